"""What the tests share: small pipeline.yml texts, and running the command as a user does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_pipeline(
    *args: str, cwd: Path, timeout: float = 60, **env: str
) -> subprocess.CompletedProcess[str]:
    """`python -m pipeline ARGS` in `cwd` with this venv's Python and this checkout's package."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


MINIMAL = """\
images:
  web:
    version: 1.0.0
    roles: [base, webservice]
environments:
  dev:
    image: web
"""
