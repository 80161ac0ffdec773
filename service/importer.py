"""``import DIR``: backfill an archive from files, through the same path as C-STORE."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Iterator, TextIO

from .ingest import Ingestor, StoreOutcome

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


@dataclass
class ImportReport:
    files: int = 0
    outcomes: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    def summary(self) -> str:
        parts = ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items()))
        rate = self.files / self.seconds if self.seconds else 0.0
        text = f"{self.files} files in {self.seconds:.1f} s ({rate:.0f}/s): {parts or 'nothing'}"
        for reason, count in self.reasons.most_common(5):
            text += f"\n  {count} x {reason}"
        return text


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
    last_print = started

    def one(path: Path) -> StoreOutcome:
        try:
            data = as_part10(path.read_bytes())
        except OSError as exc:
            return StoreOutcome(0xC210, "rejected", None, f"unreadable file: {exc.strerror}")
        except Exception:  # pydicom's many ways of saying "this is not DICOM"
            return StoreOutcome(0xC210, "rejected", None, "not a DICOM file")
        return ingestor.ingest(data, calling_ae=calling_ae)

    def record(path: Path, outcome: StoreOutcome) -> None:
        nonlocal last_print
        report.files += 1
        report.outcomes[outcome.result] += 1
        if outcome.reason:
            report.reasons[outcome.reason[:80]] += 1
            log.debug("%s: %s", path, outcome.reason)
        now = time.monotonic()
        if progress is not None and now - last_print >= 2.0:
            last_print = now
            print(f"\rimport: {report.files} files, {report.files / (now - started):.0f}/s, "
                  + ", ".join(f"{k} {v}" for k, v in sorted(report.outcomes.items())),
                  end="", file=progress, flush=True)

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
    if progress is not None and report.files:
        print("", file=progress)
    return report
