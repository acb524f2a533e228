"""The image registry on SQLite: versions, their state, and the channels pointing at them.

Every write is one transaction, so a crash leaves the registry as it was before or after.
Schema changes are numbered migrations applied in order (PRAGMA user_version).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import UsageError
from pipeline.semver import Version, sort_key

STATES = ("built", "verified", "failed", "revoked")

MIGRATIONS = [
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
    CREATE TABLE channels (
        image TEXT NOT NULL,
        channel TEXT NOT NULL,
        version TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        PRIMARY KEY (image, channel),
        FOREIGN KEY (image, version) REFERENCES versions (image, version)
    );
    CREATE TABLE channel_history (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        image TEXT NOT NULL,
        channel TEXT NOT NULL,
        from_version TEXT,
        to_version TEXT NOT NULL,
        at TEXT NOT NULL
    );
    """,
]


@dataclass(frozen=True)
class ImageVersion:
    """One baked artifact of an image."""

    image: str
    version: str
    build_id: str
    fingerprint: str
    parent: str
    state: str
    path: str
    manifest: dict[str, Any] = field(default_factory=dict)
    failure: str = ""
    created_at: str = ""

    @property
    def label(self) -> str:
        return f"{self.image} {self.version}"


class Registry:
    """Versions and channels of every image, in one SQLite file."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, timeout=30, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        try:
            self._migrate()
        except BaseException:
            # A registry that cannot be brought up to date is not handed out half open.
            self._db.close()
            raise

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _migrate(self) -> None:
        with self._transaction() as db:
            current = db.execute("PRAGMA user_version").fetchone()[0]
            for number, script in enumerate(MIGRATIONS[current:], start=current + 1):
                for statement in filter(str.strip, script.split(";")):
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {number}")

    # versions

    def add(self, version: ImageVersion) -> ImageVersion:
        """Record a newly baked version; its number must be new for this image."""
        now = _now()
        with self._transaction() as db:
            db.execute(
                "INSERT INTO versions (image, version, build_id, fingerprint, parent, state, path,"
                " manifest, failure, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    version.image,
                    version.version,
                    version.build_id,
                    version.fingerprint,
                    version.parent,
                    version.state,
                    version.path,
                    json.dumps(version.manifest, sort_keys=True),
                    version.failure,
                    now,
                    now,
                ),
            )
        return self.get(version.image, version.version)

    def get(self, image: str, version: str) -> ImageVersion:
        row = self._db.execute(
            "SELECT * FROM versions WHERE image = ? AND version = ?", (image, version)
        ).fetchone()
        if row is None:
            known = ", ".join(v.version for v in self.versions(image)[-5:]) or "none"
            message = f"{image} has no version {version!r} (latest: {known})"
            raise UsageError(message)
        return _version(row)

    def versions(self, image: str) -> list[ImageVersion]:
        """Every version of `image`, oldest first in semantic-version order."""
        rows = self._db.execute("SELECT * FROM versions WHERE image = ?", (image,)).fetchall()
        found = [_version(row) for row in rows]
        return sorted(found, key=lambda v: (sort_key(v.version), v.created_at))

    def by_fingerprint(self, image: str, fingerprint: str) -> ImageVersion | None:
        """The newest usable version baked from exactly these inputs, if any."""
        rows = self._db.execute(
            "SELECT * FROM versions WHERE image = ? AND fingerprint = ?"
            " AND state IN ('built', 'verified')",
            (image, fingerprint),
        ).fetchall()
        found = sorted((_version(r) for r in rows), key=lambda v: sort_key(v.version))
        return found[-1] if found else None

    def next_version(self, image: str, declared: str, bump: str) -> str:
        """The next number: the declared one if it is new, else a bump of the latest."""
        existing = self.versions(image)
        wanted = Version.parse(declared)
        if not existing:
            return str(wanted)
        latest = Version.parse(existing[-1].version)
        if wanted.key() > latest.key():
            return str(wanted)
        return str(latest.bump(bump))

    def set_state(self, image: str, version: str, state: str, failure: str = "") -> None:
        if state not in STATES:
            raise ValueError(f"unknown state {state!r}")
        with self._transaction() as db:
            db.execute(
                "UPDATE versions SET state = ?, failure = ?, updated_at = ?"
                " WHERE image = ? AND version = ?",
                (state, failure, _now(), image, version),
            )

    # channels

    def channel(self, image: str, channel: str) -> ImageVersion | None:
        row = self._db.execute(
            "SELECT version FROM channels WHERE image = ? AND channel = ?", (image, channel)
        ).fetchone()
        return self.get(image, row["version"]) if row else None

    def promote(self, image: str, channel: str, version: str) -> bool:
        """Point `channel` at `version`; only a verified version may be promoted.

        Returns False when the channel already pointed there.
        """
        target = self.get(image, version)
        if target.state != "verified":
            reason = f": {target.failure}" if target.failure else ""
            message = f"cannot promote {target.label} to {channel}: it is {target.state}{reason}"
            raise UsageError(message)
        with self._transaction() as db:
            row = db.execute(
                "SELECT version FROM channels WHERE image = ? AND channel = ?", (image, channel)
            ).fetchone()
            previous = row["version"] if row else None
            if previous == version:
                return False
            db.execute(
                "INSERT INTO channels (image, channel, version, updated_at) VALUES (?,?,?,?)"
                " ON CONFLICT (image, channel) DO UPDATE SET version = excluded.version,"
                " updated_at = excluded.updated_at",
                (image, channel, version, _now()),
            )
            db.execute(
                "INSERT INTO channel_history (image, channel, from_version, to_version, at)"
                " VALUES (?,?,?,?,?)",
                (image, channel, previous, version, _now()),
            )
        return True


def _version(row: sqlite3.Row) -> ImageVersion:
    return ImageVersion(
        image=row["image"],
        version=row["version"],
        build_id=row["build_id"],
        fingerprint=row["fingerprint"],
        parent=row["parent"],
        state=row["state"],
        path=row["path"],
        manifest=json.loads(row["manifest"]),
        failure=row["failure"],
        created_at=row["created_at"],
    )


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")


def open_registry(state_dir: Path) -> Registry:
    return Registry(state_dir / "registry.db")
