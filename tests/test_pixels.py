"""Pixel data to tensor (method.md B.1): pipelines/pixels.py.

Oracles: the DICOM formulas written out with literal numbers (PS3.3 C.11.2.1.2 window,
Rec. 601 luma, ImageNet constants), np.percentile on the same values, and pairs of files
that hold the same picture in different transfer syntaxes (pydicom's bundled test files and
../shared/data/dicom, whose MANIFEST.csv says which files carry pixel data).

``python -m tests.test_pixels`` (from the repository root) prints the timing table quoted in
docs/images.md instead of testing.
"""

from __future__ import annotations

import csv
import io
import struct
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import uid
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames

from pipelines.pixels import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MissingDecoder,
    NotAnImage,
    PixelDecodeError,
    UnreadableDataset,
    dataset_to_frames,
    dataset_to_image,
    decode_frames,
    describe_decoders,
    file_to_frames,
    file_to_image,
    fit_to_square,
    middle_frame_index,
    percentile_to_unit,
    percentile_window,
    window_to_unit,
)

DICOM_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dicom"
needs_shared = pytest.mark.skipif(not DICOM_ROOT.is_dir(), reason=f"{DICOM_ROOT} absent")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on odd test files

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float64)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float64)


def _normalised(unit_value: float) -> np.ndarray:
    """The 3 channel values a grey value in [0, 1] must become: (y - mean_c) / std_c."""
    return (unit_value - MEAN) / STD


def _unit(output: np.ndarray) -> np.ndarray:
    """Undo the normalisation of channel 0 (R): y = x * 0.229 + 0.485."""
    return output[..., 0, :, :].astype(np.float64) * 0.229 + 0.485


def _dataset(pixels: np.ndarray, photometric: str = "MONOCHROME2", *,
             bits_stored: int | None = None,
             sop_class: str = uid.SecondaryCaptureImageStorage, **elements) -> Dataset:
    """An Explicit VR Little Endian dataset holding ``pixels`` (pydicom's set_pixel_data)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.set_pixel_data(pixels, photometric, bits_stored or pixels.dtype.itemsize * 8)
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    return ds


# --------------------------------------------------------------------------- window formula


@pytest.mark.parametrize("x, center, width, function, expected", [
    # LINEAR, c = 50, w = 101: 0 up to c - 0.5 - (w-1)/2 = -0.5, 1 above 49.5 + 50 = 99.5
    (-10.0, 50, 101, "LINEAR", 0.0),
    (-0.5, 50, 101, "LINEAR", 0.0),
    (0.0, 50, 101, "LINEAR", 0.005),        # (0 - 49.5) / 100 + 0.5
    (50.0, 50, 101, "LINEAR", 0.505),       # (50 - 49.5) / 100 + 0.5
    (99.5, 50, 101, "LINEAR", 1.0),
    (1000.0, 50, 101, "LINEAR", 1.0),
    # width 1: a threshold at c - 0.5
    (9.5, 10, 1, "LINEAR", 0.0),
    (9.6, 10, 1, "LINEAR", 1.0),
    # CT soft tissue, c = 40, w = 400: (x - 39.5) / 399 + 0.5
    (0.0, 40, 400, "LINEAR", 0.5 - 39.5 / 399),
    (-160.0, 40, 400, "LINEAR", 0.0),       # threshold 39.5 - 199.5 = -160
    (239.5, 40, 400, "LINEAR", 1.0),
    # LINEAR_EXACT: (x - c) / w + 0.5
    (-5.0, 0, 10, "LINEAR_EXACT", 0.0),
    (0.0, 0, 10, "LINEAR_EXACT", 0.5),
    (2.5, 0, 10, "LINEAR_EXACT", 0.75),
    # SIGMOID: 1 / (1 + exp(-4 (x - c) / w)); x - c = w / 4 gives 1 / (1 + e^-1)
    (1.0, 0, 4, "SIGMOID", 0.7310585786300049),
    (0.0, 0, 4, "SIGMOID", 0.5),
])
def test_window_formula_values(x, center, width, function, expected):
    result = window_to_unit(np.array([x]), center, width, function=function)
    assert result.dtype == np.float32
    assert result[0] == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("width, function", [
    (0.5, "LINEAR"), (0, "LINEAR_EXACT"), (-1, "SIGMOID"),
])
def test_window_rejects_invalid_width(width, function):
    with pytest.raises(ValueError, match="width"):
        window_to_unit(np.zeros(3), 0, width, function=function)


# --------------------------------------------------------------------------- whole pipeline


def test_ramp_with_rescale_and_stored_window_matches_hand_formula():
    stored = np.arange(256, dtype=np.uint16).reshape(16, 16)        # value = 16 row + col
    ds = _dataset(stored, RescaleSlope=2, RescaleIntercept=-100,
                  WindowCenter=[50, 300], WindowWidth=[101, 2000])  # first pair is used
    out = dataset_to_image(ds, size=16)                             # 16 x 16: no resampling
    assert out.shape == (3, 16, 16) and out.dtype == np.float32
    # x = 2 v - 100, window c = 50, w = 101 (see test_window_formula_values)
    for value, expected_unit in [(49, 0.0),     # x = -2
                                 (50, 0.005),   # x = 0
                                 (75, 0.505),   # x = 50
                                 (99, 0.985),   # x = 98: (98 - 49.5) / 100 + 0.5
                                 (100, 1.0),    # x = 100
                                 (255, 1.0)]:
        row, column = divmod(value, 16)
        np.testing.assert_allclose(out[:, row, column], _normalised(expected_unit), atol=2e-6)


def _saved_and_read(ds: Dataset, path: Path) -> Dataset:
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = uid.generate_uid()
    ds.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path)


@pytest.mark.parametrize("sequence", ["ModalityLUTSequence", "VOILUTSequence"])
def test_an_empty_lut_item_counts_as_absent(tmp_path, sequence):
    """LEADTOOLS-style files (dwv's test data has them) carry a Modality or VOI LUT item whose
    LUT Descriptor and LUT Data are empty: the rescale and window apply as without it
    (pydicom's modality LUT raised a TypeError on it)."""
    stored = np.arange(256, dtype=np.uint16).reshape(16, 16)
    plain = _dataset(stored, RescaleSlope=2, RescaleIntercept=-100,
                     **({"WindowCenter": 50, "WindowWidth": 101}
                        if sequence == "ModalityLUTSequence" else {}))
    expected = dataset_to_image(plain, size=16)
    item = Dataset()
    item.add_new(0x00283002, "US", None)  # LUT Descriptor, zero length
    item.add_new(0x00283006, "OW", None)  # LUT Data, zero length
    if sequence == "ModalityLUTSequence":
        item.ModalityLUTType = ""
    setattr(plain, sequence, [item])
    read = _saved_and_read(plain, tmp_path / "leadtools.dcm")
    assert read[sequence][0].LUTDescriptor is None  # empty on disk, as such files have it
    np.testing.assert_array_equal(dataset_to_image(read, size=16), expected)


def test_an_empty_data_set_is_a_reason_not_no_pixel_data(tmp_path):
    """A file pydicom reads as an empty data set is not "no pixel data" (a skip, for
    good): whether it holds an image is unknown, and the reason says what happened."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = uid.CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = uid.generate_uid()
    path = tmp_path / "empty.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert len(pydicom.dcmread(path, force=True).keys()) == 0
    with pytest.raises(UnreadableDataset) as raised:
        file_to_image(path)
    assert "pydicom read an empty data set from a" in raised.value.reason
    assert "-byte file" in raised.value.reason


@needs_shared
def test_a_file_pydicom_reads_as_empty_decodes_from_its_header_offset():
    """Seen in the wild: encapsulated pixel data that ends after its last fragment, without
    the sequence delimiter. pydicom's full read gives an empty data set (it was marked "no
    pixel data" for good); its header reads, and its frames are those of the complete file."""
    short = _shared("pydicom_data/emri_small_jpeg_2k_lossless_too_short.dcm")
    assert len(pydicom.dcmread(short, force=True).keys()) == 0
    np.testing.assert_array_equal(
        file_to_frames(short),
        file_to_frames(_shared("pydicom_data/emri_small_jpeg_2k_lossless.dcm")))


@needs_shared
def test_a_cut_fragment_after_an_empty_read_says_where(tmp_path):
    """The same file cut inside a fragment: the reason says which item and how short."""
    short = _shared("pydicom_data/emri_small_jpeg_2k_lossless_too_short.dcm")
    path = tmp_path / "cut.dcm"
    path.write_bytes(short.read_bytes()[:-1000])
    with pytest.raises(UnreadableDataset) as raised:
        file_to_image(path)
    assert "header (130 elements) reads" in raised.value.reason
    assert "claims 3,752 bytes, 2,752 remain" in raised.value.reason


def test_monochrome1_is_the_inverse_of_monochrome2():
    stored = np.arange(64, dtype=np.uint16).reshape(8, 8) * 50
    # 0 up to 1575 - 1574.5 = 0.5, 1 above 1575 + 1574.5 = 3149.5: values 0..3150 span it all
    window = dict(WindowCenter=1575.5, WindowWidth=3150)
    grey2 = _unit(dataset_to_image(_dataset(stored, "MONOCHROME2", **window), size=8))
    grey1 = _unit(dataset_to_image(_dataset(stored, "MONOCHROME1", **window), size=8))
    assert grey2.min() == pytest.approx(0.0, abs=1e-6) and grey2.max() == pytest.approx(1.0)
    np.testing.assert_allclose(grey1, 1.0 - grey2, atol=2e-6)


def test_rgb_becomes_rec601_grey():
    rgb = np.array([[[255, 0, 0], [0, 255, 0]],
                    [[0, 0, 255], [255, 255, 255]]], dtype=np.uint8)
    out = dataset_to_image(_dataset(rgb, "RGB"), size=2)
    np.testing.assert_allclose(_unit(out), [[0.299, 0.587], [0.114, 1.0]], atol=2e-6)
    # every channel carries the same grey
    np.testing.assert_allclose(out[1], (_unit(out) - 0.456) / 0.224, atol=2e-6)


def test_ybr_full_with_neutral_chroma_gives_its_luma():
    ybr = np.zeros((2, 2, 3), dtype=np.uint8)
    ybr[..., 0] = [[0, 64], [128, 255]]
    ybr[..., 1:] = 128                           # Cb = Cr = 128: no colour
    out = dataset_to_image(_dataset(ybr, "YBR_FULL"), size=2)
    # YBR -> RGB rounds to whole levels: within 1/255
    np.testing.assert_allclose(_unit(out), [[0, 64 / 255], [128 / 255, 1.0]], atol=1 / 255)


def test_palette_colour_goes_through_its_lut_then_luma():
    indices = np.array([[0, 1], [2, 3]], dtype=np.uint8)
    ds = _dataset(indices, "PALETTE COLOR")
    for colour, entries in (("Red", [0, 65535, 0, 0]), ("Green", [0, 0, 65535, 0]),
                            ("Blue", [0, 0, 0, 65535])):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [4, 0, 16])
        setattr(ds, f"{colour}PaletteColorLookupTableData",
                struct.pack("<4H", *entries))
    out = dataset_to_image(ds, size=2)
    np.testing.assert_allclose(_unit(out), [[0.0, 0.299], [0.587, 0.114]], atol=2e-6)


@pytest.mark.parametrize("rows, columns, inside_rows, inside_columns", [
    (200, 100, (0, 224), (56, 168)),     # tall: 224 x 112, centred at column (224 - 112) // 2
    (50, 200, (84, 140), (0, 224)),      # wide: 56 x 224, from row 84
    (3, 7, (64, 160), (0, 224)),         # 3 * 32 = 96 rows, from row (224 - 96) // 2 = 64
    (224, 224, (0, 224), (0, 224)),      # already square: no padding
])
def test_aspect_ratio_is_kept_and_padding_is_black(rows, columns, inside_rows, inside_columns):
    stored = np.full((rows, columns), 1000, dtype=np.uint16)
    out = dataset_to_image(_dataset(stored, WindowCenter=0, WindowWidth=10), size=224)
    assert out.shape == (3, 224, 224)
    grey = _unit(out)
    inside = np.zeros((224, 224), dtype=bool)
    inside[slice(*inside_rows), slice(*inside_columns)] = True
    np.testing.assert_allclose(grey[inside], 1.0, atol=2e-6)       # white image
    np.testing.assert_allclose(grey[~inside], 0.0, atol=2e-6)      # black padding
    # the padding is what black becomes: -mean_c / std_c in each channel
    if (~inside).any():
        corner = out[:, ~inside][:, 0]
        np.testing.assert_allclose(corner, [-2.1179039, -2.0357143, -1.8044444], atol=1e-6)


def test_fit_to_square_shrinks_with_antialiasing():
    # a one-pixel checkerboard shrunk 4x must average to grey, not alias to black or white
    checker = (np.indices((896, 896)).sum(axis=0) % 2).astype(np.float32)
    square = fit_to_square(checker, size=224)
    np.testing.assert_allclose(square[8:-8, 8:-8], 0.5, atol=0.02)


@pytest.mark.parametrize("n_frames, middle", [(1, 0), (2, 1), (3, 1), (4, 2), (5, 2)])
def test_middle_frame_index(n_frames, middle):
    assert middle_frame_index(n_frames) == middle


def test_multi_frame_takes_the_middle_frame_or_all_frames():
    frames = np.stack([np.full((4, 4), value, dtype=np.uint16) for value in (0, 100, 200, 300)])
    ds = _dataset(frames, WindowCenter=150, WindowWidth=400)
    # LINEAR c = 150, w = 400: y = (x - 149.5) / 399 + 0.5
    expected = [0.5 + (value - 149.5) / 399 for value in (0, 100, 200, 300)]
    image = dataset_to_image(ds, size=4)
    assert image.shape == (3, 4, 4)
    np.testing.assert_allclose(_unit(image), expected[2], atol=2e-6)   # frame 4 // 2 = 2
    every = dataset_to_frames(ds, size=4)
    assert every.shape == (4, 3, 4, 4) and every.dtype == np.float32
    for index, value in enumerate(expected):
        np.testing.assert_allclose(_unit(every[index]), value, atol=2e-6)


def test_single_frame_dataset_to_frames_has_one_frame():
    ds = _dataset(np.zeros((4, 4), dtype=np.uint16), WindowCenter=0, WindowWidth=10)
    assert dataset_to_frames(ds, size=4).shape == (1, 3, 4, 4)


def test_enhanced_multi_frame_uses_functional_group_rescale_and_window():
    frames = np.stack([np.full((4, 4), 10, np.uint16), np.full((4, 4), 20, np.uint16)])
    ds = _dataset(frames, sop_class=uid.EnhancedCTImageStorage,
                  WindowCenter=0, WindowWidth=1)      # top level, overridden per frame
    rescale = Dataset()
    rescale.RescaleSlope, rescale.RescaleIntercept, rescale.RescaleType = 2, 0, "HU"
    shared = Dataset()
    shared.PixelValueTransformationSequence = [rescale]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for center, width in ((20, 10), (40, 100)):
        voi = Dataset()
        voi.WindowCenter, voi.WindowWidth = center, width
        item = Dataset()
        item.FrameVOILUTSequence = [voi]
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    every = dataset_to_frames(ds, size=4)
    # frame 0: x = 2 * 10 = 20, c = 20, w = 10: (20 - 19.5) / 9 + 0.5
    np.testing.assert_allclose(_unit(every[0]), 0.5 + 0.5 / 9, atol=2e-6)
    # frame 1: x = 40, c = 40, w = 100: (40 - 39.5) / 99 + 0.5
    np.testing.assert_allclose(_unit(every[1]), 0.5 + 0.5 / 99, atol=2e-6)


def test_no_stored_window_uses_the_0_5_and_99_5_percentiles():
    stored = np.arange(100, dtype=np.uint16).reshape(10, 10)
    out = dataset_to_image(_dataset(stored), size=10)
    # np.percentile (linear) of 0..99: 0.005 * 99 = 0.495 and 0.995 * 99 = 98.505
    low, high = 0.495, 98.505
    grey = _unit(out)
    for value in (0, 1, 50, 98, 99):
        expected = min(max((value - low) / (high - low), 0.0), 1.0)
        assert grey.flat[value] == pytest.approx(expected, abs=2e-6)


def test_percentile_window_ignores_pixel_padding():
    stored = np.arange(100, dtype=np.int16).reshape(10, 10)
    stored.flat[:20] = -2000                         # outside the field of view
    out = dataset_to_image(_dataset(stored, PixelPaddingValue=-2000), size=10)
    # percentiles of the 80 values 20..99: 20 + 0.005 * 79, 20 + 0.995 * 79
    low, high = 20.395, 98.605
    grey = _unit(out)
    assert grey.flat[50] == pytest.approx((50 - low) / (high - low), abs=2e-6)
    assert grey.flat[0] == pytest.approx(0.0, abs=2e-6)


@pytest.mark.parametrize("dtype, low, high", [
    (np.uint16, 0, 4096), (np.int16, -2000, 3000), (np.uint8, 0, 256),
    (np.int32, -(1 << 21), 1 << 21),             # too wide for a histogram: np.percentile
    (np.float32, -1.0, 1.0),
])
@pytest.mark.parametrize("percentiles", [(0.5, 99.5), (0.0, 100.0), (10.0, 37.3)])
def test_percentile_window_equals_numpy_percentile(dtype, low, high, percentiles):
    rng = np.random.default_rng(7)
    values = (rng.uniform(low, high, size=(61, 47)) if dtype == np.float32
              else rng.integers(low, high, size=(61, 47))).astype(dtype)
    exclude = rng.random((61, 47)) < 0.2
    expected = np.percentile(values[~exclude].astype(np.float64), percentiles)
    got = percentile_window(values, percentiles=percentiles, exclude=exclude)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9)


def test_percentile_window_ignores_non_finite_values():
    values = np.array([[np.nan, 1.0, 2.0], [3.0, np.inf, 4.0]])
    assert percentile_window(values, percentiles=(0, 100)) == (1.0, 4.0)


def test_percentile_window_with_a_negative_rescale_slope():
    stored = np.arange(100, dtype=np.uint16).reshape(10, 10)
    out = dataset_to_image(_dataset(stored, RescaleSlope=-1, RescaleIntercept=0), size=10)
    # modality values -v: percentiles -98.505 and -0.495, so v = 0 is white and v = 99 black
    grey = _unit(out)
    for value in (0, 50, 99):
        expected = min(max((-value + 98.505) / 98.01, 0.0), 1.0)
        assert grey.flat[value] == pytest.approx(expected, abs=2e-6)


def test_percentile_of_a_constant_image_is_black():
    assert percentile_to_unit(np.full((4, 4), 7.0)).max() == 0.0


def test_normalisation_constants():
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)
    black = dataset_to_image(_dataset(np.zeros((4, 4), np.uint16), WindowCenter=100,
                                      WindowWidth=10), size=4)
    white = dataset_to_image(_dataset(np.full((4, 4), 500, np.uint16), WindowCenter=100,
                                      WindowWidth=10), size=4)
    # -0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225 and (1 - mean) / std
    np.testing.assert_allclose(black[:, 0, 0], [-2.1179039, -2.0357143, -1.8044444], atol=1e-6)
    np.testing.assert_allclose(white[:, 0, 0], [2.2489083, 2.4285714, 2.64], atol=1e-6)


def test_missing_transfer_syntax_is_taken_from_how_the_file_was_read():
    stored = np.arange(64, dtype=np.uint16).reshape(8, 8)
    ds = _dataset(stored, WindowCenter=32, WindowWidth=64)
    reference = dataset_to_image(ds, size=8)
    buffer = io.BytesIO()
    ds.file_meta = FileMetaDataset()                 # written without (0002,0010)
    ds.save_as(buffer, implicit_vr=True, little_endian=True, enforce_file_format=False)
    reread = pydicom.dcmread(io.BytesIO(buffer.getvalue()), force=True)
    assert "TransferSyntaxUID" not in getattr(reread, "file_meta", {})
    np.testing.assert_array_equal(dataset_to_image(reread, size=8), reference)


# --------------------------------------------------------------------------- skips and errors


def test_basic_text_sr_is_not_an_image():
    ds = Dataset()
    ds.SOPClassUID = uid.BasicTextSRStorage
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    with pytest.raises(NotAnImage, match="Basic Text SR Storage.*structured report") as info:
        dataset_to_image(ds)
    assert info.value.reason == str(info.value)


def test_segmentation_with_pixel_data_is_not_an_image():
    ds = _dataset(np.zeros((4, 4), np.uint8), sop_class=uid.SegmentationStorage)
    with pytest.raises(NotAnImage, match="Segmentation"):
        dataset_to_image(ds)


def test_image_sop_class_without_pixel_data_is_not_an_image():
    ds = Dataset()
    ds.SOPClassUID = uid.CTImageStorage
    with pytest.raises(NotAnImage, match="no pixel data"):
        dataset_to_frames(ds)


@pytest.mark.parametrize("name, fragment", [
    ("rtplan.dcm", "RT plan"), ("rtstruct.dcm", "RT structure set"),
    ("test-SR.dcm", "structured report"), ("waveform_ecg.dcm", "waveform"),
    ("rtdose.dcm", "RT dose"),
])
def test_bundled_non_image_files(name, fragment):
    with pytest.raises(NotAnImage, match=fragment):
        file_to_image(get_testdata_file(name))


def test_truncated_pixel_data_is_a_decode_error_with_a_short_reason():
    ds = _dataset(np.zeros((16, 16), np.uint16), WindowCenter=0, WindowWidth=10)
    ds.PixelData = ds.PixelData[:100]
    with pytest.raises(PixelDecodeError, match="less than expected") as info:
        dataset_to_image(ds)
    assert not isinstance(info.value, MissingDecoder)
    assert len(info.value.reason) <= 200 and "\n" not in info.value.reason


def test_bundled_truncated_file_is_a_decode_error():
    with pytest.raises(PixelDecodeError, match="less than expected"):
        file_to_image(get_testdata_file("MR_truncated.dcm"))


def test_corrupt_jpeg_2000_codestream_is_a_decode_error():
    ds = pydicom.dcmread(get_testdata_file("MR_small_jp2klossless.dcm"))
    codestream = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([codestream[:60]])
    with pytest.raises(PixelDecodeError) as info:
        dataset_to_image(ds)
    assert not isinstance(info.value, MissingDecoder)


def test_transfer_syntax_without_any_decoder_names_what_is_missing():
    ds = _dataset(np.zeros((4, 4), np.uint8), WindowCenter=0, WindowWidth=10)
    ds.file_meta.TransferSyntaxUID = uid.MPEG2MPML
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + b"\x00" * 60])
    with pytest.raises(MissingDecoder, match="MPEG2"):
        dataset_to_image(ds)


def test_uninstalled_plugin_is_named(monkeypatch):
    import pipelines.pixels as pixels

    class NoPlugins:
        is_available = False
        available_plugins = ()

    monkeypatch.setattr(pixels, "get_decoder", lambda tsyntax: NoPlugins())
    ds = pydicom.dcmread(get_testdata_file("SC_rgb_jpeg_gdcm.dcm"))
    assert ds.file_meta.TransferSyntaxUID == uid.JPEGLosslessSV1
    with pytest.raises(MissingDecoder, match="python-gdcm"):
        dataset_to_image(ds)


def test_twelve_bit_jpeg_extended_needs_the_optional_gpl_plugin():
    path = get_testdata_file("JPGExtended.dcm")
    try:
        import libjpeg  # noqa: F401 - pylibjpeg-libjpeg, GPL-3.0, optional
    except ImportError:
        with pytest.raises(MissingDecoder, match="pylibjpeg-libjpeg"):
            file_to_image(path)
    else:
        assert np.isfinite(file_to_image(path)).all()


def test_describe_decoders_lists_installed_plugins():
    found = describe_decoders([uid.RLELossless, uid.MPEG2MPML, uid.ExplicitVRBigEndian])
    assert "pydicom" in found["RLE Lossless"]          # pydicom's own RLE decoder
    assert found["MPEG2 Main Profile / Main Level"] == "none"
    assert found["Explicit VR Big Endian"] == "built in"


def test_a_file_that_is_not_dicom_is_not_an_image(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"not a DICOM file at all\n" * 20)
    with pytest.raises((NotAnImage, PixelDecodeError)):
        file_to_image(path)


# --------------------------------------------------------------------------- transfer syntaxes


def _bundled(name: str) -> str:
    return get_testdata_file(name)


def _shared(relative: str) -> Path:
    path = DICOM_ROOT / relative
    if not path.is_file():
        pytest.skip(f"{path} absent")
    return path


def _jpeg_ls_near(path) -> int:
    """NEAR of the first JPEG-LS scan (T.87 C.2.3: SOS = FFDA, Ls, Ns, Ns x (Ci, Tmi), NEAR)."""
    ds = pydicom.dcmread(path)
    codestream = next(generate_frames(ds.PixelData, number_of_frames=1))
    sos = codestream.index(b"\xff\xda")
    n_components = codestream[sos + 4]
    return codestream[sos + 5 + 2 * n_components]


LOSSLESS_BUNDLED = [
    ("MR_small_RLE.dcm", "MR_small.dcm"),                  # RLE Lossless
    ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),     # JPEG-LS lossless
    ("MR_small_jp2klossless.dcm", "MR_small.dcm"),         # JPEG 2000 lossless
    ("MR_small_bigendian.dcm", "MR_small.dcm"),            # Explicit VR Big Endian
    ("MR_small_expb.dcm", "MR_small.dcm"),
    ("MR_small_implicit.dcm", "MR_small.dcm"),             # Implicit VR Little Endian
    ("SC_rgb_jpeg_gdcm.dcm", "SC_rgb_rle.dcm"),            # JPEG lossless SV1, RGB
    ("SC_rgb_gdcm_KY.dcm", "SC_rgb_rle.dcm"),              # JPEG 2000 (reversible content)
    ("SC_rgb_small_odd_big_endian.dcm", "SC_rgb_small_odd.dcm"),
]


@pytest.mark.parametrize("compressed, reference", LOSSLESS_BUNDLED)
def test_bundled_lossless_files_decode_to_their_reference(compressed, reference):
    decoded = decode_frames(pydicom.dcmread(_bundled(compressed)), index=None)
    expected = decode_frames(pydicom.dcmread(_bundled(reference)), index=None)
    np.testing.assert_array_equal(decoded, expected)
    # equal pixels; the float maths after them may round differently where the memory
    # layout of the decoded arrays differs (seen on an AVX-512 machine: 6e-7), while one
    # grey level is about 2e-2 after the normalisation
    np.testing.assert_allclose(file_to_image(_bundled(compressed)),
                               file_to_image(_bundled(reference)), rtol=0, atol=1e-5)


@pytest.mark.parametrize("compressed, reference, max_error, mean_error", [
    # JPEG baseline (dcmtk, default quality): a few grey levels
    ("SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_rle.dcm", 8, 1.0),
    ("SC_rgb_dcmtk_+eb+cr.dcm", "SC_rgb_rle.dcm", 8, 1.0),
    ("SC_rgb_small_odd_jpeg.dcm", "SC_rgb_small_odd.dcm", 8, 2.0),
])
def test_bundled_lossy_jpeg_is_close_to_its_reference(compressed, reference, max_error,
                                                      mean_error):
    decoded = decode_frames(pydicom.dcmread(_bundled(compressed)), index=None).astype(float)
    expected = decode_frames(pydicom.dcmread(_bundled(reference)), index=None).astype(float)
    error = np.abs(decoded - expected)
    assert error.max() <= max_error and error.mean() <= mean_error
    assert np.abs(file_to_image(_bundled(compressed))
                  - file_to_image(_bundled(reference))).mean() <= 0.05


@pytest.mark.parametrize("compressed", ["SC_rgb_jls_lossy_line.dcm",
                                        "SC_rgb_jls_lossy_sample.dcm"])
def test_near_lossless_jpeg_ls_stays_within_near(compressed):
    near = _jpeg_ls_near(_bundled(compressed))
    assert near >= 1
    decoded = decode_frames(pydicom.dcmread(_bundled(compressed)), index=None).astype(int)
    expected = decode_frames(pydicom.dcmread(_bundled("SC_rgb_rle.dcm")), index=None)
    assert np.abs(decoded - expected).max() <= near


@pytest.mark.parametrize("name", ["JPEGLSNearLossless_08.dcm", "JPEGLSNearLossless_16.dcm",
                                  "image_dfl.dcm", "JPEG2000.dcm", "examples_ybr_color.dcm",
                                  "examples_palette.dcm", "CT_small.dcm", "693_J2KI.dcm"])
def test_other_bundled_images_give_finite_tensors(name):
    out = file_to_image(_bundled(name))
    assert out.shape == (3, 224, 224) and out.dtype == np.float32 and np.isfinite(out).all()


SHARED_PAIRS = [
    # (file, reference, exact?) "UNCR"/"UNCI" = the reversible/irreversible code stream expanded
    ("pydicom_data/693_J2KR.dcm", "pydicom_data/693_UNCR.dcm"),
    ("pydicom_testfiles/693_J2KI.dcm", "pydicom_data/693_UNCI.dcm"),
    ("pydicom_data/MR2_J2KR.dcm", "pydicom_data/MR2_UNCR.dcm"),
    ("pydicom_data/MR2_J2KI.dcm", "pydicom_data/MR2_UNCI.dcm"),
    ("pydicom_data/US1_J2KR.dcm", "pydicom_data/US1_UNCR.dcm"),
    ("pydicom_data/US1_J2KI.dcm", "pydicom_data/US1_UNCI.dcm"),
    ("pydicom_data/emri_small_RLE.dcm", "pydicom_data/emri_small.dcm"),
    ("pydicom_data/emri_small_jpeg_ls_lossless.dcm", "pydicom_data/emri_small.dcm"),
    ("pydicom_data/emri_small_jpeg_2k_lossless.dcm", "pydicom_data/emri_small.dcm"),
    ("pydicom_data/emri_small_big_endian.dcm", "pydicom_data/emri_small.dcm"),
    ("pydicom_data/OBXXXX1A_rle.dcm", "pydicom_data/OBXXXX1A.dcm"),     # palette colour
    ("pydicom_data/OBXXXX1A_expb.dcm", "pydicom_data/OBXXXX1A.dcm"),    # big-endian palette
    ("pydicom_data/SC_rgb_expb.dcm", "pydicom_data/SC_rgb.dcm"),
    ("pydicom_testfiles/SC_rgb_jpeg_gdcm.dcm", "pydicom_data/SC_rgb.dcm"),  # JPEG lossless
    ("pydicom_testfiles/JPEG2000.dcm", "pydicom_data/JPEG2000_UNC.dcm"),
]


@needs_shared
@pytest.mark.parametrize("compressed, reference", SHARED_PAIRS)
def test_shared_pairs_give_identical_tensors(compressed, reference):
    np.testing.assert_array_equal(file_to_frames(_shared(compressed)),
                                  file_to_frames(_shared(reference)))


@needs_shared
def test_htj2k_lossy_is_close_to_htj2k_lossless():
    lossless = decode_frames(pydicom.dcmread(_shared("pydicom_data/HTJ2KLossless_08_RGB.dcm")),
                             index=None).astype(float)
    lossy = decode_frames(pydicom.dcmread(_shared("pydicom_data/HTJ2K_08_RGB.dcm")),
                          index=None).astype(float)
    error = np.abs(lossy - lossless)
    assert error.max() <= 8 and error.mean() <= 1.0


@needs_shared
def test_jpeg_lossless_process_14_sv1_real_files():
    for relative in ("dcm_qa_siemens/Orientation/axmb/AxAsc36mb2a/jpg1.dcm",
                     "pydicom_data/JPGLosslessP14SV1_1s_1f_8b.dcm"):
        out = file_to_image(_shared(relative))
        assert np.isfinite(out).all() and out.std() > 0.1


# --------------------------------------------------------------------------- every shared file

KNOWN_BROKEN = {
    # relative path -> text the PixelDecodeError reason must contain (broken on purpose upstream)
    "pydicom_testfiles/MR_truncated.dcm": "less than expected",
    "pydicom_testfiles/JPEG2000-embedded-sequence-delimiter.dcm": "J2K",
    "pydicom_testfiles/meta_missing_tsyntax.dcm": "Bits Allocated",
    "pydicom_testfiles/nested_priv_SQ.dcm": "Bits Allocated",
}
TWELVE_BIT_JPEG = {"pydicom_testfiles/JPEG-lossy.dcm", "pydicom_testfiles/JPGExtended.dcm"}
SKIPPED_SOP_CLASSES = {"Segmentation Storage", "RT Dose Storage"}  # pixel data, not pictures
FLOAT_PIXELS = {"pydicom_data/parametric_map_double_float.dcm"}
# pydicom reads an empty data set (the manifest's script too); decoded from the header's offset
EMPTY_FULL_READ = {"pydicom_data/emri_small_jpeg_2k_lossless_too_short.dcm"}
# Double Float Pixel Data: an image, though the manifest's script only looked for Pixel Data


def _expected_outcome(row: dict[str, str]) -> str:
    relative = row["path"]
    if relative in KNOWN_BROKEN:
        return "decode-error"
    if relative in TWELVE_BIT_JPEG:
        try:
            import libjpeg  # noqa: F401
        except ImportError:
            return "missing-decoder"
        return "image"
    if relative in EMPTY_FULL_READ:
        return "image"
    if row["SOPClass"] in SKIPPED_SOP_CLASSES:
        return "not-an-image"
    if row["has_pixels"] != "True" and relative not in FLOAT_PIXELS:
        return "not-an-image"
    return "image"


@needs_shared
def test_every_shared_file_is_an_image_or_a_recorded_skip(capsys):
    with open(DICOM_ROOT / "MANIFEST.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) >= 400
    counts: dict[str, int] = {}
    wrong = []
    for row in rows:
        path = DICOM_ROOT / row["path"]
        try:
            out = file_to_image(path)
            assert out.shape == (3, 224, 224) and out.dtype == np.float32, row["path"]
            assert np.isfinite(out).all(), row["path"]
            outcome, reason = "image", ""
        except NotAnImage as exc:
            outcome, reason = "not-an-image", exc.reason
        except MissingDecoder as exc:
            outcome, reason = "missing-decoder", exc.reason
        except PixelDecodeError as exc:
            outcome, reason = "decode-error", exc.reason
            if KNOWN_BROKEN.get(row["path"], "\0") not in reason:
                wrong.append((row["path"], "reason", reason))
        counts[outcome] = counts.get(outcome, 0) + 1
        if outcome != _expected_outcome(row):
            wrong.append((row["path"], outcome, reason))
        if outcome != "image":
            assert reason and len(reason) <= 200, (row["path"], reason)
    with capsys.disabled():
        print(f"\nshared DICOM files by outcome: {dict(sorted(counts.items()))}")
    assert not wrong, wrong


# --------------------------------------------------------------------------- timing (not a test)


def _synthetic_ct(path: Path, transfer_syntax: str = uid.ExplicitVRLittleEndian) -> Path:
    """A 512 x 512 CT slice: air, a water disc with noise, a bone ring; stored = HU + 1024."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[-256:256, -256:256]
    radius = np.hypot(yy, xx)
    hu = np.full((512, 512), -1000.0)
    hu[radius < 200] = 40 + rng.normal(0, 15, size=(radius < 200).sum())
    hu[(radius >= 180) & (radius < 200)] = 1000
    stored = np.clip(hu + 1024, 0, 4095).astype(np.uint16)
    ds = _dataset(stored, bits_stored=12, sop_class=uid.CTImageStorage,
                  RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=40, WindowWidth=400)
    ds.file_meta.MediaStorageSOPClassUID = uid.CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    if transfer_syntax != uid.ExplicitVRLittleEndian:
        ds.compress(transfer_syntax)
    ds.save_as(path, enforce_file_format=True)
    return path


def _benchmark() -> None:  # pragma: no cover - run by hand
    import tempfile

    from PIL import Image

    from pipelines import pixels

    def per_call_ms(function, repeats: int) -> str:
        """Median (and fastest) of ``repeats`` calls: on a shared machine the fastest is
        the better estimate of the uncontended cost."""
        function()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            function()
            times.append(time.perf_counter() - start)
        return f"{1e3 * np.median(times):.2f} ({1e3 * min(times):.2f})"

    def cpu_ms(function, repeats: int) -> str:
        """CPU time per call: less sensitive than wall time to other processes."""
        function()
        start = time.process_time()
        for _ in range(repeats):
            function()
        return f"{1e3 * (time.process_time() - start) / repeats:.2f}"

    with tempfile.TemporaryDirectory() as folder:
        cases = {"synthetic CT, Explicit VR LE": _synthetic_ct(Path(folder) / "ct.dcm")}
        for name, syntax in (("RLE", uid.RLELossless),
                             ("JPEG-LS lossless", uid.JPEGLSLossless),
                             ("J2K lossless", uid.JPEG2000Lossless)):
            try:
                cases[f"synthetic CT, {name}"] = _synthetic_ct(Path(folder) / f"{name}.dcm",
                                                               syntax)
            except Exception as exc:  # noqa: BLE001 - no encoder installed
                print(f"(no {name} encoder: {exc})")
        for label, relative in (("693 CT, uncompressed", "pydicom_data/693_UNCR.dcm"),
                                ("693 CT, J2K lossless", "pydicom_data/693_J2KR.dcm"),
                                ("693 CT, J2K lossy", "pydicom_testfiles/693_J2KI.dcm")):
            if (DICOM_ROOT / relative).is_file():
                cases[label] = DICOM_ROOT / relative

        print("ms per image, one core: median (fastest)\n")
        print("| 512 x 512 CT | read | decode | window | resize+pad | normalise | "
              "file_to_image | file_to_image, CPU time |")
        print("|---|---|---|---|---|---|---|---|")
        for label, path in cases.items():
            ds = pydicom.dcmread(path, force=True, defer_size=pixels.DEFAULT_DEFER_SIZE)
            frame = pixels.decode_frames(ds, index=0)
            unit = pixels.frame_to_unit(frame, ds)
            grey = pixels.fit_to_square(unit, size=224)
            steps = [
                per_call_ms(lambda: pydicom.dcmread(path, force=True,
                                                    defer_size=pixels.DEFAULT_DEFER_SIZE), 50),
                per_call_ms(lambda: pixels.decode_frames(ds, index=0), 20),
                per_call_ms(lambda: pixels.frame_to_unit(frame, ds), 50),
                per_call_ms(lambda: pixels.fit_to_square(unit, size=224), 50),
                per_call_ms(lambda: pixels.normalise_imagenet(grey), 50),
                per_call_ms(lambda: pixels.file_to_image(path), 20),
                cpu_ms(lambda: pixels.file_to_image(path), 50),
            ]
            print(f"| {label} | " + " | ".join(steps) + " |")

        unit = pixels.frame_to_unit(pixels.decode_frames(
            pydicom.dcmread(cases["synthetic CT, Explicit VR LE"]), index=0),
            pydicom.dcmread(cases["synthetic CT, Explicit VR LE"]))
        print("\n| resize 512 x 512 float32 -> 224 x 224 | ms, median (fastest) |")
        print("|---|---|")
        print(f"| Pillow BILINEAR (antialiased), used | "
              f"{per_call_ms(lambda: pixels.fit_to_square(unit, size=224), 100)} |")
        for name, resample in (("Pillow BICUBIC", Image.Resampling.BICUBIC),
                               ("Pillow BOX", Image.Resampling.BOX)):
            print(f"| {name} | " + "{} |".format(per_call_ms(
                lambda: np.asarray(Image.fromarray(unit).resize((224, 224), resample)), 100)))
        try:
            import torch
            import torch.nn.functional as functional
        except ImportError:
            return
        torch.set_num_threads(1)
        tensor = torch.from_numpy(unit)[None, None]
        for name, options in (("torch bilinear antialias", dict(mode="bilinear",
                                                               antialias=True)),
                              ("torch bicubic antialias", dict(mode="bicubic",
                                                              antialias=True)),
                              ("torch area", dict(mode="area"))):
            print(f"| {name} (1 thread) | " + "{} |".format(per_call_ms(
                lambda: functional.interpolate(tensor, size=(224, 224), **options).numpy(),
                100)))
        reference = np.asarray(Image.fromarray(unit).resize((224, 224),
                                                            Image.Resampling.BILINEAR))
        other = functional.interpolate(tensor, size=(224, 224), mode="bilinear",
                                       antialias=True)[0, 0].numpy()
        print(f"\nPillow vs torch bilinear antialias: max |diff| = "
              f"{np.abs(reference - other).max():.2e}")


if __name__ == "__main__":  # pragma: no cover
    _benchmark()
