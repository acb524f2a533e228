"""Read Ansible's own output for what failed: the task names and their `fatal:` lines.

Packer and Molecule end a failed run with their own epilogue; the failing task is what a user
needs first, so the stages put it at the front of their error messages.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from pipeline.errors import ToolError

MAX_DETAIL = 400


def output_of(exc: ToolError) -> list[str]:
    """The whole output of a command that failed: its log, else the tail the error kept."""
    try:
        return Path(exc.log).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return list(exc.tail)


def failed_tasks_of(exc: ToolError, *, prefix: str = "") -> list[str]:
    """The failed tasks in the whole output of a command that failed."""
    return failed_tasks(output_of(exc), prefix=prefix)


def failed_tasks(lines: Iterable[str], *, prefix: str = "") -> list[str]:
    """One line per failed task: `task [NAME] on HOST: DETAIL`.

    `prefix` is stripped from each line first (Packer prefixes Ansible's lines with the build's
    name, like `qemu.image: `).
    """
    task = ""
    found = []
    for raw in lines:
        line = raw.split(prefix, 1)[-1].strip() if prefix else raw.strip()
        if line.startswith("TASK [") or line.startswith("RUNNING HANDLER ["):
            task = line.split("[", 1)[1].rsplit("]", 1)[0]
        elif line.startswith(("fatal: [", "failed: [")) and task:
            host = line.split("[", 1)[1].split("]", 1)[0]
            found.append(f"task [{task}] on {host}: {_detail(line)}")
    return found


def current_task(lines: Iterable[str], *, prefix: str = "") -> str:
    """The name of the last task (or handler) Ansible started in `lines`, or ''."""
    task = ""
    for raw in lines:
        line = raw.split(prefix, 1)[-1].strip() if prefix else raw.strip()
        if line.startswith("TASK [") or line.startswith("RUNNING HANDLER ["):
            task = line.split("[", 1)[1].rsplit("]", 1)[0]
    return task


def _detail(line: str) -> str:
    """The most telling part of a `fatal:` line: its msg, or why failed_when failed."""
    _, _, payload = line.partition("=> ")
    try:
        result = json.loads(payload)
    except ValueError:
        return line[:MAX_DETAIL]
    if not isinstance(result, dict):
        return line[:MAX_DETAIL]
    reason = result.get("failed_when_result")
    if isinstance(reason, str):
        return f"failed_when: {reason}"[:MAX_DETAIL]
    if reason is True:
        return "its failed_when condition was true"
    message = result.get("msg") or result.get("stderr") or result.get("module_stderr") or line
    return str(message).strip()[:MAX_DETAIL]
