"""DenseNet121 maps and pooled features of real images, for the DDicCIR ablation (ablation.py).

    python benchmarks/ddiccir/extract_features.py OUT_DIR [--mednist N] [--weights FILE]
        [--seed 0]

Writes to OUT_DIR:

* ``mednist.npz``: ``maps`` (N, 1024, 7, 7) float16, ``pooled`` (N, 1024) float32, ``labels``
  (class name), ``groups`` (each image its own group: MedNIST has no patient or series ids),
  ``paths``. A seeded class-balanced sample of ``../shared/data/mednist/labels.csv``.
* ``dicom.npz``: the same for every decodable image of ``../shared/data/dicom`` (middle frame),
  ``labels`` = "Modality|BodyPartExamined" from the file's own tags ("" when absent),
  ``groups`` = SeriesInstanceUID.
* ``README.txt``: how they were made.

Images go through the image worker's own path: DICOM by ``pipelines.pixels.file_to_image``;
a MedNIST JPEG (8-bit grey) as ``grey / 255`` through ``fit_to_square`` and
``normalise_imagenet``, the same steps ``file_to_image`` applies after windowing. The network is
``pipelines.backbone.build_densenet121`` with the weights in ``--weights`` (a torchvision state
dict or a train-backbone checkpoint), or, without it, randomly initialised under
``torch.manual_seed(seed)`` (no pretrained weights are available offline).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pipelines.backbone import Backbone, build_densenet121, extract_features, load_backbone  # noqa: E402
from pipelines.pixels import (NotAnImage, PixelDecodeError, file_to_image,  # noqa: E402
                              fit_to_square, normalise_imagenet)

SHARED = ROOT.parent / "shared" / "data"


def make_backbone(weights: str | None, seed: int) -> Backbone:
    if weights:
        return load_backbone(weights, device="cpu")
    torch.manual_seed(seed)
    module = build_densenet121().eval()
    return Backbone(module=module, device=torch.device("cpu"),
                    model_version=f"densenet121:random-init:seed{seed}")


def mednist_input(path: Path) -> np.ndarray:
    grey = np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0
    return normalise_imagenet(fit_to_square(grey, size=224))


def run(backbone: Backbone, inputs, out: Path, extra: dict) -> None:
    maps_all, pooled_all = [], []
    batch: list[np.ndarray] = []
    started = time.perf_counter()

    def flush() -> None:
        maps, pooled = extract_features(backbone, torch.from_numpy(np.stack(batch)))
        maps_all.append(maps.half().numpy())
        pooled_all.append(pooled.numpy())
        batch.clear()

    for count, image in enumerate(inputs, 1):
        batch.append(image)
        if len(batch) == 32:
            flush()
            print(f"{out.name}: {count} images, {time.perf_counter() - started:.0f} s",
                  flush=True)
    if batch:
        flush()
    np.savez(out, maps=np.concatenate(maps_all), pooled=np.concatenate(pooled_all), **extra)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--mednist", type=int, default=2400)
    parser.add_argument("--weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-dicom", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    backbone = make_backbone(args.weights, args.seed)

    rows = list(csv.DictReader(open(SHARED / "mednist" / "labels.csv")))
    classes = sorted({row["label"] for row in rows})
    rng = np.random.default_rng(args.seed)
    chosen = []
    for name in classes:
        members = [row for row in rows if row["label"] == name]
        picks = rng.choice(len(members), size=min(len(members), args.mednist // len(classes)),
                           replace=False)
        chosen += [members[i] for i in sorted(picks)]
    paths = [row["image"] for row in chosen]
    run(backbone, (mednist_input(SHARED / "mednist" / p) for p in paths),
        args.out / "mednist.npz",
        {"labels": np.array([row["label"] for row in chosen]),
         "groups": np.array(paths), "paths": np.array(paths)})

    if not args.skip_dicom:
        images, labels, groups, paths = [], [], [], []
        for path in sorted((SHARED / "dicom").rglob("*.dcm")):
            try:
                image = file_to_image(path)
            except (NotAnImage, PixelDecodeError, FileNotFoundError):
                continue
            except Exception:  # noqa: BLE001 - a decoder bug on one odd file: skip it
                continue
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            images.append(image)
            labels.append(f"{getattr(ds, 'Modality', '')}|{getattr(ds, 'BodyPartExamined', '')}")
            groups.append(str(getattr(ds, "SeriesInstanceUID", path)))
            paths.append(str(path.relative_to(SHARED / "dicom")))
        run(backbone, iter(images), args.out / "dicom.npz",
            {"labels": np.array(labels), "groups": np.array(groups), "paths": np.array(paths)})

    (args.out / "README.txt").write_text(
        "Made by benchmarks/ddiccir/extract_features.py (see its docstring):\n"
        f"  python benchmarks/ddiccir/extract_features.py {args.out} --mednist {args.mednist}"
        f"{' --weights ' + args.weights if args.weights else ''} --seed {args.seed}\n"
        f"backbone: {backbone.model_version}\n"
        "mednist.npz: class-balanced seeded sample of ../shared/data/mednist (groups = one per "
        "image);\ndicom.npz: decodable images of ../shared/data/dicom, labels Modality|"
        "BodyPartExamined, groups SeriesInstanceUID.\nKeys: maps (N,1024,7,7) float16, pooled "
        "(N,1024) float32, labels, groups, paths.\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
