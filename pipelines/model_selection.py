"""Choice of K by the mean silhouette on a precomputed distance matrix (method.md A.6).

Silhouette of point i in cluster A (Rousseeuw 1987)::

    a(i) = mean distance from i to the other members of A
    b(i) = min over clusters C != A of the mean distance from i to the members of C
    s(i) = (b(i) - a(i)) / max(a(i), b(i)),   s(i) = 0 when A has no other member

Weighted version (distinct tag profiles weighted by instance counts, A.7): a profile of
weight ``w_i`` stands for ``w_i`` identical instances, and the weighted silhouette is exactly
the unweighted silhouette of that expanded instance set::

    a(i) = sum_{j in A} w_j d(i, j) / (W_A - 1)     W_C = sum_{j in C} w_j
    b(i) = min_{C != A} sum_{j in C} w_j d(i, j) / W_C
    s(i) = 0 when W_A <= 1 (i is alone in its cluster)
    mean silhouette = sum_i w_i s(i) / sum_i w_i

(the ``w_i - 1`` copies of i itself sit at distance 0, hence ``W_A - 1``). This needs a
zero diagonal, which the Gower matrix has for every row with a present feature. Weights are
meant as instance counts (>= 1); for other weights the same formulas are used as written.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from pipelines.kmedoids import KMedoids

__all__ = ["silhouette_samples", "silhouette_score", "choose_k", "DEFAULT_K_CANDIDATES"]

log = logging.getLogger(__name__)

DEFAULT_K_CANDIDATES = (5, 10, 15, 20, 100, 200, 300)
"""The paper's candidate list (method.md A.6)."""


def silhouette_samples(
    distances: np.ndarray, labels: np.ndarray, *, sample_weight: np.ndarray | None = None,
    block_rows: int = 1024,
) -> np.ndarray:
    """Silhouette value of every point (method.md A.6; weighted form in the module doc).

    Parameters
    ----------
    distances : ndarray of shape (n, n), zero diagonal
    labels : ndarray of shape (n,), int -- at least 2 and at most n - 1 distinct labels
    sample_weight : ndarray of shape (n,), optional

    Returns
    -------
    ndarray of shape (n,), float64, values in [-1, 1].
    """
    distances = np.asarray(distances)
    n_samples = distances.shape[0]
    if distances.ndim != 2 or distances.shape[1] != n_samples:
        raise ValueError(f"distances must be a square (n, n) matrix, got {distances.shape}")
    labels = np.asarray(labels)
    if labels.shape != (n_samples,):
        raise ValueError(f"labels must have shape ({n_samples},), got {labels.shape}")
    weights = (np.ones(n_samples) if sample_weight is None
               else np.asarray(sample_weight, dtype=np.float64))
    if weights.shape != (n_samples,) or np.any(weights < 0):
        raise ValueError(f"sample_weight must be non-negative with shape ({n_samples},)")
    _, cluster = np.unique(labels, return_inverse=True)
    n_clusters = int(cluster.max()) + 1 if n_samples else 0
    if not 2 <= n_clusters <= n_samples - 1:
        raise ValueError(
            f"silhouette needs 2 <= number of labels <= n_samples - 1, got {n_clusters} "
            f"labels for {n_samples} samples")

    # Weighted one-hot membership: (D @ member)[i, c] = sum_{j in c} w_j d(i, j).
    member = np.zeros((n_samples, n_clusters), dtype=np.float64)
    member[np.arange(n_samples), cluster] = weights
    cluster_weight = member.sum(axis=0)  # W_C

    silhouette = np.empty(n_samples, dtype=np.float64)
    for start in range(0, n_samples, block_rows):
        rows = slice(start, min(start + block_rows, n_samples))
        sums = distances[rows].astype(np.float64) @ member  # (block, C)
        own = cluster[rows]
        row_index = np.arange(sums.shape[0])
        own_weight = cluster_weight[own]
        alone = own_weight <= 1.0
        within = sums[row_index, own] / np.where(alone, 1.0, own_weight - 1.0)
        mean_to_other = sums / np.where(cluster_weight > 0, cluster_weight, np.inf)
        mean_to_other[row_index, own] = np.inf
        nearest_other = mean_to_other.min(axis=1)
        spread = np.maximum(within, nearest_other)
        value = np.divide(nearest_other - within, spread, out=np.zeros_like(spread),
                          where=spread > 0)
        silhouette[rows] = np.where(alone, 0.0, value)
    return silhouette


def silhouette_score(
    distances: np.ndarray, labels: np.ndarray, *, sample_weight: np.ndarray | None = None,
) -> float:
    """Mean silhouette (weighted by ``sample_weight`` when given); shapes as in
    :func:`silhouette_samples`."""
    values = silhouette_samples(distances, labels, sample_weight=sample_weight)
    weights = np.ones_like(values) if sample_weight is None else np.asarray(sample_weight)
    return float(np.average(values, weights=weights))


def choose_k(
    distances: np.ndarray,
    candidates: Sequence[int] = DEFAULT_K_CANDIDATES,
    *,
    sample_weight: np.ndarray | None = None,
    random_state: int = 0,
    method: str = "fasterpam",
) -> tuple[int, dict[int, float]]:
    """Pick K by the highest mean silhouette of a K-medoids fit (method.md A.6).

    Parameters
    ----------
    distances : ndarray of shape (n, n), precomputed (Gower) distances
    candidates : sequence of int
        K values to try; those < 2 or >= n are skipped (silhouette is undefined there).
    sample_weight : ndarray of shape (n,), optional -- profile instance counts (A.7)
    random_state : int -- passed to :class:`~pipelines.kmedoids.KMedoids`

    Returns
    -------
    best_k : int -- the candidate with the highest mean silhouette (smallest K on ties)
    table : dict mapping each tried K to its mean silhouette, in candidate order
    """
    n_samples = np.asarray(distances).shape[0]
    usable = [int(k) for k in dict.fromkeys(candidates) if 2 <= int(k) < n_samples]
    skipped = [int(k) for k in candidates if int(k) not in usable]
    if skipped:
        log.info("choose_k: skipping K=%s for n=%d samples", skipped, n_samples)
    if not usable:
        raise ValueError(
            f"no usable K among {list(candidates)} for {n_samples} samples (need 2 <= K < n)")
    table: dict[int, float] = {}
    for k in usable:
        model = KMedoids(k, method=method, random_state=random_state).fit(
            distances, sample_weight=sample_weight)
        table[k] = silhouette_score(distances, model.labels_, sample_weight=sample_weight)
        log.info("choose_k: K=%d mean silhouette %.4f loss %.6g", k, table[k], model.inertia_)
    best_k = max(table, key=lambda k: (table[k], -k))
    return best_k, table
