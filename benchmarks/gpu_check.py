"""One short run that proves the CUDA path: features, OMP, queries, image-model fit, worker.

    python benchmarks/gpu_check.py --out gpu_check.json            # on a GPU host, < 8 min
    python benchmarks/gpu_check.py --device cpu --quick --out x.json  # the CPU-only run (CI)

Sections, each timed and recorded even when another fails (``status``: ok / failed / skipped,
with the error):

``environment``      torch, CUDA and device names, cores, whether pgserver imports
``features``         pooled DenseNet121 features of up to 64 real images (the shared DICOM files
                     next to the repository, else synthetic CT) on the device, against fp32
                     on the CPU: largest per-image relative difference at the device's default
                     precision and in fp32 (weights: ``--weights`` or a seeded random network:
                     the difference does not depend on training)
``network``          trunk images/s at batch ``--batch`` (random 224 x 224 input), default
                     precision and fp32
``omp``              batched OMP (``pipelines.sparse_coding.sparse_encode``) on the problem of
                     benchmarks/sparse_coding (9,216-dim signals x 5,000, 128 atoms, L = 15)
                     on the device, against ``spams.omp`` on the CPU when spams imports, else
                     against the same code on the CPU (the reference is named in the output)
``query``            features + B.7 coding + ranking over 100,000 codes, ms per query, at
                     batch 1 and ``--batch`` (random model of the paper's sizes)
``image_model_fit``  ``fit_pipeline`` on ``--fit-images`` synthetic maps on the device, with
                     the pipeline's defaults: seconds, passes, stop reason
``worker``           (``--part all``) benchmarks/image_worker/run.py end to end on synthetic
                     512 x 512 CT ingested into a fresh embedded PostgreSQL: its output lines;
                     skipped with the reason when pgserver does not import

Exit status: 0 every section ran, 1 a section failed, 2 the device asked for is not there
(one line, no traceback). Needs only torch, numpy, Pillow and pydicom for ``--part core``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks" / "ddiccir"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

SHARED_DICOM = REPO.parent / "shared" / "data" / "dicom"
PAPER_OMP = dict(dimension=9216, signals=5000, atoms=128, sparsity=15)
QUICK_OMP = dict(dimension=576, signals=256, atoms=32, sparsity=5)


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(function: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median seconds of ``repeats`` warm calls (one untimed warm-up call first)."""
    function()
    _synchronise(device)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        _synchronise(device)
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def _backbone(weights: Path | None, device: torch.device, precision: str | None):
    from pipelines.backbone import Backbone, build_densenet121, default_precision, load_backbone

    if weights is not None:
        return load_backbone(weights, device=device, precision=precision)
    torch.manual_seed(0)
    module = build_densenet121().eval().to(device).to(memory_format=torch.channels_last)
    return Backbone(module=module, device=device, model_version="gpu-check-random",
                    precision=precision or default_precision(device))


def real_inputs(limit: int, size: int) -> tuple[torch.Tensor, str]:
    """Network inputs of up to ``limit`` real images, decoded by the worker's own pipeline."""
    from pipelines.pixels import NotAnImage, PixelDecodeError, file_to_image, normalise_imagenet

    images = []
    if SHARED_DICOM.is_dir():
        for path in sorted(p for p in SHARED_DICOM.rglob("*") if p.is_file()):
            try:
                images.append(file_to_image(path, size=size))  # normalised, 3 channels
            except (NotAnImage, PixelDecodeError, OSError, ValueError, AttributeError):
                continue
            if len(images) == limit:
                break
    if images:
        return torch.from_numpy(np.stack(images)), f"{len(images)} shared DICOM images"
    rng = np.random.default_rng(0)
    grey = rng.random((limit, size, size), dtype=np.float32)
    return torch.from_numpy(normalise_imagenet(grey)), f"{limit} synthetic images"


def section_environment(args, device: torch.device) -> dict:
    try:
        import pgserver  # noqa: F401
        pgserver_ok = True
    except ImportError:
        pgserver_ok = False
    return dict(torch=torch.__version__, python=platform.python_version(),
                cuda=torch.version.cuda, device=str(device),
                device_name=(torch.cuda.get_device_name(device) if device.type == "cuda"
                             else platform.processor() or platform.machine()),
                cpu_cores=os.cpu_count(), torch_threads=torch.get_num_threads(),
                pgserver=pgserver_ok)


def section_features(args, device: torch.device) -> dict:
    from pipelines.backbone import extract_features

    inputs, source = real_inputs(8 if args.quick else 64, 64 if args.quick else 224)
    _, reference = extract_features(_backbone(args.weights, torch.device("cpu"), "fp32"), inputs)
    result = dict(images=source)
    for label, precision in (("default", None), ("fp32", "fp32")):
        backbone = _backbone(args.weights, device, precision)
        _, pooled = extract_features(backbone, inputs)
        per_image = (pooled - reference).norm(dim=1) / reference.norm(dim=1).clamp_min(1e-12)
        result[label] = dict(precision=backbone.precision,
                             max_relative_difference=float(per_image.max()))
    return result


def section_network(args, device: torch.device) -> dict:
    from pipelines.backbone import extract_features

    size = 64 if args.quick else 224
    batch = torch.randn(args.batch, 3, size, size)
    result = dict(batch=args.batch, size=size)
    for label, precision in (("default", None), ("fp32", "fp32")):
        backbone = _backbone(args.weights, device, precision)
        seconds = _timed(lambda: extract_features(backbone, batch), device, args.repeats)
        result[label] = dict(precision=backbone.precision,
                             images_per_s=round(args.batch / seconds, 1))
    return result


def section_omp(args, device: torch.device) -> dict:
    from pipelines.sparse_coding import sparse_encode

    shape = QUICK_OMP if args.quick else PAPER_OMP
    rng = np.random.default_rng(0)
    mixing = rng.standard_normal((shape["dimension"], 256)).astype(np.float32)
    signals = np.maximum(mixing @ rng.standard_normal((256, shape["signals"])).astype(np.float32), 0)
    signals /= np.linalg.norm(signals, axis=0, keepdims=True)
    dictionary = signals[:, rng.choice(shape["signals"], shape["atoms"], replace=False)].copy()
    x, d = torch.from_numpy(signals), torch.from_numpy(dictionary)
    x_dev, d_dev = x.to(device), d.to(device)
    ours = _timed(lambda: sparse_encode(x_dev, d_dev, shape["sparsity"]), device, args.repeats)
    try:
        import spams  # GPL-3.0: a speed reference only, never imported by the package

        x_f, d_f = np.asfortranarray(signals), np.asfortranarray(dictionary)
        reference_name = "spams.omp (CPU)"
        reference = _timed(lambda: spams.omp(x_f, d_f, L=shape["sparsity"],
                                             numThreads=os.cpu_count()),
                           torch.device("cpu"), 1 if not args.quick else args.repeats)
    except ImportError:
        reference_name = "pipelines.sparse_coding.sparse_encode (CPU; spams not importable)"
        reference = _timed(lambda: sparse_encode(x, d, shape["sparsity"]), torch.device("cpu"),
                           1 if not args.quick else args.repeats)
    return dict(problem=shape, seconds=round(ours, 4), reference=reference_name,
                reference_seconds=round(reference, 4), speedup=round(reference / ours, 2))


def section_query(args, device: torch.device) -> dict:
    from pipelines.backbone import extract_features
    from pipelines.ddiccir import encode_queries, normalise_rows, rank_by_code
    from query_latency import random_model

    index_size = 2000 if args.quick else 100_000
    size = 224  # the model's 7 x 7 maps
    backbone = _backbone(args.weights, device, None)
    model = random_model(str(device))
    generator = torch.Generator().manual_seed(1)
    index_codes = normalise_rows(torch.randn(index_size, 256, generator=generator)).to(device)
    index_clusters = torch.randint(0, 15, (index_size,), generator=generator).to(device)
    result = dict(index=index_size, size=size)
    for batch_size in sorted({1, args.batch}):
        images = torch.randn(batch_size, 3, size, size)

        def query() -> None:
            maps, _ = extract_features(backbone, images)
            clusters, codes, _ = encode_queries(model, maps.to(device))
            rank_by_code(codes, clusters, index_codes, index_clusters, 20,
                         index_is_normalised=True)

        seconds = _timed(query, device, args.repeats)
        result[f"batch_{batch_size}_ms_per_query"] = round(1000 * seconds / batch_size, 2)
    return result


def section_image_model_fit(args, device: torch.device) -> dict:
    from pipelines.ddiccir import PipelineConfig, fit_pipeline

    n_images = 60 if args.quick else args.fit_images
    channels = 32 if args.quick else 1024
    generator = torch.Generator().manual_seed(2)
    maps = torch.randn(n_images, channels, 7, 7, generator=generator).clamp_min(0)
    pooled = maps.mean(dim=(2, 3))
    config = PipelineConfig(device=str(device))
    if args.quick:
        config = PipelineConfig(device=str(device), n_clusters=3, layer1_atoms=16,
                                layer2_atoms=24, sparsity=4, max_outer_iter=2,
                                patches_per_cluster=500)
    started = time.perf_counter()
    model = fit_pipeline(maps, pooled, config)
    _synchronise(device)
    return dict(images=n_images, channels=channels, seconds=round(time.perf_counter() - started, 2),
                passes=len(model.history), stop_reason=model.stop_reason)


def section_worker(args, device: torch.device) -> dict:
    try:
        import pgserver  # noqa: F401
    except ImportError as error:
        raise _Skipped(f"pgserver does not import ({error}); carry its wheel to run this part")
    images = 16 if args.quick else args.worker_images
    command = [sys.executable, str(REPO / "benchmarks" / "image_worker" / "run.py"),
               "--images", str(images), "--batch", str(args.batch), "--device", str(device),
               "--decode-workers", str(max(1, (os.cpu_count() or 2)))]
    done = subprocess.run(command, capture_output=True, text=True, timeout=args.worker_timeout)
    if done.returncode != 0:
        raise RuntimeError(f"run.py exited {done.returncode}: {done.stderr[-2000:]}")
    return dict(command=" ".join(command[1:]), output=done.stdout.strip().splitlines()[-12:])


class _Skipped(Exception):
    pass


SECTIONS = {
    "environment": section_environment, "features": section_features,
    "network": section_network, "omp": section_omp, "query": section_query,
    "image_model_fit": section_image_model_fit, "worker": section_worker,
}
CORE = ("environment", "features", "network", "omp", "query", "image_model_fit")


def run_sections(args, device: torch.device, names: tuple[str, ...]) -> dict:
    report: dict[str, Any] = {}
    for name in names:
        started = time.perf_counter()
        try:
            entry = dict(status="ok", **SECTIONS[name](args, device))
        except _Skipped as skipped:
            entry = dict(status="skipped", reason=str(skipped))
        except Exception as error:  # a failed section is reported; the others still run
            entry = dict(status="failed", error=f"{type(error).__name__}: {error}",
                         traceback=traceback.format_exc(limit=4))
        entry["seconds_in_section"] = round(time.perf_counter() - started, 2)
        report[name] = entry
        print(json.dumps({name: entry}, default=str), flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--part", choices=("core", "all"), default="all",
                        help="core: torch, numpy, pydicom only; all: also the worker end to end")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes: checks that every section runs (CI), times nothing")
    parser.add_argument("--weights", type=Path, help="DenseNet121 weights (default: seeded random)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fit-images", type=int, default=10_000)
    parser.add_argument("--worker-images", type=int, default=20_000)
    parser.add_argument("--worker-timeout", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it on "
              "a GPU host, or pass --device cpu for the CPU-only check", file=sys.stderr)
        return 2
    if args.quick:
        args.batch = min(args.batch, 4)
        args.repeats = 1
    names = CORE if args.part == "core" else CORE + ("worker",)
    started = time.perf_counter()
    report = run_sections(args, device, names)
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print(f"gpu_check: wrote {args.out} in {report['total_seconds']} s", file=sys.stderr)
    return 1 if any(entry.get("status") == "failed" for entry in report.values()
                    if isinstance(entry, dict)) else 0


if __name__ == "__main__":
    sys.exit(main())
