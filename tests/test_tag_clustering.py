"""Clustering distinct tag profiles and assigning every instance (method.md A.5-A.7)."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.gower import encode_features, subset_rows
from pipelines.tag_clustering import distinct_profiles, fit_tag_clusters


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
    model = fit_tag_clusters(data, candidates=(2, 3, 4, 5, 6), max_profiles=max_profiles)
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
