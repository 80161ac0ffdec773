"""Total parsers for one kind of raw tag value each (method.md A.3).

Every function here takes whatever the index JSON, pydicom or a CSV export holds for
one element (``str``, ``list``, ``MultiValue``, ``bytes``, numbers, ``None``) and
returns a :class:`Parsed`: a value, a plain "missing" (nothing was stored), or a
rejection with its reason. None of them raises on bad input; the registry still
wraps each call, so a bug here becomes a reported failure, not an exception.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from numbers import Real
from typing import Any, Generic, TypeVar

T = TypeVar("T")

MAX_VALUES = 64  # longer lists are not image-plane or timing values; refusing them bounds the work
MAX_CODE_LENGTH = 64  # CS is 16, LO 64: longer "codes" are free text pasted into the wrong tag
MAX_AGE_YEARS = 150.0
UID_PATTERN = re.compile(r"[0-9]+(\.[0-9]+)*")


@dataclass(frozen=True, slots=True)
class Parsed(Generic[T]):
    """The outcome of one parse: ``value``, or missing with ``problem`` saying why.

    ``problem`` is empty when the tag simply held nothing (not a failure). A partial
    result (some values, some not) may carry both.
    """

    value: T | None = None
    problem: str = ""

    @property
    def ok(self) -> bool:
        return not self.problem


MISSING: Parsed[Any] = Parsed()


def reject(reason: str) -> Parsed[Any]:
    return Parsed(None, reason)


# ---------------------------------------------------------------- text helpers


def as_text(raw: Any) -> str | None:
    """One raw scalar as text; None for empty or for things that are not text-like."""
    if raw is None:
        return None
    if isinstance(raw, (bytes, bytearray, memoryview)):
        # DICOM default repertoire is ASCII; latin-1 never fails and keeps bytes visible
        raw = bytes(raw).decode("latin-1")
    if not isinstance(raw, str):
        return None
    text = raw.replace("\x00", "").strip()
    return text or None


def fold(text: str) -> str:
    """Case- and accent-insensitive form: ``"Schädel"`` -> ``"schadel"``, ``"Ž"`` -> ``"z"``."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return "".join(c for c in decomposed if not unicodedata.combining(c)).replace("đ", "d")


_NON_ALNUM = re.compile(r"[^0-9a-z]+")


def alias_key(text: str) -> str:
    """The lookup key of a spelling: folded, letters and digits only, uppercase.

    ``"T SPINE"``, ``"t-spine"``, ``"T_SPINE"`` and ``"TSPINE"`` share the key ``TSPINE``,
    so one alias entry covers all of them.
    """
    return _NON_ALNUM.sub("", fold(text)).upper()


def words(text: str) -> str:
    """Folded text with every run of non-alphanumerics turned into one space (for regexes)."""
    return " " + _NON_ALNUM.sub(" ", fold(text)).strip() + " "


def clean_code(raw: Any) -> Parsed[str]:
    """A categorical value in its cleaned form: trimmed, single-spaced, uppercase.

    Garbage (no letter or digit, control characters, undecodable bytes, longer than
    MAX_CODE_LENGTH) is rejected; anything else is kept, so values from a new site
    survive until a vocabulary entry maps them.
    """
    if isinstance(raw, (list, tuple)) or _is_multivalue(raw):
        values = [v for v in _listify(raw) if as_text(v) is not None]
        if not values:
            return MISSING
        raw = values[0]
    if isinstance(raw, bool) or isinstance(raw, Real):
        raw = str(raw)
    if isinstance(raw, dict):
        return reject("binary or structured value where text was expected")
    text = as_text(raw)
    if text is None:
        return MISSING if raw is None or isinstance(raw, (str, bytes, bytearray)) else reject(
            f"unexpected {type(raw).__name__} value"
        )
    if "\ufffd" in text or any(unicodedata.category(c) == "Cc" for c in text):
        return reject("control or undecodable characters")
    if len(text) > MAX_CODE_LENGTH:
        return reject(f"{len(text)} characters, longer than a code ({MAX_CODE_LENGTH})")
    if not any(c.isalnum() for c in text):
        return reject("no letter or digit")
    return Parsed(" ".join(text.split()).upper())


def clean_codes(raw: Any) -> Parsed[tuple[str, ...]]:
    """All values of a multi-valued code string (``EP\\GR``, ``["EP", "GR"]``), cleaned."""
    if isinstance(raw, (bytes, bytearray, str)):
        text = as_text(raw)
        raw = text.split("\\") if text is not None else None
    if raw is None:
        return MISSING
    if isinstance(raw, dict):
        return reject("binary or structured value where text was expected")
    if not _is_multivalue(raw):
        raw = [raw]
    out: list[str] = []
    for item in _listify(raw)[:MAX_VALUES]:
        parsed = clean_code(item)
        if parsed.problem:
            return reject(parsed.problem)
        if parsed.value is not None:
            out.append(parsed.value)
    return Parsed(tuple(out)) if out else MISSING


# ---------------------------------------------------------------- numbers

# A decimal number (point or comma), optionally followed by a unit: "5 mm", "3.0mm", "1,5".
_NUMBER_WITH_UNIT = re.compile(
    r"(?P<number>[+-]?(?:\d+(?:[.,]\d*)?|[.,]\d+)(?:[eE][+-]?\d+)?)\s*(?P<unit>(?:[^\W\d_]|[°%²/]){0,12})\.?"
)
_NOT_FINITE = {"nan", "+nan", "-nan", "inf", "+inf", "-inf", "infinity", "+infinity", "-infinity"}


@dataclass(frozen=True, slots=True)
class Quantity:
    number: float
    unit: str  # what followed the number, as written ("" when nothing did)


def parse_quantity(raw: Any) -> Parsed[Quantity]:
    """One number from an IS/DS string, a binary number or a one-item list.

    Accepts stray spaces, a decimal comma (``"1,5"``) and a trailing unit (``"5 mm"``),
    which is returned for the caller to check. NaN and infinities are rejected.
    """
    if isinstance(raw, (list, tuple)) or _is_multivalue(raw):
        items = _listify(raw)
        if len(items) != 1:
            return MISSING if not items else reject(f"{len(items)} values where one was expected")
        raw = items[0]
    if raw is None:
        return MISSING
    if isinstance(raw, bool):
        return reject("a boolean is not a number")
    if isinstance(raw, Real):
        number = float(raw)
        return Parsed(Quantity(number, "")) if math.isfinite(number) else reject("not finite")
    if isinstance(raw, dict):
        return reject("binary value where a number was expected")
    text = as_text(raw)
    if text is None:
        if isinstance(raw, (str, bytes, bytearray, memoryview)):
            return MISSING
        return reject(f"unexpected {type(raw).__name__} value")
    match = _NUMBER_WITH_UNIT.fullmatch(text)
    if match is None:
        return reject("not finite" if text.casefold() in _NOT_FINITE else "not a number")
    number = float(match["number"].replace(",", "."))
    if not math.isfinite(number):
        return reject("not finite")
    return Parsed(Quantity(number, match["unit"]))


def parse_decimal(raw: Any) -> Parsed[float]:
    """:func:`parse_quantity` without the unit (for values whose unit is fixed by the tag)."""
    parsed = parse_quantity(raw)
    if parsed.value is None:
        return Parsed(None, parsed.problem)
    return Parsed(parsed.value.number)


_BRACKETS = "[](){}"
_QUOTES = "'\""
_LIST_SEPARATOR = re.compile(r"[,;]\s+|;")


def _split_number_text(text: str) -> list[str]:
    """Split one text holding several numbers, whichever way it was written.

    ``0.7\\0.7`` (DICOM), ``[0.7, 0.7]`` (str of a list), ``['0.7', '0.7']``, ``(0.7, 0.7)``,
    ``[0.7 0.7]`` (numpy), ``0,7\\0,7`` (decimal commas). A comma separates values when
    followed by a space, inside brackets, or when the text also has decimal points;
    a single comma between digits is a decimal comma.
    """
    bracketed = text[:1] in _BRACKETS and text[-1:] in _BRACKETS
    text = text.strip(_BRACKETS + " ")
    if "\\" in text:
        parts = text.split("\\")
    elif _LIST_SEPARATOR.search(text):
        parts = _LIST_SEPARATOR.split(text)
    elif "," in text and (bracketed or "." in text or text.count(",") > 1):
        parts = text.split(",")
    elif len(text.split()) > 1 and all(_NUMBER_WITH_UNIT.fullmatch(p.strip(_QUOTES)) for p in text.split()):
        parts = text.split()
    else:
        parts = [text]
    return [p.strip().strip(_QUOTES).strip() for p in parts]


def parse_decimals(raw: Any) -> Parsed[tuple[float | None, ...]]:
    """All numbers of a multi-valued tag (PixelSpacing, ImageOrientationPatient, ...).

    Empty items stay as None in their position; any item that is not a number rejects
    the whole value, because a shifted list would put numbers in the wrong columns.
    """
    if raw is None:
        return MISSING
    if isinstance(raw, dict):
        return reject("binary value where numbers were expected")
    if isinstance(raw, (str, bytes, bytearray, memoryview)):
        text = as_text(raw)
        if text is None:
            return MISSING
        items: list[Any] = _split_number_text(text)
    elif isinstance(raw, bool) or isinstance(raw, Real):
        items = [raw]
    elif isinstance(raw, Iterable):
        items = _listify(raw)
    else:
        return reject(f"unexpected {type(raw).__name__} value")
    if len(items) > MAX_VALUES:
        return reject(f"{len(items)} values, more than {MAX_VALUES}")
    numbers: list[float | None] = []
    for item in items:
        parsed = parse_decimal(item)
        if parsed.problem:
            return reject(f"item {len(numbers) + 1}: {parsed.problem}")
        numbers.append(parsed.value)
    if all(n is None for n in numbers):
        return MISSING
    return Parsed(tuple(numbers))


def _is_multivalue(raw: Any) -> bool:
    # pydicom MultiValue, numpy arrays and the like, without importing them here
    return not isinstance(raw, (str, bytes, bytearray, memoryview, dict)) and isinstance(raw, Iterable)


def _listify(raw: Any) -> list[Any]:
    if hasattr(raw, "tolist") and not isinstance(raw, (str, bytes)):
        raw = raw.tolist()
        if not isinstance(raw, list):
            return [raw]
    items = []
    for item in raw:
        items.append(item)
        if len(items) > MAX_VALUES:
            break
    return items


# ---------------------------------------------------------------- ages

_DAYS_PER_YEAR = 365.25
# Unit words, folded (see alias_key), to the number of such units in a year. DICOM AS uses
# D/W/M/Y; the others are what people type in English, German, Croatian, French, Italian
# and Spanish.
AGE_UNITS: dict[str, float] = {
    **dict.fromkeys(["Y", "YR", "YRS", "YEAR", "YEARS", "J", "JAHR", "JAHRE", "G", "GOD",
                     "GODINA", "GODINE", "A", "AN", "ANS", "ANNO", "ANNI", "ANO", "ANOS"], 1.0),
    **dict.fromkeys(["M", "MO", "MOS", "MON", "MONTH", "MONTHS", "MONAT", "MONATE", "MJ",
                     "MJES", "MJESEC", "MJESECI", "MOIS", "MESE", "MESI", "MES", "MESES"], 12.0),
    **dict.fromkeys(["W", "WK", "WKS", "WEEK", "WEEKS", "WOCHE", "WOCHEN", "TJ", "TJEDAN",
                     "TJEDNA", "TJEDANA", "SEM", "SEMAINE", "SEMAINES", "SETTIMANA",
                     "SETTIMANE", "SEMANA", "SEMANAS"], _DAYS_PER_YEAR / 7),
    **dict.fromkeys(["D", "DAY", "DAYS", "TAG", "TAGE", "DAN", "DANA", "JOUR", "JOURS",
                     "GIORNO", "GIORNI", "DIA", "DIAS"], _DAYS_PER_YEAR),
}
_AGE = re.compile(r"(?P<number>[+-]?\d+(?:[.,]\d+)?)\s*(?P<unit>[^\W\d_]*)\.?")


def parse_age(raw: Any) -> Parsed[float]:
    """An age in years from AS (``045Y``, ``006M``, ``003W``, ``010D``) or what people type.

    A bare number is years. Negative ages and ages above MAX_AGE_YEARS are rejected.
    ``000Y`` stays 0.0: newborns exist, and anonymisers that blank the age leave it empty.
    """
    if isinstance(raw, bool):
        return reject("a boolean is not an age")
    if isinstance(raw, Real):
        raw = str(raw)
    elif isinstance(raw, (list, tuple)) or _is_multivalue(raw):
        items = _listify(raw)
        if len(items) != 1:
            return MISSING if not items else reject(f"{len(items)} values where one age was expected")
        return parse_age(items[0])
    if isinstance(raw, dict):
        return reject("binary value where an age was expected")
    text = as_text(raw)
    if text is None:
        if raw is None or isinstance(raw, (str, bytes, bytearray, memoryview)):
            return MISSING
        return reject(f"unexpected {type(raw).__name__} value")
    match = _AGE.fullmatch(text)
    if match is None:
        return reject("not an age")
    unit = alias_key(match["unit"]) or "Y"
    per_year = AGE_UNITS.get(unit)
    if per_year is None:
        return reject(f"unknown age unit {match['unit']!r}")
    years = float(match["number"].replace(",", ".")) / per_year
    if years < 0:
        return reject("negative age")
    if years > MAX_AGE_YEARS:
        return reject(f"age above {MAX_AGE_YEARS:g} years")
    return Parsed(years)


# ---------------------------------------------------------------- orientation

OBLIQUE_THRESHOLD = 0.8
"""A slice is AXIAL/CORONAL/SAGITTAL when the largest component of its unit normal is at
least this (the plane is within about 37 degrees of the anatomical plane); OBLIQUE below."""

_PLANE_BY_AXIS = ("SAGITTAL", "CORONAL", "AXIAL")  # normal along patient x (L), y (P), z (H)


def plane_from_orientation(cosines: tuple[float | None, ...]) -> Parsed[str]:
    """AXIAL, CORONAL, SAGITTAL or OBLIQUE from the six ImageOrientationPatient cosines.

    The slice normal is the cross product of the row and column direction cosines; its
    dominant patient axis names the plane (method.md A.3).
    """
    if len(cosines) != 6 or any(c is None for c in cosines):
        return reject("orientation needs six numbers")
    rx, ry, rz, cx, cy, cz = (float(c) for c in cosines)  # type: ignore[arg-type]
    normal = (ry * cz - rz * cy, rz * cx - rx * cz, rx * cy - ry * cx)
    length = math.hypot(*normal)
    if length < 1e-6:
        return reject("row and column directions are parallel or zero")
    components = [abs(n) / length for n in normal]
    axis = max(range(3), key=components.__getitem__)
    if components[axis] < OBLIQUE_THRESHOLD:
        return Parsed("OBLIQUE")
    return Parsed(_PLANE_BY_AXIS[axis])
