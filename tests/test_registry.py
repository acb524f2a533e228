"""The registry: semantic-version order, new numbers, fingerprints, promotion, durable writes."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.errors import UsageError
from pipeline.registry import sqlite as registry_mod
from pipeline.registry.sqlite import ImageVersion, Registry
from pipeline.semver import Version, sort_key


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "registry.db"


@pytest.fixture
def registry(db_path: Path) -> Iterator[Registry]:
    opened = Registry(db_path)
    yield opened
    opened.close()


def _add(
    registry: Registry,
    version: str,
    *,
    state: str = "built",
    fingerprint: str = "fp-default",
    build_id: str | None = None,
    failure: str = "",
) -> ImageVersion:
    return registry.add(
        ImageVersion(
            image="web",
            version=version,
            build_id=build_id or f"build-{version}",
            fingerprint=fingerprint,
            parent="base:abc",
            state=state,
            path=f"/images/web/{version}",
            manifest={"version": version},
            failure=failure,
        )
    )


def _numbers(registry: Registry) -> list[str]:
    return [v.version for v in registry.versions("web")]


# Semantic-version order


def test_prereleases_sort_below_their_release_and_numbers_compare_as_numbers() -> None:
    # The precedence example of semver.org, section 11, shuffled.
    ordered = [
        "1.0.0-alpha",
        "1.0.0-alpha.1",
        "1.0.0-alpha.beta",
        "1.0.0-beta",
        "1.0.0-beta.2",
        "1.0.0-beta.11",
        "1.0.0-rc.1",
        "1.0.0",
        "1.9.0",
        "1.10.0-rc.1",
        "1.10.0",
    ]
    shuffled = [ordered[i] for i in (8, 3, 10, 0, 6, 2, 9, 5, 1, 7, 4)]

    assert sorted(shuffled, key=sort_key) == ordered


def test_build_metadata_does_not_affect_order() -> None:
    assert sort_key("1.0.0+build.1") == sort_key("1.0.0+build.2") == sort_key("1.0.0")
    assert str(Version.parse("1.0.0-rc.1+sha.5114f85")) == "1.0.0-rc.1+sha.5114f85"


@pytest.mark.parametrize("text", ["1.0", "v1.0.0", "1.0.0-", "1.0.0-01", "1.0.0\n", " 1.0.0"])
def test_a_malformed_version_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="is not a semantic version"):
        Version.parse(text)


def test_the_registry_lists_versions_in_semantic_order(registry: Registry) -> None:
    for number in ("1.10.0", "1.9.0", "1.10.0-rc.1", "1.2.0"):
        _add(registry, number)

    assert _numbers(registry) == ["1.2.0", "1.9.0", "1.10.0-rc.1", "1.10.0"]


def test_a_patch_of_an_older_line_baked_later_does_not_become_latest(registry: Registry) -> None:
    _add(registry, "1.10.0")
    _add(registry, "1.9.1")

    assert registry.versions("web")[-1].version == "1.10.0"
    assert registry.next_version("web", "1.0.0", "patch") == "1.10.1"


# Next version


def test_the_first_version_is_the_declared_one(registry: Registry) -> None:
    assert registry.next_version("web", "1.4.0", "patch") == "1.4.0"


def test_a_declared_version_above_every_existing_one_is_used(registry: Registry) -> None:
    _add(registry, "1.0.3")

    assert registry.next_version("web", "2.0.0", "patch") == "2.0.0"


@pytest.mark.parametrize(
    ("bump", "expected"), [("patch", "1.4.3"), ("minor", "1.5.0"), ("major", "2.0.0")]
)
def test_an_already_used_declared_version_bumps_the_latest(
    registry: Registry, bump: str, expected: str
) -> None:
    _add(registry, "1.4.0")
    _add(registry, "1.4.2")

    assert registry.next_version("web", "1.4.0", bump) == expected


def test_a_declared_version_below_the_latest_bumps_the_latest(registry: Registry) -> None:
    _add(registry, "1.0.0")
    _add(registry, "2.0.0")

    assert registry.next_version("web", "1.5.0", "patch") == "2.0.1"


def test_a_prerelease_latest_is_followed_by_its_release(registry: Registry) -> None:
    _add(registry, "2.0.0-rc.1")

    assert registry.next_version("web", "1.0.0", "patch") == "2.0.0"


def test_the_number_of_a_failed_version_is_never_reused(registry: Registry) -> None:
    _add(registry, "1.0.0", state="verified")
    _add(registry, "1.0.1", state="failed", failure="health check timed out")

    assert registry.next_version("web", "1.0.0", "patch") == "1.0.2"


def test_a_run_of_failed_bakes_gets_a_new_number_each_time(registry: Registry) -> None:
    seen: list[str] = []
    for _ in range(6):
        number = registry.next_version("web", "1.0.0", "patch")
        assert number not in seen
        seen.append(number)
        _add(registry, number, state="failed")

    assert seen == ["1.0.0", "1.0.1", "1.0.2", "1.0.3", "1.0.4", "1.0.5"]


def test_other_images_do_not_take_numbers(registry: Registry) -> None:
    registry.add(
        ImageVersion("api", "3.0.0", "build-api", "f-api", "base:abc", "built", "/images/api")
    )

    assert registry.next_version("web", "1.0.0", "patch") == "1.0.0"


# Fingerprints


def test_a_failed_version_with_the_same_fingerprint_is_not_reused(registry: Registry) -> None:
    _add(registry, "1.0.0", state="failed", fingerprint="same")

    assert registry.by_fingerprint("web", "same") is None


def test_the_newest_usable_version_with_the_fingerprint_is_found(registry: Registry) -> None:
    _add(registry, "1.0.0", state="verified", fingerprint="same")
    _add(registry, "1.0.1", state="built", fingerprint="same")
    _add(registry, "1.0.2", state="failed", fingerprint="same")
    _add(registry, "1.0.3", state="revoked", fingerprint="same")
    _add(registry, "1.0.4", state="verified", fingerprint="other")

    found = registry.by_fingerprint("web", "same")

    assert found is not None
    assert found.version == "1.0.1"


# Promotion


@pytest.mark.parametrize(
    ("state", "failure", "reason"),
    [
        ("built", "", "it is built"),
        ("failed", "port 8080 never answered", "it is failed: port 8080 never answered"),
        ("revoked", "", "it is revoked"),
    ],
)
def test_only_a_verified_version_can_be_promoted(
    registry: Registry, state: str, failure: str, reason: str
) -> None:
    _add(registry, "1.0.0", state=state, failure=failure)

    with pytest.raises(UsageError) as caught:
        registry.promote("web", "dev", "1.0.0")

    assert str(caught.value) == f"cannot promote web 1.0.0 to dev: {reason}"
    assert registry.channel("web", "dev") is None


def test_promoting_an_unknown_version_names_it(registry: Registry) -> None:
    _add(registry, "1.0.0", state="verified")

    with pytest.raises(UsageError, match=r"web has no version '9\.9\.9' \(latest: 1\.0\.0\)"):
        registry.promote("web", "dev", "9.9.9")


def test_promotion_moves_the_channel_and_records_each_move(
    registry: Registry, db_path: Path
) -> None:
    _add(registry, "1.0.0", state="verified")
    _add(registry, "1.0.1", state="verified")

    moves = [
        registry.promote("web", "dev", "1.0.0"),
        registry.promote("web", "dev", "1.0.0"),
        registry.promote("web", "dev", "1.0.1"),
    ]

    assert moves == [True, False, True]
    channel = registry.channel("web", "dev")
    assert channel is not None
    assert channel.version == "1.0.1"
    with sqlite3.connect(db_path) as db:
        history = db.execute(
            "SELECT channel, from_version, to_version FROM channel_history ORDER BY id"
        ).fetchall()
    assert history == [("dev", None, "1.0.0"), ("dev", "1.0.0", "1.0.1")]


def test_channels_are_independent(registry: Registry) -> None:
    _add(registry, "1.0.0", state="verified")
    _add(registry, "1.0.1", state="verified")

    registry.promote("web", "prod", "1.0.0")
    registry.promote("web", "dev", "1.0.1")

    prod, dev = registry.channel("web", "prod"), registry.channel("web", "dev")
    assert (prod and prod.version, dev and dev.version) == ("1.0.0", "1.0.1")


# Durability


def test_reopening_an_existing_registry_keeps_its_data(db_path: Path) -> None:
    first = Registry(db_path)
    _add(first, "1.0.0", state="verified", fingerprint="kept")
    first.promote("web", "dev", "1.0.0")
    first.close()

    second = Registry(db_path)
    try:
        kept = second.get("web", "1.0.0")
        channel = second.channel("web", "dev")
    finally:
        second.close()

    assert (kept.state, kept.fingerprint) == ("verified", "kept")
    assert kept.manifest == {"version": "1.0.0"}
    assert channel is not None
    assert channel.version == "1.0.0"
    with sqlite3.connect(db_path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(registry_mod.MIGRATIONS)


def test_a_duplicate_build_id_is_refused_and_leaves_the_registry_as_it_was(
    registry: Registry,
) -> None:
    _add(registry, "1.0.0", build_id="20240101t000000-aaaaaa")

    with pytest.raises(sqlite3.IntegrityError):
        _add(registry, "1.0.1", build_id="20240101t000000-aaaaaa")

    assert _numbers(registry) == ["1.0.0"]
    _add(registry, "1.0.1", build_id="20240101t000000-bbbbbb")
    assert _numbers(registry) == ["1.0.0", "1.0.1"]


def test_a_migration_that_fails_halfway_applies_none_of_its_statements(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = Registry(db_path)
    _add(first, "1.0.0")
    first.close()
    broken = "CREATE TABLE half_done (x INTEGER); INSERT INTO no_such_table VALUES (1)"
    monkeypatch.setattr(registry_mod, "MIGRATIONS", [*registry_mod.MIGRATIONS, broken])

    with pytest.raises(sqlite3.OperationalError, match="no_such_table"):
        Registry(db_path)

    with sqlite3.connect(db_path) as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
        user_version = db.execute("PRAGMA user_version").fetchone()[0]
        versions = db.execute("SELECT version FROM versions").fetchall()
    assert "half_done" not in tables
    assert user_version == 1
    assert versions == [("1.0.0",)]
