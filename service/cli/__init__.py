"""``pacs-annotate``: the one command for everything a user runs."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Iterator, Sequence

from .. import __version__
from ..config import ConfigError, Settings, load_settings
from ..database.engine import Database

log = logging.getLogger("pacs_annotate")


class UserError(Exception):
    """A mistake of the person running the command: ``main`` prints ``error: <message>``,
    one line, and exits 2 (no traceback)."""


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its messages
    return parse


positive_int = _int_at_least(1)
non_negative_int = _int_at_least(0)


def _share(*, low_open: bool = False, high_open: bool = False):
    """A float in [0, 1]; ``low_open``/``high_open`` exclude 0/1."""
    interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not ((0 < value if low_open else 0 <= value)
                and (value < 1 if high_open else value <= 1)):
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {value:g}")
        return value

    parse.__name__ = "number"
    return parse


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in ``--help``, also for options without a help text; none
    for defaults that say nothing (None, a flag's False) or a help that names its own."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)".lstrip()

    def _split_lines(self, text: str, width: int) -> list[str]:
        import textwrap

        # "same-study", a path: a value is never broken at its hyphen
        return textwrap.wrap(self._whitespace_matcher.sub(" ", text).strip(), width,
                             break_on_hyphens=False)

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and self._get_help_string(action):
            import copy

            action = copy.copy(action)
            action.help = self._get_help_string(action)
        return super()._format_action(action)


class _Parser(argparse.ArgumentParser):
    """argparse with defaults in every help and a one-line error (``prog: error: ...``),
    exit 2; the subcommands' parsers are of this class too."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# commands that work on an existing archive: with the embedded database, a --data-dir
# without one is a typo, not a wish for a new empty archive (--create makes one)
_CREATES_ARCHIVE = frozenset({"serve", "import", "migrate"})


def _check_archive_exists(args: argparse.Namespace, settings: Settings) -> None:
    command = getattr(args, "command", None)
    if (settings.database_url or command in _CREATES_ARCHIVE or command == "send"
            or (command == "select-features" and not args.auto)  # no database without --auto
            or getattr(args, "create", False) or settings.pgdata_path.is_dir()):
        return
    where = ("does not exist" if not settings.data_dir.exists()
             else "holds no archive (no pgdata folder)")
    raise UserError(f"data directory {settings.data_dir} {where}: point --data-dir (or "
                    "PACS_DATA_DIR) at the folder that `serve` or `import` filled, set "
                    "DATABASE_URL for an external PostgreSQL, or add --create to start a new, "
                    "empty archive there")


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {
        "ae_title": getattr(args, "ae_title", None),
        "bind_address": getattr(args, "bind", None),
        "port": getattr(args, "port", None),
        "processes": getattr(args, "processes", None),
        "data_dir": getattr(args, "data_dir", None),
        "storage_dir": getattr(args, "storage_dir", None),
        "log_format": getattr(args, "log_format", None),
    }
    return load_settings(getattr(args, "config", None), **overrides)  # send has no --config


@contextlib.contextmanager
def _database(settings: Settings, *, migrate: bool = True) -> Iterator[Database]:
    """The configured database, migrated; the embedded one stops when the block ends,
    also when the migration fails."""
    from ..database.engine import migrate as run_migrations
    from ..database.engine import open_database, redact

    with open_database(settings) as database:
        if migrate:
            revision = run_migrations(database.engine)
            log.info("database ready", extra={"url": redact(database.url),
                                              "revision": revision,
                                              "embedded": database.embedded})
        yield database


def _stop_on_signals() -> threading.Event:
    """Set by SIGTERM or SIGINT: the long-running commands end cleanly on either."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    return stop


def _progress_stream(quiet: bool = False):
    """Where a long job draws its progress: stderr when it is a terminal, else nowhere."""
    from ..progress import on_terminal

    return None if quiet or not on_terminal() else sys.stderr


def _vocabulary(settings: Settings):
    from parsers import load_vocabulary

    return load_vocabulary(settings.site_vocabulary)


def cmd_serve(args: argparse.Namespace) -> int:
    from ..ingest.scp import ensure_port_free, ingestor_for, serve_forever

    settings = _settings(args)
    ensure_port_free(settings.bind_address, settings.port)
    _vocabulary(settings)  # a broken site vocabulary stops the start, not the worker later
    with _database(settings) as database:
        stop = _stop_on_signals()
        # start() settles what a previous run left unfinished; with several listener
        # processes this one only does that, and the children store
        with ingestor_for(settings, database.engine,
                          stores=settings.processes <= 1) as ingestor:
            serve_forever(settings, database.url, ingestor, stop)
    log.info("stopped")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    import os
    import socket

    settings = _settings(args)
    name = f"{socket.gethostname()}:{os.getpid()}/{args.stage}"
    if args.stage == "image":
        return _run_image_worker(settings, name, args)
    from ..tags.features import TagsWorker

    vocabulary = _vocabulary(settings)
    with _database(settings) as database:
        stop = _stop_on_signals()
        if args.drain:
            return _drain_tags(database.engine, name, vocabulary, args.batch or 200, stop)
        worker = TagsWorker(database.engine, name=name, vocabulary=vocabulary,
                            batch=args.batch or 200).start()
        log.info("tags worker running")
        stop.wait()
        worker.stop()
    return 0


def _pending(engine, stage: str) -> int:
    import sqlalchemy as sa

    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT count(*) FROM work_queue WHERE stage = :stage "
                                    "AND status = 'pending'"), {"stage": stage}).scalar_one()


def _drain_tags(engine, name: str, vocabulary, batch: int, stop: threading.Event) -> int:
    """``worker --stage tags --drain``: parse what is queued now, then exit."""
    from ..tags.features import STAGE, process_queue_batch
    from ..progress import progress

    done = 0
    with progress(total=_pending(engine, STAGE), desc="tags", unit="instance") as bar:
        while not stop.is_set():
            claimed = process_queue_batch(engine, name, limit=batch, vocabulary=vocabulary)
            if not claimed:
                break
            done += claimed
            bar.update(claimed)
    print(f"{done} instances parsed")
    return 0


def _run_image_worker(settings: Settings, name: str, args: argparse.Namespace) -> int:
    from pipelines.backbone import WeightsMissingError, load_backbone

    from ..images.image_worker import (ImageWorker, enqueue_missing, requeue_missing_decoders,
                               resolve_device)

    device = resolve_device(settings.image_device)
    try:
        backbone = load_backbone(settings.image_weights, device=device)
    except (WeightsMissingError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with _database(settings) as database:
        stop = _stop_on_signals()
        queued = enqueue_missing(database.engine)
        if queued:
            log.info("queued the image backlog", extra={"instances": queued})
        requeued = requeue_missing_decoders(database.engine)
        if requeued:
            log.info("trying again the images that lacked a decoder",
                     extra={"instances": requeued})
        with ImageWorker(database.engine, backbone, storage_root=settings.storage_path,
                         feature_store=settings.feature_store_path, name=name,
                         batch=args.batch or settings.image_batch,
                         decode_workers=settings.image_decode_workers,
                         max_attempts=settings.image_max_attempts,
                         image_size=backbone.input_size,
                         weights_path=settings.image_weights) as worker:
            log.info("image worker running", extra={"device": device,
                                                    "model_version": backbone.model_version,
                                                    "input_size": backbone.input_size})
            if args.drain:
                from ..progress import progress

                with progress(total=_pending(database.engine, "image"), desc="image features",
                              unit="image") as bar:
                    # until nothing is pending: items waiting for a retry are waited for
                    worker.drain(stop, bar.update)
            else:
                worker.run(stop)
        print(json.dumps({"worker": name, **worker.stats}))
    return 0


def cmd_train_backbone(args: argparse.Namespace) -> int:
    import time

    from pipelines.backbone_training import RadiologyAugment, train_backbone

    from ..images.backbone_data import build_training_set
    from ..progress import stderr_lines

    settings = _settings(args)
    out = Path(args.out)
    say = stderr_lines()
    with _database(settings) as database:
        try:
            training = build_training_set(
                database.engine, settings.storage_path, max_per_class=args.max_per_class,
                min_per_class=args.min_per_class, size=args.size, seed=args.seed,
                group_by=args.group_by, decode_workers=settings.image_decode_workers,
                progress=say)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    merged = training.merged_classes
    say(f"{len(training.labels):,} images in {len(set(training.groups)):,} groups "
        f"({args.group_by}), {len(training.classes)} classes from the "
        f"{len(training.cluster_sizes)} tag clusters of run {training.tag_cluster_run} "
        f"({training.undecodable} not decodable"
        + (f"; {len(merged)} clusters under {args.min_per_class} images merged into the one "
           f"with the nearest medoid: " + ", ".join(
               f"{small}->{kept}" for small, kept in sorted(merged.items())) if merged else "")
        + ")")
    from ..progress import counts_callback, progress

    stop = _stop_on_signals()
    with progress(total=args.epochs, desc="train-backbone", unit="batch") as bar:
        batches_done = counts_callback(bar)
        last_line = [0.0]

        def batch_done(record: dict) -> None:
            batches_done((record["epoch"] - 1) * record["batches"] + record["batch"],
                         args.epochs * record["batches"])
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
            result = train_backbone(
                training.dataset, training.labels, classes=training.classes,
                groups=None if args.group_by == "image" else training.groups,
                checkpoint_dir=out, tag_cluster_run=training.tag_cluster_run,
                epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                warmup_epochs=args.warmup_epochs, val_fraction=args.val_fraction,
                min_val_images=args.min_val_images, patience=args.patience,
                augment=None if args.no_augment else RadiologyAugment(),
                device=None if settings.image_device == "auto" else settings.image_device,
                precision=args.precision, seed=args.seed, resume=not args.restart,
                extra_metadata={"merged_classes": {str(k): v for k, v in merged.items()},
                                "group_by": args.group_by},
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
          f"{result.n_val:,} held-out images, split by {args.group_by}")
    if result.best_epoch:
        for cluster, accuracy, support in zip(
                training.classes, result.best_val_per_class_accuracy,
                result.history[result.best_epoch - 1]["val_support"]):
            shown = "no held-out image" if accuracy is None else f"{accuracy:.3f}"
            print(f"  tag cluster {cluster}: {shown} ({support} held out)")
    print(f"weights: {result.checkpoint_path}")
    print(f"use them: PACS_IMAGE_WEIGHTS={result.checkpoint_path}")
    return 0


def cmd_image_model(args: argparse.Namespace) -> int:
    from pipelines.ddiccir import PipelineConfig

    from ..images.image_annotation import train_image_model
    from ..images.image_worker import resolve_device
    from ..progress import stderr_lines

    settings = _settings(args)
    config = PipelineConfig(n_clusters=args.clusters, max_outer_iter=args.max_iterations,
                            seed=args.seed, device=resolve_device(settings.image_device),
                            use_layer2=not args.no_layer2, reiterate=not args.no_reiteration,
                            pooling=args.pooling)
    say = stderr_lines(args.quiet)
    with _database(settings) as database:
        try:
            model_id = train_image_model(
                database.engine, settings.feature_store_path, settings.data_dir / "image_models",
                config=config, max_images=args.max_images, ranking=args.ranking,
                progress=say)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"image model {model_id} is active")
        if args.no_report:
            return 0
        out = Path(args.report or settings.data_dir / "reports" / f"image-model-{model_id}.html")
        return _write_image_report(database.engine, settings.storage_path, out, model_id)


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


def cmd_image_report(args: argparse.Namespace) -> int:
    settings = _settings(args)
    with _database(settings) as database:
        out = Path(args.out or f"image-model-{args.model or 'active'}.html")
        return _write_image_report(database.engine, settings.storage_path, out, args.model)


def cmd_query(args: argparse.Namespace) -> int:
    import time

    from pipelines.pixels import NotAnImage, PixelDecodeError

    from ..images.image_annotation import SimilarImages, query_identity
    from ..images.image_worker import resolve_device

    settings = _settings(args)
    device = resolve_device(settings.image_device)
    with _database(settings) as database:
        similar = SimilarImages(database.engine, device=device)
        started = time.perf_counter()
        try:
            if args.uid:
                clusters, codes = similar.code_of(args.uid)
            else:  # through the active model's backbone; PACS_IMAGE_WEIGHTS must match it
                clusters, codes = similar.code_file(args.file, settings.image_weights)
            # never the query itself (a stored file included); its study/patient on request
            exclude = similar.same_case_uids(args.exclude,
                                             **query_identity(args.uid, args.file))
            ranked = similar.rank(clusters, codes, args.top, exclude=exclude)[0]
        except (KeyError, ValueError, FileNotFoundError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except (NotAnImage, PixelDecodeError) as exc:
            print(f"error: {args.file}: {exc}", file=sys.stderr)
            return 2
        elapsed = time.perf_counter() - started
        hits = similar.with_tags(ranked)
        if args.html:  # the query image beside its hits, thumbnails from the stored files
            from ..images.image_report import write_query_report

            try:
                write_query_report(database.engine, settings.storage_path, Path(args.html),
                                   hits=hits, image_cluster=int(clusters[0]), seconds=elapsed,
                                   query_uid=args.uid, query_file=args.file,
                                   exclude=args.exclude)
            except OSError as exc:
                print(f"error: --html {args.html}: {exc.strerror or exc}", file=sys.stderr)
                return 2
            print(f"wrote {args.html}", file=sys.stderr)
    if args.json:
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


def cmd_visual_check(args: argparse.Namespace) -> int:
    import numpy as np
    import sqlalchemy as sa
    from pgvector.sqlalchemy import Vector

    from pipelines.visual_check import visual_check

    settings = _settings(args)
    with _database(settings) as database, database.engine.connect() as conn:
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
    size = args.sample_size or len(rows) // args.samples
    try:
        result = visual_check(embeddings, labels, n_samples=args.samples, sample_size=size,
                              random_state=args.seed)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(rows):,} images, {args.samples} samples of {size:,}: mean cosine distance to "
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


def cmd_reparse(args: argparse.Namespace) -> int:
    from parsers import PARSER_VERSION

    from ..tags.features import reparse

    settings = _settings(args)
    vocabulary = _vocabulary(settings)
    from ..progress import counts_callback, progress

    with _database(settings) as database, \
            progress(desc="reparse", unit="instance", quiet=args.quiet) as bar:
        done = reparse(database.engine, vocabulary=vocabulary, chunk=args.chunk,
                       progress=counts_callback(bar), everything=args.all)
    print(f"{done} instances parsed with parser version {PARSER_VERSION}, "
          f"vocabulary {vocabulary.version}")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    settings = _settings(args)
    with _database(settings):
        pass
    print("database schema is up to date")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from ..ingest.importer import import_directory
    from ..ingest.scp import ingestor_for

    settings = _settings(args)
    root = Path(args.directory)
    if not root.exists():
        print(f"error: {root} does not exist", file=sys.stderr)
        return 2
    rejects_csv = None
    if args.rejects_csv:
        try:  # opened first: a path that cannot be written fails before the import
            rejects_csv = open(args.rejects_csv, "w", newline="", encoding="utf-8")
        except OSError as exc:
            print(f"error: --rejects-csv {args.rejects_csv}: {exc.strerror}", file=sys.stderr)
            return 2
    try:
        with _database(settings) as database, \
                ingestor_for(settings, database.engine) as ingestor:
            report = import_directory(ingestor, root, threads=args.threads,
                                      calling_ae=args.calling_ae,
                                      progress=_progress_stream(args.quiet))
        if rejects_csv is not None:
            report.write_rejects_csv(rejects_csv)
    finally:
        if rejects_csv is not None:
            rejects_csv.close()
    print(report.summary())
    if report.outcomes.get("failed"):
        return 1
    if args.strict and report.outcomes.get("rejected"):
        return 1
    return 0


def cmd_send(args: argparse.Namespace) -> int:
    from ..ingest.sender import SendOptions, parse_destination, send_directory

    try:
        host, port = parse_destination(args.to)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    for flag, title in (("--aet", args.aet), ("--aec", args.aec)):
        if not title.strip() or len(title) > 16 or "\\" in title:
            raise UserError(f"{flag} {title!r}: an AE title has 1 to 16 characters, no backslash")
    roots = [Path(p) for p in args.paths]
    for root in roots:
        if not root.exists():
            raise UserError(f"{root} does not exist")
    report_csv = None
    if args.report:
        try:  # opened first: a path that cannot be written fails before anything is sent
            report_csv = open(args.report, "w", newline="", encoding="utf-8")
        except OSError as exc:
            raise UserError(f"--report {args.report}: {exc.strerror}") from None
    options = SendOptions(host, port, calling_ae=args.aet, called_ae=args.aec,
                          timeout=args.timeout)
    try:
        report = send_directory(roots, options, report_csv=report_csv, quiet=args.quiet)
    finally:
        if report_csv is not None:
            report_csv.close()
    print(report.summary())
    return 0 if report.ok else 1


def cmd_status(args: argparse.Namespace) -> int:
    from ..status import collect_status, format_status

    settings = _settings(args)
    with _database(settings) as database:
        status = collect_status(database.engine)
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


def _statement_error(exc) -> str:
    """PostgreSQL's message of a failed statement in one line, with where it failed."""
    orig = getattr(exc, "orig", None)
    if orig is None:  # SQLAlchemy's own objection (a bind parameter without a value)
        return str(exc).splitlines()[0].split(" (Background on this error")[0]
    text = (str(orig).strip().splitlines() or [type(orig).__name__])[0]
    position = getattr(getattr(orig, "diag", None), "statement_position", None)
    return f"{text} (at character {position})" if position else text


def cmd_sql(args: argparse.Namespace) -> int:
    import sqlalchemy as sa

    settings = _settings(args)
    with _database(settings) as database:
        with database.engine.connect() as conn:
            try:
                result = conn.execute(sa.text(args.query))
            except sa.exc.StatementError as exc:  # the statement's fault, not the service's
                raise UserError(f"sql: {_statement_error(exc)}") from None
            if result.returns_rows:
                columns = list(result.keys())
                rows = [[("" if v is None else str(v)) for v in row] for row in result]
                widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(columns)]
                print(" | ".join(c.ljust(w) for c, w in zip(columns, widths)))
                print("-+-".join("-" * w for w in widths))
                for row in rows:
                    print(" | ".join(v.ljust(w) for v, w in zip(row, widths)))
                print(f"({len(rows)} rows)")
            conn.commit()
    return 0


def cmd_db_url(args: argparse.Namespace) -> int:
    from ..database.engine import redact

    settings = _settings(args)
    with _database(settings, migrate=False) as database:
        print(database.url if database.embedded else redact(database.url))
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from ..tags.analysis import load_run, run_analysis, write_report

    settings = _settings(args)
    with _database(settings) as database:
        run_id = args.run or run_analysis(database.engine, top=args.top,
                                          unique_ratio=args.unique_ratio,
                                          progress=_progress_stream(args.quiet))
        run = load_run(database.engine, run_id)
    both = not (args.csv or args.html)
    out = Path(args.out) if args.out else Path(f"tag-analysis-{run.id}")
    paths = write_report(run, out, csv_report=args.csv or both, html_report=args.html or both)
    print(f"analysis run {run.id}: {run.instances or 0:,} instances, {len(run.tags)} tags")
    for path in paths:
        print(f"wrote {path}")
    return 0


def cmd_select_features(args: argparse.Namespace) -> int:
    import dataclasses

    from parsers.selection import default_selection, select_features

    from ..tags.analysis import AnalysisError, load_run

    if args.auto:
        settings = _settings(args)
        try:
            with _database(settings) as database:
                run = load_run(database.engine, args.run)
        except AnalysisError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        selection = select_features(
            [dataclasses.asdict(t) for t in run.tags], max_missing=args.max_missing,
            column_rows=[dataclasses.asdict(c) for c in run.columns], run_id=run.id,
            max_columns=args.max_columns)
    else:
        selection = default_selection()
    text = selection.to_json()
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
        print(f"{len(selection.columns)} feature columns written to {args.out}")
    else:
        print(text)
    return 0


def _candidates(text: str) -> tuple[int, ...]:
    try:
        values = tuple(sorted({int(v) for v in text.split(",") if v.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}")
    if not values or values[0] < 2:
        raise argparse.ArgumentTypeError("candidate K values must be integers >= 2")
    return values


EXIT_LOCKED = 75  # EX_TEMPFAIL: another recluster runs; cron may simply try again later


def cmd_recluster(args: argparse.Namespace) -> int:
    from parsers.selection import FeatureSelection, SelectionError, default_selection

    from ..progress import stderr_lines
    from ..tags.tag_clusters import ReclusterError, ReclusterLocked, ReclusterOptions, recluster

    try:
        selection = (FeatureSelection.from_json(Path(args.features).read_text(encoding="utf-8"))
                     if args.features else default_selection())
    except (OSError, SelectionError) as exc:
        print(f"error: feature selection {args.features}: {exc}", file=sys.stderr)
        return 2
    options = ReclusterOptions(
        selection=selection, candidates=args.candidates, max_profiles=args.max_profiles,
        min_profiles_per_cluster=args.min_profiles_per_cluster, random_state=args.seed,
        partition_rows=args.partition_rows, scheduler=args.scheduler,
        n_workers=args.workers, keep_runs=args.keep_runs, force=args.force,
        restart=args.restart)
    progress = stderr_lines(args.quiet)
    settings = _settings(args)
    with _database(settings) as database:
        try:
            summary = recluster(database.engine, database.url, options, progress=progress)
        except ReclusterLocked as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_LOCKED
        except ReclusterError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        if summary.status == "finished":
            print(f"run {summary.run_id}: K = {summary.k}, silhouette {summary.silhouette:.3f}, "
                  f"{summary.assigned:,} instances assigned in "
                  f"{summary.timings.get('total', 0):.1f} s; now active")
        else:
            print(f"run {summary.run_id} is still current: nothing changed")
        if args.report:
            return _write_cluster_report(database.engine, summary.run_id, Path(args.report),
                                         settings.storage_path)
    return 0


def _write_cluster_report(engine, run_id: int | None, out: Path, storage_root: Path) -> int:
    from ..tags.cluster_report import render_cluster_report
    from ..images.image_report import tag_cluster_montages
    from ..tags.tag_clusters import ReclusterError, report_data

    try:
        data = report_data(engine, run_id)
    except ReclusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    montages = tag_cluster_montages(engine, storage_root, data.run_id)  # thumbnails of members
    print(f"wrote {render_cluster_report(data, out, montages=montages)}")
    return 0


def cmd_cluster_report(args: argparse.Namespace) -> int:
    settings = _settings(args)
    with _database(settings) as database:
        out = Path(args.out or f"tag-clusters-{args.run or 'active'}")
        return _write_cluster_report(database.engine, args.run, out, settings.storage_path)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pacs-annotate",
        description="DICOM C-STORE ingestion into PostgreSQL, tag parsing and auto-annotation.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    log_format = {"choices": ["text", "json"],
                  "help": "log lines: text (HH:MM:SS LEVEL message, for a terminal) or json "
                          "(one object a line, for a log collector); PACS_LOG_FORMAT, "
                          "default text"}
    # global: before the command, or after it (then SUPPRESS keeps the one given before)
    parser.add_argument("--log-format", **log_format)
    common = _Parser(add_help=False)
    common.add_argument("--config", help="TOML settings file (also PACS_CONFIG)")
    common.add_argument("--data-dir", help="embedded database and default storage (PACS_DATA_DIR, "
                                           "default ./data)")
    common.add_argument("--storage-dir", help="where instance files go (PACS_STORAGE_DIR)")
    common.add_argument("--log-format", default=argparse.SUPPRESS, **log_format)
    common.add_argument("--create", action="store_true",
                        help="start a new, empty archive when --data-dir holds none (serve, "
                             "import and migrate always do)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", parents=[common], help="run the C-STORE SCP")
    serve.add_argument("--ae-title", help="our AE title (PACS_AE_TITLE)")
    serve.add_argument("--bind", help="address to listen on (PACS_BIND_ADDRESS)")
    serve.add_argument("--port", type=int, help="port to listen on (PACS_PORT)")
    serve.add_argument("--processes", type=positive_int, help="listener processes (PACS_PROCESSES)")
    serve.set_defaults(func=cmd_serve)

    sub.add_parser("migrate", parents=[common], help="apply database migrations").set_defaults(
        func=cmd_migrate)

    worker = sub.add_parser("worker", parents=[common],
                            help="--stage tags: parse tags of new instances into "
                                 "instance_features (serve runs one too unless "
                                 "PACS_TAGS_WORKER=false); --stage image: DenseNet121 features "
                                 "of stored images (GPU when present); runs until stopped, "
                                 "or with --drain until the queue is empty")
    worker.add_argument("--stage", choices=["tags", "image"], default="tags",
                        help="which work queue to serve")
    worker.add_argument("--batch", type=positive_int, help="items per claim (tags: 200; image: "
                                                           "PACS_IMAGE_BATCH)")
    worker.add_argument("--drain", action="store_true",
                        help="work through what is queued now, with a progress bar, then exit "
                             "(a backlog, a batch job) instead of waiting for new work")
    worker.set_defaults(func=cmd_worker)

    train = sub.add_parser("train-backbone", parents=[common],
                           help="train DenseNet121 on this site's images to predict their tag "
                                "cluster (weights for the image worker when no ImageNet file "
                                "is configured)")
    train.add_argument("--out", default="data/backbone",
                       help="checkpoint folder (best.pt, last.pt); training resumes from it")
    train.add_argument("--epochs", type=positive_int, default=30)
    train.add_argument("--batch-size", type=_int_at_least(2), default=32)
    train.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW)")
    train.add_argument("--warmup-epochs", type=float, default=1.0,
                       help="linear warm-up before the cosine decay")
    train.add_argument("--val-fraction", type=_share(low_open=True, high_open=True), default=0.2)
    train.add_argument("--group-by", choices=["patient", "study", "image"], default="patient",
                       help="the held-out split keeps each patient (or study) on one side")
    train.add_argument("--min-val-images", type=positive_int, default=30,
                       help="refuse when the held-out set would be smaller")
    train.add_argument("--patience", type=positive_int, default=5)
    train.add_argument("--max-per-class", type=positive_int, default=2000)
    train.add_argument("--min-per-class", type=positive_int, default=10,
                       help="smaller tag clusters join the one with the nearest medoid")
    train.add_argument("--size", type=_int_at_least(32), default=128,
                       help="training resolution in pixels (the image worker may extract "
                            "features at another size)")
    train.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                       default="auto", help="auto: bf16 where the device has it natively")
    train.add_argument("--no-augment", action="store_true",
                       help="no crops, rotations, window or intensity jitter")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--restart", action="store_true", help="do not resume from --out")
    train.set_defaults(func=cmd_train_backbone)

    reparse = sub.add_parser("reparse", parents=[common],
                             help="re-parse the archive's tags after a parser or vocabulary "
                                  "change (resumable)")
    reparse.add_argument("--chunk", type=positive_int, default=1000)
    reparse.add_argument("--all", action="store_true",
                         help="re-parse every instance, not only those of another parser or "
                              "vocabulary version")
    reparse.add_argument("--quiet", action="store_true", help="no progress line")
    reparse.set_defaults(func=cmd_reparse)

    imp = sub.add_parser("import", parents=[common], help="backfill DICOM files from a folder")
    imp.add_argument("directory")
    imp.add_argument("--threads", type=positive_int, default=8)
    imp.add_argument("--calling-ae", default="IMPORT", help="recorded as the calling AE title")
    imp.add_argument("--strict", action="store_true", help="exit 1 when any file is rejected")
    imp.add_argument("--rejects-csv", metavar="PATH",
                     help="write every file not stored (file, SOP Instance UID, calling AE, "
                          "status, reason) to this CSV file")
    imp.add_argument("--quiet", action="store_true", help="no progress line")
    imp.set_defaults(func=cmd_import)

    send = sub.add_parser(
        "send", help="send DICOM files to a DICOM receiver (C-STORE), each in its own transfer "
                     "syntax; exit 1 when any was rejected or not sent")
    send.add_argument("paths", nargs="+", metavar="DIR", help="folders (searched recursively) "
                                                              "or files")
    send.add_argument("--to", required=True, metavar="HOST:PORT",
                      help="the receiver, e.g. 127.0.0.1:11112 ([::1]:11112 for IPv6)")
    send.add_argument("--aet", default="STORESCU", help="our (calling) AE title")
    send.add_argument("--aec", default="PACS_ANNOTATE", help="the receiver's (called) AE title")
    send.add_argument("--timeout", type=float, default=60.0,
                      help="seconds to wait for the receiver before giving up on an association")
    send.add_argument("--report", metavar="FILE",
                      help="write one CSV row per file: path, outcome (stored, rejected, failed, "
                           "skipped), status, reason, UIDs, transfer syntax")
    send.add_argument("--quiet", action="store_true", help="no progress bar")
    send.set_defaults(func=cmd_send)

    status = sub.add_parser("status", parents=[common], help="counters and queue depth")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)

    sql = sub.add_parser("sql", parents=[common], help="run one SQL statement and print rows")
    sql.add_argument("query")
    sql.set_defaults(func=cmd_sql)

    analyze = sub.add_parser("analyze", parents=[common],
                             help="tag frequency analysis of the archive, stored as a run, "
                                  "with a CSV and HTML report")
    analyze.add_argument("--top", type=positive_int, default=10, help="top values kept per tag")
    analyze.add_argument("--unique-ratio", type=_share(low_open=True), default=0.95,
                         help="distinct/non-empty share from which a tag is unique per record")
    analyze.add_argument("--run", type=int, help="render this stored run instead of counting")
    analyze.add_argument("--out", help="report folder (default ./tag-analysis-RUN)")
    analyze.add_argument("--csv", action="store_true", help="write tags.csv and columns.csv")
    analyze.add_argument("--html", action="store_true", help="write report.html")
    analyze.add_argument("--quiet", action="store_true", help="no progress lines")
    analyze.set_defaults(func=cmd_analyze)

    select = sub.add_parser("select-features", parents=[common],
                            help="the feature columns for tag clustering, as JSON: the shipped "
                                 "default, or --auto from an analysis run")
    select.add_argument("--auto", action="store_true",
                        help="derive the list from the latest (or --run) analysis run")
    select.add_argument("--run", type=int, help="analysis run for --auto")
    select.add_argument("--max-missing", type=_share(), default=0.5,
                        help="drop columns missing in more than this share (--auto)")
    select.add_argument("--max-columns", type=positive_int, help="keep at most this many (--auto)")
    select.add_argument("--out", help="write the selection JSON here instead of stdout")
    select.set_defaults(func=cmd_select_features)

    recluster = sub.add_parser(
        "recluster", parents=[common],
        help="the nightly job: cluster the parsed tags (Gower + K-medoids, K by silhouette), "
             "assign every instance, keep labels stable, switch the active run")
    recluster.add_argument("--features", help="feature selection JSON (from select-features); "
                                              "default: the shipped list")
    recluster.add_argument("--candidates", type=_candidates, default=(5, 10, 15, 20, 100, 200, 300),
                           help="candidate K values, comma-separated (default: the paper's "
                                "5,10,15,20,100,200,300)")
    recluster.add_argument("--max-profiles", type=positive_int, default=5000,
                           help="distinct profiles clustered at most (a sample weighted by "
                                "instance count beyond that)")
    recluster.add_argument("--min-profiles-per-cluster", type=positive_int, default=10,
                           help="candidates above distinct profiles / this are not tried, so a "
                                "small site gets a K a person can read (default 10)")
    recluster.add_argument("--partition-rows", type=positive_int, default=50_000,
                           help="instances per assignment task")
    recluster.add_argument("--scheduler", help="address of a dask.distributed scheduler "
                                               "(default: a local cluster)")
    recluster.add_argument("--workers", type=positive_int, help="local Dask worker processes "
                                                       "(default: one per CPU)")
    recluster.add_argument("--seed", type=int, default=0)
    recluster.add_argument("--keep-runs", type=positive_int, default=3,
                           help="finished runs whose assignments are kept")
    recluster.add_argument("--force", action="store_true",
                           help="run even when nothing changed since the active run")
    recluster.add_argument("--restart", action="store_true",
                           help="abandon an unfinished run instead of resuming it")
    recluster.add_argument("--report", help="write the run's HTML report to this folder")
    recluster.add_argument("--quiet", action="store_true", help="no progress lines")
    recluster.set_defaults(func=cmd_recluster)

    report = sub.add_parser("cluster-report", parents=[common],
                            help="HTML report of a tag clustering run (default: the active one)")
    report.add_argument("--run", type=int)
    report.add_argument("--out", help="folder (default ./tag-clusters-RUN)")
    report.set_defaults(func=cmd_cluster_report)

    image_model = sub.add_parser(
        "image-model", parents=[common],
        help="fit the two-layer dictionary pipeline on the stored image features, annotate "
             "every image (cluster, retrieval code) and make it the active image model")
    image_model.add_argument("--clusters", type=positive_int, default=15, help="k (Table 9: 15)")
    image_model.add_argument("--max-iterations", type=positive_int, default=15)
    image_model.add_argument("--max-images", type=positive_int, default=10_000,
                             help="images the dictionaries are fitted on (a seeded sample)")
    image_model.add_argument("--pooling", choices=["max", "average"], default="max")
    image_model.add_argument("--no-layer2", action="store_true", help="ablation")
    image_model.add_argument("--no-reiteration", action="store_true", help="ablation")
    image_model.add_argument("--seed", type=int, default=0)
    image_model.add_argument(
        "--ranking", choices=["auto", "codes", "features"], default="auto",
        help="what query / similar_images rank by: DDicCIR codes, pooled features, or (auto) "
             "whichever ranks the fitted images better by their modality|body part tags")
    image_model.add_argument("--quiet", action="store_true")
    image_model.add_argument("--report", metavar="FILE",
                             help="HTML report with a thumbnail montage of every image and tag "
                                  "cluster (default DATA_DIR/reports/image-model-ID.html)")
    image_model.add_argument("--no-report", action="store_true", help="write no report")
    image_model.set_defaults(func=cmd_image_model)

    image_report = sub.add_parser(
        "image-report", parents=[common],
        help="the image model's HTML report again (thumbnail montages of every image and tag "
             "cluster), without fitting")
    image_report.add_argument("--model", type=int, help="image model id (default: the active one)")
    image_report.add_argument("--out", metavar="FILE",
                              help="HTML file (default ./image-model-ID.html)")
    image_report.set_defaults(func=cmd_image_report)

    query = sub.add_parser("query", parents=[common],
                           help="images similar to a DICOM file or a stored instance")
    target = query.add_mutually_exclusive_group(required=True)
    target.add_argument("file", nargs="?", help="a DICOM file")
    target.add_argument("--uid", help="a stored SOP Instance UID")
    query.add_argument("--top", type=positive_int, default=20)
    query.add_argument("--exclude", choices=["none", "same-study", "same-patient"],
                       default="same-study",
                       help="leave out hits from the query's own study or patient (default "
                            "same-study); the query itself is never a hit")
    query.add_argument("--json", action="store_true")
    query.add_argument("--html", metavar="FILE",
                       help="also write the query image beside its hits, with scores and key "
                            "tags, as one self-contained HTML file")
    query.set_defaults(func=cmd_query)

    check = sub.add_parser("visual-check", parents=[common],
                           help="do tag clusters group similar-looking images? (method.md A.8: "
                                "paired t-test against permuted labels)")
    check.add_argument("--samples", type=_int_at_least(2), default=10)
    check.add_argument("--sample-size", type=_int_at_least(2), help="default: all images / samples")
    check.add_argument("--seed", type=int, default=0)
    check.set_defaults(func=cmd_visual_check)

    from ..images.evaluation import add_evaluate_parser

    add_evaluate_parser(sub, common)

    sub.add_parser("db-url", parents=[common],
                   help="print the database URL (password hidden)").set_defaults(func=cmd_db_url)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import os

    # libgomp's busy-waiting threads made OMP and K-SVD 10-20x slower on a loaded machine
    # (benchmarks/sparse_coding/README.md); must be set before torch is first imported
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    from ..logs import setup_logging

    from parsers import VocabularyError

    try:
        settings = _settings(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings)
    try:
        _check_archive_exists(args, settings)
        return args.func(args)
    except (ConfigError, VocabularyError, UserError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
