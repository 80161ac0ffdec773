"""Stable labels: a new run's clusters inherit the labels of the previous run's clusters
they share the most instances with (Hungarian matching on the overlap table)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pipelines.label_matching import match_labels


def _best_total_by_brute_force(overlap: np.ndarray) -> int:
    n_new, n_previous = overlap.shape
    best = 0
    for columns in itertools.permutations(range(n_previous), min(n_new, n_previous)):
        for rows in itertools.permutations(range(n_new), len(columns)):
            best = max(best, int(sum(overlap[r, c] for r, c in zip(rows, columns))))
    return best


def test_a_permuted_clustering_gets_the_previous_labels_back():
    rng = np.random.default_rng(3)
    previous = rng.integers(0, 5, size=400)
    previous_labels = np.array([7, 2, 11, 0, 4])  # label of previous cluster j
    permutation = np.array([3, 0, 4, 1, 2])  # new cluster i = previous cluster permutation[i]
    new = np.argsort(permutation)[previous]
    overlap = np.zeros((5, 5), dtype=int)
    np.add.at(overlap, (new, previous), 1)

    labels = match_labels(overlap, previous_labels)

    assert labels.tolist() == previous_labels[permutation].tolist()


def test_the_matching_maximises_the_shared_instances():
    rng = np.random.default_rng(0)
    for _ in range(20):
        overlap = rng.integers(1, 50, size=(4, 4))
        previous_labels = np.arange(4) * 10
        labels = match_labels(overlap, previous_labels)
        column_of = {label: j for j, label in enumerate(previous_labels)}
        total = sum(overlap[i, column_of[label]] for i, label in enumerate(labels))
        assert total == _best_total_by_brute_force(overlap)


def test_greedy_choice_is_not_what_happens():
    # Greedy would give new 0 -> old 0 (9) and leave new 1 with old 1 (1): total 10.
    # The optimum pairs new 0 -> old 1 and new 1 -> old 0: 8 + 8 = 16.
    overlap = np.array([[9, 8], [8, 1]])
    assert match_labels(overlap, np.array([100, 200])).tolist() == [200, 100]


def test_more_new_clusters_than_old_get_fresh_labels_by_size():
    overlap = np.array([[0, 0], [30, 0], [0, 0], [0, 25]])
    labels = match_labels(overlap, np.array([5, 9]), sizes=np.array([3, 30, 40, 25]))
    assert labels[1] == 5 and labels[3] == 9
    # unmatched: cluster 2 (40 instances) before cluster 0 (3), above every reserved label
    assert labels[2] == 10 and labels[0] == 11


def test_retired_labels_are_not_reused():
    overlap = np.array([[10, 0], [0, 0]])
    labels = match_labels(overlap, np.array([0, 1]), reserved_labels=np.array([0, 1, 2, 3]),
                          sizes=np.array([10, 5]))
    assert labels.tolist() == [0, 4]


def test_a_pair_without_shared_instances_does_not_pass_the_label_on():
    overlap = np.array([[12, 0], [0, 0]])  # new 1 would be paired with old 1 with no overlap
    labels = match_labels(overlap, np.array([3, 8]), sizes=np.array([12, 6]))
    assert labels.tolist() == [3, 9]


def test_first_run_labels_by_decreasing_size():
    labels = match_labels(np.zeros((3, 0), dtype=int), np.array([], dtype=int),
                          sizes=np.array([5, 50, 20]))
    assert labels.tolist() == [2, 0, 1]


def test_invalid_input_is_refused():
    with pytest.raises(ValueError, match="distinct"):
        match_labels(np.ones((2, 2)), np.array([1, 1]))
    with pytest.raises(ValueError, match="previous labels"):
        match_labels(np.ones((2, 2)), np.array([1]))
