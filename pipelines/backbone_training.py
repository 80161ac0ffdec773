"""``train-backbone``: DenseNet121 trained to predict each image's tag cluster (method.md B.1).

Where a site has no local copy of torchvision's ImageNet weights, the feature extractor is
trained on the site's own images. The target needs no human labels: the tag cluster of part A
(the paper trained DenseNet121 from scratch on 40,000 NIH chest X-rays; RadiologyNet proposed
tag clusters as exactly this kind of pseudo-label). Objective, on the training split::

    min_theta  sum_i w_{y_i} * CE(classifier(mean_hw ReLU(features_theta(aug(x_i)))), y_i)

with ``w_c = n_train / (K * n_c)`` when ``balance_classes`` (tag clusters are very unequal in
size; without the weights the network can score well by predicting the largest ones).

Procedure

* Held-out split by group (``group_split``): every image of one study (or patient) is on the
  same side, so the held-out score is not flattered by near-copies of training images (slices
  of one series, views of one study). Without groups, a per-image stratified split.
* Augmentation on each training batch (``RadiologyAugment``): random crop with small
  rotation, window and intensity (gamma) jitter; seeded by ``(seed, epoch, batch)``.
* AdamW with a per-step learning rate: linear warm-up, then cosine decay (``warmup_cosine_lr``).
* Mixed precision where it is native: autocast bf16 on CUDA (fp16 with a gradient scaler where
  bf16 is missing) and on CPUs with AVX-512 BF16 or AMX; channels_last memory format.
* After every epoch: validation loss, accuracy, balanced accuracy (mean per-class recall) and
  per-class accuracy (``classification_scores``), computed at the precision the image worker
  uses on that device. An epoch *improves* when its balanced accuracy is higher than the best
  so far, or equal with a lower validation loss. Training stops after ``patience`` epochs in a
  row without improvement (early stopping), or after ``epochs`` epochs.
* Files in ``checkpoint_dir``: ``best.pt`` (weights of the best epoch + metadata; what
  ``pipelines.backbone.load_backbone`` reads for features) and ``last.pt`` (the same format plus
  the training state: optimizer, gradient scaler, epoch, position inside an unfinished epoch,
  early-stopping state, history, RNG states). ``last.pt`` is also written inside an epoch every
  ``checkpoint_seconds`` and when ``stop`` is set. Both are written to a temporary file and
  renamed, so an interruption leaves the previous complete file.
* Resume: with ``resume=True`` and a ``last.pt`` from the same run (same classes, labels,
  groups, split and hyper-parameters), training continues at the batch after the saved one.
  Batch order, augmentation and learning rate depend only on ``(seed, epoch, batch)``, so on
  the CPU a resumed run gives the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import random
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from pipelines.backbone import (
    CHECKPOINT_FORMAT, IMAGENET_NORMALISATION, MIN_INPUT_SIZE, DenseNet121, build_densenet121,
)

__all__ = ["BEST_CHECKPOINT", "LAST_CHECKPOINT", "RadiologyAugment", "TrainingResult",
           "classification_scores", "cpu_has_native_bf16", "group_split", "merge_small_classes",
           "stratified_split",
           "train_backbone", "warmup_cosine_lr"]

log = logging.getLogger(__name__)

BEST_CHECKPOINT = "best.pt"
LAST_CHECKPOINT = "last.pt"


@dataclass(frozen=True)
class TrainingResult:
    """Outcome of ``train_backbone`` (method.md B.1).

    Attributes
    ----------
    best_val_accuracy : float
        Held-out accuracy of the weights in ``checkpoint_path``.
    best_val_balanced_accuracy : float
        Their held-out balanced accuracy (mean per-class recall), the early-stopping criterion.
    best_val_per_class_accuracy : list of float or None
        Their held-out accuracy per class index; None for a class with no held-out image.
    best_epoch : int
        1-based epoch those weights come from (0: no epoch finished yet).
    epochs_run : int
        Epochs completed in total, those of earlier interrupted calls included.
    stopped_early : bool
        True when ``patience`` epochs passed without improvement before ``epochs``.
    interrupted : bool
        True when ``stop`` was set: ``last.pt`` holds the position, call again to continue.
    checkpoint_path : Path
        ``best.pt``: loadable by ``pipelines.backbone.load_backbone``.
    history : list of dict
        One record per epoch: epoch, the metrics, seconds, images/s, learning rate, improved.
    n_train, n_val : int
        Sizes of the two sides of the split.
    """

    best_val_accuracy: float
    best_val_balanced_accuracy: float
    best_val_per_class_accuracy: list[float | None]
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    interrupted: bool
    checkpoint_path: Path
    history: list[dict[str, Any]]
    n_train: int = 0
    n_val: int = 0


# --------------------------------------------------------------------------- pure maths


def stratified_split(
    labels: Sequence[int], *, val_fraction: float, seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split into training and validation indices (method.md B.1).

    Every class with ``n_c >= 2`` members puts ``round(n_c * val_fraction)`` of them, at least
    one and at most ``n_c - 1``, into validation; a class with a single member stays in
    training.

    Parameters
    ----------
    labels : sequence of int, length n
    val_fraction : float in (0, 1)
    seed : int

    Returns
    -------
    train_indices, val_indices : ndarray of int64, sorted, disjoint, together 0..n-1
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    val_parts = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        if members.size < 2:
            continue
        n_val = min(max(int(round(members.size * val_fraction)), 1), members.size - 1)
        val_parts.append(members[:n_val])
    val_indices = np.sort(np.concatenate(val_parts)) if val_parts else np.empty(0, np.int64)
    train_mask = np.ones(labels.size, dtype=bool)
    train_mask[val_indices] = False
    return np.flatnonzero(train_mask).astype(np.int64), val_indices.astype(np.int64)


def group_split(
    labels: Sequence[int], groups: Sequence[Any] | None, *, val_fraction: float, seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split that keeps every group (study or patient) on one side (method.md B.1).

    Each group is filed under its *dominant class* (its most frequent label; ties: the
    smallest). For every class, its groups are taken in a seeded random order into validation
    while the class's validation images number fewer than ``t_c = round(n_c * val_fraction)``
    (at least 1), where ``n_c`` counts the images of the groups filed under that class; its
    last group always stays in training, so a class with a single group stays in training
    altogether. Whole groups move, so the validation share of a class is ``t_c`` or more, by
    less than one group.

    ``groups=None`` (no grouping) is :func:`stratified_split`, the case of one image per group.

    Parameters
    ----------
    labels : sequence of int, length n
    groups : sequence of hashable of length n, or None
    val_fraction : float in (0, 1)
    seed : int

    Returns
    -------
    train_indices, val_indices : ndarray of int64, sorted, disjoint, together 0..n-1; no group
        has members in both.
    """
    if groups is None:
        return stratified_split(labels, val_fraction=val_fraction, seed=seed)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    labels = np.asarray(labels, dtype=np.int64)
    if len(groups) != labels.size:
        raise ValueError(f"groups must have one entry per label ({labels.size}), "
                         f"got {len(groups)}")
    _, group_codes = np.unique(np.asarray(groups, dtype=object).astype(str),
                               return_inverse=True)
    n_groups = int(group_codes.max()) + 1 if group_codes.size else 0
    n_classes = int(labels.max()) + 1 if labels.size else 0
    counts = np.zeros((n_groups, n_classes), dtype=np.int64)
    np.add.at(counts, (group_codes, labels), 1)
    dominant = counts.argmax(axis=1)  # argmax takes the first maximum: the smallest label
    sizes = counts.sum(axis=1)
    rng = np.random.default_rng(seed)
    in_val = np.zeros(n_groups, dtype=bool)
    for label in range(n_classes):
        members = rng.permutation(np.flatnonzero(dominant == label))
        target = max(int(round(sizes[members].sum() * val_fraction)), 1)
        taken = 0
        for group in members[:-1]:
            if taken >= target:
                break
            in_val[group] = True
            taken += int(sizes[group])
    val_mask = in_val[group_codes]
    return (np.flatnonzero(~val_mask).astype(np.int64),
            np.flatnonzero(val_mask).astype(np.int64))


def merge_small_classes(
    sizes: Sequence[int], distances: np.ndarray | None, *, min_size: int,
) -> np.ndarray:
    """The class each tag cluster is trained as, so that no image is dropped (method.md B.1).

    A cluster with ``min_size`` images or more is *kept* and trained as itself; a smaller one
    joins the kept cluster whose medoid is nearest to its own medoid (``distances[i, j]``: the
    Gower distance between the medoids of clusters i and j, method.md A.4; ties: the lower
    index). When fewer than two clusters reach ``min_size``, the two largest are kept (ties:
    the lower index), which is what a coarser clustering would give. ``distances=None`` sends
    every small cluster to the largest kept one.

    Parameters
    ----------
    sizes : sequence of int, length K >= 2
    distances : ndarray of shape (K, K) or None
    min_size : int

    Returns
    -------
    ndarray of int64, length K: ``target[i]`` is i for a kept cluster, else the kept cluster it
    joins.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    if sizes.size < 2:
        raise ValueError(f"need at least 2 clusters, got {sizes.size}")
    kept = np.flatnonzero(sizes >= min_size)
    if kept.size < 2:
        kept = np.sort(np.argsort(-sizes, kind="stable")[:2])
    target = np.arange(sizes.size, dtype=np.int64)
    small = np.setdiff1d(target, kept)
    if small.size:
        if distances is None:
            target[small] = kept[np.argmax(sizes[kept])]
        else:
            distances = np.asarray(distances, dtype=np.float64)
            target[small] = kept[np.argmin(distances[np.ix_(small, kept)], axis=1)]
    return target


def warmup_cosine_lr(step: int, *, base_lr: float, warmup_steps: int, total_steps: int,
                     final_fraction: float = 0.01) -> float:
    """Learning rate of optimiser step ``step`` (0-based): linear warm-up, then cosine decay.

    ::

        lr(s) = base * (s + 1) / W                                      s < W
        lr(s) = base * (f + (1 - f) * (1 + cos(pi * (s - W) / (T - W))) / 2)   W <= s < T

    with ``W = warmup_steps``, ``T = total_steps``, ``f = final_fraction``; steps at or past T
    keep ``base * f``. Warm-up spares the randomly initialised network large first steps
    (Goyal et al. 2017); the cosine decay is Loshchilov and Hutter's SGDR without restarts.
    """
    if step < 0 or total_steps < 1 or warmup_steps < 0:
        raise ValueError(f"need step >= 0, total_steps >= 1, warmup_steps >= 0; got {step}, "
                         f"{total_steps}, {warmup_steps}")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = total_steps - warmup_steps
    if decay_steps <= 0 or step >= total_steps:
        return base_lr * (final_fraction if step >= total_steps else 1.0)
    progress = (step - warmup_steps) / decay_steps
    return base_lr * (final_fraction + (1.0 - final_fraction)
                      * 0.5 * (1.0 + math.cos(math.pi * progress)))


def classification_scores(confusion: np.ndarray | torch.Tensor) -> dict[str, Any]:
    """Accuracy, balanced accuracy and per-class accuracy from a confusion matrix.

    ``confusion[t, p]`` counts items of true class t predicted as p (K x K). With
    ``n_t = sum_p confusion[t, p]``::

        accuracy          = trace / sum
        recall_t          = confusion[t, t] / n_t                  (classes with n_t > 0)
        balanced_accuracy = mean of recall_t over those classes

    which is ``sklearn.metrics.balanced_accuracy_score`` (a test compares them). The per-class
    accuracy is ``recall_t``, None where ``n_t = 0``.

    Returns
    -------
    dict with ``accuracy``, ``balanced_accuracy`` (floats; 0 for an empty matrix),
    ``per_class_accuracy`` (list of float or None) and ``support`` (list of n_t).
    """
    matrix = np.asarray(confusion.cpu() if isinstance(confusion, torch.Tensor) else confusion,
                        dtype=np.float64)
    support = matrix.sum(axis=1)
    total = support.sum()
    present = support > 0
    recall = np.divide(np.diag(matrix), support, out=np.zeros_like(support), where=present)
    return {"accuracy": float(np.trace(matrix) / total) if total else 0.0,
            "balanced_accuracy": float(recall[present].mean()) if present.any() else 0.0,
            "per_class_accuracy": [float(r) if p else None for r, p in zip(recall, present)],
            "support": [int(n) for n in support]}


@dataclass(frozen=True)
class RadiologyAugment:
    """Random geometric and grey-level changes of a normalised image batch (method.md B.1).

    For each image, on its grey values ``g = x * std + mean`` (in [0, 1] after the pixel
    pipeline's window):

    1. crop and rotate in one resampling: a square of side ``s`` (``s^2`` uniform in
       ``[min_crop_area, 1]``) at a random place inside the image, turned by an angle uniform
       in ``[-max_rotation, max_rotation]`` degrees, resampled bilinearly to the batch's size;
       what falls outside the image is black (0), as the pixel pipeline pads;
    2. window jitter: ``g <- clip((g - lo) / (hi - lo), 0, 1)`` with ``lo`` uniform in
       ``[-window, window]`` and ``hi`` in ``[1 - window, 1 + window]``: a window a little
       narrower or wider and shifted, as another reader's window or another scanner would give;
    3. intensity jitter: ``g <- g ** gamma``, ``log gamma`` uniform in
       ``[-log max_gamma, log max_gamma]``;

    then normalised again. No flips: left and right are not interchangeable in radiology.
    All draws come from ``generator``, so a batch's augmentation is reproducible.
    """

    min_crop_area: float = 0.6
    max_rotation: float = 10.0
    window: float = 0.1
    max_gamma: float = 1.3
    mean: tuple[float, ...] = tuple(IMAGENET_NORMALISATION["mean"])
    std: tuple[float, ...] = tuple(IMAGENET_NORMALISATION["std"])

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        batch = images.shape[0]
        mean = torch.tensor(self.mean, dtype=images.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=images.dtype).view(1, -1, 1, 1)
        grey = images * std + mean

        def uniform(low: float, high: float) -> torch.Tensor:
            return low + (high - low) * torch.rand(batch, generator=generator,
                                                   dtype=images.dtype)

        side = uniform(self.min_crop_area, 1.0).sqrt()
        angle = uniform(-self.max_rotation, self.max_rotation) * (math.pi / 180.0)
        # centre so that the unrotated crop stays inside the image (normalised coordinates)
        centre_x, centre_y = uniform(-1.0, 1.0) * (1 - side), uniform(-1.0, 1.0) * (1 - side)
        cos, sin = side * torch.cos(angle), side * torch.sin(angle)
        theta = torch.stack([torch.stack([cos, -sin, centre_x], 1),
                             torch.stack([sin, cos, centre_y], 1)], 1)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        grey = F.grid_sample(grey, grid, mode="bilinear", padding_mode="zeros",
                             align_corners=False)

        low = uniform(-self.window, self.window).view(-1, 1, 1, 1)
        high = uniform(1.0 - self.window, 1.0 + self.window).view(-1, 1, 1, 1)
        grey = ((grey - low) / (high - low)).clamp(0.0, 1.0)
        log_gamma = uniform(-math.log(self.max_gamma), math.log(self.max_gamma))
        grey = grey.pow(log_gamma.exp().view(-1, 1, 1, 1))
        return (grey - mean) / std


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX-512 BF16 or AMX tiles): there autocast
    bf16 makes DenseNet121 training faster; elsewhere it is emulated and slower."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


# --------------------------------------------------------------------------- training state


def _batch_seed(seed: int, epoch: int, batch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, batch]).generate_state(1, np.uint64)[0]
               >> np.uint64(1))


def _epoch_batches(indices: np.ndarray, *, seed: int, epoch: int,
                   batch_size: int) -> list[list[int]]:
    """The training batches of one epoch; the order depends only on ``(seed, epoch)``. A last
    batch of one image (batch norm cannot train on it) joins the batch before it."""
    order = np.random.default_rng([seed, epoch]).permutation(indices).tolist()
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2] += batches.pop()
    return batches


@dataclass
class _EarlyStopping:
    """Best (score, loss) so far and the number of epochs since it. The score is the
    held-out balanced accuracy; ``best_accuracy`` keeps the name of the checkpoints' key."""

    patience: int
    best_accuracy: float = -1.0
    best_loss: float = float("inf")
    best_epoch: int = 0
    epochs_without_improvement: int = 0

    def update(self, epoch: int, accuracy: float, loss: float) -> bool:
        improved = accuracy > self.best_accuracy or (
            accuracy == self.best_accuracy and loss < self.best_loss)
        if improved:
            self.best_accuracy, self.best_loss, self.best_epoch = accuracy, loss, epoch
            self.epochs_without_improvement = 0
        else:
            self.epochs_without_improvement += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.epochs_without_improvement >= self.patience

    def state(self) -> dict[str, Any]:
        return {"best_accuracy": self.best_accuracy, "best_loss": self.best_loss,
                "best_epoch": self.best_epoch,
                "epochs_without_improvement": self.epochs_without_improvement}


@dataclass
class _EpochTotals:
    """Running sums of the training pass, saved with an unfinished epoch."""

    num_classes: int
    loss_sum: float = 0.0
    seen: int = 0
    confusion: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    def add(self, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self.loss_sum += float(loss.detach()) * targets.numel()
        self.seen += targets.numel()
        pairs = (targets * self.num_classes + logits.detach().argmax(dim=1)).cpu()
        self.confusion += torch.bincount(pairs, minlength=self.num_classes ** 2).view(
            self.num_classes, self.num_classes)

    def scores(self) -> dict[str, Any]:
        return {"loss": self.loss_sum / max(self.seen, 1),
                **classification_scores(self.confusion)}

    def state(self) -> dict[str, Any]:
        return {"loss_sum": self.loss_sum, "seen": self.seen, "confusion": self.confusion}

    @classmethod
    def restore(cls, num_classes: int, state: Mapping[str, Any]) -> "_EpochTotals":
        totals = cls(num_classes, float(state["loss_sum"]), int(state["seen"]))
        totals.confusion = state["confusion"].clone()
        return totals


def _rng_state() -> dict[str, Any]:
    numpy_state = np.random.get_state()
    # As plain ints and lists: torch.load(weights_only=True) refuses numpy arrays.
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
    }


def _restore_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))


def _atomic_save(payload: Mapping[str, Any], path: Path) -> None:
    partial = path.with_name(path.name + ".partial")
    torch.save(dict(payload), partial)
    os.replace(partial, path)


def _mark_finished(best_path: Path, *, epochs_run: int, stopped_early: bool) -> None:
    """Record in ``best.pt`` how the run ended (its weights stay as they are)."""
    saved = torch.load(best_path, map_location="cpu", weights_only=True)
    ending = {"epochs_run": epochs_run, "stopped_early": stopped_early, "finished": True}
    if any(saved["metadata"].get(key) != value for key, value in ending.items()):
        saved["metadata"].update(ending)
        _atomic_save(saved, best_path)


def _plain_class(label: int | str) -> int | str:
    # numpy integers and other label types become int / str: weights_only loading refuses them.
    return int(label) if isinstance(label, (int, np.integer)) else str(label)


def _run_config(labels: np.ndarray, classes: Sequence[int | str], groups: Sequence[Any] | None,
                **settings: Any) -> dict:
    """What a resumed run must share with the run that wrote ``last.pt``."""
    groups_hash = None
    if groups is not None:
        groups_hash = hashlib.sha256("\x1f".join(map(str, groups)).encode()).hexdigest()
    return {"classes": [_plain_class(label) for label in classes],
            "labels_sha256": hashlib.sha256(labels.tobytes()).hexdigest(),
            "groups_sha256": groups_hash, "n_samples": int(labels.size), **settings}


def _describe(augment: Callable | None) -> str | None:
    """How the run augments, comparable between processes (a dataclass's repr names its
    settings; other callables by name)."""
    if augment is None:
        return None
    if hasattr(augment, "__dataclass_fields__"):
        return repr(augment)
    return getattr(augment, "__qualname__", type(augment).__qualname__)


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


_PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(_PRECISIONS)}; got {precision!r}")
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return (contextlib.nullcontext() if dtype is None
            else torch.autocast(device_type=device.type, dtype=dtype))


def _to_device(images: torch.Tensor, targets: Any, device: torch.device,
               channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    use_cuda = device.type == "cuda"
    images = images.to(device, dtype=torch.float32, non_blocking=use_cuda)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    targets = torch.as_tensor(targets, dtype=torch.int64).to(device, non_blocking=use_cuda)
    return images, targets


def _evaluate(model: DenseNet121, loader: DataLoader, *, device: torch.device,
              autocast_dtype: torch.dtype | None, channels_last: bool,
              num_classes: int) -> dict[str, Any]:
    """Held-out pass: mean loss, accuracy, balanced and per-class accuracy."""
    model.eval()
    totals = _EpochTotals(num_classes)
    with torch.inference_mode():
        for images, targets in loader:
            images, targets = _to_device(images, targets, device, channels_last)
            with _autocast(device, autocast_dtype):
                logits = model(images)
            totals.add(F.cross_entropy(logits.float(), targets), logits, targets)
    return totals.scores()


# --------------------------------------------------------------------------- entry point


def train_backbone(
    dataset: Dataset,
    labels: Sequence[int],
    *,
    classes: Sequence[int | str],
    checkpoint_dir: str | os.PathLike,
    tag_cluster_run: int | None,
    groups: Sequence[Any] | None = None,
    epochs: int = 30,
    batch_size: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    warmup_epochs: float = 1.0,
    val_fraction: float = 0.2,
    min_val_images: int = 30,
    patience: int = 5,
    balance_classes: bool = True,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    device: str | torch.device | None = None,
    precision: str = "auto",
    channels_last: bool = True,
    num_workers: int = 0,
    seed: int = 0,
    resume: bool = True,
    checkpoint_seconds: float = 300.0,
    normalisation: Mapping[str, Sequence[float]] = IMAGENET_NORMALISATION,
    extra_metadata: Mapping[str, Any] | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
    batch_progress: Callable[[dict[str, Any]], None] | None = None,
    stop: threading.Event | None = None,
) -> TrainingResult:
    """Train DenseNet121 to predict the tag cluster of each image (method.md B.1).

    Parameters
    ----------
    dataset : torch Dataset of length n
        Item i is ``(image, labels[i])``: image a float tensor of shape (3, H, W), already
        normalised with ``normalisation``. H x W is the training resolution (recorded as
        ``input_size``); the trunk is fully convolutional and pools globally, so the image
        worker may extract features at another size (224).
    labels : sequence of int of length n
        Class index (0..K-1, a position in ``classes``) of every item.
    classes : sequence of int or str of length K >= 2
        What each class index stands for (tag-cluster ids); stored in the checkpoint.
    checkpoint_dir : path
        Receives ``best.pt`` and ``last.pt``; created when missing.
    tag_cluster_run : int or None
        Id of the tag-clustering run the labels come from; stored in the checkpoint.
    groups : sequence of length n or None
        Study or patient of every item: the split keeps each group on one side
        (``group_split``). None: per-image split.
    epochs : int
        Largest total number of epochs (a resumed run counts the earlier ones).
    batch_size, lr, weight_decay : AdamW settings (``lr`` is the peak of the schedule).
    warmup_epochs : float
        Length of the linear warm-up, in epochs (``warmup_cosine_lr``).
    val_fraction : float in (0, 1)
        Held-out share of every class.
    min_val_images : int
        Refuse (ValueError) when the held-out side would have fewer images.
    patience : int
        Epochs without improvement of the held-out balanced accuracy (ties: loss) before
        stopping.
    balance_classes : bool
        Weight the training loss by inverse class frequency.
    augment : callable ``(batch, generator) -> batch`` or None
        Applied to each training batch on the CPU (e.g. ``RadiologyAugment()``); never to
        validation. Its draws must come from the generator (seeded per batch).
    device : str, torch.device or None
        None: CUDA when available, else CPU.
    precision : {"auto", "fp32", "bf16", "fp16"}
        Autocast dtype of the training passes. "auto": bf16 on CUDA (fp16 where bf16 is
        missing) and on CPUs with native bf16 (``cpu_has_native_bf16``), else fp32. Validation
        runs at the image worker's precision (CPU fp32, CUDA bf16).
    channels_last : bool
        Model and batches in channels_last memory format.
    num_workers : int
        DataLoader worker processes.
    seed : int
        Initial weights, split, batch order and augmentation.
    resume : bool
        Continue from ``last.pt`` when it belongs to this run; False starts over.
    checkpoint_seconds : float
        Also write ``last.pt`` inside an epoch when this many seconds passed since the last
        write, so that a killed run loses at most that much work.
    normalisation : mapping with "mean" and "std"
        What the dataset applied; recorded so that features are computed the same way.
    extra_metadata : mapping or None
        Added to the checkpoints' metadata (e.g. the clusters merged into each class).
    progress : callable or None
        Called with each epoch's record, after ``last.pt`` is written; an exception raised
        there stops training, and a later call with ``resume=True`` continues after that epoch.
    batch_progress : callable or None
        Called after every training batch with epoch, batch, batches, images, seconds, loss,
        images_per_second and lr.
    stop : threading.Event or None
        Checked after every batch: when set, ``last.pt`` is written with the position inside
        the epoch and the call returns with ``interrupted=True``.

    Returns
    -------
    TrainingResult

    Raises
    ------
    ValueError
        Invalid arguments, a held-out side smaller than ``min_val_images``, or ``last.pt`` from
        a different run while ``resume`` is True.
    """
    labels_array = np.asarray(labels, dtype=np.int64)
    num_classes = len(classes)
    if labels_array.ndim != 1 or labels_array.size != len(dataset):
        raise ValueError(f"labels must have one entry per dataset item ({len(dataset)}), "
                         f"got shape {labels_array.shape}")
    if num_classes < 2:
        raise ValueError(f"need at least 2 classes, got {num_classes}")
    if labels_array.size and (labels_array.min() < 0 or labels_array.max() >= num_classes):
        raise ValueError(f"labels must be class indices in [0, {num_classes})")
    if epochs < 1 or patience < 1 or batch_size < 2 or warmup_epochs < 0 or not lr > 0:
        raise ValueError(f"need epochs >= 1, patience >= 1, batch_size >= 2, warmup_epochs "
                         f">= 0, lr > 0; got {epochs}, {patience}, {batch_size}, "
                         f"{warmup_epochs}, {lr}")
    if groups is not None and len(groups) != labels_array.size:
        raise ValueError(f"groups must have one entry per dataset item ({len(dataset)}), "
                         f"got {len(groups)}")
    train_indices, val_indices = group_split(labels_array, groups, val_fraction=val_fraction,
                                             seed=seed)
    if train_indices.size < 2 or val_indices.size < max(min_val_images, 1):
        side = "studies or patients" if groups is not None else "images"
        raise ValueError(
            f"the held-out set would have {val_indices.size} images ({train_indices.size} for "
            f"training), fewer than the {min_val_images} needed for its accuracy to mean "
            f"anything: the archive has too few {side} per tag cluster; add images, use a "
            f"coarser tag clustering run (fewer clusters) or raise the held-out fraction")

    device = _resolve_device(device)
    use_cuda = device.type == "cuda"
    autocast_dtype = _autocast_dtype(precision, device)
    eval_dtype = torch.bfloat16 if use_cuda else None  # load_backbone's default precision
    precision_name = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    steps_per_epoch = len(_epoch_batches(train_indices, seed=seed, epoch=1,
                                         batch_size=batch_size))
    warmup_steps = int(round(warmup_epochs * steps_per_epoch))
    total_steps = epochs * steps_per_epoch

    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    best_path, last_path = checkpoint_dir / BEST_CHECKPOINT, checkpoint_dir / LAST_CHECKPOINT
    tag_cluster_run = None if tag_cluster_run is None else int(tag_cluster_run)
    config = _run_config(labels_array, classes, groups, tag_cluster_run=tag_cluster_run,
                         val_fraction=float(val_fraction), seed=int(seed),
                         batch_size=int(batch_size), lr=float(lr),
                         weight_decay=float(weight_decay), warmup_epochs=float(warmup_epochs),
                         epochs=int(epochs), balance_classes=bool(balance_classes),
                         augment=_describe(augment), precision=precision_name[autocast_dtype])

    # Initial weights from the seed without touching the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_densenet121(num_classes)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype is torch.float16)
    stopping = _EarlyStopping(patience)
    history: list[dict[str, Any]] = []
    start_epoch, partial = 0, None
    stopped_early = False

    if resume and last_path.is_file():
        saved = torch.load(last_path, map_location="cpu", weights_only=True)
        saved_config = saved["training_state"]["config"]
        if saved_config != config:
            differing = sorted(key for key in config.keys() | saved_config.keys()
                               if config.get(key) != saved_config.get(key))
            raise ValueError(f"{last_path} is from a different training run (differs in "
                             f"{', '.join(differing)}); pass resume=False to start over")
        state = saved["training_state"]
        model.load_state_dict(saved["model_state"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        stopping = _EarlyStopping(patience, **state["early_stopping"])
        history = list(state["history"])
        start_epoch = int(state["epoch"])
        partial = state.get("partial_epoch")
        stopped_early = bool(state["stopped_early"])
        _restore_rng_state(state["rng"])
        where = (f"batch {partial['batches_done']} of epoch {start_epoch + 1}" if partial
                 else f"epoch {start_epoch}")
        log.info("resuming backbone training from %s after %s", last_path, where)

    input_size = [int(size) for size in dataset[int(train_indices[0])][0].shape[-2:]]
    if min(input_size) < MIN_INPUT_SIZE:
        raise ValueError(f"images must be at least {MIN_INPUT_SIZE} x {MIN_INPUT_SIZE} "
                         f"pixels, got {input_size}")
    train_counts = np.bincount(labels_array[train_indices], minlength=num_classes)
    class_weights = None
    if balance_classes:
        weights = train_counts.sum() / (num_classes * np.maximum(train_counts, 1))
        class_weights = torch.as_tensor(weights, dtype=torch.float32, device=device)
    loader_options = {"num_workers": num_workers, "pin_memory": use_cuda}
    val_loader = DataLoader(dataset, sampler=val_indices.tolist(), batch_size=batch_size,
                            **loader_options)
    best_scores: dict[str, Any] = {}

    def metadata(epoch: int) -> dict[str, Any]:
        return {
            "architecture": "densenet121",
            "target": "tag cluster (method.md B.1)",
            "tag_cluster_run": tag_cluster_run,
            "classes": config["classes"],
            "epoch": epoch,  # the weights' epoch
            "epochs_run": epoch,  # final count written into best.pt when training ends
            "finished": False,
            "stopped_early": False,
            "best_epoch": stopping.best_epoch,
            "best_val_accuracy": best_scores.get("accuracy", -1.0),
            "best_val_balanced_accuracy": stopping.best_accuracy,
            "best_val_per_class_accuracy": best_scores.get("per_class_accuracy", []),
            "best_val_loss": stopping.best_loss,
            "torch_version": str(torch.__version__),  # TorchVersion is not weights_only-safe
            "input_size": input_size,  # the training resolution
            "normalisation": {key: [float(v) for v in values]
                              for key, values in normalisation.items()},
            "augment": _describe(augment),
            "split": "by group (study or patient)" if groups is not None else "by image",
            "n_train": int(train_indices.size),
            "n_val": int(val_indices.size),
            "seed": int(seed),
            "device": str(device),
            "precision": precision_name[autocast_dtype],
            "created_at": datetime.now(timezone.utc).isoformat(),
            **dict(extra_metadata or {}),
        }

    if history and stopping.best_epoch:
        best_scores = {"accuracy": history[stopping.best_epoch - 1]["val_accuracy"],
                       "per_class_accuracy":
                           history[stopping.best_epoch - 1]["val_per_class_accuracy"]}

    def model_state() -> dict[str, torch.Tensor]:
        # contiguous: channels_last tensors would be saved with their strides
        return {key: value.detach().cpu().contiguous()
                for key, value in model.state_dict().items()}

    def save_last(epoch_done: int, partial_epoch: dict[str, Any] | None) -> None:
        _atomic_save({
            "format": CHECKPOINT_FORMAT, "model_state": model_state(),
            "metadata": metadata(epoch_done),
            "training_state": {
                "config": config, "epoch": epoch_done, "partial_epoch": partial_epoch,
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "early_stopping": stopping.state(), "history": history,
                "stopped_early": stopped_early, "rng": _rng_state(),
            },
        }, last_path)

    interrupted = False
    last_write = time.monotonic()
    for epoch in range(start_epoch + 1, epochs + 1):
        if stopped_early:
            break
        started = time.perf_counter()
        batches = _epoch_batches(train_indices, seed=seed, epoch=epoch, batch_size=batch_size)
        first = 0
        totals = _EpochTotals(num_classes)
        if partial is not None:
            first = int(partial["batches_done"])
            totals = _EpochTotals.restore(num_classes, partial["totals"])
            started -= float(partial["seconds"])
            partial = None
        loader = DataLoader(dataset, batch_sampler=batches[first:], **loader_options)
        model.train()
        images_done = sum(len(batch) for batch in batches[:first])
        for position, (images, targets) in enumerate(loader, start=first):
            step = (epoch - 1) * len(batches) + position
            step_lr = warmup_cosine_lr(step, base_lr=lr, warmup_steps=warmup_steps,
                                       total_steps=total_steps)
            for group in optimizer.param_groups:
                group["lr"] = step_lr
            if augment is not None:
                generator = torch.Generator().manual_seed(_batch_seed(seed, epoch, position))
                images = augment(images.float(), generator)
            images, targets = _to_device(images, targets, device, channels_last)
            with _autocast(device, autocast_dtype):
                logits = model(images)
            # Loss in float32: a softmax in 16 bits loses the small probabilities.
            loss = F.cross_entropy(logits.float(), targets, weight=class_weights)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            totals.add(loss, logits, targets)
            images_done += targets.numel()
            elapsed = time.perf_counter() - started
            if batch_progress is not None:
                batch_progress({"epoch": epoch, "batch": position + 1, "batches": len(batches),
                                "images": images_done, "seconds": elapsed,
                                "loss": float(loss.detach()), "lr": step_lr,
                                "images_per_second": images_done / max(elapsed, 1e-9)})
            stopping_now = stop is not None and stop.is_set()
            if position + 1 < len(batches) and (
                    stopping_now or time.monotonic() - last_write >= checkpoint_seconds):
                save_last(epoch - 1, {"epoch": epoch, "batches_done": position + 1,
                                      "totals": totals.state(), "seconds": elapsed})
                last_write = time.monotonic()
                if stopping_now:
                    interrupted = True
                    break
        if interrupted:
            log.info("backbone training interrupted in epoch %d; last.pt holds the position",
                     epoch)
            break
        train_seconds = time.perf_counter() - started
        trained = totals.scores()
        validated = _evaluate(model, val_loader, device=device, autocast_dtype=eval_dtype,
                              channels_last=channels_last, num_classes=num_classes)
        improved = stopping.update(epoch, validated["balanced_accuracy"], validated["loss"])
        if improved:
            best_scores = validated
        stopped_early = stopping.should_stop and epoch < epochs
        record = {"epoch": epoch, "train_loss": trained["loss"],
                  "train_accuracy": trained["accuracy"], "val_loss": validated["loss"],
                  "val_accuracy": validated["accuracy"],
                  "val_balanced_accuracy": validated["balanced_accuracy"],
                  "val_per_class_accuracy": validated["per_class_accuracy"],
                  "val_support": validated["support"],
                  "lr": optimizer.param_groups[0]["lr"],
                  "train_images_per_second": train_indices.size / max(train_seconds, 1e-9),
                  "seconds": time.perf_counter() - started, "improved": improved}
        history.append(record)
        if improved:
            _atomic_save({"format": CHECKPOINT_FORMAT, "model_state": model_state(),
                          "metadata": metadata(epoch)}, best_path)
        save_last(epoch, None)
        last_write = time.monotonic()
        log.info("backbone epoch %d/%d: val balanced accuracy %.3f, accuracy %.3f, loss %.4f, "
                 "train loss %.4f%s", epoch, epochs, record["val_balanced_accuracy"],
                 record["val_accuracy"], record["val_loss"], record["train_loss"],
                 " (best)" if improved else "")
        if progress is not None:
            progress(dict(record))
        if stop is not None and stop.is_set() and epoch < epochs and not stopped_early:
            interrupted = True
            break
    if stopped_early:
        log.info("backbone training stopped early: no improvement for %d epochs", patience)
    if not interrupted and best_path.is_file():
        _mark_finished(best_path, epochs_run=len(history), stopped_early=stopped_early)

    return TrainingResult(
        best_val_accuracy=float(best_scores.get("accuracy", -1.0)),
        best_val_balanced_accuracy=stopping.best_accuracy,
        best_val_per_class_accuracy=list(best_scores.get("per_class_accuracy", [])),
        best_epoch=stopping.best_epoch, epochs_run=len(history), stopped_early=stopped_early,
        interrupted=interrupted, checkpoint_path=best_path, history=history,
        n_train=int(train_indices.size), n_val=int(val_indices.size))
