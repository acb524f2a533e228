"""The image registry: versions, their order and ancestry, channels, revocations.

Every stage reads and writes it; none decides from file names or timestamps. Each write is one
transaction, and each transaction that changes an image first locks that image's row in
`lineages`, so writers of one image queue behind each other on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import getpass
import json
import os
import socket
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import UsageError
from pipeline.registry.backends import Backend, Row
from pipeline.semver import Version

STATES = ("building", "built", "verified", "failed")
USABLE = ("built", "verified")
BUMPS = ("patch", "minor", "major")


class ChannelMoved(UsageError):
    """A compare-and-swap on a channel found it somewhere other than expected."""

    def __init__(self, image: str, channel: str, expected: str | None, found: str | None) -> None:
        self.found = found
        was = expected or "nothing"
        now = found or "nothing"
        super().__init__(
            f"channel {channel} of {image} moved from {was} to {now} while this promotion"
            " was deciding; nothing was changed"
        )


@dataclass(frozen=True)
class Revocation:
    reason: str
    effective_at: str
    recorded_at: str
    actor: str

    def active(self, now: str | None = None) -> bool:
        return self.effective_at <= (now or utcnow())


# Not frozen: a listing builds ten thousand of these, and a frozen dataclass takes four times
# as long to build. Treat it as a value all the same.
@dataclass(slots=True)
class ImageVersion:
    """One baked artifact of an image (or one version of a base image)."""

    image: str
    version: str
    build_id: str
    fingerprint: str
    state: str
    path: str
    parent_image: str | None = None
    parent_version: str | None = None
    manifest: dict[str, Any] = field(default_factory=dict)
    failure: str = ""
    created_at: str = ""
    updated_at: str = ""
    seq: int = 0
    revocation: Revocation | None = None

    @property
    def label(self) -> str:
        return f"{self.image} {self.version}"

    @property
    def parent(self) -> str:
        if self.parent_image:
            return f"{self.parent_image} {self.parent_version}"
        return ""

    def revoked(self, now: str | None = None) -> bool:
        return self.revocation is not None and self.revocation.active(now)

    def status(self, now: str | None = None) -> str:
        """The state a person is shown: a revocation in force overrides the stored state."""
        return "revoked" if self.revoked(now) else self.state

    def why_unusable(self, now: str | None = None) -> str | None:
        """Why this version may not be promoted or deployed, or None when it may."""
        if self.revocation is not None and self.revocation.active(now):
            rev = self.revocation
            return f"{self.label} is revoked since {rev.effective_at}: {rev.reason}"
        if self.state != "verified":
            reason = f": {self.failure}" if self.failure else ""
            return f"{self.label} is {self.state}{reason}"
        return None


@dataclass(frozen=True)
class Lineage:
    image: str
    kind: str  # "image" or "base"


@dataclass(frozen=True)
class ChannelMove:
    """One move of a channel, or the answer to a request that moved nothing."""

    image: str
    channel: str
    previous: str | None
    current: str | None
    moved: bool
    kind: str = "promote"
    at: str = ""
    actor: str = ""
    note: str = ""


@dataclass(frozen=True)
class Channel:
    image: str
    channel: str
    version: str
    updated_at: str


_COLUMNS = (
    "v.image, v.version, v.seq, v.build_id, v.fingerprint, v.parent_image, v.parent_version,"
    " v.state, v.path, v.failure, v.created_at, v.updated_at,"
    " r.reason, r.effective_at, r.recorded_at, r.actor"
)
_FROM = " FROM versions v LEFT JOIN revocations r ON r.image = v.image AND r.version = v.version"
_FROM_WITH_MANIFEST = (
    _FROM + " LEFT JOIN manifests m ON m.image = v.image AND m.version = v.version"
)


class Registry:
    """Versions, channels and revocations of every image, on one backend."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    @property
    def url(self) -> str:
        return str(getattr(self.backend, "url", self.backend.name))

    def close(self) -> None:
        self.backend.close()

    # reading versions

    def get(self, image: str, version: str) -> ImageVersion:
        rows = self.backend.query(
            f"SELECT {_COLUMNS}, m.manifest{_FROM_WITH_MANIFEST}"
            " WHERE v.image = ? AND v.version = ?",
            (image, version),
        )
        if not rows:
            raise UsageError(self._unknown(image, version))
        return _version(rows[0], with_manifest=True)

    def find(self, image: str, version: str) -> ImageVersion | None:
        try:
            return self.get(image, version)
        except UsageError:
            return None

    def versions(self, image: str) -> list[ImageVersion]:
        """Every version of `image`, oldest first in semantic-version order (no manifests)."""
        return self._listing(" WHERE v.image = ? ORDER BY v.sort_key, v.seq", (image,))

    def all_versions(self) -> list[ImageVersion]:
        return self._listing(" ORDER BY v.image, v.sort_key, v.seq", ())

    def _listing(self, where: str, params: tuple[str, ...]) -> list[ImageVersion]:
        """Versions for a listing: plain rows, read by position (the fast path; no manifests)."""
        with no_collection():
            return self._build_listing(where, params)

    def _build_listing(self, where: str, params: tuple[str, ...]) -> list[ImageVersion]:
        found = []
        for row in self.backend.rows(f"SELECT {_COLUMNS}{_FROM}{where}", params):
            revocation = None if row[12] is None else Revocation(*row[12:16])
            found.append(
                ImageVersion(
                    row[0],  # image
                    row[1],  # version
                    row[3],  # build_id
                    row[4],  # fingerprint
                    row[7],  # state
                    row[8],  # path
                    row[5],  # parent_image
                    row[6],  # parent_version
                    {},  # manifest
                    row[9],  # failure
                    row[10],  # created_at
                    row[11],  # updated_at
                    row[2],  # seq
                    revocation,
                )
            )
        return found

    def latest(
        self, image: str, *, states: Sequence[str] = STATES, unrevoked: bool = False
    ) -> ImageVersion | None:
        """The highest version in semantic-version order (ties: the one recorded last)."""
        marks = ",".join("?" for _ in states)
        sql = (
            f"SELECT {_COLUMNS}{_FROM} WHERE v.image = ? AND v.state IN ({marks})"
            " ORDER BY v.sort_key DESC, v.seq DESC LIMIT ?"
        )
        limit = 1
        while True:
            rows = self.backend.query(sql, (image, *states, limit))
            now = utcnow()
            for row in rows:
                found = _version(row)
                if not (unrevoked and found.revoked(now)):
                    return found
            if len(rows) < limit:
                return None
            limit *= 8

    def by_fingerprint(self, image: str, fingerprint: str) -> ImageVersion | None:
        """The newest usable, unrevoked version baked from exactly these inputs, if any."""
        rows = self.backend.query(
            f"SELECT {_COLUMNS}, m.manifest{_FROM_WITH_MANIFEST}"
            " WHERE v.image = ? AND v.fingerprint = ?"
            " AND v.state IN ('built', 'verified') ORDER BY v.sort_key DESC, v.seq DESC",
            (image, fingerprint),
        )
        now = utcnow()
        found = [_version(row, with_manifest=True) for row in rows]
        usable = [v for v in found if not v.revoked(now)]
        return usable[0] if usable else None

    def revoked_with_fingerprint(self, image: str, fingerprint: str) -> list[ImageVersion]:
        """Versions revoked by now that were baked from exactly these inputs."""
        rows = self.backend.query(
            f"SELECT {_COLUMNS}{_FROM} WHERE v.image = ? AND v.fingerprint = ?"
            " AND r.reason IS NOT NULL ORDER BY v.sort_key, v.seq",
            (image, fingerprint),
        )
        now = utcnow()
        return [v for v in map(_version, rows) if v.revoked(now)]

    def children(self, image: str, version: str) -> list[ImageVersion]:
        rows = self.backend.query(
            f"SELECT {_COLUMNS}{_FROM} WHERE v.parent_image = ? AND v.parent_version = ?"
            " ORDER BY v.image, v.sort_key, v.seq",
            (image, version),
        )
        return [_version(row) for row in rows]

    def descendants(self, image: str, version: str) -> list[ImageVersion]:
        """Every version built on this one, directly or through others (each once)."""
        found: list[ImageVersion] = []
        seen = {(image, version)}
        queue = [(image, version)]
        while queue:
            for child in self.children(*queue.pop(0)):
                key = (child.image, child.version)
                if key not in seen:
                    seen.add(key)
                    found.append(child)
                    queue.append(key)
        return found

    def lineages(self) -> list[Lineage]:
        rows = self.backend.query("SELECT image, kind FROM lineages ORDER BY kind, image")
        return [Lineage(row["image"], row["kind"]) for row in rows]

    def lineage(self, image: str) -> Lineage | None:
        rows = self.backend.query("SELECT image, kind FROM lineages WHERE image = ?", (image,))
        return Lineage(rows[0]["image"], rows[0]["kind"]) if rows else None

    def newest_parent(self, image: str) -> ImageVersion | None:
        """What a version built on `image` today would be built on: its newest usable version."""
        lineage = self.lineage(image)
        states = USABLE if lineage is not None and lineage.kind == "base" else ("verified",)
        return self.latest(image, states=states, unrevoked=True)

    def outdated(self, version: ImageVersion) -> ImageVersion | None:
        """The newer parent when `version` was built on one that is no longer the newest."""
        if not version.parent_image or not version.parent_version:
            return None
        newest = self.newest_parent(version.parent_image)
        if newest is None or newest.version == version.parent_version:
            return None
        parent = self.find(version.parent_image, version.parent_version)
        if parent is not None and _order(parent) >= _order(newest):
            return None
        return newest

    # numbering and recording versions

    def next_number(self, image: str, declared: str, bump: str) -> str:
        """The number the next version gets (what `reserve` would pick now)."""
        return self._next_number(image, declared, bump)

    def reserve(
        self,
        image: str,
        *,
        declared: str,
        bump: str,
        build_id: str,
        fingerprint: str,
        path: str,
        parent: tuple[str, str] | None = None,
        kind: str = "image",
    ) -> ImageVersion:
        """Take the next number for a bake that is starting, recorded as `building`.

        A number, once taken, is never handed out again, even when its version failed or was
        deleted by `gc`.
        """
        if bump not in BUMPS:
            raise ValueError(f"unknown bump {bump!r}")
        with self.backend.transaction():
            self._lock_lineage(image, kind)
            number = self._next_number(image, declared, bump)
            self._insert(
                image,
                number,
                build_id=build_id,
                fingerprint=fingerprint,
                parent=parent,
                state="building",
                path=path,
                manifest={},
            )
        return self.get(image, number)

    def add(
        self,
        image: str,
        version: str,
        *,
        build_id: str,
        fingerprint: str,
        state: str,
        path: str,
        parent: tuple[str, str] | None = None,
        manifest: dict[str, Any] | None = None,
        failure: str = "",
        kind: str = "image",
    ) -> ImageVersion:
        """Record a version under a number chosen by the caller; a number is never reused."""
        Version.parse(version)
        if state not in STATES:
            raise ValueError(f"unknown state {state!r}")
        with self.backend.transaction():
            self._lock_lineage(image, kind)
            if self.number_used(image, version):
                raise UsageError(f"{image} {version} was used before; a number is never reused")
            self._insert(
                image,
                version,
                build_id=build_id,
                fingerprint=fingerprint,
                parent=parent,
                state=state,
                path=path,
                manifest=manifest or {},
                failure=failure,
            )
        return self.get(image, version)

    def record_base(
        self, image: str, *, fingerprint: str, build_id: str, path: str, manifest: dict[str, Any]
    ) -> ImageVersion:
        """The base version for these inputs: the newest one if it has them, else a new one.

        A base that goes back to inputs it had before gets a new number, so that the newest
        version of a base is always the one images are built on today.
        """
        with self.backend.transaction():
            self._lock_lineage(image, "base")
            newest = self.latest(image, states=USABLE, unrevoked=True)
            if newest is not None and newest.fingerprint == fingerprint:
                return self.get(image, newest.version)
            number = self._next_number(image, "1.0.0", "patch")
            self._insert(
                image,
                number,
                build_id=build_id,
                fingerprint=fingerprint,
                parent=None,
                state="built",
                path=path,
                manifest=manifest,
            )
        return self.get(image, number)

    def finish(
        self, image: str, version: str, *, state: str, manifest: dict[str, Any], path: str
    ) -> ImageVersion:
        """Record a finished build: its manifest, where its files are, and its state."""
        if state not in STATES:
            raise ValueError(f"unknown state {state!r}")
        with self.backend.transaction():
            self._lock_lineage(image)
            self.backend.execute(
                "UPDATE versions SET path = ? WHERE image = ? AND version = ?",
                (path, image, version),
            )
            self.backend.execute(
                "UPDATE manifests SET manifest = ? WHERE image = ? AND version = ?",
                (json.dumps(manifest, sort_keys=True), image, version),
            )
            self._set_state(image, version, state, "")
        return self.get(image, version)

    def set_state(self, image: str, version: str, state: str, failure: str = "") -> None:
        if state not in STATES:
            raise ValueError(f"unknown state {state!r}")
        with self.backend.transaction():
            self._lock_lineage(image)
            self._set_state(image, version, state, failure)

    def abandoned_builds(self, image: str) -> list[ImageVersion]:
        """Versions still marked `building` (their bake must be over if the caller holds the
        image's lock)."""
        rows = self.backend.query(
            f"SELECT {_COLUMNS}{_FROM} WHERE v.image = ? AND v.state = 'building'", (image,)
        )
        return [_version(row) for row in rows]

    # channels

    def channel(self, image: str, channel: str) -> ImageVersion | None:
        rows = self.backend.query(
            "SELECT version FROM channels WHERE image = ? AND channel = ?", (image, channel)
        )
        return self.get(image, rows[0]["version"]) if rows else None

    def channels(self, image: str | None = None) -> list[Channel]:
        sql = "SELECT image, channel, version, updated_at FROM channels"
        params: tuple[str, ...] = ()
        if image is not None:
            sql += " WHERE image = ?"
            params = (image,)
        rows = self.backend.query(sql + " ORDER BY image, channel", params)
        return [Channel(r["image"], r["channel"], r["version"], r["updated_at"]) for r in rows]

    def history(self, image: str, channel: str) -> list[ChannelMove]:
        """Every move of the channel, oldest first."""
        rows = self.backend.query(
            "SELECT from_version, to_version, at, kind, actor FROM channel_history"
            " WHERE image = ? AND channel = ? ORDER BY id",
            (image, channel),
        )
        return [
            ChannelMove(
                image=image,
                channel=channel,
                previous=row["from_version"],
                current=row["to_version"],
                moved=True,
                kind=row["kind"],
                at=row["at"],
                actor=row["actor"],
            )
            for row in rows
        ]

    def promote(
        self,
        image: str,
        channel: str,
        version: str,
        *,
        expect: object = ...,
        allow_older: bool = False,
    ) -> ChannelMove:
        """Point `channel` at `version`, a verified and unrevoked version.

        A compare-and-swap: with `expect` given, the channel must still point there (None: at
        nothing) or ChannelMoved is raised and nothing changes. Without `allow_older`, a channel
        already on a newer version stays there: two promotions racing leave it on the newer of
        the two, whichever commits first.
        """
        with self.backend.transaction():
            self._lock_lineage(image)
            target = self.get(image, version)
            refusal = target.why_unusable()
            if refusal is not None:
                raise UsageError(f"cannot promote to {channel}: {refusal}")
            current = self._channel_version(image, channel)
            _check_expected(image, channel, current, expect)
            if current == version:
                return ChannelMove(image, channel, current, current, False, note="already there")
            if current is not None and not allow_older:
                held = self.find(image, current)
                if held is not None and _order(held) > _order(target):
                    note = f"already on {current}, newer than {version}"
                    return ChannelMove(image, channel, current, current, False, note=note)
            return self._move(image, channel, current, version, "promote")

    def rollback_target(self, image: str, channel: str) -> str | None:
        """The version the channel held before its current one (promotions stack, rollbacks pop)."""
        stack: list[str] = []
        for move in self.history(image, channel):
            if move.kind == "rollback" and stack:
                stack.pop()
                if not stack or stack[-1] != move.current:
                    stack.append(move.current or "")
            else:
                stack.append(move.current or "")
        return stack[-2] if len(stack) >= 2 else None

    def usable_rollback_target(self, image: str, channel: str) -> ImageVersion | None:
        """The version a rollback of `channel` would move to, if it exists and may be used."""
        back = self.rollback_target(image, channel)
        target = self.find(image, back) if back is not None else None
        return target if target is not None and target.why_unusable() is None else None

    def rollback(self, image: str, channel: str, *, expect: object = ...) -> ChannelMove:
        """Move `channel` back to the version it held before its current one."""
        with self.backend.transaction():
            self._lock_lineage(image)
            current = self._channel_version(image, channel)
            if current is None:
                raise UsageError(
                    f"channel {channel} of {image} points at nothing; nothing to roll back"
                )
            _check_expected(image, channel, current, expect)
            previous = self.rollback_target(image, channel)
            if previous is None:
                raise UsageError(
                    f"channel {channel} of {image} has had no version before {current};"
                    " nothing to roll back to"
                )
            target = self.find(image, previous)
            if target is None:
                raise UsageError(
                    f"cannot roll {channel} back: its previous version {image} {previous} has"
                    " been deleted"
                )
            refusal = target.why_unusable()
            if refusal is not None:
                raise UsageError(f"cannot roll {channel} back: {refusal}")
            return self._move(image, channel, current, previous, "rollback")

    # revocation

    def revoke(
        self,
        image: str,
        version: str,
        *,
        reason: str,
        at: str | None = None,
        descendants: bool = False,
    ) -> list[ImageVersion]:
        """Revoke a version (and, if asked, every version built on it) from `at` on.

        A revocation only ever comes earlier: a version already revoked from a time at or before
        `at` keeps its revocation (and reason) as it is.
        """
        if not reason.strip():
            raise UsageError("a revocation needs a reason (--reason TEXT)")
        now = utcnow()
        effective = at or now
        with self.backend.transaction():
            self._lock_lineage(image)
            targets = [self.get(image, version)]
            if descendants:
                targets += self.descendants(image, version)
            for target in targets:
                held = target.revocation
                if held is not None and held.effective_at <= effective:
                    continue
                self.backend.execute(
                    "DELETE FROM revocations WHERE image = ? AND version = ?",
                    (target.image, target.version),
                )
                self.backend.execute(
                    "INSERT INTO revocations (image, version, reason, effective_at, recorded_at,"
                    " actor) VALUES (?,?,?,?,?,?)",
                    (target.image, target.version, reason, effective, now, actor()),
                )
        return [self.get(t.image, t.version) for t in targets]

    # deletion (retention)

    def delete(self, versions: Iterable[tuple[str, str]]) -> int:
        """Delete these version records in one transaction; their numbers stay used."""
        pairs = list(versions)
        with self.backend.transaction():
            for image in sorted({image for image, _ in pairs}):
                self._lock_lineage(image)
            held = {(c.image, c.version): c.channel for c in self.channels()}
            for pair in pairs:
                if pair in held:
                    raise UsageError(
                        f"{pair[0]} {pair[1]} is on channel {held[pair]}; it cannot be deleted"
                    )
            for image, version in pairs:
                self.backend.execute(
                    "DELETE FROM revocations WHERE image = ? AND version = ?", (image, version)
                )
                self.backend.execute(
                    "DELETE FROM manifests WHERE image = ? AND version = ?", (image, version)
                )
                self.backend.execute(
                    "DELETE FROM versions WHERE image = ? AND version = ?", (image, version)
                )
        return len(pairs)

    # inside transactions

    def _lock_lineage(self, image: str, kind: str | None = None) -> None:
        """Create the image's lineage row if needed and lock it for this transaction."""
        if kind is not None:
            self.backend.execute(
                "INSERT INTO lineages (image, kind, seq) VALUES (?, ?, 0)"
                " ON CONFLICT (image) DO NOTHING",
                (image, kind),
            )
        rows = self.backend.query(
            "SELECT kind FROM lineages WHERE image = ?" + self.backend.for_update, (image,)
        )
        if not rows and kind is None:
            raise UsageError(self._unknown(image, None))
        if rows and kind is not None and rows[0]["kind"] != kind:
            raise UsageError(f"{image!r} is a {rows[0]['kind']} image, not a {kind} image")

    def number_used(self, image: str, version: str) -> bool:
        """Whether `version` was ever given to a version of `image` (deleted ones included)."""
        rows = self.backend.query(
            "SELECT 1 AS used FROM version_numbers WHERE image = ? AND version = ?",
            (image, version),
        )
        return bool(rows)

    def _next_number(self, image: str, declared: str, bump: str) -> str:
        """The declared number if it was never used, else a bump of the highest number used."""
        if not self.number_used(image, declared):
            return declared
        rows = self.backend.query(
            "SELECT version FROM version_numbers WHERE image = ? ORDER BY sort_key DESC LIMIT 1",
            (image,),
        )
        candidate = Version.parse(rows[0]["version"]).bump(bump)
        while self.number_used(image, str(candidate)):  # only after hand-made pre-releases
            candidate = candidate.bump("patch")
        return str(candidate)

    def _insert(
        self,
        image: str,
        version: str,
        *,
        build_id: str,
        fingerprint: str,
        parent: tuple[str, str] | None,
        state: str,
        path: str,
        manifest: dict[str, Any],
        failure: str = "",
    ) -> None:
        now = utcnow()
        self.backend.execute("UPDATE lineages SET seq = seq + 1 WHERE image = ?", (image,))
        seq = self.backend.query("SELECT seq FROM lineages WHERE image = ?", (image,))[0]["seq"]
        sort_text = Version.parse(version).sort_text()
        self.backend.execute(
            "INSERT INTO version_numbers (image, version, sort_key) VALUES (?, ?, ?)",
            (image, version, sort_text),
        )
        self.backend.execute(
            "INSERT INTO manifests (image, version, manifest) VALUES (?, ?, ?)",
            (image, version, json.dumps(manifest, sort_keys=True)),
        )
        self.backend.execute(
            "INSERT INTO versions (image, version, seq, sort_key, build_id, fingerprint, parent,"
            " parent_image, parent_version, state, path, failure, created_at,"
            " updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                image,
                version,
                seq,
                sort_text,
                build_id,
                fingerprint,
                " ".join(parent) if parent else "",
                parent[0] if parent else None,
                parent[1] if parent else None,
                state,
                path,
                failure,
                now,
                now,
            ),
        )

    def _set_state(self, image: str, version: str, state: str, failure: str) -> None:
        changed = self.backend.execute(
            "UPDATE versions SET state = ?, failure = ?, updated_at = ?"
            " WHERE image = ? AND version = ?",
            (state, failure, utcnow(), image, version),
        )
        if not changed:
            raise UsageError(self._unknown(image, version))

    def _channel_version(self, image: str, channel: str) -> str | None:
        rows = self.backend.query(
            "SELECT version FROM channels WHERE image = ? AND channel = ?", (image, channel)
        )
        return rows[0]["version"] if rows else None

    def _move(
        self, image: str, channel: str, previous: str | None, version: str, kind: str
    ) -> ChannelMove:
        now, who = utcnow(), actor()
        self.backend.execute(
            "INSERT INTO channels (image, channel, version, updated_at) VALUES (?,?,?,?)"
            " ON CONFLICT (image, channel) DO UPDATE SET version = excluded.version,"
            " updated_at = excluded.updated_at",
            (image, channel, version, now),
        )
        self.backend.execute(
            "INSERT INTO channel_history (image, channel, from_version, to_version, at, kind,"
            " actor) VALUES (?,?,?,?,?,?,?)",
            (image, channel, previous, version, now, kind, who),
        )
        return ChannelMove(image, channel, previous, version, True, kind, now, who)

    def _unknown(self, image: str, version: str | None) -> str:
        if version is None or self.lineage(image) is None:
            known = ", ".join(lineage.image for lineage in self.lineages()) or "none yet"
            return f"the registry has no image {image!r} (images: {known})"
        newest = ", ".join(v.version for v in self.versions(image)[-5:]) or "none"
        return f"{image} has no version {version!r} (newest: {newest})"


def _check_expected(image: str, channel: str, current: str | None, expect: object) -> None:
    """The compare of a compare-and-swap: `...` expects nothing in particular."""
    if expect is not ... and current != expect:
        raise ChannelMoved(image, channel, expect if isinstance(expect, str) else None, current)


def _order(version: ImageVersion) -> tuple[Any, ...]:
    return (Version.parse(version.version).key(), version.seq)


def _version(row: Row, *, with_manifest: bool = False) -> ImageVersion:
    revocation = None
    if row["reason"] is not None:
        revocation = Revocation(
            reason=row["reason"],
            effective_at=row["effective_at"],
            recorded_at=row["recorded_at"],
            actor=row["actor"],
        )
    return ImageVersion(
        image=row["image"],
        version=row["version"],
        build_id=row["build_id"],
        fingerprint=row["fingerprint"],
        state=row["state"],
        path=row["path"],
        parent_image=row["parent_image"],
        parent_version=row["parent_version"],
        manifest=json.loads(row["manifest"]) if with_manifest else {},
        failure=row["failure"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        seq=row["seq"],
        revocation=revocation,
    )


@contextlib.contextmanager
def no_collection() -> Iterator[None]:
    """Pause Python's cycle collector: building ten thousand objects otherwise sets it off
    several times over, for nothing (they hold no cycles)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def utcnow() -> str:
    return format_time(dt.datetime.now(dt.UTC))


def format_time(moment: dt.datetime) -> str:
    """Times are stored as UTC ISO 8601 text with microseconds, so text order is time order."""
    return moment.astimezone(dt.UTC).isoformat(timespec="microseconds")


def actor() -> str:
    """Who made a change: user, host and process, for the history."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()} pid {os.getpid()}"
