"""The DICOM upper-layer acceptor that carries C-STORE and C-ECHO (PS3.7, PS3.8).

Why not pynetdicom's ``AE.start_server``: its association runs two polling
threads per connection and encodes every command set with pydicom.  A receiver
that does nothing but accept the bytes reached 296 instances/s with one sender
on our CI machine (``benchmarks/ingest/bare_receivers.py``), which leaves less
than 1 ms per instance for the fsync, the header and the commit that the ingest
target needs.  This module keeps pynetdicom for what it does well (decoding the
A-ASSOCIATE-RQ PDU, presentation context negotiation, encoding the A-ASSOCIATE-AC)
and does the steady-state part itself: blocking reads of P-DATA-TF PDUs on one
thread per association, a direct command-set codec, and one call to ``on_store``
per complete dataset.  pynetdicom and dcmtk are the peers in the tests.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_unrestricted

from .dicom_header import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

log = logging.getLogger(__name__)

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"

# PDU types (PS3.8 9.3)
A_ASSOCIATE_RQ_TYPE, A_ASSOCIATE_AC_TYPE, A_ASSOCIATE_RJ_TYPE = 0x01, 0x02, 0x03
P_DATA_TF_TYPE, A_RELEASE_RQ_TYPE, A_RELEASE_RP_TYPE, A_ABORT_TYPE = 0x04, 0x05, 0x06, 0x07

# DIMSE command fields (PS3.7 E.1)
C_STORE_RQ, C_STORE_RSP, C_ECHO_RQ, C_ECHO_RSP, C_CANCEL_RQ = 0x0001, 0x8001, 0x0030, 0x8030, 0x0FFF
NO_DATASET = 0x0101
STATUS_UNRECOGNIZED_OPERATION = 0x0211
STATUS_PROCESSING_FAILURE = 0x0110

# A-ASSOCIATE-RJ (result, source, reason) triples, PS3.8 9.3.4
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_APPLICATION_CONTEXT = (0x01, 0x01, 0x02)
REJECT_BUSY = (0x02, 0x03, 0x02)  # transient, provider (presentation), local limit exceeded
REJECT_TRANSIENT = (0x02, 0x01, 0x01)  # transient, service user, no reason given

# A-ABORT reasons (source 2 = service provider)
ABORT_UNRECOGNIZED_PDU, ABORT_UNEXPECTED_PDU, ABORT_INVALID_PARAMETER = 0x01, 0x02, 0x06

_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)

# larger PDUs than we announced are refused; "unlimited" still has a ceiling
UNLIMITED_PDU_CEILING = 64 * 1024 * 1024


class ProtocolError(Exception):
    """The peer broke the protocol; the association is aborted."""

    def __init__(self, message: str, reason: int = ABORT_UNEXPECTED_PDU):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class StoreRequest:
    """One complete C-STORE-RQ: command values and the dataset bytes as received."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    dataset: bytes
    calling_ae_title: str
    called_ae_title: str
    peer_address: str


StoreHandler = Callable[[StoreRequest], int]


@dataclass(frozen=True)
class DimseRequest:
    """A DIMSE message other than C-STORE/C-ECHO, for a handler in ``services``."""

    command_field: int
    message_id: int
    context_id: int
    transfer_syntax_uid: str
    fields: dict[int, bytes]  # element number (group 0000) -> raw value
    dataset: bytes | None
    calling_ae_title: str
    called_ae_title: str
    peer_address: str


# command field -> handler; it runs on the association's thread and answers through
# ``association.send_message`` (storage commitment: service/ingest/storage_commitment.py)
ServiceHandler = Callable[[DimseRequest, "Association"], None]

# called before each association is accepted: a reason to refuse it (transiently), or None
AdmissionCheck = Callable[[], "str | None"]


@dataclass(frozen=True)
class AcceptorConfig:
    ae_title: str
    max_pdu_size: int = 262144
    allowed_calling_aets: tuple[str, ...] = ()
    network_timeout: float | None = 60.0
    acse_timeout: float | None = 30.0
    max_associations: int = 16
    allowed_networks: tuple[str, ...] = ()

    def address_allowed(self, host: str) -> bool:
        if not self.allowed_networks:
            return True
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in ipaddress.ip_network(n, strict=False) for n in self.allowed_networks)


# ---------------------------------------------------------------- command sets


def _pad_uid(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def encode_command(elements: list[tuple[int, bytes]]) -> bytes:
    """Implicit VR little endian command set with its group length (PS3.7 6.3.1)."""
    body = b"".join(struct.pack("<HHI", 0, element, len(value)) + value
                    for element, value in sorted(elements))
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


def decode_command(data: bytes) -> dict[int, bytes]:
    """Element number -> raw value of a group-0000 implicit VR LE command set."""
    out: dict[int, bytes] = {}
    pos, end = 0, len(data)
    while pos < end:
        if pos + 8 > end:
            raise ProtocolError("truncated command set", ABORT_INVALID_PARAMETER)
        group, element, length = struct.unpack_from("<HHI", data, pos)
        pos += 8
        if group != 0 or pos + length > end:
            raise ProtocolError("malformed command set", ABORT_INVALID_PARAMETER)
        out[element] = data[pos:pos + length]
        pos += length
    return out


def _us(command: dict[int, bytes], element: int) -> int | None:
    value = command.get(element)
    if value is None or len(value) != 2:
        return None
    return struct.unpack("<H", value)[0]


def _ui(command: dict[int, bytes], element: int) -> str:
    return command.get(element, b"").rstrip(b"\x00 ").decode("ascii", "replace")


def response_command(command_field: int, message_id: int, sop_class_uid: str, status: int,
                     sop_instance_uid: str | None = None) -> bytes:
    elements = [
        (0x0002, _pad_uid(sop_class_uid)),
        (0x0100, struct.pack("<H", command_field)),
        (0x0120, struct.pack("<H", message_id)),
        (0x0800, struct.pack("<H", NO_DATASET)),
        (0x0900, struct.pack("<H", status)),
    ]
    if sop_instance_uid:
        elements.append((0x1000, _pad_uid(sop_instance_uid)))
    return encode_command(elements)


def p_data_pdu(context_id: int, command: bytes) -> bytes:
    """One P-DATA-TF carrying a whole command set as the last command fragment."""
    item = struct.pack(">IBB", len(command) + 2, context_id, 0x03) + command
    return struct.pack(">BBI", P_DATA_TF_TYPE, 0, len(item)) + item


def reject_pdu(result: int, source: int, reason: int) -> bytes:
    return struct.pack(">BBIBBBB", A_ASSOCIATE_RJ_TYPE, 0, 4, 0, result, source, reason)


def abort_pdu(source: int = 0x02, reason: int = 0x00) -> bytes:
    return struct.pack(">BBIBBBB", A_ABORT_TYPE, 0, 4, 0, 0, source, reason)


RELEASE_RP = struct.pack(">BBII", A_RELEASE_RP_TYPE, 0, 4, 0)


# ---------------------------------------------------------------- one association


@dataclass
class _Message:
    context_id: int
    command: bytearray = field(default_factory=bytearray)
    command_done: bool = False
    fields: dict[int, bytes] = field(default_factory=dict)
    dataset_parts: list[bytes] = field(default_factory=list)


class Association:
    """Serves one connection from A-ASSOCIATE-RQ to release or abort."""

    def __init__(self, sock: socket.socket, address: tuple, config: AcceptorConfig,
                 on_store: StoreHandler, busy: bool = False,
                 admission: AdmissionCheck | None = None,
                 services: dict[int, ServiceHandler] | None = None,
                 service_syntaxes: tuple[str, ...] = ()):
        self.sock = sock
        self.services = services or {}
        self.service_syntaxes = service_syntaxes  # non-storage SOP classes ``services`` serve
        self.peer_max_pdu = 0  # the requestor's maximum PDU length, 0 = unlimited
        self.address = f"{address[0]}:{address[1]}" if address else "?"
        self.config = config
        self.on_store = on_store
        self.busy = busy
        self.admission = admission
        self.calling_ae = ""
        self.called_ae = ""
        self.contexts: dict[int, PresentationContext] = {}
        self.max_pdu = config.max_pdu_size or UNLIMITED_PDU_CEILING
        self._quickack = _TCP_QUICKACK is not None and not isinstance(sock, ssl.SSLSocket)

    # -- socket helpers

    def _recv_exact(self, count: int) -> bytes:
        chunks, remaining = [], count
        while remaining:
            chunk = self.sock.recv(min(remaining, 1 << 20))
            if not chunk:
                raise ConnectionError("peer closed the connection")
            chunks.append(chunk)
            remaining -= len(chunk)
            if self._quickack:
                # Senders that leave Nagle's algorithm on (dcmtk without TCP_NODELAY=1,
                # pynetdicom) hold back a PDU's tail until we ACK; Linux delays that
                # ACK by up to 40 ms unless asked again after every read.
                try:
                    self.sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
                except OSError:
                    self._quickack = False
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _read_pdu(self, limit: int) -> tuple[int, bytes]:
        header = self._recv_exact(6)
        pdu_type, _, length = struct.unpack(">BBI", header)
        if length > limit:
            raise ProtocolError(f"PDU of {length} bytes exceeds {limit}", ABORT_INVALID_PARAMETER)
        return pdu_type, self._recv_exact(length) if length else b""

    # -- lifecycle

    def run(self) -> None:
        try:
            self.sock.settimeout(self.config.acse_timeout)
            if not self._associate():
                return
            self.sock.settimeout(self.config.network_timeout)
            self._serve()
        except ProtocolError as exc:
            log.warning("association aborted: %s", exc,
                        extra={"calling_ae": self.calling_ae, "address": self.address})
            self._send_quietly(abort_pdu(0x02, exc.reason))
        except socket.timeout:
            log.warning("association timed out", extra={"calling_ae": self.calling_ae,
                                                        "address": self.address})
            self._send_quietly(abort_pdu(0x02, 0x00))
        except (ConnectionError, OSError) as exc:
            log.info("connection closed: %s", exc,
                     extra={"calling_ae": self.calling_ae, "address": self.address})
        finally:
            try:
                self.sock.close()
            except OSError:
                pass

    def _send_quietly(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError:
            pass

    def _associate(self) -> bool:
        pdu_type, body = self._read_pdu(1 << 20)
        if pdu_type != A_ASSOCIATE_RQ_TYPE:
            raise ProtocolError(f"expected A-ASSOCIATE-RQ, got PDU type {pdu_type:#x}",
                                ABORT_UNEXPECTED_PDU)
        rq = A_ASSOCIATE_RQ()
        try:
            rq.decode(struct.pack(">BBI", pdu_type, 0, len(body)) + body)
            primitive = rq.to_primitive()
        except Exception as exc:
            raise ProtocolError(f"undecodable A-ASSOCIATE-RQ: {exc}", ABORT_INVALID_PARAMETER)
        self.calling_ae = str(primitive.calling_ae_title or "").strip()
        self.called_ae = str(primitive.called_ae_title or "").strip()
        reject, reason = None, ""
        if str(primitive.application_context_name) != APPLICATION_CONTEXT:
            reject, reason = REJECT_APPLICATION_CONTEXT, "application context not supported"
        elif self.config.allowed_calling_aets and self.calling_ae not in self.config.allowed_calling_aets:
            reject, reason = REJECT_CALLING_AE, "calling AE title not allowed"
        elif self.busy:
            reject, reason = REJECT_BUSY, "too many associations"
        elif self.admission is not None and (refusal := self.admission()):
            reject, reason = REJECT_TRANSIENT, refusal
        if reject is not None:
            log.warning("association rejected", extra={
                "calling_ae": self.calling_ae, "address": self.address, "reason": reason})
            self.sock.sendall(reject_pdu(*reject))
            self._wait_for_close()
            return False

        roles: dict = {}
        async_requested = False
        for item in primitive.user_information:
            if isinstance(item, MaximumLengthNotification):
                self.peer_max_pdu = item.maximum_length_received or 0
            elif isinstance(item, SCP_SCU_RoleSelectionNegotiation):
                roles[item.sop_class_uid] = (item.scu_role, item.scp_role)
            elif isinstance(item, AsynchronousOperationsWindowNegotiation):
                async_requested = True
        verification = PresentationContext()
        verification.abstract_syntax = VERIFICATION
        verification.transfer_syntax = ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"]
        supported = [verification]
        for syntax in self.service_syntaxes:
            context = PresentationContext()
            context.abstract_syntax = syntax
            context.transfer_syntax = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]
            context.scu_role = context.scp_role = True
            supported.append(context)
        results, role_replies = negotiate_unrestricted(
            primitive.presentation_context_definition_list, supported, roles or None)
        self.contexts = {cx.context_id: cx for cx in results if cx.result == 0x00}

        ac = A_ASSOCIATE()
        ac.application_context_name = APPLICATION_CONTEXT
        ac.calling_ae_title = primitive.calling_ae_title
        ac.called_ae_title = primitive.called_ae_title
        ac.result = 0x00
        ac.result_source = 0x01
        ac.presentation_context_definition_results_list = results
        max_length = MaximumLengthNotification()
        max_length.maximum_length_received = self.config.max_pdu_size
        implementation = ImplementationClassUIDNotification()
        implementation.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        user_information = [max_length, implementation, version, *role_replies]
        if async_requested:
            window = AsynchronousOperationsWindowNegotiation()
            window.maximum_number_operations_invoked = 1
            window.maximum_number_operations_performed = 1
            user_information.append(window)
        ac.user_information = user_information
        pdu = A_ASSOCIATE_AC()
        pdu.from_primitive(ac)
        self.sock.sendall(pdu.encode())
        log.info("association accepted", extra={
            "calling_ae": self.calling_ae, "address": self.address,
            "contexts": len(self.contexts)})
        return True

    def _wait_for_close(self) -> None:
        # give the requestor a moment to read the rejection and close first
        try:
            self.sock.settimeout(2.0)
            self.sock.recv(1)
        except OSError:
            pass

    def _serve(self) -> None:
        message: _Message | None = None
        while True:
            pdu_type, body = self._read_pdu(self.max_pdu)
            if pdu_type == P_DATA_TF_TYPE:
                message = self._p_data(body, message)
            elif pdu_type == A_RELEASE_RQ_TYPE:
                self.sock.sendall(RELEASE_RP)
                log.info("association released", extra={"calling_ae": self.calling_ae,
                                                         "address": self.address})
                self._wait_for_close()
                return
            elif pdu_type == A_ABORT_TYPE:
                log.info("association aborted by peer", extra={"calling_ae": self.calling_ae,
                                                               "address": self.address})
                return
            elif pdu_type in (A_ASSOCIATE_RQ_TYPE, A_ASSOCIATE_AC_TYPE, A_ASSOCIATE_RJ_TYPE,
                              A_RELEASE_RP_TYPE):
                raise ProtocolError(f"unexpected PDU type {pdu_type:#x}", ABORT_UNEXPECTED_PDU)
            else:
                raise ProtocolError(f"unrecognised PDU type {pdu_type:#x}", ABORT_UNRECOGNIZED_PDU)

    def _p_data(self, body: bytes, message: _Message | None) -> _Message | None:
        view = memoryview(body)
        pos, end = 0, len(body)
        while pos < end:
            if pos + 6 > end:
                raise ProtocolError("truncated PDV item", ABORT_INVALID_PARAMETER)
            item_length, context_id, control = struct.unpack_from(">IBB", view, pos)
            if item_length < 2 or pos + 4 + item_length > end:
                raise ProtocolError("bad PDV item length", ABORT_INVALID_PARAMETER)
            fragment = view[pos + 6:pos + 4 + item_length]
            pos += 4 + item_length
            if context_id not in self.contexts:
                raise ProtocolError(f"PDV for presentation context {context_id} that was not "
                                    "accepted", ABORT_INVALID_PARAMETER)
            if message is None:
                if not control & 0x01:
                    raise ProtocolError("dataset fragment before its command",
                                        ABORT_UNEXPECTED_PDU)
                message = _Message(context_id)
            elif context_id != message.context_id:
                raise ProtocolError("fragments of one message on two contexts",
                                    ABORT_INVALID_PARAMETER)
            if control & 0x01:
                if message.command_done:
                    raise ProtocolError("command fragment after the command ended",
                                        ABORT_UNEXPECTED_PDU)
                message.command += fragment
                if control & 0x02:
                    message.command_done = True
                    message.fields = decode_command(bytes(message.command))
                    if _us(message.fields, 0x0800) == NO_DATASET:
                        self._dispatch(message, None)
                        message = None
            else:
                if not message.command_done:
                    raise ProtocolError("dataset fragment inside a command", ABORT_UNEXPECTED_PDU)
                message.dataset_parts.append(bytes(fragment))
                if control & 0x02:
                    dataset = (message.dataset_parts[0] if len(message.dataset_parts) == 1
                               else b"".join(message.dataset_parts))
                    self._dispatch(message, dataset)
                    message = None
        return message

    def _dispatch(self, message: _Message, dataset: bytes | None) -> None:
        fields = message.fields
        command_field = _us(fields, 0x0100)
        # a response (to a request a service handler sent) carries MessageIDBeingRespondedTo
        message_id = _us(fields, 0x0120 if (command_field or 0) & 0x8000 else 0x0110)
        if command_field is None or message_id is None:
            raise ProtocolError("command set without CommandField or MessageID",
                                ABORT_INVALID_PARAMETER)
        context = self.contexts[message.context_id]
        sop_class = _ui(fields, 0x0002)
        if command_field == C_ECHO_RQ:
            self._respond(message.context_id, C_ECHO_RSP, message_id, sop_class, 0x0000)
        elif command_field == C_STORE_RQ:
            sop_instance = _ui(fields, 0x1000)
            if dataset is None:
                status = STATUS_PROCESSING_FAILURE
                log.warning("rejected instance %s from %s: C-STORE request without a data set",
                            sop_instance or "(no SOP Instance UID)", self.calling_ae or "-",
                            extra={"status": f"0x{status:04X}", "calling_ae": self.calling_ae,
                                   "sop_instance_uid": sop_instance})
            else:
                request = StoreRequest(
                    sop_class_uid=sop_class,
                    sop_instance_uid=sop_instance,
                    transfer_syntax_uid=str(context.transfer_syntax[0]),
                    dataset=dataset,
                    calling_ae_title=self.calling_ae,
                    called_ae_title=self.called_ae,
                    peer_address=self.address,
                )
                try:
                    status = self.on_store(request)
                except Exception:
                    log.exception("store handler failed for instance %s from %s", sop_instance,
                                  self.calling_ae or "-",
                                  extra={"sop_instance_uid": sop_instance,
                                         "calling_ae": self.calling_ae})
                    status = STATUS_PROCESSING_FAILURE
            self._respond(message.context_id, C_STORE_RSP, message_id, sop_class, status,
                          sop_instance)
        elif command_field == C_CANCEL_RQ:
            return
        elif (service := self.services.get(command_field)) is not None:
            service(DimseRequest(command_field, message_id, message.context_id,
                                 str(context.transfer_syntax[0]), fields, dataset,
                                 self.calling_ae, self.called_ae, self.address), self)
        else:
            self._respond(message.context_id, command_field | 0x8000, message_id, sop_class,
                          STATUS_UNRECOGNIZED_OPERATION)

    def _respond(self, context_id: int, command_field: int, message_id: int, sop_class: str,
                 status: int, sop_instance: str | None = None) -> None:
        self.sock.sendall(p_data_pdu(context_id, response_command(
            command_field, message_id, sop_class, status, sop_instance)))

    def send_message(self, context_id: int, command: bytes, dataset: bytes | None = None) -> None:
        """Send a command set and its dataset, in P-DATA-TF PDUs no larger than the peer's
        maximum (for a handler in ``services``)."""
        self.sock.sendall(p_data_pdu(context_id, command))
        if dataset is None:
            return
        # PDU header 6 + PDV item header 6
        step = (self.peer_max_pdu - 12) if self.peer_max_pdu > 12 else len(dataset) or 1
        for start in range(0, max(len(dataset), 1), step):
            fragment = dataset[start:start + step]
            last = 0x02 if start + step >= len(dataset) else 0x00
            item = struct.pack(">IBB", len(fragment) + 2, context_id, last) + fragment
            self.sock.sendall(struct.pack(">BBI", P_DATA_TF_TYPE, 0, len(item)) + item)


# ---------------------------------------------------------------- server


class DicomServer:
    """Accepts connections on one port and serves each association on its own thread."""

    def __init__(self, address: tuple[str, int], config: AcceptorConfig, on_store: StoreHandler,
                 *, reuse_port: bool = False, ssl_context: ssl.SSLContext | None = None,
                 admission: AdmissionCheck | None = None,
                 services: dict[int, ServiceHandler] | None = None,
                 service_syntaxes: tuple[str, ...] = ()):
        self.config = config
        self.services = services
        self.service_syntaxes = service_syntaxes
        self.on_store = on_store
        self.admission = admission
        self.ssl_context = ssl_context
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port and hasattr(socket, "SO_REUSEPORT"):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self.socket.bind(address)
        self.socket.listen(128)
        self.address = self.socket.getsockname()
        self._active = 0
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.address[1]

    def start(self) -> "DicomServer":
        self._thread = threading.Thread(target=self._accept_loop, name="dicom-accept", daemon=True)
        self._thread.start()
        return self

    def _accept_loop(self) -> None:
        self.socket.settimeout(0.5)
        while not self._stopped.is_set():
            try:
                conn, address = self.socket.accept()
            except socket.timeout:
                continue
            except OSError:
                if self._stopped.is_set():
                    return
                raise
            if not self.config.address_allowed(address[0]):
                # before any DICOM byte: nothing from an unknown network is parsed
                log.warning("connection refused: address not in allowed_networks",
                            extra={"address": address[0]})
                conn.close()
                continue
            conn.settimeout(None)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve_connection, args=(conn, address),
                             name=f"association-{address[0]}:{address[1]}", daemon=True).start()

    def _serve_connection(self, conn: socket.socket, address: tuple) -> None:
        with self._lock:
            busy = self._active >= self.config.max_associations
            self._active += 1
            self._connections.add(conn)
        try:
            if self.ssl_context is not None:
                try:
                    conn.settimeout(self.config.acse_timeout)
                    conn = self.ssl_context.wrap_socket(conn, server_side=True)
                except (ssl.SSLError, OSError) as exc:
                    log.warning("TLS handshake failed: %s", exc, extra={"address": address[0]})
                    conn.close()
                    return
            Association(conn, address, self.config, self.on_store, busy=busy,
                        admission=self.admission, services=self.services,
                        service_syntaxes=self.service_syntaxes).run()
        finally:
            with self._lock:
                self._active -= 1
                self._connections.discard(conn)

    def shutdown(self, grace: float = 30.0) -> None:
        """Stop accepting; end open associations once their current store is answered."""
        self._stopped.set()
        try:
            self.socket.close()
        except OSError:
            pass
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                # reads end (the association's loop sees EOF); a store being handled
                # still gets its answer sent
                conn.shutdown(socket.SHUT_RD)
            except OSError:
                pass
        deadline = time.monotonic() + grace
        while self._active and time.monotonic() < deadline:
            time.sleep(0.05)
