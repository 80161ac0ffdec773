"""Tag clustering runs in PostgreSQL and the nightly ``recluster`` job.

The maths is in ``pipelines`` (Gower distance, weighted K-medoids, silhouette; method.md
A.4-A.7); this module moves data between it and the database:

1. **Fit.** The distinct feature profiles come out of SQL already grouped (``GROUP BY`` over
   the selected columns, with the instance count of each), so a million instances cost a few
   thousand rows on the wire. ``fit_tag_clusters`` chooses K by weighted silhouette and fits
   weighted K-medoids; the run stores the K table, the medoids (their feature values and an
   instance that has them), the frozen numeric ranges and the sample's silhouettes.
2. **Assign.** The instances are split into key ranges of ``sop_instance_uid``
   (``tag_cluster_partitions``); each partition is read, encoded with the medoids'
   vocabularies and assigned to its nearest medoid (O(n K)) on Dask workers, then written
   with its partition marked done in one transaction. An interrupted run resumes with the
   partitions that are not done.
3. **Match.** New clusters take the labels of the previous active run's clusters they share
   most instances with (Hungarian matching, ``pipelines.label_matching``).
4. **Switch.** Only a finished run becomes active; the views ``instance_tag_cluster`` and
   ``tag_clusters`` always show the active run. Instances that arrived meanwhile are
   assigned right after the switch; from then on the tags worker assigns each new instance
   to the active run's nearest medoid as soon as its tags are parsed.

A session-level PostgreSQL advisory lock makes sure two ``recluster`` jobs never overlap.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from parsers import FEATURE_COLUMNS
from parsers.selection import FeatureSelection, default_selection
from pipelines.gower import GowerData, NumericRanges, encode_features, gower_to_medoids
from pipelines.label_matching import match_labels
from pipelines.tag_clustering import (MIN_PROFILES_PER_CLUSTER, PAPER_CANDIDATES, fit_tag_clusters,
                                      outlier_threshold)
from ..logs import log_progress

log = logging.getLogger(__name__)

RECLUSTER_LOCK_KEY = 7436512005
"""pg advisory lock held by a running ``recluster`` (``migrate`` uses 7436512001)."""

_KIND = {c.name: c.kind for c in FEATURE_COLUMNS}
_KEY_COLUMNS = ("modality", "body_part", "plane", "pixel_spacing_row", "manufacturer",
                "sop_class")
"""Columns whose most frequent values the report lists per cluster."""


class ReclusterError(RuntimeError):
    """A clustering run that cannot start or could not finish."""


class ReclusterLocked(ReclusterError):
    """Another ``recluster`` holds the advisory lock."""


Progress = Callable[[str], None]


@dataclass(frozen=True)
class ReclusterOptions:
    """Parameters of a run; stored with it (``tag_cluster_runs.parameters``)."""

    selection: FeatureSelection = field(default_factory=default_selection)
    candidates: tuple[int, ...] = PAPER_CANDIDATES
    max_profiles: int = 5000
    min_profiles_per_cluster: int = MIN_PROFILES_PER_CLUSTER
    random_state: int = 0
    partition_rows: int = 50_000
    scheduler: str | None = None
    n_workers: int | None = None
    processes: bool = True
    keep_runs: int = 3
    force: bool = False
    restart: bool = False

    def to_parameters(self) -> dict[str, Any]:
        return {"candidates": list(self.candidates), "max_profiles": self.max_profiles,
                "min_profiles_per_cluster": self.min_profiles_per_cluster,
                "random_state": self.random_state, "partition_rows": self.partition_rows}


@dataclass(frozen=True)
class RunSummary:
    run_id: int
    status: str  # "finished", or "skipped" when nothing changed since the active run
    k: int | None
    silhouette: float | None
    instances: int
    assigned: int
    relabelled: dict[int, int]  # medoid index -> stable label
    timings: dict[str, float]


# ------------------------------------------------------------------ the stored model


def _quoted(columns: Sequence[str]) -> str:
    return ", ".join(f'"{c}"' for c in columns)


@dataclass(frozen=True)
class StoredTagModel:
    """What assigning an instance needs, rebuilt from a run's rows (method.md A.7).

    Category codes come from the medoids' own values: equality with a medoid is all the
    Gower distance to a medoid asks of a categorical feature, so a value no medoid has gets
    a fresh code and never matches, exactly as with the fit data's vocabulary.
    """

    run_id: int
    numeric_columns: tuple[str, ...]
    categorical_columns: tuple[str, ...]
    medoids: GowerData
    ranges: NumericRanges
    labels: np.ndarray  # stable label of each medoid index

    @property
    def columns(self) -> tuple[str, ...]:
        return self.numeric_columns + self.categorical_columns

    def encode(self, rows: Sequence[Sequence[Any]]) -> GowerData:
        """Encode rows whose values are in ``columns`` order (None = missing)."""
        return _encode_rows(rows, len(self.numeric_columns), len(self.columns),
                            vocabularies=self.medoids.vocabularies)

    def assign(self, data: GowerData) -> tuple[np.ndarray, np.ndarray]:
        """Nearest medoid index and Gower distance of every row."""
        return gower_to_medoids(data, self.medoids, ranges=self.ranges)


def _value_array(rows: Sequence[Sequence[Any]], n_columns: int) -> np.ndarray:
    return np.array(rows, dtype=object).reshape(len(rows), n_columns)


def _encode_rows(rows: Sequence[Sequence[Any]], n_numeric: int, n_columns: int, *,
                 vocabularies: Sequence[Sequence[Any]] | None = None) -> GowerData:
    """Raw rows (numeric columns first, None = missing; ``encode_features`` reads None in
    a numeric object column as NaN) to Gower form."""
    values = _value_array(rows, n_columns)
    return encode_features(values[:, :n_numeric], values[:, n_numeric:],
                           vocabularies=vocabularies)


def _split_columns(columns: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    numeric = tuple(c for c in columns if _KIND[c] == "numeric")
    categorical = tuple(c for c in columns if _KIND[c] != "numeric")
    return numeric, categorical


def load_model(conn: sa.Connection, run_id: int) -> StoredTagModel:
    run = conn.execute(sa.text("SELECT model FROM tag_cluster_runs WHERE id = :id"),
                       {"id": run_id}).scalar_one_or_none()
    if not run:
        raise ReclusterError(f"tag clustering run {run_id} has no fitted model")
    numeric_columns = tuple(run["numeric_columns"])
    categorical_columns = tuple(run["categorical_columns"])
    medoid_rows = conn.execute(sa.text(
        "SELECT medoid_index, label, features FROM tag_cluster_medoids WHERE run_id = :id "
        "ORDER BY medoid_index"), {"id": run_id}).all()
    columns = numeric_columns + categorical_columns
    medoids = _encode_rows([[features.get(c) for c in columns] for _, _, features in medoid_rows],
                           len(numeric_columns), len(columns))
    labels = np.array([-1 if label is None else label for _, label, _ in medoid_rows])
    ranges = NumericRanges(np.asarray(run["ranges"]["low"], dtype=np.float64),
                           np.asarray(run["ranges"]["high"], dtype=np.float64))
    return StoredTagModel(run_id, numeric_columns, categorical_columns, medoids, ranges,
                          labels)


# ------------------------------------------------------------------ reading features


def _data_version(conn: sa.Connection) -> dict[str, Any]:
    count, latest = conn.execute(sa.text(
        "SELECT count(*), max(parsed_at) FROM instance_features")).one()
    return {"instances": int(count), "latest_parsed_at": latest.isoformat() if latest else None}


def load_profiles(conn: sa.Connection, numeric_columns: Sequence[str],
                  categorical_columns: Sequence[str]):
    """The distinct feature profiles, grouped in SQL (NULLs group together, as missing
    values group in ``distinct_profiles``), with their instance counts and one instance each.
    """
    columns = tuple(numeric_columns) + tuple(categorical_columns)
    result = conn.execute(sa.text(
        f"SELECT {_quoted(columns)}, count(*) AS n, min(sop_instance_uid) AS example "
        f"FROM instance_features GROUP BY {_quoted(columns)} ORDER BY n DESC, example"))
    rows = result.all()
    values = _value_array([row[:len(columns)] for row in rows], len(columns))
    counts = np.array([row[-2] for row in rows], dtype=np.float64)
    examples = [row[-1] for row in rows]
    return values, counts, examples


def _json_value(value: Any) -> Any:
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else float(value)
    return value


# ------------------------------------------------------------------ the job


@dataclass
class _Run:
    id: int
    status: str
    parameters: dict[str, Any]
    selection: FeatureSelection
    timings: dict[str, float]


def _say(progress: Progress | None, message: str) -> None:
    log_progress(log, progress, message)


def _open_run(conn: sa.Connection, options: ReclusterOptions,
              progress: Progress | None) -> _Run | None:
    unfinished = conn.execute(sa.text(
        "SELECT id, status, parameters, feature_selection, timings FROM tag_cluster_runs "
        "WHERE status IN ('fitting', 'assigning', 'matching') ORDER BY id DESC")).all()
    for row in unfinished:
        if options.restart or row is not unfinished[0]:
            conn.execute(sa.text(
                "UPDATE tag_cluster_runs SET status = 'failed', finished_at = now(), "
                "error = coalesce(error, 'abandoned by a later run') WHERE id = :id"),
                {"id": row.id})
            _say(progress, f"run {row.id} abandoned")
    if unfinished and not options.restart:
        row = unfinished[0]
        _say(progress, f"resuming run {row.id} ({row.status})")
        return _Run(row.id, row.status, dict(row.parameters),
                    FeatureSelection.from_dict(row.feature_selection), dict(row.timings))

    version = _data_version(conn)
    if version["instances"] == 0:
        raise ReclusterError("no parsed instances to cluster (instance_features is empty)")
    active = conn.execute(sa.text(
        "SELECT id, parameters, feature_selection FROM tag_cluster_runs WHERE is_active"
    )).one_or_none()
    parameters = {**options.to_parameters(), "data": version}
    # the same data, feature columns and parameters would give the same run again
    if (active is not None and not options.force
            and active.parameters.get("data") == version
            and list(active.feature_selection.get("columns", [])) == list(options.selection.columns)
            and {k: active.parameters.get(k) for k in options.to_parameters()}
            == options.to_parameters()):
        return None
    run_id = conn.execute(sa.text(
        "INSERT INTO tag_cluster_runs (status, previous_run_id, parameters, feature_selection, "
        "instances) VALUES ('fitting', :previous, CAST(:parameters AS jsonb), "
        "CAST(:selection AS jsonb), :instances) RETURNING id"),
        {"previous": active.id if active is not None else None,
         "parameters": json.dumps(parameters),
         "selection": options.selection.to_json(),
         "instances": version["instances"]}).scalar_one()
    _say(progress, f"run {run_id}: {version['instances']:,} instances, "
                   f"{len(options.selection.columns)} feature columns")
    return _Run(run_id, "fitting", parameters, options.selection, {})


def _fit(engine: Engine, run: _Run, progress: Progress | None) -> None:
    started = time.perf_counter()
    numeric_columns, categorical_columns = _split_columns(run.selection.columns)
    with engine.connect() as conn:
        values, counts, examples = load_profiles(conn, numeric_columns, categorical_columns)
    loaded = time.perf_counter()
    _say(progress, f"run {run.id}: {len(counts):,} distinct profiles of "
                   f"{int(counts.sum()):,} instances")
    data = encode_features(values[:, :len(numeric_columns)], values[:, len(numeric_columns):])
    candidates = tuple(run.parameters["candidates"])
    model = fit_tag_clusters(data, counts=counts, candidates=candidates,
                             max_profiles=run.parameters["max_profiles"],
                             random_state=run.parameters["random_state"],
                             min_profiles_per_cluster=run.parameters.get(
                                 "min_profiles_per_cluster", MIN_PROFILES_PER_CLUSTER))
    fitted = time.perf_counter()
    skipped = [k for k in candidates if k not in model.silhouettes]
    _say(progress, f"run {run.id}: K = {model.k} (silhouette "
                   f"{model.silhouettes[model.k]:.3f}), "
                   + ", ".join(f"K={k}: {s:.3f}" for k, s in sorted(model.silhouettes.items()))
                   + (f"; K <= {model.k_bound} for {model.n_profiles_clustered:,} profiles, "
                      f"not tried: {', '.join(map(str, skipped))}" if skipped else ""))

    columns = numeric_columns + categorical_columns
    sample = {"labels": model.sample_labels.tolist(),
              "silhouettes": [round(float(s), 6) for s in model.sample_silhouettes],
              "weights": model.sample_weights.tolist()}
    medoid_rows = []
    for index, row in enumerate(model.medoid_rows):
        members = model.sample_labels == index
        weight = model.sample_weights[members]
        medoid_rows.append({
            "run_id": run.id, "medoid_index": index, "sop_instance_uid": examples[row],
            "features": json.dumps({c: _json_value(v) for c, v in zip(columns, values[row])}),
            "sample_weight": float(weight.sum()),
            "silhouette": (float(np.average(model.sample_silhouettes[members], weights=weight))
                           if weight.sum() > 0 else None)})
    stored_model = {"numeric_columns": list(numeric_columns),
                    "categorical_columns": list(categorical_columns),
                    "ranges": {"low": model.ranges.low.tolist(),
                               "high": model.ranges.high.tolist()},
                    "k_bound": model.k_bound}
    run.timings.update({"load_profiles": loaded - started, "fit": fitted - loaded})
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM tag_cluster_medoids WHERE run_id = :id"),
                     {"id": run.id})
        conn.execute(sa.text(
            "INSERT INTO tag_cluster_medoids (run_id, medoid_index, sop_instance_uid, features, "
            "sample_weight, silhouette) VALUES (:run_id, :medoid_index, :sop_instance_uid, "
            "CAST(:features AS jsonb), :sample_weight, :silhouette)"), medoid_rows)
        conn.execute(sa.text(
            "UPDATE tag_cluster_runs SET status = 'assigning', k = :k, silhouette = :s, "
            "k_table = CAST(:table AS jsonb), loss = :loss, profiles = :profiles, "
            "profiles_clustered = :clustered, model = CAST(:model AS jsonb), "
            "sample = CAST(:sample AS jsonb), timings = CAST(:timings AS jsonb) WHERE id = :id"),
            {"id": run.id, "k": model.k, "s": model.silhouettes[model.k],
             "table": json.dumps({str(k): v for k, v in sorted(model.silhouettes.items())}),
             "loss": model.inertia, "profiles": model.n_profiles,
             "clustered": model.n_profiles_clustered, "model": json.dumps(stored_model),
             "sample": json.dumps(sample), "timings": json.dumps(run.timings)})
        _plan_partitions(conn, run.id, run.parameters["partition_rows"])
    run.status = "assigning"


def _plan_partitions(conn: sa.Connection, run_id: int, rows_per_partition: int) -> None:
    """Split the instances into key ranges of about ``rows_per_partition`` rows each.

    The first range is open below and the last open above, so instances that arrive while
    the run assigns still fall into some range.
    """
    bounds = conn.execute(sa.text(
        "SELECT sop_instance_uid FROM (SELECT sop_instance_uid, row_number() OVER "
        "(ORDER BY sop_instance_uid) AS n FROM instance_features) numbered "
        "WHERE n % :rows = 0 ORDER BY sop_instance_uid"),
        {"rows": rows_per_partition}).scalars().all()
    edges = [None, *bounds, None]
    conn.execute(sa.text("DELETE FROM tag_cluster_partitions WHERE run_id = :id"),
                 {"id": run_id})
    conn.execute(sa.text(
        "INSERT INTO tag_cluster_partitions (run_id, partition, lower_uid, upper_uid) "
        "VALUES (:run_id, :partition, :lower, :upper)"),
        [{"run_id": run_id, "partition": i, "lower": lower, "upper": upper}
         for i, (lower, upper) in enumerate(zip(edges[:-1], edges[1:]))])


# ------------------------------------------------------------------ partitions (on workers)


@dataclass(frozen=True)
class Partition:
    """Instances with ``lower < sop_instance_uid <= upper`` (None: open end)."""

    run_id: int
    index: int
    lower: str | None
    upper: str | None


_ENGINES: dict[str, Engine] = {}


def _worker_engine(url: str) -> Engine:
    """One small engine per worker process and database."""
    from ..database.engine import create_db_engine

    engine = _ENGINES.get(url)
    if engine is None:
        engine = _ENGINES[url] = create_db_engine(url, pool_size=1)
    return engine


def _range_condition(partition: Partition) -> str:
    conditions = ["true"]
    if partition.lower is not None:
        conditions.append("sop_instance_uid > :lower")
    if partition.upper is not None:
        conditions.append("sop_instance_uid <= :upper")
    return " AND ".join(conditions)


def assign_partition(url: str, model: StoredTagModel, partition: Partition) -> int:
    """Read, assign and write one partition in one transaction; returns its row count.

    Runs inside a Dask worker. Reading and writing in the same transaction pins the rows
    that were assigned; a repeated partition (a retried task, a resumed run) replaces its
    earlier rows.
    """
    bind = {"run": partition.run_id, "lower": partition.lower, "upper": partition.upper,
            "partition": partition.index}
    where = _range_condition(partition)
    with _worker_engine(url).begin() as conn:
        rows = conn.execute(sa.text(
            f"SELECT sop_instance_uid, {_quoted(model.columns)} FROM instance_features "
            f"WHERE {where} ORDER BY sop_instance_uid"), bind).all()
        uids = [row[0] for row in rows]
        medoid, distance = model.assign(model.encode([row[1:] for row in rows]))
        conn.execute(sa.text(
            f"DELETE FROM tag_cluster_assignments WHERE run_id = :run AND {where}"), bind)
        _insert_assignments(conn, partition.run_id, uids, medoid, distance)
        conn.execute(sa.text(
            "UPDATE tag_cluster_partitions SET done_at = now(), rows = :rows "
            "WHERE run_id = :run AND partition = :partition"), {**bind, "rows": len(uids)})
    return len(uids)


def _insert_assignments(conn: sa.Connection, run_id: int, uids: Sequence[str],
                        medoid: np.ndarray, distance: np.ndarray, *,
                        on_conflict: str = "") -> None:
    if not uids:
        return
    conn.execute(sa.text(
        "INSERT INTO tag_cluster_assignments (run_id, sop_instance_uid, medoid_index, distance) "
        "SELECT :run, u, m, d FROM unnest(CAST(:uids AS text[]), CAST(:medoids AS smallint[]), "
        f"CAST(:distances AS real[])) AS t(u, m, d) {on_conflict}"),
        {"run": run_id, "uids": list(uids), "medoids": [int(m) for m in medoid],
         "distances": [float(d) for d in distance]})


def _run_partitions(url: str, model: StoredTagModel, partitions: Sequence[Partition],
                    options: ReclusterOptions, progress: Progress | None) -> int:
    """Assign the partitions on Dask: a local cluster, or ``options.scheduler``."""
    from functools import partial

    from pipelines.tag_clustering import PartitionAssignmentError, run_partition_tasks

    from ..progress import counts_callback, on_terminal
    from ..progress import progress as progress_bar

    bar = progress_bar(total=len(partitions), desc=f"run {model.run_id}: assign",
                       unit="partition", quiet=progress is None)
    move_bar = counts_callback(bar)

    def report(done: int, total: int) -> None:
        move_bar(done, total)
        if not on_terminal() or done == total:  # the bar says it on a terminal
            _say(progress, f"run {model.run_id}: {done}/{total} partitions assigned")

    try:
        with bar:
            return run_partition_tasks(partial(assign_partition, url), model, partitions,
                                       scheduler=options.scheduler, n_workers=options.n_workers,
                                       processes=options.processes, progress=report)
    except PartitionAssignmentError as exc:
        raise ReclusterError(str(exc)) from exc
    finally:
        # thread workers (processes=False) left their engine in this process
        engine = _ENGINES.pop(url, None)
        if engine is not None:
            engine.dispose()


def _assign(engine: Engine, url: str, run: _Run, options: ReclusterOptions,
            progress: Progress | None) -> None:
    started = time.perf_counter()
    with engine.connect() as conn:
        model = load_model(conn, run.id)
        pending = [Partition(run.id, row.partition, row.lower_uid, row.upper_uid)
                   for row in conn.execute(sa.text(
                       "SELECT partition, lower_uid, upper_uid FROM tag_cluster_partitions "
                       "WHERE run_id = :id AND done_at IS NULL ORDER BY partition"),
                       {"id": run.id})]
    _say(progress, f"run {run.id}: {len(pending)} partitions to assign")
    if pending:
        _run_partitions(url, model, pending, options, progress)
    run.timings["assign"] = run.timings.get("assign", 0.0) + time.perf_counter() - started
    with engine.begin() as conn:
        conn.execute(sa.text(
            "UPDATE tag_cluster_runs SET status = 'matching', timings = CAST(:t AS jsonb) "
            "WHERE id = :id"), {"id": run.id, "t": json.dumps(run.timings)})
    run.status = "matching"


def _match_and_switch(engine: Engine, run: _Run, options: ReclusterOptions,
                      progress: Progress | None) -> dict[int, int]:
    started = time.perf_counter()
    with engine.begin() as conn:
        previous = conn.execute(sa.text(
            "SELECT id FROM tag_cluster_runs WHERE is_active")).scalar_one_or_none()
        model = load_model(conn, run.id)
        # instances that arrived after the partitions were planned
        late = assign_unassigned(conn, model)
        # the outlier threshold from the run's own distances (as stored: float4)
        threshold = outlier_threshold(np.fromiter(conn.execute(sa.text(
            "SELECT distance FROM tag_cluster_assignments WHERE run_id = :id"),
            {"id": run.id}).scalars(), dtype=np.float32))
        threshold = None if math.isnan(threshold) else threshold
        # one pass over the run's assignments for every cluster's size, mean distance and
        # outliers
        counted = conn.execute(sa.text(
            "SELECT medoid_index, count(*), avg(distance), count(*) FILTER "
            "(WHERE distance > :t) FROM tag_cluster_assignments "
            "WHERE run_id = :id GROUP BY medoid_index"), {"id": run.id, "t": threshold}).all()
        stats = {index: (n, mean) for index, n, mean, _ in counted}
        outliers = {index: n for index, _, _, n in counted}
        k = len(model.labels)
        size_array = np.array([stats.get(i, (0, None))[0] for i in range(k)])
        previous_labels = np.array([], dtype=np.int64)
        if previous is not None:
            previous_labels = np.array(conn.execute(sa.text(
                "SELECT label FROM tag_cluster_medoids WHERE run_id = :id ORDER BY label"),
                {"id": previous}).scalars().all(), dtype=np.int64)
        column_of = {label: j for j, label in enumerate(previous_labels)}
        overlap = np.zeros((k, len(previous_labels)), dtype=np.int64)
        if previous is not None:
            for medoid_index, label, shared in conn.execute(sa.text(
                    "SELECT n.medoid_index, pm.label, count(*) FROM tag_cluster_assignments n "
                    "JOIN tag_cluster_assignments p ON p.run_id = :previous "
                    "AND p.sop_instance_uid = n.sop_instance_uid "
                    "JOIN tag_cluster_medoids pm ON pm.run_id = p.run_id "
                    "AND pm.medoid_index = p.medoid_index "
                    "WHERE n.run_id = :id GROUP BY 1, 2"), {"id": run.id, "previous": previous}):
                overlap[medoid_index, column_of[label]] = shared
        reserved = np.array(conn.execute(sa.text(
            "SELECT DISTINCT label FROM tag_cluster_medoids WHERE label IS NOT NULL "
            "AND run_id <> :id"), {"id": run.id}).scalars().all(), dtype=np.int64)
        labels = match_labels(overlap, previous_labels, reserved_labels=reserved,
                              sizes=size_array)
        conn.execute(sa.text(
            "UPDATE tag_cluster_medoids SET label = NULL WHERE run_id = :id"), {"id": run.id})
        conn.execute(sa.text(
            "UPDATE tag_cluster_medoids SET label = :label, instances = :instances, "
            "previous_overlap = :overlap, mean_distance = :mean, outliers = :outliers "
            "WHERE run_id = :id AND medoid_index = :index"),
            [{"id": run.id, "index": i, "label": int(labels[i]),
              "instances": int(size_array[i]), "mean": stats.get(i, (0, None))[1],
              "outliers": int(outliers.get(i, 0)),
              "overlap": (int(overlap[i, column_of[labels[i]]])
                          if labels[i] in column_of else None)}
             for i in range(k)])
        # The FOR UPDATE waits for tags workers that are assigning to the old run right now
        # (they hold FOR SHARE on it), so none of them writes to it after the switch.
        conn.execute(sa.text("SELECT id FROM tag_cluster_runs WHERE is_active FOR UPDATE"))
        conn.execute(sa.text("UPDATE tag_cluster_runs SET is_active = false WHERE is_active"))
        run.timings["match"] = time.perf_counter() - started
        conn.execute(sa.text(
            "UPDATE tag_cluster_runs SET status = 'finished', is_active = true, "
            "finished_at = now(), previous_run_id = :previous, assigned = :assigned, "
            "outlier_distance = :threshold, timings = CAST(:t AS jsonb), error = NULL "
            "WHERE id = :id"),
            {"id": run.id, "previous": previous, "assigned": int(size_array.sum()),
             "threshold": threshold, "t": json.dumps(run.timings)})
    run.status = "finished"
    with engine.begin() as conn:
        # tags workers that waited for the switch skipped their batch; pick it up here
        late += assign_unassigned(conn, model)
    if late:
        _say(progress, f"run {run.id}: {late:,} instances that arrived during the run assigned")
    if threshold is not None:
        _say(progress, f"run {run.id}: {sum(outliers.values()):,} instances fit no cluster "
                       f"(outliers: distance to their medoid > {threshold:.4f}, Q3 + 3 IQR of the "
                       "run's non-zero distances)")
    kept = sum(1 for i in range(k) if labels[i] in column_of)
    _say(progress, f"run {run.id}: active; {kept} of {k} clusters kept their label "
                   f"from run {previous}" if previous else f"run {run.id}: active")
    return {i: int(labels[i]) for i in range(k)}


def assign_unassigned(conn: sa.Connection, model: StoredTagModel, *,
                      limit: int | None = None) -> int:
    """Assign instances that have features but no assignment in ``model``'s run (those that
    arrived after a run planned its partitions, or while the active run switched)."""
    rows = conn.execute(sa.text(
        "SELECT f.sop_instance_uid, " + ", ".join(f'f."{c}"' for c in model.columns)
        + " FROM instance_features f WHERE NOT EXISTS (SELECT 1 FROM tag_cluster_assignments a "
        "WHERE a.run_id = :run AND a.sop_instance_uid = f.sop_instance_uid) LIMIT :limit"),
        {"run": model.run_id, "limit": limit}).all()
    if rows:
        medoid, distance = model.assign(model.encode([row[1:] for row in rows]))
        _insert_assignments(conn, model.run_id, [row[0] for row in rows], medoid, distance,
                            on_conflict="ON CONFLICT DO NOTHING")
    return len(rows)


def _prune(engine: Engine, keep_runs: int) -> int:
    """Drop the assignments of all but the newest ``keep_runs`` finished runs (the active
    one always stays); runs and medoids stay as history."""
    with engine.begin() as conn:
        return conn.execute(sa.text(
            "DELETE FROM tag_cluster_assignments WHERE run_id IN (SELECT id FROM "
            "tag_cluster_runs WHERE NOT is_active AND (status = 'failed' OR id NOT IN "
            "(SELECT id FROM tag_cluster_runs WHERE status = 'finished' ORDER BY id DESC "
            "LIMIT :keep)))"), {"keep": max(keep_runs, 1)}).rowcount


def _record_failure(engine: Engine, run_id: int, error: BaseException) -> None:
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE tag_cluster_runs SET error = :e WHERE id = :id"),
                         {"id": run_id, "e": f"{type(error).__name__}: {error}"})
    except sa.exc.SQLAlchemyError:
        log.exception("could not record the failure of run %s", run_id)


class _AdvisoryLock:
    """Session-level advisory lock on its own connection, held for the whole job."""

    def __init__(self, engine: Engine, key: int):
        self.engine, self.key = engine, key
        self._conn: sa.Connection | None = None

    def __enter__(self) -> "_AdvisoryLock":
        conn = self.engine.connect()
        if not conn.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": self.key}).scalar():
            conn.close()
            raise ReclusterLocked("another recluster is running (PostgreSQL advisory lock "
                                  f"{self.key} is held); this one did nothing")
        conn.commit()
        self._conn = conn
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._conn is not None
        try:
            self._conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
            self._conn.commit()
        finally:
            self._conn.close()


def recluster(engine: Engine, url: str, options: ReclusterOptions = ReclusterOptions(), *,
              progress: Progress | None = None) -> RunSummary:
    """Run (or resume) one tag clustering run to the end and make it the active run.

    Raises :class:`ReclusterLocked` when another job runs, :class:`ReclusterError` when the
    run cannot start or fails (the run keeps its finished steps and resumes next time).
    """
    started = time.perf_counter()
    with _AdvisoryLock(engine, RECLUSTER_LOCK_KEY):
        with engine.begin() as conn:
            run = _open_run(conn, options, progress)
        if run is None:
            with engine.connect() as conn:
                active = conn.execute(sa.text(
                    "SELECT id, k, silhouette, instances, assigned, timings FROM "
                    "tag_cluster_runs WHERE is_active")).one()
            _say(progress, f"nothing changed since run {active.id}; nothing to do "
                           "(--force runs anyway)")
            return RunSummary(active.id, "skipped", active.k, active.silhouette,
                              active.instances or 0, active.assigned or 0, {}, {})
        try:
            if run.status == "fitting":
                _fit(engine, run, progress)
            if run.status == "assigning":
                _assign(engine, url, run, options, progress)
            labels = _match_and_switch(engine, run, options, progress)
        except Exception as exc:
            _record_failure(engine, run.id, exc)
            raise ReclusterError(f"run {run.id} failed during {run.status}: "
                                 f"{type(exc).__name__}: {exc}") from exc
        pruned = _prune(engine, options.keep_runs)
        if pruned:
            _say(progress, f"dropped {pruned:,} assignments of older runs")
        with engine.connect() as conn:
            row = conn.execute(sa.text(
                "SELECT k, silhouette, instances, assigned, timings FROM tag_cluster_runs "
                "WHERE id = :id"), {"id": run.id}).one()
    timings = {**row.timings, "total": time.perf_counter() - started}
    return RunSummary(run.id, "finished", row.k, row.silhouette, row.instances or 0,
                      row.assigned or 0, labels, timings)


# ------------------------------------------------------------------ new instances


class ActiveModelCache:
    """The active run's model for the tags worker, reloaded when the active run changes."""

    def __init__(self) -> None:
        self._model: StoredTagModel | None = None

    def active(self, conn: sa.Connection) -> StoredTagModel | None:
        """The active model, with the run row share-locked until ``conn``'s transaction
        ends, so a concurrent switch waits for this transaction's assignments."""
        run_id = conn.execute(sa.text(
            "SELECT id FROM tag_cluster_runs WHERE is_active FOR SHARE")).scalar_one_or_none()
        if run_id is None:
            return None
        if self._model is None or self._model.run_id != run_id:
            self._model = load_model(conn, run_id)
        return self._model


def assign_new_instances(conn: sa.Connection, cache: ActiveModelCache,
                         feature_rows: Sequence[Mapping[str, Any]]) -> int:
    """Assign freshly parsed instances to the active run's nearest medoid (method.md A.7)."""
    if not feature_rows:
        return 0
    model = cache.active(conn)
    if model is None:
        return 0
    rows = [[row.get(c) for c in model.columns] for row in feature_rows]
    medoid, distance = model.assign(model.encode(rows))
    _insert_assignments(conn, model.run_id, [row["sop_instance_uid"] for row in feature_rows],
                        medoid, distance,
                        on_conflict="ON CONFLICT (run_id, sop_instance_uid) DO UPDATE SET "
                                    "medoid_index = EXCLUDED.medoid_index, "
                                    "distance = EXCLUDED.distance, assigned_at = now()")
    return len(rows)


# ------------------------------------------------------------------ report


def report_data(engine: Engine, run_id: int | None = None, *, top: int = 5):
    """A run read back for :func:`service.tags.cluster_report.render_cluster_report` (default: the
    active run). Top values of the key columns are counted over the run's assignments."""
    from .cluster_report import ClusterReportData

    with engine.connect() as conn:
        if run_id is None:
            run_id = conn.execute(sa.text(
                "SELECT id FROM tag_cluster_runs WHERE is_active")).scalar_one_or_none()
            if run_id is None:
                raise ReclusterError("no active tag clustering run: run `recluster` first")
        run = conn.execute(sa.text("SELECT * FROM tag_cluster_runs WHERE id = :id"),
                           {"id": run_id}).mappings().one_or_none()
        if run is None:
            raise ReclusterError(f"no tag clustering run {run_id}")
        if run["status"] != "finished":
            raise ReclusterError(f"run {run_id} is {run['status']}, not finished")
        medoids = conn.execute(sa.text(
            "SELECT medoid_index, label, features, instances FROM tag_cluster_medoids "
            "WHERE run_id = :id ORDER BY medoid_index"), {"id": run_id}).all()
        outliers = conn.execute(sa.text(
            "SELECT sum(outliers) FROM tag_cluster_medoids WHERE run_id = :id"),
            {"id": run_id}).scalar()
        key_columns = [c for c in _KEY_COLUMNS if c in run["model"]["numeric_columns"]
                       or c in run["model"]["categorical_columns"]]
        counted = conn.execute(sa.text(
            "SELECT m.label, x.col, x.value, count(*) AS n FROM tag_cluster_assignments a "
            "JOIN tag_cluster_medoids m ON m.run_id = a.run_id AND m.medoid_index = a.medoid_index "
            "JOIN instance_features f ON f.sop_instance_uid = a.sop_instance_uid "
            "CROSS JOIN LATERAL (VALUES "
            + ", ".join(f"('{c}', f.\"{c}\"::text)" for c in key_columns)
            + ") AS x(col, value) WHERE a.run_id = :id GROUP BY 1, 2, 3 "
            "ORDER BY 1, 2, n DESC, 3"), {"id": run_id}).all() if key_columns else []
    label_of = {index: label for index, label, _, _ in medoids}
    top_values: dict[int, dict[str, list[tuple[str, int]]]] = {}
    for label, column, value, n in counted:
        values = top_values.setdefault(label, {}).setdefault(column, [])
        if len(values) < top:
            values.append(("(missing)" if value is None else value, int(n)))
    sample = run["sample"]
    finished = run["finished_at"]
    return ClusterReportData(
        run_id=run_id,
        label=f"run {run_id}, {finished:%Y-%m-%d %H:%M %Z}" if finished else f"run {run_id}",
        k=run["k"],
        k_table={int(k): float(v) for k, v in run["k_table"].items()},
        sample_labels=np.array([label_of[i] for i in sample["labels"]], dtype=np.int64),
        sample_silhouettes=np.asarray(sample["silhouettes"], dtype=np.float64),
        sample_weights=np.asarray(sample["weights"], dtype=np.float64),
        cluster_sizes={label: int(n or 0) for _, label, _, n in medoids},
        top_values=top_values,
        medoid_tags={label: dict(features) for _, label, features, _ in medoids},
        parameters={**run["parameters"],
                    "feature columns": ", ".join(run["feature_selection"].get("columns", []))},
        timings=dict(run["timings"]),
        totals={"instances": run["instances"], "assigned": run["assigned"],
                "distinct profiles": run["profiles"],
                "profiles clustered": run["profiles_clustered"],
                "loss (weighted, clustered profiles)": run["loss"],
                "largest K tried (profiles / min. profiles per cluster)":
                    run["model"].get("k_bound"),
                "outliers (fit no cluster)": None if outliers is None else int(outliers),
                "outlier distance (Q3 + 3 IQR of non-zero distances)": run["outlier_distance"],
                "previous run": run["previous_run_id"]},
    )
