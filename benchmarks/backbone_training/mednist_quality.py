"""Retrieval quality of `train-backbone` features on MedNIST, against a random DenseNet121.

MedNIST (``../shared/data/mednist``: 64 x 64 JPEGs, ``labels.csv`` with label, modality and
body_part) is split per class into an *archive* part and a *query* part. The archive's
pseudo-labels are ``modality|body_part`` (what tag clustering of the archive gives: the
stand-in for the tag clusters), loaded straight into ``train_backbone``'s data structures
(no DICOM, no database). Then pooled features (``extract_features``) of both parts are
compared by cosine: every query ranks the archive, and P@20 / mAP@20 count results of the
query's MedNIST label (``pipelines.retrieval_metrics``). The floor is the same DenseNet121
with random initial weights (seed 0, never trained).

    .venv/bin/python benchmarks/backbone_training/mednist_quality.py \
        --archive-per-class 200 --queries-per-class 100 --size 64 --epochs 6 \
        --extract-sizes 64 224 --work /tmp/mednist_backbone

Writes nothing into the repository; checkpoints go under ``--work``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipelines.backbone import build_densenet121, extract_features, load_backbone
from pipelines.backbone_training import RadiologyAugment, train_backbone
from pipelines.pixels import fit_to_square, normalise_imagenet
from pipelines.retrieval_metrics import (
    binary_relevance, mean_average_precision_at, one_hot, precision_at,
)

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "mednist"


def load_part(root: Path, per_class: int, offset: int, size: int):
    """``per_class`` images of every label, from position ``offset`` of the label's sorted
    list; returns (images (n, 3, size, size) float32, label ids, pseudo-label ids, names)."""
    with open(root / "labels.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    names = sorted({row["label"] for row in rows})
    tags = sorted({f"{row['modality']}|{row['body_part']}" for row in rows})
    images, labels, pseudo = [], [], []
    for name in names:
        members = sorted((row for row in rows if row["label"] == name),
                         key=lambda row: row["image"])[offset:offset + per_class]
        for row in members:
            grey = np.asarray(Image.open(root / row["image"]).convert("L"),
                              dtype=np.float32) / 255.0
            images.append(normalise_imagenet(fit_to_square(grey, size=size)))
            labels.append(names.index(name))
            pseudo.append(tags.index(f"{row['modality']}|{row['body_part']}"))
    return (torch.from_numpy(np.stack(images)), np.asarray(labels), np.asarray(pseudo), tags)


def pooled(module, images: torch.Tensor, size: int, batch: int = 64) -> np.ndarray:
    from pipelines.backbone import Backbone

    backbone = Backbone(module=module.eval(), device=torch.device("cpu"), model_version="x")
    if images.shape[-1] != size:
        images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear",
                                                 antialias=True, align_corners=False)
    parts = [extract_features(backbone, images[start:start + batch])[1]
             for start in range(0, len(images), batch)]
    return torch.cat(parts).numpy()


def p_at_20(archive: np.ndarray, archive_labels: np.ndarray, queries: np.ndarray,
            query_labels: np.ndarray) -> tuple[float, float]:
    a = archive / np.linalg.norm(archive, axis=1, keepdims=True).clip(1e-12)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True).clip(1e-12)
    ranked = np.argsort(-(q @ a.T), axis=1, kind="stable")[:, :20]
    n = int(max(archive_labels.max(), query_labels.max())) + 1
    relevance = binary_relevance(one_hot(query_labels, n), one_hot(archive_labels, n)[ranked])
    return (float(precision_at(relevance, [20]).mean()),
            float(mean_average_precision_at(relevance, [20])[0]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--archive-per-class", type=int, default=200)
    parser.add_argument("--queries-per-class", type=int, default=100)
    parser.add_argument("--size", type=int, default=64, help="training resolution")
    parser.add_argument("--extract-sizes", type=int, nargs="+", default=[64, 224])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--no-augment", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/mednist_backbone"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--checkpoint", type=Path,
                        help="evaluate this train-backbone checkpoint instead of training")
    parser.add_argument("--skip-random", action="store_true", help="no random-init floor")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    images, labels, pseudo, tags = load_part(args.data, args.archive_per_class, 0, args.size)
    queries, query_labels, _, _ = load_part(args.data, args.queries_per_class,
                                            args.archive_per_class, args.size)
    print(f"loaded {len(images)} archive and {len(queries)} query images in "
          f"{time.perf_counter() - started:.1f} s; pseudo-labels {tags}", flush=True)

    history: list = []
    checkpoint = args.checkpoint
    if checkpoint is None:
        dataset = torch.utils.data.TensorDataset(images, torch.as_tensor(pseudo))
        cpu_started = time.process_time()
        result = train_backbone(
            dataset, pseudo, classes=tags, checkpoint_dir=args.work, tag_cluster_run=None,
            epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, patience=args.epochs,
            augment=None if args.no_augment else RadiologyAugment(), precision=args.precision,
            resume=False, checkpoint_seconds=1e9,
            progress=lambda r: print(
                f"epoch {r['epoch']}: {r['train_images_per_second']:.1f} images/s, "
                f"{r['seconds']:.0f} s, val balanced accuracy {r['val_balanced_accuracy']:.3f}, "
                f"load {os.getloadavg()[0]:.1f}", flush=True))
        train_cpu = time.process_time() - cpu_started
        trained_images = result.n_train * result.epochs_run
        print(f"training: {trained_images / train_cpu:.1f} images per CPU-second "
              f"(training and validation passes)", flush=True)

        checkpoint, history = result.checkpoint_path, result.history
    trained = load_backbone(checkpoint).module
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        random_init = build_densenet121(None)
    table = {}
    models = [("train-backbone", trained)]
    if not args.skip_random:
        models.insert(0, ("random init", random_init))
    for name, module in models:
        for size in args.extract_sizes:
            p20, map20 = p_at_20(pooled(module, images, size), labels,
                                 pooled(module, queries, size), query_labels)
            table[f"{name} @ {size}"] = {"P@20": p20, "mAP@20": map20}
            print(f"{name:15s} extract {size:3d} px: P@20 {p20:.4f}  mAP@20 {map20:.4f}",
                  flush=True)
    summary = {"args": {k: str(v) for k, v in vars(args).items()}, "table": table,
               "history": history, "load": os.getloadavg()[0]}
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1, default=str))


if __name__ == "__main__":
    main()
