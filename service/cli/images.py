"""The image stages' commands: the ``image`` worker, ``train-backbone``, ``image-model``,
``image-report``, ``query``, ``visual-check`` and ``evaluate``.

Torch, the pipelines and the image stages load inside the verbs: ``evaluate``'s options, whose
defaults are the pipeline's, are added when that command is used
(:func:`~service.cli.common.add_arguments_when_used`)."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Sequence

from .common import (Settings, add_arguments_when_used, command, database, int_at_least, log,
                     pending, positive_int, share, stop_on_signals)


def image_worker(settings: Settings, *, name: str, batch: int | None = None,
                 drain: bool = False) -> int:
    """``worker --stage image``: DenseNet121 features of stored images until stopped, or
    with ``drain`` until nothing is pending."""
    from pipelines.backbone import WeightsMissingError, load_backbone

    from ..images.image_worker import (ImageWorker, enqueue_missing, requeue_missing_decoders,
                                       resolve_device)

    device = resolve_device(settings.image_device)
    try:
        backbone = load_backbone(settings.image_weights, device=device)
    except (WeightsMissingError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with database(settings) as opened:
        stop = stop_on_signals()
        queued = enqueue_missing(opened.engine)
        if queued:
            log.info("queued the image backlog", extra={"instances": queued})
        requeued = requeue_missing_decoders(opened.engine)
        if requeued:
            log.info("trying again the images that lacked a decoder",
                     extra={"instances": requeued})
        with ImageWorker(opened.engine, backbone, storage_root=settings.storage_path,
                         feature_store=settings.feature_store_path, name=name,
                         batch=batch or settings.image_batch,
                         decode_workers=settings.image_decode_workers,
                         max_attempts=settings.image_max_attempts,
                         image_size=backbone.input_size,
                         weights_path=settings.image_weights) as worker:
            log.info("image worker running", extra={"device": device,
                                                    "model_version": backbone.model_version,
                                                    "input_size": backbone.input_size})
            if drain:
                from ..progress import progress

                with progress(total=pending(opened.engine, "image"), desc="image features",
                              unit="image") as bar:
                    # until nothing is pending: items waiting for a retry are waited for
                    worker.drain(stop, bar.update)
            else:
                worker.run(stop)
        print(json.dumps({"worker": name, **worker.stats}))
    return 0


def train_backbone(settings: Settings, *, out: str, epochs: int, batch_size: int, lr: float,
                   warmup_epochs: float, val_fraction: float, group_by: str,
                   min_val_images: int, patience: int, max_per_class: int,
                   min_per_class: int, size: int, precision: str, seed: int,
                   no_augment: bool = False, restart: bool = False) -> int:
    """Train DenseNet121 on the site's images to predict their tag cluster; the checkpoint
    folder ``out`` resumes an earlier run unless ``restart``."""
    import time

    from pipelines.backbone_training import RadiologyAugment
    from pipelines.backbone_training import train_backbone as train

    from ..images.backbone_data import build_training_set
    from ..progress import stderr_lines

    out = Path(out)
    say = stderr_lines()
    with database(settings) as opened:
        try:
            training = build_training_set(
                opened.engine, settings.storage_path, max_per_class=max_per_class,
                min_per_class=min_per_class, size=size, seed=seed,
                group_by=group_by, decode_workers=settings.image_decode_workers,
                progress=say)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    merged = training.merged_classes
    say(f"{len(training.labels):,} images in {len(set(training.groups)):,} groups "
        f"({group_by}), {len(training.classes)} classes from the "
        f"{len(training.cluster_sizes)} tag clusters of run {training.tag_cluster_run} "
        f"({training.undecodable} not decodable"
        + (f"; {len(merged)} clusters under {min_per_class} images merged into the one "
           f"with the nearest medoid: " + ", ".join(
               f"{small}->{kept}" for small, kept in sorted(merged.items())) if merged else "")
        + ")")
    from ..progress import counts_callback, progress

    stop = stop_on_signals()
    with progress(total=epochs, desc="train-backbone", unit="batch") as bar:
        batches_done = counts_callback(bar)
        last_line = [0.0]

        def batch_done(record: dict) -> None:
            batches_done((record["epoch"] - 1) * record["batches"] + record["batch"],
                         epochs * record["batches"])
            now = time.monotonic()
            if record["batch"] == 1 or now - last_line[0] >= 30:
                last_line[0] = now
                say("epoch {epoch} batch {batch}/{batches}: loss {loss:.3f}, "
                    "{images_per_second:.1f} images/s".format(**record))

        def epoch_done(record: dict) -> None:
            say("epoch {epoch}: train loss {train_loss:.3f}, val accuracy {val_accuracy:.3f}, "
                "balanced {val_balanced_accuracy:.3f}, {train_images_per_second:.1f} images/s"
                .format(**record))

        try:
            result = train(
                training.dataset, training.labels, classes=training.classes,
                groups=None if group_by == "image" else training.groups,
                checkpoint_dir=out, tag_cluster_run=training.tag_cluster_run,
                epochs=epochs, batch_size=batch_size, lr=lr,
                warmup_epochs=warmup_epochs, val_fraction=val_fraction,
                min_val_images=min_val_images, patience=patience,
                augment=None if no_augment else RadiologyAugment(),
                device=None if settings.image_device == "auto" else settings.image_device,
                precision=precision, seed=seed, resume=not restart,
                extra_metadata={"merged_classes": {str(k): v for k, v in merged.items()},
                                "group_by": group_by},
                progress=epoch_done, batch_progress=batch_done, stop=stop)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if result.interrupted:
        print(f"interrupted: {out / 'last.pt'} holds the position; run the same command again "
              f"to continue", file=sys.stderr)
        return 130
    print(f"best held-out accuracy {result.best_val_accuracy:.3f}, balanced accuracy "
          f"{result.best_val_balanced_accuracy:.3f} at epoch {result.best_epoch} of "
          f"{result.epochs_run}{' (stopped early)' if result.stopped_early else ''}; "
          f"{result.n_val:,} held-out images, split by {group_by}")
    if result.best_epoch:
        for cluster, accuracy, support in zip(
                training.classes, result.best_val_per_class_accuracy,
                result.history[result.best_epoch - 1]["val_support"]):
            shown = "no held-out image" if accuracy is None else f"{accuracy:.3f}"
            print(f"  tag cluster {cluster}: {shown} ({support} held out)")
    print(f"weights: {result.checkpoint_path}")
    print(f"use them: PACS_IMAGE_WEIGHTS={result.checkpoint_path}")
    return 0


def image_model(settings: Settings, *, clusters: int, max_iterations: int, max_images: int,
                pooling: str, seed: int, ranking: str, no_layer2: bool = False,
                no_reiteration: bool = False, quiet: bool = False, report: str | None = None,
                no_report: bool = False) -> int:
    """Fit the two-layer dictionary pipeline on the stored features, annotate every image,
    make it the active image model and write its report."""
    from pipelines.ddiccir import PipelineConfig

    from ..images.image_annotation import train_image_model
    from ..images.image_worker import resolve_device
    from ..progress import stderr_lines

    config = PipelineConfig(n_clusters=clusters, max_outer_iter=max_iterations,
                            seed=seed, device=resolve_device(settings.image_device),
                            use_layer2=not no_layer2, reiterate=not no_reiteration,
                            pooling=pooling)
    say = stderr_lines(quiet)
    with database(settings) as opened:
        try:
            model_id = train_image_model(
                opened.engine, settings.feature_store_path, settings.data_dir / "image_models",
                config=config, max_images=max_images, ranking=ranking,
                progress=say)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"image model {model_id} is active")
        if no_report:
            return 0
        out = Path(report or settings.data_dir / "reports" / f"image-model-{model_id}.html")
        return _write_image_report(opened.engine, settings.storage_path, out, model_id)


def _write_image_report(engine, storage_root: Path, out: Path, model_id: int | None) -> int:
    from ..images.image_report import write_image_model_report

    try:
        print(f"wrote {write_image_model_report(engine, storage_root, out, model_id)}")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: report {out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0


def image_report(settings: Settings, *, model: int | None = None, out: str | None = None) -> int:
    """The image model's HTML report again, without fitting."""
    with database(settings) as opened:
        path = Path(out or f"image-model-{model or 'active'}.html")
        return _write_image_report(opened.engine, settings.storage_path, path, model)


def query(settings: Settings, *, file: str | None = None, uid: str | None = None, top: int,
          exclude: str, as_json: bool = False, html: str | None = None) -> int:
    """The stored images most similar to a DICOM ``file`` or a stored instance ``uid``."""
    import time

    from pipelines.pixels import NotAnImage, PixelDecodeError

    from ..images.image_annotation import SimilarImages, query_identity
    from ..images.image_worker import resolve_device

    device = resolve_device(settings.image_device)
    with database(settings) as opened:
        similar = SimilarImages(opened.engine, device=device)
        started = time.perf_counter()
        try:
            if uid:
                clusters, codes = similar.code_of(uid)
            else:  # through the active model's backbone; PACS_IMAGE_WEIGHTS must match it
                clusters, codes = similar.code_file(file, settings.image_weights)
            # never the query itself (a stored file included); its study/patient on request
            excluded = similar.same_case_uids(exclude, **query_identity(uid, file))
            ranked = similar.rank(clusters, codes, top, exclude=excluded)[0]
        except (KeyError, ValueError, FileNotFoundError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except (NotAnImage, PixelDecodeError) as exc:
            print(f"error: {file}: {exc}", file=sys.stderr)
            return 2
        elapsed = time.perf_counter() - started
        hits = similar.with_tags(ranked)
        if html:  # the query image beside its hits, thumbnails from the stored files
            from ..images.image_report import write_query_report

            try:
                write_query_report(opened.engine, settings.storage_path, Path(html),
                                   hits=hits, image_cluster=int(clusters[0]), seconds=elapsed,
                                   query_uid=uid, query_file=file,
                                   exclude=exclude)
            except OSError as exc:
                print(f"error: --html {html}: {exc.strerror or exc}", file=sys.stderr)
                return 2
            print(f"wrote {html}", file=sys.stderr)
    if as_json:
        import dataclasses

        print(json.dumps({"image_cluster": int(clusters[0]), "seconds": elapsed,
                          "hits": [dataclasses.asdict(h) for h in hits]}, indent=2))
        return 0
    print(f"query in image cluster {int(clusters[0])} ({elapsed * 1000:.0f} ms)")
    print(f"{'rank':>4}  {'score':>6}  {'cluster':>7}  {'tag cl.':>7}  {'modality':<8}  "
          f"{'body part':<12}  SOP Instance UID")
    for rank, hit in enumerate(hits, start=1):
        print(f"{rank:>4}  {hit.score:6.3f}  {hit.image_cluster:>7}{'*' if hit.same_cluster else ' '}"
              f" {_tag_cluster_text(hit):>7}  {hit.modality or '':<8}  "
              f"{hit.body_part or '':<12}  {hit.sop_instance_uid}")
    if any(hit.tag_cluster_outlier for hit in hits):
        print("? its tags fit no tag cluster (an outlier of the active clustering run)")
    return 0


def _tag_cluster_text(hit) -> str:
    if hit.tag_cluster is None:
        return ""
    return f"{hit.tag_cluster}{'?' if hit.tag_cluster_outlier else ''}"


def visual_check(settings: Settings, *, samples: int, sample_size: int | None = None,
                 seed: int) -> int:
    """Do tag clusters group similar-looking images? (method.md A.8)"""
    import numpy as np
    import sqlalchemy as sa
    from pgvector.sqlalchemy import Vector

    from pipelines.visual_check import visual_check as paired_test

    with database(settings) as opened, opened.engine.connect() as conn:
        rows = conn.execute(sa.select(sa.column("feature", Vector()), sa.column("tag_cluster"),
                                      sa.column("model_version"), sa.column("run_id"))
                            .select_from(sa.text("image_features JOIN instance_tag_cluster "
                                                 "USING (sop_instance_uid)"))
                            .where(sa.text("status = 'done'"))).all()
    if not rows:
        print("error: no instance has both image features and a tag cluster", file=sys.stderr)
        return 2
    circular = _circular_backbone(settings, {r[2] for r in rows}, rows[0][3])
    if circular:
        log.warning(circular)
    embeddings = np.stack([np.asarray(r[0], dtype=np.float64) for r in rows])
    labels = np.array([r[1] for r in rows])
    size = sample_size or len(rows) // samples
    try:
        result = paired_test(embeddings, labels, n_samples=samples, sample_size=size,
                              random_state=seed)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(rows):,} images, {samples} samples of {size:,}: mean cosine distance to "
          f"the tag-cluster mean vs with permuted labels: {result.format()}")
    print(f"  tag clusters {result.mean_true:.6g}, permuted {result.mean_permuted:.6g}; "
          f"t = {result.t_statistic:.6g}, p = {result.p_value:.3g}")
    if circular:
        print(f"  warning: {circular}")
    return 0


def _circular_backbone(settings: Settings, feature_versions: set[str],
                       tag_cluster_run: int) -> str | None:
    """Why the check is circular, or None: the configured backbone made these features and
    ``train-backbone`` trained it to predict the clusters of ``tag_cluster_run`` itself."""
    if settings.image_weights is None or not Path(settings.image_weights).is_file():
        return None
    import torch

    from pipelines.backbone import CHECKPOINT_FORMAT, weights_version

    version = weights_version(settings.image_weights)
    if version not in feature_versions:
        return None  # the features are another backbone's: nothing known about its training
    stored = torch.load(settings.image_weights, map_location="cpu", weights_only=True,
                        mmap=True)
    trained_on = (stored.get("metadata", {}).get("tag_cluster_run")
                  if isinstance(stored, dict) and stored.get("format") == CHECKPOINT_FORMAT
                  else None)
    if trained_on is None or int(trained_on) != int(tag_cluster_run):
        return None
    return (f"circular: the backbone that made these features ({version}) was trained by "
            f"train-backbone to predict the clusters of tag-cluster run {tag_cluster_run}, "
            "the run tested here, so a small p-value is expected and says nothing about "
            "whether the tag clusters group similar-looking images; check with features "
            "of ImageNet weights instead")


def evaluate(settings: Settings, *, labels: str, out: str | None = None, methods: Sequence[str],
             folds: int, group_by: str | None = None, exclude: str, clusters: int, seed: int,
             n: int, cutoffs: Sequence[int], max_images: int | None = None, layer1_atoms: int,
             layer2_atoms: int, sparsity: int, max_iterations: int, ksvd_iterations: int,
             patches_per_cluster: int | None, quiet: bool = False) -> int:
    """``pacs-annotate evaluate``: exit 0 with the table printed and saved, 2 on unusable
    labels or options, or when no labelled instance has features."""
    from pipelines.ddiccir import PipelineConfig

    from ..images.evaluation import evaluate as run_evaluation
    from ..images.evaluation import format_table, read_labels
    from ..images.image_worker import resolve_device
    from ..progress import on_terminal, stderr_lines

    bar = not quiet and on_terminal()
    say = stderr_lines(quiet)
    folder = Path(out or f"evaluation-{datetime.now():%Y%m%d-%H%M%S}")
    try:
        label_set = read_labels(labels)
        config = PipelineConfig(
            n_clusters=clusters, layer1_atoms=layer1_atoms,
            layer2_atoms=layer2_atoms, sparsity=sparsity,
            max_outer_iter=max_iterations, ksvd_max_iter=ksvd_iterations,
            patches_per_cluster=patches_per_cluster, seed=seed,
            device=resolve_device(settings.image_device))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with database(settings) as opened:
        try:
            result = run_evaluation(opened.engine, settings.feature_store_path, label_set,
                                    config=config, methods=methods, folds=folds,
                                    group_by=group_by, exclude=exclude, seed=seed,
                                    cutoffs=cutoffs, max_images=max_images, progress=say,
                                    out_dir=folder, table_n=n, bar=bar)
        except ValueError as exc:  # NoLabelledFeatures included
            print(f"error: {exc}", file=sys.stderr)
            return 2
    print(format_table(result, n))
    for name in ("evaluation.csv", "evaluation.json", "table.md"):
        print(f"wrote {folder / name}")
    print(f"each method's result: {folder / 'methods'}/<method>.json")
    return 0


def _method_list(text: str) -> tuple[str, ...]:
    from ..images.evaluation import METHODS

    names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    unknown = [name for name in names if name not in METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown method(s) {', '.join(unknown) or '(none given)'}; choose from "
            f"{', '.join(METHODS)}")
    return names


def _cutoff_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(sorted({int(value) for value in text.split(",") if value.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}")
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError("cut-offs must be integers >= 1")
    return values


def add_evaluate_parser(subparsers, common_parent: argparse.ArgumentParser
                        ) -> argparse.ArgumentParser:
    """Register ``evaluate`` on the CLI's sub-parsers (``common_parent``: --config etc.)."""
    parser = subparsers.add_parser(
        "evaluate", parents=[common_parent],
        help="retrieval quality on labelled images: the DDicCIR paper's Table 1 (features "
             "only, one dictionary layer, full pipeline, ablations) over k group-disjoint "
             "folds, with timings",
        description="Deal the labelled images into k folds that never split a study (or "
                    "patient, series, or the labels CSV's group), fit each method on k - 1 "
                    "folds, query with the held-out one, and print and save the mean and "
                    "spread over folds of P@N, R@N, F1, mAP@N, nDCG, purity (and the IRMA "
                    "error for IRMA codes). Each method is saved as soon as it is done; "
                    "running again with the same --out skips methods already finished with "
                    "the same configuration.")
    add_arguments_when_used(parser, _evaluate_arguments)
    parser.set_defaults(func=command(evaluate))
    return parser


def _evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """``evaluate``'s options; their defaults are the pipeline's (torch)."""
    from pipelines.ddiccir import PipelineConfig
    from pipelines.retrieval_metrics import DEFAULT_CUTOFFS

    from ..images.evaluation import (DEFAULT_FOLDS, DEFAULT_METHODS, EVALUATE_KSVD_ITERATIONS,
                                     EVALUATE_MAX_ITERATIONS, EVALUATE_PATCHES_PER_CLUSTER,
                                     EXCLUDE_RULES, GROUP_RULES, METHODS)

    defaults = PipelineConfig()
    parser.add_argument("--labels", required=True,
                        help="CSV with sop_instance_uid and one of: label (single), labels "
                             "(several, separated by | or ;), irma (IRMA code); optionally "
                             "group (patient, case: never split)")
    parser.add_argument("--out", help="folder for evaluation.csv, evaluation.json, table.md "
                                      "and methods/*.json (default "
                                      "./evaluation-YYYYmmdd-HHMMSS); an earlier run's folder "
                                      "resumes it")
    parser.add_argument("--methods", type=_method_list, default=DEFAULT_METHODS,
                        help=f"comma-separated, table order (default: "
                             f"{','.join(DEFAULT_METHODS)}; all: {','.join(METHODS)})")
    parser.add_argument("--folds", type=int, default=DEFAULT_FOLDS,
                        help="k of the k-fold protocol (default 5, the paper's)")
    parser.add_argument("--group-by", choices=list(GROUP_RULES),
                        help="what is never both query and index (default: the labels CSV's "
                             "group column when it has one, else study)")
    parser.add_argument("--exclude", choices=list(EXCLUDE_RULES), default="same-study",
                        help="also leave each query's own study or patient out of its "
                             "candidates (default same-study)")
    parser.add_argument("--clusters", type=int, default=defaults.n_clusters,
                        help="k (Table 9: 15)")
    parser.add_argument("--seed", type=int, default=0, help="folds and fits")
    parser.add_argument("--n", type=int, default=20, help="the cut-off of the main table")
    parser.add_argument("--cutoffs", type=_cutoff_list, default=DEFAULT_CUTOFFS,
                        help="N list (default 5,10,...,40)")
    parser.add_argument("--max-images", type=int,
                        help="evaluate a seeded sample of this many labelled images")
    parser.add_argument("--layer1-atoms", type=int, default=defaults.layer1_atoms)
    parser.add_argument("--layer2-atoms", type=int, default=defaults.layer2_atoms)
    parser.add_argument("--sparsity", type=int, default=defaults.sparsity)
    parser.add_argument("--max-iterations", type=int, default=EVALUATE_MAX_ITERATIONS,
                        help=f"most k-means re-iteration passes (default "
                             f"{EVALUATE_MAX_ITERATIONS}; image-model: "
                             f"{defaults.max_outer_iter})")
    parser.add_argument("--ksvd-iterations", type=int, default=EVALUATE_KSVD_ITERATIONS,
                        help=f"K-SVD sweeps per dictionary per pass (default "
                             f"{EVALUATE_KSVD_ITERATIONS}; image-model: "
                             f"{defaults.ksvd_max_iter})")
    parser.add_argument("--patches-per-cluster", type=int,
                        default=EVALUATE_PATCHES_PER_CLUSTER,
                        help=f"layer-1 training patches sampled per cluster (default "
                             f"{EVALUATE_PATCHES_PER_CLUSTER}; image-model: "
                             f"{defaults.patches_per_cluster})")
    parser.add_argument("--quiet", action="store_true", help="no progress lines or bar")


def add_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser("train-backbone", parents=[common],
                            help="train DenseNet121 on this site's images to predict their tag "
                                 "cluster (weights for the image worker when no ImageNet file "
                                 "is configured)")
    parser.add_argument("--out", default="data/backbone",
                        help="checkpoint folder (best.pt, last.pt); training resumes from it")
    parser.add_argument("--epochs", type=positive_int, default=30)
    parser.add_argument("--batch-size", type=int_at_least(2), default=32)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW)")
    parser.add_argument("--warmup-epochs", type=float, default=1.0,
                        help="linear warm-up before the cosine decay")
    parser.add_argument("--val-fraction", type=share(low_open=True, high_open=True), default=0.2)
    parser.add_argument("--group-by", choices=["patient", "study", "image"], default="patient",
                        help="the held-out split keeps each patient (or study) on one side")
    parser.add_argument("--min-val-images", type=positive_int, default=30,
                        help="refuse when the held-out set would be smaller")
    parser.add_argument("--patience", type=positive_int, default=5)
    parser.add_argument("--max-per-class", type=positive_int, default=2000)
    parser.add_argument("--min-per-class", type=positive_int, default=10,
                        help="smaller tag clusters join the one with the nearest medoid")
    parser.add_argument("--size", type=int_at_least(32), default=128,
                        help="training resolution in pixels (the image worker may extract "
                             "features at another size)")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                        default="auto", help="auto: bf16 where the device has it natively")
    parser.add_argument("--no-augment", action="store_true",
                        help="no crops, rotations, window or intensity jitter")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--restart", action="store_true", help="do not resume from --out")
    parser.set_defaults(func=command(train_backbone))

    parser = sub.add_parser(
        "image-model", parents=[common],
        help="fit the two-layer dictionary pipeline on the stored image features, annotate "
             "every image (cluster, retrieval code) and make it the active image model")
    parser.add_argument("--clusters", type=positive_int, default=15, help="k (Table 9: 15)")
    parser.add_argument("--max-iterations", type=positive_int, default=15)
    parser.add_argument("--max-images", type=positive_int, default=10_000,
                        help="images the dictionaries are fitted on (a seeded sample)")
    parser.add_argument("--pooling", choices=["max", "average"], default="max")
    parser.add_argument("--no-layer2", action="store_true", help="ablation")
    parser.add_argument("--no-reiteration", action="store_true", help="ablation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--ranking", choices=["auto", "codes", "features"], default="auto",
        help="what query / similar_images rank by: DDicCIR codes, pooled features, or (auto) "
             "whichever ranks the fitted images better by their modality|body part tags")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--report", metavar="FILE",
                        help="HTML report with a thumbnail montage of every image and tag "
                             "cluster (default DATA_DIR/reports/image-model-ID.html)")
    parser.add_argument("--no-report", action="store_true", help="write no report")
    parser.set_defaults(func=command(image_model))

    parser = sub.add_parser(
        "image-report", parents=[common],
        help="the image model's HTML report again (thumbnail montages of every image and tag "
             "cluster), without fitting")
    parser.add_argument("--model", type=int, help="image model id (default: the active one)")
    parser.add_argument("--out", metavar="FILE",
                        help="HTML file (default ./image-model-ID.html)")
    parser.set_defaults(func=command(image_report))

    parser = sub.add_parser("query", parents=[common],
                            help="images similar to a DICOM file or a stored instance")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("file", nargs="?", help="a DICOM file")
    target.add_argument("--uid", help="a stored SOP Instance UID")
    parser.add_argument("--top", type=positive_int, default=20)
    parser.add_argument("--exclude", choices=["none", "same-study", "same-patient"],
                        default="same-study",
                        help="leave out hits from the query's own study or patient (default "
                             "same-study); the query itself is never a hit")
    parser.add_argument("--json", dest="as_json", action="store_true")
    parser.add_argument("--html", metavar="FILE",
                        help="also write the query image beside its hits, with scores and key "
                             "tags, as one self-contained HTML file")
    parser.set_defaults(func=command(query))

    parser = sub.add_parser("visual-check", parents=[common],
                            help="do tag clusters group similar-looking images? (method.md A.8: "
                                 "paired t-test against permuted labels)")
    parser.add_argument("--samples", type=int_at_least(2), default=10)
    parser.add_argument("--sample-size", type=int_at_least(2), help="default: all images / samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=command(visual_check))

    add_evaluate_parser(sub, common)
