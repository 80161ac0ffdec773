"""Tag parsers: raw DICOM tag values to clean features (method.md A.3).

``parse_instance(tags)`` turns one instance's tag JSON into the feature columns listed in
``FEATURE_COLUMNS``; see ``docs/parsers.md`` for every column and rule.
"""

from parsers.registry import (
    FEATURE_COLUMNS,
    PARSER_VERSION,
    PARSERS,
    ColumnSpec,
    ParseFailure,
    ParseResult,
    TagRule,
    parse_instance,
)
from parsers.vocabulary import Vocabulary, VocabularyError, load_vocabulary

__all__ = [
    "FEATURE_COLUMNS",
    "PARSER_VERSION",
    "PARSERS",
    "ColumnSpec",
    "ParseFailure",
    "ParseResult",
    "TagRule",
    "Vocabulary",
    "VocabularyError",
    "load_vocabulary",
    "parse_instance",
]
