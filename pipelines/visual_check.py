"""Visual check of the tag clusters (method.md A.8).

Do images that the DICOM tags put in one cluster also look alike? For each of S disjoint
random samples of the archive (the paper: 10 samples of 5,000 images, K = 15)::

    c_k          = mean embedding of the sample's images in tag cluster k
    d_i          = 1 - cos(x_i, c_{k(i)})            cosine distance to the own cluster mean
    true_s       = mean_i d_i                        with the tag-cluster labels
    permuted_s   = mean_i d_i                        with the labels shuffled within the sample

and a paired t-test over the S pairs (``scipy.stats.ttest_rel``, two-sided), with
``t = mean(permuted - true) / (sd(permuted - true) / sqrt(S))``, so that t > 0 when the tag
clusters are visually tighter than random groups of the same sizes. The paper reports
"0.28 vs 0.42, t(9) = 16.42, p < 0.001" (std of the per-sample means 0.023 and 0.017).

Each image's own embedding is part of its cluster mean, in both conditions. The paper
re-clustered each sample by K-medoids; here the labels come in precomputed (A.7 assigns
every instance to its nearest medoid), which is the same check of the same clusters.

References
----------
RadiologyNet: "Using DICOM Tags for Clustering Medical Radiology Images into Visually
Similar Groups" (Manojlović et al., ICPRAM 2020), evaluation section; docs/method.md A.8.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = [
    "VisualCheckResult",
    "distances_to_cluster_means",
    "visual_check",
]


def distances_to_cluster_means(embeddings: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Cosine distance of each embedding to the mean embedding of its cluster (A.8).

    Parameters
    ----------
    embeddings : ndarray of shape (m, d), float
    labels : ndarray of shape (m,) -- any hashable cluster ids

    Returns
    -------
    ndarray of shape (m,), float64 in [0, 2]. A zero-norm embedding or cluster mean has
    cosine similarity 0 (distance 1): the angle is undefined and counts as unrelated.
    """
    embeddings = np.asarray(embeddings, dtype=np.float64)
    _, cluster = np.unique(np.asarray(labels), return_inverse=True)
    cluster = cluster.reshape(-1)
    sums = np.zeros((int(cluster.max()) + 1, embeddings.shape[1]))
    np.add.at(sums, cluster, embeddings)
    # The cluster size scales the mean but not its direction, so cos(x, sum) = cos(x, mean).
    centres = sums[cluster]
    dot = np.einsum("ij,ij->i", embeddings, centres)
    norms = np.linalg.norm(embeddings, axis=1) * np.linalg.norm(centres, axis=1)
    cosine = np.divide(dot, norms, out=np.zeros_like(dot), where=norms > 0)
    return 1.0 - np.clip(cosine, -1.0, 1.0)


@dataclass(frozen=True, eq=False)
class VisualCheckResult:
    """Outcome of :func:`visual_check`.

    Attributes
    ----------
    per_sample_true : ndarray of shape (S,) -- mean distance with the tag-cluster labels
    per_sample_permuted : ndarray of shape (S,) -- mean distance with shuffled labels
    t_statistic : float -- paired t of (permuted - true); > 0 when tag clusters are tighter
    dof : int -- S - 1
    p_value : float -- two-sided
    sample_indices : ndarray of shape (S, sample_size) -- the disjoint samples' rows
    """

    per_sample_true: np.ndarray
    per_sample_permuted: np.ndarray
    t_statistic: float
    dof: int
    p_value: float
    sample_indices: np.ndarray

    @property
    def mean_true(self) -> float:
        return float(np.mean(self.per_sample_true))

    @property
    def mean_permuted(self) -> float:
        return float(np.mean(self.per_sample_permuted))

    @property
    def std_true(self) -> float:
        """Sample standard deviation (ddof=1) of the per-sample means."""
        return float(np.std(self.per_sample_true, ddof=1))

    @property
    def std_permuted(self) -> float:
        """Sample standard deviation (ddof=1) of the per-sample means."""
        return float(np.std(self.per_sample_permuted, ddof=1))

    def format(self) -> str:
        """The paper's line, e.g. ``"0.28 vs 0.42, t(9) = 16.42, p < 0.001"``."""
        p_text = "p < 0.001" if self.p_value < 0.001 else f"p = {self.p_value:.3f}"
        return (f"{self.mean_true:.2f} vs {self.mean_permuted:.2f}, "
                f"t({self.dof}) = {self.t_statistic:.2f}, {p_text}")


def visual_check(
    embeddings: np.ndarray,
    cluster_labels: np.ndarray,
    *,
    n_samples: int = 10,
    sample_size: int = 5000,
    random_state: int | np.random.Generator = 0,
) -> VisualCheckResult:
    """Tag clusters vs randomly permuted labels over disjoint samples (method.md A.8).

    Parameters
    ----------
    embeddings : ndarray of shape (n, d) -- image embeddings, finite, no zero rows
    cluster_labels : ndarray of shape (n,) -- tag cluster of each image
    n_samples : int -- S, at least 2 (a paired t-test needs two pairs)
    sample_size : int -- images per sample, at least 2; ``n >= n_samples * sample_size``
    random_state : int or numpy Generator -- draws the samples, then each permutation

    Returns
    -------
    VisualCheckResult
    """
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2 or embeddings.shape[0] == 0 or embeddings.shape[1] == 0:
        raise ValueError(f"embeddings must have shape (n, d) with n, d >= 1, "
                         f"got {embeddings.shape}")
    if not np.issubdtype(embeddings.dtype, np.number):
        raise ValueError(f"embeddings must be numeric, got {embeddings.dtype}")
    embeddings = embeddings.astype(np.float64)
    n_images = embeddings.shape[0]
    cluster_labels = np.asarray(cluster_labels)
    if cluster_labels.shape != (n_images,):
        raise ValueError(f"cluster_labels must have shape ({n_images},), "
                         f"got {cluster_labels.shape}")
    if not np.all(np.isfinite(embeddings)):
        raise ValueError("embeddings contain NaN or infinite values")
    zero_rows = int(np.count_nonzero(~np.any(embeddings != 0, axis=1)))
    if zero_rows:
        raise ValueError(f"{zero_rows} embedding(s) are all zero: cosine distance undefined")
    if int(n_samples) != n_samples or n_samples < 2:
        raise ValueError(f"n_samples must be an integer >= 2 for a paired t-test, "
                         f"got {n_samples}")
    if int(sample_size) != sample_size or sample_size < 2:
        raise ValueError(f"sample_size must be an integer >= 2, got {sample_size}")
    n_samples, sample_size = int(n_samples), int(sample_size)
    if n_images < n_samples * sample_size:
        raise ValueError(
            f"{n_samples} disjoint samples of {sample_size} need {n_samples * sample_size} "
            f"images, only {n_images} given")
    if np.unique(cluster_labels).size < 2:
        raise ValueError("cluster_labels hold a single cluster: permuting changes nothing")

    rng = np.random.default_rng(random_state)
    sample_indices = rng.permutation(n_images)[: n_samples * sample_size].reshape(
        n_samples, sample_size)
    true_means = np.empty(n_samples)
    permuted_means = np.empty(n_samples)
    for sample, rows in enumerate(sample_indices):
        sample_embeddings, sample_labels = embeddings[rows], cluster_labels[rows]
        true_means[sample] = distances_to_cluster_means(
            sample_embeddings, sample_labels).mean()
        # Shuffling keeps every cluster's size, so only the label-image pairing changes.
        shuffled = rng.permutation(sample_labels)
        permuted_means[sample] = distances_to_cluster_means(sample_embeddings, shuffled).mean()

    test = stats.ttest_rel(permuted_means, true_means)
    return VisualCheckResult(
        per_sample_true=true_means,
        per_sample_permuted=permuted_means,
        t_statistic=float(test.statistic),
        dof=n_samples - 1,
        p_value=float(test.pvalue),
        sample_indices=sample_indices,
    )
