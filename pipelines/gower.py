"""Gower distance on mixed numeric / categorical features with missing values.

Implements ``/work/shared/design/method.md`` A.4 (with optional feature weights)::

    d(i, j) = 1 - sum_k(delta_ijk * w_k * s_ijk) / sum_k(delta_ijk * w_k)

* ``delta_ijk = 0`` when feature k is missing in i or in j (else 1);
* categorical feature: ``s = 1`` if the two values are equal, else 0;
* numeric feature: ``s = 1 - |x_ik - x_jk| / R_k``, ``R_k`` the range of feature k;
  a zero range gives ``s = 1`` whenever both values are present;
* no comparable feature (the denominator is 0): ``d = 1``.

Ranges are *frozen* (:func:`fit_ranges`) on the data the medoids were fitted on, so a new
instance's distance to the medoids does not depend on what it is batched with (A.7). A new
value outside the frozen range is clamped to it first, so ``s`` stays in [0, 1].

How it is computed (why it is fast): ``d = N / D`` with

* ``D = (w * present_x) @ present_y.T`` -- one matrix product;
* ``N = sum_k w_k/R_k |x_k - y_k|`` over pairs where both are present, plus, for categorical
  features, ``w_k`` for each pair of present, unequal values.

The numeric part is an L1 distance between value matrices in which missing entries are set
to 0 (values are shifted to start at 0, so ``|0 - y| = y``). The pairs where exactly one side
is missing are then removed exactly with two matrix products,
``(1 - present_x) @ y.T`` and ``x @ (1 - present_y).T``. Only the L1 part needs an
elementwise loop over features; it runs on cache-sized float32 blocks. Categorical equality
is a one-hot matrix product for low-cardinality features and an integer comparison per
feature otherwise. Rounding: float32 results agree with exact arithmetic to about 1e-6;
``dtype=np.float64`` gives about 1e-12.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from numpy.typing import DTypeLike

__all__ = [
    "GowerData",
    "NumericRanges",
    "encode_features",
    "fit_ranges",
    "gower_matrix",
    "gower_to_medoids",
    "subset_rows",
]

log = logging.getLogger(__name__)

MISSING_CODE = -1
"""Integer code of a missing categorical value."""

_OTHER_SIDE_MISSING_CODE = -2
# Missing values of the right-hand side are re-coded to -2 inside the kernel so that an
# integer comparison of two missing values is False (missing never equals missing).

DEFAULT_BLOCK_ROWS = 256
DEFAULT_ONEHOT_MAX_CATEGORIES = 24
# Measured (benchmarks/clustering/README.md): a one-hot product costs about 2 * n_categories
# flops per pair and feature, an integer comparison about 3 memory passes; below roughly two
# dozen categories the matrix product is cheaper on this machine.


@dataclass(frozen=True)
class GowerData:
    """Encoded features of n instances.

    Attributes
    ----------
    numeric : ndarray of shape (n, p_num), float64
        Numeric features, NaN where missing.
    categorical : ndarray of shape (n, p_cat), int32
        Category codes, ``-1`` where missing. Code ``c`` of feature k means
        ``vocabularies[k][c]``.
    vocabularies : tuple of p_cat tuples
        The category values of each categorical feature, in code order.
    """

    numeric: np.ndarray
    categorical: np.ndarray
    vocabularies: tuple[tuple[Any, ...], ...]

    @property
    def n_samples(self) -> int:
        return int(self.numeric.shape[0])

    @property
    def n_numeric(self) -> int:
        return int(self.numeric.shape[1])

    @property
    def n_categorical(self) -> int:
        return int(self.categorical.shape[1])


@dataclass(frozen=True)
class NumericRanges:
    """Frozen minimum and maximum of each numeric feature (method.md A.4, ``R_k``).

    Attributes
    ----------
    low, high : ndarray of shape (p_num,), float64
        Smallest and largest present value of each feature in the fit data (0 and 0 for a
        feature that is missing everywhere).
    """

    low: np.ndarray
    high: np.ndarray

    @property
    def span(self) -> np.ndarray:
        """``R_k = high - low``, shape (p_num,)."""
        return self.high - self.low


def _is_missing_category(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, (float, np.floating)) and math.isnan(value):
        return True
    if isinstance(value, str) and not value.strip():
        return True
    return False


def encode_features(
    numeric: np.ndarray | None,
    categorical: np.ndarray | None,
    *,
    vocabularies: Sequence[Sequence[Any]] | None = None,
) -> GowerData:
    """Encode raw feature columns for :func:`gower_matrix`.

    Parameters
    ----------
    numeric : array-like of shape (n, p_num) or None
        Numeric values; NaN (or None in an object array) means missing.
    categorical : array-like of shape (n, p_cat) or None
        Category values of any hashable type; None, NaN and empty/blank strings are missing.
        Values are compared as they are (``1`` and ``"1"`` differ).
    vocabularies : sequence of p_cat sequences, optional
        Vocabularies of previously encoded data (``GowerData.vocabularies``). Pass them when
        encoding new instances that will be compared with that data, so equal values get
        equal codes. Values not in a vocabulary are appended to it (a new code each).

    Returns
    -------
    GowerData
        ``numeric`` (n, p_num) float64 with NaN; ``categorical`` (n, p_cat) int32 with -1.
    """
    if numeric is None and categorical is None:
        raise ValueError("at least one of numeric and categorical features is required")
    n_rows = len(numeric) if numeric is not None else len(categorical)  # type: ignore[arg-type]

    if numeric is None:
        numeric_values = np.empty((n_rows, 0), dtype=np.float64)
    else:
        numeric_array = np.asarray(numeric)
        if numeric_array.ndim != 2:
            raise ValueError(f"numeric features must be 2-D, got shape {numeric_array.shape}")
        if numeric_array.dtype == object:
            numeric_array = np.where(
                np.equal(numeric_array, None), np.nan, numeric_array)
        numeric_values = np.ascontiguousarray(numeric_array, dtype=np.float64)

    if categorical is None:
        category_values = np.empty((n_rows, 0), dtype=object)
    else:
        category_values = np.asarray(categorical, dtype=object)
        if category_values.ndim != 2:
            raise ValueError(
                f"categorical features must be 2-D, got shape {category_values.shape}")
    if category_values.shape[0] != numeric_values.shape[0]:
        raise ValueError(
            f"numeric and categorical features have different row counts: "
            f"{numeric_values.shape[0]} != {category_values.shape[0]}")

    n_categorical = category_values.shape[1]
    if vocabularies is not None and len(vocabularies) != n_categorical:
        raise ValueError(
            f"got {len(vocabularies)} vocabularies for {n_categorical} categorical features")

    codes = np.full(category_values.shape, MISSING_CODE, dtype=np.int32)
    encoded_vocabularies: list[tuple[Any, ...]] = []
    for feature in range(n_categorical):
        known = list(vocabularies[feature]) if vocabularies is not None else []
        code_of = {value: code for code, value in enumerate(known)}
        column = category_values[:, feature]
        for row, value in enumerate(column):
            if _is_missing_category(value):
                continue
            code = code_of.get(value)
            if code is None:
                code = len(known)
                code_of[value] = code
                known.append(value)
            codes[row, feature] = code
        encoded_vocabularies.append(tuple(known))
    return GowerData(numeric_values, codes, tuple(encoded_vocabularies))


def subset_rows(data: GowerData, rows: np.ndarray | Sequence[int] | slice) -> GowerData:
    """Rows ``rows`` of ``data`` (same vocabularies), e.g. the medoids of a fit."""
    return GowerData(
        np.ascontiguousarray(data.numeric[rows]),
        np.ascontiguousarray(data.categorical[rows]),
        data.vocabularies,
    )


def fit_ranges(data: GowerData) -> NumericRanges:
    """Freeze the range ``R_k`` of every numeric feature (method.md A.4, A.7).

    Parameters
    ----------
    data : GowerData with n rows and p_num numeric features
        The data the medoids are fitted on.

    Returns
    -------
    NumericRanges
        ``low`` and ``high`` of shape (p_num,): min and max over present values; a feature
        missing in every row gets ``low = high = 0`` (zero range).
    """
    values = data.numeric
    present = ~np.isnan(values)
    any_present = present.any(axis=0)
    low = np.where(present, values, np.inf).min(axis=0, initial=np.inf)
    high = np.where(present, values, -np.inf).max(axis=0, initial=-np.inf)
    low = np.where(any_present, low, 0.0)
    high = np.where(any_present, high, 0.0)
    return NumericRanges(low.astype(np.float64), high.astype(np.float64))


@dataclass(frozen=True)
class _PreparedSide:
    """One side (rows) of a distance computation, in kernel form."""

    scaled_t: np.ndarray        # (p_l1, n): w_k (x - low) / R_k, 0 where missing; transposed
    present_weighted: np.ndarray  # (n, p): w_k * present, numeric then categorical
    present: np.ndarray          # (n, p): 0/1 present, numeric then categorical
    correction: np.ndarray       # (n, p_cat + onehot cols + 2 p_l1): see _prepare
    compare_codes_t: np.ndarray  # (p_cmp, n) int32 codes of features compared by equality


def _check_weights(weights: np.ndarray | Sequence[float] | None, n_features: int) -> np.ndarray:
    if weights is None:
        return np.ones(n_features, dtype=np.float64)
    weight_array = np.asarray(weights, dtype=np.float64)
    if weight_array.shape != (n_features,):
        raise ValueError(
            f"weights must have shape ({n_features},) (numeric then categorical features), "
            f"got {weight_array.shape}")
    if not np.all(np.isfinite(weight_array)) or np.any(weight_array < 0):
        raise ValueError("weights must be finite and non-negative")
    return weight_array


@dataclass(frozen=True)
class _Plan:
    """Which features go through which kernel; shared by both sides."""

    l1_features: np.ndarray       # numeric features with R_k > 0 and w_k > 0
    l1_scale: np.ndarray          # w_k / R_k of those
    onehot_features: np.ndarray   # categorical features compared by one-hot product
    onehot_sizes: np.ndarray      # number of codes of each
    compare_features: np.ndarray  # categorical features compared by integer equality
    compare_weights: np.ndarray


def _make_plan(
    x: GowerData, y: GowerData, ranges: NumericRanges, weights: np.ndarray,
    onehot_max_categories: int,
) -> _Plan:
    n_numeric = x.n_numeric
    span = ranges.span
    numeric_weights = weights[:n_numeric]
    categorical_weights = weights[n_numeric:]
    l1_features = np.flatnonzero((span > 0) & (numeric_weights > 0))
    l1_scale = numeric_weights[l1_features] / span[l1_features]
    sizes = np.array(
        [max(len(a), len(b)) for a, b in zip(x.vocabularies, y.vocabularies)], dtype=np.int64)
    used = categorical_weights > 0
    onehot = used & (sizes <= onehot_max_categories)
    compare = used & ~onehot
    return _Plan(
        l1_features=l1_features,
        l1_scale=l1_scale,
        onehot_features=np.flatnonzero(onehot),
        onehot_sizes=sizes[onehot],
        compare_features=np.flatnonzero(compare),
        compare_weights=categorical_weights[compare],
    )


def _prepare(
    data: GowerData, plan: _Plan, ranges: NumericRanges, weights: np.ndarray, *,
    left: bool, dtype: np.dtype,
) -> _PreparedSide:
    numeric_present = ~np.isnan(data.numeric)
    categorical_present = data.categorical >= 0
    present = np.concatenate([numeric_present, categorical_present], axis=1)

    values = data.numeric[:, plan.l1_features]
    l1_present = numeric_present[:, plan.l1_features]
    low = ranges.low[plan.l1_features]
    high = ranges.high[plan.l1_features]
    # Clamping to the frozen range keeps s in [0, 1] for new instances, and makes every
    # scaled value >= 0, which the exact correction below relies on (|0 - y| = y).
    scaled = (np.clip(values, low, high) - low) * plan.l1_scale
    scaled = np.where(l1_present, scaled, 0.0)

    n_rows = data.n_samples
    onehot_width = int(plan.onehot_sizes.sum())
    onehot = np.zeros((n_rows, onehot_width), dtype=np.float64)
    offset = 0
    categorical_weights = weights[data.n_numeric:]
    for feature, size in zip(plan.onehot_features, plan.onehot_sizes):
        codes = data.categorical[:, feature]
        rows = np.flatnonzero(codes >= 0)
        # Left side carries the weight, right side the indicator: product = w_k [equal].
        onehot[rows, offset + codes[rows]] = categorical_weights[feature] if left else 1.0
        offset += size

    l1_missing = (~l1_present).astype(np.float64)
    if left:
        # N_extra = (w p_x) @ p_y        categorical pairs both present
        #           - W_x @ onehot_y     ... minus the equal ones (one-hot features)
        #           - (1 - p_x) @ y      L1 terms where only x is missing
        #           - x @ (1 - p_y)      L1 terms where only y is missing
        categorical_part = categorical_present * categorical_weights
        correction = np.concatenate(
            [categorical_part, -onehot, -l1_missing, -scaled], axis=1)
    else:
        correction = np.concatenate(
            [categorical_present.astype(np.float64), onehot, scaled, l1_missing], axis=1)

    compare_codes = data.categorical[:, plan.compare_features]
    if not left:
        compare_codes = np.where(compare_codes < 0, _OTHER_SIDE_MISSING_CODE, compare_codes)
    return _PreparedSide(
        scaled_t=np.ascontiguousarray(scaled.T, dtype=dtype),
        present_weighted=np.ascontiguousarray(present * weights, dtype=dtype),
        present=np.ascontiguousarray(present, dtype=dtype),
        correction=np.ascontiguousarray(correction, dtype=dtype),
        compare_codes_t=np.ascontiguousarray(compare_codes.T, dtype=np.int32),
    )


def _distance_block(
    left: _PreparedSide, right: _PreparedSide, plan: _Plan,
    rows: slice, cols: slice, dtype: np.dtype,
) -> np.ndarray:
    """Gower distances of left rows ``rows`` to right rows ``cols``: (n_rows, n_cols)."""
    denominator = left.present_weighted[rows] @ right.present[cols].T
    # Categorical mismatches and the one-sided-missing corrections, as one matrix product:
    # sum over present categorical pairs of w_k, minus equal ones, minus the spurious L1
    # terms where only one side is present (see _prepare).
    numerator = left.correction[rows] @ right.correction[cols].T

    scratch = np.empty_like(numerator)
    left_scaled = left.scaled_t[:, rows]
    right_scaled = right.scaled_t[:, cols]
    for feature in range(left_scaled.shape[0]):
        np.subtract(left_scaled[feature, :, None], right_scaled[feature, None, :], out=scratch)
        np.abs(scratch, out=scratch)
        numerator += scratch

    if plan.compare_features.size:
        equal = np.empty(numerator.shape, dtype=bool)
        left_codes = left.compare_codes_t[:, rows]
        right_codes = right.compare_codes_t[:, cols]
        for index, weight in enumerate(plan.compare_weights):
            np.equal(left_codes[index, :, None], right_codes[index, None, :], out=equal)
            if weight == 1.0:
                np.subtract(numerator, equal, out=numerator)
            else:
                np.multiply(equal, dtype.type(weight), out=scratch)
                numerator -= scratch

    comparable = denominator > 0
    distance = np.divide(numerator, denominator, out=np.ones_like(numerator), where=comparable)
    # Rounding can leave values a few ulp outside [0, 1].
    np.clip(distance, 0.0, 1.0, out=distance)
    return distance


def gower_matrix(
    x: GowerData,
    y: GowerData | None = None,
    *,
    ranges: NumericRanges,
    weights: np.ndarray | Sequence[float] | None = None,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    dtype: DTypeLike = np.float32,
    onehot_max_categories: int = DEFAULT_ONEHOT_MAX_CATEGORIES,
    n_threads: int | None = None,
) -> np.ndarray:
    """Gower distance matrix (method.md A.4), computed in blocks.

    Parameters
    ----------
    x : GowerData with n_x rows
    y : GowerData with n_y rows, optional
        Same features as ``x`` (and vocabularies that extend one another). ``None`` means
        ``x`` against itself; then only the upper block triangle is computed and mirrored,
        so the result is exactly symmetric with a zero diagonal (1 for a row with no
        present feature at all, as A.4 says).
    ranges : NumericRanges
        Frozen ranges from :func:`fit_ranges` (never recomputed from ``x`` and ``y``).
    weights : array-like of shape (p_num + p_cat,), optional
        Non-negative weight per feature, numeric features first. Default all 1.
    block_rows : int
        Side of the square blocks; memory is about ``3 * block_rows**2`` values beyond the
        output.
    dtype : float32 or float64
        Compute and output precision.
    onehot_max_categories : int
        Categorical features with at most this many categories are compared by a one-hot
        matrix product, the others by integer equality (same result, different speed).
    n_threads : int, optional
        Threads computing row bands; default ``os.cpu_count()``. The result is the same
        for any value.

    Returns
    -------
    ndarray of shape (n_x, n_y), ``dtype``, values in [0, 1].
    """
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    symmetric = y is None
    other = x if y is None else y
    plan, weight_array = _checked_plan(x, other, ranges, weights, onehot_max_categories)
    left = _prepare(x, plan, ranges, weight_array, left=True, dtype=dtype)
    right = _prepare(other, plan, ranges, weight_array, left=False, dtype=dtype)

    n_x, n_y = x.n_samples, other.n_samples
    out = np.empty((n_x, n_y), dtype=dtype)

    def fill_row_band(row_start: int) -> None:
        rows = slice(row_start, min(row_start + block_rows, n_x))
        col_begin = row_start if symmetric else 0
        for col_start in range(col_begin, n_y, block_rows):
            cols = slice(col_start, min(col_start + block_rows, n_y))
            block = _distance_block(left, right, plan, rows, cols, dtype)
            if symmetric and col_start == row_start:
                # Rounding may differ between (i, j) and (j, i); keep the upper triangle so
                # that out == out.T exactly.
                block = np.triu(block) + np.triu(block, 1).T
            out[rows, cols] = block
            if symmetric and col_start != row_start:
                out[cols, rows] = block.T

    band_starts = list(range(0, n_x, block_rows))
    workers = _thread_count(n_threads, len(band_starts))
    with _single_threaded_blas():
        if workers == 1:
            for row_start in band_starts:
                fill_row_band(row_start)
        else:
            # numpy ufuncs and BLAS release the GIL, so row bands run in parallel; every
            # band writes a disjoint part of ``out``. Results do not depend on the count.
            with ThreadPoolExecutor(max_workers=workers) as pool:
                list(pool.map(fill_row_band, band_starts))
    if symmetric:
        has_feature = right.present.any(axis=1)
        np.fill_diagonal(out, np.where(has_feature, 0.0, 1.0))
    return out


def _single_threaded_blas() -> contextlib.AbstractContextManager[Any]:
    """Limit BLAS to one thread while we parallelise over blocks ourselves.

    The block products are small (256 x 256 x a few hundred); a multi-threaded BLAS inside
    each of our threads oversubscribes the cores, and OpenBLAS's spinning threads then make
    the whole matrix 3-4x slower on a loaded 2-core machine (measured: 5.2 s vs 1.4 s at
    n = 5,000). ``threadpoolctl`` (BSD-3) is optional: without it, set
    ``OPENBLAS_NUM_THREADS=1`` (or the MKL equivalent) in the job's environment.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _thread_count(n_threads: int | None, n_tasks: int) -> int:
    if n_threads is None:
        n_threads = os.cpu_count() or 1
    if n_threads < 1:
        raise ValueError(f"n_threads must be >= 1, got {n_threads}")
    return max(1, min(n_threads, n_tasks))


def _checked_plan(
    x: GowerData, y: GowerData, ranges: NumericRanges,
    weights: np.ndarray | Sequence[float] | None, onehot_max_categories: int,
) -> tuple[_Plan, np.ndarray]:
    if (x.n_numeric, x.n_categorical) != (y.n_numeric, y.n_categorical):
        raise ValueError(
            f"x has {x.n_numeric} numeric + {x.n_categorical} categorical features, "
            f"y has {y.n_numeric} + {y.n_categorical}")
    if ranges.low.shape != (x.n_numeric,):
        raise ValueError(
            f"ranges cover {ranges.low.shape[0]} numeric features, data has {x.n_numeric}")
    for feature, (a, b) in enumerate(zip(x.vocabularies, y.vocabularies)):
        shorter = min(len(a), len(b))
        if a[:shorter] != b[:shorter]:
            raise ValueError(
                f"categorical feature {feature}: x and y were encoded with different "
                "vocabularies; encode new data with vocabularies=fitted.vocabularies")
    weight_array = _check_weights(weights, x.n_numeric + x.n_categorical)
    return _make_plan(x, y, ranges, weight_array, onehot_max_categories), weight_array


def gower_to_medoids(
    x: GowerData,
    medoids: GowerData,
    *,
    ranges: NumericRanges,
    weights: np.ndarray | Sequence[float] | None = None,
    chunk_rows: int = 16384,
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest medoid of every row of ``x`` (method.md A.4, A.7): O(n K p) time,
    O(chunk_rows p) memory.

    Unlike :func:`gower_matrix` this works row by row (float64, a fixed summation order per
    row, no matrix products), so a row's result is bit-for-bit the same whatever chunk or
    batch it arrives in -- the property the nightly assignment of millions of instances in
    parallel workers relies on. It agrees with :func:`gower_matrix` to float rounding.

    Parameters
    ----------
    x : GowerData with n rows
    medoids : GowerData with K rows (e.g. ``subset_rows(fit_data, medoid_indices_)``)
    ranges : NumericRanges frozen on the fit data
    weights : array-like of shape (p_num + p_cat,), optional

    Returns
    -------
    labels : ndarray of shape (n,), int64
        Index (0..K-1) of the nearest medoid; ties go to the lowest index.
    distances : ndarray of shape (n,), float64
        Gower distance to that medoid.
    """
    if medoids.n_samples < 1:
        raise ValueError("at least one medoid is required")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    _, weight_array = _checked_plan(x, medoids, ranges, weights, 0)
    n_numeric = x.n_numeric
    numeric_weights = weight_array[:n_numeric]
    categorical_weights = weight_array[n_numeric:]
    span = ranges.span
    scale = np.divide(numeric_weights, span, out=np.zeros_like(span), where=span > 0)

    def scaled(values: np.ndarray) -> np.ndarray:
        # NaN (missing) stays NaN; clamping keeps s in [0, 1] for out-of-range values.
        return (np.clip(values, ranges.low, ranges.high) - ranges.low) * scale

    medoid_scaled = scaled(medoids.numeric)
    medoid_numeric_present = ~np.isnan(medoids.numeric)
    medoid_codes = medoids.categorical

    n_rows = x.n_samples
    labels = np.empty(n_rows, dtype=np.int64)
    distances = np.empty(n_rows, dtype=np.float64)
    for start in range(0, n_rows, chunk_rows):
        rows = slice(start, min(start + chunk_rows, n_rows))
        chunk_scaled = scaled(x.numeric[rows])
        chunk_numeric_present = ~np.isnan(x.numeric[rows])
        chunk_codes = x.categorical[rows]
        chunk_categorical_present = chunk_codes >= 0
        to_medoids = np.empty((chunk_scaled.shape[0], medoids.n_samples), dtype=np.float64)
        for medoid in range(medoids.n_samples):
            numeric_both = chunk_numeric_present & medoid_numeric_present[medoid]
            categorical_both = chunk_categorical_present & (medoid_codes[medoid] >= 0)
            numeric_dissimilarity = np.where(
                numeric_both, np.abs(chunk_scaled - medoid_scaled[medoid]), 0.0)
            categorical_dissimilarity = np.where(
                categorical_both & (chunk_codes != medoid_codes[medoid]),
                categorical_weights, 0.0)
            numerator = (numeric_dissimilarity.sum(axis=1)
                         + categorical_dissimilarity.sum(axis=1))
            denominator = (np.where(numeric_both, numeric_weights, 0.0).sum(axis=1)
                           + np.where(categorical_both, categorical_weights, 0.0).sum(axis=1))
            to_medoids[:, medoid] = np.divide(
                numerator, denominator, out=np.ones_like(numerator), where=denominator > 0)
        labels[rows] = np.argmin(to_medoids, axis=1)
        distances[rows] = to_medoids[np.arange(to_medoids.shape[0]), labels[rows]]
    return labels, distances
