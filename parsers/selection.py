"""Which parsed feature columns tag clustering uses (method.md A.2).

Two ways to get a :class:`FeatureSelection`:

* :func:`default_selection`: the shipped list, ``DEFAULT_COLUMNS``, with one reason per
  column (``docs/analysis.md`` has the same table).
* :func:`select_features`: derived from a tag analysis run (``service.tags.analysis``). Rules, in
  order, for every column of ``FEATURE_COLUMNS``:

  1. a column listed in ``keep`` is kept, one in ``exclude`` (by default the two columns
     the shipped list argues against, whatever the data say) is dropped;
  2. its source tag never occurs in the archive: dropped;
  3. its source tag is unique per record (distinct values ~ instances with a value): dropped;
  4. its source tag has a single value in the whole archive (``drop_constant``): dropped,
     a constant adds the same similarity to every pair;
  5. its missing share is above ``max_missing``: dropped. The share is the parsed column's
     (absent, empty *or unparseable*) when column rows are given, else the tag's;
  6. the rest is ranked by missing share (then by the ``FEATURE_COLUMNS`` order) and, when
     ``max_columns`` is given, cut to that many.

Derived columns (``body_part_inferred``, ``body_part_source``) skip rules 3 and 4: their
sources are free text or another column, not the value itself.

Pure functions: rows in, a selection out. A selection serialises to JSON so a clustering run
can store exactly what it used::

    selection = select_features(tag_rows, max_missing=0.5, column_rows=column_rows)
    text = selection.to_json()
    assert FeatureSelection.from_json(text) == selection
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from parsers.registry import FEATURE_COLUMNS

SELECTION_FORMAT = 1
_COLUMNS = {c.name: c for c in FEATURE_COLUMNS}


class SelectionError(ValueError):
    """A selection that names unknown columns or is not valid selection JSON."""


@dataclass(frozen=True)
class FeatureSelection:
    """The columns to cluster on, in order, and why each column is in or out.

    ``reasons`` has one entry per column of ``FEATURE_COLUMNS`` (kept or dropped);
    ``mode`` is ``"default"`` or ``"auto"``; ``parameters`` records the options of an
    automatic selection and the analysis run it came from.
    """

    columns: tuple[str, ...]
    reasons: dict[str, str]
    mode: str = "default"
    parameters: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = [c for c in (*self.columns, *self.reasons) if c not in _COLUMNS]
        if unknown:
            raise SelectionError(f"unknown feature columns: {', '.join(sorted(set(unknown)))}")
        if len(set(self.columns)) != len(self.columns):
            raise SelectionError("a feature column is selected twice")

    @property
    def dropped(self) -> tuple[str, ...]:
        kept = set(self.columns)
        return tuple(c.name for c in FEATURE_COLUMNS if c.name not in kept)

    def to_dict(self) -> dict[str, Any]:
        return {"format": SELECTION_FORMAT, "mode": self.mode, "columns": list(self.columns),
                "reasons": dict(self.reasons), "parameters": dict(self.parameters)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FeatureSelection":
        if not isinstance(data, Mapping) or data.get("format") != SELECTION_FORMAT:
            raise SelectionError(f"not a feature selection of format {SELECTION_FORMAT}")
        columns = data.get("columns")
        if not isinstance(columns, list) or not all(isinstance(c, str) for c in columns):
            raise SelectionError("columns must be a list of column names")
        return cls(columns=tuple(columns), reasons=dict(data.get("reasons") or {}),
                   mode=str(data.get("mode", "default")),
                   parameters=dict(data.get("parameters") or {}))

    @classmethod
    def from_json(cls, text: str) -> "FeatureSelection":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SelectionError(f"not JSON: {exc}") from exc
        return cls.from_dict(data)


# ---------------------------------------------------------------- the shipped default

# Every column of FEATURE_COLUMNS, with why it is kept (None: dropped, and why).
DEFAULT_REASONS: dict[str, tuple[bool, str]] = {
    "modality": (True, "what kind of image it is; the strongest single grouping"),
    "sop_class": (True, "storage class separates e.g. CT, enhanced MR, DX for presentation, "
                        "secondary capture; names a class, not a record"),
    "manufacturer": (True, "vendor-specific reconstruction and post-processing change the "
                           "look of images"),
    "manufacturer_model": (True, "scanner generation: detector, resolution, noise texture"),
    "image_type_1": (True, "ORIGINAL vs DERIVED: reformats and MIPs look different"),
    "image_type_2": (True, "PRIMARY vs SECONDARY: screenshots and reports vs acquisitions"),
    "image_type_3": (True, "modality-specific kind: AXIAL, LOCALIZER, SCOUT, M/P, ..."),
    "photometric_interpretation": (True, "greyscale polarity or colour"),
    "body_part": (True, "the anatomy shown; what users group by"),
    "laterality": (True, "left/right anatomy is mirrored"),
    "image_laterality": (True, "left/right per image (mammography, extremities)"),
    "patient_position": (True, "head/feet first, supine/prone: orientation of the anatomy"),
    "view_position": (True, "projection view (AP, PA, LAT, CC, MLO) decides the radiograph's "
                            "appearance"),
    "patient_sex": (True, "sex-specific anatomy (breast, pelvis)"),
    "patient_age": (True, "paediatric vs adult vs elderly anatomy and bone density"),
    "patient_weight": (True, "body habitus changes noise and field of view; auto mode drops "
                             "it where mostly missing"),
    "patient_size": (True, "body habitus, as weight"),
    "pixel_spacing_row": (True, "in-plane resolution and field of view"),
    "pixel_spacing_col": (True, "in-plane resolution (anisotropic pixels)"),
    "imager_pixel_spacing_row": (True, "detector resolution of projection images"),
    "imager_pixel_spacing_col": (True, "detector resolution of projection images"),
    "image_position_x": (True, "about -FOV/2 plus centring: field of view and left-right offset"),
    "image_position_y": (True, "about -FOV/2 plus centring: field of view and table offset"),
    "image_position_z": (False, "dropped: differs per slice (unique per record) and its origin is "
                                "the scanner's table reference, so distance in z says nothing "
                                "about how two images look"),
    "image_orientation_1": (True, "slice orientation (direction cosine)"),
    "image_orientation_2": (True, "slice orientation (direction cosine)"),
    "image_orientation_3": (True, "slice orientation (direction cosine)"),
    "image_orientation_4": (True, "slice orientation (direction cosine)"),
    "image_orientation_5": (True, "slice orientation (direction cosine)"),
    "image_orientation_6": (True, "slice orientation (direction cosine)"),
    "plane": (True, "axial/coronal/sagittal/oblique: the categorical summary of orientation"),
    "slice_thickness": (True, "partial-volume blur, thin vs thick reconstructions"),
    "spacing_between_slices": (True, "slice sampling of the volume"),
    "rows": (True, "matrix size"),
    "columns": (True, "matrix size"),
    "number_of_frames": (True, "single-frame vs multi-frame (cine, enhanced, tomosynthesis)"),
    "samples_per_pixel": (True, "greyscale vs colour"),
    "bits_allocated": (True, "storage depth: 8-bit captures vs 16-bit acquisitions"),
    "bits_stored": (True, "detector dynamic range"),
    "high_bit": (True, "with bits_stored, the dynamic range"),
    "pixel_representation": (True, "signed (CT) vs unsigned pixel values"),
    "rescale_slope": (True, "value scaling: CT HU vs MR/PET units"),
    "rescale_intercept": (True, "-1024 for CT HU, 0 elsewhere"),
    "rescale_type": (True, "output units (HU, US, ...)"),
    "window_center": (True, "display preset: lung, bone, brain, soft tissue"),
    "window_width": (True, "display preset contrast"),
    "presentation_intent_type": (True, "FOR PROCESSING raw detector data vs FOR PRESENTATION"),
    "kvp": (True, "X-ray energy: contrast between tissues"),
    "xray_tube_current": (True, "tube current: noise level"),
    "exposure_time": (True, "exposure: noise and motion blur"),
    "exposure": (True, "mAs: noise level"),
    "focal_spot": (True, "geometric sharpness"),
    "filter_type": (True, "beam filtration: body vs head protocols"),
    "convolution_kernel": (True, "sharp (bone, lung) vs smooth (soft tissue) reconstruction"),
    "reconstruction_diameter": (True, "reconstructed field of view"),
    "data_collection_diameter": (True, "scan field of view"),
    "distance_source_to_detector": (True, "projection geometry, magnification"),
    "distance_source_to_patient": (True, "projection geometry, magnification"),
    "table_height": (True, "patient centring in the gantry; differs between head and body "
                           "protocols"),
    "gantry_detector_tilt": (True, "tilted (e.g. head CT) vs straight slices"),
    "spiral_pitch_factor": (True, "helical sampling: artefacts and noise"),
    "ctdi_vol": (True, "dose: noise level"),
    "body_part_thickness": (True, "compressed breast/body thickness"),
    "compression_force": (True, "mammography compression"),
    "magnetic_field_strength": (True, "1.5 T vs 3 T: SNR and artefacts"),
    "repetition_time": (True, "T1/T2/PD weighting"),
    "echo_time": (True, "T1/T2/PD weighting"),
    "inversion_time": (True, "FLAIR/STIR contrast"),
    "flip_angle": (True, "gradient-echo contrast"),
    "echo_train_length": (True, "fast spin echo blurring and contrast"),
    "number_of_averages": (True, "SNR"),
    "imaging_frequency": (True, "field strength and nucleus"),
    "pixel_bandwidth": (True, "chemical shift and distortion"),
    "percent_sampling": (True, "resolution in the phase direction"),
    "phase_encoding_steps": (True, "resolution in the phase direction"),
    "percent_phase_field_of_view": (True, "rectangular field of view"),
    "scanning_sequence": (True, "SE, GR, IR, EP: the sequence family"),
    "sequence_variant": (True, "spoiled, segmented, MT, ...: contrast variants"),
    "scan_options": (True, "fat saturation, gating, ...: contrast and artefacts"),
    "mr_acquisition_type": (True, "2D vs 3D acquisition"),
    "angio_flag": (True, "angiography images look unlike anatomy images"),
    "contrast_bolus": (True, "contrast-enhanced vs plain"),
    "contrast_bolus_route": (True, "intravenous vs oral vs intra-articular enhancement"),
    "body_part_inferred": (True, "the anatomy from the descriptions where BodyPartExamined is "
                                 "empty; missing otherwise, which Gower skips"),
    "body_part_source": (False, "dropped: says where our parser found the body part (stored, "
                                "inferred, none), a property of the metadata, not of the image; "
                                "it would split identical images by how they were labelled"),
}

DEFAULT_COLUMNS: tuple[str, ...] = tuple(
    c.name for c in FEATURE_COLUMNS if DEFAULT_REASONS[c.name][0])

DEFAULT_EXCLUDED: tuple[str, ...] = tuple(
    name for name, (keep, _) in DEFAULT_REASONS.items() if not keep)


def default_selection() -> FeatureSelection:
    """The shipped list: every parsed column but the two argued against in DEFAULT_REASONS."""
    return FeatureSelection(
        columns=DEFAULT_COLUMNS,
        reasons={name: ("kept: " if keep else "") + why
                 for name, (keep, why) in DEFAULT_REASONS.items()},
        mode="default")


# ---------------------------------------------------------------- derived from an analysis


def _get(row: Any, name: str, default: Any = None) -> Any:
    if isinstance(row, Mapping):
        return row.get(name, default)
    return getattr(row, name, default)


def select_features(analysis_rows: Iterable[Mapping[str, Any]], *, max_missing: float = 0.5,
                    column_rows: Iterable[Mapping[str, Any]] | None = None,
                    max_columns: int | None = None, keep: Iterable[str] = (),
                    drop_constant: bool = True, exclude: Iterable[str] | None = None,
                    run_id: int | None = None) -> FeatureSelection:
    """The feature columns an analysis supports, least missing first.

    ``analysis_rows``: one mapping per tag with ``keyword``, ``present``,
    ``missing_share``, ``distinct_values`` and ``is_unique_per_record`` (rows of
    ``tag_analysis``, or ``dataclasses.asdict`` of ``service.tags.analysis.TagStats``).
    ``column_rows``: optional, one per parsed column with ``column`` (or ``column_name``)
    and ``missing_share`` (``tag_analysis_columns``); with them a column that is present but
    unparseable counts as missing. ``exclude``: columns never selected; by default the
    ones ``DEFAULT_REASONS`` argues against whatever the data say. See the module docstring
    for the rules.
    """
    if not 0 <= max_missing <= 1:
        raise ValueError("max_missing must be within [0, 1]")
    if max_columns is not None and max_columns < 1:
        raise ValueError("max_columns must be at least 1")
    keep = tuple(keep)
    exclude = tuple(DEFAULT_EXCLUDED if exclude is None else exclude)
    unknown = [c for c in (*keep, *exclude) if c not in _COLUMNS]
    if unknown:
        raise SelectionError(f"unknown feature columns: {', '.join(unknown)}")
    tags = {_get(r, "keyword"): r for r in analysis_rows}
    column_missing: dict[str, float] = {}
    for r in column_rows or ():
        name = _get(r, "column") or _get(r, "column_name")
        if name in _COLUMNS and _get(r, "missing_share") is not None:
            column_missing[name] = float(_get(r, "missing_share"))

    reasons: dict[str, str] = {}
    ranked: list[tuple[float, int, str]] = []
    for order, spec in enumerate(FEATURE_COLUMNS):
        name = spec.name
        sources = [s for s in spec.source.split(",") if s]
        derived = len(sources) > 1 or name in ("body_part_source",)
        rows = [tags[s] for s in sources if s in tags]
        if rows:
            tag_missing = min(float(_get(r, "missing_share", 1.0)) for r in rows)
        else:
            tag_missing = 1.0
        missing = column_missing.get(name, tag_missing)
        if name in keep:
            reasons[name] = f"kept by configuration (missing {100 * missing:.1f}%)"
            ranked.append((-1.0, order, name))
            continue
        if name in exclude:
            reasons[name] = "dropped: excluded by configuration" + (
                f" ({DEFAULT_REASONS[name][1].removeprefix('dropped: ')})"
                if not DEFAULT_REASONS[name][0] else "")
            continue
        if not rows:
            reasons[name] = f"dropped: {spec.source} does not occur in the archive"
            continue
        row = rows[0]
        if not derived and _get(row, "is_unique_per_record"):
            reasons[name] = (f"dropped: {spec.source} is unique per record "
                             f"({_get(row, 'distinct_values'):,} distinct values in "
                             f"{_get(row, 'present'):,} instances)")
            continue
        if not derived and drop_constant and (_get(row, "distinct_values") or 0) <= 1:
            reasons[name] = f"dropped: {spec.source} has one value in the whole archive"
            continue
        if missing > max_missing:
            reasons[name] = (f"dropped: missing in {100 * missing:.1f}% of instances "
                             f"(limit {100 * max_missing:.1f}%)")
            continue
        reasons[name] = f"kept: missing in {100 * missing:.1f}% of instances"
        ranked.append((missing, order, name))

    ranked.sort()
    columns = [name for _, _, name in ranked]
    if max_columns is not None and len(columns) > max_columns:
        for position, name in enumerate(columns[max_columns:], start=max_columns + 1):
            reasons[name] = (f"dropped: ranked {position} by missing share, beyond "
                             f"max_columns={max_columns} ({reasons[name].removeprefix('kept: ')})")
        columns = columns[:max_columns]
    parameters: dict[str, Any] = {"max_missing": max_missing, "max_columns": max_columns,
                                  "keep": list(keep), "exclude": list(exclude),
                                  "drop_constant": drop_constant,
                                  "column_missing": bool(column_missing)}
    if run_id is not None:
        parameters["analysis_run"] = run_id
    return FeatureSelection(columns=tuple(columns), reasons=reasons, mode="auto",
                            parameters=parameters)
