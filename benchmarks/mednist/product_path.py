"""MedNIST through the product, as a site without ImageNet weights would run it.

    python benchmarks/mednist/product_path.py WORK [--archive-per-class 400]
        [--queries-per-class 100] [--size 64] [--epochs 10] [--port 11190]

1. Wrap an *archive* part of MedNIST (``../shared/data/mednist``) as DICOM with its Modality /
   BodyPartExamined tags, and a disjoint *query* part without them (``wrap_as_dicom.py``).
2. Send the archive through the listener (``serve`` + ``send``), then the site's own commands:
   ``recluster`` (tag clusters), ``train-backbone`` on those tag clusters, the image worker
   with the trained weights, and ``image-model`` (DDicCIR fit, ``--ranking auto``).
3. Query every query-part file by its pixels against the archive, the way ``query FILE`` does
   (``SimilarImages.code_file``: the active model's backbone at the worker's input size, its
   index and ranking), and count hits of the query's MedNIST label: P@20 / mAP@20.
4. In the same table: cosine of pooled features of the trained backbone (no clusters), and of a
   randomly initialised DenseNet121 (seed 0) at the same size and at 224 px, the floor; image
   cluster purity of the fitted model against k-means on the trained features.

The query files never enter the archive, so neither the tag clusters nor the backbone saw
them. Every step's wall time is printed and saved with the metrics in ``WORK/result.json``.
Needs the repository's virtual environment; writes only under WORK.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def run_step(name: str, command: list[str], timings: dict, env: dict) -> None:
    print(f"== {name}: {' '.join(command)}", flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, cwd=ROOT)
    timings[name] = round(time.perf_counter() - started, 1)
    print(f"== {name}: {timings[name]:.1f} s (load {os.getloadavg()[0]:.1f})", flush=True)
    record = Path(env["PACS_DATA_DIR"]).parent / "timings.json"
    saved = json.loads(record.read_text()) if record.exists() else {}
    record.write_text(json.dumps({**saved, **timings}, indent=2))


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 300) -> None:
    """Until the listener accepts connections (the embedded database starts first)."""
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"serve exited with {process.returncode}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on port {port} after {timeout:.0f} s")


def read_labels(path: Path) -> dict[str, dict]:
    with path.open(newline="") as handle:
        return {row["sop_instance_uid"]: row for row in csv.DictReader(handle)}


def wrapped_file(part: Path, row: dict) -> Path:
    """Where ``wrap_as_dicom.py`` wrote a labels.csv row's image under ``part``."""
    return part / "dicom" / row["label"] / (Path(row["image"]).stem + ".dcm")


def cosine_scores(queries, archive):
    import numpy as np

    a = archive / np.linalg.norm(archive, axis=1, keepdims=True).clip(1e-12)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True).clip(1e-12)
    return np.argsort(-(q @ a.T), axis=1, kind="stable")


def metrics_of(ranked_labels, query_labels, depth: int = 20) -> dict:
    """P@depth and mAP@depth of label-index rankings (n_queries, >= depth)."""
    import numpy as np

    from pipelines.retrieval_metrics import (
        binary_relevance, mean_average_precision_at, one_hot, precision_at,
    )

    n = int(max(ranked_labels.max(), query_labels.max())) + 1
    relevance = binary_relevance(one_hot(query_labels, n),
                                 one_hot(ranked_labels[:, :depth].ravel(), n)
                                 .reshape(len(query_labels), depth, n))
    return {f"P@{depth}": float(precision_at(relevance, [depth]).mean()),
            f"mAP@{depth}": float(mean_average_precision_at(relevance, [depth])[0]),
            "queries": int(len(query_labels))}


def pooled_of_files(module, paths: list[Path], size: int, batch: int = 64):
    import numpy as np
    import torch

    from pipelines.backbone import Backbone, extract_features
    from pipelines.pixels import file_to_image

    backbone = Backbone(module=module.eval(), device=torch.device("cpu"), model_version="x")
    parts = []
    for start in range(0, len(paths), batch):
        images = torch.from_numpy(np.stack([file_to_image(p, size=size)
                                            for p in paths[start:start + batch]]))
        parts.append(extract_features(backbone, images)[1].float().numpy())
    return np.concatenate(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--archive-per-class", type=int, default=400)
    parser.add_argument("--queries-per-class", type=int, default=100)
    parser.add_argument("--size", type=int, default=64, help="train-backbone --size")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--port", type=int, default=11190)
    parser.add_argument("--skip-to", choices=["train", "worker", "image-model", "query"],
                        help="resume a run whose earlier steps are done")
    parser.add_argument("--stop-before", choices=["train", "worker", "image-model", "query"],
                        help="end the run before this step (--skip-to it later)")
    args = parser.parse_args()

    work = args.work.resolve()
    data_dir = work / "data"
    weights = work / "backbone" / "best.pt"
    env = dict(os.environ, PACS_DATA_DIR=str(data_dir), PACS_PORT=str(args.port),
               PACS_LOG_FORMAT="text", OMP_WAIT_POLICY="PASSIVE")
    cli = [sys.executable, "-m", "service.cli"]
    wrap = [sys.executable, "benchmarks/mednist/wrap_as_dicom.py"]
    timings: dict[str, float] = {}
    result_path = work / "result.json"
    if (work / "timings.json").exists():
        timings.update(json.loads((work / "timings.json").read_text()))
    order = ["train", "worker", "image-model", "query"]
    skip = order.index(args.skip_to) if args.skip_to else -1
    stop = order.index(args.stop_before) if args.stop_before else len(order)

    if skip < 0:
        run_step("wrap archive", wrap + [str(work / "archive"), "--per-class",
                                         str(args.archive_per_class)], timings, env)
        run_step("wrap queries", wrap + [str(work / "queries"), "--per-class",
                                         str(args.queries_per_class), "--without-labels",
                                         "--exclude-csv", str(work / "archive" / "labels.csv")],
                 timings, env)
        serve = subprocess.Popen(cli + ["serve"], env=env, cwd=ROOT)
        try:
            wait_for_port(args.port, serve)
            run_step("send archive (C-STORE)", cli + [
                "send", str(work / "archive" / "dicom"), "--to", f"127.0.0.1:{args.port}"],
                timings, env)
        finally:
            serve.send_signal(signal.SIGINT)
            serve.wait(timeout=120)
        run_step("tags worker", cli + ["worker", "--stage", "tags", "--drain"], timings, env)
        run_step("recluster", cli + ["recluster"], timings, env)
    if stop <= 0:
        return 0
    if skip < 1:
        run_step("train-backbone", cli + [
            "train-backbone", "--size", str(args.size), "--epochs", str(args.epochs),
            "--out", str(work / "backbone")], timings, env)
    env["PACS_IMAGE_WEIGHTS"] = str(weights)
    if stop <= 1:
        return 0
    if skip < 2:
        run_step("image worker", cli + ["worker", "--stage", "image", "--drain"], timings, env)
    if stop <= 2:
        return 0
    if skip < 3:
        run_step("image-model", cli + ["image-model", "--report",
                                       str(work / "image-model.html")], timings, env)
    if stop <= 3:
        return 0

    import numpy as np
    import torch
    from sklearn.cluster import KMeans

    from pipelines.backbone import build_densenet121, extract_features
    from pipelines.pixels import file_to_image
    from pipelines.retrieval_metrics import cluster_purity, one_hot
    from service.config import load_settings
    from service.database.engine import open_database
    from service.images.image_annotation import SimilarImages

    archive_labels = read_labels(work / "archive" / "labels.csv")
    query_rows = list(read_labels(work / "queries" / "labels.csv").values())
    names = sorted({row["label"] for row in archive_labels.values()})
    query_paths = [wrapped_file(work / "queries", row) for row in query_rows]
    query_labels = np.array([names.index(row["label"]) for row in query_rows])
    table: dict[str, dict] = {}

    settings = load_settings(None, data_dir=data_dir)
    with open_database(settings) as database:
        similar = SimilarImages(database.engine)
        active, index_uids, index_clusters, _ = similar._load_index()
        backbone = similar.query_backbone(weights)
        size = similar.input_size()
        print(f"== query {len(query_paths)} files: image model {active.id}, ranking "
              f"{active.model.ranking}, input {size} px, {len(index_uids)} indexed",
              flush=True)
        started = time.perf_counter()
        ranked_labels = []
        for start in range(0, len(query_paths), 64):
            images = torch.from_numpy(np.stack([file_to_image(p, size=size)
                                                for p in query_paths[start:start + 64]]))
            maps, _ = extract_features(backbone, images)
            clusters, codes = similar.code_maps(maps)
            for hits in similar.rank(clusters, codes, 20):
                ranked_labels.append([names.index(archive_labels[uid]["label"])
                                      for uid, *_ in hits])
        timings["query (in-process, batches of 64)"] = round(time.perf_counter() - started, 1)
        table[f"product: image model ({active.model.ranking})"] = metrics_of(
            np.array(ranked_labels), query_labels)
        index_labels = np.array([names.index(archive_labels[u]["label"]) for u in index_uids])
        image_cluster_purity = cluster_purity(index_clusters.numpy(), one_hot(index_labels))
        k = int(index_clusters.max()) + 1
        trained = backbone.module

    archive_uids = sorted(archive_labels)
    archive_paths = [wrapped_file(work / "archive", archive_labels[u]) for u in archive_uids]
    labels = np.array([names.index(archive_labels[u]["label"]) for u in archive_uids])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        random_init = build_densenet121(None)
    purity = {"image clusters (image model)": image_cluster_purity}
    for name, module, at in [(f"train-backbone features, cosine ({size} px)", trained, size),
                             (f"random DenseNet121, cosine ({size} px)", random_init, size),
                             ("random DenseNet121, cosine (224 px)", random_init, 224)]:
        started = time.perf_counter()
        archive_pooled = pooled_of_files(module, archive_paths, at)
        query_pooled = pooled_of_files(module, query_paths, at)
        ranking = cosine_scores(query_pooled, archive_pooled)[:, :20]
        table[name] = metrics_of(
            labels[ranking], query_labels)
        timings[f"features: {name}"] = round(time.perf_counter() - started, 1)
        if module is trained:
            kmeans = KMeans(n_clusters=k, n_init=10, random_state=0).fit(
                archive_pooled / np.linalg.norm(archive_pooled, axis=1, keepdims=True))
            purity[f"k-means (k={k}) on trained pooled features"] = cluster_purity(
                kmeans.labels_, one_hot(labels))
    chance = float(np.mean([np.mean(labels == q) for q in query_labels]))
    result = {"archive": len(archive_uids), "queries": len(query_paths), "size": size,
              "epochs": args.epochs, "timings": timings, "table": table, "purity": purity,
              "chance_P": chance}
    result_path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
