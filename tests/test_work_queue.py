from __future__ import annotations

import threading

import sqlalchemy as sa

from service import work_queue

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
