"""The reaper: processes of runs that died are found by their build id and stopped; nothing else."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline import reaper
from pipeline.runs import Run
from pipeline.targets.local import qemu
from pipeline.tools import process

SLEEPER = [sys.executable, "-c", "import time; time.sleep(300)"]


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts; whatever is still running at its end is killed."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _spawn(
    procs: list[subprocess.Popen[bytes]], build_id: str, argv: list[str] | None = None
) -> subprocess.Popen[bytes]:
    env = {**os.environ, reaper.RUN_ENV: build_id}
    proc = subprocess.Popen(argv or SLEEPER, env=env, start_new_session=True)
    procs.append(proc)
    # Until it execs, the child still has this process's environment, without the mark.
    mark = f"{reaper.RUN_ENV}={build_id}".encode()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if mark in Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0"):
                break
        time.sleep(0.05)
    return proc


def _status(state_dir: Path, build_id: str, **fields: object) -> Path:
    path = state_dir / "runs" / build_id / "status.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"build_id": build_id, "state": "running", **fields}))
    return path


def _gone_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _reaped(proc: subprocess.Popen[bytes]) -> bool:
    # The reaper stops it; as our child it stays a zombie until we wait for it.
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        return False
    return True


def test_a_killed_runs_leftover_is_stopped_and_the_run_recorded_dead(
    tmp_path: Path, started: list[subprocess.Popen[bytes]]
) -> None:
    status = _status(tmp_path, "20261205t000000-aaaaaa", pid=_gone_pid(), pid_start=1)
    leftover = _spawn(started, "20261205t000000-aaaaaa")

    found = reaper.reap(tmp_path)

    assert [item.pid for item in found] == [leftover.pid]
    assert _reaped(leftover)
    recorded = json.loads(status.read_text())
    assert recorded["state"] == "dead"
    assert "died" in recorded["message"]


def test_the_secrets_folder_of_a_run_that_died_is_removed_and_a_live_runs_kept(
    tmp_path: Path,
) -> None:
    me = os.getpid()
    _status(tmp_path, "20261205t000000-dddddd", pid=_gone_pid(), pid_start=1)
    _status(tmp_path, "20261205t000000-eeeeee", pid=me, pid_start=process.start_ticks(me))
    dead = tmp_path / "private" / "20261205t000000-dddddd-bake"
    live = tmp_path / "private" / "20261205t000000-eeeeee-verify"
    for folder in (dead, live):
        folder.mkdir(parents=True)
        (folder / "bake-vars.json").write_text('{"token": "secret-value"}')

    reaper.reap(tmp_path)

    assert not dead.exists()
    assert (live / "bake-vars.json").is_file()


def test_a_live_run_keeps_its_processes(
    tmp_path: Path, started: list[subprocess.Popen[bytes]]
) -> None:
    me = os.getpid()
    _status(tmp_path, "20261205t000000-bbbbbb", pid=me, pid_start=process.start_ticks(me))
    child = _spawn(started, "20261205t000000-bbbbbb")

    assert reaper.reap(tmp_path) == []
    assert child.poll() is None


def test_a_pid_reused_by_another_program_does_not_keep_a_dead_run_alive(
    tmp_path: Path, started: list[subprocess.Popen[bytes]]
) -> None:
    # The recorded pid runs (it is this test), but it started at another time than the run's.
    me = os.getpid()
    ticks = process.start_ticks(me)
    assert ticks is not None
    _status(tmp_path, "20261205t000000-cccccc", pid=me, pid_start=ticks + 1)
    leftover = _spawn(started, "20261205t000000-cccccc")

    assert [item.pid for item in reaper.reap(tmp_path)] == [leftover.pid]
    assert _reaped(leftover)


def test_runs_of_other_projects_and_unmarked_processes_are_left_alone(
    tmp_path: Path, started: list[subprocess.Popen[bytes]]
) -> None:
    other = _spawn(started, "20261205t000000-dddddd")  # no such run folder here
    plain = subprocess.Popen(SLEEPER, start_new_session=True)
    started.append(plain)

    assert reaper.reap(tmp_path) == []
    assert other.poll() is None and plain.poll() is None


def test_fleet_instances_outlive_the_deploy_that_made_them(
    tmp_path: Path, started: list[subprocess.Popen[bytes]]
) -> None:
    """A fleet VM carries the build id of its deploy, dead or not; Terraform decides its fate.
    A Molecule or other run VM of a dead run is stopped and its folder removed."""
    _status(tmp_path, "20261205t000000-eeeeee", pid=_gone_pid(), pid_start=1)
    vms = tmp_path / "vms"
    procs = {}
    for name, labels in (("fleet-0", {"environment": "dev"}), ("verify-0", {})):
        overlay = vms / name / "overlay.qcow2"
        overlay.parent.mkdir(parents=True)
        # Looks like our QEMU to qemu.is_running: its argv[0] and the overlay in its arguments.
        argv = ["bash", "-c", f'exec -a {qemu.QEMU} "$@"', "-", *SLEEPER, str(overlay)]
        proc = _spawn(started, "20261205t000000-eeeeee", argv)
        procs[name] = proc
        record = qemu.VmRecord(
            name=name, pid=proc.pid, ssh_port=1, http_port=2, overlay=overlay,
            image=tmp_path / "disk.qcow2", serial_log=overlay.parent / "serial.log",
            labels=labels,
        )  # fmt: skip
        (overlay.parent / "record.json").write_text(json.dumps(record.to_json()))
        # bash takes a moment to exec into the stand-in; until then it is not "our QEMU".
        deadline = time.monotonic() + 30
        while not qemu.is_running(record) and time.monotonic() < deadline:
            time.sleep(0.05)

    found = reaper.reap(tmp_path)

    assert [item.pid for item in found] == [procs["verify-0"].pid]
    assert _reaped(procs["verify-0"])
    assert not (vms / "verify-0").exists()
    assert procs["fleet-0"].poll() is None
    assert (vms / "fleet-0" / "record.json").exists()


def test_a_new_run_reaps_first_and_marks_what_it_starts(
    tmp_path: Path, started: list[subprocess.Popen[bytes]]
) -> None:
    _status(tmp_path, "20261205t000000-ffffff", pid=_gone_pid(), pid_start=1)
    leftover = _spawn(started, "20261205t000000-ffffff")

    run = Run(tmp_path, "bake", "web")

    assert _reaped(leftover)
    status = json.loads((run.dir / "status.json").read_text())
    assert status["pid_start"] == process.start_ticks(os.getpid())
    with reaper.tagged(run.build_id):
        seen = subprocess.run(
            [sys.executable, "-c", f"import os; print(os.environ['{reaper.RUN_ENV}'])"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    assert seen == run.build_id
    assert reaper.RUN_ENV not in os.environ or os.environ[reaper.RUN_ENV] != run.build_id
    assert reaper.RUN_ENV not in reaper.untagged_environ()


def test_a_run_that_ends_stops_what_its_tools_left_and_nothing_else(
    tmp_path: Path, started: list[subprocess.Popen[bytes]]
) -> None:
    # This run is alive (its status says running, with this process): the reap would keep
    # its processes; stop_run is the run itself sweeping up after a tool.
    me = os.getpid()
    _status(tmp_path, "20261205t000000-111111", pid=me, pid_start=process.start_ticks(me))
    left = [_spawn(started, "20261205t000000-111111") for _ in range(2)]
    other = _spawn(started, "20261205t000000-222222")

    found = reaper.stop_run(tmp_path, "20261205t000000-111111")

    assert sorted(item.pid for item in found) == sorted(proc.pid for proc in left)
    assert all(_reaped(proc) for proc in left)
    assert other.poll() is None
