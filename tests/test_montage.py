"""Thumbnail montages a person judges the clusters by: the image-model report (every image
cluster and every tag cluster), the tag clustering report's members and ``query --html``.

One archive is built once for the module through the real pieces: instances ingested and
parsed, DenseNet121 features from the image worker, an image model fitted on them, a tag
clustering run. The pages are then checked as HTML and, when Chromium is installed, in
headless Chromium: they render and every image loads.
"""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
import uuid
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from PIL import Image
from sqlalchemy.engine import make_url

from pipelines.pixels import IMAGENET_MEAN, IMAGENET_STD, file_to_image
from service.tags import features, tag_clusters
from service.database.engine import create_db_engine, migrate, sqlalchemy_url
from service.html_report import THUMBNAIL_SIZE, Tile, montage_html, short_uid, thumbnail_png
from service.images.image_annotation import SimilarImages, train_image_model
from service.images.image_report import (image_cluster_samples, tag_cluster_montages,
                                  tag_cluster_samples, write_image_model_report,
                                  write_query_report)
from service.images.image_worker import ImageWorker, enqueue_missing

from .dicom_client import ingest_datasets, make_ct
from .test_image_annotation import SMALL, _pattern
from .test_image_worker import SIZE, weights  # noqa: F401  (fixture)

HOSTILE = "<script>alert('x')</script>\"><img src=x onerror=alert(1)>"
PER_CLUSTER = 4
LOOKS = {  # pattern -> tags, so that tag clusters and image clusters can both be judged
    "disk": dict(Modality="CT", BodyPartExamined="CHEST", SeriesDescription="Thorax 1.25mm"),
    "stripes": dict(Modality="MR", BodyPartExamined="HEAD", SeriesDescription="T1 axial"),
    "noise": dict(Modality="CR", BodyPartExamined="KNEE", SeriesDescription=HOSTILE),
}


@pytest.fixture(scope="module")
def module_engine(admin_url):
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(sqlalchemy_url(admin_url), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = make_url(sqlalchemy_url(admin_url)).set(database=name).render_as_string(
        hide_password=False)
    engine = create_db_engine(url)
    migrate(engine)
    yield engine, url
    engine.dispose()
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="module")
def archive(module_engine, tmp_path_factory, weights):  # noqa: F811
    from pipelines.backbone import load_backbone

    engine, url = module_engine
    root = tmp_path_factory.mktemp("montage")
    storage = root / "storage"
    rng = np.random.default_rng(3)
    kind_of, datasets = {}, []
    for kind in ["disk", "stripes", "noise"] * 6:
        ds = make_ct()
        ds.PixelData = _pattern(kind, rng).tobytes()
        ds.WindowCenter, ds.WindowWidth = "1750", "2000"
        for keyword, value in LOOKS[kind].items():
            setattr(ds, keyword, value)
        datasets.append(ds)
        kind_of[ds.SOPInstanceUID] = kind
    ingest_datasets(engine, storage, datasets)
    while features.process_queue_batch(engine, "test"):
        pass
    enqueue_missing(engine)
    worker = ImageWorker(engine, load_backbone(weights), storage_root=storage,
                         feature_store=root / "features", name="test", image_size=SIZE,
                         decode_workers=1, batch=32, weights_path=weights)
    while worker.run_once():
        pass
    worker.close()
    model_id = train_image_model(engine, root / "features", root / "models", config=SMALL)
    # stored after the image stage ran: a CT whose pixel data is cut short, in a tag
    # cluster only; its thumbnail cannot be made
    broken = make_ct()
    broken.PixelData = broken.PixelData[:100]
    for keyword, value in LOOKS["disk"].items():
        setattr(broken, keyword, value)
    ingest_datasets(engine, storage, [broken])
    while features.process_queue_batch(engine, "test"):
        pass
    summary = tag_clusters.recluster(engine, url, tag_clusters.ReclusterOptions(
        candidates=(2, 3), partition_rows=25, n_workers=1, processes=False,
        min_profiles_per_cluster=1))
    assert summary.status == "finished"
    return dict(engine=engine, url=url, root=root, storage=storage, kind_of=kind_of,
                model_id=model_id, run_id=summary.run_id, broken=broken.SOPInstanceUID,
                weights=weights)


class _Page(HTMLParser):
    """The <img> sources, the placeholders and the text of a page."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.images: list[dict] = []
        self.missing: list[dict] = []
        self.tiles: list[dict] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        if tag == "figure":
            self.tiles.append(attrs)
        if "missing" in (attrs.get("class") or "").split():
            self.missing.append(attrs)

    def handle_data(self, data):
        self.text.append(data)


def _png(src: str) -> Image.Image:
    assert src.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))


# ---------------------------------------------------------------- pieces


def test_thumbnail_is_what_the_network_sees(archive):
    uid = next(u for u, k in archive["kind_of"].items() if k == "stripes")
    with archive["engine"].connect() as conn:
        path = conn.execute(sa.text("SELECT file_path FROM instances WHERE sop_instance_uid = :u"),
                            {"u": uid}).scalar_one()
    image = Image.open(io.BytesIO(thumbnail_png(archive["storage"] / path)))
    assert image.size == (THUMBNAIL_SIZE, THUMBNAIL_SIZE) and image.mode == "L"
    pixels = np.asarray(image).astype(np.int16)
    # the network's input with the ImageNet normalisation undone, as 8 bits
    network = file_to_image(archive["storage"] / path, size=THUMBNAIL_SIZE)[0]
    unit = network * IMAGENET_STD[0] + IMAGENET_MEAN[0]
    assert np.abs(pixels - np.round(255 * unit)).max() <= 1
    # stripes through the stored window (HU -24 and 1476 in 750..2750): dark and grey columns
    row = pixels[THUMBNAIL_SIZE // 2, 10:-10]
    assert row.min() < 10 and row.max() > 80


def test_montage_escapes_tags_and_shows_placeholders_with_the_reason():
    uid = "1.2.826.0.1.3680043.8.498.12345678901234567890"
    text = montage_html([Tile(uid, None, reason=HOSTILE, caption=(("series", HOSTILE),),
                              note="#1")])
    assert "<script>" not in text and "<img" not in text and "&lt;script&gt;" in text
    page = _Page(text)
    assert page.images == [] and len(page.missing) == 1
    assert HOSTILE in page.missing[0]["title"]  # the reason, escaped, comes back unchanged
    assert page.tiles[0]["data-uid"] == uid
    assert short_uid(uid) in "".join(page.text) and uid not in "".join(page.text)
    assert montage_html([], empty="no <members>") == '<p class="muted">no &lt;members&gt;</p>\n'


def test_samples_are_nearest_the_centre_and_deterministic(archive):
    engine = archive["engine"]
    with engine.connect() as conn:
        images = image_cluster_samples(conn, archive["model_id"], PER_CLUSTER)
        tags = tag_cluster_samples(conn, archive["run_id"], PER_CLUSTER)
        medoids = dict(conn.execute(sa.text(
            "SELECT label, sop_instance_uid FROM tag_cluster_medoids WHERE run_id = :r"),
            {"r": archive["run_id"]}).all())
        distances = conn.execute(sa.text(
            "SELECT m.label, a.sop_instance_uid, a.distance FROM tag_cluster_assignments a "
            "JOIN tag_cluster_medoids m USING (run_id, medoid_index) WHERE a.run_id = :r"),
            {"r": archive["run_id"]}).all()
        assert image_cluster_samples(conn, archive["model_id"], PER_CLUSTER) == images
    assert images and all(1 <= len(u) <= PER_CLUSTER for u in images.values())
    assert tags.keys() == medoids.keys()
    by_label: dict[int, list[tuple[float, str]]] = {}
    for label, uid, distance in distances:
        by_label.setdefault(label, []).append((distance, uid))
    for label, uids in tags.items():
        assert uids == [u for _, u in sorted(by_label[label])][:PER_CLUSTER]
        if medoids[label] is not None and medoids[label] in dict(
                (u, d) for d, u in by_label[label]):
            assert uids[0] == medoids[label] or by_label[label][0][0] == 0


# ---------------------------------------------------------------- the three pages


def _image_model_report(archive, tmp_path) -> Path:
    return write_image_model_report(archive["engine"], archive["storage"],
                                    tmp_path / "image-model.html", per_cluster=PER_CLUSTER)


def test_image_model_report_shows_every_image_and_tag_cluster(archive, tmp_path):
    out = _image_model_report(archive, tmp_path)
    text = out.read_text()
    page = _Page(text)
    engine = archive["engine"]
    with engine.connect() as conn:
        image_sizes = dict(conn.execute(sa.text(
            "SELECT image_cluster, count(*) FROM image_annotations WHERE model_id = :m "
            "GROUP BY 1"), {"m": archive["model_id"]}).all())
        tag_sizes = dict(conn.execute(sa.text(
            "SELECT tag_cluster, count(*) FROM instance_tag_cluster GROUP BY 1")).all())
    for cluster in image_sizes:
        assert f'id="image-cluster-{cluster}"' in text
    for cluster in tag_sizes:
        assert f'id="tag-cluster-{cluster}"' in text
    shown = (sum(min(n, PER_CLUSTER) for n in image_sizes.values())
             + sum(min(n, PER_CLUSTER) for n in tag_sizes.values()))
    assert len(page.tiles) == shown
    # every image decodes as a thumbnail; the one with cut pixel data is a placeholder
    assert len(page.images) + len(page.missing) == shown
    assert all(_png(img["src"]).size == (THUMBNAIL_SIZE, THUMBNAIL_SIZE) for img in page.images)
    broken = [t for t in page.tiles if t["data-uid"] == archive["broken"]]
    if broken:  # among the PER_CLUSTER nearest its medoid
        assert len(page.missing) == 1 and "not shown" in page.missing[0]["aria-label"]
    # key tags in the captions, hostile ones escaped
    assert "CHEST" in text and "T1 axial" in text and "KNEE" in text
    assert HOSTILE in "".join(page.text) and "<script>alert" not in text
    assert 'data-broken-images' in text  # the check script is on the page
    # same archive, same bytes
    assert _image_model_report(archive, tmp_path / "again").read_text() == text


def test_tag_cluster_report_shows_each_clusters_members(archive, tmp_path):
    from service.tags.cluster_report import render_cluster_report

    data = tag_clusters.report_data(archive["engine"])
    montages = tag_cluster_montages(archive["engine"], archive["storage"], data.run_id,
                                    per_cluster=PER_CLUSTER)
    assert montages.keys() == set(data.clusters)
    text = render_cluster_report(data, tmp_path / "report", montages=montages).read_text()
    page = _Page(text)
    for cluster in data.clusters:
        assert f'id="members-{cluster}"' in text
    shown = sum(min(int(n), PER_CLUSTER) for n in data.cluster_sizes.values())
    assert len(page.tiles) == shown
    # the three plots are linked PNGs, the thumbnails are embedded
    assert len([i for i in page.images if not i["src"].startswith("data:")]) == 3
    assert len([i for i in page.images if i["src"].startswith("data:")]) + len(page.missing) \
        == shown
    assert "<script>alert" not in text


def test_cli_query_html_writes_the_query_beside_its_hits(archive, settings, monkeypatch,
                                                        capsys, tmp_path):
    from service.cli import main

    monkeypatch.setenv("DATABASE_URL", archive["url"])
    monkeypatch.setenv("PACS_STORAGE_DIR", str(archive["storage"]))
    query = next(uid for uid, kind in archive["kind_of"].items() if kind == "disk")
    out = tmp_path / "query.html"
    assert main(["query", "--uid", query, "--top", "5", "--exclude", "none",
                 "--html", str(out)]) == 0
    printed = capsys.readouterr().out
    text = out.read_text()
    page = _Page(text)
    assert len(page.tiles) == 6 and len(page.images) == 6  # the query and 5 hits
    assert page.tiles[0]["data-uid"] == query and "query" in page.tiles[0]["class"]
    hit_uids = [t["data-uid"] for t in page.tiles[1:]]
    assert hit_uids == [line.split()[-1] for line in printed.splitlines()[2:7]]
    scores = [float(s) for s in re.findall(r"#\d+ score (-?[\d.]+)", text)]
    assert scores == [float(line.split()[1]) for line in printed.splitlines()[2:7]]
    assert "CHEST" in text and "Thorax 1.25mm" in text
    assert main(["query", "--uid", query, "--html", str(tmp_path / "no" / "such" / "q.html"),
                 "--top", "2"]) == 0  # its folder is made


def test_cli_image_report(archive, settings, monkeypatch, capsys, tmp_path):
    from service.cli import main

    monkeypatch.setenv("DATABASE_URL", archive["url"])
    monkeypatch.setenv("PACS_STORAGE_DIR", str(archive["storage"]))
    out = tmp_path / "reports" / "model.html"
    assert main(["image-report", "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert f"Image model {archive['model_id']}" in out.read_text()
    assert main(["image-report", "--model", "999", "--out", str(out)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert errors == ["error: no image model 999"]  # one line, no traceback


def test_query_report_of_a_file_query(archive, tmp_path):
    engine = archive["engine"]
    similar = SimilarImages(engine)
    uid = next(uid for uid, kind in archive["kind_of"].items() if kind == "noise")
    clusters, codes = similar.code_of(uid)
    hits = similar.with_tags(similar.rank(clusters, codes, 3, exclude={uid})[0])
    with engine.connect() as conn:
        path = archive["storage"] / conn.execute(sa.text(
            "SELECT file_path FROM instances WHERE sop_instance_uid = :u"), {"u": uid}
        ).scalar_one()
    out = write_query_report(engine, archive["storage"], tmp_path / "q.html", hits=hits,
                             image_cluster=int(clusters[0]), seconds=0.01, query_file=path)
    page = _Page(out.read_text())
    assert len(page.images) == 4 and page.tiles[0]["data-uid"] == uid
    assert HOSTILE in "".join(page.text)  # the file's own series description, escaped


# ---------------------------------------------------------------- in a browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                 "--virtual-time-budget=5000"]


def _chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *BROWSER_FLAGS, *args], capture_output=True, text=True,
                          timeout=120, check=False)


def _body_counts(dom: str) -> tuple[int, int]:
    body = re.search(r"<body[^>]*>", dom)
    assert body, dom[:500]
    images = re.search(r'data-images="(\d+)"', body.group(0))
    broken = re.search(r'data-broken-images="(\d+)"', body.group(0))
    assert images and broken, f"the load script did not run: {body.group(0)}"
    return int(images.group(1)), int(broken.group(1))


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed "
                    "(Debian: apt-get install chromium)")
def test_pages_render_in_chromium_and_every_image_loads(archive, tmp_path, monkeypatch):
    from service.tags.cluster_report import render_cluster_report
    from service.cli import main

    pages = {"image-model": _image_model_report(archive, tmp_path)}
    data = tag_clusters.report_data(archive["engine"])
    pages["tag-clusters"] = render_cluster_report(
        data, tmp_path / "tag-report",
        montages=tag_cluster_montages(archive["engine"], archive["storage"], data.run_id,
                                      per_cluster=PER_CLUSTER))
    monkeypatch.setenv("DATABASE_URL", archive["url"])
    monkeypatch.setenv("PACS_STORAGE_DIR", str(archive["storage"]))
    query = next(uid for uid, kind in archive["kind_of"].items() if kind == "stripes")
    pages["query"] = tmp_path / "query.html"
    assert main(["query", "--uid", query, "--top", "8", "--html", str(pages["query"])]) == 0

    for name, path in pages.items():
        expected = len(_Page(path.read_text()).images)
        assert expected > 0
        result = _chromium("--dump-dom", path.resolve().as_uri())
        assert result.returncode == 0, result.stderr[-2000:]
        assert _body_counts(result.stdout) == (expected, 0), name
        shot = tmp_path / f"{name}.png"
        result = _chromium(f"--screenshot={shot}", "--window-size=1200,1600",
                           path.resolve().as_uri())
        assert result.returncode == 0 and shot.stat().st_size > 10_000, result.stderr[-2000:]
        # the screenshot is not blank: thumbnails and text put many grey levels on it
        assert len(np.unique(np.asarray(Image.open(shot).convert("L")))) > 32, name
