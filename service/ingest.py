"""The one path every instance takes into the archive: header, file, row, answer.

Both the C-STORE handler and ``import DIR`` call :meth:`Ingestor.ingest`.  Rows
are written by one committer thread per process that groups whatever stores are
waiting into one transaction (group commit); each store still returns only after
the transaction holding its row has committed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import socket
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, IntegrityError

from .dicom_header import (
    STATUS_DATASET_MISMATCH,
    STATUS_OUT_OF_RESOURCES,
    InstanceHeader,
    InvalidInstance,
    read_header,
)
from .storage import FileStore, PendingFile, relative_path

log = logging.getLogger(__name__)

SUCCESS = 0x0000

# ---------------------------------------------------------------- SQL

_INSERT_PATIENTS = sa.text(
    """
    INSERT INTO patients (patient_id, issuer_of_patient_id, patient_name, patient_birth_date,
                          patient_sex)
    SELECT * FROM unnest(CAST(:patient_id AS text[]), CAST(:issuer AS text[]),
                         CAST(:name AS text[]), CAST(:birth_date AS date[]), CAST(:sex AS text[]))
    ON CONFLICT (patient_id, issuer_of_patient_id) DO NOTHING
    """
)
_SELECT_PATIENTS = sa.text(
    """
    SELECT p.id, p.patient_id, p.issuer_of_patient_id FROM patients p
    JOIN unnest(CAST(:patient_id AS text[]), CAST(:issuer AS text[])) AS k(pid, iss)
      ON p.patient_id = k.pid AND p.issuer_of_patient_id = k.iss
    """
)
_INSERT_STUDIES = sa.text(
    """
    INSERT INTO studies (study_instance_uid, patient_pk, study_date, study_time, accession_number,
                         study_id, study_description, referring_physician_name)
    SELECT * FROM unnest(CAST(:uid AS text[]), CAST(:patient_pk AS bigint[]),
                         CAST(:study_date AS date[]), CAST(:study_time AS text[]),
                         CAST(:accession AS text[]), CAST(:study_id AS text[]),
                         CAST(:description AS text[]), CAST(:referring AS text[]))
    ON CONFLICT (study_instance_uid) DO NOTHING
    """
)
_INSERT_SERIES = sa.text(
    """
    INSERT INTO series (series_instance_uid, study_instance_uid, modality, series_number,
                        series_description, body_part_examined, manufacturer,
                        manufacturer_model_name, station_name, series_date)
    SELECT * FROM unnest(CAST(:uid AS text[]), CAST(:study_uid AS text[]),
                         CAST(:modality AS text[]), CAST(:number AS integer[]),
                         CAST(:description AS text[]), CAST(:body_part AS text[]),
                         CAST(:manufacturer AS text[]), CAST(:model AS text[]),
                         CAST(:station AS text[]), CAST(:series_date AS date[]))
    ON CONFLICT (series_instance_uid) DO NOTHING
    """
)
# counter deltas of one process, added to its row
_STATS_UPSERT = """
    INSERT INTO ingest_stats AS s (node, received, stored, duplicates, rejected, bytes_stored)
    VALUES (:node, :received, :stored, :duplicates, :rejected, :bytes_stored)
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
_INSERT_INSTANCES = sa.text(
    f"""
    WITH inserted AS (
        INSERT INTO instances (sop_instance_uid, series_instance_uid, study_instance_uid,
                               sop_class_uid, transfer_syntax_uid, modality, instance_number,
                               content_date, calling_ae_title, called_ae_title, file_path,
                               file_size, sha256, tags)
        SELECT r.sop, r.series, r.study, r.sop_class, r.ts, r.modality, r.number,
               r.content_date, r.calling, r.called, r.path, r.size, r.sha256, r.tags
        FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS r(
            sop text, series text, study text, sop_class text, ts text, modality text,
            number integer, content_date date, calling text, called text, path text,
            size bigint, sha256 text, tags jsonb)
        ON CONFLICT (sop_instance_uid) DO NOTHING
        RETURNING sop_instance_uid
    ), queued AS (
        INSERT INTO work_queue (stage, sop_instance_uid)
        SELECT stage, inserted.sop_instance_uid
        FROM inserted CROSS JOIN unnest(CAST(:stages AS text[])) AS stage
    ), counted AS (
        {_STATS_UPSERT}
    )
    SELECT sop_instance_uid FROM inserted
    """
)
_UPSERT_STATS = sa.text(_STATS_UPSERT)
_HASHES_BY_PATH = sa.text(
    "SELECT file_path, sha256 FROM instances WHERE file_path = ANY(CAST(:paths AS text[]))"
)

# ---------------------------------------------------------------- records


@dataclass(frozen=True)
class StoreOutcome:
    status: int
    result: str  # stored | duplicate | rejected | failed
    sop_instance_uid: str | None = None
    reason: str | None = None


@dataclass
class _Record:
    header: InstanceHeader
    relative: str
    size: int
    sha256: str
    calling_ae: str | None
    called_ae: str | None
    future: Future = field(default_factory=Future)

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


def _is_connection_error(exc: BaseException) -> bool:
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated) or isinstance(
        exc, (sa.exc.OperationalError, sa.exc.InterfaceError)
    )


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
        io_threads: int = 16,
    ):
        self.engine = engine
        self.store = store
        self.stages = list(stages)
        self.batch_max = batch_max
        self.node = node or f"{socket.gethostname()}:{os.getpid()}"
        self.stats_interval = stats_interval
        self.counters = Counters()
        self._unflushed = Counters()
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[_Record | None] = queue.SimpleQueue()
        self._cache = _KeyCache()
        self._unresolved: list[PendingFile] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._conn: sa.Connection | None = None
        self._io_pool = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="file-write")

    # -- lifecycle

    def start(self, *, resolve: bool = True) -> "Ingestor":
        self.store.prepare()
        if resolve:
            self.resolve_pending()
        self._thread = threading.Thread(target=self._run, name="group-committer", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stopping = True
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=30)
            self._thread = None
        # stores that arrived after the committer stopped are answered with a failure
        while True:
            try:
                record = self._queue.get_nowait()
            except queue.Empty:
                break
            if record is not None and not record.future.done():
                record.future.set_exception(RuntimeError("service is shutting down"))
        self._drop_connection()
        self._io_pool.shutdown(wait=True)
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
    ) -> StoreOutcome:
        """Store one DICOM Part 10 byte string; returns once it is durable (or rejected)."""
        self._count(received=1)
        if self._stopping:
            self._count(rejected=1)
            return StoreOutcome(STATUS_OUT_OF_RESOURCES, "failed", None, "service is stopping")
        # the file is written while this thread reads the header
        temp_future = self._io_pool.submit(self.store.write_temp, encoded)
        try:
            header = read_header(encoded)
            if expected_sop_instance_uid and expected_sop_instance_uid != header.sop_instance_uid:
                raise InvalidInstance(
                    STATUS_DATASET_MISMATCH,
                    f"dataset SOPInstanceUID {header.sop_instance_uid} differs from the request's "
                    f"{expected_sop_instance_uid}",
                )
            if expected_sop_class_uid and expected_sop_class_uid != header.sop_class_uid:
                raise InvalidInstance(
                    STATUS_DATASET_MISMATCH,
                    f"dataset SOPClassUID {header.sop_class_uid} differs from the request's "
                    f"{expected_sop_class_uid}",
                )
        except InvalidInstance as exc:
            self._discard(temp_future)
            self._count(rejected=1)
            log.warning("rejected instance: %s", exc.reason,
                        extra={"status": f"0x{exc.status:04X}", "calling_ae": calling_ae})
            return StoreOutcome(exc.status, "rejected", None, exc.reason)

        digest = hashlib.sha256(encoded).hexdigest()
        sop = header.sop_instance_uid
        relative = relative_path(header.study_instance_uid, header.series_instance_uid, sop)
        try:
            pending = self.store.place(temp_future.result(), relative)
        except OSError as exc:
            self._count(rejected=1)
            log.error("cannot write instance file: %s", exc, extra={"sop_instance_uid": sop})
            return StoreOutcome(STATUS_OUT_OF_RESOURCES, "failed", sop, f"storage: {exc}")

        record = _Record(
            header=header,
            relative=relative,
            size=len(encoded),
            sha256=digest,
            calling_ae=calling_ae,
            called_ae=called_ae,
        )
        self._queue.put(record)
        try:
            result = self._wait(record)
        except Exception as exc:
            # the transaction may or may not have committed: the pending file is settled
            # against the database once it answers again (also at every start-up)
            with self._lock:
                self._unresolved.append(pending)
            self._count(rejected=1)
            reason = f"database: {getattr(exc, 'orig', exc) or exc}"
            log.error("cannot index instance: %s", reason, extra={"sop_instance_uid": sop})
            return StoreOutcome(STATUS_OUT_OF_RESOURCES, "failed", sop, reason)
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
        return StoreOutcome(SUCCESS, result, sop)

    def _wait(self, record: _Record) -> str:
        while True:
            try:
                return record.future.result(timeout=1.0)
            except FuturesTimeout:
                thread = self._thread
                if thread is None or not thread.is_alive():
                    raise RuntimeError("the committer has stopped") from None

    def _discard(self, temp_future: Future) -> None:
        try:
            self.store.discard_temp(temp_future.result())
        except OSError:
            pass

    # -- committer thread

    def _run(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=self.stats_interval)
            except queue.Empty:
                self._idle_work()
                continue
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < self.batch_max:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            self._commit_batch(batch)
            if stop:
                return

    def _idle_work(self) -> None:
        try:
            self._flush_stats()
            self._resolve_unresolved()
        except DBAPIError as exc:
            log.debug("idle work postponed: %s", exc.orig)

    def _commit_batch(self, batch: list[_Record]) -> None:
        try:
            results = self._write_rows(batch)
        except IntegrityError:
            # a cached parent row was deleted behind our back: forget the cache, try once more
            self._cache.clear()
            try:
                results = self._write_rows(batch)
            except Exception as exc:
                self._fail_or_split(batch, exc)
                return
        except Exception as exc:
            self._fail_or_split(batch, exc)
            return
        for record in batch:
            record.future.set_result(results[id(record)])

    def _fail_or_split(self, batch: list[_Record], exc: Exception) -> None:
        if len(batch) > 1 and not _is_connection_error(exc):
            # one bad row must not fail the others: commit them one by one
            for record in batch:
                self._commit_batch([record])
            return
        for record in batch:
            record.future.set_exception(exc)

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
            if self._parents_known(records):
                # the common case: one statement, committed on its own (one round trip)
                patients, new_studies, new_series = {}, [], []
                inserted = self._insert_instances(conn, records)
            else:
                conn.exec_driver_sql("BEGIN")
                try:
                    patients = self._ensure_patients(conn, records)
                    new_studies = self._ensure_studies(conn, records, patients)
                    new_series = self._ensure_series(conn, records)
                    inserted = self._insert_instances(conn, records)
                except BaseException:
                    conn.exec_driver_sql("ROLLBACK")
                    raise
                conn.exec_driver_sql("COMMIT")
        except BaseException as exc:
            if _is_connection_error(exc):
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

    def _connection(self) -> sa.Connection:
        """The committer's own autocommit connection, kept open between batches.

        Autocommit lets the common batch be one statement that commits itself; batches
        that must also create patients, studies or series open a transaction.
        """
        if self._conn is None or self._conn.closed or self._conn.invalidated:
            self._drop_connection()
            self._conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        return self._conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass
            self._conn = None

    def _ensure_patients(self, conn: sa.Connection, records: list[_Record]) -> dict[tuple[str, str], int]:
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

    def _ensure_studies(self, conn: sa.Connection, records: list[_Record],
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

    def _ensure_series(self, conn: sa.Connection, records: list[_Record]) -> list[str]:
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

    def _insert_instances(self, conn: sa.Connection, records: list[_Record]) -> set[str]:
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
            result = conn.execute(_INSERT_INSTANCES, {
                "rows": json.dumps(rows, ensure_ascii=False, separators=(",", ":")),
                "stages": self.stages,
                "node": self.node,
                **deltas.as_dict(),
            })
            inserted = {row[0] for row in result}
        except BaseException:
            self._restore_unflushed(deltas)
            raise
        return inserted

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
                    conn.execute(_UPSERT_STATS, {"node": self.node, **deltas.as_dict()})
            except BaseException:
                self._restore_unflushed(deltas)
                raise

    def _committed_hashes(self, paths: Iterable[str]) -> dict[str, str]:
        with self.engine.connect() as conn:
            return dict(conn.execute(_HASHES_BY_PATH, {"paths": list(paths)}).all())

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
                                       [p.temp for p in pending if p.temp.exists()])
        except BaseException:
            with self._lock:
                self._unresolved.extend(pending)
            raise
