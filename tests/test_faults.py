"""Faults on the ingest path: the database going away, and kill -9 of the listener."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
import warnings

import pydicom
import pytest
import sqlalchemy as sa

from service.config import load_settings
from service.database.engine import create_db_engine, migrate, start_embedded
from service.ingest.storage import INCOMING

from .conftest import REPO_ROOT, _start_service, leftover_temps
from .dicom_client import associate, make_ct
from .test_cli import _env, _free_port


@pytest.fixture
def own_postgres(tmp_path):
    """A PostgreSQL of this test's own, so the test may stop and start it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver
        from pgserver._commands import pg_ctl

        server = pgserver.get_server(tmp_path / "pgdata", cleanup_mode="stop")

    def stop() -> None:
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user)

    def start() -> None:
        server.ensure_postgres_running()

    yield server.get_uri(), stop, start
    start()
    server.cleanup()


def test_database_outage_fails_stores_and_recovers_without_restart(tmp_path, own_postgres):
    url, stop_db, start_db = own_postgres
    engine = create_db_engine(url)
    migrate(engine)
    settings = load_settings(environ={}, database_url=url, data_dir=tmp_path / "data",
                             bind_address="127.0.0.1", ae_title="PACS_TEST", processes=1)
    running = _start_service(settings, engine)
    service = next(running)
    try:
        assoc = associate(service.port)
        assert assoc.send_c_store(make_ct()).Status == 0x0000
        stop_db()
        lost = make_ct()
        assert assoc.send_c_store(lost).Status == 0xA700
        start_db()
        kept = make_ct()
        status = assoc.send_c_store(kept).Status
        if status != 0x0000:  # the first store after the outage may meet the dead connection
            status = assoc.send_c_store(kept).Status
        assert status == 0x0000
        assoc.release()
        sops = {r[0] for r in service.engine.connect().execute(
            sa.text("SELECT sop_instance_uid FROM instances"))}
        assert kept.SOPInstanceUID in sops and lost.SOPInstanceUID not in sops
        # the failed store's files are settled once the database answers again
        deadline = time.monotonic() + 10
        while leftover_temps(service.storage) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert leftover_temps(service.storage) == []
        files = [p for p in service.stored_files() if INCOMING not in p.parts]
        assert len(files) == len(sops)
    finally:
        next(running, None)
        engine.dispose()


def test_kill_9_loses_no_acknowledged_instance(tmp_path):
    data_dir = tmp_path / "data"
    port = _free_port()
    log = open(tmp_path / "serve.log", "ab")

    def start_serve() -> subprocess.Popen:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--bind", "127.0.0.1",
             "--port", str(port), "--processes", "2"],
            env=_env(data_dir), cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=log,
            start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            probe = associate(port, called="PACS_ANNOTATE")
            if probe.is_established:
                probe.release()
                return process
            assert process.poll() is None, (tmp_path / "serve.log").read_text()
            time.sleep(0.2)
        raise AssertionError((tmp_path / "serve.log").read_text())

    server = start_serve()
    acknowledged: dict[str, str] = {}
    sent: dict[str, pydicom.Dataset] = {}
    lock = threading.Lock()
    stop = threading.Event()

    def sender(index: int) -> None:
        assoc = associate(port, calling=f"S{index}", called="PACS_ANNOTATE")
        try:
            for _ in range(500):
                if stop.is_set():
                    return
                ds = make_ct()
                with lock:
                    sent[ds.SOPInstanceUID] = ds
                status = assoc.send_c_store(ds)
                if getattr(status, "Status", None) == 0x0000:
                    with lock:
                        acknowledged[ds.SOPInstanceUID] = ds.PatientID
        except Exception:
            return  # the connection died with the listener

    threads = [threading.Thread(target=sender, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 120
    try:
        while len(acknowledged) < 150:
            assert time.monotonic() < deadline and any(t.is_alive() for t in threads)
            time.sleep(0.01)
    finally:
        stop.set()
        os.killpg(server.pid, signal.SIGKILL)  # listener processes, all at once
    server.wait()
    stop.set()
    for thread in threads:
        thread.join(timeout=60)
    # the embedded PostgreSQL survived its parent; the restart adopts it
    server = start_serve()
    try:
        assoc = associate(port, calling="RETRY", called="PACS_ANNOTATE")
        for sop, ds in sent.items():  # the senders' retries
            assert assoc.send_c_store(ds).Status == 0x0000
        assoc.release()
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
    storage = data_dir / "storage"
    # the last serve stopped the embedded PostgreSQL; this test holds it for its checks
    engine = create_db_engine(start_embedded(data_dir / "pgdata"))
    try:
        with engine.connect() as conn:
            rows = dict(conn.execute(sa.text("SELECT file_path, sha256 FROM instances")).all())
            sops = {r[0] for r in conn.execute(sa.text("SELECT sop_instance_uid FROM instances"))}
    finally:
        engine.dispose()
        import pgserver  # imported by start_embedded, which silences its import warning

        pgserver.get_server(data_dir / "pgdata").cleanup()  # the last holder: it stops
    assert set(acknowledged) <= sops  # nothing acknowledged was lost
    assert sops == set(sent)          # and the retries completed the rest
    files = {p.relative_to(storage).as_posix() for p in storage.rglob("*.dcm")
             if INCOMING not in p.parts}
    assert files == set(rows)         # no orphan files, no rows without files
    for relative, digest in rows.items():
        assert hashlib.sha256((storage / relative).read_bytes()).hexdigest() == digest
    assert leftover_temps(storage) == [] and not list((storage / INCOMING).glob("spare-*/*"))
    # the killed listener's hold on the embedded PostgreSQL is forgotten: once the last
    # command exits, the server stops instead of running on
    assert not (data_dir / "pgdata" / "postmaster.pid").exists()


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB file system for the storage directory (needs root to mount a tmpfs)."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)],
                            capture_output=True)
    if result.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_disk_full_fails_cleanly_refuses_associations_and_recovers(service_factory, small_disk):
    ballast = small_disk / "ballast"
    ballast.write_bytes(b"\0" * (1536 * 1024))
    service = service_factory(storage_dir=small_disk / "storage", min_free_disk_mb=1)
    assoc = associate(service.port)
    statuses = []
    for _ in range(200):
        statuses.append(assoc.send_c_store(make_ct()).Status)
        if statuses[-1] != 0x0000:
            break
    assoc.release()
    assert statuses[-1] == 0xA700 and statuses.count(0x0000) == len(statuses) - 1
    stored = service.scalar("SELECT count(*) FROM instances")
    assert stored == len(statuses) - 1
    assert leftover_temps(service.storage) == []  # no partial file
    assert len([p for p in service.stored_files() if INCOMING not in p.parts]) == stored
    time.sleep(1.1)  # the watermark is re-read at most once a second
    refused = associate(service.port)
    assert refused.is_rejected
    ballast.unlink()
    time.sleep(1.1)
    again = associate(service.port)
    assert again.is_established
    assert again.send_c_store(make_ct()).Status == 0x0000
    again.release()
