"""Compress new ``instances.tags`` values with lz4 where the server was built with it.

Every store writes one tags document of a few KB, which PostgreSQL compresses before it
goes to TOAST; pglz made that single-row INSERT about 0.3 ms slower than lz4 on the
benchmark's PostgreSQL 15 (benchmarks/ingest/README.md), for values 20% smaller.
Servers without lz4 (the embedded one) keep pglz; existing values are not rewritten.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-25
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        DO $$
        BEGIN
            ALTER TABLE instances ALTER COLUMN tags SET COMPRESSION lz4;
        EXCEPTION WHEN feature_not_supported THEN
            RAISE NOTICE 'PostgreSQL built without lz4: instances.tags keeps pglz';
        END
        $$
        """
    )


def downgrade() -> None:
    op.execute("ALTER TABLE instances ALTER COLUMN tags SET COMPRESSION pglz")
