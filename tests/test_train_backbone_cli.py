"""train-backbone from the database: the active tag clustering run's labels (small clusters
merged, never dropped), patients or studies as split groups, a checkpoint the image worker
loads, and a clear refusal when the held-out set would be too small."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.backbone import load_backbone
from service.tags import tag_clusters
from service.images.backbone_data import build_training_set
from service.cli import main

from .test_tag_clusters import _add, _labels, _options


@pytest.fixture
def clustered(engine, tmp_path, database_url):
    group_of = _add(engine, tmp_path, {"ct_chest": [8], "ct_head": [8], "cr_knee": [3, 3]})
    tag_clusters.recluster(engine, database_url, _options(candidates=(3,)))
    return engine, group_of, tmp_path / "storage"


def test_training_set_merges_small_clusters_and_keeps_every_image(clustered):
    engine, group_of, storage = clustered
    labels = _labels(engine)
    cluster_of_group = {group_of[uid]: label for uid, label in labels.items()}
    knee = cluster_of_group["cr_knee"]
    assert len(set(cluster_of_group.values())) == 3

    training = build_training_set(engine, storage, min_per_class=7, size=64, decode_workers=1)

    assert len(training.labels) == len(group_of) == 22  # nothing dropped
    assert training.cluster_sizes == {cluster_of_group["ct_chest"]: 8,
                                      cluster_of_group["ct_head"]: 8, knee: 6}
    assert set(training.merged_classes) == {knee} and knee not in training.classes
    assert training.merged_classes[knee] in training.classes and len(training.classes) == 2
    sizes = sorted(np.bincount(training.labels).tolist())
    assert sizes == [8, 14]
    image, label = training.dataset[0]
    assert tuple(image.shape) == (3, 64, 64) and label == training.labels[0]
    assert training.tag_cluster_run == 1 and training.undecodable == 0
    # every series is its own study; every test image belongs to patient PAT1
    assert len(set(training.groups)) == 1
    by_study = build_training_set(engine, storage, min_per_class=7, size=64, decode_workers=1,
                                  group_by="study")
    assert len(set(by_study.groups)) == 4


def test_cli_refuses_a_held_out_set_too_small_to_mean_anything(clustered, settings,
                                                               monkeypatch, tmp_path, capsys):
    _, _, storage = clustered
    monkeypatch.setenv("DATABASE_URL", settings.database_url)
    monkeypatch.setenv("PACS_STORAGE_DIR", str(storage))
    monkeypatch.setenv("PACS_IMAGE_DECODE_WORKERS", "1")
    code = main(["train-backbone", "--out", str(tmp_path / "backbone"), "--epochs", "1",
                 "--size", "64", "--min-per-class", "3", "--batch-size", "8"])
    captured = capsys.readouterr()
    assert code == 2
    error = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "held-out set would have 0 images" in error[0]
    assert "Traceback" not in captured.err
    assert not (tmp_path / "backbone" / "best.pt").exists()


@pytest.fixture
def studies(engine, tmp_path, database_url):
    group_of = _add(engine, tmp_path, {"ct_chest": [2] * 5, "ct_head": [2] * 5,
                                       "cr_knee": [1, 1]})
    tag_clusters.recluster(engine, database_url, _options(candidates=(2, 3)))
    return engine, group_of, tmp_path / "storage"


def test_cli_train_backbone_writes_a_checkpoint_the_worker_loads(studies, settings,
                                                                 monkeypatch, tmp_path, capsys):
    engine, group_of, storage = studies
    monkeypatch.setenv("DATABASE_URL", settings.database_url)
    monkeypatch.setenv("PACS_STORAGE_DIR", str(storage))
    monkeypatch.setenv("PACS_IMAGE_DECODE_WORKERS", "1")
    out = tmp_path / "backbone"
    assert main(["train-backbone", "--out", str(out), "--epochs", "1", "--size", "64",
                 "--min-per-class", "3", "--batch-size", "8", "--group-by", "study",
                 "--min-val-images", "3"]) == 0
    captured = capsys.readouterr()
    assert "balanced accuracy" in captured.out and "held out)" in captured.out
    assert "epoch 1 batch 1/" in captured.err and "epoch 1:" in captured.err
    backbone = load_backbone(out / "best.pt")
    metadata = backbone.metadata
    assert metadata["tag_cluster_run"] == 1 and metadata["group_by"] == "study"
    assert metadata["input_size"] == [64, 64]
    assert metadata["split"] == "by group (study or patient)"
    n_clusters = len(set(_labels(engine).values()))
    assert len(metadata["classes"]) + len(metadata["merged_classes"]) == n_clusters
    assert metadata["n_train"] + metadata["n_val"] == len(group_of)
