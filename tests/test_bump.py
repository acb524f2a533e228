"""Which bump a bake takes: the largest one declared for a kind of input that changed."""

from __future__ import annotations

import pytest

from pipeline.config import ImageConfig
from pipeline.registry import ImageVersion, open_registry
from pipeline.stages.bake import PART_KINDS, choose_bump, previous_inputs

PARTS = {part: f"hash-{part}" for part in PART_KINDS} | {"declared_version": "1.0.0"}


def _previous(**changed: str) -> ImageVersion:
    inputs = {**PARTS, **changed}
    return ImageVersion(
        image="web",
        version="1.0.0",
        build_id="b",
        fingerprint="f",
        state="verified",
        path="/p",
        manifest={"inputs": inputs},
    )


WEB = ImageConfig(
    name="web", version="1.0.0", roles=("base",), bump="patch", bump_on={"roles": "minor"}
)


@pytest.mark.parametrize(
    ("changed", "expected"),
    [
        ({"roles": "old"}, "minor"),
        ({"role_order": "old"}, "minor"),
        ({"vars": "old"}, "patch"),
        ({"base": "old"}, "patch"),
        ({"vars": "old", "roles": "old"}, "minor"),
        ({}, "patch"),
    ],
    ids=["roles", "role-order", "vars", "base", "vars-and-roles", "nothing"],
)
def test_a_role_change_declared_minor_bumps_minor(changed: dict[str, str], expected: str) -> None:
    assert choose_bump(WEB, _previous(**changed), PARTS) == expected


def test_the_first_bake_and_undeclared_kinds_take_the_default() -> None:
    majors = ImageConfig(name="web", version="1.0.0", roles=("base",), bump="major")

    assert choose_bump(WEB, None, PARTS) == "patch"
    assert choose_bump(majors, _previous(template="old"), PARTS) == "major"


def test_a_bake_compares_with_the_newest_version_whose_inputs_are_recorded(tmp_path) -> None:
    registry = open_registry(tmp_path)
    common = {"fingerprint": "f", "path": "/p"}
    registry.add(
        "web", "1.0.0", build_id="a", state="verified", manifest={"inputs": PARTS}, **common
    )
    # A bake interrupted before its inputs were recorded, and one still going.
    registry.add("web", "1.0.1", build_id="b", state="failed", failure="interrupted", **common)
    registry.reserve(
        "web", declared="1.0.0", bump="patch", build_id="c", fingerprint="g", path="/q"
    )

    previous = previous_inputs(registry, "web")

    assert previous is not None and previous.version == "1.0.0"
    assert choose_bump(WEB, previous, PARTS) == "patch"
