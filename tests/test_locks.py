"""Locks: a second run is refused with the holder's name; a dead holder's lock is free again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline import locks
from pipeline.errors import LockHeld

REPO = Path(__file__).resolve().parent.parent

# Takes the lock, says so, then holds it until its stdin closes or it is killed.
HOLDER = """\
import sys
from pathlib import Path
from pipeline import locks

with locks.hold(Path(sys.argv[1]), sys.argv[2], build_id=sys.argv[3]):
    print("held", flush=True)
    sys.stdin.read()
"""

CHILD_BUILD = "20240101t000000-c0ffee"


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holding `env-dev` in tmp_path, as a concurrent run would."""
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path), "env-dev", CHILD_BUILD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "held\n"
        yield child
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()


def _holder_record(state_dir: Path, name: str) -> dict:
    return json.loads((state_dir / "locks" / f"{name}.lock").read_text() or "{}")


def test_a_second_run_is_refused_with_the_holders_pid_and_build(
    tmp_path: Path, holder: subprocess.Popen[str]
) -> None:
    with pytest.raises(LockHeld) as caught, locks.hold(tmp_path, "env-dev", build_id="mine"):
        pass

    assert caught.value.exit_code == 7
    assert str(caught.value).startswith(
        f"env-dev is locked by another run (pid {holder.pid}, build {CHILD_BUILD}, since "
    )
    # The refused run did not overwrite who holds the lock.
    assert _holder_record(tmp_path, "env-dev")["pid"] == holder.pid


def test_a_lock_of_another_name_is_not_blocked(
    tmp_path: Path, holder: subprocess.Popen[str]
) -> None:
    with locks.hold(tmp_path, "image-web", build_id="mine"):
        assert _holder_record(tmp_path, "image-web")["build_id"] == "mine"


def test_the_lock_of_a_killed_holder_is_free_again(
    tmp_path: Path, holder: subprocess.Popen[str]
) -> None:
    holder.kill()
    holder.wait()
    assert holder.returncode == -signal.SIGKILL
    # The dead holder had no chance to clean up: its record is still in the file.
    assert _holder_record(tmp_path, "env-dev")["pid"] == holder.pid

    with locks.hold(tmp_path, "env-dev", build_id="after-the-crash"):
        record = _holder_record(tmp_path, "env-dev")

    assert (record["pid"], record["build_id"]) == (os.getpid(), "after-the-crash")


def test_a_lock_is_free_once_its_holder_has_finished(tmp_path: Path) -> None:
    with (
        locks.hold(tmp_path, "image-web", build_id="first"),
        pytest.raises(LockHeld, match=r"build first"),
        locks.hold(tmp_path, "image-web", build_id="second"),
    ):
        pass

    with locks.hold(tmp_path, "image-web", build_id="second"):
        assert _holder_record(tmp_path, "image-web")["build_id"] == "second"
    assert _holder_record(tmp_path, "image-web") == {}


def test_holder_names_who_holds_a_lock_and_takes_nothing(
    tmp_path: Path, holder: subprocess.Popen[str]
) -> None:
    assert locks.holder(tmp_path, "env-never") is None
    assert locks.holder(tmp_path, "env-dev") == locks.holder(tmp_path, "env-dev")
    assert f"pid {holder.pid}, build {CHILD_BUILD}" in str(locks.holder(tmp_path, "env-dev"))

    holder.kill()
    holder.wait()

    assert locks.holder(tmp_path, "env-dev") is None
