"""Table tests for the value parsers in parsers.values (one table per parser)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydicom.multival import MultiValue
from pydicom.valuerep import DSfloat

from parsers.values import (
    OBLIQUE_THRESHOLD,
    alias_key,
    clean_code,
    clean_codes,
    parse_age,
    parse_decimal,
    parse_decimals,
    parse_quantity,
    plane_from_orientation,
)


def case(*values_then_reason):
    *values, reason = values_then_reason
    return pytest.param(*values, id=reason)


# ---------------------------------------------------------------- single numbers

@pytest.mark.parametrize("raw, expected", [
    case("120", 120.0, "IS string"),
    case(" 120 ", 120.0, "stray spaces"),
    case("3.0mm", 3.0, "unit glued on"),
    case("5 mm", 5.0, "unit after a space"),
    case("1,5", 1.5, "decimal comma"),
    case("1.171875e+00", 1.171875, "exponent"),
    case("-1e-016", -1e-16, "tiny negative exponent"),
    case(".5", 0.5, "no leading zero"),
    case("+7", 7.0, "explicit plus"),
    case(b"2.5 ", 2.5, "bytes"),
    case(64, 64.0, "binary US from the JSON"),
    case(2.5, 2.5, "binary FD from the JSON"),
    case(np.float32(0.5), 0.5, "numpy scalar"),
    case(DSfloat("0.7"), 0.7, "pydicom DSfloat"),
    case(["3"], 3.0, "one-item list"),
    case(None, None, "absent value"),
    case("", None, "empty string"),
    case("   ", None, "blank string"),
    case("abc", None, "letters only"),
    case("nan", None, "NaN text"),
    case("inf", None, "infinity text"),
    case(float("nan"), None, "NaN float"),
    case(float("inf"), None, "infinite float"),
    case("1.2.3", None, "two decimal points"),
    case("1,234.5", None, "thousands separator is ambiguous"),
    case(True, None, "boolean is not a number"),
    case(["1", "2"], None, "two values where one was expected"),
    case({"InlineBinary": "AAAA"}, None, "binary JSON"),
    case(object(), None, "arbitrary object"),
])
def test_parse_decimal(raw, expected):
    parsed = parse_decimal(raw)
    assert parsed.value == (pytest.approx(expected) if expected is not None else None)


@pytest.mark.parametrize("raw, problem", [
    case(None, False, "absent is not a failure"),
    case("", False, "empty is not a failure"),
    case("abc", True, "garbage is a failure"),
    case("nan", True, "NaN is a failure"),
])
def test_parse_decimal_reports_problems_only_for_bad_values(raw, problem):
    assert bool(parse_decimal(raw).problem) is problem


@pytest.mark.parametrize("raw, number, unit", [
    case("5 mm", 5.0, "mm", "unit kept for the caller"),
    case("70kg", 70.0, "kg", "glued unit"),
    case("90°", 90.0, "°", "degree sign"),
    case("12 %", 12.0, "%", "percent"),
    case("3", 3.0, "", "no unit"),
])
def test_parse_quantity_returns_the_written_unit(raw, number, unit):
    parsed = parse_quantity(raw)
    assert parsed.value is not None
    assert (parsed.value.number, parsed.value.unit) == (number, unit)


# ---------------------------------------------------------------- multi-valued numbers

@pytest.mark.parametrize("raw, expected", [
    case(["0.7", "0.7"], (0.7, 0.7), "list from the JSON"),
    case(MultiValue(DSfloat, ["0.7", "0.7"]), (0.7, 0.7), "pydicom MultiValue"),
    case("0.7\\0.7", (0.7, 0.7), "DICOM backslash"),
    case("[0.7, 0.7]", (0.7, 0.7), "str of a list"),
    case("['0.7', '0.7']", (0.7, 0.7), "str of a list of strings"),
    case('["0.7", "0.7"]', (0.7, 0.7), "JSON text"),
    case("(0.7, 0.7)", (0.7, 0.7), "tuple text"),
    case((0.7, 0.7), (0.7, 0.7), "tuple"),
    case(b"0.7\\0.7", (0.7, 0.7), "bytes"),
    case(" 0.7 \\ 0.7 ", (0.7, 0.7), "stray spaces"),
    case("0,7\\0,7", (0.7, 0.7), "decimal commas"),
    case("[0,7, 0,7]", (0.7, 0.7), "decimal commas inside a list"),
    case("0.7,0.7", (0.7, 0.7), "comma list without spaces"),
    case("0.7;0.7", (0.7, 0.7), "semicolons"),
    case("[0.7 0.7]", (0.7, 0.7), "numpy array text"),
    case(np.array([0.7, 0.7]), (0.7, 0.7), "numpy array"),
    case("0,7", (0.7,), "single value with decimal comma"),
    case("1,2,3", (1.0, 2.0, 3.0), "several commas separate"),
    case("1\\\\3", (1.0, None, 3.0), "empty middle value keeps its position"),
    case(["1", None], (1.0, None), "None item from the JSON"),
    case("0.5", (0.5,), "one value"),
    case(7, (7.0,), "one binary number"),
    case([1, 0, 0, 0, 1, 0], (1.0, 0.0, 0.0, 0.0, 1.0, 0.0), "binary list"),
    case(None, None, "absent"),
    case("", None, "empty"),
    case("\\", None, "only separators"),
    case("0.7\\abc", None, "one garbage item rejects all"),
    case("[0.7, nan]", None, "NaN item"),
    case({"BulkDataLength": 9}, None, "bulk data"),
    case(list(range(100)), None, "absurdly long"),
])
def test_parse_decimals(raw, expected):
    parsed = parse_decimals(raw)
    if expected is None:
        assert parsed.value is None
    else:
        assert parsed.value == pytest.approx(expected) if None not in expected else parsed.value == expected


# ---------------------------------------------------------------- ages

@pytest.mark.parametrize("raw, years", [
    case("045Y", 45.0, "AS years"),
    case("006M", 0.5, "AS months"),
    case("003W", 3 * 7 / 365.25, "AS weeks"),
    case("010D", 10 / 365.25, "AS days"),
    case("000Y", 0.0, "zero years is a newborn"),
    case("45", 45.0, "bare number is years"),
    case("45 Y", 45.0, "space before unit"),
    case("45Y ", 45.0, "trailing space"),
    case("45y", 45.0, "lower case"),
    case("45 years", 45.0, "English word"),
    case("45 Jahre", 45.0, "German word"),
    case("45 godina", 45.0, "Croatian word"),
    case("6 mois", 0.5, "French months"),
    case("45 años", 45.0, "Spanish with accent"),
    case("45.5Y", 45.5, "decimal years"),
    case(45, 45.0, "number"),
    case(["045Y"], 45.0, "one-item list"),
    case(b"022Y", 22.0, "bytes"),
    case(None, None, "absent"),
    case("", None, "empty"),
    case("-5Y", None, "negative"),
    case("200Y", None, "above 150 years"),
    case("999M", 999 / 12, "999 months is plausible (83 years)"),
    case("2000W", 2000 * 7 / 365.25, "2000 weeks is 38 years"),
    case("45X", None, "unknown unit"),
    case("Y45", None, "unit first"),
    case("forty", None, "words"),
    case({"InlineBinary": "AA=="}, None, "binary"),
    case(True, None, "boolean"),
])
def test_parse_age(raw, years):
    parsed = parse_age(raw)
    assert parsed.value == (pytest.approx(years) if years is not None else None)


@pytest.mark.parametrize("raw", ["-5Y", "200Y", "45X", "forty"])
def test_rejected_ages_say_why(raw):
    assert parse_age(raw).problem


# ---------------------------------------------------------------- codes

@pytest.mark.parametrize("raw, expected", [
    case("T SPINE", "T SPINE", "kept, uppercased"),
    case("  thoracic   spine ", "THORACIC SPINE", "spaces collapsed"),
    case(["MR", "CT"], "MR", "first value of a list"),
    case([None, "CT"], "CT", "first non-empty value"),
    case(b"HEAD", "HEAD", "bytes"),
    case(3, "3", "number as text"),
    case(None, None, "absent"),
    case("", None, "empty"),
    case("---", None, "no letter or digit"),
    case("AB\x01C", None, "control character"),
    case("A\ufffdB", None, "undecodable byte"),
    case("X" * 65, None, "too long for a code"),
    case({"InlineBinary": "AA=="}, None, "binary"),
])
def test_clean_code(raw, expected):
    assert clean_code(raw).value == expected


@pytest.mark.parametrize("raw, expected", [
    case("EP\\GR", ("EP", "GR"), "backslash text"),
    case(["EP", "GR"], ("EP", "GR"), "list"),
    case(["EP", None, "SE"], ("EP", "SE"), "empty value dropped"),
    case("FS", ("FS",), "single"),
    case(None, None, "absent"),
    case(["EP", "\x00\x01"], None, "garbage value rejects"),
])
def test_clean_codes(raw, expected):
    assert clean_codes(raw).value == expected


@pytest.mark.parametrize("text, key", [
    case("T-SPINE", "TSPINE", "hyphen"),
    case("t spine", "TSPINE", "space and case"),
    case("Schädel", "SCHADEL", "umlaut"),
    case("Pluća", "PLUCA", "Croatian c acute"),
    case("Međunožje", "MEDUNOZJE", "Croatian d stroke"),
    case("Fuß", "FUSS", "sharp s"),
    case("G.E. Medical", "GEMEDICAL", "dots"),
])
def test_alias_key(text, key):
    assert alias_key(text) == key


# ---------------------------------------------------------------- planes

@pytest.mark.parametrize("cosines, plane", [
    case((1, 0, 0, 0, 1, 0), "AXIAL", "row x, column y"),
    case((1, 0, 0, 0, 0, -1), "CORONAL", "row x, column -z"),
    case((0, 1, 0, 0, 0, -1), "SAGITTAL", "row y, column -z"),
    case((1, -1e-16, 0, 1e-16, 0.99415096409965, -0.1079993545339), "AXIAL", "Siemens axial, 6 degrees tilt"),
    case((1, 0, 0, 0, -0.1529858224513, -0.988228383588), "CORONAL", "Siemens coronal, 9 degrees tilt"),
    case((0.97332048416137, 0, 0.22944974899291, 0, 1, 0), "AXIAL", "Philips axial, 13 degrees tilt"),
    case((0.7071, 0.7071, 0, 0, 0, -1), "OBLIQUE", "45 degrees between coronal and sagittal"),
    case((0.653996, 0.756504, 0.00377102, -0.00133901, 0.00614239, -1), "OBLIQUE", "Philips MRA projection, 41 degrees"),
    case((2, 0, 0, 0, 2, 0), "AXIAL", "unnormalised cosines"),
    case((1, 0, 0, 1, 0, 0), None, "parallel row and column"),
    case((0, 0, 0, 0, 0, 0), None, "all zero"),
    case((1, 0, 0, 0, 1), None, "five numbers"),
    case((1, 0, 0, 0, 1, None), None, "a missing cosine"),
])
def test_plane_from_orientation(cosines, plane):
    assert plane_from_orientation(cosines).value == plane


def test_oblique_threshold_is_the_documented_boundary():
    # normal at angle a from z has |n_z| = cos(a): just above and just below the threshold
    angle = math.acos(OBLIQUE_THRESHOLD)
    for delta, plane in ((-0.01, "AXIAL"), (0.01, "OBLIQUE")):
        a = angle + delta
        cosines = (1, 0, 0, 0, math.cos(a), math.sin(a))
        assert plane_from_orientation(cosines).value == plane
