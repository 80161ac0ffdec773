"""On-disk store of DenseNet121 feature maps: float16 shards referenced from SQL.

Each worker batch writes one shard, ``<root>/<model>/<yyyy-mm-dd>/<uuid>.npy``, an array of
shape (batch, 1024, 7, 7) float16 that ``numpy.load(..., mmap_mode="r")`` reads without
loading it whole; ``image_features.map_shard`` / ``map_index`` point into it. A shard is
written to a temporary name, flushed, renamed and its directory flushed before the rows
that reference it are committed, so a row never points at a missing or partial shard. A
crash between the two leaves an unreferenced shard, which ``orphan_shards`` lists.

Size: 1024 x 7 x 7 float16 = 100,352 bytes per image plus a 128-byte header per shard:
about 100 GB per million images (the 1024-value vectors in PostgreSQL add ~4 KB each).
"""

from __future__ import annotations

import datetime as dt
import os
import re
import uuid
from pathlib import Path
from typing import Iterable

import numpy as np

from ..ingest.storage import fsync_dir

MAP_DTYPE = np.float16
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def write_shard(root: Path, model_version: str, maps: np.ndarray) -> str:
    """Durably write ``maps`` (B, C, H, W) as float16; returns its path relative to ``root``."""
    folder = Path(_SAFE.sub("_", model_version)) / dt.date.today().isoformat()
    (root / folder).mkdir(parents=True, exist_ok=True)
    relative = folder / f"{uuid.uuid4().hex}.npy"
    final = root / relative
    temporary = final.with_suffix(".tmp")
    with open(temporary, "wb") as handle:
        np.save(handle, np.ascontiguousarray(maps, dtype=MAP_DTYPE), allow_pickle=False)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, final)
    fsync_dir(final.parent)
    return relative.as_posix()


def read_map(root: Path, shard: str, index: int) -> np.ndarray:
    """One image's map (C, H, W) float16, read through a memory map."""
    path = (root / shard).resolve()
    if root.resolve() not in path.parents:
        raise ValueError(f"shard path {shard!r} is outside the feature store")
    return np.array(np.load(path, mmap_mode="r", allow_pickle=False)[index])


def orphan_shards(root: Path, referenced: Iterable[str]) -> list[str]:
    """Shards on disk that no row references (left by a crash between write and commit)."""
    known = set(referenced)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.npy")
                  if p.relative_to(root).as_posix() not in known)
