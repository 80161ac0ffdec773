"""Storage Commitment Push Model SCP: real requesters over real associations
(pynetdicom's SCU, and Orthanc 1.10 where its Debian package is installed)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, StorageCommitmentPushModel

from service.ingest.storage_commitment import (
    EVENT_ALL_COMMITTED,
    EVENT_FAILURES_EXIST,
    REASON_CLASS_INSTANCE_CONFLICT,
    REASON_NO_SUCH_OBJECT,
    SOP_INSTANCE,
    STATUS_INVALID_ARGUMENT,
    STATUS_NO_SUCH_ACTION,
)

from .dicom_client import associate, encode_dataset, make_ct

WAIT = 30


def store(port: int, count: int) -> list[Dataset]:
    datasets = [make_ct() for _ in range(count)]
    assoc = associate(port)
    assert assoc.is_established
    for ds in datasets:
        assert assoc.send_c_store(ds).Status == 0x0000
    assoc.release()
    return datasets


def action_information(transaction_uid: str, references: list[tuple[str, str]]) -> Dataset:
    info = Dataset()
    info.TransactionUID = transaction_uid
    items = []
    for sop_class, sop_instance in references:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        items.append(item)
    info.ReferencedSOPSequence = items
    return info


class Reports:
    """Collects N-EVENT-REPORTs a requester receives (on any association)."""

    def __init__(self):
        self.received: list[tuple[int, Dataset, str]] = []
        self.arrived = threading.Event()

    def handle(self, event):
        self.received.append((event.event_type, event.event_information,
                              event.assoc.requestor.ae_title if event.assoc.is_acceptor
                              else "same association"))
        self.arrived.set()
        return 0x0000, None

    def wait(self) -> tuple[int, Dataset, str]:
        assert self.arrived.wait(WAIT), "no N-EVENT-REPORT arrived"
        return self.received[0]


def requester(calling: str = "TESTSCU") -> AE:
    ae = AE(ae_title=calling)
    ae.add_requested_context(StorageCommitmentPushModel,
                             [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = WAIT
    return ae


def references(stored: list[Dataset]) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """Stored + stored-under-another-class + missing references, and the failures expected."""
    good, conflicting = stored
    missing = generate_uid()
    refs = [(CTImageStorage, good.SOPInstanceUID),
            (MRImageStorage, conflicting.SOPInstanceUID),
            (CTImageStorage, missing)]
    return refs, {conflicting.SOPInstanceUID: REASON_CLASS_INSTANCE_CONFLICT,
                  missing: REASON_NO_SUCH_OBJECT}


def check_report(report: Dataset, transaction_uid: str, committed: list[str],
                 failed: dict[str, int]) -> None:
    assert report.TransactionUID == transaction_uid
    assert [item.ReferencedSOPInstanceUID for item in report.get("ReferencedSOPSequence", [])] \
        == committed
    assert {item.ReferencedSOPInstanceUID: item.FailureReason
            for item in report.get("FailedSOPSequence", [])} == failed


def test_report_on_the_same_association_answers_each_instance(service):
    stored = store(service.port, 2)
    refs, failures = references(stored)
    reports = Reports()
    transaction = generate_uid()
    assoc = requester().associate("127.0.0.1", service.port, ae_title="PACS_TEST",
                                  evt_handlers=[(evt.EVT_N_EVENT_REPORT, reports.handle)])
    assert assoc.is_established
    status, _ = assoc.send_n_action(action_information(transaction, refs), 1,
                                    StorageCommitmentPushModel, SOP_INSTANCE)
    assert status.Status == 0x0000
    event_type, report, via = reports.wait()
    assoc.release()
    assert via == "same association"
    assert event_type == EVENT_FAILURES_EXIST
    check_report(report, transaction, [stored[0].SOPInstanceUID], failures)


def test_everything_committed_is_event_type_1_without_a_failed_list(service):
    stored = store(service.port, 3)
    reports = Reports()
    transaction = generate_uid()
    assoc = requester().associate("127.0.0.1", service.port, ae_title="PACS_TEST",
                                  evt_handlers=[(evt.EVT_N_EVENT_REPORT, reports.handle)])
    status, _ = assoc.send_n_action(
        action_information(transaction, [(CTImageStorage, ds.SOPInstanceUID) for ds in stored]),
        1, StorageCommitmentPushModel, SOP_INSTANCE)
    assert status.Status == 0x0000
    event_type, report, _ = reports.wait()
    assoc.release()
    assert event_type == EVENT_ALL_COMMITTED
    assert "FailedSOPSequence" not in report
    check_report(report, transaction, [ds.SOPInstanceUID for ds in stored], {})


def test_a_large_report_is_split_into_the_requesters_pdus(service):
    """4,000 references (about 400 kB of report) through a requester that takes 16 kB PDUs."""
    stored = store(service.port, 2)
    refs = [(CTImageStorage, ds.SOPInstanceUID) for ds in stored]
    missing = [generate_uid() for _ in range(4000)]
    refs += [(CTImageStorage, uid) for uid in missing]
    reports = Reports()
    ae = requester()
    ae.maximum_pdu_size = 16384
    assoc = ae.associate("127.0.0.1", service.port, ae_title="PACS_TEST",
                         evt_handlers=[(evt.EVT_N_EVENT_REPORT, reports.handle)])
    transaction = generate_uid()
    status, _ = assoc.send_n_action(action_information(transaction, refs), 1,
                                    StorageCommitmentPushModel, SOP_INSTANCE)
    assert status.Status == 0x0000
    event_type, report, _ = reports.wait()
    assoc.release()
    assert event_type == EVENT_FAILURES_EXIST
    check_report(report, transaction, [ds.SOPInstanceUID for ds in stored],
                 {uid: REASON_NO_SUCH_OBJECT for uid in missing})


def test_report_on_a_new_association_to_a_configured_peer(service_factory):
    """A requester in storage_commitment_peers closes its association after the N-ACTION-RSP
    and gets the report on an association we open to its listening AE."""
    reports = Reports()
    listener = requester("TESTSCU")
    listener.add_supported_context(StorageCommitmentPushModel,
                                   [ExplicitVRLittleEndian, ImplicitVRLittleEndian],
                                   scu_role=True, scp_role=True)
    server = listener.start_server(("127.0.0.1", 0), block=False,
                                   evt_handlers=[(evt.EVT_N_EVENT_REPORT, reports.handle)])
    try:
        port = server.server_address[1]
        service = service_factory(storage_commitment_peers=(f"TESTSCU=127.0.0.1:{port}",))
        stored = store(service.port, 2)
        refs, failures = references(stored)
        transaction = generate_uid()
        assoc = requester("TESTSCU").associate("127.0.0.1", service.port, ae_title="PACS_TEST")
        status, _ = assoc.send_n_action(action_information(transaction, refs), 1,
                                        StorageCommitmentPushModel, SOP_INSTANCE)
        assoc.release()
        assert status.Status == 0x0000
        event_type, report, via = reports.wait()
    finally:
        server.shutdown()
    assert via == "PACS_TEST"  # our AE title, on the association we requested
    assert event_type == EVENT_FAILURES_EXIST
    check_report(report, transaction, [stored[0].SOPInstanceUID], failures)


def test_a_report_is_retried_until_the_peer_listens(engine, settings, tmp_path):
    """The peer is down when the report is due; it gets it once it listens."""
    from service.ingest.acceptor import DicomServer
    from service.ingest.scp import acceptor_config, handle_store
    from service.ingest.storage_commitment import Peer, StorageCommitmentSCP

    with socket.socket() as probe:  # a port nobody listens on, yet
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    commitment = StorageCommitmentSCP(engine, "PACS_TEST",
                                      {"TESTSCU": Peer("TESTSCU", "127.0.0.1", port)},
                                      attempts=50, retry_seconds=0.2, timeout=10)
    server = DicomServer(("127.0.0.1", 0), acceptor_config(settings),
                         lambda request: handle_store(request, None),
                         services=commitment.services,
                         service_syntaxes=(StorageCommitmentPushModel,)).start()
    reports = Reports()
    listener = requester("TESTSCU")
    listener.add_supported_context(StorageCommitmentPushModel,
                                   [ExplicitVRLittleEndian, ImplicitVRLittleEndian],
                                   scu_role=True, scp_role=True)
    peer_server = None
    try:
        assoc = requester("TESTSCU").associate("127.0.0.1", server.port, ae_title="PACS_TEST")
        status, _ = assoc.send_n_action(
            action_information(generate_uid(), [(CTImageStorage, generate_uid())]), 1,
            StorageCommitmentPushModel, SOP_INSTANCE)
        assoc.release()
        assert status.Status == 0x0000
        time.sleep(0.5)  # at least one attempt fails: nobody listens
        assert not reports.arrived.is_set()
        peer_server = listener.start_server(
            ("127.0.0.1", port), block=False,
            evt_handlers=[(evt.EVT_N_EVENT_REPORT, reports.handle)])
        event_type, report, _ = reports.wait()
    finally:
        if peer_server is not None:
            peer_server.shutdown()
        server.shutdown()
        commitment.close()
    assert event_type == EVENT_FAILURES_EXIST
    assert report.FailedSOPSequence[0].FailureReason == REASON_NO_SUCH_OBJECT


@pytest.mark.parametrize("action_type, information, expected", [
    (1, None, STATUS_INVALID_ARGUMENT),
    (1, "no transaction", STATUS_INVALID_ARGUMENT),
    (2, "good", STATUS_NO_SUCH_ACTION),
])
def test_a_malformed_request_is_refused_in_the_n_action_response(service, action_type,
                                                               information, expected):
    if information is None:
        dataset = Dataset()
        dataset.PatientID = "x"  # no Transaction UID, no references
    elif information == "no transaction":
        dataset = action_information("", [(CTImageStorage, generate_uid())])
        del dataset.TransactionUID
    else:
        dataset = action_information(generate_uid(), [(CTImageStorage, generate_uid())])
    reports = Reports()
    assoc = requester().associate("127.0.0.1", service.port, ae_title="PACS_TEST",
                                  evt_handlers=[(evt.EVT_N_EVENT_REPORT, reports.handle)])
    status, _ = assoc.send_n_action(dataset, action_type, StorageCommitmentPushModel,
                                    SOP_INSTANCE)
    assert status.Status == expected
    # the association goes on: a store after the refusal still works
    assoc.release()
    assert not reports.arrived.is_set()
    store(service.port, 1)


# ---------------------------------------------------------------- Orthanc as the requester

ORTHANC = shutil.which("Orthanc")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _http(method: str, url: str, body: bytes | None = None) -> dict | list | str:
    request = urllib.request.Request(url, data=body, method=method)
    with urllib.request.urlopen(request, timeout=WAIT) as response:
        data = response.read()
    try:
        return json.loads(data)
    except ValueError:
        return data.decode()


@pytest.mark.skipif(ORTHANC is None, reason="Orthanc is not installed "
                    "(Debian: apt-get install orthanc; 1.10 in bookworm)")
def test_orthanc_store_job_with_storage_commitment(service_factory, tmp_path: Path):
    """Orthanc sends instances with a store job whose "StorageCommitment" is true and
    reads our report on an association of its own: it must report Success."""
    http_port, dicom_port = _free_port(), _free_port()
    service = service_factory(storage_commitment_peers=(f"ORTHANC=127.0.0.1:{dicom_port}",))
    config = {
        "Name": "test", "StorageDirectory": str(tmp_path / "orthanc-db"),
        "IndexDirectory": str(tmp_path / "orthanc-db"), "HttpPort": http_port,
        "DicomPort": dicom_port, "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
        # 1.10 has no HTTP bind address: RemoteAccessAllowed false refuses other hosts
        "AuthenticationEnabled": False,
        "Plugins": [], "DicomModalities": {
            "archive": {"AET": "PACS_TEST", "Host": "127.0.0.1", "Port": service.port}},
    }
    (tmp_path / "orthanc.json").write_text(json.dumps(config))
    log = (tmp_path / "orthanc.log").open("w")
    process = subprocess.Popen([ORTHANC, str(tmp_path / "orthanc.json")], stdout=log,
                               stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + WAIT
        while True:
            try:
                _http("GET", f"{base}/system")
                break
            except OSError:
                assert process.poll() is None, (tmp_path / "orthanc.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "Orthanc did not start"
                time.sleep(0.2)
        instance_ids = [_http("POST", f"{base}/instances", encode_dataset(make_ct()))["ID"]
                        for _ in range(2)]
        job = _http("POST", f"{base}/modalities/archive/store", json.dumps({
            "Resources": instance_ids, "StorageCommitment": True, "Synchronous": True}).encode())
        transaction = job.get("StorageCommitmentTransactionUID")
        assert transaction, job
        deadline = time.monotonic() + WAIT
        while True:
            report = _http("GET", f"{base}/storage-commitment/{transaction}")
            if report.get("Status") != "Pending" or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        process.terminate()
        process.wait(timeout=WAIT)
        log.close()
    assert report["Status"] == "Success", (report, (tmp_path / "orthanc.log").read_text()[-3000:])
    assert len(report["Success"]) == 2 and not report["Failures"]
