"""``evaluate`` (issue 7): labels CSV parsing, the seeded stratified split, the Table 1
evaluation on planted features, and end to end on stored images through the CLI."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import pytest

from pipelines.ddiccir import PipelineConfig
from service.evaluation import (DEFAULT_METHODS, METHODS, LabelError, LabelSet,
                                NoLabelledFeatures, StoredFeatures, add_evaluate_parser,
                                evaluate, evaluate_stored, format_table, read_labels,
                                stratified_split, write_result)

from .test_image_annotation import SMALL, _images
from .test_image_worker import SIZE, weights  # noqa: F401  (fixture)

IRMA_CODES = ("1121-127-700-500", "1121-120-200-700", "1123-127-500-000")


def _write(tmp_path: Path, text: str, name: str = "labels.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- labels CSV

@pytest.mark.parametrize("text, kind, expected", [
    ("sop_instance_uid,label\n1.1,disk\n1.2,stripes\n1.3,disk\n", "single",
     {"1.1": {"disk"}, "1.2": {"stripes"}, "1.3": {"disk"}}),
    # other columns ignored, header case and spaces, BOM, blank trailing line
    ("\ufeffSOP_Instance_UID , Patient, Label\n1.1,p1, disk \n\n", "single",
     {"1.1": {"disk"}}),
    ("sop_instance_uid,labels\n1.1,Effusion|Atelectasis\n1.2,No Finding\n1.3,Mass; Effusion;\n",
     "multi", {"1.1": {"Atelectasis", "Effusion"}, "1.2": {"No Finding"},
               "1.3": {"Effusion", "Mass"}}),
    ("sop_instance_uid,irma\n1.1,1121-127-700-500\n1.2,1121-120-200-700\n1.3,1121-127-700-500\n",
     "irma", {"1.1": {"1121-127-700-500"}, "1.2": {"1121-120-200-700"},
              "1.3": {"1121-127-700-500"}}),
])
def test_read_labels(tmp_path, text, kind, expected):
    labels = read_labels(_write(tmp_path, text))
    assert labels.kind == kind
    assert labels.uids == tuple(expected)
    assert labels.names == tuple(sorted(set().union(*expected.values())))
    got = {uid: {labels.names[c] for c in np.flatnonzero(row)}
           for uid, row in zip(labels.uids, labels.indicator)}
    assert got == expected
    if kind == "irma":
        assert labels.irma_codes == tuple(next(iter(v)) for v in expected.values())


@pytest.mark.parametrize("text, match", [
    ("", "empty file"),
    ("sop_instance_uid,label\n", "no labelled instances"),
    ("uid,label\n1.1,a\n", "no sop_instance_uid column"),
    ("sop_instance_uid,class\n1.1,a\n", "exactly one label column .* found none"),
    ("sop_instance_uid,label,irma\n1.1,a,1121-127-700-500\n", "found label, irma"),
    ("sop_instance_uid,label\n1.1,a\n1.2,b\n1.1,a\n", r"1 UID\(s\) listed twice.*rows 2 and 4"),
    ("sop_instance_uid,label\n1.1,\n", "row 2: empty label"),
    ("sop_instance_uid,labels\n1.1,|;\n", "row 2: empty labels"),
    ("sop_instance_uid,label\n,a\n", "row 2: empty sop_instance_uid"),
    ("sop_instance_uid,irma\n1.1,1121-127-700\n", "row 2: '1121-127-700' is not an IRMA code"),
    ("sop_instance_uid,patient,label\n1.1,p1\n", "row 2: 2 fields"),
])
def test_read_labels_rejects(tmp_path, text, match):
    with pytest.raises(LabelError, match=match):
        read_labels(_write(tmp_path, text))


def test_read_labels_missing_file(tmp_path):
    with pytest.raises(LabelError, match="cannot read labels"):
        read_labels(tmp_path / "nope.csv")


# --------------------------------------------------------------------------- split

def test_stratified_split_holds_out_each_label_and_is_seeded():
    strata = ["a"] * 10 + ["b"] * 5 + ["c"] * 2 + ["lonely"]
    index, queries = stratified_split(strata, 0.2, seed=3)
    assert sorted(np.concatenate([index, queries]).tolist()) == list(range(len(strata)))
    held_out = [strata[row] for row in queries]
    # round(0.2 n) per label, never a whole label, never a label of one image
    assert {label: held_out.count(label) for label in set(held_out)} == {"a": 2, "b": 1}
    again_index, again_queries = stratified_split(strata, 0.2, seed=3)
    assert np.array_equal(queries, again_queries) and np.array_equal(index, again_index)
    assert any(not np.array_equal(queries, stratified_split(strata, 0.2, seed=s)[1])
               for s in range(4, 8))


@pytest.mark.parametrize("strata, fraction, match", [
    (["a", "b", "c"], 0.2, "too few"),
    (["a", "a"], 0.0, r"query_fraction must lie in \(0, 1\)"),
    (["a", "a"], 1.0, r"query_fraction must lie in \(0, 1\)"),
])
def test_stratified_split_rejects(strata, fraction, match):
    with pytest.raises(ValueError, match=match):
        stratified_split(strata, fraction)


# --------------------------------------------------------------------------- planted features

def _planted(n_per_label: int, *, seed: int = 0, channels: int = 64,
             irma: bool = False) -> tuple[StoredFeatures, LabelSet]:
    """Three groups of post-ReLU-like 2 x 2 maps around three random prototypes, plus one
    labelled UID without features."""
    rng = np.random.default_rng(seed)
    prototypes = rng.random((3, channels, 2, 2)).astype(np.float32)
    group = np.repeat(np.arange(3), n_per_label)
    maps = (prototypes[group] + 0.3 * rng.random((group.size, channels, 2, 2))).astype(np.float16)
    uids = tuple(f"1.2.826.0.1.{i}" for i in range(group.size))
    stored = StoredFeatures(uids=uids, pooled=maps.astype(np.float32).mean(axis=(2, 3)),
                            maps=maps, model_version="planted")
    group = np.append(group, 0)
    indicator = np.eye(3, dtype=bool)[group]
    names = IRMA_CODES if irma else ("a", "b", "c")
    labels = LabelSet(uids=uids + ("1.2.826.0.1.999",), names=names, indicator=indicator,
                      kind="irma" if irma else "single",
                      irma_codes=tuple(IRMA_CODES[g] for g in group) if irma else None)
    return stored, labels


def test_evaluate_stored_gives_every_method_and_cutoff(tmp_path):
    stored, labels = _planted(12, irma=True)
    result = evaluate_stored(stored, labels, config=SMALL, cutoffs=(5, 10, 20, 40), seed=0)

    assert [m.method for m in result.methods] == list(DEFAULT_METHODS)
    assert (result.n_labelled, result.n_with_features, result.n_without_features) == (37, 36, 1)
    assert (result.n_index, result.n_queries) == (30, 6)      # round(0.2 * 12) = 2 per label
    assert result.cutoffs == (5, 10, 20) and result.dropped_cutoffs == (40,)
    assert result.chance_precision == pytest.approx(10 / 30)
    for method in result.methods:
        for n in result.cutoffs:
            assert {f"P@{n}", f"R@{n}", f"F1@{n}", f"mAP@{n}", f"IRMA@{n}"} <= method.metrics.keys()
        assert {"nDCG@5", "nDCG@10", "purity", "IRMA@1"} <= method.metrics.keys()
        assert set(method.timings) == {"fit_s", "code_ms_per_query", "rank_ms_per_query"}
        # three well separated groups of 10 index images: the first 10 results are the group
        assert method.metrics["P@10"] == 1.0 and method.metrics["purity"] == 1.0
        assert method.metrics["IRMA@1"] == 0.0 < method.metrics["IRMA@20"]
    one_layer = result.method("one-layer")
    assert one_layer.details["use_layer2"] is False and one_layer.details["reiterate"] is False
    assert one_layer.details["passes"] == 1
    assert one_layer.details["code_dim"] == SMALL.n_clusters * SMALL.layer1_atoms
    assert result.method("full").details["code_dim"] == SMALL.layer2_atoms
    assert result.method("average-pooling").details["pooling"] == "average"

    table = format_table(result, 20)
    assert "N = 20" in table and "IRMA error" in table
    for method in METHODS.values():
        assert method.title in table
    assert "Cut-offs [40] exceed the index" in table


def test_format_table_falls_back_to_an_evaluated_cutoff():
    stored, labels = _planted(6)
    result = evaluate_stored(stored, labels, config=SMALL, methods=("features",),
                             cutoffs=(5, 10, 20))
    assert result.n_index == 15 and result.cutoffs == (5, 10)
    assert "N = 10 (20 is more than the 15 index images)" in format_table(result, 20)


def test_evaluate_stored_rejects_unknown_methods_and_too_few_images():
    stored, labels = _planted(4)
    with pytest.raises(ValueError, match="unknown method"):
        evaluate_stored(stored, labels, config=SMALL, methods=("features", "best"))
    with pytest.raises(ValueError, match="fewer than the 20 clusters"):
        evaluate_stored(stored, labels, config=PipelineConfig(n_clusters=20))


# --------------------------------------------------------------------------- end to end

def _evaluate_command(argv: list[str]) -> int:
    """Run ``evaluate`` through a parser built like service.cli's (common options first)."""
    parser = argparse.ArgumentParser(prog="pacs-annotate")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config")
    common.add_argument("--data-dir")
    common.add_argument("--storage-dir")
    common.add_argument("--log-format", choices=["json", "text"])
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_evaluate_parser(subparsers, common)
    args = parser.parse_args(argv)
    return args.func(args)


def test_evaluate_stored_images_end_to_end(engine, settings, tmp_path, weights,  # noqa: F811
                                           monkeypatch, capsys):
    from pipelines.backbone import load_backbone
    from service import features
    from service.image_worker import ImageWorker, enqueue_missing

    from .dicom_client import ingest_datasets

    datasets, kind_of = _images(["disk", "stripes", "noise"] * 10, seed=2)
    ingest_datasets(engine, settings.storage_path, datasets)
    while features.process_queue_batch(engine, "test"):
        pass
    enqueue_missing(engine)
    with ImageWorker(engine, load_backbone(weights), storage_root=settings.storage_path,
                     feature_store=settings.feature_store_path, name="test", image_size=SIZE,
                     decode_workers=1, batch=32) as worker:
        while worker.run_once():
            pass
    not_stored = ["1.2.826.0.1.3680043.99.1", "1.2.826.0.1.3680043.99.2"]
    labels_csv = tmp_path / "labels.csv"
    with labels_csv.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sop_instance_uid", "label"])
        writer.writerows([*kind_of.items(), *((uid, "disk") for uid in not_stored)])
    labels = read_labels(labels_csv)

    result = evaluate(engine, settings.feature_store_path, labels, config=SMALL,
                      methods=("features", "full"), cutoffs=(5, 10, 15, 20))
    assert (result.n_with_features, result.n_without_features) == (30, 2)
    assert set(result.missing_examples) == set(not_stored)
    assert (result.n_index, result.n_queries) == (24, 6)
    # chance from the label shares: 8 of the 24 index images share a query's pattern
    assert result.chance_precision == pytest.approx(8 / 24)
    for name in ("features", "full"):
        assert result.method(name).metrics["P@5"] >= result.chance_precision + 0.4, name

    paths = write_result(result, tmp_path / "out")
    with paths[0].open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["method"], int(r["N"])) for r in rows] == [
        (m, n) for m in ("features", "full") for n in (5, 10, 15, 20)]
    assert float(rows[0]["precision"]) == pytest.approx(
        result.method("features").metrics["P@5"], abs=1e-6)
    saved = json.loads(paths[1].read_text())
    assert saved["n_queries"] == 6 and saved["config"]["n_clusters"] == SMALL.n_clusters
    assert saved["methods"][1]["timings"]["fit_s"] > 0
    assert saved["timings"]["load_s"] >= 0

    # the command: same evaluation, printed and saved
    monkeypatch.setenv("DATABASE_URL", settings.database_url)
    monkeypatch.setenv("PACS_IMAGE_DEVICE", "cpu")
    out_dir = tmp_path / "cli"
    code = _evaluate_command([
        "evaluate", "--data-dir", str(settings.data_dir), "--labels", str(labels_csv),
        "--out", str(out_dir), "--methods", "features,one-layer", "--clusters", "3",
        "--layer1-atoms", "8", "--layer2-atoms", "12", "--sparsity", "3",
        "--max-iterations", "2", "--ksvd-iterations", "2", "--patches-per-cluster", "200",
        "--cutoffs", "5,10,20", "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "DDicCIR Table 1 layout, N = 20" in captured.out
    assert "DenseNet121 features (cosine)" in captured.out
    assert "DenseNet121 + one dictionary layer" in captured.out
    assert "30 with features (2 without)" in captured.out
    assert {p.name for p in out_dir.iterdir()} == {"evaluation.csv", "evaluation.json",
                                                   "table.md"}


def test_cli_evaluate_exits_2_without_features_or_with_bad_labels(engine, settings, tmp_path,
                                                                   monkeypatch, capsys):
    monkeypatch.setenv("DATABASE_URL", settings.database_url)
    labels = _write(tmp_path, "sop_instance_uid,label\n1.2.3,a\n1.2.4,b\n")
    assert _evaluate_command(["evaluate", "--data-dir", str(settings.data_dir),
                              "--labels", str(labels), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "none of the 2 labelled instances has image features" in err
    assert "worker --stage image" in err

    bad = _write(tmp_path, "sop_instance_uid,label\n1.2.3,a\n1.2.3,b\n", "bad.csv")
    assert _evaluate_command(["evaluate", "--data-dir", str(settings.data_dir),
                              "--labels", str(bad)]) == 2
    assert "listed twice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _evaluate_command(["evaluate", "--labels", str(labels), "--methods", "features,best"])
    assert "unknown method(s) best" in capsys.readouterr().err


def test_no_labelled_features_is_a_value_error(engine, tmp_path):
    stored_labels = LabelSet(uids=("9.9",), names=("a",), indicator=np.ones((1, 1), bool),
                             kind="single")
    with pytest.raises(NoLabelledFeatures, match="none of the 1 labelled instances"):
        evaluate(engine, tmp_path, stored_labels, config=SMALL)


def test_main_registers_evaluate(engine, settings, monkeypatch, tmp_path, capsys):
    from service.cli import main

    monkeypatch.setenv("DATABASE_URL", settings.database_url)
    labels = tmp_path / "labels.csv"
    labels.write_text("sop_instance_uid,label\n1.2.3,a\n1.2.4,b\n")
    assert main(["evaluate", "--labels", str(labels), "--out", str(tmp_path / "out")]) == 2
    assert "feature" in capsys.readouterr().err
