"""The read-only role sees the documented views and not the tables with patient data."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import ProgrammingError

from .dicom_client import ingest_datasets, make_ct

PHI_TABLES = ["patients", "studies", "series", "instances", "work_queue", "tag_analysis"]


def _as_readonly(conn: sa.Connection) -> None:
    conn.execute(sa.text("SET ROLE pacs_readonly"))


def test_readonly_role_reads_the_views(engine, tmp_path):
    ingest_datasets(engine, tmp_path / "storage", [make_ct()])
    with engine.connect() as conn:
        _as_readonly(conn)
        row = conn.execute(sa.text(
            "SELECT modality, study_date FROM radiology_instances")).one()
        columns = set(conn.execute(sa.text("SELECT * FROM radiology_instances")).keys())
        conn.execute(sa.text("SELECT count(*) FROM radiology_features")).scalar()
        conn.execute(sa.text("SELECT count(*) FROM instance_tag_cluster")).scalar()
        conn.execute(sa.text("SELECT count(*) FROM tag_clusters")).scalar()
    assert row.modality == "CT"
    assert not columns & {"patient_id", "patient_name", "patient_birth_date",
                          "accession_number", "tags", "file_path"}


@pytest.mark.parametrize("table", PHI_TABLES)
def test_readonly_role_cannot_read_the_tables(engine, table):
    with engine.connect() as conn:
        _as_readonly(conn)
        with pytest.raises(ProgrammingError, match="permission denied"):
            conn.execute(sa.text(f"SELECT 1 FROM {table} LIMIT 1"))
