"""Processes left behind by runs that died, found by their run's build id and stopped.

A run that is interrupted stops what it started. A run that is killed (SIGKILL, a crash of the
machine's OOM killer, a closed terminal without a handler) cannot: Packer and its QEMU, a
Molecule VM, a Terraform provider or an ansible-playbook go on without it, and the lock that
kept a second run out is released with the dead process. So every run marks the processes it
starts: while a run lasts, `PIPELINE_RUN_ID=<build id>` is in this process's environment, and
every child inherits it, through Packer, Molecule, ansible-runner and Terraform's providers.

Before a new run starts, `reap` looks for processes so marked whose run is over: its recorded
process is gone, or the pid now belongs to another program (its start time differs). It stops
them (SIGTERM, then SIGKILL), removes the folders of the VMs among them and the private folder
that held its secrets, and records the run as dead. Fleet instances are not touched: they
outlive the deploy that made them on purpose, and Terraform's state, not a run, says whether
they belong.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.files import write_json_atomic
from pipeline.log import context
from pipeline.tools import process

RUN_ENV = "PIPELINE_RUN_ID"
STOP_GRACE = 10.0

log = context("runs", "reap")


@dataclass(frozen=True)
class Leftover:
    """A process of a run that is over."""

    pid: int
    build_id: str
    command: str


def run_alive(status: dict[str, Any]) -> bool:
    """Whether the process that wrote a run's status.json still runs (and is that process)."""
    pid = status.get("pid")
    if not isinstance(pid, int):
        return False
    started = process.start_ticks(pid)
    if started is None:
        return False
    recorded = status.get("pid_start")
    return recorded is None or recorded == started


def leftovers(state_dir: Path) -> list[Leftover]:
    """Processes marked with a run of `state_dir` that is no longer running, fleet VMs aside."""
    runs = state_dir / "runs"
    found = []
    verdicts: dict[str, bool] = {}
    fleet = _fleet_vm_pids(state_dir / "vms")
    for pid, build_id in _marked_processes():
        if pid in fleet:
            continue
        if build_id not in verdicts:
            status = _read_status(runs / build_id / "status.json")
            # A run of another project (no folder here) is none of our business.
            verdicts[build_id] = status is None or (
                status.get("state") == "running" and run_alive(status)
            )
        if not verdicts[build_id]:
            found.append(Leftover(pid, build_id, _command(pid)))
    return found


def reap(state_dir: Path) -> list[Leftover]:
    """Stop the processes of dead runs, remove their VMs' folders, and record every run whose
    process died before it finished as dead."""
    found = leftovers(state_dir)
    for item in found:
        log.warning(
            "stopping pid %d (%s), left behind by run %s, which died",
            item.pid,
            item.command,
            item.build_id,
        )
    if found:
        _stop([item.pid for item in found])
        _remove_vm_folders(state_dir / "vms", {item.pid for item in found})
    # Runs that died leaving nothing running are recorded too.
    for path in (state_dir / "runs").glob("*/status.json"):
        mark_dead(path)
    _remove_private_folders(state_dir)
    return found


def stop_run(state_dir: Path, build_id: str) -> list[Leftover]:
    """Stop every process still marked with this run's build id (this process aside), fleet VMs
    aside: what a tool the run started left behind when it ended (Packer leaves its Ansible's
    workers and their SSH, which run in sessions of their own, when its provisioner is cancelled).
    """
    fleet = _fleet_vm_pids(state_dir / "vms")
    found = [
        Leftover(pid, marked, _command(pid))
        for pid, marked in _marked_processes()
        if marked == build_id and pid not in fleet
    ]
    if found:
        _stop([item.pid for item in found])
        # And what they forked while being stopped.
        process.kill_marked(RUN_ENV, build_id, spare=fleet)
    return found


def _remove_private_folders(state_dir: Path) -> None:
    """A bake or verify killed outright leaves the file that gave Ansible the image's secrets in
    plain text (state_dir/private/<build id>-bake/); remove those of runs that are over."""
    for folder in sorted((state_dir / "private").glob("*-*")):
        build_id = folder.name.rpartition("-")[0]
        status = _read_status(state_dir / "runs" / build_id / "status.json")
        if status is not None and status.get("state") == "running" and run_alive(status):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        log.warning("removed %s, left by run %s, which died", folder, build_id)


def mark_dead(path: Path) -> None:
    """Record a run whose process died while its status said running."""
    status = _read_status(path)
    if status is None or status.get("state") != "running" or run_alive(status):
        return
    status.update(
        state="dead",
        exit_code=None,
        message="its process died before the run finished (killed?); what it left is stopped",
    )
    write_json_atomic(path, status)


def untagged_environ() -> dict[str, str]:
    """This process's environment without the run's mark, for a process meant to outlive it."""
    return {key: value for key, value in os.environ.items() if key != RUN_ENV}


@contextlib.contextmanager
def tagged(build_id: str) -> Iterator[None]:
    """Mark every process started in the block as the run's (see the module's docstring)."""
    previous = os.environ.get(RUN_ENV)
    os.environ[RUN_ENV] = build_id
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(RUN_ENV, None)
        else:
            os.environ[RUN_ENV] = previous


def _marked_processes() -> Iterator[tuple[int, str]]:
    for pid, build_id in process.marked_processes(RUN_ENV):
        # A build id names a folder: nothing else is looked up with it.
        if build_id and "/" not in build_id and not build_id.startswith("."):
            yield pid, build_id


def _fleet_vm_pids(vm_root: Path) -> set[int]:
    from pipeline.targets.local import qemu

    return {
        record.pid
        for record in qemu.list_vms(vm_root)
        if record.labels.get("environment") and qemu.is_running(record)
    }


def _remove_vm_folders(vm_root: Path, pids: set[int]) -> None:
    from pipeline.targets.local import qemu

    for record in qemu.list_vms(vm_root):
        if record.pid in pids and not record.labels.get("environment"):
            qemu.stop(record)


def _stop(pids: list[int]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + STOP_GRACE
        while time.monotonic() < deadline and any(process.start_ticks(pid) for pid in pids):
            time.sleep(0.1)
        pids = [pid for pid in pids if process.start_ticks(pid) is not None]
        if not pids:
            return
    log.error("pid(s) %s survived SIGKILL", ", ".join(map(str, pids)))


def _read_status(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _command(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    return " ".join(a.decode(errors="replace") for a in argv if a)[:120] or "?"
