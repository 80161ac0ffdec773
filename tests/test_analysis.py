"""Tag frequency analysis on a real PostgreSQL: counts checked against a hand-made archive."""

from __future__ import annotations

import csv
import io
import json

import pytest
import sqlalchemy as sa

from service.tags import analysis, features
from service.cli import main

from .dicom_client import ingest_datasets, make_ct


def _archive() -> list:
    """Four CT instances of one series; the differences are what the analysis must count.

    PatientAge: "045Y", "045Y", "abc" (unparseable), absent  -> 3 present, 1 failure
    KVP:        120, 120, 120, absent                         -> missing 1/4
    Manufacturer: 3 x "GE MEDICAL SYSTEMS", one empty ("")    -> present 4, empty 1
    InstanceNumber: 1, 2, 3, 4                                -> unique per record
    """
    series = "1.2.826.0.1.3680043.8.498.1"
    datasets = [make_ct(study="1.2.826.0.1.3680043.8.498.2", series=series) for _ in range(4)]
    for number, ds in enumerate(datasets, start=1):
        ds.InstanceNumber = number
    datasets[0].PatientAge = "045Y"
    datasets[1].PatientAge = "045Y"
    datasets[2].PatientAge = "abc"
    del datasets[3].PatientAge
    del datasets[3].KVP
    datasets[2].Manufacturer = ""
    return datasets


@pytest.fixture
def archive(engine, tmp_path):
    ingest_datasets(engine, tmp_path / "storage", _archive())
    assert features.process_queue_batch(engine, "test") == 4
    return engine


def test_counts_missing_shares_and_top_values(archive):
    run_id = analysis.run_analysis(archive, top=3, progress=None)
    run = analysis.load_run(archive, run_id)
    assert run.status == "done" and run.instances == 4 and run.feature_instances == 4

    modality = run.tag("Modality")
    assert (modality.present, modality.empty, modality.missing_share) == (4, 0, 0.0)
    assert modality.distinct_values == 1 and modality.top_values == (("CT", 4),)
    assert not modality.is_unique_per_record and modality.parse_failures == 0

    kvp = run.tag("KVP")
    assert (kvp.present, kvp.missing_share, kvp.distinct_values) == (3, 0.25, 1)
    assert kvp.top_values == (("120", 3),)  # a DS value is stored as text

    manufacturer = run.tag("Manufacturer")
    assert (manufacturer.present, manufacturer.empty, manufacturer.missing_share) == (4, 1, 0.25)
    assert manufacturer.top_values == (("GE MEDICAL SYSTEMS", 3),)

    age = run.tag("PatientAge")
    assert (age.present, age.missing_share, age.distinct_values) == (3, 0.25, 2)
    assert age.top_values == (("045Y", 2), ("abc", 1))
    assert age.parse_failures == 1
    assert [(x["raw"], x["count"]) for x in age.failure_examples] == [("abc", 1)]

    number = run.tag("InstanceNumber")
    assert number.distinct_values == 4 and number.is_unique_per_record
    assert len(number.top_values) == 3  # cut at top=3, ties ordered by value
    assert [v for v, _ in number.top_values] == ["1", "2", "3"]
    assert run.tag("SOPInstanceUID").is_unique_per_record
    assert not run.tag("SeriesInstanceUID").is_unique_per_record

    # a multi-valued element is shown as its JSON text
    assert run.tag("PixelSpacing").top_values == (('["0.661468", "0.661468"]', 4),)
    # not a parsed tag: no failure count at all
    assert run.tag("SeriesInstanceUID").parse_failures is None

    age_column = run.column("patient_age")
    assert (age_column.present, age_column.missing_share, age_column.parse_failures) == (
        2, 0.5, 1)
    assert run.column("kvp").missing_share == 0.25


def test_every_top_level_tag_is_counted(archive):
    run = analysis.load_run(archive, analysis.run_analysis(archive, progress=None))
    with archive.connect() as conn:
        keys = set(conn.execute(sa.text(
            "SELECT DISTINCT jsonb_object_keys(tags) FROM instances")).scalars())
    assert {t.keyword for t in run.tags} == keys
    assert len(run.columns) == 85


def test_chunked_and_single_pass_agree(archive):
    single = analysis.load_run(archive, analysis.run_analysis(archive, chunks=1, progress=None))
    with archive.begin() as conn:  # spread the rows over several pages
        conn.execute(sa.text("UPDATE instances SET tags = tags"))
    chunked = analysis.load_run(archive, analysis.run_analysis(archive, chunks=64,
                                                               progress=None))
    assert single.tags == chunked.tags


def test_progress_goes_to_the_given_stream(archive):
    stream = io.StringIO()
    run_id = analysis.run_analysis(archive, progress=stream)
    assert "counting tag values of 4 instances: 100%" in stream.getvalue()
    assert f"run {run_id} done" in stream.getvalue()


def test_runs_are_versioned_and_the_latest_is_loaded(archive):
    first = analysis.run_analysis(archive, top=1, progress=None)
    second = analysis.run_analysis(archive, top=2, progress=None)
    assert second > first
    assert analysis.load_run(archive).id == second
    assert analysis.load_run(archive, first).parameters["top"] == 1
    with pytest.raises(analysis.AnalysisError, match="no analysis run 999"):
        analysis.load_run(archive, 999)


def test_empty_archive(engine):
    run = analysis.load_run(engine, analysis.run_analysis(engine, progress=None))
    assert run.instances == 0 and run.tags == ()
    assert all(c.missing_share is None for c in run.columns)


def test_csv_parses_back(archive, tmp_path):
    run = analysis.load_run(archive, analysis.run_analysis(archive, progress=None))
    paths = analysis.write_report(run, tmp_path / "out", html_report=False)
    assert [p.name for p in paths] == ["tags.csv", "columns.csv"]
    with paths[0].open(newline="", encoding="utf-8") as handle:
        rows = {r["keyword"]: r for r in csv.DictReader(handle)}
    assert len(rows) == len(run.tags)
    age = rows["PatientAge"]
    assert (int(age["present"]), float(age["missing_share"]), age["parse_failures"]) == (
        3, 0.25, "1")
    assert json.loads(age["top_values"]) == [{"value": "045Y", "count": 2},
                                             {"value": "abc", "count": 1}]
    assert json.loads(rows["PixelSpacing"]["top_values"])[0]["value"] == (
        '["0.661468", "0.661468"]')
    assert rows["SOPInstanceUID"]["is_unique_per_record"] == "true"
    with paths[1].open(newline="", encoding="utf-8") as handle:
        columns = {r["column"]: r for r in csv.DictReader(handle)}
    assert float(columns["patient_age"]["missing_share"]) == 0.5


def test_html_has_a_table_per_tag_a_bar_and_a_sorter(archive):
    run = analysis.load_run(archive, analysis.run_analysis(archive, progress=None))
    page = analysis.render_html(run)
    assert page.count('<table class="sortable tag"') == len(run.tags)
    assert 'id="tag-PatientAge"' in page and 'href="#tag-PatientAge"' in page
    assert 'style="width:25.0%"' in page  # KVP and Manufacturer: a quarter missing
    assert "addEventListener" in page and "http" not in page.replace(
        "https://", "").split("<body>")[0]  # no external assets in the head
    assert "&quot;0.661468&quot;" in page  # values are escaped
    assert "abc" in page and "failed to parse" in page


def test_cli_analyze_writes_the_report(settings, engine, tmp_path, capsys, monkeypatch):
    ingest_datasets(engine, tmp_path / "storage", _archive())
    features.process_queue_batch(engine, "test")
    monkeypatch.setenv("DATABASE_URL", settings.database_url)
    monkeypatch.setenv("PACS_DATA_DIR", str(tmp_path / "data"))
    out = tmp_path / "report"
    assert main(["analyze", "--top", "2", "--out", str(out), "--html"]) == 0
    assert (out / "report.html").exists() and not (out / "tags.csv").exists()
    captured = capsys.readouterr()
    assert "4 instances" in captured.out and "report.html" in captured.out
    # stderr is not a terminal here: the log line, no progress bar or step lines
    assert "tag analysis finished" in captured.err
    assert "analyze: counting tag values" not in captured.err
    assert main(["analyze", "--out", str(out), "--csv", "--quiet"]) == 0
    assert (out / "tags.csv").exists()
