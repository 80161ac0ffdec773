"""Time pipelines.gower.gower_matrix against gower.gower_matrix on the same data.

    .venv/bin/python benchmarks/clustering/bench_gower.py --n 5000 [--skip-package]

Data: benchmarks/clustering/bench_data.py (60 numeric + 25 categorical, 20 % missing).
The `gower` package has no missing-value rule, so its output is not compared here; the
tests compare the two on complete data.
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

log = logging.getLogger("bench_gower")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-package", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    numeric, categorical = make_tag_table(args.n)
    start = time.perf_counter()
    data = encode_features(numeric, categorical)
    ranges = fit_ranges(data)
    encode_seconds = time.perf_counter() - start
    ours = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        matrix = gower_matrix(data, ranges=ranges)
        ours.append(time.perf_counter() - start)
    log.info("n=%d encode+ranges %.3f s; pipelines.gower.gower_matrix best %.3f s "
             "(runs %s), %s %s", args.n, encode_seconds, min(ours),
             ", ".join(f"{t:.3f}" for t in ours), matrix.dtype, matrix.shape)
    if args.skip_package:
        return
    import gower
    import pandas as pd

    frame = pd.DataFrame(
        {**{f"n{k}": numeric[:, k] for k in range(numeric.shape[1])},
         **{f"c{k}": pd.Series(categorical[:, k], dtype=object)
            for k in range(categorical.shape[1])}})
    start = time.perf_counter()
    gower.gower_matrix(frame)
    package_seconds = time.perf_counter() - start
    log.info("n=%d gower.gower_matrix %.1f s; ratio %.0fx (package / ours best)",
             args.n, package_seconds, package_seconds / min(ours))


if __name__ == "__main__":
    main()
