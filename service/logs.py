"""Logging: readable ``HH:MM:SS LEVEL message key=value`` lines (the default, for a person
at a terminal) or one JSON object per line (``--log-format json`` / ``PACS_LOG_FORMAT=json``,
what the containers use), extras included either way."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from .config import Settings

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """``12:04:31 INFO  database ready revision=0009 embedded=True``: local time, the
    level, the message, the record's extras as ``key=value``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-5s %(message)s", datefmt="%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        extras = {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}
        if extras:
            base += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        return base


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record, not at set-up: a
    caller that swaps stderr (a test capturing output, a daemon redirecting it) keeps
    getting the log instead of a write to a closed stream. On a terminal it writes through
    ``tqdm.write``, so a line logged during a progress bar (``service.progress``) goes
    above the bar instead of into it."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass

    def emit(self, record: logging.LogRecord) -> None:
        from .progress import on_terminal

        if not on_terminal():
            super().emit(record)
            return
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


# loggers that are chatty at INFO: pynetdicom (every PDU/DIMSE message), dask.distributed
# (every scheduler, worker, nanny and client start: some 37 lines per recluster); their
# warnings stay
CHATTY = ("pynetdicom", "pgserver", "alembic", "distributed", "bokeh", "tornado", "asyncio")


def quiet_dask_workers() -> None:
    """Dask's worker processes configure their own logging from dask's config, not ours:
    ask them, through the environment they inherit, for warnings and up only. Call before
    ``distributed`` is first imported; a setting already in the environment wins."""
    import os

    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")


def setup_logging(settings: Settings) -> None:
    handler = _StderrHandler()
    quiet_dask_workers()
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    for chatty in CHATTY:
        logging.getLogger(chatty).setLevel(max(logging.WARNING, root.level))


def log_progress(logger: logging.Logger, progress, message: str) -> None:
    """A step of a long job: one log line. ``progress`` (a callable taking the line) gets it
    only when the log does not already show it on stderr, so a person at a terminal sees
    each step once, not twice."""
    logger.info(message)
    if progress is not None and not _shown_on_stderr(logger, logging.INFO):
        progress(message)


def _shown_on_stderr(logger: logging.Logger, level: int) -> bool:
    if not logger.isEnabledFor(level):
        return False
    current: logging.Logger | None = logger
    while current is not None:
        if any(isinstance(h, _StderrHandler) and h.level <= level for h in current.handlers):
            return True
        if not current.propagate:
            return False
        current = current.parent
    return False
