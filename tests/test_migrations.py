"""The migrations build exactly the schema the code queries, and run both ways."""

from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from service.database.engine import alembic_config, migrate
from service.database.schema import metadata


def test_migrated_schema_matches_the_table_definitions(engine):
    with engine.connect() as conn:
        differences = compare_metadata(MigrationContext.configure(conn), metadata)
    assert differences == []


def _head() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def test_downgrade_and_upgrade_again(engine):
    with engine.begin() as conn:
        command.downgrade(alembic_config(conn), "base")
    assert migrate(engine) == _head()
    assert migrate(engine) == _head()  # idempotent


def test_every_revision_downgrades_one_step_and_back(engine):
    from alembic.script import ScriptDirectory

    revisions = [r.revision for r in ScriptDirectory.from_config(alembic_config()).walk_revisions()]
    for revision in revisions:
        with engine.begin() as conn:
            command.downgrade(alembic_config(conn), "-1")
        assert migrate(engine) == _head(), revision
