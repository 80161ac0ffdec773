"""Instance files on disk: crash-safe placement and startup recovery.

Protocol for one instance (see docs/ingest.md, "Durability"):

1. write the bytes to ``.incoming/<pid>.<nonce>.tmp``;
2. rename it to ``.incoming/<final path, "/" as "+">.<pid>.<nonce>.tmp``, hard-link it to
   its final path ``<h2>/<study>/<series>/<sop>.dcm``, then ``fdatasync`` it and fsync
   both directories;
3. commit the row in PostgreSQL (the caller);
4. unlink the temp name.

Until step 4 the temp name is the record of an unfinished store.  A crash at
any point leaves at most that temp file (and its second name, the same inode);
:meth:`FileStore.resolve_pending` settles it against the database, finding the
final name in the temp file's name: row present with this content -> drop the
temp name; no row -> remove both names.
"""

from __future__ import annotations

import array
import ctypes
import errno
import fcntl
import hashlib
import logging
import os
import re
import secrets
import struct
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

from ..processes import process_is_running

log = logging.getLogger(__name__)

INCOMING = ".incoming"
SPARE_FILES = 16  # per folder, made ahead by each storing process
SPARE_PREFIX = "spare-"  # spare-<pid>.<nonce>.<a|b>: a process's folders of spare temp files
_SEP = "+"  # stands for "/" in a temp file's name; never occurs in a relative path


def relative_path(study_uid: str, series_uid: str, sop_uid: str) -> str:
    """Where an instance lives under the storage root.

    UIDs must already be validated (digits and dots only), so the result cannot
    escape the root; :func:`safe_relative_path` is for UIDs that may not be.  The
    2-hex-digit prefix spreads studies over 256 folders.
    """
    bucket = hashlib.blake2b(study_uid.encode(), digest_size=1).hexdigest()
    return f"{bucket}/{study_uid}/{series_uid}/{sop_uid}.dcm"


_VALID_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


def path_component(uid: str) -> str:
    """A file-name-safe stand-in for ``uid``: the UID itself when it is a valid one
    (digits and dots, at most 64 characters), else ``x`` and 32 hex digits of its hash.

    The derived name cannot collide with a valid UID (those never hold an ``x``), cannot
    hold ``/``, ``..``, NUL or anything else a file system treats specially, and has a
    fixed length; the raw value stays in SQL.
    """
    if len(uid) <= 64 and _VALID_UID.fullmatch(uid):
        return uid
    return "x" + hashlib.blake2b(uid.encode("utf-8", "surrogatepass"),
                                 digest_size=16).hexdigest()


def safe_relative_path(study_uid: str, series_uid: str, sop_uid: str) -> str:
    """:func:`relative_path` for UIDs that may be invalid (tolerant ingest): each one that
    is not a valid UID is replaced by :func:`path_component`.  The same as
    :func:`relative_path` when all three are valid."""
    bucket = hashlib.blake2b(study_uid.encode("utf-8", "surrogatepass"),
                             digest_size=1).hexdigest()
    return (f"{bucket}/{path_component(study_uid)}/{path_component(series_uid)}/"
            f"{path_component(sop_uid)}.dcm")


def _load_sync_file_range():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return function


_sync_file_range = _load_sync_file_range() if sys.platform.startswith("linux") else None
_SYNC_FILE_RANGE_WRITE = 2


def _start_writeback(fd: int) -> None:
    """Let the disk start on the data now; the fdatasync in ``place`` then waits less.

    Only a hint (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``): durability still
    comes from ``fdatasync``.
    """
    if _sync_file_range is not None:
        _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


def _ioctl_number(direction: int, number: int) -> int:
    return direction << 30 | struct.calcsize("l") << 16 | ord("f") << 8 | number


_FS_IOC_GETFLAGS = _ioctl_number(2, 1)  # _IOR('f', 1, long)
_FS_IOC_SETFLAGS = _ioctl_number(1, 2)  # _IOW('f', 2, long)
_FS_TOPDIR_FL = 0x00020000


def mark_top_directory(path: str | Path) -> bool:
    """Sets ext2/3/4's "top of directory hierarchy" flag (``chattr +T``) on ``path``.

    ext4 gives a new file an inode in its folder's block group, and where the journal is
    off it skips, one by one, every inode of that group freed in the last minutes: after
    the files of a study were deleted, creating a file in a folder of the same group took
    520 us instead of 18 us (benchmarks/ingest/README.md).  Sub-folders of a top folder
    are spread over the groups (by a hash of their name) instead of placed beside their
    parent, so folders with new names start in other groups.  Other file systems: no-op.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        flags = array.array("i", [0])
        fcntl.ioctl(fd, _FS_IOC_GETFLAGS, flags, True)
        if not flags[0] & _FS_TOPDIR_FL:
            flags[0] |= _FS_TOPDIR_FL
            fcntl.ioctl(fd, _FS_IOC_SETFLAGS, flags, True)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class PendingFile:
    """An instance written and linked in place, not yet confirmed by a committed row."""

    # plain strings: pathlib's joins and conversions were a tenth of the listener's
    # Python time per store (benchmarks/ingest/README.md)
    temp_path: str
    final_path: str
    relative: str
    replaced_existing: bool  # a file already had the final name; ours is still only in `temp`

    @property
    def temp(self) -> Path:
        return Path(self.temp_path)

    @property
    def final(self) -> Path:
        return Path(self.final_path)


class FileStore:
    """Instance files under ``root``.

    Once :meth:`start_spares` is called, a background thread keeps empty temp files
    ready: creating a file (allocating its inode) took 1.1-1.4 ms of the 4-5 ms a store
    took on the benchmark's ext4 volume, and a spare moves that off the path of the
    instance being stored (benchmarks/ingest/README.md).  The spares live in two
    folders used in turn, ``spare_files`` at a time: stores take from one while the
    thread fills the other, because a create holds its folder's lock, which the
    rename out of it in :meth:`place` needs too.  The folders are this process's own,
    under a top folder (:func:`mark_top_directory`), and are replaced by new ones when
    making a file in them takes more than ``slow_create_seconds`` of CPU time.
    """

    def __init__(self, root: Path, *, spare_files: int = SPARE_FILES,
                 slow_create_seconds: float = 150e-6):
        self.root = Path(root).resolve()
        self.incoming = self.root / INCOMING
        self._root = str(self.root)
        self._incoming = str(self.incoming)
        self._known_dirs: set[str] = set()
        self._spare_target = spare_files
        self._slow_create = slow_create_seconds
        self._spare_dirs = self._new_spare_dirs()
        self._retired_dirs: list[str] = []  # earlier spare folders, removed once empty
        self._spare_lock = threading.Lock()  # guards the two below
        self._spares: deque[str] = deque()  # ready, in the folder stores take from
        self._filled: deque[str] = deque()  # made in the other folder
        self._spares_wanted = threading.Event()
        self._spare_thread: threading.Thread | None = None
        self._closing = False

    def prepare(self) -> None:
        self.incoming.mkdir(parents=True, exist_ok=True)
        mark_top_directory(self._incoming)
        self._known_dirs.add(self._incoming)

    def _ensure_dir(self, directory: str) -> None:
        if directory in self._known_dirs:
            return
        missing = []
        probe = Path(directory)
        while not probe.exists():
            missing.append(probe)
            probe = probe.parent
        os.makedirs(directory, exist_ok=True)
        # make each new directory entry durable: fsync the parent of every level created
        for created in reversed(missing):
            fsync_dir(created.parent)
        self._known_dirs.add(directory)

    def start_spares(self) -> None:
        """Keep ``spare_files`` empty temp files ready for :meth:`write_temp`."""
        if self._spare_target > 0 and self._spare_thread is None:
            self._closing = False
            self._spare_thread = threading.Thread(target=self._keep_spares, name="spare-files",
                                                  daemon=True)
            self._spare_thread.start()

    def close(self) -> None:
        """Stop making spares and remove the unused ones."""
        self._closing = True
        self._spares_wanted.set()
        if self._spare_thread is not None:
            self._spare_thread.join(timeout=10)
            self._spare_thread = None
        with self._spare_lock:
            unused = [*self._spares, *self._filled]
            self._spares.clear()
            self._filled.clear()
        for path in unused:
            _unlink_quietly(path)
        for folder in {*self._spare_dirs, *self._retired_dirs}:
            _rmdir_quietly(folder)

    def _new_temp_name(self, folder: str | None = None) -> str:
        return f"{folder or self._incoming}/{os.getpid()}.{secrets.token_hex(6)}.tmp"

    def _new_spare_dirs(self) -> tuple[str, str]:
        # <pid> first: resolve_pending() leaves the folders of live processes alone
        stem = f"{self._incoming}/{SPARE_PREFIX}{os.getpid()}.{secrets.token_hex(4)}"
        return f"{stem}.a", f"{stem}.b"

    def _keep_spares(self) -> None:
        for folder in self._spare_dirs:
            os.makedirs(folder, exist_ok=True)
        turn = 0
        while not self._closing:
            self._spares_wanted.clear()
            if not self._filled and not self._spares:
                turn ^= 1  # both empty: fill the folder no store is taking from
            if self._retired_dirs:
                self._retired_dirs = [d for d in self._retired_dirs if not _rmdir_quietly(d)]
            if not self._filled:
                folder = self._spare_dirs[turn]
                # CPU time, not wall time: waiting for the GIL is not the folder's fault
                started, made = time.thread_time(), 0
                for _ in range(self._spare_target):
                    if self._closing:
                        break
                    path = self._new_temp_name(folder)
                    with self._spare_lock:
                        self._filled.append(path)  # known before it exists: never a left-over
                    try:
                        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640))
                    except OSError as exc:
                        with self._spare_lock:
                            self._filled.remove(path)
                        # a full disk: write_temp creates its own file and reports the error
                        log.debug("cannot make a spare temp file: %s", exc)
                        break
                    made += 1
                if made and (time.thread_time() - started) / made > self._slow_create:
                    self._move_spare_dirs()
            with self._spare_lock:
                swap = not self._spares and bool(self._filled)
                if swap:
                    # stores move on to the folder just filled; the next fill uses the other
                    self._spares, self._filled = self._filled, self._spares
            if swap:
                turn ^= 1
                continue
            self._spares_wanted.wait(timeout=1.0)

    def _move_spare_dirs(self) -> None:
        """New spare folders: new names, so (under a top folder) other block groups."""
        old, self._spare_dirs = self._spare_dirs, self._new_spare_dirs()
        try:
            for folder in self._spare_dirs:
                os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            log.debug("cannot make new spare folders: %s", exc)
            self._spare_dirs = old
            return
        self._retired_dirs.extend(old)

    def _open_temp(self) -> tuple[str, int]:
        with self._spare_lock:
            spare = self._spares.popleft() if self._spares else None
        if spare is not None:
            self._spares_wanted.set()
            try:
                return spare, os.open(spare, os.O_WRONLY)
            except FileNotFoundError:
                pass  # a full resolve_pending() swept it; make one as below
        temp = self._new_temp_name()
        return temp, os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)

    def write_temp(self, data: bytes | memoryview) -> str:
        """Step 1: the bytes in a new temp file (flushed in :meth:`place`)."""
        temp, fd = self._open_temp()
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            _start_writeback(fd)
        except BaseException:
            os.close(fd)
            _unlink_quietly(temp)
            raise
        os.close(fd)
        return temp

    def place(self, temp: str | Path, relative: str) -> PendingFile:
        """Step 2: name the temp file after its destination, link it there, flush it all.

        The renames and the link come before the one ``fdatasync``, so the file system
        commits its journal once for all of them instead of once per step.
        """
        temp = os.fspath(temp)
        final = f"{self._root}/{relative}"
        final_dir = final.rpartition("/")[0]
        named = f"{self._incoming}/{relative.replace('/', _SEP)}.{temp.rpartition('/')[2]}"
        try:
            os.rename(temp, named)
        except BaseException:
            _unlink_quietly(temp)
            raise
        try:
            self._ensure_dir(final_dir)
            try:
                os.link(named, final)
                replaced = False
            except FileExistsError:
                replaced = True  # a duplicate, or a stale file: decided after the insert
            fd = os.open(named, os.O_RDONLY)
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
            fsync_dir(final_dir)
            fsync_dir(self._incoming)
        except BaseException:
            self._remove_if_ours(named, final)
            _unlink_quietly(named)
            raise
        return PendingFile(named, final, relative, replaced)

    def write(self, relative: str, data: bytes | memoryview) -> PendingFile:
        """Steps 1-2 in one call."""
        return self.place(self.write_temp(data), relative)

    def discard_temp(self, temp: str | Path) -> None:
        _unlink_quietly(temp)

    def finish_stored(self, pending: PendingFile) -> None:
        """Step 4 for a newly inserted row."""
        if pending.replaced_existing:
            # a file without a row had our name (left by an admin's row delete): ours wins
            os.replace(pending.temp_path, pending.final_path)
            fsync_dir(pending.final_path.rpartition("/")[0])
        else:
            os.unlink(pending.temp_path)

    def finish_duplicate(self, pending: PendingFile) -> None:
        """The row already existed: keep the first file, forget ours."""
        if not pending.replaced_existing:
            self._remove_if_ours(pending.temp_path, pending.final_path)
        os.unlink(pending.temp_path)

    @staticmethod
    def _remove_if_ours(temp: str | Path, final: str | Path) -> None:
        try:
            same = os.path.samefile(temp, final)
        except OSError:
            return
        if same:
            _unlink_quietly(final)

    def pending_temps(self) -> list[Path]:
        if not self.incoming.exists():
            return []
        # spares this store keeps ready are not stores; those of a dead process are left-overs.
        # Listed before the ready ones are: a spare is known before its file exists.
        on_disk = list(self.incoming.glob(f"{SPARE_PREFIX}*/*.tmp"))
        with self._spare_lock:
            ready = {*self._spares, *self._filled}
        spares = [p for p in on_disk if str(p) not in ready]
        return sorted([*self.incoming.glob("*.tmp"), *spares])

    def resolve_pending(
        self,
        committed_hashes: Callable[[Iterable[str]], Mapping[str, str]],
        temps: list[Path] | None = None,
    ) -> dict[str, int]:
        """Settle unfinished stores against the database (start-up, and after DB errors).

        ``committed_hashes`` maps relative paths to the sha256 of their committed rows,
        for those that have one.  A temp file not yet named after its destination was
        never linked anywhere and is simply removed.
        """
        full = temps is None
        temps = self.pending_temps() if full else temps
        # another live process's temp is a store in flight, not a leftover
        temps = [t for t in temps if not _owned_by_other_live_process(t)]
        counts = {"kept": 0, "removed": 0}
        located = {temp: _destination(temp) for temp in temps}
        hashes = committed_hashes(sorted({r for r in located.values() if r}))
        for temp, relative in located.items():
            final = self.root / relative if relative else None
            row_hash = hashes.get(relative) if relative else None
            if final is not None and row_hash is not None and sha256_file(temp) == row_hash:
                if not final.exists():
                    self._ensure_dir(str(final.parent))
                    os.link(temp, final)
                    fsync_dir(final.parent)
                elif not os.path.samefile(temp, final) and sha256_file(final) != row_hash:
                    os.replace(temp, final)
                    fsync_dir(final.parent)
                    counts["kept"] += 1
                    continue
                os.unlink(temp)
                counts["kept"] += 1
            else:
                if final is not None:
                    self._remove_if_ours(temp, final)
                os.unlink(temp)
                counts["removed"] += 1
        if temps:
            fsync_dir(self.incoming)
        if full:
            self._remove_stale_spare_dirs()
        return counts

    def _remove_stale_spare_dirs(self) -> None:
        """Empty spare folders of processes that are gone (their files went as temps)."""
        for folder in self.incoming.glob(f"{SPARE_PREFIX}*"):
            if _is_other_live_process(folder.name[len(SPARE_PREFIX):].split(".", 1)[0]):
                continue
            if str(folder) not in self._spare_dirs:
                _rmdir_quietly(folder)


def _destination(temp: Path) -> str | None:
    """The relative final path encoded in a placed temp file's name, if it has one."""
    parts = temp.name.rsplit(".", 3)  # <encoded path>.<pid>.<nonce>.tmp
    if len(parts) != 4 or _SEP not in parts[0]:
        return None
    relative = parts[0].replace(_SEP, "/")
    if relative.startswith("/") or ".." in relative.split("/"):
        return None
    return relative


def _is_other_live_process(pid: str) -> bool:
    """Whether ``pid``, as a file or folder name carries it, is another running process."""
    return pid.isdigit() and int(pid) != os.getpid() and process_is_running(int(pid))


def _owned_by_other_live_process(temp: Path) -> bool:
    parts = temp.name.rsplit(".", 3)  # [<encoded path>.]<pid>.<nonce>.tmp
    return len(parts) >= 3 and _is_other_live_process(parts[-3])


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _rmdir_quietly(path: str | Path) -> bool:
    """Removes an empty folder; whether it is gone."""
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def _unlink_quietly(path: str | Path) -> None:
    try:
        os.unlink(path)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            log.warning("could not remove %s: %s", path, exc)
