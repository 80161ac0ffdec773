"""``similar_images(uid, n, exclude)``: leave out hits of the query's own study or patient.

A query's nearest images are mostly other slices of its own series and study; a radiologist
looking for similar cases wants other cases. ``exclude`` is ``'none'`` (the default, as
before: only the query itself is left out), ``'same-study'`` or ``'same-patient'`` (every
instance of the query's patient, by PatientID and issuer, and of its study; an empty
PatientID names no one, so it leaves out only the study), the rules of ``pacs-annotate query
--exclude``. Any other value is an error. Calls with two arguments keep working.

The exclusion reads ``instances``, ``studies`` and ``patients``, which the read-only role may
not (patient data). The function runs with its owner's rights (``SECURITY DEFINER``, with the
search path of the migration pinned so that no caller's schema can stand in for those
tables) and returns only what it returned before: hits, scores, clusters, modality and body
part.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07
"""

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

READONLY_ROLE = "pacs_readonly"

SIMILAR_IMAGES = """
CREATE FUNCTION similar_images(query_uid text, n integer DEFAULT 20, exclude text DEFAULT 'none')
RETURNS TABLE (sop_instance_uid text, score double precision, image_cluster integer,
               same_cluster boolean, tag_cluster integer, tag_cluster_outlier boolean,
               modality text, body_part text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    IF exclude IS NULL OR exclude NOT IN ('none', 'same-study', 'same-patient') THEN
        RAISE EXCEPTION 'exclude must be none, same-study or same-patient, got %', exclude
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY
    WITH query AS (
        SELECT a.retrieval_code, a.image_cluster, a.model_id
        FROM image_annotations a JOIN image_models m ON m.id = a.model_id AND m.is_active
        WHERE a.sop_instance_uid = query_uid
    ), query_case AS (
        SELECT i.study_instance_uid, p.patient_id, p.issuer_of_patient_id
        FROM instances i JOIN studies s USING (study_instance_uid)
        JOIN patients p ON p.id = s.patient_pk
        WHERE i.sop_instance_uid = query_uid
    ), left_out AS (
        SELECT i.sop_instance_uid FROM instances i, query_case c
        WHERE exclude <> 'none' AND i.study_instance_uid = c.study_instance_uid
        UNION
        SELECT i.sop_instance_uid
        FROM instances i JOIN studies s USING (study_instance_uid)
        JOIN patients p ON p.id = s.patient_pk, query_case c
        WHERE exclude = 'same-patient' AND c.patient_id <> ''
          AND p.patient_id = c.patient_id
          AND p.issuer_of_patient_id IS NOT DISTINCT FROM c.issuer_of_patient_id
    ), ranked AS (
        SELECT a.sop_instance_uid, 1 - (a.retrieval_code <=> q.retrieval_code) AS score,
               a.image_cluster, a.image_cluster = q.image_cluster AS same_cluster
        FROM image_annotations a CROSS JOIN query q
        WHERE a.model_id = q.model_id AND a.sop_instance_uid <> query_uid
          AND a.sop_instance_uid NOT IN (SELECT l.sop_instance_uid FROM left_out l)
        ORDER BY a.image_cluster = q.image_cluster DESC, a.retrieval_code <=> q.retrieval_code,
                 a.sop_instance_uid
        LIMIT n
    )
    SELECT r.sop_instance_uid, r.score, r.image_cluster, r.same_cluster, t.tag_cluster,
           t.is_outlier, f.modality::text, coalesce(f.body_part, f.body_part_inferred)::text
    FROM ranked r
    LEFT JOIN instance_tag_cluster t ON t.sop_instance_uid = r.sop_instance_uid
    LEFT JOIN radiology_features f ON f.sop_instance_uid = r.sop_instance_uid
    ORDER BY r.same_cluster DESC, r.score DESC, r.sop_instance_uid;
END
$$
"""


def _grant(signature: str) -> None:
    op.execute(
        f"""
        DO $$ BEGIN
            IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{READONLY_ROLE}') THEN
                GRANT EXECUTE ON FUNCTION {signature} TO {READONLY_ROLE};
            END IF;
        END $$
        """
    )


def upgrade() -> None:
    op.execute("DROP FUNCTION similar_images(text, integer)")
    op.execute(SIMILAR_IMAGES)
    _grant("similar_images(text, integer, text)")


def downgrade() -> None:
    import importlib.util
    from pathlib import Path

    # the function as revision 0010 defined it, from that revision's own file
    path = Path(__file__).with_name("0010_versions_outliers_backbones.py")
    spec = importlib.util.spec_from_file_location("revision_0010", path)
    previous = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(previous)
    op.execute("DROP FUNCTION similar_images(text, integer, text)")
    op.execute(previous._similar_images(outliers=True))
    _grant("similar_images(text, integer)")
