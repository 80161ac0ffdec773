"""Montages that let a person judge the clusters by looking (method.md B; docs/images.md).

* :func:`write_image_model_report`: the image model's report, one self-contained HTML file
  (written by ``pacs-annotate image-model`` after every fit, so by the nightly job too, and
  by ``pacs-annotate image-report``): the model's parameters and, for each image cluster and
  each tag cluster of the active tag clustering run, its size, what its tags say and a
  montage of a sample of its members.
* :func:`tag_cluster_montages`: the same tag-cluster montages for the tag clustering report
  (``service.tags.cluster_report``).
* :func:`write_query_report`: ``pacs-annotate query --html FILE``: the query image beside
  its hits, with rank, score and key tags.

The sample of a cluster is deterministic: up to ``per_cluster`` members nearest its centre
first, ties by SOP Instance UID. An image cluster's centre is the mean of its members'
retrieval codes (pgvector ``avg``), "nearest" by cosine distance (``<=>``, the distance the
ranking uses); a tag cluster's centre is its medoid, "nearest" by the stored Gower distance
of each assignment (the medoid itself first). Thumbnails come from the stored DICOM files
through the network's pixel pipeline (``html_report.thumbnail_png``); a file that cannot be
decoded shows its reason instead. SQL and file reading are here; the markup pieces are in
:mod:`service.html_report`.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ..html_report import (MONTAGE_STYLE, Tile, bar, montage_html, page_end, page_start,
                          thumbnail_png, value_text)

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_PER_CLUSTER", "KeyTags", "Thumbnails", "tag_cluster_montages",
           "write_image_model_report", "write_query_report"]

DEFAULT_PER_CLUSTER = 12
"""Members shown per cluster."""


@dataclass(frozen=True)
class KeyTags:
    """What a tile's caption says about an instance, and where its file is."""

    file_path: str | None
    modality: str | None
    body_part: str | None
    series_description: str | None
    tag_cluster: int | None = None
    tag_cluster_outlier: bool | None = None
    image_cluster: int | None = None


_KEY_TAGS = sa.text(
    "SELECT i.sop_instance_uid, i.file_path, coalesce(f.modality, i.modality), "
    "coalesce(f.body_part, f.body_part_inferred), s.series_description, t.tag_cluster, "
    "t.is_outlier, a.image_cluster "
    "FROM instances i LEFT JOIN instance_features f USING (sop_instance_uid) "
    "LEFT JOIN series s USING (series_instance_uid) "
    "LEFT JOIN instance_tag_cluster t USING (sop_instance_uid) "
    "LEFT JOIN image_annotations a ON a.sop_instance_uid = i.sop_instance_uid "
    "AND a.model_id = (SELECT id FROM image_models WHERE is_active) "
    "WHERE i.sop_instance_uid = ANY(CAST(:u AS text[]))")


def key_tags(conn: sa.Connection, uids: Iterable[str]) -> dict[str, KeyTags]:
    """Key tags of stored instances (modality and body part as parsed, the series
    description, the active tag and image cluster); instances not stored are left out."""
    return {row[0]: KeyTags(*row[1:]) for row in conn.execute(_KEY_TAGS, {"u": list(uids)})}


@dataclass
class Thumbnails:
    """Thumbnails of stored files, each made once (an instance can be in several montages).

    ``storage_root``: the folder ``instances.file_path`` is relative to (``PACS_STORAGE_DIR``).
    """

    storage_root: Path
    _made: dict[str, tuple[bytes | None, str | None]] = field(default_factory=dict)

    def of_file(self, key: str, path: str | Path | None) -> tuple[bytes | None, str | None]:
        """(PNG, None) or (None, reason) for the file at ``path`` (relative to the root)."""
        if key not in self._made:
            self._made[key] = self._render(path)
        return self._made[key]

    def _render(self, path: str | Path | None) -> tuple[bytes | None, str | None]:
        from pipelines.pixels import NotAnImage, PixelDecodeError

        if path is None:
            return None, "not stored"
        full = self.storage_root / path
        try:
            return thumbnail_png(full), None
        except (NotAnImage, PixelDecodeError) as exc:
            return None, str(getattr(exc, "reason", exc) or type(exc).__name__)
        except FileNotFoundError:
            return None, "file missing from storage"
        except OSError as exc:
            return None, f"file unreadable: {exc.strerror or exc}"

    def tiles(self, uids: Sequence[str], tags: dict[str, KeyTags], *, show: str,
              notes: dict[str, str] | None = None) -> list[Tile]:
        """Tiles of stored instances; ``show`` names the other clustering in the caption:
        ``"tag"`` (the instance's tag cluster) or ``"image"`` (its image cluster)."""
        out = []
        for uid in uids:
            found = tags.get(uid)
            png, reason = self.of_file(uid, found.file_path if found else None)
            out.append(Tile(uid, png, reason, caption=_caption(found, show),
                            note=(notes or {}).get(uid, "")))
        return out


def _caption(tags: KeyTags | None, show: str) -> tuple[tuple[str, object], ...]:
    if tags is None:
        return ()
    caption: list[tuple[str, object]] = [("modality", tags.modality),
                                         ("body part", tags.body_part),
                                         ("series", tags.series_description)]
    if show in ("tag", "both") and tags.tag_cluster is not None:
        caption.append(("tag cluster", f"{tags.tag_cluster}"
                                       f"{' (outlier)' if tags.tag_cluster_outlier else ''}"))
    if show in ("image", "both") and tags.image_cluster is not None:
        caption.append(("image cluster", tags.image_cluster))
    return tuple(caption)


# ------------------------------------------------------------------ samples in SQL

_IMAGE_SAMPLE = sa.text(
    "WITH a AS (SELECT sop_instance_uid, image_cluster, retrieval_code FROM image_annotations "
    "WHERE model_id = :m), "
    "c AS (SELECT image_cluster, avg(retrieval_code) AS centre FROM a GROUP BY 1), "
    "r AS (SELECT a.image_cluster, a.sop_instance_uid, row_number() OVER (PARTITION BY "
    "a.image_cluster ORDER BY a.retrieval_code <=> c.centre NULLS LAST, a.sop_instance_uid) "
    "AS k FROM a JOIN c USING (image_cluster)) "
    "SELECT image_cluster, sop_instance_uid FROM r WHERE k <= :n ORDER BY image_cluster, k")

_TAG_SAMPLE = sa.text(
    "SELECT label, sop_instance_uid FROM (SELECT m.label, a.sop_instance_uid, row_number() "
    "OVER (PARTITION BY m.label ORDER BY a.distance, a.sop_instance_uid) AS k "
    "FROM tag_cluster_assignments a JOIN tag_cluster_medoids m ON m.run_id = a.run_id "
    "AND m.medoid_index = a.medoid_index WHERE a.run_id = :r) s WHERE k <= :n "
    "ORDER BY label, k")


def _grouped(rows: Iterable[tuple[int, str]]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for cluster, uid in rows:
        out.setdefault(int(cluster), []).append(uid)
    return out


def image_cluster_samples(conn: sa.Connection, model_id: int, per_cluster: int
                          ) -> dict[int, list[str]]:
    """Up to ``per_cluster`` members of each image cluster, nearest its mean code first."""
    return _grouped(conn.execute(_IMAGE_SAMPLE, {"m": model_id, "n": per_cluster}).all())


def tag_cluster_samples(conn: sa.Connection, run_id: int, per_cluster: int
                        ) -> dict[int, list[str]]:
    """Up to ``per_cluster`` members of each tag cluster, nearest its medoid first."""
    return _grouped(conn.execute(_TAG_SAMPLE, {"r": run_id, "n": per_cluster}).all())


def tag_cluster_montages(engine: Engine, storage_root: Path, run_id: int, *,
                         per_cluster: int = DEFAULT_PER_CLUSTER,
                         thumbnails: Thumbnails | None = None) -> dict[int, str]:
    """Montage HTML of each tag cluster of run ``run_id`` (label -> markup, see
    :func:`html_report.montage_html`), captions with the image cluster where one exists."""
    thumbnails = thumbnails or Thumbnails(Path(storage_root))
    with engine.connect() as conn:
        samples = tag_cluster_samples(conn, run_id, per_cluster)
        tags = key_tags(conn, [u for uids in samples.values() for u in uids])
    return {label: montage_html(thumbnails.tiles(uids, tags, show="image"))
            for label, uids in samples.items()}


# ------------------------------------------------------------------ the image-model report

_STYLE = MONTAGE_STYLE + """
h3{margin:1.2em 0 .2em}
"""


def _counts(conn: sa.Connection, sql: str, params: dict) -> dict[int, list[tuple[str, int]]]:
    out: dict[int, list[tuple[str, int]]] = {}
    for cluster, value, n in conn.execute(sa.text(sql), params):
        out.setdefault(int(cluster), []).append((value, int(n)))
    return out


def _top(values: list[tuple[str, int]], size: int, top: int = 3) -> str:
    if not values:
        return '<span class="muted">\u2014</span>'
    shown = ", ".join(f"<code>{value_text(v, 80)}</code> {n:,}"
                      + (f" ({100 * n / size:.0f}%)" if size else "") for v, n in values[:top])
    rest = len(values) - top
    return shown + (f' <span class="muted">+{rest} more</span>' if rest > 0 else "")


def _kv_table(table_id: str, summary: str, rows: list[tuple[str, object]]) -> str:
    body = "".join(f"<tr><th>{value_text(k)}</th><td>{value_text(v)}</td></tr>\n"
                   for k, v in rows)
    return (f"<details><summary>{summary}</summary>"
            f'<table id="{table_id}"><tbody>\n{body}</tbody></table></details>\n')


def _cluster_section(w, kind: str, cluster: int, size: int, described: list[str],
                     montage: str) -> None:
    w(f'<h3 id="{kind}-cluster-{cluster}">{kind.capitalize()} cluster {cluster} '
      f'<span class="muted">({size:,} instances)</span></h3>\n')
    if described:
        w("<p>" + "; ".join(described) + "</p>\n")
    w(montage)


def render_image_model_report(engine: Engine, storage_root: Path, model_id: int | None = None,
                              *, per_cluster: int = DEFAULT_PER_CLUSTER) -> str:
    """The page (see the module docstring) of image model ``model_id`` (default: the active
    one). Raises ValueError when there is no such finished model."""
    thumbnails = Thumbnails(Path(storage_root))
    with engine.connect() as conn:
        if model_id is None:
            model_id = conn.execute(sa.text(
                "SELECT id FROM image_models WHERE is_active")).scalar_one_or_none()
            if model_id is None:
                raise ValueError("no active image model: run `pacs-annotate image-model`")
        model = conn.execute(sa.text("SELECT * FROM image_models WHERE id = :m"),
                             {"m": model_id}).mappings().one_or_none()
        if model is None:
            raise ValueError(f"no image model {model_id}")
        if model["status"] != "finished":
            raise ValueError(f"image model {model_id} is {model['status']}, not finished")
        image_sizes = dict(conn.execute(sa.text(
            "SELECT image_cluster, count(*) FROM image_annotations WHERE model_id = :m "
            "GROUP BY 1"), {"m": model_id}).all())
        image_tags = _counts(conn, (
            "SELECT a.image_cluster, coalesce(f.modality, '?') || ' / ' || "
            "coalesce(f.body_part, f.body_part_inferred, '?'), count(*) AS n "
            "FROM image_annotations a LEFT JOIN instance_features f USING (sop_instance_uid) "
            "WHERE a.model_id = :m GROUP BY 1, 2 ORDER BY 1, n DESC, 2"), {"m": model_id})
        image_vs_tag = _counts(conn, (
            "SELECT a.image_cluster, coalesce(t.tag_cluster::text, 'none'), count(*) AS n "
            "FROM image_annotations a LEFT JOIN instance_tag_cluster t USING (sop_instance_uid) "
            "WHERE a.model_id = :m GROUP BY 1, 2 ORDER BY 1, n DESC, 2"), {"m": model_id})
        image_samples = image_cluster_samples(conn, model_id, per_cluster)
        run_id = conn.execute(sa.text(
            "SELECT id FROM tag_cluster_runs WHERE is_active")).scalar_one_or_none()
        tag_sizes, tag_tags, tag_vs_image, tag_samples = {}, {}, {}, {}
        if run_id is not None:
            tag_sizes = dict(conn.execute(sa.text(
                "SELECT m.label, count(a.sop_instance_uid) FROM tag_cluster_medoids m "
                "LEFT JOIN tag_cluster_assignments a ON a.run_id = m.run_id "
                "AND a.medoid_index = m.medoid_index WHERE m.run_id = :r GROUP BY 1"),
                {"r": run_id}).all())
            tag_tags = _counts(conn, (
                "SELECT t.tag_cluster, coalesce(f.modality, '?') || ' / ' || "
                "coalesce(f.body_part, f.body_part_inferred, '?'), count(*) AS n "
                "FROM instance_tag_cluster t LEFT JOIN instance_features f "
                "USING (sop_instance_uid) GROUP BY 1, 2 ORDER BY 1, n DESC, 2"), {})
            tag_vs_image = _counts(conn, (
                "SELECT t.tag_cluster, coalesce(a.image_cluster::text, 'none'), count(*) AS n "
                "FROM instance_tag_cluster t LEFT JOIN image_annotations a "
                "ON a.sop_instance_uid = t.sop_instance_uid AND a.model_id = :m "
                "GROUP BY 1, 2 ORDER BY 1, n DESC, 2"), {"m": model_id})
            tag_samples = tag_cluster_samples(conn, run_id, per_cluster)
        tags = key_tags(conn, [u for s in (image_samples, tag_samples)
                               for uids in s.values() for u in uids])

    parameters = dict(model["parameters"] or {})
    total = sum(int(n) for n in image_sizes.values())
    out = io.StringIO()
    w = out.write
    w(page_start(f"Image model {model_id}", _STYLE))
    w(f"<h1>Image model {model_id}</h1>\n"
      f'<p id="summary">{len(image_sizes)} image clusters over {total:,} images '
      f"({value_text(model['feature_model_version'])} features), fitted on "
      f"{int(model['images'] or 0):,}, ranking by {value_text(parameters.get('ranking', '?'))}"
      f"{', active' if model['is_active'] else ''}; finished "
      f"{value_text(model['finished_at'])}. Each montage shows up to {per_cluster} members, "
      "nearest the cluster's centre first (image clusters: the mean retrieval code, cosine; "
      "tag clusters: the medoid, Gower distance). Thumbnails are the network's input "
      "(stored window, fitted to a square); hover a UID for all of it.</p>\n")
    rows = [(k, json.dumps(v, default=str) if isinstance(v, (dict, list)) else v)
            for k, v in parameters.items() if k != "selection"]
    rows += [(f"{k} (s)", f"{float(v):.1f}") for k, v in (model["timings"] or {}).items()]
    w(_kv_table("parameters", "Parameters and timings", rows))

    w("<h2>Image clusters</h2>\n"
      '<table class="sortable" id="image-clusters"><thead><tr><th>cluster</th><th>images</th>'
      "<th>share</th><th>modality / body part</th><th>tag clusters</th></tr></thead><tbody>\n")
    for cluster in sorted(image_sizes):
        size = int(image_sizes[cluster])
        share = size / total if total else 0.0
        w(f'<tr><td class="n" data-v="{cluster}"><a href="#image-cluster-{cluster}">{cluster}'
          f'</a></td><td class="n" data-v="{size}">{size:,}</td>'
          f'<td data-v="{share:.6f}">{bar(share)}</td>'
          f"<td>{_top(image_tags.get(cluster, []), size)}</td>"
          f"<td>{_top(image_vs_tag.get(cluster, []), size)}</td></tr>\n")
    w("</tbody></table>\n")
    for cluster in sorted(image_sizes):
        size = int(image_sizes[cluster])
        _cluster_section(
            w, "image", cluster, size,
            [f"tags: {_top(image_tags.get(cluster, []), size)}",
             f"tag clusters: {_top(image_vs_tag.get(cluster, []), size)}"],
            montage_html(thumbnails.tiles(image_samples.get(cluster, []), tags, show="tag")))

    if run_id is None:
        w('<h2>Tag clusters</h2>\n<p class="muted">No active tag clustering run: run '
          "<code>pacs-annotate recluster</code>.</p>\n")
    else:
        w(f"<h2>Tag clusters (run {run_id})</h2>\n")
        for cluster in sorted(tag_sizes):
            size = int(tag_sizes[cluster])
            _cluster_section(
                w, "tag", cluster, size,
                [f"tags: {_top(tag_tags.get(cluster, []), size)}",
                 f"image clusters: {_top(tag_vs_image.get(cluster, []), size)}"],
                montage_html(thumbnails.tiles(tag_samples.get(cluster, []), tags,
                                              show="image"), empty="no members"))
    w(page_end(check_images=True))
    return out.getvalue()


def write_image_model_report(engine: Engine, storage_root: Path, out: Path,
                             model_id: int | None = None, *,
                             per_cluster: int = DEFAULT_PER_CLUSTER) -> Path:
    """Write :func:`render_image_model_report` to the file ``out`` (its folder is made);
    returns ``out``."""
    page = render_image_model_report(engine, storage_root, model_id, per_cluster=per_cluster)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out


# ------------------------------------------------------------------ query --html


def write_query_report(engine: Engine, storage_root: Path, out: Path, *, hits: Sequence,
                       image_cluster: int, seconds: float, query_uid: str | None = None,
                       query_file: str | Path | None = None, exclude: str = "") -> Path:
    """The query image beside its hits (``image_annotation.Hit``), each with rank, score and
    key tags, as one self-contained HTML file ``out``; returns ``out``."""
    thumbnails = Thumbnails(Path(storage_root))
    with engine.connect() as conn:
        tags = key_tags(conn, [h.sop_instance_uid for h in hits]
                        + ([query_uid] if query_uid else []))
    if query_file is not None:
        import pydicom

        try:
            header = pydicom.dcmread(query_file, stop_before_pixels=True, force=True)
            described = KeyTags(None, str(header.get("Modality", "") or "") or None,
                                str(header.get("BodyPartExamined", "") or "") or None,
                                str(header.get("SeriesDescription", "") or "") or None)
            uid = str(header.get("SOPInstanceUID", "") or "") or Path(query_file).name
        except Exception:  # noqa: BLE001 -- the caption is optional, the image is not
            described, uid = None, Path(query_file).name
        png, reason = thumbnails.of_file("query", Path(query_file).resolve())
        label = f"file {query_file}"
    else:
        described = tags.get(query_uid)
        png, reason = thumbnails.of_file(query_uid, described.file_path if described else None)
        uid, label = query_uid, f"stored instance {query_uid}"
    query_tile = Tile(uid, png, reason, caption=_caption(described, "tag"),
                      note=f"query, image cluster {int(image_cluster)}", css="query")
    notes = {h.sop_instance_uid: f"#{rank} score {h.score:.3f}"
             for rank, h in enumerate(hits, start=1)}
    hit_tiles = []
    for rank, hit in enumerate(hits, start=1):
        found = tags.get(hit.sop_instance_uid)
        png, reason = thumbnails.of_file(hit.sop_instance_uid, found.file_path if found else None)
        caption = _caption(found, "tag") + (
            ("image cluster", f"{hit.image_cluster}{' (same)' if hit.same_cluster else ''}"),)
        hit_tiles.append(Tile(hit.sop_instance_uid, png, reason, caption=caption,
                              note=notes[hit.sop_instance_uid]))
    page = io.StringIO()
    w = page.write
    w(page_start("Query by image", _STYLE))
    w(f"<h1>Query by image</h1>\n<p id=\"summary\">{value_text(label)}: image cluster "
      f"{int(image_cluster)}, {len(hits)} hits in {seconds * 1000:.0f} ms"
      f"{', excluding ' + value_text(exclude) if exclude else ''}. Hits are ranked by cosine "
      "similarity of retrieval codes, the query's own image cluster first.</p>\n")
    w(montage_html([query_tile, *hit_tiles]))
    if not hit_tiles:
        w("<p>No hits.</p>\n")
    w(page_end(check_images=True))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page.getvalue(), encoding="utf-8")
    return out
