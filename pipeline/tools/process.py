"""Run an external command the way every adapter needs it.

Each command runs in its own process group, so that a failure, a timeout or Ctrl-C stops the
command and everything it started (Packer's QEMU, Ansible's SSH). Its output goes line by line
to a log file (and to a callback for live progress); the last lines are kept for error messages.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline import secret
from pipeline.errors import Interrupted, MissingTool, ToolError

TAIL_LINES = 15
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
STOP_GRACE_SECONDS = 10.0

# Every Packer and Terraform run: never call the vendor's update-check service.
BASE_ENV = {"CHECKPOINT_DISABLE": "1"}


@dataclass(frozen=True)
class Completed:
    """A finished command: its exit code, the whole output and where it was logged."""

    argv: list[str]
    returncode: int
    output: str
    log: Path | None
    seconds: float

    @property
    def tail(self) -> list[str]:
        return self.output.splitlines()[-TAIL_LINES:]


def command_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment every external tool runs with.

    The folder of this Python comes first on PATH, so that the tools installed beside the
    pipeline (ansible-playbook, ansible-config, molecule) are found even when the virtual
    environment was never activated. (Variables that hold a secret are not in os.environ: see
    secret.withhold.)
    """
    env = dict(os.environ)
    env.update(BASE_ENV)
    bin_dir = os.path.dirname(sys.executable)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", os.defpath)])
    if extra:
        env.update(extra)
    return env


def stop_group(proc: subprocess.Popen[bytes], grace: float = STOP_GRACE_SECONDS) -> None:
    """Stop a process group: SIGTERM, then SIGKILL after a grace period."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run(
    argv: Sequence[str],
    *,
    what: str,
    log: Path | None = None,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    on_line: Callable[[str], None] | None = None,
    check: bool = True,
    stdin_data: bytes | None = None,
    stop_when: Callable[[str], bool] | None = None,
) -> Completed:
    """Run `argv`, logging its output; raise ToolError naming `what` if it fails and `check`.

    `stop_when` is asked about every line of output: the first for which it holds stops the
    command (its process group, as a timeout does) and raises ToolError, whatever its exit code.
    """
    argv = [str(a) for a in argv]
    started = time.monotonic()
    lines: collections.deque[str] = collections.deque()
    log_file = None
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log_file = log.open("w", encoding="utf-8")
        log_file.write(f"$ {' '.join(argv)}\n")
    try:
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=command_env(env),
            stdin=subprocess.PIPE if stdin_data is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except FileNotFoundError as exc:
        if log_file:
            log_file.close()
        raise MissingTool(f"{what}: `{argv[0]}` is not installed (run ./setup.sh)") from exc

    stopped: list[str] = []
    stopper = threading.Thread(target=stop_group, args=(proc,), daemon=True, name=f"stop-{what}")

    def watch(line: str) -> None:
        if on_line is not None:
            on_line(line)
        if stop_when is not None and not stopped and stop_when(line):
            stopped.append(line)
            # Stopped from another thread: this one goes on reading what the command prints
            # while it ends, which it might otherwise block on.
            stopper.start()

    reader = threading.Thread(
        target=_pump, args=(proc, lines, log_file, watch), daemon=True, name=f"pump-{what}"
    )
    reader.start()
    try:
        if stdin_data is not None and proc.stdin is not None:
            proc.stdin.write(stdin_data)
            proc.stdin.close()
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_group(proc)
        reader.join()
        _close(log_file)
        raise ToolError(
            f"{what} (timed out after {timeout:.0f} s)",
            argv,
            -1,
            list(lines)[-TAIL_LINES:],
            str(log or ""),
        ) from None
    except KeyboardInterrupt:
        stop_group(proc)
        reader.join()
        _close(log_file)
        raise Interrupted(f"interrupted during {what}; the command was stopped") from None
    except BaseException:
        stop_group(proc)
        reader.join()
        _close(log_file)
        raise
    reader.join()
    if stopped:
        stopper.join()
    _close(log_file)

    done = Completed(argv, proc.returncode, "\n".join(lines), log, time.monotonic() - started)
    if stopped:
        tail = list(lines)[-TAIL_LINES:]
        # Its exit code says little: Packer, stopped so, ends with 0.
        where = f"{what} (stopped by the pipeline at: {stopped[0].strip()})"
        raise ToolError(where, argv, proc.returncode, tail, str(log or ""))
    if check and proc.returncode != 0:
        raise ToolError(what, argv, proc.returncode, done.tail, str(log or ""))
    return done


def _pump(
    proc: subprocess.Popen[bytes],
    lines: collections.deque[str],
    log_file: object,
    on_line: Callable[[str], None] | None,
) -> None:
    assert proc.stdout is not None
    for raw in proc.stdout:
        # Tools colour their output even when told not to; logs and messages want plain text.
        # A secret a tool prints is masked before the line goes anywhere.
        line = ANSI_ESCAPE.sub("", raw.decode("utf-8", errors="replace").rstrip("\n"))
        line = secret.redact(line)
        lines.append(line)
        if log_file is not None:
            log_file.write(line + "\n")  # type: ignore[attr-defined]
            log_file.flush()  # type: ignore[attr-defined]
        if on_line is not None:
            on_line(line)


def _close(log_file: object) -> None:
    if log_file is not None:
        log_file.close()  # type: ignore[attr-defined]


def marked_processes(name: str) -> Iterator[tuple[int, str]]:
    """Every process (but this one) whose environment sets `name`, with the value it has.

    Marks in the environment are inherited through every fork and exec, by daemons and by the
    tools' own children, where process groups and parent links are not.
    """
    needle = f"{name}=".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        for item in environ.split(b"\0"):
            if item.startswith(needle):
                yield int(entry.name), item[len(needle) :].decode(errors="replace")
                break


def kill_marked(
    name: str, value: str, *, spare: Collection[int] = (), rounds: int = 20
) -> list[int]:
    """SIGKILL every process (but those in `spare`) whose environment sets `name` to `value`;
    return their pids.

    Scans again until one finds none: a process forked while a scan went through /proc (by a
    parent killed a moment later) would otherwise be missed and live on (seen on a loaded
    machine: a smoke play's `sleep` outlived its timeout).
    """
    killed: list[int] = []
    for _ in range(rounds):
        found = [pid for pid, mark in marked_processes(name) if mark == value and pid not in spare]
        if not found:
            break
        for pid in found:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                if pid not in killed:
                    killed.append(pid)
        time.sleep(0.05)
    return killed


def start_ticks(pid: int) -> int | None:
    """When process `pid` started (clock ticks after boot), or None if there is no such process.

    With the pid this names one process for good: a pid reused by another program has another
    start time.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the command name, which may itself hold spaces and parentheses.
    fields = stat.rsplit(")", 1)[-1].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])
