from __future__ import annotations

import threading

import sqlalchemy as sa

from service.database import work_queue

from .dicom_client import ingest_datasets, make_ct


def test_concurrent_claimers_never_share_an_item(engine, tmp_path):
    ingest_datasets(engine, tmp_path / "storage", [make_ct() for _ in range(40)])
    claimed: list[list[int]] = [[] for _ in range(4)]

    def worker(index: int) -> None:
        while batch := work_queue.claim(engine, "tags", f"w{index}", 3):
            claimed[index].extend(item.id for item in batch)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [i for ids in claimed for i in ids]
    assert len(every) == 40 and len(set(every)) == 40


def test_retry_then_fail_and_release_stale(engine, tmp_path):
    ingest_datasets(engine, tmp_path / "storage", [make_ct(), make_ct()])
    first, second = work_queue.claim(engine, "tags", "w", 2)
    assert work_queue.fail(engine, first.id, "decode error", max_attempts=2,
                           backoff_seconds=0) == "pending"
    again = work_queue.claim(engine, "tags", "w", 5)
    assert [c.id for c in again] == [first.id] and again[0].attempts == 2
    assert work_queue.fail(engine, first.id, "decode error", max_attempts=2) == "failed"
    assert work_queue.release_stale(engine, "tags", older_than_seconds=0) == 1  # `second`
    work_queue.complete(engine, [c.id for c in work_queue.claim(engine, "tags", "w", 5)])
    with engine.connect() as conn:
        rows = dict(conn.execute(sa.text(
            "SELECT status, count(*) FROM work_queue GROUP BY status")).all())
        error = conn.execute(sa.text(
            "SELECT last_error FROM work_queue WHERE status = 'failed'")).scalar()
    assert rows == {"failed": 1, "done": 1} and error == "decode error"
    assert second.id != first.id


def test_new_images_reach_the_image_stage_by_default_once_it_is_in_use(engine, tmp_path):
    """Default settings queue only ``tags`` at ingest; the tags stage forwards each parsed
    instance to ``image`` once an image model or image features exist, and ``status``
    counts the instances that wait without an item."""
    from service.tags import features
    from service.config import Settings
    from service.status import collect_status, format_status

    assert Settings().queue_stages == ("tags",)  # the ingest hot path stays one row
    early = make_ct()
    ingest_datasets(engine, tmp_path / "storage", [early])
    while features.process_queue_batch(engine, "test"):
        pass
    status = collect_status(engine)
    assert "image" not in status["queue"]  # no image stage in use: nothing forwarded
    assert status["image_stage"] == {"in_use": False, "not_queued": 1}

    with engine.begin() as conn:  # an image model exists from now on
        conn.execute(sa.text("INSERT INTO image_models (feature_model_version) VALUES ('x')"))
    status = collect_status(engine)
    assert status["image_stage"] == {"in_use": True, "not_queued": 1}
    assert "1 stored instance without an image item" in format_status(status)

    late = make_ct()
    ingest_datasets(engine, tmp_path / "storage", [late])
    while features.process_queue_batch(engine, "test"):
        pass
    with engine.connect() as conn:
        queued = conn.execute(sa.text(
            "SELECT sop_instance_uid, status FROM work_queue WHERE stage = 'image'")).all()
    assert queued == [(late.SOPInstanceUID, "pending")]
    status = collect_status(engine)
    assert status["queue"]["image"] == {"pending": 1}
    assert status["image_stage"]["not_queued"] == 1  # the early one: a worker start queues it
