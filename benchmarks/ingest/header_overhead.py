"""CPU per instance of ``read_header``, the part of a normal store that tolerant ingest
changed, for comparing two checkouts of the service.

    .venv/bin/python benchmarks/ingest/header_overhead.py [--repo DIR] [FOLDER]

``--repo`` imports ``service`` from another checkout (the commit before a change); the
default is this one.  FOLDER defaults to ``../shared/data/dicom``; every file the header
reader accepts without a defect there is read ``--passes`` times per repeat, and the best of ``--repeats``
repeats is printed in microseconds of process CPU per instance.  Alternate the two
checkouts a few times: other jobs on the machine move single runs by several percent.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", nargs="?", default=str(ROOT.parent / "shared/data/dicom"))
    parser.add_argument("--repo", default=str(ROOT))
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    sys.path.insert(0, args.repo)
    from service.ingest.dicom_header import read_header

    kwargs = {}
    if "tolerate_invalid_uids" in inspect.signature(read_header).parameters:
        kwargs["tolerate_invalid_uids"] = True  # what ingest calls in the default mode
    files = []
    for path in sorted(Path(args.folder).rglob("*")):
        if not path.is_file():
            continue
        data = path.read_bytes()
        try:
            header = read_header(data, **kwargs)
        except Exception:  # InvalidInstance, and anything an older checkout raised
            continue
        if not getattr(header, "defects", ()):  # normal instances only, in both checkouts
            files.append(data)
    best = float("inf")
    for _ in range(args.repeats):
        started = time.process_time()
        for _ in range(args.passes):
            for data in files:
                read_header(data, **kwargs)
        best = min(best, (time.process_time() - started) / (args.passes * len(files)))
    print(f"{args.repo}: {len(files)} files, read_header {best * 1e6:.1f} us/instance (CPU), "
          f"arguments {kwargs or 'none'}")


if __name__ == "__main__":
    main()
