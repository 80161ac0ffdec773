"""Time and loss of K-medoids variants on a Gower matrix of the benchmark tag table.

    .venv/bin/python benchmarks/clustering/bench_kmedoids.py --n 5000 --k 15 [--pam-n 5000]

Rows: our BUILD, our FasterPAM (BUILD + eager SWAP), our PAM (BUILD + best-swap SWAP, at
--pam-n rows), and the optional GPL `kmedoids` package (Rust) when installed: FasterPAM from
our BUILD medoids, FasterPAM with its default random init, and its PAM.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_data import make_tag_table  # noqa: E402
from pipelines.gower import encode_features, fit_ranges, gower_matrix  # noqa: E402
from pipelines.kmedoids import KMedoids, build_init, medoid_loss  # noqa: E402

log = logging.getLogger("bench_kmedoids")


def timed(function):
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--k", type=int, default=15)
    parser.add_argument("--pam-n", type=int, default=5000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    numeric, categorical = make_tag_table(args.n)
    data = encode_features(numeric, categorical)
    distances = gower_matrix(data, ranges=fit_ranges(data))
    log.info("n=%d K=%d Gower matrix %s", args.n, args.k, distances.dtype)

    _, seconds = timed(lambda: build_init(distances, args.k))
    log.info("ours BUILD only              %7.2f s", seconds)
    model, seconds = timed(lambda: KMedoids(args.k).fit(distances))
    log.info("ours fasterpam (BUILD+SWAP)  %7.2f s  loss %.4f  passes %d swaps %d",
             seconds, model.inertia_, model.n_iter_, model.n_swaps_)
    fasterpam_loss = model.inertia_
    for seed in (0, 1):
        randomly, seconds = timed(
            lambda: KMedoids(args.k, init="random", random_state=seed).fit(distances))
        log.info("ours fasterpam random init %d  %7.2f s  loss %.4f  passes %d swaps %d",
                 seed, seconds, randomly.inertia_, randomly.n_iter_, randomly.n_swaps_)

    pam_distances = distances[:args.pam_n, :args.pam_n]
    pam, seconds = timed(lambda: KMedoids(args.k, method="pam").fit(pam_distances))
    log.info("ours pam (n=%d)            %7.2f s  loss %.4f  swaps %d",
             pam_distances.shape[0], seconds, pam.inertia_, pam.n_swaps_)
    if args.pam_n >= args.n:
        log.info("fasterpam / pam loss ratio %.5f", fasterpam_loss / pam.inertia_)

    try:
        import kmedoids
    except ImportError:
        log.info("kmedoids package not installed: skipped")
        return
    initial = build_init(distances, args.k)
    result, seconds = timed(lambda: kmedoids.fasterpam(distances, initial.copy(), n_cpu=1))
    log.info("kmedoids.fasterpam from our BUILD  %7.2f s  loss %.4f", seconds, result.loss)
    result, seconds = timed(
        lambda: kmedoids.fasterpam(distances, args.k, random_state=0, n_cpu=1))
    log.info("kmedoids.fasterpam random init     %7.2f s  loss %.4f", seconds, result.loss)
    result, seconds = timed(lambda: kmedoids.pam(pam_distances, args.k, init="build"))
    log.info("kmedoids.pam (n=%d)              %7.2f s  loss %.4f", pam_distances.shape[0],
             seconds, float(medoid_loss(pam_distances, result.medoids)))


if __name__ == "__main__":
    main()
