"""Which package versions a base image built now would get, found without building it.

apt-get runs with a configuration of its own (sources, package lists, an empty dpkg status) in
a cache folder under the state folder: `update` fetches the same archive sections a base build
uses, and `install --simulate` resolves the same set mmdebstrap's minbase variant installs (the
Essential and required packages, apt, and the base's packages) into an empty system. Nothing is
downloaded beyond the package lists, and the machine's own apt setup is not touched.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline import locks
from pipeline.errors import ToolError
from pipeline.targets.local import baseimage
from pipeline.tools.process import run

KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
# "Inst libc6 (2.36-9+deb12u14 Debian:12.15/oldstable [amd64]) []"; an upgrade has "[old] ".
INST = re.compile(r"^Inst (\S+) (?:\[[^\]]*\] )?\((\S+) ")
UPDATE_TIMEOUT = 300


@dataclass(frozen=True)
class Resolution:
    """The packages a new base would get, by name, and how long finding out took."""

    packages: dict[str, str]
    seconds: float


def resolve(state_dir: Path, spec: baseimage.BaseSpec) -> Resolution:
    """Resolve the base's package set against the Debian archive as it is now."""
    started = time.monotonic()
    root = state_dir / "cache" / "apt" / spec.suite
    wanted = sorted(set(baseimage.BASE_PACKAGES) | set(spec.packages))
    # Two schedules of images on the same suite share its package lists: one at a time.
    with locks.hold(state_dir, f"apt-{spec.suite}", build_id="resolve", wait=UPDATE_TIMEOUT):
        options = _prepare(root, spec.suite)
        run(
            ["apt-get", *options, "update"],
            what=f"fetch the {spec.suite} package lists (apt-get update)",
            timeout=UPDATE_TIMEOUT,
        )
        # minbase: the Essential and required packages and apt, then the base's own.
        minbase = ["?essential", "?priority(required)", "apt"]
        done = run(
            ["apt-get", *options, "install", "--simulate", *minbase, *wanted],
            what=f"resolve the {spec.suite} base packages (apt-get install --simulate)",
        )
    packages = {}
    for line in done.output.splitlines():
        found = INST.match(line)
        if found:
            packages[found.group(1).split(":")[0]] = found.group(2)
    if not packages:
        argv = ["apt-get", "install", "--simulate", *wanted]
        raise ToolError("resolve the base packages", argv, 0, ["apt-get listed no package"])
    return Resolution(packages, round(time.monotonic() - started, 1))


def differences(installed: dict[str, str], resolved: dict[str, str]) -> list[str]:
    """In words, each package whose version a new base would change, add or drop."""
    changes = []
    for name in sorted(set(installed) | set(resolved)):
        before, after = installed.get(name), resolved.get(name)
        if before == after:
            continue
        if before is None:
            changes.append(f"{name} {after} (new)")
        elif after is None:
            changes.append(f"{name} {before} (gone)")
        else:
            changes.append(f"{name} {before} -> {after}")
    return changes


def _prepare(root: Path, suite: str) -> list[str]:
    """The private apt folders and the options that point apt-get at them."""
    etc = root / "etc"
    for folder in (etc / "apt.conf.d", etc / "preferences.d", etc / "sources.list.d"):
        folder.mkdir(parents=True, exist_ok=True)
    (root / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (root / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    # An empty system: every package the base would hold gets resolved and listed.
    (root / "status").write_text("")
    lines = [
        line.replace("deb ", f"deb [signed-by={KEYRING}] ", 1) for line in baseimage.sources(suite)
    ]
    (etc / "sources.list").write_text("\n".join(lines) + "\n")
    return [
        "-q",
        "-o",
        f"Dir::Etc={etc}",
        "-o",
        f"Dir::State::Lists={root / 'lists'}",
        "-o",
        f"Dir::State::status={root / 'status'}",
        "-o",
        f"Dir::Cache={root / 'cache'}",
        "-o",
        "APT::Architecture=amd64",
        "-o",
        "Acquire::Languages=none",
        # As mmdebstrap installs them: without Recommends.
        "-o",
        "APT::Install-Recommends=false",
    ]
