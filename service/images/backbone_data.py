"""``train-backbone``: DenseNet121 trained on the site's own images to predict their tag
cluster (method.md B.1), the weights to use when no ImageNet file is configured.

The labels are the active tag clustering run's (``instance_tag_cluster``). At most
``max_per_class`` images per cluster are drawn (seeded), so a few huge CT clusters do not drown
the rest. No cluster is dropped: one with fewer than ``min_per_class`` decodable images joins
the kept cluster with the nearest medoid (``merge_small_classes``, Gower distance of the
medoids' tags). Every image carries its group for the held-out split: its patient (or its
study, ``group_by="study"``; a patient with an empty Patient ID counts as its study).
The chosen images are decoded once, in a pool of processes, at the training resolution into
an in-memory cache of 8-bit grey images (16 KB each at 128 x 128); training reads the cache,
not the files.
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
    groups: list[str]  # patient or study of each item, for the held-out split
    tag_cluster_run: int
    cluster_sizes: dict[int, int]  # tag cluster -> decodable images drawn
    merged_classes: dict[int, int]  # small tag cluster -> kept cluster it is trained as
    undecodable: int


GROUP_BY = ("patient", "study", "image")


def _medoid_distances(conn: sa.Connection, run_id: int,
                      clusters: list[int]) -> np.ndarray | None:
    """Gower distances between the medoids of ``clusters`` (stable labels), or None when the
    run's stored model cannot give them."""
    from pipelines.gower import gower_matrix

    from ..tags.tag_clusters import ReclusterError, load_model

    try:
        model = load_model(conn, run_id)
    except (ReclusterError, KeyError, TypeError) as exc:
        log.warning("tag clustering run %s: no medoids to merge by (%s); small clusters join "
                    "the largest", run_id, exc)
        return None
    row_of = {int(label): row for row, label in enumerate(model.labels) if label >= 0}
    if any(cluster not in row_of for cluster in clusters):
        return None
    matrix = gower_matrix(model.medoids, ranges=model.ranges, dtype=np.float64)
    rows = [row_of[cluster] for cluster in clusters]
    return matrix[np.ix_(rows, rows)]


def build_training_set(engine: Engine, storage_root: Path, *, max_per_class: int = 2000,
                       min_per_class: int = 10, size: int = 128, seed: int = 0,
                       group_by: str = "patient", decode_workers: int = 0,
                       progress: Callable[[str], None] | None = None) -> TrainingSet:
    """Images, tag-cluster labels and groups of the active run (see the module docstring)."""
    from pipelines.backbone_training import merge_small_classes

    if group_by not in GROUP_BY:
        raise ValueError(f"group_by must be one of {', '.join(GROUP_BY)}; got {group_by!r}")
    with engine.connect() as conn:
        run_id = conn.execute(sa.text(
            "SELECT id FROM tag_cluster_runs WHERE is_active")).scalar_one_or_none()
        if run_id is None:
            raise ValueError("no active tag clustering run: run `pacs-annotate recluster` "
                             "first; its clusters are the training labels")
        rows = conn.execute(sa.text(
            "SELECT c.tag_cluster, i.file_path, i.sop_instance_uid, i.study_instance_uid, "
            "p.id, p.patient_id FROM instance_tag_cluster c "
            "JOIN instances i USING (sop_instance_uid) "
            "JOIN instance_features f USING (sop_instance_uid) "
            "LEFT JOIN studies s ON s.study_instance_uid = i.study_instance_uid "
            "LEFT JOIN patients p ON p.id = s.patient_pk "
            "WHERE f.rows IS NOT NULL AND f.columns IS NOT NULL "
            "ORDER BY i.sop_instance_uid")).all()
        rng = np.random.default_rng(seed)
        by_class: dict[int, list[tuple[str, str]]] = {}
        for label, path, sop_uid, study_uid, patient_pk, patient_id in rows:
            if group_by == "image":
                group = f"image:{sop_uid}"
            elif group_by == "patient" and patient_pk is not None and patient_id:
                group = f"patient:{patient_pk}"
            else:
                group = f"study:{study_uid}"
            by_class.setdefault(int(label), []).append((path, group))
        chosen: list[tuple[int, str, str]] = []
        for label in sorted(by_class):
            items = by_class[label]
            picked = rng.permutation(len(items))[:max_per_class]
            chosen += [(label, *items[i]) for i in sorted(picked)]
        if progress:
            progress(f"decoding {len(chosen):,} images of {len(by_class)} tag clusters")
        workers = decode_workers or len(os.sched_getaffinity(0))
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            decoded = list(pool.map(grey_uint8, [str(storage_root / p) for _, p, _ in chosen],
                                    [size] * len(chosen), chunksize=16))
        kept = [(label, group, image) for (label, _, group), image in zip(chosen, decoded)
                if image is not None]
        counts: dict[int, int] = {}
        for label, _, _ in kept:
            counts[label] = counts.get(label, 0) + 1
        clusters = sorted(counts)
        if len(clusters) < 2:
            raise ValueError(f"need at least 2 tag clusters with decodable images; have "
                             f"{counts or 'none'}")
        sizes = [counts[cluster] for cluster in clusters]
        distances = (_medoid_distances(conn, int(run_id), clusters)
                     if min(sizes) < min_per_class else None)
    target = merge_small_classes(sizes, distances, min_size=min_per_class)
    classes = [clusters[i] for i in sorted(set(target.tolist()))]
    index_of = {cluster: classes.index(clusters[target[i]])
                for i, cluster in enumerate(clusters)}
    labels = np.array([index_of[label] for label, _, _ in kept], dtype=np.int64)
    images = np.stack([image for _, _, image in kept])
    return TrainingSet(
        dataset=GreyImageDataset(images, labels), labels=labels, classes=classes,
        groups=[group for _, group, _ in kept], tag_cluster_run=int(run_id),
        cluster_sizes=dict(zip(clusters, sizes)),
        merged_classes={cluster: clusters[target[i]] for i, cluster in enumerate(clusters)
                        if target[i] != i},
        undecodable=sum(image is None for image in decoded))
