"""Tag clustering of a whole synthetic archive: encode -> profiles -> fit -> Dask assignment.

    .venv/bin/python benchmarks/clustering/archive_scale.py --instances 1000000

Steps (wall time each, and the peak memory of the whole process tree):

1. ``generate``: ``synthetic_archive.make_archive`` (not part of the pipeline).
2. ``write partitions``: the raw feature values cut into row ranges of ``--partition-rows``,
   saved as .npy files in a temporary directory. They stand in for the SQL table the
   service reads key ranges from (not part of the pipeline).
3. ``encode``: DataFrame columns -> ``encode_features`` (numeric float/NaN, categorical codes).
4. ``profiles``: ``distinct_profiles``.
5. ``fit``: ``fit_profile_clusters`` over the paper's K candidates (distance matrix, choice
   of K by weighted silhouette, final fit).
6. ``assign``: ``assign_partitions`` with a LocalCluster of ``--workers`` processes (start-up
   included). Each worker loads its partitions' raw values, encodes them with the model's
   frozen vocabularies, assigns, and saves labels and distances next to them -- the way the
   SQL ``load`` / ``store`` will work.
7. ``verify`` (not timed in the total): ``--verify-partitions`` partitions are recomputed
   in this process with ``model.assign`` and must match the stored results bit for bit.

Memory: a sampler thread adds up the resident set size (RSS) of this process and all its
descendants (the Dask scheduler runs in this process; nanny and worker processes are
children) every 0.1 s and keeps the peak, overall and per step. Pages shared between
processes are counted in each, so the sum over-states the true use a little.
``resource.getrusage`` maxima are printed as well.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic_archive import archive_columns, make_archive  # noqa: E402
from pipelines.gower import GowerData, encode_features  # noqa: E402
from pipelines.tag_clustering import (  # noqa: E402
    PAPER_CANDIDATES, assign_partitions, distinct_profiles, fit_profile_clusters,
)

log = logging.getLogger("archive_scale")
GIB = 2 ** 30


# ---------------------------------------------------------------- partitions on disk


def write_partitions(frame, directory: Path, partition_rows: int) -> list[int]:
    """Raw numeric (float64) and categorical (object, str/None) values per row range."""
    numeric_columns, categorical_columns = archive_columns()
    partitions = []
    for index, start in enumerate(range(0, len(frame), partition_rows)):
        rows = frame.iloc[start:start + partition_rows]
        np.save(directory / f"part-{index:05d}-numeric.npy",
                rows[list(numeric_columns)].to_numpy(np.float64))
        np.save(directory / f"part-{index:05d}-categorical.npy",
                rows[list(categorical_columns)].to_numpy(object), allow_pickle=True)
        partitions.append(index)
    return partitions


def load_partition(index: int, *, directory: str, vocabularies) -> GowerData:
    """Worker side: one partition's rows, encoded with the model's frozen vocabularies."""
    folder = Path(directory)
    numeric = np.load(folder / f"part-{index:05d}-numeric.npy")
    categorical = np.load(folder / f"part-{index:05d}-categorical.npy", allow_pickle=True)
    return encode_features(numeric, categorical, vocabularies=vocabularies)


def store_partition(index: int, labels: np.ndarray, distances: np.ndarray, *,
                    directory: str) -> int:
    """Worker side: save one partition's labels and distances; returns the row count."""
    folder = Path(directory)
    np.save(folder / f"part-{index:05d}-labels.npy", labels)
    np.save(folder / f"part-{index:05d}-distances.npy", distances)
    return int(labels.size)


# ---------------------------------------------------------------- measuring


class MemorySampler:
    """Peak summed RSS of this process and its descendants, sampled every ``interval``."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.peak = 0
        self.step_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _tree_rss(self) -> int:
        process = psutil.Process()
        total = process.memory_info().rss
        for child in process.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:  # exited between listing and reading
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = self._tree_rss()
            self.peak = max(self.peak, rss)
            self.step_peak = max(self.step_peak, rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def new_step(self) -> None:
        self.step_peak = self._tree_rss()


class Steps:
    """Wall time and peak memory per named step."""

    def __init__(self, sampler: MemorySampler) -> None:
        self.sampler = sampler
        self.rows: list[tuple[str, float, float, bool]] = []

    def run(self, name: str, *, in_total: bool = True) -> "_Step":
        return _Step(self, name, in_total)


class _Step:
    def __init__(self, steps: Steps, name: str, in_total: bool) -> None:
        self.steps, self.name, self.in_total = steps, name, in_total

    def __enter__(self) -> None:
        self.steps.sampler.new_step()
        self.started = time.perf_counter()
        log.info("step %s ...", self.name)

    def __exit__(self, *exc: object) -> None:
        seconds = time.perf_counter() - self.started
        time.sleep(0.15)  # let the sampler see the end of the step
        peak = self.steps.sampler.step_peak / GIB
        self.steps.rows.append((self.name, seconds, peak, self.in_total))
        log.info("step %s: %.1f s, peak RSS (process tree) %.2f GiB", self.name, seconds, peak)


# ---------------------------------------------------------------- the run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--instances", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--partition-rows", type=int, default=50_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-profiles", type=int, default=5000)
    parser.add_argument("--k-selection-profiles", type=int, default=None)
    parser.add_argument("--candidates", type=int, nargs="+", default=list(PAPER_CANDIDATES))
    parser.add_argument("--verify-partitions", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the partition files go (default: a temporary directory)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import distributed.config  # noqa: F401  (sets its loggers' levels on import: before ours)
    logging.getLogger("distributed").setLevel(logging.WARNING)

    with tempfile.TemporaryDirectory(dir=args.workdir) as directory, MemorySampler() as sampler:
        steps = Steps(sampler)
        folder = Path(directory)
        numeric_columns, categorical_columns = archive_columns()

        with steps.run("generate", in_total=False):
            frame = make_archive(args.instances, seed=args.seed)
        with steps.run("write partitions", in_total=False):
            partitions = write_partitions(frame, folder, args.partition_rows)
        with steps.run("encode"):
            data = encode_features(frame[list(numeric_columns)].to_numpy(np.float64),
                                   frame[list(categorical_columns)].to_numpy(object))
        modality_share = frame["modality"].value_counts(normalize=True).round(3).to_dict()
        missing_share = float(np.mean(
            [frame[c].isna().mean() for c in (*numeric_columns, *categorical_columns)]))
        del frame
        with steps.run("profiles"):
            profiles = distinct_profiles(data)
        del data
        with steps.run("fit"):
            model = fit_profile_clusters(
                profiles.data, profiles.counts, candidates=tuple(args.candidates),
                max_profiles=args.max_profiles, k_selection_profiles=args.k_selection_profiles,
                random_state=args.seed)
        n_profiles = profiles.data.n_samples
        del profiles

        finished_at: list[float] = []

        def report(done: int, total: int) -> None:
            finished_at.append(time.perf_counter())
            if done == total or done % max(1, total // 10) == 0:
                log.info("assigned %d / %d partitions", done, total)

        assign_started = time.perf_counter()

        with steps.run("assign"):
            stored = assign_partitions(
                model, partitions,
                functools.partial(load_partition, directory=directory,
                                  vocabularies=model.medoids.vocabularies),
                functools.partial(store_partition, directory=directory),
                n_workers=args.workers, progress=report)

        with steps.run("verify", in_total=False):
            checked = verify(model, partitions, folder, args.verify_partitions, args.seed)
            labels = np.concatenate([np.load(folder / f"part-{p:05d}-labels.npy")
                                     for p in partitions])

    assert stored == args.instances == labels.size, (stored, args.instances, labels.size)
    first_done = finished_at[0] - assign_started
    last_done = finished_at[-1] - assign_started
    print_report(args, steps, sampler, model, n_profiles, stored, labels, checked,
                 modality_share, missing_share, first_done, last_done)


def verify(model, partitions: list[int], folder: Path, how_many: int, seed: int) -> list[int]:
    """Recompute some partitions here; stored results must be bit-identical."""
    rng = np.random.default_rng(seed)
    picked = sorted(rng.choice(partitions, size=min(how_many, len(partitions)), replace=False))
    for index in picked:
        data = load_partition(int(index), directory=str(folder),
                              vocabularies=model.medoids.vocabularies)
        labels, distances = model.assign(data)
        np.testing.assert_array_equal(np.load(folder / f"part-{index:05d}-labels.npy"), labels)
        np.testing.assert_array_equal(np.load(folder / f"part-{index:05d}-distances.npy"),
                                      distances)
    return [int(i) for i in picked]


def print_report(args, steps: Steps, sampler: MemorySampler, model, n_profiles: int,
                 stored: int, labels: np.ndarray, checked: list[int],
                 modality_share: dict, missing_share: float, first_done: float,
                 last_done: float) -> None:
    total = sum(seconds for _, seconds, _, in_total in steps.rows if in_total)
    self_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
    children_max = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / GIB
    sizes = np.bincount(labels, minlength=model.k)
    lines = [
        f"instances {args.instances:,}, partitions of {args.partition_rows:,} rows, "
        f"{args.workers} workers, {os.cpu_count()} CPUs, 1-min load average at the end "
        f"{os.getloadavg()[0]:.2f}",
        f"modality shares {modality_share}; missing share of all cells {missing_share:.3f}",
        f"distinct profiles {n_profiles:,}; clustered {model.n_profiles_clustered:,} "
        f"(K chosen on {model.n_profiles_for_k:,}); K = {model.k}; silhouettes "
        + ", ".join(f"{k}: {v:.3f}" for k, v in model.silhouettes.items()),
        "fit sub-steps: " + ", ".join(f"{k} {v:.1f} s" for k, v in model.timings.items()),
        f"rows stored {stored:,}; cluster sizes min {sizes.min():,} / median "
        f"{int(np.median(sizes)):,} / max {sizes.max():,}; verified partitions {checked} "
        "bit-identical to model.assign in the driver",
        f"assign: first partition stored {first_done:.1f} s after the call (cluster start-up, "
        f"model broadcast, one partition), last {last_done:.1f} s",
        "",
        "| step | wall time | peak RSS, process tree |",
        "|---|---|---|",
    ]
    for name, seconds, peak, in_total in steps.rows:
        label = name if in_total else f"({name})"
        lines.append(f"| {label} | {seconds:.1f} s | {peak:.2f} GiB |")
    lines.append(f"| **pipeline total** (encode + profiles + fit + assign) | **{total:.1f} s** "
                 f"| **{sampler.peak / GIB:.2f} GiB** (whole run) |")
    lines.append("")
    lines.append(f"getrusage max RSS: this process {self_max:.2f} GiB, largest child "
                 f"{children_max:.2f} GiB")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
