"""What every command module of the CLI shares: the parser classes and argument types, the
user error, settings and database opening, and :func:`command`, which lets argparse call a
verb that is a plain function.

A verb (``serve``, ``status``, ``evaluate``, ...) takes the :class:`~service.config.Settings`
and keyword arguments named like its options' ``dest``; it prints what the user reads and
returns the exit code. A test or another program calls it directly; argparse only parses and
calls it through :func:`command`. The stages' modules are imported inside the verbs, so that
building the parser (``--help``) loads none of them.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import logging
import signal
import sys
import threading
from typing import Callable, Iterator

from ..config import ConfigError, Settings, load_settings
from ..database.engine import Database

log = logging.getLogger("pacs_annotate")


class UserError(Exception):
    """A mistake of the person running the command: ``main`` prints ``error: <message>``,
    one line, and exits 2 (no traceback)."""


def int_at_least(minimum: int):
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


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def share(*, low_open: bool = False, high_open: bool = False):
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


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
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


class Parser(argparse.ArgumentParser):
    """argparse with defaults in every help and a one-line error (``prog: error: ...``),
    exit 2; the subcommands' parsers are of this class too.

    :meth:`defer` adds a command's options only when that command is used (parsed, or its
    help shown): for options whose defaults live in a module that is slow to import
    (``evaluate``'s come from the torch pipeline), so that the whole parser builds without
    it."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self._deferred: list[Callable[[argparse.ArgumentParser], None]] = []

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def defer(self, add_arguments: Callable[[argparse.ArgumentParser], None]) -> None:
        self._deferred.append(add_arguments)

    def _add_deferred(self) -> None:
        while self._deferred:
            self._deferred.pop(0)(self)

    def parse_known_args(self, args=None, namespace=None):
        self._add_deferred()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self._add_deferred()
        return super().format_usage()

    def format_help(self) -> str:
        self._add_deferred()
        return super().format_help()


def add_arguments_when_used(parser: argparse.ArgumentParser,
                            add_arguments: Callable[[argparse.ArgumentParser], None]) -> None:
    """``add_arguments(parser)`` when the parser is used (a :class:`Parser`), else now."""
    if isinstance(parser, Parser):
        parser.defer(add_arguments)
    else:
        add_arguments(parser)


def settings_from(args: argparse.Namespace) -> Settings:
    """The settings: the file and environment, overridden by the options given."""
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


def command(verb: Callable[..., int]) -> Callable[[argparse.Namespace], int]:
    """What argparse calls for ``verb``: its ``settings`` from the options that set them
    (:func:`settings_from`), each other parameter from the option of the same name."""
    parameters = inspect.signature(verb).parameters

    @functools.wraps(verb)
    def call(args: argparse.Namespace) -> int:
        kwargs = {name: getattr(args, name) for name in parameters
                  if name != "settings" and hasattr(args, name)}
        if "settings" in parameters:
            kwargs["settings"] = settings_from(args)
        return verb(**kwargs)

    return call


# commands that work on an existing archive: with the embedded database, a --data-dir
# without one is a typo, not a wish for a new empty archive (--create makes one)
CREATES_ARCHIVE = frozenset({"serve", "import", "migrate"})


def check_archive_exists(args: argparse.Namespace, settings: Settings) -> None:
    command_name = getattr(args, "command", None)
    if (settings.database_url or command_name in CREATES_ARCHIVE or command_name == "send"
            or (command_name == "select-features" and not args.auto)  # no database without --auto
            or getattr(args, "create", False) or settings.pgdata_path.is_dir()):
        return
    where = ("does not exist" if not settings.data_dir.exists()
             else "holds no archive (no pgdata folder)")
    raise UserError(f"data directory {settings.data_dir} {where}: point --data-dir (or "
                    "PACS_DATA_DIR) at the folder that `serve` or `import` filled, set "
                    "DATABASE_URL for an external PostgreSQL, or add --create to start a new, "
                    "empty archive there")


@contextlib.contextmanager
def database(settings: Settings, *, migrate: bool = True) -> Iterator[Database]:
    """The configured database, migrated; the embedded one stops when the block ends,
    also when the migration fails."""
    from ..database.engine import migrate as run_migrations
    from ..database.engine import open_database, redact

    with open_database(settings) as opened:
        if migrate:
            revision = run_migrations(opened.engine)
            log.info("database ready", extra={"url": redact(opened.url),
                                              "revision": revision,
                                              "embedded": opened.embedded})
        yield opened


def pending(engine, stage: str) -> int:
    """Items of ``stage`` waiting in the work queue."""
    import sqlalchemy as sa

    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT count(*) FROM work_queue WHERE stage = :stage "
                                    "AND status = 'pending'"), {"stage": stage}).scalar_one()


def stop_on_signals() -> threading.Event:
    """Set by SIGTERM or SIGINT: the long-running commands end cleanly on either."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    return stop


def progress_stream(quiet: bool = False):
    """Where a long job draws its progress: stderr when it is a terminal, else nowhere."""
    from ..progress import on_terminal

    return None if quiet or not on_terminal() else sys.stderr


def vocabulary(settings: Settings):
    from parsers import load_vocabulary

    return load_vocabulary(settings.site_vocabulary)
