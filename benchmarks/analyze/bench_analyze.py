"""Tag analysis on a synthetic archive: counting pushed into PostgreSQL vs a chunked client.

    .venv/bin/python benchmarks/analyze/bench_analyze.py --instances 1000000
    .venv/bin/python benchmarks/analyze/bench_analyze.py --instances 1000000 --reuse --skip-client

Builds the archive in a fresh database on the embedded pgserver (in --pgdata, default
/tmp/pacs-bench-analyze/pgdata) or on DATABASE_URL's server: series-level tag profiles are
drawn in Python (a few thousand rows), the instance rows are made by PostgreSQL itself with
``INSERT ... SELECT generate_series`` (no per-row round trip). Then it times

* ``service.tags.analysis.run_analysis`` (counting in PostgreSQL, the shipped code), and
* a chunked client-side count: a server-side cursor streams ``tags`` in chunks of
  ``--chunk`` rows and a ``collections.Counter`` counts (key, value) in Python. This is
  what Dask over chunks would do, without Dask's scheduler (Dask is not installed).

and prints wall time and the peak RSS of this Python process for each (the PostgreSQL
server's memory is separate and not included). Results go to stdout as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import time
import uuid
import warnings
from collections import Counter
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from service.tags.analysis import load_run, run_analysis  # noqa: E402
from service.database.engine import create_db_engine, migrate, sqlalchemy_url  # noqa: E402

DB_NAME = "bench_analyze"

# Series-level profiles: tag -> value choices per modality. Values drawn once per series.
COMMON = {
    "SpecificCharacterSet": ["ISO_IR 100", "ISO_IR 192", None],
    "ImageType": [["ORIGINAL", "PRIMARY", "AXIAL"], ["DERIVED", "SECONDARY", "REFORMATTED"],
                  ["ORIGINAL", "PRIMARY", "LOCALIZER"]],
    "Manufacturer": ["SIEMENS", "GE MEDICAL SYSTEMS", "Philips", "TOSHIBA", "FUJIFILM Corporation"],
    "ManufacturerModelName": ["SOMATOM Definition AS+", "Optima CT660", "Ingenia", "Aquilion ONE",
                              "Avanto", "DISCOVERY MR750", "FDR D-EVO"],
    "InstitutionName": ["KBC Rijeka", "General Hospital", "Clinic North"],
    "StationName": ["CT01", "CT02", "MR01", "MR02", "DX01", "AWS1"],
    "PatientSex": ["M", "F", "F", "M", "O"],
    "PatientAge": ["045Y", "067Y", "012Y", "080Y", "033Y", "006M", "052Y"],
    "PatientWeight": ["70", "82.5", "0", "95", "55", None],
    "PatientSize": ["1.75", "1.62", "1.80", None],
    "BodyPartExamined": ["CHEST", "ABDOMEN", "HEAD", "T SPINE", "KNEE", "PELVIS", "thorax"],
    "PatientPosition": ["HFS", "FFS", "HFP"],
    "PhotometricInterpretation": ["MONOCHROME2", "MONOCHROME1"],
    "SamplesPerPixel": [1], "BitsAllocated": [16], "BitsStored": [12, 16], "HighBit": [11, 15],
    "PixelRepresentation": [0, 1],
    "Rows": [512, 256, 320, 2048], "Columns": [512, 256, 320, 2500],
    "PixelSpacing": [["0.703125", "0.703125"], ["0.9765625", "0.9765625"], ["0.5", "0.5"],
                     ["0.429688", "0.429688"]],
    "SliceThickness": ["1", "2.5", "5", "0.625", "3"],
    "ImageOrientationPatient": [["1", "0", "0", "0", "1", "0"], ["0", "1", "0", "0", "0", "-1"],
                                ["1", "0", "0", "0", "0", "-1"]],
    "WindowCenter": ["40", "-600", "300", ["40", "400"]],
    "WindowWidth": ["400", "1500", "2000", ["400", "1800"]],
    "RescaleIntercept": ["-1024", "0"], "RescaleSlope": ["1"],
    "LossyImageCompression": ["00", "01"],
    "StudyDescription": ["CT THORAX", "MRI BRAIN", "CT ABDOMEN PELVIS", "XR CHEST", "MR KNEE"],
    "SeriesDescription": ["AXIAL 5mm", "T2 TSE SAG", "LUNG 1.25", "PA", "T1 MPRAGE", "Scout"],
    "ProtocolName": ["Thorax Routine", "Brain", "Abdomen", "Knee", "Chest PA"],
    "ReferringPhysicianName": ["DOE^JOHN", "ROE^JANE", ""],
    "AccessionNumber": None,  # per study
    "StudyID": None, "SeriesNumber": None, "StudyDate": None, "SeriesDate": None,
    "StudyTime": None, "SeriesTime": None, "PatientID": None, "PatientName": None,
    "PatientBirthDate": None, "StudyInstanceUID": None, "SeriesInstanceUID": None,
    "FrameOfReferenceUID": None, "SOPClassUID": None, "Modality": None,
    "0009100F": ["GEMS_IDEN_01", None],  # a private tag
    "00291010": [{"BulkDataLength": 2048}, {"InlineBinary": "AAECAw=="}],
}
BY_MODALITY = {
    "CT": {"KVP": ["120", "100", "140", "80"], "XRayTubeCurrent": [200, 300, 150],
           "ExposureTime": [500, 1000], "Exposure": [100, 250],
           "ConvolutionKernel": ["B30f", "STANDARD", "LUNG", "Br40"],
           "ReconstructionDiameter": ["350", "500", "220"], "TableHeight": ["150", "170"],
           "GantryDetectorTilt": ["0", "15"], "CTDIvol": ["8.2", "12.4", "45"],
           "SpiralPitchFactor": ["0.984375", "1.375"], "FilterType": ["BODY FILTER", "HEAD"],
           "RescaleType": ["HU"]},
    "MR": {"MagneticFieldStrength": ["1.5", "3"], "RepetitionTime": ["500", "4000", "2300"],
           "EchoTime": ["10", "90", "2.98"], "FlipAngle": ["90", "150", "9"],
           "EchoTrainLength": [1, 16], "ScanningSequence": ["SE", "GR", ["SE", "IR"]],
           "SequenceVariant": ["SK", ["SK", "SP"]], "ScanOptions": ["FS", "PFP", ""],
           "MRAcquisitionType": ["2D", "3D"], "ImagingFrequency": ["63.6", "123.2"],
           "PixelBandwidth": ["130", "240"], "NumberOfAverages": ["1", "2"],
           "InversionTime": ["2500", None], "AngioFlag": ["N"]},
    "DX": {"KVP": ["70", "125", "81"], "ViewPosition": ["PA", "AP", "LAT", "LL"],
           "ImagerPixelSpacing": [["0.15", "0.15"], ["0.139", "0.139"]],
           "DistanceSourceToDetector": ["1800", "1000"], "Exposure": [3, 5],
           "PresentationIntentType": ["FOR PRESENTATION"], "ImageLaterality": ["L", "R", "U"]},
}
SOP_CLASS = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4",
             "DX": "1.2.840.10008.5.1.4.1.1.1.1"}
SERIES_MISSING = 0.07  # each optional series-level tag is absent in ~7% of series


def _uid(rng: random.Random) -> str:
    return "2.25." + str(uuid.UUID(int=rng.getrandbits(128)).int)


def series_profiles(instances: int, seed: int = 7) -> list[tuple[str, str, int, int, str]]:
    """(series uid, study uid, patient number, size, tags json) until ``instances`` are made."""
    rng = random.Random(seed)
    rows, total, study, patient = [], 0, None, 0
    while total < instances:
        if study is None or rng.random() < 0.3:  # about 3 series per study
            patient += 1
            study = (_uid(rng), f"ACC{patient:08d}", f"2023{rng.randint(1, 12):02d}"
                     f"{rng.randint(1, 28):02d}")
        modality = rng.choice(["CT", "CT", "MR", "MR", "DX"])
        size = rng.randint(1, 4) if modality == "DX" else rng.randint(20, 500)
        size = min(size, instances - total)
        series_uid = _uid(rng)
        tags = {}
        for key, choices in (*COMMON.items(), *BY_MODALITY[modality].items()):
            if choices is not None:
                if rng.random() < SERIES_MISSING:
                    continue
                tags[key] = rng.choice(choices)
        tags.update(StudyInstanceUID=study[0], SeriesInstanceUID=series_uid,
                    FrameOfReferenceUID=_uid(rng), SOPClassUID=SOP_CLASS[modality],
                    Modality=modality, AccessionNumber=study[1], StudyID=str(patient % 9999),
                    SeriesNumber=rng.randint(1, 12), StudyDate=study[2], SeriesDate=study[2],
                    StudyTime=f"{rng.randint(7, 19):02d}{rng.randint(0, 59):02d}00",
                    SeriesTime=f"{rng.randint(7, 19):02d}{rng.randint(0, 59):02d}00",
                    PatientID=f"P{patient:07d}", PatientName=f"PATIENT^{patient}",
                    PatientBirthDate=f"19{rng.randint(30, 99)}0101")
        rows.append((series_uid, study[0], patient, size, json.dumps(tags)))
        total += size
    return rows


# Per-instance tags, made by PostgreSQL: UIDs, numbers, positions, times; SliceLocation is
# absent in ~5% of instances.
_INSTANCES = """
INSERT INTO instances (sop_instance_uid, series_instance_uid, study_instance_uid, sop_class_uid,
                       transfer_syntax_uid, modality, instance_number, file_path, file_size,
                       sha256, tags)
SELECT uid, p.series_uid, p.study_uid, p.tags->>'SOPClassUID', '1.2.840.10008.1.2.1',
       p.tags->>'Modality', n, 'bench/' || uid, 524288, md5(uid),
       p.tags || jsonb_build_object(
           'SOPInstanceUID', uid, 'InstanceNumber', n,
           'ImagePositionPatient', jsonb_build_array('-175.5', '-180.2', (-(n * 1.25))::text),
           'AcquisitionNumber', 1 + n / 100,
           'ContentTime', to_char(TIME '08:00' + n * INTERVAL '0.37 second', 'HH24MISS.US'),
           'InstanceCreationTime', to_char(TIME '08:00' + n * INTERVAL '0.41 second', 'HH24MISS'))
       || CASE WHEN random() < 0.05 THEN '{}'::jsonb
               ELSE jsonb_build_object('SliceLocation', (-(n * 1.25))::text) END
FROM bench_series p CROSS JOIN LATERAL generate_series(1, p.size) AS n
CROSS JOIN LATERAL (SELECT p.series_uid || '.' || n AS uid) AS u
"""

# instance_features as the tags worker would leave it, for a few columns (the analysis reads
# count(column) for all 85 and the failures): PatientAge "006M"... parse; 1% have a failure.
_FEATURES = """
INSERT INTO instance_features (sop_instance_uid, parser_version, modality, kvp, rows, columns,
                               patient_age, parse_failures)
SELECT sop_instance_uid, '1.0.0', tags->>'Modality', (tags->>'KVP')::float8,
       (tags->>'Rows')::float8, (tags->>'Columns')::float8,
       CASE WHEN random() < 0.01 THEN NULL ELSE 45 END,
       CASE WHEN random() < 0.01 THEN jsonb_build_array(jsonb_build_object(
           'keyword', 'PatientAge', 'column', 'patient_age', 'raw', '45 Jahre alt?',
           'reason', 'unknown age unit')) ELSE '[]'::jsonb END
FROM instances
"""


def build(engine: sa.Engine, instances: int) -> None:
    t0 = time.monotonic()
    profiles = series_profiles(instances)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE bench_series (series_uid text, study_uid text, "
                             "patient int, size int, tags jsonb)"))
        raw = conn.connection.driver_connection
        with raw.cursor().copy("COPY bench_series FROM STDIN") as copy:
            for row in profiles:
                copy.write_row(row)
        conn.execute(sa.text(
            "INSERT INTO patients (patient_id) SELECT DISTINCT 'P' || lpad(patient::text, 7, '0') "
            "FROM bench_series"))
        conn.execute(sa.text(
            "INSERT INTO studies (study_instance_uid, patient_pk) "
            "SELECT DISTINCT ON (s.study_uid) s.study_uid, p.id FROM bench_series s "
            "JOIN patients p ON p.patient_id = 'P' || lpad(s.patient::text, 7, '0')"))
        conn.execute(sa.text(
            "INSERT INTO series (series_instance_uid, study_instance_uid, modality) "
            "SELECT series_uid, study_uid, tags->>'Modality' FROM bench_series"))
    print(f"# {len(profiles):,} series profiles in {time.monotonic() - t0:.1f}s", file=sys.stderr)
    with engine.begin() as conn:
        conn.execute(sa.text(_INSTANCES))
    print(f"# instances loaded at {time.monotonic() - t0:.1f}s", file=sys.stderr)
    with engine.begin() as conn:
        conn.execute(sa.text(_FEATURES))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM ANALYZE instances"))
        conn.execute(sa.text("VACUUM ANALYZE instance_features"))
        size = conn.execute(sa.text(
            "SELECT pg_size_pretty(pg_total_relation_size('instances'))")).scalar()
    print(f"# archive built in {time.monotonic() - t0:.1f}s; instances table {size}",
          file=sys.stderr)


def _count(tags: dict, present: Counter, values: Counter) -> None:
    for key, value in tags.items():
        present[key] += 1
        if value in (None, "", [], {}):
            continue
        values[key, value if isinstance(value, str)
               else json.dumps(value, separators=(", ", ": "))] += 1


def client_side(engine: sa.Engine, chunk: int, top: int = 10) -> dict:
    """The chunked alternative: stream tags, count in Python (exact, like the SQL)."""
    present: Counter = Counter()
    values: Counter = Counter()
    n = 0
    with engine.connect() as conn, conn.begin():
        raw = conn.connection.driver_connection  # a psycopg named (server-side) cursor
        with raw.cursor(name="bench_tags") as cursor:
            cursor.itersize = chunk
            cursor.execute("SELECT tags FROM instances")
            while partition := cursor.fetchmany(chunk):
                for (tags,) in partition:
                    n += 1
                    _count(tags, present, values)
    distinct: Counter = Counter(key for key, _ in values)
    tops: dict[str, list] = {}
    for (key, value), count in values.most_common():
        if len(tops.setdefault(key, [])) < top:
            tops[key].append((value, count))
    return {"instances": n, "tags": len(present), "distinct": dict(distinct),
            "pairs": len(values)}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=1_000_000)
    parser.add_argument("--pgdata", default="/tmp/pacs-bench-analyze/pgdata")
    parser.add_argument("--reuse", action="store_true", help="keep an existing bench database")
    parser.add_argument("--chunks", type=int, default=16, help="run_analysis page ranges")
    parser.add_argument("--chunk", type=int, default=10_000, help="client-side rows per fetch")
    parser.add_argument("--work-mem", help="run_analysis work_mem, e.g. 256MB")
    parser.add_argument("--skip-client", action="store_true")
    parser.add_argument("--skip-sql", action="store_true")
    args = parser.parse_args()

    url = os.environ.get("DATABASE_URL")
    if not url:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pgserver

            Path(args.pgdata).parent.mkdir(parents=True, exist_ok=True)
            url = pgserver.get_server(Path(args.pgdata), cleanup_mode="stop").get_uri()
    admin = sa.create_engine(sqlalchemy_url(url), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        exists = conn.execute(sa.text("SELECT 1 FROM pg_database WHERE datname = :d"),
                              {"d": DB_NAME}).scalar()
        if exists and not args.reuse:
            conn.execute(sa.text(f'DROP DATABASE "{DB_NAME}" WITH (FORCE)'))
        if not exists or not args.reuse:
            conn.execute(sa.text(f'CREATE DATABASE "{DB_NAME}"'))
        version = conn.execute(sa.text("SHOW server_version")).scalar()
        work_mem = conn.execute(sa.text("SHOW work_mem")).scalar()
    admin.dispose()
    engine = create_db_engine(make_url(sqlalchemy_url(url)).set(database=DB_NAME)
                              .render_as_string(hide_password=False))
    migrate(engine)
    with engine.connect() as conn:
        have = conn.execute(sa.text("SELECT count(*) FROM instances")).scalar()
    if have != args.instances:
        if have:
            raise SystemExit(f"bench database holds {have:,} instances; drop --reuse")
        build(engine, args.instances)
    print(json.dumps({"postgresql": version, "work_mem": work_mem, "cpus": os.cpu_count(),
                      "instances": args.instances}))

    if not args.skip_sql:
        rss0, t0 = peak_rss_mib(), time.monotonic()
        run_id = run_analysis(engine, chunks=args.chunks, work_mem=args.work_mem,
                              progress=sys.stderr)
        seconds = time.monotonic() - t0
        run = load_run(engine, run_id)
        print(json.dumps({"method": "postgresql (run_analysis)", "chunks": args.chunks,
                          "work_mem": args.work_mem or work_mem,
                          "seconds": round(seconds, 1), "peak_rss_mib": round(peak_rss_mib()),
                          "peak_rss_before_mib": round(rss0), "tags": len(run.tags),
                          "run": run_id}), flush=True)
        sop = run.tag("SOPInstanceUID")
        assert sop.distinct_values == args.instances and sop.is_unique_per_record
    if not args.skip_client:
        t0 = time.monotonic()
        result = client_side(engine, args.chunk)
        print(json.dumps({"method": "client-side chunked Counter", "chunk": args.chunk,
                          "seconds": round(time.monotonic() - t0, 1),
                          "peak_rss_mib": round(peak_rss_mib()), "tags": result["tags"],
                          "pairs": result["pairs"]}), flush=True)
    engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
