"""The triggers of a schedule: each says whether a rebuild is worth doing now, and why.

A trigger reads the registry and the project and changes nothing. Each returns a Verdict whose
reason is logged and recorded whether it fired or not.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import Config, ImageConfig
from pipeline.registry import Registry
from pipeline.registry.store import USABLE
from pipeline.stages import bake as bake_stage
from pipeline.targets.local import baseimage, basepackages


@dataclass(frozen=True)
class Verdict:
    trigger: str
    fired: bool
    reason: str
    # base_packages: the versions the archive offers now (what a refreshed base would get).
    packages: dict[str, str] | None = None


# Resolves the package versions a new base would get (the real archive, unless a test says).
Resolver = Callable[[Path, baseimage.BaseSpec], basepackages.Resolution]


def evaluate(
    config: Config,
    image: ImageConfig,
    registry: Registry,
    *,
    now: dt.datetime,
    resolve: Resolver = basepackages.resolve,
) -> list[Verdict]:
    """Every trigger of the image's schedule, in the order pipeline.yml lists them."""
    assert image.schedule is not None
    verdicts = []
    for trigger in image.schedule.triggers:
        if trigger == "inputs_changed":
            verdicts.append(inputs_changed(config, image, registry))
        elif trigger == "parent_rebuilt":
            verdicts.append(parent_rebuilt(image, registry))
        elif trigger == "max_age_days":
            assert image.schedule.max_age_days is not None
            verdicts.append(max_age(image, registry, image.schedule.max_age_days, now=now))
        elif trigger == "base_packages":
            verdicts.append(base_packages(config, image, registry, resolve=resolve))
        else:
            raise AssertionError(f"unknown trigger {trigger!r}")
    return verdicts


def inputs_changed(config: Config, image: ImageConfig, registry: Registry) -> Verdict:
    """Fires when the fingerprint of roles, template, variables and base differs from every
    usable version's (what `pipeline plan` shows)."""
    preview = bake_stage.preview(config, image.name, registry=registry)
    if preview["rebuild"]:
        return Verdict("inputs_changed", True, "inputs changed: " + "; ".join(preview["reasons"]))
    return Verdict("inputs_changed", False, f"inputs unchanged (version {preview['version']})")


def parent_rebuilt(image: ImageConfig, registry: Registry) -> Verdict:
    """Fires when what the newest version was built on (parent image or base) has a newer
    usable version: verified for an image, built for a base."""
    newest = registry.latest(image.name, states=USABLE, unrevoked=True)
    if newest is None:
        return Verdict("parent_rebuilt", False, f"{image.name} has no usable version yet")
    newer = registry.outdated(newest)
    if newer is None:
        on = newest.parent or "nothing"
        return Verdict("parent_rebuilt", False, f"{newest.label} is built on {on}, the newest")
    reason = f"parent rebuilt: {newest.label} is built on {newest.parent}; {newer.label} is newer"
    return Verdict("parent_rebuilt", True, reason)


def max_age(image: ImageConfig, registry: Registry, days: int, *, now: dt.datetime) -> Verdict:
    """Fires when the newest usable version is older than `days` (or there is none)."""
    newest = registry.latest(image.name, states=USABLE, unrevoked=True)
    if newest is None:
        return Verdict("max_age_days", True, f"max age: {image.name} has no usable version yet")
    created = dt.datetime.fromisoformat(newest.created_at)
    age = now - created
    if age > dt.timedelta(days=days):
        reason = f"max age: {newest.label} is {_days(age)} old (more than {days} days)"
        return Verdict("max_age_days", True, reason)
    reason = f"{newest.label} is {_days(age)} old (at most {days} days)"
    return Verdict("max_age_days", False, reason)


def base_packages(
    config: Config, image: ImageConfig, registry: Registry, *, resolve: Resolver
) -> Verdict:
    """Fires when a new base would get other package versions than the current base has."""
    base = image.base
    current = registry.newest_parent(base.name)
    if current is None:
        return Verdict("base_packages", False, f"base {base.name} is not built yet")
    installed = registry.get(current.image, current.version).manifest.get("packages") or {}
    spec = baseimage.BaseSpec(suite=base.suite, packages=base.packages)
    resolution = resolve(config.state_dir, spec)
    changes = basepackages.differences(installed, resolution.packages)
    if not changes:
        reason = f"the {len(installed)} packages of {current.label} are the archive's newest"
        return Verdict("base_packages", False, reason)
    shown = ", ".join(changes[:5]) + (f" and {len(changes) - 5} more" if len(changes) > 5 else "")
    reason = f"base packages updated: {len(changes)} differ from {current.label}'s: {shown}"
    return Verdict("base_packages", True, reason, resolution.packages)


def _days(age: dt.timedelta) -> str:
    days = age.total_seconds() / 86400
    return f"{days:.1f} days"
