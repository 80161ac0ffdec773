"""One progress bar for the long commands (tqdm): rate and time left on a terminal, nothing
when stderr is not one (a log file, cron, a container's log driver).

Use it around a loop, or with a total and ``update``::

    for path in progress(paths, desc="import", unit="file"):
        ...
    with progress(total=n, desc="reparse", unit="instance") as bar:
        bar.update(len(chunk))

Lines logged while a bar is drawn go above it (``service.logs`` writes through
``tqdm.write`` on a terminal), so bar and log never share a line.
"""

from __future__ import annotations

import sys
from typing import Callable, Iterable, TypeVar

from tqdm import tqdm

__all__ = ["progress", "on_terminal", "counts_callback", "stderr_lines"]

T = TypeVar("T")


def on_terminal() -> bool:
    """True when stderr is an interactive terminal (where a bar can redraw itself)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def progress(iterable: Iterable[T] | None = None, *, total: float | None = None,
             desc: str | None = None, unit: str = "it", quiet: bool = False,
             leave: bool = True, **options) -> tqdm:
    """A tqdm bar on stderr, disabled when ``quiet`` or when stderr is not a terminal.

    A disabled bar accepts every call (and ignores it), so callers need no branches; it
    does not count, so keep your own totals. ``options`` go to :class:`tqdm.tqdm`
    (``initial``, ``postfix``, ...).
    """
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr,
                disable=quiet or not on_terminal(), leave=leave, dynamic_ncols=True,
                unit_scale=unit in ("B", "byte"), smoothing=0.1, **options)


def counts_callback(bar: tqdm) -> Callable[[int, int], None]:
    """A ``(done, total)`` callback that moves ``bar``, for jobs that report counts."""

    seen = 0

    def report(done: int, total: int) -> None:
        nonlocal seen
        if bar.total != total:
            bar.total = total
        bar.update(done - seen)
        seen = done

    return report


def stderr_lines(quiet: bool = False) -> Callable[[str], None] | None:
    """The line callback of the long commands: one line per step on stderr, written above
    a progress bar when one is drawn (never through it); None when ``quiet``."""
    if quiet:
        return None
    return lambda line: tqdm.write(line, file=sys.stderr)
