"""Sparse coding by Orthogonal Matching Pursuit, batched in torch (method.md B.3, B.5, B.7).

Problem, for every signal ``x`` (a column of ``X``) and a dictionary ``D`` of unit-norm atoms::

    gamma = argmin ||x - D gamma||_2^2   subject to   ||gamma||_0 <= L        (L = 15, Table 9)

OMP builds the support greedily: pick the atom most correlated with the residual, re-fit all
chosen coefficients by least squares, repeat. This module implements *Batch-OMP* (Rubinstein,
Zibulevsky & Elad 2008, "Efficient implementation of the K-SVD algorithm using batch
orthogonal matching pursuit", Technion CS-2008-08): everything is expressed with the Gram
matrix ``G = D^T D`` and the initial correlations ``alpha0 = D^T x``, so the residual itself
is never formed, and the least-squares re-fit uses a Cholesky factor that grows by one row per
step. Here many signals advance together: one step is a handful of tensor operations over the
whole batch, and the same code runs on CPU and CUDA (the device follows the inputs).

Selection and stopping follow scikit-learn's ``orthogonal_mp_gram`` (``_gram_omp``), so the
supports agree with it:

* the next atom is ``argmax |alpha|`` over *all* atoms (first index on ties), where
  ``alpha = alpha0 - G[:, S] gamma_S`` are the residual correlations;
* a signal stops adding atoms when that atom is already in its support, when
  ``alpha[atom]^2 < eps`` (nothing left to explain: zero signals, signals already represented
  exactly), when the new atom is linearly dependent on the chosen ones
  (``G[a, a] - ||w||^2 <= eps``, with ``w`` the new Cholesky row: duplicate atoms, ``L`` above
  the rank of ``D``), after ``L`` atoms, or -- when ``tol`` is given -- once the squared
  residual norm is ``<= tol``. ``eps`` is the machine epsilon of the dtype, as in
  scikit-learn. A stopped signal keeps the coefficients it had, so no NaN can appear.

Differences from scikit-learn, on purpose: ``n_nonzero`` larger than the number of atoms is
clipped instead of refused; with ``tol`` the sparsity cap still applies (scikit-learn ignores
``n_nonzero_coefs`` when ``tol`` is given; pass ``n_nonzero = K`` for its behaviour); no
``RuntimeWarning`` is emitted for early stops (with thousands of patches, some zero, it would
be noise).

Cholesky bookkeeping. With ``S`` the support and ``G_SS = L L^T``, the factor kept is the
*inverse* ``M = L^{-1}`` (lower triangular). Adding atom ``a``::

    w = M G[S, a],   s = sqrt(G[a, a] - ||w||^2),   new row of M = [-(w^T M) / s, 1 / s]

and ``gamma_S = M^T z`` with ``z = M alpha0_S``, whose new entry is one dot product. The
squared residual norm is ``||x||^2 - ||z||^2`` (Pythagoras: ``||z||`` is the norm of the
projection of ``x`` on the span of the chosen atoms). All per-signal operations are
elementwise products and sums over at most ``L x L`` entries, which vectorise well over the
batch; the only dense product per step is ``codes @ G`` (``n x K x K``).

Memory: signals are processed in chunks of ``chunk_size`` columns; per chunk about
``chunk_size * (4 K + L^2 + 4 L)`` values of the input dtype, plus the (K, N) result twice
(by signal, then transposed). ``sparse_encode`` also holds
``D^T X`` (``K x N``), smaller than ``X`` itself.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["omp", "sparse_encode", "gram_matrix"]

log = logging.getLogger(__name__)

DEFAULT_N_NONZERO = 15          # method.md B, Table 9: "OMP sparsity level"
DEFAULT_CHUNK_SIZE = 4096       # signals per batch; see the memory note above


def gram_matrix(dictionary: Tensor) -> Tensor:
    """``G = D^T D`` for a dictionary of shape (d, K); returns (K, K), symmetric."""
    gram = dictionary.T @ dictionary
    # Exactly symmetric: the selection rule compares G entries, and the float rounding of a
    # matmul does not guarantee G[i, j] == G[j, i].
    return (gram + gram.T) / 2


def _check_omp_inputs(
    gram: Tensor, correlations: Tensor, n_nonzero: int, tol: float | None,
    squared_norms: Tensor | None, chunk_size: int,
) -> None:
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] == 0:
        raise ValueError(f"gram must be a square (K, K) matrix with K >= 1, got shape "
                         f"{tuple(gram.shape)}")
    if correlations.ndim != 2 or correlations.shape[0] != gram.shape[0]:
        raise ValueError(
            f"correlations must have shape ({gram.shape[0]}, N), got {tuple(correlations.shape)}")
    if not gram.is_floating_point() or gram.dtype != correlations.dtype:
        raise ValueError(
            f"gram and correlations must share one floating dtype, got {gram.dtype} and "
            f"{correlations.dtype}")
    if gram.device != correlations.device:
        raise ValueError(f"gram is on {gram.device}, correlations on {correlations.device}")
    if n_nonzero < 1:
        raise ValueError(f"n_nonzero must be >= 1, got {n_nonzero}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if tol is not None:
        if tol < 0:
            raise ValueError(f"tol must be >= 0, got {tol}")
        if squared_norms is None:
            raise ValueError("tol needs squared_norms (||x||^2 of every signal, shape (N,))")
    if squared_norms is not None and squared_norms.shape != (correlations.shape[1],):
        raise ValueError(
            f"squared_norms must have shape ({correlations.shape[1]},), got "
            f"{tuple(squared_norms.shape)}")


def omp(
    gram: Tensor,
    correlations: Tensor,
    n_nonzero: int = DEFAULT_N_NONZERO,
    *,
    tol: float | None = None,
    squared_norms: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    groups: Tensor | None = None,
) -> Tensor:
    """Batch-OMP in Gram form (method.md B.3, B.5): sparse codes of many signals at once.

    Solves ``argmin_gamma ||x - D gamma||^2  s.t.  ||gamma||_0 <= n_nonzero`` for every signal
    given only ``G = D^T D`` and ``D^T x`` (Rubinstein et al. 2008); same selection rule as
    scikit-learn's ``orthogonal_mp_gram``. See the module docstring for the stopping rules.

    Parameters
    ----------
    gram : Tensor of shape (K, K)
        ``D^T D`` for a dictionary with unit-norm atoms (columns). Float32 or float64.
    correlations : Tensor of shape (K, N)
        ``D^T X``, one column per signal; same dtype and device as ``gram``.
    n_nonzero : int, default 15
        Largest number of atoms per signal (Table 9). Clipped to ``K``.
    tol : float, optional
        Stop a signal once its squared residual norm ``||x - D gamma||^2`` is ``<= tol``
        (checked after each added atom). Needs ``squared_norms``.
    squared_norms : Tensor of shape (N,), optional
        ``||x||^2`` of every signal; only used with ``tol``.
    chunk_size : int, default 4096
        Signals processed together; bounds memory, does not change the result.
    groups : Tensor of shape (N,), int64, optional
        Code each signal over its own dictionary: ``gram`` is then a stack (m, K, K) of
        ``D_j^T D_j`` and signal i uses ``gram[groups[i]]`` (its correlations must be
        ``D_groups[i]^T x_i``). One call codes a query's patches against all m cluster
        dictionaries of B.7 at once instead of m calls of a few signals each.

    Returns
    -------
    codes : Tensor of shape (K, N)
        At most ``n_nonzero`` non-zeros per column; zero columns for zero signals.

    References
    ----------
    R. Rubinstein, M. Zibulevsky, M. Elad. Efficient implementation of the K-SVD algorithm
    using batch orthogonal matching pursuit. Technion CS-2008-08, 2008.
    """
    if groups is None:
        _check_omp_inputs(gram, correlations, n_nonzero, tol, squared_norms, chunk_size)
        grams, groups = gram[None], torch.zeros(correlations.shape[1], dtype=torch.long,
                                                device=gram.device)
    else:
        if gram.ndim != 3:
            raise ValueError(f"with groups, gram must be a stack (m, K, K), got shape "
                             f"{tuple(gram.shape)}")
        _check_omp_inputs(gram[0], correlations, n_nonzero, tol, squared_norms, chunk_size)
        if groups.shape != (correlations.shape[1],) or groups.dtype != torch.long:
            raise ValueError(f"groups must be int64 of shape ({correlations.shape[1]},)")
        if groups.numel() and (int(groups.min()) < 0 or int(groups.max()) >= gram.shape[0]):
            raise ValueError(f"groups must index the {gram.shape[0]} Gram matrices")
        grams, groups = gram, groups.to(gram.device)
    n_atoms, n_signals = correlations.shape
    max_atoms = min(n_nonzero, n_atoms)
    codes_by_signal = torch.zeros((n_signals, n_atoms), dtype=gram.dtype, device=gram.device)
    correlations_by_signal = correlations.T  # (N, K) view: one row per signal
    for start in range(0, n_signals, chunk_size):
        stop = min(start + chunk_size, n_signals)
        chunk_norms = None if tol is None else squared_norms[start:stop].to(
            dtype=gram.dtype, device=gram.device)
        codes_by_signal[start:stop] = _omp_chunk(
            grams, groups[start:stop], correlations_by_signal[start:stop].contiguous(),
            max_atoms, tol, chunk_norms)
    return codes_by_signal.T.contiguous()


@dataclass
class _LiveSignals:
    """Batch-OMP state of the signals of a chunk that are still adding atoms, one row each."""

    rows: Tensor             # (n,) row in the chunk
    group: Tensor            # (n,) which Gram matrix of the stack
    alpha0: Tensor           # (n, K) D^T x
    alpha: Tensor            # (n, K) residual correlations D^T (x - D gamma)
    support: Tensor          # (n, L) chosen atoms, in order
    in_support: Tensor       # (n, K) bool
    inverse_factor: Tensor   # (n, L, L) M = L^{-1}, lower triangular
    support_alpha0: Tensor   # (n, L) alpha0 at the chosen atoms
    projections: Tensor      # (n, L) z = M alpha0_S
    gamma: Tensor            # (n, L) least-squares coefficients on the support
    squared_norms: Tensor | None  # (n,) ||x||^2, only with tol

    def keep(self, kept: Tensor) -> _LiveSignals:
        """The state of the signals at positions ``kept`` only."""
        return _LiveSignals(**{name: None if value is None else value[kept]
                               for name, value in vars(self).items()})


def _omp_chunk(
    grams: Tensor, group: Tensor, alpha0: Tensor, max_atoms: int, tol: float | None,
    squared_norms: Tensor | None,
) -> Tensor:
    """Batch-OMP for one chunk; ``alpha0`` (n, K) one row per signal, signal i over
    ``grams[group[i]]`` (grams: (m, K, K)). Returns (n, K)."""
    n_signals, n_atoms = alpha0.shape
    dtype, device = alpha0.dtype, alpha0.device
    eps = torch.finfo(dtype).eps
    codes_out = torch.zeros((n_signals, n_atoms), dtype=dtype, device=device)
    gram_diagonals = torch.diagonal(grams, dim1=1, dim2=2)                  # (m, K)
    live = _LiveSignals(
        rows=torch.arange(n_signals, device=device),
        group=group,
        alpha0=alpha0,
        alpha=alpha0.clone(),
        support=torch.zeros((n_signals, max_atoms), dtype=torch.long, device=device),
        in_support=torch.zeros((n_signals, n_atoms), dtype=torch.bool, device=device),
        inverse_factor=torch.zeros((n_signals, max_atoms, max_atoms), dtype=dtype,
                                   device=device),
        support_alpha0=torch.zeros((n_signals, max_atoms), dtype=dtype, device=device),
        projections=torch.zeros((n_signals, max_atoms), dtype=dtype, device=device),
        gamma=torch.zeros((n_signals, max_atoms), dtype=dtype, device=device),
        squared_norms=squared_norms,
    )

    def finish(stopped: Tensor, n_chosen: int) -> _LiveSignals:
        """Write the codes of the ``stopped`` (bool, (n,)) signals; keep the others live."""
        rows = torch.nonzero(stopped).squeeze(1)
        if n_chosen:
            codes_out[live.rows[rows]] = torch.zeros(
                (rows.numel(), n_atoms), dtype=dtype, device=device).scatter_(
                    1, live.support[rows, :n_chosen], live.gamma[rows, :n_chosen])
        return live.keep(torch.nonzero(~stopped).squeeze(1))

    n_chosen = 0
    for step in range(max_atoms):
        atom = torch.argmax(live.alpha.abs(), dim=1)                       # (n,)
        peak = live.alpha.gather(1, atom[:, None]).squeeze(1)
        stopping = (peak * peak < eps) | live.in_support.gather(1, atom[:, None]).squeeze(1)
        w = None
        pivot = gram_diagonals[live.group, atom]
        if step:
            gram_to_support = grams[live.group[:, None], live.support[:, :step],
                                    atom[:, None]]                         # G[S, a]: (n, step)
            w = torch.bmm(live.inverse_factor[:, :step, :step],
                          gram_to_support[:, :, None]).squeeze(2)          # M G[S, a]
            pivot = pivot - (w * w).sum(dim=1)
        stopping |= pivot <= eps                                           # dependent atom
        if bool(stopping.any()):
            going_on = torch.nonzero(~stopping).squeeze(1)
            atom, pivot = atom[going_on], pivot[going_on]
            w = None if w is None else w[going_on]
            live = finish(stopping, n_chosen)
            if not live.rows.numel():
                break

        # Grow M = L^{-1} by one row: [-(w^T M) / s, 1 / s].
        inverse_pivot = torch.rsqrt(pivot)
        if step:
            new_row = torch.bmm(w[:, None, :], live.inverse_factor[:, :step, :step]).squeeze(1)
            live.inverse_factor[:, step, :step] = -new_row * inverse_pivot[:, None]
        live.inverse_factor[:, step, step] = inverse_pivot
        live.support[:, step] = atom
        live.in_support.scatter_(1, atom[:, None], True)
        live.support_alpha0[:, step] = live.alpha0.gather(1, atom[:, None]).squeeze(1)
        n_chosen = step + 1
        live.projections[:, step] = (live.inverse_factor[:, step, :n_chosen]
                                     * live.support_alpha0[:, :n_chosen]).sum(dim=1)
        # gamma_S = M^T z: the least-squares coefficients on the support.
        live.gamma[:, :n_chosen] = torch.bmm(
            live.inverse_factor[:, :n_chosen, :n_chosen].transpose(1, 2),
            live.projections[:, :n_chosen, None]).squeeze(2)

        if n_chosen == max_atoms:
            break
        # alpha = alpha0 - G[:, S] gamma_S, from the |S| rows of each signal's own G
        support_rows = grams[live.group[:, None], live.support[:, :n_chosen]]  # (n, |S|, K)
        live.alpha = live.alpha0 - torch.bmm(live.gamma[:, None, :n_chosen],
                                             support_rows).squeeze(1)
        if tol is not None:
            residual = live.squared_norms - (live.projections[:, :n_chosen] ** 2).sum(dim=1)
            done = residual <= tol
            if bool(done.any()):
                live = finish(done, n_chosen)
                if not live.rows.numel():
                    break
    if live.rows.numel():
        finish(torch.ones_like(live.rows, dtype=torch.bool), n_chosen)
    return codes_out


def sparse_encode(
    signals: Tensor,
    dictionary: Tensor,
    n_nonzero: int = DEFAULT_N_NONZERO,
    *,
    tol: float | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """OMP codes of signals over a dictionary (method.md B.3, B.5, B.7): ``X ~= D @ codes``.

    Parameters
    ----------
    signals : Tensor of shape (d, N)
        One signal per **column** (SPAMS / K-SVD convention, so that ``X ~= D @ codes``).
        For patches stored one per row, an ``(N, d)`` tensor ``P``, pass ``P.T`` (a view; no
        copy is made).
    dictionary : Tensor of shape (d, K)
        Unit-norm atoms as columns; same dtype and device as ``signals``. Atoms are not
        re-normalised here: OMP with non-unit atoms selects by unnormalised correlation.
    n_nonzero : int, default 15
        Largest number of atoms per signal (Table 9).
    tol : float, optional
        Stop a signal once ``||x - D gamma||^2 <= tol`` (see :func:`omp`).
    chunk_size : int, default 4096
        Signals coded together (bounds memory, does not change the result).

    Returns
    -------
    codes : Tensor of shape (K, N)
    """
    if signals.ndim != 2 or dictionary.ndim != 2 or signals.shape[0] != dictionary.shape[0]:
        raise ValueError(
            f"signals (d, N) and dictionary (d, K) must share d, got {tuple(signals.shape)} "
            f"and {tuple(dictionary.shape)}")
    if signals.dtype != dictionary.dtype or signals.device != dictionary.device:
        raise ValueError("signals and dictionary must share dtype and device")
    gram = gram_matrix(dictionary)
    correlations = dictionary.T @ signals
    squared_norms = None if tol is None else (signals * signals).sum(dim=0)
    return omp(gram, correlations, n_nonzero, tol=tol, squared_norms=squared_norms,
               chunk_size=chunk_size)
