"""Parsed rows know their vocabulary, tag assignments know when they fit no cluster, and
image models know where their backbone's weights are.

* ``instance_features.vocabulary_version``: the hash of the vocabulary that parsed the row
  (``parsers.Vocabulary.version``), beside ``parser_version``; ``reparse`` redoes the rows of
  another version. Rows parsed before this migration have NULL (unknown): redone once.
* ``tag_cluster_runs.outlier_distance``: the run's outlier threshold, from its own
  distribution of assignment distances (Tukey's far-out fence over the non-zero ones,
  ``pipelines.tag_clustering.outlier_threshold``); ``tag_cluster_medoids.outliers`` counts
  them per cluster. ``instance_tag_cluster.is_outlier`` and ``tag_clusters.outliers`` show
  them; ``similar_images`` returns ``tag_cluster_outlier`` beside each hit's tag cluster.
* ``image_backbones``: the weights file each image feature version was computed with, as
  the image worker last loaded it, so ``query FILE`` uses the active image model's backbone.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import TIMESTAMP

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

READONLY_ROLE = "pacs_readonly"

INSTANCE_TAG_CLUSTER_0005 = """
    SELECT a.sop_instance_uid, m.label AS tag_cluster, a.distance, a.run_id,
           m.sop_instance_uid AS medoid_sop_instance_uid, a.assigned_at
    FROM tag_cluster_runs r
    JOIN tag_cluster_assignments a ON a.run_id = r.id
    JOIN tag_cluster_medoids m ON m.run_id = a.run_id AND m.medoid_index = a.medoid_index
    JOIN instances i ON i.sop_instance_uid = a.sop_instance_uid
    WHERE r.is_active
"""
INSTANCE_TAG_CLUSTER = """
    SELECT a.sop_instance_uid, m.label AS tag_cluster, a.distance, a.run_id,
           m.sop_instance_uid AS medoid_sop_instance_uid, a.assigned_at,
           coalesce(a.distance > r.outlier_distance, false) AS is_outlier
    FROM tag_cluster_runs r
    JOIN tag_cluster_assignments a ON a.run_id = r.id
    JOIN tag_cluster_medoids m ON m.run_id = a.run_id AND m.medoid_index = a.medoid_index
    JOIN instances i ON i.sop_instance_uid = a.sop_instance_uid
    WHERE r.is_active
"""
TAG_CLUSTERS_0005 = """
    SELECT m.label AS tag_cluster, m.instances, m.mean_distance, m.silhouette,
           m.sop_instance_uid AS medoid_sop_instance_uid, m.features AS medoid_features,
           r.id AS run_id, r.finished_at AS run_finished_at
    FROM tag_cluster_runs r
    JOIN tag_cluster_medoids m ON m.run_id = r.id
    WHERE r.is_active
"""
TAG_CLUSTERS = """
    SELECT m.label AS tag_cluster, m.instances, m.mean_distance, m.silhouette,
           m.sop_instance_uid AS medoid_sop_instance_uid, m.features AS medoid_features,
           r.id AS run_id, r.finished_at AS run_finished_at, m.outliers,
           r.outlier_distance
    FROM tag_cluster_runs r
    JOIN tag_cluster_medoids m ON m.run_id = r.id
    WHERE r.is_active
"""


def _similar_images(outliers: bool) -> str:
    return f"""
CREATE FUNCTION similar_images(query_uid text, n integer DEFAULT 20)
RETURNS TABLE (sop_instance_uid text, score double precision, image_cluster integer,
               same_cluster boolean, tag_cluster integer,
               {"tag_cluster_outlier boolean, " if outliers else ""}modality text, body_part text)
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
           {"t.is_outlier, " if outliers else ""}f.modality, coalesce(f.body_part, f.body_part_inferred)
    FROM ranked r
    LEFT JOIN instance_tag_cluster t ON t.sop_instance_uid = r.sop_instance_uid
    LEFT JOIN radiology_features f ON f.sop_instance_uid = r.sop_instance_uid
    ORDER BY r.same_cluster DESC, r.score DESC, r.sop_instance_uid
$$
"""


def _grant(statements: str) -> None:
    op.execute(
        f"""
        DO $$ BEGIN
            IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{READONLY_ROLE}') THEN
                {statements}
            END IF;
        END $$
        """
    )


def _grants() -> None:
    _grant(f"GRANT SELECT ON radiology_features, instance_tag_cluster, tag_clusters "
           f"TO {READONLY_ROLE}; GRANT EXECUTE ON FUNCTION similar_images(text, integer) "
           f"TO {READONLY_ROLE};")


def upgrade() -> None:
    op.add_column("instance_features", sa.Column("vocabulary_version", sa.Text))
    # the view was created as SELECT *, which PostgreSQL expanded then: add the new column
    op.execute("CREATE OR REPLACE VIEW radiology_features AS SELECT * FROM instance_features")
    op.add_column("tag_cluster_runs", sa.Column("outlier_distance", sa.Float))
    op.add_column("tag_cluster_medoids", sa.Column("outliers", sa.BigInteger))
    op.execute(f"CREATE OR REPLACE VIEW instance_tag_cluster AS {INSTANCE_TAG_CLUSTER}")
    op.execute(f"CREATE OR REPLACE VIEW tag_clusters AS {TAG_CLUSTERS}")
    op.execute("DROP FUNCTION similar_images(text, integer)")
    op.execute(_similar_images(outliers=True))
    op.create_table(
        "image_backbones",
        sa.Column("model_version", sa.Text, primary_key=True),
        sa.Column("weights_path", sa.Text, nullable=False),
        sa.Column("recorded_at", TIMESTAMP(timezone=True), nullable=False,
                  server_default=sa.text("now()")),
    )
    _grants()


def downgrade() -> None:
    op.drop_table("image_backbones")
    op.execute("DROP FUNCTION similar_images(text, integer)")
    op.execute("DROP VIEW tag_clusters")
    op.execute("DROP VIEW instance_tag_cluster")
    op.execute("DROP VIEW radiology_features")
    op.drop_column("tag_cluster_medoids", "outliers")
    op.drop_column("tag_cluster_runs", "outlier_distance")
    op.drop_column("instance_features", "vocabulary_version")
    op.execute("CREATE VIEW radiology_features AS SELECT * FROM instance_features")
    op.execute(f"CREATE VIEW instance_tag_cluster AS {INSTANCE_TAG_CLUSTER_0005}")
    op.execute(f"CREATE VIEW tag_clusters AS {TAG_CLUSTERS_0005}")
    op.execute(_similar_images(outliers=False))
    _grants()
