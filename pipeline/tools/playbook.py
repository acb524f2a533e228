"""Playbooks the pipeline runs itself (smoke tests), through ansible-runner.

Each run gets a fresh private data directory under the run folder (inventory, artifacts,
events); the outcome is read from the runner's own status, return code and events, never from
parsing a terminal. A play whose `hosts` matches none of the hosts fails the run: Ansible skips
it and still returns 0, so a smoke test aimed at the wrong group would pass without checking
anything. A run that takes longer than its timeout is stopped by the runner, and
every process it left behind (the runner stops only ansible-playbook itself) is killed: each run
marks its processes with a variable in their environment, which their children inherit.

Signals: left alone, ansible-runner installs SIGINT and SIGTERM handlers in the calling process
and never restores them, so after one run Ctrl-C did nothing. Here the handlers live only for the
run: a signal cancels the playbook (the runner stops it and its processes are killed) and the run
raises Interrupted, as any other step of the pipeline does.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import secret
from pipeline.errors import Interrupted, MissingTool
from pipeline.tools import process

MARK = "PIPELINE_PLAYBOOK_RUN"


@dataclass
class Outcome:
    """How a playbook run ended."""

    status: str
    rc: int | None
    failed: list[str] = field(default_factory=list)
    # Plays that matched no host, which Ansible skips without failing the run.
    unmatched: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "successful" and self.rc == 0 and not self.unmatched

    @property
    def summary(self) -> str:
        details = [*self.failed, *self.unmatched][:5]
        if self.status == "successful" and self.rc == 0 and details:
            # Ansible called it a success; saying so would only mislead.
            return "; ".join(details)
        words = f"{self.status}, rc {self.rc}"
        if details:
            words += ": " + "; ".join(details)
        return words


def run(
    playbook: Path,
    hosts: dict[str, dict[str, Any]],
    *,
    group: str,
    folder: Path,
    timeout: float,
    vault_password_file: Path | None = None,
) -> Outcome:
    """Run `playbook` against `hosts` (name -> host variables) as group `group`.

    With `vault_password_file`, the playbook may use values Ansible Vault encrypts. What the
    runner leaves on disk (its events, its copy of the output) has every known secret masked.
    """
    try:
        import ansible_runner
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise MissingTool("ansible-runner is not installed (run ./setup.sh)") from exc

    folder.mkdir(parents=True, exist_ok=True)
    private = folder / f"run-{len(list(folder.glob('run-*'))) + 1:02d}"
    private.mkdir()
    group_name = group.replace("-", "_")
    inventory = {
        "all": {"children": {group_name: {"hosts": hosts}}},
    }
    bin_dir = os.path.dirname(sys.executable)
    marker = uuid.uuid4().hex
    vault = {"ANSIBLE_VAULT_PASSWORD_FILE": str(vault_password_file)} if vault_password_file else {}
    with _cancel_on_signal() as canceled:
        try:
            runner = ansible_runner.run(
                private_data_dir=str(private),
                playbook=str(playbook),
                inventory=inventory,
                envvars={
                    "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", os.defpath)]),
                    "ANSIBLE_HOST_KEY_CHECKING": "False",
                    "ANSIBLE_PIPELINING": "True",
                    "ANSIBLE_NOCOLOR": "True",
                    MARK: marker,
                    **vault,
                },
                timeout=int(timeout),
                quiet=True,
                cancel_callback=canceled.is_set,
            )
        finally:
            process.kill_marked(MARK, marker)
            secret.REDACTOR.scrub(private)
    if canceled.is_set() or str(runner.status) == "canceled":
        raise Interrupted(f"interrupted during playbook {playbook.name}; it was stopped")
    failed = []
    unmatched = []
    for event in runner.events:
        if event.get("event") == "playbook_on_no_hosts_matched":
            data = event.get("event_data", {})
            unmatched.append(
                f"play {data.get('play')!r} matched no host (hosts: {data.get('play_pattern')});"
                f" the new instances are in groups all, {group_name}"
            )
        elif event.get("event") in ("runner_on_failed", "runner_on_unreachable"):
            data = event.get("event_data", {})
            if data.get("ignore_errors"):
                continue
            result = data.get("res", {}) or {}
            if result.get("failed_when_result") is True:
                message = "its failed_when condition held"
            else:
                message = str(result.get("msg") or result.get("stderr") or "").strip()
            failed.append(f"{data.get('host')}: {data.get('task')}: {message[:200]}")
    status = str(runner.status)
    if status == "timeout":
        failed.insert(0, f"stopped after {timeout:.0f} s")
    return Outcome(status=status, rc=runner.rc, failed=failed, unmatched=unmatched)


@contextlib.contextmanager
def _cancel_on_signal() -> Iterator[threading.Event]:
    """An event set by SIGINT or SIGTERM while the block runs; the old handlers come back after."""
    canceled = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield canceled  # only the main thread gets signals
        return
    previous = {
        number: signal.signal(number, lambda _number, _frame: canceled.set())
        for number in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield canceled
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
