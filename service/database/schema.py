"""Table definitions used by the queries.  The migrations in ``migrations/`` create them.

``tests/test_migrations.py`` checks that the migrated database and these
definitions agree, so a change here needs a new revision there.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Date,
    Float,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    REAL,
    SmallInteger,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from pgvector.sqlalchemy import Vector
from sqlalchemy.dialects.postgresql import JSONB, TIMESTAMP

metadata = MetaData()

NOW = text("now()")


def _ts(name: str, **kw) -> Column:
    return Column(name, TIMESTAMP(timezone=True), **kw)


patients = Table(
    "patients",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("patient_id", Text, nullable=False, server_default=""),
    Column("issuer_of_patient_id", Text, nullable=False, server_default=""),
    Column("patient_name", Text),
    Column("patient_birth_date", Date),
    Column("patient_sex", Text),
    _ts("created_at", nullable=False, server_default=NOW),
    UniqueConstraint("patient_id", "issuer_of_patient_id", name="uq_patients_id_issuer"),
)

studies = Table(
    "studies",
    metadata,
    Column("study_instance_uid", Text, primary_key=True),
    Column("patient_pk", BigInteger, ForeignKey("patients.id"), nullable=False),
    Column("study_date", Date),
    Column("study_time", Text),
    Column("accession_number", Text),
    Column("study_id", Text),
    Column("study_description", Text),
    Column("referring_physician_name", Text),
    _ts("created_at", nullable=False, server_default=NOW),
    Index("ix_studies_patient_pk", "patient_pk"),
    Index("ix_studies_study_date", "study_date"),
    Index("ix_studies_accession_number", "accession_number"),
)

series = Table(
    "series",
    metadata,
    Column("series_instance_uid", Text, primary_key=True),
    Column("study_instance_uid", Text, ForeignKey("studies.study_instance_uid"), nullable=False),
    Column("modality", Text),
    Column("series_number", Integer),
    Column("series_description", Text),
    Column("body_part_examined", Text),
    Column("manufacturer", Text),
    Column("manufacturer_model_name", Text),
    Column("station_name", Text),
    Column("series_date", Date),
    _ts("created_at", nullable=False, server_default=NOW),
    Index("ix_series_study_instance_uid", "study_instance_uid"),
    Index("ix_series_modality", "modality"),
    Index("ix_series_body_part_examined", "body_part_examined"),
)

instances = Table(
    "instances",
    metadata,
    Column("sop_instance_uid", Text, primary_key=True),
    Column("series_instance_uid", Text, ForeignKey("series.series_instance_uid"), nullable=False),
    Column("study_instance_uid", Text, nullable=False),
    Column("sop_class_uid", Text, nullable=False),
    Column("transfer_syntax_uid", Text, nullable=False),
    Column("modality", Text),
    Column("instance_number", Integer),
    Column("content_date", Date),
    Column("calling_ae_title", Text),
    Column("called_ae_title", Text),
    Column("file_path", Text, nullable=False),
    Column("file_size", BigInteger, nullable=False),
    Column("sha256", Text, nullable=False),
    _ts("received_at", nullable=False, server_default=NOW),
    Column("tags", JSONB, nullable=False),
    Index("ix_instances_series_instance_uid", "series_instance_uid"),
    Index("ix_instances_study_instance_uid", "study_instance_uid"),
    Index("ix_instances_sop_class_uid", "sop_class_uid"),
    Index("ix_instances_modality", "modality"),
    Index("ix_instances_received_at", "received_at"),
)

work_queue = Table(
    "work_queue",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("stage", Text, nullable=False),
    Column(
        "sop_instance_uid",
        Text,
        ForeignKey("instances.sop_instance_uid", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("status", Text, nullable=False, server_default="pending"),
    Column("attempts", Integer, nullable=False, server_default="0"),
    _ts("available_at", nullable=False, server_default=NOW),
    Column("claimed_by", Text),
    _ts("claimed_at"),
    Column("last_error", Text),
    _ts("created_at", nullable=False, server_default=NOW),
    _ts("updated_at", nullable=False, server_default=NOW),
    UniqueConstraint("stage", "sop_instance_uid", name="uq_work_queue_stage_instance"),
    Index(
        "ix_work_queue_pending",
        "stage",
        "available_at",
        "id",
        postgresql_where=text("status = 'pending'"),
    ),
    Index("ix_work_queue_status", "stage", "status"),
)

ingest_stats = Table(
    "ingest_stats",
    metadata,
    Column("node", Text, primary_key=True),
    Column("received", BigInteger, nullable=False, server_default="0"),
    Column("stored", BigInteger, nullable=False, server_default="0"),
    Column("duplicates", BigInteger, nullable=False, server_default="0"),
    Column("rejected", BigInteger, nullable=False, server_default="0"),
    Column("bytes_stored", BigInteger, nullable=False, server_default="0"),
    _ts("started_at", nullable=False, server_default=NOW),
    _ts("updated_at", nullable=False, server_default=NOW),
)

# One row per defect the receiver tolerated (0009); instances without one write none.
tolerated_defects = Table(
    "tolerated_defects",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column(
        "sop_instance_uid",
        Text,
        ForeignKey("instances.sop_instance_uid", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("rule", Text, nullable=False),
    Column("detail", Text, nullable=False),
    Column("calling_ae_title", Text),
    Column("called_ae_title", Text),
    _ts("received_at", nullable=False, server_default=NOW),
    Index("ix_tolerated_defects_sop_instance_uid", "sop_instance_uid"),
    Index("ix_tolerated_defects_rule", "rule"),
)


def _feature_columns() -> list[Column]:
    from parsers import FEATURE_COLUMNS

    return [Column(c.name, Float if c.kind == "numeric" else Text) for c in FEATURE_COLUMNS]


instance_features = Table(
    "instance_features",
    metadata,
    Column(
        "sop_instance_uid",
        Text,
        ForeignKey("instances.sop_instance_uid", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("parser_version", Text, nullable=False),
    _ts("parsed_at", nullable=False, server_default=NOW),
    *_feature_columns(),
    Column("parse_failures", JSONB, nullable=False, server_default="[]"),
    Column("vocabulary_version", Text),  # 0010: parsers.Vocabulary.version of the parse
    *[Index(f"ix_instance_features_{c}", c) for c in
      ("modality", "body_part", "body_part_inferred", "plane", "manufacturer", "parser_version")],
)

# ---------------------------------------------------------------- tag analysis (0003)


tag_analysis_runs = Table(
    "tag_analysis_runs",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    _ts("started_at", nullable=False, server_default=NOW),
    _ts("finished_at"),
    Column("status", Text, nullable=False, server_default="running"),
    Column("instances", BigInteger),
    Column("feature_instances", BigInteger),
    Column("parameters", JSONB, nullable=False, server_default="{}"),
    Column("error", Text),
)

tag_analysis = Table(
    "tag_analysis",
    metadata,
    Column("run_id", BigInteger, ForeignKey("tag_analysis_runs.id", ondelete="CASCADE"),
           primary_key=True),
    Column("keyword", Text, primary_key=True),
    Column("present", BigInteger, nullable=False),
    Column("empty", BigInteger, nullable=False),
    Column("missing_share", Float, nullable=False),
    Column("distinct_values", BigInteger, nullable=False),
    Column("top_values", JSONB, nullable=False, server_default="[]"),
    Column("is_unique_per_record", Boolean, nullable=False),
    Column("parse_failures", BigInteger),
    Column("failure_examples", JSONB),
)

tag_analysis_columns = Table(
    "tag_analysis_columns",
    metadata,
    Column("run_id", BigInteger, ForeignKey("tag_analysis_runs.id", ondelete="CASCADE"),
           primary_key=True),
    Column("column_name", Text, primary_key=True),
    Column("source", Text, nullable=False),
    Column("kind", Text, nullable=False),
    Column("present", BigInteger, nullable=False),
    Column("missing_share", Float),
    Column("parse_failures", BigInteger, nullable=False),
)

tag_cluster_runs = Table(
    "tag_cluster_runs",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    _ts("started_at", nullable=False, server_default=NOW),
    _ts("finished_at"),
    Column("status", Text, nullable=False, server_default="fitting"),
    Column("is_active", Boolean, nullable=False, server_default=text("false")),
    Column("previous_run_id", BigInteger),
    Column("parameters", JSONB, nullable=False, server_default="{}"),
    Column("feature_selection", JSONB, nullable=False, server_default="{}"),
    Column("k", Integer),
    Column("silhouette", Float),
    Column("k_table", JSONB),
    Column("loss", Float),
    Column("instances", BigInteger),
    Column("profiles", BigInteger),
    Column("profiles_clustered", BigInteger),
    Column("assigned", BigInteger),
    Column("model", JSONB),
    Column("sample", JSONB),
    Column("timings", JSONB, nullable=False, server_default="{}"),
    Column("error", Text),
    Column("outlier_distance", Float),  # 0010
    CheckConstraint("status IN ('fitting', 'assigning', 'matching', 'finished', 'failed')",
                    name="ck_tag_cluster_runs_status"),
    CheckConstraint("NOT is_active OR status = 'finished'",
                    name="ck_tag_cluster_runs_active_finished"),
    Index("ux_tag_cluster_runs_active", "is_active", unique=True,
          postgresql_where=text("is_active")),
)

tag_cluster_medoids = Table(
    "tag_cluster_medoids",
    metadata,
    Column("run_id", BigInteger, ForeignKey("tag_cluster_runs.id", ondelete="CASCADE"),
           primary_key=True),
    Column("medoid_index", Integer, primary_key=True),
    Column("label", Integer),
    Column("sop_instance_uid", Text),
    Column("features", JSONB, nullable=False),
    Column("sample_weight", Float),
    Column("silhouette", Float),
    Column("instances", BigInteger),
    Column("mean_distance", Float),
    Column("previous_overlap", BigInteger),
    Column("outliers", BigInteger),  # 0010
    UniqueConstraint("run_id", "label", name="uq_tag_cluster_medoids_label"),
)

tag_cluster_partitions = Table(
    "tag_cluster_partitions",
    metadata,
    Column("run_id", BigInteger, ForeignKey("tag_cluster_runs.id", ondelete="CASCADE"),
           primary_key=True),
    Column("partition", Integer, primary_key=True),
    Column("lower_uid", Text),
    Column("upper_uid", Text),
    Column("rows", BigInteger),
    _ts("done_at"),
)

tag_cluster_assignments = Table(
    "tag_cluster_assignments",
    metadata,
    Column("run_id", BigInteger, ForeignKey("tag_cluster_runs.id", ondelete="CASCADE"),
           primary_key=True),
    Column("sop_instance_uid", Text, primary_key=True),
    Column("medoid_index", SmallInteger, nullable=False),
    Column("distance", REAL, nullable=False),
    _ts("assigned_at", nullable=False, server_default=NOW),
)

IMAGE_FEATURE_DIM = 1024

image_features = Table(
    "image_features",
    metadata,
    Column("sop_instance_uid", Text, ForeignKey("instances.sop_instance_uid", ondelete="CASCADE"),
           primary_key=True),
    Column("model_version", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("skip_reason", Text),
    Column("frame", Integer),
    Column("feature", Vector(IMAGE_FEATURE_DIM)),
    Column("map_shard", Text),
    Column("map_index", Integer),
    _ts("computed_at", nullable=False, server_default=NOW),
    CheckConstraint("status IN ('done', 'skipped')", name="ck_image_features_status"),
    CheckConstraint("status <> 'done' OR (feature IS NOT NULL AND map_shard IS NOT NULL)",
                    name="ck_image_features_done"),
    Index("ix_image_features_model_version", "model_version"),
    Index("ix_image_features_feature", "feature", postgresql_using="hnsw",
          postgresql_ops={"feature": "vector_cosine_ops"}),
)


image_models = Table(
    "image_models",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    _ts("started_at", nullable=False, server_default=NOW),
    _ts("finished_at"),
    Column("status", Text, nullable=False, server_default="training"),
    Column("is_active", Boolean, nullable=False, server_default=text("false")),
    Column("feature_model_version", Text, nullable=False),
    Column("path", Text),
    Column("parameters", JSONB, nullable=False, server_default="{}"),
    Column("history", JSONB),
    Column("timings", JSONB, nullable=False, server_default="{}"),
    Column("images", BigInteger),
    Column("annotated", BigInteger),
    Column("error", Text),
    CheckConstraint("status IN ('training', 'annotating', 'finished', 'failed')",
                    name="ck_image_models_status"),
    CheckConstraint("NOT is_active OR status = 'finished'", name="ck_image_models_active_finished"),
    Index("ux_image_models_active", "is_active", unique=True,
          postgresql_where=text("is_active")),
)

image_annotations = Table(
    "image_annotations",
    metadata,
    Column("model_id", BigInteger, ForeignKey("image_models.id", ondelete="CASCADE"),
           primary_key=True),
    Column("sop_instance_uid", Text, ForeignKey("instances.sop_instance_uid", ondelete="CASCADE"),
           primary_key=True),
    Column("image_cluster", Integer, nullable=False),
    Column("retrieval_code", Vector(), nullable=False),
    _ts("annotated_at", nullable=False, server_default=NOW),
    Index("ix_image_annotations_model_cluster", "model_id", "image_cluster"),
)

# ---------------------------------------------------------------- image backbones (0010)

image_backbones = Table(
    "image_backbones",
    metadata,
    Column("model_version", Text, primary_key=True),
    Column("weights_path", Text, nullable=False),
    _ts("recorded_at", nullable=False, server_default=NOW),
)
