"""Tag clustering runs (method.md A.4-A.7): versioned runs, their medoids, every
instance's assignment, and the views radiology IT reads.

A run is fitted, then assigns the archive partition by partition (``tag_cluster_partitions``
records which are done, so an interrupted run resumes), then its clusters are matched to
the previous active run's so labels stay stable, and only then does it become the active
run. ``instance_tag_cluster`` always shows the active run.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB, TIMESTAMP

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

READONLY_ROLE = "pacs_readonly"
VIEWS = ("instance_tag_cluster", "tag_clusters")


def _now(name: str, **kw) -> sa.Column:
    return sa.Column(name, TIMESTAMP(timezone=True), server_default=sa.text("now()"), **kw)


def upgrade() -> None:
    op.create_table(
        "tag_cluster_runs",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        _now("started_at", nullable=False),
        sa.Column("finished_at", TIMESTAMP(timezone=True)),
        sa.Column("status", sa.Text, nullable=False, server_default="fitting"),
        sa.Column("is_active", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("previous_run_id", sa.BigInteger),
        sa.Column("parameters", JSONB, nullable=False, server_default="{}"),
        sa.Column("feature_selection", JSONB, nullable=False, server_default="{}"),
        sa.Column("k", sa.Integer),
        sa.Column("silhouette", sa.Float),
        sa.Column("k_table", JSONB),
        sa.Column("loss", sa.Float),
        sa.Column("instances", sa.BigInteger),
        sa.Column("profiles", sa.BigInteger),
        sa.Column("profiles_clustered", sa.BigInteger),
        sa.Column("assigned", sa.BigInteger),
        sa.Column("model", JSONB),
        sa.Column("sample", JSONB),
        sa.Column("timings", JSONB, nullable=False, server_default="{}"),
        sa.Column("error", sa.Text),
        sa.CheckConstraint("status IN ('fitting', 'assigning', 'matching', 'finished', "
                           "'failed')", name="ck_tag_cluster_runs_status"),
        sa.CheckConstraint("NOT is_active OR status = 'finished'",
                           name="ck_tag_cluster_runs_active_finished"),
    )
    op.create_index("ux_tag_cluster_runs_active", "tag_cluster_runs", ["is_active"],
                    unique=True, postgresql_where=sa.text("is_active"))
    op.create_table(
        "tag_cluster_medoids",
        sa.Column("run_id", sa.BigInteger,
                  sa.ForeignKey("tag_cluster_runs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("medoid_index", sa.Integer, primary_key=True),
        sa.Column("label", sa.Integer),
        sa.Column("sop_instance_uid", sa.Text),
        sa.Column("features", JSONB, nullable=False),
        sa.Column("sample_weight", sa.Float),
        sa.Column("silhouette", sa.Float),
        sa.Column("instances", sa.BigInteger),
        sa.Column("mean_distance", sa.Float),
        sa.Column("previous_overlap", sa.BigInteger),
        sa.UniqueConstraint("run_id", "label", name="uq_tag_cluster_medoids_label"),
    )
    op.create_table(
        "tag_cluster_partitions",
        sa.Column("run_id", sa.BigInteger,
                  sa.ForeignKey("tag_cluster_runs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("partition", sa.Integer, primary_key=True),
        sa.Column("lower_uid", sa.Text),
        sa.Column("upper_uid", sa.Text),
        sa.Column("rows", sa.BigInteger),
        sa.Column("done_at", TIMESTAMP(timezone=True)),
    )
    # No foreign key to instances: a run writes a million rows at once and a per-row check
    # would cost more than the view's join, which drops assignments of deleted instances.
    op.create_table(
        "tag_cluster_assignments",
        sa.Column("run_id", sa.BigInteger,
                  sa.ForeignKey("tag_cluster_runs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("sop_instance_uid", sa.Text, primary_key=True),
        sa.Column("medoid_index", sa.SmallInteger, nullable=False),
        sa.Column("distance", sa.REAL, nullable=False),
        _now("assigned_at", nullable=False),
    )
    op.execute(
        """
        CREATE VIEW instance_tag_cluster AS
        SELECT a.sop_instance_uid, m.label AS tag_cluster, a.distance, a.run_id,
               m.sop_instance_uid AS medoid_sop_instance_uid, a.assigned_at
        FROM tag_cluster_runs r
        JOIN tag_cluster_assignments a ON a.run_id = r.id
        JOIN tag_cluster_medoids m ON m.run_id = a.run_id AND m.medoid_index = a.medoid_index
        JOIN instances i ON i.sop_instance_uid = a.sop_instance_uid
        WHERE r.is_active
        """
    )
    op.execute(
        """
        CREATE VIEW tag_clusters AS
        SELECT m.label AS tag_cluster, m.instances, m.mean_distance, m.silhouette,
               m.sop_instance_uid AS medoid_sop_instance_uid, m.features AS medoid_features,
               r.id AS run_id, r.finished_at AS run_finished_at
        FROM tag_cluster_runs r
        JOIN tag_cluster_medoids m ON m.run_id = r.id
        WHERE r.is_active
        """
    )
    op.execute(
        f"""
        DO $$ BEGIN
            IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{READONLY_ROLE}') THEN
                GRANT SELECT ON {", ".join(VIEWS)} TO {READONLY_ROLE};
            END IF;
        END $$
        """
    )


def downgrade() -> None:
    for view in VIEWS:
        op.execute(f"DROP VIEW IF EXISTS {view}")
    op.drop_table("tag_cluster_assignments")
    op.drop_table("tag_cluster_partitions")
    op.drop_table("tag_cluster_medoids")
    op.drop_table("tag_cluster_runs")
