"""Tag clustering at archive scale (method.md A.5-A.7): cluster the distinct tag profiles,
weighted by how many instances share each, then give every instance its nearest medoid.

Slices of one series share almost every parsed tag, so an archive of millions of instances
has fewer distinct profiles. K-medoids on the profiles with ``sample_weight`` = instance
count minimises exactly the same objective as on the expanded instances (the sum over
instances of the distance to their medoid). When even the profiles are too many for an
n x n Gower matrix, a random sample of ``max_profiles`` *instances* is drawn (without
replacement) and collapsed into its distinct profiles, each weighted by how many sampled
instances it stands for: the weighted objective and silhouette are then exactly those of
an ordinary instance sample, as in the paper (5,000 sampled instances, A.6).

Assignment (A.7) is O(n K) and row-by-row deterministic
(:func:`pipelines.gower.gower_to_medoids`), so it splits across processes:
:func:`assign_partitions` runs it over partitions of the archive in Dask workers, each
loading and storing its own rows.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Sequence, TypeVar

import numpy as np

from .gower import (
    GowerData, NumericRanges, fit_ranges, gower_matrix, gower_to_medoids, subset_rows, unique_rows,
)
from .kmedoids import KMedoids
from .model_selection import DEFAULT_K_CANDIDATES, silhouette_samples, silhouette_score

__all__ = [
    "PAPER_CANDIDATES",
    "PartitionAssignmentError",
    "Profiles",
    "TagClusterModel",
    "assign_partitions",
    "distinct_profiles",
    "fit_profile_clusters",
    "fit_tag_clusters",
    "k_bound",
    "outlier_threshold",
    "run_partition_tasks",
]

log = logging.getLogger(__name__)

PAPER_CANDIDATES: tuple[int, ...] = tuple(DEFAULT_K_CANDIDATES)
"""K = 5, 10, 15, 20, 100, 200, 300 (method.md A.6)."""

MIN_PROFILES_PER_CLUSTER = 10
"""Default of ``min_profiles_per_cluster``: a cluster should stand for more than a handful of
distinct profiles on average, so K <= profiles / 10 (:func:`k_bound`)."""

OUTLIER_FENCE = 3.0
"""Interquartile ranges above Q3 from which a distance is an outlier (Tukey's far-out fence)."""

P = TypeVar("P")


@dataclass(frozen=True)
class Profiles:
    """The distinct rows of an encoded feature table.

    ``data`` holds one row per profile, in order of first appearance; ``counts[j]`` how
    many input rows have profile j (float64); ``inverse[i]`` the profile of input row i
    (so ``subset_rows(data, inverse)`` rebuilds the input).
    """

    data: GowerData
    counts: np.ndarray
    inverse: np.ndarray


def distinct_profiles(data: GowerData) -> Profiles:
    """Group identical rows (NaN equal to NaN, missing category equal to missing); A.7.

    O(n p) by row hashing with an exact check (:func:`pipelines.gower.unique_rows`): a
    million rows x 83 features take a few seconds.
    """
    first, inverse, counts = unique_rows(data)
    return Profiles(subset_rows(data, first), counts.astype(np.float64), inverse)


@dataclass
class TagClusterModel:
    """A fitted clustering: medoid profiles, the frozen ranges, and how K was chosen.

    Attributes
    ----------
    medoids : GowerData with K rows -- the medoid profiles, with the fit vocabularies
    ranges : NumericRanges -- frozen ``R_k`` (A.4)
    feature_weights : ndarray of shape (p_num + p_cat,) or None
    k : int
    silhouettes : dict -- every tried K -> weighted mean silhouette on the K-selection sample
    inertia : float -- weighted sum of distances to the medoids on the clustered sample
    n_profiles : int -- distinct profiles in the input
    n_profiles_clustered : int -- profiles in the clustered sample (the Gower matrix side)
    medoid_rows : ndarray of shape (K,), int64
        The row of the fit input each medoid is: of ``data`` for :func:`fit_tag_clusters`
        (the first row with that profile), of ``profiles`` for :func:`fit_profile_clusters`.
    sample_labels, sample_weights, sample_silhouettes : ndarrays of shape (n_profiles_clustered,)
        Cluster, weight (sampled instances) and silhouette of every clustered profile, for
        the per-cluster report.
    n_profiles_for_k : int -- size of the sample K was chosen on (= n_profiles_clustered
        unless ``k_selection_profiles`` made it smaller)
    timings : dict -- seconds for the distance matrix, the choice of K and the final fit
    k_bound : int -- the largest K the candidates were allowed (:func:`k_bound`)
    """

    medoids: GowerData
    ranges: NumericRanges
    feature_weights: np.ndarray | None
    k: int
    silhouettes: dict[int, float]
    inertia: float
    n_profiles: int
    n_profiles_clustered: int
    medoid_rows: np.ndarray = field(repr=False)
    sample_labels: np.ndarray = field(repr=False)
    sample_weights: np.ndarray = field(repr=False)
    sample_silhouettes: np.ndarray = field(repr=False)
    n_profiles_for_k: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    k_bound: int = 0

    def assign(self, data: GowerData, *, chunk_rows: int = 16384) -> tuple[np.ndarray, np.ndarray]:
        """Nearest medoid (label, Gower distance) of every row, O(n K); method.md A.7.

        Bit-identical for a row whatever else is in ``data`` (batching, partitioning).
        Encode ``data`` with ``vocabularies=model.medoids.vocabularies``.
        """
        return gower_to_medoids(data, self.medoids, ranges=self.ranges,
                                weights=self.feature_weights, chunk_rows=chunk_rows)


def fit_tag_clusters(
    data: GowerData,
    *,
    counts: np.ndarray | None = None,
    candidates: Sequence[int] = PAPER_CANDIDATES,
    max_profiles: int = 5000,
    k_selection_profiles: int | None = None,
    feature_weights: np.ndarray | None = None,
    random_state: int = 0,
    min_profiles_per_cluster: int = MIN_PROFILES_PER_CLUSTER,
) -> TagClusterModel:
    """Distinct profiles of ``data``, then :func:`fit_profile_clusters` (A.5-A.7).

    Parameters
    ----------
    data : GowerData with n rows
        Instances, or (with ``counts``) already grouped profiles such as a SQL
        ``GROUP BY`` returns; rows that are still identical after encoding are merged.
    counts : ndarray of shape (n,), optional
        Instances each row stands for (positive integers); default 1 per row.
    candidates, max_profiles, k_selection_profiles, feature_weights, random_state,
    min_profiles_per_cluster
        See :func:`fit_profile_clusters`.

    Returns
    -------
    TagClusterModel
        ``medoid_rows`` index ``data`` (the first row with each medoid's profile).
    """
    first, inverse, row_counts = unique_rows(data)
    if counts is None:
        profile_counts = row_counts.astype(np.float64)
    else:
        counts = _checked_counts(counts, data.n_samples)
        profile_counts = np.bincount(inverse, weights=counts, minlength=first.size)
    model = fit_profile_clusters(
        subset_rows(data, first), profile_counts, candidates=candidates,
        max_profiles=max_profiles, k_selection_profiles=k_selection_profiles,
        feature_weights=feature_weights, random_state=random_state,
        min_profiles_per_cluster=min_profiles_per_cluster)
    model.medoid_rows = first[model.medoid_rows]
    return model


def _checked_counts(counts: np.ndarray, n_rows: int) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.float64)
    if counts.shape != (n_rows,):
        raise ValueError(f"counts must have shape ({n_rows},), got {counts.shape}")
    if n_rows and (np.any(counts < 1) or np.any(counts != np.round(counts))):
        raise ValueError("counts must be positive integers (instances per profile)")
    return counts


def fit_profile_clusters(
    profiles: GowerData,
    counts: np.ndarray,
    *,
    candidates: Sequence[int] = PAPER_CANDIDATES,
    max_profiles: int = 5000,
    k_selection_profiles: int | None = None,
    feature_weights: np.ndarray | None = None,
    random_state: int = 0,
    min_profiles_per_cluster: int = MIN_PROFILES_PER_CLUSTER,
) -> TagClusterModel:
    """K by weighted mean silhouette over ``candidates``, weighted K-medoids (A.5-A.7).

    Takes the distinct profiles and their instance counts directly (what a SQL
    ``GROUP BY`` over the feature columns returns), so the instances need not be in memory.

    Parameters
    ----------
    profiles : GowerData with m distinct rows
    counts : ndarray of shape (m,)
        Instances per profile (positive integers).
    candidates : sequence of int
        K values to try (the paper's by default); those above :func:`k_bound` of the number
        of clustered profiles are skipped (when that leaves none, the smallest candidate
        below the number of profiles is fitted alone).
    max_profiles : int
        Largest Gower matrix side. With more profiles, a random sample of ``max_profiles``
        instances (drawn without replacement over all instances) is collapsed into its
        distinct profiles, weighted by their sampled counts.
    k_selection_profiles : int, optional
        Choose K on a smaller sample (``k_selection_profiles`` instances drawn the same way
        from the clustered sample) and fit only the chosen K on the full sample. Fitting
        the paper's 7 candidates costs ~7x the final fit (K = 300 dominates); this bounds
        that cost. None: choose K on the clustered sample itself, as the paper did.
    feature_weights : ndarray of shape (p_num + p_cat,), optional
    random_state : int
    min_profiles_per_cluster : int
        Distinct profiles a cluster should stand for on average (:func:`k_bound`); 1 leaves
        only the paper's ``2 <= K < profiles``.

    Returns
    -------
    TagClusterModel
        Ranges are frozen on the profiles, which have the same minimum and maximum as the
        instances, so later assignments do not depend on what they are batched with.
    """
    counts = _checked_counts(counts, profiles.n_samples)
    rng = np.random.default_rng(random_state)
    timings: dict[str, float] = {}
    ranges = fit_ranges(profiles)
    chosen, weights = _instance_sample(counts, max_profiles, rng)
    sample = subset_rows(profiles, chosen)

    started = time.perf_counter()
    # float32, as gower_matrix returns it: KMedoids and the silhouette convert rows to
    # float64 before any arithmetic, so results equal those on a float64 copy, at half the
    # memory traffic (the K = 300 fit ran 2-3x faster, benchmarks/clustering/README.md).
    distances = gower_matrix(sample, ranges=ranges, weights=feature_weights)
    timings["distance_matrix"] = time.perf_counter() - started
    bound = k_bound(sample.n_samples, min_profiles_per_cluster)
    fitting = tuple(dict.fromkeys(int(k) for k in candidates if 2 <= int(k) < sample.n_samples))
    if not fitting:
        raise ValueError(f"no candidate K in {tuple(candidates)} fits {sample.n_samples} distinct "
                         "profiles (need 2 <= K < profiles)")
    usable = tuple(k for k in fitting if k <= bound) or (min(fitting),)
    if usable != fitting:
        log.info("tag clusters: K bounded by %d (%d profiles / %d per cluster): trying %s, "
                 "not %s", bound, sample.n_samples, min_profiles_per_cluster, usable,
                 tuple(k for k in fitting if k not in usable))

    selection = np.arange(sample.n_samples)
    selection_weights = weights
    if k_selection_profiles is not None and k_selection_profiles < weights.sum():
        selection, selection_weights = _instance_sample(weights, k_selection_profiles, rng)
    started = time.perf_counter()
    selection_distances = (distances if selection.size == sample.n_samples
                           else distances[np.ix_(selection, selection)])
    best_k, table, fitted = _choose_k(selection_distances, selection_weights, usable,
                                      random_state)
    timings["choose_k"] = time.perf_counter() - started

    started = time.perf_counter()
    if selection.size != sample.n_samples:
        fitted = KMedoids(best_k, random_state=random_state).fit(distances, sample_weight=weights)
    sample_silhouettes = silhouette_samples(distances, fitted.labels_, sample_weight=weights)
    timings["final_fit"] = time.perf_counter() - started
    log.info("tag clusters: K=%d of %s on %d profiles (%d for K), %s", best_k, usable,
             sample.n_samples, selection.size,
             ", ".join(f"{name} {seconds:.1f}s" for name, seconds in timings.items()))
    return TagClusterModel(
        medoids=subset_rows(sample, fitted.medoid_indices_),
        ranges=ranges,
        feature_weights=feature_weights,
        k=best_k,
        silhouettes={int(k): float(v) for k, v in table.items()},
        inertia=float(fitted.inertia_),
        n_profiles=profiles.n_samples,
        n_profiles_clustered=sample.n_samples,
        medoid_rows=chosen[fitted.medoid_indices_].astype(np.int64),
        sample_labels=np.asarray(fitted.labels_, dtype=np.int64),
        sample_weights=np.asarray(weights, dtype=np.float64),
        sample_silhouettes=sample_silhouettes,
        n_profiles_for_k=int(selection.size),
        timings=timings,
        k_bound=bound,
    )


def k_bound(n_profiles: int, min_profiles_per_cluster: int = MIN_PROFILES_PER_CLUSTER) -> int:
    """The largest K tried on ``n_profiles`` distinct profiles: ``n_profiles //
    min_profiles_per_cluster``, at least 2.

    Why: distinct profiles weighted by their instance counts favour large K. A profile
    that is a cluster of its own, standing for w > 1 identical instances, has ``a(i) = 0``
    and silhouette 1 (A.6's weighted form), so the silhouette rises as K approaches the
    number of profiles: 236 profiles of 355 real instances chose K = 100 (silhouette 0.80,
    against 0.68 for K = 20), clusters of two or three profiles nobody can read. Asking
    every cluster to stand for ``min_profiles_per_cluster`` profiles on average keeps K
    where the silhouette compares groupings, not copies.
    """
    if min_profiles_per_cluster < 1:
        raise ValueError(f"min_profiles_per_cluster must be >= 1, got {min_profiles_per_cluster}")
    return max(2, int(n_profiles) // int(min_profiles_per_cluster))


def outlier_threshold(distances: np.ndarray, fence: float = OUTLIER_FENCE) -> float:
    """Distance above which an instance fits no tag cluster: Tukey's far-out fence over the
    distances of the instances that are not exactly on their medoid's profile.

    Method: over the run's own assignment distances ``d`` (each instance to its nearest
    medoid), drop the zeros (an instance with its medoid's very profile always fits), then

        Q1, Q3 = 25th and 75th percentiles (linear interpolation, as percentile_cont)
        threshold = Q3 + fence * (Q3 - Q1),   fence = 3 (Tukey's "far out")

    and ``d > threshold`` is an outlier. Why this and not median + k MAD: the distances are
    zero-inflated and right-skewed (on ../shared/data/dicom a quarter sit on a medoid, the
    median is 0.002, the 95th percentile 0.16), so the MAD is tiny and median + 3.5 robust
    SD flagged 40 % of the instances; a fence on the quartiles of the non-zero distances
    flagged 5 %, those differing from their medoid in about a fifth of their features.
    Quartiles are not moved by outliers up to a quarter of the instances. Returns NaN (no
    threshold: nothing is an outlier) with fewer than 4 non-zero distances.

    Parameters
    ----------
    distances : ndarray of shape (n,) -- Gower distances in [0, 1]
    fence : float -- interquartile ranges above Q3
    """
    d = np.asarray(distances, dtype=np.float64).ravel()
    off = d[d > 0]
    if off.size < 4:
        return float("nan")
    q1, q3 = np.quantile(off, [0.25, 0.75])
    return float(q3 + fence * (q3 - q1))


def _instance_sample(
    counts: np.ndarray, n_instances: int, rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Profiles and weights of a random sample of ``n_instances`` instances (A.7).

    Every profile is kept with its full count when there are at most ``n_instances``
    profiles. Otherwise ``n_instances`` instances are drawn without replacement
    (multivariate hypergeometric over the counts) and the profiles they fall on are kept,
    weighted by how many were drawn. (Drawing profiles with probability proportional to
    their counts *and* weighting them by their counts would count large profiles twice.)

    Returns ``(profile indices (sorted), weights)``.
    """
    if counts.size <= n_instances:
        return np.arange(counts.size), counts
    drawn = rng.multivariate_hypergeometric(counts.astype(np.int64), n_instances,
                                            method="marginals")
    chosen = np.flatnonzero(drawn)
    return chosen, drawn[chosen].astype(np.float64)


def _choose_k(
    distances: np.ndarray, weights: np.ndarray, candidates: Sequence[int], random_state: int,
) -> tuple[int, dict[int, float], KMedoids]:
    """:func:`pipelines.model_selection.choose_k` (same fits, same rule: highest weighted
    mean silhouette, smallest K on ties), keeping the winning fit so it is not redone."""
    table: dict[int, float] = {}
    best: tuple[float, int, KMedoids] | None = None
    for k in candidates:
        if not 2 <= k < distances.shape[0]:
            log.info("choose K: skipping K=%d for %d profiles", k, distances.shape[0])
            continue
        model = KMedoids(k, random_state=random_state).fit(distances, sample_weight=weights)
        table[k] = silhouette_score(distances, model.labels_, sample_weight=weights)
        log.info("choose K: K=%d mean silhouette %.4f loss %.6g", k, table[k], model.inertia_)
        if best is None or table[k] > best[0] or (table[k] == best[0] and k < best[1]):
            best = (table[k], k, model)
    if best is None:
        raise ValueError(f"no candidate K in {tuple(candidates)} fits {distances.shape[0]} "
                         "profiles (need 2 <= K < profiles)")
    return best[1], table, best[2]


# ---------------------------------------------------------------- distributed assignment


class PartitionAssignmentError(RuntimeError):
    """Loading, assigning or storing one partition failed; ``partition`` names it."""

    def __init__(self, partition: object, cause: BaseException) -> None:
        super().__init__(
            f"tag assignment of partition {partition!r} failed: {type(cause).__name__}: {cause}")
        self.partition = partition


def _assign_one(
    model: TagClusterModel, partition: P, load: Callable[[P], GowerData],
    store: Callable[[P, np.ndarray, np.ndarray], int],
) -> int:
    """Worker side: load one partition, give every row its nearest medoid, store it."""
    data = load(partition)
    labels, distances = model.assign(data)
    return store(partition, labels, distances)


def assign_partitions(
    model: TagClusterModel,
    partitions: Sequence[P],
    load: Callable[[P], GowerData],
    store: Callable[[P, np.ndarray, np.ndarray], int],
    *,
    scheduler: str | None = None,
    n_workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Nearest medoid of every instance of every partition, in Dask workers (A.7).

    For each partition ``p`` a worker runs ``store(p, labels, distances)`` on
    ``model.assign(load(p))``. ``load`` and ``store`` run inside the workers, so they must
    be picklable (module-level functions or ``functools.partial`` of them). Results do not
    depend on the partitioning (:meth:`TagClusterModel.assign` is row-by-row
    deterministic). ``store`` returns the number of rows it stored; the total is returned.
    Scheduling, failures and the other parameters: :func:`run_partition_tasks`.
    """
    return run_partition_tasks(partial(_assign_one, load=load, store=store), model,
                               partitions, scheduler=scheduler, n_workers=n_workers,
                               progress=progress)


def run_partition_tasks(
    task: Callable[[Any, P], int],
    model: Any,
    partitions: Sequence[P],
    *,
    scheduler: str | None = None,
    n_workers: int | None = None,
    processes: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Run ``task(model, p)`` for every partition on Dask and sum the returned row counts.

    The model is sent to every worker once (``scatter(broadcast=True)``), not pickled per
    task; ``task`` must be picklable.

    Parameters
    ----------
    scheduler : str, optional
        Address of a running Dask scheduler (``"tcp://host:8786"``). None starts a
        ``LocalCluster`` (one thread per worker, no dashboard) for this call and closes it
        afterwards.
    n_workers : int, optional
        Workers of that LocalCluster; default the CPUs this process may use.
    processes : bool, default True
        LocalCluster workers as processes; False runs them as threads of this process
        (starts in a fraction of a second: for small archives and tests).
    progress : callable ``(done, total)``, optional
        Called in the calling process each time a partition has finished.

    Raises
    ------
    PartitionAssignmentError
        When a task raised; the message and the ``partition`` attribute name it,
        ``__cause__`` is the worker's exception. The partitions still pending are
        cancelled; those already finished stay finished.
    """
    # dask.distributed (BSD-3) is only needed here; the rest of the module is numpy-only.
    from distributed import Client, LocalCluster, as_completed

    partitions = list(partitions)
    if not partitions:
        return 0
    if scheduler is None:
        workers = n_workers if n_workers is not None else _usable_cpus()
        if workers < 1:
            raise ValueError(f"n_workers must be >= 1, got {workers}")
        # No dashboard; the scheduler's small HTTP server (health, metrics) still starts,
        # so put it on a free local port instead of 8787, which another cluster may hold.
        cluster = LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=processes,
            dashboard_address=None,
            scheduler_kwargs={"dashboard": False, "dashboard_address": "127.0.0.1:0"},
            silence_logs=logging.ERROR)
        client = Client(cluster)
    else:
        cluster = None
        client = Client(scheduler)
    model_future, futures = None, {}
    try:
        [model_future] = client.scatter([model], broadcast=True, hash=False)
        run = os.urandom(4).hex()  # task keys unique to this call on a shared scheduler
        futures = {
            client.submit(_checked_task, task, model_future, partition, pure=False,
                          key=f"partition-task-{run}-{index}"): partition
            for index, partition in enumerate(partitions)
        }
        total_rows = 0
        for done, future in enumerate(as_completed(futures), start=1):
            partition = futures[future]
            try:
                total_rows += future.result()
            except Exception as error:
                raise PartitionAssignmentError(partition, error) from error
            if progress is not None:
                progress(done, len(partitions))
        return total_rows
    finally:
        # Release the pending tasks and the scattered model before closing: on a shared
        # scheduler they would stay, and a LocalCluster closed while its workers still hold
        # data logs all of it as lost.
        client.cancel([*futures, *([model_future] if model_future is not None else [])])
        client.close()
        if cluster is not None:
            cluster.close()


def _checked_task(task: Callable[[Any, P], int], model: Any, partition: P) -> int:
    rows = task(model, partition)
    if not isinstance(rows, (int, np.integer)) or isinstance(rows, bool):
        raise TypeError(f"a partition task must return the number of rows it stored, "
                        f"got {rows!r}")
    return int(rows)


def _usable_cpus() -> int:
    """CPUs this process may run on (the affinity mask in a container), else the count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
