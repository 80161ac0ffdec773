"""DenseNet121 image features (method.md B.1).

For every image, resized to 224 x 224 and ImageNet-normalised, the trunk gives::

    maps   = ReLU(features(x))              # (1024, 7, 7)
    pooled = mean over the 7 x 7 positions  # (1024,)

``features`` is torchvision's DenseNet121 trunk (Huang et al. 2017, "Densely Connected
Convolutional Networks", CVPR; torchvision's ``DenseNet.forward`` applies the same ReLU and
global average before its classifier).

The network is defined here, in plain torch, with torchvision's module and parameter names, so
that torchvision's ImageNet file (``densenet121-a639ec97.pth``, old-style keys such as
``denselayer1.norm.1.weight``) loads with ``strict=True``. torchvision itself is not imported:
the pinned torchvision wheel is built against CUDA and fails at import on a CPU-only torch, and
its ``weights=`` path downloads from a hub, which this service must never do. The equality of
this network and torchvision's is a test (tests/test_backbone.py); docs/backbone.md says why.

Weights come from a local file only (``load_backbone``): torchvision's state dict, or a
checkpoint written by ``pipelines.backbone_training`` (the tag-cluster classifier of B.1).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Backbone", "CHECKPOINT_FORMAT", "DenseNet121", "FEATURE_CHANNELS", "IMAGENET_NORMALISATION",
    "INPUT_SIZE", "WeightsMissingError", "build_densenet121", "cpu_has_native_bf16",
    "default_precision", "extract_features",
    "load_backbone", "remap_legacy_keys", "weights_version",
]

log = logging.getLogger(__name__)

INPUT_SIZE = 224
FEATURE_CHANNELS = 1024
MIN_INPUT_SIZE = 29
# Below 29 pixels the last transition's 2 x 2 average pool has nothing to pool
# (torchvision's weights metadata gives the same min_size).
IMAGENET_NORMALISATION = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
CHECKPOINT_FORMAT = "pacs-annotate/densenet121-checkpoint/1"
# Marks our own checkpoints; any other file is read as a bare state dict (torchvision's).

Precision = Literal["fp32", "bf16", "fp16"]
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

_LEGACY_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
    r"((?:[12])\.(?:weight|bias|running_mean|running_var))$")
# torchvision's own pattern (models/densenet.py, _load_state_dict): the 2017 files name the
# layers 'norm.1', 'conv.2', ...; module names may no longer contain dots, so the current
# modules are 'norm1', 'conv2'.

_GROWTH_RATE = 32
_BLOCK_CONFIG = (6, 12, 24, 16)
_INIT_FEATURES = 64
_BOTTLENECK_WIDTH = 4  # torchvision's bn_size: the 1 x 1 conv gives 4 * growth channels


class WeightsMissingError(FileNotFoundError):
    """No weights file for the image backbone (method.md B.1): features are never computed
    from random weights, and never downloaded."""


class _DenseLayer(nn.Module):
    """BN-ReLU-Conv1x1-BN-ReLU-Conv3x3 giving ``growth_rate`` new channels."""

    def __init__(self, in_channels: int, growth_rate: int, bottleneck_width: int):
        super().__init__()
        bottleneck = bottleneck_width * growth_rate
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, bottleneck, kernel_size=1, stride=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bottleneck)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bottleneck, growth_rate, kernel_size=3, stride=1, padding=1,
                               bias=False)

    def forward(self, concatenated: torch.Tensor) -> torch.Tensor:
        bottleneck = self.conv1(self.relu1(self.norm1(concatenated)))
        return self.conv2(self.relu2(self.norm2(bottleneck)))


class _DenseBlock(nn.ModuleDict):
    """Each layer sees the concatenation of the block input and every earlier layer's output."""

    def __init__(self, num_layers: int, in_channels: int, growth_rate: int,
                 bottleneck_width: int):
        super().__init__()
        for index in range(num_layers):
            self.add_module(f"denselayer{index + 1}", _DenseLayer(
                in_channels + index * growth_rate, growth_rate, bottleneck_width))

    def forward(self, block_input: torch.Tensor) -> torch.Tensor:
        outputs = [block_input]
        for layer in self.values():
            outputs.append(layer(torch.cat(outputs, 1)))
        return torch.cat(outputs, 1)


class _Transition(nn.Sequential):
    """BN-ReLU-Conv1x1 halving the channels, then 2 x 2 average pooling."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNet121(nn.Module):
    """DenseNet-BC 121 with torchvision's module names (method.md B.1).

    ``features`` is the trunk, ``classifier`` a linear head on the pooled ReLU of the trunk
    (``nn.Identity`` when built without classes). Parameter names, shapes and the initialisation
    are torchvision's ``densenet121(weights=None)``.

    Parameters
    ----------
    num_classes : int or None
        Outputs of the classifier; None builds the trunk alone (``forward`` then returns the
        (B, 1024) pooled features).
    """

    def __init__(self, num_classes: int | None = None):
        super().__init__()
        self.features = nn.Sequential(OrderedDict([
            ("conv0", nn.Conv2d(3, _INIT_FEATURES, kernel_size=7, stride=2, padding=3,
                                bias=False)),
            ("norm0", nn.BatchNorm2d(_INIT_FEATURES)),
            ("relu0", nn.ReLU(inplace=True)),
            ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
        ]))
        channels = _INIT_FEATURES
        for index, num_layers in enumerate(_BLOCK_CONFIG):
            self.features.add_module(f"denseblock{index + 1}", _DenseBlock(
                num_layers, channels, _GROWTH_RATE, _BOTTLENECK_WIDTH))
            channels += num_layers * _GROWTH_RATE
            if index != len(_BLOCK_CONFIG) - 1:
                self.features.add_module(f"transition{index + 1}",
                                         _Transition(channels, channels // 2))
                channels //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(channels))
        self.num_classes = num_classes
        self.classifier: nn.Module = (
            nn.Identity() if num_classes is None else nn.Linear(channels, num_classes))
        # torchvision's initialisation, so a model trained here starts where torchvision's would.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.constant_(module.weight, 1)
                nn.init.constant_(module.bias, 0)
            elif isinstance(module, nn.Linear):
                nn.init.constant_(module.bias, 0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        maps = F.relu(self.features(images))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(maps, 1), 1))


def build_densenet121(num_classes: int | None = None) -> DenseNet121:
    """DenseNet121 with random (torchvision-style) initial weights (method.md B.1).

    ``num_classes=None`` gives the trunk without a classifier; ``1000`` matches torchvision's
    ImageNet model; ``K`` the tag-cluster classifier of ``train-backbone``. Nothing is loaded.
    """
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"num_classes must be positive or None, got {num_classes}")
    return DenseNet121(num_classes)


def remap_legacy_keys(state_dict: Mapping[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """Rename torchvision's 2017 keys (``...denselayer1.norm.1.weight``) to the current ones
    (``...denselayer1.norm1.weight``), as torchvision does when it loads that file. Other keys
    and the order are kept."""
    renamed: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, value in state_dict.items():
        match = _LEGACY_KEY.match(key)
        renamed[match.group(1) + match.group(2) if match else key] = value
    return renamed


def weights_version(weights_path: str | os.PathLike) -> str:
    """``"densenet121:sha256:<first 16 hex digits of the file's SHA-256>"``: the version
    recorded with every feature row, so features from different weights are never mixed."""
    digest = hashlib.sha256()
    with open(weights_path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return f"densenet121:sha256:{digest.hexdigest()[:16]}"


@dataclass
class Backbone:
    """A loaded DenseNet121 in eval mode, ready for ``extract_features`` (method.md B.1).

    Attributes
    ----------
    module : DenseNet121
        Full network as stored in the weights file (classifier included); features use
        ``module.features`` only.
    device : torch.device
    model_version : str
        ``"densenet121:sha256:<16 hex>"`` of the weights file.
    precision : {"fp32", "bf16", "fp16"}
        Autocast dtype of ``extract_features`` ("fp32": no autocast).
    metadata : dict
        The checkpoint's metadata (``pipelines.backbone_training``), empty for a bare state dict.
    """

    module: DenseNet121
    device: torch.device
    model_version: str
    precision: Precision = "fp32"
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def input_size(self) -> int:
        """The side of the square images the image worker feeds this network.

        A ``train-backbone`` checkpoint records its training resolution (``input_size``);
        features taken near it rank best (trained at 64 px on MedNIST: P@20 96.95 % at 64,
        89.9 % at 224; docs/backbone.md). Other weights (torchvision's ImageNet file) get
        :data:`INPUT_SIZE`, 224 (method.md B.1).
        """
        trained = self.metadata.get("input_size")
        if not trained:
            return INPUT_SIZE
        side = int(trained[-1]) if isinstance(trained, (list, tuple)) else int(trained)
        return max(side, MIN_INPUT_SIZE)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs oneDNN's bf16 convolutions natively (AVX-512 BF16 or AMX).

    Without those instructions oneDNN emulates bf16 and is slower than fp32, so the answer
    decides the CPU default of :func:`default_precision`; it is detected, never configured.
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def default_precision(device: str | torch.device, *,
                      native_bf16: bool | None = None) -> Precision:
    """The autocast precision :func:`load_backbone` uses when none is given (method.md B.1).

    bf16 on CUDA, and on CPUs with native bf16 (``native_bf16``; detected by
    :func:`cpu_has_native_bf16` when None); fp32 elsewhere. bf16 keeps fp32's exponent range,
    so the unnormalised trunk output cannot overflow; on real images it keeps pooled
    features within 0.5 % of fp32 and retrieval unchanged (benchmarks/image_worker/README.md,
    "CPU precision").
    """
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16"
    if device.type == "cpu":
        if native_bf16 is None:
            native_bf16 = cpu_has_native_bf16()
        return "bf16" if native_bf16 else "fp32"
    return "fp32"


def _missing_weights_message(weights_path: str | os.PathLike | None) -> str:
    where = ("no image backbone weights are configured" if weights_path is None
             else f"image backbone weights file not found: {os.fspath(weights_path)}")
    return (f"{where}. Either set image_weights (environment PACS_IMAGE_WEIGHTS, or "
            "image_weights in the TOML config) to a local file: torchvision's DenseNet121 "
            "ImageNet state dict (densenet121-*.pth) or a checkpoint written by "
            "train-backbone; or run `pacs-annotate train-backbone` to train one on this "
            "site's images. Weights are never downloaded.")


def _read_weights_file(weights_path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    # weights_only: a weights file is data; unpickling arbitrary objects would run code.
    stored = torch.load(weights_path, map_location="cpu", weights_only=True)
    if not isinstance(stored, Mapping):
        raise ValueError(f"{weights_path}: expected a state dict or a train-backbone "
                         f"checkpoint, got {type(stored).__name__}")
    if stored.get("format") == CHECKPOINT_FORMAT:
        return dict(stored["model_state"]), dict(stored.get("metadata", {}))
    if not all(isinstance(value, torch.Tensor) for value in stored.values()):
        raise ValueError(f"{weights_path}: not a state dict (values other than tensors) and "
                         f"not a train-backbone checkpoint")
    return dict(stored), {}


def load_backbone(
    weights_path: str | os.PathLike | None,
    *,
    device: str | torch.device = "cpu",
    precision: Precision | None = None,
) -> Backbone:
    """Load DenseNet121 weights from a local file (method.md B.1).

    Parameters
    ----------
    weights_path : path or None
        torchvision's ImageNet state dict (old-style keys are renamed as torchvision does) or a
        ``train-backbone`` checkpoint. Loaded with ``strict=True``: every parameter and buffer
        must be present with torchvision's name and shape.
    device : str or torch.device
    precision : {"fp32", "bf16", "fp16"} or None
        Autocast dtype for ``extract_features``. None: :func:`default_precision` (bf16 on
        CUDA and on CPUs with native bf16 instructions, fp32 elsewhere).

    Returns
    -------
    Backbone
        In eval mode on ``device``, in channels_last memory format (oneDNN's and cuDNN's
        fastest convolution layout; benchmarks/image_worker/README.md).

    Raises
    ------
    WeightsMissingError
        ``weights_path`` is None or does not exist; the message says how to get weights.
    ValueError
        The file is not a DenseNet121 state dict or checkpoint.
    """
    if weights_path is None or not Path(weights_path).is_file():
        raise WeightsMissingError(_missing_weights_message(weights_path))
    weights_path = Path(weights_path)
    state_dict, metadata = _read_weights_file(weights_path)
    state_dict = remap_legacy_keys(state_dict)
    classifier_weight = state_dict.get("classifier.weight")
    num_classes = None if classifier_weight is None else int(classifier_weight.shape[0])
    module = build_densenet121(num_classes)
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise ValueError(f"{weights_path}: not a DenseNet121 state dict: {error}") from None

    device = torch.device(device)
    if precision is None:
        precision = default_precision(device)
    if precision not in ("fp32", *_AUTOCAST_DTYPES):
        raise ValueError(f"precision must be 'fp32', 'bf16' or 'fp16', got {precision!r}")
    module = module.eval().to(device).to(memory_format=torch.channels_last)
    version = weights_version(weights_path)
    log.info("image backbone %s loaded from %s on %s (%s)", version, weights_path, device,
             precision)
    return Backbone(module=module, device=device, model_version=version, precision=precision,
                    metadata=metadata)


def extract_features(
    backbone: Backbone, images: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Trunk feature maps and their global average (method.md B.1).

    Parameters
    ----------
    backbone : Backbone
        From ``load_backbone``, in eval mode.
    images : Tensor of shape (B, 3, H, W), float
        Normalised images (ImageNet mean/std); H = W = 224 gives 7 x 7 maps.

    Returns
    -------
    maps : Tensor of shape (B, 1024, H/32, W/32), float32, on the CPU
        ``ReLU(features(images))``.
    pooled : Tensor of shape (B, 1024), float32, on the CPU
        Mean of ``maps`` over the spatial positions.

    Runs under ``inference_mode`` with channels_last input and autocast at
    ``backbone.precision``. The trunk's output is cast to float32 before the ReLU and the mean,
    so ``pooled`` is exactly the mean of the returned ``maps``.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be normalised floats, got {images.dtype}")
    if min(images.shape[2:]) < MIN_INPUT_SIZE:
        raise ValueError(f"images must be at least {MIN_INPUT_SIZE} x {MIN_INPUT_SIZE} "
                         f"pixels, got {tuple(images.shape[2:])}")
    if backbone.module.training:
        raise ValueError("backbone module is in training mode: batch norm would use batch "
                         "statistics; call module.eval()")
    device = backbone.device
    use_cuda = device.type == "cuda"
    autocast_dtype = _AUTOCAST_DTYPES.get(backbone.precision)
    with torch.inference_mode():
        batch = images.to(device, dtype=torch.float32, non_blocking=use_cuda)
        batch = batch.contiguous(memory_format=torch.channels_last)
        autocast = (contextlib.nullcontext() if autocast_dtype is None
                    else torch.autocast(device_type=device.type, dtype=autocast_dtype))
        with autocast:
            trunk = backbone.module.features(batch)
        maps = F.relu(trunk.float()).contiguous()
        pooled = maps.mean(dim=(2, 3))
    return maps.cpu(), pooled.cpu()
