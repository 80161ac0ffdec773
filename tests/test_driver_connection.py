"""The committer's driver connection: psycopg 3's libpq path against its cursor path."""

from __future__ import annotations

import psycopg
import pytest
import sqlalchemy as sa

from service.database.engine import create_db_engine
from service.database.driver_connection import DriverConnection, PreparedStatement, text_parameter


def test_placeholders_are_numbered_in_order_of_first_use():
    statement = PreparedStatement("s", "SELECT %(b)s, %(a)s, %(b)s::text")
    assert statement.numbered == b"SELECT $1, $2, $1::text"
    assert statement.names == ("b", "a")


def test_literal_percent_signs_are_refused():
    with pytest.raises(ValueError):
        PreparedStatement("s", "SELECT '100%%'")


@pytest.mark.parametrize("value, text", [
    (None, None), (0, b"0"), (-12, b"-12"), (False, b"f"), (True, b"t"),
    ("ü\\", "ü\\".encode()), (b"{}", b"{}"),
    ([], b"{}"), (["a b", None, 'q"', "b\\s", ""], b'{"a b",NULL,"q\\"","b\\\\s",""}'),
])
def test_text_parameters(value, text):
    assert text_parameter(value) == text


@pytest.mark.parametrize("value", [1.5, {"a": 1}, [1, 2]])
def test_values_without_a_text_form_are_refused(value):
    with pytest.raises(TypeError):
        text_parameter(value)


ROUND_TRIP = PreparedStatement("round_trip", """
SELECT v, CAST(%(n)s AS bigint), CAST(%(doc)s AS jsonb) ->> 'k', %(absent)s::text
FROM unnest(CAST(%(values)s AS text[])) WITH ORDINALITY AS t(v, i) ORDER BY i
""")


@pytest.fixture
def driver(database_url):
    engine = create_db_engine(database_url)
    connection = DriverConnection(engine)
    yield connection
    connection.close()
    engine.dispose()


@pytest.mark.parametrize("libpq_path", [True, False], ids=["libpq", "cursor"])
def test_both_paths_give_the_same_rows(driver, libpq_path):
    if not libpq_path:
        driver._pgconn = None  # what a driver without psycopg 3's pgconn (psycopg2) takes
    values = ["plain", 'with "quotes"', "back\\slash", "{braces,comma}", None, "ünï"]
    params = {"values": values, "n": 2**40, "doc": '{"k": "välue"}', "absent": None}
    for _ in range(2):  # the second run uses the statement prepared by the first
        rows = driver.text_rows(ROUND_TRIP, params)
        assert rows == [(v, str(2**40), "välue", None) for v in values]


def test_errors_keep_the_drivers_classes(driver):
    driver.command("BEGIN")
    driver.execute("CREATE TEMP TABLE t (k int PRIMARY KEY)")
    insert = PreparedStatement("insert_k", "INSERT INTO t VALUES (CAST(%(k)s AS int)) RETURNING k")
    assert driver.text_rows(insert, {"k": 1}) == [("1",)]
    with pytest.raises(driver.errors.IntegrityError):
        driver.text_rows(insert, {"k": 1})
    driver.command("ROLLBACK")
    with pytest.raises(driver.errors.ProgrammingError):
        driver.command("COMMIT AND NONSENSE")
    assert not driver.is_connection_error(RuntimeError())


def test_a_lost_connection_is_recognised(driver, database_url):
    pid = driver.text_rows(PreparedStatement("pid", "SELECT pg_backend_pid()"), {})[0][0]
    admin = create_db_engine(database_url)
    with admin.connect() as conn:
        conn.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": int(pid)})
    admin.dispose()
    with pytest.raises(psycopg.Error) as failure:
        driver.command("BEGIN")
    assert driver.is_connection_error(failure.value)
