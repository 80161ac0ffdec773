"""Tag frequency analysis (method.md A.1): counts pushed into PostgreSQL.

For every top-level key of ``instances.tags``: how many instances have it, how many of those
hold an empty value, the missing share, the number of distinct values, the most frequent
values, and for parsed tags the parse failures recorded in ``instance_features``. Each run is
stored in ``tag_analysis_runs`` / ``tag_analysis`` / ``tag_analysis_columns`` and rendered as
CSV and a self-contained HTML page.

Nothing here loads instances into Python: one pass of ``jsonb_each`` over the archive,
chunked by heap page ranges for progress, writes per-(key, value) counts into a temporary
table; per-key statistics and the top values come from that table with aggregates and a
window function. The client only receives the results (a few rows per tag).

    run_id = run_analysis(engine, top=10)
    run = load_run(engine, run_id)
    write_report(run, Path("report"))
"""

from __future__ import annotations

import csv
import html
import io
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, TextIO

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from parsers import FEATURE_COLUMNS, PARSERS
from service.html_report import (  # a top value longer than MAX_VALUE_CHARS is shown cut
    MAX_VALUE_CHARS, bar, page_end, page_start, value_text)

log = logging.getLogger(__name__)


# A value counts as missing when the key is absent or holds one of these.
_EMPTY = "('null'::jsonb, '\"\"'::jsonb, '[]'::jsonb, '{}'::jsonb)"
_VALUE_TEXT = ("CASE jsonb_typeof(value) WHEN 'string' THEN value #>> '{}' "
               "ELSE value::text END")


class AnalysisError(Exception):
    """An analysis run that cannot be found or could not finish."""


@dataclass(frozen=True)
class TagStats:
    keyword: str
    present: int  # instances with the key, whatever its value
    empty: int  # of those, instances whose value is null, "", [] or {}
    missing_share: float  # (absent + empty) / instances
    distinct_values: int  # distinct non-empty values
    top_values: tuple[tuple[str, int], ...]  # (value as text, instances), most frequent first
    is_unique_per_record: bool
    parse_failures: int | None = None  # instances with a failure; None: tag is not parsed
    failure_examples: tuple[dict[str, Any], ...] = ()  # {raw, reason, count}

    @property
    def non_empty(self) -> int:
        return self.present - self.empty


@dataclass(frozen=True)
class ColumnStats:
    column: str
    source: str
    kind: str
    present: int  # instances with a parsed (non-null) value
    missing_share: float | None  # over instances that have features; None when none do
    parse_failures: int


@dataclass(frozen=True)
class AnalysisRun:
    id: int
    started_at: datetime
    finished_at: datetime | None
    status: str
    instances: int | None
    feature_instances: int | None
    parameters: dict[str, Any]
    tags: tuple[TagStats, ...] = field(default=())
    columns: tuple[ColumnStats, ...] = field(default=())

    def tag(self, keyword: str) -> TagStats:
        for stats in self.tags:
            if stats.keyword == keyword:
                return stats
        raise KeyError(keyword)

    def column(self, name: str) -> ColumnStats:
        for stats in self.columns:
            if stats.column == name:
                return stats
        raise KeyError(name)


# ---------------------------------------------------------------- counting in SQL

_COUNT_PART = """
INSERT INTO _tag_value_parts (key, value, n)
SELECT e.key, CASE WHEN e.value IN {empty} THEN NULL ELSE e.value END, count(*)
FROM instances i CROSS JOIN LATERAL jsonb_each(i.tags) AS e
{where}
GROUP BY 1, 2
"""

_TAG_STATS = f"""
INSERT INTO tag_analysis (run_id, keyword, present, empty, missing_share, distinct_values,
                          top_values, is_unique_per_record)
SELECT :run, s.key, s.present, s.empty,
       (:instances - s.present + s.empty)::float8 / :instances,
       s.distinct_values, coalesce(t.top, '[]'::jsonb),
       s.distinct_values > 1 AND s.distinct_values >= :ratio * (s.present - s.empty)
FROM (SELECT key, sum(n)::bigint AS present,
             coalesce(sum(n) FILTER (WHERE value IS NULL), 0)::bigint AS empty,
             count(value) AS distinct_values
      FROM {{values}} GROUP BY key) AS s
LEFT JOIN (
    SELECT key, jsonb_agg(jsonb_build_object('value', left(txt, {MAX_VALUE_CHARS}), 'count', n)
                          ORDER BY rank) AS top
    FROM (SELECT key, n, {_VALUE_TEXT} AS txt,
                 row_number() OVER (PARTITION BY key ORDER BY n DESC, value) AS rank
          FROM {{values}} WHERE value IS NOT NULL) AS ranked
    WHERE rank <= :top GROUP BY key
) AS t USING (key)
"""

_FAILURES = """
CREATE TEMP TABLE _failures ON COMMIT DROP AS
SELECT f.sop_instance_uid, x->>'keyword' AS keyword, x->>'column' AS column_name,
       x->>'raw' AS raw, x->>'reason' AS reason
FROM instance_features f CROSS JOIN LATERAL jsonb_array_elements(f.parse_failures) AS x
WHERE f.parse_failures <> '[]'::jsonb
"""

_TAG_FAILURES = """
UPDATE tag_analysis a SET parse_failures = coalesce(c.n, 0),
                          failure_examples = coalesce(e.examples, '[]'::jsonb)
FROM (SELECT unnest(CAST(:parsed AS text[])) AS keyword) AS p
LEFT JOIN (SELECT keyword, count(DISTINCT sop_instance_uid) AS n FROM _failures
           GROUP BY keyword) AS c USING (keyword)
LEFT JOIN (
    SELECT keyword, jsonb_agg(jsonb_build_object('raw', raw, 'reason', reason, 'count', n)
                              ORDER BY rank) AS examples
    FROM (SELECT keyword, raw, reason, count(DISTINCT sop_instance_uid) AS n,
                 row_number() OVER (PARTITION BY keyword
                                    ORDER BY count(DISTINCT sop_instance_uid) DESC, raw,
                                             reason) AS rank
          FROM _failures GROUP BY keyword, raw, reason) AS ranked
    WHERE rank <= :examples GROUP BY keyword
) AS e USING (keyword)
WHERE a.run_id = :run AND a.keyword = p.keyword
"""


def _progress_line(progress: TextIO | None, text: str, *, end: str = "\n") -> None:
    if progress is not None:
        print(text, end=end, file=progress, flush=True)


def run_analysis(engine: Engine, *, top: int = 10, unique_ratio: float = 0.95,
                 examples: int = 5, chunks: int = 16, work_mem: str | None = None,
                 progress: TextIO | None = sys.stderr) -> int:
    """Count every top-level tag of the archive; returns the id of the stored run.

    ``top`` values per tag are kept, ``examples`` failure examples per parsed tag. A tag is
    unique per record when it has more than one distinct value and at least
    ``unique_ratio`` times as many distinct values as instances with a value. The archive
    is read in ``chunks`` heap page ranges (for progress; 1 reads it in one statement), all
    in one repeatable-read snapshot, so instances arriving meanwhile are not half counted.
    ``work_mem`` (e.g. ``"256MB"``) is set for this transaction only: more memory per hash
    aggregate on the server before it spills to disk.
    """
    if top < 1 or examples < 0 or chunks < 1 or not 0 < unique_ratio <= 1:
        raise ValueError("top >= 1, examples >= 0, chunks >= 1 and 0 < unique_ratio <= 1")
    parameters = {"top": top, "unique_ratio": unique_ratio, "examples": examples,
                  "chunks": chunks, "work_mem": work_mem}
    with engine.begin() as conn:
        run_id = conn.execute(sa.text(
            "INSERT INTO tag_analysis_runs (parameters) VALUES (CAST(:p AS jsonb)) RETURNING id"),
            {"p": json.dumps(parameters)}).scalar_one()
    started = time.monotonic()
    try:
        with engine.connect() as conn:
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                if work_mem:
                    conn.execute(sa.text("SELECT set_config('work_mem', :m, true)"),
                                 {"m": work_mem})
                instances, feature_instances = _analyse(
                    conn, run_id, top=top, unique_ratio=unique_ratio, examples=examples,
                    chunks=chunks, progress=progress, started=started)
                conn.execute(sa.text(
                    "UPDATE tag_analysis_runs SET status = 'done', finished_at = clock_timestamp(), "
                    "instances = :i, feature_instances = :f WHERE id = :run"),
                    {"i": instances, "f": feature_instances, "run": run_id})
    except BaseException as exc:
        with engine.begin() as conn:
            conn.execute(sa.text(
                "UPDATE tag_analysis_runs SET status = 'failed', finished_at = clock_timestamp(), "
                "error = :e WHERE id = :run"), {"e": f"{type(exc).__name__}: {exc}", "run": run_id})
        raise
    log.info("tag analysis finished", extra={"run": run_id, "instances": instances,
                                             "seconds": round(time.monotonic() - started, 1)})
    return run_id


def _analyse(conn: sa.Connection, run_id: int, *, top: int, unique_ratio: float, examples: int,
             chunks: int, progress: TextIO | None, started: float) -> tuple[int, int]:
    def elapsed() -> str:
        return f"{time.monotonic() - started:,.1f}s"

    instances = conn.execute(sa.text("SELECT count(*) FROM instances")).scalar_one()
    pages = conn.execute(sa.text(
        "SELECT pg_relation_size('instances') / current_setting('block_size')::int")).scalar_one()
    chunks = max(1, min(chunks, pages))
    conn.execute(sa.text("CREATE TEMP TABLE _tag_value_parts (key text, value jsonb, n bigint) "
                         "ON COMMIT DROP"))
    step = math.ceil(pages / chunks) if pages else 0
    from tqdm import tqdm

    bar = tqdm(total=chunks, desc=f"analyze: counting tag values of {instances:,} instances",
               unit="chunk", file=progress, disable=progress is None, dynamic_ncols=True)
    for index in range(chunks):
        if chunks == 1:
            where = ""
        elif index == chunks - 1:  # open end: a page added since is invisible to the snapshot
            where = f"WHERE i.ctid >= '({index * step},0)'::tid"
        else:
            where = (f"WHERE i.ctid >= '({index * step},0)'::tid "
                     f"AND i.ctid < '({(index + 1) * step},0)'::tid")
        conn.execute(sa.text(_COUNT_PART.format(empty=_EMPTY, where=where)))
        bar.update()
    bar.close()
    if chunks > 1:  # a value seen in several chunks has one partial count per chunk
        conn.execute(sa.text("CREATE TEMP TABLE _tag_values ON COMMIT DROP AS "
                             "SELECT key, value, sum(n)::bigint AS n FROM _tag_value_parts "
                             "GROUP BY key, value"))
        table = "_tag_values"
    else:
        table = "_tag_value_parts"
    _progress_line(progress, f"analyze: per-tag statistics and top {top} values ({elapsed()})")
    if instances:
        conn.execute(sa.text(_TAG_STATS.replace("{values}", table)),
                     {"run": run_id, "instances": instances, "ratio": unique_ratio, "top": top})

    _progress_line(progress, f"analyze: parse failures and feature columns ({elapsed()})")
    counts = conn.execute(sa.text(
        "SELECT count(*), " + ", ".join(f'count("{c.name}")' for c in FEATURE_COLUMNS)
        + " FROM instance_features")).one()
    feature_instances = counts[0]
    conn.execute(sa.text(_FAILURES))
    conn.execute(sa.text(_TAG_FAILURES), {"run": run_id, "parsed": sorted(PARSERS),
                                          "examples": examples})
    column_failures = dict(conn.execute(sa.text(
        "SELECT column_name, count(*) FROM _failures GROUP BY column_name")).all())
    rows = [{"run_id": run_id, "column_name": c.name, "source": c.source, "kind": c.kind,
             "present": present,
             "missing_share": (1 - present / feature_instances) if feature_instances else None,
             "parse_failures": column_failures.get(c.name, 0)}
            for c, present in zip(FEATURE_COLUMNS, counts[1:])]
    conn.execute(sa.text(
        "INSERT INTO tag_analysis_columns (run_id, column_name, source, kind, present, "
        "missing_share, parse_failures) VALUES (:run_id, :column_name, :source, :kind, "
        ":present, :missing_share, :parse_failures)"), rows)
    _progress_line(progress, f"analyze: run {run_id} done ({elapsed()})")
    return instances, feature_instances


# ---------------------------------------------------------------- reading runs back


def latest_run_id(engine: Engine) -> int | None:
    with engine.connect() as conn:
        return conn.execute(sa.text(
            "SELECT max(id) FROM tag_analysis_runs WHERE status = 'done'")).scalar()


def load_run(engine: Engine, run_id: int | None = None) -> AnalysisRun:
    """A stored run with its tag and column rows; the latest finished one by default."""
    if run_id is None:
        run_id = latest_run_id(engine)
        if run_id is None:
            raise AnalysisError("no finished analysis run; run `pacs-annotate analyze` first")
    with engine.connect() as conn:
        head = conn.execute(sa.text(
            "SELECT id, started_at, finished_at, status, instances, feature_instances, "
            "parameters FROM tag_analysis_runs WHERE id = :run"), {"run": run_id}).one_or_none()
        if head is None:
            raise AnalysisError(f"no analysis run {run_id}")
        tags = tuple(
            TagStats(keyword=r.keyword, present=r.present, empty=r.empty,
                     missing_share=r.missing_share, distinct_values=r.distinct_values,
                     top_values=tuple((v["value"], v["count"]) for v in r.top_values),
                     is_unique_per_record=r.is_unique_per_record,
                     parse_failures=r.parse_failures,
                     failure_examples=tuple(r.failure_examples or ()))
            for r in conn.execute(sa.text(
                "SELECT * FROM tag_analysis WHERE run_id = :run ORDER BY keyword"),
                {"run": run_id}))
        order = {c.name: i for i, c in enumerate(FEATURE_COLUMNS)}
        columns = sorted(
            (ColumnStats(column=r.column_name, source=r.source, kind=r.kind, present=r.present,
                         missing_share=r.missing_share, parse_failures=r.parse_failures)
             for r in conn.execute(sa.text(
                 "SELECT * FROM tag_analysis_columns WHERE run_id = :run"), {"run": run_id})),
            key=lambda c: (order.get(c.column, len(order)), c.column))
    return AnalysisRun(id=head.id, started_at=head.started_at, finished_at=head.finished_at,
                       status=head.status, instances=head.instances,
                       feature_instances=head.feature_instances, parameters=head.parameters,
                       tags=tags, columns=tuple(columns))


# ---------------------------------------------------------------- reports

CSV_FIELDS = ("keyword", "present", "empty", "missing_share", "distinct_values",
              "is_unique_per_record", "parse_failures", "top_values", "failure_examples")
COLUMN_CSV_FIELDS = ("column", "source", "kind", "present", "missing_share", "parse_failures")


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def write_csv(run: AnalysisRun, out: TextIO) -> None:
    """One row per tag; top values and failure examples as JSON text."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    for t in run.tags:
        writer.writerow([
            t.keyword, t.present, t.empty, f"{t.missing_share:.6f}", t.distinct_values,
            "true" if t.is_unique_per_record else "false",
            "" if t.parse_failures is None else t.parse_failures,
            _json([{"value": v, "count": n} for v, n in t.top_values]),
            _json(list(t.failure_examples)),
        ])


def write_columns_csv(run: AnalysisRun, out: TextIO) -> None:
    """One row per parsed feature column."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMN_CSV_FIELDS)
    for c in run.columns:
        writer.writerow([c.column, c.source, c.kind, c.present,
                         "" if c.missing_share is None else f"{c.missing_share:.6f}",
                         c.parse_failures])


_STYLE = """
.bar span{background:#d9534f}
.bar.share span{background:#4a7fb5}
"""  # this page's own rules, after html_report.STYLE: missing shares red, value shares blue


def _num(value: int | float | None, shown: str | None = None) -> str:
    if value is None:
        return '<td class="n" data-v="-1"></td>'
    return f'<td class="n" data-v="{value}">{shown if shown is not None else f"{value:,}"}</td>'


def _anchor(keyword: str) -> str:
    return "tag-" + "".join(ch if ch.isalnum() else "_" for ch in keyword)


def render_html(run: AnalysisRun) -> str:
    """A self-contained page: a sortable summary table, the parsed columns, and one table of
    top values per tag. No external assets."""
    e = html.escape
    out = io.StringIO()
    w = out.write
    w(page_start(f"Tag analysis run {run.id}", _STYLE))
    w(f"<h1>Tag analysis, run {run.id}</h1>\n<p>{run.instances or 0:,} instances "
      f"({run.feature_instances or 0:,} with parsed features), {len(run.tags)} tags; "
      f"started {e(str(run.started_at))}, finished {e(str(run.finished_at))}, status "
      f"{e(run.status)}; parameters <code>{e(_json(run.parameters))}</code>. "
      "Missing = absent, null or empty. Click a column header to sort.</p>\n")

    w('<h2>All tags</h2>\n<table class="sortable" id="summary"><thead><tr><th>tag</th>'
      "<th>present</th><th>missing</th><th>distinct</th><th>unique per record</th>"
      "<th>parse failures</th><th>most frequent value</th></tr></thead><tbody>\n")
    for t in run.tags:
        first = (f"<code>{value_text(t.top_values[0][0])}</code> ({t.top_values[0][1]:,})"
                 if t.top_values else '<span class="muted">-</span>')
        w(f'<tr><td><a href="#{_anchor(t.keyword)}">{e(t.keyword)}</a></td>{_num(t.present)}'
          f'<td data-v="{t.missing_share:.6f}">{bar(t.missing_share)}</td>'
          f'{_num(t.distinct_values)}<td>{"yes" if t.is_unique_per_record else "no"}</td>'
          f"{_num(t.parse_failures)}<td>{first}</td></tr>\n")
    w("</tbody></table>\n")

    if run.columns:
        w('<h2>Parsed feature columns</h2>\n<table class="sortable" id="columns"><thead><tr>'
          "<th>column</th><th>source</th><th>kind</th><th>present</th><th>missing</th>"
          "<th>parse failures</th></tr></thead><tbody>\n")
        for c in run.columns:
            missing = (f'<td data-v="{c.missing_share:.6f}">{bar(c.missing_share)}</td>'
                       if c.missing_share is not None else '<td data-v="-1"></td>')
            w(f"<tr><td>{e(c.column)}</td><td>{e(c.source)}</td><td>{e(c.kind)}</td>"
              f"{_num(c.present)}{missing}{_num(c.parse_failures)}</tr>\n")
        w("</tbody></table>\n")

    w("<h2>Top values per tag</h2>\n")
    for t in run.tags:
        w(f'<h3 id="{_anchor(t.keyword)}">{e(t.keyword)}</h3>\n<p>{t.present:,} present, '
          f"{t.empty:,} empty, {t.distinct_values:,} distinct, missing "
          f"{100 * t.missing_share:.1f}%{'; unique per record' if t.is_unique_per_record else ''}"
          "</p>\n")
        w(f'<table class="sortable tag" id="values-{_anchor(t.keyword)}"><thead><tr>'
          "<th>value</th><th>instances</th><th>share of instances</th></tr></thead><tbody>\n")
        total = run.instances or 1
        for value, count in t.top_values:
            w(f"<tr><td><code>{value_text(value)}</code></td>{_num(count)}"
              f'<td data-v="{count / total:.6f}">{bar(count / total, css="bar share")}</td>'
              "</tr>\n")
        w("</tbody></table>\n")
        if t.parse_failures:
            w(f"<p>{t.parse_failures:,} instances failed to parse; examples:</p>\n"
              '<table class="sortable failures"><thead><tr><th>raw value</th><th>reason</th>'
              "<th>instances</th></tr></thead><tbody>\n")
            for example in t.failure_examples:
                w(f"<tr><td><code>{e(str(example.get('raw')))}</code></td>"
                  f"<td>{e(str(example.get('reason')))}</td>{_num(example.get('count'))}</tr>\n")
            w("</tbody></table>\n")
    w(page_end())
    return out.getvalue()


def write_report(run: AnalysisRun, directory: Path, *, csv_report: bool = True,
                 html_report: bool = True) -> list[Path]:
    """Write ``tags.csv`` + ``columns.csv`` and/or ``report.html`` into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if csv_report:
        for name, writer in (("tags.csv", write_csv), ("columns.csv", write_columns_csv)):
            path = directory / name
            with path.open("w", encoding="utf-8", newline="") as handle:
                writer(run, handle)
            written.append(path)
    if html_report:
        path = directory / "report.html"
        path.write_text(render_html(run), encoding="utf-8")
        written.append(path)
    return written


def format_summary(run: AnalysisRun, *, limit: int | None = None) -> str:
    """A plain-text table of the tags, least missing first (for the terminal)."""
    rows: Iterable[TagStats] = sorted(run.tags, key=lambda t: (t.missing_share, t.keyword))
    rows = list(rows)[:limit] if limit else list(rows)
    lines = [f"run {run.id}: {run.instances or 0:,} instances, {len(run.tags)} tags",
             f"{'tag':40} {'present':>10} {'missing':>8} {'distinct':>10} {'failures':>9}"]
    for t in rows:
        lines.append(f"{t.keyword[:40]:40} {t.present:>10,} {100 * t.missing_share:>7.1f}% "
                     f"{t.distinct_values:>10,} "
                     f"{'' if t.parse_failures is None else f'{t.parse_failures:,}':>9}"
                     f"{'  unique' if t.is_unique_per_record else ''}")
    return "\n".join(lines)
