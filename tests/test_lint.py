"""The code passes ruff and mypy; the roles and Molecule playbooks pass ansible-lint."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(
    shutil.which("ansible-lint", path=str(Path(sys.executable).parent)) is None,
    reason="ansible-lint is not installed",
)
def test_roles_and_molecule_playbooks_are_lint_clean() -> None:
    lint = Path(sys.executable).parent / "ansible-lint"
    done = subprocess.run(
        [str(lint), "--nocolor", "--profile", "production", "roles", "molecule"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _tool(name: str) -> Path:
    return Path(sys.executable).parent / name


@pytest.mark.parametrize(
    "argv",
    [["ruff", "check", "."], ["ruff", "format", "--check", "."], ["mypy", "pipeline"]],
    ids=["ruff-check", "ruff-format", "mypy"],
)
def test_the_code_is_lint_and_type_clean(argv: list[str]) -> None:
    if not _tool(argv[0]).exists():
        pytest.skip(f"{argv[0]} is not installed")
    done = subprocess.run(
        [str(_tool(argv[0])), *argv[1:]],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
