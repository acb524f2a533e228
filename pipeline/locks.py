"""One lock per environment and per image, held for the length of a run.

The lock is an `flock` on a file under `<state_dir>/locks/`: the kernel releases it when its
holder dies, however it dies, so a dead holder never blocks the next run. The file also says who
holds it (pid, build id, command), for the message a second run prints.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import LockHeld


@contextlib.contextmanager
def hold(state_dir: Path, name: str, *, build_id: str, wait: float = 0.0) -> Iterator[None]:
    """Hold lock `name` (like `env-dev` or `image-web`); wait up to `wait` seconds for it."""
    path = state_dir / "locks" / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _acquire(fd, path, name, wait)
        holder = {"pid": os.getpid(), "build_id": build_id, "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _acquire(fd: int, path: Path, name: str, wait: float) -> None:
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                break
            time.sleep(0.5)
    holder = _describe_holder(path)
    message = f"{name} is locked by another run ({holder}); try again when it has finished"
    raise LockHeld(message)


def holder(state_dir: Path, name: str) -> str | None:
    """Who holds lock `name` now (pid, build, since), or None if nobody does.

    Read from the kernel's table of locks (/proc/locks), so asking takes no lock itself and
    never makes a starting run find the lock busy.
    """
    path = state_dir / "locks" / f"{name}.lock"
    try:
        info = path.stat()
        table = Path("/proc/locks").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    key = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    for line in table.splitlines():
        fields = line.split()
        # "N: FLOCK ADVISORY WRITE PID MAJ:MIN:INODE 0 EOF"; a waiter's line has "->" after N:.
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == key:
            return _describe_holder(path)
    return None


def _describe_holder(path: Path) -> str:
    try:
        holder = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        holder = {}
    if not holder:
        return "holder unknown"
    since = time.strftime("%H:%M:%S", time.localtime(holder.get("since", 0)))
    return f"pid {holder.get('pid')}, build {holder.get('build_id')}, since {since}"
