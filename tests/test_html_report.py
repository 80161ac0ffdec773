"""The pieces shared by the HTML reports (service.html_report)."""

from __future__ import annotations

import html
import json
import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from service import html_report
from service.html_report import (
    MAX_VALUE_CHARS,
    SORT_SCRIPT,
    SORTABLE_HEADERS,
    bar,
    page_end,
    page_start,
    value_text,
)

HOSTILE = "<script>alert('x')</script>\"><img src=x onerror=alert(1)>&amp;"


# ---------------------------------------------------------------- sort script


def test_script_binds_each_tables_own_header_row_by_cell_index():
    assert SORTABLE_HEADERS == "table.sortable > thead > tr > th"
    assert f'document.querySelectorAll("{SORTABLE_HEADERS}")' in SORT_SCRIPT
    assert "col = th.cellIndex" in SORT_SCRIPT
    # The old bug: the forEach index counted header cells across all tables of the page.
    assert "function (th, col)" not in SORT_SCRIPT
    assert 'querySelectorAll("th")' not in SORT_SCRIPT  # clears its own header row only
    assert "th.parentNode.cells" in SORT_SCRIPT


# A minimal DOM, just what the script touches: enough to run it in node and click headers.
_FAKE_DOM = r"""
function el(tag, text, attrs) {
  var node = {tag: tag, textContent: text || "", attrs: attrs || {}, children: [],
              parentNode: null, listeners: {}, classes: new Set()};
  node.classList = {
    contains: function (c) { return node.classes.has(c); },
    add: function (c) { node.classes.add(c); },
    remove: function () {
      for (var i = 0; i < arguments.length; i++) node.classes.delete(arguments[i]);
    }
  };
  node.getAttribute = function (a) { return a in node.attrs ? node.attrs[a] : null; };
  node.addEventListener = function (type, f) {
    (node.listeners[type] = node.listeners[type] || []).push(f);
  };
  node.click = function () { (node.listeners.click || []).forEach(function (f) { f(); }); };
  node.append = function (child) {
    child.parentNode = node; node.children.push(child); return node;
  };
  node.appendChild = function (child) {
    var i = node.children.indexOf(child);
    if (i >= 0) node.children.splice(i, 1);
    return node.append(child);
  };
  node.querySelectorAll = function (tag) {  // descendants, as the old script used
    var out = [];
    node.children.forEach(function (c) {
      if (c.tag === tag) out.push(c);
      out = out.concat(c.querySelectorAll(tag));
    });
    return out;
  };
  node.closest = function (tag) {
    var n = node; while (n && n.tag !== tag) n = n.parentNode; return n;
  };
  Object.defineProperty(node, "cells", {get: function () { return node.children; }});
  Object.defineProperty(node, "rows", {get: function () { return node.children; }});
  Object.defineProperty(node, "tBodies", {get: function () {
    return node.children.filter(function (c) { return c.tag === "tbody"; }); }});
  Object.defineProperty(node, "cellIndex", {get: function () {
    return node.parentNode.children.indexOf(node); }});
  return node;
}
function table(cls, headers, rows) {
  var t = el("table", "", {"class": cls}), head = el("thead"), tr = el("tr"), body = el("tbody");
  headers.forEach(function (h) { tr.append(el("th", h)); });
  rows.forEach(function (r) {
    var row = el("tr");
    r.forEach(function (c) {
      row.append(typeof c === "number" ? el("td", String(c), {"data-v": String(c)}) : el("td", c));
    });
    body.append(row);
  });
  return t.append(head.append(tr)).append(body);
}
var tables = PAGE.map(function (t) { return table(t[0], t[1], t[2]); });
// A table nested in a cell of the first one (like a cluster's medoid table): not sortable.
var inner = table("inner", ["tag", "value"], [["b", 2], ["a", 1]]);
tables[0].tBodies[0].rows[0].cells[0].append(inner);
var all = tables.concat([inner]);
function headers(t) { return t.children[0].children[0].children; }
var document = {querySelectorAll: function (selector) {
  if (selector !== "table.sortable > thead > tr > th") throw new Error("selector " + selector);
  var out = [];
  all.forEach(function (t) {
    if (/\bsortable\b/.test(t.attrs["class"])) out = out.concat(headers(t));
  });
  return out;
}};
"""

_CLICKS = r"""
function column(t, i) {
  return t.tBodies[0].rows.map(function (r) { return r.cells[i].textContent; });
}
var result = [];
CLICKS.forEach(function (c) {
  headers(all[c[0]])[c[1]].click();
  result.push(all.map(function (t, i) { return column(t, c[2][i]); }));
});
console.log(JSON.stringify({result: result, innerBound: headers(inner).some(function (h) {
  return Object.keys(h.listeners).length > 0; })}));
"""


def _run_script(page, clicks):
    """Run SORT_SCRIPT over fake tables in node; return the columns seen after each click.

    page: [(class, headers, rows)]; clicks: [(table index, header index, [column to read per
    table, inner table last])]."""
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        pytest.skip("node is not installed")
    program = (f"var PAGE = {json.dumps(page)}; var CLICKS = {json.dumps(clicks)};\n"
               + _FAKE_DOM + SORT_SCRIPT + _CLICKS)
    done = subprocess.run([node, "-e", program], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_click_sorts_its_own_table_by_its_own_column_in_node():
    page = [
        ("sortable", ["name", "n", "x"], [["b", 2, "q"], ["c", 1, "p"], ["a", 3, "r"]]),
        ("sortable tag", ["value", "instances"], [["y", 10], ["x", 30], ["z", 20]]),
        ("sortable", ["raw", "reason", "instances"], [["r1", "why", 7], ["r2", "how", 5]]),
    ]
    # Read per click: (table 0 col 0, table 1 col 1, table 2 col 2, inner col 0).
    read = [0, 1, 2, 0]
    seen = _run_script(page, [
        [1, 1, read],  # 2nd table, "instances": its 2nd column, ascending
        [1, 1, read],  # again: descending
        [2, 2, read],  # 3rd table, "instances": its 3rd column (5th/8th header of the page)
        [0, 1, read],  # 1st table, "n"
        [1, 0, read],  # 2nd table, "value" (text)
    ])
    assert not seen["innerBound"]
    first, untouched_inner = ["b", "c", "a"], ["b", "a"]
    assert seen["result"] == [
        [first, ["10", "20", "30"], ["7", "5"], untouched_inner],
        [first, ["30", "20", "10"], ["7", "5"], untouched_inner],
        [first, ["30", "20", "10"], ["5", "7"], untouched_inner],
        [["c", "b", "a"], ["30", "20", "10"], ["5", "7"], untouched_inner],
        [["c", "b", "a"], ["30", "10", "20"], ["5", "7"], untouched_inner],  # x, y, z
    ]


# ---------------------------------------------------------------- escaping and cutting


def test_value_text_escapes_hostile_values():
    shown = value_text(HOSTILE)
    assert shown == html.escape(HOSTILE)
    assert not set("<>\"'") & set(shown)  # safe as content and as a quoted attribute
    assert html.unescape(shown) == HOSTILE
    assert value_text(None) == "None" and value_text(42) == "42"
    assert value_text(b"<x>") == "b&#x27;&lt;x&gt;&#x27;"


def test_value_text_cuts_long_values_before_escaping():
    short = "a" * MAX_VALUE_CHARS
    assert value_text(short) == short  # exactly the limit: not cut
    long = "a" * (MAX_VALUE_CHARS - 1) + "<script>" + "b" * 10_000
    shown = value_text(long)
    assert shown == "a" * (MAX_VALUE_CHARS - 1) + "&lt;" + html_report.CUT_MARK
    assert html.unescape(shown)[:-1] == long[:MAX_VALUE_CHARS]
    # Escaping may make the text longer, but never splits an entity.
    assert value_text("&" * 1000, limit=3) == "&amp;&amp;&amp;" + html_report.CUT_MARK
    assert value_text("\U0001F600" * 300).startswith("\U0001F600" * MAX_VALUE_CHARS)


def test_bar_is_clamped():
    assert bar(0.25) == ('<span class="bar" title="25.0%"><span style="width:25.0%">'
                         "</span></span>25.0%")
    assert 'style="width:100.0%"' in bar(3.0) and 'style="width:0.0%"' in bar(-1.0)
    assert bar(0.5, css="bar share").startswith('<span class="bar share"')


# ---------------------------------------------------------------- page skeleton


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.title = ""
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self._in_title = tag == "title"

    def handle_endtag(self, tag):
        self._in_title = False

    def handle_data(self, data):
        if self._in_title:
            self.title += data


def test_page_skeleton_is_self_contained_with_escaped_title():
    text = page_start(HOSTILE, "tr.x{color:red}") + "<p>body</p>\n" + page_end()
    assert text.startswith("<!DOCTYPE html>\n") and text.endswith("</body></html>\n")
    page = _Page()
    page.feed(text)
    assert page.title == HOSTILE  # shown as text
    assert page.tags.count("script") == 1 and "img" not in page.tags
    assert html_report.STYLE + "tr.x{color:red}" in text  # page rules after the shared ones
    assert SORT_SCRIPT in text and "http" not in text
