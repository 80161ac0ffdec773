"""Clustering distinct tag profiles and assigning every instance (method.md A.5-A.7)."""

from __future__ import annotations

import numpy as np
import pytest

import pipelines.gower as gower_module
from pipelines.gower import (
    encode_features, fit_ranges, gower_matrix, gower_to_medoids, subset_rows, unique_rows,
)
from pipelines.tag_clustering import (
    _instance_sample, distinct_profiles, fit_profile_clusters, fit_tag_clusters,
)


def _archive(seed: int = 0):
    """Three kinds of series (CT axial, MR sagittal, CR), each series repeating one profile."""
    rng = np.random.default_rng(seed)
    numeric, categorical, truth = [], [], []
    kinds = [("CT", "AXIAL", 0.7, 5.0), ("MR", "SAGITTAL", 0.45, 1.0), ("CR", None, 0.15, np.nan)]
    for kind, (modality, plane, spacing, thickness) in enumerate(kinds):
        for _ in range(12):  # series
            size = int(rng.integers(20, 200))
            row_spacing = spacing * (1 + 0.05 * rng.standard_normal())
            numeric += [[row_spacing, thickness]] * size
            categorical += [[modality, plane]] * size
            truth += [kind] * size
    numeric = np.array(numeric, dtype=float)
    categorical = np.array(categorical, dtype=object)
    return encode_features(numeric, categorical), np.array(truth)


def test_distinct_profiles_rebuild_the_input():
    data, _ = _archive()
    profiles = distinct_profiles(data)
    assert profiles.counts.sum() == data.n_samples
    assert profiles.data.n_samples == 36  # one profile per series
    rebuilt = subset_rows(profiles.data, profiles.inverse)
    np.testing.assert_array_equal(rebuilt.categorical, data.categorical)
    np.testing.assert_array_equal(np.isnan(rebuilt.numeric), np.isnan(data.numeric))
    np.testing.assert_array_equal(np.nan_to_num(rebuilt.numeric), np.nan_to_num(data.numeric))


@pytest.mark.parametrize("max_profiles", [5000, 20], ids=["all-profiles", "sampled"])
def test_clusters_recover_the_kinds_and_every_instance_is_assigned(max_profiles):
    data, truth = _archive()
    # a 20-instance sample has too few profiles for the K bound (tested on its own below)
    model = fit_tag_clusters(data, candidates=(2, 3, 4, 5, 6), max_profiles=max_profiles,
                             min_profiles_per_cluster=1)
    assert model.k == 3
    assert max(model.silhouettes, key=model.silhouettes.get) == 3
    labels, distances = model.assign(data, chunk_rows=100)
    assert labels.shape == distances.shape == (data.n_samples,)
    # purity 1: each true kind maps to exactly one cluster
    for kind in range(3):
        assert len(set(labels[truth == kind])) == 1
    assert len(set(labels)) == 3
    assert float(distances.max()) < 0.1


def test_assignment_does_not_depend_on_the_batch():
    data, _ = _archive()
    model = fit_tag_clusters(data, candidates=(3,))
    whole, _ = model.assign(data)
    part, _ = model.assign(subset_rows(data, np.arange(10)))
    np.testing.assert_array_equal(whole[:10], part)


def test_too_few_profiles_for_every_candidate_is_a_clear_error():
    data, _ = _archive()
    with pytest.raises(ValueError, match="no candidate K"):
        fit_tag_clusters(data, candidates=(100, 200))


# ---------------------------------------------------------------- the archive-scale paths


def _encode_row_by_row(categorical, vocabularies=None):
    """The original encoder, one dict lookup per row: the reference for the fast path."""
    codes = np.full(categorical.shape, -1, dtype=np.int32)
    result = []
    for feature in range(categorical.shape[1]):
        known = list(vocabularies[feature]) if vocabularies is not None else []
        code_of = {value: code for code, value in enumerate(known)}
        for row, value in enumerate(categorical[:, feature]):
            if value is None or (isinstance(value, float) and np.isnan(value)) or (
                    isinstance(value, str) and not value.strip()):
                continue
            if value not in code_of:
                code_of[value] = len(known)
                known.append(value)
            codes[row, feature] = code_of[value]
        result.append(tuple(known))
    return codes, tuple(result)


@pytest.mark.parametrize("seed", [0, 1])
def test_fast_categorical_encoding_equals_row_by_row_lookup(seed):
    rng = np.random.default_rng(seed)
    # missing spellings, equal-comparing values of different types, numpy scalars, blanks
    pool = np.array([None, float("nan"), np.float64("nan"), "", "  ", "CT", "MR", np.str_("CT"),
                     1, 1.0, True, 2, "1", ("a", 1), "  CT"], dtype=object)
    categorical = pool[rng.integers(0, pool.size, size=(400, 3))]
    fitted = encode_features(None, categorical[:200])
    codes, vocabularies = _encode_row_by_row(categorical[:200])
    np.testing.assert_array_equal(fitted.categorical, codes)
    assert fitted.vocabularies == vocabularies
    assert [tuple(map(type, v)) for v in fitted.vocabularies] == [
        tuple(map(type, v)) for v in vocabularies]  # the first-seen value is kept
    new = encode_features(None, categorical[200:], vocabularies=fitted.vocabularies)
    codes, vocabularies = _encode_row_by_row(categorical[200:], fitted.vocabularies)
    np.testing.assert_array_equal(new.categorical, codes)
    assert new.vocabularies == vocabularies


def test_unique_rows_groups_in_order_of_first_appearance():
    numeric = np.array([[1.0, np.nan], [2.0, 0.5], [1.0, np.nan], [np.nan, np.nan],
                        [2.0, 0.5], [float("-nan"), np.nan]])
    categorical = np.array([["a"], ["b"], ["a"], [None], ["b"], [None]], dtype=object)
    first, inverse, counts = unique_rows(encode_features(numeric, categorical))
    assert first.tolist() == [0, 1, 3]
    assert inverse.tolist() == [0, 1, 0, 2, 1, 2]  # NaN of any sign/payload is one value
    assert counts.tolist() == [2, 2, 2]


def test_unique_rows_is_exact_even_when_every_hash_collides(monkeypatch, caplog):
    data, _ = _archive()
    expected = unique_rows(data)
    monkeypatch.setattr(gower_module, "_row_hash",
                        lambda columns, n_rows: np.zeros(n_rows, dtype=np.uint64))
    with caplog.at_level("WARNING"):
        colliding = unique_rows(data)
    assert "hash collision" in caplog.text
    for got, want in zip(colliding, expected):
        np.testing.assert_array_equal(got, want)


def _sparse_medoid_case(seed):
    """Rows and medoids where some features are missing in every medoid or have zero range."""
    rng = np.random.default_rng(seed)
    numeric = rng.normal(size=(300, 6)) * [1, 10, 100, 1, 1, 1]
    numeric[:, 4] = 7.0                          # zero range
    numeric[rng.random(numeric.shape) < 0.3] = np.nan
    categorical = rng.choice(np.array(["x", "y", "z", None], dtype=object), size=(300, 3))
    data = encode_features(numeric, categorical)
    medoids = subset_rows(data, [5, 50, 150, 250])
    medoids.numeric[:, 2] = np.nan               # no medoid has feature 2
    medoids.categorical[:, 1] = -1               # nor categorical feature 1
    return data, medoids


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("weighted", [False, True])
def test_assignment_matches_the_matrix_and_ignores_batching(seed, weighted):
    data, medoids = _sparse_medoid_case(seed)
    ranges = fit_ranges(data)
    weights = np.random.default_rng(seed).uniform(0, 2, 9) if weighted else None
    if weighted:
        weights[0] = 0.0
    labels, distances = gower_to_medoids(data, medoids, ranges=ranges, weights=weights)
    full = gower_matrix(data, medoids, ranges=ranges, weights=weights, dtype=np.float64)
    np.testing.assert_allclose(distances, full.min(axis=1), atol=1e-12, rtol=0)
    np.testing.assert_allclose(full[np.arange(data.n_samples), labels], distances,
                               atol=1e-12, rtol=0)
    # Duplicated and shuffled rows, odd chunks: every row bit-identical to the whole run.
    order = np.random.default_rng(seed).permutation(np.r_[np.arange(data.n_samples), 0, 0, 7])
    for chunk_rows in (1, 13, 100_000):
        other_labels, other_distances = gower_to_medoids(
            subset_rows(data, order), medoids, ranges=ranges, weights=weights,
            chunk_rows=chunk_rows)
        np.testing.assert_array_equal(other_labels, labels[order])
        np.testing.assert_array_equal(other_distances, distances[order])


def test_instance_sample_is_an_unbiased_sample_of_instances():
    counts = np.array([1.0] * 500 + [400.0, 100.0, 1000.0])
    rng = np.random.default_rng(0)
    total = np.zeros(counts.size)
    for _ in range(200):
        chosen, weights = _instance_sample(counts, 300, rng)
        assert weights.sum() == 300 and np.all(weights >= 1)
        assert np.all(weights <= counts[chosen]) and np.all(np.diff(chosen) > 0)
        total[chosen] += weights
    expected = 300 * counts / counts.sum()  # each instance equally likely
    np.testing.assert_allclose(total[-3:] / 200, expected[-3:], rtol=0.05)
    np.testing.assert_allclose(total[:500].sum() / 200, expected[:500].sum(), rtol=0.05)
    everything, weights = _instance_sample(counts, 10_000, rng)
    assert everything.size == counts.size and np.array_equal(weights, counts)


def test_k_chosen_on_a_smaller_sample_then_fitted_on_the_full_one():
    data, truth = _archive()
    model = fit_tag_clusters(data, candidates=(2, 3, 4, 5), k_selection_profiles=24)
    assert model.k == 3
    assert model.n_profiles_for_k < model.n_profiles_clustered == model.n_profiles == 36
    labels, _ = model.assign(data)
    for kind in range(3):
        assert len(set(labels[truth == kind])) == 1
    assert set(model.timings) == {"distance_matrix", "choose_k", "final_fit"}


def test_profile_fit_equals_instance_fit_and_checks_counts():
    data, _ = _archive()
    profiles = distinct_profiles(data)
    direct = fit_profile_clusters(profiles.data, profiles.counts, candidates=(2, 3, 4))
    via_instances = fit_tag_clusters(data, candidates=(2, 3, 4))
    # grouped rows with counts (a SQL GROUP BY), in another order, one profile split in two
    order = np.random.default_rng(0).permutation(profiles.data.n_samples)
    rows = np.r_[order, order[0]]
    counts = np.r_[profiles.counts[order], 0.0]
    counts[0] -= 1.0
    counts[-1] = 1.0
    via_counts = fit_tag_clusters(subset_rows(profiles.data, rows), counts=counts,
                                  candidates=(2, 3, 4))
    assert direct.k == via_instances.k == via_counts.k
    assert direct.silhouettes == via_instances.silhouettes
    np.testing.assert_allclose(list(via_counts.silhouettes.values()),
                               list(direct.silhouettes.values()), atol=1e-12)
    np.testing.assert_array_equal(direct.medoids.categorical, via_instances.medoids.categorical)
    # medoid_rows point at the input rows that carry each medoid's profile
    for model, source in ((direct, profiles.data), (via_instances, data),
                          (via_counts, subset_rows(profiles.data, rows))):
        np.testing.assert_array_equal(subset_rows(source, model.medoid_rows).categorical,
                                      model.medoids.categorical)
        np.testing.assert_array_equal(subset_rows(source, model.medoid_rows).numeric,
                                      model.medoids.numeric)
    # the per-profile report values add up to the chosen K's mean silhouette
    assert np.average(direct.sample_silhouettes, weights=direct.sample_weights) == \
        direct.silhouettes[direct.k]
    assert direct.sample_weights.sum() == data.n_samples
    assert set(direct.sample_labels.tolist()) == set(range(direct.k))
    np.testing.assert_array_equal(direct.ranges.low, fit_ranges(data).low)  # same R_k
    np.testing.assert_array_equal(direct.ranges.high, fit_ranges(data).high)
    with pytest.raises(ValueError, match="positive integers"):
        fit_profile_clusters(profiles.data, profiles.counts * 0.5, candidates=(2,))
    with pytest.raises(ValueError, match="counts must have shape"):
        fit_profile_clusters(profiles.data, profiles.counts[:-1], candidates=(2,))
    with pytest.raises(ValueError, match="positive integers"):
        fit_tag_clusters(data, counts=np.zeros(data.n_samples), candidates=(2,))


# ---------------------------------------------------------------- K bound, outliers


def _copies_of_distinct_profiles(n_profiles: int, copies: int):
    """Profiles that differ from each other in every column, each shared by ``copies``
    instances: the weighted silhouette of a profile alone in its cluster is 1, so without
    a bound the largest candidate K wins."""
    categorical = np.array([[f"a{i}", f"b{i}", f"c{i}"] for i in range(n_profiles)], dtype=object)
    data = encode_features(np.empty((n_profiles, 0)), categorical)
    return data, np.full(n_profiles, float(copies))


def test_k_is_bounded_by_the_number_of_profiles():
    from pipelines.tag_clustering import k_bound

    data, counts = _copies_of_distinct_profiles(40, 10)
    unbounded = fit_tag_clusters(data, counts=counts, candidates=(2, 3, 4, 10, 20, 30),
                                 min_profiles_per_cluster=1)
    assert unbounded.k == 30  # the artefact the bound is for
    model = fit_tag_clusters(data, counts=counts, candidates=(2, 3, 4, 10, 20, 30))
    assert model.k_bound == k_bound(40) == 4
    assert set(model.silhouettes) == {2, 3, 4} and model.k <= 4
    # no candidate within the bound: the smallest that fits, alone
    fallback = fit_tag_clusters(data, counts=counts, candidates=(5, 10, 20))
    assert fallback.k == 5 and set(fallback.silhouettes) == {5}
    assert k_bound(5) == 2 and k_bound(236) == 23 and k_bound(236, 5) == 47
    with pytest.raises(ValueError, match="min_profiles_per_cluster"):
        k_bound(10, 0)


def test_outlier_threshold_is_the_far_out_fence_of_the_non_zero_distances():
    from pipelines.tag_clustering import outlier_threshold

    d = np.array([0.0, 0.0, 0.0, 0.1, 0.2, 0.2, 0.3, 0.9])
    # non-zero: 0.1 0.2 0.2 0.3 0.9, Q1 0.2, Q3 0.3: 0.3 + 3 * 0.1
    assert outlier_threshold(d) == pytest.approx(0.6)
    assert np.flatnonzero(d > outlier_threshold(d)).tolist() == [7]
    # zero-inflated and skewed, as real runs are: most on their medoid, a few far off
    rng = np.random.default_rng(0)
    typical = np.concatenate([np.zeros(300), rng.exponential(0.02, 600)])
    far = np.full(30, 0.5)
    threshold = outlier_threshold(np.concatenate([typical, far]))
    assert np.mean(typical > threshold) < 0.02 and threshold < 0.5
    # robust: far outliers below a quarter of the non-zero distances do not hide themselves
    assert outlier_threshold(np.concatenate([typical, np.full(150, 0.5)])) < 0.5
    assert not np.any(np.full(10, 0.05) > outlier_threshold(np.full(10, 0.05)))
    assert np.isnan(outlier_threshold(np.array([0.0, 0.0, 0.3])))
    assert np.isnan(outlier_threshold(np.array([])))
