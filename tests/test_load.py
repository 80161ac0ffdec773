"""The bounded load test as a CI check: 16 concurrent associations of mixed small and
large instances against `serve` on the embedded database; no store fails and the listener's
memory stays flat after the first 10 s. Throughput and latency are benchmark numbers
(benchmarks/ingest/README.md), not asserted here. PACS_LOAD_SECONDS=60 for the long form."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

LOAD_TEST = Path(__file__).resolve().parents[1] / "benchmarks" / "ingest" / "load_test.py"


def _load_test_module():
    spec = importlib.util.spec_from_file_location("load_test", LOAD_TEST)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sixteen_associations_no_failure_flat_memory():
    seconds = float(os.environ.get("PACS_LOAD_SECONDS", "30"))
    report = _load_test_module().run_load(associations=16, seconds=seconds, processes=1)
    assert report["stores"] > 16 * 5, report
    assert report["failures"] == 0, report
    memory = report["listener_rss_mib"]
    # flat: no more than 25 % above the size at 10 s (measured: 371 -> 383 MiB over 60 s)
    assert memory["max_after_10s"] <= 1.25 * memory["at_10s"], report
