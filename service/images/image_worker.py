"""The image worker (method.md B.1): stored DICOM images to DenseNet121 features.

It claims batches of the ``image`` queue stage (``FOR UPDATE SKIP LOCKED``, so any number of
workers share the queue), decodes the files in a pool of processes while the previous
batch runs through the network, and stores per instance:

* the 1024-value global average in ``image_features.feature`` (pgvector, HNSW-indexed for
  cosine search straight from SQL),
* the 1024 x 7 x 7 map in a float16 shard of the feature store (``service.images.feature_store``),
  referenced by ``map_shard`` / ``map_index``,
* the weights' ``model_version``.

Instances without an image (SR, PR, RT plans, encapsulated PDF, ...) get a ``skipped`` row
with the reason. A file that cannot be decoded goes back to the queue with its error and
exponential backoff, and is marked ``failed`` after ``image_max_attempts`` tries, so a
poison image never blocks the queue. A worker that dies mid-batch loses nothing: its claims
stay ``running`` until ``release_stale`` hands them to another worker, and rows are upserts.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Sequence

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ..database import work_queue
from .feature_store import write_shard
from .image_annotation import (ActiveImageModelCache, annotate_batch, record_backbone,
                               vector_literal)

log = logging.getLogger(__name__)

STAGE = "image"


@dataclass(frozen=True)
class Decoded:
    """The outcome of decoding one claimed instance (built in a decode process)."""

    claim: work_queue.Claim
    image: np.ndarray | None = None  # (3, H, W) float32, normalised
    skipped: str | None = None  # not an image: why
    error: str | None = None  # could not decode: why (retried)
    permanent: bool = False  # the error is not retried (no decoder, unreadable data set)


# the last_error of an item failed for want of a decoder; requeue_missing_decoders finds them
NEEDS_DECODER = "needs a decoder: "


def decode_instance(claim: work_queue.Claim, path: str | None, size: int) -> Decoded:
    """Runs in a decode process: one stored file to a network input (pipelines.pixels)."""
    from pipelines.pixels import (MissingDecoder, NotAnImage, PixelDecodeError,
                                  UnreadableDataset, file_to_image)

    if path is None:
        return Decoded(claim, skipped="instance or file no longer stored")
    try:
        return Decoded(claim, image=file_to_image(path, size=size))
    except NotAnImage as exc:
        return Decoded(claim, skipped=str(exc) or "not an image")
    except MissingDecoder as exc:  # trying again cannot help until the package is installed
        return Decoded(claim, error=f"{NEEDS_DECODER}{exc}", permanent=True)
    except UnreadableDataset as exc:  # reading again gives the same
        return Decoded(claim, error=f"cannot decode: {exc}", permanent=True)
    except PixelDecodeError as exc:
        return Decoded(claim, error=f"cannot decode: {exc}")
    except Exception as exc:  # a decoder bug must fail this item, not the worker
        return Decoded(claim, error=f"{type(exc).__name__}: {exc}")


def enqueue_missing(engine: Engine) -> int:
    """Queue every stored instance that has no ``image`` work item yet (the backlog from
    before image workers ran, or when ``queue_stages`` leaves ``image`` out)."""
    with engine.begin() as conn:
        return conn.execute(sa.text(
            "INSERT INTO work_queue (stage, sop_instance_uid) SELECT :stage, i.sop_instance_uid "
            "FROM instances i WHERE NOT EXISTS (SELECT 1 FROM work_queue q WHERE q.stage = :stage "
            "AND q.sop_instance_uid = i.sop_instance_uid) ON CONFLICT DO NOTHING"),
            {"stage": STAGE}).rowcount


def requeue_missing_decoders(engine: Engine) -> int:
    """Give the items failed for want of a decoder one more try (a worker start: the
    package may have been installed since); those still without one fail again at once."""
    with engine.begin() as conn:
        return conn.execute(sa.text(
            "UPDATE work_queue SET status = 'pending', attempts = 0, available_at = now(), "
            "updated_at = now() WHERE stage = :stage AND status = 'failed' "
            "AND last_error LIKE :prefix"),
            {"stage": STAGE, "prefix": NEEDS_DECODER + "%"}).rowcount


_UPSERT = sa.text(
    "INSERT INTO image_features (sop_instance_uid, model_version, status, skip_reason, feature, "
    "map_shard, map_index, computed_at) VALUES (:sop, :model, :status, :reason, "
    "CAST(:feature AS vector), :shard, :index, now()) ON CONFLICT (sop_instance_uid) DO UPDATE "
    "SET model_version = EXCLUDED.model_version, status = EXCLUDED.status, "
    "skip_reason = EXCLUDED.skip_reason, feature = EXCLUDED.feature, "
    "map_shard = EXCLUDED.map_shard, map_index = EXCLUDED.map_index, computed_at = now()"
)
_DONE = sa.text(
    "UPDATE work_queue SET status = 'done', last_error = NULL, updated_at = now() "
    "WHERE id = ANY(CAST(:ids AS bigint[])) AND status = 'running'"
)


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class ImageWorker:
    """Claims ``image`` work items and stores their features; see the module docstring."""

    def __init__(self, engine: Engine, backbone, *, storage_root: Path, feature_store: Path,
                 name: str, batch: int = 64, decode_workers: int = 0, max_attempts: int = 3,
                 image_size: int = 224, stale_after: float = 600.0, idle_sleep: float = 0.5,
                 retry_backoff: float = 5.0, weights_path: str | Path | None = None):
        self.engine = engine
        self.backbone = backbone
        self.storage_root = Path(storage_root)
        self.feature_store = Path(feature_store)
        self.name = name
        self.batch = batch
        self.max_attempts = max_attempts
        self.image_size = image_size
        self.stale_after = stale_after
        self.idle_sleep = idle_sleep
        self.retry_backoff = retry_backoff
        workers = decode_workers or len(os.sched_getaffinity(0))
        # spawn: the parent may hold CUDA state and threads, which fork would copy broken
        self._pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"))
        self.stats = {"done": 0, "skipped": 0, "retried": 0, "failed": 0}
        self.image_model = ActiveImageModelCache(str(backbone.device))
        if weights_path is not None:  # so `query FILE` finds the backbone of these features
            record_backbone(engine, backbone.model_version, weights_path)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "ImageWorker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- one batch -------------------------------------------------------------------

    def _submit(self, claims: Sequence[work_queue.Claim]) -> list[Future]:
        with self.engine.connect() as conn:
            paths = dict(conn.execute(sa.text(
                "SELECT sop_instance_uid, file_path FROM instances "
                "WHERE sop_instance_uid = ANY(CAST(:uids AS text[]))"),
                {"uids": [c.sop_instance_uid for c in claims]}).all())
        return [self._pool.submit(
                    decode_instance, claim,
                    str(self.storage_root / paths[claim.sop_instance_uid])
                    if claim.sop_instance_uid in paths else None,
                    self.image_size)
                for claim in claims]

    def _finish(self, futures: Sequence[Future]) -> int:
        from pipelines.backbone import extract_features

        decoded = [future.result() for future in futures]
        images = [d for d in decoded if d.image is not None]
        maps = None
        rows = [{"sop": d.claim.sop_instance_uid, "model": self.backbone.model_version,
                 "status": "skipped", "reason": d.skipped[:500], "feature": None, "shard": None,
                 "index": None} for d in decoded if d.skipped is not None]
        if images:
            import torch

            batch = torch.from_numpy(np.stack([d.image for d in images]))
            maps, pooled = extract_features(self.backbone, batch)
            shard = write_shard(self.feature_store, self.backbone.model_version, maps.numpy())
            rows += [{"sop": d.claim.sop_instance_uid, "model": self.backbone.model_version,
                      "status": "done", "reason": None, "feature": vector_literal(vector),
                      "shard": shard, "index": index}
                     for index, (d, vector) in enumerate(zip(images, pooled.numpy()))]
        finished = [d.claim.id for d in decoded if d.error is None]
        with self.engine.begin() as conn:
            if rows:
                conn.execute(_UPSERT, rows)
            if maps is not None:
                # image cluster and retrieval code with the active image model
                annotate_batch(conn, self.image_model, self.backbone.model_version,
                               [d.claim.sop_instance_uid for d in images], maps)
            if finished:
                conn.execute(_DONE, {"ids": finished})
        for d in decoded:
            if d.error is not None:
                outcome = work_queue.fail(self.engine, d.claim.id, d.error,
                                          max_attempts=1 if d.permanent else self.max_attempts,
                                          backoff_seconds=self.retry_backoff)
                self.stats["failed" if outcome == "failed" else "retried"] += 1
                log.warning("image %s: %s (%s)", d.claim.sop_instance_uid, d.error, outcome)
        self.stats["done"] += len(images)
        self.stats["skipped"] += sum(d.skipped is not None for d in decoded)
        return len(decoded)

    def run_once(self) -> int:
        """Claim, decode and store one batch; returns how many items were claimed."""
        claims = work_queue.claim(self.engine, STAGE, self.name, self.batch)
        if not claims:
            return 0
        return self._finish(self._submit(claims))

    def drain(self, stop: threading.Event, on_batch=None) -> None:
        """Until no item of the stage is pending (or ``stop`` is set): items waiting for a
        retry are waited for, so every item ends done, skipped or failed.
        ``on_batch(claimed)`` after each batch."""
        while not stop.is_set():
            claimed = self.run_once()
            if claimed:
                if on_batch is not None:
                    on_batch(claimed)
                continue
            with self.engine.connect() as conn:
                wait = conn.execute(sa.text(
                    "SELECT EXTRACT(EPOCH FROM min(available_at) - now()) FROM work_queue "
                    "WHERE stage = :stage AND status = 'pending'"), {"stage": STAGE}).scalar()
            if wait is None:
                return
            stop.wait(min(max(float(wait), 0.05), self.idle_sleep * 20))

    # -- the loop --------------------------------------------------------------------

    def run(self, stop: threading.Event, *, prefetch: int = 2) -> None:
        """Until ``stop`` is set: keep up to ``prefetch`` batches decoding while the oldest
        one runs through the network, so the GPU does not wait for decoding."""
        in_flight: deque[list[Future]] = deque()
        last_sweep = 0.0
        while not stop.is_set() or in_flight:
            try:
                if time.monotonic() - last_sweep > self.stale_after:
                    work_queue.release_stale(self.engine, STAGE, self.stale_after)
                    # a safety net: instances no tags worker forwarded (tags_worker off)
                    queued = enqueue_missing(self.engine)
                    if queued:
                        log.info("queued %d stored instances for the image stage", queued)
                    last_sweep = time.monotonic()
                claims = ([] if stop.is_set() or len(in_flight) >= prefetch else
                          work_queue.claim(self.engine, STAGE, self.name, self.batch))
                if claims:
                    in_flight.append(self._submit(claims))
                    if len(in_flight) < prefetch:
                        continue
                if in_flight:
                    self._finish(in_flight.popleft())
                elif not claims:
                    stop.wait(self.idle_sleep)
            except sa.exc.DBAPIError as exc:
                log.warning("image worker waiting for the database: %s", exc.orig)
                stop.wait(self.idle_sleep)
