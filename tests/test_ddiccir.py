"""DDicCIR pipeline (method.md B.2-B.7). Oracles: a hand loop for the patches, ``conv2d`` for
their layout, scikit-learn's KMeans for k-means, ``sparse_encode`` on hand-made patches for
the B.4 vectors and B.7 errors, brute-force ranking, and planted groups in small synthetic
feature maps (16 channels, 7 x 7) for the fitted pipeline."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from pipelines.ddiccir import (
    DDicCIRModel, MODEL_FORMAT, PipelineConfig, _layer2_atom_allocation, _learn_layer1,
    encode_queries, fit_pipeline, kmeans, kmeans_plus_plus, lloyd, match_clusters,
    neighbourhood_patches, normalise_rows, place_in_blocks, pool_codes, rank_by_code,
    relative_centroid_movement,
)
from pipelines.sparse_coding import sparse_encode

N_GROUPS = 4
PER_GROUP = 25
CHANNELS = 16

# Small version of Table 9: 4 clusters, 16 layer-1 atoms (144-value patches), 32 layer-2 atoms
# (8 per cluster block), sparsity 4.
SMALL_SIZES = dict(n_clusters=N_GROUPS, layer1_atoms=16, layer2_atoms=32, sparsity=4,
                   patches_per_cluster=600, ksvd_max_iter=8, kmeans_n_init=2, seed=0)
SMALL = PipelineConfig(**SMALL_SIZES, max_outer_iter=3, centroid_tol=0.0,
                       movement_space="codes", stop_label_change=None)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def planted_maps(seed, per_group=PER_GROUP, image_seed=None, noise=0.05):
    """Feature maps with N_GROUPS planted groups: each group has 3 motifs (4 of the 16 channels
    each) at its own 3 spatial positions, as Gaussian blobs jittered by up to 1 pixel with
    random amplitudes, plus noise; non-negative like post-ReLU maps. ``image_seed`` draws new
    images of the same groups (held-out queries)."""
    generator = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(7), torch.arange(7), indexing="ij")
    motifs = torch.zeros(N_GROUPS, 3, CHANNELS)
    centres = torch.randint(1, 6, (N_GROUPS, 3, 2), generator=generator)
    for group in range(N_GROUPS):
        for motif in range(3):
            channels = torch.randperm(CHANNELS, generator=generator)[:4]
            motifs[group, motif, channels] = 1 + torch.rand(4, generator=generator)
    if image_seed is not None:
        generator = torch.Generator().manual_seed(image_seed)
    maps, groups = [], []
    for group in range(N_GROUPS):
        for _ in range(per_group):
            image = torch.zeros(CHANNELS, 7, 7)
            for motif in range(3):
                row, column = (centres[group, motif]
                               + torch.randint(-1, 2, (2,), generator=generator)).tolist()
                blob = torch.exp(-((ys - row) ** 2 + (xs - column) ** 2) / 2.0)
                amplitude = 0.5 + torch.rand(1, generator=generator)
                image += amplitude * motifs[group, motif][:, None, None] * blob
            image += noise * torch.randn(CHANNELS, 7, 7, generator=generator)
            maps.append(image.clamp_min(0))
            groups.append(group)
    maps = torch.stack(maps)
    return maps, maps.mean(dim=(2, 3)), torch.tensor(groups)


def purity(labels, groups):
    """method.md "Retrieval metrics": (1/N) sum over clusters of the largest true class."""
    total = 0
    for cluster in labels.unique():
        total += int(torch.bincount(groups[labels == cluster]).max())
    return total / len(groups)


def hand_patches(maps, kernel_size, padding, stride):
    """The documented patch layout, one value at a time."""
    n_maps, channels, height, width = maps.shape
    rows = (height + 2 * padding - kernel_size) // stride + 1
    columns = (width + 2 * padding - kernel_size) // stride + 1
    out = torch.zeros(n_maps, rows * columns, channels * kernel_size ** 2, dtype=maps.dtype)
    for image in range(n_maps):
        for y in range(rows):
            for x in range(columns):
                for channel in range(channels):
                    for dy in range(kernel_size):
                        for dx in range(kernel_size):
                            source_y = y * stride - padding + dy
                            source_x = x * stride - padding + dx
                            if 0 <= source_y < height and 0 <= source_x < width:
                                out[image, y * columns + x,
                                    channel * kernel_size ** 2 + dy * kernel_size + dx] = (
                                        maps[image, channel, source_y, source_x])
    return out


# --------------------------------------------------------------------------------------------
# Patches, pooling, blocks
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kernel_size, padding, stride", [
    (3, 1, 1),   # Table 9
    (3, 0, 1),   # no padding: border positions dropped
    (3, 1, 2),   # strided
    (1, 0, 1),   # 1 x 1: the patch is the channel vector
])
def test_patches_match_a_hand_loop(kernel_size, padding, stride):
    maps = torch.randn(2, 3, 5, 6, generator=torch.Generator().manual_seed(0),
                       dtype=torch.float64)
    ours = neighbourhood_patches(maps, kernel_size=kernel_size, padding=padding, stride=stride)
    assert torch.equal(ours, hand_patches(maps, kernel_size, padding, stride))


def test_table9_patch_shape_and_conv2d_layout():
    maps = torch.randn(2, 8, 7, 7, generator=torch.Generator().manual_seed(1),
                       dtype=torch.float64)
    patches = neighbourhood_patches(maps)
    assert patches.shape == (2, 49, 9 * 8)
    atoms = torch.randn(9 * 8, 5, generator=torch.Generator().manual_seed(2),
                        dtype=torch.float64)
    # Atom . patch == conv2d with the atom as a (C, 3, 3) kernel: the convolutional dictionary.
    by_conv = F.conv2d(maps, atoms.T.reshape(5, 8, 3, 3), padding=1)      # (2, 5, 7, 7)
    assert torch.allclose((patches @ atoms).transpose(1, 2), by_conv.flatten(2), atol=1e-12)


def test_pooling_and_blocks():
    codes = torch.tensor([[[0.0, -3.0, 1.0], [2.0, 0.0, 0.0]],
                          [[0.5, 0.5, -0.5], [0.0, 0.0, 0.0]]])          # (B=2, K=2, L=3)
    assert torch.equal(pool_codes(codes, "max"), torch.tensor([[3.0, 2.0], [0.5, 0.0]]))
    assert torch.allclose(pool_codes(codes, "average"),
                          torch.tensor([[4 / 3, 2 / 3], [0.5, 0.0]]))
    blocks = place_in_blocks(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([2, 0]), 3)
    assert torch.equal(blocks, torch.tensor([[0.0, 0, 0, 0, 1, 2], [3, 4, 0, 0, 0, 0]]))
    with pytest.raises(ValueError, match="pooling"):
        pool_codes(codes, "median")


# --------------------------------------------------------------------------------------------
# k-means
# --------------------------------------------------------------------------------------------

def blobs(seed, n_clusters=5, per_cluster=60, dimension=8, spread=0.6):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, dimension)) * 3
    points = np.repeat(centres, per_cluster, axis=0) + spread * rng.normal(
        size=(n_clusters * per_cluster, dimension))
    truth = np.repeat(np.arange(n_clusters), per_cluster)
    order = rng.permutation(len(points))
    return points[order], truth[order]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("normalise", [False, True])
def test_lloyd_matches_sklearn_from_the_same_start(seed, normalise):
    points, _ = blobs(seed, spread=2.0)      # overlapping: several iterations are needed
    tensor = torch.from_numpy(points)
    if normalise:
        tensor = normalise_rows(tensor)
    start = tensor[kmeans_plus_plus(tensor, 5, generator=torch.Generator().manual_seed(seed))]
    ours = lloyd(tensor, start, max_iter=300, tol=1e-4)
    reference = KMeans(5, init=start.numpy(), n_init=1, max_iter=300, tol=1e-4,
                       algorithm="lloyd").fit(tensor.numpy())
    assert ours.n_iter > 1
    assert np.array_equal(ours.labels.numpy(), reference.labels_)
    assert np.allclose(ours.centroids.numpy(), reference.cluster_centers_, atol=1e-10)
    assert math.isclose(ours.inertia, reference.inertia_, rel_tol=1e-9)


def test_kmeans_finds_planted_blobs_and_matches_sklearn_inertia():
    points, truth = blobs(3)
    tensor = torch.from_numpy(points)
    ours = kmeans(tensor, 5, generator=torch.Generator().manual_seed(0), n_init=4)
    reference = KMeans(5, n_init=10, random_state=0).fit(points)
    assert adjusted_rand_score(truth, ours.labels.numpy()) == 1.0
    assert ours.inertia <= reference.inertia_ * (1 + 1e-9)


def test_kmeans_plus_plus_is_seeded_and_spreads_the_centres():
    points, truth = blobs(4)
    tensor = torch.from_numpy(points)
    first = kmeans_plus_plus(tensor, 5, generator=torch.Generator().manual_seed(7))
    again = kmeans_plus_plus(tensor, 5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first, again)
    # On well separated blobs k-means++ (with local trials) picks one seed per blob.
    assert sorted(truth[first.numpy()].tolist()) == [0, 1, 2, 3, 4]


def test_empty_cluster_is_relocated_like_sklearn():
    points, _ = blobs(5, n_clusters=3)
    tensor = torch.from_numpy(points)
    start = torch.stack([tensor[0], tensor[0], tensor[1]])    # a duplicate centre: one is empty
    ours = lloyd(tensor, start)
    reference = KMeans(3, init=start.numpy(), n_init=1, algorithm="lloyd").fit(points)
    assert torch.bincount(ours.labels, minlength=3).min() > 0
    assert np.array_equal(ours.labels.numpy(), reference.labels_)


def test_initial_centroids_are_kept_when_still_best():
    points, _ = blobs(6)
    tensor = torch.from_numpy(points)
    first = kmeans(tensor, 5, generator=torch.Generator().manual_seed(0))
    # Warm start from the converged centroids: same clustering, same numbering.
    warm = kmeans(tensor, 5, generator=torch.Generator().manual_seed(99), n_init=3,
                  initial_centroids=first.centroids)
    assert torch.equal(warm.labels, first.labels)


def test_match_clusters_undoes_a_permutation_with_noise():
    generator = torch.Generator().manual_seed(0)
    reference = torch.randint(6, (300,), generator=generator)
    permutation = torch.tensor([3, 5, 0, 1, 4, 2])
    relabelled = permutation[reference]
    relabelled[:20] = torch.randint(6, (20,), generator=generator)    # some points move
    mapping = match_clusters(relabelled, reference, 6)
    assert torch.equal(mapping[permutation], torch.arange(6))
    assert float((mapping[relabelled] == reference).double().mean()) >= 0.93


def test_relative_centroid_movement():
    previous = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    assert relative_centroid_movement(previous, previous) == 0.0
    assert math.isclose(relative_centroid_movement(previous + torch.tensor([[0.0, 1.0],
                                                                            [0.0, 0.0]]),
                                                   previous), 1 / 5)


# --------------------------------------------------------------------------------------------
# The fitted pipeline on planted groups
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def planted():
    return planted_maps(0)


@pytest.fixture(scope="module")
def fitted(planted):
    maps, pooled, _ = planted
    records = []
    model = fit_pipeline(maps, pooled, SMALL, progress=records.append)
    return model, records


@pytest.fixture(scope="module")
def fitted_two_passes(planted):
    maps, pooled, _ = planted
    return fit_pipeline(maps, pooled, dataclasses.replace(SMALL, max_outer_iter=2))


def test_clusters_recover_the_planted_groups(planted, fitted):
    _, _, groups = planted
    model, _ = fitted
    assert model.labels.shape == groups.shape
    assert purity(model.labels, groups) >= 0.95
    assert model.codes.shape == (len(groups), SMALL.layer2_atoms)
    assert int((model.codes != 0).sum(dim=1).max()) <= SMALL.sparsity


def test_history_records_every_pass(fitted):
    model, records = fitted
    assert list(model.history) == records                 # progress saw every pass
    assert [record.iteration for record in records] == [1, 2, 3]
    assert model.stop_reason == "max_outer_iter" and not model.converged   # tol 0: never
    first, *later = records
    assert first.layer1_change == (None,) * N_GROUPS and first.layer2_change is None
    assert first.centroid_movement is None                # no code-space centroids yet
    for record in records:
        assert sum(record.cluster_sizes) == N_GROUPS * PER_GROUP
        assert all(0 < error < 1 for error in record.layer1_error)
        assert all(0 < error < 1 for error in record.layer1_training_error)
        assert 0 < record.layer2_error < 1
        assert all(coherence <= SMALL.coherence_threshold + 1e-6
                   for coherence in record.layer1_coherence)
        assert set(record.seconds) == {"layer1", "aggregation", "layer2", "kmeans"}
        # Planted groups are stable; the B.6 clusters are renumbered to match (Hungarian), so
        # almost no image changes its number. Unmatched, k-means' arbitrary numbering shows.
        assert record.label_change is not None and record.label_change <= 0.05
        assert record.feature_centroid_movement is not None
    for record in later:
        assert all(change is not None and change > 0 for change in record.layer1_change)
        assert record.layer2_change > 0 and record.centroid_movement > 0


def test_dictionary_change_norms_are_the_frobenius_distances(fitted, fitted_two_passes):
    """Same seed: the 2-pass fit is the 3-pass fit stopped early, so its dictionaries are
    those the third pass started from."""
    model, _ = fitted
    for cluster in range(N_GROUPS):
        expected = torch.linalg.matrix_norm(model.layer1[cluster]
                                            - fitted_two_passes.layer1[cluster])
        assert math.isclose(model.history[2].layer1_change[cluster], float(expected),
                            rel_tol=1e-5)
    expected = torch.linalg.matrix_norm(model.layer2 - fitted_two_passes.layer2)
    assert math.isclose(model.history[2].layer2_change, float(expected), rel_tol=1e-5)


def test_loop_stops_on_the_tolerance(planted):
    maps, pooled, _ = planted
    # Feature-space movement is 0 once no image changes cluster (planted data: at once).
    config = dataclasses.replace(SMALL, movement_space="features", centroid_tol=1e-4,
                                 max_outer_iter=5)
    model = fit_pipeline(maps, pooled, config)
    assert model.converged and model.stop_reason == "centroid_tol"
    movements = [record.feature_centroid_movement for record in model.history]
    assert movements[-1] < 1e-4 and all(movement >= 1e-4 for movement in movements[:-1])
    assert len(model.history) < 5


def test_default_stopping_rule_fires(planted):
    """With the default stopping rule the loop ends once the clusters settle, well before
    max_outer_iter (the literal code-space rule never fired: its space moves every pass)."""
    maps, pooled, _ = planted
    model = fit_pipeline(maps, pooled, PipelineConfig(**SMALL_SIZES, max_outer_iter=6))
    assert model.converged and model.stop_reason in ("centroid_tol", "label_change")
    assert len(model.history) < 6
    assert model.history[-1].label_change <= 0.01


def test_codes_space_tolerance_needs_two_passes(planted):
    maps, pooled, _ = planted
    config = dataclasses.replace(SMALL, centroid_tol=10.0, max_outer_iter=5)  # any movement
    model = fit_pipeline(maps, pooled, config)
    assert model.stop_reason == "centroid_tol" and len(model.history) == 2


def test_encoding_training_images_gives_back_their_clusters_and_codes(planted, fitted):
    """Not exact by construction: training clusters come from k-means on the codes (B.6), a
    query's from the lowest reconstruction error (B.7); they agree for almost every image.
    Where they agree the code is the same computation on the same numbers."""
    maps, _, _ = planted
    model, _ = fitted
    clusters, codes, errors = encode_queries(model, maps, batch_size=7)
    agree = clusters == model.labels
    assert float(agree.double().mean()) >= 0.95
    assert torch.allclose(codes[agree], model.codes[agree], rtol=1e-4, atol=1e-5)
    assert errors.shape == (len(maps), N_GROUPS)
    assert torch.equal(clusters, errors.argmin(dim=1))


def test_query_errors_match_sparse_encode_on_hand_patches(planted, fitted):
    maps, _, _ = planted
    model, _ = fitted
    images = [0, 30, 61, 99]
    _, _, errors = encode_queries(model, maps[images])
    for row, image in enumerate(images):
        patches = hand_patches(maps[image:image + 1], 3, 1, 1)[0]           # (49, 144)
        for cluster in range(N_GROUPS):
            dictionary = model.layer1[cluster]
            codes = sparse_encode(patches.T.contiguous(), dictionary, SMALL.sparsity)
            expected = torch.linalg.matrix_norm(patches.T - dictionary @ codes) / (
                torch.linalg.matrix_norm(patches))
            assert math.isclose(float(errors[row, cluster]), float(expected), rel_tol=1e-3)


def test_ranking_puts_the_same_group_first(planted, fitted):
    _, _, groups = planted
    model, _ = fitted
    query_maps, _, query_groups = planted_maps(0, per_group=8, image_seed=123)
    clusters, codes, _ = encode_queries(model, query_maps)
    indices, scores = rank_by_code(codes, clusters, model.codes, model.labels, 10)
    assert indices.shape == scores.shape == (len(query_maps), 10)
    precision = float((groups[indices] == query_groups[:, None]).double().mean())
    assert precision >= 0.95
    assert bool((scores[:, :-1] >= scores[:, 1:] - 1e-6).all())   # one cluster: by score


# --------------------------------------------------------------------------------------------
# Ablations
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_pass_models(planted):
    """Without layer 2 and without re-iteration, with max and with average pooling."""
    maps, pooled, _ = planted
    base = dataclasses.replace(SMALL, use_layer2=False, reiterate=False)
    return {pooling: fit_pipeline(maps, pooled, dataclasses.replace(base, pooling=pooling))
            for pooling in ("max", "average")}


@pytest.mark.parametrize("pooling", ["max", "average"])
def test_without_layer2_the_code_is_the_pooled_block_vector(planted, one_pass_models, pooling):
    maps, _, _ = planted
    model = one_pass_models[pooling]
    atoms = SMALL.layer1_atoms
    assert model.layer2 is None and model.code_dim == N_GROUPS * atoms
    for image in [0, 26, 57, 80]:
        cluster = int(model.labels[image])
        patches = hand_patches(maps[image:image + 1], 3, 1, 1)[0]
        codes = sparse_encode(patches.T.contiguous(), model.layer1[cluster], SMALL.sparsity)
        expected = codes.abs().amax(dim=1) if pooling == "max" else codes.abs().mean(dim=1)
        block = slice(cluster * atoms, (cluster + 1) * atoms)
        assert torch.allclose(model.codes[image, block], expected, rtol=1e-4, atol=1e-5)
        outside = torch.ones(model.code_dim, dtype=torch.bool)
        outside[block] = False
        assert not bool(model.codes[image, outside].any())


def test_average_pooling_differs_from_max(one_pass_models):
    max_model, average_model = one_pass_models["max"], one_pass_models["average"]
    assert torch.equal(max_model.layer1, average_model.layer1)   # pooling acts after layer 1
    assert bool((max_model.codes >= average_model.codes - 1e-7).all())
    assert not torch.allclose(max_model.codes, average_model.codes)


def test_without_reiteration_the_clusters_are_b2_kmeans(planted, one_pass_models):
    _, pooled, _ = planted
    model = one_pass_models["max"]
    assert len(model.history) == 1 and model.stop_reason == "no_reiteration"
    assert model.history[0].label_change is None
    reference = KMeans(N_GROUPS, n_init=10, random_state=0).fit(
        normalise_rows(pooled).numpy())
    assert adjusted_rand_score(reference.labels_, model.labels.numpy()) == 1.0


# --------------------------------------------------------------------------------------------
# Ranking
# --------------------------------------------------------------------------------------------

def brute_force_rank(query, query_cluster, index, index_clusters, top_n):
    def cosine(a, b):
        norms = float(torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b))
        return float(a @ b) / norms if norms > 0 else 0.0
    keyed = [((index_clusters[i] != query_cluster).item(), -cosine(query, index[i]), i)
             for i in range(len(index))]
    return [i for _, _, i in sorted(keyed)[:top_n]]


@pytest.mark.parametrize("seed", [0, 1])
def test_rank_by_code_matches_brute_force(seed):
    generator = torch.Generator().manual_seed(seed)
    index = torch.randn(40, 6, generator=generator, dtype=torch.float64)
    index[::7] = 0.0                                                    # zero codes: score 0
    index[5] = index[3] * 2.0                                           # exact tie
    index_clusters = torch.randint(3, (40,), generator=generator)
    queries = torch.randn(5, 6, generator=generator, dtype=torch.float64)
    query_clusters = torch.randint(3, (5,), generator=generator)
    for top_n in (1, 12, 50):
        indices, scores = rank_by_code(queries, query_clusters, index, index_clusters, top_n,
                                       query_batch_size=2)
        assert indices.shape == (5, min(top_n, 40))
        for row in range(5):
            expected = brute_force_rank(queries[row], query_clusters[row], index,
                                        index_clusters, top_n)
            assert indices[row].tolist() == expected
            expected_scores = normalise_rows(index[indices[row]]) @ normalise_rows(
                queries[row:row + 1])[0]
            assert torch.allclose(scores[row], expected_scores)
        prenormalised = rank_by_code(queries, query_clusters, normalise_rows(index),
                                     index_clusters, top_n, index_is_normalised=True)
        assert torch.equal(prenormalised[0], indices)


def test_rank_ties_outside_the_cluster_go_by_index():
    index = torch.tensor([[0.0, 1.0], [0.0, 2.0], [1.0, 0.0], [0.0, 3.0], [1.0, 0.0]])
    clusters = torch.tensor([1, 1, 0, 1, 0])
    indices, scores = rank_by_code(torch.tensor([[1.0, 0.0]]), torch.tensor([0]), index,
                                   clusters, 5)
    assert indices[0].tolist() == [2, 4, 0, 1, 3]
    assert scores[0].tolist() == [1.0, 1.0, 0.0, 0.0, 0.0]


# --------------------------------------------------------------------------------------------
# Persistence, determinism, edge cases
# --------------------------------------------------------------------------------------------

def test_save_load_round_trip(tmp_path, planted, fitted):
    maps, _, _ = planted
    model, _ = fitted
    path = tmp_path / "ddiccir.pt"
    model.save(path)
    raw = torch.load(path, weights_only=True)                           # no pickled classes
    assert raw["format"] == MODEL_FORMAT and isinstance(raw["metadata"], str)
    loaded = DDicCIRModel.load(path)
    assert loaded.config == model.config and loaded.history == model.history
    assert loaded.stop_reason == model.stop_reason and loaded.map_shape == model.map_shape
    for name in ("layer1", "layer2", "labels", "codes"):
        assert torch.equal(getattr(loaded, name), getattr(model, name))
    for ours, theirs in zip(encode_queries(model, maps[:20]), encode_queries(loaded, maps[:20])):
        assert torch.equal(ours, theirs)


def test_load_refuses_other_files(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"format": "something else"}, path)
    with pytest.raises(ValueError, match="not a"):
        DDicCIRModel.load(path)


def test_fit_is_deterministic_for_a_seed(planted, fitted_two_passes):
    maps, pooled, _ = planted
    config = dataclasses.replace(SMALL, max_outer_iter=2)
    again = fit_pipeline(maps, pooled, config)
    for name in ("layer1", "layer2", "labels", "codes"):
        assert torch.equal(getattr(again, name), getattr(fitted_two_passes, name))
    other_seed = fit_pipeline(maps, pooled, dataclasses.replace(config, seed=1,
                                                                max_outer_iter=1))
    assert not torch.equal(other_seed.layer1, fitted_two_passes.layer1)


def test_empty_and_tiny_clusters_get_dictionaries():
    maps, _, _ = planted_maps(1, per_group=3)
    config = dataclasses.replace(SMALL, layer1_atoms=64)     # 1 image = 49 patches < 64 atoms
    labels = torch.tensor([0] * 10 + [1] + [3])               # cluster 2 empty, cluster 1 tiny
    first, results = _learn_layer1(maps, labels, None, config, 1)
    assert results[2] is None and results[0] is not None and results[1] is not None
    norms = torch.linalg.vector_norm(first, dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)  # every atom a unit vector
    second, _ = _learn_layer1(maps, labels, first, config, 2)
    assert torch.equal(second[2], first[2])                   # empty cluster keeps its atoms


def test_layer2_allocation():
    sizes = torch.tensor([100, 10, 0, 50])
    available = torch.tensor([100, 10, 0, 3])
    allocation = _layer2_atom_allocation(sizes, available, 20, floor=4)
    assert allocation.tolist() == [13, 4, 0, 3]               # floor, cap, rest by size
    assert _layer2_atom_allocation(sizes, available, 500, floor=4).tolist() == [100, 10, 0, 3]


@pytest.mark.parametrize("changes, message", [
    ({"n_clusters": 0}, "n_clusters"),
    ({"sparsity": 1.5}, "sparsity"),
    ({"coherence_threshold": 1.5}, "coherence_threshold"),
    ({"pooling": "median"}, "pooling"),
    ({"movement_space": "pixels"}, "movement_space"),
    ({"patches_per_cluster": 0}, "patches_per_cluster"),
    ({"dtype": "float16"}, "dtype"),
    ({"seed": -1}, "seed"),
])
def test_invalid_config(changes, message):
    with pytest.raises(ValueError, match=message):
        PipelineConfig(**changes)


def test_invalid_inputs(planted, fitted):
    maps, pooled, _ = planted
    with pytest.raises(ValueError, match="pooled"):
        fit_pipeline(maps, pooled[:, :3], SMALL)
    with pytest.raises(ValueError, match="at least"):
        fit_pipeline(maps[:2], pooled[:2], SMALL)
    model, _ = fitted
    with pytest.raises(ValueError, match="maps must be"):
        encode_queries(model, maps[:, :8])


def _with_uniform_background(maps, seed, strength=0.5):
    """A random per-image background in a few channels, the same at every position: it
    shifts the global average (what features-only retrieval compares) but carries no
    spatial structure, which the patch dictionaries model and max pooling ignores."""
    generator = torch.Generator().manual_seed(seed)
    background = torch.rand(maps.shape[0], CHANNELS, generator=generator) ** 4 * strength
    return maps + background[:, :, None, None]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_full_pipeline_recovers_the_classes_and_beats_features_only(seed):
    from pipelines.retrieval_metrics import cluster_purity, evaluate_rankings, one_hot

    maps, _, groups = planted_maps(seed, per_group=25)
    query_maps, _, query_groups = planted_maps(seed, per_group=8, image_seed=99)
    maps = _with_uniform_background(maps, seed + 10)
    query_maps = _with_uniform_background(query_maps, seed + 20)
    pooled, query_pooled = maps.mean(dim=(2, 3)), query_maps.mean(dim=(2, 3))
    config = PipelineConfig(n_clusters=N_GROUPS, layer1_atoms=16, layer2_atoms=32, sparsity=4,
                            max_outer_iter=8, ksvd_max_iter=4, patches_per_cluster=2000, seed=0)
    model = fit_pipeline(maps, pooled, config)
    clusters, codes, _ = encode_queries(model, query_maps)
    full, _ = rank_by_code(codes, clusters, model.codes, model.labels, 20)
    similarity = normalise_rows(query_pooled) @ normalise_rows(pooled).T
    features_only = torch.argsort(similarity, dim=1, descending=True, stable=True)[:, :20]

    truth, index_truth = one_hot(query_groups.numpy()), one_hot(groups.numpy())
    full_row = evaluate_rankings(truth, index_truth, full.numpy(), cutoffs=(20,))
    features_row = evaluate_rankings(truth, index_truth, features_only.numpy(), cutoffs=(20,))
    assert cluster_purity(model.labels.numpy(), index_truth) >= 0.9
    assert cluster_purity(clusters.numpy(), truth) >= 0.95
    assert full_row["mAP@20"] >= 0.98 > features_row["mAP@20"]
    assert full_row["P@20"] >= features_row["P@20"] + 0.05


# ------------------------------------------------------------------ codes or features

def _brute_force_leave_one_out(vectors, clusters, labels, depth):
    """Oracle: per query, sort all others by (same cluster, cosine) with a Python sort."""
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    precisions = []
    for query in range(len(labels)):
        others = [i for i in range(len(labels)) if i != query]
        others.sort(key=lambda i: (-int(clusters is None or clusters[i] == clusters[query]),
                                   -float(unit[query] @ unit[i])))
        precisions.append(np.mean([labels[i] == labels[query] for i in others[:depth]]))
    return float(np.mean(precisions))


def test_compare_rankings_scores_leave_one_out(planted, fitted):
    maps, pooled, groups = planted
    model, _ = fitted
    labels = groups.numpy() % 2                     # a coarser labelling than the clusters
    feature_clusters = kmeans(normalise_rows(pooled), N_GROUPS,
                              generator=torch.Generator().manual_seed(0)).labels
    result = __import__("pipelines.ddiccir", fromlist=["x"]).compare_rankings(
        pooled, model.codes, model.labels, feature_clusters, labels, depth=10)
    assert result["depth"] == 10 and result["n_images"] == len(labels)
    assert result["codes"]["precision"] == pytest.approx(_brute_force_leave_one_out(
        model.codes.numpy(), model.labels.numpy(), labels, 10), abs=0.02)
    assert result["features_ungated"]["precision"] == pytest.approx(_brute_force_leave_one_out(
        pooled.numpy(), None, labels, 10), abs=0.02)
    assert 0 < result["purity_codes"] <= 1 and 0 < result["purity_features"] <= 1
    sampled = __import__("pipelines.ddiccir", fromlist=["x"]).compare_rankings(
        pooled, model.codes, model.labels, feature_clusters, labels, depth=10, max_queries=30)
    assert sampled["n_queries"] == 30 and result["n_queries"] == len(labels)
    assert abs(sampled["features_ungated"]["precision"]
               - result["features_ungated"]["precision"]) < 0.2


def test_select_ranking_features_indexes_normalised_features(tmp_path, planted, fitted):
    from pipelines.ddiccir import index_entries, select_ranking

    maps, pooled, groups = planted
    model, _ = fitted
    chosen = select_ranking(model, pooled, groups.numpy(), ranking="features")
    assert chosen.ranking == "features" and chosen.selection["ranking"] == "features"
    assert {"codes", "features", "purity_codes", "purity_features"} <= set(chosen.selection)
    clusters, vectors = index_entries(chosen, maps)
    torch.testing.assert_close(vectors, normalise_rows(maps.mean(dim=(2, 3))))
    # planted groups: the nearest feature centre is the image's own cluster
    assert float((clusters == model.labels).double().mean()) >= 0.95
    path = tmp_path / "model.pt"
    chosen.save(path)
    loaded = DDicCIRModel.load(path)
    assert loaded.ranking == "features" and loaded.selection == chosen.selection
    assert torch.equal(index_entries(loaded, maps)[0], clusters)


def test_select_ranking_auto_without_labels_keeps_the_codes(planted, fitted):
    from pipelines.ddiccir import index_entries, select_ranking

    maps, pooled, _ = planted
    model, _ = fitted
    kept = select_ranking(model, pooled, None)
    assert kept.ranking == "codes" and "no labels" in kept.selection["reason"]
    clusters, codes = index_entries(kept, maps[:8])
    expected_clusters, expected_codes, _ = encode_queries(model, maps[:8])
    assert torch.equal(clusters, expected_clusters) and torch.equal(codes, expected_codes)


def test_select_ranking_auto_picks_the_higher_score(planted, fitted):
    from pipelines.ddiccir import select_ranking

    _, pooled, groups = planted
    model, _ = fitted
    chosen = select_ranking(model, pooled, groups.numpy(), ranking="auto")
    selection = chosen.selection
    codes = selection["codes"]["precision"] + selection["codes"]["map"]
    features = selection["features"]["precision"] + selection["features"]["map"]
    assert chosen.ranking == ("codes" if codes > features else "features")
