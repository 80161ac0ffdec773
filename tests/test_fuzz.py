"""Hostile input through real associations: the listener never crashes, never keeps a
half-written file or a row for a rejected instance, and keeps serving good stores.

CI runs a short form; ``PACS_FUZZ_EXAMPLES=10000 pytest tests/test_fuzz.py`` the long one.
"""

from __future__ import annotations

import os
import socket
import struct

import pytest
import sqlalchemy as sa

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from service.ingest.storage import INCOMING  # noqa: E402

from .conftest import leftover_temps  # noqa: E402
from .dicom_client import RawAssociation, associate, encode_dataset, make_ct  # noqa: E402

EXAMPLES = int(os.environ.get("PACS_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

pdu_bytes = st.one_of(
    st.binary(max_size=2048),
    st.builds(lambda kind, body, fake: struct.pack(">BBI", kind, 0,
                                                  len(body) if fake is None else fake) + body,
              st.integers(0, 255), st.binary(max_size=1024),
              st.none() | st.integers(0, 2**32 - 1)),
)


@FUZZ
@given(data=pdu_bytes)
def test_random_bytes_on_a_new_connection(service, data):
    with socket.create_connection(("127.0.0.1", service.port), timeout=10) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(4096):
                pass
        except OSError:
            pass  # reset by the listener is a fine answer to garbage


GOOD_UID = "1.2.826.0.1.3680043.10.1.1"
GOOD = encode_dataset(make_ct(sop=GOOD_UID))


@st.composite
def mutated_dataset(draw) -> bytes:
    data = bytearray(GOOD)
    for _ in range(draw(st.integers(1, 8))):
        action = draw(st.sampled_from(["flip", "cut", "insert", "length"]))
        position = draw(st.integers(0, max(len(data) - 1, 0)))
        if action == "flip" and data:
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif action == "cut":
            del data[position:position + draw(st.integers(1, 4096))]
        elif action == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=64))
        elif action == "length" and position + 8 <= len(data):
            data[position:position + 4] = struct.pack("<I", draw(st.integers(0, 2**32 - 1)))
    return bytes(data)


@pytest.fixture
def association(service):
    holder = {"assoc": None}

    def get() -> RawAssociation:
        if holder["assoc"] is None:
            holder["assoc"] = RawAssociation(service.port)
        return holder["assoc"]

    def drop() -> None:
        if holder["assoc"] is not None:
            holder["assoc"].sock.close()
        holder["assoc"] = None

    yield get, drop
    drop()


def test_mutated_datasets_leave_only_what_was_acknowledged(service, association):
    get, drop = association
    acknowledged = 0

    @FUZZ
    @given(data=mutated_dataset())
    def one(data: bytes) -> None:
        nonlocal acknowledged
        try:
            status = get().store_bytes(data, sop_instance=GOOD_UID)
        except (OSError, ConnectionError):
            drop()  # aborted by the listener: a new association for the next example
            return
        if status == 0x0000:
            acknowledged += 1

    one()
    drop()
    # every Success left exactly one row: one per SOP Instance UID, later ones are
    # duplicates; a mutation that changed the data set's SOP Instance UID is kept under
    # that UID (tolerant mode), with its mismatch recorded
    rows = service.scalar("SELECT count(*) FROM instances")
    assert (rows > 0) == (acknowledged > 0) and rows <= acknowledged
    others = service.scalar("SELECT count(*) FROM instances WHERE sop_instance_uid <> :s",
                            s=GOOD_UID)
    assert others == service.scalar(
        "SELECT count(DISTINCT sop_instance_uid) FROM tolerated_defects "
        "WHERE rule = 'sop-instance-mismatch'")
    with service.engine.connect() as conn:
        paths = [r[0] for r in conn.execute(sa.text("SELECT file_path FROM instances"))]
    files = [p for p in service.stored_files() if INCOMING not in p.parts]
    assert sorted(str(service.storage / p) for p in paths) == sorted(map(str, files))
    assert leftover_temps(service.storage) == []
    good = associate(service.port)
    assert good.send_c_store(make_ct()).Status == 0x0000
    good.release()


def test_hostile_tag_values_are_stored_safely(service):
    ds = make_ct()
    ds.PatientName = "Robert'); DROP TABLE instances;--"
    ds.StudyDescription = "x" * (1024 * 1024)
    ds.SeriesDescription = "nul\x00inside"
    ds.InstitutionName = "\\\\'\"$$;--"
    assoc = associate(service.port)
    assert assoc.send_c_store(ds).Status == 0x0000
    assoc.release()
    with service.engine.connect() as conn:
        tags = conn.execute(sa.text("SELECT tags FROM instances")).scalar()
        name = conn.execute(sa.text("SELECT patient_name FROM patients")).scalar()
    assert name == "Robert'); DROP TABLE instances;--"
    assert len(tags["StudyDescription"]) == 65536  # cut in the JSONB copy only
    assert "\x00" not in tags["SeriesDescription"]
