"""Test peers: a few helpers over pynetdicom's SCU, and a raw SCU that can send
what pynetdicom would refuse to encode (garbage datasets, broken PDUs)."""

from __future__ import annotations

import socket
import struct
from io import BytesIO

import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification

from service.ingest.acceptor import C_STORE_RQ, encode_command, p_data_pdu

CT_SMALL = get_testdata_file("CT_small.dcm")
MR_SMALL = get_testdata_file("MR_small.dcm")


def make_ct(study: str | None = None, series: str | None = None, sop: str | None = None,
            patient_id: str = "PAT1") -> Dataset:
    ds = pydicom.dcmread(CT_SMALL)
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = series or generate_uid()
    ds.SOPInstanceUID = sop or generate_uid()
    ds.PatientID = patient_id
    return ds


def scu_ae(calling: str = "TESTSCU") -> AE:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    ae.add_requested_context(MRImageStorage, [ExplicitVRLittleEndian])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    return ae


def associate(port: int, calling: str = "TESTSCU", called: str = "PACS_TEST"):
    return scu_ae(calling).associate("127.0.0.1", port, ae_title=called)


class RawAssociation:
    """A requestor that speaks the upper layer by hand (built on pynetdicom's PDU codecs)."""

    def __init__(self, port: int, *, calling: str = "RAWSCU", called: str = "PACS_TEST",
                 abstract_syntax: str = CTImageStorage,
                 transfer_syntax: str = ExplicitVRLittleEndian):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        primitive = A_ASSOCIATE()
        primitive.application_context_name = "1.2.840.10008.3.1.1.1"
        primitive.calling_ae_title = calling
        primitive.called_ae_title = called
        context = PresentationContext()
        context.context_id = 1
        context.abstract_syntax = abstract_syntax
        context.transfer_syntax = [transfer_syntax]
        primitive.presentation_context_definition_list = [context]
        max_length = MaximumLengthNotification()
        max_length.maximum_length_received = 16384
        implementation = ImplementationClassUIDNotification()
        implementation.implementation_class_uid = "1.2.3.4"
        primitive.user_information = [max_length, implementation]
        pdu = A_ASSOCIATE_RQ()
        pdu.from_primitive(primitive)
        self.sock.sendall(pdu.encode())
        self.response_type, body = self.read_pdu()
        self.accepted = False
        self.peer_max_pdu = 16384
        if self.response_type == 0x02:
            ac = A_ASSOCIATE_AC()
            ac.decode(struct.pack(">BBI", 2, 0, len(body)) + body)
            accepted = ac.to_primitive()
            results = accepted.presentation_context_definition_results_list
            self.accepted = any(cx.result == 0 for cx in results)
            for item in accepted.user_information:
                if isinstance(item, MaximumLengthNotification):
                    self.peer_max_pdu = item.maximum_length_received or (1 << 30)
        self._message_id = 0

    def read_pdu(self) -> tuple[int, bytes]:
        header = self._recv(6)
        pdu_type, _, length = struct.unpack(">BBI", header)
        return pdu_type, self._recv(length)

    def _recv(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = self.sock.recv(count - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    def store_bytes(self, dataset: bytes, *, sop_class: str = CTImageStorage,
                    sop_instance: str = "1.2.3.4.5") -> int:
        """Send ``dataset`` as the C-STORE data set; returns the response status."""
        self._message_id += 1
        pad = lambda uid: uid.encode() + (b"\x00" if len(uid) % 2 else b"")  # noqa: E731
        command = encode_command([
            (0x0002, pad(sop_class)),
            (0x0100, struct.pack("<H", C_STORE_RQ)),
            (0x0110, struct.pack("<H", self._message_id)),
            (0x0700, struct.pack("<H", 0)),
            (0x0800, struct.pack("<H", 0x0000)),
            (0x1000, pad(sop_instance)),
        ])
        self.sock.sendall(p_data_pdu(1, command))
        # fragments that respect the maximum PDU length the acceptor announced
        step = self.peer_max_pdu - 6
        chunks = [dataset[i:i + step] for i in range(0, len(dataset), step)] or [b""]
        for index, chunk in enumerate(chunks):
            control = 0x02 if index == len(chunks) - 1 else 0x00
            item = struct.pack(">IBB", len(chunk) + 2, 1, control) + chunk
            self.sock.sendall(struct.pack(">BBI", 0x04, 0, len(item)) + item)
        pdu_type, body = self.read_pdu()
        if pdu_type != 0x04:
            raise ConnectionError(f"PDU type {pdu_type:#x} instead of a response")
        # PDV header (6 bytes), then the command set; Status is (0000,0900)
        fields = body[6:]
        pos = 0
        while pos < len(fields):
            _, element, length = struct.unpack_from("<HHI", fields, pos)
            if element == 0x0900:
                return struct.unpack_from("<H", fields, pos + 8)[0]
            pos += 8 + length
        raise AssertionError("no status in response")

    def release(self) -> None:
        self.sock.sendall(struct.pack(">BBII", 0x05, 0, 4, 0))
        try:
            self.read_pdu()
        finally:
            self.sock.close()


def encode_dataset(ds: Dataset) -> bytes:
    """The data set alone (no preamble or meta), explicit VR little endian."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = False
    write_dataset(buffer, ds)
    return buffer.getvalue()


def ingest_datasets(engine, storage, datasets) -> None:
    """Store datasets through the ingest path without a network (as ``import`` does)."""
    from service.ingest.ingestor import Ingestor
    from service.ingest.storage import FileStore

    with Ingestor(engine, FileStore(storage)) as ingestor:
        for ds in datasets:
            buffer = BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            assert ingestor.ingest(buffer.getvalue()).result == "stored"
