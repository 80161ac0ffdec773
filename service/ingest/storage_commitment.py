"""Storage Commitment Push Model as an SCP (PS3.4 Annex J).

A forwarding PACS that sent us instances asks, with an N-ACTION-RQ on the Storage
Commitment Push Model SOP Class (1.2.840.10008.1.20.1, well-known instance
1.2.840.10008.1.20.1.1), whether we hold them, before it deletes its own copy.  We
answer the N-ACTION at once (the request was understood) and the question itself with an
N-EVENT-REPORT-RQ: event type 1 when every instance is committed, 2 when some are not,
each failed one with its reason.

What "committed" means here: a row in ``instances``.  A store answers Success only after
its file is flushed and its row committed (docs/ingest.md, "Durability"), so a row is a
durable file; an instance still in flight, or one a store failed, has no row.  We answer
from rows only, never from files or memory.

Where the report goes:

* to a requester listed in ``storage_commitment_peers`` (``AE=host:port``): on a new
  association we open to that address, as Orthanc expects (it always reads the report
  on an association of its own) and as dcm4chee does once the requester has closed the
  first one; tried again ``attempts`` times, ``retry_seconds`` apart;
* to any other requester: on the same association, right after the N-ACTION-RSP; the
  requester must stay connected until it has the report (pynetdicom does, with a handler
  bound to ``evt.EVT_N_EVENT_REPORT``).

Reports waiting for a retry live in memory: a service stopped before it could deliver one
loses it, and the requester, which then never hears back, asks again.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import struct
import threading
import time
from dataclasses import dataclass
from io import BytesIO
from typing import TYPE_CHECKING, Iterable, Mapping

import sqlalchemy as sa
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from .acceptor import NO_DATASET, DimseRequest, encode_command
# the storage_commitment_peers setting is parsed where the settings are checked
from ..config import Peer, parse_peer, parse_peers  # noqa: F401  (part of this API)

if TYPE_CHECKING:
    from .acceptor import Association

log = logging.getLogger(__name__)

SOP_CLASS = "1.2.840.10008.1.20.1"
SOP_INSTANCE = "1.2.840.10008.1.20.1.1"

# DIMSE-N command fields (PS3.7 E.1)
N_EVENT_REPORT_RQ, N_EVENT_REPORT_RSP = 0x0100, 0x8100
N_ACTION_RQ, N_ACTION_RSP = 0x0130, 0x8130

ACTION_REQUEST_COMMITMENT = 1  # Action Type ID (PS3.4 J.3.2.1)
EVENT_ALL_COMMITTED, EVENT_FAILURES_EXIST = 1, 2  # Event Type ID (PS3.4 J.3.3.1)

# Failure Reason (0008,1197) of a failed instance (PS3.3 C.14.1.1)
REASON_PROCESSING_FAILURE = 0x0110
REASON_NO_SUCH_OBJECT = 0x0112
REASON_CLASS_INSTANCE_CONFLICT = 0x0119

# N-ACTION-RSP statuses (PS3.7 10.1.4.1.10)
STATUS_SUCCESS = 0x0000
STATUS_PROCESSING_FAILURE = 0x0110
STATUS_NO_SUCH_OBJECT_INSTANCE = 0x0112
STATUS_INVALID_ARGUMENT = 0x0115
STATUS_NO_SUCH_SOP_CLASS = 0x0118
STATUS_NO_SUCH_ACTION = 0x0123

REPORT_ATTEMPTS = 5
REPORT_RETRY_SECONDS = 30.0
QUERY_CHUNK = 10_000

class InvalidRequest(ValueError):
    """The N-ACTION-RQ cannot be served; ``status`` is its N-ACTION-RSP status."""

    def __init__(self, message: str, status: int = STATUS_INVALID_ARGUMENT):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Reference:
    sop_class_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class CommitmentRequest:
    transaction_uid: str
    references: tuple[Reference, ...]


# ---------------------------------------------------------------- the answer


def parse_action_information(data: bytes | None, transfer_syntax_uid: str) -> CommitmentRequest:
    """The N-ACTION-RQ's Action Information: Transaction UID and the referenced instances."""
    from pynetdicom.dsutils import decode

    if not data:
        raise InvalidRequest("N-ACTION-RQ without Action Information")
    syntax = UID(transfer_syntax_uid)
    try:
        dataset = decode(BytesIO(data), syntax.is_implicit_VR, syntax.is_little_endian,
                         syntax.is_deflated)
        transaction_uid = str(dataset.get("TransactionUID", "") or "").strip()
        items = dataset.get("ReferencedSOPSequence")
        references = tuple(
            Reference(str(item.get("ReferencedSOPClassUID", "") or "").strip(),
                      str(item.get("ReferencedSOPInstanceUID", "") or "").strip())
            for item in (items or ()))
    except Exception as exc:  # pydicom raises many kinds on a broken data set
        raise InvalidRequest(f"undecodable Action Information: {exc}") from None
    if not transaction_uid:
        raise InvalidRequest("Action Information without Transaction UID")
    if not references:
        raise InvalidRequest("Action Information without Referenced SOP Sequence items")
    if any(not ref.sop_class_uid or not ref.sop_instance_uid for ref in references):
        raise InvalidRequest("a Referenced SOP Sequence item lacks its class or instance UID")
    return CommitmentRequest(transaction_uid, references)


def commitment_outcome(references: Iterable[Reference], stored: Mapping[str, str]
                       ) -> tuple[list[Reference], list[tuple[Reference, int]]]:
    """Split the references into committed and failed ones (with their Failure Reason).

    ``stored``: SOP Instance UID -> SOP Class UID of the committed rows among them.  An
    instance we hold under another SOP class than the requester names is a class/instance
    conflict: the requester's copy is not the one we have.
    """
    committed: list[Reference] = []
    failed: list[tuple[Reference, int]] = []
    for ref in references:
        sop_class = stored.get(ref.sop_instance_uid)
        if sop_class is None:
            failed.append((ref, REASON_NO_SUCH_OBJECT))
        elif sop_class != ref.sop_class_uid:
            failed.append((ref, REASON_CLASS_INSTANCE_CONFLICT))
        else:
            committed.append(ref)
    return committed, failed


def stored_classes(engine: sa.Engine, sop_instance_uids: Iterable[str]) -> dict[str, str]:
    """SOP Instance UID -> SOP Class UID of the committed rows among ``sop_instance_uids``."""
    uids = sorted(set(sop_instance_uids))
    found: dict[str, str] = {}
    query = sa.text("SELECT sop_instance_uid, sop_class_uid FROM instances "
                    "WHERE sop_instance_uid = ANY(:uids)")
    with engine.connect() as conn:
        for start in range(0, len(uids), QUERY_CHUNK):
            for uid, sop_class in conn.execute(query, {"uids": uids[start:start + QUERY_CHUNK]}):
                found[uid] = sop_class
    return found


def event_information(transaction_uid: str, committed: list[Reference],
                      failed: list[tuple[Reference, int]]) -> tuple[int, Dataset]:
    """Event Type ID and Event Information of the N-EVENT-REPORT-RQ (PS3.4 J.3.3.1)."""

    def item(ref: Reference) -> Dataset:
        out = Dataset()
        out.ReferencedSOPClassUID = ref.sop_class_uid
        out.ReferencedSOPInstanceUID = ref.sop_instance_uid
        return out

    info = Dataset()
    info.TransactionUID = transaction_uid
    if committed:
        info.ReferencedSOPSequence = [item(ref) for ref in committed]
    if failed:
        failed_items = []
        for ref, reason in failed:
            entry = item(ref)
            entry.FailureReason = reason
            failed_items.append(entry)
        info.FailedSOPSequence = failed_items
    return (EVENT_FAILURES_EXIST if failed else EVENT_ALL_COMMITTED), info


def encode_dataset(dataset: Dataset, transfer_syntax_uid: str) -> bytes:
    from pynetdicom.dsutils import encode

    syntax = UID(transfer_syntax_uid)
    data = encode(dataset, syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated)
    if data is None:
        raise ValueError("cannot encode the Event Information")
    return data


def _ui(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _us(value: int) -> bytes:
    return struct.pack("<H", value)


def action_response(message_id: int, status: int) -> bytes:
    return encode_command([
        (0x0002, _ui(SOP_CLASS)), (0x0100, _us(N_ACTION_RSP)), (0x0120, _us(message_id)),
        (0x0800, _us(NO_DATASET)), (0x0900, _us(status)), (0x1000, _ui(SOP_INSTANCE)),
        (0x1008, _us(ACTION_REQUEST_COMMITMENT)),
    ])


def event_report_request(message_id: int, event_type: int) -> bytes:
    return encode_command([
        (0x0002, _ui(SOP_CLASS)), (0x0100, _us(N_EVENT_REPORT_RQ)), (0x0110, _us(message_id)),
        (0x0800, _us(0x0000)), (0x1000, _ui(SOP_INSTANCE)), (0x1002, _us(event_type)),
    ])


# ---------------------------------------------------------------- the service


@dataclass(order=True)
class _Pending:
    due: float
    sequence: int
    peer: Peer
    transaction_uid: str
    event_type: int
    info: Dataset
    attempt: int = 1


class StorageCommitmentSCP:
    """Serves N-ACTION-RQ (request commitment) on the acceptor's associations and delivers
    the N-EVENT-REPORT; ``services`` goes to :class:`service.ingest.acceptor.DicomServer`."""

    def __init__(self, engine: sa.Engine, ae_title: str, peers: Mapping[str, Peer] | None = None,
                 *, attempts: int = REPORT_ATTEMPTS, retry_seconds: float = REPORT_RETRY_SECONDS,
                 timeout: float = 30.0):
        self.engine = engine
        self.ae_title = ae_title
        self.peers = dict(peers or {})
        self.attempts = attempts
        self.retry_seconds = retry_seconds
        self.timeout = timeout
        self._message_ids = itertools.count(1)
        self._sequence = itertools.count()
        self._pending: list[_Pending] = []
        self._wake = threading.Condition()
        self._stopped = False
        self._thread: threading.Thread | None = None

    @property
    def services(self) -> dict:
        return {N_ACTION_RQ: self.on_n_action, N_EVENT_REPORT_RSP: self.on_n_event_report_rsp}

    # -- on the association's thread

    def on_n_action(self, request: DimseRequest, association: "Association") -> None:
        extra = {"calling_ae": request.calling_ae_title, "address": request.peer_address}
        try:
            commitment = self._validate(request)
            stored = stored_classes(self.engine,
                                    (ref.sop_instance_uid for ref in commitment.references))
        except InvalidRequest as exc:
            log.warning("storage commitment request refused: %s", exc,
                        extra={**extra, "status": exc.status})
            association.send_message(request.context_id,
                                     action_response(request.message_id, exc.status))
            return
        except (sa.exc.SQLAlchemyError, OSError) as exc:
            # the requester asks again; we never answer without the database
            log.error("storage commitment request failed: database: %s", exc, extra=extra)
            association.send_message(request.context_id,
                                     action_response(request.message_id,
                                                     STATUS_PROCESSING_FAILURE))
            return
        association.send_message(request.context_id,
                                 action_response(request.message_id, STATUS_SUCCESS))
        committed, failed = commitment_outcome(commitment.references, stored)
        event_type, info = event_information(commitment.transaction_uid, committed, failed)
        log.info("storage commitment answered", extra={
            **extra, "transaction_uid": commitment.transaction_uid,
            "committed": len(committed), "failed": len(failed)})
        peer = self.peers.get(request.calling_ae_title)
        if peer is not None:
            self._enqueue(_Pending(time.monotonic(), next(self._sequence), peer,
                                   commitment.transaction_uid, event_type, info))
            return
        association.send_message(
            request.context_id, event_report_request(next(self._message_ids) & 0xFFFF or 1,
                                                     event_type),
            encode_dataset(info, request.transfer_syntax_uid))

    def on_n_event_report_rsp(self, request: DimseRequest, association: "Association") -> None:
        status = request.fields.get(0x0900, b"")
        status_value = struct.unpack("<H", status)[0] if len(status) == 2 else None
        if status_value != STATUS_SUCCESS:
            log.warning("storage commitment report answered with a failure", extra={
                "calling_ae": request.calling_ae_title, "status": status_value})

    def _validate(self, request: DimseRequest) -> CommitmentRequest:
        fields = request.fields
        sop_class = fields.get(0x0003, b"").rstrip(b"\x00 ").decode("ascii", "replace")
        sop_instance = fields.get(0x1001, b"").rstrip(b"\x00 ").decode("ascii", "replace")
        action = fields.get(0x1008, b"")
        if sop_class != SOP_CLASS:
            raise InvalidRequest(f"N-ACTION on SOP class {sop_class!r}", STATUS_NO_SUCH_SOP_CLASS)
        if sop_instance != SOP_INSTANCE:
            raise InvalidRequest(f"N-ACTION on SOP instance {sop_instance!r}",
                                 STATUS_NO_SUCH_OBJECT_INSTANCE)
        if len(action) != 2 or struct.unpack("<H", action)[0] != ACTION_REQUEST_COMMITMENT:
            raise InvalidRequest(f"action type {action.hex() or 'missing'}",
                                 STATUS_NO_SUCH_ACTION)
        return parse_action_information(request.dataset, request.transfer_syntax_uid)

    # -- reports on a new association (a thread that lives while reports wait)

    def close(self) -> None:
        """Stop delivering; reports still waiting are lost (logged)."""
        with self._wake:
            self._stopped = True
            lost = len(self._pending)
            self._pending.clear()
            thread = self._thread
            self._wake.notify_all()
        if thread is not None:
            thread.join(timeout=self.timeout + 5)
        if lost:
            log.warning("storage commitment reports not delivered before stopping",
                        extra={"reports": lost})

    def _enqueue(self, pending: _Pending) -> None:
        with self._wake:
            if self._stopped:
                return
            heapq.heappush(self._pending, pending)
            self._wake.notify_all()
            if self._thread is None:
                self._thread = threading.Thread(target=self._deliver_loop,
                                                 name="storage-commitment-reports", daemon=True)
                self._thread.start()

    def _deliver_loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopped and self._pending and (
                        self._pending[0].due > time.monotonic()):
                    self._wake.wait(self._pending[0].due - time.monotonic())
                if self._stopped or not self._pending:
                    self._thread = None
                    return
                pending = heapq.heappop(self._pending)
            error = self._deliver(pending)
            extra = {"calling_ae": pending.peer.ae_title, "transaction_uid":
                     pending.transaction_uid, "attempt": pending.attempt}
            if error is None:
                log.info("storage commitment report delivered", extra=extra)
            elif pending.attempt < self.attempts:
                log.warning("storage commitment report not delivered, will retry: %s", error,
                            extra=extra)
                pending.attempt += 1
                pending.due = time.monotonic() + self.retry_seconds
                with self._wake:
                    heapq.heappush(self._pending, pending)
            else:
                log.error("storage commitment report given up: %s", error, extra=extra)

    def _deliver(self, pending: _Pending) -> str | None:
        """Open an association to the requester's AE and send the report; the reason it
        failed, or None."""
        from pynetdicom import AE, build_role

        ae = AE(ae_title=self.ae_title)
        ae.add_requested_context(SOP_CLASS, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        peer = pending.peer
        try:
            # we act as the SCP of the SOP class on an association we request (PS3.4 J.3.3)
            assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title,
                                 ext_neg=[build_role(SOP_CLASS, scp_role=True)])
        except (OSError, ValueError, RuntimeError) as exc:
            return f"association to {peer.host}:{peer.port}: {exc}"
        if not assoc.is_established:
            return (f"association to {peer.ae_title} at {peer.host}:{peer.port} "
                    "rejected or failed")
        try:
            status, _ = assoc.send_n_event_report(pending.info, pending.event_type, SOP_CLASS,
                                                  SOP_INSTANCE)
        except (OSError, ValueError, RuntimeError) as exc:
            assoc.abort()
            return f"N-EVENT-REPORT: {exc}"
        if "Status" not in status:
            assoc.abort()
            return "no N-EVENT-REPORT-RSP (timeout or aborted association)"
        assoc.release()
        if status.Status != STATUS_SUCCESS:
            return f"N-EVENT-REPORT-RSP status {status.Status:#06x}"
        return None
