"""Batch-OMP (method.md B.3, B.5): oracle = scikit-learn's ``orthogonal_mp_gram``."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.linear_model import orthogonal_mp_gram

from pipelines.sparse_coding import gram_matrix, omp, sparse_encode


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_problem(seed, dimension, n_atoms, n_signals, dtype=np.float64):
    """Unit-norm Gaussian atoms (d, K) and Gaussian signals (d, N)."""
    rng = np.random.default_rng(seed)
    dictionary = rng.standard_normal((dimension, n_atoms))
    dictionary /= np.linalg.norm(dictionary, axis=0)
    signals = rng.standard_normal((dimension, n_signals))
    return dictionary.astype(dtype), signals.astype(dtype)


def sklearn_codes(dictionary, signals, n_nonzero=None, tol=None):
    gram = dictionary.T @ dictionary
    gram = (gram + gram.T) / 2  # the same exactly symmetric Gram that gram_matrix builds
    with warnings.catch_warnings():
        # sklearn warns when a signal stops before n_nonzero atoms; those cases are the
        # point of several tests here.
        warnings.simplefilter("ignore", RuntimeWarning)
        return orthogonal_mp_gram(
            gram, dictionary.T @ signals, n_nonzero_coefs=n_nonzero, tol=tol,
            norms_squared=None if tol is None else (signals ** 2).sum(axis=0))


def our_codes(dictionary, signals, n_nonzero, **options):
    return sparse_encode(torch.from_numpy(signals), torch.from_numpy(dictionary), n_nonzero,
                         **options).numpy()


def assert_same_codes(ours, reference, tolerance=1e-4):
    assert not np.isnan(ours).any()
    np.testing.assert_array_equal(ours != 0, reference != 0, err_msg="supports differ")
    np.testing.assert_allclose(ours, reference, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("dimension, n_atoms, n_signals, n_nonzero", [
    (64, 100, 300, 15),    # overcomplete, the Table 9 sparsity
    (128, 64, 300, 10),    # undercomplete
    (50, 80, 200, 1),      # matching pursuit's first step only
    (30, 200, 200, 25),    # many atoms, sparsity close to d
])
def test_matches_sklearn_orthogonal_mp_gram(dtype, dimension, n_atoms, n_signals, n_nonzero):
    dictionary, signals = random_problem(0, dimension, n_atoms, n_signals, dtype)
    ours = our_codes(dictionary, signals, n_nonzero)
    assert ours.dtype == dtype
    assert ours.shape == (n_atoms, n_signals)
    assert ((ours != 0).sum(axis=0) == n_nonzero).all()
    reference = sklearn_codes(dictionary, signals, n_nonzero)
    if dtype == np.float32:
        assert_same_codes_up_to_ties(ours, reference, dictionary, signals)
    else:
        assert_same_codes(ours, reference)


def assert_same_codes_up_to_ties(ours, reference, dictionary, signals, max_tied=0.01):
    """In float32 two atoms can tie late in a long OMP run (25 atoms in 30 dimensions), and
    which one wins depends on the BLAS's rounding (seen on an AVX-512 machine: one signal
    of 200).  Such a signal must be fitted as well as the reference fits it, to 0.1% of
    its norm (both residuals are near zero there: 0.0049 and 0.0044 of a norm of 5)."""
    differ = ((ours != 0) != (reference != 0)).any(axis=0)
    assert differ.mean() <= max_tied
    assert_same_codes(ours[:, ~differ], reference[:, ~differ])
    residual = np.linalg.norm(signals[:, differ] - dictionary @ ours[:, differ], axis=0)
    reference_residual = np.linalg.norm(
        signals[:, differ] - dictionary @ reference[:, differ], axis=0)
    norms = np.linalg.norm(signals[:, differ], axis=0)
    assert (np.abs(residual - reference_residual) <= 1e-3 * norms).all()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_residual_tolerance_matches_sklearn(dtype):
    dictionary, signals = random_problem(1, 60, 90, 200, dtype)
    tol = 0.2 * float(np.median((signals ** 2).sum(axis=0)))
    ours = our_codes(dictionary, signals, 90, tol=tol)
    reference = sklearn_codes(dictionary, signals, tol=tol)
    counts = (reference != 0).sum(axis=0)
    assert counts.min() < counts.max()  # the tolerance, not the cap, decides here
    assert_same_codes(ours, reference)


def test_tolerance_and_sparsity_cap_both_apply():
    dictionary, signals = random_problem(2, 60, 90, 200)
    capped = our_codes(dictionary, signals, 5, tol=1e-3)
    assert ((capped != 0).sum(axis=0) == 5).all()  # tol alone would need more atoms
    assert_same_codes(capped, sklearn_codes(dictionary, signals, 5))


def test_orthonormal_dictionary_recovers_the_known_code():
    q, _ = np.linalg.qr(np.random.default_rng(3).standard_normal((6, 6)))
    code = np.array([0.0, 2.0, 0.0, -0.5, 0.0, 1.0])
    signal = (q @ code)[:, None]
    ours = our_codes(q, signal, 3)[:, 0]
    np.testing.assert_allclose(ours, code, atol=1e-12)
    # L above the true sparsity: OMP stops at 3 atoms, nothing is left to explain.
    np.testing.assert_allclose(our_codes(q, signal, 6)[:, 0], code, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_zero_signals_get_zero_codes(dtype):
    dictionary, signals = random_problem(4, 40, 70, 50, dtype)
    signals[:, [0, 17, 49]] = 0.0
    ours = our_codes(dictionary, signals, 15)
    assert not np.isnan(ours).any()
    assert (ours[:, [0, 17, 49]] == 0).all()
    others = [i for i in range(50) if i not in (0, 17, 49)]
    alone = our_codes(dictionary, signals[:, others], 15)
    np.testing.assert_array_equal(ours[:, others] != 0, alone != 0)
    np.testing.assert_allclose(ours[:, others], alone, rtol=1e-5, atol=1e-5)
    assert_same_codes(ours, sklearn_codes(dictionary, signals, 15))


def test_signals_represented_before_the_cap_stop_adding_atoms():
    dictionary, _ = random_problem(5, 80, 120, 0)
    rng = np.random.default_rng(5)
    true_codes = np.zeros((120, 40))
    for column in range(40):
        atoms = rng.choice(120, size=column % 4 + 1, replace=False)
        true_codes[atoms, column] = rng.uniform(1, 2, atoms.size) * rng.choice([-1, 1], atoms.size)
    signals = dictionary @ true_codes
    ours = our_codes(dictionary, signals, 15)
    assert not np.isnan(ours).any()
    np.testing.assert_array_equal(ours != 0, true_codes != 0)
    np.testing.assert_allclose(ours, true_codes, atol=1e-10)
    assert_same_codes(ours, sklearn_codes(dictionary, signals, 15))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_sparsity_above_the_rank(dtype):
    # 20 atoms in R^8: at most 8 independent atoms fit; L = 15 must stop there, finite.
    dictionary, signals = random_problem(6, 8, 20, 100, dtype)
    ours = our_codes(dictionary, signals, 15)
    assert not np.isnan(ours).any()
    assert (ours != 0).sum(axis=0).max() <= 8
    residual = signals - dictionary @ ours
    assert np.abs(residual).max() < (1e-10 if dtype == np.float64 else 1e-4)
    if dtype == np.float64:
        assert_same_codes(ours, sklearn_codes(dictionary, signals, 15))
    # In float32 the last of the 8 atoms is picked from correlations of ~1e-6 (the residual
    # after 7 atoms is nearly in two atoms' span); scikit-learn's float32 rounding chose
    # another atom than ours (and than float64) for 1 of 100 signals, so only the fit is
    # compared there.


def test_duplicate_atoms_are_never_both_chosen():
    dictionary, signals = random_problem(7, 30, 40, 200)
    dictionary = np.concatenate([dictionary, dictionary[:, :10]], axis=1)  # atoms 40..49 copy 0..9
    signals[:, :50] = dictionary[:, :10] @ np.random.default_rng(7).standard_normal((10, 50))
    ours = our_codes(dictionary, signals, 15)
    assert not np.isnan(ours).any()
    both = (ours[:10] != 0) & (ours[40:] != 0)
    assert not both.any()
    # Twins tie exactly; scikit-learn breaks ties by its internally swapped atom order,
    # we by the lower index, so compare with each twin pair merged into one atom.
    reference = sklearn_codes(dictionary, signals, 15)
    assert not ((reference[:10] != 0) & (reference[40:] != 0)).any()

    def merged(codes):
        return np.concatenate([codes[:10] + codes[40:], codes[10:40]])

    assert_same_codes(merged(ours), merged(reference))


def test_more_atoms_requested_than_the_dictionary_has():
    dictionary, signals = random_problem(8, 30, 10, 20)
    ours = our_codes(dictionary, signals, 15)  # clipped to K = 10 (sklearn refuses)
    assert ((ours != 0).sum(axis=0) == 10).all()
    assert_same_codes(ours, sklearn_codes(dictionary, signals, 10))


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 10_000])
def test_chunk_size_does_not_change_the_codes(chunk_size):
    dictionary, signals = random_problem(9, 50, 90, 150)
    signals[:, 3] = 0.0                           # stops at step 0
    signals[:, 10] = dictionary[:, 5] * 3.0        # stops at step 1
    reference = our_codes(dictionary, signals, 15, chunk_size=150)
    chunked = our_codes(dictionary, signals, 15, chunk_size=chunk_size)
    np.testing.assert_array_equal(chunked != 0, reference != 0)
    np.testing.assert_allclose(chunked, reference, rtol=0, atol=1e-12)


def test_gram_form_and_least_squares_property():
    dictionary, signals = random_problem(10, 40, 60, 80)
    d, x = torch.from_numpy(dictionary), torch.from_numpy(signals)
    codes = omp(gram_matrix(d), d.T @ x, 15)
    torch.testing.assert_close(codes, sparse_encode(x, d, 15), rtol=0, atol=0)
    # OMP's refit: the residual is orthogonal to every chosen atom.
    residual = x - d @ codes
    orthogonality = (d.T @ residual).abs() * (codes != 0)
    assert float(orthogonality.max()) < 1e-10


def test_rows_layout_by_passing_a_transposed_view():
    dictionary, signals = random_problem(11, 40, 60, 80, np.float32)
    patches = torch.from_numpy(np.ascontiguousarray(signals.T))  # (N, d), one patch per row
    codes = sparse_encode(patches.T, torch.from_numpy(dictionary), 15)
    np.testing.assert_allclose(codes.numpy(), our_codes(dictionary, signals, 15),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arguments, message", [
    (dict(gram=torch.eye(3), correlations=torch.zeros(4, 2)), r"correlations must have shape"),
    (dict(gram=torch.zeros(3, 4), correlations=torch.zeros(3, 2)), r"square"),
    (dict(gram=torch.zeros(0, 0), correlations=torch.zeros(0, 2)), r"K >= 1"),
    (dict(gram=torch.eye(3), correlations=torch.zeros(3, 2, dtype=torch.float64)), r"dtype"),
    (dict(gram=torch.eye(3), correlations=torch.zeros(3, 2), n_nonzero=0), r"n_nonzero"),
    (dict(gram=torch.eye(3), correlations=torch.zeros(3, 2), tol=0.1), r"squared_norms"),
    (dict(gram=torch.eye(3), correlations=torch.zeros(3, 2), chunk_size=0), r"chunk_size"),
])
def test_invalid_arguments(arguments, message):
    with pytest.raises(ValueError, match=message):
        omp(**arguments)


def test_sparse_encode_shape_check():
    with pytest.raises(ValueError, match=r"share d"):
        sparse_encode(torch.zeros(5, 3), torch.zeros(4, 2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_matches_cpu(dtype):
    dictionary, signals = random_problem(12, 64, 100, 500)
    d = torch.from_numpy(dictionary).to(dtype)
    x = torch.from_numpy(signals).to(dtype)
    on_cpu = sparse_encode(x, d, 15)
    on_gpu = sparse_encode(x.cuda(), d.cuda(), 15, chunk_size=128)
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu() != 0, on_cpu != 0)
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=1e-4, atol=1e-4)


def test_grouped_omp_equals_one_call_per_dictionary():
    generator = torch.Generator().manual_seed(5)
    dictionaries = torch.randn(3, 40, 24, dtype=torch.float64, generator=generator)
    dictionaries /= torch.linalg.vector_norm(dictionaries, dim=1, keepdim=True)
    signals = torch.randn(40, 30, dtype=torch.float64, generator=generator)
    groups = torch.randint(0, 3, (30,), generator=generator)
    grams = torch.stack([gram_matrix(d) for d in dictionaries])
    correlations = torch.einsum("gdk,dn->gkn", dictionaries, signals)[groups, :,
                                                                     torch.arange(30)].T
    grouped = omp(grams, correlations, 5, groups=groups, chunk_size=7)
    for group in range(3):
        members = groups == group
        alone = omp(grams[group], correlations[:, members], 5)
        torch.testing.assert_close(grouped[:, members], alone, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="groups must index"):
        omp(grams, correlations, 5, groups=groups + 3)
