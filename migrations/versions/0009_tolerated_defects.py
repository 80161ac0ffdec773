"""Tolerated defects: one row for each defect the receiver let through instead of rejecting.

An instance that dcmtk's ``storescp`` and Orthanc store (an invalid UID in the data set, a
C-STORE whose Affected SOP Instance UID differs from the data set's) is kept in tolerant mode,
and each defect gets a row here in the same transaction as the instance's row: which
instance, which rule, what was seen, and which sender.  Instances without a defect write
nothing here.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import TIMESTAMP

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

READONLY_ROLE = "pacs_readonly"


def upgrade() -> None:
    op.create_table(
        "tolerated_defects",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("sop_instance_uid", sa.Text,
                  sa.ForeignKey("instances.sop_instance_uid", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("rule", sa.Text, nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
        sa.Column("calling_ae_title", sa.Text),
        sa.Column("called_ae_title", sa.Text),
        sa.Column("received_at", TIMESTAMP(timezone=True), nullable=False,
                  server_default=sa.text("now()")),
    )
    op.create_index("ix_tolerated_defects_sop_instance_uid", "tolerated_defects",
                    ["sop_instance_uid"])
    op.create_index("ix_tolerated_defects_rule", "tolerated_defects", ["rule"])
    op.execute(
        f"""
        DO $$
        BEGIN
            IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{READONLY_ROLE}') THEN
                GRANT SELECT ON tolerated_defects TO {READONLY_ROLE};
            END IF;
        END
        $$
        """
    )


def downgrade() -> None:
    op.drop_table("tolerated_defects")
