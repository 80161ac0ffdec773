"""Stable cluster labels across clustering runs.

A nightly re-clustering finds its clusters in an arbitrary order. Users keep their own notes
about "cluster 7", so a new run's clusters are matched to the previous run's by how many
instances they share, and a matched cluster inherits the old label. The matching that
maximises the total number of shared instances is an assignment problem (Hungarian
algorithm, :func:`scipy.optimize.linear_sum_assignment`).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = ["match_labels"]


def match_labels(
    overlap: np.ndarray,
    previous_labels: np.ndarray,
    *,
    min_overlap: int = 1,
    reserved_labels: np.ndarray | None = None,
    sizes: np.ndarray | None = None,
) -> np.ndarray:
    """Labels for a new run's clusters, inherited from the previous run where they match.

    Parameters
    ----------
    overlap : ndarray of shape (n_new, n_previous), int
        ``overlap[i, j]`` = number of instances in new cluster i and previous cluster j.
    previous_labels : ndarray of shape (n_previous,), int
        The label of each previous cluster (column of ``overlap``).
    min_overlap : int, default 1
        A matched pair sharing fewer instances than this does not pass the label on: a new
        cluster that merely got paired with a leftover old one is a new group.
    reserved_labels : ndarray of int, optional
        Labels that must not be given to an unmatched cluster, e.g. every label any earlier
        run used (a retired label is never reused for a different group). The previous
        labels are always reserved.

    Returns
    -------
    ndarray of shape (n_new,), int64
        Distinct labels: the matched previous label, or for an unmatched new cluster the
        next label above every reserved one (0 when there is none), in order of decreasing
        ``sizes`` then row index, so the result is deterministic.
    """
    overlap = np.asarray(overlap)
    previous_labels = np.asarray(previous_labels, dtype=np.int64).reshape(-1)
    if overlap.ndim != 2:
        raise ValueError(f"overlap must be 2-D, got shape {overlap.shape}")
    n_new, n_previous = overlap.shape
    if previous_labels.shape[0] != n_previous:
        raise ValueError(f"{previous_labels.shape[0]} previous labels for {n_previous} "
                         "previous clusters")
    if np.unique(previous_labels).size != n_previous:
        raise ValueError("previous labels must be distinct")
    if np.any(overlap < 0):
        raise ValueError("overlap counts must be non-negative")

    labels = np.full(n_new, -1, dtype=np.int64)
    if n_new and n_previous:
        rows, columns = linear_sum_assignment(overlap, maximize=True)
        keep = overlap[rows, columns] >= max(min_overlap, 1)
        labels[rows[keep]] = previous_labels[columns[keep]]

    reserved = [previous_labels]
    if reserved_labels is not None:
        reserved.append(np.asarray(reserved_labels, dtype=np.int64).reshape(-1))
    taken = np.concatenate(reserved)
    next_label = int(taken.max()) + 1 if taken.size else 0
    unmatched = np.flatnonzero(labels < 0)
    sizes = overlap.sum(axis=1) if sizes is None else np.asarray(sizes).reshape(-1)
    if sizes.shape[0] != n_new:
        raise ValueError(f"{sizes.shape[0]} sizes for {n_new} new clusters")
    for row in unmatched[np.lexsort((unmatched, -sizes[unmatched]))]:
        labels[row] = next_label
        next_label += 1
    return labels
