"""What the tests share: small pipeline.yml texts, and running the command as a user does."""

from __future__ import annotations

import os
import signal
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
        preexec_fn=take_ctrl_c,
    )


def take_ctrl_c() -> None:
    """Let the child take SIGINT as a terminal's Ctrl-C, even when the test run itself was
    started in the background (where the shell makes its children ignore SIGINT)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


MINIMAL = """\
images:
  web:
    version: 1.0.0
    roles: [base, webservice]
environments:
  dev:
    image: web
"""
