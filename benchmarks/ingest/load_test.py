"""Bounded load test on loopback: N concurrent associations for T seconds, mixed sizes.

Starts `pacs-annotate serve` on the embedded database in a fresh directory, drives it from
N client processes (each one association, storing a small or a large instance at random,
timing every store), samples the listener's memory each second, and prints throughput, store
latency percentiles, failures and the memory trend.

    .venv/bin/python benchmarks/ingest/load_test.py --associations 16 --seconds 60
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _client(port: int, seconds: float, seed: int, results) -> None:
    import numpy as np

    from tests.dicom_client import RawAssociation, encode_dataset, make_ct

    rng = random.Random(seed)
    # encode each template once; every store gets a fresh SOP Instance UID of the same
    # length patched into the bytes, so the client spends its time sending, not encoding
    placeholder = f"1.2.826.0.1.3680043.10.9.{seed:04d}.{0:012d}"
    small = make_ct(sop=placeholder)
    large = make_ct(sop=placeholder)
    pixels = np.frombuffer(large.PixelData, dtype=np.int16).reshape(128, 128)
    large.PixelData = np.kron(pixels, np.ones((4, 4), dtype=np.int16)).tobytes()
    large.Rows = large.Columns = 512
    templates = [encode_dataset(small), encode_dataset(large)]
    sop_class = small.SOPClassUID
    assoc = RawAssociation(port, called="PACS_ANNOTATE")
    latencies, failures, stored_bytes = [], 0, 0
    first_store = time.time()
    deadline = time.monotonic() + seconds
    counter = 0
    while time.monotonic() < deadline:
        counter += 1
        sop = f"1.2.826.0.1.3680043.10.9.{seed:04d}.{counter:012d}"
        template = templates[1] if rng.random() < 0.2 else templates[0]
        data = template.replace(placeholder.encode(), sop.encode())
        started = time.perf_counter()
        status = assoc.store_bytes(data, sop_class=sop_class, sop_instance=sop)
        latencies.append(time.perf_counter() - started)
        if status != 0:
            failures += 1
        else:
            stored_bytes += len(data)
    last_store = time.time()
    assoc.release()
    results.put((latencies, failures, stored_bytes, first_store, last_store))


def _rss_of_tree(pid: int) -> int:
    import psutil

    try:
        parent = psutil.Process(pid)
        processes = [parent] + parent.children(recursive=True)
        return sum(p.memory_info().rss for p in processes if p.name().startswith("python"))
    except psutil.Error:
        return 0


def run_load(associations: int = 16, seconds: float = 60, processes: int | None = None) -> dict:
    """Run the load test (see the module docstring) and return its report."""
    args = argparse.Namespace(associations=associations, seconds=seconds, processes=processes)
    work = Path(tempfile.mkdtemp(prefix="pacs-load-"))
    port = _free_port()
    env = dict(os.environ, PACS_DATA_DIR=str(work / "data"), PACS_LOG_LEVEL="WARNING",
               PACS_MAX_ASSOCIATIONS=str(args.associations))
    env.pop("DATABASE_URL", None)
    command = [sys.executable, "-m", "service.cli", "serve", "--bind", "127.0.0.1",
               "--port", str(port)]
    if args.processes:
        command += ["--processes", str(args.processes)]
    server = subprocess.Popen(command, env=env, cwd=ROOT, stderr=open(work / "serve.log", "wb"))
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.2)
        time.sleep(1.0)
        results = multiprocessing.Queue()
        clients = [multiprocessing.Process(target=_client, args=(port, args.seconds, i, results))
                   for i in range(args.associations)]
        started = time.monotonic()
        for client in clients:
            client.start()
        memory = []
        while any(c.is_alive() for c in clients) and len(memory) < args.seconds + 30:
            memory.append((round(time.monotonic() - started, 1), _rss_of_tree(server.pid)))
            time.sleep(1.0)
        collected = [results.get(timeout=60) for _ in clients]
        for client in clients:
            client.join()

    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    latencies = sorted(x for lat, *_ in collected for x in lat)
    failures = sum(c[1] for c in collected)
    nbytes = sum(c[2] for c in collected)
    # throughput over the window in which all clients were storing (not their start-up)
    after_10s = [rss for t, rss in memory if t >= 10]
    report = {
        "associations": args.associations,
        "seconds_storing": round(max(c[4] for c in collected) - min(c[3] for c in collected), 1),
        "stores": len(latencies),
        "failures": failures,
        "instances_per_s": round(len(latencies) / (max(c[4] for c in collected)
                                                   - min(c[3] for c in collected)), 1),
        "mb_per_s": round(nbytes / (max(c[4] for c in collected)
                                    - min(c[3] for c in collected)) / 1e6, 1),
        "latency_ms": {
            "p50": round(1000 * latencies[len(latencies) // 2], 1),
            "p99": round(1000 * latencies[int(len(latencies) * 0.99)], 1),
            "max": round(1000 * latencies[-1], 1),
            "mean": round(1000 * statistics.fmean(latencies), 1),
        },
        "listener_rss_mib": {
            "at_10s": round(after_10s[0] / 2**20, 1) if after_10s else None,
            "max_after_10s": round(max(after_10s) / 2**20, 1) if after_10s else None,
            "at_end": round(after_10s[-1] / 2**20, 1) if after_10s else None,
        },
    }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--associations", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--processes", type=int, default=None, help="listener processes")
    args = parser.parse_args()
    print(json.dumps(run_load(args.associations, args.seconds, args.processes), indent=2))


if __name__ == "__main__":
    main()
