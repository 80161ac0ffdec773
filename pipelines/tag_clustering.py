"""Tag clustering at archive scale (method.md A.5-A.7): cluster the distinct tag profiles,
weighted by how many instances share each, then give every instance its nearest medoid.

Slices of one series share almost every parsed tag, so an archive of millions of instances
has far fewer distinct profiles. K-medoids on the profiles with ``sample_weight`` = instance
count minimises exactly the same objective as on the expanded instances (the sum over
instances of the distance to their medoid); when even the profiles are too many for an
n x n Gower matrix, a sample of them is drawn with probability proportional to their counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .gower import GowerData, NumericRanges, fit_ranges, gower_matrix, gower_to_medoids, subset_rows
from .kmedoids import KMedoids
from .model_selection import choose_k, silhouette_samples

PAPER_CANDIDATES = (5, 10, 15, 20, 100, 200, 300)


@dataclass(frozen=True)
class Profiles:
    """The distinct rows of an encoded feature table.

    ``data`` holds one row per profile, ``counts[j]`` how many input rows have profile j,
    and ``inverse[i]`` the profile of input row i (so ``subset_rows(data, inverse)``
    rebuilds the input).
    """

    data: GowerData
    counts: np.ndarray
    inverse: np.ndarray


def distinct_profiles(data: GowerData) -> Profiles:
    """Group identical rows (NaN equal to NaN, missing category equal to missing)."""
    numeric = np.where(np.isnan(data.numeric), np.nan, data.numeric)  # one NaN bit pattern
    keys = np.concatenate(
        [numeric.astype(np.float64).view(np.int64), data.categorical.astype(np.int64)], axis=1)
    if keys.shape[1] == 0:
        keys = np.zeros((data.n_samples, 1), dtype=np.int64)
    _, first, inverse, counts = np.unique(keys, axis=0, return_index=True,
                                          return_inverse=True, return_counts=True)
    return Profiles(subset_rows(data, first), counts.astype(np.float64), inverse.reshape(-1))


@dataclass
class TagClusterModel:
    """A fitted clustering: medoid profiles, the frozen ranges, and how K was chosen."""

    medoids: GowerData
    ranges: NumericRanges
    feature_weights: np.ndarray | None
    k: int
    silhouettes: dict[int, float]
    inertia: float
    n_profiles: int
    n_profiles_clustered: int
    profile_labels: np.ndarray = field(repr=False)
    medoid_rows: np.ndarray = field(repr=False, default_factory=lambda: np.empty(0, np.intp))
    sample_rows: np.ndarray = field(repr=False, default_factory=lambda: np.empty(0, np.intp))
    sample_weights: np.ndarray = field(repr=False, default_factory=lambda: np.empty(0))
    sample_silhouettes: np.ndarray = field(repr=False, default_factory=lambda: np.empty(0))

    @property
    def sample_labels(self) -> np.ndarray:
        """Cluster (medoid index) of every clustered profile, alias of ``profile_labels``."""
        return self.profile_labels

    def assign(self, data: GowerData, *, chunk_rows: int = 16384) -> tuple[np.ndarray, np.ndarray]:
        """Nearest medoid (label, Gower distance) of every row, O(n K); method.md A.7."""
        return gower_to_medoids(data, self.medoids, ranges=self.ranges,
                                weights=self.feature_weights, chunk_rows=chunk_rows)


def fit_tag_clusters(
    data: GowerData,
    *,
    candidates: tuple[int, ...] = PAPER_CANDIDATES,
    max_profiles: int = 5000,
    feature_weights: np.ndarray | None = None,
    random_state: int = 0,
    counts: np.ndarray | None = None,
) -> TagClusterModel:
    """K by weighted mean silhouette over ``candidates``, then weighted K-medoids (A.5, A.6).

    Numeric ranges are frozen from all the data given here, so later assignments do not
    depend on what they are batched with.

    ``counts``: the rows of ``data`` are already distinct profiles and ``counts[i]`` is how
    many instances share row i (e.g. grouped in SQL); default: group ``data`` here. The
    returned ``medoid_rows`` and ``sample_rows`` index rows of ``data`` in that case, and
    rows of the distinct profiles otherwise.
    """
    if counts is None:
        profiles = distinct_profiles(data)
    else:
        counts = np.asarray(counts, dtype=np.float64).reshape(-1)
        if counts.shape[0] != data.n_samples or np.any(counts <= 0):
            raise ValueError("counts must hold one positive count per row of data")
        profiles = Profiles(data, counts, np.arange(data.n_samples))
    ranges = fit_ranges(data)
    chosen = np.arange(profiles.data.n_samples)
    if chosen.size > max_profiles:
        rng = np.random.default_rng(random_state)
        chosen = np.sort(rng.choice(chosen.size, size=max_profiles, replace=False,
                                    p=profiles.counts / profiles.counts.sum()))
    sample = subset_rows(profiles.data, chosen)
    weights = profiles.counts[chosen]
    distances = gower_matrix(sample, ranges=ranges, weights=feature_weights).astype(np.float64)
    usable = tuple(k for k in candidates if 2 <= k < sample.n_samples)
    if not usable:
        raise ValueError(f"no candidate K in {candidates} fits {sample.n_samples} distinct "
                         "profiles (need 2 <= K < profiles)")
    best_k, table = choose_k(distances, usable, sample_weight=weights,
                             random_state=random_state)
    model = KMedoids(best_k, random_state=random_state).fit(distances, sample_weight=weights)
    medoids = subset_rows(sample, model.medoid_indices_)
    silhouettes = silhouette_samples(distances, model.labels_, sample_weight=weights)
    return TagClusterModel(
        medoids=medoids,
        ranges=ranges,
        feature_weights=feature_weights,
        k=best_k,
        silhouettes={int(k): float(v) for k, v in table.items()},
        inertia=float(model.inertia_),
        n_profiles=profiles.data.n_samples,
        n_profiles_clustered=sample.n_samples,
        profile_labels=np.asarray(model.labels_),
        medoid_rows=chosen[np.asarray(model.medoid_indices_)],
        sample_rows=chosen,
        sample_weights=weights,
        sample_silhouettes=silhouettes,
    )
