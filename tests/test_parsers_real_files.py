"""The parsers on the shared real DICOM files (../shared/data/dicom, see its README).

Every file is parsed (no exception may escape, every failure keeps its raw value), and
a set of files is checked against values read by hand with pydicom: the expected
values below are the normalised forms of those raw values (raw value in the comment).
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest

from parsers import FEATURE_COLUMNS, ParseResult, parse_instance
from service.ingest.dicom_header import InvalidInstance, read_header, read_tags_pydicom

DICOM_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dicom"
pytestmark = [
    pytest.mark.skipif(not DICOM_ROOT.is_dir(), reason=f"{DICOM_ROOT} not present"),
    pytest.mark.filterwarnings("ignore:Expected explicit VR:UserWarning"),  # pydicom on broken files
]

MAX_UNREADABLE_SHARE = 0.05  # a few upstream test files are broken on purpose


def _dicom_files() -> list[Path]:
    if not DICOM_ROOT.is_dir():
        return []
    return sorted(
        p for p in DICOM_ROOT.rglob("*")
        if p.is_file() and "_provenance" not in p.parts and p.name not in ("README.md", "MANIFEST.csv")
    )


@lru_cache(maxsize=None)
def _tags(path: Path) -> tuple[dict[str, Any] | None, str]:
    """(tags, how they were read): the ingest reader, else pydicom, else None with why."""
    encoded = path.read_bytes()
    try:
        return read_header(encoded).tags, "read_header"
    except InvalidInstance as exc:
        reason = exc.reason
    try:
        return read_tags_pydicom(encoded)[0], f"read_tags_pydicom after: {reason}"
    except Exception as exc:  # noqa: BLE001 - broken upstream test files
        return None, f"unreadable: {type(exc).__name__}"


def _parse(relative: str) -> dict[str, Any]:
    tags, _ = _tags(DICOM_ROOT / relative)
    assert tags is not None, relative
    return parse_instance(tags).features


def test_every_real_file_parses_without_exceptions():
    files = _dicom_files()
    assert len(files) >= 400
    unreadable = []
    parsed = 0
    for path in files:
        tags, how = _tags(path)
        if tags is None:
            unreadable.append((path.name, how))
            continue
        result = parse_instance(tags)
        parsed += 1
        assert isinstance(result, ParseResult)
        assert list(result.features) == [c.name for c in FEATURE_COLUMNS]
        for failure in result.failures:
            assert isinstance(failure.raw, str) and failure.raw, (path, failure)
            assert failure.reason and failure.column in result.features
            assert result.features[failure.column] is None
    assert len(unreadable) <= MAX_UNREADABLE_SHARE * len(files), unreadable


# Siemens TrioTim series acquired in each plane, some tilted (dcm_qa Orientation/).
@pytest.mark.parametrize("folder, plane", [
    pytest.param("ax", "AXIAL", id="axial, tilted up to 10 degrees"),
    pytest.param("axmb", "AXIAL", id="axial multiband, JPEG encoded"),
    pytest.param("cor", "CORONAL", id="coronal, tilted 9 degrees"),
    pytest.param("sag", "SAGITTAL", id="sagittal"),
])
def test_siemens_orientation_series_give_their_plane(folder, plane):
    files = [p for p in (DICOM_ROOT / "dcm_qa_siemens" / "Orientation" / folder).rglob("*") if p.is_file()]
    assert files
    assert {_parse(str(p.relative_to(DICOM_ROOT)))["plane"] for p in files} == {plane}


SIEMENS_SAG = "dcm_qa_siemens/Orientation/sag/sagdesc36/MR.1.3.12.2.1107.5.2.32.35131.2014031012590727219489809"
SIEMENS_COR = "dcm_qa_siemens/Orientation/cor/cordesc35/MR.1.3.12.2.1107.5.2.32.35131.2014031012573893053289241"
GE_MR = "dcm_qa_ge/SliceTimingRT/7_epiRT_IntDesHB3_GD55/0001.dcm"
PHILIPS_MRA = "pydicom_testfiles/dicomdirtests/98892003/MR700/4467"
PHILIPS_EPI = "dcm_qa_philips/Magdeburg_2014/fmri/201_EPI_asc_CLEAR_0001_01.dcm"
AGFA_CR = "pydicom_testfiles/dicomdirtests/77654033/CR1/6154"
FUJI_CR = "pydicom_data/RG3_J2KI.dcm"
GE_CT = "pydicom_testfiles/CT_small.dcm"
TOSHIBA_MR = "pydicom_testfiles/MR_small.dcm"
SIEMENS_ENHANCED = "dcm_qa_agfa_siemens_enh/Agfa/011-0001.img"
GE_US_BIG_ENDIAN = "pydicom_testfiles/ExplVR_BigEnd.dcm"


@pytest.mark.parametrize("relative, column, expected", [
    # raw PixelSpacing [3.25, 3.25], IOP [0, 1, 0, 0, 0, -1], PatientAge '033Y', 'SIEMENS'
    pytest.param(SIEMENS_SAG, "pixel_spacing_row", 3.25, id="Siemens sag spacing"),
    pytest.param(SIEMENS_SAG, "plane", "SAGITTAL", id="Siemens sag plane"),
    pytest.param(SIEMENS_SAG, "patient_age", 33.0, id="Siemens age 033Y"),
    pytest.param(SIEMENS_SAG, "manufacturer", "SIEMENS", id="Siemens manufacturer"),
    pytest.param(SIEMENS_SAG, "repetition_time", 3000.0, id="Siemens TR '3000'"),
    pytest.param(SIEMENS_SAG, "body_part_source", "none", id="Siemens no body part anywhere"),
    # IOP [1, 0, 0, 0, -0.1529858224513, -0.988228383588]
    pytest.param(SIEMENS_COR, "plane", "CORONAL", id="Siemens tilted coronal"),
    pytest.param(SIEMENS_COR, "image_orientation_6", -0.988228383588, id="Siemens cosine 6"),
    # 'GE MEDICAL SYSTEMS', [3.75, 3.75], BodyPartExamined 'BRAIN', '000Y', TE '14.8'
    pytest.param(GE_MR, "manufacturer", "GE", id="GE MEDICAL SYSTEMS"),
    pytest.param(GE_MR, "pixel_spacing_col", 3.75, id="GE spacing"),
    pytest.param(GE_MR, "body_part", "BRAIN", id="GE stored body part"),
    pytest.param(GE_MR, "body_part_source", "stored", id="GE body part source"),
    pytest.param(GE_MR, "patient_age", 0.0, id="GE age 000Y"),
    pytest.param(GE_MR, "echo_time", 14.8, id="GE TE"),
    # 'Philips Medical Systems, Inc.', [3.906250e-01, ...], IOP 41 degrees off sagittal/coronal,
    # '045Y', no BodyPartExamined, StudyDescription 'Brain-MRA', SequenceVariant ['SS', 'SP']
    pytest.param(PHILIPS_MRA, "manufacturer", "PHILIPS", id="Philips Inc"),
    pytest.param(PHILIPS_MRA, "pixel_spacing_row", 0.390625, id="Philips exponent spacing"),
    pytest.param(PHILIPS_MRA, "plane", "OBLIQUE", id="Philips oblique projection"),
    pytest.param(PHILIPS_MRA, "patient_age", 45.0, id="Philips age 045Y"),
    pytest.param(PHILIPS_MRA, "body_part", None, id="Philips no stored body part"),
    pytest.param(PHILIPS_MRA, "body_part_inferred", "BRAIN", id="Philips body part from Brain-MRA"),
    pytest.param(PHILIPS_MRA, "sequence_variant", "SP\\SS", id="Philips sequence variant set"),
    # 'Philips Medical Systems', IOP [0.973, 0, 0.229, 0, 1, 0] (13 degrees), '048Y', BodyPart ''
    pytest.param(PHILIPS_EPI, "manufacturer", "PHILIPS", id="Philips Medical Systems"),
    pytest.param(PHILIPS_EPI, "plane", "AXIAL", id="Philips tilted axial"),
    pytest.param(PHILIPS_EPI, "body_part_source", "none", id="Philips empty body part, no keywords"),
    # 'Agfa-Gevaert AG', CR, 'CSPINE', 'LL', ImagerPixelSpacing [0.1000, 0.1000], '047Y', KVP '0'
    pytest.param(AGFA_CR, "manufacturer", "AGFA", id="Agfa"),
    pytest.param(AGFA_CR, "body_part", "CSPINE", id="Agfa body part"),
    pytest.param(AGFA_CR, "view_position", "LL", id="Agfa view"),
    pytest.param(AGFA_CR, "imager_pixel_spacing_row", 0.1, id="Agfa imager spacing"),
    pytest.param(AGFA_CR, "patient_age", 47.0, id="Agfa age"),
    pytest.param(AGFA_CR, "photometric_interpretation", "MONOCHROME1", id="Agfa MONOCHROME1"),
    pytest.param(AGFA_CR, "kvp", None, id="Agfa KVP 0 placeholder"),
    # 'FUJI PHOTO FILM CO. LTD.', 'EXTREMITY', 'AP', Laterality 'R', PatientSex 'F'
    pytest.param(FUJI_CR, "manufacturer", "FUJIFILM", id="Fuji"),
    pytest.param(FUJI_CR, "body_part", "EXTREMITY", id="Fuji body part"),
    pytest.param(FUJI_CR, "view_position", "AP", id="Fuji view"),
    pytest.param(FUJI_CR, "laterality", "R", id="Fuji laterality"),
    pytest.param(FUJI_CR, "patient_sex", "F", id="Fuji sex"),
    # GE CT: KVP '120', ExposureTime '1601', XRayTubeCurrent '170', 'STANDARD', 'FFS',
    # RescaleIntercept '-1024', ContrastBolusAgent 'ISOVUE300/100', route 'IV', weight '0.000000'
    pytest.param(GE_CT, "modality", "CT", id="CT modality"),
    pytest.param(GE_CT, "kvp", 120.0, id="CT kVp"),
    pytest.param(GE_CT, "exposure_time", 1601.0, id="CT exposure time"),
    pytest.param(GE_CT, "xray_tube_current", 170.0, id="CT tube current"),
    pytest.param(GE_CT, "convolution_kernel", "STANDARD", id="CT kernel"),
    pytest.param(GE_CT, "patient_position", "FFS", id="CT patient position"),
    pytest.param(GE_CT, "rescale_intercept", -1024.0, id="CT intercept"),
    pytest.param(GE_CT, "image_type_3", "AXIAL", id="CT image type 3"),
    pytest.param(GE_CT, "contrast_bolus", "YES", id="CT contrast named"),
    pytest.param(GE_CT, "contrast_bolus_route", "IV", id="CT contrast route"),
    pytest.param(GE_CT, "patient_weight", None, id="CT weight 0 placeholder"),
    # 'TOSHIBA_MEC', [0.3125, 0.3125], SliceThickness '0.8000'
    pytest.param(TOSHIBA_MR, "manufacturer", "TOSHIBA", id="Toshiba"),
    pytest.param(TOSHIBA_MR, "pixel_spacing_row", 0.3125, id="Toshiba spacing"),
    pytest.param(TOSHIBA_MR, "slice_thickness", 0.8, id="Toshiba thickness"),
    # enhanced MR: 'Siemens', spacing only in the shared functional groups, 25 frames, '060Y'
    pytest.param(SIEMENS_ENHANCED, "manufacturer", "SIEMENS", id="Siemens mixed case"),
    pytest.param(SIEMENS_ENHANCED, "pixel_spacing_row", 3.28125, id="enhanced spacing from groups"),
    pytest.param(SIEMENS_ENHANCED, "plane", "AXIAL", id="enhanced plane from groups"),
    pytest.param(SIEMENS_ENHANCED, "number_of_frames", 25.0, id="enhanced frames"),
    pytest.param(SIEMENS_ENHANCED, "patient_age", 60.0, id="enhanced age"),
    pytest.param(SIEMENS_ENHANCED, "sop_class", "EnhancedMRImageStorage", id="enhanced SOP class"),
    # big endian, read by pydicom: 'G.E. Medical Systems', US
    pytest.param(GE_US_BIG_ENDIAN, "manufacturer", "GE", id="G.E. dotted"),
    pytest.param(GE_US_BIG_ENDIAN, "modality", "US", id="US modality"),
])
def test_hand_checked_values(relative, column, expected):
    value = _parse(relative)[column]
    assert value == (pytest.approx(expected) if isinstance(expected, float) else expected)


def test_every_ge_spelling_in_the_archive_maps_to_ge():
    ge = re.compile(r"^\s*g\.?\s?e\.?\s+medical", re.IGNORECASE)
    seen = set()
    for path in _dicom_files():
        tags, _ = _tags(path)
        if tags and isinstance(tags.get("Manufacturer"), str) and ge.match(tags["Manufacturer"]):
            seen.add(tags["Manufacturer"])
            assert parse_instance(tags).features["manufacturer"] == "GE", tags["Manufacturer"]
    assert len(seen) >= 3  # GE MEDICAL SYSTEMS, G.E. Medical Systems, GE Medical Systems


def test_every_valid_orientation_has_a_plane():
    for path in _dicom_files():
        tags, _ = _tags(path)
        if not tags:
            continue
        features = parse_instance(tags).features
        if features["image_orientation_1"] is not None:
            assert features["plane"] in {"AXIAL", "CORONAL", "SAGITTAL", "OBLIQUE"}, path
