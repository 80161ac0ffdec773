"""Fit time of ``fit_pipeline`` with the default configuration against archive size.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/ddiccir/fit_time.py SIZE [SIZE ...]
        [--features FEATURES.npz]

Without ``--features``: synthetic post-ReLU 1024 x 7 x 7 maps with 15 planted channel
profiles (as bench_fit.py), float16 as the feature store keeps them. With it: the first SIZE
images of an extract_features.py file (real DenseNet121 maps). Prints, per size, the passes,
stop reason, seconds in all and per 1,000 images, and the seconds per stage of every pass.
2 torch threads; note the machine's load (``uptime``) with the numbers.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipelines.ddiccir import PipelineConfig, fit_pipeline  # noqa: E402


def synthetic(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    profiles = torch.randn(15, 1024, 1, 1, generator=generator).clamp_min(0)
    groups = torch.arange(n) % 15
    maps = ((profiles[groups] * torch.rand(n, 1, 7, 7, generator=generator) * 2
             + torch.randn(n, 1024, 7, 7, generator=generator) * 0.5) - 0.3).clamp_min(0).half()
    return maps, maps.float().mean(dim=(2, 3))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("sizes", type=int, nargs="+")
    parser.add_argument("--features", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)
    logging.basicConfig(level=logging.ERROR)
    data = np.load(args.features) if args.features else None
    for size in args.sizes:
        if data is not None:
            maps = torch.from_numpy(data["maps"][:size])
            pooled = torch.from_numpy(data["pooled"][:size]).float()
        else:
            maps, pooled = synthetic(size)
        load = os.getloadavg()[0]
        tick = time.perf_counter()
        model = fit_pipeline(maps, pooled, PipelineConfig())
        seconds = time.perf_counter() - tick
        print(f"{maps.shape[0]} images: {len(model.history)} passes, stop {model.stop_reason}, "
              f"{seconds:.0f} s, {1000 * seconds / maps.shape[0]:.0f} s per 1,000 images "
              f"(load {load:.1f} at start, {os.getloadavg()[0]:.1f} at end)", flush=True)
        for record in model.history:
            print(f"  pass {record.iteration}: "
                  + ", ".join(f"{k} {v:.0f} s" for k, v in record.seconds.items())
                  + f", label change {record.label_change}, replaced l1 "
                  f"{sum(record.layer1_replaced_atoms)} l2 {record.layer2_replaced_atoms}",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
