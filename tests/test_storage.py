"""File placement and the settling of unfinished stores after a crash."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import sqlalchemy as sa

from service.ingest.ingestor import Ingestor
from service.ingest.storage import FileStore, relative_path, sha256_file

from .dicom_client import CT_SMALL, make_ct


def _bytes(ds) -> bytes:
    from io import BytesIO

    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_relative_path_is_inside_the_root():
    path = relative_path("1.2.3", "1.2.3.4", "1.2.3.4.5")
    assert path.endswith("/1.2.3/1.2.3.4/1.2.3.4.5.dcm")
    assert not path.startswith("/") and ".." not in path.split("/")


def test_written_file_has_two_names_until_finished(tmp_path):
    store = FileStore(tmp_path)
    store.prepare()
    pending = store.write("ab/1/2/3.dcm", b"payload")
    assert os.path.samefile(pending.temp, pending.final)
    store.finish_stored(pending)
    assert not pending.temp.exists()
    assert pending.final.read_bytes() == b"payload"


def test_duplicate_never_overwrites_the_first_file(tmp_path):
    store = FileStore(tmp_path)
    store.prepare()
    first = store.write("ab/1/2/3.dcm", b"first")
    store.finish_stored(first)
    second = store.write("ab/1/2/3.dcm", b"second")
    assert second.replaced_existing
    store.finish_duplicate(second)
    assert first.final.read_bytes() == b"first"
    assert list(store.incoming.iterdir()) == []


def test_spare_temp_files_are_used_and_removed_at_close(tmp_path):
    store = FileStore(tmp_path, spare_files=4)
    store.prepare()
    store.start_spares()
    def spares():
        return set(store.incoming.glob("spare-*/*.tmp"))

    deadline = time.monotonic() + 10
    while len(spares()) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    ready = spares()
    assert len(ready) >= 4
    assert store.pending_temps() == []  # spares are not unfinished stores
    temp = store.write_temp(b"payload")
    assert Path(temp) in ready  # no file was created on the store's path
    pending = store.place(temp, "ab/1/2/3.dcm")
    store.finish_stored(pending)
    assert pending.final.read_bytes() == b"payload"
    store.close()
    assert spares() == set() and store.pending_temps() == []


def test_spares_of_a_dead_process_are_removed_at_start_up(tmp_path):
    store = FileStore(tmp_path)
    store.prepare()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    left = store.incoming / "spare-a" / f"{dead.stdout.strip()}.0123456789ab.tmp"
    left.parent.mkdir()
    left.touch()
    assert store.resolve_pending(lambda paths: {}) == {"kept": 0, "removed": 1}
    assert not left.exists()


def _leave_unfinished_store(storage: Path, data: bytes) -> None:
    """A separate process writes and links a file, then dies before any commit."""
    code = (
        "import os, sys; from pathlib import Path\n"
        "from service.ingest.storage import FileStore\n"
        "from service.ingest.dicom_header import read_header\n"
        "from service.ingest.storage import relative_path\n"
        "data = sys.stdin.buffer.read(); h = read_header(data)\n"
        "store = FileStore(Path(sys.argv[1])); store.prepare()\n"
        "store.write(relative_path(h.study_instance_uid, h.series_instance_uid,"
        " h.sop_instance_uid), data)\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(storage)], input=data, check=True,
                   cwd=Path(__file__).resolve().parents[1])


def test_temp_written_but_never_placed_is_removed(tmp_path, engine):
    storage = tmp_path / "storage"
    store = FileStore(storage)
    store.prepare()
    temp = store.incoming / "999999.0badc0ffee.tmp"
    temp.write_bytes(b"half an instance")
    with Ingestor(engine, FileStore(storage)):
        pass
    assert not temp.exists()


def test_startup_removes_files_of_stores_that_never_committed(tmp_path, engine):
    storage = tmp_path / "storage"
    _leave_unfinished_store(storage, _bytes(make_ct()))
    assert len([p for p in storage.rglob("*") if p.is_file()]) == 2  # temp + final name
    with Ingestor(engine, FileStore(storage)) as ingestor:
        assert ingestor.store.pending_temps() == []
    assert [p for p in storage.rglob("*") if p.is_file()] == []


def test_startup_completes_stores_whose_row_committed(tmp_path, engine):
    storage = tmp_path / "storage"
    ds = make_ct()
    data = _bytes(ds)
    with Ingestor(engine, FileStore(storage)) as ingestor:
        assert ingestor.ingest(data).result == "stored"
    final = next(p for p in storage.rglob("*.dcm") if ".incoming" not in p.parts)
    # the crash happened after COMMIT but before the temp name was dropped and,
    # worse, before the final name reached the disk
    relative = final.relative_to(storage).as_posix()
    temp = storage / ".incoming" / f"{relative.replace('/', '+')}.999999.deadbeef.tmp"
    os.link(final, temp)
    final.unlink()
    with Ingestor(engine, FileStore(storage)) as ingestor:
        assert ingestor.store.pending_temps() == []
    assert final.exists() and not temp.exists()
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT sha256 FROM instances")).scalar() == sha256_file(final)


def test_another_live_process_temp_is_left_alone(tmp_path, engine):
    storage = tmp_path / "storage"
    FileStore(storage).prepare()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        temp = storage / ".incoming" / f"{sleeper.pid}.abcdef.tmp"
        temp.write_bytes(Path(CT_SMALL).read_bytes())
        with Ingestor(engine, FileStore(storage)):
            pass
        assert temp.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    with Ingestor(engine, FileStore(storage)):
        pass
    assert not temp.exists()


def test_temp_of_a_killed_but_unreaped_process_is_settled(tmp_path, engine):
    storage = tmp_path / "storage"
    FileStore(storage).prepare()
    pid = os.fork()
    if pid == 0:
        os._exit(0)  # the child dies at once; we do not reap it: a zombie
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with open(f"/proc/{pid}/stat", "rb") as stat:
                if stat.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    break
            time.sleep(0.01)
        temp = storage / ".incoming" / f"{pid}.abcdef.tmp"
        temp.write_bytes(b"left by a killed listener")
        with Ingestor(engine, FileStore(storage)):
            pass
        assert not temp.exists()
    finally:
        os.waitpid(pid, 0)


def _flags(path) -> int:
    import array
    import fcntl

    from service.ingest import storage

    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        flags = array.array("i", [0])
        fcntl.ioctl(fd, storage._FS_IOC_GETFLAGS, flags, True)
        return flags[0]
    finally:
        os.close(fd)


def test_the_incoming_folder_is_a_top_folder_where_the_file_system_has_them(tmp_path):
    from service.ingest import storage

    store = FileStore(tmp_path)
    store.prepare()
    try:
        flags = _flags(store.incoming)
    except OSError:
        pytest.skip("this file system has no inode flags")
    if not storage.mark_top_directory(store.incoming):
        pytest.skip("this file system refuses the top-folder flag")
    assert flags & storage._FS_TOPDIR_FL


def _spare_folders(store: FileStore) -> set[str]:
    return {p.name for p in store.incoming.glob("spare-*")}


def test_spare_folders_are_the_processs_own_and_stale_ones_go_at_start_up(tmp_path):
    store = FileStore(tmp_path, spare_files=2)
    store.prepare()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    stale = store.incoming / f"spare-{dead}.0badf00d.a"
    stale.mkdir()
    (stale / f"{dead}.0123456789ab.tmp").touch()
    alive = store.incoming / f"spare-{os.getppid()}.0badf00d.a"  # pytest's parent lives
    alive.mkdir()
    store.start_spares()
    deadline = time.monotonic() + 10
    while len(_spare_folders(store)) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert store.resolve_pending(lambda paths: {}) == {"kept": 0, "removed": 1}
    own = {f"spare-{os.getpid()}."}
    assert {name[:len(next(iter(own)))] for name in _spare_folders(store) - {alive.name}} == own
    assert alive.exists() and not stale.exists()
    store.close()
    assert _spare_folders(store) == {alive.name}


def test_spare_folders_move_when_making_files_in_them_is_slow(tmp_path):
    # every fill counts as slow: the thread moves on to new folders each time
    store = FileStore(tmp_path, spare_files=2, slow_create_seconds=0.0)
    store.prepare()
    store.start_spares()
    seen: set[str] = set()
    for index in range(12):
        temp = store.write_temp(b"payload %d" % index)
        seen.add(Path(temp).parent.name)
        store.finish_stored(store.place(temp, f"ab/1/2/{index}.dcm"))
    assert len(seen) > 2  # stores took spares from more than one pair of folders
    assert store.pending_temps() == []
    deadline = time.monotonic() + 10
    while len(_spare_folders(store)) > 4 and time.monotonic() < deadline:
        time.sleep(0.01)  # emptied old folders are removed by the spare thread
    assert len(_spare_folders(store)) <= 4
    store.close()
    assert _spare_folders(store) == set()
    assert sorted(p.name for p in (tmp_path / "ab/1/2").iterdir()) == sorted(
        f"{i}.dcm" for i in range(12))
