"""The ``worker`` command: serves one stage's work queue, ``tags`` or ``image``."""

from __future__ import annotations

import argparse

from .common import Settings, command, positive_int


def worker(settings: Settings, *, stage: str, batch: int | None = None,
           drain: bool = False) -> int:
    """Serve the ``stage`` queue until stopped, or with ``drain`` until it is empty; the
    worker's name (host:pid/stage) is what the queue records as the claimer."""
    import os
    import socket

    from .images import image_worker
    from .tags import tags_worker

    name = f"{socket.gethostname()}:{os.getpid()}/{stage}"
    run = image_worker if stage == "image" else tags_worker
    return run(settings, name=name, batch=batch, drain=drain)


def add_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser("worker", parents=[common],
                            help="--stage tags: parse tags of new instances into "
                                 "instance_features (serve runs one too unless "
                                 "PACS_TAGS_WORKER=false); --stage image: DenseNet121 features "
                                 "of stored images (GPU when present); runs until stopped, "
                                 "or with --drain until the queue is empty")
    parser.add_argument("--stage", choices=["tags", "image"], default="tags",
                        help="which work queue to serve")
    parser.add_argument("--batch", type=positive_int, help="items per claim (tags: 200; image: "
                                                           "PACS_IMAGE_BATCH)")
    parser.add_argument("--drain", action="store_true",
                        help="work through what is queued now, with a progress bar, then exit "
                             "(a backlog, a batch job) instead of waiting for new work")
    parser.set_defaults(func=command(worker))
