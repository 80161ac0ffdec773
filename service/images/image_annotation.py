"""Image clusters and retrieval codes in SQL (method.md B.2-B.7).

* ``train_image_model``: fits the two-layer dictionary pipeline (``pipelines.ddiccir``) on a
  seeded sample of the stored feature maps, saves it under ``<data_dir>/image_models``,
  annotates every image with features (training images keep the cluster and code the fit
  gave them; the others are coded as queries, B.7), then makes it the active model. Before
  annotating, ``select_ranking`` measures on the fitted images, labelled "modality|body part"
  from their tags, whether the DDicCIR codes or the pooled features rank them better, and the
  model indexes the better one (``ranking``, recorded in the model file and in
  ``image_models.parameters``); ``--ranking codes|features`` forces it.
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
from typing import Callable, Collection, Sequence

import numpy as np
import sqlalchemy as sa
import torch
from sqlalchemy.engine import Engine

from pipelines.ddiccir import (DDicCIRModel, PipelineConfig, fit_pipeline, index_entries,
                               normalise_rows, rank_by_code, select_ranking)

from ..logs import log_progress
from ..progress import progress as progress_bar
from ..database.schema import image_features

log = logging.getLogger(__name__)

Progress = Callable[[str], None]

QUERY_EXCLUDE_RULES = ("none", "same-study", "same-patient")
"""Which hits ``query`` leaves out besides the query itself (:meth:`SimilarImages.same_case_uids`)."""


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
    clusters, codes = index_entries(active.model, maps)
    _store(conn, active.id, uids, clusters, codes)
    return len(uids)


def _tag_labels(engine: Engine, uids: Sequence[str]) -> np.ndarray | None:
    """"modality|body part" of each image from its own tags (the labels ``select_ranking``
    measures with); None when fewer than two distinct values exist."""
    with engine.connect() as conn:
        found = dict(conn.execute(sa.text(
            "SELECT sop_instance_uid, coalesce(modality, '') || '|' || "
            "coalesce(body_part, body_part_inferred, '') FROM instance_features "
            "WHERE sop_instance_uid = ANY(CAST(:u AS text[]))"), {"u": list(uids)}).all())
    labels = np.array([found.get(uid, "|") for uid in uids])
    return labels if len(np.unique(labels)) > 1 else None


def train_image_model(engine: Engine, feature_store: Path, model_dir: Path, *,
                      config: PipelineConfig = PipelineConfig(), max_images: int = 10_000,
                      chunk: int = 2_000, keep_models: int = 2, ranking: str = "auto",
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
        # bars on a terminal unless quiet (no ``progress``); the steps go to the log
        with progress_bar(total=config.max_outer_iter, desc="image-model: fit", unit="pass",
                          quiet=progress is None) as bar:
            def fitted_pass(record) -> None:
                _say(progress, f"image model {model_id}: pass {record.iteration}: "
                               f"{json.dumps(record.to_dict())[:300]}")
                bar.update()

            model = fit_pipeline(maps, pooled, config, progress=fitted_pass)
        fitted = time.perf_counter()
        # codes or features: whichever ranks this site's images better by their own tags
        model = select_ranking(model, pooled, _tag_labels(engine, [r.sop_instance_uid
                                                                   for r in sample]),
                               ranking=ranking)
        _say(progress, f"image model {model_id}: ranking by {model.ranking} "
                       f"({model.selection.get('reason', 'requested')})")
        model_dir.mkdir(parents=True, exist_ok=True)
        path = model_dir / f"image-model-{model_id}.pt"
        model.save(path)
        with engine.begin() as conn:
            conn.execute(sa.text(
                "UPDATE image_models SET status = 'annotating', path = :path, "
                "history = CAST(:h AS jsonb), parameters = parameters || CAST(:s AS jsonb) "
                "WHERE id = :id"),
                {"id": model_id, "path": str(path),
                 "h": json.dumps([r.to_dict() for r in model.history]),
                 "s": json.dumps({"ranking": model.ranking, "selection": model.selection})})
            if model.ranking == "codes":
                _store(conn, model_id, [r.sop_instance_uid for r in sample], model.labels,
                       model.codes)
            else:
                _store(conn, model_id, [r.sop_instance_uid for r in sample],
                       *index_entries(model, maps))
        annotated = len(sample)
        after = ""
        bar = progress_bar(total=total, initial=annotated, desc="image-model: annotate",
                           unit="image", quiet=progress is None)
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
                clusters, codes = index_entries(model, chunk_maps)
                _store(conn, model_id, [r.sop_instance_uid for r in rows], clusters, codes)
            annotated += len(rows)
            after = rows[-1].sop_instance_uid
            bar.update(len(rows))
            _say(progress, f"image model {model_id}: {annotated:,}/{total:,} images annotated")
        bar.close()
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
    tag_cluster_outlier: bool | None = None  # its tags fit no tag cluster (docs/clustering.md)


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
        return index_entries(active.model, maps)

    def rank(self, clusters: torch.Tensor, codes: torch.Tensor, top_n: int, *,
             exclude: str | Collection[str] | None = None
             ) -> list[list[tuple[str, float, int, bool]]]:
        """Top ``top_n`` hits per query; ``exclude``: SOP Instance UIDs that are never hits
        (the query itself, its study or patient: :meth:`same_case_uids`)."""
        _, uids, index_clusters, index_codes = self._load_index()
        left_out = ({exclude} if isinstance(exclude, str) else set(exclude or ()))
        indices, scores = rank_by_code(codes.float(), clusters, index_codes, index_clusters,
                                       top_n + len(left_out), index_is_normalised=True)
        out = []
        for row, (hit_rows, hit_scores) in enumerate(zip(indices.tolist(), scores.tolist())):
            hits = [(uids[i], float(s), int(index_clusters[i]),
                     int(index_clusters[i]) == int(clusters[row]))
                    for i, s in zip(hit_rows, hit_scores) if i >= 0 and uids[i] not in left_out]
            out.append(hits[:top_n])
        return out

    def same_case_uids(self, rule: str, *, sop_instance_uid: str | None = None,
                       study_instance_uid: str | None = None, patient_id: str | None = None,
                       issuer_of_patient_id: str = "") -> set[str]:
        """SOP Instance UIDs that must not be hits of a query under ``rule``.

        Always the query itself (``sop_instance_uid``); with ``"same-study"`` also every
        stored instance of its study, with ``"same-patient"`` every stored instance of its
        patient (PatientID + issuer) and study. A stored query's study and patient come from
        the database; a file's from its header (``study_instance_uid``, ``patient_id``).
        """
        if rule not in QUERY_EXCLUDE_RULES:
            raise ValueError(f"exclude must be one of {', '.join(QUERY_EXCLUDE_RULES)}, "
                             f"got {rule!r}")
        left_out = {sop_instance_uid} if sop_instance_uid else set()
        if rule == "none":
            return left_out
        with self.engine.connect() as conn:
            if sop_instance_uid:
                stored = conn.execute(sa.text(
                    "SELECT i.study_instance_uid, p.patient_id, p.issuer_of_patient_id "
                    "FROM instances i JOIN studies s USING (study_instance_uid) "
                    "JOIN patients p ON p.id = s.patient_pk WHERE i.sop_instance_uid = :u"),
                    {"u": sop_instance_uid}).one_or_none()
                if stored is not None:
                    study_instance_uid, patient_id, issuer_of_patient_id = stored
            if study_instance_uid:
                left_out.update(conn.execute(sa.text(
                    "SELECT sop_instance_uid FROM instances WHERE study_instance_uid = :s"),
                    {"s": study_instance_uid}).scalars())
            if rule == "same-patient" and patient_id:  # "" is no one in particular
                left_out.update(conn.execute(sa.text(
                    "SELECT i.sop_instance_uid FROM instances i JOIN studies s "
                    "USING (study_instance_uid) JOIN patients p ON p.id = s.patient_pk "
                    "WHERE p.patient_id = :p AND p.issuer_of_patient_id = :i"),
                    {"p": patient_id, "i": issuer_of_patient_id or ""}).scalars())
        return left_out

    def with_tags(self, ranked: list[tuple[str, float, int, bool]]) -> list[Hit]:
        with self.engine.connect() as conn:
            tags = {row[0]: row[1:] for row in conn.execute(sa.text(
                "SELECT f.sop_instance_uid, t.tag_cluster, f.modality, "
                "coalesce(f.body_part, f.body_part_inferred), t.is_outlier "
                "FROM instance_features f "
                "LEFT JOIN instance_tag_cluster t USING (sop_instance_uid) "
                "WHERE f.sop_instance_uid = ANY(CAST(:u AS text[]))"),
                {"u": [r[0] for r in ranked]})}
        return [Hit(uid, score, cluster, same, *tags.get(uid, (None, None, None, None)))
                for uid, score, cluster, same in ranked]

    # -- a DICOM file as the query: the active model's own backbone ---------------------

    def feature_backbone(self) -> tuple[ActiveImageModel, str | None]:
        """The active image model, and the weights file an image worker recorded for the
        features it was fitted on (``image_backbones``; None when none did)."""
        active, *_ = self._load_index()
        with self.engine.connect() as conn:
            recorded = conn.execute(sa.text(
                "SELECT weights_path FROM image_backbones WHERE model_version = :v"),
                {"v": active.feature_model_version}).scalar_one_or_none()
        return active, recorded

    def query_backbone(self, weights: str | Path | None):
        """The backbone that makes features comparable with the active image model's.

        ``weights`` (``PACS_IMAGE_WEIGHTS``) None: the file an image worker recorded for the
        model's feature version. Raises ValueError naming the setting when there is none
        or it is not on this machine, and when ``weights`` make other features than the
        model was fitted on (their codes would land in wrong clusters, with wrong hits).
        """
        from pipelines.backbone import load_backbone, weights_version

        active, recorded = self.feature_backbone()
        version = active.feature_model_version
        if weights is None:
            if recorded is None:
                raise ValueError(f"a file query needs the weights that made image model "
                                 f"{active.id}'s features ({version}); no image worker recorded "
                                 "them: set PACS_IMAGE_WEIGHTS")
            if not Path(recorded).is_file():
                raise ValueError(f"a file query needs the weights that made image model "
                                 f"{active.id}'s features ({version}): the image worker used "
                                 f"{recorded}, which is not on this machine; set "
                                 "PACS_IMAGE_WEIGHTS to a copy")
            weights = recorded
        elif not Path(weights).is_file():
            raise ValueError(f"PACS_IMAGE_WEIGHTS={weights}: no such file")
        made = weights_version(weights)
        if made != version:
            raise ValueError(
                f"PACS_IMAGE_WEIGHTS={weights} makes features {made}, but image model "
                f"{active.id} was fitted on features {version}"
                + (f" (weights {recorded})" if recorded else "")
                + ": its clusters and hits would be wrong; use those weights or unset "
                  "PACS_IMAGE_WEIGHTS")
        return load_backbone(weights, device=self.device)

    def input_size(self) -> int:
        """The input side that gives the active model's map shape (DenseNet121's maps are
        1/32 of the input: 224 -> 7 x 7), i.e. the image worker's input size."""
        active, *_ = self._load_index()
        return int(active.model.map_shape[-1]) * BACKBONE_STRIDE

    def code_file(self, path: str | Path, weights: str | Path | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image cluster and retrieval code of a DICOM file, through the active model's
        backbone (:meth:`query_backbone`) at the worker's input size."""
        from pipelines.backbone import extract_features
        from pipelines.pixels import file_to_image

        backbone = self.query_backbone(weights)
        image = torch.from_numpy(file_to_image(path, size=self.input_size()))
        maps, _ = extract_features(backbone, image[None])
        return self.code_maps(maps)


BACKBONE_STRIDE = 32
"""Input pixels per feature-map cell of DenseNet121 (five halvings)."""


def record_backbone(engine: Engine, model_version: str, weights_path: str | Path) -> None:
    """Remember which weights file makes features of ``model_version`` (the image worker
    calls this when it starts), for file queries (:meth:`SimilarImages.query_backbone`)."""
    with engine.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO image_backbones (model_version, weights_path) VALUES (:v, :p) "
            "ON CONFLICT (model_version) DO UPDATE SET weights_path = EXCLUDED.weights_path, "
            "recorded_at = now()"), {"v": model_version, "p": str(Path(weights_path).resolve())})


def query_identity(uid: str | None = None, file: str | Path | None = None) -> dict:
    """Who a query is, for :meth:`SimilarImages.same_case_uids`: a stored instance's UID, or
    a DICOM file's SOP Instance UID, StudyInstanceUID, PatientID and issuer (header only)."""
    if uid:
        return {"sop_instance_uid": uid}
    import pydicom

    header = pydicom.dcmread(file, stop_before_pixels=True, force=True,
                             specific_tags=["SOPInstanceUID", "StudyInstanceUID", "PatientID",
                                            "IssuerOfPatientID"])
    text = lambda keyword: str(header.get(keyword, "") or "").strip() or None  # noqa: E731
    return {"sop_instance_uid": text("SOPInstanceUID"),
            "study_instance_uid": text("StudyInstanceUID"), "patient_id": text("PatientID"),
            "issuer_of_patient_id": text("IssuerOfPatientID") or ""}

