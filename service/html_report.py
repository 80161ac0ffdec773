"""Pieces shared by the self-contained HTML reports (``service.analysis``,
``service.cluster_report``).

A report is one page with no external assets: :func:`page_start` writes the head with the
shared :data:`STYLE` (plus the page's own rules), :func:`page_end` closes it with
:data:`SORT_SCRIPT`, which makes every ``table.sortable`` sortable by a click on a header.

Text that may come from DICOM files (written by anybody) goes through :func:`value_text`:
escaped for element content and attribute values, and cut to :data:`MAX_VALUE_CHARS`.
"""

from __future__ import annotations

import html

__all__ = ["MAX_VALUE_CHARS", "SORTABLE_HEADERS", "SORT_SCRIPT", "STYLE", "bar", "page_end",
           "page_start", "value_text"]

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


def page_end() -> str:
    """The sort script and the closing tags."""
    return f"<script>{SORT_SCRIPT}</script>\n</body></html>\n"
