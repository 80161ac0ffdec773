"""The command line, end to end on the embedded database: serve, restart, import, status."""

from __future__ import annotations

import argparse
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
from .test_image_worker import weights  # noqa: F401  (fixture)

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
    _run(["migrate"], _env(data_dir))  # a new archive: read-only commands refuse to make one
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


# ---------------------------------------------------------------- a CLI that speaks to a person

def _person_env(tmp_path: Path, database_url: str | None = None, **extra: str) -> dict[str, str]:
    """As a person runs it: no PACS_LOG_FORMAT (the default), optionally an external database."""
    env = {k: v for k, v in _env(tmp_path / "data").items() if k != "PACS_LOG_FORMAT"}
    if database_url:
        env["DATABASE_URL"] = database_url
    env.update(extra)
    return env


def _archive_folder(folder: Path, count: int = 12) -> Path:
    """CT files of three body parts (three tag profiles) for import."""
    folder.mkdir()
    for number in range(count):
        ds = make_ct()
        ds.BodyPartExamined, ds.Manufacturer = [("HEAD", "SIEMENS"), ("KNEE", "FUJIFILM"),
                                                ("CHEST", "Philips")][number % 3]
        ds.save_as(folder / f"{number}.dcm", enforce_file_format=True)
    return folder


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1, result.stderr
    return errors[0]


def test_help_of_every_subcommand_shows_its_defaults():
    from service.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {"serve", "import", "recluster", "worker", "evaluate"} <= set(commands.choices)
    for name, sub in commands.choices.items():
        text = " ".join(sub.format_help().split())
        for action in sub._actions:
            if (not action.option_strings or action.default is None or action.default is False
                    or action.default == argparse.SUPPRESS):
                continue
            assert (f"(default: {action.default})" in text  # or a help that names it
                    or "default" in (action.help or "")), (name, action.option_strings)
    worker = " ".join(commands.choices["worker"].format_help().split())
    assert "--drain work through what is queued now" in worker
    assert "(default: 30)" in " ".join(commands.choices["train-backbone"].format_help().split())


@pytest.mark.parametrize("args, message", [
    (["analyze", "--top", "-1"], "argument --top: must be at least 1, got -1"),
    (["image-model", "--clusters", "0"], "argument --clusters: must be at least 1, got 0"),
    (["analyze", "--unique-ratio", "2"], "argument --unique-ratio: must be in (0, 1], got 2"),
    (["visual-check", "--samples", "1"], "argument --samples: must be at least 2, got 1"),
])
def test_bad_arguments_are_one_line_and_exit_2(tmp_path, args, message):
    result = _run(args, _person_env(tmp_path), check=False)
    line = _one_error_line(result)
    assert line.startswith(f"pacs-annotate {args[0]}: error: {message}"), line
    assert result.stderr.count("\n") == 1  # no usage block either


def test_a_typo_in_sql_is_one_line_and_exit_2(tmp_path, database_url):
    env = _person_env(tmp_path, database_url)
    line = _one_error_line(_run(["sql", "SELEC count(*) FROM instances"], env, check=False))
    assert line == 'error: sql: syntax error at or near "SELEC" (at character 1)'
    line = _one_error_line(_run(["sql", "SELECT nonsense FROM instances"], env, check=False))
    assert line == 'error: sql: column "nonsense" does not exist (at character 8)'


def test_a_data_dir_without_an_archive_is_not_silently_created(tmp_path):
    missing = tmp_path / "typo"
    for command in (["status"], ["sql", "SELECT 1"], ["analyze"], ["recluster"]):
        line = _one_error_line(_run(command + ["--data-dir", str(missing)],
                                    _person_env(tmp_path), check=False))
        assert f"data directory {missing} does not exist" in line and "--create" in line
    assert not missing.exists()
    created = _run(["status", "--data-dir", str(missing), "--create"], _person_env(tmp_path))
    assert "received" in created.stdout
    assert (missing / "pgdata").is_dir()


def test_log_lines_are_readable_by_default_and_json_when_asked(tmp_path, database_url):
    import re

    env = _person_env(tmp_path, database_url)
    text = _run(["status"], env).stderr.splitlines()
    assert text and all(re.match(r"\d\d:\d\d:\d\d (INFO|WARNING|ERROR) ", line)
                        for line in text), text
    assert any(" database ready " in line for line in text)
    for args in (["--log-format", "json", "status"], ["status", "--log-format", "json"]):
        lines = _run(args, env).stderr.splitlines()
        assert lines and [json.loads(line)["level"] for line in lines]
    assert "database ready" in _run(["status"], {**env, "PACS_LOG_FORMAT": "json"}).stderr


def _on_a_terminal(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run with stderr on a pseudo-terminal, as at a person's shell; returns (rc, stderr)."""
    import pty
    import threading

    import fcntl
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    chunks: list[bytes] = []

    def read() -> None:
        while True:
            try:
                data = os.read(leader, 4096)
            except OSError:  # the follower side closed
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    process = subprocess.run(CLI + args, env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                             stderr=follower, timeout=300)
    os.close(follower)
    reader.join(timeout=10)
    os.close(leader)
    return process.returncode, b"".join(chunks).decode("utf-8", "replace")


def test_long_jobs_draw_a_bar_on_a_terminal_only(tmp_path, database_url):
    source = _archive_folder(tmp_path / "in", count=6)
    env = _person_env(tmp_path, database_url)
    rc, terminal = _on_a_terminal(["import", str(source)], env)
    assert rc == 0
    assert "import: 100%" in terminal and "6/6" in terminal and "file/s]" in terminal

    again = _run(["import", str(source)], env)  # stderr is a pipe here: no bar
    assert "file/s" not in again.stderr and "\r" not in again.stderr
    assert "duplicate 6" in again.stdout

    # the tags queue drained with a bar; before, --drain was for the image stage only
    rc, terminal = _on_a_terminal(["worker", "--stage", "tags", "--drain"], env)
    assert rc == 0 and "tags: 100%" in terminal and "6/6" in terminal
    assert _run(["worker", "--stage", "tags", "--drain"], env).stdout.strip() == \
        "0 instances parsed"

    rc, terminal = _on_a_terminal(["reparse", "--all"], env)
    assert rc == 0 and "reparse: 100%" in terminal and "6/6" in terminal
    assert "instance/s" not in _run(["reparse", "--all"], env).stderr

    rc, terminal = _on_a_terminal(["recluster", "--candidates", "2", "--workers", "1"], env)
    assert rc == 0 and "assign: 100%" in terminal and "partition/s" in terminal


def test_recluster_prints_each_step_once_and_no_dask_chatter(tmp_path, database_url):
    env = _person_env(tmp_path, database_url)
    _run(["import", str(_archive_folder(tmp_path / "in")), "--quiet"], env)
    _run(["reparse", "--quiet"], env)
    result = _run(["recluster", "--candidates", "2,3", "--workers", "1"], env)
    assert "now active" in result.stdout
    lines = result.stderr.splitlines()
    steps = [line.split(" ", 2)[2] for line in lines]  # without time and level
    assert len(steps) == len(set(steps)), result.stderr  # nothing printed twice
    assert any("partitions assigned" in step for step in steps)
    for chatter in ("Scheduler", "Nanny", "worker compute stream", "dashboard", "Register"):
        assert chatter not in result.stderr, result.stderr
    assert len(lines) < 15, result.stderr


def test_visual_check_with_a_backbone_trained_on_the_tested_run_warns(
        engine, tmp_path, weights, settings, monkeypatch, capsys, caplog,  # noqa: F811
        database_url):
    """A backbone trained to predict the tag clusters of run N separates run N's clusters by
    construction: the t-test on its features is circular and the output must say so."""
    import torch

    from pipelines.backbone import CHECKPOINT_FORMAT, load_backbone
    from service.tags import features, tag_clusters
    from service.cli import main
    from service.images.image_worker import ImageWorker, enqueue_missing

    from .dicom_client import ingest_datasets
    from .test_image_annotation import _images
    from .test_image_worker import SIZE
    from .test_tag_clusters import _options

    datasets, kind_of = _images(["disk", "stripes", "noise"] * 8, seed=3)
    for number, ds in enumerate(datasets):
        ds.BodyPartExamined = {"disk": "HEAD", "stripes": "KNEE",
                               "noise": "CHEST"}[kind_of[ds.SOPInstanceUID]]
        ds.TableHeight = str(100 + number % 4)
    storage = tmp_path / "storage"
    ingest_datasets(engine, storage, datasets)
    while features.process_queue_batch(engine, "test"):
        pass
    run_id = tag_clusters.recluster(engine, database_url, _options(candidates=(2, 3))).run_id
    # a train-backbone checkpoint of that run (its format; training itself is tested elsewhere)
    checkpoint = tmp_path / "best.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "model_state": torch.load(weights),
                "metadata": {"tag_cluster_run": run_id}}, checkpoint)
    enqueue_missing(engine)
    with ImageWorker(engine, load_backbone(checkpoint), storage_root=storage,
                     feature_store=tmp_path / "features", name="test", image_size=SIZE,
                     decode_workers=1, batch=32) as worker:
        while worker.run_once():
            pass

    monkeypatch.setenv("DATABASE_URL", settings.database_url)
    monkeypatch.setenv("PACS_IMAGE_WEIGHTS", str(checkpoint))
    assert main(["visual-check", "--samples", "2", "--sample-size", "10"]) == 0
    out = capsys.readouterr()
    assert "warning: circular: the backbone that made these features" in out.out
    assert f"tag-cluster run {run_id}, the run tested here" in out.out
    assert "circular" in out.err  # and in the log

    # the same features judged against another run are not flagged
    run_2 = tag_clusters.recluster(engine, database_url,
                                   _options(candidates=(2, 3), force=True)).run_id
    assert run_2 != run_id
    assert main(["visual-check", "--samples", "2", "--sample-size", "10"]) == 0
    assert "circular" not in capsys.readouterr().out
