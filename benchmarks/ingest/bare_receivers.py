"""The ceiling of a pynetdicom receiver: a C-STORE handler that only takes the bytes.

Why the listener has its own protocol loop (docs/ingest.md): run this, then send the harness's
corpus to it with dcmtk, e.g.

    python benchmarks/ingest/bare_receivers.py --port 11300 &
    TCP_NODELAY=1 storescu -aec BARE +sd +r +sp '*.dcm' 127.0.0.1 11300 /tmp/bench_ingest/corpus/small

and compare with the same sender against `pacs-annotate serve` (which also fsyncs and commits).
`--ours` starts our acceptor with the same no-op handler instead.
"""

from __future__ import annotations

import argparse
import threading
import time


def pynetdicom_receiver(port: int) -> None:
    from pynetdicom import AE, _config, evt
    from pynetdicom.sop_class import Verification

    _config.UNRESTRICTED_STORAGE_SERVICE = True

    def handle(event):
        event.encoded_dataset()
        return 0x0000

    ae = AE(ae_title="BARE")
    ae.maximum_pdu_size = 262144
    ae.add_supported_context(Verification)
    ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, handle)])


def our_receiver(port: int) -> None:
    from service.ingest.acceptor import AcceptorConfig, DicomServer

    DicomServer(("127.0.0.1", port), AcceptorConfig(ae_title="BARE"), lambda request: 0).start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=11300)
    parser.add_argument("--ours", action="store_true")
    parser.add_argument("--seconds", type=float, default=600)
    args = parser.parse_args()
    (our_receiver if args.ours else pynetdicom_receiver)(args.port)
    print(f"listening on 127.0.0.1:{args.port}", flush=True)
    threading.Event().wait(args.seconds)
    time.sleep(0)


if __name__ == "__main__":
    main()
