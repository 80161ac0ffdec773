"""train-backbone from the database: the active tag clustering run's labels, the stored
images, a checkpoint the image worker loads."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.backbone import load_backbone
from service import tag_clusters
from service.backbone_data import build_training_set
from service.cli import main

from .test_tag_clusters import _add, _labels, _options


@pytest.fixture
def clustered(engine, tmp_path, database_url):
    group_of = _add(engine, tmp_path, {"ct_chest": [8], "ct_head": [8], "cr_knee": [3, 3]})
    tag_clusters.recluster(engine, database_url, _options(candidates=(2, 3)))
    return engine, group_of, tmp_path / "storage"


def test_training_set_has_the_active_runs_labels(clustered):
    engine, group_of, storage = clustered
    labels = _labels(engine)
    knee = {labels[uid] for uid, group in group_of.items() if group == "cr_knee"}.pop()

    training = build_training_set(engine, storage, min_per_class=7, size=64, decode_workers=1)

    assert training.dropped_classes == {knee: 6}  # below min_per_class
    assert knee not in training.classes and len(training.classes) == 2
    assert np.bincount(training.labels).tolist() == [8, 8]
    image, label = training.dataset[0]
    assert tuple(image.shape) == (3, 64, 64) and label == training.labels[0]
    assert training.tag_cluster_run == 1 and training.undecodable == 0


def test_cli_train_backbone_writes_a_checkpoint_the_worker_loads(clustered, settings,
                                                                 monkeypatch, tmp_path, capsys):
    engine, group_of, storage = clustered
    monkeypatch.setenv("DATABASE_URL", settings.database_url)
    monkeypatch.setenv("PACS_STORAGE_DIR", str(storage))
    monkeypatch.setenv("PACS_IMAGE_DECODE_WORKERS", "1")
    out = tmp_path / "backbone"
    assert main(["train-backbone", "--out", str(out), "--epochs", "1", "--size", "64",
                 "--min-per-class", "3", "--batch-size", "8"]) == 0
    captured = capsys.readouterr()
    assert "best held-out accuracy" in captured.out and "epoch 1" in captured.err
    backbone = load_backbone(out / "best.pt")
    assert backbone.metadata["tag_cluster_run"] == 1
    assert len(backbone.metadata["classes"]) == 3
