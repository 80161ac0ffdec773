"""The work queue that later stages consume: claim with SKIP LOCKED, finish, retry, fail."""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Engine

IMAGE_STAGE_IN_USE = ("(EXISTS (SELECT 1 FROM image_models) "
                      "OR EXISTS (SELECT 1 FROM image_features))")
"""SQL condition: an image model exists or an image worker has stored features, so new
instances should reach the ``image`` stage (the tags stage forwards them)."""

_CLAIM = sa.text(
    """
    UPDATE work_queue SET status = 'running', claimed_by = :worker, claimed_at = now(),
                          attempts = attempts + 1, updated_at = now()
    WHERE id IN (SELECT id FROM work_queue
                 WHERE stage = :stage AND status = 'pending' AND available_at <= now()
                 ORDER BY available_at, id
                 FOR UPDATE SKIP LOCKED
                 LIMIT :limit)
    RETURNING id, sop_instance_uid, attempts
    """
)
_DONE = sa.text(
    "UPDATE work_queue SET status = 'done', last_error = NULL, updated_at = now() "
    "WHERE id = ANY(CAST(:ids AS bigint[])) AND status = 'running'"
)
_FAIL = sa.text(
    """
    UPDATE work_queue SET
        status = CASE WHEN attempts >= :max_attempts THEN 'failed' ELSE 'pending' END,
        available_at = now() + make_interval(secs => :backoff * power(2, attempts - 1)),
        last_error = :error, claimed_by = NULL, updated_at = now()
    WHERE id = :id AND status = 'running'
    RETURNING status
    """
)
_RELEASE_STALE = sa.text(
    """
    UPDATE work_queue SET status = 'pending', claimed_by = NULL, updated_at = now()
    WHERE stage = :stage AND status = 'running'
      AND claimed_at < now() - make_interval(secs => :older_than)
    """
)


@dataclass(frozen=True)
class Claim:
    id: int
    sop_instance_uid: str
    attempts: int


def claim(engine: Engine, stage: str, worker: str, limit: int) -> list[Claim]:
    """Up to ``limit`` pending items of ``stage``; concurrent claimers never share one."""
    with engine.begin() as conn:
        rows = conn.execute(_CLAIM, {"stage": stage, "worker": worker, "limit": limit}).all()
    return [Claim(*row) for row in rows]


def complete(engine: Engine, ids: list[int]) -> None:
    with engine.begin() as conn:
        conn.execute(_DONE, {"ids": ids})


def fail(engine: Engine, item_id: int, error: str, *, max_attempts: int = 3,
         backoff_seconds: float = 5.0) -> str:
    """Put an item back with exponential backoff, or mark it failed after ``max_attempts``."""
    with engine.begin() as conn:
        status = conn.execute(_FAIL, {"id": item_id, "error": error[:2000],
                                      "max_attempts": max_attempts,
                                      "backoff": backoff_seconds}).scalar()
    return status or "unknown"


def release_stale(engine: Engine, stage: str, older_than_seconds: float) -> int:
    """Return claims of crashed workers to the queue."""
    with engine.begin() as conn:
        return conn.execute(_RELEASE_STALE, {"stage": stage,
                                             "older_than": older_than_seconds}).rowcount
