"""Orthanc forwarding a folder of real files: to us, and to dcmtk's ``storescp +xa -pm``.

A real Orthanc (the Debian package, 1.10 in bookworm) on 127.0.0.1 gets every file of
``../shared/data/dicom`` over its REST API, then one store job per peer sends all the
instances it accepted to our listener and to dcmtk's ``storescp`` (``+xa``: every transfer
syntax, ``-pm``: unknown SOP classes too).  Every SOP Instance UID that dcmtk answers
Success for in that forward must have a row in ``instances`` (``storescp`` also keeps the
file of an instance it answers ``0xC000``: the file alone does not count).  Skipped, with the
reason, when Orthanc or ``storescp`` is not installed.  About a minute on 2 shared cores.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import pydicom
import pytest

from .conftest import SHARED_DICOM

ORTHANC = shutil.which("Orthanc")
STORESCP = shutil.which("storescp")
START_WAIT = 30
JOB_WAIT = 600  # a synchronous store job of the whole folder

pytestmark = [
    pytest.mark.skipif(ORTHANC is None, reason="Orthanc is not installed "
                       "(Debian: apt-get install orthanc; 1.10 in bookworm)"),
    pytest.mark.skipif(STORESCP is None, reason="dcmtk's storescp is not installed "
                       "(Debian: apt-get install dcmtk)"),
    pytest.mark.skipif(not SHARED_DICOM.is_dir(),
                       reason=f"the shared DICOM folder {SHARED_DICOM.name} is missing"),
]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _http(method: str, url: str, body: bytes | None = None, timeout: float = START_WAIT,
          raw: bool = False):
    request = urllib.request.Request(url, data=body, method=method)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        data = response.read()
    if raw:
        return data
    try:
        return json.loads(data)
    except ValueError:
        return data.decode()


def _wait_for_port(port: int, process: subprocess.Popen, log: Path, what: str) -> None:
    deadline = time.monotonic() + START_WAIT
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            assert process.poll() is None, f"{what} exited:\n{log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"{what} did not start:\n{log.read_text()[-2000:]}"
            time.sleep(0.1)


@dataclass
class Upload:
    files: int = 0
    accepted: list[str] = field(default_factory=list)  # Orthanc instance ids, in order
    statuses: Counter = field(default_factory=Counter)  # Success / AlreadyStored
    refused: list[tuple[str, str]] = field(default_factory=list)  # (file, why)


def upload_folder(base: str, folder: Path, log: Path) -> Upload:
    """POST every file under ``folder`` to Orthanc's /instances; a refusal's reason is
    Orthanc's answer and the error lines it logged meanwhile."""
    result = Upload()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        result.files += 1
        logged = log.stat().st_size
        try:
            answer = _http("POST", f"{base}/instances", path.read_bytes())
        except urllib.error.HTTPError as error:
            reason = error.read().decode(errors="replace")
            try:
                reason = json.loads(reason).get("Message", reason)
            except ValueError:
                pass
            with log.open("rb") as text:
                text.seek(logged)
                details = [match.group(1) for line in text.read().decode(errors="replace")
                           .splitlines() if (match := ERROR.match(line))]
            result.refused.append((str(path.relative_to(folder)),
                                   "; ".join([f"HTTP {error.code} {reason}"] + details)))
            continue
        result.statuses[answer["Status"]] += 1
        if answer["ID"] not in result.accepted:
            result.accepted.append(answer["ID"])
    return result


SENDING = re.compile(r'Sending instance ([0-9a-f-]+) to modality "([^"]+)"')
ERROR = re.compile(r"^E\S* \S+ \S+\] (.*)$")


def job_outcomes(log: str) -> dict[str, dict[str, str | None]]:
    """Per called AE title, each Orthanc instance id sent and its failure (None: Success).

    Read from Orthanc's --verbose log: a store job logs "Sending instance ID to modality
    AET" before each C-STORE, and a permissive job logs "Ignoring an error" after the
    error of a failed one.  The store jobs run one at a time, so the lines do not mix.
    """
    outcomes: dict[str, dict[str, str | None]] = {}
    current: tuple[str, str] | None = None
    error = None
    for line in log.splitlines():
        if match := SENDING.search(line):
            current = (match.group(2), match.group(1))
            outcomes.setdefault(current[0], {})[current[1]] = None
            error = None
        elif match := ERROR.match(line):
            error = match.group(1)
        elif "Ignoring an error in a permissive job" in line and current is not None:
            outcomes[current[0]][current[1]] = error or line
    return outcomes


def dataset_sop_instance_uid(data: bytes) -> str:
    """The SOP Instance UID a receiver reads from the data set (pydicom, as we do)."""
    ds = pydicom.dcmread(BytesIO(data), stop_before_pixels=True, force=True,
                         specific_tags=["SOPInstanceUID"])
    return str(ds.get("SOPInstanceUID", ""))


def test_every_instance_storescp_keeps_from_an_orthanc_forward_is_stored(
        service, tmp_path: Path, caplog):
    caplog.set_level(logging.WARNING, logger="service")
    received = tmp_path / "storescp"
    received.mkdir()
    dcmtk_port, http_port = _free_port(), _free_port()
    dcmtk_log = tmp_path / "storescp.log"
    orthanc_log = tmp_path / "orthanc.log"
    config = {
        "Name": "forward-test", "StorageDirectory": str(tmp_path / "orthanc-db"),
        "IndexDirectory": str(tmp_path / "orthanc-db"), "HttpPort": http_port,
        # 1.10 has no HTTP bind address: RemoteAccessAllowed false refuses other hosts
        "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "DicomServerEnabled": False, "DicomAet": "ORTHANC", "Plugins": [],
        "DicomScuTimeout": 60,
        "DicomModalities": {
            "archive": {"AET": "PACS_TEST", "Host": "127.0.0.1", "Port": service.port},
            "dcmtk": {"AET": "STORESCP", "Host": "127.0.0.1", "Port": dcmtk_port},
        },
    }
    (tmp_path / "orthanc.json").write_text(json.dumps(config))
    processes: list[subprocess.Popen] = []
    logs = [dcmtk_log.open("w"), orthanc_log.open("w")]
    try:
        # storescp 3.6.7 has no bind address option: it listens on every interface
        processes.append(subprocess.Popen(
            [STORESCP, "-v", "+xa", "-pm", "+uf", "-aet", "STORESCP", "-od", str(received),
             str(dcmtk_port)], stdout=logs[0], stderr=subprocess.STDOUT))
        _wait_for_port(dcmtk_port, processes[-1], dcmtk_log, "storescp")
        processes.append(subprocess.Popen([ORTHANC, "--verbose", str(tmp_path / "orthanc.json")],
                                          stdout=logs[1], stderr=subprocess.STDOUT))
        _wait_for_port(http_port, processes[-1], orthanc_log, "Orthanc")
        base = f"http://127.0.0.1:{http_port}"

        upload = upload_folder(base, SHARED_DICOM, orthanc_log)
        assert upload.accepted, upload.refused
        uid_of = {orthanc_id: dataset_sop_instance_uid(
                      _http("GET", f"{base}/instances/{orthanc_id}/file", raw=True))
                  for orthanc_id in upload.accepted}
        for modality in ("dcmtk", "archive"):
            # Permissive: a failed instance does not stop the job, every one is tried
            _http("POST", f"{base}/modalities/{modality}/store", json.dumps({
                "Resources": upload.accepted, "Synchronous": True, "Permissive": True,
            }).encode(), timeout=JOB_WAIT)
    finally:
        for process in reversed(processes):
            process.terminate()
            process.wait(timeout=START_WAIT)
        for log in logs:
            log.close()

    log_text = orthanc_log.read_text(errors="replace")
    outcomes = job_outcomes(log_text)
    for aet in ("STORESCP", "PACS_TEST"):
        assert set(outcomes.get(aet, {})) == set(upload.accepted), (
            f"Orthanc's log does not name every instance sent to {aet} "
            "(has the format of its --verbose log changed?)")
    dcmtk_ok = {uid_of[i] for i, failure in outcomes["STORESCP"].items() if failure is None}
    sent_ok = {uid_of[i] for i, failure in outcomes["PACS_TEST"].items() if failure is None}
    ours = {row[0] for row in _rows(service, "SELECT sop_instance_uid FROM instances")}
    defects = dict(_rows(service, "SELECT rule, count(*) FROM tolerated_defects GROUP BY rule"))
    dcmtk_files = sum(1 for p in received.iterdir() if p.is_file())
    rejections = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    summary = (
        f"files uploaded {upload.files}, accepted by Orthanc "
        f"{sum(upload.statuses.values())} ({dict(upload.statuses)}) as "
        f"{len(upload.accepted)} instances, refused {len(upload.refused)}; "
        f"dcmtk answered Success for {len(dcmtk_ok)} SOP Instance UIDs "
        f"({dcmtk_files} files written), we did for {len(sent_ok)}, "
        f"rows in instances {len(ours)}, tolerated defects {dict(sorted(defects.items()))}")
    print(summary)
    for name, why in upload.refused:
        print(f"refused by Orthanc: {name}: {why}")
    for aet, sent in outcomes.items():
        for orthanc_id, failure in sorted(sent.items()):
            if failure is not None:
                print(f"{aet} failed {uid_of[orthanc_id]} (Orthanc {orthanc_id}): {failure}")

    def lines(uids):
        return [f"  {uid}: " + "; ".join(
            [r for r in rejections if uid in r] or ["no rejection logged"]) for uid in uids]

    missing = sorted(dcmtk_ok - ours)
    extra = sorted(ours - dcmtk_ok)
    assert not missing, "\n".join(
        [summary, "stored by dcmtk, not by us:"] + lines(missing)
        + ["stored by us, not by dcmtk:"] + lines(extra)
        + ["Orthanc's log:", log_text[-3000:]])
    assert sent_ok <= ours, sorted(sent_ok - ours)


def _rows(service, sql: str) -> list[tuple]:
    import sqlalchemy as sa

    with service.engine.connect() as conn:
        return [tuple(row) for row in conn.execute(sa.text(sql))]
