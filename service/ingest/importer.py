"""``import DIR``: backfill an archive from files, through the same path as C-STORE."""

from __future__ import annotations

import csv
import logging
import os
import sys
import threading
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Iterator, TextIO

from .ingestor import Ingestor, StoreOutcome

log = logging.getLogger(__name__)


def iter_files(root: Path) -> Iterator[Path]:
    if root.is_file():
        yield root
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            yield Path(dirpath) / name


def as_part10(data: bytes) -> bytes:
    """Files written without preamble and file meta get both, so every stored file is Part 10."""
    if len(data) >= 132 and data[128:132] == b"DICM":
        return data
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    ds = pydicom.dcmread(BytesIO(data), force=True)
    meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    if "TransferSyntaxUID" not in meta:
        implicit = getattr(ds, "is_implicit_VR", None)
        meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit in (True, None) else ExplicitVRLittleEndian
    if "SOPInstanceUID" in ds and "MediaStorageSOPInstanceUID" not in meta:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if "SOPClassUID" in ds and "MediaStorageSOPClassUID" not in meta:
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta = meta
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


REJECT_COLUMNS = ("file", "sop_instance_uid", "calling_ae", "status", "result", "reason")


@dataclass(frozen=True)
class Reject:
    """A file that was not stored: rejected (bad data) or failed (storage, database)."""

    file: str
    sop_instance_uid: str | None
    calling_ae: str
    status: int
    result: str
    reason: str

    def line(self) -> str:
        return (f"{self.result} {self.file}: SOP Instance UID {self.sop_instance_uid or '-'}, "
                f"calling AE {self.calling_ae}, status 0x{self.status:04X}: {self.reason}")


@dataclass
class ImportReport:
    files: int = 0
    outcomes: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)
    tolerated: Counter = field(default_factory=Counter)  # rule -> stored instances
    rejects: list[Reject] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        """Counts, every reason with its count, then every file not stored, one a line."""
        parts = ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items()))
        rate = self.files / self.seconds if self.seconds else 0.0
        text = f"{self.files} files in {self.seconds:.1f} s ({rate:.0f}/s): {parts or 'nothing'}"
        for reason, count in sorted(self.reasons.items(), key=lambda item: (-item[1], item[0])):
            text += f"\n  {count} x {reason}"
        if self.tolerated:
            text += "\ntolerated defects (stored anyway): " + ", ".join(
                f"{rule} {count}" for rule, count in sorted(self.tolerated.items()))
        if self.rejects:
            text += "\nnot stored:"
            for reject in self.rejects:
                text += f"\n  {reject.line()}"
        return text

    def write_rejects_csv(self, out: TextIO) -> None:
        """One row per file not stored (columns ``REJECT_COLUMNS``)."""
        writer = csv.writer(out)
        writer.writerow(REJECT_COLUMNS)
        for r in self.rejects:
            writer.writerow([r.file, r.sop_instance_uid or "", r.calling_ae,
                             f"0x{r.status:04X}", r.result, r.reason])


def import_directory(
    ingestor: Ingestor,
    root: Path,
    *,
    threads: int = 8,
    calling_ae: str = "IMPORT",
    progress: TextIO | None = sys.stderr,
) -> ImportReport:
    report = ImportReport()
    started = time.monotonic()
    # a bar on ``progress`` (the caller passes None off a terminal); its total comes from a
    # walk of the tree beside the import, so the time left shows once that walk is done
    from tqdm import tqdm

    bar = tqdm(desc="import", unit="file", file=progress, disable=progress is None,
               dynamic_ncols=True, smoothing=0.1)
    if progress is not None:
        def count_files() -> None:
            bar.total = sum(1 for _ in iter_files(root))
            bar.refresh()

        threading.Thread(target=count_files, name="import-count", daemon=True).start()

    def unread(path: Path, reason: str) -> StoreOutcome:
        log.warning("rejected file %s from %s: %s", path, calling_ae, reason,
                    extra={"status": "0xC210", "calling_ae": calling_ae, "file": str(path)})
        return StoreOutcome(0xC210, "rejected", None, reason)

    def one(path: Path) -> StoreOutcome:
        try:
            data = as_part10(path.read_bytes())
        except OSError as exc:
            return unread(path, f"unreadable file: {exc.strerror}")
        except Exception:  # pydicom's many ways of saying "this is not DICOM"
            return unread(path, "not a DICOM file")
        return ingestor.ingest(data, calling_ae=calling_ae, source=str(path))

    def record(path: Path, outcome: StoreOutcome) -> None:
        report.files += 1
        report.outcomes[outcome.result] += 1
        if outcome.result == "stored":  # a duplicate's defects were counted with its first
            for rule, _ in outcome.defects:
                report.tolerated[rule] += 1
        if outcome.result in ("rejected", "failed"):
            reason = outcome.reason or "no reason given"
            report.reasons[reason[:200]] += 1
            report.rejects.append(Reject(str(path), outcome.sop_instance_uid, calling_ae,
                                         outcome.status, outcome.result, reason))
            log.debug("%s: %s", path, reason)
        bar.update()
        if not bar.disable:
            bar.set_postfix_str(", ".join(f"{k} {v}" for k, v in
                                          sorted(report.outcomes.items())), refresh=False)

    # a bounded window of files in flight: the tree may hold millions
    window: deque = deque()
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="import") as pool:
        for path in iter_files(root):
            window.append((path, pool.submit(one, path)))
            if len(window) >= threads * 4:
                done_path, future = window.popleft()
                record(done_path, future.result())
        while window:
            done_path, future = window.popleft()
            record(done_path, future.result())
    report.seconds = time.monotonic() - started
    bar.close()
    return report
