"""The registry, on SQLite and on a real PostgreSQL server alike: order, numbers, fingerprints,
channels (compare-and-swap, history, rollback), ancestry, revocation and deletion."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pipeline.errors import UsageError
from pipeline.registry import ChannelMoved, ImageVersion, Registry, open_registry, retention
from pipeline.registry.backends import connect
from pipeline.semver import Version, sort_key

BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(params=BACKENDS)
def registry_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    new_db: Callable[[], str] = request.getfixturevalue("new_postgres_db")
    return new_db()


@pytest.fixture
def registry(registry_url: str) -> Iterator[Registry]:
    opened = Registry(connect(registry_url))
    yield opened
    opened.close()


def _add(
    registry: Registry,
    version: str,
    *,
    image: str = "web",
    state: str = "built",
    fingerprint: str = "fp-default",
    failure: str = "",
    parent: tuple[str, str] | None = None,
    kind: str = "image",
) -> ImageVersion:
    return registry.add(
        image,
        version,
        build_id=f"build-{image}-{version}",
        fingerprint=fingerprint,
        state=state,
        path=f"/images/{image}/{version}",
        parent=parent,
        manifest={"version": version},
        failure=failure,
        kind=kind,
    )


def _numbers(registry: Registry, image: str = "web") -> list[str]:
    return [v.version for v in registry.versions(image)]


def _at(days: float) -> str:
    moment = dt.datetime.now(dt.UTC) + dt.timedelta(days=days)
    return moment.isoformat(timespec="microseconds")


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
    # The text the database sorts by gives the same order, byte by byte.
    assert sorted(shuffled, key=lambda v: Version.parse(v).sort_text()) == ordered


def test_the_sort_text_agrees_with_semver_precedence_on_awkward_identifiers() -> None:
    texts = ["1.0.0-alpha-x", "1.0.0-alpha.1.2", "1.0.0-1", "1.0.0-a", "1.0.0-99999999999"]
    texts += ["1.0.0-alpha", "1.0.0-alpha.1", "10.0.0", "9.99.999", "1.0.0"]
    for a in texts:
        for b in texts:
            va, vb = Version.parse(a), Version.parse(b)
            assert (va.key() < vb.key()) == (va.sort_text() < vb.sort_text()), (a, b)


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


def test_a_hotfix_of_an_older_line_built_later_does_not_become_latest(registry: Registry) -> None:
    for number in ("1.9.0", "1.10.0-rc.1", "1.10.0", "1.9.1"):
        _add(registry, number, state="verified")

    latest = registry.latest("web")
    assert latest is not None and latest.version == "1.10.0"
    assert _numbers(registry) == ["1.9.0", "1.9.1", "1.10.0-rc.1", "1.10.0"]


def test_equal_precedence_is_broken_by_the_order_of_recording(registry: Registry) -> None:
    _add(registry, "1.0.0+b")
    _add(registry, "1.0.0+a")

    latest = registry.latest("web")
    assert latest is not None and latest.version == "1.0.0+a"
    assert _numbers(registry) == ["1.0.0+b", "1.0.0+a"]


def test_latest_can_skip_revoked_versions(registry: Registry) -> None:
    _add(registry, "1.0.0", state="verified")
    _add(registry, "1.0.1", state="verified")
    registry.revoke("web", "1.0.1", reason="bad openssl")

    latest = registry.latest("web", states=("verified",), unrevoked=True)
    assert latest is not None and latest.version == "1.0.0"


# Next number


def _reserve(registry: Registry, declared: str = "1.0.0", bump: str = "patch") -> str:
    count = len(registry.all_versions())
    return registry.reserve(
        "web",
        declared=declared,
        bump=bump,
        build_id=f"build-{count}",
        fingerprint=f"fp-{count}",
        path="/pending",
    ).version


def test_the_first_version_is_the_declared_one(registry: Registry) -> None:
    assert _reserve(registry, "1.4.0") == "1.4.0"


def test_a_declared_version_never_used_is_taken_as_written(registry: Registry) -> None:
    _add(registry, "1.0.3")
    _add(registry, "2.0.0")

    assert _reserve(registry, "2.1.0") == "2.1.0"
    # Below the latest too: that is how a hotfix of an older line is made.
    assert _reserve(registry, "1.0.4") == "1.0.4"


@pytest.mark.parametrize(
    ("bump", "expected"), [("patch", "1.4.3"), ("minor", "1.5.0"), ("major", "2.0.0")]
)
def test_an_already_used_declared_version_bumps_the_highest_number(
    registry: Registry, bump: str, expected: str
) -> None:
    _add(registry, "1.4.0")
    _add(registry, "1.4.2")

    assert _reserve(registry, "1.4.0", bump) == expected


def test_a_prerelease_highest_is_followed_by_its_release(registry: Registry) -> None:
    _add(registry, "1.0.0")
    _add(registry, "2.0.0-rc.1")

    assert _reserve(registry, "1.0.0") == "2.0.0"


def test_a_reserved_version_is_building_and_takes_its_number(registry: Registry) -> None:
    first = registry.reserve(
        "web", declared="1.0.0", bump="patch", build_id="b1", fingerprint="f", path="/p"
    )

    assert first.state == "building"
    assert _reserve(registry) == "1.0.1"
    assert registry.by_fingerprint("web", "f") is None


def test_a_run_of_failed_bakes_gets_a_new_number_each_time(registry: Registry) -> None:
    seen = []
    for _ in range(6):
        number = _reserve(registry)
        registry.set_state("web", number, "failed", "role failed")
        seen.append(number)

    assert seen == ["1.0.0", "1.0.1", "1.0.2", "1.0.3", "1.0.4", "1.0.5"]


def test_a_deleted_version_number_is_never_handed_out_again(registry: Registry) -> None:
    _add(registry, "1.0.0")
    _add(registry, "1.0.1")
    registry.delete([("web", "1.0.1")])

    assert _numbers(registry) == ["1.0.0"]
    assert _reserve(registry) == "1.0.2"
    with pytest.raises(UsageError, match="was used before"):
        _add(registry, "1.0.1")


def test_other_images_do_not_take_numbers(registry: Registry) -> None:
    _add(registry, "3.0.0", image="api")

    assert _reserve(registry) == "1.0.0"


def test_concurrent_reservations_get_distinct_numbers(registry_url: str) -> None:
    import threading

    numbers: list[str] = []
    errors: list[BaseException] = []

    def bake(index: int) -> None:
        own = Registry(connect(registry_url))
        try:
            for round_ in range(5):
                reserved = own.reserve(
                    "web",
                    declared="1.0.0",
                    bump="patch",
                    build_id=f"t{index}-{round_}",
                    fingerprint="f",
                    path="/p",
                )
                numbers.append(reserved.version)
        except BaseException as exc:
            errors.append(exc)
        finally:
            own.close()

    threads = [threading.Thread(target=bake, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert sorted(numbers, key=sort_key) == [f"1.0.{n}" for n in range(20)]


# Fingerprints


def test_a_failed_version_with_the_same_fingerprint_is_not_reused(registry: Registry) -> None:
    _add(registry, "1.0.0", state="failed", fingerprint="same")

    assert registry.by_fingerprint("web", "same") is None


def test_the_newest_usable_unrevoked_version_with_the_fingerprint_is_found(
    registry: Registry,
) -> None:
    _add(registry, "1.0.0", state="verified", fingerprint="same")
    _add(registry, "1.0.1", state="built", fingerprint="same")
    _add(registry, "1.0.2", state="failed", fingerprint="same")
    _add(registry, "1.0.3", state="verified", fingerprint="same")
    _add(registry, "1.0.4", state="verified", fingerprint="other")
    registry.revoke("web", "1.0.3", reason="CVE")

    found = registry.by_fingerprint("web", "same")

    assert found is not None
    assert found.version == "1.0.1"
    assert found.manifest == {"version": "1.0.1"}


# Promotion


@pytest.mark.parametrize(
    ("state", "failure", "reason"),
    [
        ("built", "", "web 1.0.0 is built"),
        ("failed", "port 8080 never answered", "web 1.0.0 is failed: port 8080 never answered"),
        ("building", "", "web 1.0.0 is building"),
    ],
)
def test_only_a_verified_version_can_be_promoted(
    registry: Registry, state: str, failure: str, reason: str
) -> None:
    _add(registry, "1.0.0", state=state, failure=failure)

    with pytest.raises(UsageError) as caught:
        registry.promote("web", "dev", "1.0.0")

    assert str(caught.value) == f"cannot promote to dev: {reason}"
    assert registry.channel("web", "dev") is None


def test_promoting_an_unknown_version_names_it(registry: Registry) -> None:
    _add(registry, "1.0.0", state="verified")

    with pytest.raises(UsageError, match=r"web has no version '9\.9\.9' \(newest: 1\.0\.0\)"):
        registry.promote("web", "dev", "9.9.9")


def test_promotion_moves_the_channel_and_records_each_move(registry: Registry) -> None:
    _add(registry, "1.0.0", state="verified")
    _add(registry, "1.0.1", state="verified")

    moves = [
        registry.promote("web", "dev", "1.0.0"),
        registry.promote("web", "dev", "1.0.0"),
        registry.promote("web", "dev", "1.0.1"),
    ]

    assert [m.moved for m in moves] == [True, False, True]
    channel = registry.channel("web", "dev")
    assert channel is not None and channel.version == "1.0.1"
    history = [(m.previous, m.current, m.kind) for m in registry.history("web", "dev")]
    assert history == [(None, "1.0.0", "promote"), ("1.0.0", "1.0.1", "promote")]
    assert all("pid" in m.actor for m in registry.history("web", "dev"))


def test_channels_are_independent(registry: Registry) -> None:
    _add(registry, "1.0.0", state="verified")
    _add(registry, "1.0.1", state="verified")

    registry.promote("web", "prod", "1.0.0")
    registry.promote("web", "dev", "1.0.1")

    prod, dev = registry.channel("web", "prod"), registry.channel("web", "dev")
    assert (prod and prod.version, dev and dev.version) == ("1.0.0", "1.0.1")


def test_a_compare_and_swap_on_a_moved_channel_changes_nothing(registry: Registry) -> None:
    for number in ("1.0.0", "1.0.1", "1.0.2"):
        _add(registry, number, state="verified")
    registry.promote("web", "dev", "1.0.1")

    with pytest.raises(ChannelMoved) as caught:
        registry.promote("web", "dev", "1.0.2", expect="1.0.0")

    assert caught.value.found == "1.0.1"
    assert "moved from 1.0.0 to 1.0.1" in str(caught.value)
    assert len(registry.history("web", "dev")) == 1


def test_a_channel_on_a_newer_version_is_not_moved_back_without_asking(
    registry: Registry,
) -> None:
    _add(registry, "1.0.0", state="verified")
    _add(registry, "1.0.1", state="verified")
    registry.promote("web", "dev", "1.0.1")

    stayed = registry.promote("web", "dev", "1.0.0")
    moved = registry.promote("web", "dev", "1.0.0", allow_older=True)

    assert (stayed.moved, stayed.current, stayed.note) == (
        False,
        "1.0.1",
        "already on 1.0.1, newer than 1.0.0",
    )
    assert (moved.moved, moved.current) == (True, "1.0.0")


def test_racing_promotions_leave_the_channel_on_the_newer_of_the_two(registry_url: str) -> None:
    """Many pairs of processes promote 1.0.1 and 1.0.2 from the same start at once."""
    import multiprocessing

    setup = Registry(connect(registry_url))
    for number in ("1.0.0", "1.0.1", "1.0.2"):
        _add(setup, number, state="verified")
    context = multiprocessing.get_context("spawn")
    try:
        for _ in range(4):
            setup.promote("web", "dev", "1.0.0", allow_older=True)
            start = context.Event()
            racers = [
                context.Process(target=_race, args=(registry_url, version, start))
                for version in ("1.0.2", "1.0.1", "1.0.2", "1.0.1")
            ]
            for racer in racers:
                racer.start()
            start.set()
            for racer in racers:
                racer.join(60)
            assert [r.exitcode for r in racers] == [0, 0, 0, 0]
            channel = setup.channel("web", "dev")
            assert channel is not None and channel.version == "1.0.2"
    finally:
        setup.close()


def _race(url: str, version: str, start: object) -> None:
    from pipeline.api import _promote

    own = Registry(connect(url))
    start.wait()  # type: ignore[attr-defined]
    _promote(own, "web", "dev", version)
    own.close()


# Rollback


def test_rollback_goes_back_one_promotion_at_a_time(registry: Registry) -> None:
    for number in ("1.0.0", "1.0.1", "1.0.2"):
        _add(registry, number, state="verified")
        registry.promote("web", "prod", number)

    first = registry.rollback("web", "prod")
    second = registry.rollback("web", "prod")

    assert (first.previous, first.current, first.kind) == ("1.0.2", "1.0.1", "rollback")
    assert (second.previous, second.current) == ("1.0.1", "1.0.0")
    with pytest.raises(UsageError, match=r"no version before 1\.0\.0"):
        registry.rollback("web", "prod")


def test_rollback_after_a_new_promotion_goes_to_the_version_before_it(registry: Registry) -> None:
    for number in ("1.0.0", "1.0.1", "1.0.2"):
        _add(registry, number, state="verified")
    registry.promote("web", "prod", "1.0.0")
    registry.promote("web", "prod", "1.0.1")
    registry.rollback("web", "prod")
    registry.promote("web", "prod", "1.0.2")

    assert registry.rollback("web", "prod").current == "1.0.0"


def test_rollback_refuses_a_revoked_previous_version_and_says_why(registry: Registry) -> None:
    for number in ("1.0.0", "1.0.1"):
        _add(registry, number, state="verified")
        registry.promote("web", "prod", number)
    registry.revoke("web", "1.0.0", reason="leaks memory")

    with pytest.raises(UsageError, match=r"cannot roll prod back: web 1\.0\.0 is revoked .*"):
        registry.rollback("web", "prod")
    channel = registry.channel("web", "prod")
    assert channel is not None and channel.version == "1.0.1"


def test_rollback_of_an_empty_channel_says_so(registry: Registry) -> None:
    _add(registry, "1.0.0", state="verified")

    with pytest.raises(UsageError, match="points at nothing"):
        registry.rollback("web", "prod")


# Revocation


def test_a_revoked_version_cannot_be_promoted_and_the_reason_is_given(registry: Registry) -> None:
    _add(registry, "1.4.0", state="verified")
    registry.revoke("web", "1.4.0", reason="CVE-2026-0001 in openssl")

    with pytest.raises(UsageError) as caught:
        registry.promote("web", "prod", "1.4.0")

    message = str(caught.value)
    assert message.startswith("cannot promote to prod: web 1.4.0 is revoked since ")
    assert message.endswith(": CVE-2026-0001 in openssl")


def test_a_revocation_in_the_future_is_not_yet_in_force(registry: Registry) -> None:
    _add(registry, "1.4.0", state="verified")
    registry.revoke("web", "1.4.0", reason="end of support", at=_at(days=30))

    version = registry.get("web", "1.4.0")
    assert version.revocation is not None
    assert not version.revoked()
    assert version.status() == "verified"
    assert version.revoked(now=_at(days=31))
    assert registry.promote("web", "prod", "1.4.0").moved


def test_revoking_with_descendants_reaches_every_generation(registry: Registry) -> None:
    _add(registry, "1.0.0", image="debian", kind="base")
    _add(registry, "1.0.1", image="debian", kind="base")
    _add(registry, "1.0.0", parent=("debian", "1.0.0"))
    _add(registry, "1.0.1", parent=("debian", "1.0.1"))
    _add(registry, "2.0.0", image="api", parent=("web", "1.0.0"))

    revoked = registry.revoke("debian", "1.0.0", reason="bad kernel", descendants=True)

    assert sorted(v.label for v in revoked) == ["api 2.0.0", "debian 1.0.0", "web 1.0.0"]
    assert not registry.get("web", "1.0.1").revoked()


def test_a_revocation_needs_a_reason(registry: Registry) -> None:
    _add(registry, "1.0.0")

    with pytest.raises(UsageError, match="needs a reason"):
        registry.revoke("web", "1.0.0", reason="  ")


# Ancestry


def test_a_version_built_on_an_older_base_is_outdated(registry: Registry) -> None:
    _add(registry, "1.0.0", image="debian", kind="base", fingerprint="b1")
    _add(registry, "1.0.0", state="verified", parent=("debian", "1.0.0"))
    assert registry.outdated(registry.get("web", "1.0.0")) is None

    registry.record_base("debian", fingerprint="b2", build_id="b-2", path="/b2", manifest={})

    newer = registry.outdated(registry.get("web", "1.0.0"))
    assert newer is not None and newer.label == "debian 1.0.1"


def test_a_base_returning_to_old_inputs_gets_a_new_number(registry: Registry) -> None:
    first = registry.record_base("debian", fingerprint="a", build_id="1", path="/a", manifest={})
    again = registry.record_base("debian", fingerprint="a", build_id="2", path="/a", manifest={})
    second = registry.record_base("debian", fingerprint="b", build_id="3", path="/b", manifest={})
    back = registry.record_base("debian", fingerprint="a", build_id="4", path="/a", manifest={})

    assert [first.version, again.version, second.version, back.version] == [
        "1.0.0",
        "1.0.0",
        "1.0.1",
        "1.0.2",
    ]
    newest = registry.newest_parent("debian")
    assert newest is not None and newest.version == "1.0.2"


def test_an_image_and_a_base_cannot_share_a_name(registry: Registry) -> None:
    _add(registry, "1.0.0")

    with pytest.raises(UsageError, match="'web' is a image image, not a base image"):
        registry.record_base("web", fingerprint="x", build_id="b", path="/x", manifest={})


# Deletion and retention


def test_a_version_on_a_channel_cannot_be_deleted(registry: Registry) -> None:
    _add(registry, "1.0.0", state="verified")
    _add(registry, "1.0.1", state="verified")
    registry.promote("web", "dev", "1.0.0")

    with pytest.raises(UsageError, match="on channel dev"):
        registry.delete([("web", "1.0.1"), ("web", "1.0.0")])

    assert _numbers(registry) == ["1.0.0", "1.0.1"]


def test_retention_keeps_the_newest_the_used_and_their_parents(registry: Registry) -> None:
    _add(registry, "1.0.0", image="debian", kind="base")
    _add(registry, "1.0.1", image="debian", kind="base")
    for number in ("1.0.0", "1.0.1", "1.0.2", "1.0.3", "1.0.4", "1.0.5"):
        base = "1.0.0" if number < "1.0.3" else "1.0.1"
        _add(registry, number, state="verified", parent=("debian", base))
    _add(registry, "1.0.6", state="failed")
    registry.promote("web", "prod", "1.0.1")
    registry.promote("web", "prod", "1.0.2")
    registry.revoke("web", "1.0.5", reason="broken")

    decided = retention.plan(
        registry, keep=2, in_use={("web", "1.0.0"): ["environment dev runs it"]}
    )

    kept = {f"{image} {version}": why for (image, version), why in decided.keep.items()}
    assert sorted(v.label for v in decided.delete) == ["web 1.0.5", "web 1.0.6"]
    assert kept["web 1.0.4"] == ["newest"]
    assert kept["web 1.0.3"] == ["newest 2 usable"]
    assert kept["web 1.0.2"] == ["channel prod points at it"]
    assert kept["web 1.0.1"] == ["channel prod would roll back to it"]
    assert kept["web 1.0.0"] == ["environment dev runs it"]
    assert "parent of web 1.0.0" in kept["debian 1.0.0"]
    assert kept["debian 1.0.1"][0] == "newest"


# Durability and migrations


def test_reopening_an_existing_registry_keeps_its_data(registry_url: str) -> None:
    first = Registry(connect(registry_url))
    _add(first, "1.0.0", state="verified")
    first.promote("web", "dev", "1.0.0")
    first.close()

    second = Registry(connect(registry_url))
    channel = second.channel("web", "dev")
    second.close()

    assert channel is not None and channel.version == "1.0.0"


def test_a_duplicate_build_id_is_refused_and_leaves_the_registry_as_it_was(
    registry: Registry,
) -> None:
    registry.add("web", "1.0.0", build_id="b", fingerprint="f", state="built", path="/p")

    with pytest.raises(Exception, match=r"(?i)unique"):
        registry.add("web", "1.0.1", build_id="b", fingerprint="f", state="built", path="/p")

    assert _numbers(registry) == ["1.0.0"]
    # The failed insert took no number with it.
    assert _reserve(registry, "1.0.1") == "1.0.1"


def test_open_registry_prefers_the_environment_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chosen = tmp_path / "elsewhere.db"
    monkeypatch.setenv("PIPELINE_REGISTRY_URL", f"sqlite:///{chosen}")

    opened = open_registry(tmp_path / "state", "sqlite:////nowhere/at/all.db")
    opened.close()

    assert chosen.is_file()
    assert not (tmp_path / "state" / "registry.db").exists()


def test_revoked_versions_of_the_same_inputs_are_found(registry: Registry) -> None:
    _add(registry, "1.0.0", state="verified", fingerprint="same")
    _add(registry, "1.0.1", state="verified", fingerprint="same")
    registry.revoke("web", "1.0.0", reason="bad message")
    registry.revoke("web", "1.0.1", reason="later", at=_at(days=3))

    found = registry.revoked_with_fingerprint("web", "same")

    assert [v.label for v in found] == ["web 1.0.0"]
    assert registry.revoked_with_fingerprint("web", "other") == []
