"""Feature selection: the shipped default, the automatic rules on hand-made analysis rows,
JSON round trips, and the CLI on a real analysis run."""

from __future__ import annotations

import json
from io import BytesIO

import pytest

from parsers import FEATURE_COLUMNS
from parsers.selection import (
    DEFAULT_COLUMNS,
    DEFAULT_REASONS,
    FeatureSelection,
    SelectionError,
    default_selection,
    select_features,
)
from service.tags import analysis, features
from service.cli import main
from service.ingest.ingestor import Ingestor
from service.ingest.storage import FileStore

from .dicom_client import make_ct

ALL = {c.name for c in FEATURE_COLUMNS}


def row(keyword: str, missing: float, distinct: int = 5, present: int = 100,
        unique: bool = False) -> dict:
    return {"keyword": keyword, "present": present, "missing_share": missing,
            "distinct_values": distinct, "is_unique_per_record": unique}


ROWS = [
    row("Modality", 0.0, distinct=3),
    row("KVP", 0.10),
    row("SliceThickness", 0.30),
    row("PatientWeight", 0.80),  # too often missing
    row("ImagePositionPatient", 0.0, distinct=100, unique=True),
    row("Rows", 0.0, distinct=1),  # constant
    row("SeriesDescription", 0.2, distinct=40),
    row("BodyPartExamined", 0.05),
    row("SOPInstanceUID", 0.0, distinct=100, unique=True),  # not a parsed tag: ignored
]


def test_default_list_covers_every_column_and_drops_two():
    assert set(DEFAULT_REASONS) == ALL
    assert len(DEFAULT_COLUMNS) == 83
    assert set(ALL) - set(DEFAULT_COLUMNS) == {"image_position_z", "body_part_source"}
    selection = default_selection()
    assert selection.columns == DEFAULT_COLUMNS and selection.mode == "default"
    assert selection.dropped == ("image_position_z", "body_part_source")
    assert all(selection.reasons[c].startswith("kept: ") for c in selection.columns)
    assert all(selection.reasons[c].startswith("dropped: ") for c in selection.dropped)


def test_auto_rules_and_ranking():
    selection = select_features(ROWS, max_missing=0.5)
    # least missing first, FEATURE_COLUMNS order among equals
    assert selection.columns == ("modality", "body_part", "kvp", "body_part_inferred",
                                 "slice_thickness")
    r = selection.reasons
    assert r["kvp"] == "kept: missing in 10.0% of instances"
    assert r["patient_weight"] == "dropped: missing in 80.0% of instances (limit 50.0%)"
    assert r["image_position_x"].startswith("dropped: ImagePositionPatient is unique per record")
    assert r["rows"] == "dropped: Rows has one value in the whole archive"
    assert r["echo_time"] == "dropped: EchoTime does not occur in the archive"
    assert r["body_part_source"].startswith("dropped: excluded by configuration (says where")
    assert "body_part_source" in select_features(ROWS, exclude=()).columns
    assert set(r) == ALL
    assert selection.parameters["max_missing"] == 0.5


def test_threshold_is_inclusive_and_configurable():
    assert "slice_thickness" in select_features(ROWS, max_missing=0.3).columns
    assert "slice_thickness" not in select_features(ROWS, max_missing=0.29).columns
    assert "patient_weight" in select_features(ROWS, max_missing=0.9).columns


def test_constant_columns_can_be_kept():
    assert "rows" in select_features(ROWS, drop_constant=False).columns


def test_column_missing_share_overrides_the_tag_share():
    # KVP is present in 90% but unparseable in half of those: the column is 55% missing
    selection = select_features(ROWS, column_rows=[{"column_name": "kvp",
                                                    "missing_share": 0.55}])
    assert "kvp" not in selection.columns
    assert selection.reasons["kvp"].startswith("dropped: missing in 55.0%")


def test_max_columns_and_keep():
    selection = select_features(ROWS, max_columns=2, keep=["patient_weight"])
    assert selection.columns == ("patient_weight", "modality")
    assert selection.reasons["patient_weight"] == "kept by configuration (missing 80.0%)"
    assert selection.reasons["body_part"].startswith("dropped: ranked 3 by missing share")


@pytest.mark.parametrize("kwargs, match", [
    ({"max_missing": 1.5}, "max_missing"),
    ({"max_columns": 0}, "max_columns"),
    ({"keep": ["no_such_column"]}, "unknown feature columns: no_such_column"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        select_features(ROWS, **kwargs)


def test_json_round_trip():
    for selection in (default_selection(), select_features(ROWS, run_id=7)):
        text = selection.to_json()
        assert FeatureSelection.from_json(text) == selection
    assert json.loads(select_features(ROWS, run_id=7).to_json())["parameters"][
        "analysis_run"] == 7


@pytest.mark.parametrize("text, match", [
    ("not json", "not JSON"),
    ('{"format": 99, "columns": []}', "not a feature selection"),
    ('{"format": 1, "columns": "modality"}', "list of column names"),
    ('{"format": 1, "columns": ["modality", "nope"]}', "unknown feature columns: nope"),
    ('{"format": 1, "columns": ["modality", "modality"]}', "selected twice"),
])
def test_bad_json(text, match):
    with pytest.raises(SelectionError, match=match):
        FeatureSelection.from_json(text)


def test_auto_selection_from_a_real_run(engine, tmp_path, settings, monkeypatch, capsys):
    datasets = [make_ct() for _ in range(3)]
    datasets[0].PatientAge = "abc"  # 1 of 3 unparseable
    datasets[1].PatientAge = "abc"  # 2 of 3: column missing 66.7%
    with Ingestor(engine, FileStore(tmp_path / "storage")) as ingestor:
        for ds in datasets:
            buffer = BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            assert ingestor.ingest(buffer.getvalue()).result == "stored"
    features.process_queue_batch(engine, "test")
    run = analysis.load_run(engine, analysis.run_analysis(engine, progress=None))
    import dataclasses

    selection = select_features([dataclasses.asdict(t) for t in run.tags],
                                column_rows=[dataclasses.asdict(c) for c in run.columns])
    # every instance of the sample is one CT: all of its constant tags are dropped
    assert "modality" not in selection.columns
    assert selection.reasons["modality"] == "dropped: Modality has one value in the whole archive"
    # PatientAge has 2 distinct raw values but only 1 of 3 parses
    assert selection.reasons["patient_age"] == (
        "dropped: missing in 66.7% of instances (limit 50.0%)")

    monkeypatch.setenv("DATABASE_URL", settings.database_url)
    monkeypatch.setenv("PACS_DATA_DIR", str(tmp_path / "data"))
    out = tmp_path / "selection.json"
    assert main(["select-features", "--auto", "--max-missing", "0.7", "--out", str(out)]) == 0
    stored = FeatureSelection.from_json(out.read_text())
    assert stored.mode == "auto" and stored.parameters["analysis_run"] == run.id
    assert "patient_age" in stored.columns
    capsys.readouterr()
    assert main(["select-features"]) == 0
    assert FeatureSelection.from_json(capsys.readouterr().out) == default_selection()
