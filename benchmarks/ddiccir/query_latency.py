"""Query-by-image latency as the paper measures it: DenseNet121 features + B.7 coding +
ranking, per query, warm, over an index of 100,000 retrieval codes (target: < 100 ms
on 2 CPU cores, < 5 ms batched on one H100).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/ddiccir/query_latency.py [--device cuda]

Random weights and a random model of the paper's sizes (C = 1024, 7 x 7, k = 15, 128 / 256
atoms, L = 15): the time does not depend on the values.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from pipelines.backbone import (Backbone, build_densenet121, default_precision,  # noqa: E402
                                extract_features)
from pipelines.ddiccir import (DDicCIRModel, PipelineConfig, encode_queries,  # noqa: E402
                               normalise_rows, rank_by_code)


def random_model(device: str) -> DDicCIRModel:
    generator = torch.Generator().manual_seed(0)
    k, atoms1, atoms2, channels = 15, 128, 256, 1024
    layer1 = torch.randn(k, 9 * channels, atoms1, generator=generator).clamp_min(0)
    layer1 /= torch.linalg.vector_norm(layer1, dim=1, keepdim=True)
    layer2 = torch.randn(k * atoms1, atoms2, generator=generator)
    layer2 /= torch.linalg.vector_norm(layer2, dim=0, keepdim=True)
    return DDicCIRModel(config=PipelineConfig(device=device), map_shape=(channels, 7, 7),
                        layer1=layer1, layer2=layer2, labels=torch.zeros(1, dtype=torch.long),
                        codes=torch.zeros(1, atoms2), history=(), converged=False,
                        stop_reason="benchmark").to(device)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--index", type=int, default=100_000)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"),
                        help="default: what the service picks for the device")
    args = parser.parse_args()
    device = torch.device(args.device)
    module = build_densenet121().eval().to(device).to(memory_format=torch.channels_last)
    backbone = Backbone(module=module, device=device, model_version="benchmark",
                        precision=args.precision or default_precision(device))
    model = random_model(args.device)
    model.layer1_grams, model.layer2_gram  # computed once, as a warm service has them
    generator = torch.Generator().manual_seed(1)
    index_codes = normalise_rows(torch.randn(args.index, 256, generator=generator)).to(device)
    index_clusters = torch.randint(0, 15, (args.index,), generator=generator).to(device)

    def query(images: torch.Tensor) -> None:
        maps, _ = extract_features(backbone, images)
        clusters, codes, _ = encode_queries(model, maps)
        rank_by_code(codes, clusters, index_codes, index_clusters, 20,
                     index_is_normalised=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    print(f"device {device}, torch threads {torch.get_num_threads()}, index {args.index:,}, "
          f"precision {backbone.precision}")
    for batch in (int(b) for b in args.batches.split(",")):
        images = torch.randn(batch, 3, 224, 224)
        query(images)  # warm
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            query(images)
            times.append(time.perf_counter() - started)
        median = statistics.median(times)
        print(f"batch {batch:>3}: {1000 * median / batch:7.1f} ms per query "
              f"({1000 * median:.0f} ms per batch)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
