"""A read-only role for radiology IT and the views it may read.

``pacs_readonly`` (NOLOGIN: grant it to real login roles) can read the documented
views, which carry no patient names, IDs, birth dates or accession numbers. It cannot
read the tables. Roles are cluster-wide: the role is created once and kept on downgrade.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

READONLY_ROLE = "pacs_readonly"
VIEWS = ("radiology_instances", "radiology_features")


def upgrade() -> None:
    op.execute(
        f"""
        DO $$ BEGIN
            IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{READONLY_ROLE}') THEN
                CREATE ROLE {READONLY_ROLE} NOLOGIN;
            END IF;
        EXCEPTION
            WHEN duplicate_object OR unique_violation THEN NULL;  -- another database won
            WHEN insufficient_privilege THEN
                RAISE NOTICE 'no CREATEROLE privilege: create role {READONLY_ROLE} by hand, '
                             'then run the GRANTs in docs/security.md';
        END $$
        """
    )
    op.execute(
        """
        CREATE VIEW radiology_instances AS
        SELECT i.sop_instance_uid, i.series_instance_uid, i.study_instance_uid,
               i.sop_class_uid, i.transfer_syntax_uid, i.modality, i.instance_number,
               i.content_date, i.calling_ae_title, i.file_size, i.received_at,
               st.study_date, st.study_description,
               se.series_number, se.series_description, se.body_part_examined,
               se.manufacturer, se.manufacturer_model_name, se.station_name
        FROM instances i
        JOIN series se ON se.series_instance_uid = i.series_instance_uid
        JOIN studies st ON st.study_instance_uid = i.study_instance_uid
        """
    )
    op.execute("CREATE VIEW radiology_features AS SELECT * FROM instance_features")
    op.execute(
        f"""
        DO $$ BEGIN
            IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{READONLY_ROLE}') THEN
                EXECUTE 'GRANT USAGE ON SCHEMA ' || quote_ident(current_schema())
                        || ' TO {READONLY_ROLE}';
                GRANT SELECT ON {", ".join(VIEWS)} TO {READONLY_ROLE};
            END IF;
        END $$
        """
    )


def downgrade() -> None:
    for view in VIEWS:
        op.execute(f"DROP VIEW IF EXISTS {view}")
