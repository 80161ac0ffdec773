"""Read what the index needs from an encoded instance, without touching pixel data.

Two readers give the same JSON (``tests/test_dicom_header.py`` holds them to it on
every real file): a direct parser of little-endian datasets, which is what the
ingest path runs, and pydicom, used for everything else (big endian, deflate,
multi-byte character sets) and whenever the direct parser meets something odd.
"""

from __future__ import annotations

import base64
import datetime as dt
import math
import re
import struct
from dataclasses import dataclass
from functools import lru_cache
from io import BytesIO
from typing import Any

import pydicom
from pydicom.config import settings as pydicom_settings
from pydicom.datadict import dictionary_keyword, dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

# Values that do not follow their VR are indexed as read, not rejected: the
# tag parsers count and report them.
pydicom_settings.reading_validation_mode = pydicom.config.IGNORE

UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")
MAX_UID_LENGTH = 64
# Tolerant mode keeps an invalid UID as its raw text in SQL, where it is a key of a btree
# index (at most ~2,700 bytes an entry); a value longer than this is rejected in any mode.
MAX_TOLERATED_UID_LENGTH = 256

# rules of the defects that tolerant mode lets through (tolerated_defects.rule)
RULE_INVALID_UID = "invalid-uid"
RULE_SOP_INSTANCE_MISMATCH = "sop-instance-mismatch"
MAX_TEXT_LENGTH = 65536  # longer values are cut in the JSONB copy (the file keeps them whole)
MAX_INLINE_BINARY = 256
MAX_SEQUENCE_DEPTH = 8

# C-STORE failure statuses (PS3.4 B.2.3; the Cxxx "cannot understand" codes are ours to pick)
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_UNDECODABLE = 0xC210
STATUS_MISSING_UID = 0xC211
STATUS_MALFORMED_UID = 0xC212

_PIXEL_TAGS = {0x7FE00010, 0x7FE00008, 0x7FE00009}
_TEXT_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM",
             "UC", "UI", "UR", "UT"}
_SINGLE_VALUED_TEXT = {"LT", "ST", "UT", "UR"}
_BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN", "OB or OW", "US or OW", "US or SS or OW"}
_STRUCT_CODES = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "FL": "f", "FD": "d",
                 "UV": "Q", "SV": "q"}
_FAST_CHARSETS = {"": "latin-1", "ISO_IR 6": "latin-1", "ISO_IR 100": "latin-1",
                  "ISO_IR 192": "utf-8"}
_LONG_LENGTH_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR",
                    b"UT", b"SV", b"UV"}

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD


class InvalidInstance(ValueError):
    """The dataset cannot be indexed; ``status`` is the DICOM failure status to answer.

    ``sop_instance_uid``: the data set's SOP Instance UID as read, where there was one,
    so that the rejection can name the instance.
    """

    def __init__(self, status: int, reason: str, sop_instance_uid: str | None = None):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.sop_instance_uid = sop_instance_uid


@dataclass(frozen=True)
class InstanceHeader:
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    tags: dict[str, Any]
    # (rule, detail) of each defect tolerated while reading; empty for a valid instance
    defects: tuple[tuple[str, str], ...] = ()

    def text(self, keyword: str) -> str | None:
        value = self.tags.get(keyword)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is None or isinstance(value, (dict, list)):
            return None
        value = str(value).strip()
        return value or None

    def date(self, keyword: str) -> dt.date | None:
        return parse_da(self.text(keyword))

    def integer(self, keyword: str) -> int | None:
        value = self.text(keyword)
        try:
            number = int(float(value)) if value is not None else None
        except (ValueError, OverflowError):
            return None
        if number is None or not -(2**31) <= number < 2**31:
            return None
        return number


def parse_da(value: str | None) -> dt.date | None:
    """A DICOM DA (``YYYYMMDD``) as a date; anything else, None."""
    if not value or len(value) < 8 or not value[:8].isdigit():
        return None
    try:
        return dt.date(int(value[:4]), int(value[4:6]), int(value[6:8]))
    except ValueError:
        return None


# ---------------------------------------------------------------- value conversion


def _clean_text(value: str) -> str:
    # lone surrogates (from undecodable bytes) are not valid in JSONB
    return _cut_text(value.encode("utf-8", "replace").decode("utf-8"))


def _cut_text(value: str) -> str:
    """No NULs (JSONB refuses them), at most MAX_TEXT_LENGTH characters."""
    if "\x00" in value:
        value = value.replace("\x00", "")
    return value[:MAX_TEXT_LENGTH]


def _binary_json(value: bytes | None) -> Any:
    if not value:
        return None
    if len(value) <= MAX_INLINE_BINARY:
        return {"InlineBinary": base64.b64encode(value).decode()}
    return {"BulkDataLength": len(value)}


def _text_json(text: str, vr: str) -> Any:
    return _split_text(_clean_text(text), vr)


def _decoded_text_json(text: str, vr: str) -> Any:
    """:func:`_text_json` for text from ``bytes.decode(..., "replace")``, which cannot hold
    lone surrogates, so the UTF-8 round trip of :func:`_clean_text` is skipped."""
    return _split_text(_cut_text(text), vr)


def _split_text(text: str, vr: str) -> Any:
    if vr in _SINGLE_VALUED_TEXT:
        return text.rstrip(" ") or None
    if "\\" not in text:
        return text.strip(" ") or None
    return [part.strip(" ") or None for part in text.split("\\")]


def _number_json(value: Any, vr: str) -> Any:
    if vr == "AT":
        return f"{int(value):08X}"
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value


def convert_bytes(data: bytes, vr: str, little_endian: bool, encoding: str) -> Any:
    """One element's JSON value from its encoded bytes (text and binary-number VRs)."""
    if not data:
        return None
    if vr in _TEXT_VRS:
        return _decoded_text_json(data.decode(encoding, "replace").rstrip(" \x00"), vr)
    endian = "<" if little_endian else ">"
    if vr == "AT":
        if len(data) % 4:
            raise ValueError(f"AT value of {len(data)} bytes")
        words = struct.unpack(f"{endian}{len(data) // 2}H", data)
        values = [f"{words[i]:04X}{words[i + 1]:04X}" for i in range(0, len(words), 2)]
        return values[0] if len(values) == 1 else values
    code = _STRUCT_CODES.get(vr)
    if code is None:
        raise LookupError(vr)
    size = struct.calcsize(code)
    count = len(data) // size
    if count == 0 or count * size != len(data):
        raise ValueError(f"{vr} value of {len(data)} bytes")
    values = [_number_json(n, vr) for n in struct.unpack(f"{endian}{count}{code}", data)]
    return values[0] if count == 1 else values


@lru_cache(maxsize=65536)  # bounded: private tags from senders are open-ended
def _dictionary_entry(tag: int) -> tuple[str, str]:
    """(VR, keyword) from the data dictionary; ("UN", "") when unknown."""
    try:
        return dictionary_VR(tag), dictionary_keyword(tag)
    except KeyError:
        return "UN", ""


def _key(tag: int, keyword: str) -> str:
    return keyword or f"{tag:08X}"


_ELEMENT_INFO: dict[int, tuple[str, str, str, bool]] = {}
_ELEMENT_INFO_LIMIT = 100_000  # private tags are open-ended: a hostile sender cannot grow it


def _element_info(tag: int) -> tuple[str, str, str, bool]:
    """(JSON key, dictionary VR, keyword, not indexed) of a tag, memoised."""
    info = _ELEMENT_INFO.get(tag)
    if info is None:
        vr, keyword = _dictionary_entry(tag)
        info = (_key(tag, keyword), vr, keyword, tag & 0xFFFF == 0 or tag in _PIXEL_TAGS)
        if len(_ELEMENT_INFO) >= _ELEMENT_INFO_LIMIT:
            _ELEMENT_INFO.clear()
        _ELEMENT_INFO[tag] = info
    return info


_EXPLICIT_HEADER = struct.Struct("<HH2sH")  # group, element, VR, 16-bit length
_IMPLICIT_HEADER = struct.Struct("<HHI")  # group, element, 32-bit length
_LENGTH_32 = struct.Struct("<I")
_VR_NAMES = {vr.encode("ascii"): vr for vr in (
    "AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL "
    "UN UR US UT UV").split()}


# ---------------------------------------------------------------- direct parser


class _Unsupported(Exception):
    """The direct parser declines; pydicom reads the dataset instead."""


class _Truncated(_Unsupported):
    """The bytes end inside an element: corrupt, rejected rather than read leniently."""


class _LittleEndianReader:
    """Walks an explicit or implicit VR little-endian dataset up to the pixel data."""

    def __init__(self, buffer: bytes, implicit: bool):
        self.buffer = buffer
        self.implicit = implicit
        self.encoding = "latin-1"
        self.signed_pixels = False  # PixelRepresentation, for the "US or SS" elements

    def _header(self, pos: int, implicit: bool) -> tuple[int, str | None, int, int]:
        buf = self.buffer
        group, element = struct.unpack_from("<HH", buf, pos)
        tag = (group << 16) | element
        if implicit or group == 0xFFFE:
            (length,) = struct.unpack_from("<I", buf, pos + 4)
            return tag, None, length, pos + 8
        vr = buf[pos + 4:pos + 6]
        if vr in _LONG_LENGTH_VRS:
            (length,) = struct.unpack_from("<I", buf, pos + 8)
            return tag, vr.decode("ascii"), length, pos + 12
        if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
            raise _Unsupported(f"bad VR bytes {vr!r}")
        (length,) = struct.unpack_from("<H", buf, pos + 6)
        return tag, vr.decode("ascii"), length, pos + 8

    def read(self, pos: int, end: int, depth: int, implicit: bool) -> tuple[dict[str, Any], int]:
        """Elements from ``pos`` to ``end`` (or to an item delimiter); returns (json, new pos).

        The element header is decoded inline rather than by :meth:`_header`: this loop
        runs for every element of every stored instance (benchmarks/ingest/README.md).
        """
        out: dict[str, Any] = {}
        buf = self.buffer
        size = len(buf)
        while pos < end:
            if pos + 8 > size:
                raise _Truncated("truncated element header")
            if implicit:
                group, element, length = _IMPLICIT_HEADER.unpack_from(buf, pos)
                vr = None
                pos += 8
            else:
                group, element, vr_bytes, length = _EXPLICIT_HEADER.unpack_from(buf, pos)
                if group == 0xFFFE:
                    (length,) = _LENGTH_32.unpack_from(buf, pos + 4)
                    vr = None
                    pos += 8
                elif vr_bytes in _LONG_LENGTH_VRS:
                    (length,) = _LENGTH_32.unpack_from(buf, pos + 8)
                    vr = _VR_NAMES[vr_bytes]
                    pos += 12
                else:
                    vr = _VR_NAMES.get(vr_bytes)
                    if vr is None:
                        if not (65 <= vr_bytes[0] <= 90 and 65 <= vr_bytes[1] <= 90):
                            raise _Unsupported(f"bad VR bytes {vr_bytes!r}")
                        vr = vr_bytes.decode("ascii")
                    pos += 8
            tag = (group << 16) | element
            if tag == _ITEM_END:
                return out, pos
            if depth == 0 and tag in _PIXEL_TAGS:
                return out, size  # nothing after the pixels is indexed (as pydicom)
            key, dict_vr, keyword, not_indexed = _element_info(tag)
            if vr is None or (vr == "UN" and keyword):
                vr = dict_vr
                if vr.startswith("US or SS"):
                    vr = "SS" if self.signed_pixels else "US"
            if length == _UNDEFINED:
                if vr not in ("SQ", "UN") and not (implicit and vr not in _TEXT_VRS):
                    raise _Unsupported(f"undefined length on {vr}")
                # explicit UN with undefined length is an implicit-VR sequence (PS3.5 6.2.2)
                value, pos = self._sequence(pos, None, depth, implicit or vr == "UN")
            else:
                value_end = pos + length
                if value_end > size:
                    raise _Truncated("value runs past the end")
                if vr == "SQ":
                    value, _ = self._sequence(pos, value_end, depth, implicit)
                elif not_indexed:
                    value = None  # group lengths are not indexed
                elif vr in _TEXT_VRS:
                    text = buf[pos:value_end].decode(self.encoding, "replace").rstrip(" \x00")
                    value = _decoded_text_json(text, vr) if text else None
                    if tag == 0x00080005:
                        self._set_charset(value)
                elif vr in _STRUCT_CODES or vr == "AT":
                    value = convert_bytes(buf[pos:value_end], vr, True, self.encoding)
                    if tag == 0x00280103:
                        self.signed_pixels = value == 1
                else:
                    value = _binary_json(buf[pos:value_end])
                pos = value_end
            if not_indexed:
                continue
            out[key] = value
        return out, pos

    def _set_charset(self, value: Any) -> None:
        if isinstance(value, list):
            raise _Unsupported("code extensions")
        encoding = _FAST_CHARSETS.get((value or "").strip())
        if encoding is None:
            raise _Unsupported(f"character set {value!r}")
        self.encoding = encoding

    def _sequence(self, pos: int, end: int | None, depth: int, implicit: bool):
        items: list[Any] = []
        limit = len(self.buffer) if end is None else end
        while pos < limit:
            if pos + 8 > len(self.buffer):
                raise _Truncated("truncated sequence")
            group, element = struct.unpack_from("<HH", self.buffer, pos)
            tag = (group << 16) | element
            (length,) = struct.unpack_from("<I", self.buffer, pos + 4)
            pos += 8
            if tag == _SEQUENCE_END:
                return (items if depth < MAX_SEQUENCE_DEPTH else None), pos
            if tag != _ITEM:
                raise _Unsupported(f"unexpected tag {tag:08X} in a sequence")
            item_end = limit if length == _UNDEFINED else pos + length
            if item_end > limit:
                raise _Truncated("item runs past its sequence")
            item, pos = self.read(pos, item_end, depth + 1, implicit)
            items.append(item)
        if end is None:
            raise _Truncated("sequence without delimiter")
        return (items if depth < MAX_SEQUENCE_DEPTH else None), pos


def _read_meta(encoded: bytes) -> tuple[dict[str, Any], int]:
    if len(encoded) < 132 or encoded[128:132] != b"DICM":
        raise _Unsupported("no preamble")
    reader = _LittleEndianReader(encoded, implicit=False)
    pos, meta = 132, {}
    while pos + 8 <= len(encoded):
        group = struct.unpack_from("<H", encoded, pos)[0]
        if group != 0x0002:
            break
        tag, vr, length, value_pos = reader._header(pos, False)
        if length == _UNDEFINED or value_pos + length > len(encoded):
            raise _Unsupported("bad file meta")
        if vr in _TEXT_VRS:
            meta[_dictionary_entry(tag)[1] or f"{tag:08X}"] = convert_bytes(
                encoded[value_pos:value_pos + length], vr, True, "latin-1")
        pos = value_pos + length
    return meta, pos


def read_tags_direct(encoded: bytes) -> tuple[dict[str, Any], str]:
    """(tags, transfer syntax) by the direct parser; raises :class:`_Unsupported`."""
    meta, pos = _read_meta(encoded)
    transfer_syntax = meta.get("TransferSyntaxUID")
    if not isinstance(transfer_syntax, str):
        raise _Unsupported("no transfer syntax")
    if transfer_syntax in (EXPLICIT_VR_BIG_ENDIAN, DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN):
        raise _Unsupported(transfer_syntax)
    implicit = transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN
    reader = _LittleEndianReader(encoded, implicit)
    try:
        tags, _ = reader.read(pos, len(encoded), 0, implicit)
    except (struct.error, LookupError, ValueError, UnicodeError) as exc:
        raise _Unsupported(str(exc)) from None
    return tags, transfer_syntax


# ---------------------------------------------------------------- pydicom reader


def _element_json(ds: Dataset, tag: Any, depth: int, encoding: str | None) -> tuple[str, Any]:
    raw = ds.get_item(tag)
    if isinstance(raw, RawDataElement) and encoding is not None:
        vr, keyword = _dictionary_entry(int(tag))
        if raw.VR and not raw.is_implicit_VR and not (raw.VR == "UN" and keyword):
            vr = raw.VR
        if vr in _BINARY_VRS:
            return _key(int(tag), keyword), _binary_json(bytes(raw.value) if raw.value else None)
        if vr != "SQ":
            try:
                return _key(int(tag), keyword), convert_bytes(
                    bytes(raw.value or b""), vr, raw.is_little_endian, encoding)
            except (LookupError, ValueError, struct.error):
                pass  # the general path below decides
    elem = ds[tag]
    _, keyword = _dictionary_entry(int(tag))
    key = _key(int(tag), keyword or elem.keyword)
    value, vr = elem.value, elem.VR
    if vr == "SQ" or isinstance(value, Sequence):
        if depth >= MAX_SEQUENCE_DEPTH:
            return key, None
        return key, [dataset_to_json(item, depth + 1) for item in value]
    if vr in _BINARY_VRS or isinstance(value, (bytes, bytearray)):
        return key, _binary_json(bytes(value) if value is not None else None)
    values = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
    if vr in _TEXT_VRS:
        converted = [None if v is None else _text_json(str(v), vr) for v in values]
    else:
        converted = [None if v is None else _number_json(v, vr) for v in values]
    if not converted or (len(converted) == 1 and converted[0] in ("", None)):
        return key, None
    return key, converted[0] if len(converted) == 1 else converted


def _fast_encoding(ds: Dataset) -> str | None:
    """Codec for direct decoding, or None when pydicom's charset handling is needed."""
    charset = ds.get("SpecificCharacterSet", "")
    if isinstance(charset, (list, MultiValue)):
        if len(charset) != 1:
            return None
        charset = charset[0]
    return _FAST_CHARSETS.get(str(charset).strip())


def dataset_to_json(ds: Dataset, depth: int = 0) -> dict[str, Any]:
    """Every non-pixel element as JSON, keyed by keyword (``GGGGEEEE`` when private/unknown).

    Text keeps its stored form (``0.7\\0.7`` arrives as ``["0.7", "0.7"]``), binary
    numbers become numbers, short binary values are base64, long ones only their length.
    An element that cannot be converted is stored as its raw text, never dropped silently.
    """
    out: dict[str, Any] = {}
    encoding = _fast_encoding(ds)
    for tag in list(ds.keys()):
        if int(tag) in _PIXEL_TAGS or tag.element == 0:
            continue
        try:
            key, value = _element_json(ds, tag, depth, encoding)
            out[key] = value
        except Exception as exc:  # one broken element must not lose the others
            raw_value = getattr(ds.get_item(tag), "value", None)
            key = _key(int(tag), _dictionary_entry(int(tag))[1])
            if isinstance(raw_value, (bytes, bytearray)):
                out[key] = _clean_text(bytes(raw_value).decode("latin-1"))
            else:
                out[key] = {"Unreadable": _clean_text(str(exc))}
    return out


def read_tags_pydicom(encoded: bytes) -> tuple[dict[str, Any], str]:
    ds = pydicom.dcmread(BytesIO(encoded), stop_before_pixels=True, force=True)
    meta = getattr(ds, "file_meta", None) or Dataset()
    return dataset_to_json(ds), str(meta.get("TransferSyntaxUID", "") or "")


# ---------------------------------------------------------------- entry point


def _raw_uid(tags: dict[str, Any], keyword: str) -> str | None:
    """The element's single value, stripped of padding; None when missing or empty."""
    value = tags.get(keyword)
    if isinstance(value, list):
        value = value[0] if len(value) == 1 else None
    if not isinstance(value, str) or not value.strip("\x00 "):
        return None
    return value.strip("\x00 ")


def _require_uid(tags: dict[str, Any], keyword: str,
                 defects: list[tuple[str, str]] | None = None) -> str:
    """The UID of ``keyword``; a malformed one is rejected, or, with a ``defects`` list
    (tolerant mode), kept and noted there unless it is longer than
    ``MAX_TOLERATED_UID_LENGTH``."""
    value = _raw_uid(tags, keyword)
    if value is None:
        raise InvalidInstance(STATUS_MISSING_UID, f"{keyword} is missing")
    if len(value) > MAX_UID_LENGTH or not UID_PATTERN.match(value):
        reason = f"{keyword} {value[:80]!r} is not a valid UID"
        if defects is None or len(value) > MAX_TOLERATED_UID_LENGTH:
            if defects is not None:
                reason += f" (longer than {MAX_TOLERATED_UID_LENGTH} characters)"
            raise InvalidInstance(STATUS_MALFORMED_UID, reason)
        defects.append((RULE_INVALID_UID, reason))
    return value


def read_header(encoded: bytes, *, tolerate_invalid_uids: bool = False) -> InstanceHeader:
    """Parse a DICOM Part 10 byte string (preamble, file meta, dataset) up to the pixels.

    ``tolerate_invalid_uids``: SOP Instance, SOP Class, Study and Series Instance UIDs
    that are present but not valid UIDs (``REM SAMPLES 1``) are kept as read, each noted
    in :attr:`InstanceHeader.defects`, instead of rejected (as dcmtk's ``storescp`` and
    Orthanc keep them).  Missing UIDs are rejected either way.
    """
    try:
        tags, transfer_syntax = read_tags_direct(encoded)
    except _Truncated as exc:
        raise InvalidInstance(STATUS_UNDECODABLE, f"truncated dataset: {exc}") from None
    except _Unsupported:
        try:
            tags, transfer_syntax = read_tags_pydicom(encoded)
        except Exception as exc:
            raise InvalidInstance(STATUS_UNDECODABLE, f"cannot decode dataset: {exc}") from None
    if not tags:
        raise InvalidInstance(STATUS_UNDECODABLE, "no data elements could be read")
    if not transfer_syntax:
        raise InvalidInstance(STATUS_UNDECODABLE, "no transfer syntax in file meta",
                              _raw_uid(tags, "SOPInstanceUID"))
    defects: list[tuple[str, str]] | None = [] if tolerate_invalid_uids else None
    try:
        header = InstanceHeader(
            sop_instance_uid=_require_uid(tags, "SOPInstanceUID", defects),
            sop_class_uid=_require_uid(tags, "SOPClassUID", defects),
            study_instance_uid=_require_uid(tags, "StudyInstanceUID", defects),
            series_instance_uid=_require_uid(tags, "SeriesInstanceUID", defects),
            transfer_syntax_uid=transfer_syntax,
            tags=tags,
            defects=tuple(defects) if defects else (),
        )
    except InvalidInstance as exc:
        raw = _raw_uid(tags, "SOPInstanceUID")
        exc.sop_instance_uid = raw[:MAX_TOLERATED_UID_LENGTH] if raw else None
        raise
    return header


# ---------------------------------------------------------------- file meta

IMPLEMENTATION_CLASS_UID = "2.25.221393845126434880469498744796745785906"
IMPLEMENTATION_VERSION_NAME = "PACS_ANNOTATE_01"


def _meta_element(group_element: int, vr: bytes, value: bytes) -> bytes:
    pad = b"\x00" if vr in (b"UI", b"OB") else b" "
    if len(value) % 2:
        value += pad
    header = struct.pack("<HH", group_element >> 16, group_element & 0xFFFF) + vr
    if vr == b"OB":
        return header + b"\x00\x00" + struct.pack("<I", len(value)) + value
    return header + struct.pack("<H", len(value)) + value


def encode_part10(
    dataset: bytes,
    *,
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax_uid: str,
    source_ae_title: str | None = None,
) -> bytes:
    """Preamble, File Meta Information (PS3.10 7.1) and the dataset as received."""
    body = b"".join([
        _meta_element(0x00020001, b"OB", b"\x00\x01"),
        _meta_element(0x00020002, b"UI", sop_class_uid.encode("ascii")),
        _meta_element(0x00020003, b"UI", sop_instance_uid.encode("ascii")),
        _meta_element(0x00020010, b"UI", transfer_syntax_uid.encode("ascii")),
        _meta_element(0x00020012, b"UI", IMPLEMENTATION_CLASS_UID.encode("ascii")),
        _meta_element(0x00020013, b"SH", IMPLEMENTATION_VERSION_NAME.encode("ascii")),
    ])
    if source_ae_title:
        body += _meta_element(0x00020016, b"AE", source_ae_title.strip().encode("ascii", "replace"))
    group_length = struct.pack("<HH", 2, 0) + b"UL" + struct.pack("<HI", 4, len(body))
    return b"".join([b"\x00" * 128, b"DICM", group_length, body, dataset])


def with_media_storage_sop_instance_uid(encoded: bytes, sop_instance_uid: str) -> bytes:
    """The same Part 10 file with (0002,0003) Media Storage SOP Instance UID replaced (or
    added) and the group length recomputed; the data set is untouched.

    For a C-STORE whose request named another instance than its data set (tolerant mode
    keeps it under the data set's UID): the file meta must name what the file holds.
    """
    meta, pos = _meta_elements(encoded)
    meta[0x00020003] = _meta_element(0x00020003, b"UI",
                                     sop_instance_uid.encode("ascii", "replace"))
    meta.pop(0x00020000, None)
    body = b"".join(meta[tag] for tag in sorted(meta))
    group_length = struct.pack("<HH", 2, 0) + b"UL" + struct.pack("<HI", 4, len(body))
    return b"".join([encoded[:132], group_length, body, encoded[pos:]])


def _meta_elements(encoded: bytes) -> tuple[dict[int, bytes], int]:
    """Tag -> encoded element of each File Meta Information element, and where the data
    set starts."""
    if len(encoded) < 132 or encoded[128:132] != b"DICM":
        raise ValueError("no DICOM preamble")
    reader = _LittleEndianReader(encoded, implicit=False)
    elements: dict[int, bytes] = {}
    pos = 132
    while pos + 8 <= len(encoded):
        if struct.unpack_from("<H", encoded, pos)[0] != 0x0002:
            break
        tag, _, length, value_pos = reader._header(pos, False)
        if length == _UNDEFINED or value_pos + length > len(encoded):
            raise ValueError("bad file meta")
        elements[tag] = encoded[pos:value_pos + length]
        pos = value_pos + length
    return elements, pos
