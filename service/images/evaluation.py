"""Retrieval evaluation against site labels: the DDicCIR paper's Table 1.

Given a labels CSV (single-label, multi-label or IRMA codes) and the image features the image
worker stored, ``pacs-annotate evaluate`` (its command line: ``service.cli.images``) answers
"how well does retrieval work on *our* images, and what does each part of the pipeline add?"
with the paper's Table 1 layout:

==================  ==========================================================================
method              what ranks the held-out queries against the index images
==================  ==========================================================================
features            DenseNet121 pooled features (1024 values), cosine similarity; no fit
one-layer           DenseNet121 + one dictionary layer: layer 1 per cluster + max pooling,
                    no layer 2, no k-means re-iteration (``use_layer2=False, reiterate=False``)
full                DDicCIR: both layers, max pooling, k-means re-iteration (method.md B)
no-layer2           the paper's ablation "without second DL" (re-iteration kept)
no-reiteration      the paper's ablation "without k-means iteration" (layer 2 kept)
average-pooling     the paper's ablation "average pooling" instead of max
==================  ==========================================================================

Readings fixed here (docs/image_pipeline.md, "Evaluation", gives the reasons):

* **"One dictionary layer".** The paper's "DenseNet121 + DL" row is a cited baseline whose
  set-up it does not describe; it contrasts DDicCIR, its two layers and its re-iteration, with
  "shallow or one-layer dictionary learning". The nearest one-layer method this pipeline can
  express is DenseNet121 -> k-means -> per-cluster layer-1 dictionaries -> pooled codes, with
  neither of DDicCIR's two additions. It differs from ``no-layer2`` (which keeps re-iteration)
  and from ``no-reiteration`` (which keeps layer 2).
* **Protocol.** k group-disjoint folds (default 5, the paper's protocol): scikit-learn's
  ``StratifiedGroupKFold`` (seeded) over groups, stratified by label (label set for
  multi-label data, full code for IRMA). Each fold in turn is the queries; the other folds
  are both the training set and the index, as in the paper, where the database images are
  what the dictionaries are learned on. A group is a study (StudyInstanceUID, the default),
  a patient, a series, or the ``group`` column of the labels CSV: images of one group are
  never query and index at once, so near-duplicates (neighbouring slices of one scan) cannot
  inflate the numbers. Every metric is reported as the mean and the standard deviation over
  the folds. A query with nothing relevant among its candidates (its label only in its own
  fold) is left out of that fold and counted.
* **Exclusion.** ``exclude="same-study"`` / ``"same-patient"`` also removes, for each query,
  the index images of its own study / patient from its candidates (its ranking, R and the
  ideal nDCG list): needed when the groups are finer than studies (e.g. series).
* **Purity** is that of the clusters the index images belong to: the fitted model's training
  clusters, and for ``features`` the B.2 k-means clusters of the index features (the paper
  gives a purity for its DenseNet121 row, so it must have clustered the features; ranking by
  features alone does not use them).
* **IRMA error** is the mean over the top N results of each query, then over queries: the
  paper reports it in its Table 8, whose caption says "for n = 20". ``IRMA@1`` (the best hit
  only) is recorded too.
* **Timings** start from the stored features: DenseNet121 itself is not timed (the paper's
  "10 ms per query" includes it). Coding is :func:`~pipelines.ddiccir.encode_queries` per
  query, ranking is :func:`~pipelines.ddiccir.rank_by_code` against an index normalised
  beforehand (the service keeps its index normalised).
* **Cut-offs** larger than the index are dropped (recorded in ``dropped_cutoffs``): P@N is not
  defined for N beyond the number of images that can be retrieved.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import hashlib
import re
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
import sqlalchemy as sa
import torch
from sqlalchemy.engine import Engine
from torch import Tensor

from pipelines.ddiccir import (PipelineConfig, encode_queries, fit_pipeline, kmeans,
                               normalise_rows, rank_by_code)
from pipelines.retrieval_metrics import (DEFAULT_CUTOFFS, DEFAULT_NDCG_CUTOFFS, count_relevant,
                                         evaluate_rankings, irma_error, parse_irma_codes)

__all__ = [
    "DEFAULT_FOLDS", "DEFAULT_METHODS", "EXCLUDE_RULES", "EvaluationResult", "GROUP_RULES",
    "LabelError", "LabelSet", "METHODS", "Method", "MethodResult", "NoLabelledFeatures",
    "StoredFeatures", "evaluate", "evaluate_stored",
    "excluded_pairs", "format_table", "group_folds", "load_stored_features", "read_labels",
    "write_result",
]

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
LabelKind = Literal["single", "multi", "irma"]
GroupRule = Literal["study", "patient", "series", "column"]
ExcludeRule = Literal["none", "same-study", "same-patient"]

GROUP_RULES: dict[str, str] = {
    "study": "StudyInstanceUID",
    "patient": "patient (PatientID + issuer)",
    "series": "SeriesInstanceUID",
    "column": "the labels CSV's group column",
}
"""``group_by`` value -> how the table names it."""
EXCLUDE_RULES: dict[str, str] = {
    "none": "",
    "same-study": "hits from the query's own study left out",
    "same-patient": "hits from the query's own patient left out",
}
DEFAULT_FOLDS = 5
"""The paper's protocol (5-fold cross-validation)."""

UID_COLUMN = "sop_instance_uid"
GROUP_COLUMN = "group"
LABEL_COLUMNS: dict[str, LabelKind] = {"label": "single", "labels": "multi", "irma": "irma"}
"""Label column name -> kind of label set; a CSV has exactly one of them."""

_MULTI_LABEL_SEPARATORS = re.compile(r"[|;]")


class LabelError(ValueError):
    """The labels CSV cannot be used (one line for the CLI)."""


class NoLabelledFeatures(ValueError):
    """No labelled instance has stored image features."""


# --------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class LabelSet:
    """Labels of instances, read from a CSV (:func:`read_labels`).

    Attributes
    ----------
    uids : tuple of str -- SOP Instance UIDs, in file order
    names : tuple of str -- the label vocabulary, sorted; column order of ``indicator``
    indicator : ndarray of shape (len(uids), len(names)), bool
        Row i, column c is True when instance i carries label c (exactly one per row for
        single-label and IRMA data).
    kind : {"single", "multi", "irma"}
    irma_codes : tuple of str or None -- the lower-case IRMA code of each instance ("irma")
    source : str -- where the labels came from
    groups : tuple of str or None -- the ``group`` column (patient, case, ...), when present
    """

    uids: tuple[str, ...]
    names: tuple[str, ...]
    indicator: np.ndarray
    kind: LabelKind
    irma_codes: tuple[str, ...] | None = None
    source: str = ""
    groups: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.uids)

    def strata(self) -> list[str]:
        """One key per instance for the stratified split: its label, label set or code."""
        return ["|".join(self.names[c] for c in np.flatnonzero(row)) for row in self.indicator]


def read_labels(path: str | Path) -> LabelSet:
    """Read a labels CSV.

    The file has a header row with a ``sop_instance_uid`` column and exactly one of:

    * ``label``: one label per instance (single-label data);
    * ``labels``: several labels per instance separated by ``|`` or ``;`` (multi-label data,
      e.g. NIH ChestX-ray14's ``Atelectasis|Effusion``);
    * ``irma``: an IRMA code ``TTTT-DDD-AAA-BBB`` (e.g. ``1121-127-700-500``). The full code is
      the label for P/R/mAP (same code = relevant); the IRMA error is reported too.

    An optional ``group`` column names what must never be split between queries and index
    (a patient, a case); ``evaluate`` uses it when present.

    Column names are case-insensitive; other columns are ignored; a UTF-8 byte-order mark
    (spreadsheet exports) is accepted.

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    LabelSet

    Raises
    ------
    LabelError
        Empty file, no data rows, a missing or ambiguous column, an empty UID or label, a
        malformed IRMA code, an empty group, or a UID listed twice; the message names the
        row.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelError(f"{path}: cannot read labels: {exc}") from exc
    if not text.strip():
        raise LabelError(f"{path}: empty file; expected a header with {UID_COLUMN} and one of "
                         f"{', '.join(LABEL_COLUMNS)}")
    reader = csv.reader(io.StringIO(text))
    header = [name.strip().lower() for name in next(reader)]
    if UID_COLUMN not in header:
        raise LabelError(f"{path}: no {UID_COLUMN} column (header: {', '.join(header)})")
    present = [name for name in LABEL_COLUMNS if name in header]
    if len(present) != 1:
        found = "none" if not present else ", ".join(present)
        raise LabelError(f"{path}: need exactly one label column of {', '.join(LABEL_COLUMNS)}; "
                         f"found {found}")
    column = present[0]
    kind = LABEL_COLUMNS[column]
    uid_at, label_at = header.index(UID_COLUMN), header.index(column)
    group_at = header.index(GROUP_COLUMN) if GROUP_COLUMN in header else None

    uids: list[str] = []
    groups: list[str] = []
    label_sets: list[tuple[str, ...]] = []
    first_row: dict[str, int] = {}
    duplicates: list[str] = []
    for row_number, row in enumerate(reader, start=2):
        if not any(cell.strip() for cell in row):
            continue  # blank lines, e.g. a trailing one
        if len(row) <= max(uid_at, label_at, group_at or 0):
            raise LabelError(f"{path}, row {row_number}: {len(row)} fields, header has "
                             f"{len(header)}")
        uid, value = row[uid_at].strip(), row[label_at].strip()
        if not uid:
            raise LabelError(f"{path}, row {row_number}: empty {UID_COLUMN}")
        if uid in first_row:
            duplicates.append(f"{uid} (rows {first_row[uid]} and {row_number})")
            continue
        first_row[uid] = row_number
        if kind == "multi":
            parts = tuple(sorted({part.strip() for part in _MULTI_LABEL_SEPARATORS.split(value)
                                  if part.strip()}))
        else:
            parts = (value,) if value else ()
        if not parts:
            raise LabelError(f"{path}, row {row_number}: empty {column} for {uid}")
        if kind == "irma":
            try:
                parse_irma_codes([value])
            except ValueError:
                raise LabelError(f"{path}, row {row_number}: {value!r} is not an IRMA code "
                                 f"TTTT-DDD-AAA-BBB (e.g. 1121-127-700-500)") from None
            parts = (value.lower(),)
        if group_at is not None:
            group = row[group_at].strip()
            if not group:
                raise LabelError(f"{path}, row {row_number}: empty {GROUP_COLUMN} for {uid}")
            groups.append(group)
        uids.append(uid)
        label_sets.append(parts)
    if duplicates:
        raise LabelError(f"{path}: {len(duplicates)} UID(s) listed twice, e.g. "
                         f"{'; '.join(duplicates[:3])}")
    if not uids:
        raise LabelError(f"{path}: a header but no labelled instances")

    names = tuple(sorted({label for labels in label_sets for label in labels}))
    column_of = {name: c for c, name in enumerate(names)}
    indicator = np.zeros((len(uids), len(names)), dtype=bool)
    for row, labels in enumerate(label_sets):
        indicator[row, [column_of[label] for label in labels]] = True
    return LabelSet(uids=tuple(uids), names=names, indicator=indicator, kind=kind,
                    irma_codes=tuple(labels[0] for labels in label_sets)
                    if kind == "irma" else None,
                    source=str(path), groups=tuple(groups) if group_at is not None else None)


# --------------------------------------------------------------------------------------------
# Stored features
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class StoredFeatures:
    """Image features of labelled instances, as the image worker stored them.

    Attributes
    ----------
    uids : tuple of str -- in the order of the LabelSet they were loaded for
    pooled : ndarray of shape (N, C), float32 -- the pgvector ``feature`` (global average)
    maps : ndarray of shape (N, C, H, W), float16, or None -- the feature-store maps
    model_version : str -- the backbone weights the features come from
    other_version : int -- labelled instances whose features are of older weights only
    studies, patients, series : tuple of str or None
        Each instance's StudyInstanceUID, patient (the ``patients`` row id, i.e. PatientID
        and issuer) and SeriesInstanceUID: the split groups and the exclusion keys.
    """

    uids: tuple[str, ...]
    pooled: np.ndarray
    maps: np.ndarray | None
    model_version: str
    other_version: int = 0
    studies: tuple[str, ...] | None = None
    patients: tuple[str, ...] | None = None
    series: tuple[str, ...] | None = None


def load_stored_features(engine: Engine, feature_store: Path, uids: Sequence[str], *,
                         with_maps: bool = True) -> StoredFeatures:
    """Features of those ``uids`` that have them, of the newest backbone weights among them.

    Features of two backbones are not comparable, so one version is used: the one computed
    most recently, as ``image-model`` does; instances with only older features are counted in
    ``other_version``.

    Raises
    ------
    NoLabelledFeatures
        When none of ``uids`` has features (status ``done``).
    """
    from .image_annotation import load_maps

    wanted = list(dict.fromkeys(uids))
    with engine.connect() as conn:
        versions = conn.execute(sa.text(
            "SELECT model_version, count(*) FROM image_features WHERE status = 'done' "
            "AND sop_instance_uid = ANY(CAST(:u AS text[])) GROUP BY model_version "
            "ORDER BY max(computed_at) DESC"), {"u": wanted}).all()
        if not versions:
            raise NoLabelledFeatures(
                f"none of the {len(wanted):,} labelled instances has image features: ingest "
                f"them, then run `pacs-annotate worker --stage image --drain`")
        version = versions[0][0]
        from pgvector.sqlalchemy import Vector

        rows = conn.execute(
            sa.select(sa.column("sop_instance_uid"), sa.column("feature", Vector()),
                      sa.column("map_shard"), sa.column("map_index"))
            .select_from(sa.table("image_features"))
            .where(sa.text("status = 'done' AND model_version = :v AND "
                           "sop_instance_uid = ANY(CAST(:u AS text[]))"))
            .params(v=version, u=wanted)).all()
        context = {row[0]: row[1:] for row in conn.execute(sa.text(
            "SELECT i.sop_instance_uid, i.study_instance_uid, s.patient_pk::text, "
            "i.series_instance_uid FROM instances i JOIN studies s USING (study_instance_uid) "
            "WHERE i.sop_instance_uid = ANY(CAST(:u AS text[]))"),
            {"u": [row[0] for row in rows]})}
    position = {uid: i for i, uid in enumerate(wanted)}
    rows = sorted(rows, key=lambda row: position[row[0]])
    pooled = np.stack([np.asarray(row[1], dtype=np.float32) for row in rows])
    maps = (load_maps(feature_store, [(row[2], row[3]) for row in rows]) if with_maps
            else None)
    return StoredFeatures(uids=tuple(row[0] for row in rows), pooled=pooled, maps=maps,
                          model_version=version,
                          other_version=sum(count for _, count in versions[1:]),
                          studies=tuple(context[row[0]][0] for row in rows),
                          patients=tuple(context[row[0]][1] for row in rows),
                          series=tuple(context[row[0]][2] for row in rows))


# --------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Method:
    """One row of the table.

    Attributes
    ----------
    name : str -- the ``--methods`` name
    title : str -- the row label
    overrides : dict or None
        PipelineConfig fields this method fixes on top of the base configuration; None for
        the features-only method, which fits nothing.
    """

    name: str
    title: str
    overrides: dict | None


METHODS: dict[str, Method] = {method.name: method for method in (
    Method("features", "DenseNet121 features (cosine)", None),
    Method("one-layer", "DenseNet121 + one dictionary layer",
           {"use_layer2": False, "reiterate": False, "pooling": "max"}),
    Method("full", "DDicCIR", {"use_layer2": True, "reiterate": True, "pooling": "max"}),
    Method("no-layer2", "DDicCIR without layer 2",
           {"use_layer2": False, "reiterate": True, "pooling": "max"}),
    Method("no-reiteration", "DDicCIR without k-means re-iteration",
           {"use_layer2": True, "reiterate": False, "pooling": "max"}),
    Method("average-pooling", "DDicCIR with average pooling",
           {"use_layer2": True, "reiterate": True, "pooling": "average"}),
)}
DEFAULT_METHODS: tuple[str, ...] = ("features",)
"""What ``evaluate`` runs without ``--methods``: the only row measured to finish 2,000 images
in 5 folds in under 10 minutes on 2 CPU cores (about 1 minute with the database start). A
dictionary method costs minutes per fold there (docs/image_pipeline.md, "Evaluation", has
the measurements): ``--methods features,one-layer,full`` for the paper's rows."""

EVALUATE_MAX_ITERATIONS = 3
EVALUATE_KSVD_ITERATIONS = 3
EVALUATE_PATCHES_PER_CLUSTER = 2_000
"""``evaluate``'s fit settings (``--max-iterations``, ``--ksvd-iterations``,
``--patches-per-cluster``): lighter than ``image-model``'s, since every method is fitted once
per fold; the docs give their cost and what they change."""


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MethodResult:
    """One method's row.

    Attributes
    ----------
    method, title : str
    metrics : dict of str to float
        Mean over the folds of :func:`~pipelines.retrieval_metrics.evaluate_rankings`' row
        (fractions): ``P@N``, ``R@N``, ``F1@N``, ``mAP@N`` for every cut-off, ``nDCG@k``,
        ``purity``; with IRMA labels also ``IRMA@N`` (mean over the top N) and ``IRMA@1``.
    timings : dict of str to float
        Means over the folds of ``fit_s`` (0 for features), ``code_ms_per_query``,
        ``rank_ms_per_query``; ``total_s`` is the method's wall time over all folds.
    details : dict
        Config flags of the method; for fitted methods the passes run and the stop reason
        (of each fold) and the code length.
    metrics_std : dict of str to float
        Standard deviation over the folds (ddof = 1) of each metric.
    fold_metrics : tuple of dict -- each fold's row
    """

    method: str
    title: str
    metrics: dict[str, float]
    timings: dict[str, float]
    details: dict = field(default_factory=dict)
    metrics_std: dict[str, float] = field(default_factory=dict)
    fold_metrics: tuple[dict, ...] = ()

    @classmethod
    def from_dict(cls, values: dict) -> "MethodResult":
        return cls(**{**values, "fold_metrics": tuple(values.get("fold_metrics", ()))})


@dataclass(frozen=True)
class EvaluationResult:
    """Everything one evaluation run measured (:func:`evaluate`), JSON-ready via
    :meth:`to_dict`.

    Counts: ``n_labelled`` rows in the CSV, ``n_with_features`` of them with stored features
    (``n_without_features`` without, ``n_other_version`` only with features of older
    backbone weights); ``n_images`` evaluated (fewer when ``max_images`` sub-sampled them) in
    ``n_groups`` groups; each is a query once over the ``folds`` folds (``n_queries`` in
    all, less ``n_queries_without_relevant`` left out because nothing relevant was among
    their candidates); ``n_index`` is the mean index size of a fold. ``chance_precision`` is
    the P@N a random ranking reaches on average (the share of a query's candidates that are
    relevant, averaged over queries and folds), the floor every method should clear.
    """

    methods: tuple[MethodResult, ...]
    label_kind: LabelKind
    label_source: str
    n_label_values: int
    n_labelled: int
    n_with_features: int
    n_without_features: int
    n_other_version: int
    missing_examples: tuple[str, ...]
    n_images: int
    folds: int
    group_by: str
    n_groups: int
    exclude: str
    n_index: int
    n_queries: int
    n_queries_without_relevant: int
    chance_precision: float
    cutoffs: tuple[int, ...]
    ndcg_cutoffs: tuple[int, ...]
    dropped_cutoffs: tuple[int, ...]
    feature_model_version: str
    config: dict
    seed: int
    timings: dict[str, float]
    created_at: str
    resumed: tuple[str, ...] = ()

    @property
    def split_rule(self) -> str:
        """How queries and index were separated, e.g. "5 folds, disjoint by
        StudyInstanceUID"; the table's header names it."""
        rule = f"{self.folds} folds, disjoint by {GROUP_RULES[self.group_by]}"
        excluded = EXCLUDE_RULES.get(self.exclude, "")
        return f"{rule}; {excluded}" if excluded else rule

    def method(self, name: str) -> MethodResult:
        for result in self.methods:
            if result.method == name:
                return result
        raise KeyError(name)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "split_rule": self.split_rule}


# --------------------------------------------------------------------------------------------
# Protocol
# --------------------------------------------------------------------------------------------

def group_folds(strata: Sequence[str], groups: Sequence[str], n_folds: int = DEFAULT_FOLDS, *,
                seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """k group-disjoint folds, stratified by label: scikit-learn's ``StratifiedGroupKFold``.

    Every item is a query in exactly one fold; the items of one group are always in the same
    fold, so no group is query and index at once. Within that constraint each fold's label
    shares follow the whole set's (strata with fewer items than folds cannot, and are
    accepted: scikit-learn's warning about them is silenced). When no label has as many
    images as there are folds, the folds are ``GroupKFold``'s, unstratified.

    Parameters
    ----------
    strata : sequence of str -- one label key per item (label, label set, IRMA code)
    groups : sequence of str -- one group per item (study, patient, series, case)
    n_folds : int >= 2
    seed : int -- shuffles the groups before they are dealt out

    Returns
    -------
    list of (index_rows, query_rows), each an ascending int array; one pair per fold

    Raises
    ------
    ValueError
        Fewer than 2 folds, strata and groups of different lengths, or fewer groups than
        folds.
    """
    from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

    n = len(strata)
    if len(groups) != n:
        raise ValueError(f"{n} strata but {len(groups)} groups")
    if n_folds < 2:
        raise ValueError(f"folds must be >= 2, got {n_folds}")
    _, group_codes = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    n_groups = int(group_codes.max()) + 1 if n else 0
    if n_groups < n_folds:
        raise ValueError(f"{n:,} images in {n_groups:,} groups: too few groups for {n_folds} "
                         f"folds (lower --folds, or group by something finer)")
    _, label_codes, label_counts = np.unique(np.asarray(strata, dtype=str),
                                             return_inverse=True, return_counts=True)
    if label_counts.max() >= n_folds:
        splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    else:  # no label has an image for every fold: nothing to stratify
        splitter = GroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*least populated class", category=UserWarning)
        folds = [(np.sort(index).astype(np.intp), np.sort(queries).astype(np.intp))
                 for index, queries in splitter.split(np.zeros((n, 1)), label_codes.ravel(),
                                                      group_codes.ravel())]
    return folds


def excluded_pairs(query_keys: Sequence[str], index_keys: Sequence[str]
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(query row, index row) pairs that share a key (study or patient): the index images
    that are no candidates for that query under ``exclude``.

    Returns
    -------
    query_rows, index_rows : int64 arrays of equal length, sorted by query then index row
    """
    members: dict[str, list[int]] = {}
    for row, key in enumerate(index_keys):
        members.setdefault(key, []).append(row)
    query_rows: list[int] = []
    index_rows: list[int] = []
    for row, key in enumerate(query_keys):
        same = members.get(key, ())
        query_rows.extend([row] * len(same))
        index_rows.extend(same)
    return np.asarray(query_rows, dtype=np.int64), np.asarray(index_rows, dtype=np.int64)


def _drop_excluded(ranked: np.ndarray, excluded: tuple[np.ndarray, np.ndarray],
                   depth: int) -> np.ndarray:
    """The first ``depth`` results of each ranking that are not excluded for its query
    (``ranked`` must be deep enough: ``depth`` + the most items excluded for one query)."""
    if excluded[0].size == 0:
        return ranked[:, :depth]
    n_database = int(max(ranked.max(initial=0), excluded[1].max(initial=0))) + 1
    keys = np.arange(ranked.shape[0])[:, None] * n_database + ranked
    hidden = np.isin(keys, excluded[0] * n_database + excluded[1])
    order = np.argsort(hidden, axis=1, kind="stable")  # kept results first, in rank order
    return np.take_along_axis(ranked, order, axis=1)[:, :depth]


@dataclass(frozen=True)
class _Fold:
    index_rows: np.ndarray         # rows of the evaluated images
    query_rows: np.ndarray
    excluded: tuple[np.ndarray, np.ndarray]   # (query position, index position)
    most_excluded: int             # the most index images excluded for one query
    without_relevant: int          # queries dropped: nothing relevant among the candidates
    chance: float                  # mean share of relevant candidates


def _prepare_fold(index_rows: np.ndarray, query_rows: np.ndarray, indicator: np.ndarray,
                  keys: Sequence[str] | None) -> _Fold:
    if keys is None:
        excluded = (np.empty(0, np.int64), np.empty(0, np.int64))
    else:
        excluded = excluded_pairs([keys[row] for row in query_rows],
                                  [keys[row] for row in index_rows])
    index_labels = indicator[index_rows]
    relevant = count_relevant(indicator[query_rows], index_labels, excluded=excluded)
    keep = relevant > 0
    if not keep.all():
        position = np.cumsum(keep) - 1
        inside = keep[excluded[0]]
        excluded = (position[excluded[0][inside]], excluded[1][inside])
        query_rows, relevant = query_rows[keep], relevant[keep]
    hidden = np.bincount(excluded[0], minlength=len(query_rows))
    candidates = len(index_rows) - hidden
    return _Fold(index_rows=index_rows, query_rows=query_rows, excluded=excluded,
                 most_excluded=int(hidden.max(initial=0)),
                 without_relevant=int((~keep).sum()),
                 chance=float(np.mean(relevant / candidates)) if len(query_rows) else 0.0)


def _synchronise(device: torch.device) -> None:
    # CUDA runs asynchronously: without this, timings would measure the launch only.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _warm_up(device: torch.device) -> None:
    # The first topk/sort/nonzero of a process pays one-off set-up costs (CUDA kernels
    # loaded, thread pools started); without this the first method's ranking time would
    # include them.
    codes = torch.ones((2, 4), device=device)
    clusters = torch.zeros(2, dtype=torch.long, device=device)
    rank_by_code(codes, clusters, codes, clusters, 1)
    _synchronise(device)


@dataclass(frozen=True)
class _Ranked:
    indices: np.ndarray            # (Q, depth) rows of the index
    index_clusters: np.ndarray     # (n_index,) for purity
    timings: dict[str, float]
    details: dict


def _rank_by_features(pooled_index: Tensor, pooled_queries: Tensor, depth: int,
                      config: PipelineConfig) -> _Ranked:
    device = torch.device(config.device)
    index_unit = normalise_rows(pooled_index.to(device=device, dtype=config.torch_dtype))
    _synchronise(device)
    tick = time.perf_counter()
    query_unit = normalise_rows(pooled_queries.to(device=device, dtype=config.torch_dtype))
    _synchronise(device)
    coded = time.perf_counter()
    # One shared cluster makes rank_by_code a plain cosine ranking with its tie rule.
    no_clusters_index = torch.zeros(index_unit.shape[0], dtype=torch.long, device=device)
    no_clusters_queries = torch.zeros(query_unit.shape[0], dtype=torch.long, device=device)
    indices, _ = rank_by_code(query_unit, no_clusters_queries, index_unit, no_clusters_index,
                              depth, index_is_normalised=True)
    _synchronise(device)
    ranked = time.perf_counter()
    clustering = kmeans(index_unit, config.n_clusters,
                        generator=torch.Generator().manual_seed(config.seed),
                        n_init=config.kmeans_n_init, max_iter=config.kmeans_max_iter,
                        tol=config.kmeans_tol)
    n_queries = query_unit.shape[0]
    return _Ranked(
        indices=indices.cpu().numpy(), index_clusters=clustering.labels.cpu().numpy(),
        timings={"fit_s": 0.0, "code_ms_per_query": 1000 * (coded - tick) / n_queries,
                 "rank_ms_per_query": 1000 * (ranked - coded) / n_queries},
        details={"purity_clusters": "k-means on the index features (B.2)",
                 "code_dim": int(index_unit.shape[1])})


def _rank_by_model(maps_index: Tensor, pooled_index: Tensor, maps_queries: Tensor, depth: int,
                   config: PipelineConfig, say: Callable[[str], None]) -> _Ranked:
    device = torch.device(config.device)
    tick = time.perf_counter()
    model = fit_pipeline(maps_index, pooled_index, config, progress=lambda record: say(
        f"pass {record.iteration}: cluster sizes {list(record.cluster_sizes)}"))
    _synchronise(device)
    fitted = time.perf_counter()
    query_clusters, query_codes, _ = encode_queries(model, maps_queries)
    _synchronise(device)
    coded = time.perf_counter()
    index_codes = normalise_rows(model.codes)
    _synchronise(device)
    ranking_starts = time.perf_counter()
    indices, _ = rank_by_code(query_codes, query_clusters, index_codes, model.labels, depth,
                              index_is_normalised=True)
    _synchronise(device)
    ranked = time.perf_counter()
    n_queries = maps_queries.shape[0]
    return _Ranked(
        indices=indices.cpu().numpy(), index_clusters=model.labels.cpu().numpy(),
        timings={"fit_s": fitted - tick,
                 "code_ms_per_query": 1000 * (coded - fitted) / n_queries,
                 "rank_ms_per_query": 1000 * (ranked - ranking_starts) / n_queries},
        details={"passes": len(model.history), "stop_reason": model.stop_reason,
                 "code_dim": model.code_dim,
                 "purity_clusters": "the model's training clusters"})


def _irma_columns(labels: LabelSet, index_rows: np.ndarray, query_rows: np.ndarray,
                  ranked: np.ndarray, cutoffs: Sequence[int]) -> dict[str, float]:
    codes = np.asarray(labels.irma_codes)
    query_codes, index_codes = codes[query_rows], codes[index_rows]
    # irma_error needs a fully specified reference; a query code with '*' has no error
    specified = np.char.find(query_codes, "*") < 0
    if not specified.any():
        return {}
    errors = irma_error(query_codes[specified, None], index_codes[ranked[specified]])
    columns = {"IRMA@1": float(errors[:, 0].mean())}
    for n in cutoffs:
        columns[f"IRMA@{n}"] = float(errors[:, :n].mean())
    return columns

def _config_key(stored_uids: Sequence[str], labels: LabelSet, label_rows: np.ndarray,
                groups: Sequence[str], method: str, settings: dict) -> str:
    """A digest of everything a method's result depends on: resume skips a method only when
    its saved result has the same digest."""
    digest = hashlib.sha256()
    for uid, row, group in zip(stored_uids, label_rows.tolist(), groups):
        digest.update(f"{uid}\t{group}\t".encode())
        digest.update(np.packbits(labels.indicator[row]).tobytes())
        digest.update(b"\n")
    digest.update("|".join(labels.names).encode())
    digest.update(json.dumps({"method": method, "overrides": METHODS[method].overrides,
                              **settings}, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _saved_path(out_dir: Path, method: str) -> Path:
    return out_dir / "methods" / f"{method}.json"


def _load_saved(out_dir: Path | None, method: str, key: str) -> MethodResult | None:
    if out_dir is None:
        return None
    path = _saved_path(out_dir, method)
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("key") != key:
            return None
        return MethodResult.from_dict(saved["result"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent, half-written or of another format: run the method again


def _save(out_dir: Path, method: MethodResult, key: str) -> None:
    path = _saved_path(out_dir, method.method)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.part")
    partial.write_text(json.dumps({"key": key, "result": dataclasses.asdict(method)}, indent=2)
                       + "\n", encoding="utf-8")
    partial.replace(path)  # atomic: an interrupted write never leaves a half result


def _aggregate(name: str, rows: list[dict[str, float]], timings: list[dict[str, float]],
               details: dict, total_s: float) -> MethodResult:
    metrics = {key: float(np.mean([row[key] for row in rows])) for key in rows[0]}
    spread = {key: float(np.std([row[key] for row in rows], ddof=1)) if len(rows) > 1 else 0.0
              for key in rows[0]}
    mean_timings = {key: float(np.mean([t[key] for t in timings])) for key in timings[0]}
    return MethodResult(method=name, title=METHODS[name].title, metrics=metrics,
                        timings={**mean_timings, "total_s": total_s}, details=details,
                        metrics_std=spread, fold_metrics=tuple(rows))


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def evaluate_stored(
    stored: StoredFeatures,
    labels: LabelSet,
    *,
    config: PipelineConfig,
    methods: Sequence[str] = DEFAULT_METHODS,
    folds: int = DEFAULT_FOLDS,
    group_by: GroupRule | None = None,
    exclude: ExcludeRule = "none",
    seed: int = 0,
    cutoffs: Sequence[int] = DEFAULT_CUTOFFS,
    ndcg_cutoffs: Sequence[int] = DEFAULT_NDCG_CUTOFFS,
    max_images: int | None = None,
    progress: Progress | None = None,
    out_dir: str | Path | None = None,
    table_n: int = 20,
    bar: bool = False,
) -> EvaluationResult:
    """The evaluation proper, on features already loaded (see :func:`evaluate`)."""
    started = time.perf_counter()
    methods = tuple(dict.fromkeys(methods))  # a method listed twice is one row
    unknown = [name for name in methods if name not in METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    if exclude not in EXCLUDE_RULES:
        raise ValueError(f"exclude must be one of {', '.join(EXCLUDE_RULES)}, got {exclude!r}")
    if group_by is None:
        group_by = "column" if labels.groups is not None else "study"
    if group_by not in GROUP_RULES:
        raise ValueError(f"group_by must be one of {', '.join(GROUP_RULES)}, got {group_by!r}")
    out = Path(out_dir) if out_dir is not None else None

    def say(message: str) -> None:
        if progress is not None:
            progress(message)
        else:  # the log shows them when nobody asked for lines (not both: one line each)
            log.info(message)

    row_of = {uid: row for row, uid in enumerate(labels.uids)}
    label_rows = np.asarray([row_of[uid] for uid in stored.uids], dtype=np.intp)
    feature_rows = np.arange(len(stored.uids))
    if max_images is not None and len(feature_rows) > max_images:
        chosen = np.sort(np.random.default_rng(seed).choice(len(feature_rows), max_images,
                                                            replace=False))
        label_rows, feature_rows = label_rows[chosen], feature_rows[chosen]

    def per_image(values: Sequence[str] | None, what: str, by_label_row: bool = False
                  ) -> list[str]:
        if values is None:
            raise ValueError(f"no {what} for the images: cannot group or exclude by it")
        rows = label_rows if by_label_row else feature_rows
        return [values[row] for row in rows]

    if group_by == "column":
        if labels.groups is None:
            raise ValueError(f"{labels.source or 'the labels'} has no {GROUP_COLUMN} column "
                             f"to group by")
        groups = per_image(labels.groups, "group column", by_label_row=True)
    else:
        groups = per_image({"study": stored.studies, "patient": stored.patients,
                            "series": stored.series}[group_by], GROUP_RULES[group_by])
    keys = (None if exclude == "none" else
            per_image(stored.studies if exclude == "same-study" else stored.patients,
                      exclude.replace("same-", "")))

    strata = labels.strata()
    indicator = labels.indicator[label_rows]
    splits = group_folds([strata[row] for row in label_rows], groups, folds, seed=seed)
    prepared = [_prepare_fold(index_rows, query_rows, indicator, keys)
                for index_rows, query_rows in splits]
    smallest_index = min(len(fold.index_rows) for fold in prepared)
    if smallest_index < config.n_clusters:
        raise ValueError(f"{smallest_index} index images in a fold: fewer than the "
                         f"{config.n_clusters} clusters (lower --clusters or label more images)")
    if not any(len(fold.query_rows) for fold in prepared):
        raise ValueError("no query has a relevant image among its candidates in any fold "
                         "(every label sits in one group)")
    candidates = min(len(fold.index_rows) - fold.most_excluded for fold in prepared)
    kept = tuple(int(n) for n in cutoffs if n <= candidates)
    dropped = tuple(int(n) for n in cutoffs if n > candidates)
    if not kept:
        raise ValueError(f"every cut-off in {list(cutoffs)} exceeds the {candidates} index "
                         f"images a query can find in a fold")
    kept_ndcg = tuple(int(k) for k in ndcg_cutoffs if k <= candidates)
    depth = max(kept + kept_ndcg)
    n_queries = sum(len(fold.query_rows) for fold in prepared)
    without_relevant = sum(fold.without_relevant for fold in prepared)
    chance = float(np.average([fold.chance for fold in prepared],
                              weights=[max(len(fold.query_rows), 1e-9) for fold in prepared]))
    n_groups = len(set(groups))

    needs_fit = any(METHODS[name].overrides is not None for name in methods)
    pooled = torch.from_numpy(stored.pooled[feature_rows])
    maps = (torch.from_numpy(stored.maps[feature_rows]) if needs_fit and stored.maps is not None
            else None)
    if needs_fit and maps is None:
        raise ValueError("the dictionary methods need the feature maps (load with_maps=True)")
    _warm_up(torch.device(config.device))
    settings = {"folds": folds, "group_by": group_by, "exclude": exclude, "seed": seed,
                "cutoffs": kept, "ndcg_cutoffs": kept_ndcg, "max_images": max_images,
                "feature_model_version": stored.model_version,
                "config": {key: value for key, value in config.to_dict().items()
                           if key not in ("device", "batch_size")}}
    with_features = set(stored.uids)
    missing = [uid for uid in labels.uids if uid not in with_features]
    split_text = f"{folds} folds, disjoint by {GROUP_RULES[group_by]}"
    say(f"{len(feature_rows):,} images in {n_groups:,} groups; {split_text}; about "
        f"{round(np.mean([len(f.index_rows) for f in prepared])):,} index images and "
        f"{round(n_queries / folds):,} queries per fold; {len(labels.names):,} label values "
        f"({labels.kind}); chance P@N {chance:.1%}"
        + (f"; {without_relevant} queries have nothing relevant among their candidates and "
           f"are left out" if without_relevant else ""))

    results: list[MethodResult] = []
    resumed: list[str] = []

    def snapshot() -> EvaluationResult:
        return EvaluationResult(
            methods=tuple(results), label_kind=labels.kind, label_source=labels.source,
            n_label_values=len(labels.names), n_labelled=len(labels),
            n_with_features=len(stored.uids), n_without_features=len(missing),
            n_other_version=stored.other_version, missing_examples=tuple(missing[:5]),
            n_images=len(feature_rows), folds=folds, group_by=group_by, n_groups=n_groups,
            exclude=exclude,
            n_index=int(round(np.mean([len(fold.index_rows) for fold in prepared]))),
            n_queries=n_queries, n_queries_without_relevant=without_relevant,
            chance_precision=chance, cutoffs=kept, ndcg_cutoffs=kept_ndcg,
            dropped_cutoffs=dropped, feature_model_version=stored.model_version,
            config=config.to_dict(), seed=seed,
            timings={"evaluate_s": time.perf_counter() - started},
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            resumed=tuple(resumed))

    # Time left: the mean time of a fold of each kind (features only / a fit) so far, times
    # the folds of that kind still to run.
    fold_seconds: dict[bool, list[float]] = {False: [], True: []}
    to_run = {name: _config_key(stored.uids, labels, label_rows, groups, name, settings)
              for name in methods}
    remaining = {fitted: folds * sum(1 for name in methods
                                     if (METHODS[name].overrides is not None) == fitted)
                 for fitted in (False, True)}

    def time_left() -> str:
        known = {kind: np.mean(times) for kind, times in fold_seconds.items() if times}
        if remaining[True] and True not in known:
            return "time left known after the first fit"
        return "about " + _minutes(sum(known.get(kind, 0.0) * remaining[kind]
                                       for kind in (False, True))) + " left"

    from ..progress import progress as progress_bar

    shown = table_n if table_n in kept else kept[-1]
    with progress_bar(total=len(methods) * folds, unit="fold", desc="evaluate",
                      quiet=not bar,
                      bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                                 "folds [{elapsed}, {postfix}]") as bar_:
        bar_.set_postfix_str(time_left())
        for name in methods:
            method = METHODS[name]
            fitted = method.overrides is not None
            saved = _load_saved(out, name, to_run[name])
            if saved is not None:
                results.append(saved)
                resumed.append(name)
                remaining[fitted] -= folds
                bar_.update(folds)
                say(f"{name}: finished earlier with the same configuration "
                    f"({_saved_path(out, name)}); skipped")
                continue
            rows: list[dict[str, float]] = []
            timings: list[dict[str, float]] = []
            details: dict = dict(method.overrides or {})
            method_started = time.perf_counter()
            for number, fold in enumerate(prepared, start=1):
                tick = time.perf_counter()
                bar_.set_description(f"evaluate {name} fold {number}/{folds}")
                index_take = torch.from_numpy(fold.index_rows)
                query_take = torch.from_numpy(fold.query_rows)
                fold_depth = min(depth + fold.most_excluded, len(fold.index_rows))
                if not fitted:
                    ranked = _rank_by_features(pooled[index_take], pooled[query_take],
                                               fold_depth, config)
                else:
                    method_config = dataclasses.replace(config, **method.overrides)
                    ranked = _rank_by_model(
                        maps[index_take], pooled[index_take], maps[query_take], fold_depth,
                        method_config, lambda message, name=name, number=number: log.info(
                            f"{name}: fold {number}: {message}"))
                indices = _drop_excluded(ranked.indices, fold.excluded, depth)
                metrics = evaluate_rankings(
                    indicator[fold.query_rows], indicator[fold.index_rows], indices,
                    cutoffs=kept, ndcg_cutoffs=kept_ndcg,
                    cluster_labels=ranked.index_clusters, excluded=fold.excluded)
                if labels.kind == "irma":
                    metrics.update(_irma_columns(labels, label_rows[fold.index_rows],
                                                 label_rows[fold.query_rows], indices, kept))
                rows.append(metrics)
                timings.append(ranked.timings)
                for key, value in ranked.details.items():
                    if key in ("passes", "stop_reason"):
                        details.setdefault(key, []).append(value)
                    else:
                        details[key] = value
                fold_seconds[fitted].append(time.perf_counter() - tick)
                remaining[fitted] -= 1
                bar_.set_postfix_str(time_left())
                bar_.update(1)
                say(f"{name}: fold {number}/{folds}: P@{shown} {metrics[f'P@{shown}']:.1%}, "
                    f"mAP@{shown} {metrics[f'mAP@{shown}']:.1%} "
                    f"(fit {ranked.timings['fit_s']:.1f} s); {time_left()}")
            result = _aggregate(name, rows, timings, details,
                                time.perf_counter() - method_started)
            results.append(result)
            if out is not None:
                _save(out, result, to_run[name])
                write_result(snapshot(), out, n=table_n)
            say(f"{name}: P@{shown} {result.metrics[f'P@{shown}']:.1%} "
                f"± {result.metrics_std[f'P@{shown}']:.1%} over {folds} folds"
                + (f"; saved in {_saved_path(out, name)}" if out is not None else ""))
    return snapshot()


def evaluate(
    engine: Engine,
    feature_store: Path,
    labels: LabelSet,
    *,
    config: PipelineConfig,
    methods: Sequence[str] = DEFAULT_METHODS,
    folds: int = DEFAULT_FOLDS,
    group_by: GroupRule | None = None,
    exclude: ExcludeRule = "none",
    seed: int = 0,
    cutoffs: Sequence[int] = DEFAULT_CUTOFFS,
    ndcg_cutoffs: Sequence[int] = DEFAULT_NDCG_CUTOFFS,
    max_images: int | None = None,
    progress: Progress | None = None,
    out_dir: str | Path | None = None,
    table_n: int = 20,
    bar: bool = False,
) -> EvaluationResult:
    """The paper's Table 1 for the labelled instances with stored features, over k
    group-disjoint folds.

    Loads the stored features of the labelled instances (pooled vectors from pgvector, maps
    from the feature store) with each one's study, patient and series, deals the groups
    into ``folds`` folds (:func:`group_folds`), and for each method and fold fits on the
    other folds' images, codes the fold's queries, ranks the index for each and scores the
    rankings; metrics are the mean and standard deviation over the folds. See the module
    docstring for what each method is and the readings fixed here.

    Parameters
    ----------
    engine : Engine
    feature_store : Path -- where the image worker keeps the maps
    labels : LabelSet -- from :func:`read_labels`
    config : PipelineConfig
        The base configuration; each method fixes ``use_layer2``, ``reiterate`` and
        ``pooling`` itself (:data:`METHODS`). ``n_clusters`` is also the k of the purity
        clustering of the features-only method.
    methods : sequence of str -- names from :data:`METHODS`, in table order
    folds : int >= 2, default 5 -- the paper's protocol
    group_by : {"study", "patient", "series", "column"}, optional
        What is never split between queries and index; default ``"column"`` when the labels
        CSV has a ``group`` column, else ``"study"`` (StudyInstanceUID).
    exclude : {"none", "same-study", "same-patient"}
        Also leave each query's own study / patient out of its candidates.
    seed : int -- the folds (and the ``max_images`` sample); the fits use ``config.seed``
    cutoffs : sequence of int -- N of P@N, R@N, F1@N, mAP@N, IRMA@N
    ndcg_cutoffs : sequence of int -- k of nDCG@k
    max_images : int, optional -- evaluate a seeded sample of this many labelled images
    progress : callable, optional -- receives one line per step (with the time left)
    out_dir : path, optional
        Each method's result is saved in ``out_dir/methods/<method>.json`` as soon as its
        folds are done (and the tables of :func:`write_result` rewritten), so an interrupted
        run keeps what finished; a method whose saved result has the same configuration
        (images, labels, groups, folds, seed, parameters) is not run again.
    table_n : int -- the cut-off of the tables written as methods finish
    bar : bool -- draw a tqdm progress bar with the time left on stderr

    Returns
    -------
    EvaluationResult

    Raises
    ------
    NoLabelledFeatures
        When no labelled instance has stored features.
    ValueError
        Unknown method or rule, too few groups for the folds, too few images for
        ``config.n_clusters``.
    """
    tick = time.perf_counter()
    needs_maps = any(METHODS[name].overrides is not None for name in methods if name in METHODS)
    stored = load_stored_features(engine, feature_store, labels.uids, with_maps=needs_maps)
    loaded = time.perf_counter() - tick
    if progress is not None:
        progress(f"{len(stored.uids):,} of {len(labels):,} labelled instances have features "
                 f"({stored.model_version}); loaded in {loaded:.1f} s")
    result = evaluate_stored(stored, labels, config=config, methods=methods, folds=folds,
                             group_by=group_by, exclude=exclude, seed=seed, cutoffs=cutoffs,
                             ndcg_cutoffs=ndcg_cutoffs, max_images=max_images,
                             progress=progress, out_dir=out_dir, table_n=table_n, bar=bar)
    result = dataclasses.replace(result, timings={"load_s": loaded, **result.timings})
    if out_dir is not None:
        write_result(result, out_dir, n=table_n)
    return result


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------

def _table_cutoff(result: EvaluationResult, n: int) -> int:
    """``n`` when it was evaluated, else the largest evaluated cut-off below it (or the
    smallest one)."""
    if n in result.cutoffs:
        return n
    below = [cutoff for cutoff in result.cutoffs if cutoff < n]
    return max(below) if below else min(result.cutoffs)


def _markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(  # noqa: E731
        cell.ljust(width) if i == 0 else cell.rjust(width)
        for i, (cell, width) in enumerate(zip(cells, widths))) + " |"
    rule = "|" + "|".join(("-" * (width + 1) + ("-" if i == 0 else ":"))
                          for i, width in enumerate(widths)) + "|"
    return [line(header), rule, *(line(row) for row in rows)]


def _cell(result: MethodResult, key: str, scale: float, digits: int) -> str:
    mean = scale * result.metrics[key]
    spread = scale * result.metrics_std.get(key, 0.0)
    return f"{mean:.{digits}f} ± {spread:.{digits}f}"


def format_table(result: EvaluationResult, n: int = 20) -> str:
    """The paper's Table 1 layout at cut-off ``n``, then P@N and mAP@N at every cut-off.

    Every cell is the mean ± the standard deviation over the folds; the first line names the
    split rule. Metrics are percentages as in the paper; purity and nDCG are fractions. When
    ``n`` was not evaluated (a fold's index is smaller), the largest evaluated cut-off below
    it is used and the heading says so.
    """
    shown = _table_cutoff(result, n)
    irma = result.label_kind == "irma" and any(
        f"IRMA@{shown}" in method.metrics for method in result.methods)
    lines = [
        f"Retrieval evaluation, DDicCIR Table 1 layout, N = {shown}"
        + (f" ({n} is more than a query's candidates)" if shown != n else "")
        + f"; {result.split_rule}; mean ± std over folds",
        f"{result.n_labelled:,} labelled instances, {result.n_with_features:,} with features "
        f"({result.n_without_features:,} without"
        + (f", {result.n_other_version:,} only with older features" if result.n_other_version
           else "") + f"); {result.n_images:,} images in {result.n_groups:,} groups; "
        f"~{result.n_index:,} index images per fold, {result.n_queries:,} queries in all"
        + (f" ({result.n_queries_without_relevant:,} left out: nothing relevant among their "
           f"candidates)" if result.n_queries_without_relevant else "")
        + f"; {result.n_label_values:,} label values ({result.label_kind}); "
        f"k = {result.config['n_clusters']}; seed {result.seed}",
        f"chance P@N (random ranking): {100 * result.chance_precision:.2f} %",
        "",
    ]
    header = ["Method", "% Precision", "% Recall", "% F1", "% mAP",
              *(f"nDCG@{k}" for k in result.ndcg_cutoffs), "Purity",
              *(["IRMA error"] if irma else []), "fit s", "code ms/q", "rank ms/q"]
    rows = []
    for method in result.methods:
        timings = method.timings
        rows.append([
            method.title,
            *(_cell(method, f"{name}@{shown}", 100, 2) for name in ("P", "R", "F1", "mAP")),
            *(_cell(method, f"nDCG@{k}", 1, 3) for k in result.ndcg_cutoffs),
            _cell(method, "purity", 1, 3),
            *([_cell(method, f"IRMA@{shown}", 1, 3) if f"IRMA@{shown}" in method.metrics
               else "nan"] if irma else []),
            f"{timings['fit_s']:.1f}", f"{timings['code_ms_per_query']:.2f}",
            f"{timings['rank_ms_per_query']:.2f}"])
    lines += _markdown(header, rows)
    for name, heading in (("P", "% Precision at N"), ("mAP", "% mAP at N")):
        lines += ["", heading + " (mean over folds)"]
        lines += _markdown(["N", *(method.method for method in result.methods)],
                           [[str(cutoff), *(f"{100 * method.metrics[f'{name}@{cutoff}']:.2f}"
                                            for method in result.methods)]
                            for cutoff in result.cutoffs])
    notes = ["", "R@N = relevant retrieved / all relevant index images (method.md); with many "
                 "relevant images per query it is far below the paper's R@20."]
    if irma:
        notes.append(f"IRMA error: mean over the top {shown} results of each query (paper "
                     "Table 8, n = 20).")
    notes.append("Timings start from the stored features (DenseNet121 not included), means "
                 "per fold; code = B.7 coding, rank = cosine ranking against the normalised "
                 "index.")
    if result.dropped_cutoffs:
        notes.append(f"Cut-offs {list(result.dropped_cutoffs)} exceed a query's candidates "
                     "and were skipped.")
    if result.resumed:
        notes.append(f"Taken from an earlier run with the same configuration: "
                     f"{', '.join(result.resumed)}.")
    return "\n".join(lines + notes)


CSV_COLUMNS = ("method", "title", "N", "precision", "recall", "f1", "map", "irma_error",
               "precision_std", "recall_std", "f1_std", "map_std", "folds", "split")


def write_result(result: EvaluationResult, out_dir: str | Path, *, n: int = 20) -> list[Path]:
    """Save ``evaluation.csv`` (one row per method and cut-off: means over the folds and
    their standard deviations), ``evaluation.json`` (:meth:`EvaluationResult.to_dict`: every
    metric, per fold too, timing, parameter and count) and ``table.md``
    (:func:`format_table`) in ``out_dir``; returns their paths. Each file is replaced
    atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, json_path, table_path = (out / "evaluation.csv", out / "evaluation.json",
                                       out / "table.md")
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for method in result.methods:
        for cutoff in result.cutoffs:
            metrics, spread = method.metrics, method.metrics_std
            irma = metrics.get(f"IRMA@{cutoff}")
            writer.writerow([method.method, method.title, cutoff,
                             *(f"{metrics[f'{name}@{cutoff}']:.6f}"
                               for name in ("P", "R", "F1", "mAP")),
                             "" if irma is None else f"{irma:.6f}",
                             *(f"{spread.get(f'{name}@{cutoff}', 0.0):.6f}"
                               for name in ("P", "R", "F1", "mAP")),
                             result.folds, result.split_rule])
    for path, content in ((csv_path, text.getvalue()),
                          (json_path, json.dumps(result.to_dict(), indent=2) + "\n"),
                          (table_path, format_table(result, n) + "\n")):
        partial = path.with_name(path.name + ".part")
        partial.write_text(content, encoding="utf-8")
        partial.replace(path)
    return [csv_path, json_path, table_path]
