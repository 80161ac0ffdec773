"""HTML report of a tag-clustering run: contents checked against a real little clustering."""

from __future__ import annotations

import dataclasses
import html
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.kmedoids import KMedoids
from pipelines.model_selection import choose_k, silhouette_samples
from service.tags.cluster_report import (
    ClusterReportData,
    render_cluster_report,
    silhouette_bar_layout,
)

HOSTILE = "<script>alert('x')</script>"
HOSTILE_ATTRIBUTE = '"><img src=x onerror=alert(1)>'


# ---------------------------------------------------------------- a real clustering


def _clustering(seed: int = 7) -> ClusterReportData:
    """Three blobs of 12 weighted profiles, K chosen from {2, 3, 4, 5} by weighted silhouette.

    Each profile carries a modality (by blob, one of them hostile), a body part (sometimes
    missing) and its coordinates as numeric tags; whole-archive sizes are 3 x the sampled
    instances plus the label, so they differ from the sample.
    """
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
    points = np.concatenate([rng.normal(c, 0.5, size=(12, 2)) for c in centres])
    weights = rng.integers(1, 20, size=points.shape[0]).astype(float)
    distances = np.sqrt(((points[:, None, :] - points[None, :, :]) ** 2).sum(axis=-1))
    k, table = choose_k(distances, (2, 3, 4, 5), sample_weight=weights, random_state=0)
    model = KMedoids(k, random_state=0).fit(distances, sample_weight=weights)
    labels = model.labels_
    silhouettes = silhouette_samples(distances, labels, sample_weight=weights)

    modality = np.repeat(np.array(["CT", "MR", HOSTILE], dtype=object), 12)
    body_part = np.array([["CHEST", "HEAD", None][i % 3] for i in range(points.shape[0])],
                         dtype=object)
    body_part[model.medoid_indices_[0]] = None  # one medoid with a missing value

    top_values, medoid_tags, sizes = {}, {}, {}
    for cluster, medoid in enumerate(model.medoid_indices_):
        members = labels == cluster
        sizes[cluster] = int(3 * weights[members].sum()) + cluster
        columns = {}
        for name, column in (("modality", modality), ("body_part", body_part)):
            counts: dict[str, int] = {}
            for value, weight in zip(column[members], weights[members]):
                if value is not None:
                    counts[value] = counts.get(value, 0) + int(weight)
            columns[name] = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        top_values[cluster] = columns
        medoid_tags[cluster] = {"modality": modality[medoid], "body_part": body_part[medoid],
                                "position_x": round(float(points[medoid, 0]), 3),
                                "position_y": round(float(points[medoid, 1]), 3),
                                HOSTILE_ATTRIBUTE: None}
    return ClusterReportData(
        run_id=3,
        label=f"run 3, 2026-11-25 02:00 UTC {HOSTILE_ATTRIBUTE}",
        k=k,
        k_table=table,
        sample_labels=labels,
        sample_silhouettes=silhouettes,
        sample_weights=weights,
        cluster_sizes=sizes,
        top_values=top_values,
        medoid_tags=medoid_tags,
        parameters={"candidates": [2, 3, 4, 5], "max_profiles": 5000, "seed": 0,
                    "note": HOSTILE},
        timings={"gower": 0.25, "choose_k": 1.5, "assign": 12.0},
        totals={"instances": sum(sizes.values()), "distinct profiles": 36,
                "profiles clustered": 36, "loss": float(model.inertia_)},
    )


@pytest.fixture(scope="module")
def data() -> ClusterReportData:
    return _clustering()


@pytest.fixture(scope="module")
def report(data, tmp_path_factory) -> tuple[Path, str, "_Page"]:
    index = render_cluster_report(data, tmp_path_factory.mktemp("report"))
    text = index.read_text(encoding="utf-8")
    page = _Page()
    page.feed(text)
    page.close()
    return index, text, page


# ---------------------------------------------------------------- a small HTML reader


class _Page(HTMLParser):
    """Tables by id (rows of cell texts, with row attributes), images, script tags, text.

    Text goes to the innermost open cell, so a table nested in a cell is read on its own.
    """

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: dict[str, list[tuple[dict, list[str]]]] = {}
        self.images: list[str] = []
        self.scripts = 0
        self.text: list[str] = []
        self._open: list[tuple[str, list]] = []  # (table id, rows)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            rows: list = []
            self._open.append((attrs.get("id", f"anonymous-{len(self.tables)}"), rows))
        elif tag == "tr" and self._open:
            self._open[-1][1].append((attrs, []))
        elif tag in ("td", "th") and self._open and self._open[-1][1]:
            self._open[-1][1][-1][1].append("")
        elif tag == "img":
            self.images.append(attrs["src"])
        elif tag == "script":
            self.scripts += 1

    def handle_endtag(self, tag):
        if tag == "table" and self._open:
            table_id, rows = self._open.pop()
            self.tables[table_id] = rows

    def handle_data(self, text):
        self.text.append(text)
        if self._open and self._open[-1][1] and self._open[-1][1][-1][1]:
            cells = self._open[-1][1][-1][1]
            cells[-1] += text

    def rows(self, table_id: str) -> list[list[str]]:
        return [[cell.strip() for cell in cells] for _, cells in self.tables[table_id] if cells]


def _body_rows(page: _Page, table_id: str) -> list[tuple[dict, list[str]]]:
    """Rows after the header row, as (row attributes, cell texts)."""
    return [(attrs, [c.strip() for c in cells]) for attrs, cells in page.tables[table_id]][1:]


# ---------------------------------------------------------------- the page


def test_index_parses_and_links_existing_pngs(report):
    index, text, page = report
    assert index.name == "index.html"
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert not page._open  # every table closed
    assert len(page.images) == 3
    for source in page.images:
        assert "/" not in source  # relative, inside the report folder
        path = index.parent / source
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.width >= 400 and image.height >= 250
            colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
            assert colours is None or len(colours) > 10  # something was drawn


def test_k_table_lists_every_candidate_and_marks_the_chosen_one(data, report):
    _, _, page = report
    rows = _body_rows(page, "k-table")
    assert [int(cells[0]) for _, cells in rows] == sorted(data.k_table)
    for attrs, cells in rows:
        candidate = int(cells[0])
        assert cells[1] == f"{data.k_table[candidate]:.4f}"
        is_marked = attrs.get("class") == "chosen" and cells[2] == "chosen"
        assert is_marked == (candidate == data.k)
        if candidate != data.k:
            assert cells[2] == "" and "class" not in attrs
    assert data.k == max(data.k_table, key=data.k_table.get)  # choose_k's own pick


def test_every_cluster_with_size_share_top_values_and_medoid(data, report):
    _, _, page = report
    rows = _body_rows(page, "clusters")
    assert [int(cells[0]) for _, cells in rows] == list(range(data.k))
    archive = sum(data.cluster_sizes.values())
    for _, cells in rows:
        cluster = int(cells[0])
        size = data.cluster_sizes[cluster]
        assert cells[1] == f"{size:,}"
        assert cells[2].endswith(f"{100 * size / archive:.1f}%")
        in_sample = data.sample_labels == cluster
        assert cells[3] == str(int(in_sample.sum()))
        mean = np.average(data.sample_silhouettes[in_sample], weights=data.sample_weights[in_sample])
        assert cells[4] == f"{mean:.4f}"
        for column, values in data.top_values[cluster].items():
            assert f"{column}:" in cells[5]
            for value, count in values:
                assert f"{value} {count:,} ({100 * count / size:.1f}%)" in cells[5]

        medoid = dict((r[0], r[1]) for r in page.rows(f"medoid-{cluster}"))
        expected = data.medoid_tags[cluster]
        assert list(medoid) == list(expected)
        for column, value in expected.items():
            if value is None:
                assert medoid[column] == "\u2014"
            elif isinstance(value, float):
                assert float(medoid[column]) == pytest.approx(value, abs=1e-9)
            else:
                assert medoid[column] == value
    assert any(v is None for tags in data.medoid_tags.values() for v in tags.values())


def test_header_shows_label_totals_timings_and_parameters(data, report):
    _, _, page = report
    text = "".join(page.text)
    assert data.label in text
    assert f"K = {data.k}" in text
    totals = dict(page.rows("totals"))
    assert totals["instances"] == f"{data.totals['instances']:,}"
    assert totals["distinct profiles"] == "36"
    assert float(totals["loss"].replace(",", "")) == pytest.approx(data.totals["loss"], rel=1e-5)
    timings = dict(page.rows("timings"))
    for step, seconds in data.timings.items():
        assert timings[step] == f"{seconds:,.2f} s"
    assert timings["all steps"] == f"{sum(data.timings.values()):,.2f} s"
    parameters = dict(page.rows("parameters"))
    assert parameters["candidates"] == "[2, 3, 4, 5]"
    assert parameters["note"] == HOSTILE


def test_hostile_text_is_escaped_everywhere(data, report):
    _, text, page = report
    assert page.scripts == 1  # the page's own sort script, nothing injected
    assert "<script>alert" not in text and "<img src=x" not in text
    assert html.escape(HOSTILE) in text and html.escape(HOSTILE_ATTRIBUTE) in text
    hostile_cluster = int(np.bincount(data.sample_labels[24:]).argmax())  # the third blob
    cells = dict((int(c[0]), c) for _, c in _body_rows(page, "clusters"))
    assert HOSTILE in cells[hostile_cluster][5]  # shown, as text


def test_same_input_gives_identical_files(data, tmp_path):
    first = render_cluster_report(data, tmp_path / "a").parent
    second = render_cluster_report(data, tmp_path / "b" / "nested").parent
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    assert names == ["cluster_sizes.png", "index.html", "silhouette_by_k.png",
                     "silhouette_samples.png"]
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_silhouette_plot_is_drawn_from_the_layout(data, tmp_path):
    """A change of the silhouettes must change the picture (the plot is not a placeholder)."""
    flipped = dataclasses.replace(data, sample_silhouettes=-data.sample_silhouettes)
    one = render_cluster_report(data, tmp_path / "one").parent / "silhouette_samples.png"
    two = render_cluster_report(flipped, tmp_path / "two").parent / "silhouette_samples.png"
    with Image.open(one) as a, Image.open(two) as b:
        assert np.asarray(a.convert("L")).astype(int).sum() != \
            np.asarray(b.convert("L")).astype(int).sum()


# ---------------------------------------------------------------- bar layout


def test_bar_layout_hand_computed():
    labels = np.array([1, 0, 1, 0, 1])
    silhouettes = np.array([0.2, 0.5, 0.8, -0.1, 0.8])
    weights = np.array([1.0, 2.0, 1.0, 1.0, 3.0])
    bars = silhouette_bar_layout(labels, silhouettes, weights, gap=1.0)
    # cluster 0: profile 1 (0.5), 3 (-0.1); cluster 1: 2 and 4 tie at 0.8 (index order), 0
    assert bars.order.tolist() == [1, 3, 2, 4, 0]
    assert bars.members.tolist() == [1, 1, 1, 1, 1]
    assert bars.labels.tolist() == [0, 0, 1, 1, 1]
    assert bars.values.tolist() == [0.5, -0.1, 0.8, 0.8, 0.2]
    assert bars.heights.tolist() == [2.0, 1.0, 1.0, 3.0, 1.0]
    assert bars.bottoms.tolist() == [0.0, 2.0, 4.0, 5.0, 8.0]  # gap of 1 after cluster 0
    assert bars.extent == 9.0
    assert bars.clusters.tolist() == [0, 1]
    assert bars.cluster_span(1) == (4.0, 9.0)


def test_bar_layout_without_weights_is_one_unit_per_profile():
    bars = silhouette_bar_layout(np.array([2, 2, 5]), np.array([0.1, 0.3, 0.0]))
    assert bars.order.tolist() == [1, 0, 2]
    assert bars.heights.tolist() == [1.0, 1.0, 1.0]
    assert bars.bottoms.tolist() == [0.0, 1.0, 2.0]


def test_bar_layout_merges_consecutive_profiles_when_over_the_cap():
    # Cluster 0: 10 profiles with silhouettes 0.9, 0.8, ..., 0.0; cluster 1: 2 profiles.
    # max_bars = 4: one bar each, the 2 spare shared by 9 : 1 -> quotas 1.8, 0.2 -> 2 : 0,
    # so cluster 0 gets 3 bars of 4, 3, 3 profiles and cluster 1 one bar of 2.
    labels = np.array([0] * 10 + [1] * 2)
    silhouettes = np.concatenate([np.linspace(0.0, 0.9, 10), [0.4, -0.2]])
    weights = np.array([1.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 3.0, 1.0, 5.0, 1.0])
    bars = silhouette_bar_layout(labels, silhouettes, weights, max_bars=4)
    assert bars.members.tolist() == [4, 3, 3, 2]
    assert bars.labels.tolist() == [0, 0, 0, 1]
    # group 1: s 0.9 (w1), 0.8 (w3), 0.7 (w1), 0.6 (w1) -> (0.9 + 2.4 + 0.7 + 0.6) / 6
    # group 2: 0.5, 0.4, 0.3 (w1 each); group 3: 0.2 (w1), 0.1 (w2), 0.0 (w1) -> 0.4 / 4
    # cluster 1: 0.4 (w5), -0.2 (w1) -> 1.8 / 6
    np.testing.assert_allclose(bars.values, [4.6 / 6, 0.4, 0.1, 0.3])
    np.testing.assert_allclose(bars.heights, [6.0, 3.0, 4.0, 6.0])
    np.testing.assert_allclose(bars.bottoms, [0.0, 6.0, 9.0, 13.0])


def test_bar_layout_caps_large_samples_and_keeps_totals():
    rng = np.random.default_rng(1)
    n = 20000
    labels = rng.integers(0, 15, size=n)
    silhouettes = rng.uniform(-0.3, 0.9, size=n)
    weights = rng.integers(1, 50, size=n).astype(float)
    bars = silhouette_bar_layout(labels, silhouettes, weights, max_bars=2000, gap=0.0)
    assert bars.members.size == 2000 and bars.members.sum() == n
    assert bars.extent == pytest.approx(weights.sum())
    assert np.sum(bars.values * bars.heights) == pytest.approx(np.sum(silhouettes * weights))
    for label in range(15):
        mine = bars.labels == label
        assert np.all(np.diff(bars.values[mine]) <= 1e-12)  # still sorted, highest first
        assert bars.heights[mine].sum() == pytest.approx(weights[labels == label].sum())
    # more clusters than bars: one bar per cluster
    assert silhouette_bar_layout(labels, silhouettes, weights, max_bars=3).members.size == 15


def test_large_report_renders(data, tmp_path):
    rng = np.random.default_rng(2)
    n = 20000
    labels = rng.integers(0, data.k, size=n)
    big = dataclasses.replace(data, sample_labels=labels,
                              sample_silhouettes=rng.uniform(-0.5, 1.0, size=n),
                              sample_weights=rng.integers(1, 9, size=n).astype(float))
    index = render_cluster_report(big, tmp_path / "big", max_bars=1500)
    text = index.read_text(encoding="utf-8")
    assert f"{n:,} profiles as 1,500 bars" in text


# ---------------------------------------------------------------- inconsistent input


def _bad(data: ClusterReportData, **changes):
    return lambda: dataclasses.replace(data, **changes)


@pytest.mark.parametrize("case, match", [
    ("short silhouettes", "sample_silhouettes has shape"),
    ("short weights", "sample_weights has shape"),
    ("k not a candidate", "not a candidate"),
    ("empty k table", "k_table is empty"),
    ("k table out of range", r"not a silhouette in \[-1, 1\]"),
    ("too few medoids", "medoid_tags has"),
    ("sample label unknown", "sample_labels .* not clusters"),
    ("float labels", "must be integers"),
    ("silhouette out of range", r"sample_silhouettes must be finite and in \[-1, 1\]"),
    ("nan silhouette", "sample_silhouettes must be finite"),
    ("weight below one", "instance counts"),
    ("size of unknown cluster", "cluster_sizes has labels"),
    ("negative size", "is not a count"),
    ("top values of unknown cluster", "top_values has labels"),
    ("negative timing", "not a duration"),
])
def test_inconsistent_input_raises(data, case, match):
    n = data.sample_labels.size
    silhouettes = data.sample_silhouettes.copy()
    changes = {
        "short silhouettes": {"sample_silhouettes": silhouettes[:-1]},
        "short weights": {"sample_weights": data.sample_weights[1:]},
        "k not a candidate": {"k": 17},
        "empty k table": {"k_table": {}},
        "k table out of range": {"k_table": {**data.k_table, 6: 1.5}},
        "too few medoids": {"medoid_tags": {c: t for c, t in data.medoid_tags.items() if c}},
        "sample label unknown": {"sample_labels": np.where(np.arange(n) == 0, 99,
                                                           data.sample_labels)},
        "float labels": {"sample_labels": data.sample_labels.astype(float)},
        "silhouette out of range": {"sample_silhouettes": np.where(np.arange(n) == 3, 1.2,
                                                                   silhouettes)},
        "nan silhouette": {"sample_silhouettes": np.where(np.arange(n) == 3, np.nan,
                                                          silhouettes)},
        "weight below one": {"sample_weights": np.where(np.arange(n) == 5, 0.5,
                                                        data.sample_weights)},
        "size of unknown cluster": {"cluster_sizes": {**data.cluster_sizes, 42: 7}},
        "negative size": {"cluster_sizes": {**data.cluster_sizes, 0: -1}},
        "top values of unknown cluster": {"top_values": {**data.top_values, -1: {}}},
        "negative timing": {"timings": {"gower": -0.1}},
    }[case]
    with pytest.raises(ValueError, match=match):
        _bad(data, **changes)()


def test_a_cluster_missing_from_sizes_is_shown_empty(data, tmp_path):
    sizes = {c: s for c, s in data.cluster_sizes.items() if c != 0}
    index = render_cluster_report(dataclasses.replace(data, cluster_sizes=sizes), tmp_path)
    page = _Page()
    page.feed(index.read_text(encoding="utf-8"))
    cells = dict((int(c[0]), c) for _, c in _body_rows(page, "clusters"))
    assert cells[0][1] == "0"


def test_layout_rejects_bad_arguments():
    with pytest.raises(ValueError, match="1-d of one length"):
        silhouette_bar_layout(np.array([0, 1]), np.array([0.1]))
    with pytest.raises(ValueError, match="max_bars"):
        silhouette_bar_layout(np.array([0, 1]), np.array([0.1, 0.2]), max_bars=0)
