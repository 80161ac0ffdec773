"""Database connection: ``DATABASE_URL`` when set, else the embedded pgserver PostgreSQL."""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url

from ..config import Settings
from ..processes import process_is_running

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


def sqlalchemy_url(url: str) -> str:
    """Map a libpq-style URL to a SQLAlchemy one; psycopg 3 unless a driver is named.

    >>> sqlalchemy_url("postgres://u:p@h/db")
    'postgresql+psycopg://u:p@h/db'
    >>> sqlalchemy_url("postgresql+psycopg2://h/db")
    'postgresql+psycopg2://h/db'
    """
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def redact(url: str) -> str:
    """The URL with its password hidden, for logs and messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparseable URL is still never printed whole
        return "<unparseable database URL>"


def create_db_engine(url: str, *, pool_size: int = 5) -> Engine:
    return sa.create_engine(
        sqlalchemy_url(url),
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        future=True,
    )


@dataclass
class Database:
    url: str
    embedded: bool
    engine: Engine

    def dispose(self) -> None:
        self.engine.dispose()


def _forget_dead_holders(pgdata: Path) -> None:
    """pgserver stops its server when the last process holding it exits, and keeps the
    holders' pids in ``pgdata/.handle_pids.json``.  A holder killed with -9 never leaves
    that list, so the server would outlive every later run; drop the pids of processes
    that are gone before joining."""
    path = pgdata / ".handle_pids.json"
    try:
        pids = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if not isinstance(pids, list):
        return
    alive = [pid for pid in pids if isinstance(pid, int) and process_is_running(pid)]
    if alive != pids:
        log.info("forgetting embedded PostgreSQL holders that are gone",
                 extra={"pids": [pid for pid in pids if pid not in alive]})
        path.write_text(json.dumps(alive))


def start_embedded(pgdata: Path) -> str:
    """Start (or join) the pgserver PostgreSQL in ``pgdata``; returns its libpq URL.

    The server stops when the last process that called this exits (also after a holder
    was killed: see :func:`_forget_dead_holders`).
    """
    pgdata = pgdata.resolve()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    _forget_dead_holders(pgdata)
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (root shells, CI)
        warnings.simplefilter("ignore")
        import pgserver

        server = pgserver.get_server(pgdata, cleanup_mode="stop")
    log.info("embedded PostgreSQL running", extra={"pgdata": str(pgdata)})
    return server.get_uri()


@contextlib.contextmanager
def open_database(settings: Settings, *, pool_size: int = 5) -> Iterator[Database]:
    """The configured database, starting the embedded one when no URL is set."""
    if settings.database_url:
        url, embedded = settings.database_url, False
    else:
        url, embedded = start_embedded(settings.pgdata_path), True
    engine = create_db_engine(url, pool_size=pool_size)
    try:
        yield Database(url=url, embedded=embedded, engine=engine)
    finally:
        engine.dispose()


def alembic_config(connection: sa.Connection | None = None):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def migrate(engine: Engine, revision: str = "head") -> str | None:
    """Apply migrations up to ``revision``; returns the revision the database is at."""
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    with engine.begin() as conn:
        # one migrator at a time when several services start together
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(7436512001)"))
        command.upgrade(alembic_config(conn), revision)
        return MigrationContext.configure(conn).get_current_revision()
