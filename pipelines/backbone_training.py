"""``train-backbone``: DenseNet121 trained to predict each image's tag cluster (method.md B.1).

Where a site has no local copy of torchvision's ImageNet weights, the feature extractor is
trained on the site's own images. The target needs no human labels: the tag cluster of part A
(the paper trained DenseNet121 from scratch on 40,000 NIH chest X-rays; RadiologyNet proposed
tag clusters as exactly this kind of pseudo-label). Objective, on the training split::

    min_theta  sum_i w_{y_i} * CE(classifier(mean_hw ReLU(features_theta(x_i))), y_i)

with ``w_c = n_train / (K * n_c)`` when ``balance_classes`` (tag clusters are very unequal in
size; without the weights the network can score well by predicting the largest ones).

Procedure

* Held-out split: stratified per class, seeded (``stratified_split``).
* AdamW; on CUDA channels_last and autocast (bf16 where supported, else fp16 with a gradient
  scaler).
* After every epoch: validation loss, accuracy and balanced accuracy. An epoch *improves* when
  its validation accuracy is higher than the best so far, or equal with a lower validation loss.
  Training stops after ``patience`` epochs in a row without improvement (early stopping), or
  after ``epochs`` epochs.
* Files in ``checkpoint_dir``: ``best.pt`` (weights of the best epoch + metadata; what
  ``pipelines.backbone.load_backbone`` reads for features) and ``last.pt`` (the same format plus
  the training state: optimizer, gradient scaler, epoch, early-stopping state, history, RNG
  states). Both are written to a temporary file and renamed, so an interruption leaves the
  previous complete file.
* Resume: with ``resume=True`` and a ``last.pt`` from the same run (same classes, labels, split
  and hyper-parameters), training continues after its epoch. The shuffling of each epoch
  depends only on ``(seed, epoch)``, so on the CPU a resumed run gives the same weights as an
  uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from pipelines.backbone import (
    CHECKPOINT_FORMAT, IMAGENET_NORMALISATION, DenseNet121, build_densenet121,
)

__all__ = ["BEST_CHECKPOINT", "LAST_CHECKPOINT", "TrainingResult", "stratified_split",
           "train_backbone"]

log = logging.getLogger(__name__)

BEST_CHECKPOINT = "best.pt"
LAST_CHECKPOINT = "last.pt"
_METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_balanced_accuracy")


@dataclass(frozen=True)
class TrainingResult:
    """Outcome of ``train_backbone`` (method.md B.1).

    Attributes
    ----------
    best_val_accuracy : float
        Held-out accuracy of the weights in ``checkpoint_path``.
    best_epoch : int
        1-based epoch those weights come from.
    epochs_run : int
        Epochs completed in total, those of earlier interrupted calls included.
    stopped_early : bool
        True when ``patience`` epochs passed without improvement before ``epochs``.
    checkpoint_path : Path
        ``best.pt``: loadable by ``pipelines.backbone.load_backbone``.
    history : list of dict
        One record per epoch: epoch, the metrics, seconds, improved.
    """

    best_val_accuracy: float
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    checkpoint_path: Path
    history: list[dict[str, Any]]


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


class _EpochShuffle(Sampler[int]):
    """The training indices in an order that depends only on ``(seed, epoch)``, so that an
    epoch replayed after a resume sees the same batches."""

    def __init__(self, indices: np.ndarray, seed: int):
        self.indices = indices
        self.seed = seed
        self.epoch = 0

    def __iter__(self) -> Iterator[int]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.indices)
        return iter(order.tolist())

    def __len__(self) -> int:
        return len(self.indices)


@dataclass
class _EarlyStopping:
    """Best (accuracy, loss) so far and the number of epochs since it."""

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


def _run_config(labels: np.ndarray, classes: Sequence[int | str], **settings: Any) -> dict:
    """What a resumed run must share with the run that wrote ``last.pt``."""
    return {"classes": [_plain_class(label) for label in classes],
            "labels_sha256": hashlib.sha256(labels.tobytes()).hexdigest(),
            "n_samples": int(labels.size), **settings}


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _run_epoch(
    model: DenseNet121, loader: DataLoader, *, device: torch.device,
    optimizer: torch.optim.Optimizer | None, scaler: torch.amp.GradScaler,
    autocast_dtype: torch.dtype | None, class_weights: torch.Tensor | None, num_classes: int,
    augment: Callable[[torch.Tensor], torch.Tensor] | None,
) -> dict[str, float]:
    """One pass; trains when ``optimizer`` is given, else evaluates. Returns the mean loss,
    accuracy and balanced accuracy (mean recall over the classes present)."""
    training = optimizer is not None
    model.train(training)
    use_cuda = device.type == "cuda"
    total_loss, seen = 0.0, 0
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    grad_mode = contextlib.nullcontext() if training else torch.inference_mode()
    with grad_mode:
        for images, targets in loader:
            images = images.to(device, dtype=torch.float32, non_blocking=use_cuda)
            targets = torch.as_tensor(targets, dtype=torch.int64).to(device,
                                                                     non_blocking=use_cuda)
            if use_cuda:
                images = images.contiguous(memory_format=torch.channels_last)
            if training and augment is not None:
                images = augment(images)
            autocast = (contextlib.nullcontext() if autocast_dtype is None
                        else torch.autocast(device_type=device.type, dtype=autocast_dtype))
            with autocast:
                logits = model(images)
            # Loss in float32: a softmax in fp16 loses the small probabilities.
            loss = F.cross_entropy(logits.float(), targets,
                                   weight=class_weights if training else None)
            if training:
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            total_loss += float(loss.detach()) * targets.numel()
            seen += targets.numel()
            predicted = logits.detach().argmax(dim=1)
            pairs = (targets * num_classes + predicted).cpu()
            confusion += torch.bincount(pairs, minlength=num_classes ** 2).view(
                num_classes, num_classes)
    per_class = confusion.sum(dim=1)
    present = per_class > 0
    recall = confusion.diagonal()[present].double() / per_class[present].double()
    return {"loss": total_loss / max(seen, 1),
            "accuracy": float(confusion.diagonal().sum()) / max(seen, 1),
            "balanced_accuracy": float(recall.mean()) if present.any() else 0.0}


def train_backbone(
    dataset: Dataset,
    labels: Sequence[int],
    *,
    classes: Sequence[int | str],
    checkpoint_dir: str | os.PathLike,
    tag_cluster_run: int | None,
    epochs: int = 30,
    batch_size: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    val_fraction: float = 0.2,
    patience: int = 5,
    balance_classes: bool = True,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    seed: int = 0,
    resume: bool = True,
    normalisation: Mapping[str, Sequence[float]] = IMAGENET_NORMALISATION,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> TrainingResult:
    """Train DenseNet121 to predict the tag cluster of each image (method.md B.1).

    Parameters
    ----------
    dataset : torch Dataset of length n
        Item i is ``(image, labels[i])``: image a float tensor of shape (3, H, W), already
        normalised with ``normalisation`` (224 x 224 for the features of B.1).
    labels : sequence of int of length n
        Class index (0..K-1, a position in ``classes``) of every item; used for the split.
    classes : sequence of int or str of length K >= 2
        What each class index stands for (tag-cluster ids); stored in the checkpoint.
    checkpoint_dir : path
        Receives ``best.pt`` and ``last.pt``; created when missing.
    tag_cluster_run : int or None
        Id of the tag-clustering run the labels come from; stored in the checkpoint.
    epochs : int
        Largest total number of epochs (a resumed run counts the earlier ones).
    batch_size, lr, weight_decay : AdamW settings.
    val_fraction : float in (0, 1)
        Held-out share of every class (``stratified_split``).
    patience : int
        Epochs without improvement of the validation accuracy (ties: loss) before stopping.
    balance_classes : bool
        Weight the training loss by inverse class frequency.
    device : str, torch.device or None
        None: CUDA when available, else CPU.
    num_workers : int
        DataLoader worker processes.
    seed : int
        Initial weights, split and shuffling.
    resume : bool
        Continue from ``last.pt`` when it belongs to this run; False starts over.
    normalisation : mapping with "mean" and "std"
        What the dataset applied; recorded so that features are computed the same way.
    augment : callable or None
        Applied to each training batch on the device (e.g. random flips); never to validation.
    progress : callable or None
        Called with each epoch's record, after ``last.pt`` is written; an exception raised
        there stops training, and a later call with ``resume=True`` continues after that epoch.

    Returns
    -------
    TrainingResult

    Raises
    ------
    ValueError
        Invalid arguments, or ``last.pt`` from a different run while ``resume`` is True.
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
    if epochs < 1 or patience < 1 or batch_size < 2:
        raise ValueError(f"need epochs >= 1, patience >= 1, batch_size >= 2; got {epochs}, "
                         f"{patience}, {batch_size}")
    train_indices, val_indices = stratified_split(labels_array, val_fraction=val_fraction,
                                                  seed=seed)
    if train_indices.size < 2 or val_indices.size < 1:
        raise ValueError(f"too few images to split: {train_indices.size} for training, "
                         f"{val_indices.size} for validation")

    device = _resolve_device(device)
    use_cuda = device.type == "cuda"
    autocast_dtype = None
    if use_cuda:
        autocast_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[autocast_dtype]

    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    best_path, last_path = checkpoint_dir / BEST_CHECKPOINT, checkpoint_dir / LAST_CHECKPOINT
    tag_cluster_run = None if tag_cluster_run is None else int(tag_cluster_run)
    config = _run_config(labels_array, classes, tag_cluster_run=tag_cluster_run,
                         val_fraction=float(val_fraction), seed=int(seed),
                         batch_size=int(batch_size), lr=float(lr),
                         weight_decay=float(weight_decay), balance_classes=bool(balance_classes))

    # Initial weights from the seed without touching the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_densenet121(num_classes)
    model = model.to(device)
    if use_cuda:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype is torch.float16)
    stopping = _EarlyStopping(patience)
    history: list[dict[str, Any]] = []
    start_epoch = 0
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
        stopped_early = bool(state["stopped_early"])
        _restore_rng_state(state["rng"])
        log.info("resuming backbone training from %s after epoch %d", last_path, start_epoch)

    input_size = [int(size) for size in dataset[int(train_indices[0])][0].shape[-2:]]
    train_counts = np.bincount(labels_array[train_indices], minlength=num_classes)
    class_weights = None
    if balance_classes:
        weights = train_counts.sum() / (num_classes * np.maximum(train_counts, 1))
        class_weights = torch.as_tensor(weights, dtype=torch.float32, device=device)
    train_sampler = _EpochShuffle(train_indices, seed)
    loader_options = {"batch_size": batch_size, "num_workers": num_workers,
                      "pin_memory": use_cuda, "persistent_workers": num_workers > 0}
    # A last batch of one image would make batch norm fail in training mode.
    train_loader = DataLoader(dataset, sampler=train_sampler,
                              drop_last=train_indices.size % batch_size == 1, **loader_options)
    val_loader = DataLoader(dataset, sampler=val_indices.tolist(), **loader_options)
    pass_options = {"device": device, "scaler": scaler, "autocast_dtype": autocast_dtype,
                    "num_classes": num_classes}

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
            "best_val_accuracy": stopping.best_accuracy,
            "best_val_loss": stopping.best_loss,
            "torch_version": str(torch.__version__),  # TorchVersion is not weights_only-safe
            "input_size": input_size,
            "normalisation": {key: [float(v) for v in values]
                              for key, values in normalisation.items()},
            "n_train": int(train_indices.size),
            "n_val": int(val_indices.size),
            "seed": int(seed),
            "device": str(device),
            "precision": precision,
            "created_at": datetime.now(timezone.utc).isoformat(),
        }

    for epoch in range(start_epoch + 1, epochs + 1):
        if stopped_early:
            break
        started = time.perf_counter()
        train_sampler.epoch = epoch
        trained = _run_epoch(model, train_loader, optimizer=optimizer,
                             class_weights=class_weights, augment=augment, **pass_options)
        validated = _run_epoch(model, val_loader, optimizer=None, class_weights=None,
                               augment=None, **pass_options)
        improved = stopping.update(epoch, validated["accuracy"], validated["loss"])
        stopped_early = stopping.should_stop and epoch < epochs
        record = {"epoch": epoch, "train_loss": trained["loss"],
                  "train_accuracy": trained["accuracy"], "val_loss": validated["loss"],
                  "val_accuracy": validated["accuracy"],
                  "val_balanced_accuracy": validated["balanced_accuracy"],
                  "seconds": time.perf_counter() - started, "improved": improved}
        history.append(record)
        model_state = {key: value.detach().cpu() for key, value in model.state_dict().items()}
        if improved:
            _atomic_save({"format": CHECKPOINT_FORMAT, "model_state": model_state,
                          "metadata": metadata(epoch)}, best_path)
        _atomic_save({
            "format": CHECKPOINT_FORMAT, "model_state": model_state, "metadata": metadata(epoch),
            "training_state": {
                "config": config, "epoch": epoch, "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "early_stopping": stopping.state(),
                "history": history, "stopped_early": stopped_early, "rng": _rng_state(),
            },
        }, last_path)
        log.info("backbone epoch %d/%d: val accuracy %.3f, val loss %.4f, train loss %.4f%s",
                 epoch, epochs, record["val_accuracy"], record["val_loss"],
                 record["train_loss"], " (best)" if improved else "")
        if progress is not None:
            progress(dict(record))
    if stopped_early:
        log.info("backbone training stopped early: no improvement for %d epochs", patience)
    _mark_finished(best_path, epochs_run=len(history), stopped_early=stopped_early)

    return TrainingResult(
        best_val_accuracy=stopping.best_accuracy, best_epoch=stopping.best_epoch,
        epochs_run=len(history), stopped_early=stopped_early, checkpoint_path=best_path,
        history=history)
