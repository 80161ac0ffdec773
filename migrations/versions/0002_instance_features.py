"""Parsed tag features per instance: one typed column per parsed feature.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB, TIMESTAMP

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# parsers.FEATURE_COLUMNS at parser version 1.0.0, frozen here: a parser change that adds
# or retypes a column comes with a new revision (tests/test_migrations.py checks they agree)
FEATURE_COLUMNS = [
    ("modality", sa.Text),
    ("sop_class", sa.Text),
    ("manufacturer", sa.Text),
    ("manufacturer_model", sa.Text),
    ("image_type_1", sa.Text),
    ("image_type_2", sa.Text),
    ("image_type_3", sa.Text),
    ("photometric_interpretation", sa.Text),
    ("body_part", sa.Text),
    ("laterality", sa.Text),
    ("image_laterality", sa.Text),
    ("patient_position", sa.Text),
    ("view_position", sa.Text),
    ("patient_sex", sa.Text),
    ("patient_age", sa.Float),
    ("patient_weight", sa.Float),
    ("patient_size", sa.Float),
    ("pixel_spacing_row", sa.Float),
    ("pixel_spacing_col", sa.Float),
    ("imager_pixel_spacing_row", sa.Float),
    ("imager_pixel_spacing_col", sa.Float),
    ("image_position_x", sa.Float),
    ("image_position_y", sa.Float),
    ("image_position_z", sa.Float),
    ("image_orientation_1", sa.Float),
    ("image_orientation_2", sa.Float),
    ("image_orientation_3", sa.Float),
    ("image_orientation_4", sa.Float),
    ("image_orientation_5", sa.Float),
    ("image_orientation_6", sa.Float),
    ("plane", sa.Text),
    ("slice_thickness", sa.Float),
    ("spacing_between_slices", sa.Float),
    ("rows", sa.Float),
    ("columns", sa.Float),
    ("number_of_frames", sa.Float),
    ("samples_per_pixel", sa.Float),
    ("bits_allocated", sa.Float),
    ("bits_stored", sa.Float),
    ("high_bit", sa.Float),
    ("pixel_representation", sa.Float),
    ("rescale_slope", sa.Float),
    ("rescale_intercept", sa.Float),
    ("rescale_type", sa.Text),
    ("window_center", sa.Float),
    ("window_width", sa.Float),
    ("presentation_intent_type", sa.Text),
    ("kvp", sa.Float),
    ("xray_tube_current", sa.Float),
    ("exposure_time", sa.Float),
    ("exposure", sa.Float),
    ("focal_spot", sa.Float),
    ("filter_type", sa.Text),
    ("convolution_kernel", sa.Text),
    ("reconstruction_diameter", sa.Float),
    ("data_collection_diameter", sa.Float),
    ("distance_source_to_detector", sa.Float),
    ("distance_source_to_patient", sa.Float),
    ("table_height", sa.Float),
    ("gantry_detector_tilt", sa.Float),
    ("spiral_pitch_factor", sa.Float),
    ("ctdi_vol", sa.Float),
    ("body_part_thickness", sa.Float),
    ("compression_force", sa.Float),
    ("magnetic_field_strength", sa.Float),
    ("repetition_time", sa.Float),
    ("echo_time", sa.Float),
    ("inversion_time", sa.Float),
    ("flip_angle", sa.Float),
    ("echo_train_length", sa.Float),
    ("number_of_averages", sa.Float),
    ("imaging_frequency", sa.Float),
    ("pixel_bandwidth", sa.Float),
    ("percent_sampling", sa.Float),
    ("phase_encoding_steps", sa.Float),
    ("percent_phase_field_of_view", sa.Float),
    ("scanning_sequence", sa.Text),
    ("sequence_variant", sa.Text),
    ("scan_options", sa.Text),
    ("mr_acquisition_type", sa.Text),
    ("angio_flag", sa.Text),
    ("contrast_bolus", sa.Text),
    ("contrast_bolus_route", sa.Text),
    ("body_part_inferred", sa.Text),
    ("body_part_source", sa.Text),
]


def upgrade() -> None:
    op.create_table(
        "instance_features",
        sa.Column(
            "sop_instance_uid",
            sa.Text,
            sa.ForeignKey("instances.sop_instance_uid", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("parser_version", sa.Text, nullable=False),
        sa.Column("parsed_at", TIMESTAMP(timezone=True), nullable=False,
                  server_default=sa.text("now()")),
        *[sa.Column(name, kind) for name, kind in FEATURE_COLUMNS],
        sa.Column("parse_failures", JSONB, nullable=False, server_default="[]"),
    )
    for column in ("modality", "body_part", "body_part_inferred", "plane", "manufacturer",
                   "parser_version"):
        op.create_index(f"ix_instance_features_{column}", "instance_features", [column])


def downgrade() -> None:
    op.drop_table("instance_features")
