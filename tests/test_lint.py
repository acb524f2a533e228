"""The code passes ruff and mypy; the roles and the playbooks (Molecule's, the smoke test) pass
ansible-lint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "argv",
    [
        ["ruff", "check", "."],
        ["ruff", "format", "--check", "."],
        ["mypy", "pipeline"],
        ["mypy", *map(str, (REPO / "ansible_collections").rglob("plugins/**/*.py"))],
        ["ansible-lint", "--nocolor", "--profile", "production", "roles", "molecule", "playbooks"],
    ],
    ids=["ruff-check", "ruff-format", "mypy", "mypy-collection", "ansible-lint"],
)
def test_the_code_is_lint_and_type_clean(argv: list[str]) -> None:
    tool = Path(sys.executable).parent / argv[0]
    if not tool.exists():
        pytest.skip(f"{argv[0]} is not installed")
    done = subprocess.run(
        [str(tool), *argv[1:]],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
