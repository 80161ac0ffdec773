"""DenseNet121 features (method.md B.1): oracle = torchvision's own densenet.py.

The pinned torchvision wheel is CUDA-built and cannot be imported on a CPU-only torch, but its
``models/densenet.py`` is plain torch. ``torchvision_densenet`` loads that file from the
installed wheel under a private package name, without torchvision's ``__init__`` (which loads
the compiled ops), so the equality tests run on CPU CI too. Where ``import torchvision`` works
(a CUDA torch), a second test checks against the imported package, in a subprocess.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import json
import pickle
import re
import socket
import subprocess
import sys
import types
import urllib.request
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipelines.backbone import (
    Backbone, WeightsMissingError, build_densenet121, cpu_has_native_bf16, default_precision,
    extract_features, load_backbone, remap_legacy_keys, weights_version,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
_SHADOW_PACKAGE = "_torchvision_source_for_tests"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def seeded_model(num_classes=1000, seed=0):
    """Our DenseNet121 with random weights *and* random batch-norm statistics, so that a
    mismatch in any buffer changes the outputs (fresh BN buffers are 0 / 1)."""
    torch.manual_seed(seed)
    model = build_densenet121(num_classes)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
            elif isinstance(module, torch.nn.Linear):
                module.bias.normal_(0.0, 0.1)
    return model.eval()


def to_legacy_keys(state_dict):
    """A state dict laid out as torchvision's densenet121-a639ec97.pth (2017): dense-layer
    names 'denselayer1.norm.1.weight', and no 'num_batches_tracked' buffers (added to batch
    norm in PyTorch 0.4.1; torchvision's remap pattern has no case for them, which is how we
    know the file lacks them). Written out here independently of ``remap_legacy_keys``."""
    return OrderedDict(
        (re.sub(r"(denselayer\d+)\.(norm|relu|conv)([12])\.", r"\1.\2.\3.", key), value)
        for key, value in state_dict.items() if not key.endswith("num_batches_tracked"))


def save_legacy_file(model, path):
    # The original file predates the zip format; torch.load must read the old one too.
    torch.save(to_legacy_keys(model.state_dict()), path, _use_new_zipfile_serialization=False)
    return path


def images(batch, size, seed=1):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def torchvision_densenet():
    """torchvision/models/densenet.py from the installed wheel, imported as a submodule of an
    empty package so that torchvision's ``__init__`` (compiled ops) never runs. Its sibling
    modules models/_api.py, _meta.py, _utils.py are the real ones; only the two imports that
    reach the image libraries are stubbed: ``transforms._presets.ImageClassification``
    (preprocessing attached to the weights enum) and ``utils._log_api_usage_once`` (telemetry).
    """
    spec = importlib.util.find_spec("torchvision")  # finds the folder, runs nothing
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("torchvision is not installed (pip install -c constraints.txt torchvision)")
    root = Path(next(iter(spec.submodule_search_locations)))
    added = {}

    def package(name, folder=None):
        module = types.ModuleType(name)
        module.__path__ = [str(folder)] if folder else []
        added[name] = module

    package(_SHADOW_PACKAGE, root)
    package(f"{_SHADOW_PACKAGE}.models", root / "models")
    package(f"{_SHADOW_PACKAGE}.transforms")
    presets = types.ModuleType(f"{_SHADOW_PACKAGE}.transforms._presets")
    presets.ImageClassification = lambda **kwargs: None
    utils = types.ModuleType(f"{_SHADOW_PACKAGE}.utils")
    utils._log_api_usage_once = lambda obj: None
    added[presets.__name__], added[utils.__name__] = presets, utils
    sys.modules.update(added)
    try:
        module = importlib.import_module(f"{_SHADOW_PACKAGE}.models.densenet")
        yield module
    finally:
        for name in [name for name in sys.modules if name.startswith(_SHADOW_PACKAGE)]:
            del sys.modules[name]


def torchvision_model(densenet_module):
    # The body of torchvision's densenet121(weights=None), without its weights enum.
    return densenet_module._densenet(32, (6, 12, 24, 16), 64, weights=None, progress=False)


# ---------------------------------------------------------------- against torchvision


def test_parameter_names_shapes_and_count_match_torchvision(torchvision_densenet):
    ours = build_densenet121(1000).state_dict()
    theirs = torchvision_model(torchvision_densenet).state_dict()
    assert [(k, tuple(v.shape)) for k, v in ours.items()] == \
        [(k, tuple(v.shape)) for k, v in theirs.items()]
    assert sum(p.numel() for p in build_densenet121(1000).parameters()) == 7_978_856
    # 7,978,856: torchvision's DenseNet121_Weights meta["num_params"].


def test_same_outputs_as_torchvision_for_the_same_weights(torchvision_densenet, tmp_path):
    ours = seeded_model()
    theirs = torchvision_model(torchvision_densenet)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    theirs.eval()
    backbone = load_backbone(save_legacy_file(ours, tmp_path / "w.pth"), precision="fp32")
    batch = images(2, 64)
    maps, pooled = extract_features(backbone, batch)
    with torch.no_grad():
        reference_maps = F.relu(theirs.features(batch))
        reference_logits = theirs(batch)
        logits = backbone.module.classifier(pooled)
    torch.testing.assert_close(maps, reference_maps)
    torch.testing.assert_close(logits, reference_logits)


def test_legacy_key_remap_agrees_with_torchvision_loader(torchvision_densenet, tmp_path):
    """torchvision's own ``_load_state_dict`` reads our legacy-named file into its model; our
    loader must end with the same tensors under every name."""
    legacy_path = save_legacy_file(seeded_model(seed=3), tmp_path / "densenet121-legacy.pth")

    class LocalWeights:  # stands in for the weights enum; no URL, no download
        @staticmethod
        def get_state_dict(progress, check_hash):
            return torch.load(legacy_path, weights_only=True)

    theirs = torchvision_model(torchvision_densenet)
    torchvision_densenet._load_state_dict(theirs, LocalWeights, progress=False)
    ours = load_backbone(legacy_path).module.state_dict()
    assert list(ours) == list(theirs.state_dict())
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours[key], value), key


def test_same_outputs_as_imported_torchvision_where_it_imports(tmp_path):
    """On a CUDA torch ``import torchvision`` works; compare with the real package there.
    A subprocess, because a failed torchvision import leaves half-registered ops behind."""
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision is not installed")
    model = seeded_model(seed=5)
    weights = save_legacy_file(model, tmp_path / "w.pth")
    batch = images(1, 64, seed=6)
    torch.save(batch, tmp_path / "x.pt")
    script = f"""
import json, sys, torch
torch.set_num_threads(1)
try:
    import torchvision
except Exception as error:
    print(json.dumps({{"import_error": f"{{type(error).__name__}}: {{error}}"}})); sys.exit(0)
from torchvision.models import densenet
class LocalWeights:  # stands in for the weights enum; no URL, no download
    @staticmethod
    def get_state_dict(progress, check_hash):
        return torch.load({str(weights)!r}, weights_only=True)
model = densenet.densenet121(weights=None)
densenet._load_state_dict(model, LocalWeights, progress=False)  # torchvision's key remap
with torch.no_grad():
    logits = model.eval()(torch.load({str(tmp_path / "x.pt")!r}))
torch.save(logits, {str(tmp_path / "logits.pt")!r})
print(json.dumps({{"version": torchvision.__version__}}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=True)
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    if "import_error" in outcome:
        pytest.skip(f"torchvision does not import here ({outcome['import_error'][:120]}); "
                    "covered by the source-file tests above")
    _, pooled = extract_features(load_backbone(weights, precision="fp32"), batch)
    with torch.no_grad():
        logits = load_backbone(weights).module.classifier(pooled)
    torch.testing.assert_close(logits, torch.load(tmp_path / "logits.pt"))


# ---------------------------------------------------------------- features


def test_feature_shapes_at_224_and_pooled_is_mean_of_relu_map(tmp_path):
    weights = tmp_path / "w.pth"
    torch.save(seeded_model().state_dict(), weights)
    backbone = load_backbone(weights, precision="fp32")
    batch = images(1, 224)
    maps, pooled = extract_features(backbone, batch)
    assert maps.shape == (1, 1024, 7, 7) and pooled.shape == (1, 1024)
    assert maps.dtype == pooled.dtype == torch.float32
    assert maps.min() >= 0 and (maps > 0).any() and (maps == 0).any()  # a ReLU was applied
    # float64 reference: the mean written out as a sum over the 49 positions
    reference = maps.double().sum(dim=(2, 3)) / 49
    torch.testing.assert_close(pooled.double(), reference, rtol=1e-6, atol=1e-7)
    with torch.no_grad():  # the network's own forward uses the same pooled vector
        torch.testing.assert_close(backbone.module.classifier(pooled), backbone.module(batch))


@pytest.mark.parametrize("size, spatial", [(64, 2), (96, 3), (32, 1)])
def test_map_size_is_input_over_32(tmp_path, size, spatial):
    weights = tmp_path / "w.pth"
    torch.save(build_densenet121().state_dict(), weights)
    maps, _ = extract_features(load_backbone(weights), images(1, size))
    assert maps.shape == (1, 1024, spatial, spatial)


def test_cpu_features_are_deterministic_and_batch_independent(tmp_path):
    weights = tmp_path / "w.pth"
    torch.save(seeded_model().state_dict(), weights)
    backbone = load_backbone(weights)
    batch = images(3, 64)
    first = extract_features(backbone, batch)
    again = extract_features(load_backbone(weights), batch)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    _, alone = extract_features(backbone, batch[1:2])
    torch.testing.assert_close(alone, first[1][1:2], rtol=1e-5, atol=1e-6)


def test_bf16_option_on_cpu_is_close_to_fp32(tmp_path):
    weights = tmp_path / "w.pth"
    torch.save(seeded_model().state_dict(), weights)
    batch = images(1, 64)
    _, exact = extract_features(load_backbone(weights, precision="fp32"), batch)
    bf16 = load_backbone(weights, precision="bf16")
    assert bf16.precision == "bf16"
    _, approximate = extract_features(bf16, batch)
    assert approximate.dtype == torch.float32
    relative = (approximate - exact).norm() / exact.norm()
    assert 0 < relative < 0.05  # bf16 has 8 significant bits: close, not equal


@pytest.mark.parametrize("native_bf16, expected", [(True, "bf16"), (False, "fp32")])
def test_cpu_default_precision_follows_native_bf16(native_bf16, expected):
    """oneDNN emulates bf16 where the CPU lacks it, slower than fp32: detected, not set."""
    assert default_precision("cpu", native_bf16=native_bf16) == expected
    assert default_precision("cuda", native_bf16=False) == "bf16"


def test_default_precision_is_the_detected_one_and_close_to_fp32_per_image(tmp_path):
    weights = tmp_path / "w.pth"
    torch.save(seeded_model().state_dict(), weights)
    backbone = load_backbone(weights)
    assert backbone.precision == ("bf16" if cpu_has_native_bf16() else "fp32")
    batch = images(4, 96)
    _, pooled = extract_features(backbone, batch)
    _, exact = extract_features(load_backbone(weights, precision="fp32"), batch)
    per_image = (pooled - exact).norm(dim=1) / exact.norm(dim=1)
    assert float(per_image.max()) < 1e-2  # the features stay what they are, image by image


@pytest.mark.parametrize("bad, reason", [
    (torch.zeros(3, 64, 64), "no batch dimension"),
    (torch.zeros(1, 1, 64, 64), "grey, not 3 channels"),
    (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), "raw pixels, not normalised floats"),
    (torch.zeros(1, 3, 16, 16), "smaller than 29 pixels"),
])
def test_extract_features_rejects_bad_input(tmp_path, bad, reason):
    weights = tmp_path / "w.pth"
    torch.save(build_densenet121().state_dict(), weights)
    with pytest.raises(ValueError):
        extract_features(load_backbone(weights), bad)


def test_extract_features_refuses_training_mode(tmp_path):
    weights = tmp_path / "w.pth"
    torch.save(build_densenet121().state_dict(), weights)
    backbone = load_backbone(weights)
    backbone.module.train()
    with pytest.raises(ValueError, match="training mode"):
        extract_features(backbone, images(2, 64))


# ---------------------------------------------------------------- loading


def test_torchvision_format_state_dict_loads_strictly(tmp_path):
    model = seeded_model(seed=2)
    legacy = to_legacy_keys(model.state_dict())
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy  # really the old names
    assert not [key for key in legacy if "norm1" in key or "num_batches" in key]
    backbone = load_backbone(save_legacy_file(model, tmp_path / "densenet121-a639ec97.pth"))
    assert isinstance(backbone, Backbone) and not backbone.module.training
    assert backbone.module.classifier.out_features == 1000 and backbone.metadata == {}
    loaded = backbone.module.state_dict()
    assert list(loaded) == list(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(loaded[key], value), key


def test_remap_legacy_keys_renames_only_dense_layer_keys():
    state = OrderedDict([
        ("features.conv0.weight", torch.zeros(1)),
        ("features.denseblock2.denselayer12.norm.2.running_var", torch.zeros(1)),
        ("features.denseblock2.denselayer12.conv.1.weight", torch.zeros(1)),
        ("features.transition1.norm.weight", torch.zeros(1)),
        ("classifier.bias", torch.zeros(1)),
    ])
    assert list(remap_legacy_keys(state)) == [
        "features.conv0.weight",
        "features.denseblock2.denselayer12.norm2.running_var",
        "features.denseblock2.denselayer12.conv1.weight",
        "features.transition1.norm.weight",
        "classifier.bias",
    ]


def test_model_version_is_the_weights_file_hash(tmp_path):
    weights = tmp_path / "w.pth"
    torch.save(build_densenet121().state_dict(), weights)
    expected = "densenet121:sha256:" + hashlib.sha256(weights.read_bytes()).hexdigest()[:16]
    assert load_backbone(weights).model_version == expected == weights_version(weights)


def test_trunk_only_state_dict_loads(tmp_path):
    weights = tmp_path / "trunk.pth"
    torch.save(build_densenet121(None).state_dict(), weights)
    assert isinstance(load_backbone(weights).module.classifier, torch.nn.Identity)


@pytest.mark.parametrize("weights_path", [None, "does/not/exist.pth"])
def test_missing_weights_message_names_both_options(weights_path):
    with pytest.raises(WeightsMissingError) as caught:
        load_backbone(weights_path)
    message = str(caught.value)
    assert isinstance(caught.value, FileNotFoundError)
    for option in ("image_weights", "PACS_IMAGE_WEIGHTS", "TOML", "densenet121",
                   "pacs-annotate train-backbone"):
        assert option in message
    if weights_path:
        assert weights_path in message


def test_wrong_state_dict_is_rejected(tmp_path):
    state = build_densenet121(1000).state_dict()
    del state["features.norm5.running_var"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="not a DenseNet121 state dict"):
        load_backbone(tmp_path / "partial.pth")
    torch.save({"fc.weight": torch.zeros(10, 512)}, tmp_path / "resnet.pth")
    with pytest.raises(ValueError, match="not a DenseNet121 state dict"):
        load_backbone(tmp_path / "resnet.pth")


class _RunsCode:
    def __reduce__(self):
        return (print, ("unpickled code ran",))


def test_weights_file_is_never_unpickled_as_code(tmp_path, capsys):
    with open(tmp_path / "evil.pth", "wb") as handle:
        pickle.dump({"x": _RunsCode()}, handle, protocol=2)
    with pytest.raises(pickle.UnpicklingError):
        load_backbone(tmp_path / "evil.pth")
    assert "unpickled code ran" not in capsys.readouterr().out


def test_precision_is_validated(tmp_path):
    weights = tmp_path / "w.pth"
    torch.save(build_densenet121().state_dict(), weights)
    with pytest.raises(ValueError, match="precision"):
        load_backbone(weights, precision="int8")


# ---------------------------------------------------------------- no network


def test_no_network_is_used_to_build_load_and_extract(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    weights = save_legacy_file(build_densenet121(1000), tmp_path / "w.pth")
    maps, pooled = extract_features(load_backbone(weights), images(1, 64))
    assert pooled.shape == (1, 1024)


@pytest.mark.parametrize("source", ["pipelines/backbone.py", "pipelines/backbone_training.py"])
def test_no_hub_or_download_code_is_reachable(source):
    """Nothing that can fetch weights is imported or referenced (torchvision's ``weights=``
    download included: torchvision is not imported at all)."""
    tree = ast.parse((REPO_ROOT / source).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    forbidden = ("torchvision", "torch.hub", "urllib", "requests", "http", "socket", "timm")
    assert not [name for name in imported if name.startswith(forbidden)]
    attributes = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    assert not attributes & {"hub", "load_state_dict_from_url", "download_url_to_file",
                             "urlopen", "get_state_dict"}
