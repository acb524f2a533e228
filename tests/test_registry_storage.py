"""How the registry keeps its data: migrations from older schemas, and writes that a killed
process leaves as they were before or after, never between (SQLite and PostgreSQL)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.registry import Registry, backends
from pipeline.registry.backends import connect

# The first schema, as the first release of the pipeline created it, with two bakes in it.
VERSION_1 = """
CREATE TABLE versions (image TEXT NOT NULL, version TEXT NOT NULL, build_id TEXT NOT NULL UNIQUE,
  fingerprint TEXT NOT NULL, parent TEXT NOT NULL, state TEXT NOT NULL, path TEXT NOT NULL,
  manifest TEXT NOT NULL, failure TEXT NOT NULL DEFAULT '', created_at TEXT NOT NULL,
  updated_at TEXT NOT NULL, PRIMARY KEY (image, version));
CREATE INDEX versions_fingerprint ON versions (image, fingerprint);
CREATE TABLE channels (image TEXT NOT NULL, channel TEXT NOT NULL, version TEXT NOT NULL,
  updated_at TEXT NOT NULL, PRIMARY KEY (image, channel),
  FOREIGN KEY (image, version) REFERENCES versions (image, version));
CREATE TABLE channel_history (id INTEGER PRIMARY KEY AUTOINCREMENT, image TEXT NOT NULL,
  channel TEXT NOT NULL, from_version TEXT, to_version TEXT NOT NULL, at TEXT NOT NULL);
INSERT INTO versions VALUES ('web', '1.0.10', 'b2', 'f2', 'base:abc', 'verified', '/i/1.0.10',
  '{}', '', '2026-12-01T10:00:00+00:00', '2026-12-01T10:00:00+00:00');
INSERT INTO versions VALUES ('web', '1.0.9', 'b1', 'f1', 'base:abc', 'failed', '/i/1.0.9',
  '{}', 'role failed', '2026-12-01T09:00:00+00:00', '2026-12-01T09:00:00+00:00');
INSERT INTO channels VALUES ('web', 'dev', '1.0.10', '2026-12-01T10:05:00+00:00');
INSERT INTO channel_history (image, channel, from_version, to_version, at)
  VALUES ('web', 'dev', NULL, '1.0.10', '2026-12-01T10:05:00+00:00');
PRAGMA user_version = 1;
"""


def test_a_registry_of_the_first_schema_is_migrated_with_its_data(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    with sqlite3.connect(path) as db:
        db.executescript(VERSION_1)

    registry = Registry(connect(f"sqlite:///{path}"))
    try:
        assert [v.version for v in registry.versions("web")] == ["1.0.9", "1.0.10"]
        channel = registry.channel("web", "dev")
        assert channel is not None and channel.version == "1.0.10"
        assert registry.get("web", "1.0.9").failure == "role failed"
        # Numbers used before the migration stay used.
        reserved = registry.reserve(
            "web", declared="1.0.9", bump="patch", build_id="b3", fingerprint="f3", path="/p"
        )
        assert reserved.version == "1.0.11"
        assert registry.rollback_target("web", "dev") is None
    finally:
        registry.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(backends.SQLITE_MIGRATIONS)


def test_a_migration_that_fails_halfway_applies_none_of_its_statements_sqlite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "registry.db"
    Registry(connect(f"sqlite:///{path}")).close()
    broken = "CREATE TABLE half_done (x INTEGER); INSERT INTO no_such_table VALUES (1)"
    monkeypatch.setattr(backends, "SQLITE_MIGRATIONS", [*backends.SQLITE_MIGRATIONS, broken])

    with pytest.raises(backends.RegistryUnavailable, match="no_such_table"):
        connect(f"sqlite:///{path}")

    with sqlite3.connect(path) as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
        user_version = db.execute("PRAGMA user_version").fetchone()[0]
    assert "half_done" not in tables
    assert user_version == len(backends.SQLITE_MIGRATIONS) - 1


def test_a_migration_that_fails_halfway_applies_none_of_its_statements_postgresql(
    postgres_db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import psycopg

    Registry(connect(postgres_db_url)).close()
    broken = "CREATE TABLE half_done (x INTEGER); INSERT INTO no_such_table VALUES (1)"
    monkeypatch.setattr(backends, "POSTGRES_MIGRATIONS", [*backends.POSTGRES_MIGRATIONS, broken])

    with pytest.raises(psycopg.errors.UndefinedTable):
        connect(postgres_db_url)

    with psycopg.connect(postgres_db_url) as db:
        tables = {row[0] for row in db.execute("SELECT tablename FROM pg_tables")}
        version = db.execute("SELECT version FROM pipeline_schema").fetchone()
    assert "half_done" not in tables
    assert version == (len(backends.POSTGRES_MIGRATIONS) - 1,)


def test_a_file_that_is_not_a_registry_is_refused_with_its_name(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    path.write_text("this is not a database\n" * 100)

    with pytest.raises(backends.RegistryUnavailable, match=f"{path} is not a usable registry"):
        connect(f"sqlite:///{path}")


def test_an_unreachable_server_is_named_without_its_password() -> None:
    # Port 9 on loopback: nothing listens there, the connection is refused at once.
    url = "postgresql://pipeline:s3cret@127.0.0.1:9/registry"

    with pytest.raises(backends.RegistryUnavailable) as caught:
        connect(url)

    assert "postgresql://pipeline:***@127.0.0.1:9/registry" in str(caught.value)
    assert "s3cret" not in str(caught.value)


# A process that kills itself (SIGKILL) after the Nth statement of one write.
KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from pipeline.registry import Registry
    from pipeline.registry.backends import connect

    url, after = sys.argv[1], int(sys.argv[2])
    registry = Registry(connect(url))
    real = registry.backend.execute
    count = 0

    def execute(sql, params=()):
        global count
        result = real(sql, params)
        count += 1
        if count == after:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    registry.backend.execute = execute
    registry.revoke("debian", "1.0.0", reason="bad kernel", descendants=True)
    print("finished", count)
    """
)


def _seed(url: str) -> None:
    registry = Registry(connect(url))
    try:
        registry.add(
            "debian", "1.0.0", build_id="d", fingerprint="d", state="built", path="/d", kind="base"
        )
        for number in ("1.0.0", "1.0.1", "1.0.2"):
            registry.add(
                "web",
                number,
                build_id=f"w{number}",
                fingerprint="w",
                state="verified",
                path="/w",
                parent=("debian", "1.0.0"),
            )
    finally:
        registry.close()


def _revoked(url: str) -> list[str]:
    registry = Registry(connect(url))
    try:
        return sorted(v.label for v in registry.all_versions() if v.revocation is not None)
    finally:
        registry.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_write_killed_at_any_statement_leaves_all_or_nothing(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    everything = ["debian 1.0.0", "web 1.0.0", "web 1.0.1", "web 1.0.2"]
    outcomes = []
    after = 1
    while True:
        if backend == "sqlite":
            url = f"sqlite:///{tmp_path / f'registry-{after}.db'}"
        else:
            new_db: Callable[[], str] = request.getfixturevalue("new_postgres_db")
            url = new_db()
        _seed(url)
        done = subprocess.run(
            [sys.executable, "-c", KILLER, url, str(after)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        revoked = _revoked(url)
        assert revoked in ([], everything), f"killed after statement {after}: {revoked}"
        outcomes.append((done.returncode, revoked == everything))
        if done.returncode == 0:
            break
        assert done.returncode == -9, done.stderr
        after += 1
        assert after < 50, "the write never finished"

    # Killed inside the transaction: nothing; the run that was not killed: everything.
    assert outcomes[-1] == (0, True)
    assert all(outcome == (-9, False) for outcome in outcomes[:-1])
    assert len(outcomes) > 5
