"""The two header readers agree, UIDs are validated, and file meta is well formed."""

from __future__ import annotations

import json
import warnings
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from service.ingest.dicom_header import (
    STATUS_MALFORMED_UID,
    STATUS_MISSING_UID,
    STATUS_UNDECODABLE,
    InvalidInstance,
    _Unsupported,
    encode_part10,
    parse_da,
    read_header,
    read_tags_direct,
    read_tags_pydicom,
)

from .conftest import SHARED_DICOM


def _real_files() -> list[Path]:
    if not SHARED_DICOM.is_dir():
        return []
    return sorted(p for p in SHARED_DICOM.rglob("*")
                  if p.is_file() and "_provenance" not in p.parts
                  and p.suffix.lower() not in (".csv", ".md"))


def test_direct_reader_matches_pydicom_on_every_real_file():
    files = _real_files()
    if not files:
        pytest.skip(f"{SHARED_DICOM} is absent")
    compared = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in files:
            data = path.read_bytes()
            try:
                expected, expected_ts = read_tags_pydicom(data)
            except Exception:
                continue  # not DICOM at all
            try:
                tags, ts = read_tags_direct(data)
            except _Unsupported:
                continue  # pydicom reads it on the ingest path too
            compared += 1
            assert ts == expected_ts, path
            assert json.dumps(tags, sort_keys=True) == json.dumps(expected, sort_keys=True), path
    # the direct reader is the ingest path: it must cover nearly everything
    assert compared >= 400, compared


def test_every_real_file_is_indexed_or_rejected_with_a_reason():
    files = _real_files()
    if not files:
        pytest.skip(f"{SHARED_DICOM} is absent")
    indexed = rejected = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in files:
            try:
                header = read_header(path.read_bytes())
            except InvalidInstance as exc:
                assert exc.reason and exc.status in (
                    STATUS_UNDECODABLE, STATUS_MISSING_UID, STATUS_MALFORMED_UID)
                rejected += 1
                continue
            json.dumps(header.tags)  # JSONB-safe
            indexed += 1
    assert indexed > 400 and rejected < 40


def test_tags_keep_stored_text_and_types():
    header = read_header(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    tags = header.tags
    assert tags["PixelSpacing"] == ["0.661468", "0.661468"]
    assert tags["Rows"] == 128 and isinstance(tags["Rows"], int)
    assert tags["ImageType"] == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert "PixelData" not in tags
    assert header.text("Modality") == "CT"
    assert header.date("StudyDate").isoformat() == "2004-01-19"
    assert header.integer("InstanceNumber") == 1


def test_nul_bytes_and_invalid_utf8_become_jsonb_safe_text():
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.StudyDescription = "x"
    buffer = BytesIO()
    ds.save_as(buffer)
    data = buffer.getvalue().replace(b"x\x00" if b"x\x00" in buffer.getvalue() else b"x ",
                                     b"\xff\x00")
    tags = read_header(data).tags
    text = json.dumps(tags)
    assert "\\u0000" not in text
    text.encode("utf-8")


@pytest.mark.parametrize("value, expected", [
    ("20240229", "2024-02-29"), ("20230229", None), ("2024", None), ("", None),
    (None, None), ("2024-02-29", None), ("20240101120000", "2024-01-01"),
])
def test_parse_da(value, expected):
    result = parse_da(value)
    assert (result.isoformat() if result else None) == expected


def test_encode_part10_round_trips_through_pydicom():
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    raw = BytesIO()
    pydicom.dcmwrite(raw, ds)
    dataset = raw.getvalue()
    meta_end = 144 + int.from_bytes(dataset[140:144], "little")
    encoded = encode_part10(dataset[meta_end:], sop_class_uid=ds.SOPClassUID,
                            sop_instance_uid=ds.SOPInstanceUID,
                            transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
                            source_ae_title="MODALITY1")
    back = pydicom.dcmread(BytesIO(encoded))
    assert back.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert back.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
    assert back.file_meta.SourceApplicationEntityTitle == "MODALITY1"
    assert back.PatientName == ds.PatientName
    assert len(back.PixelData) == len(ds.PixelData)
