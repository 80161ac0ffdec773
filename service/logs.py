"""Structured logging: one JSON object per line (or plain text), extras included."""

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
    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        extras = {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}
        if extras:
            base += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        return base


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record, not at set-up: a
    caller that swaps stderr (a test capturing output, a daemon redirecting it) keeps
    getting the log instead of a write to a closed stream."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(settings: Settings) -> None:
    handler = _StderrHandler()
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    # pynetdicom (every PDU/DIMSE message) and dask.distributed (every worker and client
    # start) are chatty at INFO; keep their warnings
    for chatty in ("pynetdicom", "pgserver", "alembic", "distributed"):
        logging.getLogger(chatty).setLevel(max(logging.WARNING, root.level))


def log_progress(logger: logging.Logger, progress, message: str) -> None:
    """A step of a long job: to the log, and to ``progress`` (e.g. stderr lines) when given."""
    logger.info(message)
    if progress is not None:
        progress(message)
