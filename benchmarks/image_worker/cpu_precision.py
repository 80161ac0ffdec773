"""DenseNet121 features on the CPU: speed and fidelity of each precision / memory layout.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/image_worker/cpu_precision.py \\
        --weights W.pth [--mednist ../shared/data/mednist] [--per-class 100] [--batch 32]

For a class-balanced sample of real MedNIST images (six modality x region classes) it turns
each image into the network input exactly as the image worker does (``fit_to_square`` to
224 x 224, ``normalise_imagenet``), then, for each candidate, measures images/s of the trunk
(wall time and CPU time of this process, the latter less sensitive to other jobs on the
machine), the largest per-image relative difference of the pooled features from the fp32
reference, and retrieval with those features (leave-one-out, cosine; P@20 and mAP@20 against
the MedNIST class). The candidate the service uses by default is the one
``pipelines.backbone.default_precision`` picks for this CPU.

Weights: any DenseNet121 file the worker accepts (``benchmarks/mednist/random_weights.py``
makes the random-initialisation floor; ``train-backbone`` makes trained ones).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from pipelines.backbone import (  # noqa: E402
    cpu_has_native_bf16, default_precision, extract_features, load_backbone,
)
from pipelines.pixels import fit_to_square, normalise_imagenet  # noqa: E402
from pipelines.retrieval_metrics import (  # noqa: E402
    binary_relevance, mean_average_precision_at, one_hot, precision_at,
)

CANDIDATES = (
    # name, precision, channels_last
    ("fp32, contiguous", "fp32", False),
    ("fp32, channels_last", "fp32", True),
    ("bf16, contiguous", "bf16", False),
    ("bf16, channels_last", "bf16", True),
)


def mednist_sample(root: Path, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A class-balanced sample: (N, 3, 224, 224) network inputs and (N,) class names."""
    with open(root / "labels.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    rng = np.random.default_rng(seed)
    chosen = []
    for label in sorted({row["label"] for row in rows}):
        members = [row for row in rows if row["label"] == label]
        picked = rng.choice(len(members), size=min(per_class, len(members)), replace=False)
        chosen.extend(members[i] for i in sorted(picked))
    inputs = np.stack([
        normalise_imagenet(fit_to_square(
            np.asarray(Image.open(root / row["image"]).convert("L"), dtype=np.float32) / 255.0))
        for row in chosen])
    return inputs, np.array([row["label"] for row in chosen])


def loo_retrieval(pooled: torch.Tensor, labels: np.ndarray, n: int = 20) -> tuple[float, float]:
    """Leave-one-out P@n and mAP@n (%) of cosine ranking over the sample itself."""
    unit = torch.nn.functional.normalize(pooled, dim=1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(-float("inf"))
    ranked = torch.topk(similarity, n, dim=1).indices.numpy()
    indicator = one_hot(np.unique(labels, return_inverse=True)[1])
    relevance = binary_relevance(indicator, indicator[ranked])
    return (100 * float(precision_at(relevance, [n]).mean()),
            100 * float(mean_average_precision_at(relevance, [n])[0]))


def _pooled_contiguous(backbone, images: torch.Tensor) -> torch.Tensor:
    """``extract_features``'s pooled output with the module and input in the contiguous
    layout (``extract_features`` itself always asks for channels_last)."""
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=backbone.precision == "bf16")
    with torch.inference_mode(), autocast:
        trunk = backbone.module.features(images.contiguous())
    return torch.relu(trunk.float()).mean(dim=(2, 3))


def features(backbone, inputs: np.ndarray, batch: int, channels_last: bool
             ) -> tuple[torch.Tensor, float, float]:
    if channels_last:
        run = lambda images: extract_features(backbone, images)[1]  # noqa: E731
    else:
        backbone.module.to(memory_format=torch.contiguous_format)
        run = lambda images: _pooled_contiguous(backbone, images)  # noqa: E731
    run(torch.from_numpy(inputs[:batch]))  # warm-up: oneDNN builds its primitives once
    outputs = []
    wall, cpu = time.perf_counter(), time.process_time()
    for start in range(0, len(inputs), batch):
        outputs.append(run(torch.from_numpy(inputs[start:start + batch])))
    return (torch.cat(outputs), len(inputs) / (time.perf_counter() - wall),
            len(inputs) / (time.process_time() - cpu) * torch.get_num_threads())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--mednist", type=Path, default=REPO.parent / "shared/data/mednist")
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    inputs, labels = mednist_sample(args.mednist, args.per_class, args.seed)
    print(f"{len(inputs)} MedNIST images, {len(set(labels))} classes; torch threads "
          f"{torch.get_num_threads()}; native bf16: {cpu_has_native_bf16()}; service default "
          f"on this CPU: {default_precision('cpu')}", flush=True)
    reference = None
    results = []
    for name, precision, channels_last in CANDIDATES:
        backbone = load_backbone(args.weights, precision=precision)
        pooled, wall_rate, cpu_rate = features(backbone, inputs, args.batch, channels_last)
        if reference is None:
            reference = pooled
        difference = float(((pooled - reference).norm(dim=1) / reference.norm(dim=1)).max())
        p20, map20 = loo_retrieval(pooled, labels)
        row = dict(candidate=name, images_per_s_wall=round(wall_rate, 2),
                   images_per_s_cpu_time=round(cpu_rate, 2),
                   max_relative_difference=difference, p20=round(p20, 2), map20=round(map20, 2))
        results.append(row)
        print(f"{name:22s} {wall_rate:6.1f} images/s wall, {cpu_rate:6.1f} by CPU time; "
              f"max rel. diff {difference:.1e}; P@20 {p20:.2f} %, mAP@20 {map20:.2f} %",
              flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
