"""HTML report of one tag-clustering run (method.md A.6, the paper's Figure 3).

``service.tags.tag_clusters`` reads a run back from the database into a :class:`ClusterReportData`
and calls :func:`render_cluster_report`, which writes a self-contained folder::

    out_dir/index.html               header, K table, per-cluster table, the plots below
    out_dir/silhouette_by_k.png      weighted mean silhouette against candidate K
    out_dir/silhouette_samples.png   per-profile silhouettes, cluster after cluster
    out_dir/cluster_sizes.png        instances per cluster (whole archive)

With ``montages`` (``service.images.image_report.tag_cluster_montages``) the page also shows a
thumbnail montage of each cluster's members nearest its medoid, embedded in the page.

Tag values come from DICOM files written by anybody, so every piece of text goes through
``html_report.value_text`` (escaped, long values cut); style, sort script and page skeleton
come from :mod:`service.html_report`; the plots show only numbers and cluster labels,
never tag text (matplotlib would interpret ``$...$`` in it as mathtext). Plots are drawn on
a bare :class:`matplotlib.figure.Figure` with the Agg canvas, not pyplot: no global figure
registry, so rendering is thread-safe and nothing has to be closed. Same input, same bytes.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

from service.html_report import MONTAGE_STYLE, bar, page_end, page_start, value_text

__all__ = ["ClusterReportData", "SilhouetteBars", "render_cluster_report",
           "silhouette_bar_layout", "DEFAULT_MAX_BARS"]

DEFAULT_MAX_BARS = 3000
"""At most this many bars in the per-sample silhouette plot (more would not be visible)."""

DPI = 100
MAX_LABELLED_CLUSTERS = 40  # beyond this, per-cluster tick labels would overlap
MISSING = "\u2014"  # em-dash

INDEX_NAME = "index.html"
SILHOUETTE_BY_K_PNG = "silhouette_by_k.png"
SILHOUETTE_SAMPLES_PNG = "silhouette_samples.png"
CLUSTER_SIZES_PNG = "cluster_sizes.png"


# ---------------------------------------------------------------- input


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


@dataclass(frozen=True, eq=False)
class ClusterReportData:
    """Everything the report shows about one run; checked for consistency on construction.

    Parameters
    ----------
    run_id : int
    label : str -- e.g. ``"run 3, 2026-11-25 02:00 UTC"``
    k : int -- chosen K; must be a key of ``k_table`` and the number of medoids
    k_table : dict int -> float -- candidate K -> weighted mean silhouette (method.md A.6)
    sample_labels : ndarray of shape (n,), int -- cluster of each clustered profile
    sample_silhouettes : ndarray of shape (n,), float in [-1, 1] -- for the chosen K
    sample_weights : ndarray of shape (n,), float >= 1 -- instances each profile stands for
    cluster_sizes : dict label -> int -- instances assigned over the whole archive; a
        cluster left out has 0 (a ``GROUP BY`` over assignments omits empty clusters)
    top_values : dict label -> dict column -> list of (value text, instances)
        Most frequent first, per key column (modality, body_part, plane, ...).
    medoid_tags : dict label -> dict column -> value -- the medoid's features, ``None`` (or
        NaN) = missing; its keys are the clusters, so there must be exactly ``k`` of them
    parameters : dict -- run parameters (candidates, max_profiles, feature columns, seed...)
    timings : dict step -> seconds, finite and >= 0
    totals : dict -- e.g. instances, distinct profiles, profiles clustered, loss

    The arrays are stored as read-only copies. Dicts are shown in their insertion order.
    Equality is identity (``eq=False``): field-wise ``==`` on arrays has no truth value.

    Raises
    ------
    ValueError
        On inconsistent input: array lengths differ, ``k`` not in ``k_table``, a label in the
        sample or the sizes that is not a cluster, a silhouette outside [-1, 1], ...
    """

    run_id: int
    label: str
    k: int
    k_table: dict[int, float]
    sample_labels: np.ndarray
    sample_silhouettes: np.ndarray
    sample_weights: np.ndarray
    cluster_sizes: dict[int, int]
    top_values: dict[int, dict[str, list[tuple[str, int]]]]
    medoid_tags: dict[int, dict[str, object]]
    parameters: dict[str, object]
    timings: dict[str, float]
    totals: dict[str, object]

    def __post_init__(self) -> None:
        if not self.k_table:
            raise ValueError("k_table is empty: no candidate K was evaluated")
        for candidate, score in self.k_table.items():
            if not _is_int(candidate) or candidate < 2:
                raise ValueError(f"k_table keys must be integers >= 2, got {candidate!r}")
            if not (isinstance(score, (int, float, np.number)) and math.isfinite(score)
                    and -1.0 - 1e-9 <= score <= 1.0 + 1e-9):
                raise ValueError(f"k_table[{candidate}] = {score!r} is not a silhouette in [-1, 1]")
        if not _is_int(self.k) or self.k not in self.k_table:
            raise ValueError(f"chosen K {self.k!r} is not a candidate in k_table "
                             f"{sorted(int(c) for c in self.k_table)}")

        labels = np.array(self.sample_labels)
        if labels.ndim != 1 or labels.size == 0:
            raise ValueError(f"sample_labels must be a non-empty 1-d array, got shape {labels.shape}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"sample_labels must be integers, got dtype {labels.dtype}")
        silhouettes = np.array(self.sample_silhouettes, dtype=np.float64)
        weights = np.array(self.sample_weights, dtype=np.float64)
        for name, array in (("sample_silhouettes", silhouettes), ("sample_weights", weights)):
            if array.shape != labels.shape:
                raise ValueError(f"{name} has shape {array.shape}, sample_labels {labels.shape}")
        if not np.all(np.isfinite(silhouettes)) or np.any(np.abs(silhouettes) > 1.0 + 1e-9):
            raise ValueError("sample_silhouettes must be finite and in [-1, 1]")
        if not np.all(np.isfinite(weights)) or np.any(weights < 1.0):
            raise ValueError("sample_weights are instance counts: finite and >= 1")

        clusters = set(self.medoid_tags)
        if any(not _is_int(c) for c in clusters):
            raise ValueError("medoid_tags keys (cluster labels) must be integers")
        if len(clusters) != self.k:
            raise ValueError(f"K = {self.k} but medoid_tags has {len(clusters)} clusters")
        unknown = set(np.unique(labels).tolist()) - clusters
        if unknown:
            raise ValueError(f"sample_labels {sorted(unknown)} are not clusters of medoid_tags")
        unknown = set(self.cluster_sizes) - clusters
        if unknown:
            raise ValueError(f"cluster_sizes has labels {sorted(unknown)} that are not clusters")
        for cluster, size in self.cluster_sizes.items():
            if not _is_int(size) or size < 0:
                raise ValueError(f"cluster_sizes[{cluster}] = {size!r} is not a count >= 0")
        unknown = set(self.top_values) - clusters
        if unknown:
            raise ValueError(f"top_values has labels {sorted(unknown)} that are not clusters")
        for cluster, columns in self.top_values.items():
            for column, values in columns.items():
                for value, count in values:
                    if not _is_int(count) or count < 0:
                        raise ValueError(f"top_values[{cluster}][{column!r}]: count {count!r} "
                                         f"of {value!r} is not a count >= 0")
        for step, seconds in self.timings.items():
            if not (isinstance(seconds, (int, float, np.number)) and math.isfinite(seconds)
                    and seconds >= 0):
                raise ValueError(f"timings[{step!r}] = {seconds!r} is not a duration >= 0")

        for name, array in (("sample_labels", labels), ("sample_silhouettes", silhouettes),
                            ("sample_weights", weights)):
            array.setflags(write=False)
            object.__setattr__(self, name, array)

    @property
    def clusters(self) -> list[int]:
        """Cluster labels, ascending: the order of every table and plot."""
        return sorted(int(c) for c in self.medoid_tags)


# ---------------------------------------------------------------- silhouette bar layout


@dataclass(frozen=True, eq=False)
class SilhouetteBars:
    """Geometry of the per-sample silhouette plot (:func:`silhouette_bar_layout`).

    Attributes
    ----------
    order : ndarray of shape (n,), int -- profile indices in drawing order (top to bottom)
    members : ndarray of shape (m,), int -- profiles per bar; bar j stands for
        ``order[sum(members[:j]) : sum(members[:j + 1])]``
    labels : ndarray of shape (m,) -- cluster of each bar
    values : ndarray of shape (m,), float -- silhouette (weighted mean of its profiles)
    bottoms : ndarray of shape (m,), float -- where each bar starts along the stacking axis
    heights : ndarray of shape (m,), float -- thickness = instances the bar stands for
    clusters : ndarray of shape (c,) -- distinct labels, in drawing order (ascending)
    extent : float -- end of the last bar
    """

    order: np.ndarray
    members: np.ndarray
    labels: np.ndarray
    values: np.ndarray
    bottoms: np.ndarray
    heights: np.ndarray
    clusters: np.ndarray
    extent: float

    def cluster_span(self, label: int) -> tuple[float, float]:
        """(start, end) of a cluster's block along the stacking axis."""
        mine = np.flatnonzero(self.labels == label)
        if mine.size == 0:
            raise KeyError(label)
        return float(self.bottoms[mine[0]]), float(self.bottoms[mine[-1]] + self.heights[mine[-1]])


def _bars_per_cluster(counts: np.ndarray, max_bars: int) -> np.ndarray:
    """One bar per profile when they fit; else every cluster gets one bar and the rest of
    the budget is shared in proportion to the profiles beyond the first (largest remainder,
    ties to the earlier cluster), so small clusters stay visible and the total is exactly
    ``max(max_bars, number of clusters)``."""
    if counts.sum() <= max_bars:
        return counts.copy()
    if max_bars <= counts.size:
        return np.ones_like(counts)
    spare = max_bars - counts.size
    wanted = counts - 1
    quota = spare * wanted / wanted.sum()
    extra = np.floor(quota).astype(np.int64)
    leftover = spare - int(extra.sum())
    by_remainder = np.lexsort((np.arange(counts.size), -(quota - extra)))
    extra[by_remainder[:leftover]] += 1
    return 1 + np.minimum(extra, wanted)


def silhouette_bar_layout(
    labels: np.ndarray,
    silhouettes: np.ndarray,
    weights: np.ndarray | None = None,
    *,
    max_bars: int = DEFAULT_MAX_BARS,
    gap: float = 0.0,
) -> SilhouetteBars:
    """Bars of the per-sample silhouette plot, as in the paper's Figure 3 / Rousseeuw (1987).

    Cluster blocks follow each other in ascending label order, ``gap`` apart; inside a block
    the profiles are sorted by silhouette, highest first (ties: lower index first).

    Weights: a bar's thickness is the number of instances it stands for. A profile of weight
    ``w`` is ``w`` identical instances with one silhouette (module ``model_selection``), and
    sorted they would sit next to each other, so the weighted plot is exactly the unweighted
    plot of the expanded instance set: each block's height is its cluster's instance count
    in the sample, and the area left of zero is the instances that fit their cluster badly.
    Profiles standing for few instances become thin, which is what they weigh in the mean.

    Large samples: with more than ``max_bars`` profiles, each cluster's sorted run is cut into
    consecutive groups of (almost) equal numbers of profiles, one bar per group (bars are
    shared out by :func:`_bars_per_cluster`). A group's bar has the group's total weight and
    weighted mean silhouette, so block heights, the order and the overall weighted mean are
    unchanged, and the result is deterministic (no random subsample).

    Parameters
    ----------
    labels : ndarray of shape (n,) -- cluster of each profile
    silhouettes : ndarray of shape (n,)
    weights : ndarray of shape (n,), optional -- instances per profile (default 1)
    max_bars : int >= 1
    gap : float >= 0 -- space between cluster blocks, in instances

    Returns
    -------
    SilhouetteBars
    """
    labels = np.asarray(labels)
    silhouettes = np.asarray(silhouettes, dtype=np.float64)
    n = labels.shape[0] if labels.ndim == 1 else -1
    weights = np.ones(max(n, 0)) if weights is None else np.asarray(weights, dtype=np.float64)
    if labels.ndim != 1 or silhouettes.shape != labels.shape or weights.shape != labels.shape:
        raise ValueError(f"labels, silhouettes and weights must be 1-d of one length, got "
                         f"{labels.shape}, {silhouettes.shape}, {weights.shape}")
    if n == 0:
        raise ValueError("no profiles to lay out")
    if not _is_int(max_bars) or max_bars < 1:
        raise ValueError(f"max_bars must be a positive integer, got {max_bars!r}")
    if not gap >= 0:
        raise ValueError(f"gap must be >= 0, got {gap!r}")

    order = np.lexsort((np.arange(n), -silhouettes, labels))
    clusters, counts = np.unique(labels, return_counts=True)
    bars = _bars_per_cluster(counts, int(max_bars))
    members = np.concatenate([
        np.repeat([q + 1, q], [r, b - r]) for q, r, b in
        ((count // b, count % b, b) for count, b in zip(counts, bars))]).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(members)[:-1]])

    sorted_weights = weights[order]
    heights = np.add.reduceat(sorted_weights, starts)
    sorted_silhouettes = silhouettes[order]
    # A bar of one profile keeps its silhouette exactly (w * s / w need not round-trip).
    values = np.where(members == 1, sorted_silhouettes[starts],
                      np.add.reduceat(sorted_weights * sorted_silhouettes, starts) / heights)
    bar_labels = labels[order][starts]
    block = np.searchsorted(clusters, bar_labels)  # 0, 1, ... per cluster, for the gaps
    bottoms = np.cumsum(heights) - heights + gap * block
    extent = float(bottoms[-1] + heights[-1])
    return SilhouetteBars(order=order, members=members, labels=bar_labels, values=values,
                          bottoms=bottoms, heights=heights, clusters=clusters, extent=extent)


# ---------------------------------------------------------------- plots


def _cluster_colours(n_clusters: int) -> list[tuple[float, float, float, float]]:
    if n_clusters <= 10:
        return [colormaps["tab10"](i) for i in range(n_clusters)]
    if n_clusters <= 20:
        return [colormaps["tab20"](i) for i in range(n_clusters)]
    spectral = colormaps["nipy_spectral"]
    return [spectral(0.05 + 0.9 * i / (n_clusters - 1)) for i in range(n_clusters)]


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def _save_png(figure: Figure, path: Path) -> None:
    # No "Software" entry: the bytes then depend on the drawing, not the matplotlib version.
    figure.savefig(path, format="png", dpi=DPI, metadata={"Software": None})


def _silhouette_by_k_figure(data: ClusterReportData) -> Figure:
    candidates = sorted(int(c) for c in data.k_table)
    scores = [float(data.k_table[c]) for c in candidates]
    figure = _new_figure(7.0, 4.0)
    axes = figure.add_subplot()
    axes.plot(candidates, scores, marker="o", color="#4a7fb5")
    axes.plot([data.k], [float(data.k_table[data.k])], marker="*", markersize=16,
              linestyle="none", color="#d9534f", label=f"chosen K = {data.k}")
    if len(candidates) > 1 and candidates[-1] >= 10 * candidates[0]:
        axes.set_xscale("log")  # the paper's candidates run from 5 to 300
    axes.set_xticks(candidates, [str(c) for c in candidates])
    axes.xaxis.set_minor_locator(NullLocator())
    axes.set_xlabel("K (number of clusters)")
    axes.set_ylabel("weighted mean silhouette")
    axes.set_title(f"Choice of K, run {data.run_id}")
    axes.grid(True, alpha=0.3)
    axes.legend(loc="best")
    figure.tight_layout()
    return figure


def _silhouette_samples_figure(data: ClusterReportData, bars: SilhouetteBars,
                               mean: float) -> Figure:
    n_clusters = bars.clusters.size
    figure = _new_figure(8.0, min(16.0, 4.0 + 0.12 * n_clusters))
    axes = figure.add_subplot()
    colours = dict(zip(data.clusters, _cluster_colours(len(data.clusters))))
    centres = []
    for label in bars.clusters:
        mine = np.flatnonzero(bars.labels == label)
        # One stepped polygon per cluster: no seams between bars, and thousands of bars
        # cost one path instead of thousands of patches.
        edges = np.append(bars.bottoms[mine], bars.bottoms[mine[-1]] + bars.heights[mine[-1]])
        widths = np.append(bars.values[mine], bars.values[mine[-1]])
        colour = colours[int(label)]
        axes.fill_betweenx(edges, 0.0, widths, step="post", facecolor=colour,
                           edgecolor=colour, linewidth=0.3)
        centres.append((edges[0] + edges[-1]) / 2)
    axes.axvline(mean, color="#d9534f", linestyle="--", linewidth=1.2,
                 label=f"weighted mean {mean:.3f}")
    axes.axvline(0.0, color="#555555", linewidth=0.6)
    if n_clusters <= MAX_LABELLED_CLUSTERS:
        axes.set_yticks(centres, [str(int(c)) for c in bars.clusters])
    else:
        axes.set_yticks([])
    axes.set_ylim(bars.extent, 0.0)  # first cluster, best profile, at the top
    axes.set_xlim(min(-0.1, float(bars.values.min()) - 0.05), 1.0)
    axes.set_xlabel("silhouette")
    axes.set_ylabel("cluster (bar thickness = instances)")
    axes.set_title(f"Silhouette per clustered profile, K = {data.k}")
    axes.legend(loc="best")
    figure.tight_layout()
    return figure


def _cluster_sizes_figure(data: ClusterReportData) -> Figure:
    clusters = data.clusters
    sizes = [int(data.cluster_sizes.get(c, 0)) for c in clusters]
    figure = _new_figure(8.0, 4.0)
    axes = figure.add_subplot()
    positions = np.arange(len(clusters))
    axes.bar(positions, sizes, color=_cluster_colours(len(clusters)), width=0.8)
    step = max(1, math.ceil(len(clusters) / MAX_LABELLED_CLUSTERS))
    axes.set_xticks(positions[::step], [str(c) for c in clusters[::step]])
    axes.set_xlabel("cluster")
    axes.set_ylabel("instances")
    axes.set_title(f"Cluster sizes, whole archive, run {data.run_id}")
    axes.grid(True, axis="y", alpha=0.3)
    figure.tight_layout()
    return figure


# ---------------------------------------------------------------- HTML

_STYLE = """
tr.chosen td{background:#fff3cd;font-weight:bold}
table.inner{margin:.2em 0}
img{max-width:100%;height:auto;display:block;margin:.5em 0}
"""  # this page's own rules, after html_report.STYLE


def _is_missing(value: object) -> bool:
    return value is None or (isinstance(value, (float, np.floating)) and math.isnan(value))


def _tag_value(value: object) -> str:
    """A medoid's feature value: em-dash when missing, floats to 6 significant digits."""
    if _is_missing(value):
        return f'<span class="muted">{MISSING}</span>'
    if isinstance(value, (float, np.floating)):
        return f"<code>{float(value):.6g}</code>"
    return f"<code>{value_text(value)}</code>"


def _scalar(value: object) -> str:
    """A header value: counts with thousands separators, floats to 6 significant digits."""
    if _is_missing(value):
        return MISSING
    if _is_int(value):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        return f"{float(value):,.6g}"
    if isinstance(value, (str, bool)):
        return value_text(value)
    return f"<code>{value_text(json.dumps(value, ensure_ascii=False, default=str))}</code>"


def _key_value_table(table_id: str, caption: str, rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{key}</th><td>{value}</td></tr>\n" for key, value in rows)
    return (f'<table id="{table_id}"><caption>{caption}</caption><tbody>\n{body}'
            "</tbody></table>\n")


def _weighted_mean(values: np.ndarray, weights: np.ndarray) -> float:
    return float(np.sum(values * weights) / np.sum(weights))


def render_html(data: ClusterReportData, bars: SilhouetteBars,
                montages: dict[int, str] | None = None) -> str:
    """The page, linking the three PNGs by relative name (see module docstring);
    ``montages``: cluster label -> montage markup (``html_report.montage_html``)."""
    clusters = data.clusters
    labels, silhouettes, weights = (data.sample_labels, data.sample_silhouettes,
                                    data.sample_weights)
    sample_mean = _weighted_mean(silhouettes, weights)
    archive_total = sum(int(data.cluster_sizes.get(c, 0)) for c in clusters)

    out = io.StringIO()
    w = out.write
    style = _STYLE + (MONTAGE_STYLE if montages else "")
    w(page_start(f"Tag clustering run {data.run_id}", style))
    w(f"<h1>Tag clustering, run {data.run_id}</h1>\n"
      f'<p id="summary">{value_text(data.label)}. Chosen K = {data.k}, weighted mean silhouette '
      f"{float(data.k_table[data.k]):.4f}; {labels.size:,} profiles clustered, standing for "
      f"{weights.sum():,.0f} instances; {archive_total:,} instances assigned. "
      "Click a column header to sort.</p>\n")
    w(_key_value_table("totals", "Totals",
                       [(value_text(key), _scalar(value)) for key, value in data.totals.items()]))
    timing_rows = [(value_text(step), f"{float(seconds):,.2f} s")
                   for step, seconds in data.timings.items()]
    if timing_rows:
        timing_rows.append(("all steps", f"{sum(float(s) for s in data.timings.values()):,.2f} s"))
    w(_key_value_table("timings", "Timings", timing_rows))
    w(_key_value_table("parameters", "Parameters",
                       [(value_text(key), _scalar(value))
                        for key, value in data.parameters.items()]))

    w("<h2>Choice of K</h2>\n<p>Weighted mean silhouette of a K-medoids fit for every "
      "candidate K (method.md A.6); the chosen K is highlighted.</p>\n"
      '<table class="sortable" id="k-table"><thead><tr><th>K</th><th>mean silhouette</th>'
      "<th>chosen</th></tr></thead><tbody>\n")
    for candidate in sorted(int(c) for c in data.k_table):
        score = float(data.k_table[candidate])
        chosen = candidate == data.k
        row_class = ' class="chosen"' if chosen else ""
        w(f"<tr{row_class}>"
          f'<td class="n" data-v="{candidate}">{candidate}</td>'
          f'<td class="n" data-v="{score:.6f}">{score:.4f}</td>'
          f'<td>{"chosen" if chosen else ""}</td></tr>\n')
    w(f'</tbody></table>\n<img src="{SILHOUETTE_BY_K_PNG}" alt="mean silhouette against K">\n')

    merged = "" if bars.members.size == labels.size else (
        f" There are more profiles than fit the plot, so each cluster's sorted profiles are "
        f"drawn in consecutive groups: {labels.size:,} profiles as {bars.members.size:,} bars, "
        "each with its group's instances and weighted mean silhouette.")
    w("<h2>Silhouette per clustered profile</h2>\n"
      f"<p>Clusters top to bottom in label order, each cluster's profiles sorted by "
      f"silhouette, highest first. Bar thickness is the number of instances a profile stands "
      f"for, so this is the silhouette plot of the sampled instances. Dashed line: weighted "
      f"mean {sample_mean:.4f}.{merged}</p>\n"
      f'<img src="{SILHOUETTE_SAMPLES_PNG}" alt="silhouette of every clustered profile">\n')

    w("<h2>Clusters</h2>\n"
      f"<p>Instances: assigned to the nearest medoid over the whole archive (share of "
      f"{archive_total:,}). Profiles and mean silhouette: the clustered sample. Missing "
      f"medoid values are shown as {MISSING}.</p>\n"
      f'<img src="{CLUSTER_SIZES_PNG}" alt="instances per cluster">\n'
      '<table class="sortable" id="clusters"><thead><tr><th>cluster</th><th>instances</th>'
      "<th>share</th><th>profiles</th><th>mean silhouette</th><th>top values</th>"
      "<th>medoid</th></tr></thead><tbody>\n")
    for cluster in clusters:
        size = int(data.cluster_sizes.get(cluster, 0))
        share = size / archive_total if archive_total else 0.0
        in_sample = labels == cluster
        profiles = int(in_sample.sum())
        if profiles:
            mean = _weighted_mean(silhouettes[in_sample], weights[in_sample])
            mean_cell = f'<td class="n" data-v="{mean:.6f}">{mean:.4f}</td>'
        else:
            mean_cell = f'<td class="n" data-v="-2">{MISSING}</td>'
        top_lines = []
        for column, values in data.top_values.get(cluster, {}).items():
            shown = ", ".join(
                f"<code>{value_text(value)}</code> {int(count):,}"
                + (f" ({100 * int(count) / size:.1f}%)" if size else "")
                for value, count in values) or MISSING
            top_lines.append(f'<div><span class="muted">{value_text(column)}:</span> {shown}</div>')
        medoid = data.medoid_tags[cluster]
        medoid_rows = "".join(f"<tr><th>{value_text(column)}</th><td>{_tag_value(value)}</td></tr>"
                              for column, value in medoid.items())
        w(f'<tr id="cluster-{cluster}"><td class="n" data-v="{cluster}">{cluster}</td>'
          f'<td class="n" data-v="{size}">{size:,}</td>'
          f'<td data-v="{share:.6f}">{bar(share)}</td>'
          f'<td class="n" data-v="{profiles}">{profiles:,}</td>{mean_cell}'
          f'<td>{"".join(top_lines) or MISSING}</td>'
          f"<td><details><summary>{len(medoid)} tags</summary>"
          f'<table class="inner" id="medoid-{cluster}"><tbody>{medoid_rows}</tbody></table>'
          "</details></td></tr>\n")
    w("</tbody></table>\n")
    if montages:
        w("<h2>Members</h2>\n<p>A sample of each cluster's members, nearest its medoid "
          "first (the medoid itself leads), as the image network sees them; hover a UID for "
          "all of it.</p>\n")
        for cluster in clusters:
            size = int(data.cluster_sizes.get(cluster, 0))
            w(f'<h3 id="members-{cluster}">Cluster {cluster} <span class="muted">'
              f"({size:,} instances)</span></h3>\n")
            w(montages.get(cluster, '<p class="muted">no members</p>\n'))
    w(page_end(check_images=bool(montages)))  # records broken images on <body>
    return out.getvalue()


def render_cluster_report(data: ClusterReportData, out_dir: Path, *,
                          max_bars: int = DEFAULT_MAX_BARS,
                          montages: dict[int, str] | None = None) -> Path:
    """Write ``index.html`` plus the PNG plots into ``out_dir``; return the path of
    ``index.html``.

    ``out_dir`` is created when missing and files of an earlier report there are replaced.
    The page links the plots by relative name, so the folder can be moved or zipped whole.
    ``max_bars`` caps the per-sample silhouette plot (see :func:`silhouette_bar_layout`).
    ``montages``: cluster label -> montage markup, shown in a "Members" section.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Gaps of 1.5 % of the sampled instances per cluster boundary keep the blocks apart
    # without letting K = 300 gaps swamp the bars.
    total_weight = float(data.sample_weights.sum())
    gap = total_weight * min(0.015, 0.3 / max(len(data.clusters), 1))
    bars = silhouette_bar_layout(data.sample_labels, data.sample_silhouettes,
                                 data.sample_weights, max_bars=max_bars, gap=gap)
    mean = _weighted_mean(data.sample_silhouettes, data.sample_weights)
    _save_png(_silhouette_by_k_figure(data), out_dir / SILHOUETTE_BY_K_PNG)
    _save_png(_silhouette_samples_figure(data, bars, mean), out_dir / SILHOUETTE_SAMPLES_PNG)
    _save_png(_cluster_sizes_figure(data), out_dir / CLUSTER_SIZES_PNG)
    index = out_dir / INDEX_NAME
    index.write_text(render_html(data, bars, montages), encoding="utf-8")
    return index
