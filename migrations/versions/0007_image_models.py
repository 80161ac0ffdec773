"""Image clusters and retrieval codes (method.md B.2-B.7): versioned image models,
each image's cluster and 256-value retrieval code, and ``similar_images(uid, n)``.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op
from pgvector.sqlalchemy import Vector
from sqlalchemy.dialects.postgresql import JSONB, TIMESTAMP

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

READONLY_ROLE = "pacs_readonly"

SIMILAR_IMAGES = f"""
CREATE FUNCTION similar_images(query_uid text, n integer DEFAULT 20)
RETURNS TABLE (sop_instance_uid text, score double precision, image_cluster integer,
               same_cluster boolean, tag_cluster integer, modality text, body_part text)
LANGUAGE sql STABLE AS $$
    WITH query AS (
        SELECT a.retrieval_code, a.image_cluster, a.model_id
        FROM image_annotations a JOIN image_models m ON m.id = a.model_id AND m.is_active
        WHERE a.sop_instance_uid = query_uid
    ), ranked AS (
        SELECT a.sop_instance_uid, 1 - (a.retrieval_code <=> q.retrieval_code) AS score,
               a.image_cluster, a.image_cluster = q.image_cluster AS same_cluster
        FROM image_annotations a CROSS JOIN query q
        WHERE a.model_id = q.model_id AND a.sop_instance_uid <> query_uid
        ORDER BY a.image_cluster = q.image_cluster DESC, a.retrieval_code <=> q.retrieval_code,
                 a.sop_instance_uid
        LIMIT n
    )
    SELECT r.sop_instance_uid, r.score, r.image_cluster, r.same_cluster, t.tag_cluster,
           f.modality, coalesce(f.body_part, f.body_part_inferred)
    FROM ranked r
    LEFT JOIN instance_tag_cluster t ON t.sop_instance_uid = r.sop_instance_uid
    LEFT JOIN radiology_features f ON f.sop_instance_uid = r.sop_instance_uid
    ORDER BY r.same_cluster DESC, r.score DESC, r.sop_instance_uid
$$
"""


def upgrade() -> None:
    op.create_table(
        "image_models",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("started_at", TIMESTAMP(timezone=True), nullable=False,
                  server_default=sa.text("now()")),
        sa.Column("finished_at", TIMESTAMP(timezone=True)),
        sa.Column("status", sa.Text, nullable=False, server_default="training"),
        sa.Column("is_active", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("feature_model_version", sa.Text, nullable=False),
        sa.Column("path", sa.Text),
        sa.Column("parameters", JSONB, nullable=False, server_default="{}"),
        sa.Column("history", JSONB),
        sa.Column("timings", JSONB, nullable=False, server_default="{}"),
        sa.Column("images", sa.BigInteger),
        sa.Column("annotated", sa.BigInteger),
        sa.Column("error", sa.Text),
        sa.CheckConstraint("status IN ('training', 'annotating', 'finished', 'failed')",
                           name="ck_image_models_status"),
        sa.CheckConstraint("NOT is_active OR status = 'finished'",
                           name="ck_image_models_active_finished"),
    )
    op.create_index("ux_image_models_active", "image_models", ["is_active"], unique=True,
                    postgresql_where=sa.text("is_active"))
    op.create_table(
        "image_annotations",
        sa.Column("model_id", sa.BigInteger,
                  sa.ForeignKey("image_models.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("sop_instance_uid", sa.Text,
                  sa.ForeignKey("instances.sop_instance_uid", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("image_cluster", sa.Integer, nullable=False),
        # no fixed dimension: 256 with Table 9 defaults, k x 128 for the no-layer-2 ablation
        sa.Column("retrieval_code", Vector(), nullable=False),
        sa.Column("annotated_at", TIMESTAMP(timezone=True), nullable=False,
                  server_default=sa.text("now()")),
    )
    op.create_index("ix_image_annotations_model_cluster", "image_annotations",
                    ["model_id", "image_cluster"])
    op.execute(SIMILAR_IMAGES)
    op.execute(
        f"""
        DO $$ BEGIN
            IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{READONLY_ROLE}') THEN
                GRANT SELECT ON image_annotations, image_models TO {READONLY_ROLE};
                GRANT EXECUTE ON FUNCTION similar_images(text, integer) TO {READONLY_ROLE};
            END IF;
        END $$
        """
    )


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS similar_images(text, integer)")
    op.drop_table("image_annotations")
    op.drop_table("image_models")
