"""The base_packages trigger against the real Debian archive: resolution without building.

These fetch the bookworm package lists (about 9 MB, then only what changed) and resolve with
apt-get; a few seconds in all.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from pathlib import Path

import pytest
import yaml

from pipeline import config
from pipeline.registry import open_registry
from pipeline.schedule import engine, triggers
from pipeline.targets.local import baseimage, basepackages

DEBIAN_VERSION = re.compile(r"^(\d+:)?[0-9][A-Za-z0-9.+~-]*$")

PROJECT = """\
images:
  web:
    version: 1.0.0
    roles: [base]
    schedule: {cron: '0 3 * * *', triggers: [base_packages]}
environments: {}
"""


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("state")


@pytest.fixture(scope="module")
def resolved(state_dir: Path) -> basepackages.Resolution:
    return basepackages.resolve(state_dir, baseimage.BaseSpec())


def test_the_resolution_holds_what_a_minbase_with_the_base_packages_installs(
    resolved: basepackages.Resolution,
) -> None:
    packages = resolved.packages

    assert set(baseimage.BASE_PACKAGES) <= set(packages)
    # The Essential set and apt come with minbase.
    assert {"dpkg", "bash", "coreutils", "libc6", "apt", "base-files"} <= set(packages)
    # Recommends stay out, as in mmdebstrap's build (openssh-server recommends xauth).
    assert "xauth" not in packages
    assert all(DEBIAN_VERSION.match(version) for version in packages.values()), packages
    assert packages["base-files"].startswith("12.")  # bookworm is Debian 12


def test_the_trigger_is_quiet_for_a_base_with_the_archives_versions_and_fires_otherwise(
    tmp_path: Path, state_dir: Path, resolved: basepackages.Resolution
) -> None:
    project = config.parse(yaml.safe_load(PROJECT), tmp_path / "pipeline.yml")
    # The package lists fetched for the first test serve this one too.
    project = dataclasses.replace(project, state_dir=state_dir)
    image = project.image("web")
    registry = open_registry(tmp_path)
    try:
        registry.record_base(
            "debian",
            fingerprint="f1",
            build_id="b1",
            path=str(tmp_path / "base1"),
            manifest={"packages": resolved.packages},
        )
        current = triggers.evaluate(project, image, registry, now=dt.datetime.now(dt.UTC))

        stale = dict(resolved.packages, libc6="2.36-9+deb12u1")
        del stale["openssh-server"]
        stale["telnet"] = "0.17+2.4-2"
        registry.record_base(
            "debian",
            fingerprint="f2",
            build_id="b2",
            path=str(tmp_path / "base2"),
            manifest={"packages": stale},
        )
        older = triggers.evaluate(project, image, registry, now=dt.datetime.now(dt.UTC))
    finally:
        registry.close()

    assert [(v.trigger, v.fired) for v in current] == [("base_packages", False)]
    count = len(resolved.packages)
    assert current[0].reason == f"the {count} packages of debian 1.0.0 are the archive's newest"
    assert [(v.trigger, v.fired) for v in older] == [("base_packages", True)]
    assert older[0].reason.startswith("base packages updated: 3 differ from debian 1.0.1's: ")
    assert f"libc6 2.36-9+deb12u1 -> {resolved.packages['libc6']}" in older[0].reason
    assert f"openssh-server {resolved.packages['openssh-server']} (new)" in older[0].reason
    assert "telnet 0.17+2.4-2 (gone)" in older[0].reason


def test_differences_name_changed_new_and_gone_packages() -> None:
    installed = {"a": "1", "b": "1", "c": "1"}
    resolved = {"a": "1", "b": "2", "d": "1"}

    assert basepackages.differences(installed, resolved) == [
        "b 1 -> 2",
        "c 1 (gone)",
        "d 1 (new)",
    ]


def test_a_firing_trigger_makes_the_next_bake_build_the_base_anew(
    tmp_path: Path, state_dir: Path, resolved: basepackages.Resolution
) -> None:
    (tmp_path / "pipeline.yml").write_text(PROJECT)
    keys = state_dir / "keys"
    keys.mkdir(exist_ok=True)
    (keys / "id_ed25519.pub").write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFake test\n")
    spec = baseimage.BaseSpec()
    cached = baseimage.planned_fingerprint(state_dir, spec)
    project = dataclasses.replace(config.load(tmp_path / "pipeline.yml"), state_dir=state_dir)
    registry = open_registry(tmp_path)
    calls: list[str] = []

    def bake(image: str, schedule: config.ScheduleConfig, config_path: Path) -> str:
        calls.append(image)
        return "recorded"

    try:
        registry.record_base(
            "debian",
            fingerprint=str(cached),
            build_id="b1",
            path=str(tmp_path / "base1"),
            manifest={"packages": dict(resolved.packages, libc6="2.36-9+deb12u1")},
        )
        [outcome] = engine.tick(
            project,
            registry,
            now=dt.datetime.now(dt.UTC),
            action=bake,
        )
    finally:
        registry.close()
    refreshed = baseimage.planned_fingerprint(state_dir, spec)
    # Asking again for the same versions changes nothing more.
    baseimage.request_refresh(state_dir, spec, resolved.packages)

    assert outcome.result == "ok"
    assert calls == ["web"]
    assert refreshed is not None and refreshed != cached
    assert baseimage.planned_fingerprint(state_dir, spec) == refreshed
    # Another base (other packages) is not refreshed by it.
    other = baseimage.BaseSpec(packages=("vim",))
    assert baseimage.planned_fingerprint(state_dir, other) == baseimage.fingerprint(
        other,
        public_key=(keys / "id_ed25519.pub").read_text(),
        tool_version=baseimage.mmdebstrap_version(state_dir),
    )
