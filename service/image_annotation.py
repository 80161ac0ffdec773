"""Image clusters and retrieval codes in SQL (issue 7, method.md B.2-B.7).

* ``train_image_model``: fits the two-layer dictionary pipeline (``pipelines.ddiccir``) on a
  seeded sample of the stored feature maps, saves it under ``<data_dir>/image_models``,
  annotates every image with features (training images keep the cluster and code the fit
  gave them; the others are coded as queries, B.7), then makes it the active model.
* ``annotate_batch``: the image worker codes each new image with the active model in the
  same transaction that stores its features.
* ``similar``: query-by-image: a stored SOP Instance UID or a DICOM file in, the top-N
  instances out, ranked by cosine of retrieval codes inside the query's cluster first.
  SQL users have the same ranking in ``similar_images(uid, n)``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import sqlalchemy as sa
import torch
from sqlalchemy.engine import Engine

from pipelines.ddiccir import (DDicCIRModel, PipelineConfig, encode_queries, fit_pipeline,
                               normalise_rows, rank_by_code)

from .logs import log_progress
from .schema import image_features

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


def _say(progress: Progress | None, message: str) -> None:
    log_progress(log, progress, message)


def vector_literal(values: np.ndarray) -> str:
    """pgvector's text form of a vector, for ``CAST(:v AS vector)`` in bound parameters."""
    return "[" + ",".join(f"{v:.7g}" for v in np.asarray(values).tolist()) + "]"


def load_maps(feature_store: Path, refs: Sequence[tuple[str, int]]) -> np.ndarray:
    """Feature maps (N, C, H, W) float16 for ``(shard, index)`` references, each shard read
    once through a memory map."""
    by_shard: dict[str, list[int]] = {}
    for position, (shard, _) in enumerate(refs):
        by_shard.setdefault(shard, []).append(position)
    out: np.ndarray | None = None
    for shard, positions in by_shard.items():
        stored = np.load(feature_store / shard, mmap_mode="r", allow_pickle=False)
        if out is None:
            out = np.empty((len(refs), *stored.shape[1:]), dtype=np.float16)
        out[positions] = stored[[refs[p][1] for p in positions]]
    return out if out is not None else np.empty((0,), dtype=np.float16)


def _feature_version(conn: sa.Connection) -> str:
    version = conn.execute(sa.text(
        "SELECT model_version FROM image_features WHERE status = 'done' "
        "ORDER BY computed_at DESC LIMIT 1")).scalar_one_or_none()
    if version is None:
        raise ValueError("no image features yet: run `pacs-annotate worker --stage image`")
    return version


@dataclass
class ActiveImageModel:
    id: int
    feature_model_version: str
    model: DDicCIRModel


class ActiveImageModelCache:
    """The active image model, reloaded when another one becomes active."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self._active: ActiveImageModel | None = None

    def active(self, conn: sa.Connection) -> ActiveImageModel | None:
        row = conn.execute(sa.text(
            "SELECT id, feature_model_version, path FROM image_models WHERE is_active "
            "FOR SHARE")).one_or_none()
        if row is None:
            return None
        if self._active is None or self._active.id != row.id:
            self._active = ActiveImageModel(row.id, row.feature_model_version,
                                            DDicCIRModel.load(row.path, device=self.device))
        return self._active


_INSERT = sa.text(
    "INSERT INTO image_annotations (model_id, sop_instance_uid, image_cluster, retrieval_code) "
    "VALUES (:model, :sop, :cluster, CAST(:code AS vector)) ON CONFLICT (model_id, "
    "sop_instance_uid) DO UPDATE SET image_cluster = EXCLUDED.image_cluster, "
    "retrieval_code = EXCLUDED.retrieval_code, annotated_at = now()")


def _store(conn: sa.Connection, model_id: int, uids: Sequence[str], clusters: torch.Tensor,
           codes: torch.Tensor) -> None:
    if uids:
        conn.execute(_INSERT, [
            {"model": model_id, "sop": uid, "cluster": int(c), "code": vector_literal(code)}
            for uid, c, code in zip(uids, clusters.cpu().tolist(),
                                    codes.detach().cpu().float().numpy())])


def annotate_batch(conn: sa.Connection, cache: ActiveImageModelCache, feature_model_version: str,
                   uids: Sequence[str], maps: torch.Tensor) -> int:
    """Code freshly computed maps with the active model (B.7) inside ``conn``'s transaction;
    nothing when there is no active model or it was fitted on other features."""
    active = cache.active(conn)
    if (active is None or active.feature_model_version != feature_model_version
            or not uids or tuple(maps.shape[1:]) != tuple(active.model.map_shape)):
        return 0
    clusters, codes, _ = encode_queries(active.model, maps)
    _store(conn, active.id, uids, clusters, codes)
    return len(uids)


def train_image_model(engine: Engine, feature_store: Path, model_dir: Path, *,
                      config: PipelineConfig = PipelineConfig(), max_images: int = 10_000,
                      chunk: int = 2_000, keep_models: int = 2,
                      progress: Progress | None = None) -> int:
    """Fit, save, annotate everything, switch (see the module docstring); returns its id."""
    started = time.perf_counter()
    with engine.begin() as conn:
        version = _feature_version(conn)
        total = conn.execute(sa.text(
            "SELECT count(*) FROM image_features WHERE status = 'done' AND model_version = :v"),
            {"v": version}).scalar_one()
        sample = conn.execute(
            sa.select(image_features.c.sop_instance_uid, image_features.c.map_shard,
                      image_features.c.map_index, image_features.c.feature)
            .where(image_features.c.status == "done", image_features.c.model_version == version)
            .order_by(sa.func.md5(image_features.c.sop_instance_uid + str(config.seed)))
            .limit(max_images)).all()
        if len(sample) < config.n_clusters * 2:
            raise ValueError(f"{len(sample)} images with features of {version}: too few for "
                             f"{config.n_clusters} image clusters")
        model_id = conn.execute(sa.text(
            "INSERT INTO image_models (feature_model_version, parameters, images) VALUES "
            "(:v, CAST(:p AS jsonb), :n) RETURNING id"),
            {"v": version, "p": json.dumps({**config.to_dict(), "max_images": max_images}),
             "n": len(sample)}).scalar_one()
    _say(progress, f"image model {model_id}: fitting on {len(sample):,} of {total:,} images "
                   f"({version})")
    try:
        maps = torch.from_numpy(load_maps(feature_store, [(r.map_shard, r.map_index)
                                                          for r in sample]))
        pooled = torch.from_numpy(np.stack([np.asarray(r.feature, dtype=np.float32)
                                            for r in sample]))
        loaded = time.perf_counter()
        model = fit_pipeline(maps, pooled, config, progress=lambda record: _say(
            progress, f"image model {model_id}: pass {record.iteration}: "
                      f"{json.dumps(record.to_dict())[:300]}"))
        fitted = time.perf_counter()
        model_dir.mkdir(parents=True, exist_ok=True)
        path = model_dir / f"image-model-{model_id}.pt"
        model.save(path)
        with engine.begin() as conn:
            conn.execute(sa.text(
                "UPDATE image_models SET status = 'annotating', path = :path, "
                "history = CAST(:h AS jsonb) WHERE id = :id"),
                {"id": model_id, "path": str(path),
                 "h": json.dumps([r.to_dict() for r in model.history])})
            _store(conn, model_id, [r.sop_instance_uid for r in sample], model.labels,
                   model.codes)
        annotated = len(sample)
        after = ""
        while True:
            with engine.begin() as conn:
                rows = conn.execute(sa.text(
                    "SELECT f.sop_instance_uid, f.map_shard, f.map_index FROM image_features f "
                    "WHERE f.status = 'done' AND f.model_version = :v AND f.sop_instance_uid > :a "
                    "AND NOT EXISTS (SELECT 1 FROM image_annotations a WHERE a.model_id = :m "
                    "AND a.sop_instance_uid = f.sop_instance_uid) "
                    "ORDER BY f.sop_instance_uid LIMIT :n"),
                    {"v": version, "a": after, "m": model_id, "n": chunk}).all()
                if not rows:
                    break
                chunk_maps = torch.from_numpy(load_maps(
                    feature_store, [(r.map_shard, r.map_index) for r in rows]))
                clusters, codes, _ = encode_queries(model, chunk_maps)
                _store(conn, model_id, [r.sop_instance_uid for r in rows], clusters, codes)
            annotated += len(rows)
            after = rows[-1].sop_instance_uid
            _say(progress, f"image model {model_id}: {annotated:,}/{total:,} images annotated")
        timings = {"load": loaded - started, "fit": fitted - loaded,
                   "annotate": time.perf_counter() - fitted}
        with engine.begin() as conn:
            conn.execute(sa.text("SELECT id FROM image_models WHERE is_active FOR UPDATE"))
            conn.execute(sa.text("UPDATE image_models SET is_active = false WHERE is_active"))
            conn.execute(sa.text(
                "UPDATE image_models SET status = 'finished', is_active = true, "
                "finished_at = now(), annotated = :n, timings = CAST(:t AS jsonb) "
                "WHERE id = :id"), {"id": model_id, "n": annotated, "t": json.dumps(timings)})
            conn.execute(sa.text(
                "DELETE FROM image_annotations WHERE model_id IN (SELECT id FROM image_models "
                "WHERE NOT is_active AND id NOT IN (SELECT id FROM image_models WHERE status = "
                "'finished' ORDER BY id DESC LIMIT :keep))"), {"keep": max(keep_models, 1)})
    except Exception as exc:
        with engine.begin() as conn:
            conn.execute(sa.text(
                "UPDATE image_models SET status = 'failed', error = :e WHERE id = :id"),
                {"id": model_id, "e": f"{type(exc).__name__}: {exc}"})
        raise
    _say(progress, f"image model {model_id}: active; {model.config.n_clusters} image clusters, "
                   f"stopped on {model.stop_reason} after {len(model.history)} passes")
    return model_id


# ------------------------------------------------------------------ query by image


@dataclass(frozen=True)
class Hit:
    sop_instance_uid: str
    score: float
    image_cluster: int
    same_cluster: bool
    tag_cluster: int | None
    modality: str | None
    body_part: str | None


class SimilarImages:
    """Query-by-image over the active model's index, held in memory (warm queries)."""

    def __init__(self, engine: Engine, *, device: str = "cpu"):
        self.engine = engine
        self.device = device
        self.cache = ActiveImageModelCache(device)
        self._index: tuple[int, list[str], torch.Tensor, torch.Tensor] | None = None

    def _load_index(self) -> tuple[ActiveImageModel, list[str], torch.Tensor, torch.Tensor]:
        with self.engine.connect() as conn:
            active = self.cache.active(conn)
            if active is None:
                raise ValueError("no active image model: run `pacs-annotate image-model`")
            if self._index is None or self._index[0] != active.id:
                from pgvector.sqlalchemy import Vector

                rows = conn.execute(sa.select(
                    sa.column("sop_instance_uid"), sa.column("image_cluster"),
                    sa.column("retrieval_code", Vector())).select_from(
                    sa.table("image_annotations")).where(sa.column("model_id") == active.id)
                    .order_by(sa.column("sop_instance_uid"))).all()
                uids = [r[0] for r in rows]
                clusters = torch.tensor([r[1] for r in rows], dtype=torch.int64)
                codes = torch.from_numpy(np.stack([np.asarray(r[2], dtype=np.float32)
                                                   for r in rows]))
                codes = normalise_rows(codes)
                self._index = (active.id, uids, clusters.to(self.device),
                               codes.to(self.device))
        return active, self._index[1], self._index[2], self._index[3]

    def code_of(self, sop_instance_uid: str) -> tuple[torch.Tensor, torch.Tensor]:
        active, uids, clusters, codes = self._load_index()
        position = np.searchsorted(uids, sop_instance_uid)
        if position >= len(uids) or uids[position] != sop_instance_uid:
            raise KeyError(f"{sop_instance_uid} has no retrieval code in image model {active.id}")
        return clusters[position:position + 1], codes[position:position + 1]

    def code_maps(self, maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        active, *_ = self._load_index()
        clusters, codes, _ = encode_queries(active.model, maps)
        return clusters, codes

    def rank(self, clusters: torch.Tensor, codes: torch.Tensor, top_n: int, *,
             exclude: str | None = None) -> list[list[tuple[str, float, int, bool]]]:
        _, uids, index_clusters, index_codes = self._load_index()
        indices, scores = rank_by_code(codes.float(), clusters, index_codes, index_clusters,
                                       top_n + (1 if exclude else 0), index_is_normalised=True)
        out = []
        for row, (hit_rows, hit_scores) in enumerate(zip(indices.tolist(), scores.tolist())):
            hits = [(uids[i], float(s), int(index_clusters[i]),
                     int(index_clusters[i]) == int(clusters[row]))
                    for i, s in zip(hit_rows, hit_scores) if i >= 0 and uids[i] != exclude]
            out.append(hits[:top_n])
        return out

    def with_tags(self, ranked: list[tuple[str, float, int, bool]]) -> list[Hit]:
        with self.engine.connect() as conn:
            tags = {row[0]: row[1:] for row in conn.execute(sa.text(
                "SELECT f.sop_instance_uid, t.tag_cluster, f.modality, "
                "coalesce(f.body_part, f.body_part_inferred) FROM instance_features f "
                "LEFT JOIN instance_tag_cluster t USING (sop_instance_uid) "
                "WHERE f.sop_instance_uid = ANY(CAST(:u AS text[]))"),
                {"u": [r[0] for r in ranked]})}
        return [Hit(uid, score, cluster, same, *tags.get(uid, (None, None, None)))
                for uid, score, cluster, same in ranked]
