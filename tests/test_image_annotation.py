"""In SQL: an image model fitted on stored features, every image annotated, the
worker annotating new images, similar_images() and the query / visual-check commands."""

from __future__ import annotations

import json

import numpy as np
import pytest
import sqlalchemy as sa

from pipelines.ddiccir import PipelineConfig
from service.tags import features
from service.images.image_annotation import SimilarImages, train_image_model
from service.images.image_worker import ImageWorker, enqueue_missing

from .dicom_client import ingest_datasets, make_ct
from .test_image_worker import SIZE, weights  # noqa: F401  (fixture)

SMALL = PipelineConfig(n_clusters=3, layer1_atoms=8, layer2_atoms=12, sparsity=3,
                       max_outer_iter=3, ksvd_max_iter=3, patches_per_cluster=200, seed=0)


def _pattern(kind: str, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:128, 0:128]
    if kind == "disk":
        image = ((xx - 64) ** 2 + (yy - 64) ** 2 < (30 + rng.integers(0, 8)) ** 2) * 1500
    elif kind == "stripes":
        image = ((xx // (6 + rng.integers(0, 3))) % 2) * 1500
    else:
        image = rng.integers(0, 1500, size=(128, 128))
    return (image + rng.normal(0, 10, (128, 128)) + 1000).clip(0, 4095).astype(np.uint16)


def _images(kinds: list[str], seed: int) -> tuple[list, dict[str, str]]:
    rng = np.random.default_rng(seed)
    datasets, kind_of = [], {}
    for kind in kinds:
        ds = make_ct()
        ds.PixelData = _pattern(kind, rng).tobytes()
        ds.WindowCenter, ds.WindowWidth = "1750", "2000"
        datasets.append(ds)
        kind_of[ds.SOPInstanceUID] = kind
    return datasets, kind_of


@pytest.fixture
def annotated(engine, tmp_path, weights):  # noqa: F811
    from pipelines.backbone import load_backbone

    datasets, kind_of = _images(["disk", "stripes", "noise"] * 8, seed=1)
    storage = tmp_path / "storage"
    ingest_datasets(engine, storage, datasets)
    while features.process_queue_batch(engine, "test"):
        pass
    enqueue_missing(engine)
    worker = ImageWorker(engine, load_backbone(weights), storage_root=storage,
                         feature_store=tmp_path / "features", name="test", image_size=SIZE,
                         decode_workers=1, batch=32, weights_path=weights)
    while worker.run_once():
        pass
    model_id = train_image_model(engine, tmp_path / "features", tmp_path / "models",
                                 config=SMALL)
    yield engine, worker, kind_of, model_id, storage
    worker.close()


def test_every_image_gets_a_cluster_and_a_code(annotated):
    engine, _, kind_of, model_id, _ = annotated
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT sop_instance_uid, image_cluster, vector_dims(retrieval_code) FROM "
            "image_annotations WHERE model_id = :m"), {"m": model_id}).all()
        model = conn.execute(sa.text("SELECT * FROM image_models")).mappings().one()
    assert {r[0] for r in rows} == kind_of.keys()
    assert {r[2] for r in rows} == {SMALL.layer2_atoms}
    assert model["is_active"] and model["status"] == "finished"
    assert model["history"] and len(model["history"]) <= SMALL.max_outer_iter
    # the clusters follow the patterns: each pattern's images mostly share one cluster
    clusters = {}
    for uid, cluster, _ in rows:
        clusters.setdefault(kind_of[uid], []).append(cluster)
    purity = sum(np.bincount(c).max() for c in clusters.values()) / len(rows)
    assert purity >= 0.8, clusters


def test_similar_images_in_sql_ranks_the_same_pattern_first(annotated):
    engine, _, kind_of, _, _ = annotated
    query = next(uid for uid, kind in kind_of.items() if kind == "stripes")
    with engine.connect() as conn:
        hits = conn.execute(sa.text("SELECT * FROM similar_images(:u, 5)"), {"u": query}).all()
    assert len(hits) == 5 and query not in {h.sop_instance_uid for h in hits}
    assert [h.score for h in hits if h.same_cluster] == sorted(
        [h.score for h in hits if h.same_cluster], reverse=True)
    assert sum(kind_of[h.sop_instance_uid] == "stripes" for h in hits) >= 4
    assert all(h.modality == "CT" for h in hits)


def test_the_read_only_role_may_query_similar_images(annotated):
    engine, _, kind_of, _, _ = annotated
    query = next(iter(kind_of))
    with engine.connect() as conn:
        conn.execute(sa.text("SET ROLE pacs_readonly"))
        hits = conn.execute(sa.text("SELECT * FROM similar_images(:u, 3)"), {"u": query}).all()
        # leaving out the query's study reads patient tables the role may not read itself
        other_studies = conn.execute(sa.text(
            "SELECT * FROM similar_images(:u, 3, 'same-patient')"), {"u": query}).all()
        clusters = conn.execute(sa.text(
            "SELECT count(DISTINCT image_cluster) FROM image_annotations")).scalar()
    assert len(hits) == 3 and all(h.modality == "CT" for h in hits)
    assert len(other_studies) <= 3
    assert clusters == SMALL.n_clusters


def test_python_query_agrees_with_sql(annotated):
    engine, _, kind_of, _, _ = annotated
    query = next(uid for uid, kind in kind_of.items() if kind == "disk")
    similar = SimilarImages(engine)
    clusters, codes = similar.code_of(query)
    python_hits = similar.rank(clusters, codes, 6, exclude=query)[0]
    with engine.connect() as conn:
        sql_hits = conn.execute(sa.text("SELECT sop_instance_uid, score FROM "
                                        "similar_images(:u, 6)"), {"u": query}).all()
    # The scores agree to float rounding (pgvector computes in double from float4, torch in
    # float32); near-equal scores (these tiny codes are almost identical within a cluster)
    # may then swap places, so the order is checked against the SQL scores with a tolerance.
    sql_score = dict(sql_hits)
    assert sql_hits[0][0] == python_hits[0][0]
    assert {uid for uid, *_ in python_hits[:-1]} <= sql_score.keys()
    in_python_order = [sql_score.get(uid, sql_hits[-1][1]) for uid, *_ in python_hits]
    assert all(a >= b - 1e-5 for a, b in zip(in_python_order, in_python_order[1:]))
    np.testing.assert_allclose([h[1] for h in python_hits], [h[1] for h in sql_hits],
                               atol=1e-5)


def test_the_worker_annotates_new_images_with_the_active_model(annotated):
    engine, worker, _, model_id, storage = annotated
    datasets, kind_of = _images(["disk", "stripes"], seed=7)
    ingest_datasets(engine, storage, datasets)
    enqueue_missing(engine)
    while worker.run_once():
        pass
    with engine.connect() as conn:
        annotated_uids = set(conn.execute(sa.text(
            "SELECT sop_instance_uid FROM image_annotations WHERE model_id = :m"),
            {"m": model_id}).scalars())
    assert kind_of.keys() <= annotated_uids


def test_image_model_ranking_by_features_indexes_features(engine, tmp_path, weights):  # noqa: F811
    """``ranking="features"``: the index holds normalised pooled features (C values) with the
    cluster of the nearest feature centre, SQL and Python rank them, the worker adds new
    images the same way, and the choice is recorded with the model."""
    from pipelines.backbone import load_backbone

    datasets, kind_of = _images(["disk", "stripes", "noise"] * 6, seed=3)
    storage = tmp_path / "storage"
    ingest_datasets(engine, storage, datasets)
    while features.process_queue_batch(engine, "test"):
        pass
    enqueue_missing(engine)
    worker = ImageWorker(engine, load_backbone(weights), storage_root=storage,
                         feature_store=tmp_path / "features", name="test", image_size=SIZE,
                         decode_workers=1, batch=32, weights_path=weights)
    try:
        while worker.run_once():
            pass
        model_id = train_image_model(engine, tmp_path / "features", tmp_path / "models",
                                     config=SMALL, ranking="features")
        with engine.connect() as conn:
            dims = set(conn.execute(sa.text(
                "SELECT vector_dims(retrieval_code) FROM image_annotations WHERE model_id = :m"),
                {"m": model_id}).scalars())
            parameters = conn.execute(sa.text(
                "SELECT parameters FROM image_models WHERE id = :m"), {"m": model_id}).scalar()
            stored = conn.execute(sa.text(
                "SELECT f.feature, a.retrieval_code FROM image_features f JOIN "
                "image_annotations a USING (sop_instance_uid) LIMIT 1")).one()
        feature, code = (np.asarray(json.loads(value), dtype=np.float64) for value in stored)
        channels = len(feature)
        assert dims == {channels} and parameters["ranking"] == "features"
        np.testing.assert_allclose(code, feature / np.linalg.norm(feature), atol=2e-3)
        query = next(uid for uid, kind in kind_of.items() if kind == "stripes")
        with engine.connect() as conn:
            hits = conn.execute(sa.text("SELECT * FROM similar_images(:u, 4)"),
                                {"u": query}).all()
        assert sum(kind_of[h.sop_instance_uid] == "stripes" for h in hits) >= 3
        similar = SimilarImages(engine)
        python_hits = similar.rank(*similar.code_of(query), 4, exclude=query)[0]
        assert [h[0] for h in python_hits][:1] == [hits[0].sop_instance_uid]
        new, _ = _images(["disk"], seed=9)
        ingest_datasets(engine, storage, new)
        enqueue_missing(engine)
        while worker.run_once():
            pass
        with engine.connect() as conn:
            dim = conn.execute(sa.text(
                "SELECT vector_dims(retrieval_code) FROM image_annotations WHERE "
                "sop_instance_uid = :u"), {"u": new[0].SOPInstanceUID}).scalar()
        assert dim == channels
    finally:
        worker.close()


def test_cli_query_by_file_and_by_uid(annotated, settings, monkeypatch, capsys, weights,  # noqa: F811
                                      tmp_path):
    from service.cli import main

    engine, _, kind_of, _, storage = annotated
    monkeypatch.setenv("DATABASE_URL", settings.database_url)
    monkeypatch.setenv("PACS_IMAGE_WEIGHTS", str(weights))
    query = next(uid for uid, kind in kind_of.items() if kind == "noise")
    assert main(["query", "--uid", query, "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "query in image cluster" in out and len(out.strip().splitlines()) == 5
    assert main(["query", "--uid", "1.2.3.4"]) == 2
    assert "no retrieval code" in capsys.readouterr().err


def test_cli_query_by_file_uses_the_active_models_backbone(annotated, settings, monkeypatch,
                                                            capsys, tmp_path):
    """No PACS_IMAGE_WEIGHTS: the weights the image worker recorded for the model's
    features, at the worker's input size (this model was fitted on SIZE-pixel inputs)."""
    import json

    import torch

    from pipelines.backbone import build_densenet121
    from service.cli import main

    engine, _, kind_of, _, storage = annotated
    monkeypatch.setenv("DATABASE_URL", settings.database_url)
    monkeypatch.delenv("PACS_IMAGE_WEIGHTS", raising=False)
    query = next(uid for uid, kind in kind_of.items() if kind == "disk")
    with engine.connect() as conn:
        path = storage / conn.execute(sa.text(
            "SELECT file_path FROM instances WHERE sop_instance_uid = :u"), {"u": query}).scalar()
    assert main(["query", str(path), "--top", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["hits"]
    # the file is coded as its stored code: the same hits as the stored instance's (and
    # never the file itself)
    assert main(["query", "--uid", query, "--top", "3", "--json"]) == 0
    stored_hits = json.loads(capsys.readouterr().out)["hits"]
    assert [h["sop_instance_uid"] for h in hits] == [h["sop_instance_uid"] for h in stored_hits]
    assert [h["score"] for h in hits] == pytest.approx([h["score"] for h in stored_hits],
                                                       abs=1e-4)
    assert query not in {h["sop_instance_uid"] for h in hits}
    assert "tag_cluster_outlier" in hits[0]

    # other weights than those of the model's features: refused, not wrong hits
    torch.manual_seed(1)
    other = tmp_path / "other.pth"
    torch.save(build_densenet121().state_dict(), other)
    monkeypatch.setenv("PACS_IMAGE_WEIGHTS", str(other))
    assert main(["query", str(path)]) == 2
    err = capsys.readouterr().err
    assert "was fitted on features" in err and "Traceback" not in err

    # nothing recorded and nothing set: the error names the setting
    monkeypatch.delenv("PACS_IMAGE_WEIGHTS")
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM image_backbones"))
    assert main(["query", str(path)]) == 2
    assert "set PACS_IMAGE_WEIGHTS" in capsys.readouterr().err


def test_hits_say_when_their_tags_fit_no_tag_cluster(annotated, database_url, capsys,
                                                     settings, monkeypatch):
    from service.tags import tag_clusters
    from service.cli import main

    from .test_tag_clusters import _options

    engine, _, kind_of, _, _ = annotated
    with engine.begin() as conn:  # the test images share their tags: make a few profiles
        conn.execute(sa.text("UPDATE instance_features SET kvp = 80 + 10 * "
                             "(ascii(right(sop_instance_uid, 1)) % 4)"))
    tag_clusters.recluster(engine, database_url, _options(candidates=(2,)))
    query = next(iter(kind_of))
    with engine.begin() as conn:  # pretend every instance's tags are far from its medoid
        conn.execute(sa.text("UPDATE tag_cluster_runs SET outlier_distance = -1"))
        hits = conn.execute(sa.text("SELECT * FROM similar_images(:u, 3)"), {"u": query}).all()
    assert len(hits) == 3 and all(h.tag_cluster_outlier for h in hits)
    assert all(h.tag_cluster is not None for h in hits)
    monkeypatch.setenv("DATABASE_URL", settings.database_url)
    assert main(["query", "--uid", query, "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "fit no tag cluster" in out and out.count("?") >= 3


def test_cli_visual_check_needs_features_and_tag_clusters(engine, settings, monkeypatch,
                                                          capsys):
    from service.cli import main

    monkeypatch.setenv("DATABASE_URL", settings.database_url)
    assert main(["visual-check"]) == 2
    assert "no instance has both image features and a tag cluster" in capsys.readouterr().err


def test_cli_image_model_without_features_says_what_to_run(engine, settings, monkeypatch,
                                                           capsys):
    from service.cli import main

    monkeypatch.setenv("DATABASE_URL", settings.database_url)
    assert main(["image-model"]) == 2
    assert "worker --stage image" in capsys.readouterr().err


def test_cli_visual_check_prints_the_t_test(engine, tmp_path, weights, settings,  # noqa: F811
                                            monkeypatch, capsys, database_url):
    """Tag groups that coincide with visual patterns: images sit closer to their tag
    cluster's mean feature than to a permuted cluster's (method.md A.8)."""
    from pipelines.backbone import load_backbone
    from service.tags import tag_clusters
    from service.cli import main

    from .test_tag_clusters import _options

    body_part = {"disk": ("HEAD", "SIEMENS"), "stripes": ("KNEE", "FUJIFILM"),
                 "noise": ("CHEST", "Philips")}
    datasets, kind_of = _images(["disk", "stripes", "noise"] * 10, seed=3)
    for number, ds in enumerate(datasets):
        ds.BodyPartExamined, ds.Manufacturer = body_part[kind_of[ds.SOPInstanceUID]]
        ds.TableHeight = str(100 + number % 4)  # a few profiles per group
    storage = tmp_path / "storage"
    ingest_datasets(engine, storage, datasets)
    while features.process_queue_batch(engine, "test"):
        pass
    tag_clusters.recluster(engine, database_url, _options(candidates=(2, 3, 4)))
    enqueue_missing(engine)
    with ImageWorker(engine, load_backbone(weights), storage_root=storage,
                     feature_store=tmp_path / "features", name="test", image_size=SIZE,
                     decode_workers=1, batch=32) as worker:
        while worker.run_once():
            pass

    monkeypatch.setenv("DATABASE_URL", settings.database_url)
    assert main(["visual-check", "--samples", "3", "--sample-size", "10"]) == 0
    summary, detail = capsys.readouterr().out.strip().splitlines()
    assert "30 images, 3 samples of 10" in summary and "t(2) = " in summary
    true_mean = float(detail.split("tag clusters ")[1].split(",")[0])
    permuted_mean = float(detail.split("permuted ")[1].split(";")[0])
    assert true_mean < permuted_mean
