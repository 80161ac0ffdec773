"""Time and error of batched OMP and K-SVD against scikit-learn and SPAMS (method.md B.3, B.5).

    .venv/bin/python benchmarks/sparse_coding/bench_sparse_coding.py \
        [--device cpu|cuda] [--dtype float32|float64] [--threads N] [--parts omp ksvd]

Problem (defaults): 9,216-dim signals (3 x 3 x 1024 DenseNet121 patches) x 5,000 signals,
128 unit-norm atoms, sparsity L = 15. Data (seed 0, ``--data``):

* ``relu`` (default): ``max(W Z, 0)`` with ``W`` (d, 256) and ``Z`` (256, N) Gaussian -- non-
  negative and correlated like post-ReLU feature patches, not exactly sparse;
* ``sparse``: 15-sparse combinations of a hidden 128-atom dictionary plus 1 % noise (K-SVD can
  recover the atoms: the share with |cos| > 0.99 is printed).

Signals are scaled to unit norm, so that SPAMS' and scikit-learn's l1 weight (0.1) means what
it does for normalised features; OMP and K-SVD do not depend on the scale.

OMP rows: ours (``sparse_encode``: Gram, ``D^T X`` and Batch-OMP), ours given ``G`` and
``D^T X`` (``omp`` only), scikit-learn ``orthogonal_mp_gram`` (Gram and ``D^T X`` in numpy
included), SPAMS ``omp`` when ``spams`` (``spams-bin``, GPL-3.0, benchmark only) is importable.
Dictionary rows: our K-SVD (``--ksvd-iter`` iterations, tol 0), SPAMS ``trainDL`` (Table 9's
lambda1 = 0.1, lambda2 = 0.001, mode 2) with ``iter = --ksvd-iter`` mini-batches and with as
many mini-batches as ``--ksvd-iter`` passes over the data, and scikit-learn
``MiniBatchDictionaryLearning`` (alpha = 0.1, ``--sklearn-epochs`` passes). Every dictionary
is judged the same way: relative error ``||X - D C||_F / ||X||_F`` with ``C`` our OMP codes at
L = 15, which is how the pipeline codes. All learners start from the same ``D0`` (128 random
samples, normalised). References always run on the CPU.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

# Before torch (and SPAMS) load libgomp: with the default ACTIVE policy, idle OpenMP workers
# spin between operations, and on a shared 2-core machine they starve the main thread
# (Batch-OMP and K-SVD issue many small ops: measured 10x slower). Export
# OMP_WAIT_POLICY=ACTIVE to measure the default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipelines.dictionary_learning import init_dictionary_from_samples, ksvd  # noqa: E402
from pipelines.sparse_coding import gram_matrix, omp, sparse_encode  # noqa: E402

log = logging.getLogger("bench_sparse_coding")

try:
    import spams  # GPL-3.0: speed reference only, never imported by the package
except ImportError:
    spams = None


def make_data(kind: str, dimension: int, n_signals: int, n_atoms: int, n_nonzero: int,
              dtype: np.dtype) -> tuple[np.ndarray, np.ndarray | None]:
    rng = np.random.default_rng(0)
    if kind == "relu":
        mixing = rng.standard_normal((dimension, 256), dtype=np.float32)
        factors = rng.standard_normal((256, n_signals), dtype=np.float32)
        signals = np.maximum(mixing @ factors, 0)
        return (signals / np.linalg.norm(signals, axis=0)).astype(dtype), None
    hidden = rng.standard_normal((dimension, n_atoms))
    hidden /= np.linalg.norm(hidden, axis=0)
    codes = np.zeros((n_atoms, n_signals))
    for column in range(n_signals):
        atoms = rng.choice(n_atoms, n_nonzero, replace=False)
        codes[atoms, column] = rng.uniform(1, 2, n_nonzero) * rng.choice([-1, 1], n_nonzero)
    signals = hidden @ codes
    signals += 0.01 * np.linalg.norm(signals) / np.sqrt(signals.size) * rng.standard_normal(
        signals.shape)
    return (signals / np.linalg.norm(signals, axis=0)).astype(dtype), hidden.astype(dtype)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def repeat(function, repeats: int, device: torch.device | None = None):
    """Result of the last call, and all wall times."""
    times = []
    result = None
    for _ in range(repeats):
        if device is not None:
            synchronize(device)
        start = time.perf_counter()
        result = function()
        if device is not None:
            synchronize(device)
        times.append(time.perf_counter() - start)
    return result, times


def describe(times: list[float]) -> str:
    listed = ", ".join(f"{t:.3f}" for t in times)
    return f"best {min(times):7.3f} s  median {statistics.median(times):7.3f} s  ({listed})"


def relative_error(signals: torch.Tensor, dictionary: torch.Tensor, n_nonzero: int) -> float:
    dictionary = dictionary / torch.linalg.vector_norm(dictionary, dim=0)
    codes = sparse_encode(signals, dictionary, n_nonzero)
    residual = torch.linalg.matrix_norm((signals - dictionary @ codes).double())
    return float(residual / torch.linalg.matrix_norm(signals.double()))


def same_support_share(first: np.ndarray, second: np.ndarray) -> float:
    return float(np.mean(np.all((first != 0) == (second != 0), axis=0)))


def bench_omp(args, signals_np: np.ndarray, device: torch.device) -> None:
    if args.omp_dictionary == "random":
        rng = np.random.default_rng(1)
        dictionary_np = rng.standard_normal((signals_np.shape[0], args.atoms))
        dictionary_np = (dictionary_np / np.linalg.norm(dictionary_np, axis=0)).astype(
            signals_np.dtype)
    else:
        dictionary_np = init_dictionary_from_samples(
            torch.from_numpy(signals_np), args.atoms, torch.Generator().manual_seed(1)).numpy()
    signals = torch.from_numpy(signals_np).to(device)
    dictionary = torch.from_numpy(dictionary_np).to(device)
    log.info("OMP, dictionary = %s unit-norm atoms, L=%d", args.omp_dictionary, args.sparsity)

    ours, times = repeat(lambda: sparse_encode(signals, dictionary, args.sparsity),
                         args.repeats, device)
    log.info("ours sparse_encode (Gram + D^T X + OMP)  %s", describe(times))
    gram, correlations = gram_matrix(dictionary), dictionary.T @ signals
    _, times = repeat(lambda: omp(gram, correlations, args.sparsity), args.repeats, device)
    log.info("ours omp only (G, D^T X given)           %s", describe(times))
    ours = ours.cpu().numpy()
    log.info("  ours relative error %.6f", relative_error(
        torch.from_numpy(signals_np), torch.from_numpy(dictionary_np), args.sparsity))

    if not args.skip_sklearn:
        from sklearn.linear_model import orthogonal_mp_gram

        def sklearn_omp():
            gram_np = dictionary_np.T @ dictionary_np
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                return orthogonal_mp_gram((gram_np + gram_np.T) / 2,
                                          dictionary_np.T @ signals_np,
                                          n_nonzero_coefs=args.sparsity)
        reference, times = repeat(sklearn_omp, args.sklearn_repeats)
        log.info("sklearn orthogonal_mp_gram (+ G, D^T X)  %s", describe(times))
        log.info("  same support as ours: %.2f %% of signals; max |coef diff| %.2e",
                 100 * same_support_share(ours, reference), np.abs(ours - reference).max())
    if spams is not None and not args.skip_spams:
        signals_f = np.asfortranarray(signals_np)
        dictionary_f = np.asfortranarray(dictionary_np)
        threads = args.threads if args.threads else -1
        codes, times = repeat(lambda: spams.omp(signals_f, dictionary_f, L=args.sparsity,
                                                numThreads=threads), args.repeats)
        codes = codes.toarray()
        residual = np.linalg.norm((signals_np - dictionary_np @ codes).astype(np.float64))
        log.info("spams.omp (numThreads=%d)                %s", threads, describe(times))
        log.info("  spams relative error %.6f; %.2f non-zeros per signal; same support as "
                 "ours: %.2f %% of signals",
                 residual / np.linalg.norm(signals_np.astype(np.float64)),
                 (codes != 0).sum() / codes.shape[1], 100 * same_support_share(ours, codes))
    elif not args.skip_spams:
        log.info("spams not importable: pip install -c constraints.txt spams-bin (GPL-3.0)")


def bench_ksvd(args, signals_np: np.ndarray, hidden: np.ndarray | None,
               device: torch.device) -> None:
    signals_cpu = torch.from_numpy(signals_np)
    signals = signals_cpu.to(device)
    initial = init_dictionary_from_samples(signals_cpu, args.atoms,
                                           torch.Generator().manual_seed(0))
    initial_np = initial.numpy()
    log.info("dictionary learning, %d atoms, D0 = random samples; error = ours OMP L=%d",
             args.atoms, args.sparsity)
    log.info("D0                                        error %.6f",
             relative_error(signals_cpu, initial, args.sparsity))

    def recovered(dictionary: np.ndarray) -> str:
        if hidden is None:
            return ""
        unit = dictionary / np.linalg.norm(dictionary, axis=0)
        share = np.mean(np.abs(unit.T @ hidden).max(axis=0) > 0.99)
        return f"  recovered {100 * share:.0f} % of hidden atoms"

    for power in args.power_iterations:
        for threshold in args.coherence_thresholds:
            def run():
                return ksvd(signals, initial.to(device), args.sparsity, max_iter=args.ksvd_iter,
                            tol=0.0, power_iterations=power,
                            coherence_threshold=None if threshold <= 0 else threshold)
            result, times = repeat(run, 1, device)
            log.info("ours ksvd %d it, power_it %d, coherence<=%s  %7.2f s  error %.6f "
                     "(own record %.6f)  coherence %.3f  replaced %d%s",
                     result.n_iter, power, threshold if threshold > 0 else "off", times[0],
                     relative_error(signals_cpu, result.dictionary.cpu(), args.sparsity),
                     float(result.errors[-1]), float(result.coherence[-1]),
                     sum(len(atoms) for atoms in result.replaced_atoms),
                     recovered(result.dictionary.cpu().numpy()))
            log.info("  error per iteration: %s",
                     " ".join(f"{e:.4f}" for e in result.errors.tolist()))

    if spams is not None and not args.skip_spams:
        signals_f = np.asfortranarray(signals_np)
        threads = args.threads if args.threads else -1
        batch = 256 * ((args.threads or torch.get_num_threads()) + 1)  # SPAMS' default
        for label, iterations in (("iter=%d" % args.ksvd_iter, args.ksvd_iter),
                                  ("%d passes" % args.ksvd_iter,
                                   args.ksvd_iter * signals_np.shape[1] // batch)):
            start = time.perf_counter()
            dictionary = spams.trainDL(signals_f, D=np.asfortranarray(initial_np), K=args.atoms,
                                       lambda1=0.1, lambda2=0.001, iter=iterations,
                                       batchsize=batch, numThreads=threads, verbose=False)
            seconds = time.perf_counter() - start
            log.info("spams trainDL %-10s (%d batches of %d)  %7.2f s  error %.6f%s",
                     label, iterations, batch, seconds,
                     relative_error(signals_cpu, torch.from_numpy(np.asarray(dictionary)),
                                    args.sparsity), recovered(np.asarray(dictionary)))
    if args.sklearn_epochs and not args.skip_sklearn:
        from sklearn.decomposition import MiniBatchDictionaryLearning
        from sklearn.exceptions import ConvergenceWarning
        warnings.simplefilter("ignore", ConvergenceWarning)  # its inner lasso, per batch
        start = time.perf_counter()
        model = MiniBatchDictionaryLearning(
            n_components=args.atoms, alpha=0.1, batch_size=256, max_iter=args.sklearn_epochs,
            fit_algorithm="cd", dict_init=initial_np.T, random_state=0, tol=0,
            max_no_improvement=None).fit(signals_np.T)
        seconds = time.perf_counter() - start
        learned = torch.from_numpy(np.ascontiguousarray(model.components_.T))
        log.info("sklearn MiniBatchDictionaryLearning %d epochs  %7.2f s  error %.6f%s",
                 args.sklearn_epochs, seconds,
                 relative_error(signals_cpu, learned, args.sparsity),
                 recovered(learned.numpy()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch (and SPAMS) threads; 0 = library defaults")
    parser.add_argument("--data", choices=["relu", "sparse"], default="relu")
    parser.add_argument("--dim", type=int, default=9216)
    parser.add_argument("--n-signals", type=int, default=5000)
    parser.add_argument("--atoms", type=int, default=128)
    parser.add_argument("--sparsity", type=int, default=15)
    parser.add_argument("--omp-dictionary", choices=["samples", "random"], default="samples",
                        help="OMP part: atoms = random normalised samples, or Gaussian")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sklearn-repeats", type=int, default=2)
    parser.add_argument("--parts", nargs="+", choices=["omp", "ksvd"], default=["omp", "ksvd"])
    parser.add_argument("--ksvd-iter", type=int, default=20)
    parser.add_argument("--power-iterations", type=int, nargs="+", default=[1])
    parser.add_argument("--coherence-thresholds", type=float, nargs="+", default=[0.0],
                        help="0 = coherence rule off")
    parser.add_argument("--sklearn-epochs", type=int, default=0,
                        help="MiniBatchDictionaryLearning passes (0 = skip; slow at d=9216)")
    parser.add_argument("--skip-sklearn", action="store_true")
    parser.add_argument("--skip-spams", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = np.dtype(args.dtype)
    signals_np, hidden = make_data(args.data, args.dim, args.n_signals, args.atoms,
                                   args.sparsity, dtype)
    log.info("data %s: %d x %d %s, device %s, torch %s threads %d, OMP_WAIT_POLICY=%s, "
             "spams %s", args.data, args.dim, args.n_signals, args.dtype, device,
             torch.__version__, torch.get_num_threads(), os.environ["OMP_WAIT_POLICY"],
             "yes" if spams is not None else "no")
    if "omp" in args.parts:
        bench_omp(args, signals_np, device)
    if "ksvd" in args.parts:
        bench_ksvd(args, signals_np, hidden, device)


if __name__ == "__main__":
    main()
