"""Tag frequency analysis runs (method.md A.1): one row per run, one per tag, one
per parsed feature column.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB, TIMESTAMP

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tag_analysis_runs",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("started_at", TIMESTAMP(timezone=True), nullable=False,
                  server_default=sa.text("now()")),
        sa.Column("finished_at", TIMESTAMP(timezone=True)),
        sa.Column("status", sa.Text, nullable=False, server_default="running"),
        sa.Column("instances", sa.BigInteger),
        sa.Column("feature_instances", sa.BigInteger),
        sa.Column("parameters", JSONB, nullable=False, server_default="{}"),
        sa.Column("error", sa.Text),
    )
    op.create_table(
        "tag_analysis",
        sa.Column("run_id", sa.BigInteger,
                  sa.ForeignKey("tag_analysis_runs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("keyword", sa.Text, primary_key=True),
        sa.Column("present", sa.BigInteger, nullable=False),
        sa.Column("empty", sa.BigInteger, nullable=False),
        sa.Column("missing_share", sa.Float, nullable=False),
        sa.Column("distinct_values", sa.BigInteger, nullable=False),
        sa.Column("top_values", JSONB, nullable=False, server_default="[]"),
        sa.Column("is_unique_per_record", sa.Boolean, nullable=False),
        sa.Column("parse_failures", sa.BigInteger),
        sa.Column("failure_examples", JSONB),
    )
    op.create_table(
        "tag_analysis_columns",
        sa.Column("run_id", sa.BigInteger,
                  sa.ForeignKey("tag_analysis_runs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("column_name", sa.Text, primary_key=True),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("present", sa.BigInteger, nullable=False),
        sa.Column("missing_share", sa.Float),
        sa.Column("parse_failures", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("tag_analysis_columns")
    op.drop_table("tag_analysis")
    op.drop_table("tag_analysis_runs")
