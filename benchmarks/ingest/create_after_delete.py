"""What creating a file costs right after many files were deleted, with and without
``.incoming``'s top-folder flag (``service.ingest.storage.mark_top_directory``).

    .venv/bin/python benchmarks/ingest/create_after_delete.py [--root DIR] [--files N]

Each round makes ``<root>/storage/.incoming/<spare folder>`` the way the service does,
creates N empty files in it, then deletes the whole tree, as the benchmark harness does
between runs.  Rounds alternate between a plain ``.incoming`` with a fixed spare folder
name (the layout before the second speed-up round) and a top-folder ``.incoming`` with a new name per round
(the service's layout now).  On ext4 without a journal the first kind keeps landing in
the block group the previous round's files were freed in.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from service.ingest.storage import mark_top_directory  # noqa: E402


def one_round(root: Path, files: int, top_folder: bool) -> tuple[float, int, bool]:
    incoming = root / "storage" / ".incoming"
    incoming.mkdir(parents=True)
    marked = mark_top_directory(incoming) if top_folder else False
    folder = incoming / (f"spare-{os.getpid()}.{secrets.token_hex(4)}.a" if top_folder
                         else "spare-a")
    folder.mkdir()
    start = time.perf_counter()
    for index in range(files):
        os.close(os.open(folder / f"{index}.tmp", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640))
    per_file = (time.perf_counter() - start) / files
    inode = folder.stat().st_ino
    shutil.rmtree(root / "storage")
    return per_file, inode, marked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/bench_ingest/run/create-probe"))
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    shutil.rmtree(args.root, ignore_errors=True)
    one_round(args.root, args.files, False)  # leave freshly deleted inodes behind
    for _ in range(args.rounds):
        for top_folder in (False, True):
            per_file, inode, marked = one_round(args.root, args.files, top_folder)
            layout = "top folder, new name" if top_folder else "plain, fixed name   "
            print(f"{layout}: {per_file * 1e6:6.0f} us per create "
                  f"(folder inode {inode}{', flag set' if marked else ''})")
    shutil.rmtree(args.root, ignore_errors=True)


if __name__ == "__main__":
    main()
