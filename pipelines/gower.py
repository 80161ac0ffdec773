"""Gower distance on mixed numeric / categorical features with missing values.

Implements docs/method.md A.4 (with optional feature weights)::

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
    "unique_rows",
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
        codes[:, feature] = _encode_column(category_values[:, feature].tolist(), known)
        encoded_vocabularies.append(tuple(known))
    return GowerData(numeric_values, codes, tuple(encoded_vocabularies))


def _encode_column(column: list[Any], known: list[Any]) -> np.ndarray:
    """Codes of one categorical column; appends unseen values to ``known`` (in place).

    Equivalent to looking every value up in a dict in row order, but the per-row work runs
    in C (``dict.fromkeys`` for the distinct values, ``map`` for the lookups): a million
    rows take ~0.1 s instead of ~1 s. Only the distinct values pass through Python code, in
    order of first appearance, so codes and vocabulary order are exactly those of the
    row-by-row loop (values that compare equal, such as ``1`` and ``1.0``, share the code of
    the first one seen, as a dict lookup does).
    """
    code_of = {value: code for code, value in enumerate(known)}
    code_of_distinct: dict[Any, int] = {}
    for value in dict.fromkeys(column):
        if _is_missing_category(value):
            code_of_distinct[value] = MISSING_CODE
            continue
        code = code_of.get(value)
        if code is None:
            code = len(known)
            code_of[value] = code
            known.append(value)
        code_of_distinct[value] = code
    return np.fromiter(map(code_of_distinct.__getitem__, column), dtype=np.int32,
                       count=len(column))


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
    any_present = ~np.isnan(values).all(axis=0)
    # fmin / fmax skip NaN: one pass over the data and no (n, p) temporaries (1M rows).
    low = np.fmin.reduce(values, axis=0, initial=np.inf)
    high = np.fmax.reduce(values, axis=0, initial=-np.inf)
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


def _row_key_columns(data: GowerData) -> list[np.ndarray]:
    """The row identity as int64 columns: numeric bit patterns (one NaN pattern for all
    missing values) then categorical codes."""
    columns = []
    for feature in range(data.n_numeric):
        values = data.numeric[:, feature]
        values = np.where(np.isnan(values), np.nan, values)
        columns.append(values.view(np.int64))
    for feature in range(data.n_categorical):
        columns.append(data.categorical[:, feature].astype(np.int64))
    return columns


_HASH_MULTIPLIERS = (np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))
_HASH_STEP_INT = 0x9E3779B97F4A7C15
_UINT64_MASK = (1 << 64) - 1


def _row_hash(columns: Sequence[np.ndarray], n_rows: int) -> np.ndarray:
    """64-bit hash of every row (splitmix64 finaliser per value, combined column by column)."""
    state = np.zeros(n_rows, dtype=np.uint64)
    for position, column in enumerate(columns):
        offset = np.uint64((_HASH_STEP_INT * (position + 1)) & _UINT64_MASK)
        mixed = column.view(np.uint64) + offset
        mixed ^= mixed >> np.uint64(30)
        mixed *= _HASH_MULTIPLIERS[0]
        mixed ^= mixed >> np.uint64(27)
        mixed *= _HASH_MULTIPLIERS[1]
        mixed ^= mixed >> np.uint64(31)
        state ^= mixed
        state *= _HASH_MULTIPLIERS[position % 2]
        state ^= state >> np.uint64(29)
    return state


def _groups_of_equal_keys(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(first, inverse)`` of a 1-D key array: first row of every group, group of every
    row; groups numbered in order of their first row."""
    n_rows = keys.shape[0]
    order = np.argsort(keys, kind="stable")  # stable: a group's first row comes first
    sorted_keys = keys[order]
    starts = np.ones(n_rows, dtype=bool)
    starts[1:] = sorted_keys[1:] != sorted_keys[:-1]
    group_in_sorted = np.cumsum(starts) - 1
    first = order[starts]
    inverse = np.empty(n_rows, dtype=np.int64)
    inverse[order] = group_in_sorted
    by_first = np.argsort(first, kind="stable")
    rank = np.empty_like(by_first)
    rank[by_first] = np.arange(by_first.size)
    return first[by_first], rank[inverse]


def unique_rows(data: GowerData) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Group identical rows (NaN equals NaN, a missing category equals a missing category).

    Rows are hashed to 64 bits column by column (O(n p), no (n, p) key matrix and no
    lexicographic sort of rows: ``np.unique(axis=0)`` took 36 s and a few GB for a million
    rows x 83 features, this 3-4 s), grouped by hash, and every row is then checked against
    its group's first row, column by column.
    Should two different rows ever share a hash, the exact (slow) ``np.unique(axis=0)`` is
    used instead, so the result never depends on the hash.

    Parameters
    ----------
    data : GowerData with n rows

    Returns
    -------
    first : ndarray of shape (n_groups,), int64
        The first row of every group, in increasing order (groups are numbered in order of
        first appearance).
    inverse : ndarray of shape (n,), int64
        The group of every row: ``subset_rows(data, first[inverse])`` equals ``data``.
    counts : ndarray of shape (n_groups,), int64
        Rows per group.
    """
    n_rows = data.n_samples
    if n_rows == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    columns = _row_key_columns(data)
    first, inverse = _groups_of_equal_keys(_row_hash(columns, n_rows))
    representative = first[inverse]
    if not all(np.array_equal(column, column[representative]) for column in columns):
        log.warning("unique_rows: 64-bit hash collision among %d rows; exact fallback", n_rows)
        keys = np.stack(columns, axis=1) if columns else np.zeros((n_rows, 1), np.int64)
        _, exact_inverse = np.unique(keys, axis=0, return_inverse=True)
        first, inverse = _groups_of_equal_keys(exact_inverse.reshape(-1))
    counts = np.bincount(inverse, minlength=first.size).astype(np.int64)
    return first.astype(np.int64), inverse, counts


def gower_to_medoids(
    x: GowerData,
    medoids: GowerData,
    *,
    ranges: NumericRanges,
    weights: np.ndarray | Sequence[float] | None = None,
    chunk_rows: int = 16384,
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest medoid of every row of ``x`` (method.md A.4, A.7): O(n K p) time,
    O(chunk_rows (p + K)) memory beyond the input and the per-feature tables.

    Unlike :func:`gower_matrix` this uses no matrix products: every (row, medoid) distance
    is accumulated feature by feature in a fixed order with elementwise float64 operations,
    so a row's result is bit-for-bit the same whatever chunk, batch or worker it is
    computed in -- the property the nightly assignment of millions of instances in
    parallel workers relies on. It agrees with :func:`gower_matrix` to float rounding.

    How it is fast (1M rows x 300 medoids x 83 features, benchmarks/clustering/README.md):
    identical rows (slices of one series) are computed once (:func:`unique_rows`); each
    numeric term ``w_k/R_k |x_k - m_k|`` comes from a per-feature table over the chunk's
    distinct values of feature k (archive columns take few), so a row costs one gather and
    one add of K values per feature, in (rows, K) blocks that stay in cache; the categorical
    mismatches and the denominator depend only on the categorical codes and on which
    numeric values are present, so they are computed once per distinct combination.

    Parameters
    ----------
    x : GowerData with n rows
    medoids : GowerData with K rows (e.g. ``subset_rows(fit_data, medoid_indices_)``)
    ranges : NumericRanges frozen on the fit data
    weights : array-like of shape (p_num + p_cat,), optional
    chunk_rows : int
        Distinct rows handled at once (memory: ``chunk_rows x p`` value indices and, per
        feature, a table of the chunk's distinct values x K). Does not change the result.

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
    kernel = _MedoidKernel(medoids, ranges, weight_array)
    first, inverse, _ = unique_rows(x)
    distinct = subset_rows(x, first)
    n_distinct = distinct.n_samples
    labels = np.empty(n_distinct, dtype=np.int64)
    distances = np.empty(n_distinct, dtype=np.float64)
    for start in range(0, n_distinct, chunk_rows):
        rows = slice(start, min(start + chunk_rows, n_distinct))
        labels[rows], distances[rows] = kernel.nearest(
            distinct.numeric[rows], distinct.categorical[rows])
    return labels[inverse], distances[inverse]


class _MedoidKernel:
    """Distances of rows to K fixed medoids, row by row deterministic (see gower_to_medoids).

    Every term is looked up in a per-feature table over the distinct values of the chunk
    (``table[v, m]`` = the term of value v against medoid m), and the tables are added in a
    fixed feature order. A row's sum therefore consists of the same float operations in the
    same order whatever else is in the chunk; only the table sizes change. Archive columns
    take few distinct values per chunk (series-level tags), so building the tables is cheap
    and the per-row work is one gather and one add per feature over K values.
    """

    _BLOCK_VALUES = 16384
    # (rows, K) float64 blocks of 128 KiB: block, scratch and result stay in the 512 KiB L2
    # cache across the per-feature passes.

    def __init__(self, medoids: GowerData, ranges: NumericRanges, weights: np.ndarray) -> None:
        n_numeric = medoids.n_numeric
        self.ranges = ranges
        self.numeric_weights = weights[:n_numeric]
        self.categorical_weights = weights[n_numeric:]
        span = ranges.span
        self.scale = np.divide(self.numeric_weights, span, out=np.zeros_like(span),
                               where=span > 0)
        self.medoid_scaled = self._scaled(medoids.numeric)                 # (K, p_num)
        # Features that can add to a numerator: a positive scale and a medoid that has them.
        self.l1_features = np.flatnonzero(
            (self.scale > 0) & ~np.all(np.isnan(self.medoid_scaled), axis=0))
        self.medoid_numeric_present = ~np.isnan(medoids.numeric)           # (K, p_num)
        self.medoid_codes = medoids.categorical                            # (K, p_cat)
        self.n_medoids = medoids.n_samples

    def _scaled(self, values: np.ndarray) -> np.ndarray:
        # NaN (missing) stays NaN; clamping keeps s in [0, 1] for out-of-range values.
        return (np.clip(values, self.ranges.low, self.ranges.high) - self.ranges.low) * self.scale

    def nearest(self, numeric: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Nearest medoid and its distance for rows ``numeric`` (n, p_num), ``codes`` (n, p_cat)."""
        n_rows = numeric.shape[0]
        tables, indices = self._numeric_tables(numeric)
        # Categorical numerator and denominator depend only on (codes, numeric presence):
        # few distinct combinations per chunk (series-level tags), computed once each.
        numeric_present = ~np.isnan(numeric)
        combination = GowerData(numeric_present.astype(np.float64), codes, ())
        first, combination_of_row, _ = unique_rows(combination)
        mismatch, comparable = self._categorical_and_denominator(
            numeric_present[first], codes[first])

        labels = np.empty(n_rows, dtype=np.int64)
        distances = np.empty(n_rows, dtype=np.float64)
        # Everything per block of rows: no (n, K) array is ever allocated, the block and
        # its scratch stay in cache.
        block_rows = max(1, self._BLOCK_VALUES // self.n_medoids)
        numerator = np.empty((block_rows, self.n_medoids), dtype=np.float64)
        scratch = np.empty_like(numerator)
        distance = np.empty_like(numerator)
        for start in range(0, n_rows, block_rows):
            stop = min(start + block_rows, n_rows)
            size = stop - start
            block, buffer, block_distance = numerator[:size], scratch[:size], distance[:size]
            block.fill(0.0)
            for table, index in zip(tables, indices):  # sum_k w_k/R_k |x_k - m_k|, in order
                np.take(table, index[start:stop], axis=0, out=buffer)
                block += buffer
            combination_rows = combination_of_row[start:stop]
            np.take(mismatch, combination_rows, axis=0, out=buffer)
            block += buffer
            np.take(comparable, combination_rows, axis=0, out=buffer)
            block_distance.fill(1.0)  # no comparable feature: distance 1
            np.divide(block, buffer, out=block_distance, where=buffer > 0)
            nearest = np.argmin(block_distance, axis=1)
            labels[start:stop] = nearest
            distances[start:stop] = block_distance[np.arange(size), nearest]
        return labels, distances

    def _numeric_tables(self, numeric: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per L1 feature: ``table[v, m] = w/R |v - m|`` (0 when either is missing) over the
        chunk's distinct values v, and the value index of every row."""
        scaled = self._scaled(numeric)
        tables, indices = [], []
        for feature in self.l1_features:
            values, index = np.unique(scaled[:, feature], return_inverse=True)  # NaN: one value
            table = np.abs(values[:, None] - self.medoid_scaled[None, :, feature])
            np.fmax(table, 0.0, out=table)  # NaN (missing on either side) adds 0
            tables.append(table)
            indices.append(index.reshape(-1))
        return tables, indices

    def _accumulate(self, tables: list[np.ndarray], indices: list[np.ndarray],
                    n_rows: int) -> np.ndarray:
        """``sum_f tables[f][indices[f]]`` in order of f: (n_rows, K)."""
        total = np.zeros((n_rows, self.n_medoids), dtype=np.float64)
        for table, index in zip(tables, indices):
            total += table[index]
        return total

    def _categorical_and_denominator(
        self, numeric_present: np.ndarray, codes: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Weighted categorical mismatches and ``sum_k w_k delta_k`` of rows (few, distinct
        combinations of codes and numeric presence) against the medoids: two (n, K)."""
        n_rows = numeric_present.shape[0]
        mismatch_tables, mismatch_indices = [], []
        comparable_tables, comparable_indices = [], []
        for feature, weight in enumerate(self.numeric_weights):
            if weight > 0:
                medoid_present = self.medoid_numeric_present[:, feature]
                # row 0: missing in the row, row 1: present
                comparable_tables.append(np.stack([np.zeros(self.n_medoids),
                                                   np.where(medoid_present, weight, 0.0)]))
                comparable_indices.append(numeric_present[:, feature].astype(np.intp))
        for feature, weight in enumerate(self.categorical_weights):
            if weight > 0:
                values, index = np.unique(codes[:, feature], return_inverse=True)
                medoid_codes = self.medoid_codes[None, :, feature]
                both = (values[:, None] >= 0) & (medoid_codes >= 0)
                comparable_tables.append(np.where(both, weight, 0.0))
                comparable_indices.append(index.reshape(-1))
                mismatch_tables.append(np.where(both & (values[:, None] != medoid_codes),
                                                weight, 0.0))
                mismatch_indices.append(index.reshape(-1))
        return (self._accumulate(mismatch_tables, mismatch_indices, n_rows),
                self._accumulate(comparable_tables, comparable_indices, n_rows))
