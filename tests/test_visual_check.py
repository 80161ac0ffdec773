"""Visual check of tag clusters (method.md A.8)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from pipelines.visual_check import VisualCheckResult, distances_to_cluster_means, visual_check


def test_distances_by_hand():
    embeddings = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # cluster 0 = (1,0), (0,1): mean (1/2, 1/2); cos((1,0), (1/2,1/2)) = (1/2)/(1 * 1/√2)
    #   = 1/√2, so both have distance 1 - 1/√2 = 0.292893
    # cluster 1 = (1,1) alone: it is its own mean, distance 0
    np.testing.assert_allclose(distances_to_cluster_means(embeddings, np.array([0, 0, 1])),
                               [1 - 1 / math.sqrt(2), 1 - 1 / math.sqrt(2), 0.0], atol=1e-12)


def test_distance_to_a_zero_mean_is_one():
    # (1,0) and (-1,0) in one cluster: the mean is 0, the angle undefined -> distance 1
    np.testing.assert_allclose(
        distances_to_cluster_means(np.array([[1.0, 0.0], [-1.0, 0.0]]), np.array(["a", "a"])),
        [1.0, 1.0])


def test_distances_ignore_a_common_scale_and_the_label_values():
    # Each row's norm weighs it in its cluster mean, so only a scale shared by all rows
    # leaves the distances unchanged; cluster ids are names, so 0,1,2 -> 10,20,30 is free.
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(30, 4))
    labels = rng.integers(0, 3, 30)
    np.testing.assert_allclose(distances_to_cluster_means(3.0 * embeddings, labels),
                               distances_to_cluster_means(embeddings, labels), atol=1e-12)
    np.testing.assert_allclose(distances_to_cluster_means(embeddings, 10 * (labels + 1)),
                               distances_to_cluster_means(embeddings, labels), atol=1e-12)


def clustered_embeddings(seed, n_images=2000, n_clusters=15, dim=16, spread=1.0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=3.0, size=(n_clusters, dim))
    labels = rng.integers(0, n_clusters, n_images)
    embeddings = centres[labels] + rng.normal(scale=spread, size=(n_images, dim))
    return embeddings, labels


def test_tag_clusters_that_match_the_images_are_detected():
    embeddings, labels = clustered_embeddings(seed=1)
    result = visual_check(embeddings, labels, n_samples=10, sample_size=200, random_state=7)
    assert result.mean_true < result.mean_permuted
    assert np.all(result.per_sample_true < result.per_sample_permuted)
    assert result.t_statistic > 10
    assert result.p_value < 0.001
    assert result.dof == 9
    assert result.format().endswith("p < 0.001")


def test_random_labels_show_no_difference():
    embeddings, _ = clustered_embeddings(seed=2)
    labels = np.random.default_rng(3).integers(0, 15, embeddings.shape[0])
    result = visual_check(embeddings, labels, n_samples=10, sample_size=200, random_state=4)
    assert result.p_value > 0.05
    assert abs(result.mean_true - result.mean_permuted) < 0.01


def test_random_labels_reject_at_about_the_nominal_rate():
    # Under the null (labels unrelated to images) true and permuted means are exchangeable,
    # so a 5% test should reject about 2 of 40 seeds; 7 or more has probability ~4e-4 under
    # Binomial(40, 0.05).
    embeddings, _ = clustered_embeddings(seed=5, n_images=600, dim=8)
    rejections = 0
    for seed in range(40):
        labels = np.random.default_rng(100 + seed).integers(0, 5, embeddings.shape[0])
        result = visual_check(embeddings, labels, n_samples=10, sample_size=60,
                              random_state=seed)
        rejections += result.p_value < 0.05
    assert rejections <= 6


@pytest.mark.parametrize("seed", [0, 1])
def test_t_test_is_scipys_paired_test_on_the_returned_means(seed):
    embeddings, labels = clustered_embeddings(seed=seed, spread=4.0)
    result = visual_check(embeddings, labels, n_samples=5, sample_size=300, random_state=seed)
    reference = stats.ttest_rel(result.per_sample_permuted, result.per_sample_true)
    assert result.t_statistic == pytest.approx(reference.statistic, rel=1e-12)
    assert result.p_value == pytest.approx(reference.pvalue, rel=1e-12)
    assert result.dof == reference.df == 4
    assert result.mean_true == pytest.approx(result.per_sample_true.mean())
    assert result.std_permuted == pytest.approx(np.std(result.per_sample_permuted, ddof=1))


def test_per_sample_means_are_recomputable_from_the_samples():
    embeddings, labels = clustered_embeddings(seed=3)
    result = visual_check(embeddings, labels, n_samples=3, sample_size=100, random_state=0)
    for rows, expected in zip(result.sample_indices, result.per_sample_true):
        assert distances_to_cluster_means(embeddings[rows], labels[rows]).mean() == \
            pytest.approx(expected, abs=1e-12)


def test_samples_are_disjoint_and_seeded():
    embeddings, labels = clustered_embeddings(seed=4, n_images=1000)
    first = visual_check(embeddings, labels, n_samples=4, sample_size=250, random_state=11)
    again = visual_check(embeddings, labels, n_samples=4, sample_size=250, random_state=11)
    other = visual_check(embeddings, labels, n_samples=4, sample_size=250, random_state=12)
    assert first.sample_indices.shape == (4, 250)
    assert np.unique(first.sample_indices).size == 1000   # every image used once
    np.testing.assert_array_equal(first.sample_indices, again.sample_indices)
    np.testing.assert_array_equal(first.per_sample_permuted, again.per_sample_permuted)
    assert not np.array_equal(first.sample_indices, other.sample_indices)


@pytest.mark.parametrize("p_value, tail", [(1e-7, "p < 0.001"), (0.25, "p = 0.250")])
def test_format_is_the_papers_line(p_value, tail):
    result = VisualCheckResult(
        per_sample_true=np.full(10, 0.28), per_sample_permuted=np.full(10, 0.42),
        t_statistic=16.42, dof=9, p_value=p_value, sample_indices=np.zeros((10, 1), int))
    assert result.format() == f"0.28 vs 0.42, t(9) = 16.42, {tail}"


@pytest.mark.parametrize("change, match", [
    ({"n_samples": 3, "sample_size": 50}, "need 150 images, only 100"),
    ({"n_samples": 1}, "n_samples must be an integer >= 2"),
    ({"sample_size": 1}, "sample_size must be an integer >= 2"),
    ({"sample_size": 2.5}, "sample_size must be an integer"),
    ({"labels": np.zeros(99, int)}, r"cluster_labels must have shape \(100,\)"),
    ({"labels": np.zeros(100, int)}, "single cluster"),
    ({"embeddings": np.zeros(100)}, r"shape \(n, d\)"),
    ({"zero_row": True}, "1 embedding"),
    ({"nan": True}, "NaN"),
])
def test_bad_input_is_rejected_clearly(change, match):
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(100, 3))
    if change.get("zero_row"):
        embeddings[5] = 0.0
    if change.get("nan"):
        embeddings[5, 1] = np.nan
    embeddings = change.get("embeddings", embeddings)
    labels = change.get("labels", rng.integers(0, 3, 100))
    kwargs = {"n_samples": change.get("n_samples", 2),
              "sample_size": change.get("sample_size", 10)}
    with pytest.raises(ValueError, match=match):
        visual_check(embeddings, labels, random_state=0, **kwargs)
