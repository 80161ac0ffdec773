"""The image worker end to end on a real PostgreSQL: stored DICOM files in, DenseNet121
features in SQL (pgvector) and maps in the feature store out; non-images skipped with a
reason, a poison image failed after its tries, a killed worker loses nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import sqlalchemy as sa
import torch
from pydicom.data import get_testdata_file

from pipelines.backbone import build_densenet121, extract_features, load_backbone
from pipelines.pixels import file_to_image
from service.database import work_queue
from service.images.feature_store import read_map
from service.images.image_worker import (
    NEEDS_DECODER,
    STAGE,
    ImageWorker,
    enqueue_missing,
    requeue_missing_decoders,
)

from .dicom_client import ingest_datasets, make_ct

SIZE = 64  # small inputs keep DenseNet121 fast on 2 CPU cores (2 x 2 maps instead of 7 x 7)
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "densenet121-site.pth"
    torch.save(build_densenet121().state_dict(), path)
    return path


def _report() -> object:
    ds = make_ct()
    del ds.PixelData
    ds.SOPClassUID = BASIC_TEXT_SR
    ds.file_meta.MediaStorageSOPClassUID = BASIC_TEXT_SR
    ds.Modality = "SR"
    return ds


def _poison() -> object:
    ds = make_ct()
    ds.PixelData = ds.PixelData[:1000]  # 128 x 128 x 2 bytes expected
    return ds


@pytest.fixture
def archive(engine, tmp_path):
    images = [make_ct() for _ in range(5)]
    for number, ds in enumerate(images):
        ds.WindowCenter, ds.WindowWidth = str(40 + 30 * number), "400"
    report, poison = _report(), _poison()
    storage = tmp_path / "storage"
    ingest_datasets(engine, storage, [*images, report, poison])
    assert enqueue_missing(engine) == 7
    assert enqueue_missing(engine) == 0
    return storage, images, report, poison


def _worker(engine, weights, tmp_path, storage, **kw) -> ImageWorker:
    backbone = load_backbone(weights, device="cpu")
    return ImageWorker(engine, backbone, storage_root=storage,
                       feature_store=tmp_path / "features", name="test", image_size=SIZE,
                       decode_workers=1, retry_backoff=0.0, **kw)


def _rows(engine) -> dict[str, sa.Row]:
    with engine.connect() as conn:
        return {row.sop_instance_uid: row for row in conn.execute(sa.text(
            "SELECT sop_instance_uid, status, skip_reason, model_version, map_shard, map_index, "
            "feature::text AS feature FROM image_features"))}


def test_features_reach_sql_and_the_feature_store(engine, tmp_path, archive, weights):
    storage, images, report, poison = archive
    with _worker(engine, weights, tmp_path, storage, batch=16, max_attempts=2) as worker:
        assert worker.run_once() == 7
        rows = _rows(engine)
        backbone = worker.backbone

    assert {uid for uid, r in rows.items() if r.status == "done"} == {
        ds.SOPInstanceUID for ds in images}
    skipped = rows[report.SOPInstanceUID]
    assert skipped.status == "skipped" and skipped.feature is None
    assert "SR" in skipped.skip_reason or "image" in skipped.skip_reason.lower()
    assert poison.SOPInstanceUID not in rows  # back in the queue, not a row

    # the stored vector and map equal the backbone's own output for that file
    with engine.connect() as conn:
        paths = dict(conn.execute(sa.text(
            "SELECT sop_instance_uid, file_path FROM instances")).all())
    for ds in images:
        row = rows[ds.SOPInstanceUID]
        image = torch.from_numpy(file_to_image(storage / paths[ds.SOPInstanceUID], size=SIZE))
        maps, pooled = extract_features(backbone, image[None])
        stored = np.array([float(v) for v in row.feature.strip("[]").split(",")])
        assert stored.shape == (1024,)
        np.testing.assert_allclose(stored, pooled[0].numpy(), rtol=1e-5, atol=1e-6)
        stored_map = read_map(tmp_path / "features", row.map_shard, row.map_index)
        assert stored_map.dtype == np.float16 and stored_map.shape == (1024, 2, 2)
        np.testing.assert_allclose(stored_map.astype(np.float32), maps[0].numpy(),
                                   rtol=2e-3, atol=2e-3)
        assert row.model_version == backbone.model_version
    # different windows gave different features: the vectors are not all the same
    vectors = {rows[ds.SOPInstanceUID].feature for ds in images}
    assert len(vectors) == len(images)

    # nearest neighbour straight from SQL with pgvector
    with engine.connect() as conn:
        nearest = conn.execute(sa.text(
            "SELECT sop_instance_uid FROM image_features WHERE status = 'done' "
            "ORDER BY feature <=> (SELECT feature FROM image_features WHERE "
            "sop_instance_uid = :uid) LIMIT 1"), {"uid": images[2].SOPInstanceUID}).scalar()
    assert nearest == images[2].SOPInstanceUID


def test_a_poison_image_fails_after_its_tries_and_never_blocks(engine, tmp_path, archive,
                                                               weights):
    storage, images, report, poison = archive
    with _worker(engine, weights, tmp_path, storage, batch=16, max_attempts=2) as worker:
        worker.run_once()
        worker.run_once()  # the poison image's second and last try
        assert worker.run_once() == 0
        assert worker.stats == {"done": 5, "skipped": 1, "retried": 1, "failed": 1}
    with engine.connect() as conn:
        queue = dict(conn.execute(sa.text(
            "SELECT status, count(*) FROM work_queue WHERE stage = 'image' GROUP BY 1")).all())
        error = conn.execute(sa.text(
            "SELECT last_error FROM work_queue WHERE stage = 'image' AND status = 'failed'"
        )).scalar()
    assert queue == {"done": 6, "failed": 1}
    assert error.startswith("cannot decode")


def _queue(engine) -> dict[str, int]:
    with engine.connect() as conn:
        return dict(conn.execute(sa.text(
            "SELECT status, count(*) FROM work_queue WHERE stage = 'image' GROUP BY 1")).all())


def test_an_image_without_a_decoder_fails_at_once_until_the_next_start(engine, tmp_path,
                                                                       weights):
    """12-bit JPEG without the optional GPL plugin: retrying cannot help, so the item fails
    on its first try (docs/images.md); a worker start gives it one more try."""
    from pipelines.pixels import MissingDecoder

    path = get_testdata_file("JPGExtended.dcm")
    with pytest.raises(MissingDecoder):
        file_to_image(path, size=SIZE)
    storage = tmp_path / "storage"
    ingest_datasets(engine, storage, [pydicom.dcmread(path)])
    assert enqueue_missing(engine) == 1
    with _worker(engine, weights, tmp_path, storage, max_attempts=3) as worker:
        assert worker.run_once() == 1
        assert worker.run_once() == 0
        assert worker.stats == {"done": 0, "skipped": 0, "retried": 0, "failed": 1}
    assert _queue(engine) == {"failed": 1}
    with engine.connect() as conn:
        error = conn.execute(sa.text(
            "SELECT last_error FROM work_queue WHERE stage = 'image'")).scalar()
    assert error.startswith(NEEDS_DECODER) and "pylibjpeg-libjpeg" in error
    assert requeue_missing_decoders(engine) == 1
    assert _queue(engine) == {"pending": 1}


def test_a_killed_worker_loses_nothing(engine, tmp_path, archive, weights, database_url):
    storage, images, report, poison = archive
    code = (
        "import sys, threading\n"
        "from service.database.engine import create_db_engine\n"
        "from service.images.image_worker import ImageWorker\n"
        "from pipelines.backbone import load_backbone\n"
        f"engine = create_db_engine({database_url!r})\n"
        f"worker = ImageWorker(engine, load_backbone({str(weights)!r}), "
        f"storage_root={str(storage)!r}, feature_store={str(tmp_path / 'features')!r}, "
        f"name='doomed', image_size={SIZE}, batch=16, decode_workers=1)\n"
        "worker.run(threading.Event())\n")
    doomed = subprocess.Popen([sys.executable, "-c", code], start_new_session=True,
                              cwd=Path(__file__).resolve().parents[1])
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with engine.connect() as conn:
                running = conn.execute(sa.text(
                    "SELECT count(*) FROM work_queue WHERE stage = 'image' "
                    "AND status = 'running' AND claimed_by = 'doomed'")).scalar()
            if running:
                break
            time.sleep(0.05)
        assert running == 7, "the worker never claimed its batch"
    finally:
        os.killpg(doomed.pid, signal.SIGKILL)
        doomed.wait()

    assert work_queue.release_stale(engine, STAGE, 0) == 7
    with _worker(engine, weights, tmp_path, storage, batch=16, max_attempts=1) as worker:
        while worker.run_once():
            pass
    rows = _rows(engine)
    assert len(rows) == 6 and sum(r.status == "done" for r in rows.values()) == 5
    with engine.connect() as conn:
        queue = dict(conn.execute(sa.text(
            "SELECT status, count(*) FROM work_queue WHERE stage = 'image' GROUP BY 1")).all())
    assert queue == {"done": 6, "failed": 1}


def test_cli_worker_stage_image(engine, tmp_path, archive, weights, settings, monkeypatch,
                                capsys):
    from service.cli import main

    storage, images, report, poison = archive
    monkeypatch.setenv("DATABASE_URL", settings.database_url)
    monkeypatch.setenv("PACS_STORAGE_DIR", str(storage))
    monkeypatch.setenv("PACS_FEATURE_STORE_DIR", str(tmp_path / "features"))
    monkeypatch.setenv("PACS_IMAGE_DECODE_WORKERS", "1")
    monkeypatch.setenv("PACS_IMAGE_MAX_ATTEMPTS", "2")

    assert main(["worker", "--stage", "image", "--drain"]) == 2
    err = capsys.readouterr().err
    assert "PACS_IMAGE_WEIGHTS" in err and "train-backbone" in err

    monkeypatch.setenv("PACS_IMAGE_WEIGHTS", str(weights))
    assert main(["worker", "--stage", "image", "--drain"]) == 0
    out = capsys.readouterr().out
    assert '"done": 5' in out
    # --drain waits for the poison image's retry (5 s backoff) instead of exiting before it
    assert '"retried": 1' in out and '"failed": 1' in out
    assert _queue(engine) == {"done": 6, "failed": 1}
    rows = _rows(engine)
    assert sum(r.status == "done" for r in rows.values()) == 5
    shard = next(r.map_shard for r in rows.values() if r.status == "done")
    assert read_map(tmp_path / "features", shard, 0).shape == (1024, 7, 7)  # 224 x 224 input


def test_cli_worker_extracts_at_the_checkpoints_training_resolution(
        engine, tmp_path, archive, weights, settings, monkeypatch, capsys):
    """Features rank best near the resolution the backbone was trained at (docs/backbone.md):
    a train-backbone checkpoint that records 64 px gets 64 px inputs, 2 x 2 maps."""
    from pipelines.backbone import CHECKPOINT_FORMAT
    from service.cli import main

    storage, *_ = archive
    checkpoint = tmp_path / "trained.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "metadata": {"input_size": [64, 64]},
                "model_state": torch.load(weights, weights_only=True)}, checkpoint)
    monkeypatch.setenv("DATABASE_URL", settings.database_url)
    monkeypatch.setenv("PACS_STORAGE_DIR", str(storage))
    monkeypatch.setenv("PACS_FEATURE_STORE_DIR", str(tmp_path / "features"))
    monkeypatch.setenv("PACS_IMAGE_DECODE_WORKERS", "1")
    monkeypatch.setenv("PACS_IMAGE_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("PACS_IMAGE_WEIGHTS", str(checkpoint))
    assert main(["worker", "--stage", "image", "--drain"]) == 0
    rows = _rows(engine)
    shard = next(r.map_shard for r in rows.values() if r.status == "done")
    assert read_map(tmp_path / "features", shard, 0).shape == (1024, 2, 2)
