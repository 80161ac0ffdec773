"""``pacs-annotate``: the one command for everything a user runs.

The parser is assembled here from the stages' command modules (``ingest``, ``archive``,
``worker``, ``tags``, ``images``); each holds its commands as plain functions, the verbs, and
the sub-parsers that call them (:func:`service.cli.common.command`). ``python -m service.cli``
and ``python -m service`` run :func:`main`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .. import __version__
from . import archive, images, ingest, tags, worker
from .common import ConfigError, Parser, UserError, check_archive_exists, settings_from
from .tags import EXIT_LOCKED

__all__ = ["EXIT_LOCKED", "UserError", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
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
    common = Parser(add_help=False)
    common.add_argument("--config", help="TOML settings file (also PACS_CONFIG)")
    common.add_argument("--data-dir", help="embedded database and default storage (PACS_DATA_DIR, "
                                           "default ./data)")
    common.add_argument("--storage-dir", help="where instance files go (PACS_STORAGE_DIR)")
    common.add_argument("--log-format", default=argparse.SUPPRESS, **log_format)
    common.add_argument("--create", action="store_true",
                        help="start a new, empty archive when --data-dir holds none (serve, "
                             "import and migrate always do)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for stage in (ingest, archive, worker, tags, images):
        stage.add_parsers(sub, common)
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
        settings = settings_from(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings)
    try:
        check_archive_exists(args, settings)
        return args.func(args)
    except (ConfigError, VocabularyError, UserError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130

