"""Image features (method.md B.1): one DenseNet121 feature vector per instance in a
pgvector column, the 7 x 7 maps referenced in the on-disk feature store, and the reason
when an instance has no image.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op
from pgvector.sqlalchemy import Vector
from sqlalchemy.dialects.postgresql import TIMESTAMP

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

FEATURE_DIM = 1024


def upgrade() -> None:
    op.execute("CREATE EXTENSION IF NOT EXISTS vector")
    op.create_table(
        "image_features",
        sa.Column("sop_instance_uid", sa.Text,
                  sa.ForeignKey("instances.sop_instance_uid", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("model_version", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("skip_reason", sa.Text),
        sa.Column("frame", sa.Integer),
        sa.Column("feature", Vector(FEATURE_DIM)),
        sa.Column("map_shard", sa.Text),
        sa.Column("map_index", sa.Integer),
        sa.Column("computed_at", TIMESTAMP(timezone=True), nullable=False,
                  server_default=sa.text("now()")),
        sa.CheckConstraint("status IN ('done', 'skipped')", name="ck_image_features_status"),
        sa.CheckConstraint("status <> 'done' OR (feature IS NOT NULL AND map_shard IS NOT NULL)",
                           name="ck_image_features_done"),
    )
    op.create_index("ix_image_features_model_version", "image_features", ["model_version"])
    # cosine nearest-neighbour search on the features straight from SQL (ORDER BY feature <=> q)
    op.create_index("ix_image_features_feature", "image_features", ["feature"],
                    postgresql_using="hnsw", postgresql_ops={"feature": "vector_cosine_ops"})


def downgrade() -> None:
    op.drop_table("image_features")
