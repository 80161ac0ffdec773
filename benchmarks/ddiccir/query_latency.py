"""Query-by-image latency as the paper measures it: DenseNet121 features + B.7 coding +
ranking, per query, warm, over an index of 100,000 retrieval codes (target: < 100 ms
on 2 CPU cores, < 5 ms batched on one H100).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/ddiccir/query_latency.py [--device cuda]
        [--size 224] [--ranking codes|features] [--precision fp32|bf16|fp16]

Random weights and a random model of the paper's sizes (C = 1024, k = 15, 128 / 256 atoms,
L = 15; maps of ``size / 32`` squared: 7 x 7 at ImageNet's 224 px, 4 x 4 at train-backbone's
default 128 px): the time does not depend on the values. ``--ranking features`` is a model
whose selection picked pooled features (``image-model --ranking auto``): no B.7 coding, and
an index of 1,024-value vectors instead of 256-value codes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from pipelines.backbone import (Backbone, build_densenet121, default_precision,  # noqa: E402
                                extract_features)
from pipelines.ddiccir import (DDicCIRModel, PipelineConfig, index_entries,  # noqa: E402
                               normalise_rows, rank_by_code)


def random_model(device: str, side: int = 7, ranking: str = "codes") -> DDicCIRModel:
    generator = torch.Generator().manual_seed(0)
    k, atoms1, atoms2, channels = 15, 128, 256, 1024
    layer1 = torch.randn(k, 9 * channels, atoms1, generator=generator).clamp_min(0)
    layer1 /= torch.linalg.vector_norm(layer1, dim=1, keepdim=True)
    layer2 = torch.randn(k * atoms1, atoms2, generator=generator)
    layer2 /= torch.linalg.vector_norm(layer2, dim=0, keepdim=True)
    centroids = normalise_rows(torch.randn(k, channels, generator=generator))
    return DDicCIRModel(config=PipelineConfig(device=device), map_shape=(channels, side, side),
                        layer1=layer1, layer2=layer2, labels=torch.zeros(1, dtype=torch.long),
                        codes=torch.zeros(1, atoms2), history=(), converged=False,
                        stop_reason="benchmark", ranking=ranking,
                        feature_centroids=centroids).to(device)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--index", type=int, default=100_000)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"),
                        help="default: what the service picks for the device")
    parser.add_argument("--size", type=int, default=224,
                        help="input side in pixels (the worker's: 224 for ImageNet weights, "
                             "the checkpoint's for train-backbone weights)")
    parser.add_argument("--ranking", choices=("codes", "features"), default="codes")
    args = parser.parse_args()
    device = torch.device(args.device)
    module = build_densenet121().eval().to(device).to(memory_format=torch.channels_last)
    backbone = Backbone(module=module, device=device, model_version="benchmark",
                        precision=args.precision or default_precision(device))
    model = random_model(args.device, args.size // 32, args.ranking)
    model.layer1_grams, model.layer2_gram  # computed once, as a warm service has them
    generator = torch.Generator().manual_seed(1)
    width = 256 if args.ranking == "codes" else 1024
    index_codes = normalise_rows(torch.randn(args.index, width, generator=generator)).to(device)
    index_clusters = torch.randint(0, 15, (args.index,), generator=generator).to(device)

    def synchronise() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def query(images: torch.Tensor) -> tuple[float, float, float]:
        """Seconds of features, coding (or pooling) and ranking."""
        started = time.perf_counter()
        maps, _ = extract_features(backbone, images)
        synchronise()
        featured = time.perf_counter()
        clusters, codes = index_entries(model, maps)
        synchronise()
        coded = time.perf_counter()
        rank_by_code(codes, clusters, index_codes, index_clusters, 20,
                     index_is_normalised=True)
        synchronise()
        return featured - started, coded - featured, time.perf_counter() - coded

    print(f"device {device}, torch threads {torch.get_num_threads()}, index {args.index:,} x "
          f"{width}, precision {backbone.precision}, {args.size} px, ranking {args.ranking}")
    for batch in (int(b) for b in args.batches.split(",")):
        images = torch.randn(batch, 3, args.size, args.size)
        query(images)  # warm
        times = sorted((query(images) for _ in range(args.repeats)), key=sum)
        median = times[len(times) // 2]
        print(f"batch {batch:>3}: {1000 * sum(median) / batch:7.1f} ms per query "
              f"(features {1000 * median[0] / batch:.1f}, coding {1000 * median[1] / batch:.1f}, "
              f"ranking {1000 * median[2] / batch:.1f})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
