"""The registry commands through the real `pipeline` command, without baking anything.

Each test writes a project folder, records versions straight into its registry with the library
(the same SQLite file, or the same PostgreSQL database, the command opens), then runs
`python -m pipeline` in that folder as a user would and checks what it printed, its exit code,
and what it left in the registry and on disk. The key commands run on both backends.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from projects import run_pipeline

from pipeline import locks
from pipeline.errors import UsageError
from pipeline.registry import URL_VARIABLE, Registry, open_registry

REPO = Path(__file__).resolve().parent.parent

# Two images: `web` gets versions, `api` is declared and never baked.
PROJECT = """\
images:
  web:
    version: 1.0.0
    roles: [base, webservice]
  api:
    version: 1.0.0
    roles: [base]
environments:
  dev:
    image: web
"""

FUTURE = "2099-01-01T00:00:00Z"
FUTURE_STORED = "2099-01-01T00:00:00.000000+00:00"
CVE = "CVE-2026-0001 in openssl"
SVG = "{http://www.w3.org/2000/svg}"


# Running the command


def pipeline(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m pipeline ARGS` in the project folder, as a user would."""
    return run_pipeline(*args, cwd=project)


def ok(project: Path, *args: str) -> str:
    """Run a command that must succeed; its stdout."""
    done = pipeline(project, *args)
    assert done.returncode == 0, f"pipeline {' '.join(args)} failed:\n{done.stderr}"
    return done.stdout


def as_json(project: Path, *args: str) -> Any:
    return json.loads(ok(project, *args, "--json"))


def error_line(done: subprocess.CompletedProcess[str]) -> str:
    """The one line a failed command printed, without its `pipeline: error: ` prefix."""
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{done.stderr}"
    assert lines[0].startswith("pipeline: error: ")
    return lines[0].removeprefix("pipeline: error: ")


# Projects and their registries


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty project on the default registry: SQLite in `.pipeline/registry.db`."""
    monkeypatch.delenv(URL_VARIABLE, raising=False)
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "pipeline.yml").write_text(PROJECT)
    return folder


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, project: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test on each backend; PostgreSQL through $PIPELINE_REGISTRY_URL, as a team would."""
    if request.param == "postgresql":
        monkeypatch.setenv(URL_VARIABLE, request.getfixturevalue("postgres_db_url"))
    return str(request.param)


@contextlib.contextmanager
def registry_of(project: Path) -> Iterator[Registry]:
    """The registry the command opens in this project (it follows $PIPELINE_REGISTRY_URL)."""
    registry = open_registry(project / ".pipeline")
    try:
        yield registry
    finally:
        registry.close()


def folder(project: Path, *parts: str) -> Path:
    """A version's own folder with a file in it, where a bake would have left one."""
    path = project.joinpath(".pipeline", *parts)
    path.mkdir(parents=True)
    (path / "disk.qcow2").write_text(" ".join(parts))
    return path


def add_base(registry: Registry, project: Path, fingerprint: str) -> str:
    """A new version of the `debian` base (numbered by the registry); its number."""
    number = registry.next_number("debian", "1.0.0", "patch")
    recorded = registry.record_base(
        "debian",
        fingerprint=fingerprint,
        build_id=f"base-{fingerprint}",
        path=str(folder(project, "base", number)),
        manifest={"suite": "bookworm", "fingerprint": fingerprint},
    )
    assert recorded.version == number
    return number


def add_web(
    registry: Registry,
    project: Path,
    version: str,
    *,
    on: str,
    state: str = "verified",
    failure: str = "",
    path: Path | None = None,
) -> None:
    registry.add(
        "web",
        version,
        build_id=f"build-{version}",
        fingerprint=f"fp-{version}",
        state=state,
        path=str(path or folder(project, "images", "web", version)),
        parent=("debian", on),
        manifest={"image": "web", "version": version, "roles": ["base", "webservice"]},
        failure=failure,
    )


def seed_story(project: Path) -> None:
    """A registry with some history.

    debian 1.0.0 (base)  <- web 1.0.0 (revoked), 1.1.0 (on dev), 1.2.0 (failed), 1.9.1
    debian 1.0.1 (base)  <- web 1.10.0

    1.9.1 is a hotfix recorded after 1.10.0; every version on debian 1.0.0 is outdated.
    """
    with registry_of(project) as registry:
        assert add_base(registry, project, "base-a") == "1.0.0"
        add_web(registry, project, "1.0.0", on="1.0.0")
        add_web(registry, project, "1.1.0", on="1.0.0")
        add_web(registry, project, "1.2.0", on="1.0.0", state="failed", failure="port 8080 closed")
        assert add_base(registry, project, "base-b") == "1.0.1"
        add_web(registry, project, "1.10.0", on="1.0.1")
        add_web(registry, project, "1.9.1", on="1.0.0")
        registry.promote("web", "dev", "1.1.0")
        registry.revoke("web", "1.0.0", reason=CVE)


def channel_of(project: Path, channel: str) -> str | None:
    with registry_of(project) as registry:
        found = registry.channel("web", channel)
        return found.version if found else None


# images list

STORY_LIST = """\
IMAGE          VERSION      STATUS    PARENT                 BUILD                    NOTES
debian         1.0.0        built                            base-base-a
debian         1.0.1        built                            base-base-b
web            1.0.0        revoked   debian 1.0.0           build-1.0.0              \
reason: CVE-2026-0001 in openssl  outdated (debian 1.0.1 is newer)
web            1.1.0        verified  debian 1.0.0           build-1.1.0              \
<- dev  outdated (debian 1.0.1 is newer)
web            1.2.0        failed    debian 1.0.0           build-1.2.0              \
outdated (debian 1.0.1 is newer)  failed: port 8080 closed
web            1.9.1        verified  debian 1.0.0           build-1.9.1              \
outdated (debian 1.0.1 is newer)
web            1.10.0       verified  debian 1.0.1           build-1.10.0
"""


def test_list_shows_every_base_and_image_version_in_semver_order(
    backend: str, project: Path
) -> None:
    seed_story(project)

    assert ok(project, "images", "list") == STORY_LIST


def test_list_json_describes_each_version(backend: str, project: Path) -> None:
    seed_story(project)

    listed = as_json(project, "images", "list", "web")

    assert [v["version"] for v in listed] == ["1.0.0", "1.1.0", "1.2.0", "1.9.1", "1.10.0"]
    by_version = {v["version"]: v for v in listed}
    revoked, on_dev, failed = by_version["1.0.0"], by_version["1.1.0"], by_version["1.2.0"]
    assert {
        "image",
        "version",
        "kind",
        "status",
        "state",
        "parent_image",
        "parent_version",
        "channels",
        "revocation",
        "outdated",
        "failure",
    } <= set(revoked)
    assert (revoked["image"], revoked["kind"], revoked["state"], revoked["status"]) == (
        "web",
        "image",
        "verified",
        "revoked",
    )
    assert revoked["revocation"]["reason"] == CVE
    assert revoked["revocation"]["in_force"] is True
    assert (on_dev["parent_image"], on_dev["parent_version"]) == ("debian", "1.0.0")
    assert on_dev["channels"] == ["dev"]
    assert on_dev["revocation"] is None
    assert on_dev["outdated"] == "debian 1.0.1"
    assert (failed["state"], failed["status"], failed["failure"]) == (
        "failed",
        "failed",
        "port 8080 closed",
    )
    assert by_version["1.10.0"]["outdated"] is None
    assert by_version["1.10.0"]["channels"] == []


def test_list_of_one_image_leaves_the_others_out(project: Path) -> None:
    seed_story(project)

    bases = as_json(project, "images", "list", "debian")

    assert [(v["image"], v["version"], v["kind"]) for v in bases] == [
        ("debian", "1.0.0", "base"),
        ("debian", "1.0.1", "base"),
    ]
    assert {v["parent_image"] for v in bases} == {None}
    web = ok(project, "images", "list", "web").splitlines()
    assert web[1:] == [line for line in STORY_LIST.splitlines() if line.startswith("web ")]


def test_list_of_an_unknown_image_names_it_and_the_known_ones(project: Path) -> None:
    seed_story(project)

    done = pipeline(project, "images", "list", "db")

    assert done.returncode == 2
    assert error_line(done) == (
        "unknown image 'db' (images in pipeline.yml: api, web; also in the registry: debian)"
    )


def test_list_of_a_declared_image_with_no_versions_is_empty(project: Path) -> None:
    seed_story(project)

    assert ok(project, "images", "list", "api") == "no versions yet\n"
    assert as_json(project, "images", "list", "api") == []


# images show


def test_show_gives_the_manifest_children_and_channel_moves(project: Path) -> None:
    seed_story(project)
    ok(project, "promote", "web", "dev", "1.9.1")
    ok(project, "promote", "web", "dev", "--rollback")

    shown = as_json(project, "images", "show", "web", "1.1.0")
    base = as_json(project, "images", "show", "debian", "1.0.0")

    assert shown["manifest"] == {
        "image": "web",
        "version": "1.1.0",
        "roles": ["base", "webservice"],
    }
    assert shown["children"] == []
    assert shown["channels"] == ["dev"]
    assert [(m["previous"], m["current"], m["kind"]) for m in shown["history"]] == [
        (None, "1.1.0", "promote"),
        ("1.1.0", "1.9.1", "promote"),
        ("1.9.1", "1.1.0", "rollback"),
    ]
    assert base["kind"] == "base"
    assert base["manifest"] == {"suite": "bookworm", "fingerprint": "base-a"}
    assert base["children"] == ["web 1.0.0", "web 1.1.0", "web 1.2.0", "web 1.9.1"]


def test_show_as_text_names_parent_children_channels_and_notes(project: Path) -> None:
    seed_story(project)

    lines = ok(project, "images", "show", "web", "1.0.0").splitlines()
    base = ok(project, "images", "show", "debian", "1.0.1").splitlines()

    assert lines[0] == "web 1.0.0 (image)"
    assert "  status:       revoked" in lines
    assert "  parent:       debian 1.0.0" in lines
    assert "  children:     -" in lines
    assert "  channels:     -" in lines
    assert "  outdated:     built on debian 1.0.0; debian 1.0.1 is newer" in lines
    [revoked] = [line for line in lines if line.startswith("  revoked:")]
    assert revoked.endswith(f"(in force): {CVE}")
    assert base[0] == "debian 1.0.1 (base)"
    assert "  children:     web 1.10.0" in base


def test_show_as_text_includes_the_manifest(project: Path) -> None:
    seed_story(project)

    shown = ok(project, "images", "show", "web", "1.1.0")

    assert "webservice" in shown


def test_show_as_text_does_not_print_python_none_for_a_first_promotion(project: Path) -> None:
    seed_story(project)

    lines = ok(project, "images", "show", "web", "1.1.0").splitlines()

    [move] = [line for line in lines if line.startswith("  moved:")]
    assert move.endswith(" -> 1.1.0")
    assert "None" not in move


def test_show_of_an_unknown_version_names_it_and_the_newest(project: Path) -> None:
    seed_story(project)

    done = pipeline(project, "images", "show", "web", "2.0.0")

    assert done.returncode == 2
    assert error_line(done) == (
        "web has no version '2.0.0' (newest: 1.0.0, 1.1.0, 1.2.0, 1.9.1, 1.10.0)"
    )


# images tree

STORY_TREE = f"""\
debian 1.0.0 (base) built
├── web 1.0.0 revoked reason: {CVE}  outdated (debian 1.0.1 is newer)
├── web 1.1.0 verified <- dev  outdated (debian 1.0.1 is newer)
├── web 1.2.0 failed outdated (debian 1.0.1 is newer)  failed: port 8080 closed
└── web 1.9.1 verified outdated (debian 1.0.1 is newer)
debian 1.0.1 (base) built
└── web 1.10.0 verified
"""


def test_tree_draws_bases_and_the_versions_built_on_them(project: Path) -> None:
    seed_story(project)

    assert ok(project, "images", "tree") == STORY_TREE


def channels_drawn(node: ET.Element) -> list[str | None]:
    badges = [g for g in node.iter(f"{SVG}g") if g.get("class") == "channel"]
    return [text.text for badge in badges for text in badge.iter(f"{SVG}text")]


def test_tree_writes_a_well_formed_svg_with_one_node_per_version(project: Path) -> None:
    seed_story(project)

    done = pipeline(project, "images", "tree", "--output", "lineage.svg")

    assert done.returncode == 0
    assert done.stdout == STORY_TREE
    assert done.stderr == "picture written to lineage.svg\n"
    root = ET.parse(project / "lineage.svg").getroot()
    assert root.tag == f"{SVG}svg"
    nodes = {g.get("data-id"): g for g in root.iter(f"{SVG}g") if g.get("data-id")}
    assert sorted(nodes) == sorted(
        ["debian@1.0.0", "debian@1.0.1"]
        + [f"web@{v}" for v in ("1.0.0", "1.1.0", "1.2.0", "1.9.1", "1.10.0")]
    )
    edges = {
        (p.get("data-from"), p.get("data-to"))
        for p in root.iter(f"{SVG}path")
        if p.get("class") == "edge"
    }
    assert edges == {
        ("debian@1.0.0", "web@1.0.0"),
        ("debian@1.0.0", "web@1.1.0"),
        ("debian@1.0.0", "web@1.2.0"),
        ("debian@1.0.0", "web@1.9.1"),
        ("debian@1.0.1", "web@1.10.0"),
    }
    assert "revoked" in (nodes["web@1.0.0"].get("class") or "").split()
    assert "revoked" not in (nodes["web@1.1.0"].get("class") or "").split()
    assert channels_drawn(nodes["web@1.1.0"]) == ["dev"]
    assert channels_drawn(nodes["web@1.10.0"]) == []


def test_tree_refuses_a_picture_that_is_not_svg(project: Path) -> None:
    seed_story(project)

    done = pipeline(project, "images", "tree", "--output", "lineage.png")

    assert done.returncode == 2
    assert "SVG" in error_line(done)
    assert not (project / "lineage.png").exists()


def test_tree_output_that_cannot_be_written_is_a_usage_error(project: Path) -> None:
    seed_story(project)
    target = project / "pipeline.yml" / "lineage.svg"  # pipeline.yml is a file, not a folder

    done = pipeline(project, "images", "tree", "--output", str(target))

    assert done.returncode == 2
    assert str(target) in done.stderr.splitlines()[-1]
    assert "Traceback" not in done.stderr


def test_tree_json_has_the_versions_and_the_roots(project: Path) -> None:
    seed_story(project)

    tree = as_json(project, "images", "tree")

    assert tree["roots"] == ["debian@1.0.0", "debian@1.0.1"]
    assert tree["output"] is None
    assert [(v["image"], v["version"]) for v in tree["versions"]] == [
        ("debian", "1.0.0"),
        ("debian", "1.0.1"),
        ("web", "1.0.0"),
        ("web", "1.1.0"),
        ("web", "1.2.0"),
        ("web", "1.9.1"),
        ("web", "1.10.0"),
    ]


def test_tree_of_one_image_keeps_only_its_versions_and_their_ancestors(project: Path) -> None:
    seed_story(project)
    with registry_of(project) as registry:
        # A base nothing of web's is built on, and an image on the other base.
        registry.record_base(
            "debian", fingerprint="base-c", build_id="base-c", path="/none", manifest={}
        )
        registry.add(
            "api",
            "1.0.0",
            build_id="api-1",
            fingerprint="api-1",
            state="verified",
            path="/none",
            parent=("debian", "1.0.2"),
        )

    everything = as_json(project, "images", "tree")
    web = as_json(project, "images", "tree", "web")

    assert {(v["image"], v["version"]) for v in everything["versions"]} >= {
        ("debian", "1.0.2"),
        ("api", "1.0.0"),
    }
    assert [(v["image"], v["version"]) for v in web["versions"]] == [
        ("debian", "1.0.0"),
        ("debian", "1.0.1"),
        ("web", "1.0.0"),
        ("web", "1.1.0"),
        ("web", "1.2.0"),
        ("web", "1.9.1"),
        ("web", "1.10.0"),
    ]
    assert web["roots"] == ["debian@1.0.0", "debian@1.0.1"]
    assert "api" not in ok(project, "images", "tree", "web")


# promote


def test_promote_picks_the_newest_verified_unrevoked_version(backend: str, project: Path) -> None:
    seed_story(project)

    # 1.10.0, not 1.9.1 recorded after it, nor the failed 1.2.0.
    assert ok(project, "promote", "web", "dev") == "channel dev of web moved: 1.1.0 -> 1.10.0\n"
    with registry_of(project) as registry:
        registry.revoke("web", "1.10.0", reason="leaks memory")
    onto_prod = ok(project, "promote", "web", "prod")

    assert onto_prod.startswith("channel prod of web moved: ")
    assert onto_prod.endswith(" -> 1.9.1\n")
    assert (channel_of(project, "dev"), channel_of(project, "prod")) == ("1.10.0", "1.9.1")


def test_promote_onto_a_new_channel_does_not_print_python_none(project: Path) -> None:
    seed_story(project)

    out = ok(project, "promote", "web", "prod", "1.9.1")

    assert out.startswith("channel prod of web moved: ")
    assert "None" not in out


def test_promote_again_to_the_same_version_changes_nothing(project: Path) -> None:
    seed_story(project)

    out = ok(project, "promote", "web", "dev", "1.1.0")

    assert out == "channel dev of web stays on 1.1.0 (already there)\n"
    with registry_of(project) as registry:
        assert len(registry.history("web", "dev")) == 1


def test_rollback_goes_back_one_step_each_time_then_says_there_is_none(project: Path) -> None:
    seed_story(project)
    ok(project, "promote", "web", "dev", "1.9.1")
    ok(project, "promote", "web", "dev", "1.10.0")

    first = ok(project, "promote", "web", "dev", "--rollback")
    second = ok(project, "promote", "web", "dev", "--rollback")
    third = pipeline(project, "promote", "web", "dev", "--rollback")

    assert first == "channel dev of web rolled back: 1.10.0 -> 1.9.1\n"
    assert second == "channel dev of web rolled back: 1.9.1 -> 1.1.0\n"
    assert third.returncode == 2
    assert error_line(third) == (
        "channel dev of web has had no version before 1.1.0; nothing to roll back to"
    )
    assert channel_of(project, "dev") == "1.1.0"


def test_rollback_of_a_channel_that_points_at_nothing_fails_clearly(project: Path) -> None:
    seed_story(project)

    done = pipeline(project, "promote", "web", "prod", "--rollback")

    assert done.returncode == 2
    assert error_line(done) == "channel prod of web points at nothing; nothing to roll back"


def test_promoting_an_older_version_needs_allow_older(backend: str, project: Path) -> None:
    seed_story(project)
    ok(project, "promote", "web", "dev", "1.10.0")

    refused = pipeline(project, "promote", "web", "dev", "1.9.1")
    channel_after_refusal = channel_of(project, "dev")
    allowed = ok(project, "promote", "web", "dev", "1.9.1", "--allow-older")

    assert refused.returncode == 2
    assert error_line(refused) == (
        "channel dev of web is already on 1.10.0, newer than 1.9.1; to move it back, use"
        " `--rollback` or `--allow-older`"
    )
    assert channel_after_refusal == "1.10.0"
    assert allowed == "channel dev of web moved: 1.10.0 -> 1.9.1\n"
    assert channel_of(project, "dev") == "1.9.1"


@pytest.mark.parametrize(
    ("version", "why"),
    [
        ("1.0.0", "web 1.0.0 is revoked since "),
        ("1.2.0", "web 1.2.0 is failed: port 8080 closed"),
    ],
    ids=["revoked", "failed"],
)
def test_promoting_an_unusable_version_says_why_and_moves_nothing(
    project: Path, version: str, why: str
) -> None:
    seed_story(project)

    done = pipeline(project, "promote", "web", "dev", version)

    assert done.returncode == 2
    message = error_line(done)
    assert message.startswith(f"cannot promote to dev: {why}")
    if version == "1.0.0":
        assert message.endswith(f": {CVE}")
    assert channel_of(project, "dev") == "1.1.0"


def test_promote_json_gives_the_move_and_the_version(project: Path) -> None:
    seed_story(project)

    result = as_json(project, "promote", "web", "dev", "1.9.1")

    move, version = result["move"], result["version"]
    assert (move["image"], move["channel"], move["previous"], move["current"]) == (
        "web",
        "dev",
        "1.1.0",
        "1.9.1",
    )
    assert (move["moved"], move["kind"]) == (True, "promote")
    assert (version["image"], version["version"], version["state"]) == ("web", "1.9.1", "verified")
    assert version["manifest"]["version"] == "1.9.1"


# revoke


def test_a_revocation_in_the_future_is_listed_but_not_yet_in_force(project: Path) -> None:
    seed_story(project)

    out = ok(project, "revoke", "web", "1.9.1", "--reason", "old kernel", "--at", FUTURE)
    listed = {v["version"]: v for v in as_json(project, "images", "list", "web")}
    promoted = ok(project, "promote", "web", "dev", "1.9.1")

    assert out == f"revoked web 1.9.1 from {FUTURE_STORED}: old kernel\n"
    assert listed["1.9.1"]["status"] == "verified"
    assert listed["1.9.1"]["revocation"]["in_force"] is False
    assert listed["1.9.1"]["revocation"]["effective_at"] == FUTURE_STORED
    assert promoted == "channel dev of web moved: 1.1.0 -> 1.9.1\n"
    row = ok(project, "images", "list", "web").splitlines()[4]
    assert row.startswith("web            1.9.1        verified")
    assert f"revoked from {FUTURE_STORED}: old kernel" in row
    shown = ok(project, "images", "show", "web", "1.9.1").splitlines()
    assert f"  revoked:      from {FUTURE_STORED} (not yet in force): old kernel" in shown


def test_revoke_at_a_time_that_is_not_one_names_the_value(project: Path) -> None:
    seed_story(project)

    done = pipeline(project, "revoke", "web", "1.9.1", "--reason", "x", "--at", "next tuesday")

    assert done.returncode == 2
    assert error_line(done).startswith("--at 'next tuesday' is not a time")
    with registry_of(project) as registry:
        assert registry.get("web", "1.9.1").revocation is None


def test_revoke_without_a_reason_is_refused_by_the_command_line(project: Path) -> None:
    seed_story(project)

    done = pipeline(project, "revoke", "web", "1.9.1")

    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == (
        "pipeline revoke: error: the following arguments are required: --reason"
    )


def test_revoking_a_base_with_descendants_revokes_what_was_built_on_it(
    backend: str, project: Path
) -> None:
    seed_story(project)

    out = ok(project, "revoke", "debian", "1.0.0", "--reason", "bad kernel", "--descendants")

    assert out.splitlines()[0] == "revoked debian 1.0.0 from now on: bad kernel"
    lines = sorted(out.splitlines()[1:])
    assert lines[:3] == [
        f"revoked web {v} from now on: bad kernel" for v in ("1.1.0", "1.2.0", "1.9.1")
    ]
    # web 1.0.0 was revoked before, for its own reason: that earlier revocation stays.
    assert re.fullmatch(
        r"web 1\.0\.0 was already revoked from \S+: CVE-2026-0001 in openssl \(left as it was\)",
        lines[3],
    ), lines[3]
    statuses = {(v["image"], v["version"]): v["status"] for v in as_json(project, "images", "list")}
    assert statuses == {
        ("debian", "1.0.0"): "revoked",
        ("debian", "1.0.1"): "built",
        ("web", "1.0.0"): "revoked",
        ("web", "1.1.0"): "revoked",
        ("web", "1.2.0"): "revoked",
        ("web", "1.9.1"): "revoked",
        ("web", "1.10.0"): "verified",
    }


def test_revoking_a_version_a_channel_points_at_warns_naming_the_channel(project: Path) -> None:
    seed_story(project)

    done = pipeline(project, "revoke", "web", "1.1.0", "--reason", "crashes")

    assert done.returncode == 0
    assert done.stdout == "revoked web 1.1.0 from now on: crashes\n"
    [warning] = done.stderr.splitlines()
    assert warning.startswith("warning: channel dev of web points at revoked 1.1.0;")


def test_revoke_json_lists_the_revoked_versions_and_the_channels_on_them(project: Path) -> None:
    seed_story(project)

    result = as_json(project, "revoke", "web", "1.1.0", "--reason", "crashes")

    assert [(v["image"], v["version"], v["status"]) for v in result["revoked"]] == [
        ("web", "1.1.0", "revoked")
    ]
    assert result["revoked"][0]["revocation"]["reason"] == "crashes"
    assert result["channels"] == [
        {
            "image": "web",
            "channel": "dev",
            "version": "1.1.0",
            "in_force": True,
            "effective_at": result["revoked"][0]["revocation"]["effective_at"],
            "rollback_to": None,
        }
    ]


def test_a_future_revocation_warns_with_the_time_it_comes_into_force(project: Path) -> None:
    seed_story(project)

    done = pipeline(project, "revoke", "web", "1.1.0", "--reason", "crashes", "--at", FUTURE)

    [warning] = done.stderr.splitlines()
    assert "channel dev" in warning
    assert "2099-01-01" in warning


def test_revoking_descendants_later_keeps_a_revocation_already_in_force(project: Path) -> None:
    seed_story(project)

    ok(
        project,
        "revoke",
        "debian",
        "1.0.0",
        "--reason",
        "old kernel",
        "--at",
        FUTURE,
        "--descendants",
    )
    listed = {v["version"]: v for v in as_json(project, "images", "list", "web")}
    promoted = pipeline(project, "promote", "web", "dev", "1.0.0", "--allow-older")

    assert listed["1.0.0"]["status"] == "revoked"
    assert listed["1.0.0"]["revocation"]["reason"] == CVE
    assert promoted.returncode == 2


# gc


def seed_for_gc(project: Path) -> None:
    """Versions gc must tell apart, with `--keep 1`:

    debian 1.0.0  delete: only deleted versions are built on it
    debian 1.0.1  keep:   parent of web 1.2.0
    debian 1.0.2  keep:   newest; parent of web 1.3.0 and 1.6.0
    web 1.0.0     delete: verified, old          web 1.4.0  delete: revoked
    web 1.1.0     delete: failed                 web 1.5.0  delete: verified, not newest
    web 1.2.0     keep:   prod rolls back to it  web 1.6.0  keep:   newest
    web 1.3.0     keep:   prod points at it      web 1.7.0  delete: failed, the highest number
    """
    with registry_of(project) as registry:
        add_base(registry, project, "base-a")
        add_base(registry, project, "base-b")
        add_base(registry, project, "base-c")
        add_web(registry, project, "1.0.0", on="1.0.0")
        add_web(registry, project, "1.1.0", on="1.0.0", state="failed", failure="boot timeout")
        add_web(registry, project, "1.2.0", on="1.0.1")
        for version in ("1.3.0", "1.4.0", "1.5.0", "1.6.0"):
            add_web(registry, project, version, on="1.0.2")
        add_web(registry, project, "1.7.0", on="1.0.2", state="failed", failure="boot timeout")
        registry.promote("web", "prod", "1.2.0")
        registry.promote("web", "prod", "1.3.0")
        registry.revoke("web", "1.4.0", reason="bad config")


GC_DELETED = [
    ("debian", "1.0.0", "built"),
    ("web", "1.0.0", "verified"),
    ("web", "1.1.0", "failed"),
    ("web", "1.4.0", "revoked"),
    ("web", "1.5.0", "verified"),
    ("web", "1.7.0", "failed"),
]
GC_KEPT = {
    "debian 1.0.1": ["parent of web 1.2.0"],
    "debian 1.0.2": ["newest", "parent of web 1.3.0", "parent of web 1.6.0"],
    "web 1.2.0": ["channel prod would roll back to it"],
    "web 1.3.0": ["channel prod points at it"],
    "web 1.6.0": ["newest"],
}


def version_folders(project: Path) -> set[str]:
    state = project / ".pipeline"
    return {
        str(path.relative_to(state))
        for path in [*state.glob("base/*"), *state.glob("images/web/*")]
    }


ALL_FOLDERS = {f"base/1.0.{n}" for n in range(3)} | {f"images/web/1.{n}.0" for n in range(8)}


def test_gc_dry_run_says_what_would_go_and_deletes_nothing(backend: str, project: Path) -> None:
    seed_for_gc(project)

    out = ok(project, "gc", "--keep", "1", "--dry-run").splitlines()

    would = [line.split()[2:5] for line in out if line.startswith("would delete  ")]
    assert [tuple(words) for words in would] == GC_DELETED
    kept = [line.split()[1:3] for line in out if line.startswith("kept ")]
    assert sorted(" ".join(words) for words in kept) == sorted(GC_KEPT)
    assert out[-1] == "would delete 6 version(s), kept 5"
    assert version_folders(project) == ALL_FOLDERS
    with registry_of(project) as registry:
        assert len(registry.all_versions()) == 11
    assert not (project / ".pipeline" / "runs").exists()


def test_gc_deletes_the_records_and_folders_and_says_why_the_rest_stay(project: Path) -> None:
    seed_for_gc(project)

    out = ok(project, "gc", "--keep", "1").splitlines()

    assert out[-1] == "deleted 6 version(s), kept 5"
    deleted = [line.split()[1:4] for line in out if line.startswith("deleted  ")]
    assert [tuple(words) for words in deleted] == GC_DELETED
    reasons = {
        " ".join(line.split()[1:3]): line.split(None, 4)[4]
        for line in out
        if line.startswith("kept ")
    }
    assert reasons["web 1.2.0"] == "channel prod would roll back to it"
    assert reasons["web 1.3.0"] == "channel prod points at it"
    assert reasons["web 1.6.0"] == "newest"
    assert reasons["debian 1.0.1"] == "parent of web 1.2.0"
    assert sorted(reasons["debian 1.0.2"].split("; ")) == GC_KEPT["debian 1.0.2"]
    with registry_of(project) as registry:
        left = [(v.image, v.version) for v in registry.all_versions()]
    assert left == [
        ("debian", "1.0.1"),
        ("debian", "1.0.2"),
        ("web", "1.2.0"),
        ("web", "1.3.0"),
        ("web", "1.6.0"),
    ]
    assert version_folders(project) == {
        "base/1.0.1",
        "base/1.0.2",
        "images/web/1.2.0",
        "images/web/1.3.0",
        "images/web/1.6.0",
    }


def test_gc_never_gives_a_deleted_number_out_again(project: Path) -> None:
    seed_for_gc(project)

    ok(project, "gc", "--keep", "1")

    with registry_of(project) as registry:
        # 1.7.0, the highest number ever used, is gone, yet the next one is after it.
        assert registry.next_number("web", "1.7.0", "patch") == "1.7.1"
        assert registry.next_number("web", "1.5.0", "minor") == "1.8.0"
        reserved = registry.reserve(
            "web", declared="1.0.0", bump="patch", build_id="b", fingerprint="f", path="/p"
        )
        assert reserved.version == "1.7.1"
        with pytest.raises(UsageError, match="was used before"):
            add_web(registry, project, "1.5.0", on="1.0.2", path=Path("/p"))
        # The deleted base's inputs come back under a new number.
        rebuilt = registry.record_base(
            "debian", fingerprint="base-a", build_id="again", path="/p", manifest={}
        )
        assert rebuilt.version == "1.0.3"


def test_gc_leaves_a_folder_outside_the_state_folder_alone(project: Path, tmp_path: Path) -> None:
    seed_for_gc(project)
    outside = tmp_path / "elsewhere" / "web-1.8.0"
    outside.mkdir(parents=True)
    with registry_of(project) as registry:
        add_web(registry, project, "1.8.0", on="1.0.2", state="failed", path=outside)

    out = ok(project, "gc", "--keep", "1")

    assert "\ndeleted       web 1.8.0 " in out
    assert outside.is_dir()
    with registry_of(project) as registry:
        assert registry.find("web", "1.8.0") is None


@pytest.mark.parametrize("keep", ["0", "-1"])
def test_gc_must_keep_at_least_one_version(project: Path, keep: str) -> None:
    seed_for_gc(project)

    done = pipeline(project, "gc", "--keep", keep)

    assert done.returncode == 2
    assert error_line(done) == f"--keep {keep}: keep at least 1 version of each image"
    assert version_folders(project) == ALL_FOLDERS


def test_gc_json_has_what_was_deleted_and_why_the_rest_was_kept(project: Path) -> None:
    seed_for_gc(project)

    result = as_json(project, "gc", "--keep", "1", "--dry-run")

    assert set(result) == {"dry_run", "keep", "deleted", "kept", "stray_folders"}
    assert (result["dry_run"], result["keep"]) == (True, 1)
    entry = {"label", "image", "version", "status", "path", "reasons"}
    assert all(set(item) == entry for item in result["deleted"] + result["kept"])
    assert [(d["image"], d["version"], d["status"]) for d in result["deleted"]] == GC_DELETED
    assert all(d["reasons"] == [] for d in result["deleted"])
    assert result["deleted"][1]["path"] == str(project / ".pipeline" / "images" / "web" / "1.0.0")
    kept = {k["label"]: k["reasons"] for k in result["kept"]}
    assert {label: sorted(why) for label, why in kept.items()} == GC_KEPT


def test_gc_keeps_the_newest_n_usable_versions(project: Path) -> None:
    seed_for_gc(project)

    result = as_json(project, "gc", "--keep", "3", "--dry-run")

    kept = {k["label"]: k["reasons"] for k in result["kept"]}
    assert kept["web 1.6.0"] == ["newest"]
    assert kept["web 1.5.0"] == ["newest 3 usable"]
    assert kept["web 1.3.0"] == ["newest 3 usable", "channel prod points at it"]
    assert [d["label"] for d in result["deleted"]] == [
        "web 1.0.0",
        "web 1.1.0",
        "web 1.4.0",
        "web 1.7.0",
    ]


def test_gc_lists_kept_versions_in_semver_order(project: Path) -> None:
    seed_story(project)

    result = as_json(project, "gc", "--dry-run")

    kept = [k["label"] for k in result["kept"] if k["image"] == "web"]
    assert kept == ["web 1.1.0", "web 1.9.1", "web 1.10.0"]


# the command as a whole


def test_a_reader_that_goes_away_is_not_reported_as_a_bug(project: Path) -> None:
    seed_story(project)
    read_end, write_end = os.pipe()
    os.close(read_end)  # like `| head` having exited already
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pipeline", "images", "list"],
            cwd=project,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)

    assert "Traceback" not in done.stderr
    assert "internal error" not in done.stderr
    assert done.returncode != 1


def test_gc_removes_folders_an_interrupted_gc_left_behind(project: Path) -> None:
    seed_for_gc(project)
    with registry_of(project) as registry:
        # What a gc stopped between deleting records and deleting folders leaves.
        registry.delete([("web", "1.0.0")])
    unrelated = project / ".pipeline" / "images" / "web" / "notes"
    unrelated.mkdir()

    planned = as_json(project, "gc", "--keep", "1", "--dry-run")
    done = as_json(project, "gc", "--keep", "1")

    stray = str(project / ".pipeline" / "images" / "web" / "1.0.0")
    assert planned["stray_folders"] == done["stray_folders"] == [stray]
    assert not Path(stray).exists()
    assert unrelated.is_dir()


@pytest.mark.parametrize(
    ("at", "message"),
    [
        ("9999-12-31T23:59:59-05:00", "is out of range once turned into UTC"),
        ("yesterday", "is not a time"),
    ],
)
def test_an_at_time_that_cannot_be_stored_is_a_usage_error(
    project: Path, at: str, message: str
) -> None:
    seed_story(project)

    done = pipeline(project, "revoke", "web", "1.0.0", "--reason", "x", "--at", at)

    assert done.returncode == 2
    assert message in error_line(done)


def test_a_reason_with_control_characters_is_refused(project: Path) -> None:
    seed_story(project)

    done = pipeline(project, "revoke", "web", "1.1.0", "--reason", "one\ntwo\x1b[31m")

    assert done.returncode == 2
    assert error_line(done) == "--reason must be one line of text, without control characters"
    assert as_json(project, "images", "show", "web", "1.1.0")["revocation"] is None


def test_a_registry_in_a_folder_that_does_not_exist_is_refused(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = project / "no" / "such" / "registry.db"
    monkeypatch.setenv(URL_VARIABLE, f"sqlite:///{missing}")

    done = pipeline(project, "images", "list")

    assert done.returncode == 4
    assert error_line(done) == f"cannot open the registry {missing}: no folder {missing.parent}"
    assert not (project / "no").exists()


def test_a_relative_sqlite_path_in_the_variable_is_read_from_the_project_folder(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "elsewhere"
    for folder in (project, elsewhere):
        (folder / "shared").mkdir(parents=True)
    monkeypatch.setenv(URL_VARIABLE, "sqlite:///shared/registry.db")

    done = run_pipeline("-c", str(project), "images", "list", cwd=elsewhere)

    assert done.returncode == 0, done.stderr
    assert (project / "shared" / "registry.db").is_file()
    assert not (elsewhere / "shared" / "registry.db").exists()


def test_gc_dry_run_stands_in_no_runs_way_while_gc_waits_for_it(project: Path) -> None:
    seed_for_gc(project)

    with locks.hold(project / ".pipeline", "image-web", build_id="a-bake"):
        planned = pipeline(project, "gc", "--keep", "1", "--dry-run")
        deleting = pipeline(project, "gc", "--keep", "1")

    assert planned.returncode == 0, planned.stderr
    assert planned.stdout.splitlines()[-1] == "would delete 6 version(s), kept 5"
    assert deleting.returncode == 7
    assert "image-web is locked by another run" in error_line(deleting)
    assert version_folders(project) == ALL_FOLDERS
