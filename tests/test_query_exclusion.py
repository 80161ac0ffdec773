"""``query`` and ``SimilarImages`` leave out the query's own study or patient on request, and
never return the query itself, also when it is given as the stored file (through the real
database, image worker and image model)."""

from __future__ import annotations

import copy
import json

import pytest
import sqlalchemy as sa
from pydicom.uid import generate_uid

from service.tags import features
from service.images.image_annotation import SimilarImages, query_identity, train_image_model
from service.images.image_worker import ImageWorker, enqueue_missing

from .dicom_client import ingest_datasets
from .test_image_annotation import SMALL, _images
from .test_image_worker import SIZE, weights  # noqa: F401  (fixture)


@pytest.fixture
def cases(engine, tmp_path, weights):  # noqa: F811
    """12 studies of two identical images (a near-duplicate pair), two studies per patient."""
    from pipelines.backbone import load_backbone

    originals, kind_of = _images(["disk", "stripes", "noise"] * 4, seed=3)
    datasets, study_of, patient_of = [], {}, {}
    for number, ds in enumerate(originals):
        ds.StudyInstanceUID = f"1.2.826.0.1.3680043.97.{number}"
        ds.PatientID = f"PAT{number // 2}"
        twin = copy.deepcopy(ds)
        twin.SOPInstanceUID = generate_uid()
        twin.SeriesInstanceUID = generate_uid()
        kind_of[twin.SOPInstanceUID] = kind_of[ds.SOPInstanceUID]
        for item in (ds, twin):
            datasets.append(item)
            study_of[item.SOPInstanceUID] = item.StudyInstanceUID
            patient_of[item.SOPInstanceUID] = item.PatientID
    storage = tmp_path / "storage"
    ingest_datasets(engine, storage, datasets)
    while features.process_queue_batch(engine, "test"):
        pass
    enqueue_missing(engine)
    with ImageWorker(engine, load_backbone(weights), storage_root=storage,
                     feature_store=tmp_path / "features", name="test", image_size=SIZE,
                     decode_workers=1, batch=32, weights_path=weights) as worker:
        while worker.run_once():
            pass
    train_image_model(engine, tmp_path / "features", tmp_path / "models", config=SMALL)
    yield engine, storage, study_of, patient_of


def _hits(engine, uid: str, rule: str, top: int = 8) -> list[str]:
    similar = SimilarImages(engine)
    clusters, codes = similar.code_of(uid)
    exclude = similar.same_case_uids(rule, **query_identity(uid))
    return [hit[0] for hit in similar.rank(clusters, codes, top, exclude=exclude)[0]]


def test_same_study_and_same_patient_hits_are_left_out(cases):
    engine, _, study_of, patient_of = cases
    query = next(iter(study_of))
    twin = next(uid for uid, study in study_of.items()
                if study == study_of[query] and uid != query)
    # without exclusion the identical twin of the same study is a hit (first among the
    # images of the same pattern, which may tie with it at score 1: ties go by UID)
    plain = _hits(engine, query, "none")
    assert query not in plain and twin in plain and len(plain) == 8
    same_study = _hits(engine, query, "same-study")
    assert len(same_study) == 8
    assert not {study_of[uid] for uid in same_study} & {study_of[query]}
    same_patient = _hits(engine, query, "same-patient")
    assert len(same_patient) == 8
    assert patient_of[query] not in {patient_of[uid] for uid in same_patient}
    assert _hits(engine, query, "same-patient", top=100) and \
        len(_hits(engine, query, "same-patient", top=100)) == len(study_of) - 4


def test_same_case_uids_of_a_stored_instance_and_of_a_file(cases):
    engine, storage, study_of, patient_of = cases
    query = next(iter(study_of))
    similar = SimilarImages(engine)
    study = {uid for uid, s in study_of.items() if s == study_of[query]}
    patient = {uid for uid, p in patient_of.items() if p == patient_of[query]}
    assert similar.same_case_uids("none", sop_instance_uid=query) == {query}
    assert similar.same_case_uids("same-study", sop_instance_uid=query) == study
    assert similar.same_case_uids("same-patient", sop_instance_uid=query) == patient
    with engine.connect() as conn:
        path = storage / conn.execute(sa.text(
            "SELECT file_path FROM instances WHERE sop_instance_uid = :u"), {"u": query}).scalar()
    # a file: its header says who it is
    assert query_identity(file=path)["sop_instance_uid"] == query
    assert similar.same_case_uids("same-patient", **query_identity(file=path)) == patient
    # a new file of a study and patient the archive does not hold: only itself
    assert similar.same_case_uids("same-study", sop_instance_uid="9.9",
                                  study_instance_uid="9.8", patient_id="NEW") == {"9.9"}
    with pytest.raises(ValueError, match="exclude must be one of"):
        similar.same_case_uids("same-site", sop_instance_uid=query)


def test_cli_query_of_a_stored_file_never_returns_that_file(cases, settings, monkeypatch,
                                                            capsys):
    from service.cli import main

    engine, storage, study_of, _ = cases
    monkeypatch.setenv("DATABASE_URL", settings.database_url)
    # the backbone and input size the image worker recorded for the model's features
    monkeypatch.delenv("PACS_IMAGE_WEIGHTS", raising=False)
    query = next(iter(study_of))
    with engine.connect() as conn:
        path = storage / conn.execute(sa.text(
            "SELECT file_path FROM instances WHERE sop_instance_uid = :u"), {"u": query}).scalar()
    assert main(["query", str(path), "--top", "8", "--json", "--exclude", "none"]) == 0
    hits = [hit["sop_instance_uid"] for hit in json.loads(capsys.readouterr().out)["hits"]]
    assert query not in hits and len(hits) == 8
    assert study_of[query] in {study_of[uid] for uid in hits}  # its twin, exclusion off
    # the default leaves the query's study out
    assert main(["query", str(path), "--top", "5", "--json"]) == 0
    hits = [hit["sop_instance_uid"] for hit in json.loads(capsys.readouterr().out)["hits"]]
    assert len(hits) == 5 and study_of[query] not in {study_of[uid] for uid in hits}
    assert main(["query", "--uid", query, "--top", "5", "--json",
                 "--exclude", "same-patient"]) == 0
    hits = [hit["sop_instance_uid"] for hit in json.loads(capsys.readouterr().out)["hits"]]
    assert len(hits) == 5 and query not in hits


def _sql_hits(engine, uid: str, n: int, *exclude: str) -> list[str]:
    call = "similar_images(:u, :n, :e)" if exclude else "similar_images(:u, :n)"
    with engine.connect() as conn:
        return list(conn.execute(sa.text(f"SELECT sop_instance_uid FROM {call}"),
                                 {"u": uid, "n": n, "e": exclude[0] if exclude else None})
                    .scalars())


def test_similar_images_in_sql_leaves_out_the_same_study_or_patient(cases):
    engine, _, study_of, patient_of = cases
    query = next(iter(study_of))
    twin = next(uid for uid, study in study_of.items()
                if study == study_of[query] and uid != query)
    plain = _sql_hits(engine, query, 8)
    assert plain == _sql_hits(engine, query, 8, "none")  # the default is unchanged
    assert query not in plain and twin in plain
    same_study = _sql_hits(engine, query, 100, "same-study")
    assert len(same_study) == len(study_of) - 2
    assert study_of[query] not in {study_of[uid] for uid in same_study}
    same_patient = _sql_hits(engine, query, 100, "same-patient")
    assert len(same_patient) == len(study_of) - 4
    assert patient_of[query] not in {patient_of[uid] for uid in same_patient}
    with pytest.raises(sa.exc.DBAPIError, match="exclude must be"):
        _sql_hits(engine, query, 5, "same-series")
