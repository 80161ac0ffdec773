"""The ingest stage's commands: ``serve`` (the DICOM listener), ``import`` (files through the
same path) and ``send`` (C-STORE to a receiver)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from .common import (Settings, UserError, command, database, log, positive_int,
                     progress_stream, stop_on_signals, vocabulary)


def serve(settings: Settings) -> int:
    """Run the C-STORE SCP until SIGTERM or SIGINT."""
    from ..ingest.scp import ensure_port_free, ingestor_for, serve_forever

    ensure_port_free(settings.bind_address, settings.port)
    vocabulary(settings)  # a broken site vocabulary stops the start, not the worker later
    with database(settings) as opened:
        stop = stop_on_signals()
        # start() settles what a previous run left unfinished; with several listener
        # processes this one only does that, and the children store
        with ingestor_for(settings, opened.engine,
                          stores=settings.processes <= 1) as ingestor:
            serve_forever(settings, opened.url, ingestor, stop)
    log.info("stopped")
    return 0


def import_files(settings: Settings, *, directory: str, threads: int, calling_ae: str,
                 strict: bool = False, rejects_csv: str | None = None,
                 quiet: bool = False) -> int:
    """Backfill the DICOM files under ``directory``: exit 1 when any failed (or, ``strict``,
    was rejected)."""
    from ..ingest.importer import import_directory
    from ..ingest.scp import ingestor_for

    root = Path(directory)
    if not root.exists():
        print(f"error: {root} does not exist", file=sys.stderr)
        return 2
    rejects = None
    if rejects_csv:
        try:  # opened first: a path that cannot be written fails before the import
            rejects = open(rejects_csv, "w", newline="", encoding="utf-8")
        except OSError as exc:
            print(f"error: --rejects-csv {rejects_csv}: {exc.strerror}", file=sys.stderr)
            return 2
    try:
        with database(settings) as opened, ingestor_for(settings, opened.engine) as ingestor:
            report = import_directory(ingestor, root, threads=threads, calling_ae=calling_ae,
                                      progress=progress_stream(quiet))
        if rejects is not None:
            report.write_rejects_csv(rejects)
    finally:
        if rejects is not None:
            rejects.close()
    print(report.summary())
    if report.outcomes.get("failed"):
        return 1
    if strict and report.outcomes.get("rejected"):
        return 1
    return 0


def send(*, paths: Sequence[str], to: str, aet: str, aec: str, timeout: float,
         report: str | None = None, quiet: bool = False) -> int:
    """Send files to the receiver ``to`` (HOST:PORT): exit 1 when any was rejected or not
    sent; :class:`~service.cli.common.UserError` on a bad destination, title or path."""
    from ..ingest.sender import SendOptions, parse_destination, send_directory

    try:
        host, port = parse_destination(to)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    for flag, title in (("--aet", aet), ("--aec", aec)):
        if not title.strip() or len(title) > 16 or "\\" in title:
            raise UserError(f"{flag} {title!r}: an AE title has 1 to 16 characters, no backslash")
    roots = [Path(p) for p in paths]
    for root in roots:
        if not root.exists():
            raise UserError(f"{root} does not exist")
    report_csv = None
    if report:
        try:  # opened first: a path that cannot be written fails before anything is sent
            report_csv = open(report, "w", newline="", encoding="utf-8")
        except OSError as exc:
            raise UserError(f"--report {report}: {exc.strerror}") from None
    options = SendOptions(host, port, calling_ae=aet, called_ae=aec, timeout=timeout)
    try:
        result = send_directory(roots, options, report_csv=report_csv, quiet=quiet)
    finally:
        if report_csv is not None:
            report_csv.close()
    print(result.summary())
    return 0 if result.ok else 1


def add_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    serve_parser = sub.add_parser("serve", parents=[common], help="run the C-STORE SCP")
    serve_parser.add_argument("--ae-title", help="our AE title (PACS_AE_TITLE)")
    serve_parser.add_argument("--bind", help="address to listen on (PACS_BIND_ADDRESS)")
    serve_parser.add_argument("--port", type=int, help="port to listen on (PACS_PORT)")
    serve_parser.add_argument("--processes", type=positive_int,
                              help="listener processes (PACS_PROCESSES)")
    serve_parser.set_defaults(func=command(serve))

    imp = sub.add_parser("import", parents=[common], help="backfill DICOM files from a folder")
    imp.add_argument("directory")
    imp.add_argument("--threads", type=positive_int, default=8)
    imp.add_argument("--calling-ae", default="IMPORT", help="recorded as the calling AE title")
    imp.add_argument("--strict", action="store_true", help="exit 1 when any file is rejected")
    imp.add_argument("--rejects-csv", metavar="PATH",
                     help="write every file not stored (file, SOP Instance UID, calling AE, "
                          "status, reason) to this CSV file")
    imp.add_argument("--quiet", action="store_true", help="no progress line")
    imp.set_defaults(func=command(import_files))

    send_parser = sub.add_parser(
        "send", help="send DICOM files to a DICOM receiver (C-STORE), each in its own transfer "
                     "syntax; exit 1 when any was rejected or not sent")
    send_parser.add_argument("paths", nargs="+", metavar="DIR",
                             help="folders (searched recursively) or files")
    send_parser.add_argument("--to", required=True, metavar="HOST:PORT",
                             help="the receiver, e.g. 127.0.0.1:11112 ([::1]:11112 for IPv6)")
    send_parser.add_argument("--aet", default="STORESCU", help="our (calling) AE title")
    send_parser.add_argument("--aec", default="PACS_ANNOTATE",
                             help="the receiver's (called) AE title")
    send_parser.add_argument("--timeout", type=float, default=60.0,
                             help="seconds to wait for the receiver before giving up on an "
                                  "association")
    send_parser.add_argument("--report", metavar="FILE",
                             help="write one CSV row per file: path, outcome (stored, "
                                  "rejected, failed, skipped), status, reason, UIDs, transfer "
                                  "syntax")
    send_parser.add_argument("--quiet", action="store_true", help="no progress bar")
    send_parser.set_defaults(func=command(send))
