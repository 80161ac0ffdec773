"""The C-STORE SCP service: listener wiring, one or more listener processes on one port."""

from __future__ import annotations

import errno
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

from .acceptor import AcceptorConfig, DicomServer, StoreRequest
from ..config import ConfigError, Settings
from .dicom_header import STATUS_UNDECODABLE, encode_part10
from .ingestor import Ingestor
from .storage_commitment import SOP_CLASS as STORAGE_COMMITMENT
from .storage_commitment import StorageCommitmentSCP, parse_peers

log = logging.getLogger(__name__)


def ingestor_for(settings: Settings, engine: Any, *, stores: bool = True) -> Ingestor:
    """The ingest path as configured (storage, queue stages, batch size); call ``start()``
    or use it as a context manager.  ``stores=False``: only to settle what earlier runs
    left (no spare temp files are made ahead)."""
    from .storage import SPARE_FILES, FileStore

    store = FileStore(settings.storage_path, spare_files=SPARE_FILES if stores else 0)
    return Ingestor(engine, store, stages=settings.queue_stages,
                    batch_max=settings.commit_batch_max, strict=settings.strict_ingest)


def handle_store(request: StoreRequest, ingestor: Ingestor) -> int:
    """C-STORE handler: frame the received dataset as a Part 10 file and ingest it."""
    try:
        encoded = encode_part10(
            request.dataset,
            sop_class_uid=request.sop_class_uid,
            sop_instance_uid=request.sop_instance_uid,
            transfer_syntax_uid=request.transfer_syntax_uid,
            source_ae_title=request.calling_ae_title,
        )
    except (UnicodeError, ValueError) as exc:
        log.warning("rejected instance %s from %s: cannot frame the received dataset: %s",
                    request.sop_instance_uid or "(no SOP Instance UID)",
                    request.calling_ae_title or "-", exc,
                    extra={"status": f"0x{STATUS_UNDECODABLE:04X}",
                           "calling_ae": request.calling_ae_title,
                           "sop_instance_uid": request.sop_instance_uid})
        return STATUS_UNDECODABLE
    outcome = ingestor.ingest(
        encoded,
        calling_ae=request.calling_ae_title,
        called_ae=request.called_ae_title,
        expected_sop_instance_uid=request.sop_instance_uid or None,
        expected_sop_class_uid=request.sop_class_uid or None,
    )
    return outcome.status


def acceptor_config(settings: Settings) -> AcceptorConfig:
    return AcceptorConfig(
        ae_title=settings.ae_title,
        max_pdu_size=settings.max_pdu_size,
        allowed_calling_aets=settings.allowed_calling_aets,
        allowed_networks=settings.allowed_networks,
        network_timeout=settings.network_timeout,
        acse_timeout=settings.acse_timeout,
        max_associations=settings.max_associations,
    )


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """Server-side TLS (PS3.15 B.1 secure transport) when a certificate is configured.

    With ``tls_client_ca`` the peer must present a certificate signed by that CA.
    """
    if settings.tls_certificate is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(settings.tls_certificate, settings.tls_private_key)
        if settings.tls_client_ca is not None:
            context.load_verify_locations(settings.tls_client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"TLS files: {exc}") from None
    return context


class DiskWatermark:
    """Refuses new associations while the storage has less free space than the watermark.

    Stores already under way go on (and fail with 0xA700 if the disk really fills); the
    refusal is transient, so senders retry later, and lifts by itself when space returns.
    """

    def __init__(self, path: Path, min_free_mb: int, recheck_seconds: float = 1.0):
        self.path = path
        self.min_free = min_free_mb * 1024 * 1024
        self.recheck_seconds = recheck_seconds
        self._checked_at = 0.0
        self._refusal: str | None = None

    def __call__(self) -> str | None:
        if self.min_free <= 0:
            return None
        now = time.monotonic()
        if now - self._checked_at >= self.recheck_seconds:
            self._checked_at = now
            free = shutil.disk_usage(self.path).free
            refusal = (f"storage has {free // 2**20} MiB free, below the "
                       f"{self.min_free // 2**20} MiB watermark") if free < self.min_free else None
            if refusal and not self._refusal:
                log.error("refusing new associations: %s", refusal, extra={"path": str(self.path)})
            elif self._refusal and not refusal:
                log.warning("storage back above the watermark; accepting associations again")
            self._refusal = refusal
        return self._refusal


class PortInUse(ConfigError):
    """Another program holds the listening port: starting would split the archive."""


def ensure_port_free(bind_address: str, port: int) -> None:
    """Raise :class:`PortInUse` when any socket already listens on ``bind_address:port``.

    The listener processes of one ``serve`` bind with ``SO_REUSEPORT`` so that the kernel
    spreads associations over them. The kernel would spread them just as well over the
    processes of a *second* service started on the same port with another archive, and each
    sender would be told Success by whichever archive it reached. A bind without
    ``SO_REUSEPORT`` fails while any socket holds the port (ours included), so it tells a
    free port from a taken one; ``SO_REUSEADDR`` keeps the connections of a stopped run,
    still in TIME_WAIT, from counting as a holder. Port 0 (an ephemeral port per process)
    cannot be shared and is not checked.
    """
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in bind_address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((bind_address, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            raise PortInUse(
                f"port {port} on {bind_address} is already in use by another program "
                f"(another 'pacs-annotate serve'?); stop it or choose another --port"
            ) from None


def start_listener(settings: Settings, ingestor: Ingestor, *, reuse_port: bool = False,
                   port: int | None = None) -> DicomServer:
    """Start the SCP in background threads; returns the server (call ``shutdown()``)."""
    commitment = StorageCommitmentSCP(ingestor.engine, settings.ae_title,
                                      parse_peers(settings.storage_commitment_peers),
                                      timeout=settings.dimse_timeout)
    server = DicomServer(
        (settings.bind_address, settings.port if port is None else port),
        acceptor_config(settings),
        lambda request: handle_store(request, ingestor),
        reuse_port=reuse_port,
        ssl_context=tls_context(settings),
        admission=DiskWatermark(settings.storage_path, settings.min_free_disk_mb),
        services=commitment.services,
        service_syntaxes=(STORAGE_COMMITMENT,),
    )
    return server.start()


def _child_stop_event() -> threading.Event:
    """A child process stops on the SIGTERM its parent sends; Ctrl-C is the parent's to handle."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return stop


def _child_main(settings: Settings, database_url: str, ready: Any) -> None:
    from ..database.engine import create_db_engine
    from ..logs import setup_logging

    setup_logging(settings)
    stop = _child_stop_event()
    engine = create_db_engine(database_url, pool_size=2)
    ingestor = ingestor_for(settings, engine)
    ingestor.start(resolve=False)
    server = start_listener(settings, ingestor, reuse_port=True)
    ready.set()
    stop.wait()
    server.shutdown()
    ingestor.close()
    engine.dispose()


TAGS_WORKER_NICENESS = 10


def _tags_worker_main(settings: Settings, database_url: str, ready: Any) -> None:
    """The tags stage in its own process, below the listeners' CPU priority, yielding to
    ingest while stores keep arriving (``tags_quiet_seconds``, ``tags_max_lag_seconds``).

    Parsing costs CPU that storing needs more: under load the features lag a little and
    catch up, instead of the stores slowing down.
    """
    from parsers import load_vocabulary

    from ..database.engine import create_db_engine
    from ..tags.features import TagsWorker
    from ..logs import setup_logging

    setup_logging(settings)
    os.nice(TAGS_WORKER_NICENESS)
    stop = _child_stop_event()
    engine = create_db_engine(database_url, pool_size=2)
    worker = TagsWorker(engine, name=f"{os.getpid()}/tags",
                        vocabulary=load_vocabulary(settings.site_vocabulary),
                        quiet_seconds=settings.tags_quiet_seconds,
                        max_lag_seconds=settings.tags_max_lag_seconds).start()
    ready.set()
    stop.wait()
    worker.stop()
    engine.dispose()


def _stop_children(children: list) -> None:
    for child, _ in children:
        if child.is_alive():
            os.kill(child.pid, signal.SIGTERM)
    for child, _ in children:
        child.join(timeout=30)
        if child.is_alive():
            child.kill()


def _wait_until_ready(child: Any, ready: Any, stop: threading.Event) -> bool:
    """Whether ``child`` said it is ready (False: it died first, or ``stop`` was set)."""
    while not ready.wait(0.2):
        if not child.is_alive():
            log.error("a child process died while starting", extra={"process": child.name})
            return False
        if stop.is_set():
            return False
    return True


def serve_forever(settings: Settings, database_url: str, ingestor: Ingestor,
                  stop: threading.Event) -> None:
    """Run the listener until ``stop`` is set: in-process, or in N child processes.

    The tags worker, when enabled, runs in a child process of its own either way, and is
    started first: the port opens once the whole service is up, so the first stores do
    not share the CPU with the worker's start (a second of imports, which took an eighth
    of the CPU of the benchmark's first seconds: benchmarks/ingest/README.md).
    """
    # checked again here, after the database and before the workers start: the first
    # check (cli.ingest.serve) fails fast, this one narrows the window to the listeners' start
    ensure_port_free(settings.bind_address, settings.port)
    context = multiprocessing.get_context("spawn")
    children: list = []
    if settings.tags_worker and "tags" in settings.queue_stages:
        ready = context.Event()
        worker = context.Process(target=_tags_worker_main, args=(settings, database_url, ready),
                                 name="pacs-tags-worker", daemon=False)
        worker.start()
        children.append((worker, ready))
        if not _wait_until_ready(worker, ready, stop):
            _stop_children(children)
            return
    if settings.processes <= 1:
        server = start_listener(settings, ingestor)
        log.info("listening", extra={"ae_title": settings.ae_title, "port": server.port,
                                     "address": settings.bind_address, "processes": 1})
        stop.wait()
        server.shutdown()
        _stop_children(children)
        return
    for _ in range(settings.processes):
        ready = context.Event()
        child = context.Process(target=_child_main, args=(settings, database_url, ready),
                                name="pacs-listener", daemon=False)
        child.start()
        children.append((child, ready))
    for child, ready in children:
        if not _wait_until_ready(child, ready, stop):
            stop.set()
    log.info("listening", extra={"ae_title": settings.ae_title, "port": settings.port,
                                 "address": settings.bind_address,
                                 "processes": settings.processes})
    while not stop.wait(0.5):
        if any(not child.is_alive() for child, _ in children):
            log.error("a listener or worker process died; stopping the service")
            break
    _stop_children(children)
