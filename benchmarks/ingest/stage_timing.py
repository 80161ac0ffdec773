"""Where the time of one store goes: the listener in-process, every stage timed.

    .venv/bin/python benchmarks/ingest/stage_timing.py <folder of .dcm> [--senders N]

Starts one listener process (no tags worker) on a fresh embedded database under
``--data-dir``, sends the folder with dcmtk ``storescu`` (N associations, files dealt
round-robin), and prints the instances/s, the CPU per instance of the listener,
PostgreSQL and the senders, and the median and p90 of each timed stage.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from service.config import load_settings  # noqa: E402
from service.database.engine import migrate, open_database  # noqa: E402
from service.ingest import ingestor as ingest, scp, storage  # noqa: E402

TIMES: dict[str, list[float]] = collections.defaultdict(list)


@contextlib.contextmanager
def _database(settings):
    """The configured database, migrated (as the CLI opens it)."""
    with open_database(settings) as database:
        migrate(database.engine)
        yield database


def timed(owner, name: str, label: str) -> None:
    function = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            TIMES[label].append(time.perf_counter() - start)

    setattr(owner, name, wrapper)


def postgres_cpu() -> float:
    import psutil

    total = 0.0
    for process in psutil.process_iter(["name"]):
        if (process.info["name"] or "").startswith("postgres"):
            try:
                times = process.cpu_times()
                total += times.user + times.system
            except psutil.Error:
                pass
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--senders", type=int, default=1)
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/pacs-stage-timing"))
    parser.add_argument("--port", type=int, default=11400)
    args = parser.parse_args()

    timed(scp, "handle_store", "whole store")
    timed(storage.FileStore, "write_temp", "write temp file")
    timed(ingest, "read_header", "read header")
    timed(storage.FileStore, "place", "place + flush file")
    timed(ingest.Ingestor, "_insert_instances", "INSERT (committer)")
    timed(ingest.Ingestor, "_write_rows", "batch incl. COMMIT")
    timed(ingest.Ingestor, "_wait", "wait for COMMIT")

    shutil.rmtree(args.data_dir, ignore_errors=True)
    os.environ.update(PACS_DATA_DIR=str(args.data_dir), PACS_PROCESSES="1",
                      PACS_TAGS_WORKER="false", PACS_PORT=str(args.port),
                      PACS_LOG_LEVEL="WARNING")
    settings = load_settings()
    files = sorted(str(p) for p in args.folder.rglob("*.dcm"))
    env = dict(os.environ, TCP_NODELAY="1")
    with _database(settings) as database, scp.ingestor_for(settings, database.engine) as ingestor:
        server = scp.start_listener(settings, ingestor)
        ours0 = time.process_time()
        pg0 = postgres_cpu()
        senders0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        senders = [subprocess.Popen(["storescu", "-aec", settings.ae_title, "127.0.0.1",
                                     str(args.port), *files[i::args.senders]], env=env)
                   for i in range(args.senders)]
        for sender in senders:
            sender.wait()
        wall = time.perf_counter() - start
        ours = time.process_time() - ours0
        pg = postgres_cpu() - pg0
        senders1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        server.shutdown()
    n = len(files)
    sender_cpu = (senders1.ru_utime + senders1.ru_stime - senders0.ru_utime - senders0.ru_stime)
    print(f"{n} instances, {args.senders} sender(s): {n / wall:.0f}/s ({wall / n * 1e3:.2f} ms each)")
    print(f"CPU per instance: listener {ours / n * 1e3:.2f} ms, PostgreSQL {pg / n * 1e3:.2f} ms, "
          f"senders {sender_cpu / n * 1e3:.2f} ms")
    for label, values in TIMES.items():
        values = sorted(values)
        print(f"  {label:22s} median {statistics.median(values) * 1e3:6.3f} ms   "
              f"p90 {values[int(len(values) * 0.9)] * 1e3:6.3f} ms   (n = {len(values)})")


if __name__ == "__main__":
    main()
