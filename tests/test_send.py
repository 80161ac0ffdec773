"""``pacs-annotate send`` (service/ingest/sender.py) and the README's other ways of sending, through
real associations to the listener, against a real PostgreSQL.

The shared-file tests send ../shared/data/dicom (447 DICOM files, MANIFEST.csv, READMEs and
licences) and check that every file of the folder has exactly one outcome, that the outcomes
agree with the manifest, and that what the receiver holds is what the sender reports stored.
"""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

from service.ingest import acceptor
from service.ingest.sender import (
    FAILED,
    MAX_CONTEXTS,
    REJECTED,
    SKIPPED,
    STORED,
    Requestor,
    SendError,
    SendOptions,
    parse_destination,
    plan_associations,
    send_paths,
)

from .conftest import REPO_ROOT, SHARED_DICOM
from .dicom_client import encode_dataset, make_ct

CLI = [sys.executable, "-m", "service.cli"]
needs_shared = pytest.mark.skipif(not (SHARED_DICOM / "MANIFEST.csv").is_file(),
                                  reason=f"{SHARED_DICOM} absent")


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "PACS_CONFIG")}


def send_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "send", *args], env=_env(), cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600)


def write_ct(folder: Path, name: str, **changes) -> pydicom.Dataset:
    ds = make_ct()
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    folder.mkdir(parents=True, exist_ok=True)
    ds.save_as(folder / name, enforce_file_format=True)
    return ds


def all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def read_report(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fp:
        return list(csv.DictReader(fp))


# ---------------------------------------------------------------- pure parts


def test_plan_keeps_every_pair_once_in_order_and_at_most_128_per_association():
    pairs = [(f"1.2.3.{i % 300}", "1.2.840.10008.1.2.1") for i in range(900)]
    groups = plan_associations(pairs)
    assert [len(g) for g in groups] == [128, 128, 44]
    assert [p for g in groups for p in g] == list(dict.fromkeys(pairs))
    assert plan_associations([]) == []
    assert plan_associations([("a", "b")] * 5) == [[("a", "b")]]
    assert [len(g) for g in plan_associations(pairs[:7], limit=3)] == [3, 3, 1]
    with pytest.raises(ValueError):
        plan_associations(pairs, limit=0)


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:11112", ("127.0.0.1", 11112)),
    ("pacs.example.org:104", ("pacs.example.org", 104)),
    ("[::1]:11112", ("::1", 11112)),
])
def test_destination(text, expected):
    assert parse_destination(text) == expected


@pytest.mark.parametrize("text", ["127.0.0.1", "127.0.0.1:", ":11112", "host:port", "h:0",
                                  "h:70000"])
def test_bad_destination(text):
    with pytest.raises(ValueError):
        parse_destination(text)


# ---------------------------------------------------------------- the command


def test_send_skips_and_counts_what_is_not_dicom_and_exits_0(service, tmp_path):
    folder = tmp_path / "in"
    sent = [write_ct(folder / "a", "1.dcm"), write_ct(folder / "b", "2.dcm")]
    (folder / "notes.txt").write_text("not DICOM")
    (folder / "empty.dcm").write_bytes(b"")
    report = tmp_path / "report.csv"
    result = send_cli(str(folder), "--to", f"127.0.0.1:{service.port}", "--aec", "PACS_TEST",
                      "--report", str(report))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("4 files: 2 stored, 0 rejected, 0 failed, 2 skipped")
    assert result.stderr == ""  # no progress bar when stderr is not a terminal, no warnings
    rows = read_report(report)
    assert sorted((Path(r["path"]).name, r["outcome"]) for r in rows) == [
        ("1.dcm", STORED), ("2.dcm", STORED), ("empty.dcm", SKIPPED), ("notes.txt", SKIPPED)]
    assert service.scalar("SELECT count(*) FROM instances") == 2
    assert {r["sop_instance_uid"] for r in rows if r["outcome"] == STORED} == {
        ds.SOPInstanceUID for ds in sent}


def test_each_file_goes_in_its_own_transfer_syntax(service, tmp_path):
    """An RLE file and an explicit little endian one of the same SOP class: two presentation
    contexts, and each file is stored byte for byte as it was sent (nothing re-encoded)."""
    folder = tmp_path / "in"
    plain = write_ct(folder, "plain.dcm")
    rle = make_ct()
    rle.compress(RLELossless)
    rle.save_as(folder / "rle.dcm", enforce_file_format=True)
    result = send_cli(str(folder), "--to", f"127.0.0.1:{service.port}", "--aec", "PACS_TEST")
    assert result.returncode == 0, result.stderr
    for ds, name in ((plain, "plain.dcm"), (rle, "rle.dcm")):
        path = service.scalar("SELECT file_path FROM instances WHERE sop_instance_uid = :u",
                              u=ds.SOPInstanceUID)
        stored = pydicom.dcmread(service.storage / path)
        original = pydicom.dcmread(folder / name)
        assert stored.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert stored.PixelData == original.PixelData


def test_a_rejected_file_exits_1_and_is_reported(service, tmp_path):
    folder = tmp_path / "in"
    write_ct(folder, "good.dcm")
    bad = make_ct()
    del bad.StudyInstanceUID  # the receiver refuses it
    bad.save_as(folder / "bad.dcm", enforce_file_format=True)
    report = tmp_path / "report.csv"
    result = send_cli(str(folder), "--to", f"127.0.0.1:{service.port}", "--aec", "PACS_TEST",
                      "--report", str(report), "--quiet")
    assert result.returncode == 1
    assert result.stdout.startswith("2 files: 1 stored, 1 rejected, 0 failed, 0 skipped")
    rows = {Path(r["path"]).name: r for r in read_report(report)}
    assert rows["bad.dcm"]["outcome"] == REJECTED and rows["bad.dcm"]["status"] == "0xC211"
    assert rows["good.dcm"]["outcome"] == STORED and rows["good.dcm"]["status"] == "0x0000"
    assert "rejected" in result.stderr and "bad.dcm" in result.stderr  # one line per failure


def test_nobody_listening_fails_every_file_and_exits_1(tmp_path):
    folder = tmp_path / "in"
    write_ct(folder, "1.dcm")
    write_ct(folder, "2.dcm")
    (folder / "x.txt").write_text("x")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        result = send_cli(str(folder), "--to", f"127.0.0.1:{port}")
    assert result.returncode == 1
    assert result.stdout.startswith("3 files: 0 stored, 0 rejected, 2 failed, 1 skipped")
    assert "cannot connect" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["{missing}", "--to", "127.0.0.1:11112"], "does not exist"),
    (["{folder}", "--to", "127.0.0.1"], "--to wants HOST:PORT"),
    (["{folder}", "--to", "127.0.0.1:x"], "is not a number"),
    (["{folder}", "--to", "127.0.0.1:11112", "--aec", "A" * 17], "AE title"),
    (["{folder}", "--to", "127.0.0.1:11112", "--report", "{folder}/no/such/dir/r.csv"],
     "--report"),
])
def test_user_errors_are_one_line_and_exit_2(tmp_path, args, message):
    values = {"missing": str(tmp_path / "missing"), "folder": str(tmp_path)}
    result = send_cli(*[a.format(**values) for a in args])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_more_pairs_than_one_association_carries_open_more_associations(service, tmp_path):
    """130 SOP classes: 128 presentation contexts in the first association, 2 in a second."""
    folder = tmp_path / "in"
    classes = [f"1.2.826.0.1.3680043.8.498.77.{i}" for i in range(130)]
    for i, sop_class in enumerate(classes):
        write_ct(folder, f"{i:03d}.dcm", SOPClassUID=sop_class)
    paths = all_files(folder)
    out = io.StringIO()
    report = send_paths(paths, SendOptions("127.0.0.1", service.port, called_ae="PACS_TEST"),
                        report_csv=out, quiet=True)
    assert report.associations == 2
    assert dict(report.outcomes) == {STORED: 130}
    assert report.ok
    assert service.scalar("SELECT count(DISTINCT sop_class_uid) FROM instances") == 130
    assert len(out.getvalue().splitlines()) == 131  # header + one row per file


def test_one_open_association_serves_the_next_batch_when_it_accepted_its_pairs(service,
                                                                               tmp_path):
    folder = tmp_path / "in"
    for i in range(7):
        write_ct(folder, f"{i}.dcm")
    report = send_paths(all_files(folder), SendOptions(
        "127.0.0.1", service.port, called_ae="PACS_TEST", batch=2), quiet=True)
    assert report.associations == 1
    assert report.outcomes[STORED] == 7


# ---------------------------------------------------------------- each response answers its request


def test_a_duplicated_response_is_caught_not_taken_for_the_next_answer(service, monkeypatch):
    """The check the concurrency test relies on: a receiver that answered one request twice
    would have its second answer read as the reply to the next request; the sender sees the
    wrong Message ID Being Responded To and gives up on the association."""
    real = acceptor.Association._respond

    def respond_twice(self, *args, **kwargs):
        real(self, *args, **kwargs)
        real(self, *args, **kwargs)

    monkeypatch.setattr(acceptor.Association, "_respond", respond_twice)
    first, second = make_ct(), make_ct()
    requestor = Requestor("127.0.0.1", service.port, [(first.SOPClassUID, ExplicitVRLittleEndian)],
                          called_ae="PACS_TEST")
    assert requestor.store(first.SOPClassUID, first.SOPInstanceUID, ExplicitVRLittleEndian,
                           encode_dataset(first)).status == 0x0000
    with pytest.raises(SendError, match="answered message 1 while message 2 waited"):
        requestor.store(second.SOPClassUID, second.SOPInstanceUID, ExplicitVRLittleEndian,
                        encode_dataset(second))
    requestor.abort()


def test_a_late_response_shows_at_release(service, monkeypatch):
    real = acceptor.Association._respond

    def respond_twice(self, *args, **kwargs):
        real(self, *args, **kwargs)
        real(self, *args, **kwargs)

    monkeypatch.setattr(acceptor.Association, "_respond", respond_twice)
    ds = make_ct()
    requestor = Requestor("127.0.0.1", service.port, [(ds.SOPClassUID, ExplicitVRLittleEndian)],
                          called_ae="PACS_TEST")
    requestor.store(ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian, encode_dataset(ds))
    with pytest.raises(SendError, match="instead of A-RELEASE-RP"):
        requestor.release()


def test_a_refused_association_fails_every_file_with_the_reason(service_factory, tmp_path):
    service = service_factory(allowed_calling_aets=("GOODPACS",))
    folder = tmp_path / "in"
    for i in range(3):
        write_ct(folder, f"{i}.dcm")
    report = send_paths(all_files(folder), SendOptions("127.0.0.1", service.port,
                                                       called_ae="PACS_TEST"), quiet=True)
    assert dict(report.outcomes) == {FAILED: 3}
    assert not report.ok
    assert "rejected the association permanently: calling AE title not recognised" in \
        report.summary()


def test_an_aborted_association_fails_one_file_and_the_next_go_on_a_new_one(service, tmp_path,
                                                                             monkeypatch):
    folder = tmp_path / "in"
    doomed = write_ct(folder, "1.dcm")
    for i in (2, 3):
        write_ct(folder, f"{i}.dcm")
    real = acceptor.Association._dispatch

    def dispatch(self, message, dataset):
        if dataset is not None and doomed.SOPInstanceUID.encode() in dataset:
            raise acceptor.ProtocolError("test: abort on this one")
        return real(self, message, dataset)

    monkeypatch.setattr(acceptor.Association, "_dispatch", dispatch)
    out = io.StringIO()
    report = send_paths(all_files(folder), SendOptions("127.0.0.1", service.port,
                                                       called_ae="PACS_TEST"),
                        report_csv=out, quiet=True)
    assert dict(report.outcomes) == {FAILED: 1, STORED: 2}
    assert report.associations == 2
    rows = {Path(r["path"]).name: r for r in csv.DictReader(io.StringIO(out.getvalue()))}
    assert rows["1.dcm"]["outcome"] == FAILED and "aborted" in rows["1.dcm"]["reason"]
    assert service.scalar("SELECT count(*) FROM instances") == 2


def test_at_most_128_contexts_per_requestor():
    with pytest.raises(ValueError):
        Requestor("127.0.0.1", 1, [("1.2.3", "1.2.840.10008.1.2")] * (MAX_CONTEXTS + 1))


# ---------------------------------------------------------------- the shared files, three ways


def _manifest() -> dict[str, dict[str, str]]:
    with open(SHARED_DICOM / "MANIFEST.csv", newline="", encoding="utf-8") as fp:
        return {row["path"]: row for row in csv.DictReader(fp)}


def _relative(path: str) -> str:
    return Path(path).resolve().relative_to(SHARED_DICOM.resolve()).as_posix()


@needs_shared
def test_send_all_shared_files_outcomes_add_up_and_match_the_manifest(service, tmp_path):
    manifest = _manifest()
    files = all_files(SHARED_DICOM)
    report = tmp_path / "report.csv"
    result = send_cli(str(SHARED_DICOM), "--to", f"127.0.0.1:{service.port}",
                      "--aec", "PACS_TEST", "--report", str(report))
    rows = read_report(report)
    outcomes = {_relative(r["path"]): r for r in rows}
    assert len(rows) == len(outcomes) == len(files)  # one row per file, none twice
    counts = {name: sum(r["outcome"] == name for r in rows) for name in (STORED, REJECTED,
                                                                         FAILED, SKIPPED)}
    assert counts[FAILED] == 0
    assert counts[STORED] + counts[REJECTED] + counts[SKIPPED] == len(files)
    assert result.stdout.startswith(
        f"{len(files)} files: {counts[STORED]} stored, {counts[REJECTED]} rejected, 0 failed, "
        f"{counts[SKIPPED]} skipped")
    # exit 1: the receiver refuses the deliberately broken test files
    assert result.returncode == (1 if counts[REJECTED] else 0)
    # every manifest file is there; everything else in the folder is not DICOM, and skipped
    assert set(manifest) <= set(outcomes)
    for path, row in outcomes.items():
        if path not in manifest:
            assert row["outcome"] == SKIPPED and row["reason"].startswith("not a DICOM file")
    # every file the manifest gives a SOP class and transfer syntax left the sender, in the
    # transfer syntax the manifest names, with its SOP Instance UID
    names = {uid.name: str(uid) for uid in map(pydicom.uid.UID, {
        r["transfer_syntax_uid"] for r in rows if r["transfer_syntax_uid"]})}
    sendable = [p for p, m in manifest.items() if m["SOPClass"] and m["TransferSyntax"]]
    assert len(sendable) >= 430
    for path in sendable:
        row, expected = outcomes[path], manifest[path]
        assert row["outcome"] in (STORED, REJECTED), (path, row)
        assert row["sop_instance_uid"] == expected["SOPInstanceUID"], path
        assert row["transfer_syntax_uid"] in (names.get(expected["TransferSyntax"]),
                                              expected["TransferSyntax"]), path
    # the compressed files among them (the old pynetdicom recipe lost these)
    compressed = [p for p in sendable if not manifest[p]["TransferSyntax"].startswith(
        ("Explicit VR", "Implicit VR"))]
    assert len(compressed) >= 70
    assert all(outcomes[p]["outcome"] in (STORED, REJECTED) for p in compressed)
    # skipped DICOM files are those the manifest could not give a SOP class either
    for path, row in outcomes.items():
        if path in manifest and row["outcome"] == SKIPPED:
            assert not manifest[path]["SOPClass"], (path, row)
    # the receiver holds exactly the SOP instances reported stored (repeats are kept once)
    stored_uids = {r["sop_instance_uid"] for r in rows if r["outcome"] == STORED}
    assert service.scalar("SELECT count(*) FROM instances") == len(stored_uids)
    assert sum(r["repeated"] == "yes" for r in rows) == counts[STORED] - len(stored_uids)
    held = service.scalar("SELECT array_agg(sop_instance_uid) FROM instances")
    assert set(held) == stored_uids


def _receiver_total(service) -> int:
    """Stores the receiver answered: stored, duplicates and rejections."""
    counters = service.ingestor.counters
    return counters.stored + counters.duplicates + counters.rejected


@needs_shared
def test_readme_pynetdicom_storescu_recipe_sends_every_shared_file(service):
    """README: ``python -m pynetdicom storescu HOST PORT -aec ... -r -cx DIR``.  Without
    ``-cx`` it proposes uncompressed transfer syntaxes only and 105 compressed or big endian
    files never left."""
    result = subprocess.run(
        [sys.executable, "-m", "pynetdicom", "storescu", "127.0.0.1", str(service.port),
         "-aec", "PACS_TEST", "-r", "-cx", "-v", str(SHARED_DICOM)],
        capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    log = result.stderr + result.stdout
    not_dicom = len(re.findall(r"^E: Bad DICOM file: ", log, re.M))
    no_uids = len(re.findall(r"^E: Unknown SOP Class or Transfer Syntax UID: ", log, re.M))
    not_sent = len(re.findall(r"^E: Store failed: ", log, re.M))  # e.g. could not re-encode
    answered = re.findall(r"^I: Received Store Response \(Status: (0x[0-9A-F]{4})", log, re.M)
    # pynetdicom's own race (docs/ingest.md, "Sending"): on a busy machine its reactor may
    # take one response; that store is never answered, the association is aborted and every
    # later file is "Store failed".  The recipe's negotiation is still checked in full.
    lost = log.count("Received unexpected C-STORE service message")
    files = all_files(SHARED_DICOM)
    assert not_dicom + no_uids + not_sent + len(answered) + lost == len(files), log[-3000:]
    assert len(answered) + lost == _receiver_total(service)
    if not lost:
        assert not_sent <= 1  # pydicom cannot re-encode SC_rgb_jpeg.dcm; our sender sends it
    assert not_dicom == len(files) - len(_manifest())
    assert "No presentation context" not in log


@needs_shared
@pytest.mark.skipif(shutil.which("dcmsend") is None, reason="dcmtk (dcmsend) not installed")
def test_readme_dcmtk_recipe_sends_every_shared_file(service):
    """README: ``dcmsend -aec ... +sd +r -nh -dn HOST PORT DIR``.  dcmtk's storescu proposes
    one preferred transfer syntax per SOP class (plus the uncompressed ones) and cannot send
    a folder that mixes JPEG, JPEG 2000, JPEG-LS and RLE files as they are; dcmsend, from the
    same package, proposes each file's own."""
    result = subprocess.run(
        ["dcmsend", "-v", "-aec", "PACS_TEST", "+sd", "+r", "-nh", "-dn", "127.0.0.1",
         str(service.port), str(SHARED_DICOM)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "TCP_NODELAY": "1"})
    log = result.stderr + result.stdout

    def number(label: str) -> int:
        match = re.search(rf"^I:\s+{re.escape(label)}\s*: (\d+)", log, re.M)
        assert match, (label, log[-3000:])
        return int(match.group(1))

    files = all_files(SHARED_DICOM)
    ignored = len(re.findall(r"^W: bad DICOM file: .*ignoring file$", log, re.M))
    instances = number("Number of SOP instances")
    sent, success, error = (number("- sent to the peer"), number("* with status SUCCESS"),
                            number("* with status ERROR"))
    assert ignored + instances == len(files)
    assert sent == success + error == _receiver_total(service)
    assert instances - sent <= 8  # files dcmtk's parser refuses (truncated test files)
    assert "unable to convert" not in log
