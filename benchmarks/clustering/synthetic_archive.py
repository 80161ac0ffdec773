"""A synthetic PACS archive of parsed tag features, shaped like a real one ("Scale").

``make_archive(n_instances, seed=...)`` returns one row per instance with the columns of
``parsers.selection.default_selection()`` (typed by ``parsers.FEATURE_COLUMNS``: numeric as
float64 with NaN, categorical as ``str`` or ``None`` in object columns), plus
``sop_instance_uid`` and ``series_instance_uid``. What makes it archive-like:

* **Series.** Instances come in series that share their tags: cross-sectional series (CT,
  MR, PT) have 20-500 slices, projection radiography (CR, DX, MG) 1-4 images, US, NM, XA
  and secondary captures a few to a few dozen (one series per modality may be cut short to
  hit the exact instance count). Series-level values are drawn once per series and
  repeated; series of all modalities are interleaved in random order.
* **What varies inside a series** (the columns a real archive varies per instance, among
  the default selection): CT tube current and mAs under dose modulation (60 % of CT
  series), the in-plane image position of sagittal / coronal MR slices, MR window per slice
  (30 % of MR series), the PET rescale slope, XA runs' exposure and geometry, and the view,
  laterality and exposure of each radiograph / mammogram. Everything else is identical, so
  the archive has far fewer distinct profiles than instances, but not few.
* **Modalities** in exact instance shares of a hospital archive (CT 40 %, MR 30 %, PT 8 %,
  US, XA 5 % each, CR 4 %, DX 3 %, NM, MG 2 % each, OT 1 %), each with its own columns (an MR
  has no kVp) and value sets: vendors and models, field strengths and their imaging
  frequencies, matrices, fields of view -> pixel spacing, slice thickness, kVp, kernels,
  windows, body parts, views, planes and orientation cosines (gantry tilt, oblique MR).
* **Missing values.** Columns the modality does not write are missing (structural). On top
  of that, each series drops each tag it writes with probability ``missing_share`` x
  U(0.5, 1.5), with all the columns parsed from it (modality and SOP class are never
  dropped): a scanner that does not fill a tag, or a value the parser rejected. With the
  default ``missing_share = 0.075``, about 7 % of the written cells are missing.
  ``body_part_inferred`` is filled (70 %) only where ``body_part`` was dropped, as the
  parser does from descriptions.

Determinism: values and missingness come from two generators seeded from ``seed``, so
``make_archive(n, seed=s, missing_share=0.0)`` is the same archive with nothing dropped
(the tests use this to measure the missing share exactly).

Speed: everything is vectorised per column over series, then repeated to instances; 1M
rows take a few seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import pandas as pd

from parsers import FEATURE_COLUMNS
from parsers.selection import default_selection

__all__ = [
    "FEATURE_KINDS",
    "MODALITY_SHARES",
    "NEVER_MISSING",
    "archive_columns",
    "make_archive",
]

FEATURE_KINDS: dict[str, str] = {column.name: column.kind for column in FEATURE_COLUMNS}
SOURCE_TAG: dict[str, str] = {column.name: column.source for column in FEATURE_COLUMNS}
NEVER_MISSING = ("modality", "sop_class")
DERIVED_AFTER_MISSING = ("body_part_inferred",)
UID_ROOT = "1.2.826.0.1.3680043.8.498"  # pydicom's root for generated UIDs


@dataclass(frozen=True)
class Range:
    """Uniform value in ``[low, high]`` rounded to ``step`` (no rounding when 0)."""

    low: float
    high: float
    step: float = 0.0


# A value spec is a scalar (constant), a tuple of scalars (uniform choice), or a Range.
# A key that is a tuple of column names takes a tuple of row tuples (uniform choice of row).
Spec = Mapping[Any, Any]


@dataclass(frozen=True)
class Modality:
    """How one modality's series are generated.

    ``series`` is drawn per series; one of ``scanners`` and one of ``protocols`` is drawn
    per series and overrides it (protocol last). ``per_instance`` specs (modality-level, or
    inside a protocol under the key ``"per_instance"``) are redrawn for every instance.
    Columns named ``_x`` are helpers (field of view, plane, tilt) used by the derivations.
    """

    code: str
    share: float
    series_size: tuple[int, int]
    series: Spec
    scanners: tuple[Spec, ...]
    protocols: tuple[Spec, ...]
    per_instance: Spec = None  # type: ignore[assignment]


HELPER_KINDS = {"_fov": "numeric", "_tilt": "numeric", "_offset_x": "numeric",
                "_offset_y": "numeric", "_plane": "categorical", "_modulated": "numeric",
                "_window_per_slice": "numeric", "_multiframe": "numeric"}

PATIENT: Spec = {
    "patient_age": Range(0, 95, 1),
    "patient_sex": ("M", "F"),
    "patient_weight": Range(45, 130, 1),
    "patient_size": Range(1.50, 1.95, 0.01),
}

_MONO16 = {"photometric_interpretation": "MONOCHROME2", "samples_per_pixel": 1.0,
           "bits_allocated": 16.0}

CT = Modality(
    "CT", 0.40, (20, 500),
    series={
        **PATIENT, **_MONO16,
        "sop_class": "CTImageStorage",
        ("image_type_1", "image_type_2", "image_type_3", "_plane"): (
            ("ORIGINAL", "PRIMARY", "AXIAL", "AXIAL"),) * 6 + (
            ("DERIVED", "SECONDARY", "REFORMATTED", "CORONAL"),
            ("DERIVED", "SECONDARY", "REFORMATTED", "SAGITTAL"),
            ("DERIVED", "SECONDARY", "MPR", "AXIAL")),
        "rows": 512.0, "columns": 512.0,
        "bits_stored": (12.0, 12.0, 16.0), "pixel_representation": (0.0, 1.0),
        "rescale_slope": 1.0, "rescale_intercept": (-1024.0, -1024.0, -1024.0, -8192.0),
        "rescale_type": "HU", "data_collection_diameter": 500.0,
        "xray_tube_current": Range(80, 450, 1), "exposure_time": Range(500, 1500, 1),
        "table_height": Range(110, 200, 0.5),
        "contrast_bolus": ("NO", "NO", "YES"),
        "_offset_x": Range(-25, 25, 0.1), "_offset_y": Range(-40, 10, 0.1),
        "_modulated": (1.0, 1.0, 1.0, 0.0, 0.0), "_tilt": 0.0,
    },
    scanners=(
        {"manufacturer": "SIEMENS", "manufacturer_model": "SOMATOM DEFINITION AS",
         "distance_source_to_detector": 1085.6, "distance_source_to_patient": 595.0,
         "focal_spot": (0.7, 1.2), "convolution_kernel": ("I30F", "I40F", "I70F", "B30F", "B70F")},
        {"manufacturer": "SIEMENS", "manufacturer_model": "SOMATOM FORCE",
         "distance_source_to_detector": 1085.6, "distance_source_to_patient": 595.0,
         "focal_spot": (0.8, 1.2), "convolution_kernel": ("BR40", "BR59", "BR64", "HR40")},
        {"manufacturer": "GE", "manufacturer_model": "REVOLUTION CT",
         "distance_source_to_detector": 946.7, "distance_source_to_patient": 538.5,
         "focal_spot": (0.7, 1.2), "convolution_kernel": ("STANDARD", "SOFT", "LUNG", "BONE")},
        {"manufacturer": "GE", "manufacturer_model": "LIGHTSPEED VCT",
         "distance_source_to_detector": 949.1, "distance_source_to_patient": 541.0,
         "focal_spot": (0.7, 1.2), "convolution_kernel": ("STANDARD", "LUNG", "BONE", "DETAIL")},
        {"manufacturer": "PHILIPS", "manufacturer_model": "BRILLIANCE 64",
         "distance_source_to_detector": 1040.0, "distance_source_to_patient": 570.0,
         "focal_spot": (0.5, 1.0), "convolution_kernel": ("B", "C", "YA", "YB", "L")},
        {"manufacturer": "CANON", "manufacturer_model": "AQUILION ONE",
         "distance_source_to_detector": 1072.0, "distance_source_to_patient": 600.0,
         "focal_spot": (0.9, 1.6), "convolution_kernel": ("FC08", "FC13", "FC18", "FC52")},
    ),
    protocols=(
        {"body_part": "HEAD", "patient_position": "HFS", "_fov": Range(200, 250, 1),
         ("window_center", "window_width"): ((40.0, 80.0), (35.0, 100.0), (600.0, 2800.0)),
         "kvp": 120.0, "slice_thickness": (0.625, 1.0, 2.5, 5.0), "filter_type": "HEAD FILTER",
         "_tilt": (0.0, 0.0, Range(-20, -8, 0.5)), "spiral_pitch_factor": (0.55, 0.8),
         "ctdi_vol": Range(40, 60, 0.01)},
        {"body_part": "CHEST", "patient_position": ("HFS", "FFS"), "_fov": Range(320, 420, 1),
         ("window_center", "window_width"): ((-600.0, 1500.0), (40.0, 400.0), (-500.0, 1400.0)),
         "kvp": (100.0, 120.0), "slice_thickness": (1.0, 1.25, 2.0, 3.0, 5.0),
         "filter_type": ("BODY FILTER", "FLAT"), "spiral_pitch_factor": (0.9, 1.2, 1.375),
         "ctdi_vol": Range(3, 15, 0.01)},
        {"body_part": ("ABDOMEN", "ABDOMENPELVIS", "CHESTABDPELVIS", "PELVIS"),
         "patient_position": ("FFS", "HFS"), "_fov": Range(340, 500, 1),
         ("window_center", "window_width"): ((40.0, 400.0), (50.0, 350.0), (60.0, 360.0)),
         "kvp": (100.0, 120.0, 140.0), "slice_thickness": (2.0, 3.0, 5.0),
         "filter_type": "BODY FILTER", "spiral_pitch_factor": (0.984, 1.375),
         "ctdi_vol": Range(6, 25, 0.01)},
        {"body_part": ("CSPINE", "LSPINE", "TSPINE"), "patient_position": "HFS",
         "_fov": Range(150, 250, 1),
         ("window_center", "window_width"): ((300.0, 1500.0), (40.0, 400.0)),
         "kvp": (120.0, 140.0), "slice_thickness": (0.75, 1.0, 2.0, 3.0),
         "filter_type": "BODY FILTER", "spiral_pitch_factor": (0.6, 0.8),
         "ctdi_vol": Range(10, 35, 0.01)},
    ),
)

MR = Modality(
    "MR", 0.30, (20, 300),
    series={
        **PATIENT, **_MONO16,
        "sop_class": "MRImageStorage",
        ("image_type_1", "image_type_2", "image_type_3"): (
            ("ORIGINAL", "PRIMARY", "M"), ("ORIGINAL", "PRIMARY", "M"),
            ("ORIGINAL", "PRIMARY", "OTHER"), ("DERIVED", "PRIMARY", "MPR")),
        "body_part": ("BRAIN", "BRAIN", "HEAD", "KNEE", "LSPINE", "CSPINE", "SHOULDER",
                      "ABDOMEN", "PELVIS", "PROSTATE", "BREAST"),
        "patient_position": ("HFS", "HFS", "FFS", "HFP"),
        "_plane": ("AXIAL", "SAGITTAL", "CORONAL"),
        "_tilt": (0.0, 0.0, Range(-20, 20, 0.1), 45.0),
        "_offset_x": Range(-30, 30, 0.01), "_offset_y": Range(-30, 30, 0.01),
        ("rows", "columns"): ((256.0, 256.0), (320.0, 320.0), (384.0, 384.0),
                              (512.0, 512.0), (256.0, 232.0), (448.0, 448.0)),
        "_fov": Range(160, 400, 10),
        "bits_stored": (12.0, 16.0), "pixel_representation": 0.0,
        ("window_center", "window_width"): ((Range(150, 900, 1), Range(300, 1800, 1)),),
        "number_of_averages": (1.0, 1.0, 2.0, 3.0, 4.0),
        "pixel_bandwidth": Range(100, 900, 1),
        "percent_sampling": (70.0, 75.0, 80.0, 100.0),
        "percent_phase_field_of_view": (75.0, 81.25, 87.5, 100.0),
        "scan_options": ("FS", "PFP", "FS\\PFP", "SAT1", "FC", "IR\\PFP"),
        "angio_flag": "N",
        "contrast_bolus": ("NO", "NO", "YES"),
        "_window_per_slice": (1.0, 0.0, 0.0),
    },
    scanners=(
        {"manufacturer": "SIEMENS", "manufacturer_model": "AVANTO",
         "magnetic_field_strength": 1.5, "imaging_frequency": Range(63.67, 63.69, 1e-6)},
        {"manufacturer": "SIEMENS", "manufacturer_model": "SKYRA",
         "magnetic_field_strength": 3.0, "imaging_frequency": Range(123.22, 123.26, 1e-6)},
        {"manufacturer": "GE", "manufacturer_model": "SIGNA HDXT",
         "magnetic_field_strength": 1.5, "imaging_frequency": Range(63.85, 63.87, 1e-6)},
        {"manufacturer": "GE", "manufacturer_model": "DISCOVERY MR750",
         "magnetic_field_strength": 3.0, "imaging_frequency": Range(127.72, 127.78, 1e-6)},
        {"manufacturer": "PHILIPS", "manufacturer_model": "INGENIA",
         "magnetic_field_strength": 1.5, "imaging_frequency": Range(63.89, 63.91, 1e-6),
         "rescale_slope": Range(0.8, 4.0, 1e-5), "rescale_intercept": 0.0},
        {"manufacturer": "PHILIPS", "manufacturer_model": "ACHIEVA",
         "magnetic_field_strength": 3.0, "imaging_frequency": Range(127.75, 127.79, 1e-6),
         "rescale_slope": Range(0.8, 4.0, 1e-5), "rescale_intercept": 0.0},
    ),
    protocols=(
        {"scanning_sequence": "SE", "sequence_variant": "SK\\SP", "mr_acquisition_type": "2D",
         "repetition_time": Range(400, 700, 1), "echo_time": Range(8, 20, 0.01),
         "flip_angle": 90.0, "echo_train_length": (1.0, 2.0, 3.0),
         "slice_thickness": (3.0, 4.0, 5.0)},
        {"scanning_sequence": "SE", "sequence_variant": "SK\\SP\\OSP", "mr_acquisition_type": "2D",
         "repetition_time": Range(3000, 6000, 1), "echo_time": Range(80, 110, 0.01),
         "flip_angle": (90.0, 150.0, 160.0), "echo_train_length": (8.0, 12.0, 16.0, 24.0),
         "slice_thickness": (3.0, 3.5, 4.0, 5.0)},
        {"scanning_sequence": "IR\\SE", "sequence_variant": "SK\\SP\\MP",
         "mr_acquisition_type": "2D",
         "repetition_time": Range(8000, 11000, 1), "echo_time": Range(80, 140, 0.01),
         "inversion_time": Range(2200, 2800, 1), "flip_angle": (150.0, 180.0),
         "echo_train_length": (16.0, 20.0), "slice_thickness": (4.0, 5.0, 6.0)},
        {"scanning_sequence": "EP\\SE", "sequence_variant": "SK\\SP", "mr_acquisition_type": "2D",
         "repetition_time": Range(3000, 8000, 1), "echo_time": Range(60, 100, 0.01),
         "flip_angle": 90.0, "echo_train_length": 1.0, "slice_thickness": (4.0, 5.0),
         "image_type_3": "DIFFUSION"},
        {"scanning_sequence": "GR\\IR", "sequence_variant": "SK\\SP\\MP",
         "mr_acquisition_type": "3D",
         "repetition_time": Range(1900, 2300, 1), "echo_time": Range(2, 4, 0.01),
         "inversion_time": Range(850, 1100, 1), "flip_angle": (8.0, 9.0),
         "echo_train_length": 1.0, "slice_thickness": (0.9, 1.0, 1.2)},
        {"scanning_sequence": "GR", "sequence_variant": "SP", "mr_acquisition_type": "3D",
         "repetition_time": Range(20, 30, 0.01), "echo_time": Range(3, 7, 0.01),
         "flip_angle": Range(18, 25, 1), "echo_train_length": 1.0, "angio_flag": "Y",
         "slice_thickness": (0.5, 0.6, 0.7)},
    ),
)

PT = Modality(
    "PT", 0.08, (150, 500),
    series={
        **PATIENT, **_MONO16,
        "sop_class": "PositronEmissionTomographyImageStorage",
        ("image_type_1", "image_type_2", "image_type_3"): (("ORIGINAL", "PRIMARY", "AXIAL"),),
        "body_part": ("WHOLEBODY", "WHOLEBODY", "CHESTABDPELVIS", "HEAD"),
        "patient_position": ("FFS", "HFS"), "_plane": "AXIAL", "_tilt": 0.0,
        "_offset_x": Range(-10, 10, 0.01), "_offset_y": Range(-10, 10, 0.01),
        ("rows", "columns"): ((128.0, 128.0), (168.0, 168.0), (200.0, 200.0),
                              (256.0, 256.0), (400.0, 400.0)),
        "_fov": Range(500, 700, 0.1),
        "slice_thickness": (2.0, 2.03, 3.0, 3.27, 4.0, 5.0),
        "bits_stored": 16.0, "pixel_representation": (0.0, 1.0),
        "rescale_intercept": 0.0, "rescale_type": "BQML",
        ("window_center", "window_width"): ((Range(5000, 20000, 1), Range(10000, 40000, 1)),),
    },
    scanners=(
        {"manufacturer": "SIEMENS", "manufacturer_model": "BIOGRAPH MCT"},
        {"manufacturer": "GE", "manufacturer_model": "DISCOVERY MI"},
        {"manufacturer": "PHILIPS", "manufacturer_model": "VEREOS PET/CT"},
    ),
    protocols=({},),
    per_instance={"rescale_slope": Range(0.01, 40.0, 1e-6)},
)

NM = Modality(
    "NM", 0.02, (1, 10),
    series={
        **PATIENT, **_MONO16,
        "sop_class": "NuclearMedicineImageStorage",
        "bits_stored": 16.0, "pixel_representation": 0.0,
        ("rows", "columns", "pixel_spacing_row", "pixel_spacing_col"): (
            (64.0, 64.0, 9.59, 9.59), (128.0, 128.0, 4.42, 4.42), (128.0, 128.0, 4.8, 4.8),
            (256.0, 256.0, 2.21, 2.21), (1024.0, 256.0, 2.4, 2.4)),
        "number_of_frames": (1.0, 32.0, 60.0, 64.0, 120.0, 128.0),
        "patient_position": ("HFS", "FFS"),
    },
    scanners=(
        {"manufacturer": "SIEMENS", "manufacturer_model": "SYMBIA T2"},
        {"manufacturer": "GE", "manufacturer_model": "DISCOVERY NM/CT 670"},
        {"manufacturer": "PHILIPS", "manufacturer_model": "BRIGHTVIEW"},
    ),
    protocols=(
        {"body_part": "WHOLEBODY", ("image_type_1", "image_type_2", "image_type_3"): (
            ("ORIGINAL", "PRIMARY", "WHOLE BODY"),)},
        {"body_part": ("HEART", "BRAIN"), ("image_type_1", "image_type_2", "image_type_3"): (
            ("ORIGINAL", "PRIMARY", "TOMO"), ("ORIGINAL", "PRIMARY", "RECON TOMO"),
            ("ORIGINAL", "PRIMARY", "GATED TOMO")), "slice_thickness": (4.42, 4.8, 6.6)},
        {"body_part": ("THYROID", "KIDNEY"), ("image_type_1", "image_type_2", "image_type_3"): (
            ("ORIGINAL", "PRIMARY", "STATIC"), ("ORIGINAL", "PRIMARY", "DYNAMIC"))},
    ),
)

US = Modality(
    "US", 0.05, (1, 60),
    series={
        "patient_age": PATIENT["patient_age"], "patient_sex": PATIENT["patient_sex"],
        ("sop_class", "_multiframe"): (("UltrasoundImageStorage", 0.0),
                                        ("UltrasoundImageStorage", 0.0),
                                        ("UltrasoundMultiFrameImageStorage", 1.0)),
        ("photometric_interpretation", "samples_per_pixel"): (
            ("RGB", 3.0), ("YBR_FULL_422", 3.0), ("MONOCHROME2", 1.0)),
        "bits_allocated": 8.0, "bits_stored": 8.0, "pixel_representation": 0.0,
        ("rows", "columns"): ((480.0, 640.0), (600.0, 800.0), (720.0, 960.0),
                              (768.0, 1024.0), (1080.0, 1920.0)),
        ("image_type_1", "image_type_2"): (("ORIGINAL", "PRIMARY"), ("DERIVED", "PRIMARY")),
    },
    scanners=(
        {"manufacturer": "GE", "manufacturer_model": "LOGIQ E9"},
        {"manufacturer": "GE", "manufacturer_model": "VIVID E95"},
        {"manufacturer": "PHILIPS", "manufacturer_model": "EPIQ 7G"},
        {"manufacturer": "PHILIPS", "manufacturer_model": "IU22"},
        {"manufacturer": "SIEMENS", "manufacturer_model": "ACUSON S2000"},
        {"manufacturer": "CANON", "manufacturer_model": "APLIO I800"},
        {"manufacturer": "SAMSUNG", "manufacturer_model": "RS80A"},
    ),
    protocols=(
        {"body_part": ("ABDOMEN", "LIVER", "KIDNEY", "PELVIS"), "image_type_3": "ABDOMINAL"},
        {"body_part": ("THYROID", "NECK", "BREAST"), "image_type_3": "SMALL PARTS"},
        {"body_part": ("HEART",), "image_type_3": "CARDIAC"},
        {"body_part": ("CAROTID", "LEG"), "image_type_3": "VASCULAR"},
    ),
)

XA = Modality(
    "XA", 0.05, (1, 30),
    series={
        **PATIENT,
        "sop_class": "XRayAngiographicImageStorage",
        ("image_type_1", "image_type_2", "image_type_3"): (
            ("ORIGINAL", "PRIMARY", "SINGLE PLANE"), ("ORIGINAL", "PRIMARY", "BIPLANE A"),
            ("ORIGINAL", "PRIMARY", "BIPLANE B")),
        "photometric_interpretation": "MONOCHROME2", "samples_per_pixel": 1.0,
        "bits_allocated": (8.0, 16.0), "bits_stored": (8.0, 10.0, 12.0),
        "pixel_representation": 0.0,
        ("rows", "columns"): ((512.0, 512.0), (1024.0, 1024.0)),
        ("imager_pixel_spacing_row", "imager_pixel_spacing_col"): (
            (0.154, 0.154), (0.184, 0.184), (0.2, 0.2), (0.308, 0.308)),
        "patient_position": "HFS", "distance_source_to_patient": Range(700, 800, 1),
        "table_height": Range(800, 1100, 1), "exposure_time": Range(5, 15, 0.1),
        "contrast_bolus": ("YES", "YES", "NO"),
    },
    scanners=(
        {"manufacturer": "SIEMENS", "manufacturer_model": "AXIOM-ARTIS", "focal_spot": (0.4, 0.7)},
        {"manufacturer": "SIEMENS", "manufacturer_model": "ARTIS ZEE", "focal_spot": (0.3, 0.6)},
        {"manufacturer": "PHILIPS", "manufacturer_model": "ALLURA XPER FD20",
         "focal_spot": (0.4, 0.7)},
        {"manufacturer": "GE", "manufacturer_model": "INNOVA 3100", "focal_spot": (0.3, 0.6, 1.0)},
    ),
    protocols=({"body_part": ("HEART", "HEART", "HEAD", "ABDOMEN", "LEG")},),
    per_instance={"number_of_frames": Range(10, 200, 1), "kvp": Range(60, 110, 0.1),
                  "xray_tube_current": Range(100, 900, 1),
                  "distance_source_to_detector": Range(900, 1200, 1),
                  ("window_center", "window_width"): ((Range(100, 160, 1), Range(200, 256, 1)),)},
)


def _radiography(code: str, share: float, sop_class: str, scanners: tuple[Spec, ...],
                 extra: Spec) -> Modality:
    """CR and DX: 1-4 images per series, view, laterality and exposure per image."""
    return Modality(
        code, share, (1, 4),
        series={
            **PATIENT,
            "sop_class": sop_class,
            ("image_type_1", "image_type_2"): (("ORIGINAL", "PRIMARY"),),
            "photometric_interpretation": ("MONOCHROME1", "MONOCHROME2"),
            "samples_per_pixel": 1.0, "bits_allocated": 16.0,
            "bits_stored": (10.0, 12.0, 14.0, 15.0), "pixel_representation": 0.0,
            "rescale_slope": 1.0, "rescale_intercept": 0.0,
            "filter_type": ("NONE", "AL", "0.1 CU", "0.2 CU"),
            **extra,
        },
        scanners=scanners,
        protocols=(
            {"body_part": "CHEST", "distance_source_to_detector": Range(1750, 1850, 1),
             "per_instance": {"view_position": ("PA", "PA", "LL", "AP"),
                              "kvp": Range(110, 125, 1)}},
            {"body_part": ("HAND", "FOOT", "KNEE", "SHOULDER", "ANKLE", "WRIST", "ELBOW"),
             "laterality": ("R", "L"), "distance_source_to_detector": Range(1000, 1150, 1),
             "per_instance": {"view_position": ("AP", "PA", "LAT"), "kvp": Range(50, 70, 1)}},
            {"body_part": ("LSPINE", "PELVIS", "ABDOMEN", "SKULL", "CSPINE"),
             "distance_source_to_detector": Range(1000, 1150, 1),
             "per_instance": {"view_position": ("AP", "LAT"), "kvp": Range(70, 95, 1)}},
        ),
        per_instance={"xray_tube_current": Range(100, 500, 1),
                      "exposure_time": Range(5, 100, 1),
                      ("window_center", "window_width"): ((Range(1800, 2400, 1),
                                                           Range(3000, 4000, 1)),)},
    )


CR = _radiography(
    "CR", 0.04, "ComputedRadiographyImageStorage",
    scanners=(
        {"manufacturer": "AGFA", "manufacturer_model": "CR 85-X",
         ("imager_pixel_spacing_row", "imager_pixel_spacing_col"): ((0.1, 0.1), (0.15, 0.15))},
        {"manufacturer": "FUJIFILM", "manufacturer_model": "FCR PROFECT CS",
         ("imager_pixel_spacing_row", "imager_pixel_spacing_col"): ((0.1, 0.1), (0.15, 0.15))},
        {"manufacturer": "CARESTREAM", "manufacturer_model": "DIRECTVIEW CR 975",
         ("imager_pixel_spacing_row", "imager_pixel_spacing_col"): ((0.168, 0.168),)},
        {"manufacturer": "KONICA MINOLTA", "manufacturer_model": "REGIUS 190",
         ("imager_pixel_spacing_row", "imager_pixel_spacing_col"): ((0.175, 0.175),)},
    ),
    extra={("rows", "columns"): ((1760.0, 2140.0), (2140.0, 1760.0), (2500.0, 2048.0),
                                 (2048.0, 2500.0))},
)

DX = _radiography(
    "DX", 0.03, "DigitalXRayImageStorageForPresentation",
    scanners=(
        {"manufacturer": "SIEMENS", "manufacturer_model": "YSIO MAX", "focal_spot": (0.6, 1.0),
         ("imager_pixel_spacing_row", "imager_pixel_spacing_col"): ((0.148, 0.148),)},
        {"manufacturer": "PHILIPS", "manufacturer_model": "DIGITALDIAGNOST",
         "focal_spot": (0.6, 1.2),
         ("imager_pixel_spacing_row", "imager_pixel_spacing_col"): ((0.143, 0.143),)},
        {"manufacturer": "GE", "manufacturer_model": "DEFINIUM 6000", "focal_spot": (0.6, 1.2),
         ("imager_pixel_spacing_row", "imager_pixel_spacing_col"): ((0.2, 0.2),)},
        {"manufacturer": "CANON", "manufacturer_model": "CXDI-710C", "focal_spot": (0.6, 1.2),
         ("imager_pixel_spacing_row", "imager_pixel_spacing_col"): ((0.125, 0.125),)},
        {"manufacturer": "CARESTREAM", "manufacturer_model": "DRX-EVOLUTION",
         "focal_spot": (0.6, 1.2),
         ("imager_pixel_spacing_row", "imager_pixel_spacing_col"): ((0.139, 0.139),)},
    ),
    extra={("rows", "columns"): ((3000.0, 3000.0), (2816.0, 3072.0), (3072.0, 2560.0),
                                 (2874.0, 2840.0)),
           "presentation_intent_type": "FOR PRESENTATION",
           "body_part_thickness": Range(50, 300, 1)},
)

MG = Modality(
    "MG", 0.02, (1, 4),
    series={
        "patient_age": Range(40, 80, 1), "patient_sex": "F",
        ("sop_class", "presentation_intent_type"): (
            ("DigitalMammographyXRayImageStorageForPresentation", "FOR PRESENTATION"),
            ("DigitalMammographyXRayImageStorageForPresentation", "FOR PRESENTATION"),
            ("DigitalMammographyXRayImageStorageForProcessing", "FOR PROCESSING")),
        ("image_type_1", "image_type_2"): (("ORIGINAL", "PRIMARY"), ("DERIVED", "PRIMARY")),
        "photometric_interpretation": ("MONOCHROME1", "MONOCHROME2"),
        "samples_per_pixel": 1.0, "bits_allocated": 16.0, "bits_stored": (12.0, 14.0),
        "pixel_representation": 0.0, "body_part": "BREAST",
        "filter_type": ("RHODIUM", "MOLYBDENUM", "SILVER", "ALUMINUM"),
        "focal_spot": (0.3, 0.3, 0.1),
    },
    scanners=(
        {"manufacturer": "HOLOGIC", "manufacturer_model": "SELENIA DIMENSIONS",
         ("rows", "columns", "imager_pixel_spacing_row", "imager_pixel_spacing_col"): (
             (4096.0, 3328.0, 0.07, 0.07), (3328.0, 2560.0, 0.07, 0.07)),
         "distance_source_to_detector": 700.0},
        {"manufacturer": "GE", "manufacturer_model": "SENOGRAPHE PRISTINA",
         ("rows", "columns", "imager_pixel_spacing_row", "imager_pixel_spacing_col"): (
             (2850.0, 2394.0, 0.1, 0.1),), "distance_source_to_detector": 660.0},
        {"manufacturer": "SIEMENS", "manufacturer_model": "MAMMOMAT INSPIRATION",
         ("rows", "columns", "imager_pixel_spacing_row", "imager_pixel_spacing_col"): (
             (3328.0, 2560.0, 0.085, 0.085),), "distance_source_to_detector": 650.0},
    ),
    protocols=({},),
    per_instance={"view_position": ("CC", "MLO"), "image_laterality": ("R", "L"),
                  "kvp": Range(25, 35, 1), "xray_tube_current": Range(50, 200, 1),
                  "exposure_time": Range(500, 2000, 1), "body_part_thickness": Range(20, 80, 1),
                  "compression_force": Range(50, 200, 1)},
)

OT = Modality(
    "OT", 0.01, (1, 20),
    series={
        "sop_class": "SecondaryCaptureImageStorage",
        ("image_type_1", "image_type_2"): (("DERIVED", "SECONDARY"),),
        ("photometric_interpretation", "samples_per_pixel", "bits_allocated", "bits_stored"): (
            ("RGB", 3.0, 8.0, 8.0), ("MONOCHROME2", 1.0, 8.0, 8.0),
            ("MONOCHROME2", 1.0, 16.0, 12.0)),
        "pixel_representation": 0.0,
        ("rows", "columns"): ((768.0, 1024.0), (1024.0, 1280.0), (1080.0, 1920.0),
                              (512.0, 512.0)),
        "body_part": ("CHEST", "ABDOMEN", "HEAD", "HEART"),
    },
    scanners=({"manufacturer": ("SIEMENS", "GE", "PHILIPS", "AGFA"),
               "manufacturer_model": ("SYNGO.VIA", "AW SERVER", "INTELLISPACE", "ENTERPRISE")},),
    protocols=({},),
)

MODALITIES: tuple[Modality, ...] = (CT, MR, PT, NM, US, XA, CR, DX, MG, OT)
MODALITY_SHARES: dict[str, float] = {m.code: m.share for m in MODALITIES}


def archive_columns() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(numeric, categorical)`` feature column names, in default-selection order."""
    columns = default_selection().columns
    return (tuple(c for c in columns if FEATURE_KINDS[c] == "numeric"),
            tuple(c for c in columns if FEATURE_KINDS[c] == "categorical"))


# ---------------------------------------------------------------- drawing values


def _draw(spec: Any, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` values of one spec (scalar, tuple of choices, or Range), object or float."""
    if isinstance(spec, Range):
        values = rng.uniform(spec.low, spec.high, size)
        if spec.step:
            values = np.round(np.round(values / spec.step) * spec.step, 10)
        return values
    if isinstance(spec, tuple):
        picks = rng.integers(0, len(spec), size)
        if any(isinstance(choice, Range) for choice in spec):
            # A choice among ranges and constants: draw every option, keep the picked one.
            drawn = np.stack([_draw(choice, size, rng) for choice in spec])
            return drawn[picks, np.arange(size)]
        return np.array(spec, dtype=object)[picks]
    return np.full(size, spec, dtype=object)


def _draw_rows(rows_spec: tuple[tuple[Any, ...], ...], size: int,
               rng: np.random.Generator) -> list[np.ndarray]:
    """One row tuple per draw (columns that go together); a Range inside is drawn per item."""
    picks = rng.integers(0, len(rows_spec), size)
    width = len(rows_spec[0])
    out = []
    for position in range(width):
        options = [row[position] for row in rows_spec]
        if any(isinstance(option, Range) for option in options):
            drawn = np.stack([_draw(option, size, rng) for option in options])
            out.append(drawn[picks, np.arange(size)])
        else:
            out.append(np.array(options, dtype=object)[picks])
    return out


class _Table:
    """Columns of equal length, numeric (float64, NaN) or categorical (object, None)."""

    def __init__(self, kinds: Mapping[str, str], length: int) -> None:
        self.kinds = dict(kinds)
        self.columns: dict[str, np.ndarray] = {}
        self.length = length

    def column(self, name: str) -> np.ndarray:
        if name not in self.columns:
            kind = self.kinds[name]
            self.columns[name] = (np.full(self.length, np.nan) if kind == "numeric"
                                  else np.full(self.length, None, dtype=object))
        return self.columns[name]

    def put(self, name: str, rows: np.ndarray, values: np.ndarray) -> None:
        target = self.column(name)
        if self.kinds[name] == "numeric":
            target[rows] = np.asarray(values, dtype=np.float64)
        else:
            target[rows] = values

    def apply(self, spec: Spec, rows: np.ndarray, rng: np.random.Generator) -> None:
        for key, value in spec.items():
            if key == "per_instance" or rows.size == 0:
                continue
            if isinstance(key, tuple):
                for name, values in zip(key, _draw_rows(value, rows.size, rng)):
                    self.put(name, rows, values)
            else:
                self.put(key, rows, _draw(value, rows.size, rng))


def _series_layout(n_instances: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Modality index and size of every series, sizes summing to ``n_instances``.

    Each modality gets its share of the instances (largest remainders for the rounding),
    filled with series of random sizes (the last one cut to fit); the series are then
    shuffled, so modalities interleave as they do in a PACS over time.
    """
    shares = np.array([m.share for m in MODALITIES])
    exact = shares / shares.sum() * n_instances
    budget = np.floor(exact).astype(np.int64)
    budget[np.argsort(budget - exact)[:n_instances - int(budget.sum())]] += 1
    modality_parts, size_parts = [], []
    for index, modality in enumerate(MODALITIES):
        if budget[index] == 0:
            continue
        low, high = modality.series_size
        expected = int(budget[index] / ((low + high) / 2)) + 2
        sizes = rng.integers(low, high + 1, expected)
        while sizes.sum() < budget[index]:
            sizes = np.concatenate([sizes, rng.integers(low, high + 1, expected)])
        end = np.cumsum(sizes)
        n_series = int(np.searchsorted(end, budget[index])) + 1
        sizes = sizes[:n_series].copy()
        sizes[-1] -= int(end[n_series - 1] - budget[index])
        modality_parts.append(np.full(n_series, index))
        size_parts.append(sizes)
    modality = np.concatenate(modality_parts)
    size = np.concatenate(size_parts)
    order = rng.permutation(modality.size)
    return modality[order], size[order]


# ---------------------------------------------------------------- derived columns


def _plane_of(cosines: np.ndarray) -> np.ndarray:
    """Vectorised ``parsers.values.plane_from_orientation`` (slice normal's dominant axis)."""
    row, col = cosines[:, :3], cosines[:, 3:]
    normal = np.cross(row, col)
    length = np.linalg.norm(normal, axis=1)
    components = np.abs(normal) / np.where(length > 0, length, 1.0)[:, None]
    axis = components.argmax(axis=1)
    plane = np.array(["SAGITTAL", "CORONAL", "AXIAL"], dtype=object)[axis]
    return np.where(components.max(axis=1) < 0.8, "OBLIQUE", plane).astype(object)


def _orientation(plane: np.ndarray, tilt_degrees: np.ndarray) -> np.ndarray:
    """Six direction cosines for a base plane tilted by ``tilt_degrees`` about one axis."""
    t = np.radians(np.nan_to_num(tilt_degrees.astype(np.float64)))
    c, s = np.cos(t), np.sin(t)
    zero, one = np.zeros_like(t), np.ones_like(t)
    axial = np.stack([one, zero, zero, zero, c, -s], axis=1)
    sagittal = np.stack([zero, c, s, zero, s, -c], axis=1)
    coronal = np.stack([c, s, zero, zero, zero, -one], axis=1)
    out = np.where((plane == "SAGITTAL")[:, None], sagittal,
                   np.where((plane == "CORONAL")[:, None], coronal, axial))
    return np.round(out, 6) + 0.0  # + 0.0: no negative zeros


def _derive_series(table: _Table, rows: np.ndarray, modality: Modality,
                   rng: np.random.Generator) -> None:
    """Columns computed from others, per series (pixel spacing from FOV and matrix, ...)."""
    if rows.size == 0:
        return
    get = lambda name: table.column(name)[rows]  # noqa: E731
    if "bits_stored" in table.columns:
        table.put("high_bit", rows, get("bits_stored") - 1.0)
    if modality.code in ("CT", "MR", "PT"):
        fov = get("_fov")
        spacing = np.round(fov / get("columns"), 6)
        table.put("pixel_spacing_row", rows, spacing)
        table.put("pixel_spacing_col", rows, spacing)
        table.put("image_position_x", rows, np.round(-fov / 2 + get("_offset_x"), 4))
        table.put("image_position_y", rows, np.round(-fov / 2 + get("_offset_y"), 4))
        cosines = _orientation(get("_plane"), get("_tilt"))
        for index in range(6):
            table.put(f"image_orientation_{index + 1}", rows, cosines[:, index])
        table.put("plane", rows, _plane_of(cosines))
    if modality.code in ("CT", "PT"):
        table.put("reconstruction_diameter", rows, get("_fov"))
    if modality.code == "CT":
        table.put("gantry_detector_tilt", rows, get("_tilt"))
        table.put("exposure", rows, np.round(get("xray_tube_current")
                                              * get("exposure_time") / 1000.0))
    if modality.code == "MR":
        thickness = get("slice_thickness")
        gap = _draw((1.0, 1.1, 1.2, 1.3), rows.size, rng).astype(np.float64)
        table.put("spacing_between_slices", rows, np.round(thickness * gap, 3))
        table.put("phase_encoding_steps", rows,
                  np.round(get("rows") * get("percent_sampling") / 100.0))
    if modality.code == "US":
        frames = _draw(Range(20, 300, 1), rows.size, rng)
        table.put("number_of_frames", rows, np.where(get("_multiframe") == 1.0, frames, np.nan))
    if "contrast_bolus" in table.columns:
        given = get("contrast_bolus") == "YES"
        route = np.where(given, _draw(("IV", "IV", "IV", "ORAL"), rows.size, rng), None)
        table.put("contrast_bolus_route", rows, route)


def _vary_per_instance(table: _Table, rows: np.ndarray, position: np.ndarray,
                       modality: Modality, rng: np.random.Generator) -> None:
    """Instance-level values: redraws (view, exposure, ...) and slice-dependent columns."""
    if rows.size == 0:
        return
    if modality.per_instance:
        table.apply(modality.per_instance, rows, rng)
    if modality.code == "CT":
        # Dose modulation: tube current follows the anatomy slice by slice.
        modulated = table.column("_modulated")[rows] == 1.0
        current = table.column("xray_tube_current")[rows]
        factor = rng.uniform(0.6, 1.4, rows.size)
        current = np.where(modulated, np.round(current * factor), current)
        table.put("xray_tube_current", rows, current)
        table.put("exposure", rows,
                  np.round(current * table.column("exposure_time")[rows] / 1000.0))
    if modality.code == "MR":
        # Sagittal slices step in x, coronal in y; some series window every slice.
        step = table.column("spacing_between_slices")[rows] * position
        plane = table.column("plane")[rows]
        for name, which in (("image_position_x", "SAGITTAL"), ("image_position_y", "CORONAL")):
            base = table.column(name)[rows]
            table.put(name, rows, np.where(plane == which, np.round(base + step, 4), base))
        per_slice = table.column("_window_per_slice")[rows] == 1.0
        for name, spread in (("window_center", 40), ("window_width", 80)):
            base = table.column(name)[rows]
            jitter = rng.integers(-spread, spread + 1, rows.size)
            table.put(name, rows, np.where(per_slice, base + jitter, base))
    if modality.code in ("CR", "DX"):
        table.put("exposure", rows, np.round(table.column("xray_tube_current")[rows]
                                             * table.column("exposure_time")[rows] / 1000.0, 1))
    if modality.code in ("MG", "XA"):
        time = table.column("exposure_time")[rows]
        table.put("exposure", rows,
                  np.round(table.column("xray_tube_current")[rows] * time / 1000.0, 1))


# ---------------------------------------------------------------- the archive


def make_archive(n_instances: int, *, seed: int, missing_share: float = 0.075) -> pd.DataFrame:
    """A synthetic archive of ``n_instances`` parsed instances (see the module docstring).

    Parameters
    ----------
    n_instances : int
        Number of rows (instances).
    seed : int
        Same seed, same archive (values and missingness).
    missing_share : float
        Mean probability that a series drops a column it writes (modality and SOP class
        excepted). 0 gives the complete archive with otherwise identical values.

    Returns
    -------
    pandas.DataFrame
        ``sop_instance_uid``, ``series_instance_uid`` (str), then the default-selection
        feature columns in their order: numeric float64 (NaN missing), categorical object
        (``str`` or ``None``). Rows are ordered by series, then instance number.
    """
    if n_instances < 1:
        raise ValueError(f"n_instances must be >= 1, got {n_instances}")
    if not 0.0 <= missing_share <= 0.5:
        raise ValueError(f"missing_share must be in [0, 0.5], got {missing_share}")
    value_rng = np.random.default_rng([seed, 0])
    missing_rng = np.random.default_rng([seed, 1])
    numeric_columns, categorical_columns = archive_columns()
    feature_columns = default_selection().columns
    kinds = {**FEATURE_KINDS, **HELPER_KINDS}

    modality_of_series, sizes = _series_layout(n_instances, value_rng)
    n_series = sizes.size
    series = _Table(kinds, n_series)
    protocol_of_series = np.full(n_series, -1)
    for index, modality in enumerate(MODALITIES):
        rows = np.flatnonzero(modality_of_series == index)
        series.put("modality", rows, np.full(rows.size, modality.code, dtype=object))
        series.apply(modality.series, rows, value_rng)
        for choices in (modality.scanners, modality.protocols):
            pick = value_rng.integers(0, len(choices), rows.size)
            for option, spec in enumerate(choices):
                series.apply(spec, rows[pick == option], value_rng)
        protocol_of_series[rows] = pick
        _derive_series(series, rows, modality, value_rng)

    # Repeat series values to instances, then vary what varies inside a series.
    series_of_instance = np.repeat(np.arange(n_series), sizes)
    first_of_series = np.cumsum(sizes) - sizes
    position = np.arange(n_instances) - np.repeat(first_of_series, sizes)
    instances = _Table(kinds, n_instances)
    for name, values in series.columns.items():
        instances.columns[name] = np.repeat(values, sizes)
    modality_of_instance = np.repeat(modality_of_series, sizes)
    protocol_of_instance = np.repeat(protocol_of_series, sizes)
    for index, modality in enumerate(MODALITIES):
        rows = np.flatnonzero(modality_of_instance == index)
        _vary_per_instance(instances, rows, position[rows], modality, value_rng)
        for option, spec in enumerate(modality.protocols):
            if "per_instance" in spec:
                instances.apply(spec["per_instance"], rows[protocol_of_instance[rows] == option],
                                value_rng)

    # Per-series dropouts of written tags (drawn from their own generator). A dropped tag
    # loses all its columns (PixelSpacing both values, ImageOrientationPatient 6 + plane).
    sources = list(dict.fromkeys(SOURCE_TAG[name] for name in feature_columns))
    rate = missing_share * missing_rng.uniform(0.5, 1.5, n_series)
    dropped = missing_rng.random((n_series, len(sources))) < rate[:, None]
    for name in feature_columns:
        if name in NEVER_MISSING or name in DERIVED_AFTER_MISSING:
            continue
        column = instances.column(name)
        mask = np.repeat(dropped[:, sources.index(SOURCE_TAG[name])], sizes)
        column[mask] = np.nan if kinds[name] == "numeric" else None
    # The parser infers the body part from descriptions only where BodyPartExamined is empty.
    body_part = series.column("body_part")
    lost = np.repeat(dropped[:, sources.index(SOURCE_TAG["body_part"])]
                     & np.not_equal(body_part, None)
                     & (missing_rng.random(n_series) < 0.7), sizes)
    inferred = instances.column("body_part_inferred")
    inferred[lost] = np.repeat(body_part, sizes)[lost]

    sop_uids = [f"{UID_ROOT}.{seed}.{s}.{k + 1}"
                for s, k in zip(series_of_instance.tolist(), position.tolist())]
    series_uids = np.array([f"{UID_ROOT}.{seed}.{s}" for s in range(n_series)],
                           dtype=object)[series_of_instance]
    data: dict[str, Any] = {"sop_instance_uid": pd.Series(sop_uids, dtype=object),
                            "series_instance_uid": pd.Series(series_uids, dtype=object)}
    for name in feature_columns:
        values = instances.column(name)
        data[name] = (pd.Series(values, dtype=np.float64) if kinds[name] == "numeric"
                      else pd.Series(values, dtype=object))
    return pd.DataFrame(data, copy=False)


if __name__ == "__main__":  # quick look: python benchmarks/clustering/synthetic_archive.py
    import sys
    import time

    start = time.perf_counter()
    frame = make_archive(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000, seed=0)
    print(f"{len(frame)} rows x {frame.shape[1]} columns in {time.perf_counter() - start:.2f} s")
    print(frame["modality"].value_counts(normalize=True).round(3).to_dict())
    print(f"missing share (all cells): {frame.iloc[:, 2:].isna().to_numpy().mean():.3f}")
