"""The nightly job end to end at archive scale: ``recluster`` on a synthetic archive in
PostgreSQL (target: 1,000,000 instances clustered and assigned in under 10 minutes on
2 cores, peak memory under 8 GiB).

    .venv/bin/python benchmarks/clustering/recluster_sql.py --instances 1000000

Loads ``make_archive(n)`` into a fresh embedded PostgreSQL (or ``--database-url``, whose
tables it fills: use an empty database) with COPY, then runs ``service.tags.tag_clusters.recluster``
with the paper's K candidates exactly as ``pacs-annotate recluster`` does, and prints the
step timings and the peak resident memory of this process plus its children (Dask workers)
sampled every 0.2 s, and separately of the PostgreSQL server processes.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic_archive import make_archive  # noqa: E402

from service.database.engine import create_db_engine, migrate, start_embedded  # noqa: E402
from service.tags.tag_clusters import ReclusterOptions, recluster  # noqa: E402


class PeakMemory:
    """Peak of the summed RSS of some process trees, sampled in a thread."""

    def __init__(self, roots: list[psutil.Process], interval: float = 0.2):
        self.roots, self.interval = roots, interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        total = 0
        for root in self.roots:
            for process in [root, *root.children(recursive=True)]:
                try:
                    total += process.memory_info().rss
                except psutil.Error:
                    pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def load_archive(engine: sa.Engine, n_instances: int, seed: int) -> float:
    """COPY a synthetic archive into the ingest and feature tables; returns seconds."""
    started = time.perf_counter()
    archive = make_archive(n_instances, seed=seed)
    feature_columns = [c for c in archive.columns
                       if c not in ("sop_instance_uid", "series_instance_uid")]
    series = archive["series_instance_uid"].unique()
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        cursor.execute("INSERT INTO patients (patient_id) VALUES ('SYNTH') RETURNING id")
        patient = cursor.fetchone()[0]

        def copy(table: str, columns: list[str], frame) -> None:
            buffer = io.StringIO()
            frame.to_csv(buffer, index=False, header=False, na_rep="\\N", sep="\t")
            with cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy_in:
                copy_in.write(buffer.getvalue())

        import pandas as pd

        studies = pd.DataFrame({"study_instance_uid": series + ".1", "patient_pk": patient})
        copy("studies", list(studies.columns), studies)
        series_rows = pd.DataFrame({"series_instance_uid": series,
                                    "study_instance_uid": series + ".1"})
        copy("series", list(series_rows.columns), series_rows)
        instances = pd.DataFrame({
            "sop_instance_uid": archive["sop_instance_uid"],
            "series_instance_uid": archive["series_instance_uid"],
            "study_instance_uid": archive["series_instance_uid"] + ".1",
            "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
            "transfer_syntax_uid": "1.2.840.10008.1.2.1",
            "file_path": "synthetic", "file_size": 0, "sha256": "", "tags": "{}"})
        copy("instances", list(instances.columns), instances)
        features = archive[["sop_instance_uid", *feature_columns]].copy()
        features.insert(1, "parser_version", "synthetic")
        copy("instance_features", [f'"{c}"' for c in features.columns], features)
        raw.commit()
    finally:
        raw.close()
    with engine.begin() as conn:
        conn.execute(sa.text("ANALYZE"))
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--partition-rows", type=int, default=50_000)
    parser.add_argument("--database-url", help="an empty database (default: embedded)")
    args = parser.parse_args()

    url = args.database_url or start_embedded(Path(tempfile.mkdtemp()) / "pgdata")
    engine = create_db_engine(url)
    migrate(engine)
    print(f"loading {args.instances:,} synthetic instances ...", flush=True)
    print(f"  loaded in {load_archive(engine, args.instances, args.seed):.1f} s", flush=True)

    server = [p for p in psutil.process_iter(["name", "cmdline"])
              if p.info["name"] and p.info["name"].startswith("postgres")]
    server_roots = [p for p in server if p.parent() is None or p.parent() not in server]
    options = ReclusterOptions(partition_rows=args.partition_rows, n_workers=args.workers)
    with PeakMemory([psutil.Process()]) as ours, PeakMemory(server_roots) as database:
        started = time.perf_counter()
        summary = recluster(engine, url, options,
                            progress=lambda line: print("  " + line, flush=True))
        wall = time.perf_counter() - started
    print(f"recluster: {wall:.1f} s wall, K = {summary.k}, silhouette {summary.silhouette:.3f}, "
          f"{summary.assigned:,} assigned")
    print("steps: " + ", ".join(f"{k} {v:.1f} s" for k, v in summary.timings.items()))
    print(f"peak RSS: this process + Dask workers {ours.peak / 2**30:.2f} GiB; "
          f"PostgreSQL server {database.peak / 2**30:.2f} GiB")
    engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
