"""The one path every instance takes into the archive: header, file, row, answer.

Both the C-STORE handler and ``import DIR`` call :meth:`Ingestor.ingest`.  Rows are
written by one committer thread per process that groups whatever stores are
waiting into one transaction (group commit); each store returns only after the
transaction holding its row has committed.

The two slow steps of a store overlap: the committer inserts the row while the
store's own thread flushes the file to disk, and commits once every file of the
batch is durable in place, so a committed row never names a file a crash could
lose (benchmarks/ingest/README.md has the measurements).
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import msgspec
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from .dicom_header import (
    RULE_SOP_INSTANCE_MISMATCH,
    STATUS_DATASET_MISMATCH,
    STATUS_OUT_OF_RESOURCES,
    InstanceHeader,
    InvalidInstance,
    read_header,
    with_media_storage_sop_instance_uid,
)
from ..database.driver_connection import DriverConnection, PreparedStatement
from .storage import FileStore, PendingFile, relative_path, safe_relative_path

log = logging.getLogger(__name__)

SUCCESS = 0x0000

# ---------------------------------------------------------------- SQL
# DBAPI "pyformat" strings: the committer runs them on the driver connection itself
# (psycopg 3 or psycopg2), without SQLAlchemy, whose per-statement work was a sixth
# of the listener's CPU per instance (benchmarks/ingest/README.md)

_INSERT_PATIENTS = """
INSERT INTO patients (patient_id, issuer_of_patient_id, patient_name, patient_birth_date,
                      patient_sex)
SELECT * FROM unnest(CAST(%(patient_id)s AS text[]), CAST(%(issuer)s AS text[]),
                     CAST(%(name)s AS text[]), CAST(%(birth_date)s AS date[]), CAST(%(sex)s AS text[]))
ON CONFLICT (patient_id, issuer_of_patient_id) DO NOTHING
"""
_SELECT_PATIENTS = """
SELECT p.id, p.patient_id, p.issuer_of_patient_id FROM patients p
JOIN unnest(CAST(%(patient_id)s AS text[]), CAST(%(issuer)s AS text[])) AS k(pid, iss)
  ON p.patient_id = k.pid AND p.issuer_of_patient_id = k.iss
"""
_INSERT_STUDIES = """
INSERT INTO studies (study_instance_uid, patient_pk, study_date, study_time, accession_number,
                     study_id, study_description, referring_physician_name)
SELECT * FROM unnest(CAST(%(uid)s AS text[]), CAST(%(patient_pk)s AS bigint[]),
                     CAST(%(study_date)s AS date[]), CAST(%(study_time)s AS text[]),
                     CAST(%(accession)s AS text[]), CAST(%(study_id)s AS text[]),
                     CAST(%(description)s AS text[]), CAST(%(referring)s AS text[]))
ON CONFLICT (study_instance_uid) DO NOTHING
"""
_INSERT_SERIES = """
INSERT INTO series (series_instance_uid, study_instance_uid, modality, series_number,
                    series_description, body_part_examined, manufacturer,
                    manufacturer_model_name, station_name, series_date)
SELECT * FROM unnest(CAST(%(uid)s AS text[]), CAST(%(study_uid)s AS text[]),
                     CAST(%(modality)s AS text[]), CAST(%(number)s AS integer[]),
                     CAST(%(description)s AS text[]), CAST(%(body_part)s AS text[]),
                     CAST(%(manufacturer)s AS text[]), CAST(%(model)s AS text[]),
                     CAST(%(station)s AS text[]), CAST(%(series_date)s AS date[]))
ON CONFLICT (series_instance_uid) DO NOTHING
"""
# counter deltas of one process, added to its row
_STATS_UPSERT = """
    INSERT INTO ingest_stats AS s (node, received, stored, duplicates, rejected, bytes_stored)
    VALUES (%(node)s, %(received)s, %(stored)s, %(duplicates)s, %(rejected)s, %(bytes_stored)s)
    ON CONFLICT (node) DO UPDATE SET
        received = s.received + EXCLUDED.received,
        stored = s.stored + EXCLUDED.stored,
        duplicates = s.duplicates + EXCLUDED.duplicates,
        rejected = s.rejected + EXCLUDED.rejected,
        bytes_stored = s.bytes_stored + EXCLUDED.bytes_stored,
        updated_at = now()
"""
# instances and their queue entries in one round trip; the rows travel as one JSON
# document, which is cheaper to send than one array per column (no array escaping)
_INSERT_INSTANCES = PreparedStatement("pacs_insert_instances", f"""
WITH inserted AS (
    INSERT INTO instances (sop_instance_uid, series_instance_uid, study_instance_uid,
                           sop_class_uid, transfer_syntax_uid, modality, instance_number,
                           content_date, calling_ae_title, called_ae_title, file_path,
                           file_size, sha256, tags)
    SELECT r.sop, r.series, r.study, r.sop_class, r.ts, r.modality, r.number,
           r.content_date, r.calling, r.called, r.path, r.size, r.sha256, r.tags
    FROM jsonb_to_recordset(CAST(%(rows)s AS jsonb)) AS r(
        sop text, series text, study text, sop_class text, ts text, modality text,
        number integer, content_date date, calling text, called text, path text,
        size bigint, sha256 text, tags jsonb)
    ON CONFLICT (sop_instance_uid) DO NOTHING
    RETURNING sop_instance_uid
), queued AS (
    INSERT INTO work_queue (stage, sop_instance_uid)
    SELECT stage, inserted.sop_instance_uid
    FROM inserted CROSS JOIN unnest(CAST(%(stages)s AS text[])) AS stage
), counted AS (
    {_STATS_UPSERT}
)
SELECT sop_instance_uid FROM inserted
""")
# the defects tolerant mode let through, for the instances of a batch that have any (rare:
# a normal instance writes no row here and costs the batch one attribute test)
_INSERT_DEFECTS = """
INSERT INTO tolerated_defects (sop_instance_uid, rule, detail, calling_ae_title, called_ae_title)
SELECT * FROM unnest(CAST(%(sop)s AS text[]), CAST(%(rule)s AS text[]), CAST(%(detail)s AS text[]),
                     CAST(%(calling)s AS text[]), CAST(%(called)s AS text[]))
"""
# msgspec: 6 us against the json module's 50 us for one CT_small row (benchmarks/ingest)
_ROWS_ENCODER = msgspec.json.Encoder()
_HASHES_BY_PATH = (
    "SELECT file_path, sha256 FROM instances WHERE file_path = ANY(CAST(%(paths)s AS text[]))")

# ---------------------------------------------------------------- records


@dataclass(frozen=True)
class StoreOutcome:
    status: int
    result: str  # stored | duplicate | rejected | failed
    sop_instance_uid: str | None = None
    reason: str | None = None
    # (rule, detail) of each defect tolerated to store it
    defects: tuple[tuple[str, str], ...] = ()


@dataclass
class _Record:
    header: InstanceHeader
    relative: str
    size: int
    sha256: str
    calling_ae: str | None
    called_ae: str | None
    defects: tuple[tuple[str, str], ...] = ()
    # -> PendingFile once the file is durable in place, or the OSError that prevented it
    placed: Future = field(default_factory=Future)
    result: str | None = None  # stored | duplicate, once its transaction committed
    error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self.result is not None or self.error is not None

    @property
    def patient_key(self) -> tuple[str, str]:
        h = self.header
        return (h.text("PatientID") or "", h.text("IssuerOfPatientID") or "")


@dataclass
class Counters:
    received: int = 0
    stored: int = 0
    duplicates: int = 0
    rejected: int = 0
    bytes_stored: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class StorageFailure(Exception):
    """The instance's file could not be placed; its row was not committed."""

    def __init__(self, error: OSError):
        super().__init__(str(error))
        self.error = error


class _PlacementFailed(Exception):
    """Some files of a batch could not be placed; the batch's transaction was rolled back."""

    def __init__(self, failed: Mapping[int, OSError]):
        super().__init__(f"{len(failed)} file(s) could not be placed")
        self.failed = failed


def _placement_errors(batch: Iterable[_Record]) -> dict[int, OSError]:
    """Waits until every file of the batch is placed; the records whose file failed."""
    failed: dict[int, OSError] = {}
    for record in batch:
        try:
            record.placed.result()
        except OSError as exc:
            failed[id(record)] = exc
    return failed


class _KeyCache:
    """Keys known to be committed, so repeats skip their INSERT; bounded, cleared when full."""

    def __init__(self, limit: int = 200_000):
        self.limit = limit
        self.patients: dict[tuple[str, str], int] = {}
        self.studies: set[str] = set()
        self.series: set[str] = set()

    def clear(self) -> None:
        self.patients.clear()
        self.studies.clear()
        self.series.clear()

    def remember(self, patients: Mapping[tuple[str, str], int], studies: Iterable[str],
                 series: Iterable[str]) -> None:
        if len(self.patients) + len(self.studies) + len(self.series) > self.limit:
            self.clear()
        self.patients.update(patients)
        self.studies.update(studies)
        self.series.update(series)


def _first_per_key(records: Iterable[_Record], key: Callable[[InstanceHeader], str],
                   known: set[str]) -> dict[str, _Record]:
    """The first record of each key not yet known to be committed."""
    todo: dict[str, _Record] = {}
    for record in records:
        value = key(record.header)
        if value not in known:
            todo.setdefault(value, record)
    return todo


# ---------------------------------------------------------------- ingestor


class Ingestor:
    """Validates, stores and indexes instances; thread-safe."""

    def __init__(
        self,
        engine: Engine,
        store: FileStore,
        *,
        stages: Sequence[str] = ("tags",),
        batch_max: int = 128,
        node: str | None = None,
        stats_interval: float = 1.0,
        strict: bool = False,
    ):
        """``strict``: reject what tolerant mode (the default) stores with a recorded
        defect: UIDs that are not valid UIDs, and a C-STORE whose Affected SOP Instance
        UID differs from its data set's (docs/ingest.md, "Tolerated defects")."""
        self.engine = engine
        self.store = store
        self.strict = strict
        self.stages = list(stages)
        self.batch_max = batch_max
        self.node = node or f"{socket.gethostname()}:{os.getpid()}"
        self.stats_interval = stats_interval
        self.counters = Counters()
        self._unflushed = Counters()
        self._lock = threading.Lock()
        # records waiting for the committer; one lock, a condition for each side
        group_lock = threading.Lock()
        self._work_ready = threading.Condition(group_lock)
        self._batch_done = threading.Condition(group_lock)
        self._waiting: list[_Record] = []
        self._cache = _KeyCache()
        self._unresolved: list[PendingFile] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._conn: DriverConnection | None = None

    # -- lifecycle

    def start(self, *, resolve: bool = True) -> "Ingestor":
        self.store.prepare()
        if resolve:
            self.resolve_pending()
        self.store.start_spares()
        self._thread = threading.Thread(target=self._run, name="group-committer", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        with self._work_ready:
            self._stopping = True
            self._work_ready.notify()
        if self._thread is not None:
            # the committer commits what is waiting, then stops
            self._thread.join(timeout=30)
            self._thread = None
        with self._batch_done:
            for record in self._waiting:
                record.error = RuntimeError("service is shutting down")
            self._waiting.clear()
            self._batch_done.notify_all()
        self._drop_connection()
        self.store.close()
        try:
            self._flush_stats()
        except DBAPIError as exc:
            log.warning("could not write the last counters: %s", exc.orig)

    def __enter__(self) -> "Ingestor":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- the store path

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self.counters, name, getattr(self.counters, name) + delta)
                setattr(self._unflushed, name, getattr(self._unflushed, name) + delta)

    def ingest(
        self,
        encoded: bytes,
        *,
        calling_ae: str | None = None,
        called_ae: str | None = None,
        expected_sop_instance_uid: str | None = None,
        expected_sop_class_uid: str | None = None,
        source: str | None = None,
    ) -> StoreOutcome:
        """Store one DICOM Part 10 byte string; returns once it is durable (or rejected).

        ``source`` (a file name, for ``import``) names the instance in log lines when its
        SOP Instance UID cannot be read.
        """
        self._count(received=1)
        if self._stopping:
            self._count(rejected=1)
            return StoreOutcome(STATUS_OUT_OF_RESOURCES, "failed", None, "service is stopping")
        # written before the parse, so that the disk already has the data when place()
        # flushes it; a write error is reported only for an instance that parses
        temp: str | None = None
        write_error: OSError | None = None
        try:
            temp = self.store.write_temp(encoded)
        except OSError as exc:
            write_error = exc
        mismatch = False
        try:
            header = read_header(encoded, tolerate_invalid_uids=not self.strict)
            if expected_sop_instance_uid and expected_sop_instance_uid != header.sop_instance_uid:
                if self.strict:
                    raise InvalidInstance(
                        STATUS_DATASET_MISMATCH,
                        f"dataset SOPInstanceUID {header.sop_instance_uid} differs from the "
                        f"request's {expected_sop_instance_uid}", header.sop_instance_uid)
                mismatch = True
            # the SOP class chose the presentation context: a data set of another class is
            # not what the association negotiated, in either mode
            if expected_sop_class_uid and expected_sop_class_uid != header.sop_class_uid:
                raise InvalidInstance(
                    STATUS_DATASET_MISMATCH,
                    f"dataset SOPClassUID {header.sop_class_uid} differs from the request's "
                    f"{expected_sop_class_uid}", header.sop_instance_uid)
        except InvalidInstance as exc:
            if temp is not None:
                self.store.discard_temp(temp)
            self._count(rejected=1)
            sop = exc.sop_instance_uid or expected_sop_instance_uid
            log.warning("rejected instance %s from %s: %s",
                        sop or source or "(no SOP Instance UID)", calling_ae or "-", exc.reason,
                        extra={"status": f"0x{exc.status:04X}", "calling_ae": calling_ae,
                               "sop_instance_uid": sop, "file": source})
            return StoreOutcome(exc.status, "rejected", sop, exc.reason)

        sop = header.sop_instance_uid
        defects = header.defects
        if mismatch:
            defects += ((RULE_SOP_INSTANCE_MISMATCH,
                         f"C-STORE Affected SOP Instance UID {expected_sop_instance_uid!r} "
                         f"differs from the data set's SOPInstanceUID {sop!r}; kept under the "
                         "data set's"),)
            # the file meta names what the file holds, not what the request said
            encoded = with_media_storage_sop_instance_uid(encoded, sop)
            if temp is not None:
                self.store.discard_temp(temp)
                temp = None
                try:
                    temp = self.store.write_temp(encoded)
                except OSError as exc:
                    write_error = exc
        if defects:
            relative = safe_relative_path(header.study_instance_uid, header.series_instance_uid,
                                          sop)
            for rule, detail in defects:
                log.warning("tolerated %s in instance %s from %s: %s", rule, sop,
                            calling_ae or "-", detail,
                            extra={"rule": rule, "calling_ae": calling_ae,
                                   "sop_instance_uid": sop, "file": source})
        else:
            relative = relative_path(header.study_instance_uid, header.series_instance_uid, sop)
        if temp is None:
            return self._storage_failed(sop, write_error, calling_ae)
        record = _Record(
            header=header,
            relative=relative,
            size=len(encoded),
            sha256=hashlib.sha256(encoded).hexdigest(),
            calling_ae=calling_ae,
            called_ae=called_ae,
            defects=defects,
        )
        # the committer inserts the row while this thread flushes the file; it commits
        # only after both
        with self._work_ready:
            self._waiting.append(record)
            self._work_ready.notify()
        try:
            record.placed.set_result(self.store.place(temp, relative))
        except OSError as exc:
            record.placed.set_exception(exc)
        except BaseException as exc:
            # the committer waits on this record's file: it must hear of any failure
            record.placed.set_exception(exc)
            raise
        try:
            result = self._wait(record)
        except StorageFailure as exc:
            return self._storage_failed(sop, exc.error, calling_ae)
        except Exception as exc:
            # the transaction may or may not have committed: the pending file is settled
            # against the database once it answers again (also at every start-up)
            try:
                pending = record.placed.result()
            except OSError:
                pass  # place() removed what it had written
            else:
                with self._lock:
                    self._unresolved.append(pending)
            self._count(rejected=1)
            reason = f"database: {getattr(exc, 'orig', exc) or exc}"
            log.error("cannot index instance %s from %s: %s", sop, calling_ae or "-", reason,
                      extra={"sop_instance_uid": sop, "calling_ae": calling_ae})
            return StoreOutcome(STATUS_OUT_OF_RESOURCES, "failed", sop, reason, defects)
        pending = record.placed.result()
        try:
            if result == "stored":
                self.store.finish_stored(pending)
                self._count(stored=1, bytes_stored=record.size)
            else:
                self.store.finish_duplicate(pending)
                self._count(duplicates=1)
                log.info("duplicate instance kept as first received", extra={"sop_instance_uid": sop})
        except OSError as exc:
            # the row is committed and the file is linked in place; only the
            # temp name is left, which start-up settles
            log.warning("could not finish file placement: %s", exc, extra={"sop_instance_uid": sop})
        return StoreOutcome(SUCCESS, result, sop, None, defects)

    def _storage_failed(self, sop: str, exc: OSError, calling_ae: str | None) -> StoreOutcome:
        self._count(rejected=1)
        log.error("cannot write instance file %s from %s: %s", sop, calling_ae or "-", exc,
                  extra={"sop_instance_uid": sop, "calling_ae": calling_ae})
        return StoreOutcome(STATUS_OUT_OF_RESOURCES, "failed", sop, f"storage: {exc}")

    def _wait(self, record: _Record) -> str:
        with self._batch_done:
            while not record.done:
                if not self._batch_done.wait(timeout=1.0):
                    thread = self._thread
                    if thread is None or not thread.is_alive():
                        raise RuntimeError("the committer has stopped")
        if record.error is not None:
            raise record.error
        return record.result

    # -- committer thread

    def _run(self) -> None:
        while True:
            with self._work_ready:
                if not self._waiting and not self._stopping:
                    self._work_ready.wait(timeout=self.stats_interval)
                if self._stopping and not self._waiting:
                    return
                batch = self._waiting[:self.batch_max]
                del self._waiting[:self.batch_max]
            if not batch:
                self._idle_work()
                continue
            try:
                self._commit_batch(batch)
            finally:
                with self._batch_done:
                    for record in batch:
                        if not record.done:
                            record.error = RuntimeError("the commit did not finish")
                    self._batch_done.notify_all()

    def _idle_work(self) -> None:
        try:
            self._flush_stats()
            self._resolve_unresolved()
        except DBAPIError as exc:
            log.debug("idle work postponed: %s", exc.orig)

    def _commit_batch(self, batch: list[_Record]) -> None:
        try:
            try:
                results = self._write_rows(batch)
            except Exception as exc:
                if not self._is_integrity_error(exc):
                    raise
                # a cached parent row was deleted behind our back: forget the cache, try again
                self._cache.clear()
                results = self._write_rows(batch)
        except _PlacementFailed as failure:
            for record in batch:
                if id(record) in failure.failed:
                    record.error = StorageFailure(failure.failed[id(record)])
            rest = [record for record in batch if id(record) not in failure.failed]
            if rest:
                self._commit_batch(rest)
            return
        except Exception as exc:
            self._fail_or_split(batch, exc)
            return
        for record in batch:
            record.result = results[id(record)]

    def _fail_or_split(self, batch: list[_Record], exc: Exception) -> None:
        if len(batch) > 1 and not self._lost_connection(exc):
            # one bad row must not fail the others: commit them one by one
            for record in batch:
                self._commit_batch([record])
            return
        for record in batch:
            record.error = exc

    def _write_rows(self, batch: list[_Record]) -> dict[int, str]:
        results: dict[int, str] = {}
        unique: dict[str, _Record] = {}
        for record in sorted(batch, key=lambda r: r.header.sop_instance_uid):
            if record.header.sop_instance_uid in unique:
                results[id(record)] = "duplicate"  # same instance twice in one batch
            else:
                unique[record.header.sop_instance_uid] = record
        records = list(unique.values())
        conn = self._connection()
        try:
            conn.command("BEGIN")
            try:
                if self._parents_known(records):
                    patients, new_studies, new_series = {}, [], []
                else:
                    patients = self._ensure_patients(conn, records)
                    new_studies = self._ensure_studies(conn, records, patients)
                    new_series = self._ensure_series(conn, records)
                inserted = self._insert_instances(conn, records)
                defective = [r for r in records if r.defects]
                if defective:
                    self._insert_defects(conn, defective, inserted)
                # the rows commit only once every file of the batch is durable in place
                failed = _placement_errors(batch)
                if failed:
                    raise _PlacementFailed(failed)
            except BaseException:
                if not conn.closed:
                    conn.command("ROLLBACK")
                raise
            conn.command("COMMIT")
        except BaseException as exc:
            if conn.is_connection_error(exc):
                self._drop_connection()
            raise
        self._cache.remember(patients, new_studies, new_series)
        for record in records:
            sop = record.header.sop_instance_uid
            results[id(record)] = "stored" if sop in inserted else "duplicate"
        return results

    def _parents_known(self, records: list[_Record]) -> bool:
        cache = self._cache
        return all(r.header.series_instance_uid in cache.series
                   and r.header.study_instance_uid in cache.studies
                   and r.patient_key in cache.patients for r in records)

    def _connection(self) -> DriverConnection:
        """The committer's connection, kept open between batches."""
        if self._conn is None or self._conn.closed:
            self._drop_connection()
            self._conn = DriverConnection(self.engine)
        return self._conn

    def _is_integrity_error(self, exc: BaseException) -> bool:
        return self._conn is not None and isinstance(exc, self._conn.errors.IntegrityError)

    def _lost_connection(self, exc: BaseException) -> bool:
        return self._conn is None or self._conn.is_connection_error(exc)

    def _drop_connection(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass
            self._conn = None

    def _ensure_patients(self, conn: DriverConnection, records: list[_Record]) -> dict[tuple[str, str], int]:
        known = self._cache.patients
        missing: dict[tuple[str, str], _Record] = {}
        for record in records:
            key = record.patient_key
            if key not in known and key not in missing:
                missing[key] = record
        found = {key: known[key] for key in {r.patient_key for r in records} if key in known}
        if not missing:
            return found
        keys = sorted(missing)
        rows = [missing[k].header for k in keys]
        conn.execute(_INSERT_PATIENTS, {
            "patient_id": [k[0] for k in keys],
            "issuer": [k[1] for k in keys],
            "name": [h.text("PatientName") for h in rows],
            "birth_date": [h.date("PatientBirthDate") for h in rows],
            "sex": [h.text("PatientSex") for h in rows],
        })
        for pk, pid, issuer in conn.execute(_SELECT_PATIENTS, {
            "patient_id": [k[0] for k in keys], "issuer": [k[1] for k in keys],
        }):
            found[(pid, issuer)] = pk
        return found

    def _ensure_studies(self, conn: DriverConnection, records: list[_Record],
                        patients: Mapping[tuple[str, str], int]) -> list[str]:
        todo = _first_per_key(records, lambda h: h.study_instance_uid, self._cache.studies)
        if todo:
            uids = sorted(todo)
            hs = [todo[u].header for u in uids]
            conn.execute(_INSERT_STUDIES, {
                "uid": uids,
                "patient_pk": [patients[todo[u].patient_key] for u in uids],
                "study_date": [h.date("StudyDate") for h in hs],
                "study_time": [h.text("StudyTime") for h in hs],
                "accession": [h.text("AccessionNumber") for h in hs],
                "study_id": [h.text("StudyID") for h in hs],
                "description": [h.text("StudyDescription") for h in hs],
                "referring": [h.text("ReferringPhysicianName") for h in hs],
            })
        return list(todo)

    def _ensure_series(self, conn: DriverConnection, records: list[_Record]) -> list[str]:
        todo = _first_per_key(records, lambda h: h.series_instance_uid, self._cache.series)
        if todo:
            uids = sorted(todo)
            hs = [todo[u].header for u in uids]
            conn.execute(_INSERT_SERIES, {
                "uid": uids,
                "study_uid": [h.study_instance_uid for h in hs],
                "modality": [h.text("Modality") for h in hs],
                "number": [h.integer("SeriesNumber") for h in hs],
                "description": [h.text("SeriesDescription") for h in hs],
                "body_part": [h.text("BodyPartExamined") for h in hs],
                "manufacturer": [h.text("Manufacturer") for h in hs],
                "model": [h.text("ManufacturerModelName") for h in hs],
                "station": [h.text("StationName") for h in hs],
                "series_date": [h.date("SeriesDate") for h in hs],
            })
        return list(todo)

    def _insert_instances(self, conn: DriverConnection, records: list[_Record]) -> set[str]:
        rows = []
        for r in records:
            h = r.header
            content_date = h.date("ContentDate")
            rows.append({
                "sop": h.sop_instance_uid, "series": h.series_instance_uid,
                "study": h.study_instance_uid, "sop_class": h.sop_class_uid,
                "ts": h.transfer_syntax_uid, "modality": h.text("Modality"),
                "number": h.integer("InstanceNumber"),
                "content_date": content_date.isoformat() if content_date else None,
                "calling": r.calling_ae, "called": r.called_ae, "path": r.relative,
                "size": r.size, "sha256": r.sha256, "tags": h.tags,
            })
        deltas = self._take_unflushed()
        try:
            result = conn.text_rows(_INSERT_INSTANCES, {
                "rows": _ROWS_ENCODER.encode(rows).decode(),
                "stages": self.stages,
                "node": self.node,
                **deltas.as_dict(),
            })
            inserted = {row[0] for row in result}
        except BaseException:
            self._restore_unflushed(deltas)
            raise
        return inserted

    @staticmethod
    def _insert_defects(conn: DriverConnection, records: list[_Record],
                        inserted: set[str]) -> None:
        """The defects of the newly stored instances, in their transaction (a duplicate's
        were recorded with the instance it duplicates, if it had any)."""
        rows = [(r.header.sop_instance_uid, rule, detail, r.calling_ae, r.called_ae)
                for r in records if r.header.sop_instance_uid in inserted
                for rule, detail in r.defects]
        if rows:
            sop, rule, detail, calling, called = (list(column) for column in zip(*rows))
            conn.execute(_INSERT_DEFECTS, {"sop": sop, "rule": rule, "detail": detail,
                                           "calling": calling, "called": called})

    # -- counters and recovery

    def _take_unflushed(self) -> Counters:
        with self._lock:
            deltas, self._unflushed = self._unflushed, Counters()
        return deltas

    def _restore_unflushed(self, deltas: Counters) -> None:
        with self._lock:
            for name, value in deltas.as_dict().items():
                setattr(self._unflushed, name, getattr(self._unflushed, name) + value)

    def _flush_stats(self) -> None:
        """Counters not yet written with a batch (rejections, the last stores) go in now."""
        deltas = self._take_unflushed()
        if any(deltas.as_dict().values()):
            try:
                with self.engine.begin() as conn:
                    conn.exec_driver_sql(_STATS_UPSERT, {"node": self.node, **deltas.as_dict()})
            except BaseException:
                self._restore_unflushed(deltas)
                raise

    def _committed_hashes(self, paths: Iterable[str]) -> dict[str, str]:
        with self.engine.connect() as conn:
            return dict(conn.exec_driver_sql(_HASHES_BY_PATH, {"paths": list(paths)}).all())

    def resolve_pending(self) -> dict[str, int]:
        """Settle files of unfinished stores (crash, lost database) against committed rows."""
        counts = self.store.resolve_pending(self._committed_hashes)
        if counts["kept"] or counts["removed"]:
            log.info("settled unfinished stores", extra=counts)
        return counts

    def _resolve_unresolved(self) -> None:
        with self._lock:
            pending, self._unresolved = self._unresolved, []
        if not pending:
            return
        try:
            self.store.resolve_pending(self._committed_hashes,
                                       [p.temp for p in pending if os.path.exists(p.temp_path)])
        except BaseException:
            with self._lock:
                self._unresolved.extend(pending)
            raise
