"""The tag stages' commands: the ``tags`` worker, ``reparse``, ``analyze``,
``select-features``, ``recluster`` (the nightly clustering run) and ``cluster-report``."""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

from .common import (Settings, command, database, log, pending, positive_int, progress_stream,
                     share, stop_on_signals, vocabulary)

EXIT_LOCKED = 75  # EX_TEMPFAIL: another recluster runs; cron may simply try again later


def tags_worker(settings: Settings, *, name: str, batch: int | None = None,
                drain: bool = False) -> int:
    """``worker --stage tags``: parse the tags of new instances until stopped, or with
    ``drain`` what is queued now."""
    from ..tags.features import TagsWorker

    parse_with = vocabulary(settings)
    with database(settings) as opened:
        stop = stop_on_signals()
        if drain:
            return _drain_tags(opened.engine, name, parse_with, batch or 200, stop)
        worker = TagsWorker(opened.engine, name=name, vocabulary=parse_with,
                            batch=batch or 200).start()
        log.info("tags worker running")
        stop.wait()
        worker.stop()
    return 0


def _drain_tags(engine, name: str, vocabulary, batch: int, stop: threading.Event) -> int:
    """``worker --stage tags --drain``: parse what is queued now, then exit."""
    from ..progress import progress
    from ..tags.features import STAGE, process_queue_batch

    done = 0
    with progress(total=pending(engine, STAGE), desc="tags", unit="instance") as bar:
        while not stop.is_set():
            claimed = process_queue_batch(engine, name, limit=batch, vocabulary=vocabulary)
            if not claimed:
                break
            done += claimed
            bar.update(claimed)
    print(f"{done} instances parsed")
    return 0


def reparse(settings: Settings, *, chunk: int, everything: bool = False,
            quiet: bool = False) -> int:
    """Re-parse the archive's tags (``everything``: every instance, not only those of another
    parser or vocabulary version)."""
    from parsers import PARSER_VERSION

    from ..progress import counts_callback, progress
    from ..tags.features import reparse as reparse_archive

    parse_with = vocabulary(settings)
    with database(settings) as opened, \
            progress(desc="reparse", unit="instance", quiet=quiet) as bar:
        done = reparse_archive(opened.engine, vocabulary=parse_with, chunk=chunk,
                               progress=counts_callback(bar), everything=everything)
    print(f"{done} instances parsed with parser version {PARSER_VERSION}, "
          f"vocabulary {parse_with.version}")
    return 0


def analyze(settings: Settings, *, top: int, unique_ratio: float, run: int | None = None,
            out: str | None = None, csv: bool = False, html: bool = False,
            quiet: bool = False) -> int:
    """Count every tag over the archive as a new analysis run (or render the stored ``run``)
    and write its CSV and HTML report."""
    from ..tags.analysis import load_run, run_analysis, write_report

    with database(settings) as opened:
        run_id = run or run_analysis(opened.engine, top=top, unique_ratio=unique_ratio,
                                     progress=progress_stream(quiet))
        loaded = load_run(opened.engine, run_id)
    both = not (csv or html)
    folder = Path(out) if out else Path(f"tag-analysis-{loaded.id}")
    paths = write_report(loaded, folder, csv_report=csv or both, html_report=html or both)
    print(f"analysis run {loaded.id}: {loaded.instances or 0:,} instances, "
          f"{len(loaded.tags)} tags")
    for path in paths:
        print(f"wrote {path}")
    return 0


def select_features(settings: Settings, *, auto: bool = False, run: int | None = None,
                    max_missing: float, max_columns: int | None = None,
                    out: str | None = None) -> int:
    """The feature columns for tag clustering as JSON: the shipped default, or (``auto``)
    derived from the latest (or ``run``) analysis run."""
    import dataclasses

    from parsers.selection import default_selection, select_features as derive_selection

    from ..tags.analysis import AnalysisError, load_run

    if auto:
        try:
            with database(settings) as opened:
                loaded = load_run(opened.engine, run)
        except AnalysisError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        selection = derive_selection(
            [dataclasses.asdict(t) for t in loaded.tags], max_missing=max_missing,
            column_rows=[dataclasses.asdict(c) for c in loaded.columns], run_id=loaded.id,
            max_columns=max_columns)
    else:
        selection = default_selection()
    text = selection.to_json()
    if out:
        Path(out).write_text(text + "\n", encoding="utf-8")
        print(f"{len(selection.columns)} feature columns written to {out}")
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


def recluster(settings: Settings, *, features: str | None = None, candidates: tuple[int, ...],
              max_profiles: int, min_profiles_per_cluster: int, partition_rows: int,
              scheduler: str | None = None, workers: int | None = None, seed: int,
              keep_runs: int, force: bool = False, restart: bool = False,
              report: str | None = None, quiet: bool = False) -> int:
    """The nightly job: cluster the parsed tags, assign every instance, switch the active
    run; exit :data:`EXIT_LOCKED` when another run holds the lock."""
    from parsers.selection import FeatureSelection, SelectionError, default_selection

    from ..progress import stderr_lines
    from ..tags.tag_clusters import ReclusterError, ReclusterLocked, ReclusterOptions
    from ..tags.tag_clusters import recluster as run_recluster

    try:
        selection = (FeatureSelection.from_json(Path(features).read_text(encoding="utf-8"))
                     if features else default_selection())
    except (OSError, SelectionError) as exc:
        print(f"error: feature selection {features}: {exc}", file=sys.stderr)
        return 2
    options = ReclusterOptions(
        selection=selection, candidates=candidates, max_profiles=max_profiles,
        min_profiles_per_cluster=min_profiles_per_cluster, random_state=seed,
        partition_rows=partition_rows, scheduler=scheduler,
        n_workers=workers, keep_runs=keep_runs, force=force,
        restart=restart)
    progress = stderr_lines(quiet)
    with database(settings) as opened:
        try:
            summary = run_recluster(opened.engine, opened.url, options, progress=progress)
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
        if report:
            return _write_cluster_report(opened.engine, summary.run_id, Path(report),
                                         settings.storage_path)
    return 0


def _write_cluster_report(engine, run_id: int | None, out: Path, storage_root: Path) -> int:
    from ..images.image_report import tag_cluster_montages
    from ..tags.cluster_report import render_cluster_report
    from ..tags.tag_clusters import ReclusterError, report_data

    try:
        data = report_data(engine, run_id)
    except ReclusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    montages = tag_cluster_montages(engine, storage_root, data.run_id)  # thumbnails of members
    print(f"wrote {render_cluster_report(data, out, montages=montages)}")
    return 0


def cluster_report(settings: Settings, *, run: int | None = None, out: str | None = None) -> int:
    """The HTML report of a tag clustering run (default: the active one)."""
    with database(settings) as opened:
        folder = Path(out or f"tag-clusters-{run or 'active'}")
        return _write_cluster_report(opened.engine, run, folder, settings.storage_path)


def add_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    reparse_parser = sub.add_parser("reparse", parents=[common],
                                    help="re-parse the archive's tags after a parser or "
                                         "vocabulary change (resumable)")
    reparse_parser.add_argument("--chunk", type=positive_int, default=1000)
    reparse_parser.add_argument("--all", dest="everything", action="store_true",
                                help="re-parse every instance, not only those of another "
                                     "parser or vocabulary version")
    reparse_parser.add_argument("--quiet", action="store_true", help="no progress line")
    reparse_parser.set_defaults(func=command(reparse))

    analyze_parser = sub.add_parser("analyze", parents=[common],
                                    help="tag frequency analysis of the archive, stored as a "
                                         "run, with a CSV and HTML report")
    analyze_parser.add_argument("--top", type=positive_int, default=10,
                                help="top values kept per tag")
    analyze_parser.add_argument("--unique-ratio", type=share(low_open=True), default=0.95,
                                help="distinct/non-empty share from which a tag is unique per "
                                     "record")
    analyze_parser.add_argument("--run", type=int,
                                help="render this stored run instead of counting")
    analyze_parser.add_argument("--out", help="report folder (default ./tag-analysis-RUN)")
    analyze_parser.add_argument("--csv", action="store_true",
                                help="write tags.csv and columns.csv")
    analyze_parser.add_argument("--html", action="store_true", help="write report.html")
    analyze_parser.add_argument("--quiet", action="store_true", help="no progress lines")
    analyze_parser.set_defaults(func=command(analyze))

    select = sub.add_parser("select-features", parents=[common],
                            help="the feature columns for tag clustering, as JSON: the shipped "
                                 "default, or --auto from an analysis run")
    select.add_argument("--auto", action="store_true",
                        help="derive the list from the latest (or --run) analysis run")
    select.add_argument("--run", type=int, help="analysis run for --auto")
    select.add_argument("--max-missing", type=share(), default=0.5,
                        help="drop columns missing in more than this share (--auto)")
    select.add_argument("--max-columns", type=positive_int, help="keep at most this many (--auto)")
    select.add_argument("--out", help="write the selection JSON here instead of stdout")
    select.set_defaults(func=command(select_features))

    parser = sub.add_parser(
        "recluster", parents=[common],
        help="the nightly job: cluster the parsed tags (Gower + K-medoids, K by silhouette), "
             "assign every instance, keep labels stable, switch the active run")
    parser.add_argument("--features", help="feature selection JSON (from select-features); "
                                           "default: the shipped list")
    parser.add_argument("--candidates", type=_candidates, default=(5, 10, 15, 20, 100, 200, 300),
                        help="candidate K values, comma-separated (default: the paper's "
                             "5,10,15,20,100,200,300)")
    parser.add_argument("--max-profiles", type=positive_int, default=5000,
                        help="distinct profiles clustered at most (a sample weighted by "
                             "instance count beyond that)")
    parser.add_argument("--min-profiles-per-cluster", type=positive_int, default=10,
                        help="candidates above distinct profiles / this are not tried, so a "
                             "small site gets a K a person can read (default 10)")
    parser.add_argument("--partition-rows", type=positive_int, default=50_000,
                        help="instances per assignment task")
    parser.add_argument("--scheduler", help="address of a dask.distributed scheduler "
                                            "(default: a local cluster)")
    parser.add_argument("--workers", type=positive_int, help="local Dask worker processes "
                                                             "(default: one per CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-runs", type=positive_int, default=3,
                        help="finished runs whose assignments are kept")
    parser.add_argument("--force", action="store_true",
                        help="run even when nothing changed since the active run")
    parser.add_argument("--restart", action="store_true",
                        help="abandon an unfinished run instead of resuming it")
    parser.add_argument("--report", help="write the run's HTML report to this folder")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.set_defaults(func=command(recluster))

    report = sub.add_parser("cluster-report", parents=[common],
                            help="HTML report of a tag clustering run (default: the active one)")
    report.add_argument("--run", type=int)
    report.add_argument("--out", help="folder (default ./tag-clusters-RUN)")
    report.set_defaults(func=command(cluster_report))
