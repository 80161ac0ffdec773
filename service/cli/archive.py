"""The archive's own commands: ``migrate``, ``status`` (counters and queue depth), ``sql``
(one statement) and ``db-url``."""

from __future__ import annotations

import argparse
import json

from .common import Settings, UserError, command, database


def migrate(settings: Settings) -> int:
    """Apply the database migrations (opening the database does)."""
    with database(settings):
        pass
    print("database schema is up to date")
    return 0


def status(settings: Settings, *, as_json: bool = False) -> int:
    from ..status import collect_status, format_status

    with database(settings) as opened:
        counters = collect_status(opened.engine)
    print(json.dumps(counters, indent=2) if as_json else format_status(counters))
    return 0


def _statement_error(exc) -> str:
    """PostgreSQL's message of a failed statement in one line, with where it failed."""
    orig = getattr(exc, "orig", None)
    if orig is None:  # SQLAlchemy's own objection (a bind parameter without a value)
        return str(exc).splitlines()[0].split(" (Background on this error")[0]
    text = (str(orig).strip().splitlines() or [type(orig).__name__])[0]
    position = getattr(getattr(orig, "diag", None), "statement_position", None)
    return f"{text} (at character {position})" if position else text


def sql(settings: Settings, *, query: str) -> int:
    """Run one statement, print its rows as a table and commit."""
    import sqlalchemy as sa

    with database(settings) as opened, opened.engine.connect() as conn:
        try:
            result = conn.execute(sa.text(query))
        except sa.exc.StatementError as exc:  # the statement's fault, not the service's
            raise UserError(f"sql: {_statement_error(exc)}") from None
        if result.returns_rows:
            columns = list(result.keys())
            rows = [[("" if v is None else str(v)) for v in row] for row in result]
            widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(columns)]
            print(" | ".join(c.ljust(w) for c, w in zip(columns, widths)))
            print("-+-".join("-" * w for w in widths))
            for row in rows:
                print(" | ".join(v.ljust(w) for v, w in zip(row, widths)))
            print(f"({len(rows)} rows)")
        conn.commit()
    return 0


def db_url(settings: Settings) -> int:
    """Print the database URL (an external one's password hidden)."""
    from ..database.engine import redact

    with database(settings, migrate=False) as opened:
        print(opened.url if opened.embedded else redact(opened.url))
    return 0


def add_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    sub.add_parser("migrate", parents=[common], help="apply database migrations").set_defaults(
        func=command(migrate))

    status_parser = sub.add_parser("status", parents=[common], help="counters and queue depth")
    status_parser.add_argument("--json", dest="as_json", action="store_true")
    status_parser.set_defaults(func=command(status))

    sql_parser = sub.add_parser("sql", parents=[common],
                                help="run one SQL statement and print rows")
    sql_parser.add_argument("query")
    sql_parser.set_defaults(func=command(sql))

    sub.add_parser("db-url", parents=[common],
                   help="print the database URL (password hidden)").set_defaults(
        func=command(db_url))
