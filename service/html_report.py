"""Pieces shared by the self-contained HTML reports (``service.tags.analysis``,
``service.tags.cluster_report``, ``service.images.image_report``).

A report is one page with no external assets: :func:`page_start` writes the head with the
shared :data:`STYLE` (plus the page's own rules), :func:`page_end` closes it with
:data:`SORT_SCRIPT`, which makes every ``table.sortable`` sortable by a click on a header.

Text that may come from DICOM files (written by anybody) goes through :func:`value_text`:
escaped for element content and attribute values, and cut to :data:`MAX_VALUE_CHARS`.

Montages (:func:`montage_html`) show images so that a person can judge clusters by looking:
each :class:`Tile` is a small PNG rendered from the stored DICOM file by the project's own
pixel pipeline (:func:`thumbnail_png`: ``pipelines.pixels.file_to_image``, i.e. the same
windowing and fitting the network sees), embedded as a ``data:`` URI so the page stays one
file, with its key tags as caption. A file that cannot be decoded is a placeholder box with
the reason, not a broken ``<img>``. ``page_end(check_images=True)`` adds
:data:`IMAGE_CHECK_SCRIPT`, which records on ``<body>`` how many images the browser failed
to load (``data-broken-images``; the tests read it in headless Chromium).
"""

from __future__ import annotations

import base64
import html
import io
import os
from dataclasses import dataclass

__all__ = ["IMAGE_CHECK_SCRIPT", "MAX_VALUE_CHARS", "MONTAGE_STYLE", "SORTABLE_HEADERS",
           "SORT_SCRIPT", "STYLE", "THUMBNAIL_SIZE", "Tile", "bar", "montage_html", "page_end",
           "page_start", "png_data_uri", "short_uid", "thumbnail_png", "unit_to_png",
           "value_text"]

MAX_VALUE_CHARS = 256  # a value longer than this is shown cut
CUT_MARK = "\u2026"  # ellipsis, after a cut value

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:2px 6px;text-align:left;vertical-align:top}
th{background:#f0f0f0}
table.sortable>thead>tr>th{cursor:pointer;user-select:none}
th.asc:after{content:" \\25B2"} th.desc:after{content:" \\25BC"}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.bar{display:inline-block;width:120px;height:10px;background:#e6eef7;vertical-align:middle;
     margin-right:6px;border:1px solid #bcd}
.bar span{display:block;height:100%;background:#4a7fb5}
code{white-space:pre-wrap;word-break:break-all}
.muted{color:#777}
"""
"""CSS of every report; a page adds its own rules after it (see :func:`page_start`)."""

SORTABLE_HEADERS = "table.sortable > thead > tr > th"
"""The header cells the sort script binds: only the header row of each sortable table itself,
so a table nested in a cell is left alone and no header counts as a column of another table."""

# A click on a header sorts its own table by that header's column (th.cellIndex, its place in
# its own row, not its place among all the page's headers); cells sort by data-v when set.
SORT_SCRIPT = """
document.querySelectorAll("%s").forEach(function (th) {
  th.addEventListener("click", function () {
    var table = th.closest("table"), body = table.tBodies[0], col = th.cellIndex;
    var dir = th.classList.contains("asc") ? -1 : 1;
    Array.from(th.parentNode.cells).forEach(function (h) { h.classList.remove("asc", "desc"); });
    th.classList.add(dir > 0 ? "asc" : "desc");
    var key = function (tr) {
      var td = tr.cells[col], v = td.getAttribute("data-v");
      return v !== null ? parseFloat(v) : td.textContent.toLowerCase();
    };
    Array.from(body.rows).sort(function (a, b) {
      var x = key(a), y = key(b);
      return (x < y ? -1 : x > y ? 1 : 0) * dir;
    }).forEach(function (tr) { body.appendChild(tr); });
  });
});
""" % SORTABLE_HEADERS


def value_text(value: object, limit: int = MAX_VALUE_CHARS) -> str:
    """``str(value)`` cut to ``limit`` characters (then :data:`CUT_MARK`) and escaped, quotes
    included, so the result is safe as element content and as a quoted attribute value.
    Cut before escaping: an entity is never split."""
    text = str(value)
    if len(text) > limit:
        text = text[:limit] + CUT_MARK
    return html.escape(text)


def bar(share: float, *, css: str = "bar") -> str:
    """An inline bar of ``share`` (clamped to [0, 1]) followed by the percentage.
    ``css`` is the bar's class attribute (a constant of the caller, not escaped)."""
    share = min(max(share, 0.0), 1.0)
    return (f'<span class="{css}" title="{100 * share:.1f}%"><span style="width:'
            f'{100 * share:.1f}%"></span></span>{100 * share:.1f}%')


def page_start(title: str, style: str = "") -> str:
    """Doctype and head (``title`` is escaped; ``style`` is the page's own CSS, appended to
    :data:`STYLE`) and the opening ``<body>``."""
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(title)}</title><style>{STYLE}{style}</style></head><body>\n")


def page_end(*, check_images: bool = False) -> str:
    """The sort script (and with ``check_images`` :data:`IMAGE_CHECK_SCRIPT`) and the
    closing tags."""
    check = f"<script>{IMAGE_CHECK_SCRIPT}</script>\n" if check_images else ""
    return f"<script>{SORT_SCRIPT}</script>\n{check}</body></html>\n"


# ---------------------------------------------------------------- montages

THUMBNAIL_SIZE = 96
"""Side of a montage thumbnail in pixels (the image fitted into the square, aspect kept)."""

UID_TAIL = 12
"""A tile shows the last this many characters of a UID (the full UID is its title)."""

MONTAGE_STYLE = """
.montage{display:flex;flex-wrap:wrap;gap:6px;margin:.4em 0 1.2em}
.tile{margin:0;width:%(w)dpx;font-size:11px;line-height:1.25;border:1px solid #ddd;padding:3px;
      background:#fafafa;overflow-wrap:anywhere}
.tile img,.tile .missing{display:block;width:%(s)dpx;height:%(s)dpx;margin:0 auto 2px;
      background:#000}
.tile .missing{background:#fbe9e9;color:#a33;font-size:10px;overflow:hidden;
      box-sizing:border-box;padding:4px;border:1px dashed #d88}
.tile.query{border:2px solid #4a7fb5;background:#eef4fb}
.tile .note{font-weight:bold}
.tile .uid{color:#777}
""" % {"s": THUMBNAIL_SIZE, "w": THUMBNAIL_SIZE + 8}
"""CSS of :func:`montage_html`; a page that shows montages passes it to :func:`page_start`."""

IMAGE_CHECK_SCRIPT = """
window.addEventListener("load", function () {
  var images = Array.from(document.images);
  var broken = images.filter(function (img) { return !img.complete || img.naturalWidth === 0; });
  broken.forEach(function (img) { img.classList.add("broken"); });
  document.body.setAttribute("data-images", String(images.length));
  document.body.setAttribute("data-broken-images", String(broken.length));
});
"""
"""On load: ``<body data-images="N" data-broken-images="B">``, B = images with no pixels."""


@dataclass(frozen=True)
class Tile:
    """One image of a montage.

    ``png``: the thumbnail (None when it could not be made; ``reason`` says why);
    ``caption``: (label, value) pairs, shown escaped, an empty or None value left out;
    ``note``: an optional first line in bold (e.g. a rank and score); ``css``: an extra class
    (a constant of the caller, not escaped), e.g. ``"query"``.
    """

    uid: str
    png: bytes | None
    reason: str | None = None
    caption: tuple[tuple[str, object], ...] = ()
    note: str = ""
    css: str = ""


def unit_to_png(unit, *, greyscale_max: int = 255) -> bytes:
    """A 2-d array of grey values in [0, 1] (clipped) as an 8-bit greyscale PNG."""
    import numpy as np
    from PIL import Image

    grey = np.clip(np.asarray(unit, dtype=np.float32), 0.0, 1.0)
    image = Image.fromarray(np.round(grey * greyscale_max).astype(np.uint8), mode="L")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def thumbnail_png(path: str | os.PathLike[str], *, size: int = THUMBNAIL_SIZE) -> bytes:
    """A DICOM file as a ``size`` x ``size`` greyscale PNG, through the network's own pixel
    pipeline (``pipelines.pixels.file_to_image``: middle frame, rescale, stored or
    percentile window, MONOCHROME1 inverted, fitted on a black square), with the ImageNet
    normalisation undone (channel 0: ``x * std + mean``), so the thumbnail is what the
    model saw. Raises what ``file_to_image`` raises (``NotAnImage``, ``PixelDecodeError``,
    ``FileNotFoundError``)."""
    from pipelines.pixels import IMAGENET_MEAN, IMAGENET_STD, file_to_image

    image = file_to_image(path, size=size)
    return unit_to_png(image[0] * IMAGENET_STD[0] + IMAGENET_MEAN[0])


def png_data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` of PNG bytes (no quotes or markup to escape)."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def short_uid(uid: str, keep: int = UID_TAIL) -> str:
    """The tail of a UID (its distinctive end), with an ellipsis when cut; not escaped."""
    return uid if len(uid) <= keep + 1 else CUT_MARK + uid[-keep:]


def _tile_html(tile: Tile) -> str:
    full = value_text(tile.uid, limit=MAX_VALUE_CHARS)
    if tile.png is not None:
        picture = (f'<img src="{png_data_uri(tile.png)}" width="{THUMBNAIL_SIZE}" '
                   f'height="{THUMBNAIL_SIZE}" alt="{full}" title="{full}">')
    else:
        reason = value_text(tile.reason or "no image")
        picture = (f'<div class="missing" role="img" aria-label="not shown: {reason}" '
                   f'title="{reason}">not shown: {reason}</div>')
    lines = [f'<div class="note">{tile.note}</div>'] if tile.note else []
    lines += [f'<div><span class="muted">{value_text(label)}:</span> '
              f"{value_text(value, limit=60)}</div>"
              for label, value in tile.caption if value not in (None, "")]
    lines.append(f'<div class="uid" title="{full}">{value_text(short_uid(tile.uid))}</div>')
    css = f"tile {tile.css}".strip()
    return (f'<figure class="{css}" data-uid="{full}">{picture}'
            f'<figcaption>{"".join(lines)}</figcaption></figure>')


def montage_html(tiles: list[Tile], *, empty: str = "no images") -> str:
    """A wrapping row of thumbnails with captions (:data:`MONTAGE_STYLE`); ``empty``
    (plain text, escaped) when there are no tiles. ``Tile.note`` is trusted markup of the
    caller (numbers); every other text is escaped."""
    if not tiles:
        return f'<p class="muted">{html.escape(empty)}</p>\n'
    return '<div class="montage">' + "".join(_tile_html(t) for t in tiles) + "</div>\n"
