"""``train-backbone``: DenseNet121 trained on the site's own images to predict their tag
cluster (issue 6, method.md B.1), the weights to use when no ImageNet file is configured.

The labels are the active tag clustering run's (``instance_tag_cluster``). Clusters with
fewer than ``min_per_class`` decodable images are left out, and at most ``max_per_class``
images per cluster are drawn (seeded), so a few huge CT clusters do not drown the rest. The
chosen images are decoded once, in a pool of processes, into an in-memory cache of 8-bit
grey images (50 KB each at 224 x 224); training reads the cache, not the files.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Callable

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from pipelines.pixels import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

# the normalisation the worker's inputs went through, undone and redone here
_MEAN = np.asarray(IMAGENET_MEAN, dtype=np.float32)
_STD = np.asarray(IMAGENET_STD, dtype=np.float32)


def grey_uint8(path: str, size: int) -> np.ndarray | None:
    """One file as an 8-bit grey image (the network input before the ImageNet
    normalisation), or None when it is not a decodable image. Runs in a decode process."""
    from pipelines.pixels import NotAnImage, PixelDecodeError, file_to_image

    try:
        image = file_to_image(path, size=size)
    except (NotAnImage, PixelDecodeError):
        return None
    grey = image[0] * _STD[0] + _MEAN[0]  # undo the normalisation of channel 0
    return np.clip(np.rint(grey * 255.0), 0, 255).astype(np.uint8)


class GreyImageDataset:
    """Map-style dataset over cached 8-bit grey images: item i is ``(image, label)`` with
    the image normalised and repeated to 3 channels, as the feature worker feeds it."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        import torch

        grey = self.images[index].astype(np.float32) / 255.0
        stacked = (grey[None, :, :] - _MEAN[:, None, None]) / _STD[:, None, None]
        return torch.from_numpy(np.ascontiguousarray(stacked)), int(self.labels[index])


@dataclass(frozen=True)
class TrainingSet:
    dataset: GreyImageDataset
    labels: np.ndarray  # class index per item
    classes: list[int]  # tag cluster label of each class index
    tag_cluster_run: int
    dropped_classes: dict[int, int]  # tag cluster -> decodable images, too few to train on
    undecodable: int


def build_training_set(engine: Engine, storage_root: Path, *, max_per_class: int = 2000,
                       min_per_class: int = 10, size: int = 224, seed: int = 0,
                       decode_workers: int = 0,
                       progress: Callable[[str], None] | None = None) -> TrainingSet:
    """Images and tag-cluster labels of the active run (see the module docstring)."""
    with engine.connect() as conn:
        run_id = conn.execute(sa.text(
            "SELECT id FROM tag_cluster_runs WHERE is_active")).scalar_one_or_none()
        if run_id is None:
            raise ValueError("no active tag clustering run: run `pacs-annotate recluster` "
                             "first; its clusters are the training labels")
        rows = conn.execute(sa.text(
            "SELECT c.tag_cluster, i.file_path FROM instance_tag_cluster c "
            "JOIN instances i USING (sop_instance_uid) "
            "JOIN instance_features f USING (sop_instance_uid) "
            "WHERE f.rows IS NOT NULL AND f.columns IS NOT NULL "
            "ORDER BY i.sop_instance_uid")).all()
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[str]] = {}
    for label, path in rows:
        by_class.setdefault(int(label), []).append(path)
    chosen: list[tuple[int, str]] = []
    for label in sorted(by_class):
        paths = by_class[label]
        picked = rng.permutation(len(paths))[:max_per_class]
        chosen += [(label, paths[i]) for i in sorted(picked)]
    if progress:
        progress(f"decoding {len(chosen):,} images of {len(by_class)} tag clusters")
    workers = decode_workers or len(os.sched_getaffinity(0))
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        decoded = list(pool.map(grey_uint8, [str(storage_root / p) for _, p in chosen],
                                [size] * len(chosen), chunksize=16))
    kept = [(label, image) for (label, _), image in zip(chosen, decoded) if image is not None]
    counts: dict[int, int] = {}
    for label, _ in kept:
        counts[label] = counts.get(label, 0) + 1
    classes = sorted(label for label, n in counts.items() if n >= min_per_class)
    if len(classes) < 2:
        raise ValueError(f"need at least 2 tag clusters with {min_per_class} or more decodable "
                         f"images each; have {dict(sorted(counts.items()))}")
    index_of = {label: i for i, label in enumerate(classes)}
    kept = [(label, image) for label, image in kept if label in index_of]
    labels = np.array([index_of[label] for label, _ in kept], dtype=np.int64)
    images = np.stack([image for _, image in kept])
    return TrainingSet(
        dataset=GreyImageDataset(images, labels), labels=labels, classes=classes,
        tag_cluster_run=int(run_id),
        dropped_classes={label: n for label, n in counts.items() if label not in index_of},
        undecodable=sum(image is None for image in decoded))
