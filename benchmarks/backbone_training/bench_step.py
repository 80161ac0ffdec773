"""Training-step throughput of DenseNet121 on the CPU: images/s of forward + backward + AdamW
for each candidate (input size, memory format, autocast dtype, torch.compile).

    .venv/bin/python benchmarks/backbone_training/bench_step.py --sizes 224 128 96 64 \
        --threads 2 --batch 32 --steps 3

Prints one line per candidate: images/s of wall time, images per CPU-second of the process
(less sensitive to other jobs on the cores: on an idle machine with T threads the wall rate is
at most T times it), and the machine load (`os.getloadavg`), because other jobs may share the
cores. Random inputs: the speed of a convolution does not depend on the pixels.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import time

import torch
import torch.nn.functional as F

from pipelines.backbone import build_densenet121


def measure(size: int, batch: int, steps: int, channels_last: bool, dtype: str,
            compiled: bool) -> tuple[float, float]:
    """(images per second of wall time, images per CPU-second of this process)."""
    torch.manual_seed(0)
    model = build_densenet121(6).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step_model = torch.compile(model) if compiled else model
    images = torch.randn(batch, 3, size, size)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    targets = torch.randint(0, 6, (batch,))
    autocast = (contextlib.nullcontext() if dtype == "fp32"
                else torch.autocast("cpu", dtype=torch.bfloat16))

    def step() -> None:
        with autocast:
            logits = step_model(images)
        loss = F.cross_entropy(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up (and compilation)
    started, cpu_started = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    return steps * batch / wall, steps * batch / cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 128, 96, 64])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--formats", nargs="+", default=["contiguous", "channels_last"])
    parser.add_argument("--compile", action="store_true", help="also torch.compile")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    compiled_options = [False, True] if args.compile else [False]
    for size, fmt, dtype, compiled in itertools.product(args.sizes, args.formats, args.dtypes,
                                                        compiled_options):
        rate, cpu_rate = measure(size, args.batch, args.steps, fmt == "channels_last", dtype,
                                 compiled)
        load = os.getloadavg()[0]
        print(f"size {size:4d}  {fmt:13s} {dtype:4s} {'compiled' if compiled else 'eager':8s}"
              f"  {rate:7.1f} images/s  {cpu_rate:7.2f} images/CPU-s  (load {load:.2f})",
              flush=True)


if __name__ == "__main__":
    main()
