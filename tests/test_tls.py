"""DICOM over TLS with a CA, server and client certificates made by the test."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import pytest

from .dicom_client import make_ct, scu_ae

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _certificate(directory: Path, name: str, cn: str, ca: str, *, server: bool) -> None:
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-subj",
             f"/CN={cn}", "-out", f"{name}.csr", cwd=directory)
    extensions = directory / f"{name}.ext"
    extensions.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n" if server
                          else "extendedKeyUsage=clientAuth\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-days", "2", "-out", f"{name}.crt", "-extfile", str(extensions),
             cwd=directory)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-subj",
             "/CN=Test CA", "-days", "2", "-out", "ca.crt", cwd=directory)
    _certificate(directory, "server", "localhost", "ca", server=True)
    _certificate(directory, "client", "modality", "ca", server=False)
    return directory


@pytest.fixture
def tls_service(service_factory, pki):
    """A listener that speaks only TLS and wants a client certificate from the test CA."""
    return service_factory(tls_certificate=pki / "server.crt",
                           tls_private_key=pki / "server.key",
                           tls_client_ca=pki / "ca.crt")


def _client_context(pki: Path, *, with_certificate: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.crt"))
    if with_certificate:
        context.load_cert_chain(pki / "client.crt", pki / "client.key")
    return context


def test_store_over_tls_with_client_certificate(tls_service, pki):
    service = tls_service
    ae = scu_ae()
    assoc = ae.associate("127.0.0.1", service.port, ae_title="PACS_TEST",
                         tls_args=(_client_context(pki, with_certificate=True), "localhost"))
    assert assoc.is_established
    assert assoc.send_c_store(make_ct()).Status == 0x0000
    assoc.release()
    assert service.scalar("SELECT count(*) FROM instances") == 1


def test_tls_refuses_clients_without_a_certificate_and_plain_tcp(tls_service, pki):
    service = tls_service
    ae = scu_ae()
    anonymous = ae.associate("127.0.0.1", service.port, ae_title="PACS_TEST",
                             tls_args=(_client_context(pki, with_certificate=False), "localhost"))
    assert not anonymous.is_established
    plain = ae.associate("127.0.0.1", service.port, ae_title="PACS_TEST")
    assert not plain.is_established
    assert service.scalar("SELECT count(*) FROM instances") == 0
