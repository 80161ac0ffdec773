"""K-medoids on a precomputed distance matrix (method.md A.5, A.7).

Objective (with optional sample weights ``w``, default 1)::

    L(M) = sum_i w_i * min_{m in M} d(i, m),   |M| = K, M a subset of the n points

Weights let the service cluster the *distinct* tag profiles, each weighted by the number of
instances that share it (A.7): the weighted objective on the profiles equals the unweighted
objective on the instances, because identical rows have identical distances to everything.

Algorithms

* ``init="build"``: PAM's greedy BUILD (Kaufman & Rousseeuw 1990): the first medoid minimises
  the total distance, every next one gives the largest decrease of ``L``.
* ``method="pam"``: PAM SWAP -- evaluate every (medoid, non-medoid) swap, do the best one,
  repeat until no swap lowers ``L``. O(n^2) per swap.
* ``method="fasterpam"``: FasterPAM (Schubert & Rousseeuw 2021, "Fast and eager k-medoids
  clustering: O(k) runtime improvement of the PAM, CLARA, and CLARANS algorithms",
  Information Systems 101, 101804). For each non-medoid candidate ``c`` the change of ``L``
  for removing *every* medoid at once is computed in O(n) from the nearest / second-nearest
  distances, and the best improving swap is done *eagerly*, before the next candidate is
  looked at. It stops when a whole cycle over the candidates finds no improvement, which is
  the same kind of local optimum as PAM (no single swap improves ``L``).

Both are vectorised in numpy over a batch of candidates (the per-medoid sums are one matrix
product with the one-hot matrix of nearest medoids). For FasterPAM a batch is evaluated
against the current medoids, the *first* improving candidate in it is swapped in, and the
scan resumes right after it, so the result is exactly that of the sequential eager loop.

Memory: the (n, n) matrix itself; ``float32`` input is fine (sums are done in float64).
"""

from __future__ import annotations

import logging
import warnings
from typing import Literal

import numpy as np

__all__ = ["KMedoids", "build_init", "fasterpam_swap", "pam_swap", "assign_to_medoids",
           "medoid_loss"]

log = logging.getLogger(__name__)

_RELATIVE_IMPROVEMENT_TOL = 1e-12
# A swap must lower L by more than this fraction of L: float rounding must not make two
# equally good configurations swap back and forth forever.

_BATCH_MIN, _BATCH_MAX = 16, 512
# FasterPAM candidate batches: small right after a swap (the rest of the batch is wasted when
# the state changes), doubling while no swap is found.


class ConvergenceWarning(UserWarning):
    """SWAP stopped at ``max_iter`` before reaching a local optimum."""


def _check_distances(distances: np.ndarray) -> np.ndarray:
    array = np.asarray(distances)
    if array.ndim != 2 or array.shape[0] != array.shape[1]:
        raise ValueError(f"distances must be a square (n, n) matrix, got shape {array.shape}")
    if array.dtype not in (np.float32, np.float64):
        array = array.astype(np.float64)
    return array


def _check_weights(sample_weight: np.ndarray | None, n_samples: int) -> np.ndarray:
    if sample_weight is None:
        return np.ones(n_samples, dtype=np.float64)
    weights = np.asarray(sample_weight, dtype=np.float64)
    if weights.shape != (n_samples,):
        raise ValueError(
            f"sample_weight must have shape ({n_samples},), got {weights.shape}")
    if not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise ValueError("sample_weight must be finite and non-negative")
    return weights


def assign_to_medoids(
    distances: np.ndarray, medoids: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest and second-nearest medoid of every point.

    Parameters
    ----------
    distances : ndarray of shape (n, n), symmetric
    medoids : ndarray of shape (K,), int

    Returns
    -------
    nearest : ndarray of shape (n,), int64 -- position (0..K-1) in ``medoids``
    nearest_distance : ndarray of shape (n,), float64
    second_distance : ndarray of shape (n,), float64 (``inf`` when K == 1)
    """
    to_medoids = np.asarray(distances[medoids], dtype=np.float64).T  # (n, K), symmetric D
    nearest = np.argmin(to_medoids, axis=1)
    rows = np.arange(to_medoids.shape[0])
    nearest_distance = to_medoids[rows, nearest]
    if len(medoids) == 1:
        second_distance = np.full_like(nearest_distance, np.inf)
    else:
        masked = to_medoids.copy()
        masked[rows, nearest] = np.inf
        second_distance = masked.min(axis=1)
    return nearest, nearest_distance, second_distance


def medoid_loss(
    distances: np.ndarray, medoids: np.ndarray, *, sample_weight: np.ndarray | None = None,
) -> float:
    """``L(M) = sum_i w_i min_m d(i, m)`` for distances (n, n) and medoids (K,)."""
    weights = _check_weights(sample_weight, distances.shape[0])
    _, nearest_distance, _ = assign_to_medoids(distances, np.asarray(medoids))
    return float(weights @ nearest_distance)


def build_init(
    distances: np.ndarray, n_clusters: int, *, sample_weight: np.ndarray | None = None,
    batch_rows: int = 256,
) -> np.ndarray:
    """PAM BUILD: greedy medoids (method.md A.5). Returns medoid indices, shape (K,).

    ``distances``: (n, n) symmetric; ``sample_weight``: (n,) or None. O(n^2 K) time in the
    worst case; each step after the second only revisits the points whose nearest medoid
    changed, which is usually a small share.
    """
    distances = _check_distances(distances)
    n_samples = distances.shape[0]
    weights = _check_weights(sample_weight, n_samples)
    if not 1 <= n_clusters <= n_samples:
        raise ValueError(f"n_clusters must be in [1, {n_samples}], got {n_clusters}")
    total = np.empty(n_samples, dtype=np.float64)
    for start in range(0, n_samples, batch_rows):
        rows = slice(start, min(start + batch_rows, n_samples))
        total[rows] = distances[rows].astype(np.float64) @ weights
    medoids = [int(np.argmin(total))]
    nearest_distance = distances[medoids[0]].astype(np.float64)
    is_medoid = np.zeros(n_samples, dtype=bool)
    is_medoid[medoids[0]] = True
    if n_clusters == 1:
        return np.array(medoids, dtype=np.int64)
    # gain[c] = sum_o w_o max(nearest_distance[o] - d(c, o), 0): the loss decrease of adding
    # c. Computed in full once; afterwards only the points whose nearest distance dropped
    # change their terms, so each step costs O(n * changed) instead of O(n^2).
    gain = np.empty(n_samples, dtype=np.float64)
    for start in range(0, n_samples, batch_rows):
        rows = slice(start, min(start + batch_rows, n_samples))
        decrease = nearest_distance - distances[rows]  # (batch, n)
        np.maximum(decrease, 0.0, out=decrease)
        gain[rows] = decrease @ weights
    for _ in range(1, n_clusters):
        gain_of_candidates = np.where(is_medoid, -np.inf, gain)
        chosen = int(np.argmax(gain_of_candidates))
        medoids.append(chosen)
        is_medoid[chosen] = True
        to_chosen = distances[chosen].astype(np.float64)
        changed = np.flatnonzero(to_chosen < nearest_distance)
        for start in range(0, changed.size, batch_rows):
            points = changed[start:start + batch_rows]
            # d(c, o) for the changed points o, all candidates c: rows of a symmetric D.
            to_points = distances[points].astype(np.float64)  # (batch, n)
            old_terms = np.maximum(nearest_distance[points, None] - to_points, 0.0)
            new_terms = np.maximum(to_chosen[points, None] - to_points, 0.0)
            gain -= weights[points] @ (old_terms - new_terms)
        nearest_distance[changed] = to_chosen[changed]
    return np.array(medoids, dtype=np.int64)


class _SwapState:
    """Nearest / second-nearest bookkeeping shared by PAM and FasterPAM SWAP."""

    def __init__(self, distances: np.ndarray, medoids: np.ndarray, weights: np.ndarray):
        self.distances = distances
        self.weights = weights
        self.medoids = medoids.copy()
        self.is_medoid = np.zeros(distances.shape[0], dtype=bool)
        self.is_medoid[self.medoids] = True
        self.refresh()

    def refresh(self) -> None:
        self.nearest, self.nearest_distance, self.second_distance = assign_to_medoids(
            self.distances, self.medoids)
        n_clusters = len(self.medoids)
        self.nearest_onehot = np.zeros((len(self.nearest), n_clusters), dtype=np.float64)
        self.nearest_onehot[np.arange(len(self.nearest)), self.nearest] = 1.0
        # Removal loss of medoid i: what L grows by when i is removed and its points move
        # to their second-nearest medoid.
        finite_second = np.where(np.isinf(self.second_distance), self.nearest_distance,
                                 self.second_distance)  # K == 1: never used
        self.removal_loss = np.bincount(
            self.nearest, weights=self.weights * (finite_second - self.nearest_distance),
            minlength=n_clusters)
        self.loss = float(self.weights @ self.nearest_distance)

    def swap_deltas(self, candidates: np.ndarray) -> np.ndarray:
        """Change of L for swapping each candidate with each medoid: (C, K)."""
        to_candidates = self.distances[candidates].astype(np.float64)  # (C, n)
        # Point o moves to the candidate if it is closer than o's nearest medoid.
        gain_new = np.minimum(to_candidates - self.nearest_distance, 0.0) @ self.weights
        # Per removed medoid i: points of i that do not move to the candidate go to
        # min(candidate, second nearest) instead of second nearest (already counted in
        # removal_loss); points of i that move to the candidate did not need the second.
        if len(self.medoids) == 1:
            # Removing the only medoid moves every point to the candidate.
            return ((to_candidates - self.nearest_distance) @ self.weights)[:, None]
        closer = to_candidates < self.nearest_distance
        per_point = np.where(closer, self.nearest_distance - self.second_distance,
                             np.minimum(to_candidates - self.second_distance, 0.0))
        per_medoid = (per_point * self.weights) @ self.nearest_onehot  # (C, K)
        return self.removal_loss[None, :] + per_medoid + gain_new[:, None]

    def swap(self, medoid_position: int, candidate: int) -> None:
        self.is_medoid[self.medoids[medoid_position]] = False
        self.medoids[medoid_position] = candidate
        self.is_medoid[candidate] = True
        self.refresh()

    def improvement_threshold(self) -> float:
        return -_RELATIVE_IMPROVEMENT_TOL * max(self.loss, np.finfo(np.float64).tiny)


def fasterpam_swap(
    distances: np.ndarray, medoids: np.ndarray, *, sample_weight: np.ndarray | None = None,
    max_iter: int = 100,
) -> tuple[np.ndarray, int, int]:
    """FasterPAM eager SWAP from ``medoids`` (K,) on ``distances`` (n, n).

    Returns ``(medoids (K,), n_passes, n_swaps)``; ``n_passes`` counts cycles over the
    candidates (at most ``max_iter``).
    """
    distances = _check_distances(distances)
    n_samples = distances.shape[0]
    state = _SwapState(distances, np.asarray(medoids, dtype=np.int64),
                       _check_weights(sample_weight, n_samples))
    if len(state.medoids) == n_samples:
        return state.medoids, 0, 0
    n_swaps = 0
    position = 0          # next candidate to look at (cyclic)
    scanned_since_swap = 0  # candidates looked at since the last swap
    scanned_total = 0
    batch = _BATCH_MIN
    while scanned_since_swap < n_samples:
        if scanned_total >= max_iter * n_samples:
            warnings.warn(f"FasterPAM stopped after max_iter={max_iter} passes",
                          ConvergenceWarning, stacklevel=3)
            break
        size = min(batch, n_samples - position, n_samples - scanned_since_swap)
        candidates = np.arange(position, position + size)
        deltas = state.swap_deltas(candidates)
        best_medoid = np.argmin(deltas, axis=1)
        best_delta = deltas[np.arange(size), best_medoid]
        best_delta[state.is_medoid[candidates]] = np.inf
        improving = np.flatnonzero(best_delta < state.improvement_threshold())
        if improving.size:
            first = int(improving[0])
            state.swap(int(best_medoid[first]), int(candidates[first]))
            n_swaps += 1
            scanned = first + 1
            scanned_since_swap = 0
            batch = _BATCH_MIN
        else:
            scanned = size
            scanned_since_swap += size
            batch = min(2 * batch, _BATCH_MAX)
        scanned_total += scanned
        position = (position + scanned) % n_samples
    n_passes = -(-scanned_total // n_samples)
    log.debug("fasterpam: %d swaps, %d passes, loss %.6g", n_swaps, n_passes, state.loss)
    return state.medoids, n_passes, n_swaps


def pam_swap(
    distances: np.ndarray, medoids: np.ndarray, *, sample_weight: np.ndarray | None = None,
    max_iter: int = 100, batch_rows: int = 256,
) -> tuple[np.ndarray, int, int]:
    """Classic PAM SWAP: do the best of all K (n - K) swaps until none improves.

    Returns ``(medoids (K,), n_iterations, n_swaps)``; O(n^2) per iteration.
    """
    distances = _check_distances(distances)
    n_samples = distances.shape[0]
    state = _SwapState(distances, np.asarray(medoids, dtype=np.int64),
                       _check_weights(sample_weight, n_samples))
    n_swaps = 0
    for iteration in range(1, max_iter + 1):
        best = (np.inf, -1, -1)
        for start in range(0, n_samples, batch_rows):
            candidates = np.arange(start, min(start + batch_rows, n_samples))
            deltas = state.swap_deltas(candidates)
            deltas[state.is_medoid[candidates]] = np.inf
            flat = int(np.argmin(deltas))
            row, medoid_position = divmod(flat, deltas.shape[1])
            if deltas[row, medoid_position] < best[0]:
                best = (float(deltas[row, medoid_position]), medoid_position,
                        int(candidates[row]))
        if not best[0] < state.improvement_threshold():
            return state.medoids, iteration, n_swaps
        state.swap(best[1], best[2])
        n_swaps += 1
    warnings.warn(f"PAM stopped after max_iter={max_iter} swaps", ConvergenceWarning,
                  stacklevel=3)
    return state.medoids, max_iter, n_swaps


class KMedoids:
    """K-medoids on a precomputed distance matrix (method.md A.5).

    Parameters
    ----------
    n_clusters : int
        K.
    method : {"fasterpam", "pam"}
        SWAP variant (see module docstring). Both stop at a configuration no single swap
        improves.
    init : {"build", "random"}
        ``"build"``: PAM BUILD (deterministic). ``"random"``: K distinct points drawn
        with ``random_state``.
    max_iter : int
        FasterPAM: most cycles over the candidates; PAM: most swaps.
    random_state : int or None
        Seed for ``init="random"``.
    backend : {"numpy", "kmedoids"}
        ``"kmedoids"`` runs FasterPAM SWAP in the optional ``kmedoids`` package (Rust,
        GPL-3.0, never required; no sample weights) from the same initial medoids.

    Attributes
    ----------
    medoid_indices_ : ndarray of shape (K,), int64
    labels_ : ndarray of shape (n,), int64 -- cluster (0..K-1) of every point
    inertia_ : float -- ``sum_i w_i d(i, medoid(i))``
    n_iter_ : int -- FasterPAM passes, or PAM swap iterations
    n_swaps_ : int

    Examples
    --------
    >>> import numpy as np
    >>> points = np.array([0.0, 0.1, 0.2, 5.0, 5.1, 5.2])
    >>> distances = np.abs(points[:, None] - points[None, :])
    >>> model = KMedoids(2).fit(distances)
    >>> model.medoid_indices_.tolist(), model.labels_.tolist()
    ([1, 4], [0, 0, 0, 1, 1, 1])
    >>> round(model.inertia_, 6)
    0.4
    """

    def __init__(
        self,
        n_clusters: int,
        *,
        method: Literal["fasterpam", "pam"] = "fasterpam",
        init: Literal["build", "random"] = "build",
        max_iter: int = 100,
        random_state: int | None = None,
        backend: Literal["numpy", "kmedoids"] = "numpy",
    ) -> None:
        self.n_clusters = n_clusters
        self.method = method
        self.init = init
        self.max_iter = max_iter
        self.random_state = random_state
        self.backend = backend

    def _validate(self, n_samples: int) -> None:
        if not isinstance(self.n_clusters, (int, np.integer)) or self.n_clusters < 1:
            raise ValueError(f"n_clusters must be a positive integer, got {self.n_clusters!r}")
        if self.n_clusters > n_samples:
            raise ValueError(
                f"n_clusters={self.n_clusters} is larger than the {n_samples} samples")
        if self.method not in ("fasterpam", "pam"):
            raise ValueError(f"method must be 'fasterpam' or 'pam', got {self.method!r}")
        if self.init not in ("build", "random"):
            raise ValueError(f"init must be 'build' or 'random', got {self.init!r}")
        if not isinstance(self.max_iter, (int, np.integer)) or self.max_iter < 1:
            raise ValueError(f"max_iter must be a positive integer, got {self.max_iter!r}")
        if self.backend not in ("numpy", "kmedoids"):
            raise ValueError(f"backend must be 'numpy' or 'kmedoids', got {self.backend!r}")
        if self.backend == "kmedoids" and self.method != "fasterpam":
            raise ValueError("backend='kmedoids' supports only method='fasterpam'")

    def fit(self, distances: np.ndarray, y: None = None, *,
            sample_weight: np.ndarray | None = None) -> "KMedoids":
        """Fit on ``distances`` (n, n), symmetric; ``sample_weight`` (n,) optional."""
        distances = _check_distances(distances)
        n_samples = distances.shape[0]
        self._validate(n_samples)
        weights = _check_weights(sample_weight, n_samples)
        if self.init == "build":
            initial = build_init(distances, int(self.n_clusters), sample_weight=weights)
        else:
            rng = np.random.default_rng(self.random_state)
            initial = rng.choice(n_samples, size=int(self.n_clusters), replace=False)

        if self.backend == "kmedoids":
            if sample_weight is not None:
                raise ValueError("backend='kmedoids' does not support sample_weight")
            medoids, n_iter, n_swaps = _kmedoids_package_fasterpam(
                distances, initial, self.max_iter)
        elif self.method == "fasterpam":
            medoids, n_iter, n_swaps = fasterpam_swap(
                distances, initial, sample_weight=weights, max_iter=int(self.max_iter))
        else:
            medoids, n_iter, n_swaps = pam_swap(
                distances, initial, sample_weight=weights, max_iter=int(self.max_iter))

        nearest, nearest_distance, _ = assign_to_medoids(distances, medoids)
        self.medoid_indices_ = np.asarray(medoids, dtype=np.int64)
        self.labels_ = nearest.astype(np.int64)
        self.inertia_ = float(weights @ nearest_distance)
        self.n_iter_ = int(n_iter)
        self.n_swaps_ = int(n_swaps)
        return self

    def predict(self, distances: np.ndarray) -> np.ndarray:
        """Cluster of new points from their distances to the fit points, (m, n) -> (m,)."""
        if not hasattr(self, "medoid_indices_"):
            raise RuntimeError("this KMedoids instance is not fitted yet; call fit first")
        array = np.asarray(distances)
        if array.ndim != 2 or array.shape[1] <= int(self.medoid_indices_.max()):
            raise ValueError(
                f"distances must have shape (m, n_fit_samples), got {array.shape}")
        return np.argmin(array[:, self.medoid_indices_], axis=1).astype(np.int64)

    def fit_predict(self, distances: np.ndarray, y: None = None, *,
                    sample_weight: np.ndarray | None = None) -> np.ndarray:
        return self.fit(distances, sample_weight=sample_weight).labels_


def _kmedoids_package_fasterpam(
    distances: np.ndarray, initial: np.ndarray, max_iter: int,
) -> tuple[np.ndarray, int, int]:
    try:
        import kmedoids  # GPL-3.0, optional extra
    except ImportError as error:
        raise ImportError(
            "backend='kmedoids' needs the optional GPL-3.0 package 'kmedoids'") from error
    result = kmedoids.fasterpam(distances, np.asarray(initial, dtype=np.int64),
                                max_iter=max_iter, n_cpu=1)
    return np.asarray(result.medoids, dtype=np.int64), int(result.n_iter), int(result.n_swap)
