"""The command line, end to end on the embedded database: serve, restart, import, status."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from .conftest import REPO_ROOT, SHARED_DICOM
from .dicom_client import associate, make_ct

CLI = [sys.executable, "-m", "service.cli"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "PACS_CONFIG")}
    env.update(PACS_DATA_DIR=str(data_dir), PACS_LOG_FORMAT="json", **extra)
    return env


def _run(args: list[str], env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + args, env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300, check=check)


class Serve:
    def __init__(self, data_dir: Path, port: int, *extra: str):
        self.port = port
        self.log = data_dir.parent / f"serve-{port}.log"
        self.process = subprocess.Popen(
            CLI + ["serve", "--bind", "127.0.0.1", "--port", str(port), *extra],
            env=_env(data_dir), cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
            stderr=open(self.log, "ab"))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.1)
        raise AssertionError("listener did not start:\n" + self.log.read_text())

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


def _status(data_dir: Path) -> dict:
    return json.loads(_run(["status", "--json"], _env(data_dir)).stdout)


@pytest.mark.parametrize("processes", ["1", "2"])
def test_data_survives_restart_of_service_and_embedded_database(tmp_path, processes):
    data_dir = tmp_path / "data"
    port = _free_port()
    ds = make_ct()
    server = Serve(data_dir, port, "--processes", processes)
    try:
        assoc = associate(port, called="PACS_ANNOTATE")
        assert assoc.send_c_store(ds).Status == 0x0000
        assoc.release()
        # spare temp files are made by the processes that store, and only by them
        serving = psutil.Process(server.process.pid)
        storing = {serving.pid} if processes == "1" else {
            p.pid for p in serving.children() if p.nice() == serving.nice()
            and "spawn_main" in " ".join(p.cmdline())}  # not the tags worker, not PostgreSQL
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            spare_owners = {int(p.name.split("-")[1].split(".")[0])
                            for p in (data_dir / "storage" / ".incoming").glob("spare-*")}
            if spare_owners == storing:
                break
            time.sleep(0.1)
        assert spare_owners == storing
    finally:
        assert server.stop() == 0
    assert not list((data_dir / "storage" / ".incoming").glob("spare-*"))
    # the embedded PostgreSQL stopped with the service
    assert not (data_dir / "pgdata" / "postmaster.pid").exists()
    server = Serve(data_dir, port, "--processes", processes)
    try:
        assoc = associate(port, called="PACS_ANNOTATE")
        assert assoc.send_c_store(ds).Status == 0x0000  # a duplicate now
        other = make_ct()
        assert assoc.send_c_store(other).Status == 0x0000
        assoc.release()
    finally:
        assert server.stop() == 0
    status = _status(data_dir)
    assert status["archive"]["instances"] == 2
    assert status["counters"]["stored"] == 2
    assert status["counters"]["duplicates"] == 1
    assert sum(status["queue"]["tags"].values()) == 2  # pending or already parsed


def test_import_directory_then_again_is_all_duplicates(tmp_path):
    source = SHARED_DICOM / "dcm_qa_siemens"
    if not source.is_dir():
        pytest.skip(f"{source} is absent")
    data_dir = tmp_path / "data"
    first = _run(["import", str(source), "--quiet"], _env(data_dir))
    files = sum(1 for p in source.rglob("*") if p.is_file())
    licence_files = sum(1 for p in source.rglob("*") if p.is_file() and "_provenance" in p.parts)
    assert f"{files} files" in first.stdout
    assert f"{licence_files} x not a DICOM file" in first.stdout
    status = _status(data_dir)
    stored = status["archive"]["instances"]
    assert stored > 0
    second = _run(["import", str(source), "--quiet"], _env(data_dir))
    assert f"duplicate {stored}" in second.stdout
    assert _status(data_dir)["archive"]["instances"] == stored


def test_import_counts_non_dicom_files_as_rejected(tmp_path):
    source = tmp_path / "mixed"
    source.mkdir()
    (source / "notes.txt").write_text("not an image")
    make_ct().save_as(source / "a.dcm", enforce_file_format=True)
    data_dir = tmp_path / "data"
    result = _run(["import", str(source), "--quiet"], _env(data_dir))
    assert "rejected 1" in result.stdout and "stored 1" in result.stdout
    strict = _run(["import", str(source), "--quiet", "--strict"], _env(data_dir), check=False)
    assert strict.returncode == 1


def test_reparse_parses_the_archive(tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    for index in range(3):
        make_ct().save_as(source / f"{index}.dcm", enforce_file_format=True)
    data_dir = tmp_path / "data"
    _run(["import", str(source), "--quiet"], _env(data_dir))
    result = _run(["reparse", "--quiet"], _env(data_dir))
    assert result.stdout.startswith("3 instances parsed")
    rows = _run(["sql", "SELECT count(*) AS n FROM instance_features WHERE modality = 'CT'"],
                _env(data_dir)).stdout
    assert rows.splitlines()[2].strip() == "3"
    again = _run(["reparse", "--quiet"], _env(data_dir))
    assert again.stdout.startswith("0 instances parsed")


def test_status_text_and_sql(tmp_path):
    data_dir = tmp_path / "data"
    text = _run(["status"], _env(data_dir)).stdout
    assert "received" in text and "work queue" in text
    rows = _run(["sql", "SELECT count(*) AS n FROM instances"], _env(data_dir)).stdout
    assert rows.splitlines()[0].strip() == "n" and "(1 rows)" in rows


def test_bad_configuration_exits_2_with_a_message(tmp_path):
    result = _run(["status"], _env(tmp_path, PACS_PORT="99999"), check=False)
    assert result.returncode == 2
    assert "port" in result.stderr


def test_database_password_is_never_printed(tmp_path):
    env = _env(tmp_path, DATABASE_URL="postgresql://scott:tiger-secret@127.0.0.1:1/nodb")
    result = _run(["db-url"], env)
    assert "tiger-secret" not in result.stdout + result.stderr
    failed = _run(["status"], env, check=False)
    assert failed.returncode != 0
    assert "tiger-secret" not in failed.stdout + failed.stderr


def test_serve_parses_tags_in_a_lower_priority_process(tmp_path):
    data_dir = tmp_path / "data"
    port = _free_port()
    server = Serve(data_dir, port, "--processes", "1")
    try:
        # the port opens only once the worker has started (it lowers its priority first):
        # its start-up must not share the CPU with the first stores
        workers = [p for p in psutil.Process(server.process.pid).children()
                   if p.nice() > psutil.Process().nice()]
        assert len(workers) == 1
        assoc = associate(port, called="PACS_ANNOTATE")
        assert assoc.send_c_store(make_ct()).Status == 0x0000
        assoc.release()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            counts = _status(data_dir)["queue"].get("tags", {})
            if counts.get("done") == 1:
                break
            time.sleep(0.2)
        assert counts == {"done": 1}
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize("processes", ["1", "2"])
def test_a_second_service_on_a_taken_port_refuses_to_start(tmp_path, processes):
    """Listener processes share their port (SO_REUSEPORT); a second service must not join
    them, or the kernel would spread one PACS's stores over two archives."""
    port = _free_port()
    first_dir, second_dir = tmp_path / "first" / "data", tmp_path / "second" / "data"
    first_dir.parent.mkdir()
    server = Serve(first_dir, port, "--processes", processes)
    try:
        second = subprocess.run(
            CLI + ["serve", "--bind", "127.0.0.1", "--port", str(port), "--processes", "2"],
            env=_env(second_dir), cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert f"port {port} on 127.0.0.1 is already in use" in second.stderr
        assert "Traceback" not in second.stderr
        assoc = associate(port, called="PACS_ANNOTATE")
        for _ in range(15):
            assert assoc.send_c_store(make_ct()).Status == 0x0000
        assoc.release()
    finally:
        assert server.stop() == 0
    assert _status(first_dir)["archive"]["instances"] == 15
