"""Dictionary learning by K-SVD with coherence control, in torch (method.md B.3, B.5).

Objective, for signals ``X`` (d, N) one per column, a dictionary ``D`` (d, K) of unit-norm
atoms and codes ``Gamma`` (K, N)::

    min_{D, Gamma} ||X - D Gamma||_F^2   s.t.  ||gamma_i||_0 <= L for every i,  ||d_k||_2 = 1

K-SVD (Aharon, Elad & Bruckstein 2006) alternates two steps:

1. **Sparse coding**: every signal by OMP with at most ``L`` atoms (``pipelines.sparse_coding``,
   batched Batch-OMP; method.md B.3 fixes L = 15).
2. **Atom update**, one atom after the other (later atoms see the earlier updates): for atom
   ``k`` with users ``I = {i : Gamma[k, i] != 0}`` and the residual without it,
   ``E_I = X_I - D Gamma_I + d_k Gamma[k, I]``, replace ``d_k`` and ``Gamma[k, I]`` by the best
   rank-1 approximation of ``E_I``. The support stays fixed, so the error cannot grow in this
   step.

The rank-1 step is the **approximate K-SVD** of Rubinstein, Zibulevsky & Elad (2008): power
iterations started from the current codes, ``d = E_I g / ||E_I g||``, ``g = E_I^T d``, with
``E_I`` never formed (products with it are expanded into ``X_I``, ``D`` and ``Gamma_I``).
``power_iterations=1`` (the default) is their method; more iterations converge to the exact
leading singular pair, i.e. exact K-SVD (checked against ``numpy.linalg.svd`` in the tests).
Measured on the benchmark problem (9,216 x 5,000, 128 atoms, L = 15, 20 iterations;
benchmarks/sparse_coding/README.md): relative error 0.7111 with 1 power iteration, 0.7106
with 3, at 1.9x the time.

**Coherence control** (method.md B.3): after each sweep of atom updates, atoms are replaced

* when unused (no signal chose them; ``replace_unused``), and
* when their largest absolute cosine to another atom exceeds ``coherence_threshold``: pairs
  are resolved greedily, most coherent pair first, and of the pair the atom used by fewer
  signals is replaced (on ties the higher index).

Replacements come from the worst-reconstructed samples (largest residual after the last coding
step): by default their residuals ``x - D gamma`` under the current atoms and codes
(``replacement="residuals"``; the direction the dictionary misses most), or the samples
themselves (``"samples"``, the textbook rule), normalised, each taken at most once and skipped
when it would itself be more coherent than the threshold with an atom already kept; if the
candidates run out, random unit vectors from ``generator``. With non-negative, alike samples
(post-ReLU patches, B.4 vectors) the samples themselves are nearly all rejected, and random unit
atoms spanning every cluster block took their place (measured on real features:
benchmarks/ddiccir/README.md). The coherence ``max_{j != k} |d_j . d_k|`` is recorded for the initial
dictionary and after every iteration; with a threshold it is at most the threshold after each
replacement step.

**Stopping**: after every iteration the signals are coded again with the new dictionary and the
relative reconstruction error ``e_t = ||X - D_t Gamma_t||_F / ||X||_F`` is recorded; the loop
stops when ``|e_{t-1} - e_t| / e_{t-1} < tol`` (Table 9: 1e-4) or after ``max_iter``
iterations. The returned codes are always those of the returned dictionary. The atom update
cannot raise the error, but the greedy OMP re-coding can: near convergence a few signals
that OMP codes badly may flip between two supports, and the error then cycles (seen in the
tests: period 3, amplitude 3 %), so the relative-change rule never fires and the loop runs to
``max_iter`` with ``converged=False``. ``e_t`` is
evaluated in float64 from Gram quantities, ``||x||^2 - 2 gamma . D^T x + gamma^T G gamma``;
with float32 inputs the correlations ``D^T x`` carry float32 rounding, so the squared error is
accurate to about ``1e-6 ||X||_F^2`` -- ample while the relative error stays above ~1e-2, as it
does for real features at sparsity 15 (use float64 for near-exact synthetic data).

**Table 9's lambda1 = 0.1 and lambda2 = 0.001.** These are the two parameters of SPAMS
``trainDL`` in its default mode (``mode=2``), which codes with the elastic net
``min ||x - D alpha||^2 / 2 + lambda1 ||alpha||_1 + lambda2 ||alpha||^2 / 2`` and updates ``D``
by block-coordinate descent on unit-norm atoms (Mairal et al. 2010). In method.md B.3 the
coding is OMP with at most 15 atoms, an l0 constraint, so lambda1 has no role: the sparsity
level replaces it. lambda2, which the paper labels "dictionary", cannot act on the atoms
either: every K-SVD atom is a unit vector (the leading singular vector of ``E_I``), and a ridge
``lambda2 ||d_k||^2`` is constant on the unit sphere, so a weight decay before renormalising
changes nothing. In SPAMS it is a ridge on the codes, which OMP's least-squares refit does not
have. Both are therefore **not applicable** to this K-SVD and are not parameters here; a
SPAMS-based layer (optional ``gpl`` extra) would pass them to ``trainDL`` as they are.

Warm start: pass the previous dictionary as ``initial_dictionary`` (method.md B.6).
First start: :func:`init_dictionary_from_samples` on the cluster's own samples.

References
----------
M. Aharon, M. Elad, A. Bruckstein. K-SVD: An algorithm for designing overcomplete dictionaries
for sparse representation. IEEE Trans. Signal Process. 54(11), 4311-4322, 2006.
R. Rubinstein, M. Zibulevsky, M. Elad. Efficient implementation of the K-SVD algorithm using
batch orthogonal matching pursuit. Technion CS-2008-08, 2008.
J. Mairal, F. Bach, J. Ponce, G. Sapiro. Online learning for matrix factorization and sparse
coding. JMLR 11, 19-60, 2010 (SPAMS ``trainDL``).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from pipelines.sparse_coding import DEFAULT_CHUNK_SIZE, DEFAULT_N_NONZERO, gram_matrix, omp

__all__ = ["DictionaryResult", "ksvd", "init_dictionary_from_samples", "mutual_coherence",
           "reconstruction_errors"]

log = logging.getLogger(__name__)

DEFAULT_TOL = 1e-4  # Table 9: relative change of the reconstruction error

Replacement = Literal["residuals", "samples"]

_CANDIDATE_BATCH = 64
# Replacement candidates are screened this many at a time (one matmul with the dictionary),
# since most of the worst-reconstructed samples are accepted.


@dataclass(frozen=True)
class DictionaryResult:
    """Outcome of :func:`ksvd`.

    Attributes
    ----------
    dictionary : Tensor of shape (d, K)
        Unit-norm atoms (columns).
    codes : Tensor of shape (K, N)
        OMP codes of the signals over ``dictionary`` (the last coding step).
    errors : Tensor of shape (n_iter + 1,), float64, on the CPU
        Relative reconstruction error ``||X - D Gamma||_F / ||X||_F`` after each coding step;
        ``errors[0]`` is that of the initial dictionary.
    coherence : Tensor of shape (n_iter + 1,), float64, on the CPU
        ``max_{j != k} |d_j . d_k|`` of the initial dictionary, then after every iteration's
        atom replacements.
    replaced_atoms : tuple of n_iter tuples of int
        Indices of the atoms replaced in each iteration.
    n_iter : int
        Iterations (atom-update sweeps) done.
    converged : bool
        True when the loop stopped on ``tol`` rather than ``max_iter``.
    """

    dictionary: Tensor
    codes: Tensor
    errors: Tensor
    coherence: Tensor
    replaced_atoms: tuple[tuple[int, ...], ...]
    n_iter: int
    converged: bool


def mutual_coherence(dictionary: Tensor) -> float:
    """``max_{j != k} |d_j . d_k| / (||d_j|| ||d_k||)`` of a dictionary (d, K) (method.md B.3).

    0.0 for a single atom.
    """
    if dictionary.shape[1] < 2:
        return 0.0
    norms = torch.linalg.vector_norm(dictionary, dim=0)
    unit = dictionary / norms.clamp_min(torch.finfo(dictionary.dtype).tiny)
    cosines = (unit.T @ unit).abs()
    cosines.fill_diagonal_(0.0)
    return float(cosines.max())


def reconstruction_errors(
    gram: Tensor, correlations: Tensor, codes: Tensor, squared_norms: Tensor,
) -> Tensor:
    """Squared residual norms ``||x_i - D gamma_i||^2`` from Gram quantities, in float64.

    Parameters
    ----------
    gram : Tensor of shape (K, K), ``D^T D``
    correlations : Tensor of shape (K, N), ``D^T X``
    codes : Tensor of shape (K, N)
    squared_norms : Tensor of shape (N,), ``||x_i||^2``

    Returns
    -------
    Tensor of shape (N,), float64, clamped at 0 (rounding can make it slightly negative).
    """
    codes64 = codes.double()
    residual = (squared_norms.double()
                - 2 * (codes64 * correlations.double()).sum(dim=0)
                + (codes64 * (gram.double() @ codes64)).sum(dim=0))
    return residual.clamp_min(0.0)


def _random_unit_atoms(
    dimension: int, count: int, like: Tensor, generator: torch.Generator | None,
) -> Tensor:
    atoms = torch.randn((dimension, count), generator=generator, dtype=torch.float64)
    atoms /= torch.linalg.vector_norm(atoms, dim=0)
    return atoms.to(dtype=like.dtype, device=like.device)


def init_dictionary_from_samples(
    signals: Tensor, n_atoms: int, generator: torch.Generator | None = None,
) -> Tensor:
    """Initial dictionary: ``n_atoms`` distinct random samples, normalised (method.md B.3).

    Parameters
    ----------
    signals : Tensor of shape (d, N)
        The cluster's own samples, one per column.
    n_atoms : int
        K (128 for layer 1, 256 for layer 2; Table 9).
    generator : torch.Generator, optional
        CPU generator for the choice (seed it for reproducible dictionaries).

    Returns
    -------
    Tensor of shape (d, n_atoms), unit-norm columns, dtype and device of ``signals``.
    Zero samples are never chosen; when fewer than ``n_atoms`` samples are non-zero the rest
    are random unit vectors (logged as a warning), which K-SVD then updates or replaces.
    """
    if signals.ndim != 2:
        raise ValueError(f"signals must be (d, N), got shape {tuple(signals.shape)}")
    if n_atoms < 1:
        raise ValueError(f"n_atoms must be >= 1, got {n_atoms}")
    dimension, n_signals = signals.shape
    norms = torch.linalg.vector_norm(signals, dim=0)
    order = torch.randperm(n_signals, generator=generator).to(signals.device)
    nonzero = order[norms[order] > 0][:n_atoms]
    atoms = signals[:, nonzero] / norms[nonzero]
    missing = n_atoms - nonzero.numel()
    if missing:
        log.warning("init_dictionary_from_samples: %d non-zero samples for %d atoms; %d random "
                    "atoms added", nonzero.numel(), n_atoms, missing)
        atoms = torch.cat([atoms, _random_unit_atoms(dimension, missing, signals, generator)],
                          dim=1)
    return atoms.contiguous()


def _rows_pattern(rows: Tensor, n_rows: int, dtype: torch.dtype) -> Tensor:
    """Sparse CSR (n_rows, 1) with ones at ``rows`` (sorted): the "sample these rows" mask
    for :func:`torch.sparse.sampled_addmm`."""
    counts = torch.zeros(n_rows + 1, dtype=torch.long, device=rows.device)
    counts[rows + 1] = 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(
            torch.cumsum(counts, dim=0), torch.zeros_like(rows),
            torch.zeros(rows.numel(), dtype=dtype, device=rows.device),
            size=(n_rows, 1))


def _update_atoms(
    signals_by_row: Tensor, dictionary: Tensor, codes: Tensor, power_iterations: int,
) -> None:
    """One sweep of approximate K-SVD atom updates, in place on ``dictionary`` and ``codes``.

    ``signals_by_row`` (N, d) contiguous, ``dictionary`` (d, K), ``codes`` (K, N).

    The two products with the users' signals ``X_I`` read only the rows in ``I`` and never
    copy them: ``X_I^T g`` is a weighted ``embedding_bag`` sum and ``X_I u`` a sampled
    product (SDDMM). Gathering ``X_I`` and then two mat-vecs moved 3x the data (~30 % slower
    per sweep on the benchmark problem).
    """
    n_signals = signals_by_row.shape[0]
    n_atoms = dictionary.shape[1]
    for atom_index in range(n_atoms):
        users = torch.nonzero(codes[atom_index]).squeeze(1)       # sorted
        if users.numel() == 0:
            continue  # unused: left to the replacement step
        pattern = _rows_pattern(users, n_signals, signals_by_row.dtype)
        user_codes = codes[:, users]                                # Gamma_I (K, m)
        own_codes = codes[atom_index, users]                        # g_orig (m,)
        old_atom = dictionary[:, atom_index].clone()

        def residual_times(coefficients: Tensor) -> Tensor:         # E_I v, shape (d,)
            signal_part = torch.nn.functional.embedding_bag(
                users[None, :], signals_by_row, per_sample_weights=coefficients[None, :],
                mode="sum")[0]                                      # X_I^T v
            return (signal_part - dictionary @ (user_codes @ coefficients)
                    + old_atom * (own_codes @ coefficients))

        def residual_transposed_times(atom: Tensor) -> Tensor:     # E_I^T u, shape (m,)
            signal_part = torch.sparse.sampled_addmm(
                pattern, signals_by_row, atom[:, None], beta=0.0).values()  # X_I u
            return (signal_part - user_codes.T @ (dictionary.T @ atom)
                    + own_codes * (old_atom @ atom))

        coefficients = own_codes
        new_atom = None
        for _ in range(power_iterations):
            direction = residual_times(coefficients)
            norm = torch.linalg.vector_norm(direction)
            if not bool(norm > 0):
                break  # E_I g == 0: the atom's users are already exactly represented
            new_atom = direction / norm
            coefficients = residual_transposed_times(new_atom)
        if new_atom is None:
            continue
        # The products above read the *old* atom through ``dictionary``; write only now.
        dictionary[:, atom_index] = new_atom
        codes[atom_index, users] = coefficients


def _atoms_to_replace(
    dictionary: Tensor, usage: Tensor, coherence_threshold: float | None,
    replace_unused: bool,
) -> list[int]:
    """Unused atoms, then greedily one atom of each pair above the coherence threshold."""
    to_replace = torch.zeros(dictionary.shape[1], dtype=torch.bool, device=dictionary.device)
    if replace_unused:
        to_replace |= usage == 0
    if coherence_threshold is not None:
        cosines = (dictionary.T @ dictionary).abs()
        cosines.fill_diagonal_(0.0)
        cosines[to_replace] = 0.0
        cosines[:, to_replace] = 0.0
        while True:
            flat_index = int(torch.argmax(cosines))
            first, second = divmod(flat_index, cosines.shape[1])
            if not bool(cosines[first, second] > coherence_threshold):
                break
            # Keep the atom more signals rely on; on a tie keep the lower index.
            if usage[first] < usage[second] or (usage[first] == usage[second] and first > second):
                victim = first
            else:
                victim = second
            to_replace[victim] = True
            cosines[victim] = 0.0
            cosines[:, victim] = 0.0
    return torch.nonzero(to_replace).squeeze(1).tolist()


def _replace_atoms(
    dictionary: Tensor, codes: Tensor, atoms: list[int], signals_by_row: Tensor,
    residuals: Tensor, coherence_threshold: float | None, generator: torch.Generator | None,
    replacement: Replacement = "residuals",
) -> None:
    """Put the worst-reconstructed samples' residuals (or the samples themselves, with
    ``replacement="samples"``), normalised, in place of ``atoms``, in place."""
    kept = torch.ones(dictionary.shape[1], dtype=torch.bool, device=dictionary.device)
    kept[atoms] = False
    pending = list(atoms)
    candidates = torch.argsort(residuals, descending=True).to(dictionary.device)
    position = 0
    while pending and position < candidates.numel():
        batch = candidates[position:position + _CANDIDATE_BATCH]
        position += batch.numel()
        samples = signals_by_row.index_select(0, batch).T           # (d, b)
        if replacement == "residuals":
            # x - D gamma with the current atoms and codes: the part of the sample the
            # dictionary misses, hence far less coherent with the kept atoms than the sample
            # (post-ReLU samples are all alike; replaced atoms have zero codes here).
            samples = samples - dictionary @ codes[:, batch]
        norms = torch.linalg.vector_norm(samples, dim=0)
        for column in range(batch.numel()):
            if not pending:
                break
            if not bool(norms[column] > 0):
                continue
            atom = samples[:, column] / norms[column]
            if coherence_threshold is not None and bool(kept.any()):
                if float((dictionary[:, kept].T @ atom).abs().max()) > coherence_threshold:
                    continue
            index = pending.pop(0)
            dictionary[:, index] = atom
            codes[index] = 0.0
            kept[index] = True
    if pending:
        log.warning("ksvd: samples exhausted, %d atoms replaced by random unit vectors",
                    len(pending))
        dictionary[:, pending] = _random_unit_atoms(dictionary.shape[0], len(pending),
                                                    dictionary, generator)
        codes[pending] = 0.0


def ksvd(
    signals: Tensor,
    initial_dictionary: Tensor,
    n_nonzero: int = DEFAULT_N_NONZERO,
    *,
    max_iter: int = 30,
    tol: float = DEFAULT_TOL,
    coherence_threshold: float | None = None,
    replace_unused: bool = True,
    power_iterations: int = 1,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    generator: torch.Generator | None = None,
    replacement: Replacement = "residuals",
) -> DictionaryResult:
    """Learn a dictionary by (approximate) K-SVD with coherence control (method.md B.3, B.5).

    Parameters
    ----------
    signals : Tensor of shape (d, N)
        One sample per column (for patches stored one per row, ``P`` of shape (N, d), pass
        ``P.T``: a view, and then no copy is made). Float32 or float64, CPU or CUDA.
    initial_dictionary : Tensor of shape (d, K)
        Starting atoms: :func:`init_dictionary_from_samples`, or the previous dictionary for a
        warm start. Normalised here; moved to the dtype and device of ``signals``.
    n_nonzero : int, default 15
        OMP sparsity L (Table 9).
    max_iter : int, default 30
        Largest number of iterations (atom-update sweeps).
    tol : float, default 1e-4
        Stop when the relative change of the reconstruction error is below it (Table 9).
    coherence_threshold : float, optional
        Replace atoms whose largest absolute cosine to another atom exceeds it (e.g. 0.95);
        None disables the coherence rule (unused atoms are still replaced).
    replace_unused : bool, default True
        Replace atoms that no signal uses.
    power_iterations : int, default 1
        Power iterations of the rank-1 update: 1 is Rubinstein et al.'s approximate K-SVD;
        larger values approach the exact SVD update.
    chunk_size : int, default 4096
        Signals per OMP batch (memory bound only).
    generator : torch.Generator, optional
        CPU generator for random replacement atoms (only used when candidates run out).
    replacement : {"residuals", "samples"}, default "residuals"
        What replaces an atom: the normalised residual ``x - D gamma`` of the worst-
        reconstructed samples, or (``"samples"``) those samples themselves. With
        non-negative, alike samples (post-ReLU patches, B.4 vectors) the samples are all
        more coherent with the kept atoms than the threshold, so "samples" ran out and fell
        back to random unit atoms (152 of them in the first pass on real features); the
        residuals are what the dictionary misses and pass the coherence check.

    Returns
    -------
    DictionaryResult
    """
    if signals.ndim != 2 or not signals.is_floating_point():
        raise ValueError(f"signals must be a floating (d, N) tensor, got {tuple(signals.shape)} "
                         f"{signals.dtype}")
    if initial_dictionary.ndim != 2 or initial_dictionary.shape[0] != signals.shape[0]:
        raise ValueError(f"initial_dictionary must be (d={signals.shape[0]}, K), got "
                         f"{tuple(initial_dictionary.shape)}")
    if max_iter < 0 or tol < 0 or power_iterations < 1 or n_nonzero < 1:
        raise ValueError("need max_iter >= 0, tol >= 0, power_iterations >= 1, n_nonzero >= 1")
    if coherence_threshold is not None and not 0 < coherence_threshold <= 1:
        raise ValueError(f"coherence_threshold must be in (0, 1], got {coherence_threshold}")
    if replacement not in ("residuals", "samples"):
        raise ValueError(f"replacement must be 'residuals' or 'samples', got {replacement!r}")
    dictionary = initial_dictionary.to(dtype=signals.dtype, device=signals.device, copy=True)
    atom_norms = torch.linalg.vector_norm(dictionary, dim=0)
    if not bool((atom_norms > 0).all()):
        raise ValueError("initial_dictionary has zero atoms")
    dictionary /= atom_norms

    # One row per signal: the atom update gathers the signals that use an atom, and rows of
    # a row-major matrix are contiguous. ``X.T`` of a row-major (N, d) tensor costs nothing.
    signals_by_row = signals.T.contiguous()
    squared_norms = (signals_by_row * signals_by_row).sum(dim=1)
    total_energy = float(squared_norms.double().sum())

    def code(current: Tensor) -> tuple[Tensor, Tensor, float]:
        gram = gram_matrix(current)
        correlations = (signals_by_row @ current).T                 # (K, N) view
        codes = omp(gram, correlations, n_nonzero, chunk_size=chunk_size)
        residuals = reconstruction_errors(gram, correlations, codes, squared_norms)
        relative = (float(residuals.sum()) / total_energy) ** 0.5 if total_energy > 0 else 0.0
        return codes, residuals, relative

    codes, residuals, error = code(dictionary)
    errors = [error]
    coherence = [mutual_coherence(dictionary)]
    replaced: list[tuple[int, ...]] = []
    converged = False
    for iteration in range(1, max_iter + 1):
        _update_atoms(signals_by_row, dictionary, codes, power_iterations)
        usage = (codes != 0).sum(dim=1)
        atoms = _atoms_to_replace(dictionary, usage, coherence_threshold, replace_unused)
        if atoms:
            _replace_atoms(dictionary, codes, atoms, signals_by_row, residuals,
                           coherence_threshold, generator, replacement)
        replaced.append(tuple(atoms))
        coherence.append(mutual_coherence(dictionary))
        codes, residuals, error = code(dictionary)
        errors.append(error)
        previous = errors[-2]
        change = abs(previous - error) / previous if previous > 0 else 0.0
        log.debug("ksvd iteration %d: error %.6g (change %.3g), coherence %.4f, %d replaced",
                  iteration, error, change, coherence[-1], len(atoms))
        if change < tol:
            converged = True
            break
    return DictionaryResult(
        dictionary=dictionary,
        codes=codes,
        errors=torch.tensor(errors, dtype=torch.float64),
        coherence=torch.tensor(coherence, dtype=torch.float64),
        replaced_atoms=tuple(replaced),
        n_iter=len(replaced),
        converged=converged,
    )
