"""Retrieval and clustering metrics of DDicCIR (method.md B, "Retrieval metrics").

Label sets are boolean indicator matrices throughout: row i, column c is True when item i
carries label c. A single-label data set is the special case of one True per row
(:func:`one_hot` converts integer class labels), and then every definition below reduces to
its single-label form ("same class"). A ranking is a matrix of database row indices,
``ranked_indices[q, k]`` the (k+1)-th result of query q, taken exactly as given: ties in the
similarity scores must be broken by whoever produced the ranking.

For query labels ``Q`` and the labels ``L_k`` of the k-th result (k = 1..N)::

    rel_k        = 1 if |Q ∩ L_k| > 0 else 0           (single-label: same class)
    P@N          = sum_{k<=N} rel_k / N
    R@N          = sum_{k<=N} rel_k / R,   R = number of database items relevant to Q
    AP@N         = sum_{k<=N} P@k * rel_k / sum_{k<=N} rel_k      (0 when the sum is 0)
    mAP@N        = mean over queries of AP@N
    g_k          = |Q ∩ L_k| / |Q ∪ L_k|                (graded; 0 when both sets are empty)
    DCG@k        = sum_{j<=k} g_j / log2(j + 1)
    nDCG@k       = DCG@k / IDCG@k                       (0 when IDCG@k is 0)
    purity       = (1/n) sum_clusters max_label |{i in cluster : i carries label}|

IDCG@k is the DCG of the best possible ordering of the *whole database* for that query (all
database gains sorted in decreasing order), the paper's "maximum possible DCG for the given
query". It is not the re-sorted retrieved list, which would score a ranking that misses the
best items as perfect. ``sklearn.metrics.ndcg_score`` computes the same number when it is
given the gains of every database item as ``y_true``.

AP@N divides by the relevant items *found in the top N*, as method.md says, not by
``min(N, R)`` (another common AP@N): a list whose only relevant item is at rank 1 has
AP@N = 1. With distinct scores it equals ``sklearn.metrics.average_precision_score`` on the
top-N relevance vector.

The paper (Table 1) also reports F1, and its numbers are the harmonic mean of the averaged
precision and recall (84.53 and 83.24 give 83.88); :func:`evaluate_rankings` does the same.

R@N here is method.md's "relevant retrieved / all relevant in the database", so R@N <= N / R.
On NIH ChestX-ray14 a query has thousands of relevant database images, so R@20 is far
below 1%; the paper's R@20 of 83% (close to its P@20) cannot have used that denominator, and
it is not a target this R@N can be compared with. The paper's Eqs. (10)-(18) are images in
our copy of its text; the definitions above are method.md's.

IRMA error: see :func:`irma_axis_errors`.

References
----------
DDicCIR: "Deep Dictionary Clustering for Image Retrieval", Eqs. (10)-(18), (20) and the
mAP@N / nDCG text (Sucharitha et al., 2025); docs/method.md, "Retrieval metrics".
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

__all__ = [
    "DEFAULT_CUTOFFS",
    "DEFAULT_NDCG_CUTOFFS",
    "IRMA_AXES",
    "IRMA_AXIS_LENGTHS",
    "one_hot",
    "binary_relevance",
    "overlap_gain",
    "count_relevant",
    "ideal_gains",
    "precision_at",
    "recall_at",
    "average_precision_at",
    "mean_average_precision_at",
    "dcg_at",
    "ndcg_at",
    "cluster_purity",
    "parse_irma_codes",
    "irma_axis_errors",
    "irma_error",
    "evaluate_rankings",
]

DEFAULT_CUTOFFS = (5, 10, 15, 20, 25, 30, 35, 40)
"""The paper's N list for P@N, R@N and mAP@N."""

DEFAULT_NDCG_CUTOFFS = (5, 10)
"""The paper's nDCG cut-offs (Table 4)."""


# --------------------------------------------------------------------------------------
# Input checks (the boundary); the kernels below assume clean arrays.

def one_hot(classes: np.ndarray, n_classes: int | None = None) -> np.ndarray:
    """Indicator matrix of single-label integer classes.

    Parameters
    ----------
    classes : ndarray of shape (n,), non-negative int
    n_classes : int, optional -- number of columns; default ``classes.max() + 1``

    Returns
    -------
    ndarray of shape (n, n_classes), bool, exactly one True per row.
    """
    classes = np.asarray(classes)
    if classes.ndim != 1 or not np.issubdtype(classes.dtype, np.integer):
        raise ValueError(f"classes must be a 1-D integer array, got {classes.dtype} "
                         f"of shape {classes.shape}")
    if classes.size and classes.min() < 0:
        raise ValueError("classes must be non-negative")
    width = int(classes.max()) + 1 if classes.size else 0
    if n_classes is not None:
        if n_classes < width:
            raise ValueError(f"n_classes={n_classes} but classes go up to {width - 1}")
        width = int(n_classes)
    indicator = np.zeros((classes.size, width), dtype=bool)
    indicator[np.arange(classes.size), classes] = True
    return indicator


def _check_labels(labels: np.ndarray, name: str, *, n_labels: int | None = None) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"{name} must be an (n, n_labels) indicator matrix, got shape "
                         f"{labels.shape} (use one_hot() for integer classes)")
    if labels.dtype != bool:
        if not np.all((labels == 0) | (labels == 1)):
            raise ValueError(f"{name} must hold only 0/1 or booleans")
        labels = labels.astype(bool)
    if n_labels is not None and labels.shape[1] != n_labels:
        raise ValueError(f"{name} has {labels.shape[1]} label columns, expected {n_labels}")
    return labels


def _check_relevance(relevance: np.ndarray, name: str = "relevance") -> np.ndarray:
    relevance = np.asarray(relevance)
    if relevance.ndim != 2:
        raise ValueError(f"{name} must have shape (n_queries, depth), got {relevance.shape}")
    relevance = relevance.astype(np.float64)
    if not np.all(np.isfinite(relevance)) or np.any(relevance < 0):
        raise ValueError(f"{name} must be finite and non-negative")
    return relevance


def _check_binary_relevance(relevance: np.ndarray) -> np.ndarray:
    relevance = _check_relevance(relevance)
    if not np.all((relevance == 0) | (relevance == 1)):
        raise ValueError("relevance must be binary (0/1 or bool) for P, R and AP")
    return relevance


def _check_cutoffs(cutoffs: Sequence[int], depth: int) -> np.ndarray:
    cut = np.asarray(cutoffs)
    if cut.ndim != 1 or cut.size == 0 or not np.issubdtype(cut.dtype, np.integer):
        raise ValueError(f"cutoffs must be a non-empty sequence of ints, got {cutoffs!r}")
    if cut.min() < 1 or cut.max() > depth:
        raise ValueError(f"cutoffs must lie in [1, {depth}] (the ranking depth), "
                         f"got {list(cut)}")
    return cut.astype(np.intp)


def _check_ranking(ranked_indices: np.ndarray, n_database: int,
                   query_indices: np.ndarray | None,
                   excluded: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    ranked = np.asarray(ranked_indices)
    if ranked.ndim != 2 or not np.issubdtype(ranked.dtype, np.integer):
        raise ValueError(f"ranked_indices must be a 2-D integer array, got {ranked.dtype} "
                         f"of shape {ranked.shape}")
    if ranked.size and (ranked.min() < 0 or ranked.max() >= n_database):
        raise ValueError(f"ranked_indices must lie in [0, {n_database})")
    ordered = np.sort(ranked, axis=1)
    if np.any(ordered[:, 1:] == ordered[:, :-1]):
        raise ValueError("a ranking lists the same database item twice")
    if query_indices is not None and np.any(ranked == query_indices[:, None]):
        raise ValueError("a ranking contains its own query (query_indices)")
    if excluded is not None and excluded[0].size and ranked.size:
        ranked_keys = (np.arange(ranked.shape[0])[:, None] * n_database + ranked).ravel()
        if np.isin(excluded[0] * n_database + excluded[1], ranked_keys).any():
            raise ValueError("a ranking contains an item excluded for its query (excluded)")
    return ranked


def _check_excluded(excluded, n_queries: int,
                    n_database: int) -> tuple[np.ndarray, np.ndarray] | None:
    if excluded is None:
        return None
    try:
        query_rows, database_rows = (np.asarray(part) for part in excluded)
    except (TypeError, ValueError):
        raise ValueError("excluded must be a pair (query_rows, database_rows) of int arrays")
    if (query_rows.ndim != 1 or query_rows.shape != database_rows.shape
            or (query_rows.size and not (np.issubdtype(query_rows.dtype, np.integer)
                                         and np.issubdtype(database_rows.dtype, np.integer)))):
        raise ValueError("excluded must be a pair (query_rows, database_rows) of equally long "
                         "1-D int arrays")
    query_rows = query_rows.astype(np.int64)
    database_rows = database_rows.astype(np.int64)
    if query_rows.size and (query_rows.min() < 0 or query_rows.max() >= n_queries
                            or database_rows.min() < 0 or database_rows.max() >= n_database):
        raise ValueError(f"excluded rows must lie in [0, {n_queries}) x [0, {n_database})")
    keys = np.unique(query_rows * n_database + database_rows)  # a pair listed twice is one
    return keys // n_database, keys % n_database


def _left_out(query_indices: np.ndarray | None, excluded: tuple[np.ndarray, np.ndarray] | None,
              n_database: int) -> tuple[np.ndarray, np.ndarray]:
    # (query, database item) pairs that are not candidates: the query itself (leave-one-out)
    # and the excluded pairs (e.g. the query's own study), each pair once.
    parts = [] if excluded is None else [excluded[0] * n_database + excluded[1]]
    if query_indices is not None:
        parts.append(np.arange(query_indices.size, dtype=np.int64) * n_database
                     + query_indices.astype(np.int64))
    if not parts:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    keys = np.unique(np.concatenate(parts))
    return keys // n_database, keys % n_database


def _check_query_indices(query_indices: np.ndarray | None, query_labels: np.ndarray,
                         database_labels: np.ndarray) -> np.ndarray | None:
    if query_indices is None:
        return None
    query_indices = np.asarray(query_indices)
    n_queries, n_database = query_labels.shape[0], database_labels.shape[0]
    if (query_indices.shape != (n_queries,)
            or not np.issubdtype(query_indices.dtype, np.integer)):
        raise ValueError(f"query_indices must be {n_queries} integers, one per query")
    if query_indices.size and (query_indices.min() < 0 or query_indices.max() >= n_database):
        raise ValueError(f"query_indices must lie in [0, {n_database})")
    if not np.array_equal(database_labels[query_indices], query_labels):
        raise ValueError("query_labels differ from database_labels[query_indices]")
    return query_indices


# --------------------------------------------------------------------------------------
# Relevance

def binary_relevance(query_labels: np.ndarray, retrieved_labels: np.ndarray) -> np.ndarray:
    """rel_k: does the k-th result share any label with its query (method.md B, metrics).

    Parameters
    ----------
    query_labels : ndarray of shape (n_queries, n_labels), bool
    retrieved_labels : ndarray of shape (n_queries, depth, n_labels), bool
        ``database_labels[ranked_indices]``.

    Returns
    -------
    ndarray of shape (n_queries, depth), bool
    """
    query_labels = _check_labels(query_labels, "query_labels")
    retrieved_labels = np.asarray(retrieved_labels, dtype=bool)
    if (retrieved_labels.ndim != 3 or retrieved_labels.shape[0] != query_labels.shape[0]
            or retrieved_labels.shape[2] != query_labels.shape[1]):
        raise ValueError(f"retrieved_labels must have shape ({query_labels.shape[0]}, depth, "
                         f"{query_labels.shape[1]}), got {retrieved_labels.shape}")
    return np.any(query_labels[:, None, :] & retrieved_labels, axis=2)


def overlap_gain(query_labels: np.ndarray, retrieved_labels: np.ndarray) -> np.ndarray:
    """Graded relevance g_k = |Q ∩ L_k| / |Q ∪ L_k| (method.md B, metrics; paper Eq. 17).

    Two empty label sets have gain 0, consistent with rel_k = 0 for them.

    Parameters
    ----------
    query_labels : ndarray of shape (n_queries, n_labels), bool
    retrieved_labels : ndarray of shape (n_queries, depth, n_labels), bool

    Returns
    -------
    ndarray of shape (n_queries, depth), float64 in [0, 1]
    """
    query_labels = _check_labels(query_labels, "query_labels")
    retrieved_labels = np.asarray(retrieved_labels, dtype=bool)
    if (retrieved_labels.ndim != 3 or retrieved_labels.shape[0] != query_labels.shape[0]
            or retrieved_labels.shape[2] != query_labels.shape[1]):
        raise ValueError(f"retrieved_labels must have shape ({query_labels.shape[0]}, depth, "
                         f"{query_labels.shape[1]}), got {retrieved_labels.shape}")
    query = query_labels[:, None, :]
    shared = np.count_nonzero(query & retrieved_labels, axis=2)
    either = np.count_nonzero(query | retrieved_labels, axis=2)
    return np.divide(shared, either, out=np.zeros(shared.shape), where=either > 0)


def _label_profiles(database_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # Many database items share one label set (NIH: ~800 distinct sets over 112k images), so
    # per-query work runs over distinct sets weighted by their counts: (q, u), never (q, n).
    profiles, profile_of_item, profile_size = np.unique(
        database_labels, axis=0, return_inverse=True, return_counts=True)
    return profiles, profile_of_item.reshape(-1), profile_size


_BLOCK_ELEMENTS = 1 << 22
# Queries are handled in blocks of at most ~4M (query, profile) pairs (32 MB of float64):
# random multi-label data can have tens of thousands of distinct label sets.


def _query_blocks(n_queries: int, n_profiles: int):
    step = max(1, _BLOCK_ELEMENTS // max(n_profiles, 1))
    for start in range(0, n_queries, step):
        yield slice(start, min(start + step, n_queries))


def _jaccard(query_labels: np.ndarray, profiles: np.ndarray) -> np.ndarray:
    query_f = query_labels.astype(np.float64)
    profiles_f = profiles.astype(np.float64)
    shared = query_f @ profiles_f.T
    either = query_f.sum(1)[:, None] + profiles_f.sum(1)[None, :] - shared
    return np.divide(shared, either, out=np.zeros_like(shared), where=either > 0)


def count_relevant(query_labels: np.ndarray, database_labels: np.ndarray, *,
                   query_indices: np.ndarray | None = None,
                   excluded: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """R, the number of database items relevant to each query (denominator of R@N).

    Parameters
    ----------
    query_labels : ndarray of shape (n_queries, n_labels), bool
    database_labels : ndarray of shape (n_database, n_labels), bool
    query_indices : ndarray of shape (n_queries,), int, optional
        When the queries are themselves database items (leave-one-out), their database rows;
        each query is then not counted as relevant to itself.
    excluded : pair of int arrays (query_rows, database_rows), optional
        Database items that are not candidates for a query (e.g. images of the query's own
        study, left out of its ranking); they are not counted for that query.

    Returns
    -------
    ndarray of shape (n_queries,), int64
    """
    query_labels = _check_labels(query_labels, "query_labels")
    database_labels = _check_labels(database_labels, "database_labels",
                                    n_labels=query_labels.shape[1])
    query_indices = _check_query_indices(query_indices, query_labels, database_labels)
    excluded = _check_excluded(excluded, query_labels.shape[0], database_labels.shape[0])
    profiles, _, profile_size = _label_profiles(database_labels)
    profiles_t = profiles.T.astype(np.int64)
    relevant = np.empty(query_labels.shape[0], dtype=np.int64)
    for rows in _query_blocks(query_labels.shape[0], profiles.shape[0]):
        shares = (query_labels[rows].astype(np.int64) @ profiles_t) > 0      # (block, u)
        relevant[rows] = shares.astype(np.int64) @ profile_size.astype(np.int64)
    pair_query, pair_item = _left_out(query_indices, excluded, database_labels.shape[0])
    if pair_query.size:
        shares = np.any(query_labels[pair_query] & database_labels[pair_item], axis=1)
        np.subtract.at(relevant, pair_query, shares.astype(np.int64))
    return relevant


def ideal_gains(query_labels: np.ndarray, database_labels: np.ndarray, depth: int, *,
                query_indices: np.ndarray | None = None,
                excluded: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """The best ``depth`` gains any ranking of the database can reach, per query (IDCG).

    All database items' overlap gains with the query, sorted in decreasing order and cut at
    ``depth``; zeros past the end of a database shorter than ``depth``.

    Parameters
    ----------
    query_labels : ndarray of shape (n_queries, n_labels), bool
    database_labels : ndarray of shape (n_database, n_labels), bool
    depth : int -- the largest nDCG cut-off needed
    query_indices : ndarray of shape (n_queries,), int, optional
        As in :func:`count_relevant`: the query's own row is left out of the ideal list.
    excluded : pair of int arrays (query_rows, database_rows), optional
        As in :func:`count_relevant`: those items are left out of that query's ideal list.

    Returns
    -------
    ndarray of shape (n_queries, depth), float64, non-increasing along each row
    """
    query_labels = _check_labels(query_labels, "query_labels")
    database_labels = _check_labels(database_labels, "database_labels",
                                    n_labels=query_labels.shape[1])
    query_indices = _check_query_indices(query_indices, query_labels, database_labels)
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    excluded = _check_excluded(excluded, query_labels.shape[0], database_labels.shape[0])
    profiles, profile_of_item, profile_size = _label_profiles(database_labels)
    pair_query, pair_item = _left_out(query_indices, excluded, database_labels.shape[0])
    pair_profile = profile_of_item[pair_item]
    best = np.zeros((query_labels.shape[0], depth))
    if profiles.shape[0] == 0:
        return best  # an empty database: nothing to gain
    for rows in _query_blocks(query_labels.shape[0], profiles.shape[0]):
        inside = (pair_query >= rows.start) & (pair_query < rows.stop)
        best[rows] = _ideal_gains_block(
            query_labels[rows], profiles, profile_size, depth,
            (pair_query[inside] - rows.start, pair_profile[inside]))
    return best


def _ideal_gains_block(query_labels: np.ndarray, profiles: np.ndarray,
                       profile_size: np.ndarray, depth: int,
                       left_out: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    n_queries, n_profiles = query_labels.shape[0], profiles.shape[0]
    gains = _jaccard(query_labels, profiles)                               # (q, u)
    counts = np.broadcast_to(profile_size, gains.shape).copy()
    np.subtract.at(counts, left_out, 1)  # the query itself, excluded items
    # A profile left without items (the query's own, alone) must not take a top place.
    gains[counts == 0] = -np.inf
    # Every remaining profile holds >= 1 item, so the best `depth` items lie in the best
    # `depth` profiles: partition first, then sort only those.
    keep = min(depth, n_profiles)
    top = np.argpartition(-gains, keep - 1, axis=1)[:, :keep]
    top_gains = np.take_along_axis(gains, top, axis=1)
    order = np.argsort(-top_gains, axis=1, kind="stable")
    sorted_gains = np.take_along_axis(top_gains, order, axis=1)
    sorted_counts = np.take_along_axis(np.take_along_axis(counts, top, axis=1), order, axis=1)
    ends = np.cumsum(sorted_counts, axis=1)                                 # items so far
    # Position j of query i lies in the first profile whose running count exceeds j. One
    # searchsorted for all queries: shift row i by i * (largest count + 1), which keeps the
    # flattened running counts sorted because no row's count exceeds that.
    stride = int(ends[:, -1].max()) + 1
    row = np.arange(n_queries)[:, None]
    flat_ends = (ends + row * stride).ravel()
    wanted = (np.arange(depth)[None, :] + row * stride).ravel()
    column = np.searchsorted(flat_ends, wanted, side="right").reshape(n_queries, depth)
    column -= row * keep
    past_end = column >= keep
    best = np.take_along_axis(sorted_gains, np.minimum(column, keep - 1), axis=1)
    return np.where(past_end, 0.0, best)


# --------------------------------------------------------------------------------------
# Rank metrics on a relevance matrix (one column per cut-off)

def precision_at(relevance: np.ndarray,
                 cutoffs: Sequence[int] = DEFAULT_CUTOFFS) -> np.ndarray:
    """P@N = sum_{k<=N} rel_k / N (method.md B, metrics; paper Eq. 10).

    Parameters
    ----------
    relevance : ndarray of shape (n_queries, depth), 0/1 -- rel_k in rank order
    cutoffs : sequence of int, each in [1, depth]

    Returns
    -------
    ndarray of shape (n_queries, len(cutoffs)), float64
    """
    relevance = _check_binary_relevance(relevance)
    cut = _check_cutoffs(cutoffs, relevance.shape[1])
    return np.cumsum(relevance, axis=1)[:, cut - 1] / cut


def recall_at(relevance: np.ndarray, n_relevant: np.ndarray,
              cutoffs: Sequence[int] = DEFAULT_CUTOFFS) -> np.ndarray:
    """R@N = relevant retrieved in the top N / all relevant in the database (method.md B).

    A query with nothing relevant in the database has recall 0 at every N.

    Parameters
    ----------
    relevance : ndarray of shape (n_queries, depth), 0/1
    n_relevant : ndarray of shape (n_queries,), int -- see :func:`count_relevant`
    cutoffs : sequence of int, each in [1, depth]

    Returns
    -------
    ndarray of shape (n_queries, len(cutoffs)), float64 in [0, 1]
    """
    relevance = _check_binary_relevance(relevance)
    cut = _check_cutoffs(cutoffs, relevance.shape[1])
    n_relevant = np.asarray(n_relevant)
    if n_relevant.shape != (relevance.shape[0],):
        raise ValueError(f"n_relevant must have shape ({relevance.shape[0]},), "
                         f"got {n_relevant.shape}")
    found = np.cumsum(relevance, axis=1)[:, cut - 1]
    if np.any(found > n_relevant[:, None]):
        raise ValueError("a ranking holds more relevant items than n_relevant says exist")
    total = np.broadcast_to(n_relevant[:, None].astype(np.float64), found.shape)
    return np.divide(found, total, out=np.zeros_like(found), where=total > 0)


def average_precision_at(relevance: np.ndarray,
                         cutoffs: Sequence[int] = DEFAULT_CUTOFFS) -> np.ndarray:
    """AP@N = sum_{k<=N} P@k rel_k / sum_{k<=N} rel_k, 0 without a hit (method.md B).

    Parameters
    ----------
    relevance : ndarray of shape (n_queries, depth), 0/1
    cutoffs : sequence of int, each in [1, depth]

    Returns
    -------
    ndarray of shape (n_queries, len(cutoffs)), float64 in [0, 1]
    """
    relevance = _check_binary_relevance(relevance)
    cut = _check_cutoffs(cutoffs, relevance.shape[1])
    hits = np.cumsum(relevance, axis=1)
    precision_at_rank = hits / np.arange(1, relevance.shape[1] + 1)
    summed = np.cumsum(precision_at_rank * relevance, axis=1)[:, cut - 1]
    found = hits[:, cut - 1]
    return np.divide(summed, found, out=np.zeros_like(summed), where=found > 0)


def mean_average_precision_at(relevance: np.ndarray,
                              cutoffs: Sequence[int] = DEFAULT_CUTOFFS) -> np.ndarray:
    """mAP@N, the mean of :func:`average_precision_at` over queries.

    Returns
    -------
    ndarray of shape (len(cutoffs),), float64
    """
    return average_precision_at(relevance, cutoffs).mean(axis=0)


def dcg_at(gains: np.ndarray, cutoffs: Sequence[int]) -> np.ndarray:
    """DCG@k = sum_{j<=k} g_j / log2(j + 1) (method.md B, metrics; paper Eq. 15).

    Parameters
    ----------
    gains : ndarray of shape (n_queries, depth), non-negative, in rank order
    cutoffs : sequence of int, each in [1, depth]

    Returns
    -------
    ndarray of shape (n_queries, len(cutoffs)), float64
    """
    gains = _check_relevance(gains, "gains")
    cut = _check_cutoffs(cutoffs, gains.shape[1])
    discount = np.log2(np.arange(2, gains.shape[1] + 2))
    return np.cumsum(gains / discount, axis=1)[:, cut - 1]


def ndcg_at(gains: np.ndarray, ideal: np.ndarray, cutoffs: Sequence[int]) -> np.ndarray:
    """nDCG@k = DCG@k / IDCG@k, 0 when IDCG@k = 0 (method.md B, metrics; paper Eq. 16).

    Parameters
    ----------
    gains : ndarray of shape (n_queries, depth) -- gains of the ranking, in rank order
    ideal : ndarray of shape (n_queries, depth_ideal), non-increasing rows
        The best gains the database allows (:func:`ideal_gains`); ``depth_ideal`` must reach
        the largest cut-off.
    cutoffs : sequence of int

    Returns
    -------
    ndarray of shape (n_queries, len(cutoffs)), float64
    """
    ideal = _check_relevance(ideal, "ideal")
    if np.any(np.diff(ideal, axis=1) > 0):
        raise ValueError("ideal gains must be sorted in non-increasing order")
    achieved = dcg_at(gains, cutoffs)
    best = dcg_at(ideal, cutoffs)
    if best.shape != achieved.shape:
        raise ValueError(f"ideal has {ideal.shape[0]} rows, gains {achieved.shape[0]}")
    return np.divide(achieved, best, out=np.zeros_like(achieved), where=best > 0)


# --------------------------------------------------------------------------------------
# Clustering

def cluster_purity(cluster_labels: np.ndarray, true_labels: np.ndarray) -> float:
    """Purity = (1/n) sum over clusters of the largest true class inside (paper Eq. 18).

    With multi-label ``true_labels`` the "largest class" of a cluster is the label carried
    by most of its members (our reading; the paper gives purity for multi-label NIH data
    without saying). For one-hot labels this is the textbook purity.

    Parameters
    ----------
    cluster_labels : ndarray of shape (n,), int -- any cluster ids
    true_labels : ndarray of shape (n, n_labels), bool

    Returns
    -------
    float in [0, 1]
    """
    true_labels = _check_labels(true_labels, "true_labels")
    cluster_labels = np.asarray(cluster_labels)
    if cluster_labels.shape != (true_labels.shape[0],):
        raise ValueError(f"cluster_labels must have shape ({true_labels.shape[0]},), "
                         f"got {cluster_labels.shape}")
    if cluster_labels.size == 0:
        raise ValueError("purity of an empty clustering is undefined")
    _, cluster = np.unique(cluster_labels, return_inverse=True)
    label_counts = np.zeros((int(cluster.max()) + 1, true_labels.shape[1]), dtype=np.int64)
    np.add.at(label_counts, cluster.reshape(-1), true_labels.astype(np.int64))
    majority = label_counts.max(axis=1, initial=0)
    return float(majority.sum() / cluster_labels.size)


# --------------------------------------------------------------------------------------
# IRMA error

IRMA_AXES = ("technical", "directional", "anatomical", "biological")
IRMA_AXIS_LENGTHS = (4, 3, 3, 3)
"""Code layout ``TTTT-DDD-AAA-BBB``, e.g. ``"1121-127-700-500"``."""

_IRMA_PATTERN = re.compile(r"[0-9a-z*]{4}-[0-9a-z*]{3}-[0-9a-z*]{3}-[0-9a-z*]{3}")
_IRMA_WIDTH = sum(IRMA_AXIS_LENGTHS)
_AXIS_SLICES = tuple(slice(start, start + length) for start, length in zip(
    np.cumsum((0,) + IRMA_AXIS_LENGTHS[:-1]), IRMA_AXIS_LENGTHS))


def parse_irma_codes(codes: np.ndarray | Sequence[str]) -> np.ndarray:
    """Split IRMA codes into their 13 characters.

    Parameters
    ----------
    codes : array-like of str, any shape -- ``"TTTT-DDD-AAA-BBB"``, characters 0-9, a-z
        (case-insensitive) or ``*`` (not specified)

    Returns
    -------
    ndarray of shape codes.shape + (13,), dtype <U1
    """
    codes = np.asarray(codes, dtype=str)
    flat = [code.lower() for code in codes.reshape(-1).tolist()]
    bad = [code for code in flat if not _IRMA_PATTERN.fullmatch(code)]
    if bad:
        raise ValueError(f"{len(bad)} malformed IRMA code(s), e.g. {bad[0]!r}; expected "
                         f"'TTTT-DDD-AAA-BBB' with characters 0-9, a-z or '*'")
    digits = [code.replace("-", "") for code in flat]
    chars = np.array([list(code) for code in digits], dtype="<U1").reshape(
        codes.shape + (_IRMA_WIDTH,))
    return chars


def irma_axis_errors(reference_codes: np.ndarray | Sequence[str],
                     compared_codes: np.ndarray | Sequence[str], *,
                     branching: np.ndarray | None = None,
                     unspecified_weight: float = 0.5) -> np.ndarray:
    """Normalised IRMA error of each of the four axes (method.md B, metrics; paper Eq. 20).

    Per axis, walking the characters i = 1, 2, ... left to right::

        error = sum_i delta_i / (b_i * i)  /  sum_i 1 / (b_i * i)        in [0, 1]

    ``delta_i`` follows the ImageCLEF 2007-2009 medical annotation error counting (Müller et
    al., "Overview of the ImageCLEFmed 2007 medical retrieval and annotation tasks";
    Tommasi et al., "Overview of the CLEF 2009 medical image annotation track"; rules as in
    their public evaluation script):

    * 0 while the compared character equals the reference and nothing earlier went wrong;
    * 1 from the first differing character on, for it and every character after it;
    * ``*`` in the compared code means "not specified": 0.5 (``unspecified_weight``) for it
      and for every character after it, except that a ``*`` against a reference ``0``
      (which the IRMA code uses for "unspecified") costs 0.

    The DDicCIR paper only says "delta equals 1 if the code differs and 0 otherwise" and
    never meets ``*`` (retrieval compares two complete database codes); the ImageCLEF rule
    is kept so that partial codes are scored as in the benchmark.

    ``b_i`` is the number of possible characters at depth i. ImageCLEF takes it from the
    IRMA code tree: the number of children of the reference code's node at depth i - 1.
    Pass those per code (shape ``(..., 13)``) when you have the tree, or a per-depth table
    (shape ``(13,)``, the four axes concatenated). The default is 10 everywhere (one decimal
    digit); a constant ``b`` cancels in the per-axis normalisation, so the default weighs a
    wrong character at depth i by 1/i.

    Parameters
    ----------
    reference_codes : array-like of str -- the query's codes; must not contain ``*``
    compared_codes : array-like of str, broadcastable with ``reference_codes``
    branching : ndarray broadcastable to ``shape + (13,)``, positive, optional
    unspecified_weight : float in [0, 1]

    Returns
    -------
    ndarray of shape broadcast_shape + (4,), float64 in [0, 1], axes in ``IRMA_AXES`` order
    """
    reference = parse_irma_codes(reference_codes)
    compared = parse_irma_codes(compared_codes)
    if np.any(reference == "*"):
        raise ValueError("reference IRMA codes must be fully specified (no '*')")
    if not 0.0 <= unspecified_weight <= 1.0:
        raise ValueError(f"unspecified_weight must lie in [0, 1], got {unspecified_weight}")
    reference, compared = np.broadcast_arrays(reference, compared)
    if branching is None:
        branching = np.full(_IRMA_WIDTH, 10.0)
    branching = np.asarray(branching, dtype=np.float64)
    if branching.shape[-1:] != (_IRMA_WIDTH,) or np.any(~(branching > 0)):
        raise ValueError(f"branching must be positive with last dimension {_IRMA_WIDTH}")
    branching = np.broadcast_to(branching, reference.shape)

    shape = reference.shape[:-1]
    errors = np.empty(shape + (len(IRMA_AXES),))
    for axis, columns in enumerate(_AXIS_SLICES):
        wrong = np.zeros(shape, dtype=bool)
        unspecified = np.zeros(shape, dtype=bool)
        axis_error = np.zeros(shape)
        axis_maximum = np.zeros(shape)
        for depth, column in enumerate(range(columns.start, columns.stop), start=1):
            weight = 1.0 / (branching[..., column] * depth)
            ref, cmp = reference[..., column], compared[..., column]
            # The four cases of the ImageCLEF script, tried in its order.
            correct = (ref == cmp) & ~wrong & ~unspecified
            star_on_unspecified = ~correct & (ref == "0") & (cmp == "*") & ~wrong
            half = ~correct & ~star_on_unspecified & (((cmp == "*") & ~wrong) | unspecified)
            miss = ~correct & ~star_on_unspecified & ~half
            unspecified |= star_on_unspecified | half
            wrong |= miss
            axis_error += weight * (unspecified_weight * half + 1.0 * miss)
            axis_maximum += weight
        errors[..., axis] = axis_error / axis_maximum
    return errors


def irma_error(reference_codes: np.ndarray | Sequence[str],
               compared_codes: np.ndarray | Sequence[str], *,
               branching: np.ndarray | None = None,
               unspecified_weight: float = 0.5) -> np.ndarray:
    """IRMA error in [0, 1]: the mean of the four :func:`irma_axis_errors`.

    For a retrieval run pass the query codes with shape (n_queries, 1) and the retrieved
    codes with shape (n_queries, N); average the result for the paper's single number.

    Returns
    -------
    ndarray of the broadcast shape of the two code arrays, float64
    """
    return irma_axis_errors(reference_codes, compared_codes, branching=branching,
                            unspecified_weight=unspecified_weight).mean(axis=-1)


# --------------------------------------------------------------------------------------
# The paper's table row

def evaluate_rankings(
    query_labels: np.ndarray,
    database_labels: np.ndarray,
    ranked_indices: np.ndarray,
    *,
    cutoffs: Sequence[int] = DEFAULT_CUTOFFS,
    ndcg_cutoffs: Sequence[int] = DEFAULT_NDCG_CUTOFFS,
    cluster_labels: np.ndarray | None = None,
    query_indices: np.ndarray | None = None,
    excluded: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, float]:
    """One row of the paper's Table 1 (and Table 4): macro averages over queries.

    Parameters
    ----------
    query_labels : ndarray of shape (n_queries, n_labels), bool
    database_labels : ndarray of shape (n_database, n_labels), bool
    ranked_indices : ndarray of shape (n_queries, depth), int
        Database rows in rank order; ``depth`` must reach every cut-off.
    cutoffs : sequence of int -- N for P@N, R@N, F1@N and mAP@N
    ndcg_cutoffs : sequence of int -- k for nDCG@k; empty to skip
    cluster_labels : ndarray of shape (n_database,), int, optional
        The database's clusters; adds ``"purity"`` against ``database_labels``.
    query_indices : ndarray of shape (n_queries,), int, optional
        Database rows of the queries when they come from the database (leave-one-out);
        they are then excluded from R and from the ideal nDCG list, and must not appear
        in their own ranking.
    excluded : pair of int arrays (query_rows, database_rows), optional
        Database items that were no candidates for a query (e.g. images of the query's own
        study or patient): left out of that query's R and ideal nDCG list; they must not
        appear in its ranking.

    Returns
    -------
    dict with keys ``"P@N"``, ``"R@N"``, ``"F1@N"``, ``"mAP@N"`` for every N, ``"nDCG@k"``
    for every k, and ``"purity"`` when ``cluster_labels`` is given; values are fractions
    (the paper prints percentages). ``F1@N`` is the harmonic mean of the averaged P@N and
    R@N, which reproduces the paper's F1 column.
    """
    query_labels = _check_labels(query_labels, "query_labels")
    database_labels = _check_labels(database_labels, "database_labels",
                                    n_labels=query_labels.shape[1])
    query_indices = _check_query_indices(query_indices, query_labels, database_labels)
    excluded = _check_excluded(excluded, query_labels.shape[0], database_labels.shape[0])
    ranked = _check_ranking(ranked_indices, database_labels.shape[0], query_indices, excluded)
    if ranked.shape[0] != query_labels.shape[0]:
        raise ValueError(f"ranked_indices has {ranked.shape[0]} rows for "
                         f"{query_labels.shape[0]} queries")
    retrieved_labels = database_labels[ranked]
    relevance = binary_relevance(query_labels, retrieved_labels)
    n_relevant = count_relevant(query_labels, database_labels, query_indices=query_indices,
                                excluded=excluded)

    precision = precision_at(relevance, cutoffs).mean(axis=0)
    recall = recall_at(relevance, n_relevant, cutoffs).mean(axis=0)
    mean_ap = mean_average_precision_at(relevance, cutoffs)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(both), where=both > 0)

    row: dict[str, float] = {}
    for column, n in enumerate(cutoffs):
        row[f"P@{n}"] = float(precision[column])
        row[f"R@{n}"] = float(recall[column])
        row[f"F1@{n}"] = float(f1[column])
        row[f"mAP@{n}"] = float(mean_ap[column])
    if len(ndcg_cutoffs):
        _check_cutoffs(ndcg_cutoffs, ranked.shape[1])
        gains = overlap_gain(query_labels, retrieved_labels)
        ideal = ideal_gains(query_labels, database_labels, int(max(ndcg_cutoffs)),
                            query_indices=query_indices, excluded=excluded)
        ndcg = ndcg_at(gains, ideal, ndcg_cutoffs).mean(axis=0)
        for column, k in enumerate(ndcg_cutoffs):
            row[f"nDCG@{k}"] = float(ndcg[column])
    if cluster_labels is not None:
        row["purity"] = cluster_purity(cluster_labels, database_labels)
    return row
