"""Initial schema: patient/study/series/instance index, work queue, ingest counters.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB, TIMESTAMP

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _ts(name: str, **kw) -> sa.Column:
    return sa.Column(name, TIMESTAMP(timezone=True), **kw)


def upgrade() -> None:
    now = sa.text("now()")
    op.create_table(
        "patients",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("patient_id", sa.Text, nullable=False, server_default=""),
        sa.Column("issuer_of_patient_id", sa.Text, nullable=False, server_default=""),
        sa.Column("patient_name", sa.Text),
        sa.Column("patient_birth_date", sa.Date),
        sa.Column("patient_sex", sa.Text),
        _ts("created_at", nullable=False, server_default=now),
        sa.UniqueConstraint("patient_id", "issuer_of_patient_id", name="uq_patients_id_issuer"),
    )
    op.create_table(
        "studies",
        sa.Column("study_instance_uid", sa.Text, primary_key=True),
        sa.Column("patient_pk", sa.BigInteger, sa.ForeignKey("patients.id"), nullable=False),
        sa.Column("study_date", sa.Date),
        sa.Column("study_time", sa.Text),
        sa.Column("accession_number", sa.Text),
        sa.Column("study_id", sa.Text),
        sa.Column("study_description", sa.Text),
        sa.Column("referring_physician_name", sa.Text),
        _ts("created_at", nullable=False, server_default=now),
    )
    op.create_index("ix_studies_patient_pk", "studies", ["patient_pk"])
    op.create_index("ix_studies_study_date", "studies", ["study_date"])
    op.create_index("ix_studies_accession_number", "studies", ["accession_number"])
    op.create_table(
        "series",
        sa.Column("series_instance_uid", sa.Text, primary_key=True),
        sa.Column(
            "study_instance_uid",
            sa.Text,
            sa.ForeignKey("studies.study_instance_uid"),
            nullable=False,
        ),
        sa.Column("modality", sa.Text),
        sa.Column("series_number", sa.Integer),
        sa.Column("series_description", sa.Text),
        sa.Column("body_part_examined", sa.Text),
        sa.Column("manufacturer", sa.Text),
        sa.Column("manufacturer_model_name", sa.Text),
        sa.Column("station_name", sa.Text),
        sa.Column("series_date", sa.Date),
        _ts("created_at", nullable=False, server_default=now),
    )
    op.create_index("ix_series_study_instance_uid", "series", ["study_instance_uid"])
    op.create_index("ix_series_modality", "series", ["modality"])
    op.create_index("ix_series_body_part_examined", "series", ["body_part_examined"])
    op.create_table(
        "instances",
        sa.Column("sop_instance_uid", sa.Text, primary_key=True),
        sa.Column(
            "series_instance_uid",
            sa.Text,
            sa.ForeignKey("series.series_instance_uid"),
            nullable=False,
        ),
        sa.Column("study_instance_uid", sa.Text, nullable=False),
        sa.Column("sop_class_uid", sa.Text, nullable=False),
        sa.Column("transfer_syntax_uid", sa.Text, nullable=False),
        sa.Column("modality", sa.Text),
        sa.Column("instance_number", sa.Integer),
        sa.Column("content_date", sa.Date),
        sa.Column("calling_ae_title", sa.Text),
        sa.Column("called_ae_title", sa.Text),
        sa.Column("file_path", sa.Text, nullable=False),
        sa.Column("file_size", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.Text, nullable=False),
        _ts("received_at", nullable=False, server_default=now),
        sa.Column("tags", JSONB, nullable=False),
    )
    # lz4 compresses the tags several times faster than the default pglz; servers built
    # without lz4 (the embedded pgserver build) keep pglz
    op.execute(
        """
        DO $$ BEGIN
            ALTER TABLE instances ALTER COLUMN tags SET COMPRESSION lz4;
        EXCEPTION WHEN feature_not_supported THEN NULL;
        END $$
        """
    )
    op.create_index("ix_instances_series_instance_uid", "instances", ["series_instance_uid"])
    op.create_index("ix_instances_study_instance_uid", "instances", ["study_instance_uid"])
    op.create_index("ix_instances_sop_class_uid", "instances", ["sop_class_uid"])
    op.create_index("ix_instances_modality", "instances", ["modality"])
    op.create_index("ix_instances_received_at", "instances", ["received_at"])
    op.create_table(
        "work_queue",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("stage", sa.Text, nullable=False),
        sa.Column(
            "sop_instance_uid",
            sa.Text,
            sa.ForeignKey("instances.sop_instance_uid", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("status", sa.Text, nullable=False, server_default="pending"),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        _ts("available_at", nullable=False, server_default=now),
        sa.Column("claimed_by", sa.Text),
        _ts("claimed_at"),
        sa.Column("last_error", sa.Text),
        _ts("created_at", nullable=False, server_default=now),
        _ts("updated_at", nullable=False, server_default=now),
        sa.UniqueConstraint("stage", "sop_instance_uid", name="uq_work_queue_stage_instance"),
    )
    op.create_index(
        "ix_work_queue_pending",
        "work_queue",
        ["stage", "available_at", "id"],
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.create_index("ix_work_queue_status", "work_queue", ["stage", "status"])
    op.create_table(
        "ingest_stats",
        sa.Column("node", sa.Text, primary_key=True),
        sa.Column("received", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("stored", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("duplicates", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("rejected", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("bytes_stored", sa.BigInteger, nullable=False, server_default="0"),
        _ts("started_at", nullable=False, server_default=now),
        _ts("updated_at", nullable=False, server_default=now),
    )


def downgrade() -> None:
    for table in ("ingest_stats", "work_queue", "instances", "series", "studies", "patients"):
        op.drop_table(table)
