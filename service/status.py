"""What ``status`` reports: counters, archive size and queue depth, read from SQL."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from .database.work_queue import IMAGE_STAGE_IN_USE

_COUNTERS = sa.text(
    """
    SELECT coalesce(sum(received), 0), coalesce(sum(stored), 0), coalesce(sum(duplicates), 0),
           coalesce(sum(rejected), 0), coalesce(sum(bytes_stored), 0), max(updated_at)
    FROM ingest_stats
    """
)
_ARCHIVE = sa.text(
    """
    SELECT (SELECT count(*) FROM patients), (SELECT count(*) FROM studies),
           (SELECT count(*) FROM series), (SELECT count(*) FROM instances),
           (SELECT coalesce(sum(file_size), 0) FROM instances)
    """
)
_DEFECTS = sa.text(
    "SELECT rule, count(*) FROM tolerated_defects GROUP BY rule ORDER BY rule"
)
_QUEUE = sa.text(
    "SELECT stage, status, count(*) FROM work_queue GROUP BY stage, status ORDER BY stage, status"
)
# stored instances that wait for the image stage without an item: queued by the next image
# worker start (or the tags stage, for new ones, once the image stage is in use)
_IMAGE_STAGE = sa.text(
    f"SELECT {IMAGE_STAGE_IN_USE}, (SELECT count(*) FROM instances i WHERE NOT EXISTS "
    "(SELECT 1 FROM work_queue q WHERE q.stage = 'image' "
    "AND q.sop_instance_uid = i.sop_instance_uid))"
)


def collect_status(engine: Engine) -> dict[str, Any]:
    with engine.connect() as conn:
        received, stored, duplicates, rejected, nbytes, updated = conn.execute(_COUNTERS).one()
        patients, studies, series, instances, archive_bytes = conn.execute(_ARCHIVE).one()
        queue: dict[str, dict[str, int]] = {}
        for stage, status, count in conn.execute(_QUEUE):
            queue.setdefault(stage, {})[status] = count
        defects = {rule: int(count) for rule, count in conn.execute(_DEFECTS)}
        image_in_use, not_queued = conn.execute(_IMAGE_STAGE).one()
    return {
        "counters": {
            "received": int(received), "stored": int(stored), "duplicates": int(duplicates),
            "rejected": int(rejected), "bytes_stored": int(nbytes),
            "updated_at": updated.isoformat() if updated else None,
        },
        "archive": {
            "patients": patients, "studies": studies, "series": series,
            "instances": instances, "bytes": int(archive_bytes),
        },
        "queue": queue,
        "image_stage": {"in_use": bool(image_in_use), "not_queued": int(not_queued)},
        # stored instances that tolerant ingest let through, by rule (table tolerated_defects)
        "tolerated_defects": defects,
    }


def format_status(status: dict[str, Any]) -> str:
    c, a = status["counters"], status["archive"]
    lines = [
        "ingest counters (all listener processes, since the database was created)",
        f"  received    {c['received']:>12,}",
        f"  stored      {c['stored']:>12,}",
        f"  duplicates  {c['duplicates']:>12,}",
        f"  rejected    {c['rejected']:>12,}",
        f"  bytes       {c['bytes_stored']:>12,}",
        f"  last update {c['updated_at'] or '-'}",
        "archive",
        f"  patients {a['patients']:,}  studies {a['studies']:,}  series {a['series']:,}  "
        f"instances {a['instances']:,}  ({a['bytes'] / 1e6:,.1f} MB)",
        "tolerated defects (stored anyway; rows in tolerated_defects)",
    ]
    if not status["tolerated_defects"]:
        lines.append("  (none)")
    for rule, count in status["tolerated_defects"].items():
        lines.append(f"  {rule:<22} {count:>8,}")
    lines.append("work queue")
    if not status["queue"]:
        lines.append("  (empty)")
    for stage, counts in status["queue"].items():
        pending = counts.get("pending", 0)
        rest = ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items()) if k != "pending")
        lines.append(f"  {stage:<10} pending {pending:,}" + (f"  ({rest})" if rest else ""))
    image = status.get("image_stage") or {}
    waiting = image.get("not_queued", 0)
    if waiting and image.get("in_use"):
        lines.append(f"  image      + {waiting:,} stored instance{'' if waiting == 1 else 's'} "
                     "without an image item (queued when an image worker starts)")
    elif waiting:
        lines.append(f"  image      not in use yet: {waiting:,} stored instances wait for the "
                     "first `worker --stage image`")
    return "\n".join(lines)
