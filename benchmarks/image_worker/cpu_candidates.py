"""DenseNet121 features on the CPU: inference engines and compilers measured side by side.

    .venv/bin/python -m pip install onnxruntime onnx openvino   # measurement only, not needed
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/image_worker/cpu_candidates.py \\
        --json cpu_candidates.json [--weights W.pth] [--per-class 100] [--only NAME ...]

The network is the image worker's trunk (method.md B.1): ``maps = ReLU(features(x))``,
``pooled`` = the mean of ``maps`` over the positions (``pipelines.backbone.extract_features``).
Weights: DenseNet121 as ``build_densenet121`` initialises it under ``torch.manual_seed(0)``,
or ``--weights FILE`` (``load_backbone``). Each candidate runs in a fresh process of its own
(thread pools, oneDNN caches and compiler caches do not carry over) and gives:

* ``latency_224_ms`` / ``latency_128_ms``: one image (batch 1), warm, median of ``--repeats``
  calls, 2 threads: the ``query FILE`` case;
* ``images_per_s``: batch ``--batch`` over the real sample (full batches only), 2 threads,
  wall clock: the worker's case on a machine it has to itself;
* ``images_per_cpu_s``: batch ``--batch``, 1 thread, images per CPU-second of the process
  (``time.process_time``): what the candidate costs, much less sensitive to other jobs on
  the machine than wall time;
* ``one_off_s``: what the first call costs beyond a warm call (export, engine load, compile;
  for ``torch.compile`` and OpenVINO, which compile once per input shape, the first shape
  only; ``compile_s_all_shapes`` is the one-off with the other two, 1 x 128 px and
  32 x 224 px);
* accuracy on real images: ``--per-class`` MedNIST images of every class (seeded), made into
  network input as the worker does (grey / 255, ``fit_to_square`` to 224, ``normalise_imagenet``);
  the per-image relative difference of the pooled features, ``||p - p_ref|| / ||p_ref||``,
  against eager float32 (max and median), and leave-one-out P@20 by cosine with the MedNIST
  class as relevance (``pipelines.retrieval_metrics``), beside the reference's.

``os.getloadavg()`` (1 minute) is recorded before and after every number: the machine may be
shared, and wall-clock numbers of a loaded machine are only comparable within one run.

Candidates (``--only`` picks some; the reference always runs):

``eager-fp32``           eager PyTorch, float32, contiguous (NCHW): the reference
``eager-fp32-cl``        eager, float32, channels_last (the fallback on CPUs without bf16)
``eager-bf16-cl``        eager, bf16 autocast, channels_last: ``Backbone(precision="bf16")``
                         through ``extract_features``, the default where oneDNN has native bf16
``compile-fp32``         ``torch.compile`` (inductor, freezing, static shapes), float32
``compile-bf16``         the same under bf16 autocast
``ort-fp32``             ONNX Runtime, CPU execution provider, float32 (legacy TorchScript
                         exporter; the graph ends at the ReLU maps)
``ort-int8``             ONNX Runtime, static int8 quantisation (QDQ, per-channel weights,
                         min-max calibration on MedNIST images outside the sample)
``openvino-fp32``        OpenVINO CPU plugin on the same ONNX file, reshaped to each input
                         shape (static shapes), inference precision f32
``openvino-bf16``        the same with ``INFERENCE_PRECISION_HINT`` bf16 (where the CPU has it)

A candidate whose package is missing, or that fails, gets a row with the reason. Writes
nothing into the repository; exported files go to a temporary folder.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

DEFAULT_MEDNIST = REPO.parent / "shared" / "data" / "mednist"

CANDIDATES = {
    "eager-fp32": "eager, fp32, contiguous (reference)",
    "eager-fp32-cl": "eager, fp32, channels_last",
    "eager-bf16-cl": "eager, bf16 autocast, channels_last (current default)",
    "compile-fp32": "torch.compile (inductor, freezing), fp32",
    "compile-bf16": "torch.compile (inductor, freezing), bf16 autocast",
    "ort-fp32": "ONNX Runtime CPU EP, fp32",
    "ort-int8": "ONNX Runtime CPU EP, int8 static QDQ",
    "openvino-fp32": "OpenVINO CPU, f32",
    "openvino-bf16": "OpenVINO CPU, bf16 hint",
}
REFERENCE = "eager-fp32"
PACKAGES = ("torch", "numpy", "onnx", "onnxruntime", "openvino")

Maps = Callable[[np.ndarray], np.ndarray]
# A candidate, built: (B, 3, H, W) float32 network input -> (B, 1024, H/32, W/32) float32 maps.


class UserError(Exception):
    """A problem with the command line or the data: one line on stderr, exit code 2."""


class CompileTooSlow(Exception):
    """Raised by the alarm when the first compilation passes ``--compile-limit``."""


# ----------------------------------------------------------------------------- data

def sample_rows(root: Path, per_class: int, seed: int) -> tuple[list[dict], list[dict]]:
    """``per_class`` rows of every label (seeded, in file order) and, from the rows left
    over, a calibration set of ``max(4, per_class // 6)`` per label (for int8 only)."""
    labels_file = root / "labels.csv"
    if not labels_file.is_file():
        raise UserError(f"no MedNIST labels.csv under {root} (give --mednist)")
    with open(labels_file, newline="") as handle:
        rows = list(csv.DictReader(handle))
    rng = np.random.default_rng(seed)
    chosen, calibration = [], []
    for label in sorted({row["label"] for row in rows}):
        members = [row for row in rows if row["label"] == label]
        order = rng.permutation(len(members))
        picked = sorted(order[:per_class])
        spare = sorted(order[per_class:per_class + max(4, per_class // 6)])
        chosen.extend(members[i] for i in picked)
        calibration.extend(members[i] for i in spare)
    return chosen, calibration


def network_inputs(root: Path, rows: list[dict], size: int) -> np.ndarray:
    """(N, 3, size, size) float32 as the worker makes them: grey / 255, ``fit_to_square``,
    ``normalise_imagenet`` (as benchmarks/backbone_training/mednist_quality.py does)."""
    from PIL import Image

    from pipelines.pixels import fit_to_square, normalise_imagenet

    return np.stack([
        normalise_imagenet(fit_to_square(
            np.asarray(Image.open(root / row["image"]).convert("L"), dtype=np.float32) / 255.0,
            size=size))
        for row in rows])


# ----------------------------------------------------------------------------- candidates

def _module(weights: Path | None):
    from pipelines.backbone import build_densenet121, load_backbone

    if weights is not None:
        return load_backbone(weights, precision="fp32").module.eval()
    torch.manual_seed(0)
    return build_densenet121().eval()


def _eager(module, precision: str, channels_last: bool) -> Maps:
    from pipelines.backbone import Backbone, extract_features

    if channels_last:
        # The product path: extract_features asks for channels_last and autocasts.
        backbone = Backbone(module=module.to(memory_format=torch.channels_last),
                            device=torch.device("cpu"), model_version="candidate",
                            precision=precision)
        return lambda images: extract_features(backbone, torch.from_numpy(images))[0].numpy()
    assert precision == "fp32"
    module = module.to(memory_format=torch.contiguous_format)

    def maps(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return torch.relu(module.features(torch.from_numpy(images))).numpy()
    return maps


def _compiled(module, precision: str) -> Maps:
    import torch._dynamo.config
    import torch._inductor.config

    torch._inductor.config.freezing = True  # weights as constants: folded and prepacked
    torch._dynamo.config.automatic_dynamic_shapes = False  # one static graph per shape
    torch._dynamo.config.cache_size_limit = 16
    module = module.to(memory_format=torch.channels_last)
    features = module.features
    bf16 = precision == "bf16"

    def trunk(batch: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = features(batch)
        return torch.relu(out.float())

    compiled = torch.compile(trunk, dynamic=False)

    def maps(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            batch = torch.from_numpy(images).contiguous(memory_format=torch.channels_last)
            return compiled(batch).contiguous().numpy()
    return maps


class Trunk(torch.nn.Module):
    """``ReLU(features(x))``: what the exported graph computes."""

    def __init__(self, features: torch.nn.Module):
        super().__init__()
        self.features = features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.features(images))


def export_onnx(module, path: Path) -> Path:
    """The trunk up to the ReLU maps as ONNX (opset 17), batch and image size dynamic.
    The legacy TorchScript exporter (``dynamo=False``): it needs no extra package."""
    import warnings

    module = module.to(memory_format=torch.contiguous_format)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Trunk(module.features).eval(), (torch.zeros(1, 3, 224, 224),), str(path), dynamo=False,
            input_names=["images"], output_names=["maps"], opset_version=17,
            dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"},
                          "maps": {0: "batch", 2: "map_height", 3: "map_width"}})
    return path


def _ort_session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # No busy-waiting between operators: like OMP_WAIT_POLICY=PASSIVE for torch, so CPU time
    # is work, and other jobs on a shared machine are not starved.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda images: session.run(None, {"images": images})[0]


def _ort_int8(fp32_path: Path, work: Path, calibration: np.ndarray, threads: int) -> Maps:
    from onnxruntime.quantization import (
        CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"images": calibration[i:i + 8]}
                                 for i in range(0, len(calibration), 8)])

        def get_next(self):
            return next(self.batches, None)

    prepared = work / "trunk-prepared.onnx"
    quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
    quantised = work / "trunk-int8.onnx"
    quantize_static(str(prepared), str(quantised), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
    return _ort_session(quantised, threads)


def openvino_supports_bf16() -> bool:
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def _openvino(path: Path, precision: str, threads: int) -> Maps:
    import openvino as ov

    core = ov.Core()
    if precision == "bf16" and not openvino_supports_bf16():
        raise RuntimeError("OpenVINO's CPU plugin lists no BF16 capability on this CPU")
    config = {
        "INFERENCE_PRECISION_HINT": {"fp32": "f32", "bf16": "bf16"}[precision],
        "INFERENCE_NUM_THREADS": threads,
        "NUM_STREAMS": 1,
        "PERFORMANCE_HINT": "LATENCY",
    }
    requests = {}  # one static-shape compilation per input shape: the CPU plugin's fast path

    def maps(images: np.ndarray) -> np.ndarray:
        request = requests.get(images.shape)
        if request is None:
            model = core.read_model(str(path))
            model.reshape({0: list(images.shape)})
            request = requests[images.shape] = core.compile_model(
                model, "CPU", config).create_infer_request()
        return np.array(request.infer({0: images})[0], dtype=np.float32, copy=True)
    return maps


def build(name: str, module, work: Path, threads: int,
          calibration: Callable[[], np.ndarray]) -> Maps:
    """The candidate ``name`` as a function of the network input; raises ImportError when
    its package is missing."""
    if name == "eager-fp32":
        return _eager(module, "fp32", channels_last=False)
    if name == "eager-fp32-cl":
        return _eager(module, "fp32", channels_last=True)
    if name == "eager-bf16-cl":
        return _eager(module, "bf16", channels_last=True)
    if name.startswith("compile-"):
        return _compiled(module, name.split("-")[1])
    if name.startswith("ort-"):
        import onnxruntime  # noqa: F401  (missing package: skipped before exporting)
        path = export_onnx(module, work / "trunk.onnx")
        if name == "ort-fp32":
            return _ort_session(path, threads)
        return _ort_int8(path, work, calibration(), threads)
    if name.startswith("openvino-"):
        import openvino  # noqa: F401
        return _openvino(export_onnx(module, work / "trunk.onnx"), name.split("-")[1], threads)
    raise UserError(f"unknown candidate {name!r}")


# ----------------------------------------------------------------------------- one process

def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _alarm(signum, frame):
    raise CompileTooSlow


def run_worker(args: argparse.Namespace) -> dict:
    """One candidate in this process at ``args.threads`` threads (phase "main": latency,
    throughput and features of the sample; phase "cpu": images per CPU-second)."""
    torch.set_num_threads(args.threads)
    rows, spare = sample_rows(args.mednist, args.per_class, args.seed)
    if args.phase == "cpu":
        rows = rows[::max(1, len(rows) // (args.batch * (args.cpu_batches + 1)))]
    inputs = network_inputs(args.mednist, rows, 224)
    module = _module(args.weights)
    work = Path(tempfile.mkdtemp(prefix="cpu-candidates-"))
    result: dict = {"candidate": args.worker, "phase": args.phase, "threads": args.threads}

    started = time.perf_counter()
    maps = build(args.worker, module, work, args.threads,
                 lambda: network_inputs(args.mednist, spare, 224))
    build_s = time.perf_counter() - started

    def first_call(images: np.ndarray) -> float:
        """Seconds of the first call at this shape beyond a warm call (compilation)."""
        compiling = args.worker.startswith("compile-")
        if compiling:
            signal.signal(signal.SIGALRM, _alarm)
            signal.alarm(args.compile_limit)
        try:
            start = time.perf_counter()
            maps(images)
            first = time.perf_counter() - start
        finally:
            if compiling:
                signal.alarm(0)
        start = time.perf_counter()
        maps(images)
        return max(0.0, first - (time.perf_counter() - start))

    batch = args.batch
    if args.phase == "cpu":
        result["load_before"] = _load()
        first_call(inputs[:batch])
        timed = inputs[batch:batch * (args.cpu_batches + 1)]
        wall, cpu = time.perf_counter(), time.process_time()
        for start in range(0, len(timed), batch):
            maps(timed[start:start + batch])
        cpu_s, wall_s = time.process_time() - cpu, time.perf_counter() - wall
        result.update(images_per_cpu_s=round(len(timed) / cpu_s, 2),
                      images_per_s_one_thread_wall=round(len(timed) / wall_s, 2),
                      timed_images=len(timed), load_after=_load())
        return result

    small = network_inputs(args.mednist, rows[:1], 128)
    result["load_before"] = _load()
    first_224 = first_call(inputs[:1])
    result["one_off_s"] = round(build_s + first_224, 2)
    result["build_s"] = round(build_s, 2)
    compile_s = build_s + first_224

    def latency(image: np.ndarray) -> float:
        for _ in range(2):
            maps(image)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            maps(image)
            times.append(time.perf_counter() - start)
        return round(1000 * statistics.median(times), 2)

    result["latency_224_ms"] = latency(inputs[:1])
    result["load_after_latency_224"] = _load()
    compile_s += first_call(small)
    result["latency_128_ms"] = latency(small)
    result["load_after_latency_128"] = _load()

    compile_s += first_call(inputs[:batch])
    full = len(inputs) // batch * batch
    wall, cpu = time.perf_counter(), time.process_time()
    pooled = [maps(inputs[start:start + batch]).mean(axis=(2, 3)) for start in range(0, full, batch)]
    wall_s, cpu_s = time.perf_counter() - wall, time.process_time() - cpu
    result.update(images_per_s=round(full / wall_s, 2),
                  images_per_cpu_s_two_threads=round(full / cpu_s, 2),
                  throughput_images=full, load_after_throughput=_load())
    if full < len(inputs):  # the remainder, untimed, padded to a full batch (no new shape)
        rest = inputs[full:]
        padded = np.concatenate([rest, np.zeros((batch - len(rest),) + rest.shape[1:],
                                                dtype=rest.dtype)])
        pooled.append(maps(padded)[:len(rest)].mean(axis=(2, 3)))
    if args.worker.startswith(("compile-", "openvino-")):
        result["compile_s_all_shapes"] = round(compile_s, 2)
    np.save(args.out / f"{args.worker}.npy", np.concatenate(pooled).astype(np.float32))
    return result


# ----------------------------------------------------------------------------- the run

def loo_p_at(pooled: np.ndarray, labels: np.ndarray, n: int = 20) -> float:
    """Leave-one-out P@n (%) of cosine ranking over the sample, relevance = same class."""
    from pipelines.retrieval_metrics import binary_relevance, one_hot, precision_at

    unit = pooled / np.linalg.norm(pooled, axis=1, keepdims=True).clip(1e-12)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    ranked = np.argsort(-similarity, axis=1, kind="stable")[:, :n]
    indicator = one_hot(np.unique(labels, return_inverse=True)[1])
    return 100 * float(precision_at(binary_relevance(indicator, indicator[ranked]), [n]).mean())


def relative_differences(pooled: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per image, ``||p - p_ref|| / ||p_ref||`` (float64)."""
    reference = reference.astype(np.float64)
    return (np.linalg.norm(pooled - reference, axis=1)
            / np.linalg.norm(reference, axis=1).clip(1e-30))


def _spawn(args: argparse.Namespace, name: str, phase: str, threads: int, out: Path) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--phase",
               phase, "--threads", str(threads), "--out", str(out), "--mednist",
               str(args.mednist), "--per-class", str(args.per_class), "--seed", str(args.seed),
               "--batch", str(args.batch), "--repeats", str(args.repeats), "--cpu-batches",
               str(args.cpu_batches), "--compile-limit", str(args.compile_limit)]
    if args.weights is not None:
        command += ["--weights", str(args.weights)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               # a cold inductor cache, so compile time is what a fresh service pays
               TORCHINDUCTOR_CACHE_DIR=tempfile.mkdtemp(prefix="inductor-"))
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True,
                              timeout=args.compile_limit + 1200)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": f"{phase}: no result in "
                                              f"{args.compile_limit + 1200} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"status": "failed", "reason": f"{phase}: {tail}"[:300]}
    return json.loads(lines[-1])


def _versions() -> dict:
    found = {}
    for package in PACKAGES:
        try:
            meta = importlib.metadata.metadata(package)
        except importlib.metadata.PackageNotFoundError:
            continue
        licence = meta.get("License-Expression") or next(
            (c.split("::")[-1].strip() for c in meta.get_all("Classifier") or []
             if c.startswith("License ::")), (meta.get("License") or "")[:80])
        found[package] = {"version": meta["Version"], "licence": licence}
    return found


def _cpu() -> dict:
    model, flags = platform.processor(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    from pipelines.backbone import cpu_has_native_bf16

    return {"model": model, "cores": os.cpu_count(), "avx512_bf16": "avx512_bf16" in flags,
            "amx_bf16": "amx_bf16" in flags, "avx512_vnni": "avx512_vnni" in flags,
            "torch_native_bf16": cpu_has_native_bf16()}


def _cell(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(rows: list[dict], batch: int) -> str:
    lines = ["| candidate | 1 image 224 px, ms | 1 image 128 px, ms | "
             f"batch {batch}, images/s "
             "(2 threads) | images per CPU-s (1 thread) | one-off, s | max rel. diff | "
             "median rel. diff | P@20 | load (1 min) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if row.get("status") != "ok":
            lines.append(f"| {row['candidate']} | {row.get('status')}: {row.get('reason')} "
                         "|  |  |  |  |  |  |  |  |")
            continue
        loads = [row[k] for k in row if k.startswith("load")]
        one_off = _cell(row["one_off_s"])
        if "compile_s_all_shapes" in row:
            one_off += f" ({row['compile_s_all_shapes']:.0f} with all shapes)"
        lines.append(
            f"| {row['candidate']} | {_cell(row['latency_224_ms'])} | "
            f"{_cell(row['latency_128_ms'])} | {_cell(row['images_per_s'])} | "
            f"{_cell(row.get('images_per_cpu_s'))} | {one_off} | "
            f"{row['max_relative_difference']:.1e} | {row['median_relative_difference']:.1e} | "
            f"{row['p20']:.2f} % | {min(loads):.1f}-{max(loads):.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--weights", type=Path, help="DenseNet121 weights file; default: "
                        "random initialisation under torch.manual_seed(0)")
    parser.add_argument("--mednist", type=Path, default=DEFAULT_MEDNIST)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15, help="timed single-image calls")
    parser.add_argument("--cpu-batches", type=int, default=2,
                        help="timed batches of the 1-thread CPU-time measurement")
    parser.add_argument("--compile-limit", type=int, default=300,
                        help="seconds torch.compile may take for its first shape")
    parser.add_argument("--only", nargs="+", choices=sorted(CANDIDATES), metavar="NAME",
                        help=f"candidates to run ({', '.join(CANDIDATES)})")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--phase", choices=("main", "cpu"), help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    try:
        if args.worker:
            try:
                print(json.dumps(dict(run_worker(args), status="ok")), flush=True)
            except ImportError as error:
                print(json.dumps({"status": "skipped", "reason": f"not installed: {error.name}"}))
            except CompileTooSlow:
                print(json.dumps({"status": "skipped", "reason": "first compilation took "
                                  f"more than {args.compile_limit} s"}))
            return 0
        if args.weights is not None and not args.weights.is_file():
            raise UserError(f"weights file not found: {args.weights}")
        rows, _ = sample_rows(args.mednist, args.per_class, args.seed)
        if len(rows) <= 20:
            raise UserError(f"{len(rows)} images: P@20 needs more than 20 (raise --per-class)")
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    labels = np.array([row["label"] for row in rows])
    names = [REFERENCE] + [n for n in (args.only or CANDIDATES) if n != REFERENCE]
    out = Path(tempfile.mkdtemp(prefix="cpu-candidates-"))
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
              "command": " ".join(shlex.quote(a) for a in [
                  "benchmarks/image_worker/cpu_candidates.py", *(argv or sys.argv[1:])]),
              "cpu": _cpu(), "packages": _versions(), "images": len(rows),
              "classes": len(set(labels)), "weights": str(args.weights or "random, seed 0"),
              "batch": args.batch, "repeats": args.repeats, "candidates": []}
    print(f"{len(rows)} MedNIST images, {len(set(labels))} classes; CPU {report['cpu']}; "
          f"packages {report['packages']}", flush=True)
    reference = None
    reference_p20 = None
    for name in names:
        row = {"candidate": name, "description": CANDIDATES[name]}
        main_result = _spawn(args, name, "main", 2, out)
        row.update(main_result)
        if main_result.get("status") == "ok":
            cpu_result = _spawn(args, name, "cpu", 1, out)
            if cpu_result.get("status") == "ok":
                row.update(images_per_cpu_s=cpu_result["images_per_cpu_s"],
                           images_per_s_one_thread_wall=cpu_result[
                               "images_per_s_one_thread_wall"],
                           load_before_cpu=cpu_result["load_before"],
                           load_after_cpu=cpu_result["load_after"])
            else:
                row["cpu_phase"] = cpu_result
            pooled = np.load(out / f"{name}.npy")
            if reference is None:
                reference = pooled
            differences = relative_differences(pooled, reference)
            row.update(max_relative_difference=float(differences.max()),
                       median_relative_difference=float(np.median(differences)),
                       p20=round(loo_p_at(pooled, labels), 2))
            reference_p20 = reference_p20 if reference_p20 is not None else row["p20"]
            row["p20_minus_reference"] = round(row["p20"] - reference_p20, 2)
        elif name == REFERENCE:
            print(f"error: the reference failed: {main_result.get('reason')}", file=sys.stderr)
            return 1
        report["candidates"].append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
    print(table(report["candidates"], args.batch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
