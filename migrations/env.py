"""Alembic environment: the connection comes from the caller or from DATABASE_URL."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from service.database.engine import sqlalchemy_url
from service.database.schema import metadata

config = context.config
target_metadata = metadata


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()
        return
    from service.config import load_settings

    url = load_settings().database_url or config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("set DATABASE_URL, or use `pacs-annotate migrate` for the embedded database")
    engine = create_engine(sqlalchemy_url(url))
    with engine.connect() as conn:
        context.configure(connection=conn, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata,
                      literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    run_migrations_online()
