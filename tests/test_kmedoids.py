"""K-medoids (method.md A.5): oracle = textbook PAM written out below (and `kmedoids`
when installed)."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.kmedoids import (
    ConvergenceWarning, KMedoids, build_init, fasterpam_swap, medoid_loss, pam_swap,
)


def textbook_pam(distances, n_clusters, weights=None):
    """Kaufman & Rousseeuw PAM: greedy BUILD, then best swap until none improves."""
    n = len(distances)
    weights = [1.0] * n if weights is None else list(weights)

    def loss(medoids):
        return sum(weights[o] * min(distances[o][m] for m in medoids) for o in range(n))

    medoids = [min(range(n), key=lambda c: sum(weights[o] * distances[o][c] for o in range(n)))]
    while len(medoids) < n_clusters:
        rest = [c for c in range(n) if c not in medoids]
        medoids.append(min(rest, key=lambda c: loss(medoids + [c])))
    current = loss(medoids)
    while True:
        best = (current, None)
        for position in range(n_clusters):
            for candidate in range(n):
                if candidate in medoids:
                    continue
                trial = medoids[:position] + [candidate] + medoids[position + 1:]
                trial_loss = loss(trial)
                if trial_loss < best[0] - 1e-12:
                    best = (trial_loss, trial)
        if best[1] is None:
            return medoids, current
        current, medoids = best


def random_distances(seed, n_rows=40, n_dims=3):
    rng = np.random.default_rng(seed)
    points = rng.normal(size=(n_rows, n_dims))
    return np.sqrt(((points[:, None] - points[None]) ** 2).sum(-1))


def separated_distances(seed, n_groups=4, per_group=10):
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=100.0, size=(n_groups, 2))
    points = np.repeat(centres, per_group, axis=0) + rng.normal(size=(n_groups * per_group, 2))
    return np.sqrt(((points[:, None] - points[None]) ** 2).sum(-1)), np.repeat(
        np.arange(n_groups), per_group)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("n_clusters", [1, 2, 3, 5])
@pytest.mark.parametrize("method", ["fasterpam", "pam"])
def test_loss_within_one_percent_of_textbook_pam(seed, n_clusters, method):
    distances = random_distances(seed)
    _, reference_loss = textbook_pam(distances.tolist(), n_clusters)
    model = KMedoids(n_clusters, method=method).fit(distances)
    assert model.inertia_ <= reference_loss * 1.01 + 1e-12
    assert model.inertia_ == pytest.approx(medoid_loss(distances, model.medoid_indices_))


@pytest.mark.parametrize("seed", [0, 1])
def test_our_pam_equals_textbook_pam(seed):
    distances = random_distances(seed, n_rows=30)
    reference_medoids, reference_loss = textbook_pam(distances.tolist(), 3)
    model = KMedoids(3, method="pam").fit(distances)
    assert model.inertia_ == pytest.approx(reference_loss, rel=1e-12)
    assert sorted(model.medoid_indices_.tolist()) == sorted(reference_medoids)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("method", ["fasterpam", "pam"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_separated_groups_found_exactly(seed, method, dtype):
    distances, groups = separated_distances(seed)
    _, reference_loss = textbook_pam(distances.tolist(), 4)
    model = KMedoids(4, method=method).fit(distances.astype(dtype))
    assert model.inertia_ == pytest.approx(reference_loss, rel=1e-6)
    # Same partition up to label names.
    pairs = set(zip(groups.tolist(), model.labels_.tolist()))
    assert len(pairs) == 4


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("method", ["fasterpam", "pam"])
def test_weights_equal_duplicated_rows(seed, method):
    rng = np.random.default_rng(seed)
    distances = random_distances(seed, n_rows=25)
    counts = rng.integers(1, 4, size=25)
    expanded_index = np.repeat(np.arange(25), counts)
    expanded = distances[np.ix_(expanded_index, expanded_index)]
    weighted = KMedoids(3, method=method).fit(distances, sample_weight=counts)
    _, reference_loss = textbook_pam(distances.tolist(), 3, counts.tolist())
    assert weighted.inertia_ <= reference_loss * 1.01 + 1e-12
    duplicated = KMedoids(3, method=method).fit(expanded)
    assert weighted.inertia_ == pytest.approx(duplicated.inertia_, rel=1e-9)
    first_copy = np.cumsum(counts) - counts  # expanded position of each original row
    assert weighted.inertia_ == pytest.approx(
        medoid_loss(expanded, first_copy[weighted.medoid_indices_]), rel=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n_clusters", [2, 5, 9])
def test_fasterpam_matches_kmedoids_package(seed, n_clusters):
    kmedoids = pytest.importorskip("kmedoids")
    distances = random_distances(seed, n_rows=80)
    initial = build_init(distances, n_clusters)
    ours, _, _ = fasterpam_swap(distances, initial)
    theirs = kmedoids.fasterpam(distances, initial.copy(), n_cpu=1)
    assert medoid_loss(distances, ours) == pytest.approx(float(theirs.loss), rel=1e-9)
    backend = KMedoids(n_clusters, backend="kmedoids").fit(distances)
    assert backend.inertia_ == pytest.approx(float(theirs.loss), rel=1e-9)


def test_build_matches_kmedoids_package_build():
    kmedoids = pytest.importorskip("kmedoids")
    distances = random_distances(7, n_rows=60)
    ours = build_init(distances, 6)
    theirs = kmedoids.pam(distances, 6, init="build", max_iter=0)
    assert sorted(ours.tolist()) == sorted(np.asarray(theirs.medoids).tolist())


def test_six_points_by_hand():
    points = np.array([0.0, 0.1, 0.2, 5.0, 5.1, 5.2])
    distances = np.abs(points[:, None] - points[None, :])
    model = KMedoids(2, method="pam").fit(distances)
    assert model.medoid_indices_.tolist() == [1, 4]
    assert model.labels_.tolist() == [0, 0, 0, 1, 1, 1]
    assert model.inertia_ == pytest.approx(0.4)
    new = np.abs(np.array([[4.0], [0.05]]) - points[None, :])
    assert model.predict(new).tolist() == [1, 0]
    assert model.fit_predict(distances).tolist() == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("seed", [0, 1])
def test_random_init_is_seeded_and_reaches_local_optimum(seed):
    distances = random_distances(seed, n_rows=50)
    first = KMedoids(4, init="random", random_state=seed).fit(distances)
    second = KMedoids(4, init="random", random_state=seed).fit(distances)
    assert first.medoid_indices_.tolist() == second.medoid_indices_.tolist()
    # Local optimum: PAM SWAP started from it finds no improving swap.
    _, _, n_swaps = pam_swap(distances, first.medoid_indices_)
    assert n_swaps == 0


def test_k_equals_n_puts_every_point_alone():
    distances = random_distances(0, n_rows=5)
    model = KMedoids(5).fit(distances)
    assert sorted(model.medoid_indices_.tolist()) == [0, 1, 2, 3, 4]
    assert model.inertia_ == 0.0


def test_max_iter_warns():
    distances = random_distances(0, n_rows=60)
    with pytest.warns(ConvergenceWarning, match="max_iter=1"):
        KMedoids(5, method="pam", max_iter=1).fit(distances)


def test_hyper_parameters_are_not_changed_by_fit():
    model = KMedoids(3, max_iter=7, random_state=1)
    model.fit(random_distances(0, n_rows=20))
    assert (model.n_clusters, model.max_iter, model.random_state) == (3, 7, 1)
    assert model.n_iter_ >= 1


@pytest.mark.parametrize(
    "model, distances, kwargs, error, message",
    [
        (KMedoids(0), np.zeros((3, 3)), {}, ValueError, "n_clusters must be a positive"),
        (KMedoids(4), np.zeros((3, 3)), {}, ValueError, "larger than the 3 samples"),
        (KMedoids(2, method="clara"), np.zeros((3, 3)), {}, ValueError, "method must be"),
        (KMedoids(2, init="kpp"), np.zeros((3, 3)), {}, ValueError, "init must be"),
        (KMedoids(2), np.zeros((3, 2)), {}, ValueError, "square"),
        (KMedoids(2), np.zeros((3, 3)), {"sample_weight": np.ones(2)}, ValueError,
         "sample_weight must have shape"),
        (KMedoids(2), np.zeros((3, 3)), {"sample_weight": -np.ones(3)}, ValueError,
         "non-negative"),
        (KMedoids(2, method="pam", backend="kmedoids"), np.zeros((3, 3)), {}, ValueError,
         "only method='fasterpam'"),
    ],
)
def test_errors(model, distances, kwargs, error, message):
    with pytest.raises(error, match=message):
        model.fit(distances, **kwargs)


def test_predict_before_fit():
    with pytest.raises(RuntimeError, match="not fitted"):
        KMedoids(2).predict(np.zeros((1, 3)))
