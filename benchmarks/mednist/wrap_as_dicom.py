"""Wrap the MedNIST sample as DICOM Secondary Capture files, to send through the listener.

    python benchmarks/mednist/wrap_as_dicom.py OUT_DIR [--mednist ../shared/data/mednist]
        [--per-class N] [--seed 0] [--without-labels] [--exclude-csv OTHER/labels.csv]

Each 64 x 64 JPEG becomes one Secondary Capture Image Storage instance (Explicit VR Little
Endian, 8-bit grey, MONOCHROME2) whose Modality and BodyPartExamined come from
``labels.csv`` (its ``modality`` / ``body_part`` columns), so the tag side of the service sees
what a site's header would carry. ``--without-labels`` writes Modality ``OT`` and no
BodyPartExamined instead: the pixels are then the only clue ("query by pixels").

MedNIST has no patient or case grouping: every image gets its own PatientID, StudyInstanceUID
and SeriesInstanceUID. Group-disjoint evaluation by study is therefore the same as a plain
image split here, and near-duplicate slices of one scan can still sit on both sides: MedNIST
numbers are optimistic.

UIDs are deterministic (``pydicom.uid.generate_uid`` over the image's path): wrapping again
gives the same UIDs, so a labels CSV made once stays valid.

Writes to OUT_DIR:

* ``dicom/<class>/<image>.dcm``, one file per image;
* ``labels.csv``: ``sop_instance_uid,label,group,image`` (``group`` = the PatientID) for
  ``pacs-annotate evaluate --labels``.

``--per-class N`` wraps a seeded sample of N images of each class (default: all).
``--exclude-csv`` leaves out the images of another run's ``labels.csv`` before sampling, so
that an archive part and a query part never share an image.
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

ROOT = Path(__file__).resolve().parents[2]
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
UID_PREFIX = "1.2.826.0.1.3680043.10.1157."  # pydicom's root (2.25 UIDs are too long for
# the entropy form); the rest is a hash of the image path, so the UIDs are deterministic


def _uid(kind: str, key: str) -> str:
    return generate_uid(prefix=UID_PREFIX, entropy_srcs=["mednist", kind, key])


def wrap(jpeg: Path, key: str, label: str, modality: str, body_part: str, *,
         with_labels: bool, number: int) -> Dataset:
    """One Secondary Capture dataset for one MedNIST JPEG (``key``: its labels.csv path)."""
    grey = np.asarray(Image.open(jpeg).convert("L"), dtype=np.uint8)
    sop_uid = _uid("sop", key)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = sop_uid
    ds.PatientID = f"MEDNIST-{number:05d}"
    ds.PatientName = f"MedNIST^{number:05d}"
    ds.StudyInstanceUID = _uid("study", key)
    ds.SeriesInstanceUID = _uid("series", key)
    ds.StudyID = f"{number}"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.StudyDescription = "MedNIST" if not with_labels else f"MedNIST {label}"
    ds.Modality = modality if with_labels else "OT"
    if with_labels and body_part:
        ds.BodyPartExamined = body_part
    ds.ConversionType = "WSD"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = grey.shape
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = grey.tobytes()
    return ds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--mednist", type=Path, default=ROOT.parent / "shared" / "data" / "mednist")
    parser.add_argument("--per-class", type=int, help="seeded sample of N images per class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--without-labels", action="store_true",
                        help="Modality OT and no BodyPartExamined: pixels only")
    parser.add_argument("--exclude-csv", type=Path, action="append", default=[],
                        help="leave out the images listed in this labels.csv (repeatable)")
    args = parser.parse_args(argv)

    excluded: set[str] = set()
    for other in args.exclude_csv:
        with other.open(newline="") as handle:
            excluded.update(row["image"] for row in csv.DictReader(handle))

    with (args.mednist / "labels.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    by_class: dict[str, list[dict]] = {}
    for row in rows:
        if row["image"] in excluded:
            continue
        by_class.setdefault(row["label"], []).append(row)
    chosen: list[dict] = []
    for label in sorted(by_class):
        members = sorted(by_class[label], key=lambda row: row["image"])
        if args.per_class is not None and args.per_class < len(members):
            members = sorted(random.Random(f"{args.seed}:{label}").sample(members,
                                                                          args.per_class),
                             key=lambda row: row["image"])
        chosen.extend(members)

    out_dicom = args.out / "dicom"
    with_labels = not args.without_labels
    labels_rows = []
    for number, row in enumerate(chosen):
        ds = wrap(args.mednist / row["image"], row["image"], row["label"], row["modality"],
                  row["body_part"], with_labels=with_labels, number=number)
        target = out_dicom / row["label"] / (Path(row["image"]).stem + ".dcm")
        target.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(target, enforce_file_format=True)
        labels_rows.append((ds.SOPInstanceUID, row["label"], ds.PatientID, row["image"]))
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sop_instance_uid", "label", "group", "image"])
        writer.writerows(labels_rows)
    print(f"wrote {len(labels_rows):,} Secondary Capture files under {out_dicom} and "
          f"{args.out / 'labels.csv'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
