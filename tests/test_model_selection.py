"""Silhouette and choice of K (method.md A.6)."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.model_selection import choose_k, silhouette_samples, silhouette_score


def formula_silhouette(distances, labels):
    """Rousseeuw's silhouette written out; s = 0 for a point alone in its cluster."""
    values = []
    for i, own in enumerate(labels):
        mates = [j for j, label in enumerate(labels) if label == own and j != i]
        if not mates:
            values.append(0.0)
            continue
        a = sum(distances[i][j] for j in mates) / len(mates)
        b = min(
            sum(distances[i][j] for j, label in enumerate(labels) if label == other)
            / sum(1 for label in labels if label == other)
            for other in set(labels) - {own})
        values.append(0.0 if max(a, b) == 0 else (b - a) / max(a, b))
    return np.array(values)


def random_case(seed, n_rows=40, n_labels=4):
    rng = np.random.default_rng(seed)
    points = rng.normal(size=(n_rows, 2))
    distances = np.sqrt(((points[:, None] - points[None]) ** 2).sum(-1))
    labels = rng.integers(0, n_labels, size=n_rows)
    labels[:n_labels] = np.arange(n_labels)
    labels[n_labels] = n_labels + 7  # a singleton cluster with a non-contiguous label
    return distances, labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_samples_match_formula(seed):
    distances, labels = random_case(seed)
    np.testing.assert_allclose(
        silhouette_samples(distances, labels), formula_silhouette(distances.tolist(),
                                                                  labels.tolist()),
        atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_scikit_learn(seed):
    metrics = pytest.importorskip("sklearn.metrics")
    distances, labels = random_case(seed, n_rows=60)
    np.testing.assert_allclose(
        silhouette_samples(distances, labels, block_rows=7),
        metrics.silhouette_samples(distances, labels, metric="precomputed"), atol=1e-12)
    assert silhouette_score(distances, labels) == pytest.approx(
        metrics.silhouette_score(distances, labels, metric="precomputed"), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_weighted_equals_duplicated_rows(seed):
    distances, labels = random_case(seed, n_rows=30)
    counts = np.random.default_rng(seed).integers(1, 4, size=30)
    counts[4] = 1  # the singleton stays alone
    expanded = np.repeat(np.arange(30), counts)
    weighted = silhouette_samples(distances, labels, sample_weight=counts)
    duplicated = silhouette_samples(distances[np.ix_(expanded, expanded)], labels[expanded])
    np.testing.assert_allclose(weighted[expanded], duplicated, atol=1e-12)
    assert silhouette_score(distances, labels, sample_weight=counts) == pytest.approx(
        duplicated.mean(), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_choose_k_finds_separated_groups(seed):
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=50.0, size=(5, 2))
    points = np.repeat(centres, 12, axis=0) + rng.normal(size=(60, 2))
    distances = np.sqrt(((points[:, None] - points[None]) ** 2).sum(-1))
    best_k, table = choose_k(distances, candidates=(2, 5, 10, 20, 100), random_state=seed)
    assert best_k == 5
    assert list(table) == [2, 5, 10, 20]  # 100 >= n is skipped
    assert table[5] == max(table.values())


def test_choose_k_with_weights_uses_weighted_silhouette():
    distances, _ = random_case(3, n_rows=30)
    counts = np.arange(1, 31)
    _, table = choose_k(distances, candidates=(3,), sample_weight=counts)
    from pipelines.kmedoids import KMedoids
    labels = KMedoids(3).fit(distances, sample_weight=counts).labels_
    assert table[3] == pytest.approx(
        silhouette_score(distances, labels, sample_weight=counts), abs=1e-12)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda d: choose_k(d, candidates=(1, 10, 50)), "no usable K"),
        (lambda d: silhouette_samples(d, np.zeros(10, dtype=int)), "2 <= number of labels"),
        (lambda d: silhouette_samples(d, np.zeros(3, dtype=int)), "labels must have shape"),
        (lambda d: silhouette_samples(d[:, :5], np.zeros(10, dtype=int)), "square"),
    ],
)
def test_errors(call, message):
    distances = np.ones((10, 10)) - np.eye(10)
    with pytest.raises(ValueError, match=message):
        call(distances)
