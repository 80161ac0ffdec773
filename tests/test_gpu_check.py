"""benchmarks/gpu_check.py: its CPU-only part runs here, and without a GPU it says so."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from .conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "gpu_check.py"


def test_every_core_section_runs_on_the_cpu_and_the_report_is_complete(tmp_path):
    out = tmp_path / "check.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick",
                           "--part", "core", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    sections = ("environment", "features", "network", "omp", "query", "image_model_fit")
    assert [name for name in report if name != "total_seconds"] == list(sections)
    assert all(report[name]["status"] == "ok" for name in sections), report
    assert report["features"]["fp32"]["max_relative_difference"] == 0.0  # same code, same CPU
    assert report["features"]["default"]["max_relative_difference"] < 1e-2
    assert report["network"]["fp32"]["images_per_s"] > 0
    assert report["omp"]["speedup"] > 0 and report["omp"]["reference"]
    assert report["query"]["batch_1_ms_per_query"] > 0
    assert report["image_model_fit"]["passes"] >= 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_asking_for_cuda_without_one_is_one_line_and_exit_2(tmp_path):
    out = tmp_path / "check.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert done.returncode == 2
    assert "no CUDA device here" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists()
