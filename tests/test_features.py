"""Features reach SQL for every ingested instance: through the queue, and by reparse."""

from __future__ import annotations

import time

import sqlalchemy as sa

from parsers import FEATURE_COLUMNS, PARSER_VERSION
from service.tags import features

from .dicom_client import associate, ingest_datasets, make_ct


def test_queue_batch_fills_the_feature_table(engine, tmp_path):
    ds = make_ct()
    ds.BodyPartExamined = "T SPINE"
    ingest_datasets(engine, tmp_path / "storage", [ds, make_ct()])
    assert features.process_queue_batch(engine, "test") == 2
    assert features.process_queue_batch(engine, "test") == 0
    with engine.connect() as conn:
        row = conn.execute(sa.text(
            "SELECT * FROM instance_features WHERE sop_instance_uid = :s"),
            {"s": ds.SOPInstanceUID}).mappings().one()
        queue = dict(conn.execute(sa.text(
            "SELECT status, count(*) FROM work_queue GROUP BY status")).all())
        filtered = conn.execute(sa.text(
            "SELECT count(*) FROM instance_features "
            "WHERE body_part = 'TSPINE' AND slice_thickness < 6")).scalar()
    assert row["parser_version"] == PARSER_VERSION
    assert row["modality"] == "CT"
    assert row["body_part"] == "TSPINE" and row["body_part_source"] == "stored"
    assert abs(row["pixel_spacing_row"] - 0.661468) < 1e-9
    assert row["plane"] == "AXIAL"
    assert queue == {"done": 2}
    assert filtered == 1


def test_serve_gives_a_new_instance_its_features_within_seconds(service):
    worker = features.TagsWorker(service.engine, name="test", idle_sleep=0.1).start()
    try:
        ds = make_ct()
        assoc = associate(service.port)
        assert assoc.send_c_store(ds).Status == 0
        assoc.release()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if service.scalar("SELECT count(*) FROM instance_features") == 1:
                break
            time.sleep(0.05)
        assert service.scalar("SELECT modality FROM instance_features") == "CT"
    finally:
        worker.stop()


def test_tags_worker_yields_while_stores_keep_arriving(engine, tmp_path):
    patient = features.TagsWorker(engine, name="test", quiet_seconds=5.0, max_lag_seconds=60.0)
    assert not patient.ingest_busy()  # nothing waiting
    ingest_datasets(engine, tmp_path / "storage", [make_ct()])
    assert patient.ingest_busy()  # a store just arrived: ingest goes first
    lagging = features.TagsWorker(engine, name="test", quiet_seconds=5.0, max_lag_seconds=0.0)
    assert not lagging.ingest_busy()  # the oldest entry waited long enough: parse now
    time.sleep(0.5)
    paused = features.TagsWorker(engine, name="test", quiet_seconds=0.2, max_lag_seconds=60.0,
                                 idle_sleep=0.05)
    assert not paused.ingest_busy()  # the stores paused
    paused.start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not _count(engine, "instance_features"):
            time.sleep(0.05)
    finally:
        paused.stop()
    assert _count(engine, "instance_features") == 1


def _count(engine, table: str) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar()


def test_reparse_rebuilds_stale_versions_and_is_resumable(engine, tmp_path):
    ingest_datasets(engine, tmp_path / "storage", [make_ct() for _ in range(5)])
    assert features.reparse(engine, chunk=2, progress=None) == 5
    assert features.reparse(engine, chunk=2, progress=None) == 0  # nothing stale
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE instance_features SET parser_version = 'old', "
                             "modality = NULL WHERE sop_instance_uid IN "
                             "(SELECT sop_instance_uid FROM instance_features LIMIT 3)"))
    assert features.reparse(engine, chunk=2, progress=None) == 3
    with engine.connect() as conn:
        versions = conn.execute(sa.text(
            "SELECT DISTINCT parser_version, modality FROM instance_features")).all()
    assert versions == [(PARSER_VERSION, "CT")]


def test_feature_table_has_one_column_per_parsed_feature(engine):
    inspector = sa.inspect(engine)
    columns = {c["name"] for c in inspector.get_columns("instance_features")}
    assert {c.name for c in FEATURE_COLUMNS} <= columns


def test_reparse_follows_a_vocabulary_change_and_all_forces(engine, tmp_path):
    from parsers import load_vocabulary

    ds = make_ct()
    ds.Manufacturer = "TOSHIBA"
    ingest_datasets(engine, tmp_path / "storage", [ds, make_ct()])
    assert features.reparse(engine, progress=None) == 2
    assert features.reparse(engine, progress=None) == 0
    site = tmp_path / "vocabulary.toml"
    site.write_text('[aliases.Manufacturer]\nTOSHIBA = "CANON"\n', encoding="utf-8")
    # only the vocabulary changed: every row was parsed with the old one, so all are redone
    assert features.reparse(engine, vocabulary=load_vocabulary(site), progress=None) == 2
    assert features.reparse(engine, vocabulary=load_vocabulary(site), progress=None) == 0
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT sop_instance_uid, manufacturer, parser_version, vocabulary_version "
            "FROM instance_features")).all()
    assert {r.manufacturer for r in rows if r.sop_instance_uid == ds.SOPInstanceUID} == {"CANON"}
    assert {(r.parser_version, r.vocabulary_version) for r in rows} == {
        (PARSER_VERSION, load_vocabulary(site).version)}
    # back to the shipped vocabulary: its version differs again
    assert load_vocabulary().version != load_vocabulary(site).version
    assert features.reparse(engine, progress=None) == 2
    assert features.reparse(engine, progress=None, everything=True) == 2


def test_vocabulary_version_is_a_hash_of_its_content(tmp_path):
    from parsers import load_vocabulary

    assert load_vocabulary().version == load_vocabulary().version
    same = tmp_path / "same.toml"
    same.write_text("# nothing added\n", encoding="utf-8")
    assert load_vocabulary(same).version == load_vocabulary().version
    rule = tmp_path / "rule.toml"
    rule.write_text('[[body_part_inference]]\npattern = "\\\\bTHUMB\\\\b"\ncode = "HAND"\n',
                    encoding="utf-8")
    assert load_vocabulary(rule).version != load_vocabulary().version
