"""``evaluate``: labels CSV parsing, the group-disjoint k folds, exclusion of the query's own
study or patient, per-method saving and resume, the Table 1 evaluation on planted features,
and end to end on stored images through the CLI."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from pipelines.ddiccir import PipelineConfig
from service.cli.images import add_evaluate_parser
from service.images.evaluation import (METHODS, LabelError, LabelSet,
                                       NoLabelledFeatures, StoredFeatures,
                                       evaluate, evaluate_stored, excluded_pairs, format_table,
                                       group_folds, load_stored_features, read_labels,
                                       write_result)

from .test_image_annotation import SMALL, _images
from .test_image_worker import SIZE, weights  # noqa: F401  (fixture)

IRMA_CODES = ("1121-127-700-500", "1121-120-200-700", "1123-127-500-000")
# every method is fitted once per fold: a lighter fit than SMALL keeps the tests short
TINY = dataclasses.replace(SMALL, max_outer_iter=2, ksvd_max_iter=2, patches_per_cluster=100)


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


# --------------------------------------------------------------------------- folds

def test_group_folds_never_split_a_group_and_cover_every_image_once():
    rng = np.random.default_rng(0)
    groups = [f"study{g}" for g in rng.integers(0, 40, 200)]
    strata = [("a", "b", "c")[hash(g) % 3] for g in groups]
    folds = group_folds(strata, groups, 5, seed=1)
    assert len(folds) == 5
    queries = np.concatenate([q for _, q in folds])
    assert sorted(queries.tolist()) == list(range(200))         # each image a query once
    for index, query in folds:
        assert np.intersect1d(index, query).size == 0
        assert np.union1d(index, query).size == 200
        # no study is query and index at once
        assert not {groups[i] for i in index} & {groups[i] for i in query}
    again = group_folds(strata, groups, 5, seed=1)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, again))
    assert any(not np.array_equal(a[1], b[1])
               for a, b in zip(folds, group_folds(strata, groups, 5, seed=2)))


def test_group_folds_keep_label_shares():
    strata = ["a"] * 100 + ["b"] * 50
    folds = group_folds(strata, [str(i) for i in range(150)], 5, seed=0)
    for _, query in folds:
        held_out = [strata[i] for i in query]
        assert (held_out.count("a"), held_out.count("b")) == (20, 10)


@pytest.mark.parametrize("strata, groups, folds, match", [
    (["a"] * 6, ["g1", "g1", "g2", "g2", "g3", "g3"], 5, "3 groups: too few groups for 5"),
    (["a"] * 4, ["1", "2", "3", "4"], 1, "folds must be >= 2"),
    (["a"] * 4, ["1", "2", "3"], 2, "4 strata but 3 groups"),
])
def test_group_folds_reject(strata, groups, folds, match):
    with pytest.raises(ValueError, match=match):
        group_folds(strata, groups, folds)


def test_excluded_pairs_are_index_images_sharing_the_querys_key():
    query_rows, index_rows = excluded_pairs(["s1", "s2", "s9"], ["s2", "s1", "s2", "s3"])
    assert list(zip(query_rows.tolist(), index_rows.tolist())) == [(0, 1), (1, 0), (1, 2)]


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
    # two images per study, two studies per patient (of one group), one series per image
    stored = StoredFeatures(uids=uids, pooled=maps.astype(np.float32).mean(axis=(2, 3)),
                            maps=maps, model_version="planted",
                            studies=tuple(f"study{i // 2}" for i in range(group.size)),
                            patients=tuple(f"patient{i // 4}" for i in range(group.size)),
                            series=uids)
    group = np.append(group, 0)
    indicator = np.eye(3, dtype=bool)[group]
    names = IRMA_CODES if irma else ("a", "b", "c")
    labels = LabelSet(uids=uids + ("1.2.826.0.1.999",), names=names, indicator=indicator,
                      kind="irma" if irma else "single",
                      irma_codes=tuple(IRMA_CODES[g] for g in group) if irma else None)
    return stored, labels


def test_evaluate_stored_gives_every_method_and_cutoff(tmp_path):
    stored, labels = _planted(12, irma=True)
    result = evaluate_stored(stored, labels, config=TINY, methods=tuple(METHODS), folds=3,
                             cutoffs=(5, 10, 20, 40), seed=0)

    assert [m.method for m in result.methods] == list(METHODS)
    assert (result.n_labelled, result.n_with_features, result.n_without_features) == (37, 36, 1)
    # 18 studies of two images in 3 folds: 12 queries, 24 index images per fold
    assert (result.folds, result.group_by, result.n_groups) == (3, "study", 18)
    assert (result.n_index, result.n_queries, result.n_queries_without_relevant) == (24, 36, 0)
    assert result.cutoffs == (5, 10, 20) and result.dropped_cutoffs == (40,)
    assert result.chance_precision == pytest.approx(8 / 24)    # stratified: 8 of each label
    for method in result.methods:
        for n in result.cutoffs:
            assert {f"P@{n}", f"R@{n}", f"F1@{n}", f"mAP@{n}", f"IRMA@{n}"} <= method.metrics.keys()
        assert {"nDCG@5", "nDCG@10", "purity", "IRMA@1"} <= method.metrics.keys()
        assert set(method.metrics_std) == set(method.metrics)
        assert len(method.fold_metrics) == 3
        assert method.metrics["P@5"] == pytest.approx(
            np.mean([fold["P@5"] for fold in method.fold_metrics]))
        assert method.metrics_std["P@20"] == pytest.approx(
            np.std([fold["P@20"] for fold in method.fold_metrics], ddof=1))
        assert set(method.timings) == {"fit_s", "code_ms_per_query", "rank_ms_per_query",
                                       "total_s"}
        # three well separated groups of 8 index images: the first 8 results are the group
        assert method.metrics["P@5"] == 1.0 and method.metrics["purity"] == 1.0
        assert method.metrics["IRMA@1"] == 0.0 < method.metrics["IRMA@20"]
    one_layer = result.method("one-layer")
    assert one_layer.details["use_layer2"] is False and one_layer.details["reiterate"] is False
    assert one_layer.details["passes"] == [1, 1, 1]
    assert one_layer.details["code_dim"] == TINY.n_clusters * TINY.layer1_atoms
    assert result.method("full").details["code_dim"] == TINY.layer2_atoms
    assert result.method("average-pooling").details["pooling"] == "average"

    table = format_table(result, 20)
    assert table.splitlines()[0] == ("Retrieval evaluation, DDicCIR Table 1 layout, N = 20; "
                                     "3 folds, disjoint by StudyInstanceUID; mean ± std over "
                                     "folds")
    assert "IRMA error" in table and "1.000 ± 0.000" in table
    for method in METHODS.values():
        assert method.title in table
    assert "Cut-offs [40] exceed a query's candidates" in table


def test_format_table_falls_back_to_an_evaluated_cutoff():
    stored, labels = _planted(6)
    result = evaluate_stored(stored, labels, config=SMALL, methods=("features",), folds=2,
                             cutoffs=(5, 10, 20))
    assert result.n_index == 9 and result.cutoffs == (5,)
    assert "N = 5 (20 is more than a query's candidates)" in format_table(result, 20)


def test_evaluate_stored_rejects_unknown_methods_rules_and_too_few_images():
    stored, labels = _planted(4)
    with pytest.raises(ValueError, match="unknown method"):
        evaluate_stored(stored, labels, config=SMALL, methods=("features", "best"))
    with pytest.raises(ValueError, match="fewer than the 20 clusters"):
        evaluate_stored(stored, labels, config=PipelineConfig(n_clusters=20))
    with pytest.raises(ValueError, match="exclude must be one of"):
        evaluate_stored(stored, labels, config=SMALL, exclude="same-site")
    with pytest.raises(ValueError, match="no group column"):
        evaluate_stored(stored, labels, config=SMALL, group_by="column")
    with pytest.raises(ValueError, match="too few groups for 5 folds"):
        evaluate_stored(stored, labels, config=SMALL, group_by="patient")  # 3 patients


def test_near_duplicates_of_one_study_are_never_query_and_index():
    """Two copies of every image, in one study: a plain image split lets each query find its
    own copy first (the near-duplicate effect); group folds by study cannot."""
    rng = np.random.default_rng(0)
    n = 30
    maps = rng.random((n, 16, 2, 2)).astype(np.float16)        # noise: no label signal
    maps = np.repeat(maps, 2, axis=0)                           # each image twice
    uids = tuple(f"1.2.3.{i}" for i in range(2 * n))
    studies = tuple(f"study{i // 2}" for i in range(2 * n))
    stored = StoredFeatures(uids=uids, pooled=maps.astype(np.float32).mean(axis=(2, 3)),
                            maps=maps, model_version="planted", studies=studies,
                            patients=studies, series=uids)
    classes = np.repeat(rng.integers(0, 3, n), 2)
    labels = LabelSet(uids=uids, names=("a", "b", "c"), indicator=np.eye(3, dtype=bool)[classes],
                      kind="single")
    by_series = evaluate_stored(stored, labels, config=SMALL, methods=("features",),
                                group_by="series", cutoffs=(1, 5))
    by_study = evaluate_stored(stored, labels, config=SMALL, methods=("features",),
                               group_by="study", cutoffs=(1, 5))
    # split by series (one image each) the copy sits in the index (unless both copies fell in
    # the query fold) and is then the first hit
    assert by_series.method("features").metrics["P@1"] >= 0.75
    # by study the copy is never a candidate: P@1 is near chance (1/3)
    assert by_study.method("features").metrics["P@1"] < 0.6
    # excluding the query's own study gives the same protection within a series split
    excluded = evaluate_stored(stored, labels, config=SMALL, methods=("features",),
                               group_by="series", exclude="same-study", cutoffs=(1, 5))
    assert excluded.method("features").metrics["P@1"] < 0.6
    assert "hits from the query's own study left out" in format_table(excluded, 5)


def test_group_column_of_the_labels_csv_is_the_default_group(tmp_path):
    stored, labels = _planted(12)
    # the group column puts each label in 4 groups of 3 images (12 groups in all)
    groups = tuple(f"case{i // 3}" for i in range(len(stored.uids))) + ("case-x",)
    labels = dataclasses.replace(labels, groups=groups)
    result = evaluate_stored(stored, labels, config=SMALL, methods=("features",), folds=4)
    assert (result.group_by, result.n_groups) == ("column", 12)
    assert "4 folds, disjoint by the labels CSV's group column" in format_table(result)


def test_each_method_is_saved_when_done_and_a_rerun_skips_it(tmp_path, monkeypatch):
    from service.images import evaluation

    stored, labels = _planted(8)
    out = tmp_path / "run"
    fits = []
    real_rank_by_model = evaluation._rank_by_model

    def counted(*args, **kwargs):
        fits.append(args[4].use_layer2)
        if len(fits) == 3:  # the third method's first fold: the run is interrupted
            raise KeyboardInterrupt
        return real_rank_by_model(*args, **kwargs)

    monkeypatch.setattr(evaluation, "_rank_by_model", counted)
    methods = ("features", "one-layer", "full")
    with pytest.raises(KeyboardInterrupt):
        evaluate_stored(stored, labels, config=TINY, methods=methods, folds=2, out_dir=out)
    # features and one-layer finished before the interruption and are on disk
    assert {p.name for p in (out / "methods").iterdir()} == {"features.json", "one-layer.json"}
    assert "DenseNet121 + one dictionary layer" in (out / "table.md").read_text()
    saved = json.loads((out / "evaluation.json").read_text())
    assert [m["method"] for m in saved["methods"]] == ["features", "one-layer"]

    fits.clear()
    result = evaluate_stored(stored, labels, config=TINY, methods=methods, folds=2,
                             out_dir=out)
    assert result.resumed == ("features", "one-layer")
    assert fits == [True, True]                                   # only full was fitted
    assert [m.method for m in result.methods] == list(methods)
    assert result.method("one-layer").metrics == \
        json.loads((out / "methods" / "one-layer.json").read_text())["result"]["metrics"]
    assert "Taken from an earlier run with the same configuration: features, one-layer" in \
        format_table(result)

    # another configuration (the seed of the folds) runs everything again
    fits.clear()
    result = evaluate_stored(stored, labels, config=TINY, methods=("features", "one-layer"),
                             folds=2, seed=1, out_dir=out)
    assert result.resumed == () and fits == [False, False]


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
    from service.tags import features
    from service.images.image_worker import ImageWorker, enqueue_missing

    from .dicom_client import ingest_datasets

    datasets, kind_of = _images(["disk", "stripes", "noise"] * 10, seed=2)
    # two images per study (15 studies), two studies per patient
    study_of, patient_of = {}, {}
    for number, ds in enumerate(datasets):
        ds.StudyInstanceUID = f"1.2.826.0.1.3680043.98.{number // 2}"
        ds.PatientID = f"PAT{number // 4}"
        study_of[ds.SOPInstanceUID] = ds.StudyInstanceUID
        patient_of[ds.SOPInstanceUID] = ds.PatientID
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

    stored = load_stored_features(engine, settings.feature_store_path, labels.uids,
                                  with_maps=False)
    # the split groups and exclusion keys come from the database
    assert [study_of[uid] for uid in stored.uids] == list(stored.studies)
    patient_rows = {}
    for uid, patient in zip(stored.uids, stored.patients):
        patient_rows.setdefault(patient, set()).add(patient_of[uid])
    assert all(len(ids) == 1 for ids in patient_rows.values()) and len(patient_rows) == 8

    result = evaluate(engine, settings.feature_store_path, labels, config=TINY,
                      methods=("features", "full"), folds=3, exclude="same-patient",
                      cutoffs=(5, 10, 15, 20))
    assert (result.n_with_features, result.n_without_features) == (30, 2)
    assert set(result.missing_examples) == set(not_stored)
    assert (result.group_by, result.n_groups, result.folds) == ("study", 15, 3)
    assert (result.n_index, result.n_queries) == (20, 30)   # 5 studies of 2 per fold
    assert 0.25 < result.chance_precision < 0.42             # about a third
    for name in ("features", "full"):
        assert result.method(name).metrics["P@5"] >= result.chance_precision + 0.4, name

    paths = write_result(result, tmp_path / "out")
    with paths[0].open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["method"], int(r["N"])) for r in rows] == [
        (m, n) for m in ("features", "full") for n in (5, 10, 15)]   # 20 > candidates
    assert rows[0]["split"] == ("3 folds, disjoint by StudyInstanceUID; hits from the "
                                "query's own patient left out")
    assert float(rows[0]["precision"]) == pytest.approx(
        result.method("features").metrics["P@5"], abs=1e-6)
    saved = json.loads(paths[1].read_text())
    assert saved["n_queries"] == 30 and saved["config"]["n_clusters"] == SMALL.n_clusters
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
        "--cutoffs", "5,10,20", "--folds", "3", "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert ("DDicCIR Table 1 layout, N = 20; 3 folds, disjoint by StudyInstanceUID; hits "
            "from the query's own study left out; mean ± std over folds") in captured.out
    assert "DenseNet121 features (cosine)" in captured.out
    assert "DenseNet121 + one dictionary layer" in captured.out
    assert "30 with features (2 without)" in captured.out
    assert {p.name for p in out_dir.iterdir()} == {"evaluation.csv", "evaluation.json",
                                                   "table.md", "methods"}
    assert {p.name for p in (out_dir / "methods").iterdir()} == {"features.json",
                                                                 "one-layer.json"}


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
