"""Gower distance (method.md A.4): oracle = plain-Python transcription of the formula."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipelines.gower import (
    GowerData, NumericRanges, encode_features, fit_ranges, gower_matrix, gower_to_medoids,
    subset_rows,
)


def formula_gower(numeric, categorical, *, low, high, weights=None, other=None):
    """method.md A.4 written out with loops: d = 1 - sum(delta w s) / sum(delta w)."""
    other_numeric, other_categorical = (numeric, categorical) if other is None else other
    n_numeric = len(numeric[0]) if len(numeric) else 0
    n_categorical = len(categorical[0]) if len(categorical) else 0
    if weights is None:
        weights = [1.0] * (n_numeric + n_categorical)

    def missing(value):
        return value is None or (isinstance(value, float) and math.isnan(value)) or (
            isinstance(value, str) and not value.strip())

    result = np.zeros((len(numeric), len(other_numeric)))
    for i in range(len(numeric)):
        for j in range(len(other_numeric)):
            similarity = comparable = 0.0
            for k in range(n_numeric):
                a, b = numeric[i][k], other_numeric[j][k]
                if math.isnan(a) or math.isnan(b):
                    continue
                span = high[k] - low[k]
                a, b = min(max(a, low[k]), high[k]), min(max(b, low[k]), high[k])
                s = 1.0 if span == 0 else 1.0 - abs(a - b) / span
                similarity += weights[k] * s
                comparable += weights[k]
            for k in range(n_categorical):
                a, b = categorical[i][k], other_categorical[j][k]
                if missing(a) or missing(b):
                    continue
                similarity += weights[n_numeric + k] * (1.0 if a == b else 0.0)
                comparable += weights[n_numeric + k]
            result[i, j] = 1.0 if comparable == 0 else 1.0 - similarity / comparable
    return result


def random_mixed(seed, n_rows=30, n_numeric=5, n_categorical=4, missing_share=0.3):
    rng = np.random.default_rng(seed)
    numeric = rng.normal(size=(n_rows, n_numeric)) * rng.uniform(0.5, 50, size=n_numeric)
    numeric[:, 0] = np.round(numeric[:, 0])  # a low-cardinality numeric column
    numeric[rng.random(numeric.shape) < missing_share] = np.nan
    categorical = np.empty((n_rows, n_categorical), dtype=object)
    for k in range(n_categorical):
        size = [2, 3, 30, 60][k % 4]
        categorical[:, k] = [f"c{v}" for v in rng.integers(0, size, n_rows)]
    categorical[rng.random(categorical.shape) < missing_share] = None
    blanks = rng.random(categorical.shape) < 0.05
    categorical[blanks] = ""
    return numeric, categorical


def ranges_of(numeric):
    low = [float(np.nanmin(c)) if not np.all(np.isnan(c)) else 0.0 for c in numeric.T]
    high = [float(np.nanmax(c)) if not np.all(np.isnan(c)) else 0.0 for c in numeric.T]
    return low, high


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype, tolerance", [(np.float64, 1e-9), (np.float32, 2e-6)])
@pytest.mark.parametrize("onehot_max_categories", [0, 24, 1000])
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_formula_with_missing_values(seed, dtype, tolerance, onehot_max_categories,
                                             weighted):
    numeric, categorical = random_mixed(seed)
    weights = np.random.default_rng(seed + 100).uniform(0.0, 3.0, 9) if weighted else None
    data = encode_features(numeric, categorical)
    low, high = ranges_of(numeric)
    expected = formula_gower(numeric.tolist(), categorical.tolist(), low=low, high=high,
                             weights=None if weights is None else weights.tolist())
    got = gower_matrix(data, ranges=fit_ranges(data), weights=weights, dtype=dtype,
                       block_rows=7, onehot_max_categories=onehot_max_categories)
    assert got.dtype == dtype
    np.testing.assert_allclose(got, expected, atol=tolerance, rtol=0)


@pytest.mark.parametrize("seed", [3, 4])
def test_cross_matrix_matches_formula(seed):
    numeric, categorical = random_mixed(seed, n_rows=25)
    fit = encode_features(numeric[:15], categorical[:15])
    new = encode_features(numeric[15:], categorical[15:], vocabularies=fit.vocabularies)
    ranges = fit_ranges(fit)
    expected = formula_gower(numeric[15:].tolist(), categorical[15:].tolist(),
                             low=ranges.low.tolist(), high=ranges.high.tolist(),
                             other=(numeric[:15].tolist(), categorical[:15].tolist()))
    got = gower_matrix(new, fit, ranges=ranges, dtype=np.float64, block_rows=4)
    np.testing.assert_allclose(got, expected, atol=1e-9, rtol=0)


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_gower_package_on_complete_data(seed):
    gower = pytest.importorskip("gower")
    pd = pytest.importorskip("pandas")
    rng = np.random.default_rng(seed)
    n_rows = 60
    # Positive values: the package normalises by max and range = 1 - min / max.
    numeric = rng.uniform(1.0, 100.0, size=(n_rows, 6))
    categorical = rng.integers(0, 4, size=(n_rows, 3)).astype(str).astype(object)
    frame = pd.DataFrame(
        {**{f"n{k}": numeric[:, k] for k in range(6)},
         **{f"c{k}": pd.Series(categorical[:, k], dtype=object) for k in range(3)}})
    expected = gower.gower_matrix(frame)
    data = encode_features(numeric, categorical)
    got = gower_matrix(data, ranges=fit_ranges(data), dtype=np.float64)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)  # package works in float32


def test_zero_range_feature_counts_as_equal():
    numeric = np.array([[5.0, 0.0], [5.0, 1.0], [np.nan, 0.5]])
    data = encode_features(numeric, None)
    got = gower_matrix(data, ranges=fit_ranges(data), dtype=np.float64)
    # (0, 1): constant feature s = 1, other s = 0 -> d = 1 - 1/2.
    assert got[0, 1] == pytest.approx(0.5)
    # (0, 2): constant feature missing in row 2 -> only the second feature, s = 0.5.
    assert got[0, 2] == pytest.approx(0.5)


def test_pair_with_no_comparable_feature_is_one():
    numeric = np.array([[1.0, np.nan], [np.nan, 2.0], [np.nan, np.nan], [3.0, 4.0]])
    categorical = np.array([["a"], [None], [float("nan")], [None]], dtype=object)
    data = encode_features(numeric, categorical)
    got = gower_matrix(data, ranges=fit_ranges(data), dtype=np.float64)
    assert got[0, 1] == 1.0          # features present in disjoint positions
    assert got[2, 2] == 1.0          # all-missing row: no comparable feature, even with itself
    assert np.all(got[2] == 1.0)
    assert got[0, 0] == 0.0 and got[3, 3] == 0.0


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_symmetric_with_zero_diagonal(seed, dtype):
    numeric, categorical = random_mixed(seed, n_rows=70, missing_share=0.2)
    numeric[:, 1] = 1.0  # every row has at least one present feature
    data = encode_features(numeric, categorical)
    got = gower_matrix(data, ranges=fit_ranges(data), dtype=dtype, block_rows=16)
    assert np.array_equal(got, got.T)
    assert np.all(np.diag(got) == 0.0)
    assert got.min() >= 0.0 and got.max() <= 1.0


@pytest.mark.parametrize("seed", [0, 1])
def test_block_size_and_thread_count_do_not_change_results(seed):
    numeric, categorical = random_mixed(seed, n_rows=90)
    data = encode_features(numeric, categorical)
    ranges = fit_ranges(data)
    reference = gower_matrix(data, ranges=ranges, block_rows=32, n_threads=1)
    np.testing.assert_array_equal(
        gower_matrix(data, ranges=ranges, block_rows=32, n_threads=3), reference)
    for block_rows in (1, 7, 500):
        # Matrix products may round differently for other block shapes: float32 ulps only.
        np.testing.assert_allclose(
            gower_matrix(data, ranges=ranges, block_rows=block_rows), reference,
            atol=1e-6, rtol=0)


@pytest.mark.parametrize("seed", [0, 1])
def test_medoid_assignment_is_batch_invariant_and_matches_matrix(seed):
    numeric, categorical = random_mixed(seed, n_rows=120)
    fit = encode_features(numeric[:80], categorical[:80])
    new = encode_features(numeric[80:], categorical[80:], vocabularies=fit.vocabularies)
    ranges = fit_ranges(fit)
    medoids = subset_rows(fit, [3, 17, 42, 66])
    labels, distances = gower_to_medoids(new, medoids, ranges=ranges)
    # Rows one by one and in odd chunks give bit-identical results.
    for chunk_rows in (1, 7):
        other_labels, other_distances = gower_to_medoids(
            new, medoids, ranges=ranges, chunk_rows=chunk_rows)
        np.testing.assert_array_equal(other_labels, labels)
        np.testing.assert_array_equal(other_distances, distances)
    shuffled = np.random.default_rng(seed).permutation(new.n_samples)
    shuffled_labels, shuffled_distances = gower_to_medoids(
        subset_rows(new, shuffled), medoids, ranges=ranges, chunk_rows=9)
    np.testing.assert_array_equal(shuffled_distances, distances[shuffled])
    np.testing.assert_array_equal(shuffled_labels, labels[shuffled])
    full = gower_matrix(new, medoids, ranges=ranges, dtype=np.float64)
    np.testing.assert_allclose(distances, full.min(axis=1), atol=1e-12, rtol=0)


def test_frozen_ranges_clamp_new_values():
    fit = encode_features(np.array([[0.0], [10.0]]), None)
    ranges = fit_ranges(fit)
    new = encode_features(np.array([[25.0], [-5.0]]), None)
    got = gower_matrix(new, fit, ranges=ranges, dtype=np.float64)
    np.testing.assert_allclose(got, [[1.0, 0.0], [0.0, 1.0]])


def test_encode_reuses_vocabularies_and_appends_unseen_values():
    fit = encode_features(None, np.array([["CT"], ["MR"], [None]], dtype=object))
    assert fit.vocabularies == (("CT", "MR"),)
    assert fit.categorical[:, 0].tolist() == [0, 1, -1]
    new = encode_features(None, np.array([["MR"], ["US"], ["  "]], dtype=object),
                          vocabularies=fit.vocabularies)
    assert new.categorical[:, 0].tolist() == [1, 2, -1]
    assert new.vocabularies == (("CT", "MR", "US"),)


def test_fit_ranges_ignores_missing_and_all_missing_feature():
    data = encode_features(np.array([[1.0, np.nan], [np.nan, np.nan], [4.0, np.nan]]), None)
    ranges = fit_ranges(data)
    assert isinstance(ranges, NumericRanges)
    np.testing.assert_array_equal(ranges.low, [1.0, 0.0])
    np.testing.assert_array_equal(ranges.span, [3.0, 0.0])


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda d, r: gower_matrix(d, ranges=r, weights=[1.0]), "weights must have shape"),
        (lambda d, r: gower_matrix(d, ranges=r, weights=[1.0, -1.0]), "non-negative"),
        (lambda d, r: gower_matrix(d, ranges=r, dtype=np.int32), "float32 or float64"),
        (lambda d, r: gower_matrix(d, ranges=NumericRanges(np.zeros(2), np.ones(2))),
         "ranges cover 2"),
        (lambda d, r: gower_matrix(
            d, encode_features(np.zeros((1, 1)), np.array([["zz"]], dtype=object)), ranges=r),
         "different vocabularies"),
        (lambda d, r: gower_to_medoids(d, subset_rows(d, []), ranges=r), "at least one medoid"),
    ],
)
def test_errors(call, message):
    data = encode_features(np.array([[1.0], [2.0]]), np.array([["a"], ["b"]], dtype=object))
    with pytest.raises(ValueError, match=message):
        call(data, fit_ranges(data))


def test_encode_rejects_mismatched_rows():
    with pytest.raises(ValueError, match="different row counts"):
        encode_features(np.zeros((2, 1)), np.array([["a"]], dtype=object))


def test_gower_data_shapes():
    data = encode_features(np.zeros((3, 2)), np.array([["a"]] * 3, dtype=object))
    assert isinstance(data, GowerData)
    assert (data.n_samples, data.n_numeric, data.n_categorical) == (3, 2, 1)
