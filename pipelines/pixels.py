"""Pixel data to network input: a DICOM image as a (3, size, size) float32 ImageNet tensor.

Implements docs/method.md B.1 (the part before DenseNet121): "rescale
slope/intercept, the stored window (or a robust percentile window), MONOCHROME1 inverted,
grey repeated to 3 channels, ImageNet normalisation", for every transfer syntax the listener
accepts. ``docs/images.md`` ("Pixel data to tensor") has the decoder table and the timings.

The steps, in order, for one frame:

1. **Decode** with pydicom's pixel decoders (:func:`decode_frames`); YBR is converted to RGB
   by the decoder. Plugins are tried in the order of :data:`PREFERRED_PLUGINS` (fastest
   measured first), then every other installed one.
2. **Grey in [0, 1]** (:func:`frame_to_unit`):

   * MONOCHROME1/2: Modality LUT Sequence (pydicom's ``apply_modality_lut``) or
     ``x * RescaleSlope + RescaleIntercept``; then the first stored window
     (:func:`window_to_unit`, PS3.3 C.11.2.1.2, honouring VOILUTFunction), else the first
     VOI LUT Sequence item, else the 0.5/99.5 percentile window
     (:func:`percentile_to_unit`); MONOCHROME1 then becomes ``1 - y``. Enhanced multi-frame
     objects take rescale and window from the frame's functional groups.
   * RGB (and YBR, converted) and PALETTE COLOR (through its LUT): Rec. 601 luma
     ``0.299 R + 0.587 G + 0.114 B`` (:data:`LUMA_WEIGHTS`, the Y of DICOM YBR_FULL), divided
     by the largest sample value. Colour images are not windowed (VOI applies to grey only).

3. **Fit** (:func:`fit_to_square`): resize so the longer side is ``size`` (aspect ratio of
   the pixel grid kept, Pillow bilinear with antialiasing), centred on a square of 0.0, the
   value black has at this point.
4. **Normalise** (:func:`normalise_imagenet`): grey repeated to 3 channels,
   ``(y - mean_c) / std_c`` with the ImageNet constants. The padding so ends up at
   ``-mean_c / std_c``, exactly what a black pixel becomes.

Outcomes: an array, :class:`NotAnImage` (nothing to picture: skip and record the reason), or
:class:`PixelDecodeError` (corrupt or undecodable: record, retry); its subclass
:class:`MissingDecoder` means no installed plugin decodes the transfer syntax, so retrying
will not help until one is installed.
"""

from __future__ import annotations

import logging
import math
import os
import struct
import warnings
from typing import Callable, Literal, Sequence

import numpy as np
import pydicom
from PIL import Image
from pydicom import uid
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, get_decoder
from pydicom.pixels.utils import as_pixel_options, get_nr_frames

__all__ = [
    "DECODER_PACKAGES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LUMA_WEIGHTS",
    "MissingDecoder",
    "NON_IMAGE_SOP_CLASS_FAMILIES",
    "NotAnImage",
    "PERCENTILE_WINDOW",
    "PREFERRED_PLUGINS",
    "PixelDecodeError",
    "check_is_image",
    "dataset_to_frames",
    "dataset_to_image",
    "decode_frames",
    "describe_decoders",
    "file_to_frames",
    "file_to_image",
    "fit_to_square",
    "frame_to_unit",
    "middle_frame_index",
    "normalise_imagenet",
    "percentile_to_unit",
    "percentile_window",
    "rgb_to_unit",
    "window_to_unit",
]

log = logging.getLogger(__name__)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
"""Per-channel constants of torchvision's ImageNet weights (R, G, B)."""

LUMA_WEIGHTS: tuple[float, float, float] = (0.299, 0.587, 0.114)
"""RGB to grey: ITU-R BT.601 luma, the same weights as Y of DICOM YBR_FULL (PS3.3 C.7.6.3.1.2)."""

PERCENTILE_WINDOW: tuple[float, float] = (0.5, 99.5)
"""Percentiles (of the frame's non-padding pixels) that map to black and white when no
window is stored: wide enough to keep anatomy, narrow enough that a few hot pixels or
metal do not compress everything else into a grey band."""

DEFAULT_DEFER_SIZE = "1 MB"
# file_*: elements larger than this are read only when used. A non-image object (an
# encapsulated PDF of 50 MB) is then skipped without reading its payload; an image's Pixel
# Data costs one more open() when decoded (~20 us).

NON_IMAGE_SOP_CLASS_FAMILIES: tuple[tuple[str, str], ...] = (
    # (text in pydicom's SOP class name, why it is not a picture to embed)
    ("SR Storage", "structured report"),
    ("Key Object Selection", "key object selection document"),
    ("Presentation State", "presentation state"),
    ("Encapsulated", "encapsulated document"),
    ("Waveform", "waveform"),
    ("Raw Data", "raw data"),
    ("Spectroscopy", "spectroscopy data"),
    ("RT Plan", "RT plan"),
    ("RT Ion Plan", "RT plan"),
    ("RT Structure Set", "RT structure set"),
    ("Treatment Record", "RT treatment record"),
    ("RT Dose", "RT dose grid, not an acquired image"),
    ("Segmentation", "segmentation label map, not an acquired image"),
    ("Registration", "spatial registration"),
    ("Fiducials", "spatial fiducials"),
    ("Real World Value Mapping", "real world value mapping"),
    ("Measurements Storage", "measurements"),
    ("Surface Scan", "surface scan"),
    ("Tractography", "tractography results"),
    ("Media Storage Directory", "DICOMDIR"),
)
"""SOP classes skipped even when they carry Pixel Data (RT Dose, Segmentation): matched as
substrings of the standard's SOP class name. Anything else with pixel data is an image."""

PREFERRED_PLUGINS: dict[str, str] = {
    # transfer syntax UID -> pydicom decoding plugin tried first (fastest measured on one core,
    # docs/images.md); on failure every installed plugin is tried in pydicom's own order.
    uid.JPEGBaseline8Bit: "pillow",  # 0.8 ms vs gdcm 3.5 ms (256 x 256 RGB)
    uid.JPEGExtended12Bit: "pillow",
    uid.JPEGLSLossless: "pyjpegls",  # 1.1 ms vs gdcm 1.4 ms (128 x 128, 16 bit)
    uid.JPEGLSNearLossless: "pyjpegls",
    uid.JPEG2000Lossless: "pylibjpeg",  # 31 ms vs gdcm 33, pillow 38 (512 x 512 CT)
    uid.JPEG2000: "pylibjpeg",  # 7 ms vs pillow 12, gdcm 13 (512 x 512 CT, lossy)
    uid.HTJ2KLossless: "pylibjpeg",
    uid.HTJ2KLosslessRPCL: "pylibjpeg",
    uid.HTJ2K: "pylibjpeg",
    uid.RLELossless: "pylibjpeg",  # 0.6 ms vs pydicom's numpy decoder 4.1 ms (800 x 600 RGB)
}

DECODER_PACKAGES: dict[str, str] = {
    # transfer syntax UID -> the PyPI packages whose pydicom plugin decodes it (licence)
    uid.RLELossless: "none needed (pydicom); pylibjpeg-rle (MIT) is faster",
    uid.JPEGBaseline8Bit: "pillow (MIT-CMU) or python-gdcm (Apache-2.0/BSD)",
    uid.JPEGExtended12Bit: "8-bit: pillow or python-gdcm; 12-bit: only pylibjpeg-libjpeg (GPL-3.0)",
    uid.JPEGLossless: "python-gdcm (Apache-2.0/BSD) or pylibjpeg-libjpeg (GPL-3.0)",
    uid.JPEGLosslessSV1: "python-gdcm (Apache-2.0/BSD) or pylibjpeg-libjpeg (GPL-3.0)",
    uid.JPEGLSLossless: "pyjpegls (MIT) or python-gdcm",
    uid.JPEGLSNearLossless: "pyjpegls (MIT) or python-gdcm",
    uid.JPEG2000Lossless: "pylibjpeg-openjpeg (MIT), pillow or python-gdcm",
    uid.JPEG2000: "pylibjpeg-openjpeg (MIT), pillow or python-gdcm",
    uid.HTJ2KLossless: "pylibjpeg-openjpeg (MIT)",
    uid.HTJ2KLosslessRPCL: "pylibjpeg-openjpeg (MIT)",
    uid.HTJ2K: "pylibjpeg-openjpeg (MIT)",
}

_PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_MAX_PERCENTILE_SAMPLES = 1 << 20
# Above ~1 Mpixel the percentile window is estimated from a regular grid of about this many
# pixels (every k-th row and column): np.percentile is O(n) but ~8 ns per pixel, so a
# 4k x 4k radiograph would spend 130 ms there; the grid estimate differs by well under 1 %
# of the window.


class NotAnImage(Exception):
    """The dataset holds nothing to picture (no pixel data, or a non-image SOP class).

    The worker records :attr:`reason` and does not retry.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PixelDecodeError(Exception):
    """The dataset claims an image but its pixel data cannot be turned into one.

    Truncated or corrupt data, missing Image Pixel module elements, decoder failures. The
    worker records :attr:`reason` (one short line) and retries.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class MissingDecoder(PixelDecodeError):
    """No installed plugin decodes this transfer syntax; :attr:`reason` names what to install."""


class UnreadableDataset(PixelDecodeError):
    """pydicom read no data element at all (an empty data set), so whether the file holds an
    image is unknown: not :class:`NotAnImage`. Reading again gives the same; the worker
    records :attr:`reason` and does not retry."""


# --------------------------------------------------------------------------- pure maths


def window_to_unit(
    pixels: np.ndarray,
    center: float,
    width: float,
    *,
    function: Literal["LINEAR", "LINEAR_EXACT", "SIGMOID"] = "LINEAR",
) -> np.ndarray:
    """Map values through a DICOM VOI window onto [0, 1] (method.md B.1, PS3.3 C.11.2.1.2).

    With output range ``[0, 1]`` the standard's formulas become, for centre c and width w:

    * ``LINEAR`` (C.11.2.1.2.1): ``0`` if ``x <= c - 0.5 - (w - 1) / 2``, ``1`` if
      ``x > c - 0.5 + (w - 1) / 2``, else ``(x - (c - 0.5)) / (w - 1) + 0.5``. Requires
      ``w >= 1``; ``w == 1`` is a threshold at ``c - 0.5``.
    * ``LINEAR_EXACT`` (C.11.2.1.3.2): ``clip((x - c) / w + 0.5, 0, 1)``, ``w > 0``.
    * ``SIGMOID`` (C.11.2.1.3.1): ``1 / (1 + exp(-4 (x - c) / w))``, ``w > 0``.

    Parameters
    ----------
    pixels : ndarray of any shape
        Values after the modality transform (e.g. Hounsfield units).
    center, width : float
        Window Center and Window Width.
    function : {"LINEAR", "LINEAR_EXACT", "SIGMOID"}
        VOI LUT Function (0028,1056).

    Returns
    -------
    ndarray of the same shape, float32, values in [0, 1].
    """
    x = np.asarray(pixels, dtype=np.float32)
    if function == "LINEAR":
        if not width >= 1:
            raise ValueError(f"LINEAR window width must be >= 1, got {width}")
        if width == 1:
            return (x > center - 0.5).astype(np.float32)
        # the clip reproduces both outer branches exactly: the middle formula is 0 and 1 at
        # the two thresholds
        unit = (x - np.float32(center - 0.5)) * np.float32(1.0 / (width - 1)) + np.float32(0.5)
    elif function == "LINEAR_EXACT":
        if not width > 0:
            raise ValueError(f"LINEAR_EXACT window width must be > 0, got {width}")
        unit = (x - np.float32(center)) * np.float32(1.0 / width) + np.float32(0.5)
    elif function == "SIGMOID":
        if not width > 0:
            raise ValueError(f"SIGMOID window width must be > 0, got {width}")
        with np.errstate(over="ignore"):  # exp overflow is 0 after the division, as it should be
            return (1.0 / (1.0 + np.exp(-4.0 * (x - np.float32(center)) / np.float32(width)))
                    ).astype(np.float32)
    else:
        raise ValueError(f"unknown VOI LUT function {function!r}")
    return np.clip(unit, 0.0, 1.0, out=unit)


def percentile_window(
    values: np.ndarray,
    *,
    percentiles: tuple[float, float] = PERCENTILE_WINDOW,
    exclude: np.ndarray | None = None,
) -> tuple[float, float] | None:
    """The robust window's bounds: two percentiles of the image (method.md B.1).

    The same numbers as ``np.percentile(values[keep], percentiles)`` (linear interpolation
    between order statistics), ``keep`` being the pixels that are neither excluded nor
    non-finite. Integer images whose range is below 2**20 find the two order statistics in a
    cumulative histogram (``np.bincount``), which is exact and 3-4 times faster than the
    partition ``np.percentile`` does on a 512 x 512 slice. Images above about 1 Mpixel
    estimate both from a regular grid (every k-th row and column, about 2**20 pixels).

    Parameters
    ----------
    values : ndarray of shape (rows, columns)
        Stored or modality values.
    percentiles : (low, high)
        In percent, default :data:`PERCENTILE_WINDOW` (0.5, 99.5).
    exclude : bool ndarray of shape (rows, columns), optional
        Pixels left out (Pixel Padding Value: outside the scan's field of view).

    Returns
    -------
    (p_low, p_high), or None when no pixel is left.
    """
    values = np.asarray(values)
    stride = max(1, math.ceil(math.sqrt(values.size / _MAX_PERCENTILE_SAMPLES)))
    if values.ndim == 2 and stride > 1:
        values = values[::stride, ::stride]
        exclude = None if exclude is None else exclude[::stride, ::stride]
    keep = None if exclude is None else ~exclude
    if not np.issubdtype(values.dtype, np.integer):
        finite = np.isfinite(values)
        if not finite.all():
            keep = finite if keep is None else keep & finite
    sample = values.ravel() if keep is None else values[keep]
    if sample.size == 0:
        return None
    if np.issubdtype(sample.dtype, np.integer):
        bounds = _integer_percentiles(sample, percentiles)
        if bounds is not None:
            return bounds
    low, high = np.percentile(sample, percentiles)
    return float(low), float(high)


def _integer_percentiles(sample: np.ndarray,
                         percentiles: tuple[float, float]) -> tuple[float, float] | None:
    """np.percentile (linear) of a 1-D integer array from its histogram; None if the range
    is too wide for one."""
    smallest, largest = int(sample.min()), int(sample.max())
    if largest - smallest >= 1 << 20:
        return None
    offset = 0 if smallest >= 0 else smallest
    shifted = sample if offset == 0 else sample.astype(np.int64) - offset
    cumulative = np.cumsum(np.bincount(shifted))
    last = int(cumulative[-1]) - 1

    def order_statistic(rank: int) -> int:
        # the value of the rank-th smallest element (0-based)
        return int(np.searchsorted(cumulative, rank, side="right")) + offset

    bounds = []
    for percent in percentiles:
        position = last * percent / 100.0
        below = math.floor(position)
        value_below = order_statistic(below)
        value_above = order_statistic(min(below + 1, last))
        bounds.append(value_below + (position - below) * (value_above - value_below))
    return bounds[0], bounds[1]


def percentile_to_unit(
    pixels: np.ndarray,
    *,
    percentiles: tuple[float, float] = PERCENTILE_WINDOW,
    exclude: np.ndarray | None = None,
) -> np.ndarray:
    """Robust window: the low/high percentiles of the image map to 0 and 1 (method.md B.1).

    ``y = clip((x - p_low) / (p_high - p_low), 0, 1)``, ``p`` from :func:`percentile_window`.
    A constant image (``p_high == p_low``) maps to 0; non-finite values map to 0.

    Parameters
    ----------
    pixels : ndarray of shape (rows, columns)
        Values after the modality transform.
    percentiles, exclude
        As :func:`percentile_window`.

    Returns
    -------
    ndarray of shape (rows, columns), float32, values in [0, 1].
    """
    bounds = percentile_window(pixels, percentiles=percentiles, exclude=exclude)
    return _stretch_to_unit(pixels, bounds)


def _stretch_to_unit(pixels: np.ndarray, bounds: tuple[float, float] | None) -> np.ndarray:
    """``clip((x - low) / (high - low), 0, 1)`` in float32; zeros without a valid range."""
    x = np.asarray(pixels, dtype=np.float32)
    if bounds is None or not bounds[1] > bounds[0]:
        return np.zeros(x.shape, dtype=np.float32)
    low, high = bounds
    unit = (x - np.float32(low)) * np.float32(1.0 / (high - low))
    np.clip(unit, 0.0, 1.0, out=unit)
    if not np.issubdtype(x.dtype, np.integer):
        # NaN survives clip (+-inf were clipped already)
        np.nan_to_num(unit, copy=False, nan=0.0)
    return unit


def rgb_to_unit(rgb: np.ndarray, *, max_value: float) -> np.ndarray:
    """Grey in [0, 1] from colour samples: Rec. 601 luma over the largest value (method.md B.1).

    ``y = (0.299 R + 0.587 G + 0.114 B) / max_value`` (:data:`LUMA_WEIGHTS`).

    Parameters
    ----------
    rgb : ndarray of shape (rows, columns, 3)
        R, G, B samples (YBR already converted to RGB).
    max_value : float
        The value of full intensity, ``2**BitsStored - 1`` (255 for 8-bit samples).

    Returns
    -------
    ndarray of shape (rows, columns), float32, values in [0, 1].
    """
    weights = np.asarray(LUMA_WEIGHTS, dtype=np.float32) / np.float32(max_value)
    grey = np.asarray(rgb, dtype=np.float32) @ weights
    return np.clip(grey, 0.0, 1.0, out=grey)


def fit_to_square(unit: np.ndarray, *, size: int = 224) -> np.ndarray:
    """Resize keeping the aspect ratio, centred on a ``size`` x ``size`` square of 0.0.

    The longer side becomes ``size`` and the shorter ``max(1, floor(n * size / longer + 0.5))``.
    Resampling is Pillow's bilinear filter on float32 ("F" mode) which widens its support when
    shrinking (antialiasing); chosen over ``torch.nn.functional.interpolate(antialias=True)``
    by measurement (docs/images.md) and because it needs no torch in decode workers. The
    image is placed at row ``(size - h) // 2``, column ``(size - w) // 2``; the rest is 0.0,
    the value of black before normalisation.

    Parameters
    ----------
    unit : ndarray of shape (rows, columns)
        Grey values in [0, 1].
    size : int
        Side of the output square.

    Returns
    -------
    ndarray of shape (size, size), float32.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    rows, columns = unit.shape
    scale = size / max(rows, columns)
    new_rows = max(1, min(size, int(math.floor(rows * scale + 0.5))))
    new_columns = max(1, min(size, int(math.floor(columns * scale + 0.5))))
    image = np.ascontiguousarray(unit, dtype=np.float32)
    if (new_rows, new_columns) != (rows, columns):
        resized = Image.fromarray(image).resize(
            (new_columns, new_rows), resample=Image.Resampling.BILINEAR)
        image = np.asarray(resized, dtype=np.float32)
    if (new_rows, new_columns) == (size, size):
        return image if image.flags.writeable else image.copy()
    square = np.zeros((size, size), dtype=np.float32)
    top, left = (size - new_rows) // 2, (size - new_columns) // 2
    square[top:top + new_rows, left:left + new_columns] = image
    return square


def normalise_imagenet(grey: np.ndarray) -> np.ndarray:
    """Grey repeated to 3 channels and normalised: ``(y - mean_c) / std_c`` (method.md B.1).

    Parameters
    ----------
    grey : ndarray of shape (..., size, size)
        Grey values in [0, 1]; leading dimensions (frames) are kept.

    Returns
    -------
    ndarray of shape (..., 3, size, size), float32, channel order R, G, B
    (:data:`IMAGENET_MEAN`, :data:`IMAGENET_STD`).
    """
    grey = np.asarray(grey, dtype=np.float32)
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)
    std = np.asarray(IMAGENET_STD, dtype=np.float32)
    out = np.empty(grey.shape[:-2] + (3,) + grey.shape[-2:], dtype=np.float32)
    for channel in range(3):
        np.subtract(grey, mean[channel], out=out[..., channel, :, :])
        out[..., channel, :, :] /= std[channel]
    return out


def middle_frame_index(n_frames: int) -> int:
    """Index of the frame :func:`dataset_to_image` uses: ``n_frames // 2`` (0-based).

    For an even count this is the later of the two central frames (index 2 of 4).
    """
    if n_frames < 1:
        raise ValueError(f"n_frames must be >= 1, got {n_frames}")
    return n_frames // 2


# --------------------------------------------------------------------------- DICOM side


def check_is_image(ds: Dataset) -> None:
    """Raise :class:`NotAnImage` unless ``ds`` is an image we should embed.

    Not an image: a SOP class of :data:`NON_IMAGE_SOP_CLASS_FAMILIES`, or no Pixel Data,
    Float Pixel Data or Double Float Pixel Data at the top level. A missing or unknown SOP
    Class UID with pixel data counts as an image.
    """
    if not ds.keys():
        size = _file_size(ds)
        raise UnreadableDataset(
            "pydicom read an empty data set" + (f" from a {size:,}-byte file" if size else "")
            + ": its elements could not be parsed, so it is unknown whether it holds pixel data")
    sop_class = ds.get("SOPClassUID")
    if sop_class:
        name = uid.UID(str(sop_class)).name
        for family, why in NON_IMAGE_SOP_CLASS_FAMILIES:
            if family in name:
                raise NotAnImage(f"{name} ({sop_class}): {why}")
    if not any(keyword in ds for keyword in _PIXEL_DATA_KEYWORDS):
        what = uid.UID(str(sop_class)).name if sop_class else "no SOP Class UID"
        raise NotAnImage(f"no pixel data ({what})")


def _file_size(ds: Dataset) -> int | None:
    filename = getattr(ds, "filename", None)
    try:
        return os.path.getsize(filename) if isinstance(filename, str) else None
    except OSError:
        return None


def _lut_item(ds: Dataset, keyword: str) -> Dataset | None:
    """The first item of a Modality or VOI LUT Sequence when it can be applied: a LUT
    Descriptor of three values and LUT Data.

    Some writers (LEADTOOLS-based ones; dwv's test files have them) put an item whose
    LUT Descriptor and LUT Data are empty. Such an item maps nothing; PS3.3 C.11.1 and
    C.11.2 then leave the Rescale and Window attributes, so it counts as absent (pydicom's
    ``apply_modality_lut`` would fail on it with a TypeError).
    """
    items = ds.get(keyword)
    if not items:
        return None
    item = items[0]
    descriptor = item.get("LUTDescriptor")
    data = item.get("LUTData")
    try:
        usable = descriptor is not None and len(descriptor) == 3 and data is not None \
            and len(data) > 0
    except TypeError:
        usable = False
    return item if usable else None


def _transfer_syntax(ds: Dataset) -> uid.UID:
    """The transfer syntax of the pixel data; guessed from how the file was read if absent.

    A missing (0002,0010) is common in files written without meta information. When the
    Pixel Data is native (not encapsulated) the encoding pydicom detected while reading is
    the transfer syntax; encapsulated data cannot be guessed.
    """
    file_meta = getattr(ds, "file_meta", None)
    tsyntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if tsyntax:
        return uid.UID(str(tsyntax))
    element = ds.get("PixelData") if "PixelData" in ds else None
    encapsulated = element is not None and getattr(element, "is_undefined_length", False)
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if encapsulated or implicit is None or little is None:
        raise PixelDecodeError("no Transfer Syntax UID (0002,0010) and the pixel data is "
                               "encapsulated or the encoding unknown")
    if implicit:
        return uid.ImplicitVRLittleEndian
    return uid.ExplicitVRLittleEndian if little else uid.ExplicitVRBigEndian


def _check_decoder(ds: Dataset, tsyntax: uid.UID) -> None:
    """Raise :class:`MissingDecoder` when no installed plugin can decode ``tsyntax``."""
    hint = DECODER_PACKAGES.get(tsyntax, "no pydicom plugin exists for it")
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        raise MissingDecoder(
            f"no decoder for transfer syntax {tsyntax.name} ({tsyntax}): {hint}") from None
    if not decoder.is_available:
        raise MissingDecoder(f"no decoder installed for {tsyntax.name}: install {hint}")
    bits_stored = ds.get("BitsStored")
    if (tsyntax == uid.JPEGExtended12Bit and isinstance(bits_stored, int) and bits_stored > 8
            and "pylibjpeg" not in decoder.available_plugins):
        # gdcm's and Pillow's wheels are built with 8-bit libjpeg only
        raise MissingDecoder("12-bit JPEG Extended needs pylibjpeg-libjpeg (GPL-3.0, optional); "
                             "pillow and python-gdcm decode 8-bit only")


def _short_reason(exc: BaseException) -> str:
    """``Type: first line of the message``, at most 200 characters, for the worker's record."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    # pydicom's "all plugins failed" message puts the useful part on the next lines
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if len(lines) > 1 and message.endswith(":"):
        message = message + " " + "; ".join(lines[1:])
    reason = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return reason if len(reason) <= 200 else reason[:197] + "..."


def decode_frames(ds: Dataset, *, index: int | None) -> np.ndarray:
    """Decoded pixel data of one frame (``index``) or all frames (``None``).

    Tries the plugin in :data:`PREFERRED_PLUGINS` first, then all installed plugins.

    Returns
    -------
    ndarray of shape (rows, columns[, samples]) for one frame, or
    (frames, rows, columns[, samples]) when ``index`` is None; YBR converted to RGB.

    Raises
    ------
    MissingDecoder
        No installed plugin decodes the transfer syntax.
    PixelDecodeError
        Anything else that goes wrong (truncated data, missing Rows, decoder errors).
    """
    tsyntax = _transfer_syntax(ds)
    _check_decoder(ds, tsyntax)
    decoder = get_decoder(tsyntax)
    preferred = PREFERRED_PLUGINS.get(tsyntax, "")
    attempts = [preferred, ""] if preferred in decoder.available_plugins else [""]
    for attempt, plugin in enumerate(attempts):
        try:
            with warnings.catch_warnings():
                # pydicom warns about trailing padding and odd lengths it then handles
                warnings.simplefilter("ignore")
                # the decoder takes the transfer syntax from itself, not from ds.file_meta,
                # so a guessed syntax needs no change to ds
                frames, _ = decoder.as_array(ds, index=index, validate=True,
                                             decoding_plugin=plugin, **as_pixel_options(ds))
                return frames
        except Exception as exc:  # noqa: BLE001 - every failure becomes a recorded reason
            if attempt + 1 < len(attempts):
                log.debug("plugin %s failed on %s, trying all: %s", plugin, tsyntax.name, exc)
                continue
            raise PixelDecodeError(_short_reason(exc)) from exc
    raise AssertionError("unreachable")


def _frame_value(ds: Dataset, frame_index: int, sequence: str, keyword: str) -> object:
    """An attribute of one frame: per-frame functional group, shared group, then top level.

    Enhanced multi-frame objects (PS3.3 C.7.6.16) keep Rescale and Window in
    ``PixelValueTransformationSequence`` and ``FrameVOILUTSequence`` of the functional groups.
    """
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame_index),
                          ("SharedFunctionalGroupsSequence", 0)):
        items = ds.get(groups)
        if items and index < len(items):
            macro = items[index].get(sequence)
            if macro and keyword in macro[0]:
                return macro[0][keyword].value
    return ds.get(keyword)


def _first_number(value: object) -> float | None:
    """The first value of a DS/IS/FD element as a finite float, or None (total: never raises)."""
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        if len(value) == 0:
            return None
        value = value[0]
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _padding_mask(stored: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """Pixels equal to Pixel Padding Value (or within its range limit), in stored values."""
    value = _first_number(ds.get("PixelPaddingValue"))
    if value is None:
        return None
    limit = _first_number(ds.get("PixelPaddingRangeLimit"))
    if limit is None:
        return stored == value
    low, high = min(value, limit), max(value, limit)
    return (stored >= low) & (stored <= high)


def _rescale(ds: Dataset, frame_index: int) -> tuple[float, float] | None:
    """(slope, intercept) of the modality transform, or None when a Modality LUT Sequence
    replaces it. Missing or unreadable values count as 1 and 0, and so does a slope of 0
    (invalid: it would flatten the image)."""
    if _lut_item(ds, "ModalityLUTSequence") is not None:
        return None
    slope = _first_number(
        _frame_value(ds, frame_index, "PixelValueTransformationSequence", "RescaleSlope"))
    intercept = _first_number(
        _frame_value(ds, frame_index, "PixelValueTransformationSequence", "RescaleIntercept"))
    return (1.0 if slope is None or slope == 0 else slope,
            0.0 if intercept is None else intercept)


def _modality_transform(stored: np.ndarray, ds: Dataset, frame_index: int) -> np.ndarray:
    """Stored values to modality values (PS3.3 C.11.1), float32."""
    affine = _rescale(ds, frame_index)
    if affine is None:
        return apply_modality_lut(stored, ds).astype(np.float32)
    slope, intercept = affine
    values = stored.astype(np.float32)
    # float32 rather than pydicom's float64: same values to ~1e-7 relative, half the memory
    # traffic for the steps that follow
    if slope != 1.0:
        values *= np.float32(slope)
    if intercept != 0.0:
        values += np.float32(intercept)
    return values


def _voi_to_unit(values: np.ndarray, stored: np.ndarray, ds: Dataset,
                 frame_index: int) -> np.ndarray:
    """Modality values to [0, 1]: stored window, else VOI LUT Sequence, else percentiles."""
    center = _first_number(_frame_value(ds, frame_index, "FrameVOILUTSequence", "WindowCenter"))
    width = _first_number(_frame_value(ds, frame_index, "FrameVOILUTSequence", "WindowWidth"))
    function = str(_frame_value(ds, frame_index, "FrameVOILUTSequence", "VOILUTFunction")
                   or "LINEAR").strip().upper()
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        function = "LINEAR"
    if center is not None and width is not None and (
            width >= 1.0 if function == "LINEAR" else width > 0.0):
        return window_to_unit(values, center, width, function=function)  # type: ignore[arg-type]
    if (lut_item := _lut_item(ds, "VOILUTSequence")) is not None:
        bits = int(lut_item.LUTDescriptor[2])
        indices = np.rint(values).astype(np.int64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mapped = apply_voi(indices, ds)
        return (mapped.astype(np.float32) / np.float32(2 ** bits - 1)).clip(0.0, 1.0)
    exclude = _padding_mask(stored, ds)
    affine = _rescale(ds, frame_index)
    if affine is None or not np.issubdtype(stored.dtype, np.integer):
        return percentile_to_unit(values, exclude=exclude)
    # percentiles of the stored integers (histogram, fast) carried through the rescale; a
    # negative slope reverses the order, so the complementary percentiles are taken
    slope, intercept = affine
    low_percent, high_percent = PERCENTILE_WINDOW
    if slope < 0:
        low_percent, high_percent = 100.0 - high_percent, 100.0 - low_percent
    bounds = percentile_window(stored, percentiles=(low_percent, high_percent), exclude=exclude)
    if bounds is None:
        return np.zeros(values.shape, dtype=np.float32)
    low, high = sorted(bound * slope + intercept for bound in bounds)
    return _stretch_to_unit(values, (low, high))


def _palette_grey_lut(ds: Dataset) -> tuple[np.ndarray, int]:
    """Grey value in [0, 1] of every palette entry, and the first mapped index (C.7.6.3.1.5).

    The three colour LUTs are expanded once by pydicom's ``apply_color_lut`` (segmented
    tables included), then turned into one grey LUT, so each pixel costs one lookup.
    Full intensity is ``2**bits - 1`` for the descriptor's bits, except that a 16-bit table
    whose entries never exceed 255 is read as 8-bit (writers that put 8-bit values in 16-bit
    entries; taken at face value they would give a black image).
    """
    descriptor = ds.RedPaletteColorLookupTableDescriptor
    n_entries = int(descriptor[0]) or 2 ** 16
    first_index = int(descriptor[1])
    source = ds
    red = ds.get("RedPaletteColorLookupTableData")
    if (red is not None and _transfer_syntax(ds) == uid.ExplicitVRBigEndian
            and len(red) == 2 * n_entries):
        # pydicom 3.0.2 reads non-segmented OW LUT data as little endian whatever the
        # transfer syntax; hand it little-endian bytes
        source = Dataset()
        for colour in ("Red", "Green", "Blue"):
            keyword = f"{colour}PaletteColorLookupTableData"
            setattr(source, f"{colour}PaletteColorLookupTableDescriptor",
                    ds[f"{colour}PaletteColorLookupTableDescriptor"].value)
            setattr(source, keyword, np.frombuffer(ds[keyword].value, dtype=">u2")
                    .astype("<u2").tobytes())
        source.PhotometricInterpretation = "PALETTE COLOR"
        source.file_meta = pydicom.dataset.FileMetaDataset()
        source.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    entries = np.arange(first_index, first_index + n_entries, dtype=np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = apply_color_lut(entries, source)[:, :3]
    full_scale = float(np.iinfo(table.dtype).max)
    if table.dtype == np.uint16 and table.max() <= 255:
        full_scale = 255.0
    return rgb_to_unit(table, max_value=full_scale), first_index


def frame_to_unit(frame: np.ndarray, ds: Dataset, *, frame_index: int = 0) -> np.ndarray:
    """One decoded frame to grey in [0, 1], black = 0 (method.md B.1; steps in the module doc).

    Parameters
    ----------
    frame : ndarray of shape (rows, columns) or (rows, columns, 3)
        Decoded samples (:func:`decode_frames`), colour already RGB.
    ds : Dataset
        The dataset the frame came from (photometric interpretation, rescale, window, LUTs).
    frame_index : int
        Which frame it is, for enhanced multi-frame functional groups.

    Returns
    -------
    ndarray of shape (rows, columns), float32, values in [0, 1].
    """
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if frame.ndim == 3:
        if frame.shape[-1] != 3:
            raise PixelDecodeError(f"unsupported samples per pixel: {frame.shape[-1]}")
        bits = ds.get("BitsStored") or ds.get("BitsAllocated") or 8
        return rgb_to_unit(frame, max_value=float(2 ** int(bits) - 1))
    if photometric == "PALETTE COLOR":
        grey_lut, first_index = _palette_grey_lut(ds)
        indices = np.clip(frame.astype(np.int64) - first_index, 0, grey_lut.size - 1)
        return grey_lut[indices]
    values = _modality_transform(frame, ds, frame_index)
    unit = _voi_to_unit(values, frame, ds, frame_index)
    if photometric == "MONOCHROME1":
        np.subtract(1.0, unit, out=unit)
    return unit


def _number_of_frames(ds: Dataset) -> int:
    try:
        return max(1, int(get_nr_frames(ds, warn=False)))
    except (TypeError, ValueError):
        return 1


def _with_reason(step: Callable[[], np.ndarray]) -> np.ndarray:
    """Run ``step()``; unexpected errors become :class:`PixelDecodeError` with a short reason."""
    try:
        return step()
    except (NotAnImage, PixelDecodeError):
        raise
    except Exception as exc:  # noqa: BLE001
        raise PixelDecodeError(_short_reason(exc)) from exc


def dataset_to_image(ds: Dataset, *, size: int = 224) -> np.ndarray:
    """The network input of one image: middle frame, ImageNet-normalised (method.md B.1).

    Multi-frame objects use frame :func:`middle_frame_index` (``n_frames // 2``): for a
    volume or a cine loop it is the frame most likely to show the structure of interest,
    and only that frame is decoded. Use :func:`dataset_to_frames` for all frames.

    Parameters
    ----------
    ds : Dataset
        A dataset as read by pydicom (file meta with the Transfer Syntax UID).
    size : int
        Side of the square output (224 for DenseNet121).

    Returns
    -------
    ndarray of shape (3, size, size), float32, finite.

    Raises
    ------
    NotAnImage
        Non-image SOP class or no pixel data; ``.reason`` says which.
    PixelDecodeError
        Corrupt or undecodable pixel data (:class:`MissingDecoder`: no plugin installed).
    """
    check_is_image(ds)

    def step() -> np.ndarray:
        index = middle_frame_index(_number_of_frames(ds))
        frame = decode_frames(ds, index=index)
        grey = fit_to_square(frame_to_unit(frame, ds, frame_index=index), size=size)
        return normalise_imagenet(grey)

    return _with_reason(step)


def dataset_to_frames(ds: Dataset, *, size: int = 224) -> np.ndarray:
    """Every frame as network input (method.md B.1); a single-frame image gives 1 frame.

    Each frame is windowed with its own functional-group values (or its own percentiles).

    Returns
    -------
    ndarray of shape (frames, 3, size, size), float32, finite.

    Raises
    ------
    NotAnImage, PixelDecodeError
        As :func:`dataset_to_image`.
    """
    check_is_image(ds)

    def step() -> np.ndarray:
        n_frames = _number_of_frames(ds)
        decoded = decode_frames(ds, index=None)
        if n_frames == 1:
            decoded = decoded[np.newaxis]
        grey = np.stack([fit_to_square(frame_to_unit(frame, ds, frame_index=i), size=size)
                         for i, frame in enumerate(decoded)])
        return normalise_imagenet(grey)

    return _with_reason(step)


def _read(path: str | os.PathLike[str]) -> Dataset:
    try:
        ds = pydicom.dcmread(path, force=True, defer_size=DEFAULT_DEFER_SIZE)
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise PixelDecodeError(f"unreadable DICOM file: {_short_reason(exc)}") from exc
    return ds if ds.keys() else _read_header_then_pixels(path)


_ITEM, _SEQUENCE_DELIMITER = (0xFFFE, 0xE000), (0xFFFE, 0xE0DD)


def _read_header_then_pixels(path: str | os.PathLike[str]) -> Dataset:
    """A file pydicom's full read returns as an empty data set: read the header up to the
    pixel data, then the pixel data element from its offset.

    Seen in the wild: encapsulated Pixel Data whose file ends after its last complete
    fragment, without the sequence delimiter. pydicom meets the end of the file while looking
    for the delimiter and gives up on the whole data set (``pydicom_data/
    emri_small_jpeg_2k_lossless_too_short.dcm`` of ../shared/data/dicom), though the header
    reads, as it does for the ingest's header reader. The complete fragments are decoded;
    anything else raises :class:`UnreadableDataset` saying what was found.
    """
    with open(path, "rb") as handle:
        try:
            header = pydicom.dcmread(handle, force=True, stop_before_pixels=True)
        except Exception as exc:  # noqa: BLE001
            header, exc_reason = None, _short_reason(exc)
        offset = handle.tell()
        data = handle.read()
    size = offset + len(data)
    if header is None or not header.keys():
        raise UnreadableDataset(
            f"pydicom read an empty data set from a {size:,}-byte file, and no header either"
            + (f" ({exc_reason})" if header is None else ""))
    prefix = (f"pydicom's full read of this {size:,}-byte file is an empty data set though its "
              f"header ({len(header.keys())} elements) reads")
    implicit, little = header.original_encoding
    if len(data) < 8 or not little:
        raise UnreadableDataset(f"{prefix}; no pixel data element follows it")
    group, element = struct.unpack_from("<HH", data, 0)
    if implicit:
        length, value_at = struct.unpack_from("<I", data, 4)[0], 8
    else:
        vr = data[4:6]
        if vr in (b"OB", b"OW", b"OF", b"OD", b"OL", b"UN"):
            length, value_at = struct.unpack_from("<I", data, 8)[0], 12
        else:
            length, value_at = struct.unpack_from("<H", data, 6)[0], 8
    if (group, element) != (0x7FE0, 0x0010):
        raise UnreadableDataset(f"{prefix}; after it comes ({group:04X},{element:04X}), "
                                "not the pixel data")
    if length != 0xFFFFFFFF:
        raise UnreadableDataset(f"{prefix}; its Pixel Data claims {length:,} bytes, "
                                f"{len(data) - value_at:,} remain")
    pos, items = value_at, 0
    while pos + 8 <= len(data):
        tag = struct.unpack_from("<HH", data, pos)
        item_length = struct.unpack_from("<I", data, pos + 4)[0]
        if tag == _SEQUENCE_DELIMITER:
            break
        if tag != _ITEM:
            raise UnreadableDataset(f"{prefix}; pixel data item {items} has tag "
                                    f"({tag[0]:04X},{tag[1]:04X})")
        if pos + 8 + item_length > len(data):
            raise UnreadableDataset(f"{prefix}; pixel data item {items} claims "
                                    f"{item_length:,} bytes, {len(data) - pos - 8:,} remain")
        pos += 8 + item_length
        items += 1
    if items < 2:  # the Basic Offset Table item and at least one fragment
        raise UnreadableDataset(f"{prefix}; its encapsulated pixel data has no fragment")
    log.info("%s: decoding its %d complete pixel data items (no sequence delimiter)",
             path, items)
    header.PixelData = data[value_at:pos]
    header["PixelData"].VR = "OB"
    header["PixelData"].is_undefined_length = True
    return header


def file_to_image(path: str | os.PathLike[str], *, size: int = 224) -> np.ndarray:
    """:func:`dataset_to_image` of a file (read with ``force=True``; large elements deferred).

    Raises ``FileNotFoundError`` for a missing file; see :func:`dataset_to_image` otherwise.
    """
    return dataset_to_image(_read(path), size=size)


def file_to_frames(path: str | os.PathLike[str], *, size: int = 224) -> np.ndarray:
    """:func:`dataset_to_frames` of a file; shape (frames, 3, size, size)."""
    return dataset_to_frames(_read(path), size=size)


def describe_decoders(transfer_syntaxes: Sequence[str] | None = None) -> dict[str, str]:
    """Installed plugins per transfer syntax name, e.g. for a start-up log line."""
    result: dict[str, str] = {}
    for tsyntax in transfer_syntaxes or list(DECODER_PACKAGES):
        try:
            decoder = get_decoder(uid.UID(tsyntax))
        except NotImplementedError:
            result[uid.UID(tsyntax).name] = "none"
            continue
        result[uid.UID(tsyntax).name] = ", ".join(decoder.available_plugins) or "built in"
    return result
