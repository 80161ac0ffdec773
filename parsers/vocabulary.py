"""Canonical vocabularies for categorical tags, shipped defaults plus a site file.

A :class:`Vocabulary` is immutable; :func:`load_vocabulary` builds one from the tables
in :mod:`parsers.terms` and, optionally, a site TOML or JSON file that adds spellings,
manufacturer prefixes and body-part inference rules (method.md A.3: manually typed
categorical tags are normalised to a canonical vocabulary).
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from types import MappingProxyType
from typing import Any

from parsers import terms
from parsers.values import alias_key, words

# The shipped alias tables, by the tag keyword they normalise.
SHIPPED_TERMS: dict[str, dict[str, tuple[str, ...]]] = {
    "BodyPartExamined": terms.BODY_PART_TERMS,
    "Modality": terms.MODALITY_TERMS,
    "Manufacturer": terms.MANUFACTURER_TERMS,
    "PhotometricInterpretation": terms.PHOTOMETRIC_TERMS,
    "Laterality": terms.LATERALITY_TERMS,
    "ImageLaterality": terms.LATERALITY_TERMS,
    "PatientSex": terms.PATIENT_SEX_TERMS,
    "PatientPosition": terms.PATIENT_POSITION_TERMS,
    "ViewPosition": terms.VIEW_POSITION_TERMS,
    "MRAcquisitionType": terms.MR_ACQUISITION_TYPE_TERMS,
    "AngioFlag": terms.ANGIO_FLAG_TERMS,
}
SHIPPED_PREFIXES: dict[str, dict[str, tuple[str, ...]]] = {
    "Manufacturer": terms.MANUFACTURER_PREFIXES,
}


class VocabularyError(ValueError):
    """A site vocabulary file that cannot be used (raised at load time, not while parsing)."""


@dataclass(frozen=True)
class InferenceRule:
    pattern: re.Pattern[str]
    code: str


@dataclass(frozen=True)
class Vocabulary:
    """Alias tables per tag keyword, prefix tables, and body-part inference rules.

    ``aliases[keyword][alias_key(spelling)] -> code``; ``prefixes[keyword]`` is a tuple
    of ``(key prefix, code)``, longest prefix first; ``inference`` is ordered, first
    match wins.
    """

    aliases: Mapping[str, Mapping[str, str]]
    prefixes: Mapping[str, tuple[tuple[str, str], ...]]
    inference: tuple[InferenceRule, ...]

    @cached_property
    def version(self) -> str:
        """16 hex digits of the SHA-256 of the content (aliases, prefixes in the order they
        are tried, inference rules in order): equal for equal vocabularies however they were
        written, different after any change of a spelling, code, prefix or rule. Stored with
        every parsed row (``instance_features.vocabulary_version``) so ``reparse`` finds the
        rows an older vocabulary parsed."""
        content = {
            "aliases": {k: dict(sorted(v.items())) for k, v in sorted(self.aliases.items())},
            "prefixes": {k: [list(p) for p in v] for k, v in sorted(self.prefixes.items())},
            "inference": [[r.pattern.pattern, r.pattern.flags, r.code] for r in self.inference],
        }
        text = json.dumps(content, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    def lookup(self, keyword: str, text: str) -> str | None:
        """The canonical code for one spelling of ``keyword``, or None if unknown."""
        key = alias_key(text)
        if not key:
            return None
        code = self.aliases.get(keyword, {}).get(key)
        if code is not None:
            return code
        for prefix, code in self.prefixes.get(keyword, ()):
            if key.startswith(prefix):
                return code
        return None

    def infer_body_part(self, texts: Iterable[str | None]) -> str | None:
        """The first inference rule matching the first text that any rule matches."""
        for text in texts:
            if not text:
                continue
            folded = words(text)
            for rule in self.inference:
                if rule.pattern.search(folded):
                    return rule.code
        return None


def _alias_table(table: Mapping[str, Iterable[str]], into: dict[str, str]) -> None:
    for code, spellings in table.items():
        for spelling in (code, *spellings):
            key = alias_key(spelling)
            if key:
                into[key] = code


def _prefix_table(table: Mapping[str, Iterable[str]]) -> list[tuple[str, str]]:
    return [(alias_key(prefix), code) for code, prefixes in table.items() for prefix in prefixes
            if alias_key(prefix)]


def _compile(rules: Iterable[tuple[str, str]], origin: str) -> list[InferenceRule]:
    compiled = []
    for pattern, code in rules:
        try:
            compiled.append(InferenceRule(re.compile(pattern), code))
        except re.error as exc:
            raise VocabularyError(f"{origin}: bad pattern {pattern!r}: {exc}") from None
    return compiled


def _read_site_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise VocabularyError(f"{path}: cannot read: {exc}") from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise VocabularyError(f"{path}: not valid {path.suffix or 'TOML'}: {exc}") from None
    if not isinstance(data, dict):
        raise VocabularyError(f"{path}: top level must be a table")
    unknown = set(data) - {"aliases", "prefixes", "body_part_inference"}
    if unknown:
        raise VocabularyError(f"{path}: unknown sections {sorted(unknown)}")
    return data


def _site_tables(data: Mapping[str, Any], section: str, path: Path) -> dict[str, dict[str, tuple[str, ...]]]:
    """``{keyword: {spelling: code}}`` in the file, as ``{keyword: {code: spellings}}``."""
    out: dict[str, dict[str, tuple[str, ...]]] = {}
    tables = data.get(section, {})
    if not isinstance(tables, dict):
        raise VocabularyError(f"{path}: [{section}] must be a table of tag keywords")
    for keyword, table in tables.items():
        if not isinstance(table, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v.strip() for k, v in table.items()
        ):
            raise VocabularyError(f"{path}: [{section}.{keyword}] must map text to a code")
        by_code: dict[str, list[str]] = {}
        for spelling, code in table.items():
            by_code.setdefault(code.strip().upper(), []).append(spelling)
        out[keyword] = {code: tuple(spellings) for code, spellings in by_code.items()}
    return out


def _site_inference(data: Mapping[str, Any], path: Path) -> list[tuple[str, str]]:
    rules = data.get("body_part_inference", [])
    if not isinstance(rules, list) or not all(
        isinstance(r, dict) and isinstance(r.get("pattern"), str) and isinstance(r.get("code"), str)
        for r in rules
    ):
        raise VocabularyError(f"{path}: body_part_inference must be a list of {{pattern, code}}")
    return [(r["pattern"], r["code"].strip().upper()) for r in rules]


def load_vocabulary(site_file: str | Path | None = None) -> Vocabulary:
    """The shipped vocabulary, extended by ``site_file`` (TOML, or JSON by suffix).

    Site spellings override shipped ones; site prefixes and inference rules are tried
    before the shipped ones. A bad site file raises :class:`VocabularyError`.
    """
    aliases: dict[str, dict[str, str]] = {}
    for keyword, table in SHIPPED_TERMS.items():
        _alias_table(table, aliases.setdefault(keyword, {}))
    prefixes = {keyword: _prefix_table(table) for keyword, table in SHIPPED_PREFIXES.items()}
    inference = _compile(terms.BODY_PART_INFERENCE, "shipped inference rules")

    if site_file is not None:
        path = Path(site_file)
        data = _read_site_file(path)
        for keyword, table in _site_tables(data, "aliases", path).items():
            _alias_table(table, aliases.setdefault(keyword, {}))
        for keyword, table in _site_tables(data, "prefixes", path).items():
            prefixes[keyword] = _prefix_table(table) + prefixes.get(keyword, [])
        inference = _compile(_site_inference(data, path), str(path)) + inference

    return Vocabulary(
        aliases=MappingProxyType({k: MappingProxyType(v) for k, v in aliases.items()}),
        # longest prefix first, so a site's "SIEMENSHEALTHINEERSCT" can beat "SIEMENS"
        prefixes=MappingProxyType(
            {k: tuple(sorted(v, key=lambda item: -len(item[0]))) for k, v in prefixes.items()}
        ),
        inference=tuple(inference),
    )
