"""What the tests share: small pipeline.yml texts, and running the command as a user does."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
COMMAND_TIMEOUT = 2400


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


class Project:
    """A copy of the example project in a temporary folder, driven through `python -m pipeline`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.state = root / ".pipeline"

    def pipeline(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "-m", "pipeline", *args],
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
        if check and done.returncode != 0:
            pytest.fail(f"pipeline {' '.join(args)} exited {done.returncode}:\n{done.stderr}")
        return done

    def run_json(self, *args: str) -> tuple[dict, str]:
        done = self.pipeline(*args, "--json")
        return json.loads(done.stdout), done.stderr

    def vm_processes(self) -> list[str]:
        """Command lines of every QEMU whose files live in this project's state."""
        return self.processes("qemu-system")

    def processes(self, program: str) -> list[str]:
        """Command lines of every `program` process that names this project's folder."""
        found = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if program in cmdline and str(self.root) in cmdline:
                found.append(cmdline)
        return found


def share_base(state: Path, shared: Path) -> None:
    # The session's base image and key are reused, so that this story bakes only its own images.
    state.mkdir(parents=True)
    for name in ("base", "keys", "accel.json"):
        if (shared / name).exists():
            (state / name).symlink_to(shared / name)


class Probe:
    """Requests the front door every 50 ms in a thread; counts answers, failures, versions."""

    def __init__(self, url: str) -> None:
        assert url.startswith("http://127.0.0.1:"), url
        self.url = url
        self.ok = 0
        self.failed: list[str] = []
        self.versions: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        print(f"\nprobe of {self.url}: {self.ok} answered, {len(self.failed)} failed")

    def _loop(self) -> None:
        while not self._stop.wait(0.05):
            try:
                with urllib.request.urlopen(self.url + "/", timeout=10) as response:
                    body = response.read().decode()
                self.ok += 1
                found = re.search(r"^image: web (\S+)$", body, re.M)
                if found:
                    self.versions.add(found.group(1))
            except Exception as exc:  # every kind of failure counts
                self.failed.append(f"{time.strftime('%H:%M:%S')} {exc}")
