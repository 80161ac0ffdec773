"""DDicCIR: image clusters and sparse retrieval codes from DenseNet121 maps (method.md B.2-B.7).

Pipeline, for ``N`` images with feature maps ``X_i`` (C, H, W) = (1024, 7, 7) and their global
averages ``f_i`` (C,)::

    B.2  labels      = k-means(normalise(f))                                  k clusters
    B.3  D1[c]       = K-SVD on 3 x 3 x C neighbourhoods of cluster c's maps   (9C, 128) per c
    B.4  a_i         = max over positions of |OMP(patches(X_i), D1[c_i])|      (128,)
         v_i         = a_i in block c_i of a k x 128 vector, zeros elsewhere  (k * 128,)
    B.5  D2, code_i  = K-SVD on all v_i; code_i = OMP(v_i, D2), sparsity 15   (256,) per image
    B.6  new labels  = k-means(normalise(code)); re-learn D1 (warm), D2 (warm); repeat until
                       the relative centroid movement is < 1e-4 or 15 passes
    B.7  query       = cluster whose D1 reconstructs its patches best; its code as in B.4-B.5;
                       ranking by cosine of codes, the query's cluster first

Readings fixed here (method.md is the authority; docs/image_pipeline.md gives the reasons and
measurements):

* **Patches** (B.3) are ``torch.nn.functional.unfold`` neighbourhoods: 3 x 3, zero padding 1,
  stride 1, so 49 patches of 9C values per 7 x 7 map, channel-major (see
  :func:`neighbourhood_patches`). Layer-1 atoms have the same layout, so an atom reshaped to
  (C, 3, 3) is a convolution kernel: the "convolutional dictionary" of the paper, coded patch by
  patch. K-SVD trains on a random sample of the cluster's patches (``patches_per_cluster``);
  aggregation (B.4) codes *all* patches of every image.
* **k-means** (B.2, B.6) is Lloyd's algorithm on L2-normalised rows with greedy k-means++ seeding
  (scikit-learn's algorithm and stopping rule, in torch so it runs where the tensors are), best of
  ``kmeans_n_init`` starts by inertia. In B.6 the previous centroids are one more start, so a
  clustering that is still the best is kept instead of being re-drawn.
* **Cluster correspondence** (B.6): k-means numbers its clusters arbitrarily, so the new clusters
  are matched to the old ones by the Hungarian method on their overlap before layer 1 is
  warm-started; cluster ``c`` keeps dictionary ``D1[c]`` and block ``c`` of layer 2.
* **Centroid movement** (B.6) ``||M_t - M_{t-1}||_F / ||M_{t-1}||_F`` over the matched centroid
  matrices of two consecutive B.6 steps. The first pass has none (the B.2 centroids live in
  feature space, not code space), so with re-iteration at least two passes run. That space is
  re-learned every pass, so this movement rarely falls below 1e-4; ``movement_space=
  "features"`` measures the clusters in the fixed B.2 feature space instead.
* **Labels kept** are the clusters the returned dictionaries were learned on, which are also the
  blocks the returned codes sit in; the last B.6 clustering only decides whether to stop (at
  convergence the two agree; ``IterationRecord.label_change`` says by how much).
* **Layer 2** initial atoms are drawn per block (each non-empty cluster gets
  ``min(sparsity, layer2_atoms // non-empty clusters)`` atoms, the rest in proportion to
  cluster size), because a B.4 vector is zero outside its block: an atom drawn from cluster
  ``c`` is zero outside block ``c`` and K-SVD keeps it there (unless it falls back to a random
  replacement atom), so a cluster that drew no atom would get all-zero codes.
* **Coherence control** also on layer 2 (``layer2_coherence_threshold``, default 0.7; method.md
  states it for layer 1 only): without it, B.6 scrambles the clusters (see PipelineConfig).
* **Empty and tiny clusters**: an empty cluster keeps its previous layer-1 dictionary (random unit
  atoms in the first pass; no training image uses it). A cluster with fewer patches than atoms is
  trained as it is: :func:`~pipelines.dictionary_learning.init_dictionary_from_samples` tops the
  atoms up with random unit vectors, which K-SVD replaces or leaves unused.

References
----------
DDicCIR: "Deep Dictionary Clustering for Image Retrieval" (method.md part B).
D. Arthur, S. Vassilvitskii. k-means++: the advantages of careful seeding. SODA 2007.
H. W. Kuhn. The Hungarian method for the assignment problem. Naval Res. Logist. Q. 2, 1955.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from pipelines.dictionary_learning import (
    DictionaryResult, init_dictionary_from_samples, ksvd, mutual_coherence,
    reconstruction_errors,
)
from pipelines.sparse_coding import gram_matrix, omp

__all__ = [
    "DDicCIRModel", "IterationRecord", "KMeansResult", "MODEL_FORMAT", "PipelineConfig",
    "code_patches", "compare_rankings", "purity", "encode_queries", "fit_pipeline", "index_entries",
    "kmeans", "kmeans_plus_plus", "lloyd", "select_ranking",
    "match_clusters", "neighbourhood_patches", "normalise_rows", "place_in_blocks",
    "pool_codes", "rank_by_code", "relative_centroid_movement",
]

log = logging.getLogger(__name__)

MODEL_FORMAT = "pacs-annotate/ddiccir-model/1"
# Written into every saved model; ``DDicCIRModel.load`` refuses any other value.

Pooling = Literal["max", "average"]

# Random streams, one per purpose: each generator is derived from (seed, purpose, pass,
# cluster), so changing how many draws one step makes never shifts another step's draws.
_STREAM_KMEANS, _STREAM_PATCHES, _STREAM_LAYER1_INIT = 1, 2, 3
_STREAM_LAYER1_KSVD, _STREAM_LAYER2_INIT, _STREAM_LAYER2_KSVD = 4, 5, 6

_SAME_CLUSTER_BONUS = 4.0
# Ranking key = cosine + bonus for the query's cluster: cosines lie in [-1, 1], so any bonus
# above 2 puts every same-cluster result before every other one.


# --------------------------------------------------------------------------------------------
# Configuration and records
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PipelineConfig:
    """Hyper-parameters of the pipeline (method.md B, Table 9 defaults).

    Parameters
    ----------
    n_clusters : int, default 15
        k, image clusters (Table 9).
    layer1_atoms : int, default 128
        Atoms per cluster dictionary of layer 1 (Table 9, "number of kernels DicL1").
    layer2_atoms : int, default 256
        Atoms of the global layer-2 dictionary = length of the retrieval code (Table 9).
    sparsity : int, default 15
        OMP sparsity in both layers and for queries (Table 9).
    kernel_size, padding, stride : int, default 3, 1, 1
        Layer-1 neighbourhoods (Table 9, DicL1).
    max_outer_iter : int, default 15
        Most dictionary-learning passes of the k-means loop (Table 9, "k-means iterations").
    centroid_tol : float, default 1e-4
        Stop when the relative centroid movement of B.6 falls below it (method.md B.6).
    movement_space : {"codes", "features"}, default "features"
        Where that movement is measured. "codes" (method.md's literal reading): the B.6 k-means
        centroids of consecutive passes, in retrieval-code space; that space itself changes
        whenever layer 1 or 2 is re-learned, so the movement stays well above 1e-4 even when
        no image changes cluster (measured on planted data: 3.5-70 % per pass) and the loop
        runs to ``max_outer_iter``. "features" (default): the clusters' mean normalised B.2
        features before and after B.6 -- a fixed space, 0 exactly when the clusters did not
        change.
    stop_label_change : float or None, default 0.01
        Also stop once B.6 would move at most this share of the images (the clusters have
        settled; the movement rule alone needs almost no image to move). None: movement only.
    ksvd_max_iter : int, default 5
        K-SVD sweeps per dictionary in the first pass. On real patches (MedNIST, one cluster,
        benchmarks/ddiccir/README.md) the relative error is 0.086 after 5 sweeps and 0.079
        after 10; Table 9's 1e-4 tolerance never stops it earlier, and the sweeps were most
        of the fit time.
    ksvd_max_iter_warm : int or None, default 2
        Sweeps per dictionary in later passes, which start from the previous pass's
        dictionaries (None: ``ksvd_max_iter``). Warm dictionaries change little per sweep
        (benchmarks/ddiccir/README.md), and the sweeps were most of the fit time.
    ksvd_tol : float, default 1e-4
        K-SVD stops when its relative reconstruction error changes less (Table 9).
    coherence_threshold : float or None, default 0.95
        Layer-1 atoms more coherent than this with another atom are replaced (method.md B.3).
        0.95 only removes near-duplicates: DenseNet maps are post-ReLU, so sample atoms are
        non-negative and many pairs legitimately have cosines of 0.5-0.9; a lower threshold
        replaces atoms every sweep and K-SVD no longer settles (docs/image_pipeline.md).
    layer2_coherence_threshold : float or None, default 0.7
        The same rule for layer 2 (method.md states it for layer 1 only). B.4 vectors of one
        cluster are non-negative and alike (cosines ~0.9), so atoms drawn from them are nearly
        collinear and their OMP codes unstable: two similar images get dissimilar codes, and
        B.6's k-means on the codes then scrambles the clusters. Measured on planted data
        (docs/image_pipeline.md): purity after 6 passes 0.51-0.86 with None or 0.95, 0.73-0.92
        with 0.9, 0.92-1.0 with 0.8, 1.0 with 0.7. Replacement samples more coherent than this
        are skipped, and when none is left K-SVD uses random unit atoms.
    replacement : {"residuals", "samples"}, default "residuals"
        What K-SVD puts in place of an unused or too coherent atom (both layers): the residual
        of a worst-reconstructed sample, or the sample itself (see
        :func:`pipelines.dictionary_learning.ksvd`; "samples" fell back to random atoms).
    patches_per_cluster : int or None, default 5_000
        Layer-1 training patches sampled per cluster (uniformly over image x position); None uses
        all. 5,000 is ~39 samples per atom, each atom's rank-1 update then sees ~600 patches
        (sparsity 15 of 128), and the sample is 184 MB in float32 at C = 1024. (10,000 before:
        sweep time is linear in it.)
    pooling : {"max", "average"}, default "max"
        B.4: per atom, the largest (or mean) absolute coefficient over the positions.
        "average" is the paper's ablation.
    use_layer2 : bool, default True
        False (ablation): the retrieval code is the k x 128 pooled vector itself.
    reiterate : bool, default True
        False (ablation): one pass on the B.2 clusters, no B.6.
    kmeans_n_init, kmeans_max_iter, kmeans_tol : int, int, float, default 4, 300, 1e-4
        k-means++ starts (best inertia kept), Lloyd iterations and scikit-learn's tolerance
        (relative to the mean feature variance) for B.2 and B.6.
    seed : int, default 0
        Everything random derives from it (k-means++, patch sample, initial atoms).
    device : str, default "cpu"
        Where the maths runs ("cuda" for a GPU); inputs stay where they are and are moved in
        batches.
    dtype : {"float32", "float64"}, default "float32"
    batch_size : int, default 64
        Images coded together in B.4 and B.7 (memory only: ~2 MB of patches per image at
        C = 1024, plus k x 128 x 49 codes per image when querying).
    """

    n_clusters: int = 15
    layer1_atoms: int = 128
    layer2_atoms: int = 256
    sparsity: int = 15
    kernel_size: int = 3
    padding: int = 1
    stride: int = 1
    max_outer_iter: int = 15
    centroid_tol: float = 1e-4
    movement_space: Literal["codes", "features"] = "features"
    stop_label_change: float | None = 0.01
    ksvd_max_iter: int = 5
    ksvd_max_iter_warm: int | None = 2
    ksvd_tol: float = 1e-4
    coherence_threshold: float | None = 0.95
    layer2_coherence_threshold: float | None = 0.7
    patches_per_cluster: int | None = 5_000
    replacement: Literal["residuals", "samples"] = "residuals"
    pooling: Pooling = "max"
    use_layer2: bool = True
    reiterate: bool = True
    kmeans_n_init: int = 4
    kmeans_max_iter: int = 300
    kmeans_tol: float = 1e-4
    seed: int = 0
    device: str = "cpu"
    dtype: Literal["float32", "float64"] = "float32"
    batch_size: int = 64

    def __post_init__(self) -> None:
        positive = ("n_clusters", "layer1_atoms", "layer2_atoms", "sparsity", "kernel_size",
                    "stride", "max_outer_iter", "kmeans_n_init", "kmeans_max_iter",
                    "batch_size")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.ksvd_max_iter_warm is not None and (
                isinstance(self.ksvd_max_iter_warm, bool) or self.ksvd_max_iter_warm < 0):
            raise ValueError(f"ksvd_max_iter_warm must be >= 0 or None, got "
                             f"{self.ksvd_max_iter_warm!r}")
        for name in ("padding", "ksvd_max_iter", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.stop_label_change is not None and not 0 <= self.stop_label_change < 1:
            raise ValueError(f"stop_label_change must be in [0, 1) or None, got "
                             f"{self.stop_label_change!r}")
        if self.replacement not in ("residuals", "samples"):
            raise ValueError(f"replacement must be 'residuals' or 'samples', got "
                             f"{self.replacement!r}")
        for name in ("centroid_tol", "ksvd_tol", "kmeans_tol"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("coherence_threshold", "layer2_coherence_threshold"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 1:
                raise ValueError(f"{name} must be in (0, 1] or None, got {value!r}")
        if self.patches_per_cluster is not None and self.patches_per_cluster < 1:
            raise ValueError(f"patches_per_cluster must be >= 1 or None, got "
                             f"{self.patches_per_cluster!r}")
        if self.pooling not in ("max", "average"):
            raise ValueError(f"pooling must be 'max' or 'average', got {self.pooling!r}")
        if self.movement_space not in ("codes", "features"):
            raise ValueError(f"movement_space must be 'codes' or 'features', got "
                             f"{self.movement_space!r}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "PipelineConfig":
        known = {item.name for item in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown PipelineConfig fields: {sorted(unknown)}")
        return cls(**values)


@dataclass(frozen=True)
class IterationRecord:
    """What one pass of the B.6 loop did (``DDicCIRModel.history``).

    Per-cluster tuples have k entries, indexed by cluster. ``None`` marks what a pass does not
    have: no change norms in the first pass, no movement before the second B.6 step, no layer-2
    values with ``use_layer2=False``, no B.6 values with ``reiterate=False``.

    Attributes
    ----------
    iteration : int
        1-based pass number.
    cluster_sizes : tuple of int
        Images per cluster in this pass (the clusters layer 1 was learned on).
    layer1_change : tuple of (float or None)
        ``||D1_t[c] - D1_{t-1}[c]||_F``, the paper's "dictionary stability" (its Table 8).
    layer1_training_error : tuple of (float or None)
        K-SVD's final ``||X - D G||_F / ||X||_F`` on the cluster's sampled patches.
    layer1_error : tuple of (float or None)
        The same over *all* patches of the cluster's images, as coded in B.4.
    layer1_ksvd_iterations : tuple of int
        K-SVD sweeps done (0 for an empty cluster).
    layer1_replaced_atoms : tuple of int
        Atoms replaced (unused or too coherent) over those sweeps.
    layer1_coherence : tuple of float
        Mutual coherence of each learned layer-1 dictionary.
    layer2_change, layer2_error, layer2_coherence : float or None
        The same for the global layer-2 dictionary, over all images' B.4 vectors.
    layer2_ksvd_iterations, layer2_replaced_atoms : int or None
    centroid_movement : float or None
        Relative movement of the matched B.6 centroids (code space) since the previous pass.
    feature_centroid_movement : float or None
        Relative movement of the clusters' mean normalised B.2 features caused by this pass's
        B.6 step (``config.movement_space`` says which of the two stops the loop).
    label_change : float or None
        Share of images whose (matched) B.6 cluster differs from this pass's cluster.
    seconds : dict of str to float
        Wall time of "layer1", "aggregation", "layer2" and "kmeans".
    """

    iteration: int
    cluster_sizes: tuple[int, ...]
    layer1_change: tuple[float | None, ...]
    layer1_training_error: tuple[float | None, ...]
    layer1_error: tuple[float | None, ...]
    layer1_ksvd_iterations: tuple[int, ...]
    layer1_replaced_atoms: tuple[int, ...]
    layer1_coherence: tuple[float, ...]
    layer2_change: float | None
    layer2_error: float | None
    layer2_coherence: float | None
    layer2_ksvd_iterations: int | None
    layer2_replaced_atoms: int | None
    centroid_movement: float | None
    feature_centroid_movement: float | None
    label_change: float | None
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "IterationRecord":
        converted = {key: tuple(value) if isinstance(value, list) else value
                     for key, value in values.items()}
        return cls(**converted)


# --------------------------------------------------------------------------------------------
# Pure maths
# --------------------------------------------------------------------------------------------

def neighbourhood_patches(
    maps: Tensor, *, kernel_size: int = 3, padding: int = 1, stride: int = 1,
) -> Tensor:
    """Neighbourhood patches of feature maps, one row per position (method.md B.3).

    Parameters
    ----------
    maps : Tensor of shape (B, C, H, W)
    kernel_size, padding, stride : int, default 3, 1, 1
        Square neighbourhoods, zero padding on every side (Table 9, DicL1).

    Returns
    -------
    Tensor of shape (B, L, C * kernel_size**2), contiguous
        ``L = H_out * W_out`` positions in row-major order (position ``p = y * W_out + x``,
        ``H_out = (H + 2 * padding - kernel_size) // stride + 1``): 49 patches of 9,216 values
        for a 1024 x 7 x 7 map. Values are channel-major, as in ``torch.nn.functional.unfold``:
        entry ``c * kernel_size**2 + dy * kernel_size + dx`` is channel ``c`` at row
        ``y * stride - padding + dy``, column ``x * stride - padding + dx`` of the map (0 outside
        it). A patch dotted with an atom equals ``conv2d`` with that atom reshaped to
        (C, kernel_size, kernel_size).
    """
    if maps.ndim != 4:
        raise ValueError(f"maps must be (B, C, H, W), got shape {tuple(maps.shape)}")
    columns = F.unfold(maps, kernel_size, padding=padding, stride=stride)  # (B, C k^2, L)
    return columns.transpose(1, 2).contiguous()


def normalise_rows(rows: Tensor) -> Tensor:
    """Rows scaled to unit L2 norm (method.md B.2, B.6); zero rows stay zero. (N, d) -> (N, d)."""
    norms = torch.linalg.vector_norm(rows, dim=1, keepdim=True)
    return rows / norms.clamp_min(torch.finfo(rows.dtype).tiny)


@dataclass(frozen=True)
class KMeansResult:
    """Outcome of :func:`lloyd` / :func:`kmeans`.

    Attributes
    ----------
    labels : Tensor of shape (N,), int64 -- nearest centroid of every point
    centroids : Tensor of shape (k, d)
    inertia : float -- sum of squared distances to the nearest centroid
    n_iter : int -- Lloyd iterations done
    """

    labels: Tensor
    centroids: Tensor
    inertia: float
    n_iter: int


def _squared_distances(points: Tensor, point_norms: Tensor, centroids: Tensor) -> Tensor:
    """``||x - m||^2`` for all pairs, (N, d) x (k, d) -> (N, k), clamped at 0."""
    centroid_norms = (centroids * centroids).sum(dim=1)
    distances = point_norms[:, None] - 2 * points @ centroids.T + centroid_norms[None, :]
    return distances.clamp_min(0.0)


def kmeans_plus_plus(
    points: Tensor, n_clusters: int, *, generator: torch.Generator,
    n_local_trials: int | None = None,
) -> Tensor:
    """Greedy k-means++ seeding (method.md B.2, B.6); returns point indices, shape (k,), int64.

    The first centre is a uniformly random point; every next one is the best (lowest total
    squared distance) of ``n_local_trials`` candidates drawn with probability proportional to
    the squared distance to the nearest centre so far -- scikit-learn's ``_kmeans_plusplus``
    with its default ``2 + log(k)`` trials.

    Parameters
    ----------
    points : Tensor of shape (N, d)
    n_clusters : int
    generator : torch.Generator
        CPU generator: the draws are made on the CPU, so a seed picks the same candidates on
        every device (distances, hence choices between candidates, can differ in the last bit).
    """
    n_points = points.shape[0]
    if not 1 <= n_clusters <= n_points:
        raise ValueError(f"n_clusters must be in [1, {n_points}], got {n_clusters}")
    trials = n_local_trials if n_local_trials is not None else 2 + int(math.log(n_clusters))
    point_norms = (points * points).sum(dim=1)
    first = int(torch.randint(n_points, (1,), generator=generator))
    chosen = [first]
    closest = _squared_distances(points, point_norms, points[first:first + 1]).squeeze(1)
    closest = closest.double()
    for _ in range(1, n_clusters):
        potential = closest.sum()
        draws = torch.rand(trials, generator=generator, dtype=torch.float64).to(points.device)
        cumulative = torch.cumsum(closest, dim=0)
        candidates = torch.searchsorted(cumulative, draws * potential).clamp_max(n_points - 1)
        to_candidates = _squared_distances(points, point_norms, points[candidates]).double()
        candidate_closest = torch.minimum(closest[:, None], to_candidates)     # (N, trials)
        best = int(torch.argmin(candidate_closest.sum(dim=0)))
        chosen.append(int(candidates[best]))
        closest = candidate_closest[:, best].contiguous()
    return torch.tensor(chosen, dtype=torch.long)


def lloyd(
    points: Tensor, initial_centroids: Tensor, *, max_iter: int = 300, tol: float = 1e-4,
) -> KMeansResult:
    """Lloyd's k-means iterations from given centroids (method.md B.2, B.6).

    Minimises ``sum_i ||x_i - m_{label_i}||^2``. Follows scikit-learn's ``_kmeans_single_lloyd``
    so that both give the same result from the same start (tested): each iteration assigns the
    points to their nearest centroid and moves every centroid to the mean of its points; it
    stops when the labels no longer change, or when the summed squared centroid shift is at most
    ``tol * mean_j var(x[:, j])``; unless the labels were stable, a last assignment makes them
    match the returned centroids. An empty cluster is moved onto the point farthest from its
    centroid (several empty clusters: the farthest points in order), which leaves its old
    cluster -- scikit-learn's relocation rule.

    Parameters
    ----------
    points : Tensor of shape (N, d)
    initial_centroids : Tensor of shape (k, d)
    max_iter : int, default 300
    tol : float, default 1e-4

    Returns
    -------
    KMeansResult
    """
    if points.ndim != 2 or initial_centroids.ndim != 2 or (
            points.shape[1] != initial_centroids.shape[1]):
        raise ValueError(f"points (N, d) and centroids (k, d) must share d, got "
                         f"{tuple(points.shape)} and {tuple(initial_centroids.shape)}")
    n_clusters = initial_centroids.shape[0]
    point_norms = (points * points).sum(dim=1)
    scaled_tol = float(points.var(dim=0, unbiased=False).mean()) * tol
    centroids = initial_centroids.to(dtype=points.dtype, device=points.device).clone()
    previous_labels: Tensor | None = None
    stable = False
    n_iter = 0
    for n_iter in range(1, max_iter + 1):
        distances = _squared_distances(points, point_norms, centroids)
        nearest_distance, labels = distances.min(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, labels, points)
        counts = torch.bincount(labels, minlength=n_clusters).to(points.dtype)
        empty = torch.nonzero(counts == 0).squeeze(1)
        if empty.numel():
            # Farthest points first; they leave their cluster for the empty one (scikit-learn).
            farthest = torch.topk(nearest_distance, empty.numel()).indices
            for cluster, point in zip(empty.tolist(), farthest.tolist()):
                owner = int(labels[point])
                sums[owner] -= points[point]
                counts[owner] -= 1
                sums[cluster] = points[point]
                counts[cluster] = 1
        new_centroids = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None],
                                    centroids)
        shift = float(((new_centroids - centroids) ** 2).sum())
        centroids = new_centroids
        if previous_labels is not None and torch.equal(labels, previous_labels):
            stable = True
            break
        if shift <= scaled_tol:
            break
        previous_labels = labels
    if not stable:
        distances = _squared_distances(points, point_norms, centroids)
        nearest_distance, labels = distances.min(dim=1)
    else:
        nearest_distance = _squared_distances(points, point_norms, centroids).gather(
            1, labels[:, None]).squeeze(1)
    return KMeansResult(labels=labels, centroids=centroids,
                        inertia=float(nearest_distance.double().sum()), n_iter=n_iter)


def kmeans(
    points: Tensor, n_clusters: int, *, generator: torch.Generator, n_init: int = 4,
    max_iter: int = 300, tol: float = 1e-4, initial_centroids: Tensor | None = None,
) -> KMeansResult:
    """k-means: best of ``n_init`` k-means++ starts, plus an optional given start (B.2, B.6).

    Parameters
    ----------
    points : Tensor of shape (N, d)
        Already L2-normalised by the caller when method.md asks for it.
    n_clusters : int
    generator : torch.Generator
        CPU generator for k-means++.
    n_init : int, default 4
    max_iter, tol : see :func:`lloyd`
    initial_centroids : Tensor of shape (k, d), optional
        An extra start tried first (B.6 passes the previous pass's centroids); on equal inertia
        it wins, so a clustering that is still the best stays as it was.

    Returns
    -------
    KMeansResult with the lowest inertia.
    """
    starts: list[Tensor] = []
    if initial_centroids is not None:
        starts.append(initial_centroids)
    for _ in range(n_init):
        starts.append(points[kmeans_plus_plus(points, n_clusters, generator=generator)
                             .to(points.device)])
    best: KMeansResult | None = None
    for start in starts:
        result = lloyd(points, start, max_iter=max_iter, tol=tol)
        if best is None or result.inertia < best.inertia:
            best = result
    assert best is not None
    return best


def match_clusters(labels: Tensor, reference_labels: Tensor, n_clusters: int) -> Tensor:
    """Relabelling that best matches a new clustering to a reference one (method.md B.6).

    Hungarian assignment (``scipy.optimize.linear_sum_assignment``) maximising the number of
    points whose new cluster is mapped to their reference cluster.

    Parameters
    ----------
    labels, reference_labels : Tensor of shape (N,), int64, values in [0, k)
    n_clusters : int

    Returns
    -------
    mapping : Tensor of shape (k,), int64, a permutation on the device of ``labels``
        ``mapping[labels]`` are the new labels in the reference numbering.
    """
    overlap = torch.bincount(labels * n_clusters + reference_labels.to(labels.device),
                             minlength=n_clusters * n_clusters).reshape(n_clusters, n_clusters)
    rows, columns = linear_sum_assignment(overlap.cpu().numpy(), maximize=True)
    mapping = torch.empty(n_clusters, dtype=torch.long)
    mapping[torch.as_tensor(rows)] = torch.as_tensor(columns, dtype=torch.long)
    return mapping.to(labels.device)


def relative_centroid_movement(centroids: Tensor, previous_centroids: Tensor) -> float:
    """``||M - M_prev||_F / ||M_prev||_F`` for matched centroid matrices (k, d) (B.6)."""
    reference = float(torch.linalg.matrix_norm(previous_centroids.double()))
    change = float(torch.linalg.matrix_norm((centroids - previous_centroids).double()))
    if reference == 0.0:
        return 0.0 if change == 0.0 else math.inf
    return change / reference


def pool_codes(codes: Tensor, pooling: Pooling = "max") -> Tensor:
    """Pool layer-1 codes over the positions (method.md B.4).

    Parameters
    ----------
    codes : Tensor of shape (B, K, L) -- atom x position codes of each image
    pooling : {"max", "average"}
        "max": for every atom the largest absolute coefficient over the L positions. (Not the
        paper's alternative reading, max over atoms per position: that loses which atom fired.)
        "average" (ablation): the mean absolute coefficient.

    Returns
    -------
    Tensor of shape (B, K), non-negative
    """
    if pooling == "max":
        return codes.abs().amax(dim=2)
    if pooling == "average":
        return codes.abs().mean(dim=2)
    raise ValueError(f"pooling must be 'max' or 'average', got {pooling!r}")


def place_in_blocks(pooled: Tensor, clusters: Tensor, n_clusters: int) -> Tensor:
    """Put each image's pooled vector in the block of its cluster (method.md B.4).

    Parameters
    ----------
    pooled : Tensor of shape (B, K)
    clusters : Tensor of shape (B,), int64, values in [0, k)
    n_clusters : int

    Returns
    -------
    Tensor of shape (B, k * K): row ``i`` holds ``pooled[i]`` in columns
    ``clusters[i] * K ... clusters[i] * K + K - 1`` and zeros elsewhere, so vectors from
    different clusters never share a non-zero column.
    """
    n_images, n_atoms = pooled.shape
    blocks = torch.zeros((n_images, n_clusters * n_atoms), dtype=pooled.dtype,
                         device=pooled.device)
    columns = clusters.to(pooled.device)[:, None] * n_atoms + torch.arange(
        n_atoms, device=pooled.device)[None, :]
    return blocks.scatter_(1, columns, pooled)


def code_patches(
    maps: Tensor, dictionaries: Tensor, grams: Tensor, n_nonzero: int, *,
    kernel_size: int = 3, padding: int = 1, stride: int = 1,
) -> tuple[Tensor, Tensor, Tensor]:
    """OMP codes of every patch of every map over each of several dictionaries (B.4, B.7).

    For each dictionary ``D_j`` (d, K) and each map's patches ``P`` (L, d):
    ``Gamma = argmin ||P^T - D_j Gamma||^2  s.t. ||gamma||_0 <= n_nonzero`` per patch, by
    Batch-OMP (:func:`pipelines.sparse_coding.omp`), with the correlations formed as
    ``P @ D_j`` exactly as K-SVD forms them.

    Parameters
    ----------
    maps : Tensor of shape (B, C, H, W), dtype and device of the dictionaries
    dictionaries : Tensor of shape (m, d, K), d = C * kernel_size**2, unit-norm atoms
    grams : Tensor of shape (m, K, K), ``gram_matrix(dictionaries[j])``
    n_nonzero : int
    kernel_size, padding, stride : int
        As in :func:`neighbourhood_patches`.

    Returns
    -------
    codes : Tensor of shape (m, B, K, L)
    squared_residuals : Tensor of shape (m, B), float64
        ``sum over the map's patches of ||p - D_j gamma_p||^2``.
    squared_norms : Tensor of shape (B,), float64 -- ``sum over the map's patches of ||p||^2``
    """
    patches = neighbourhood_patches(maps, kernel_size=kernel_size, padding=padding,
                                    stride=stride)
    n_maps, n_positions, dimension = patches.shape
    if dictionaries.ndim != 3 or dictionaries.shape[1] != dimension:
        raise ValueError(f"dictionaries must be (m, {dimension}, K) for these maps, got "
                         f"{tuple(dictionaries.shape)}")
    n_dictionaries, _, n_atoms = dictionaries.shape
    rows = patches.reshape(n_maps * n_positions, dimension)
    patch_norms = (rows * rows).sum(dim=1)
    codes = torch.empty((n_dictionaries, n_maps, n_atoms, n_positions), dtype=rows.dtype,
                        device=rows.device)
    squared_residuals = torch.empty((n_dictionaries, n_maps), dtype=torch.float64,
                                    device=rows.device)
    # One OMP call over every (dictionary, patch) pair: the per-step overhead of m calls on
    # few signals dominated query coding (benchmarks/ddiccir/README.md).
    n_rows = rows.shape[0]
    all_correlations = torch.matmul(rows, dictionaries).permute(2, 0, 1).reshape(
        n_atoms, n_dictionaries * n_rows)                                   # (K, m B L)
    groups = torch.arange(n_dictionaries, device=rows.device).repeat_interleave(n_rows)
    all_codes = omp(grams, all_correlations, n_nonzero, groups=groups)
    for index in range(n_dictionaries):
        columns = slice(index * n_rows, (index + 1) * n_rows)
        correlations, patch_codes = all_correlations[:, columns], all_codes[:, columns]
        residuals = reconstruction_errors(grams[index], correlations, patch_codes, patch_norms)
        codes[index] = patch_codes.T.reshape(n_maps, n_positions, n_atoms).transpose(1, 2)
        squared_residuals[index] = residuals.reshape(n_maps, n_positions).sum(dim=1)
    squared_norms = patch_norms.double().reshape(n_maps, n_positions).sum(dim=1)
    return codes, squared_residuals, squared_norms


def _layer2_codes(aggregated: Tensor, layer2: Tensor, gram: Tensor, n_nonzero: int) -> Tensor:
    """Retrieval codes (method.md B.5): OMP of B.4 vectors (N, k K1) over D2 -> (N, K2)."""
    correlations = (aggregated @ layer2).T           # as K-SVD forms them: same codes
    return omp(gram, correlations, n_nonzero).T.contiguous()


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class DDicCIRModel:
    """A fitted DDicCIR pipeline (method.md B.2-B.7).

    Attributes
    ----------
    config : PipelineConfig
    map_shape : tuple of int -- (C, H, W) of the maps it was fitted on
    layer1 : Tensor of shape (k, C * kernel_size**2, layer1_atoms)
        One dictionary per cluster, unit-norm atoms as columns, patch layout of
        :func:`neighbourhood_patches`.
    layer2 : Tensor of shape (k * layer1_atoms, layer2_atoms), or None with ``use_layer2=False``
    labels : Tensor of shape (N,), int64 -- cluster of every training image
    codes : Tensor of shape (N, code_dim) -- retrieval code of every training image
    history : tuple of IterationRecord -- one per pass
    converged : bool -- stopped on ``centroid_tol`` or ``stop_label_change``
    stop_reason : str -- "centroid_tol", "label_change", "max_outer_iter" or "no_reiteration"
    ranking : {"codes", "features"}, default "codes"
        What the service indexes and ranks by (:func:`index_entries`): the retrieval codes
        (B.7), or the L2-normalised pooled features when a measurement on the site's images
        (:func:`compare_rankings`) found them better. Both rank the query's cluster first.
    feature_centroids : Tensor of shape (k, C), optional
        Unit cluster centres in pooled-feature space; with ``ranking="features"`` a new image
        goes to the nearest one.
    selection : dict
        The measurement behind ``ranking`` (JSON-able), kept with the model.
    """

    config: PipelineConfig
    map_shape: tuple[int, int, int]
    layer1: Tensor
    layer2: Tensor | None
    labels: Tensor
    codes: Tensor
    history: tuple[IterationRecord, ...]
    converged: bool
    stop_reason: str
    ranking: Literal["codes", "features"] = "codes"
    feature_centroids: Tensor | None = None
    selection: dict = field(default_factory=dict)

    @property
    def code_dim(self) -> int:
        """Length of a retrieval code: layer2_atoms, or k * layer1_atoms without layer 2."""
        return self.codes.shape[1]

    @property
    def device(self) -> torch.device:
        return self.layer1.device

    @cached_property
    def layer1_grams(self) -> Tensor:
        """``D1[c]^T D1[c]`` for every cluster, (k, K1, K1); computed once (B.7 speed)."""
        return torch.stack([gram_matrix(dictionary) for dictionary in self.layer1])

    @cached_property
    def layer2_gram(self) -> Tensor | None:
        return None if self.layer2 is None else gram_matrix(self.layer2)

    def to(self, device: str | torch.device) -> "DDicCIRModel":
        """The same model with its tensors on ``device``."""
        return DDicCIRModel(
            config=self.config, map_shape=self.map_shape, layer1=self.layer1.to(device),
            layer2=None if self.layer2 is None else self.layer2.to(device),
            labels=self.labels.to(device), codes=self.codes.to(device), history=self.history,
            converged=self.converged, stop_reason=self.stop_reason, ranking=self.ranking,
            feature_centroids=None if self.feature_centroids is None
            else self.feature_centroids.to(device), selection=self.selection)

    def save(self, path: str | Path) -> None:
        """Write the model with ``torch.save``: CPU tensors and a JSON string only, so that
        ``torch.load(path, weights_only=True)`` reads it (no pickled classes)."""
        metadata = {
            "config": self.config.to_dict(),
            "map_shape": list(self.map_shape),
            "history": [record.to_dict() for record in self.history],
            "converged": self.converged,
            "stop_reason": self.stop_reason,
            "ranking": self.ranking,
            "selection": self.selection,
        }
        payload = {
            "format": MODEL_FORMAT,
            "layer1": self.layer1.detach().cpu(),
            "layer2": None if self.layer2 is None else self.layer2.detach().cpu(),
            "labels": self.labels.detach().cpu(),
            "codes": self.codes.detach().cpu(),
            "feature_centroids": None if self.feature_centroids is None
            else self.feature_centroids.detach().cpu(),
            "metadata": json.dumps(metadata),
        }
        torch.save(payload, Path(path))

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device | None = None,
             ) -> "DDicCIRModel":
        """Read a model written by :meth:`save` (``weights_only=True``), onto ``device`` (default:
        the device in its config)."""
        payload = torch.load(Path(path), map_location="cpu", weights_only=True)
        if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
            raise ValueError(f"{path} is not a {MODEL_FORMAT} file")
        metadata = json.loads(payload["metadata"])
        config = PipelineConfig.from_dict(metadata["config"])
        model = cls(
            config=config, map_shape=tuple(metadata["map_shape"]), layer1=payload["layer1"],
            layer2=payload["layer2"], labels=payload["labels"], codes=payload["codes"],
            history=tuple(IterationRecord.from_dict(record) for record in metadata["history"]),
            converged=bool(metadata["converged"]), stop_reason=str(metadata["stop_reason"]),
            ranking=metadata.get("ranking", "codes"),
            feature_centroids=payload.get("feature_centroids"),
            selection=metadata.get("selection", {}))
        _check_model(model)
        return model.to(device if device is not None else config.device)


def _check_model(model: DDicCIRModel) -> None:
    config = model.config
    channels, _, _ = model.map_shape
    expected = (config.n_clusters, channels * config.kernel_size ** 2, config.layer1_atoms)
    if tuple(model.layer1.shape) != expected:
        raise ValueError(f"layer1 must have shape {expected}, got {tuple(model.layer1.shape)}")
    if config.use_layer2:
        expected2 = (config.n_clusters * config.layer1_atoms, config.layer2_atoms)
        if model.layer2 is None or tuple(model.layer2.shape) != expected2:
            raise ValueError(f"layer2 must have shape {expected2}")
    elif model.layer2 is not None:
        raise ValueError("a model without layer 2 (use_layer2=False) must have layer2=None")
    if model.labels.ndim != 1 or model.codes.shape[0] != model.labels.shape[0]:
        raise ValueError("labels (N,) and codes (N, code_dim) must have the same N")
    if model.ranking not in ("codes", "features"):
        raise ValueError(f"ranking must be 'codes' or 'features', got {model.ranking!r}")
    if model.ranking == "features" and (
            model.feature_centroids is None
            or tuple(model.feature_centroids.shape) != (config.n_clusters, channels)):
        raise ValueError("ranking='features' needs feature_centroids of shape (k, C)")


# --------------------------------------------------------------------------------------------
# Fitting (B.2-B.6)
# --------------------------------------------------------------------------------------------

def _generator(seed: int, *keys: int) -> torch.Generator:
    """CPU generator for one purpose, from (seed, purpose, pass, cluster)."""
    state = np.random.SeedSequence([seed, *keys]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _n_positions(height: int, width: int, config: PipelineConfig) -> int:
    span = config.kernel_size
    rows = (height + 2 * config.padding - span) // config.stride + 1
    columns = (width + 2 * config.padding - span) // config.stride + 1
    return rows * columns


def _patch_options(config: PipelineConfig) -> dict[str, int]:
    return {"kernel_size": config.kernel_size, "padding": config.padding,
            "stride": config.stride}


def _sample_cluster_patches(
    maps: Tensor, members: Tensor, n_samples: int | None, generator: torch.Generator,
    config: PipelineConfig,
) -> Tensor:
    """Layer-1 training patches of one cluster (method.md B.3): ``n_samples`` drawn uniformly
    without replacement from its (image, position) pairs, or all of them. Returns (n, d) on
    ``config.device``; patches are extracted a batch of images at a time."""
    device, dtype = torch.device(config.device), config.torch_dtype
    _, channels, height, width = maps.shape
    n_positions = _n_positions(height, width, config)
    dimension = channels * config.kernel_size ** 2
    total = members.numel() * n_positions
    if n_samples is None or total <= n_samples:
        chosen = torch.arange(total)
    else:
        chosen = torch.randperm(total, generator=generator)[:n_samples].sort().values
    image_of, position_of = chosen // n_positions, chosen % n_positions
    images, rows_per_image = torch.unique_consecutive(image_of, return_counts=True)
    samples = torch.empty((chosen.numel(), dimension), dtype=dtype, device=device)
    start = 0
    for first in range(0, images.numel(), config.batch_size):
        batch_images = images[first:first + config.batch_size]
        batch_counts = rows_per_image[first:first + config.batch_size]
        n_rows = int(batch_counts.sum())
        patches = neighbourhood_patches(
            maps[members[batch_images]].to(device=device, dtype=dtype), **_patch_options(config))
        local_image = torch.repeat_interleave(torch.arange(batch_images.numel()), batch_counts)
        samples[start:start + n_rows] = patches[local_image.to(device),
                                                position_of[start:start + n_rows].to(device)]
        start += n_rows
    return samples


def _sweeps(config: PipelineConfig, *, warm: bool) -> int:
    """K-SVD sweeps for a dictionary: ``ksvd_max_iter`` cold, ``ksvd_max_iter_warm`` warm."""
    if warm and config.ksvd_max_iter_warm is not None:
        return config.ksvd_max_iter_warm
    return config.ksvd_max_iter


def _learn_layer1(
    maps: Tensor, labels: Tensor, previous: Tensor | None, config: PipelineConfig,
    iteration: int,
) -> tuple[Tensor, list[DictionaryResult | None]]:
    """One dictionary per cluster (method.md B.3); warm-started from ``previous`` when given.

    Returns (dictionaries (k, d, K1), the K-SVD result per cluster or None when empty)."""
    device, dtype = torch.device(config.device), config.torch_dtype
    channels = maps.shape[1]
    dimension = channels * config.kernel_size ** 2
    dictionaries = torch.empty((config.n_clusters, dimension, config.layer1_atoms),
                               dtype=dtype, device=device)
    results: list[DictionaryResult | None] = []
    for cluster in range(config.n_clusters):
        members = torch.nonzero(labels == cluster).squeeze(1).cpu()
        if members.numel() == 0:
            if previous is not None:
                log.warning("ddiccir pass %d: cluster %d is empty, its layer-1 dictionary is "
                            "kept", iteration, cluster)
                dictionaries[cluster] = previous[cluster]
            else:
                log.warning("ddiccir pass %d: cluster %d is empty, random layer-1 atoms",
                            iteration, cluster)
                dictionaries[cluster] = init_dictionary_from_samples(
                    torch.zeros((dimension, 0), dtype=dtype, device=device),
                    config.layer1_atoms,
                    _generator(config.seed, _STREAM_LAYER1_INIT, iteration, cluster))
            results.append(None)
            continue
        samples = _sample_cluster_patches(
            maps, members, config.patches_per_cluster,
            _generator(config.seed, _STREAM_PATCHES, iteration, cluster), config)
        if samples.shape[0] < config.layer1_atoms:
            log.warning("ddiccir pass %d: cluster %d has %d patches for %d atoms", iteration,
                        cluster, samples.shape[0], config.layer1_atoms)
        if previous is None:
            initial = init_dictionary_from_samples(
                samples.T, config.layer1_atoms,
                _generator(config.seed, _STREAM_LAYER1_INIT, iteration, cluster))
        else:
            initial = previous[cluster]
        result = ksvd(samples.T, initial, config.sparsity,
                      max_iter=_sweeps(config, warm=previous is not None),
                      tol=config.ksvd_tol, coherence_threshold=config.coherence_threshold,
                      generator=_generator(config.seed, _STREAM_LAYER1_KSVD, iteration, cluster),
                      replacement=config.replacement)
        dictionaries[cluster] = result.dictionary
        results.append(result)
        del samples
    return dictionaries, results


def _aggregate(
    maps: Tensor, labels: Tensor, layer1: Tensor, grams: Tensor, config: PipelineConfig,
) -> tuple[Tensor, Tensor, Tensor]:
    """B.4 vectors of all images, each coded with its own cluster's dictionary.

    Returns (aggregated (N, k K1), squared residual per cluster (k,), squared norm per cluster
    (k,)), the last two in float64."""
    device, dtype = torch.device(config.device), config.torch_dtype
    n_images = maps.shape[0]
    k, n_atoms = config.n_clusters, config.layer1_atoms
    aggregated = torch.zeros((n_images, k * n_atoms), dtype=dtype, device=device)
    residual = torch.zeros(k, dtype=torch.float64)
    energy = torch.zeros(k, dtype=torch.float64)
    for cluster in range(k):
        members = torch.nonzero(labels == cluster).squeeze(1).cpu()
        for first in range(0, members.numel(), config.batch_size):
            batch = members[first:first + config.batch_size]
            codes, squared_residuals, squared_norms = code_patches(
                maps[batch].to(device=device, dtype=dtype), layer1[cluster:cluster + 1],
                grams[cluster:cluster + 1], config.sparsity, **_patch_options(config))
            pooled = pool_codes(codes[0], config.pooling)
            aggregated[batch.to(device), cluster * n_atoms:(cluster + 1) * n_atoms] = pooled
            residual[cluster] += float(squared_residuals.sum())
            energy[cluster] += float(squared_norms.sum())
    return aggregated, residual, energy


def _layer2_atom_allocation(
    cluster_sizes: Tensor, available: Tensor, n_atoms: int, floor: int,
) -> Tensor:
    """Initial layer-2 atoms per cluster block: ``floor`` each (non-empty clusters), then one at
    a time to the cluster with the largest ``size / (atoms + 1)`` (D'Hondt, i.e. in proportion
    to size), never more than a cluster's distinct non-zero vectors (``available``)."""
    allocation = torch.minimum(torch.where(cluster_sizes > 0, floor, 0), available)
    while int(allocation.sum()) < n_atoms:
        room = allocation < available
        if not bool(room.any()):
            break
        priority = torch.where(room, cluster_sizes.double() / (allocation + 1), -1.0)
        allocation[int(torch.argmax(priority))] += 1
    return allocation


def _initial_layer2(
    aggregated: Tensor, labels: Tensor, config: PipelineConfig, generator: torch.Generator,
) -> Tensor:
    """First layer-2 dictionary (method.md B.5), drawn from the B.4 vectors block by block."""
    k = config.n_clusters
    labels_here = labels.to(aggregated.device)
    sizes = torch.bincount(labels_here, minlength=k).cpu()
    nonzero = torch.linalg.vector_norm(aggregated, dim=1) > 0
    available = torch.bincount(labels_here[nonzero], minlength=k).cpu()
    n_nonempty = max(int((sizes > 0).sum()), 1)
    floor = min(config.sparsity, config.layer2_atoms // n_nonempty)
    allocation = _layer2_atom_allocation(sizes, available, config.layer2_atoms, floor)
    parts = []
    for cluster in range(k):
        if int(allocation[cluster]) == 0:
            continue
        rows = aggregated[labels_here == cluster]
        parts.append(init_dictionary_from_samples(rows.T, int(allocation[cluster]), generator))
    missing = config.layer2_atoms - int(allocation.sum())
    if missing:
        # Fewer distinct non-zero vectors than atoms (tiny data sets): random unit atoms.
        parts.append(init_dictionary_from_samples(
            aggregated[:0].T, missing, generator))
    return torch.cat(parts, dim=1)


def _check_fit_inputs(maps: Tensor, pooled: Tensor, config: PipelineConfig) -> None:
    if maps.ndim != 4 or not maps.is_floating_point():
        raise ValueError(f"maps must be a floating (N, C, H, W) tensor, got "
                         f"{tuple(maps.shape)} {maps.dtype}")
    n_images, channels = maps.shape[:2]
    if pooled.shape != (n_images, channels) or not pooled.is_floating_point():
        raise ValueError(f"pooled must be a floating ({n_images}, {channels}) tensor, got "
                         f"{tuple(pooled.shape)} {pooled.dtype}")
    if n_images < config.n_clusters:
        raise ValueError(f"need at least n_clusters={config.n_clusters} images, got {n_images}")
    if not bool(torch.isfinite(pooled).all()):
        raise ValueError("pooled features contain NaN or infinite values")
    if _n_positions(maps.shape[2], maps.shape[3], config) < 1:
        raise ValueError(f"maps of {tuple(maps.shape[2:])} are too small for kernel "
                         f"{config.kernel_size} with padding {config.padding}")


def fit_pipeline(
    maps: Tensor, pooled: Tensor, config: PipelineConfig = PipelineConfig(),
    progress: Callable[[IterationRecord], None] | None = None,
) -> DDicCIRModel:
    """Fit the two-layer dictionary pipeline with k-means re-iteration (method.md B.2-B.6).

    Parameters
    ----------
    maps : Tensor of shape (N, C, H, W)
        DenseNet121 maps (1024 x 7 x 7), any floating dtype (float16 from the feature store is
        fine), on any device: they are moved to ``config.device`` in batches of images.
    pooled : Tensor of shape (N, C)
        Their global averages (B.2's k-means input).
    config : PipelineConfig
    progress : callable, optional
        Called with each pass's :class:`IterationRecord` as soon as the pass ends.

    Returns
    -------
    DDicCIRModel
        Dictionaries of the last pass, the clusters they were learned on, and the training
        images' retrieval codes (block of their cluster, layer-2 code).

    Notes
    -----
    One pass: layer 1 per cluster (B.3, warm-started after the first pass), B.4 vectors of all
    images, layer 2 (B.5), then -- with ``reiterate`` -- k-means on the normalised codes (B.6),
    matched to the current clusters. The loop stops when the matched centroids moved less than
    ``centroid_tol`` (relative), after ``max_outer_iter`` passes, or after one pass without
    re-iteration. See the module docstring for the readings this fixes.
    """
    _check_fit_inputs(maps, pooled, config)
    device, dtype = torch.device(config.device), config.torch_dtype
    n_images, channels, height, width = maps.shape
    k = config.n_clusters

    started = time.perf_counter()
    features = normalise_rows(pooled.to(device=device, dtype=dtype))
    initial = kmeans(features, k, generator=_generator(config.seed, _STREAM_KMEANS, 0),
                     n_init=config.kmeans_n_init, max_iter=config.kmeans_max_iter,
                     tol=config.kmeans_tol)
    labels = initial.labels
    log.info("ddiccir B.2: k-means on %d features, inertia %.4g, sizes %s (%.1f s)", n_images,
             initial.inertia, torch.bincount(labels, minlength=k).tolist(),
             time.perf_counter() - started)

    layer1: Tensor | None = None
    layer2: Tensor | None = None
    previous_centroids: Tensor | None = None
    history: list[IterationRecord] = []
    converged = False
    stop_reason = "max_outer_iter"
    for iteration in range(1, config.max_outer_iter + 1):
        seconds: dict[str, float] = {}
        sizes = torch.bincount(labels, minlength=k).tolist()

        tick = time.perf_counter()
        new_layer1, layer1_results = _learn_layer1(maps, labels, layer1, config, iteration)
        _synchronise(device)
        seconds["layer1"] = time.perf_counter() - tick
        layer1_change = tuple(
            None if layer1 is None else float(torch.linalg.matrix_norm(new_layer1[c] - layer1[c]))
            for c in range(k))

        tick = time.perf_counter()
        grams = torch.stack([gram_matrix(dictionary) for dictionary in new_layer1])
        aggregated, residual, energy = _aggregate(maps, labels, new_layer1, grams, config)
        _synchronise(device)
        seconds["aggregation"] = time.perf_counter() - tick
        layer1_error = tuple(
            float((residual[c] / energy[c]).sqrt()) if energy[c] > 0 else None for c in range(k))

        tick = time.perf_counter()
        layer2_result: DictionaryResult | None = None
        if config.use_layer2:
            initial_layer2 = layer2 if layer2 is not None else _initial_layer2(
                aggregated, labels, config, _generator(config.seed, _STREAM_LAYER2_INIT))
            layer2_result = ksvd(
                aggregated.T, initial_layer2, config.sparsity,
                max_iter=_sweeps(config, warm=layer2 is not None),
                tol=config.ksvd_tol, coherence_threshold=config.layer2_coherence_threshold,
                generator=_generator(config.seed, _STREAM_LAYER2_KSVD, iteration),
                replacement=config.replacement)
            new_layer2 = layer2_result.dictionary
            codes = _layer2_codes(aggregated, new_layer2, gram_matrix(new_layer2),
                                  config.sparsity)
        else:
            new_layer2 = None
            codes = aggregated
        _synchronise(device)
        seconds["layer2"] = time.perf_counter() - tick
        layer2_change = (None if layer2 is None or new_layer2 is None
                         else float(torch.linalg.matrix_norm(new_layer2 - layer2)))

        centroid_movement = feature_movement = label_change = None
        new_labels = centroids = None
        if config.reiterate:
            tick = time.perf_counter()
            clustering = kmeans(
                normalise_rows(codes), k,
                generator=_generator(config.seed, _STREAM_KMEANS, iteration),
                n_init=config.kmeans_n_init, max_iter=config.kmeans_max_iter,
                tol=config.kmeans_tol, initial_centroids=previous_centroids)
            mapping = match_clusters(clustering.labels, labels, k)
            new_labels = mapping[clustering.labels]
            centroids = torch.empty_like(clustering.centroids)
            centroids[mapping] = clustering.centroids
            if previous_centroids is not None:
                centroid_movement = relative_centroid_movement(centroids, previous_centroids)
            feature_movement = relative_centroid_movement(
                _cluster_means(features, new_labels, k), _cluster_means(features, labels, k))
            label_change = float((new_labels != labels).double().mean())
            _synchronise(device)
            seconds["kmeans"] = time.perf_counter() - tick

        record = IterationRecord(
            iteration=iteration,
            cluster_sizes=tuple(int(size) for size in sizes),
            layer1_change=layer1_change,
            layer1_training_error=tuple(
                None if result is None else float(result.errors[-1]) for result in layer1_results),
            layer1_error=layer1_error,
            layer1_ksvd_iterations=tuple(
                0 if result is None else result.n_iter for result in layer1_results),
            layer1_replaced_atoms=tuple(
                0 if result is None else sum(len(atoms) for atoms in result.replaced_atoms)
                for result in layer1_results),
            layer1_coherence=tuple(mutual_coherence(dictionary) for dictionary in new_layer1),
            layer2_change=layer2_change,
            layer2_error=None if layer2_result is None else float(layer2_result.errors[-1]),
            layer2_coherence=None if new_layer2 is None else mutual_coherence(new_layer2),
            layer2_ksvd_iterations=None if layer2_result is None else layer2_result.n_iter,
            layer2_replaced_atoms=None if layer2_result is None else sum(
                len(atoms) for atoms in layer2_result.replaced_atoms),
            centroid_movement=centroid_movement,
            feature_centroid_movement=feature_movement,
            label_change=label_change,
            seconds=seconds,
        )
        history.append(record)
        log.info("ddiccir pass %d: sizes %s, layer-1 change %s, layer-2 change %s, movement %s, "
                 "label change %s, %.1f s", iteration, record.cluster_sizes,
                 _short(record.layer1_change), _short((record.layer2_change,)),
                 _short((record.centroid_movement,)), _short((record.label_change,)),
                 sum(seconds.values()))
        if progress is not None:
            progress(record)

        layer1, layer2 = new_layer1, new_layer2
        if not config.reiterate:
            stop_reason = "no_reiteration"
            break
        movement = (centroid_movement if config.movement_space == "codes"
                    else feature_movement)
        if movement is not None and movement < config.centroid_tol:
            converged, stop_reason = True, "centroid_tol"
            break
        if (config.stop_label_change is not None and label_change is not None
                and label_change <= config.stop_label_change):
            converged, stop_reason = True, "label_change"
            break
        if iteration < config.max_outer_iter:
            labels, previous_centroids = new_labels, centroids

    assert layer1 is not None
    model = DDicCIRModel(
        config=config, map_shape=(channels, height, width), layer1=layer1, layer2=layer2,
        labels=labels, codes=codes, history=tuple(history), converged=converged,
        stop_reason=stop_reason)
    log.info("ddiccir: %d passes, stop: %s, %.1f s", len(history), stop_reason,
             time.perf_counter() - started)
    return model


def _cluster_means(points: Tensor, labels: Tensor, n_clusters: int) -> Tensor:
    """Mean point of every cluster, (k, d); zeros for an empty cluster."""
    sums = torch.zeros((n_clusters, points.shape[1]), dtype=points.dtype, device=points.device)
    sums.index_add_(0, labels, points)
    counts = torch.bincount(labels, minlength=n_clusters).clamp_min(1).to(points.dtype)
    return sums / counts[:, None]


def _short(values: tuple[float | None, ...]) -> str:
    return "[" + ", ".join("-" if value is None else f"{value:.3g}" for value in values) + "]"


# --------------------------------------------------------------------------------------------
# Queries (B.7)
# --------------------------------------------------------------------------------------------

def encode_queries(
    model: DDicCIRModel, maps: Tensor, *, batch_size: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Cluster and retrieval code of new images (method.md B.7).

    Every image's patches are coded by OMP (sparsity ``config.sparsity``) against every
    cluster's layer-1 dictionary; the image goes to the cluster with the lowest reconstruction
    error, and its code is made from that cluster's codes exactly as for the training images:
    pooled (B.4), put in block c, coded over layer 2 (B.5).

    Parameters
    ----------
    model : DDicCIRModel
    maps : Tensor of shape (B, C, H, W), the shape the model was fitted on; any floating dtype
        and device (moved to the model's in batches).
    batch_size : int, optional
        Images coded together (default ``config.batch_size``); memory only.

    Returns
    -------
    clusters : Tensor of shape (B,), int64
    codes : Tensor of shape (B, code_dim)
    reconstruction_error : Tensor of shape (B, k), float64
        ``||P - D1[c] Gamma||_F / ||P||_F`` over the image's patches P, for every cluster
        (0 for an all-zero map, which then goes to cluster 0).

    All three are on the model's device.

    Notes
    -----
    A training image gets back its stored cluster and code when its own cluster's dictionary
    reconstructs it best, which is likely but not guaranteed: training clusters come from
    k-means on the codes (B.6), query clusters from the reconstruction error (B.7).
    """
    config = model.config
    if maps.ndim != 4 or tuple(maps.shape[1:]) != tuple(model.map_shape):
        raise ValueError(f"maps must be (B, {', '.join(map(str, model.map_shape))}), got "
                         f"{tuple(maps.shape)}")
    device, dtype = model.device, model.layer1.dtype
    size = batch_size if batch_size is not None else config.batch_size
    n_images = maps.shape[0]
    k = config.n_clusters
    clusters = torch.empty(n_images, dtype=torch.long, device=device)
    errors = torch.empty((n_images, k), dtype=torch.float64, device=device)
    aggregated = torch.empty((n_images, k * config.layer1_atoms), dtype=dtype, device=device)
    grams = model.layer1_grams
    for first in range(0, n_images, size):
        batch = slice(first, min(first + size, n_images))
        codes, squared_residuals, squared_norms = code_patches(
            maps[batch].to(device=device, dtype=dtype), model.layer1, grams, config.sparsity,
            **_patch_options(config))
        chosen = torch.argmin(squared_residuals, dim=0)                       # (b,)
        clusters[batch] = chosen
        errors[batch] = (squared_residuals / squared_norms.clamp_min(
            torch.finfo(torch.float64).tiny)).sqrt().T
        own_codes = codes[chosen, torch.arange(chosen.numel(), device=device)]  # (b, K1, L)
        aggregated[batch] = place_in_blocks(pool_codes(own_codes, config.pooling), chosen, k)
    if model.layer2 is None:
        return clusters, aggregated, errors
    return clusters, _layer2_codes(aggregated, model.layer2, model.layer2_gram,
                                   config.sparsity), errors


def rank_by_code(
    query_codes: Tensor, query_clusters: Tensor, index_codes: Tensor, index_clusters: Tensor,
    top_n: int, *, query_batch_size: int = 256, index_is_normalised: bool = False,
) -> tuple[Tensor, Tensor]:
    """Rank index images for each query (method.md B.7).

    Score = cosine similarity of retrieval codes (0 against an all-zero code). Index images in
    the query's cluster come first, by decreasing score, then all others by decreasing score;
    ties keep index order.

    Parameters
    ----------
    query_codes : Tensor of shape (Q, D)
    query_clusters : Tensor of shape (Q,), int64
    index_codes : Tensor of shape (N, D)
    index_clusters : Tensor of shape (N,), int64
    top_n : int
        Results per query (at most N are returned).
    query_batch_size : int, default 256
        Queries ranked together (memory: Q x N scores per batch).
    index_is_normalised : bool, default False
        True when ``index_codes`` already went through :func:`normalise_rows`: a service that
        keeps the index normalised saves a pass over it per call (~100 ms for 100k x 256 on the
        2-core box, more than the ranking itself).

    Returns
    -------
    indices : Tensor of shape (Q, min(top_n, N)), int64 -- rows of the index
    scores : Tensor of shape (Q, min(top_n, N)) -- their cosine similarity

    Notes
    -----
    With B.4's block placement, codes of images in different clusters have (almost) disjoint
    supports: layer-2 atoms stay in the block they were drawn from, and only random replacement
    atoms span several blocks. Scores outside the query's cluster are therefore 0 or close to
    it, and their order carries little information.
    """
    if query_codes.ndim != 2 or index_codes.ndim != 2 or (
            query_codes.shape[1] != index_codes.shape[1]):
        raise ValueError(f"codes must be (Q, D) and (N, D), got {tuple(query_codes.shape)} and "
                         f"{tuple(index_codes.shape)}")
    if query_clusters.shape != query_codes.shape[:1] or (
            index_clusters.shape != index_codes.shape[:1]):
        raise ValueError("one cluster per code is needed")
    if top_n < 1:
        raise ValueError(f"top_n must be >= 1, got {top_n}")
    n_results = min(top_n, index_codes.shape[0])
    device = index_codes.device
    index_unit = index_codes if index_is_normalised else normalise_rows(index_codes)
    index_clusters = index_clusters.to(device)
    all_indices, all_scores = [], []
    for first in range(0, query_codes.shape[0], query_batch_size):
        queries = normalise_rows(query_codes[first:first + query_batch_size].to(device))
        clusters = query_clusters[first:first + query_batch_size].to(device)
        scores = queries @ index_unit.T                                       # (q, N)
        same = clusters[:, None] == index_clusters[None, :]
        key = scores.double() + _SAME_CLUSTER_BONUS * same.double()
        # topk alone is fast but picks arbitrarily among ties at the cut (all the zero scores
        # outside the cluster): keep everything at or above the n-th key, then order that
        # candidate set with a stable sort, so ties always go by index.
        cut = torch.topk(key, n_results, dim=1).values[:, -1]
        order = torch.empty((key.shape[0], n_results), dtype=torch.long, device=device)
        for row in range(key.shape[0]):
            candidates = torch.nonzero(key[row] >= cut[row]).squeeze(1)
            ranked = torch.sort(key[row, candidates], descending=True, stable=True).indices
            order[row] = candidates[ranked[:n_results]]
        all_indices.append(order)
        all_scores.append(scores.gather(1, order))
    return torch.cat(all_indices), torch.cat(all_scores)


# --------------------------------------------------------------------------------------------
# What the service indexes: codes or features, chosen by measurement
# --------------------------------------------------------------------------------------------

def index_entries(model: DDicCIRModel, maps: Tensor) -> tuple[Tensor, Tensor]:
    """Cluster and index vector of images, as the service stores and ranks them.

    ``model.ranking == "codes"``: :func:`encode_queries` (B.7), the DDicCIR code.
    ``"features"``: the L2-normalised pooled feature (mean of the map over positions, as
    :func:`pipelines.backbone.extract_features` defines it) and the nearest of
    ``model.feature_centroids`` (cosine). Either way :func:`rank_by_code` ranks them, the
    query's cluster first.

    Parameters
    ----------
    model : DDicCIRModel
    maps : Tensor of shape (B, C, H, W)

    Returns
    -------
    clusters : Tensor of shape (B,), int64
    vectors : Tensor of shape (B, code_dim) or (B, C)
    """
    if model.ranking == "codes":
        clusters, codes, _ = encode_queries(model, maps)
        return clusters, codes
    assert model.feature_centroids is not None
    if maps.ndim != 4 or tuple(maps.shape[1:]) != tuple(model.map_shape):
        raise ValueError(f"maps must be (B, {', '.join(map(str, model.map_shape))}), got "
                         f"{tuple(maps.shape)}")
    centroids = model.feature_centroids
    size = model.config.batch_size
    features = normalise_rows(torch.cat([
        maps[first:first + size].to(device=centroids.device, dtype=torch.float32)
        .mean(dim=(2, 3)) for first in range(0, maps.shape[0], size)]).to(centroids.dtype))
    return torch.argmax(features @ centroids.T, dim=1), features


def _leave_one_out_scores(
    vectors: Tensor, queries: Tensor, clusters: Tensor | None, labels: np.ndarray, depth: int,
) -> dict[str, float]:
    """P@depth and mAP@depth of ranking all other items for each query row (itself
    excluded), the query's cluster first when ``clusters`` is given; relevant = same label.
    ``vectors`` (N, D) unit rows, ``queries`` (Q,) row indices."""
    from pipelines.retrieval_metrics import average_precision_at

    key = (vectors[queries] @ vectors.T).double()
    if clusters is not None:
        key += _SAME_CLUSTER_BONUS * (clusters[queries, None] == clusters[None, :]).double()
    key[torch.arange(queries.numel()), queries] = -math.inf
    order = torch.topk(key, depth, dim=1).indices.cpu().numpy()
    relevance = labels[order] == labels[queries.cpu().numpy(), None]
    return {"precision": float(relevance.mean()),
            "map": float(average_precision_at(relevance, [depth]).mean())}


def purity(clusters: np.ndarray, labels: np.ndarray) -> float:
    """Cluster purity (method.md, metrics): ``(1/N) sum_c max_label |{i in c: label_i}|``;
    single labels of any type. (N,), (N,) -> float in (0, 1]."""
    _, label_codes = np.unique(np.asarray(labels), return_inverse=True)
    _, cluster_codes = np.unique(np.asarray(clusters), return_inverse=True)
    table = np.zeros((cluster_codes.max() + 1, label_codes.max() + 1), dtype=np.int64)
    np.add.at(table, (cluster_codes, label_codes), 1)
    return float(table.max(axis=1).sum() / len(label_codes))


def compare_rankings(
    features: Tensor, codes: Tensor, code_clusters: Tensor, feature_clusters: Tensor,
    labels: np.ndarray, *, depth: int = 20, max_queries: int = 2_000, seed: int = 0,
) -> dict:
    """Which index ranks a site's images better: DDicCIR codes or the pooled features.

    Leave-one-out on the fitted images: each image is a query against all others (itself left
    out), relevant = same label (e.g. "modality|body part" from the images' tags). Scored:

    * ``codes``: cosine of codes, the image's DDicCIR cluster first (the B.7 ranking);
    * ``features``: cosine of normalised features, the image's feature cluster first (what
      :func:`index_entries` does with ``ranking="features"``);
    * ``features_ungated``: cosine of features alone, for reference;

    each as P@depth and mAP@depth (:mod:`pipelines.retrieval_metrics`), plus the purity of
    both clusterings against the labels. The codes are in-sample (the dictionaries were
    learned on these images), which favours them if anything.

    Parameters
    ----------
    features : Tensor of shape (N, C) -- pooled features (normalised here)
    codes : Tensor of shape (N, D) -- the model's training codes
    code_clusters, feature_clusters : Tensor of shape (N,), int64
    labels : ndarray of shape (N,)
    depth : int, default 20 (clipped to N - 1)
    max_queries : int, default 2,000
        Queries are a seeded sample of this many images (all when fewer), each ranked against
        all N (memory: max_queries x N scores).
    seed : int, default 0

    Returns
    -------
    dict with "codes", "features", "features_ungated" (each {"precision", "map"}), "depth",
    "purity_codes", "purity_features", "n_images", "n_labels".
    """
    labels = np.asarray(labels)
    n_images = labels.shape[0]
    if n_images < 3 or not (features.shape[0] == codes.shape[0] == n_images):
        raise ValueError("compare_rankings needs at least 3 images and one label each")
    depth = min(depth, n_images - 1)
    unit_features = normalise_rows(features.float())
    unit_codes = normalise_rows(codes.float().to(unit_features.device))
    queries = torch.arange(n_images)
    if n_images > max_queries:
        queries = torch.randperm(n_images, generator=torch.Generator().manual_seed(seed))[
            :max_queries].sort().values
    queries = queries.to(unit_features.device)
    code_clusters = code_clusters.to(unit_features.device)
    feature_clusters = feature_clusters.to(unit_features.device)
    return {
        "codes": _leave_one_out_scores(unit_codes, queries, code_clusters, labels, depth),
        "features": _leave_one_out_scores(unit_features, queries, feature_clusters, labels,
                                          depth),
        "features_ungated": _leave_one_out_scores(unit_features, queries, None, labels, depth),
        "n_queries": int(queries.numel()),
        "depth": depth,
        "purity_codes": purity(code_clusters.cpu().numpy(), labels),
        "purity_features": purity(feature_clusters.cpu().numpy(), labels),
        "n_images": int(n_images),
        "n_labels": int(len(np.unique(labels))),
    }


def select_ranking(
    model: DDicCIRModel, pooled: Tensor, labels: np.ndarray | None, *,
    ranking: Literal["auto", "codes", "features"] = "auto", depth: int = 20,
) -> DDicCIRModel:
    """The model with ``ranking``, ``feature_centroids`` and ``selection`` set.

    ``"auto"`` measures (:func:`compare_rankings`, labels of the fitted images) and keeps the
    codes only when their P@depth + mAP@depth is higher than the features'; without labels
    (or with a single label) it keeps the codes and says so. The feature clustering is the
    model's own clusters or k-means (B.2 settings) on the features, whichever is purer (the
    model's when there are no labels).

    Parameters
    ----------
    model : DDicCIRModel -- fitted on ``pooled``'s images, in the same order
    pooled : Tensor of shape (N, C)
    labels : ndarray of shape (N,), or None
    ranking : {"auto", "codes", "features"}
    depth : int, default 20
    """
    import dataclasses

    if ranking not in ("auto", "codes", "features"):
        raise ValueError(f"ranking must be 'auto', 'codes' or 'features', got {ranking!r}")
    config = model.config
    device = model.device
    features = normalise_rows(pooled.to(device=device, dtype=model.layer1.dtype))
    k = config.n_clusters
    own = model.labels.to(device)
    clusterings = {"model": own}
    usable = labels is not None and len(np.unique(np.asarray(labels))) > 1
    if usable:
        clusterings["kmeans"] = kmeans(
            features, k, generator=_generator(config.seed, _STREAM_KMEANS, 0),
            n_init=config.kmeans_n_init, max_iter=config.kmeans_max_iter,
            tol=config.kmeans_tol).labels
    selection: dict = {"requested": ranking}
    feature_source = "model"
    if usable:
        purities = {name: purity(values.cpu().numpy(), np.asarray(labels))
                    for name, values in clusterings.items()}
        feature_source = max(purities, key=lambda name: (purities[name], name == "model"))
        measured = compare_rankings(features, model.codes, own, clusterings[feature_source],
                                    np.asarray(labels), depth=depth)
        selection.update(measured)
        selection["feature_clusters"] = feature_source
    chosen = ranking
    if ranking == "auto":
        if not usable:
            chosen = "codes"
            selection["reason"] = "no labels to measure with: codes kept"
        else:
            codes_total = selection["codes"]["precision"] + selection["codes"]["map"]
            features_total = selection["features"]["precision"] + selection["features"]["map"]
            chosen = "codes" if codes_total > features_total else "features"
            selection["reason"] = (f"P@{selection['depth']} + mAP@{selection['depth']}: codes "
                                   f"{codes_total:.3f}, features {features_total:.3f}")
    selection["ranking"] = chosen
    centroids = normalise_rows(_cluster_means(features, clusterings[feature_source], k))
    return dataclasses.replace(model, ranking=chosen, feature_centroids=centroids,
                               selection=selection)
