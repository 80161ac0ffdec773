"""Fixtures: a real PostgreSQL (embedded pgserver, or TEST_DATABASE_URL), a fresh
database per test, and a running listener on a free port."""

from __future__ import annotations

import os
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import sqlalchemy as sa

try:
    # Imported here, at collection, rather than by hypothesis's own plugin at the end of
    # the session: on CPython 3.11.7 that late import (pytest rewrites it) died with
    # "SystemError: AST constructor recursion depth mismatch" after the database-outage
    # test, when that test ran alone.
    import hypothesis  # noqa: F401
except ImportError:
    pass
from sqlalchemy.engine import make_url

from service.config import Settings, load_settings
from service.database.engine import create_db_engine, migrate, sqlalchemy_url
from service.ingest.ingestor import Ingestor
from service.ingest.scp import start_listener
from service.ingest.storage import FileStore

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DICOM = REPO_ROOT.parent / "shared" / "data" / "dicom"


@pytest.fixture(scope="session")
def admin_url(tmp_path_factory) -> Iterator[str]:
    """URL of a PostgreSQL server the tests may create databases on."""
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        yield url
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver

        server = pgserver.get_server(tmp_path_factory.mktemp("pg") / "pgdata", cleanup_mode="stop")
    yield server.get_uri()
    server.cleanup()


@pytest.fixture
def database_url(admin_url: str) -> Iterator[str]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(sqlalchemy_url(admin_url), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = make_url(sqlalchemy_url(admin_url)).set(database=name).render_as_string(
        hide_password=False)
    yield url
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def engine(database_url: str) -> Iterator[sa.Engine]:
    eng = create_db_engine(database_url)
    migrate(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return load_settings(
        environ={},
        database_url=database_url,
        data_dir=tmp_path / "data",
        bind_address="127.0.0.1",
        ae_title="PACS_TEST",
        processes=1,
    )


@dataclass
class RunningService:
    settings: Settings
    engine: sa.Engine
    ingestor: Ingestor
    port: int

    @property
    def storage(self) -> Path:
        return self.settings.storage_path

    def scalar(self, sql: str, **params):
        with self.engine.connect() as conn:
            return conn.execute(sa.text(sql), params).scalar()

    def stored_files(self) -> list[Path]:
        return sorted(p for p in self.storage.rglob("*") if p.is_file())


def leftover_temps(storage: Path) -> list[Path]:
    """Temp names of unfinished stores: what a finished store or a clean start-up must not
    leave.  The spare files a running listener keeps ready live in sub-folders."""
    from service.ingest.storage import INCOMING

    return sorted((storage / INCOMING).glob("*.tmp"))


def _start_service(settings: Settings, engine: sa.Engine) -> Iterator[RunningService]:
    ingestor = Ingestor(engine, FileStore(settings.storage_path), stages=settings.queue_stages,
                        batch_max=settings.commit_batch_max, stats_interval=0.2,
                        strict=settings.strict_ingest)
    ingestor.start()
    server = start_listener(settings, ingestor, port=0)
    try:
        yield RunningService(settings, engine, ingestor, server.port)
    finally:
        server.shutdown()
        ingestor.close()


@pytest.fixture
def service(settings: Settings, engine: sa.Engine) -> Iterator[RunningService]:
    yield from _start_service(settings, engine)


@pytest.fixture
def service_factory(settings: Settings, engine: sa.Engine):
    """Start a listener with some settings changed."""
    started = []

    def make(**changes) -> RunningService:
        import dataclasses

        generator = _start_service(dataclasses.replace(settings, **changes), engine)
        running = next(generator)
        started.append(generator)
        return running

    yield make
    for generator in started:
        next(generator, None)


@pytest.fixture
def one_torch_thread():
    """Small torch problems run on one thread: with 2 threads on a shared 2-core machine,
    OpenMP workers spinning between ops starve the main thread."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
