"""Parsed tag features in SQL: the ``tags`` queue stage, and ``reparse`` for the archive.

The parsing itself is pure (``parsers.parse_instance``); this module moves tags out of
``instances.tags`` and features into ``instance_features``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Callable, Iterable

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from parsers import FEATURE_COLUMNS, PARSER_VERSION, Vocabulary, parse_instance
from parsers.registry import default_vocabulary

from ..database import work_queue
from .tag_clusters import ActiveModelCache, assign_new_instances, assign_unassigned

log = logging.getLogger(__name__)

STAGE = "tags"


def _sql_type(kind: str) -> str:
    return "double precision" if kind == "numeric" else "text"


_NAMES = [c.name for c in FEATURE_COLUMNS]
_UPSERT = sa.text(
    "INSERT INTO instance_features (sop_instance_uid, parser_version, vocabulary_version, "
    "parsed_at, " + ", ".join(f'"{n}"' for n in _NAMES) + ", parse_failures) "
    "SELECT r.sop_instance_uid, r.parser_version, r.vocabulary_version, now(), "
    + ", ".join(f'r."{n}"' for n in _NAMES) + ", r.parse_failures "
    "FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS r(sop_instance_uid text, "
    "parser_version text, vocabulary_version text, "
    + ", ".join(f'"{c.name}" {_sql_type(c.kind)}' for c in FEATURE_COLUMNS)
    + ", parse_failures jsonb) "
    "ON CONFLICT (sop_instance_uid) DO UPDATE SET parser_version = EXCLUDED.parser_version, "
    "vocabulary_version = EXCLUDED.vocabulary_version, parsed_at = EXCLUDED.parsed_at, "
    + ", ".join(f'"{n}" = EXCLUDED."{n}"' for n in _NAMES)
    + ", parse_failures = EXCLUDED.parse_failures"
)
# the image stage is not queued at ingest by default (one queue row per store); parsed
# instances go on to it here once it is in use
_FORWARD_TO_IMAGE = sa.text(
    "INSERT INTO work_queue (stage, sop_instance_uid) SELECT 'image', u "
    "FROM unnest(CAST(:uids AS text[])) AS u "
    f"WHERE {work_queue.IMAGE_STAGE_IN_USE} ON CONFLICT DO NOTHING"
)
_TAGS = sa.text(
    "SELECT sop_instance_uid, tags FROM instances "
    "WHERE sop_instance_uid = ANY(CAST(:uids AS text[]))"
)
# a row is stale when it is missing or another parser or vocabulary version made it;
# with :everything every instance is (``reparse --all``)
_STALE_ROW = ("(:everything OR f.parser_version IS DISTINCT FROM :version "
              "OR f.vocabulary_version IS DISTINCT FROM :vocabulary)")
_STALE = sa.text(
    f"""
    SELECT i.sop_instance_uid, i.tags FROM instances i
    LEFT JOIN instance_features f USING (sop_instance_uid)
    WHERE {_STALE_ROW} AND i.sop_instance_uid > :after
    ORDER BY i.sop_instance_uid LIMIT :limit
    """
)
_COUNT_STALE = sa.text(
    f"""
    SELECT count(*) FROM instances i LEFT JOIN instance_features f USING (sop_instance_uid)
    WHERE {_STALE_ROW}
    """
)


def feature_rows(items: Iterable[tuple[str, dict[str, Any]]],
                 vocabulary: Vocabulary | None) -> list[dict[str, Any]]:
    """Parsed rows for ``instance_features``, each with the parser and vocabulary versions
    that made it."""
    vocabulary = vocabulary or default_vocabulary()
    rows = []
    for sop_instance_uid, tags in items:
        result = parse_instance(tags or {}, vocabulary)
        row: dict[str, Any] = dict(result.features)
        row["sop_instance_uid"] = sop_instance_uid
        row["parser_version"] = PARSER_VERSION
        row["vocabulary_version"] = vocabulary.version
        row["parse_failures"] = [
            {"keyword": f.keyword, "column": f.column, "raw": f.raw, "reason": f.reason}
            for f in result.failures
        ]
        rows.append(row)
    return rows


def write_features(conn: sa.Connection, rows: list[dict[str, Any]]) -> None:
    if rows:
        conn.execute(_UPSERT, {"rows": json.dumps(rows, ensure_ascii=False, allow_nan=False,
                                                  separators=(",", ":"))})


_ACTIVE_TAG_MODEL = ActiveModelCache()


def process_queue_batch(engine: Engine, worker: str, *, limit: int = 200,
                        vocabulary: Vocabulary | None = None,
                        tag_model: ActiveModelCache = _ACTIVE_TAG_MODEL) -> int:
    """Parse one claimed batch of the ``tags`` stage; returns how many were claimed.

    In the same transaction the new features are assigned to the active tag clustering
    run's nearest medoid, so ``instance_tag_cluster`` has them as soon as they are parsed,
    and, once the image stage is in use (an image model or image features exist), the
    instances are queued for it (``queue_stages`` need not name ``image``).
    """
    claims = work_queue.claim(engine, STAGE, worker, limit)
    if not claims:
        return 0
    try:
        with engine.begin() as conn:
            tags = dict(conn.execute(_TAGS, {"uids": [c.sop_instance_uid for c in claims]}).all())
            rows = feature_rows(tags.items(), vocabulary)
            write_features(conn, rows)
            assign_new_instances(conn, tag_model, rows)
            conn.execute(_FORWARD_TO_IMAGE, {"uids": list(tags)})
    except Exception as exc:
        # parsing is total, so this is the database or a bug: retry each item later
        log.exception("tag parsing batch failed")
        for claim in claims:
            work_queue.fail(engine, claim.id, f"{type(exc).__name__}: {exc}")
        return len(claims)
    work_queue.complete(engine, [c.id for c in claims])
    return len(claims)


def sweep_unassigned(engine: Engine, tag_model: ActiveModelCache, *, limit: int = 20_000) -> int:
    """Assign parsed instances the active tag clustering run has no label for: a batch that
    met a run switch, or a recluster that stopped right after switching."""
    with engine.begin() as conn:
        model = tag_model.active(conn)
        return 0 if model is None else assign_unassigned(conn, model, limit=limit)


# is a store still arriving (newest entry younger than the quiet time), and is the oldest
# entry still within the allowed lag?  Both ends of the partial pending index, no scan.
_INGEST_BUSY = sa.text(
    """
    SELECT now() - max(available_at) < make_interval(secs => :quiet)
       AND now() - min(available_at) < make_interval(secs => :max_lag)
    FROM work_queue WHERE stage = :stage AND status = 'pending'
    """
)


class TagsWorker:
    """Background thread that keeps ``instance_features`` up to date as instances arrive.

    With ``quiet_seconds`` > 0 it yields to ingest: while entries keep arriving (the newest
    is younger than ``quiet_seconds``) it waits, unless the oldest has waited
    ``max_lag_seconds``.  Parsing tags beside a busy listener took 10-20% of the
    listener's throughput on 2 cores (benchmarks/ingest/README.md); features of a burst
    arrive once it pauses, and never later than ``max_lag_seconds`` plus the parse.
    """

    def __init__(self, engine: Engine, *, name: str, vocabulary: Vocabulary | None = None,
                 batch: int = 200, idle_sleep: float = 0.5, stale_after: float = 600.0,
                 quiet_seconds: float = 0.0, max_lag_seconds: float = 30.0):
        self.engine = engine
        self.name = name
        self.vocabulary = vocabulary
        self.batch = batch
        self.idle_sleep = idle_sleep
        self.stale_after = stale_after
        self.quiet_seconds = quiet_seconds
        self.max_lag_seconds = max_lag_seconds
        self.tag_model = ActiveModelCache()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "TagsWorker":
        self._thread = threading.Thread(target=self.run, name="tags-worker", daemon=True)
        self._thread.start()
        return self

    def run(self) -> None:
        last_sweep = 0.0
        while not self._stop.is_set():
            try:
                if time.monotonic() - last_sweep > self.stale_after:
                    work_queue.release_stale(self.engine, STAGE, self.stale_after)
                    sweep_unassigned(self.engine, self.tag_model)
                    last_sweep = time.monotonic()
                if self.ingest_busy():
                    self._stop.wait(min(self.quiet_seconds, self.idle_sleep))
                    continue
                done = process_queue_batch(self.engine, self.name, limit=self.batch,
                                           vocabulary=self.vocabulary, tag_model=self.tag_model)
            except sa.exc.DBAPIError as exc:
                log.warning("tags worker waiting for the database: %s", exc.orig)
                done = 0
            if not done:
                self._stop.wait(self.idle_sleep)

    def ingest_busy(self) -> bool:
        """True while stores keep arriving and the oldest waiting entry is within the lag."""
        if self.quiet_seconds <= 0:
            return False
        with self.engine.connect() as conn:
            return bool(conn.execute(_INGEST_BUSY, {
                "quiet": self.quiet_seconds, "max_lag": self.max_lag_seconds, "stage": STAGE,
            }).scalar())

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)


def reparse(engine: Engine, *, vocabulary: Vocabulary | None = None, chunk: int = 1000,
            progress: Callable[[int, int], None] | None = None,
            everything: bool = False) -> int:
    """Re-parse every instance whose features are missing, or were made by another parser
    version (``PARSER_VERSION``) or another vocabulary (``Vocabulary.version``, a hash of its
    content: a site vocabulary edit counts); ``everything`` re-parses all instances.

    Resumable: an interrupted run leaves the finished chunks at the current versions and the
    next run starts with what is left (``everything`` walks the whole archive again).
    ``progress(done, total)`` is called after every chunk.
    """
    vocabulary = vocabulary or default_vocabulary()
    versions = {"version": PARSER_VERSION, "vocabulary": vocabulary.version,
                "everything": everything}
    with engine.connect() as conn:
        total = conn.execute(_COUNT_STALE, versions).scalar() or 0
    done, after = 0, ""
    while True:
        with engine.begin() as conn:
            items = conn.execute(_STALE, {**versions, "after": after, "limit": chunk}).all()
            if not items:
                break
            write_features(conn, feature_rows(items, vocabulary))
        after = items[-1][0]
        done += len(items)
        if progress is not None:
            progress(done, max(total, done))
    return done
