"""``send DIR --to HOST:PORT``: a C-STORE SCU that sends files as they are.

Every DICOM file is offered in its own transfer syntax (its bytes after the File Meta
Information go out unchanged: nothing is decoded or re-encoded), in one presentation context
per (SOP class, transfer syntax) pair.  An association carries at most 128 presentation
contexts (PS3.8 9.3.2.2: odd IDs 1-255), so the pairs a batch of files needs are split over
as many associations as it takes.  Files that are not DICOM Part 10 files, or that carry no
SOP Class / SOP Instance UID to put in the C-STORE request, never leave and are counted as
skipped; every file gets one outcome, and the outcomes add up to the files found.

Why not pynetdicom's ``Association.send_c_store``: its association runs a reactor thread
beside the caller, and ``send_c_store`` pauses that reactor with a handshake that can let the
reactor run one last loop after the request went out.  When the response arrives within that
loop, the reactor takes it off the DIMSE queue ("Received unexpected C-STORE service
message"), and the caller waits for the DIMSE timeout and aborts.  On a busy machine this
lost 405 of 2,000 stores in ``tests/test_scp.py``.  So, as ``service/ingest/acceptor.py``
does on the receiving side, pynetdicom encodes the A-ASSOCIATE-RQ and decodes the answer, and
the steady state is one blocking loop on the calling thread: send a request, read its response,
check that the response answers that request (Message ID Being Responded To, SOP Instance UID,
context).
"""

from __future__ import annotations

import csv
import logging
import socket
import struct
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Sequence, TextIO

from .acceptor import (
    A_ABORT_TYPE,
    A_ASSOCIATE_AC_TYPE,
    A_ASSOCIATE_RJ_TYPE,
    A_RELEASE_RP_TYPE,
    APPLICATION_CONTEXT,
    C_STORE_RQ,
    C_STORE_RSP,
    P_DATA_TF_TYPE,
    abort_pdu,
    decode_command,
    encode_command,
    p_data_pdu,
)
from .dicom_header import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from .importer import iter_files

log = logging.getLogger(__name__)

MAX_CONTEXTS = 128  # presentation contexts one association can propose (odd IDs 1..255)
DEFAULT_CALLED_AE = "PACS_ANNOTATE"
DEFAULT_CALLING_AE = "STORESCU"
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # DICOMDIR
OUR_MAX_PDU = 65536  # responses are small
UNLIMITED_PDU_CHUNK = 1 << 20  # what we send per PDU when the peer announces no limit

# outcomes, in the order the summary lists them
STORED, REJECTED, FAILED, SKIPPED = "stored", "rejected", "failed", "skipped"
OUTCOMES = (STORED, REJECTED, FAILED, SKIPPED)

# A-ASSOCIATE-RJ reasons (PS3.8 9.3.4), for messages a person can act on
_REJECT_REASONS = {
    (1, 1): "no reason given", (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognised", (1, 7): "called AE title not recognised",
    (2, 1): "no reason given", (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion", (3, 2): "local limit exceeded",
}


class SendError(Exception):
    """The association cannot go on (peer aborted, broke the protocol, timed out)."""


class AssociationRefused(SendError):
    """No association: connection refused or unreachable, or A-ASSOCIATE-RJ."""


# ---------------------------------------------------------------- files


@dataclass(frozen=True)
class Instance:
    """A file that can be sent: its UIDs and where its data set starts."""

    path: str
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    offset: int  # first byte after the File Meta Information
    size: int  # bytes from offset to the end of the file

    @property
    def context(self) -> tuple[str, str]:
        return (self.sop_class_uid, self.transfer_syntax_uid)


@dataclass(frozen=True)
class FileOutcome:
    path: str
    outcome: str  # stored | rejected | failed | skipped
    status: int | None = None
    reason: str = ""
    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    transfer_syntax_uid: str = ""
    repeated: bool = False  # a SOP Instance UID this run had already stored


def inspect_file(path: Path) -> Instance | FileOutcome:
    """What a C-STORE of ``path`` needs, or why the file is skipped.

    A sendable file is a DICOM Part 10 file (preamble, ``DICM``, File Meta Information with a
    Transfer Syntax UID) whose data set has a SOP Class UID and a SOP Instance UID: those go
    in the request and the receiver checks them against the data set."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pynetdicom.dsutils import split_dataset

    text = str(path)
    try:
        with open(path, "rb") as fp:
            head = fp.read(132)
        if len(head) < 132 or head[128:132] != b"DICM":
            return FileOutcome(text, SKIPPED, reason="not a DICOM file (no DICM preamble)")
        meta, offset = split_dataset(path)
        size = path.stat().st_size - offset
    except OSError as exc:
        return FileOutcome(text, SKIPPED, reason=f"unreadable: {exc.strerror or exc}")
    except Exception as exc:  # pydicom's many ways of saying "broken meta"
        return FileOutcome(text, SKIPPED, reason=f"unreadable File Meta Information: {exc}")
    syntax = str(meta.get("TransferSyntaxUID", "") or "").strip()
    if str(meta.get("MediaStorageSOPClassUID", "") or "").strip() == MEDIA_STORAGE_DIRECTORY:
        return FileOutcome(text, SKIPPED, reason="DICOMDIR (a media directory, not an instance)",
                           transfer_syntax_uid=syntax)
    if not syntax:
        return FileOutcome(text, SKIPPED, reason="File Meta Information has no Transfer Syntax UID")
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True,
                             specific_tags=["SOPClassUID", "SOPInstanceUID"])
        sop_class = str(ds.get("SOPClassUID", "") or "").strip()
        sop_instance = str(ds.get("SOPInstanceUID", "") or "").strip()
    except (InvalidDicomError, Exception) as exc:
        return FileOutcome(text, SKIPPED, reason=f"data set unreadable: {exc}",
                           transfer_syntax_uid=syntax)
    if not sop_class or not sop_instance:
        missing = "SOP Class UID" if not sop_class else "SOP Instance UID"
        return FileOutcome(text, SKIPPED, reason=f"no {missing} in the data set",
                           sop_class_uid=sop_class, sop_instance_uid=sop_instance,
                           transfer_syntax_uid=syntax)
    return Instance(text, sop_class, sop_instance, syntax, offset, size)


def plan_associations(contexts: Iterable[tuple[str, str]],
                      limit: int = MAX_CONTEXTS) -> list[list[tuple[str, str]]]:
    """Split the distinct (SOP class, transfer syntax) pairs, in order of first appearance,
    into groups of at most ``limit``: one association each."""
    if limit < 1:
        raise ValueError("limit must be at least 1")
    distinct = list(dict.fromkeys(contexts))
    return [distinct[i:i + limit] for i in range(0, len(distinct), limit)]


# ---------------------------------------------------------------- one association


def _ui(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


@dataclass(frozen=True)
class StoreResponse:
    status: int
    error_comment: str = ""


class Requestor:
    """One association, requested by us; every call is answered before it returns.

    One thread uses one ``Requestor``: the thread that sends a request reads its response,
    so no other reader can take it.  Each response must answer the request just sent (same
    Message ID, SOP Instance UID and presentation context); anything else ends the
    association with ``SendError``."""

    def __init__(self, host: str, port: int, contexts: Sequence[tuple[str, str]], *,
                 calling_ae: str = DEFAULT_CALLING_AE, called_ae: str = DEFAULT_CALLED_AE,
                 timeout: float | None = 60.0, first_message_id: int = 1):
        from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
        from pynetdicom.pdu_primitives import (
            A_ASSOCIATE,
            ImplementationClassUIDNotification,
            ImplementationVersionNameNotification,
            MaximumLengthNotification,
        )
        from pynetdicom.presentation import PresentationContext

        if not 1 <= len(contexts) <= MAX_CONTEXTS:
            raise ValueError(f"between 1 and {MAX_CONTEXTS} presentation contexts, "
                             f"not {len(contexts)}")
        self.peer = f"{host}:{port}"
        self._message_id = (first_message_id - 1) % 65535
        try:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise AssociationRefused(f"cannot connect to {self.peer}: "
                                     f"{exc.strerror or exc}") from None
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        proposed = {}
        primitive = A_ASSOCIATE()
        primitive.application_context_name = APPLICATION_CONTEXT
        primitive.calling_ae_title = calling_ae
        primitive.called_ae_title = called_ae
        definitions = []
        for index, (abstract, syntax) in enumerate(contexts):
            context = PresentationContext()
            context.context_id = 2 * index + 1
            context.abstract_syntax = abstract
            context.transfer_syntax = [syntax]
            definitions.append(context)
            proposed[context.context_id] = (abstract, syntax)
        primitive.presentation_context_definition_list = definitions
        max_length = MaximumLengthNotification()
        max_length.maximum_length_received = OUR_MAX_PDU
        implementation = ImplementationClassUIDNotification()
        implementation.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        primitive.user_information = [max_length, implementation, version]
        rq = A_ASSOCIATE_RQ()
        rq.from_primitive(primitive)
        try:
            self.sock.sendall(rq.encode())
            pdu_type, body = self._read_pdu()
        except (OSError, SendError) as exc:
            self.close()
            raise AssociationRefused(f"{self.peer}: no answer to the association request: "
                                     f"{exc}") from None
        if pdu_type == A_ASSOCIATE_RJ_TYPE and len(body) >= 4:
            self.close()
            result, source, reason = body[1], body[2], body[3]
            kind = "permanently" if result == 1 else "transiently"
            raise AssociationRefused(
                f"{self.peer} rejected the association {kind}: "
                f"{_REJECT_REASONS.get((source, reason), f'source {source}, reason {reason}')}"
                f" (calling AE {calling_ae!r}, called AE {called_ae!r})")
        if pdu_type != A_ASSOCIATE_AC_TYPE:
            self.close()
            raise AssociationRefused(f"{self.peer} answered the association request with PDU "
                                     f"type {pdu_type:#x}")
        ac = A_ASSOCIATE_AC()
        ac.decode(struct.pack(">BBI", pdu_type, 0, len(body)) + body)
        accepted = ac.to_primitive()
        #: (SOP class, transfer syntax) -> presentation context ID, for the accepted ones
        self.accepted: dict[tuple[str, str], int] = {}
        for result in accepted.presentation_context_definition_results_list:
            if result.result == 0 and result.context_id in proposed:
                self.accepted[proposed[result.context_id]] = result.context_id
        self.peer_max_pdu = 0
        for item in accepted.user_information:
            if isinstance(item, MaximumLengthNotification):
                self.peer_max_pdu = item.maximum_length_received or 0
        self.released = False

    # -- socket helpers

    def _recv_exact(self, count: int) -> bytes:
        chunks, remaining = [], count
        while remaining:
            try:
                chunk = self.sock.recv(min(remaining, 1 << 20))
            except socket.timeout:
                raise SendError(f"{self.peer} did not answer in time") from None
            if not chunk:
                raise SendError(f"{self.peer} closed the connection")
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)

    def _read_pdu(self) -> tuple[int, bytes]:
        pdu_type, _, length = struct.unpack(">BBI", self._recv_exact(6))
        if length > max(OUR_MAX_PDU, 1 << 20) + 6:
            raise SendError(f"{self.peer} sent a PDU of {length} bytes")
        body = self._recv_exact(length) if length else b""
        if pdu_type == A_ABORT_TYPE:
            source, reason = (body[2], body[3]) if len(body) >= 4 else (0, 0)
            raise SendError(f"{self.peer} aborted the association (source {source}, "
                            f"reason {reason})")
        return pdu_type, body

    def _next_message_id(self) -> int:
        self._message_id = self._message_id % 65535 + 1
        return self._message_id

    # -- DIMSE

    def store(self, sop_class: str, sop_instance: str, transfer_syntax: str,
              data: bytes | BinaryIO, size: int | None = None) -> StoreResponse:
        """C-STORE the data set ``data`` (bytes, or a file positioned at the data set with
        ``size`` bytes to send) in ``transfer_syntax``; returns the peer's status."""
        context_id = self.accepted.get((sop_class, transfer_syntax))
        if context_id is None:
            raise KeyError((sop_class, transfer_syntax))
        message_id = self._next_message_id()
        command = encode_command([
            (0x0002, _ui(sop_class)),
            (0x0100, struct.pack("<H", C_STORE_RQ)),
            (0x0110, struct.pack("<H", message_id)),
            (0x0700, struct.pack("<H", 0)),  # priority: medium
            (0x0800, struct.pack("<H", 0x0000)),  # a data set follows
            (0x1000, _ui(sop_instance)),
        ])
        step = (self.peer_max_pdu - 6) if self.peer_max_pdu > 6 else UNLIMITED_PDU_CHUNK
        try:
            self.sock.sendall(p_data_pdu(context_id, command))
            if isinstance(data, (bytes, bytearray, memoryview)):
                self._send_dataset(context_id, memoryview(data), len(data), step)
            else:
                self._send_dataset(context_id, data, size or 0, step)
        except socket.timeout:
            raise SendError(f"{self.peer} stopped reading") from None
        except OSError as exc:
            raise SendError(f"{self.peer}: {exc.strerror or exc}") from None
        fields = self._read_response(context_id)
        return self._check_response(fields, message_id, sop_instance)

    def _send_dataset(self, context_id: int, source, size: int, step: int) -> None:
        sent = 0
        while True:
            if isinstance(source, memoryview):
                chunk = source[sent:sent + step]
            else:
                chunk = source.read(min(step, size - sent))
                if len(chunk) < min(step, size - sent):
                    raise OSError(0, "the file got shorter while it was sent")
            sent += len(chunk)
            last = sent >= size
            header = struct.pack(">BBIIBB", P_DATA_TF_TYPE, 0, len(chunk) + 6, len(chunk) + 2,
                                 context_id, 0x02 if last else 0x00)
            self.sock.sendall(header + bytes(chunk) if len(chunk) < 65536 else header)
            if len(chunk) >= 65536:
                self.sock.sendall(chunk)
            if last:
                return

    def _read_response(self, context_id: int) -> dict[int, bytes]:
        command = bytearray()
        while True:
            pdu_type, body = self._read_pdu()
            if pdu_type != P_DATA_TF_TYPE:
                raise SendError(f"{self.peer} sent PDU type {pdu_type:#x} instead of a response")
            pos = 0
            while pos < len(body):
                if pos + 6 > len(body):
                    raise SendError(f"{self.peer} sent a truncated PDV item")
                length, item_context, control = struct.unpack_from(">IBB", body, pos)
                if length < 2 or pos + 4 + length > len(body):
                    raise SendError(f"{self.peer} sent a bad PDV item length")
                if item_context != context_id:
                    raise SendError(f"{self.peer} answered on presentation context "
                                    f"{item_context}, the request went on {context_id}")
                if not control & 0x01:
                    raise SendError(f"{self.peer} sent a data set with a C-STORE response")
                command += body[pos + 6:pos + 4 + length]
                pos += 4 + length
                if control & 0x02:
                    if pos != len(body):
                        raise SendError(f"{self.peer} sent more than one response")
                    try:
                        return decode_command(bytes(command))
                    except Exception as exc:
                        raise SendError(f"{self.peer} sent an undecodable response: "
                                        f"{exc}") from None

    def _check_response(self, fields: dict[int, bytes], message_id: int,
                        sop_instance: str) -> StoreResponse:
        def us(element: int) -> int | None:
            value = fields.get(element)
            return struct.unpack("<H", value)[0] if value is not None and len(value) == 2 else None

        command_field, answered = us(0x0100), us(0x0120)
        if command_field != C_STORE_RSP:
            raise SendError(f"{self.peer} answered a C-STORE with command {command_field!r}")
        if answered != message_id:
            raise SendError(f"{self.peer} answered message {answered} while message "
                            f"{message_id} waited for its response")
        uid = fields.get(0x1000, b"").rstrip(b"\x00 ").decode("ascii", "replace")
        if uid and uid != sop_instance:
            raise SendError(f"{self.peer} answered for SOP instance {uid}, not {sop_instance}")
        status = us(0x0900)
        if status is None:
            raise SendError(f"{self.peer} sent a C-STORE response without a status")
        comment = fields.get(0x0902, b"").rstrip(b"\x00 ").decode("ascii", "replace")
        return StoreResponse(status, comment)

    # -- ending

    def release(self) -> None:
        """A-RELEASE; a response still on its way would show up here as a protocol error."""
        try:
            self.sock.sendall(struct.pack(">BBII", 0x05, 0, 4, 0))
            pdu_type, _ = self._read_pdu()
            if pdu_type != A_RELEASE_RP_TYPE:
                raise SendError(f"{self.peer} sent PDU type {pdu_type:#x} instead of "
                                "A-RELEASE-RP")
            self.released = True
        except OSError as exc:
            raise SendError(f"{self.peer}: {exc.strerror or exc}") from None
        finally:
            self.close()

    def abort(self) -> None:
        try:
            self.sock.sendall(abort_pdu(0x00, 0x00))
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "Requestor":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.release()
        else:
            self.abort()


# ---------------------------------------------------------------- statuses


def is_success(status: int) -> bool:
    """Success or Warning (PS3.7 C, PS3.4 B.2.3): the instance was stored."""
    return status == 0x0000 or status in (0x0001, 0x0107, 0x0116) or (status & 0xF000) == 0xB000


def describe_status(status: int) -> str:
    if status == 0x0000:
        return "Success"
    if is_success(status):
        return "Warning"
    if (status & 0xFF00) == 0xA700:
        return "Refused: out of resources"
    if (status & 0xFF00) == 0xA900:
        return "Error: data set does not match SOP class"
    if (status & 0xF000) == 0xC000:
        return "Error: cannot understand"
    return {0x0110: "Processing failure", 0x0122: "SOP class not supported",
            0x0124: "Not authorized", 0x0211: "Unrecognized operation",
            0x0212: "Mistyped argument"}.get(status, "Failure")


# ---------------------------------------------------------------- a whole folder


@dataclass
class SendReport:
    files: int = 0
    outcomes: Counter = field(default_factory=Counter)
    skip_reasons: Counter = field(default_factory=Counter)
    failure_reasons: Counter = field(default_factory=Counter)
    repeated: int = 0
    associations: int = 0
    seconds: float = 0.0

    def add(self, outcome: FileOutcome) -> None:
        self.files += 1
        self.outcomes[outcome.outcome] += 1
        if outcome.repeated:
            self.repeated += 1
        if outcome.outcome == SKIPPED:
            self.skip_reasons[_reason_kind(outcome.reason)] += 1
        elif outcome.outcome in (REJECTED, FAILED):
            self.failure_reasons[outcome.reason[:100]] += 1

    @property
    def ok(self) -> bool:
        return not (self.outcomes[REJECTED] or self.outcomes[FAILED])

    def summary(self) -> str:
        counts = {name: self.outcomes[name] for name in OUTCOMES}
        rate = (counts[STORED] + counts[REJECTED]) / self.seconds if self.seconds else 0.0
        text = (f"{self.files} files: {counts[STORED]} stored, {counts[REJECTED]} rejected, "
                f"{counts[FAILED]} failed, {counts[SKIPPED]} skipped "
                f"({self.seconds:.1f} s, {rate:.0f} sent/s, {self.associations} associations)")
        if self.repeated:
            text += (f"\n  {self.repeated} of the stored repeat a SOP Instance UID stored "
                     "earlier in this run (the receiver keeps one)")
        for reason, count in self.skip_reasons.most_common():
            text += f"\n  skipped {count} x {reason}"
        for reason, count in self.failure_reasons.most_common(10):
            text += f"\n  {count} x {reason}"
        return text


def _reason_kind(reason: str) -> str:
    """Skip reasons without the per-file detail, for the summary."""
    return reason.split(":", 1)[0]


REPORT_FIELDS = ("path", "outcome", "status", "reason", "sop_class_uid", "sop_instance_uid",
                 "transfer_syntax_uid", "repeated")


class _CsvReport:
    def __init__(self, out: TextIO | None):
        self.writer = csv.writer(out) if out is not None else None
        if self.writer:
            self.writer.writerow(REPORT_FIELDS)

    def write(self, outcome: FileOutcome) -> None:
        if self.writer:
            self.writer.writerow([
                outcome.path, outcome.outcome,
                "" if outcome.status is None else f"0x{outcome.status:04X}", outcome.reason,
                outcome.sop_class_uid, outcome.sop_instance_uid, outcome.transfer_syntax_uid,
                "yes" if outcome.repeated else ""])


@dataclass(frozen=True)
class SendOptions:
    host: str
    port: int
    calling_ae: str = DEFAULT_CALLING_AE
    called_ae: str = DEFAULT_CALLED_AE
    timeout: float | None = 60.0
    batch: int = 2000  # files inspected, grouped and sent at a time
    max_contexts: int = MAX_CONTEXTS


def send_paths(
    paths: Sequence[Path],
    options: SendOptions,
    *,
    report_csv: TextIO | None = None,
    quiet: bool = False,
    on_outcome: Callable[[FileOutcome], None] | None = None,
) -> SendReport:
    """Send every file of ``paths``; one outcome per file.

    A progress bar on stderr when it is a terminal (not with ``quiet``); rejected and failed
    files are logged, one line each (above the bar)."""
    from ..progress import progress

    report = SendReport()
    table = _CsvReport(report_csv)
    stored_uids: set[str] = set()
    started = time.monotonic()
    bar = progress(total=len(paths), desc="send", unit="file", quiet=quiet)
    association: Requestor | None = None
    dead: str | None = None  # why no association can be opened any more

    def record(outcome: FileOutcome) -> None:
        report.add(outcome)
        table.write(outcome)
        if outcome.outcome == REJECTED or (outcome.outcome == FAILED
                                            and not outcome.reason.startswith("not sent:")):
            log.warning("%s: %s: %s", outcome.outcome, outcome.path, outcome.reason)
        if on_outcome is not None:
            on_outcome(outcome)
        bar.update(1)
        if not bar.disable:
            bar.set_postfix({name: report.outcomes[name] for name in OUTCOMES}, refresh=False)

    def sent(instance: Instance, **values) -> FileOutcome:
        return FileOutcome(instance.path, sop_class_uid=instance.sop_class_uid,
                           sop_instance_uid=instance.sop_instance_uid,
                           transfer_syntax_uid=instance.transfer_syntax_uid, **values)

    def open_for(contexts: list[tuple[str, str]]) -> Requestor | None:
        nonlocal dead
        try:
            opened = Requestor(options.host, options.port, contexts,
                               calling_ae=options.calling_ae, called_ae=options.called_ae,
                               timeout=options.timeout)
        except AssociationRefused as exc:
            dead = str(exc)
            log.error("%s", exc)
            return None
        report.associations += 1
        return opened

    try:
        for start in range(0, len(paths), options.batch):
            instances: list[Instance] = []
            for path in paths[start:start + options.batch]:
                found = inspect_file(Path(path))
                if isinstance(found, Instance):
                    instances.append(found)
                else:
                    record(found)
            groups = plan_associations((i.context for i in instances), options.max_contexts)
            for group in groups:
                members = set(group)
                todo = [i for i in instances if i.context in members]
                # the open association serves this group too when it accepted all of it
                if association is not None and not members <= set(association.accepted):
                    _finish(association)
                    association = None
                for instance in todo:
                    if dead is not None:
                        record(sent(instance, outcome=FAILED, reason=f"not sent: {dead}"))
                        continue
                    if association is None:
                        association = open_for(group)
                        if association is None:
                            record(sent(instance, outcome=FAILED, reason=f"not sent: {dead}"))
                            continue
                    if instance.context not in association.accepted:
                        record(sent(instance, outcome=FAILED, reason=(
                            f"{options.host}:{options.port} accepted no presentation context "
                            f"for {instance.sop_class_uid} in {instance.transfer_syntax_uid}")))
                        continue
                    try:
                        with open(instance.path, "rb") as fp:
                            fp.seek(instance.offset)
                            response = association.store(
                                instance.sop_class_uid, instance.sop_instance_uid,
                                instance.transfer_syntax_uid, fp, instance.size)
                    except OSError as exc:  # our own file, before anything was sent
                        association.abort()
                        association = None
                        record(sent(instance, outcome=FAILED,
                                    reason=f"unreadable: {exc.strerror or exc}"))
                        continue
                    except SendError as exc:
                        # the association is gone; the next file opens a new one
                        association.abort()
                        association = None
                        record(sent(instance, outcome=FAILED, reason=str(exc)))
                        continue
                    status = response.status
                    detail = describe_status(status) + (
                        f": {response.error_comment}" if response.error_comment else "")
                    if is_success(status):
                        repeated = instance.sop_instance_uid in stored_uids
                        stored_uids.add(instance.sop_instance_uid)
                        record(sent(instance, outcome=STORED, status=status,
                                    reason="" if status == 0 else detail, repeated=repeated))
                    else:
                        record(sent(instance, outcome=REJECTED, status=status,
                                    reason=f"0x{status:04X} {detail}"))
    finally:
        if association is not None:
            _finish(association)
        bar.close()
    report.seconds = time.monotonic() - started
    return report


def _finish(association: Requestor) -> None:
    try:
        association.release()
    except SendError as exc:
        log.warning("release: %s", exc)


def send_directory(roots: Sequence[Path], options: SendOptions, **kwargs) -> SendReport:
    """``send_paths`` over every file under each of ``roots``."""
    paths = [path for root in roots for path in iter_files(root)]
    return send_paths(paths, options, **kwargs)


def parse_destination(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6-address]:PORT`` for IPv6) -> (host, port); ValueError if not."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port:
        raise ValueError(f"--to wants HOST:PORT, not {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"--to {text!r}: port {port!r} is not a number") from None
    if not 0 < number < 65536:
        raise ValueError(f"--to {text!r}: port {number} is out of range")
    return host, number
