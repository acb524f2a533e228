"""The PostgreSQL test server: reachable on 127.0.0.1, and a new empty database for each ask."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlsplit

import psycopg


def _tables(url: str) -> list[str]:
    query = (
        "SELECT table_name FROM information_schema.tables"
        " WHERE table_schema NOT IN ('pg_catalog', 'information_schema')"
    )
    with psycopg.connect(url) as connection:
        return [row[0] for row in connection.execute(query)]


def test_the_server_answers_on_the_loopback_address(postgres_url: str) -> None:
    assert urlsplit(postgres_url).hostname == "127.0.0.1"
    with psycopg.connect(postgres_url) as connection:
        assert connection.execute("SELECT 1").fetchone() == (1,)


def test_a_test_database_starts_empty(postgres_db_url: str, postgres_url: str) -> None:
    assert urlsplit(postgres_db_url).path != urlsplit(postgres_url).path
    assert _tables(postgres_db_url) == []


def test_two_test_databases_are_distinct(new_postgres_db: Callable[[], str]) -> None:
    first = new_postgres_db()
    with psycopg.connect(first) as connection:
        connection.execute("CREATE TABLE images (name text)")

    second = new_postgres_db()

    assert first != second
    assert _tables(first) == ["images"]
    assert _tables(second) == []
