"""Table tests for parse_instance: every rule in the registry, vocabularies, inference,
site files, and totality (no input makes a parser raise)."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import pytest

import parsers
from parsers import (
    FEATURE_COLUMNS,
    PARSER_VERSION,
    PARSERS,
    ParseResult,
    Vocabulary,
    VocabularyError,
    load_vocabulary,
    parse_instance,
)
from parsers.registry import RULES, TagRule

COLUMN_NAMES = [c.name for c in FEATURE_COLUMNS]


def case(*values_then_reason):
    *values, reason = values_then_reason
    return pytest.param(*values, id=reason)


def feature(column: str, tags: dict, vocabulary: Vocabulary | None = None):
    return parse_instance(tags, vocabulary).features[column]


# ---------------------------------------------------------------- the column list

def test_feature_columns_are_unique_and_all_present():
    assert len(COLUMN_NAMES) == len(set(COLUMN_NAMES))
    result = parse_instance({})
    assert list(result.features) == COLUMN_NAMES
    assert all(v is None for k, v in result.features.items() if k != "body_part_source")
    assert result.features["body_part_source"] == "none"
    assert result.failures == ()


def test_column_specs_are_well_formed():
    assert isinstance(PARSER_VERSION, str) and PARSER_VERSION
    for column in FEATURE_COLUMNS:
        assert column.kind in ("numeric", "categorical")
        assert column.name == column.name.lower() and column.description
        assert column.source
    assert all(rule.keyword == rule.columns[0].source for rule in RULES)
    assert set(PARSERS) == {rule.keyword for rule in RULES}
    assert 80 <= len(FEATURE_COLUMNS) <= 90  # the paper's 85, give or take


def test_public_names_are_exported():
    for name in ("PARSER_VERSION", "ColumnSpec", "FEATURE_COLUMNS", "ParseFailure",
                 "ParseResult", "parse_instance", "load_vocabulary", "Vocabulary"):
        assert hasattr(parsers, name)


# ---------------------------------------------------------------- numeric rules

@pytest.mark.parametrize("column, tags, expected", [
    case("pixel_spacing_row", {"PixelSpacing": ["0.3125", "0.4"]}, 0.3125, "row from the JSON list"),
    case("pixel_spacing_col", {"PixelSpacing": ["0.3125", "0.4"]}, 0.4, "column from the JSON list"),
    case("pixel_spacing_col", {"PixelSpacing": "[0.7, 0.7]"}, 0.7, "str of a list"),
    case("pixel_spacing_row", {"PixelSpacing": ["0.000", "0.000"]}, None, "zero spacing"),
    case("pixel_spacing_row", {"PixelSpacing": "0.7"}, None, "one value where two are expected"),
    case("imager_pixel_spacing_col", {"ImagerPixelSpacing": "0,1\\0,1"}, 0.1, "decimal commas"),
    case("image_position_z", {"ImagePositionPatient": ["-158.1", "-179.0", "-75.7"]}, -75.7, "z"),
    case("image_orientation_6", {"ImageOrientationPatient": "1\\0\\0\\0\\1\\0"}, 0.0, "cosine 6"),
    case("image_orientation_1", {"ImageOrientationPatient": "1\\0\\0\\0\\1"}, None, "five cosines"),
    case("image_orientation_1", {"ImageOrientationPatient": "3\\0\\0\\0\\1\\0"}, None, "cosine above 1"),
    case("plane", {"ImageOrientationPatient": ["0", "1", "0", "0", "0", "-1"]}, "SAGITTAL", "plane"),
    case("plane", {"ImageOrientationPatient": "1\\0\\0\\1\\0\\0"}, None, "degenerate plane"),
    case("image_orientation_1", {"ImageOrientationPatient": "1\\0\\0\\1\\0\\0"}, 1.0,
         "cosines kept when only the plane fails"),
    case("window_center", {"WindowCenter": ["40", "400"]}, 40.0, "first of several centers"),
    case("window_width", {"WindowWidth": "400\\1500"}, 400.0, "first width from text"),
    case("window_width", {"WindowWidth": "-5"}, None, "negative width"),
    case("slice_thickness", {"SliceThickness": "5 mm"}, 5.0, "unit junk"),
    case("slice_thickness", {"SliceThickness": "0.5cm"}, 5.0, "centimetres converted"),
    case("slice_thickness", {"SliceThickness": "5 kg"}, None, "wrong unit"),
    case("slice_thickness", {"SliceThickness": "1,5"}, 1.5, "decimal comma"),
    case("slice_thickness", {"SliceThickness": "NaN"}, None, "NaN"),
    case("kvp", {"KVP": " 120 "}, 120.0, "stray spaces"),
    case("kvp", {"KVP": "120 kV"}, 120.0, "kV written"),
    case("kvp", {"KVP": "0"}, None, "zero is a placeholder"),
    case("exposure_time", {"ExposureTime": "0.5 s"}, 500.0, "seconds to ms"),
    case("patient_weight", {"PatientWeight": "70.00"}, 70.0, "weight"),
    case("patient_weight", {"PatientWeight": "0.000000"}, None, "zero weight placeholder"),
    case("patient_weight", {"PatientWeight": "154 lbs"}, pytest.approx(69.853, abs=1e-3), "pounds"),
    case("patient_size", {"PatientSize": "1.75"}, 1.75, "height in metres"),
    case("patient_size", {"PatientSize": "175"}, None, "175 m is not a height"),
    case("patient_size", {"PatientSize": "175 cm"}, 1.75, "height in cm with unit"),
    case("patient_age", {"PatientAge": "045Y"}, 45.0, "age"),
    case("patient_age", {"PatientAge": "006M"}, 0.5, "age in months"),
    case("patient_age", {"PatientAge": "151Y"}, None, "absurd age"),
    case("rows", {"Rows": 512}, 512.0, "binary US"),
    case("rows", {"Rows": 0}, None, "zero rows"),
    case("rows", {"Rows": {"InlineBinary": "AAA="}}, None, "binary blob"),
    case("repetition_time", {"RepetitionTime": "1999.99975585937"}, 1999.99975585937, "long DS"),
    case("flip_angle", {"FlipAngle": "90°"}, 90.0, "degree sign"),
    case("magnetic_field_strength", {"MagneticFieldStrength": "1.5T"}, 1.5, "tesla"),
    case("magnetic_field_strength", {"MagneticFieldStrength": "15000"}, None, "gauss, out of range"),
    case("rescale_intercept", {"RescaleIntercept": "-1024"}, -1024.0, "negative intercept"),
    case("number_of_frames", {"NumberOfFrames": "1A"}, None, "garbage IS"),
    case("focal_spot", {"FocalSpots": ["0.7", "1.2"]}, 0.7, "first focal spot"),
])
def test_numeric_columns(column, tags, expected):
    assert feature(column, tags) == expected


# ---------------------------------------------------------------- categorical rules

@pytest.mark.parametrize("column, tags, expected", [
    # BodyPartExamined: CID 4031 terms and spellings (method.md A.3)
    case("body_part", {"BodyPartExamined": "T SPINE"}, "TSPINE", "space"),
    case("body_part", {"BodyPartExamined": "TSPINE"}, "TSPINE", "canonical"),
    case("body_part", {"BodyPartExamined": "T-SPINE"}, "TSPINE", "hyphen"),
    case("body_part", {"BodyPartExamined": "thoracic spine"}, "TSPINE", "English words"),
    case("body_part", {"BodyPartExamined": "Th-spine"}, "TSPINE", "Th abbreviation"),
    case("body_part", {"BodyPartExamined": "BWS"}, "TSPINE", "German abbreviation"),
    case("body_part", {"BodyPartExamined": "HWS"}, "CSPINE", "German cervical"),
    case("body_part", {"BodyPartExamined": "LWS"}, "LSPINE", "German lumbar"),
    case("body_part", {"BodyPartExamined": "Halswirbelsäule"}, "CSPINE", "German word with umlaut"),
    case("body_part", {"BodyPartExamined": "Schädel"}, "HEAD", "German skull/head"),
    case("body_part", {"BodyPartExamined": "Thorax"}, "CHEST", "German/Latin chest"),
    case("body_part", {"BodyPartExamined": "Thorax p.a. liegend"}, "CHEST", "free words, via the rules"),
    case("body_part", {"BodyPartExamined": "Pluća"}, "CHEST", "Croatian lungs"),
    case("body_part", {"BodyPartExamined": "Glava"}, "HEAD", "Croatian head"),
    case("body_part", {"BodyPartExamined": "koljeno"}, "KNEE", "Croatian knee"),
    case("body_part", {"BodyPartExamined": "Genou"}, "KNEE", "French knee"),
    case("body_part", {"BodyPartExamined": "ginocchio"}, "KNEE", "Italian knee"),
    case("body_part", {"BodyPartExamined": "rodilla"}, "KNEE", "Spanish knee"),
    case("body_part", {"BodyPartExamined": "Cheville"}, "ANKLE", "French ankle"),
    case("body_part", {"BodyPartExamined": "WHOLE BODY"}, "WHOLEBODY", "two words"),
    case("body_part", {"BodyPartExamined": "ABD PELVIS"}, "ABDOMENPELVIS", "abbreviated pair"),
    case("body_part", {"BodyPartExamined": "Chest/Abd/Pelvis"}, "CHESTABDPELVIS", "slashes"),
    case("body_part", {"BodyPartExamined": "Head and Neck"}, "HEADNECK", "with and"),
    case("body_part", {"BodyPartExamined": "PANCREAS"}, "PANCREAS", "organ term"),
    case("body_part", {"BodyPartExamined": "PHANTOM"}, "PHANTOM", "phantom"),
    case("body_part", {"BodyPartExamined": "QQQ7"}, "QQQ7", "unknown kept cleaned"),
    case("body_part", {"BodyPartExamined": "\x01\x02"}, None, "garbage"),
    case("body_part", {"BodyPartExamined": None}, None, "empty"),
    # Manufacturer
    case("manufacturer", {"Manufacturer": "GE MEDICAL SYSTEMS"}, "GE", "GE upper"),
    case("manufacturer", {"Manufacturer": "G.E. Medical Systems"}, "GE", "GE dotted"),
    case("manufacturer", {"Manufacturer": "GE Medical Systems"}, "GE", "GE mixed case"),
    case("manufacturer", {"Manufacturer": "GE Healthcare"}, "GE", "GE Healthcare"),
    case("manufacturer", {"Manufacturer": "GE"}, "GE", "bare GE"),
    case("manufacturer", {"Manufacturer": "GENESIS"}, "GENESIS", "GE is not a bare prefix"),
    case("manufacturer", {"Manufacturer": "SIEMENS"}, "SIEMENS", "Siemens upper"),
    case("manufacturer", {"Manufacturer": "Siemens Healthineers"}, "SIEMENS", "Siemens Healthineers"),
    case("manufacturer", {"Manufacturer": "Philips Medical Systems"}, "PHILIPS", "Philips"),
    case("manufacturer", {"Manufacturer": "Philips Medical Systems, Inc."}, "PHILIPS", "Philips Inc"),
    case("manufacturer", {"Manufacturer": "TOSHIBA_MEC"}, "TOSHIBA", "Toshiba underscore"),
    case("manufacturer", {"Manufacturer": "CANON_MEC"}, "CANON", "Canon"),
    case("manufacturer", {"Manufacturer": "Agfa-Gevaert AG"}, "AGFA", "Agfa"),
    case("manufacturer", {"Manufacturer": "FUJI PHOTO FILM CO. LTD."}, "FUJIFILM", "Fuji"),
    case("manufacturer", {"Manufacturer": "FUJIFILM Corporation"}, "FUJIFILM", "Fujifilm"),
    case("manufacturer", {"Manufacturer": "Kodak"}, "CARESTREAM", "Kodak is Carestream now"),
    case("manufacturer", {"Manufacturer": "Acme  Products"}, "ACME PRODUCTS", "unknown kept cleaned"),
    # Modality
    case("modality", {"Modality": "MR"}, "MR", "defined term"),
    case("modality", {"Modality": "mri"}, "MR", "alias"),
    case("modality", {"Modality": "PET"}, "PT", "PET alias"),
    case("modality", {"Modality": "Mammo"}, "MG", "mammo alias"),
    case("modality", {"Modality": "ZZ"}, "ZZ", "unknown kept"),
    # Laterality (enumerated: closed)
    case("laterality", {"Laterality": "R"}, "R", "R"),
    case("laterality", {"Laterality": "left"}, "L", "English"),
    case("laterality", {"Laterality": "links"}, "L", "German"),
    case("laterality", {"Laterality": "desno"}, "R", "Croatian"),
    case("laterality", {"Laterality": "bilateral"}, "B", "both"),
    case("laterality", {"Laterality": "Q"}, None, "not an enumerated value"),
    case("image_laterality", {"ImageLaterality": "U"}, "U", "unpaired"),
    # PatientPosition, ViewPosition
    case("patient_position", {"PatientPosition": "HFS"}, "HFS", "head first supine"),
    case("patient_position", {"PatientPosition": "ffs"}, "FFS", "lower case"),
    case("patient_position", {"PatientPosition": "Head First-Supine"}, "HFS", "words"),
    case("view_position", {"ViewPosition": "P-A"}, "PA", "hyphenated"),
    case("view_position", {"ViewPosition": "LL"}, "LL", "left lateral"),
    case("view_position", {"ViewPosition": "lateral"}, "LAT", "side unknown"),
    case("view_position", {"ViewPosition": "MLO"}, "MLO", "mammography view"),
    # PhotometricInterpretation
    case("photometric_interpretation", {"PhotometricInterpretation": "MONOCHROME2"}, "MONOCHROME2", "mono2"),
    case("photometric_interpretation", {"PhotometricInterpretation": "PALETTE COLOR"}, "PALETTE COLOR", "palette"),
    case("photometric_interpretation", {"PhotometricInterpretation": "ybr full 422"}, "YBR_FULL_422", "spaces"),
    # PatientSex (closed)
    case("patient_sex", {"PatientSex": "F"}, "F", "F"),
    case("patient_sex", {"PatientSex": "weiblich"}, "F", "German"),
    case("patient_sex", {"PatientSex": "Muški"}, "M", "Croatian"),
    case("patient_sex", {"PatientSex": "X"}, None, "not enumerated"),
    # ImageType
    case("image_type_1", {"ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"]}, "ORIGINAL", "value 1"),
    case("image_type_2", {"ImageType": "DERIVED\\SECONDARY"}, "SECONDARY", "value 2 from text"),
    case("image_type_3", {"ImageType": ["ORIGINAL", "PRIMARY", "M", "ND"]}, "M", "value 3"),
    case("image_type_1", {"ImageType": ["FOO", "PRIMARY"]}, None, "value 1 not enumerated"),
    case("image_type_2", {"ImageType": ["FOO", "PRIMARY"]}, "PRIMARY", "other values survive"),
    # MR code sets
    case("scanning_sequence", {"ScanningSequence": ["SE", "EP"]}, "EP\\SE", "sorted set"),
    case("scanning_sequence", {"ScanningSequence": "EP\\SE"}, "EP\\SE", "same set from text"),
    case("sequence_variant", {"SequenceVariant": "SK"}, "SK", "single"),
    case("mr_acquisition_type", {"MRAcquisitionType": "3D"}, "3D", "3D"),
    case("mr_acquisition_type", {"MRAcquisitionType": "4D"}, None, "not enumerated"),
    case("angio_flag", {"AngioFlag": "N"}, "N", "angio flag"),
    # contrast presence
    case("contrast_bolus", {"ContrastBolusAgent": "11 ml Omniscan"}, "YES", "agent named"),
    case("contrast_bolus", {"ContrastBolusAgent": None}, "NO", "present but empty"),
    case("contrast_bolus", {"ContrastBolusAgent": "None"}, "NO", "says none"),
    case("contrast_bolus", {"ContrastBolusAgent": "nativ"}, "NO", "German native"),
    case("contrast_bolus", {}, None, "absent: unknown"),
    # other cleaned categories
    case("convolution_kernel", {"ConvolutionKernel": ["Br40d", "3"]}, "BR40D", "first kernel value"),
    case("sop_class", {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.4"}, "MRImageStorage", "known class"),
    case("sop_class", {"SOPClassUID": "1.2.3.4"}, "1.2.3.4", "private class keeps UID"),
    case("sop_class", {"SOPClassUID": "not-a-uid"}, None, "garbage UID"),
])
def test_categorical_columns(column, tags, expected):
    assert feature(column, tags) == expected


# ---------------------------------------------------------------- body part inference

@pytest.mark.parametrize("tags, stored, inferred, source", [
    case({"BodyPartExamined": "CHEST", "StudyDescription": "CT Kopf"}, "CHEST", None, "stored",
         "stored wins, inference not run"),
    case({"StudyDescription": "CT, HEAD/BRAIN WO CONTRAST"}, None, "BRAIN", "inferred", "English"),
    case({"StudyDescription": "CCT nativ"}, None, "HEAD", "inferred", "German cranial CT"),
    case({"StudyDescription": "MRT Schädel"}, None, "HEAD", "inferred", "German skull"),
    case({"StudyDescription": "MR mozga"}, None, "BRAIN", "inferred", "Croatian brain"),
    case({"StudyDescription": "RTG pluća PA"}, None, "CHEST", "inferred", "Croatian lungs"),
    case({"StudyDescription": "MSCT prsnog koša"}, None, "CHEST", "inferred", "Croatian chest"),
    case({"StudyDescription": "Röntgen Thorax"}, None, "CHEST", "inferred", "German chest"),
    case({"StudyDescription": "CT Lunge"}, None, "CHEST", "inferred", "German lung"),
    case({"SeriesDescription": "T2 sag LWS"}, None, "LSPINE", "inferred", "German lumbar spine"),
    case({"StudyDescription": "MR vratne kralježnice"}, None, "CSPINE", "inferred", "Croatian cervical spine"),
    case({"StudyDescription": "XR C Spine Comp Min 4 Views"}, None, "CSPINE", "inferred", "C spine"),
    case({"StudyDescription": "CT chest abdomen pelvis"}, None, "CHESTABDPELVIS", "inferred", "combined first"),
    case({"StudyDescription": "CT Thorax/Abdomen"}, None, "CHESTABDOMEN", "inferred", "two regions"),
    case({"StudyDescription": "IRM du genou"}, None, "KNEE", "inferred", "French knee"),
    case({"StudyDescription": "RM ginocchio sinistro"}, None, "KNEE", "inferred", "Italian knee"),
    case({"StudyDescription": "RM de rodilla"}, None, "KNEE", "inferred", "Spanish knee"),
    case({"StudyDescription": "Echocardiogram"}, None, "HEART", "inferred", "heart"),
    case({"SeriesDescription": "Liver Segmentation", "StudyDescription": "abdomen^liver"}, None,
         "LIVER", "inferred", "series before study"),
    case({"SeriesDescription": "ep2d_bold", "ProtocolName": "Routine Brain"}, None, "BRAIN",
         "inferred", "protocol when series says nothing"),
    case({"StudyDescription": "Testing File-set"}, None, None, "none", "nothing to infer"),
    case({"StudyDescription": "cardiology"}, None, "HEART", "inferred", "word stem"),
    case({"StudyDescription": "ahead of time"}, None, None, "none", "word boundaries"),
    case({"StudyDescription": ["HEAD", "NECK"]}, None, "HEADNECK", "inferred", "backslash split text"),
    case({"BodyPartExamined": "", "StudyDescription": "Brain"}, None, "BRAIN", "inferred", "empty stored"),
    case({"BodyPartExamined": "\x01", "StudyDescription": "Brain"}, None, "BRAIN", "inferred",
         "garbage stored"),
])
def test_body_part_inference(tags, stored, inferred, source):
    features = parse_instance(tags).features
    assert (features["body_part"], features["body_part_inferred"], features["body_part_source"]) == (
        stored, inferred, source)


def test_descriptions_are_not_output_columns():
    # method.md A.2: free text only feeds inference
    sources = {c.source for c in FEATURE_COLUMNS if c.name != "body_part_inferred"}
    assert not sources & {"StudyDescription", "SeriesDescription", "ProtocolName",
                          "SOPInstanceUID", "StudyDate", "StudyInstanceUID"}


# ---------------------------------------------------------------- failures

def test_failures_keep_the_raw_value_and_name_the_column():
    result = parse_instance({"PatientAge": "200Y", "PixelSpacing": "a\\b", "Rows": 512})
    by_column = {f.column: f for f in result.failures}
    assert set(by_column) == {"patient_age", "pixel_spacing_row", "pixel_spacing_col"}
    assert by_column["patient_age"].raw == "200Y"
    assert by_column["patient_age"].keyword == "PatientAge"
    assert by_column["pixel_spacing_col"].raw == "a\\b"
    assert all(f.reason for f in result.failures)
    assert result.features["rows"] == 512.0


def test_absent_and_empty_values_are_not_failures():
    assert parse_instance({"PatientAge": None, "PixelSpacing": "", "Modality": "  "}).failures == ()


def test_unknown_clean_categories_are_not_failures():
    assert parse_instance({"Manufacturer": "Brand New Vendor"}).failures == ()


def test_a_raising_parser_becomes_a_failure(monkeypatch):
    def broken(raw, vocabulary):
        raise ZeroDivisionError("bug")

    rule = PARSERS["KVP"]
    patched = tuple(TagRule(r.keyword, r.columns, broken) if r is rule else r for r in RULES)
    monkeypatch.setattr("parsers.registry.RULES", patched)
    result = parse_instance({"KVP": "120", "Rows": 4})
    assert result.features["kvp"] is None and result.features["rows"] == 4.0
    assert [(f.column, f.raw) for f in result.failures] == [("kvp", "120")]
    assert "ZeroDivisionError" in result.failures[0].reason


def test_enhanced_multiframe_values_come_from_functional_groups():
    tags = {
        "SharedFunctionalGroupsSequence": [{
            "PixelMeasuresSequence": [{"PixelSpacing": ["0.5", "0.6"], "SliceThickness": "2"}],
            "PlaneOrientationSequence": [{"ImageOrientationPatient": ["1", "0", "0", "0", "0", "-1"]}],
        }],
        "PerFrameFunctionalGroupsSequence": [
            {"PlanePositionSequence": [{"ImagePositionPatient": ["1", "2", "3"]}]},
        ],
    }
    f = parse_instance(tags).features
    assert (f["pixel_spacing_col"], f["slice_thickness"], f["plane"], f["image_position_z"]) == (
        0.6, 2.0, "CORONAL", 3.0)


# ---------------------------------------------------------------- totality

_ATOMS = [None, "", " ", "\\", "0", "-1", "1e400", "nan", "045Y", "abc", "\x00", "\ufffd",
          "[1, 2]", "1\\2\\3", 0, -1, 2**70, 1.5, float("nan"), float("-inf"), True, b"\xff\xfe",
          {"InlineBinary": "AA=="}, {"BulkDataLength": 10}, {}, [], [None], [[1]], [{}], ("a",),
          object()]


def _random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(6)
    if kind == 0 or depth > 2:
        return rng.choice(_ATOMS)
    if kind == 1:
        return "".join(rng.choice(string.printable + "äđ\\[],;°µ") for _ in range(rng.randrange(12)))
    if kind == 2:
        return rng.uniform(-1e6, 1e6)
    if kind == 3:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(8))]
    if kind == 4:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(10)))
    return {rng.choice(list(PARSERS)): _random_value(rng, depth + 1)}


def test_random_values_never_raise():
    rng = random.Random(20240604)
    keywords = [*PARSERS, "StudyDescription", "SeriesDescription", "ProtocolName",
                "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"]
    for _ in range(3000):
        tags = {k: _random_value(rng) for k in rng.sample(keywords, rng.randrange(1, 12))}
        result = parse_instance(tags)
        assert isinstance(result, ParseResult)
        assert list(result.features) == COLUMN_NAMES
        for value in result.features.values():
            assert value is None or isinstance(value, (float, str))
        for failure in result.failures:
            assert isinstance(failure.raw, str) and failure.reason


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.keyword)
def test_every_rule_survives_every_atom(rule):
    vocabulary = load_vocabulary()
    for atom in _ATOMS:
        parsed = rule.parse(atom, vocabulary)  # called directly: the rule itself is total
        assert parsed.value is None or len(parsed.value) == len(rule.columns)


def test_hypothesis_never_raises():
    hypothesis = pytest.importorskip("hypothesis")
    st = pytest.importorskip("hypothesis.strategies")
    leaves = st.one_of(st.none(), st.text(max_size=20), st.binary(max_size=16), st.integers(),
                       st.floats(allow_nan=True, allow_infinity=True), st.booleans())
    values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=6), max_leaves=12)
    tags_strategy = st.dictionaries(st.sampled_from(list(PARSERS) + ["StudyDescription"]), values,
                                    max_size=10)

    @hypothesis.settings(max_examples=300, deadline=None)
    @hypothesis.given(tags_strategy)
    def check(tags):
        result = parse_instance(tags)
        assert list(result.features) == COLUMN_NAMES

    check()


# ---------------------------------------------------------------- site vocabulary

SITE_TOML = """
[aliases.BodyPartExamined]
"Prsni kos i abdomen" = "CHESTABDOMEN"
"Kosti sake" = "HAND"

[aliases.Manufacturer]
"Acme Products" = "ACME"

[prefixes.Manufacturer]
"Shimadzu" = "SHIMADZU-SITE"

[[body_part_inference]]
pattern = "\\\\bmamo\\\\w*"
code = "BREAST"
"""


def test_site_toml_extends_the_shipped_vocabulary(tmp_path: Path):
    site = tmp_path / "site.toml"
    site.write_text(SITE_TOML, encoding="utf-8")
    vocabulary = load_vocabulary(site)
    assert feature("body_part", {"BodyPartExamined": "PRSNI KOS I ABDOMEN"}, vocabulary) == "CHESTABDOMEN"
    assert feature("body_part", {"BodyPartExamined": "kosti šake"}, vocabulary) == "HAND"
    assert feature("manufacturer", {"Manufacturer": "ACME products"}, vocabulary) == "ACME"
    assert feature("manufacturer", {"Manufacturer": "SHIMADZU Corp."}, vocabulary) == "SHIMADZU-SITE"
    assert feature("body_part_inferred", {"StudyDescription": "Mamografija"}, vocabulary) == "BREAST"
    # the shipped entries are still there
    assert feature("body_part", {"BodyPartExamined": "T SPINE"}, vocabulary) == "TSPINE"
    assert feature("manufacturer", {"Manufacturer": "Acme Products"}) == "ACME PRODUCTS"


def test_site_json_works_too(tmp_path: Path):
    site = tmp_path / "site.json"
    site.write_text(json.dumps({"aliases": {"Modality": {"Roentgen": "DX"}}}), encoding="utf-8")
    assert feature("modality", {"Modality": "ROENTGEN"}, load_vocabulary(site)) == "DX"


@pytest.mark.parametrize("content, suffix", [
    case("not toml = = =", ".toml", "syntax error"),
    case('[colours]\nred = "R"', ".toml", "unknown section"),
    case('[aliases]\nBodyPartExamined = "x"', ".toml", "alias table not a table"),
    case('[aliases.BodyPartExamined]\nx = 3', ".toml", "code not text"),
    case('[[body_part_inference]]\npattern = "("\ncode = "X"', ".toml", "bad regex"),
    case('[[body_part_inference]]\npattern = "x"', ".toml", "rule without a code"),
    case("[1, 2]", ".json", "JSON list at the top"),
])
def test_bad_site_files_are_refused_at_load(tmp_path: Path, content, suffix):
    site = tmp_path / f"site{suffix}"
    site.write_text(content, encoding="utf-8")
    with pytest.raises(VocabularyError, match="site"):
        load_vocabulary(site)


def test_missing_site_file_is_refused(tmp_path: Path):
    with pytest.raises(VocabularyError, match="cannot read"):
        load_vocabulary(tmp_path / "nope.toml")


def test_docs_list_every_column():
    docs = Path(__file__).resolve().parents[1] / "docs" / "parsers.md"
    text = docs.read_text(encoding="utf-8")
    missing = [name for name in COLUMN_NAMES if f"| `{name}` |" not in text]
    assert not missing


def test_site_aliases_reach_code_sets_and_kernels(tmp_path: Path):
    site = tmp_path / "site.toml"
    site.write_text('[aliases.ScanOptions]\n"FAT SAT" = "FS"\n[aliases.ConvolutionKernel]\n'
                    '"B30s" = "SMOOTH"\n', encoding="utf-8")
    vocabulary = load_vocabulary(site)
    assert feature("scan_options", {"ScanOptions": ["FAT SAT", "FS", "PFP"]}, vocabulary) == "FS\\PFP"
    assert feature("convolution_kernel", {"ConvolutionKernel": "B30s"}, vocabulary) == "SMOOTH"
