"""Writing files so that a reader never sees half of one (a temporary name, then a rename), and
removing folders a chroot builder may have left file systems mounted in."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
from pathlib import Path
from typing import Any


def write_text_atomic(path: Path, text: str, *, mode: int | None = None) -> None:
    """Write `text` to a temporary name beside `path`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        if mode is not None:
            tmp.chmod(mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    """Write `data` as indented JSON, atomically."""
    text = json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"
    write_text_atomic(path, text)


def remove_tree(path: Path) -> list[str]:
    """Remove a folder without ever reaching a file system mounted inside it.

    A root tree that mmdebstrap was killed in may still have /proc, /sys and /dev's file
    systems mounted in it, and removing through those would reach the machine's own. So the
    mounts under `path` are detached first (deepest first), and the removal skips anything on
    another device. Returns the mount points it could not detach (their folders stay).
    """
    stuck = [point for point in mounts_under(path) if not _detach(point)]
    with contextlib.suppress(FileNotFoundError):
        top = os.lstat(path)
        if stat.S_ISDIR(top.st_mode):
            _remove_on_device(str(path), top.st_dev)
        else:
            os.unlink(path)
    return stuck


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below `path`, deepest first."""
    root = os.path.realpath(path)
    found = []
    with contextlib.suppress(OSError), open("/proc/self/mountinfo", encoding="utf-8") as table:
        for line in table:
            # The fifth field, with spaces and the like written as octal escapes.
            point = _unescape(line.split()[4])
            if point == root or point.startswith(root + "/"):
                found.append(point)
    return sorted(found, key=len, reverse=True)


def _unescape(field: str) -> str:
    return field.encode().decode("unicode_escape").encode("latin-1").decode(errors="replace")


def _detach(point: str) -> bool:
    done = subprocess.run(
        ["umount", "--lazy", point], capture_output=True, check=False, stdin=subprocess.DEVNULL
    )
    return done.returncode == 0


def _remove_on_device(folder: str, device: int) -> None:
    with contextlib.suppress(OSError), os.scandir(folder) as entries:
        for entry in entries:
            with contextlib.suppress(OSError):
                info = entry.stat(follow_symlinks=False)
                if info.st_dev != device:
                    continue
                if stat.S_ISDIR(info.st_mode):
                    _remove_on_device(entry.path, device)
                else:
                    os.unlink(entry.path)
    with contextlib.suppress(OSError):
        os.rmdir(folder)
