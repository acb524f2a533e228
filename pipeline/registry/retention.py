"""Retention: which versions `pipeline gc` may delete, and why each other one is kept.

A version is kept when it is among the newest usable ones of its image, when a channel points
at it (or would go back to it on a rollback), when an environment's Terraform state or a
running VM uses it, when its bake is still going, or when it is the parent of a kept version.
Everything else is deleted: records first (one transaction), then files.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from pipeline.registry.store import USABLE, ImageVersion, Registry

Key = tuple[str, str]


@dataclass
class RetentionPlan:
    keep: dict[Key, list[str]] = field(default_factory=dict)
    delete: list[ImageVersion] = field(default_factory=list)
    versions: dict[Key, ImageVersion] = field(default_factory=dict)


def plan(registry: Registry, *, keep: int, in_use: Mapping[Key, list[str]]) -> RetentionPlan:
    """Decide for every version in the registry; `in_use` gives outside reasons to keep."""
    if keep < 1:
        raise ValueError("keep must be at least 1")
    result = RetentionPlan()
    reasons: dict[Key, list[str]] = {}

    def hold(key: Key, reason: str) -> None:
        reasons.setdefault(key, [])
        if reason not in reasons[key]:
            reasons[key].append(reason)

    versions = registry.all_versions()
    result.versions = {(v.image, v.version): v for v in versions}
    by_image: dict[str, list[ImageVersion]] = {}
    for version in versions:
        by_image.setdefault(version.image, []).append(version)

    for image, listed in by_image.items():
        usable = [v for v in listed if v.state in USABLE and not v.revoked()]
        for position, version in enumerate(reversed(usable[-keep:])):
            hold((image, version.version), f"newest {keep} usable" if position else "newest")
        for version in listed:
            if version.state == "building":
                hold((image, version.version), "its bake is still running")

    for channel in registry.channels():
        hold((channel.image, channel.version), f"channel {channel.channel} points at it")
        target = registry.usable_rollback_target(channel.image, channel.channel)
        if target is not None:
            hold(
                (channel.image, target.version), f"channel {channel.channel} would roll back to it"
            )

    for key, outside in in_use.items():
        for reason in outside:
            hold(key, reason)

    # The parent of a kept version is kept, and so on up its ancestry.
    queue = list(reasons)
    while queue:
        key = queue.pop()
        child = result.versions.get(key)
        if child is None or not child.parent_image or not child.parent_version:
            continue
        parent = (child.parent_image, child.parent_version)
        if parent not in reasons:
            queue.append(parent)
        hold(parent, f"parent of {child.label}")

    result.keep = {key: why for key, why in reasons.items() if key in result.versions}
    result.delete = [v for v in versions if (v.image, v.version) not in result.keep]
    return result
