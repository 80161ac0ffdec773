"""Tag keyword -> parser dispatch table, and :func:`parse_instance` over it.

Each :class:`TagRule` names one source tag, the feature columns it fills, and a parser
``(raw, vocabulary) -> Parsed[tuple]`` returning one value per column. Parsers are
total (method.md A.3): an unparseable value becomes missing and is reported as a
:class:`ParseFailure` with its raw value. :func:`parse_instance` also catches anything
a parser raises by mistake, so one bad rule costs one column, never the instance.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

from pydicom.uid import UID

from parsers import terms
from parsers.values import (
    MISSING,
    UID_PATTERN,
    Parsed,
    alias_key,
    as_text,
    clean_code,
    clean_codes,
    parse_age,
    parse_decimals,
    parse_quantity,
    plane_from_orientation,
    reject,
)
from parsers.vocabulary import Vocabulary, load_vocabulary

PARSER_VERSION = "1.0.0"
"""Bump when any output can change (rules, vocabulary, thresholds): stored features
parsed by another version must be re-parsed before they are compared."""

Feature = float | str | None
MAX_RAW_CHARS = 256


@dataclass(frozen=True)
class ColumnSpec:
    name: str
    source: str  # the tag keyword the value comes from
    kind: Literal["numeric", "categorical"]
    unit: str | None
    description: str


@dataclass(frozen=True)
class ParseFailure:
    keyword: str
    column: str
    raw: str  # the stored value, as text, for the report
    reason: str


@dataclass(frozen=True)
class ParseResult:
    features: dict[str, Feature]
    failures: tuple[ParseFailure, ...]


Parser = Callable[[Any, Vocabulary], Parsed[tuple[Feature, ...]]]


@dataclass(frozen=True)
class TagRule:
    keyword: str
    columns: tuple[ColumnSpec, ...]
    parse: Parser


# ---------------------------------------------------------------- parser builders

# Units written after a number that mean the column's unit times a factor; any other
# unit is rejected rather than guessed (a height "175 cm" is 1.75 m, "175 in" is not).
# A unit equal to the column's (any case) needs no entry. Columns without a unit take
# plain numbers only ("1A" frames is garbage, not one frame).
UNIT_FACTORS: dict[tuple[str, str], float] = {
    ("mm", "cm"): 10.0, ("mm", "m"): 1000.0,
    ("m", "cm"): 0.01, ("m", "mm"): 0.001,
    ("kg", "g"): 0.001, ("kg", "lb"): 0.45359237, ("kg", "lbs"): 0.45359237,
    ("ms", "s"): 1000.0, ("ms", "sec"): 1000.0, ("ms", "us"): 0.001, ("ms", "µs"): 0.001,
    ("kV", "kvp"): 1.0, ("T", "tesla"): 1.0, ("deg", "°"): 1.0, ("deg", "degrees"): 1.0,
    ("year", "y"): 1.0,
}


def numeric(unit: str | None, low: float, high: float, *, low_open: bool = False) -> Parser:
    """One number in ``[low, high]`` (``(low, high]`` with ``low_open``), unit-checked."""

    def parse(raw: Any, vocabulary: Vocabulary) -> Parsed[tuple[Feature, ...]]:
        parsed = parse_quantity(raw)
        if parsed.value is None:
            return Parsed(None, parsed.problem)
        number, written = parsed.value.number, parsed.value.unit
        if written:
            same = unit is not None and written.casefold() == unit.casefold()
            factor = 1.0 if same else UNIT_FACTORS.get((unit or "", written.casefold()))
            if factor is None:
                return reject(f"unit {written!r} where {unit or 'a plain number'} was expected")
            number *= factor
        if number < low or number > high or (low_open and number == low):
            return reject(f"{number:g} outside {'(' if low_open else '['}{low:g}, {high:g}]")
        return Parsed((number,))

    return parse


def numbers(count: int, low: float, high: float, *, first_only: bool = False) -> Parser:
    """``count`` numbers from one multi-valued tag, or only its first value."""

    def parse(raw: Any, vocabulary: Vocabulary) -> Parsed[tuple[Feature, ...]]:
        parsed = parse_decimals(raw)
        if parsed.value is None:
            return Parsed(None, parsed.problem)
        values = parsed.value[:1] if first_only else parsed.value
        if len(values) != count:
            return reject(f"{len(values)} values where {count} were expected")
        if any(v is not None and not low <= v <= high for v in values):
            return reject(f"a value outside [{low:g}, {high:g}]")
        return Parsed(tuple(values))

    return parse


def orientation(raw: Any, vocabulary: Vocabulary) -> Parsed[tuple[Feature, ...]]:
    """Six direction cosines and the derived plane (see values.plane_from_orientation)."""
    cosines = numbers(6, -1.0001, 1.0001)(raw, vocabulary)
    if cosines.value is None:
        return Parsed(None, cosines.problem)
    plane = plane_from_orientation(cosines.value)
    return Parsed((*cosines.value, plane.value), plane.problem)


def age(raw: Any, vocabulary: Vocabulary) -> Parsed[tuple[Feature, ...]]:
    parsed = parse_age(raw)
    return Parsed(None if parsed.value is None else (parsed.value,), parsed.problem)


def categorical(keyword: str, *, closed: bool = False) -> Parser:
    """A code normalised through the vocabulary of ``keyword``.

    Unknown values keep their cleaned uppercase form, unless ``closed`` (the standard's
    Enumerated Values: a value outside them is an error, not a new term).
    """

    def parse(raw: Any, vocabulary: Vocabulary) -> Parsed[tuple[Feature, ...]]:
        cleaned = clean_code(raw)
        if cleaned.value is None:
            return Parsed(None, cleaned.problem)
        code = vocabulary.lookup(keyword, cleaned.value)
        if code is not None:
            return Parsed((code,))
        if closed:
            return reject("not one of the enumerated values")
        return Parsed((cleaned.value,))

    return parse


def body_part(raw: Any, vocabulary: Vocabulary) -> Parsed[tuple[Feature, ...]]:
    """BodyPartExamined: alias table, then the inference rules on the stored text itself
    (``"Thorax p.a. liegend"`` -> CHEST), then the cleaned form."""
    cleaned = clean_code(raw)
    if cleaned.value is None:
        return Parsed(None, cleaned.problem)
    code = vocabulary.lookup("BodyPartExamined", cleaned.value)
    if code is None:
        code = vocabulary.infer_body_part([cleaned.value])
    return Parsed((code or cleaned.value,))


def image_type(raw: Any, vocabulary: Vocabulary) -> Parsed[tuple[Feature, ...]]:
    """ImageType values 1-3: ORIGINAL/DERIVED, PRIMARY/SECONDARY, then the modality's own."""
    parsed = clean_codes(raw)
    if parsed.value is None:
        return Parsed(None, parsed.problem)
    values: list[Feature] = list(parsed.value[:3]) + [None] * (3 - len(parsed.value[:3]))
    problems = []
    for i, allowed in ((0, {"ORIGINAL", "DERIVED"}), (1, {"PRIMARY", "SECONDARY"})):
        if values[i] is not None and values[i] not in allowed:
            problems.append(f"value {i + 1} {values[i]!r} is not one of {sorted(allowed)}")
            values[i] = None
    return Parsed(tuple(values), "; ".join(problems))


def code_set(keyword: str) -> Parser:
    """A multi-valued code string whose values form a set (ScanningSequence ``EP\\SE`` is
    ``SE\\EP``): each value through the vocabulary of ``keyword``, then sorted,
    deduplicated and joined with a backslash."""

    def parse(raw: Any, vocabulary: Vocabulary) -> Parsed[tuple[Feature, ...]]:
        parsed = clean_codes(raw)
        if parsed.value is None:
            return Parsed(None, parsed.problem)
        codes = {vocabulary.lookup(keyword, value) or value for value in parsed.value}
        return Parsed(("\\".join(sorted(codes)),))

    return parse


_CONTRAST_NEGATIVE = frozenset(alias_key(t) for t in terms.CONTRAST_NEGATIVE)


def contrast_presence(raw: Any, vocabulary: Vocabulary) -> Parsed[tuple[Feature, ...]]:
    """YES when an agent is named, NO when the element is present but empty or says none.

    Called only when the tag is present: the Contrast/Bolus module writes it (type 2)
    for every image it applies to, so an empty value means "no contrast".
    """
    if raw is None:
        return Parsed(("NO",))
    cleaned = clean_code(raw)
    if cleaned.problem:
        return Parsed(None, cleaned.problem)
    if cleaned.value is None or alias_key(cleaned.value) in _CONTRAST_NEGATIVE:
        return Parsed(("NO",))
    return Parsed(("YES",))


@lru_cache(maxsize=1024)
def _sop_class_name(uid: str) -> str:
    name = UID(uid).keyword
    return name or uid


def sop_class(raw: Any, vocabulary: Vocabulary) -> Parsed[tuple[Feature, ...]]:
    """SOPClassUID as its keyword (``MRImageStorage``); unknown (private) classes keep the
    UID. Not unique per record, so unlike other UIDs it is a feature."""
    text = as_text(raw[0] if isinstance(raw, list) and len(raw) == 1 else raw)
    if text is None:
        return MISSING if raw is None or isinstance(raw, str) else reject("not a UID")
    if len(text) > 64 or not UID_PATTERN.fullmatch(text):
        return reject("not a UID")
    return Parsed((_sop_class_name(text),))


# ---------------------------------------------------------------- the registry


def _column(name: str, source: str, kind: Literal["numeric", "categorical"], unit: str | None,
            description: str) -> ColumnSpec:
    return ColumnSpec(name, source, kind, unit, description)


def _num(name: str, keyword: str, unit: str | None, low: float, high: float, description: str,
         *, low_open: bool = False) -> TagRule:
    valid = f"{'(' if low_open else '['}{low:g}, {high:g}]"
    return TagRule(keyword, (_column(name, keyword, "numeric", unit, f"{description}; valid {valid}"),),
                   numeric(unit, low, high, low_open=low_open))


def _cat(name: str, keyword: str, parse: Parser, description: str) -> TagRule:
    return TagRule(keyword, (_column(name, keyword, "categorical", None, description),), parse)


def _pair(prefix: str, keyword: str, unit: str, low: float, high: float, what: str,
          suffixes: tuple[str, ...], parse: Parser | None = None) -> TagRule:
    columns = tuple(_column(f"{prefix}_{s}", keyword, "numeric", unit, f"{what}, {s}")
                    for s in suffixes)
    return TagRule(keyword, columns, parse or numbers(len(suffixes), low, high))


_BIG = 1e9
RULES: tuple[TagRule, ...] = (
    # --- what the instance is
    _cat("modality", "Modality", categorical("Modality"), "Modality defined term (aliases such as MRI -> MR)"),
    _cat("sop_class", "SOPClassUID", sop_class, "SOP class keyword, e.g. MRImageStorage"),
    _cat("manufacturer", "Manufacturer", categorical("Manufacturer"), "Manufacturer, normalised company code"),
    _cat("manufacturer_model", "ManufacturerModelName", categorical("ManufacturerModelName"), "Model name, cleaned"),
    TagRule("ImageType", tuple(
        _column(f"image_type_{i}", "ImageType", "categorical", None, what)
        for i, what in ((1, "ImageType value 1: ORIGINAL or DERIVED"),
                        (2, "ImageType value 2: PRIMARY or SECONDARY"),
                        (3, "ImageType value 3: modality-specific, cleaned")))
    , image_type),
    _cat("photometric_interpretation", "PhotometricInterpretation",
         categorical("PhotometricInterpretation"), "Photometric interpretation defined term"),
    # --- anatomy and patient
    _cat("body_part", "BodyPartExamined", body_part, "BodyPartExamined as stored, normalised to CID 4031 terms"),
    _cat("laterality", "Laterality", categorical("Laterality", closed=True), "Laterality of the series: R, L"),
    _cat("image_laterality", "ImageLaterality", categorical("ImageLaterality", closed=True), "Laterality of the image: R, L, B, U"),
    _cat("patient_position", "PatientPosition", categorical("PatientPosition"), "Patient position: HFS, FFS, HFP, ..."),
    _cat("view_position", "ViewPosition", categorical("ViewPosition"), "Projection view: AP, PA, LL, RL, LAT, CC, MLO, ..."),
    _cat("patient_sex", "PatientSex", categorical("PatientSex", closed=True), "Patient sex: M, F, O"),
    TagRule("PatientAge", (_column("patient_age", "PatientAge", "numeric", "year", "Patient age in years"),), age),
    _num("patient_weight", "PatientWeight", "kg", 0, 700, "Patient weight (0 is a placeholder)", low_open=True),
    _num("patient_size", "PatientSize", "m", 0, 3, "Patient height (0 is a placeholder)", low_open=True),
    # --- image plane
    _pair("pixel_spacing", "PixelSpacing", "mm", 1e-6, 1e4, "Pixel spacing", ("row", "col")),
    _pair("imager_pixel_spacing", "ImagerPixelSpacing", "mm", 1e-6, 1e4, "Imager pixel spacing (projection)", ("row", "col")),
    _pair("image_position", "ImagePositionPatient", "mm", -1e6, 1e6, "Position of the first pixel", ("x", "y", "z")),
    TagRule("ImageOrientationPatient", (
        *(_column(f"image_orientation_{i}", "ImageOrientationPatient", "numeric", None,
                  f"Direction cosine {i} ({'row' if i <= 3 else 'column'} {'xyz'[(i - 1) % 3]})")
          for i in range(1, 7)),
        _column("plane", "ImageOrientationPatient", "categorical", None,
                "AXIAL, CORONAL, SAGITTAL or OBLIQUE from the slice normal"),
    ), orientation),
    _num("slice_thickness", "SliceThickness", "mm", 0, 1e4, "Slice thickness"),
    _num("spacing_between_slices", "SpacingBetweenSlices", "mm", -1e4, 1e4, "Spacing between slices"),
    _num("rows", "Rows", None, 1, 65535, "Rows"),
    _num("columns", "Columns", None, 1, 65535, "Columns"),
    _num("number_of_frames", "NumberOfFrames", None, 1, _BIG, "Number of frames"),
    # --- pixel encoding and display
    _num("samples_per_pixel", "SamplesPerPixel", None, 1, 4, "Samples per pixel"),
    _num("bits_allocated", "BitsAllocated", None, 1, 64, "Bits allocated"),
    _num("bits_stored", "BitsStored", None, 1, 64, "Bits stored"),
    _num("high_bit", "HighBit", None, 0, 63, "High bit"),
    _num("pixel_representation", "PixelRepresentation", None, 0, 1, "0 unsigned, 1 two's complement"),
    _num("rescale_slope", "RescaleSlope", None, -_BIG, _BIG, "Rescale slope"),
    _num("rescale_intercept", "RescaleIntercept", None, -_BIG, _BIG, "Rescale intercept"),
    _cat("rescale_type", "RescaleType", categorical("RescaleType"), "Rescale output units, e.g. HU"),
    TagRule("WindowCenter", (_column("window_center", "WindowCenter", "numeric", None, "First window center"),),
            numbers(1, -_BIG, _BIG, first_only=True)),
    TagRule("WindowWidth", (_column("window_width", "WindowWidth", "numeric", None, "First window width"),),
            numbers(1, 0, _BIG, first_only=True)),
    _cat("presentation_intent_type", "PresentationIntentType", categorical("PresentationIntentType"),
         "FOR PRESENTATION or FOR PROCESSING"),
    # --- X-ray and CT acquisition
    _num("kvp", "KVP", "kV", 0, 1000, "Peak kilovoltage (0 is a placeholder)", low_open=True),
    _num("xray_tube_current", "XRayTubeCurrent", "mA", 0, 1e5, "X-ray tube current"),
    _num("exposure_time", "ExposureTime", "ms", 0, 1e7, "Exposure time"),
    _num("exposure", "Exposure", "mAs", 0, 1e7, "Exposure"),
    TagRule("FocalSpots", (_column("focal_spot", "FocalSpots", "numeric", "mm", "First nominal focal spot size"),),
            numbers(1, 0, 100, first_only=True)),
    _cat("filter_type", "FilterType", categorical("FilterType"), "X-ray filter type, cleaned"),
    _cat("convolution_kernel", "ConvolutionKernel", categorical("ConvolutionKernel"), "Reconstruction kernel (first value), cleaned"),
    _num("reconstruction_diameter", "ReconstructionDiameter", "mm", 0, 1e4, "Reconstruction diameter"),
    _num("data_collection_diameter", "DataCollectionDiameter", "mm", 0, 1e4, "Data collection diameter"),
    _num("distance_source_to_detector", "DistanceSourceToDetector", "mm", 0, 1e5, "Source to detector distance"),
    _num("distance_source_to_patient", "DistanceSourceToPatient", "mm", 0, 1e5, "Source to patient distance"),
    _num("table_height", "TableHeight", "mm", -1e4, 1e4, "Table height"),
    _num("gantry_detector_tilt", "GantryDetectorTilt", "deg", -180, 180, "Gantry/detector tilt"),
    _num("spiral_pitch_factor", "SpiralPitchFactor", None, 0, 100, "Spiral pitch factor"),
    _num("ctdi_vol", "CTDIvol", "mGy", 0, 1e5, "CTDIvol"),
    _num("body_part_thickness", "BodyPartThickness", "mm", 0, 2000, "Compressed body part thickness"),
    _num("compression_force", "CompressionForce", "N", 0, 1e4, "Compression force (mammography)"),
    # --- MR acquisition
    _num("magnetic_field_strength", "MagneticFieldStrength", "T", 0, 30, "Field strength (0 is a placeholder)", low_open=True),
    _num("repetition_time", "RepetitionTime", "ms", 0, 1e7, "Repetition time"),
    _num("echo_time", "EchoTime", "ms", 0, 1e6, "Echo time"),
    _num("inversion_time", "InversionTime", "ms", 0, 1e7, "Inversion time"),
    _num("flip_angle", "FlipAngle", "deg", 0, 360, "Flip angle"),
    _num("echo_train_length", "EchoTrainLength", None, 0, 1e5, "Echo train length"),
    _num("number_of_averages", "NumberOfAverages", None, 0, 1e5, "Number of averages"),
    _num("imaging_frequency", "ImagingFrequency", "MHz", 0, 1e4, "Imaging frequency"),
    _num("pixel_bandwidth", "PixelBandwidth", "Hz", 0, 1e7, "Pixel bandwidth (Hz/pixel)"),
    _num("percent_sampling", "PercentSampling", "%", 0, 1000, "Percent sampling"),
    _num("phase_encoding_steps", "NumberOfPhaseEncodingSteps", None, 0, 1e5, "Number of phase encoding steps"),
    _num("percent_phase_field_of_view", "PercentPhaseFieldOfView", "%", 0, 1000, "Percent phase field of view"),
    _cat("scanning_sequence", "ScanningSequence", code_set("ScanningSequence"), "Scanning sequence set (SE, IR, GR, EP, RM)"),
    _cat("sequence_variant", "SequenceVariant", code_set("SequenceVariant"), "Sequence variant set (SK, SS, SP, MP, OSP, ...)"),
    _cat("scan_options", "ScanOptions", code_set("ScanOptions"), "Scan options set, vendor values kept"),
    _cat("mr_acquisition_type", "MRAcquisitionType", categorical("MRAcquisitionType", closed=True), "2D or 3D"),
    _cat("angio_flag", "AngioFlag", categorical("AngioFlag", closed=True), "Angio image: Y or N"),
    # --- contrast
    _cat("contrast_bolus", "ContrastBolusAgent", contrast_presence, "Contrast agent given: YES or NO"),
    _cat("contrast_bolus_route", "ContrastBolusRoute", categorical("ContrastBolusRoute"), "Contrast route, cleaned"),
)

# Columns computed from several tags after the registry has run (see parse_instance).
BODY_PART_TEXT_SOURCES = ("SeriesDescription", "ProtocolName", "StudyDescription",
                          "RequestedProcedureDescription", "PerformedProcedureStepDescription")
DERIVED_COLUMNS: tuple[ColumnSpec, ...] = (
    ColumnSpec("body_part_inferred", ",".join(BODY_PART_TEXT_SOURCES), "categorical", None,
               "Body part inferred from description keywords; only when body_part is missing"),
    ColumnSpec("body_part_source", "BodyPartExamined", "categorical", None,
               "stored, inferred or none: where the body part came from"),
)

PARSERS: dict[str, TagRule] = {rule.keyword: rule for rule in RULES}
FEATURE_COLUMNS: tuple[ColumnSpec, ...] = (
    *(column for rule in RULES for column in rule.columns),
    *DERIVED_COLUMNS,
)

# ---------------------------------------------------------------- running it

_FUNCTIONAL_GROUPS = ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence")


def find_tag(tags: Mapping[str, Any], keyword: str) -> tuple[bool, Any]:
    """``(present, raw)`` for ``keyword``: top level first, then (enhanced multi-frame
    objects) the shared functional groups, then the first frame's."""
    if keyword in tags:
        return True, tags[keyword]
    for group in _FUNCTIONAL_GROUPS:
        items = tags.get(group)
        if not isinstance(items, list) or not items or not isinstance(items[0], dict):
            continue
        for macro in items[0].values():
            if isinstance(macro, list) and macro and isinstance(macro[0], dict) and keyword in macro[0]:
                return True, macro[0][keyword]
    return False, None


def raw_text(raw: Any) -> str:
    """The raw value as text for a failure report, cut to MAX_RAW_CHARS."""
    try:
        text = raw if isinstance(raw, str) else json.dumps(raw, default=repr, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        text = repr(raw)
    return text[:MAX_RAW_CHARS]


def _run_rule(rule: TagRule, raw: Any, vocabulary: Vocabulary) -> Parsed[tuple[Feature, ...]]:
    try:
        parsed = rule.parse(raw, vocabulary)
    except Exception as exc:  # the totality boundary: a bug becomes a failure  # noqa: BLE001
        return reject(f"parser error: {type(exc).__name__}: {exc}")
    if parsed.value is not None and len(parsed.value) != len(rule.columns):
        return reject(f"parser returned {len(parsed.value)} values for {len(rule.columns)} columns")
    return parsed


def parse_instance(tags: Mapping[str, Any], vocabulary: Vocabulary | None = None) -> ParseResult:
    """All feature columns of one instance from its tag JSON (``InstanceHeader.tags``).

    Never raises for any content of ``tags``. Absent tags give missing columns and no
    failure; present values that cannot be parsed give missing columns and one
    :class:`ParseFailure` per column lost.
    """
    vocabulary = vocabulary or default_vocabulary()
    features: dict[str, Feature] = {column.name: None for column in FEATURE_COLUMNS}
    failures: list[ParseFailure] = []
    for rule in RULES:
        try:
            present, raw = find_tag(tags, rule.keyword)
        except Exception as exc:  # noqa: BLE001 - a Mapping that misbehaves
            present, raw = True, None
            failures.append(ParseFailure(rule.keyword, rule.columns[0].name, "", f"lookup error: {exc}"))
        if not present:
            continue
        parsed = _run_rule(rule, raw, vocabulary)
        values = parsed.value or (None,) * len(rule.columns)
        for column, value in zip(rule.columns, values):
            features[column.name] = value
            if parsed.problem and value is None:
                failures.append(ParseFailure(rule.keyword, column.name, raw_text(raw), parsed.problem))

    if features["body_part"] is not None:
        features["body_part_source"] = "stored"
    else:
        try:
            texts = [_description(tags, keyword) for keyword in BODY_PART_TEXT_SOURCES]
            features["body_part_inferred"] = vocabulary.infer_body_part(texts)
        except Exception as exc:  # noqa: BLE001
            failures.append(ParseFailure("BodyPartExamined", "body_part_inferred", "", f"inference error: {exc}"))
        features["body_part_source"] = "inferred" if features["body_part_inferred"] else "none"
    return ParseResult(features, tuple(failures))


def _description(tags: Mapping[str, Any], keyword: str) -> str | None:
    value = tags.get(keyword)
    if isinstance(value, list):  # a backslash in free text splits it into "values"
        value = " ".join(str(v) for v in value if v is not None)
    return as_text(value) if isinstance(value, (str, bytes)) else None


@lru_cache(maxsize=1)
def default_vocabulary() -> Vocabulary:
    """The shipped vocabulary, built once."""
    return load_vocabulary()
