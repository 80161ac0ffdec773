"""A labels CSV for the shared real DICOM files, from their own tags.

    python benchmarks/mednist/shared_dicom_labels.py OUT.csv [--manifest ../shared/data/dicom/MANIFEST.csv]

One row per instance of ``MANIFEST.csv``: ``sop_instance_uid``, ``label`` = "Modality|Body
part" (``Modality`` and ``BodyPartExamined`` as the file's header carries them, upper-cased;
an empty body part stays empty, so "MR|" is a label of its own) and ``group`` =
SeriesInstanceUID (the SOP Instance UID when the manifest has none): the slices of one series
are near-duplicates, so a series is never split between queries and index. Instances without
pixel data are left out, and so are copies (a SOP Instance UID listed again).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--manifest", type=Path,
                        default=ROOT.parent / "shared" / "data" / "dicom" / "MANIFEST.csv")
    args = parser.parse_args(argv)
    rows, seen = [], set()
    with args.manifest.open(newline="") as handle:
        for row in csv.DictReader(handle):
            if (row["has_pixels"] != "True" or not row["SOPInstanceUID"]
                    or row["SOPInstanceUID"] in seen):
                continue  # no pixels, or a copy of a file listed before (same UID)
            seen.add(row["SOPInstanceUID"])
            label = f"{row['Modality'].strip().upper()}|{row['BodyPartExamined'].strip().upper()}"
            # a file without a SeriesInstanceUID is a group of its own
            rows.append((row["SOPInstanceUID"], label,
                         row["SeriesInstanceUID"] or row["SOPInstanceUID"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sop_instance_uid", "label", "group"])
        writer.writerows(rows)
    print(f"wrote {len(rows)} labelled instances ({len({r[1] for r in rows})} labels, "
          f"{len({r[2] for r in rows})} series) to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
