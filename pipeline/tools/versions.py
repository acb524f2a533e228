"""Versions of the external tools, part of every fingerprint.

Asking a tool its version costs a process start; the answer is cached per binary (path, size and
modification time), so deciding "unchanged" stays fast.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

from pipeline.errors import MissingTool
from pipeline.files import write_json_atomic


def binary_version(state_dir: Path, name: str, args: tuple[str, ...] = ("--version",)) -> str:
    """The first line `name ARGS` prints, cached while the binary stays the same."""
    path = shutil.which(name)
    if path is None:
        raise MissingTool(f"`{name}` is not installed (run ./setup.sh)")
    stat = os.stat(path)
    key = f"{path}:{stat.st_size}:{stat.st_mtime_ns}:{' '.join(args)}"
    cache_path = state_dir / "cache" / "tool-versions.json"
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return str(cache[key])
    done = subprocess.run(
        [path, *args],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "CHECKPOINT_DISABLE": "1"},
    )
    text = (done.stdout or done.stderr).strip().splitlines()
    version = text[0] if text else "unknown"
    cache[key] = version
    write_json_atomic(cache_path, cache)
    return version


def python_package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"
