"""The committer's database connection: the DBAPI driver itself, without SQLAlchemy.

With psycopg 3 the statements of the store path go through its libpq wrapper
(``Connection.pgconn``, psycopg's documented low-level interface): BEGIN and COMMIT
without a cursor, the INSERT as a server-side prepared statement with its parameters
already in PostgreSQL's text format.  psycopg's cursor machinery (query conversion,
adaptation, result description) was a fifth of the listener's Python time per store
(benchmarks/ingest/README.md).  Any other driver (psycopg2) takes the cursor path with
the same SQL.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

from sqlalchemy.engine import Engine

try:
    from psycopg import errors as psycopg_errors
    from psycopg import pq
except ImportError:  # pragma: no cover - psycopg 3 is a dependency; psycopg2 also works
    psycopg_errors = pq = None

_PLACEHOLDER = re.compile(r"%\((\w+)\)s")


class PreparedStatement:
    """A DBAPI ``pyformat`` statement and its ``$n`` form for a server-side prepare.

    >>> s = PreparedStatement("q", "SELECT %(a)s, %(b)s, %(a)s")
    >>> s.numbered, s.names
    (b'SELECT $1, $2, $1', ('a', 'b'))
    """

    def __init__(self, name: str, sql: str):
        if "%%" in sql:
            raise ValueError("literal % signs are not supported in a prepared statement")
        names: list[str] = []

        def number(match: re.Match) -> str:
            if match.group(1) not in names:
                names.append(match.group(1))
            return f"${names.index(match.group(1)) + 1}"

        self.name = name
        self.sql = sql
        self.numbered = _PLACEHOLDER.sub(number, sql).encode()
        self.names = tuple(names)


def text_parameter(value: Any) -> bytes | None:
    """One parameter in PostgreSQL's text input format (the statement's casts type it).

    >>> [text_parameter(v) for v in (None, 7, True, "é")]
    [None, b'7', b't', b'\\xc3\\xa9']
    >>> text_parameter(["tags", 'a"b\\\\c', None])
    b'{"tags","a\\\\"b\\\\\\\\c",NULL}'
    """
    if value is None:
        return None
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bool):
        return b"t" if value else b"f"
    if isinstance(value, int):
        return str(value).encode()
    if isinstance(value, (list, tuple)):
        return ("{" + ",".join(_array_element(v) for v in value) + "}").encode()
    raise TypeError(f"no text form for a parameter of type {type(value).__name__}")


def _array_element(value: Any) -> str:
    if value is None:
        return "NULL"
    if not isinstance(value, str):
        raise TypeError(f"array elements must be text, not {type(value).__name__}")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class DriverConnection:
    """A driver connection (psycopg 3 or psycopg2) in autocommit mode.

    Taken from the engine's pool and detached from it: it lives as long as the committer
    and sends BEGIN and COMMIT itself, so that a COMMIT can wait for the batch's files.
    """

    def __init__(self, engine: Engine):
        self._pooled = engine.raw_connection()
        self.driver = self._pooled.driver_connection
        self._pooled.detach()
        self.driver.autocommit = True
        self.errors = engine.dialect.loaded_dbapi
        self._pgconn = getattr(self.driver, "pgconn", None) if pq is not None else None
        self._prepared: set[str] = set()

    def command(self, sql: str) -> None:
        """A statement with no parameters and no rows: BEGIN, COMMIT, ROLLBACK."""
        if self._pgconn is None:
            self.execute(sql)
            return
        self._check(self._pgconn.exec_(sql.encode()))

    def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> list[tuple]:
        cursor = self.driver.cursor()
        try:
            cursor.execute(sql, params)
            return cursor.fetchall() if cursor.description is not None else []
        finally:
            cursor.close()

    def text_rows(self, statement: PreparedStatement,
                  params: Mapping[str, Any]) -> list[Sequence[str | None]]:
        """Runs ``statement``; its rows, every value as text (or None)."""
        if self._pgconn is None:
            return [tuple(None if v is None else str(v) for v in row)
                    for row in self.execute(statement.sql, params)]
        if statement.name not in self._prepared:
            self._check(self._pgconn.prepare(statement.name.encode(), statement.numbered))
            self._prepared.add(statement.name)
        result = self._check(self._pgconn.exec_prepared(
            statement.name.encode(), [text_parameter(params[n]) for n in statement.names]))
        encoding = self.driver.info.encoding
        return [tuple(None if (v := result.get_value(row, column)) is None else v.decode(encoding)
                      for column in range(result.nfields))
                for row in range(result.ntuples)]

    def _check(self, result: Any) -> Any:
        if result.status not in (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK):
            raise psycopg_errors.error_from_result(result, encoding=self.driver.info.encoding)
        return result

    @property
    def closed(self) -> bool:
        return bool(self.driver.closed)

    def is_connection_error(self, exc: BaseException) -> bool:
        return isinstance(exc, (self.errors.OperationalError, self.errors.InterfaceError)) \
            or self.closed

    def close(self) -> None:
        self._pooled.close()
