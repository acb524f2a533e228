"""The two databases the registry runs on: an SQLite file (the default) and PostgreSQL.

The registry writes its queries once, with `?` placeholders, and a backend runs them. Each
backend brings its schema as numbered migrations, applied in order inside one transaction, so a
registry is either wholly at the old schema or wholly at the new one.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from pipeline import failpoints
from pipeline.errors import PipelineError
from pipeline.semver import Version

Row = Any  # sqlite3.Row or a dict: both are read by column name


class RegistryUnavailable(PipelineError):
    """The registry's database cannot be opened or reached."""

    exit_code = 4


class Backend(Protocol):
    name: str
    # Appended to a SELECT that reads a row the transaction is about to change.
    for_update: str

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]: ...

    # Rows as plain tuples, read by position: for listings of thousands of rows.
    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int: ...

    def transaction(self) -> contextlib.AbstractContextManager[None]: ...

    def close(self) -> None: ...


# Tables whose definition is the same on both databases. Sort keys compare byte by byte:
# {collate} is BINARY on SQLite and "C" on PostgreSQL.
_CHANNELS = """
    CREATE TABLE channels (
        image TEXT NOT NULL,
        channel TEXT NOT NULL,
        version TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        PRIMARY KEY (image, channel),
        FOREIGN KEY (image, version) REFERENCES versions (image, version)
    );
"""
_NUMBERING_AND_REVOCATIONS = """
    CREATE TABLE lineages (
        image TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        seq INTEGER NOT NULL
    );
    CREATE TABLE version_numbers (
        image TEXT NOT NULL,
        version TEXT NOT NULL,
        sort_key TEXT COLLATE {collate} NOT NULL,
        PRIMARY KEY (image, version)
    );
    CREATE INDEX version_numbers_order ON version_numbers (image, sort_key);
    CREATE TABLE manifests (
        image TEXT NOT NULL,
        version TEXT NOT NULL,
        manifest TEXT NOT NULL,
        PRIMARY KEY (image, version)
    );
    CREATE TABLE revocations (
        image TEXT NOT NULL,
        version TEXT NOT NULL,
        reason TEXT NOT NULL,
        effective_at TEXT NOT NULL,
        recorded_at TEXT NOT NULL,
        actor TEXT NOT NULL,
        PRIMARY KEY (image, version)
    )
"""

# SQLite


def _sqlite_fill_order(db: sqlite3.Connection) -> None:
    """Migration 2, the part SQL cannot do: sort keys, per-image order and number lineages;
    manifests move to a table of their own (a listing then reads small rows only)."""
    rows = db.execute("SELECT image, version FROM versions ORDER BY created_at").fetchall()
    seen: dict[str, list[str]] = {}
    for image, version in rows:
        numbers = seen.setdefault(image, [])
        numbers.append(version)
        db.execute(
            "UPDATE versions SET sort_key = ?, seq = ? WHERE image = ? AND version = ?",
            (Version.parse(version).sort_text(), len(numbers), image, version),
        )
    for image, numbers in seen.items():
        db.execute(
            "INSERT INTO lineages (image, kind, seq) VALUES (?, 'image', ?)", (image, len(numbers))
        )
        db.executemany(
            "INSERT INTO version_numbers (image, version, sort_key) VALUES (?, ?, ?)",
            [(image, number, Version.parse(number).sort_text()) for number in numbers],
        )
    db.execute(
        "INSERT INTO manifests (image, version, manifest)"
        " SELECT image, version, manifest FROM versions"
    )
    db.execute("ALTER TABLE versions DROP COLUMN manifest")


SQLITE_MIGRATIONS: list[str | Callable[[sqlite3.Connection], None]] = [
    """
    CREATE TABLE versions (
        image TEXT NOT NULL,
        version TEXT NOT NULL,
        build_id TEXT NOT NULL UNIQUE,
        fingerprint TEXT NOT NULL,
        parent TEXT NOT NULL,
        state TEXT NOT NULL,
        path TEXT NOT NULL,
        manifest TEXT NOT NULL,
        failure TEXT NOT NULL DEFAULT '',
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        PRIMARY KEY (image, version)
    );
    CREATE INDEX versions_fingerprint ON versions (image, fingerprint);
    """
    + _CHANNELS
    + """
    CREATE TABLE channel_history (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        image TEXT NOT NULL,
        channel TEXT NOT NULL,
        from_version TEXT,
        to_version TEXT NOT NULL,
        at TEXT NOT NULL
    );
    """,
    # 2: order kept in the database, ancestry by name, number lineages, revocations.
    """
    ALTER TABLE versions ADD COLUMN seq INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE versions ADD COLUMN sort_key TEXT NOT NULL DEFAULT '';
    ALTER TABLE versions ADD COLUMN parent_image TEXT;
    ALTER TABLE versions ADD COLUMN parent_version TEXT;
    ALTER TABLE channel_history ADD COLUMN kind TEXT NOT NULL DEFAULT 'promote';
    ALTER TABLE channel_history ADD COLUMN actor TEXT NOT NULL DEFAULT '';
    """
    + _NUMBERING_AND_REVOCATIONS.format(collate="BINARY")
    + """;
    CREATE INDEX versions_order ON versions (image, sort_key, seq);
    CREATE INDEX versions_parent ON versions (parent_image, parent_version);
    CREATE INDEX channel_history_channel ON channel_history (image, channel, id)
    """,
    _sqlite_fill_order,
]


class SQLiteBackend:
    """One SQLite file; a write transaction takes the database's write lock when it begins."""

    name = "sqlite"
    for_update = ""

    def __init__(self, path: Path, *, create_folder: bool = False) -> None:
        if create_folder:
            path.parent.mkdir(parents=True, exist_ok=True)
        elif not path.parent.is_dir():
            raise RegistryUnavailable(f"cannot open the registry {path}: no folder {path.parent}")
        self.path = path
        self.url = f"sqlite:///{path}"
        try:
            self._db = sqlite3.connect(path, timeout=30, isolation_level=None)
        except sqlite3.Error as exc:
            raise RegistryUnavailable(f"cannot open the registry {path}: {exc}") from None
        self._db.row_factory = sqlite3.Row
        self._in_transaction = False
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise RegistryUnavailable(f"{path} is not a usable registry: {exc}") from None
        except BaseException:
            # A registry that cannot be brought up to date is not handed out half open.
            self._db.close()
            raise

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return self._db.execute(sql, params).fetchall()

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        cursor = self._db.cursor()
        cursor.row_factory = None
        return cursor.execute(sql, params).fetchall()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self._db.execute(sql, params).rowcount

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        if self._in_transaction:
            yield
            return
        self._db.execute("BEGIN IMMEDIATE")
        self._in_transaction = True
        try:
            yield
        except BaseException:
            self._in_transaction = False
            self._db.execute("ROLLBACK")
            raise
        failpoints.reach("registry.commit")
        self._in_transaction = False
        self._db.execute("COMMIT")

    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def close(self) -> None:
        self._db.close()

    def _migrate(self) -> None:
        with self.transaction():
            current = self.schema_version()
            for number, step in enumerate(SQLITE_MIGRATIONS[current:], start=current + 1):
                if callable(step):
                    step(self._db)
                else:
                    for statement in filter(str.strip, step.split(";")):
                        self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {number}")


# PostgreSQL

POSTGRES_MIGRATIONS: list[str] = [
    """
    CREATE TABLE versions (
        image TEXT NOT NULL,
        version TEXT NOT NULL,
        seq INTEGER NOT NULL,
        sort_key TEXT COLLATE "C" NOT NULL,
        build_id TEXT NOT NULL UNIQUE,
        fingerprint TEXT NOT NULL,
        parent TEXT NOT NULL,
        parent_image TEXT,
        parent_version TEXT,
        state TEXT NOT NULL,
        path TEXT NOT NULL,
        failure TEXT NOT NULL DEFAULT '',
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        PRIMARY KEY (image, version)
    );
    CREATE INDEX versions_fingerprint ON versions (image, fingerprint);
    CREATE INDEX versions_order ON versions (image, sort_key, seq);
    CREATE INDEX versions_parent ON versions (parent_image, parent_version);
    """
    + _CHANNELS
    + """
    CREATE TABLE channel_history (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        image TEXT NOT NULL,
        channel TEXT NOT NULL,
        from_version TEXT,
        to_version TEXT NOT NULL,
        at TEXT NOT NULL,
        kind TEXT NOT NULL DEFAULT 'promote',
        actor TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX channel_history_channel ON channel_history (image, channel, id);
    """
    + _NUMBERING_AND_REVOCATIONS.format(collate='"C"'),
]

# Any constant will do: it names "the registry's schema" among the server's advisory locks.
_MIGRATION_LOCK = 7_146_330_451


class PostgresBackend:
    """A PostgreSQL database shared by several machines; rows are locked with FOR UPDATE."""

    name = "postgresql"
    for_update = " FOR UPDATE"

    def __init__(self, url: str) -> None:
        import psycopg
        from psycopg.rows import dict_row

        self.url = url
        self._psycopg = psycopg
        try:
            self._db = psycopg.connect(
                url, autocommit=True, row_factory=dict_row, connect_timeout=15
            )
        except psycopg.Error as exc:
            message = f"cannot reach the registry at {redact(url)}: {_first_line(exc)}"
            raise RegistryUnavailable(message) from None
        self._transaction: Any = None
        try:
            self._migrate()
        except BaseException:
            self._db.close()
            raise

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return self._db.execute(_placeholders(sql), params).fetchall()

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        from psycopg.rows import tuple_row

        with self._db.cursor(row_factory=tuple_row) as cursor:
            return cursor.execute(_placeholders(sql), params).fetchall()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self._db.execute(_placeholders(sql), params).rowcount

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        if self._transaction is not None:
            yield
            return
        with self._db.transaction() as tx:
            self._transaction = tx
            try:
                yield
                failpoints.reach("registry.commit")
            finally:
                self._transaction = None

    def schema_version(self) -> int:
        rows = self.query("SELECT version FROM pipeline_schema")
        return int(rows[0]["version"]) if rows else 0

    def close(self) -> None:
        self._db.close()

    def _migrate(self) -> None:
        with self.transaction():
            # Two machines opening a new registry at once must not both create the tables.
            self.execute("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK,))
            self.execute("CREATE TABLE IF NOT EXISTS pipeline_schema (version INTEGER NOT NULL)")
            current = self.schema_version()
            for number, script in enumerate(POSTGRES_MIGRATIONS[current:], start=current + 1):
                for statement in filter(str.strip, script.split(";")):
                    self.execute(statement)
                self.execute("DELETE FROM pipeline_schema")
                self.execute("INSERT INTO pipeline_schema (version) VALUES (?)", (number,))


def _placeholders(sql: str) -> str:
    return sql.replace("?", "%s")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def redact(url: str) -> str:
    """The URL with its password, if any, replaced: it goes into messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))


URL_SCHEMES = ("sqlite", "postgresql", "postgres")
_SQLITE_URL = re.compile(r"sqlite:///(?P<path>.+)")
_POSTGRES_URL = re.compile(r"postgres(ql)?://.+")
# The forms a registry URL takes, as messages and the README give them.
URL_FORMS = (
    "sqlite:///PATH (PATH relative to the project folder), sqlite:////ABSOLUTE/PATH"
    " or postgresql://USER@HOST/DATABASE"
)


def url_problem(url: str) -> str:
    """Why `url` names no registry, or "" when it has one of the URL_FORMS."""
    if _POSTGRES_URL.fullmatch(url):
        return ""
    match = _SQLITE_URL.fullmatch(url)
    if match and match["path"] != ":memory:":
        return ""
    return f"{redact(url)!r} is not {URL_FORMS}"


def anchored(url: str, root: Path) -> str:
    """`url` with a relative SQLite path read from `root`, the project folder: the same URL then
    names the same file whichever folder a command runs in."""
    match = _SQLITE_URL.fullmatch(url)
    if match is None or Path(match["path"]).is_absolute():
        return url
    return f"sqlite:///{root / match['path']}"


def connect(url: str, *, create_folder: bool = False) -> Backend:
    """The backend for a registry URL: `sqlite:///path` or `postgresql://...`.

    An SQLite file's folder must exist unless `create_folder` (the default registry's, in the
    state folder): a mistyped path is refused rather than created. A relative path is read from
    the current folder: open_registry anchors one to the project folder first.
    """
    scheme = url.split(":", 1)[0]
    if scheme in ("postgresql", "postgres"):
        return PostgresBackend(url)
    match = _SQLITE_URL.fullmatch(url)
    if scheme == "sqlite" and match and match["path"] != ":memory:":
        return SQLiteBackend(Path(match["path"]), create_folder=create_folder)
    raise RegistryUnavailable(f"registry URL {url_problem(url)}")
