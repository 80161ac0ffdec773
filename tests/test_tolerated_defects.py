"""Tolerant ingest, through real associations against a real PostgreSQL.

Two instances that dcmtk's ``storescp`` and Orthanc keep: a Secondary Capture whose
SeriesInstanceUID is ``REM SAMPLES 1``, and a PET data set whose SOP UIDs have VR UN,
which Orthanc 1.10 forwards with the Affected SOP Instance UID ``31``.  Tolerant mode (the
default) stores both, each defect in ``tolerated_defects``; strict mode rejects them.
Every rejection names its instance (or file) and its calling AE.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import struct
import subprocess
import sys
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
import sqlalchemy as sa
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import (
    CTImageStorage,
    PositronEmissionTomographyImageStorage,
    SecondaryCaptureImageStorage,
)

from service.ingest.importer import import_directory
from service.ingest.ingestor import Ingestor
from service.status import collect_status, format_status
from service.ingest.storage import INCOMING, FileStore

from .conftest import REPO_ROOT, leftover_temps
from .dicom_client import RawAssociation, encode_dataset, make_ct

CALLING = "ORTHANC"
SUCCESS, MISMATCH, MISSING_UID, MALFORMED_UID = 0x0000, 0xA900, 0xC211, 0xC212


# ---------------------------------------------------------------- peers and data sets


def send(port: int, ds: pydicom.Dataset, *, affected_sop_instance: str | None = None,
         dataset_bytes: bytes | None = None) -> int:
    """C-STORE ``ds`` over a pynetdicom association; returns the status.

    ``affected_sop_instance`` and ``dataset_bytes`` replace, on the sender's side only,
    the request's Affected SOP Instance UID and the encoded data set, as Orthanc 1.10
    sends a data set whose SOP UIDs have VR UN.
    """
    ae = AE(ae_title=CALLING)
    for sop_class in (SecondaryCaptureImageStorage, PositronEmissionTomographyImageStorage,
                      CTImageStorage):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate("127.0.0.1", port, ae_title="PACS_TEST")
    assert assoc.is_established
    try:
        if affected_sop_instance is not None or dataset_bytes is not None:
            send_msg = assoc.dimse.send_msg

            def altered(primitive, context_id):
                if isinstance(primitive, C_STORE):
                    if affected_sop_instance is not None:
                        primitive.AffectedSOPInstanceUID = affected_sop_instance
                    if dataset_bytes is not None:
                        primitive.DataSet = BytesIO(dataset_bytes)
                send_msg(primitive, context_id)

            assoc.dimse.send_msg = altered
        return assoc.send_c_store(ds).Status
    finally:
        assoc.release()


def secondary_capture(series: str = "REM SAMPLES 1", **uids: str) -> pydicom.Dataset:
    ds = make_ct()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.Modality = "OT"
    ds.SeriesInstanceUID = series
    for keyword, value in uids.items():
        setattr(ds, keyword, value)
    return ds


def pet_with_un_uids() -> tuple[pydicom.Dataset, bytes]:
    """A PET data set, and its explicit VR little endian encoding with the SOP Class and
    SOP Instance UIDs written with VR UN."""
    ds = make_ct()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = PositronEmissionTomographyImageStorage
    ds.Modality = "PT"
    encoded = encode_dataset(ds)
    # pydicom gives a UN element of a known tag its dictionary VR: rewritten by hand
    for element in (0x0016, 0x0018):
        head = struct.pack("<HH", 0x0008, element) + b"UI"
        at = encoded.index(head)
        (length,) = struct.unpack_from("<H", encoded, at + 6)
        encoded = (encoded[:at] + struct.pack("<HH", 0x0008, element) + b"UN\x00\x00"
                   + struct.pack("<I", length) + encoded[at + 8:])
    assert b"\x08\x00\x18\x00UN" in encoded and b"\x08\x00\x16\x00UN" in encoded
    return ds, encoded


def defects(service) -> list[dict]:
    with service.engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.text(
            "SELECT sop_instance_uid, rule, detail, calling_ae_title, called_ae_title, "
            "received_at FROM tolerated_defects ORDER BY id")).mappings()]


def instance_files(service) -> list[Path]:
    return [p for p in service.stored_files() if INCOMING not in p.parts]


# ---------------------------------------------------------------- invalid UIDs


def test_invalid_series_uid_is_stored_under_a_derived_path_and_recorded(service):
    ds = secondary_capture()
    assert send(service.port, ds) == SUCCESS
    with service.engine.connect() as conn:
        row = conn.execute(sa.text("SELECT * FROM instances")).mappings().one()
    assert row["sop_instance_uid"] == ds.SOPInstanceUID
    assert row["series_instance_uid"] == "REM SAMPLES 1"  # the original value, in SQL
    assert service.scalar("SELECT series_instance_uid FROM series") == "REM SAMPLES 1"
    bucket, study, series, name = row["file_path"].split("/")
    assert study == ds.StudyInstanceUID and name == f"{ds.SOPInstanceUID}.dcm"
    assert series.startswith("x") and len(series) == 33 and " " not in series
    path = service.storage / row["file_path"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == row["sha256"]
    assert pydicom.dcmread(path).SeriesInstanceUID == "REM SAMPLES 1"
    assert instance_files(service) == [path]
    assert not leftover_temps(service.storage)

    [defect] = defects(service)
    assert defect["sop_instance_uid"] == ds.SOPInstanceUID
    assert defect["rule"] == "invalid-uid"
    assert "SeriesInstanceUID" in defect["detail"] and "REM SAMPLES 1" in defect["detail"]
    assert defect["calling_ae_title"] == CALLING and defect["called_ae_title"] == "PACS_TEST"
    assert defect["received_at"] is not None
    status = collect_status(service.engine)
    assert status["tolerated_defects"] == {"invalid-uid": 1}
    assert "invalid-uid" in format_status(status)


def test_invalid_series_uid_is_rejected_in_strict_mode(service_factory):
    service = service_factory(strict_ingest=True)
    assert send(service.port, secondary_capture()) == MALFORMED_UID
    assert service.scalar("SELECT count(*) FROM instances") == 0
    assert service.scalar("SELECT count(*) FROM tolerated_defects") == 0
    assert instance_files(service) == []


def test_a_duplicate_of_a_defective_instance_adds_no_second_defect(service):
    ds = secondary_capture()
    assert send(service.port, ds) == SUCCESS
    assert send(service.port, ds) == SUCCESS
    assert service.scalar("SELECT count(*) FROM instances") == 1
    assert len(defects(service)) == 1
    assert len(instance_files(service)) == 1


def test_instances_with_one_invalid_series_value_share_its_folder(service):
    study = generate_uid()
    first, second = (secondary_capture(StudyInstanceUID=study) for _ in range(2))
    assert send(service.port, first) == SUCCESS
    assert send(service.port, second) == SUCCESS
    with service.engine.connect() as conn:
        paths = [r[0] for r in conn.execute(sa.text("SELECT file_path FROM instances"))]
    assert len(paths) == 2 and len({p.rsplit("/", 1)[0] for p in paths}) == 1
    assert service.scalar("SELECT count(*) FROM tolerated_defects") == 2


@pytest.mark.parametrize("keyword, value", [
    ("StudyInstanceUID", "1.2/../../etc"),
    ("StudyInstanceUID", ".."),
    ("StudyInstanceUID", "/etc/passwd"),
    ("SeriesInstanceUID", "1." + "2" * 70),
    ("SOPInstanceUID", "../../" + "9" * 200),
], ids=["dots-and-slashes", "parent", "absolute", "longer-than-64", "sop-path-256"])
def test_hostile_uid_values_stay_inside_the_storage_root(service, keyword, value):
    ds = secondary_capture(series=generate_uid(), **{keyword: value})
    # by hand: pynetdicom refuses to put a UID of more than 64 characters in a request
    raw = RawAssociation(service.port, calling=CALLING, abstract_syntax=SecondaryCaptureImageStorage)
    assert raw.accepted
    assert raw.store_bytes(encode_dataset(ds), sop_class=SecondaryCaptureImageStorage,
                           sop_instance=ds.SOPInstanceUID) == SUCCESS
    raw.release()
    with service.engine.connect() as conn:
        row = conn.execute(sa.text("SELECT * FROM instances")).mappings().one()
        rule = conn.execute(sa.text("SELECT rule FROM tolerated_defects")).scalar_one()
    column = {"StudyInstanceUID": "study_instance_uid", "SeriesInstanceUID": "series_instance_uid",
              "SOPInstanceUID": "sop_instance_uid"}[keyword]
    assert row[column] == value and rule == "invalid-uid"
    parts = row["file_path"].split("/")
    assert len(parts) == 4 and all(p not in ("", ".", "..") for p in parts)
    derived = {"StudyInstanceUID": parts[1], "SeriesInstanceUID": parts[2],
               "SOPInstanceUID": parts[3].removesuffix(".dcm")}[keyword]
    assert derived.startswith("x") and len(derived) == 33
    root = service.storage.resolve()
    path = (service.storage / row["file_path"]).resolve()
    assert path.is_file() and path.is_relative_to(root)
    assert [p.resolve() for p in instance_files(service)] == [path]


@pytest.mark.parametrize("keyword, value, status", [
    ("SeriesInstanceUID", "1." + "2" * 300, MALFORMED_UID),
    ("StudyInstanceUID", "1.2\\3.4", MISSING_UID),
], ids=["longer-than-256", "two-values"])
def test_unusable_uids_are_rejected_in_tolerant_mode_too(service, keyword, value, status):
    ds = secondary_capture(**{keyword: value})
    assert send(service.port, ds) == status
    assert service.scalar("SELECT count(*) FROM instances") == 0
    assert instance_files(service) == [] and not leftover_temps(service.storage)


# ---------------------------------------------------------------- request and data set disagree


def test_request_naming_another_instance_is_kept_under_the_data_sets_uid(service):
    ds, un_encoded = pet_with_un_uids()
    assert send(service.port, ds, affected_sop_instance="31", dataset_bytes=un_encoded) == SUCCESS
    with service.engine.connect() as conn:
        row = conn.execute(sa.text("SELECT * FROM instances")).mappings().one()
    assert row["sop_instance_uid"] == ds.SOPInstanceUID
    assert row["sop_class_uid"] == PositronEmissionTomographyImageStorage
    assert row["file_path"].endswith(f"/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm")
    path = service.storage / row["file_path"]
    data = path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == row["sha256"] and len(data) == row["file_size"]
    stored = pydicom.dcmread(path)
    # the file meta names what the file holds, not what the request said
    assert stored.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert stored.SOPInstanceUID == ds.SOPInstanceUID
    assert un_encoded in data  # the data set as received, UN elements included

    [defect] = defects(service)
    assert defect["sop_instance_uid"] == ds.SOPInstanceUID
    assert defect["rule"] == "sop-instance-mismatch"
    assert "'31'" in defect["detail"] and ds.SOPInstanceUID in defect["detail"]
    assert defect["calling_ae_title"] == CALLING
    assert collect_status(service.engine)["tolerated_defects"] == {"sop-instance-mismatch": 1}
    assert not leftover_temps(service.storage)


def test_request_naming_another_instance_is_rejected_in_strict_mode(service_factory):
    service = service_factory(strict_ingest=True)
    ds, un_encoded = pet_with_un_uids()
    assert send(service.port, ds, affected_sop_instance="31", dataset_bytes=un_encoded) == MISMATCH
    assert service.scalar("SELECT count(*) FROM instances") == 0
    assert service.scalar("SELECT count(*) FROM tolerated_defects") == 0
    assert instance_files(service) == []


def test_normal_instances_write_no_defect_rows(service):
    assert send(service.port, make_ct()) == SUCCESS
    assert service.scalar("SELECT count(*) FROM instances") == 1
    assert service.scalar("SELECT count(*) FROM tolerated_defects") == 0
    assert collect_status(service.engine)["tolerated_defects"] == {}


# ---------------------------------------------------------------- reject lines


def test_every_rejection_in_the_log_names_the_instance_and_the_calling_ae(service, caplog):
    ds = secondary_capture()
    del ds.StudyInstanceUID
    with caplog.at_level(logging.WARNING, logger="service"):
        assert send(service.port, ds) == MISSING_UID
    [line] = [r for r in caplog.records if r.getMessage().startswith("rejected instance")]
    assert ds.SOPInstanceUID in line.getMessage() and CALLING in line.getMessage()
    assert line.sop_instance_uid == ds.SOPInstanceUID and line.calling_ae == CALLING


def _rejects_folder(root: Path) -> dict[str, str]:
    """Files for ``import``: one stored with a tolerated defect, six rejected for six
    reasons (more than the five an earlier summary showed); file name -> SOP UID."""
    root.mkdir()
    uids = {}

    def save(name: str, ds: pydicom.Dataset) -> None:
        ds.save_as(root / name, enforce_file_format=True)
        uids[name] = str(ds.get("SOPInstanceUID", ""))

    save("a_rem_samples.dcm", secondary_capture())
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID"):
        ds = secondary_capture(series=generate_uid())
        delattr(ds, keyword)
        save(f"b_no_{keyword}.dcm", ds)
    save("c_long_uid.dcm", secondary_capture(series="1." + "3" * 300))
    ds = secondary_capture(series=generate_uid(), SOPInstanceUID="1." + "4" * 400)
    save("d_long_sop.dcm", ds)
    (root / "e_notes.txt").write_text("not an image")
    uids["e_notes.txt"] = ""
    return uids


def test_import_summary_names_every_reject_and_writes_them_to_csv(tmp_path, engine):
    uids = _rejects_folder(tmp_path / "in")
    with Ingestor(engine, FileStore(tmp_path / "storage")) as ingestor:
        report = import_directory(ingestor, tmp_path / "in", threads=2, calling_ae="BACKFILL",
                                  progress=None)
    assert report.outcomes == {"stored": 1, "rejected": 6}
    summary = report.summary()
    assert len(report.reasons) == 6
    for reason, count in report.reasons.items():
        assert f"{count} x {reason}" in summary
    rejected_lines = [line for line in summary.splitlines() if line.startswith("  rejected ")]
    assert len(rejected_lines) == 6
    for name, uid in uids.items():
        if name == "a_rem_samples.dcm":
            continue
        [line] = [line for line in rejected_lines if name in line]
        assert "calling AE BACKFILL" in line
        if uid and len(uid) <= 256:
            assert uid in line
    assert "tolerated defects (stored anyway): invalid-uid 1" in summary

    out = tmp_path / "rejects.csv"
    with open(out, "w", newline="") as fh:
        report.write_rejects_csv(fh)
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6
    assert {Path(r["file"]).name for r in rows} == set(uids) - {"a_rem_samples.dcm"}
    assert all(r["calling_ae"] == "BACKFILL" and r["reason"] and r["status"].startswith("0xC2")
               for r in rows)
    by_name = {Path(r["file"]).name: r for r in rows}
    assert by_name["b_no_SeriesInstanceUID.dcm"]["sop_instance_uid"] == \
        uids["b_no_SeriesInstanceUID.dcm"]
    assert by_name["e_notes.txt"]["reason"] == "not a DICOM file"


def _cli(args: list[str], database_url: str, data_dir: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PACS_CONFIG"}
    env.update(DATABASE_URL=database_url, PACS_DATA_DIR=str(data_dir), PACS_LOG_FORMAT="text")
    return subprocess.run([sys.executable, "-m", "service.cli", *args], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)


def test_import_command_writes_rejects_csv_and_logs_each_reject(tmp_path, database_url):
    uids = _rejects_folder(tmp_path / "in")
    out = tmp_path / "rejects.csv"
    result = _cli(["import", str(tmp_path / "in"), "--quiet", "--rejects-csv", str(out)],
                  database_url, tmp_path / "data")
    assert result.returncode == 0, result.stderr
    assert "rejected 6" in result.stdout and "stored 1" in result.stdout
    with open(out, newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 6
    log_lines = [line for line in result.stderr.splitlines() if " rejected " in line]
    assert len(log_lines) == 6 and all("from IMPORT" in line for line in log_lines)
    assert any(uids["b_no_SOPClassUID.dcm"] in line for line in log_lines)
    assert any("e_notes.txt" in line for line in log_lines)
    assert "invalid-uid" in _cli(["status"], database_url, tmp_path / "data").stdout

    again = _cli(["import", str(tmp_path / "in"), "--quiet"], database_url, tmp_path / "data")
    assert "duplicate 1" in again.stdout and "rejected 6" in again.stdout
    assert "tolerated defects" not in again.stdout  # counted with the first store only

    unwritable = _cli(["import", str(tmp_path / "in"), "--rejects-csv",
                       str(tmp_path / "missing" / "r.csv")], database_url, tmp_path / "data")
    assert unwritable.returncode == 2
    [line] = unwritable.stderr.strip().splitlines()
    assert line.startswith("error: --rejects-csv")


def test_strict_ingest_setting_reaches_import(tmp_path, database_url):
    source = tmp_path / "in"
    source.mkdir()
    secondary_capture().save_as(source / "rem.dcm", enforce_file_format=True)
    tolerant = _cli(["import", str(source), "--quiet"], database_url, tmp_path / "data")
    assert "stored 1" in tolerant.stdout
    other = tmp_path / "in2"
    other.mkdir()
    secondary_capture().save_as(other / "rem.dcm", enforce_file_format=True)
    env = {k: v for k, v in os.environ.items() if k != "PACS_CONFIG"}
    env.update(DATABASE_URL=database_url, PACS_DATA_DIR=str(tmp_path / "data"),
               PACS_STRICT_INGEST="true")
    result = subprocess.run([sys.executable, "-m", "service.cli", "import", str(other), "--quiet"],
                            env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert "rejected 1" in result.stdout and "is not a valid UID" in result.stdout
