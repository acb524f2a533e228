"""An environment's front door: one HAProxy on 127.0.0.1 in front of the environment's instances.

The address stays the same for the life of the environment while the instances behind it come
and go: every `apply` writes a new configuration, checks it with `haproxy -c`, and reloads the
running HAProxy seamlessly (the listening socket passes from the old worker to the new one, so
no connection is refused), or starts it the first time. Everything lives in the front door's
own folder: the configuration, the pid file, the two admin sockets and `frontdoor.json`, the
record that keeps the port across runs. Any later process can adopt a running front door from
that folder.

HAProxy runs in master-worker mode. The master outlives the pipeline (daemonized, in its own
session); each reload forks a new worker and asks the old ones to finish what they were doing.
The master's CLI (`master.sock`) tells which worker is current and reaches each one, which is
how `apply` knows the new configuration is serving and `drain` knows the old ones have left.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

from pipeline import failpoints
from pipeline.errors import MissingTool, PipelineError, ToolError, UsageError
from pipeline.files import write_json_atomic, write_text_atomic
from pipeline.tools.process import run

log = logging.getLogger(__name__)

ADDRESS = "127.0.0.1"
# Names end up as words of the HAProxy configuration: nothing that could start a comment, a
# quoted string, an environment variable or a second keyword.
NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
CHECK_PATH = re.compile(r"/[A-Za-z0-9._~/?&=%+:@!,;*-]*")
# The folder's paths are written unquoted into the configuration and into `-S path,mode,600`.
FOLDER_PATH = re.compile(r"/[A-Za-z0-9._/+@=-]*")
# The longest path a unix socket address holds (sun_path), less its terminating NUL.
SOCKET_PATH_MAX = 107
# Bounds the life of a worker of an earlier configuration; drain() waits at most this by default.
HARD_STOP_AFTER = 30.0
START_TIMEOUT = 30.0
APPLY_TIMEOUT = 30.0
STOP_GRACE = 10.0
CLI_TIMEOUT = 5.0
EXEC_GRACE = 1.0
LOG_TAIL = 15
# Debian installs HAProxy in /usr/sbin, which is not on every user's PATH.
SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin")
# The master re-executes itself on every reload and keeps this environment for good: give it
# only what HAProxy needs to find its libraries, nothing of the pipeline's own environment.
HAPROXY_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"}


class FrontDoorError(PipelineError):
    """HAProxy did not start, did not take a new configuration in time, or did not stop."""

    exit_code = ToolError.exit_code


class PortTaken(FrontDoorError):
    """The front door's port is held by another program: nothing of the fleet was changed."""

    exit_code = 6  # DeployFailed's: the rollout could not go on


class _NoAnswer(FrontDoorError):
    """HAProxy's master CLI did not answer (it is away for an instant at each reload)."""


@dataclass
class _Processes:
    """What the master CLI's `show proc` says: current and leaving workers, failed reloads."""

    workers: list[int] = field(default_factory=list)
    old_workers: list[int] = field(default_factory=list)
    failed_reloads: int = 0


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class HealthCheck:
    """How HAProxy checks each instance behind the front door."""

    path: str = "/healthz"
    status: int = 200  # expected HTTP status
    interval: float = 1.0  # seconds between active checks
    rise: int = 2  # consecutive passes to go UP
    fall: int = 2  # consecutive failures to go DOWN

    def __post_init__(self) -> None:
        problem = ""
        if not CHECK_PATH.fullmatch(self.path):
            problem = f"path {self.path!r} (a URL path from /, no spaces, quotes or #)"
        elif not _is_int(self.status) or not 100 <= self.status <= 599:
            problem = f"status {self.status!r} (an HTTP status, 100 to 599)"
        elif not isinstance(self.interval, int | float) or not 0.01 <= self.interval <= 3600:
            problem = f"interval {self.interval!r} (seconds, 0.01 to 3600)"
        elif not _is_int(self.rise) or not _is_int(self.fall) or min(self.rise, self.fall) < 1:
            problem = f"rise {self.rise!r} / fall {self.fall!r} (whole counts from 1)"
        if problem:
            raise UsageError(f"not a usable health check: {problem}")


class FrontDoor:
    """One environment's HAProxy on 127.0.0.1, kept in `folder`, found again from it."""

    def __init__(
        self,
        folder: Path,
        *,
        name: str,
        port: int | None = None,
        health: HealthCheck = HealthCheck(),
    ) -> None:
        if not NAME.fullmatch(name):
            raise UsageError(f"not a usable front door name: {name!r} (letters, digits, . _ -)")
        if port is not None:
            _check_port(port, f"port of front door {name}")
        # Absolute: the daemonized master changes to /, and running() matches this path in its
        # command line.
        self.folder = folder.resolve()
        if not FOLDER_PATH.fullmatch(str(self.folder)):
            message = (
                f"not a usable front door folder: {self.folder} "
                f"(HAProxy's configuration takes letters, digits and . _ / + @ = - in a path)"
            )
            raise UsageError(message)
        self.name = name
        self.health = health
        self._config = self.folder / "haproxy.cfg"
        self._pidfile = self.folder / "haproxy.pid"
        self._admin_socket = self.folder / "admin.sock"
        self._master_socket = self.folder / "master.sock"
        self._state_file = self.folder / "servers.state"
        self._log = self.folder / "haproxy.log"
        self._record_path = self.folder / "frontdoor.json"
        self._lock_path = self.folder / "frontdoor.lock"
        for path in (self._admin_socket, self._master_socket):
            if len(os.fsencode(path)) > SOCKET_PATH_MAX:
                message = f"front door folder {self.folder} is too deep for a unix socket path"
                raise UsageError(message)

        self.folder.mkdir(parents=True, exist_ok=True)
        with self._locked():
            record = self._read_record()
            if record.get("name", name) != name:
                message = f"{self.folder} is the folder of front door {record['name']}, not {name}"
                raise UsageError(message)
            # The address is what clients keep: once picked, a port stays unless one is given.
            # A given port is recorded only once HAProxy serves on it (apply), so a port that
            # turns out taken leaves the recorded address, the one still serving, as it was.
            recorded = record.get("port")
            if recorded is not None:
                _check_port(recorded, f"port recorded in {self._record_path}")
            self._port = port or recorded or _free_port()
            self._recorded_port: int | None = recorded
            if recorded is None or "name" not in record:
                self._write_record(record.get("backends", {}))

    @property
    def port(self) -> int:
        """The port the front door listens on, or will once applied."""
        return int(self._port)

    @property
    def url(self) -> str:
        """Where clients reach the environment: the same across runs and reloads.

        Until a newly given port serves, that is still the recorded one.
        """
        return f"http://{ADDRESS}:{self._recorded_port or self.port}"

    def running(self) -> bool:
        """True if the pid file names a live HAProxy master of this front door's config."""
        try:
            pid = int(self._pidfile.read_text().strip())
        except (OSError, ValueError):
            return False
        return self._is_ours(pid)

    def apply(self, backends: Mapping[str, int]) -> None:
        """Put exactly `backends` (server name -> port on 127.0.0.1) behind the front door.

        Returns once the new configuration is serving. A configuration HAProxy refuses raises
        ToolError and leaves the running one as it was.
        """
        wanted = _check_backends(backends, self.port)
        with self._locked():
            text = self._render(wanted)
            if self.running() and _read(self._config) == text and self._serves(wanted):
                # Already serving exactly these: a reload would only churn workers.
                return
            candidate = self._write_candidate(text)
            if self.running():
                self._reload(candidate, wanted)
            else:
                self._start(candidate, wanted)
            self._write_record(wanted)
        log.info("[%s > front door] %s -> %s", self.name, self.url, _describe(wanted))

    def drain(self, timeout: float = HARD_STOP_AFTER) -> None:
        """Wait until the workers of earlier configurations have finished their requests."""
        deadline = time.monotonic() + timeout
        while self.running():
            leaving = self._processes().old_workers
            if not leaving:
                return
            if time.monotonic() > deadline:
                pids = ", ".join(str(pid) for pid in leaving)
                message = (
                    f"front door {self.name}: workers of earlier configurations (pid {pids}) "
                    f"still serve requests after {timeout:.0f} s; HAProxy stops them "
                    f"{HARD_STOP_AFTER:.0f} s after their reload"
                )
                raise FrontDoorError(message)
            time.sleep(0.1)

    def servers(self) -> dict[str, str]:
        """Each server's state as the current worker sees it: UP, DOWN, MAINT, DRAIN, NOLB.

        A server between states counts as where it is: HAProxy's "UP 1/2" (up, one check
        failed) is UP, and "DOWN 1/2" (down, one check passed) is DOWN.
        """
        if not self.running():
            raise UsageError(f"front door {self.name} is not running")
        worker = self._current_worker()
        rows = csv.reader(self._ask(f"@!{worker} show stat").lstrip("# ").splitlines())
        header = next(rows, [])
        if "status" not in header:
            raise FrontDoorError(f"front door {self.name}: worker {worker} gave no server list")
        states = {}
        for row in rows:
            fields = dict(zip(header, row, strict=False))
            server = fields.get("svname", "")
            if fields.get("pxname") != self._backend or server in ("FRONTEND", "BACKEND"):
                continue
            states[server] = re.sub(r" \d+/\d+$", "", fields["status"])
        return states

    def stop(self) -> None:
        """Stop HAProxy, master and workers; keep the record, so a later start keeps the port."""
        with self._locked():
            pids = self._our_pids()
            for pid in pids:
                _signal(pid, signal.SIGTERM)
            if not _wait_gone(self._our_pids, STOP_GRACE):
                for pid in self._our_pids():
                    _signal(pid, signal.SIGKILL)
                if not _wait_gone(self._our_pids, STOP_GRACE):
                    raise FrontDoorError(f"front door {self.name}: HAProxy survived SIGKILL")
            for path in (self._pidfile, self._admin_socket, self._master_socket):
                path.unlink(missing_ok=True)
        if pids:
            log.info("[%s > front door] stopped", self.name)

    # --- configuration ----------------------------------------------------------------------

    @property
    def _backend(self) -> str:
        return f"be_{self.name}"

    def _render(self, backends: Mapping[str, int]) -> str:
        health = self.health
        inter = max(10, round(health.interval * 1000))
        servers = "".join(
            f"    server {name} {ADDRESS}:{port} check inter {inter}ms "
            f"rise {health.rise} fall {health.fall}\n"
            for name, port in sorted(backends.items())
        )
        # A server added by a reload starts UP in HAProxy 2.6 (there is no `init-state` before
        # 3.1): it takes traffic at once and goes DOWN at its first failed check, without
        # waiting for `fall` failures. That is what the pipeline wants, since it adds only
        # instances it has checked healthy. Servers that were already there keep their state
        # through the server-state file, so a DOWN one does not come back UP on a reload.
        return f"""\
# Front door {self.name}, written by the pipeline: changes here are lost at the next apply.
global
    # No `log` line: nothing is logged, and nothing is sent to any syslog server.
    stats socket {self._admin_socket} mode 600 level admin expose-fd listeners
    server-state-file {self._state_file}
    hard-stop-after {HARD_STOP_AFTER:.0f}s
    # Only the sockets handed over at a reload may share the port, never another process.
    noreuseport

defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout http-request 10s
    timeout http-keep-alive 5s
    timeout queue 10s
    timeout check 2s
    # An instance that goes away mid-request: try again, on another server.
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response junk-response
    load-server-state-from-file global

frontend fe_{self.name}
    bind {ADDRESS}:{self.port}
    default_backend {self._backend}

backend {self._backend}
    balance roundrobin
    # Connections to instances are shared the default way (`http-reuse safe`): only a client's
    # later requests may take a connection another left open. `always` halved an emulated
    # guest's CPU per request, but then a GET body an instance leaves unread (as Python's
    # http.server does) became the start of another client's request (tests/test_frontdoor.py).
    option httpchk GET {health.path}
    http-check expect status {health.status}
{servers}"""

    def _write_candidate(self, text: str) -> Path:
        # A refused candidate stays under its name, which HAProxy's message quotes with a line.
        candidate = self.folder / "haproxy.cfg.candidate"
        write_text_atomic(candidate, text, mode=0o600)
        argv = [_haproxy(), "-c", "-f", str(candidate)]
        done = run(argv, what="check the front door config", check=False, timeout=60)
        if done.returncode != 0:
            alerts = [line for line in done.output.splitlines() if "[ALERT]" in line]
            what = f"check the front door config {candidate}"
            raise ToolError(what, argv, done.returncode, alerts or done.tail)
        return candidate

    # --- start and reload -------------------------------------------------------------------

    def _start(self, candidate: Path, backends: Mapping[str, int]) -> None:
        # A worker whose master died still holds the port; it is ours to end.
        for pid in self._our_pids():
            _signal(pid, signal.SIGKILL)
        _wait_gone(self._our_pids, STOP_GRACE)
        _check_port_free(self.port, self.name)
        for path in (self._pidfile, self._admin_socket, self._master_socket):
            path.unlink(missing_ok=True)
        write_text_atomic(self._state_file, "1\n")
        os.replace(candidate, self._config)

        argv = [
            _haproxy(), "-W", "-D", "-f", str(self._config), "-p", str(self._pidfile),
            "-S", f"{self._master_socket},mode,600",
        ]  # fmt: skip
        offset = _size(self._log)
        # Not through run(): the daemonized master keeps stderr open for good, so its output
        # goes to a file of ours rather than a pipe someone waits on.
        with self._log.open("ab") as output:
            try:
                launcher = subprocess.run(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=output,
                    cwd=self.folder,
                    env=HAPROXY_ENV,
                    start_new_session=True,
                    timeout=START_TIMEOUT,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                raise self._tool_error("start HAProxy", argv, -1, offset) from None
        if launcher.returncode != 0:
            raise self._tool_error("start HAProxy", argv, launcher.returncode, offset)
        self._wait_serving(backends, previous=set(), failed=0, offset=offset)
        log.info("[%s > front door] HAProxy started on %s", self.name, self.url)

    def _reload(self, candidate: Path, backends: Mapping[str, int]) -> None:
        processes = self._processes()
        previous = set(processes.workers)
        failed = processes.failed_reloads
        if self._config_port() != self.port:
            _check_port_free(self.port, self.name)
        self._save_states(backends)
        backup = self.folder / "haproxy.cfg.previous"
        shutil.copy2(self._config, backup)
        os.replace(candidate, self._config)
        offset = _size(self._log)
        pid = int(self._pidfile.read_text().strip())
        try:
            failpoints.reach("frontdoor.reload")
            os.kill(pid, signal.SIGUSR2)
            self._wait_serving(backends, previous=previous, failed=failed, offset=offset)
        except BaseException:
            # What is on disk stays what is serving.
            os.replace(backup, self._config)
            raise
        backup.unlink(missing_ok=True)

    def _wait_serving(
        self, backends: Mapping[str, int], *, previous: set[int], failed: int, offset: int
    ) -> None:
        # Done when a worker the master did not have before answers with exactly these servers.
        wanted = {(name, port) for name, port in backends.items()}
        deadline = time.monotonic() + APPLY_TIMEOUT
        seen: set[tuple[str, int]] | None = None
        while True:
            # Just after the launcher returns, the master may not have written its pid yet.
            if not self.running() and not self._our_pids():
                message = f"front door {self.name}: HAProxy exited; its log {self._log} says:"
                raise FrontDoorError(_with_tail(message, self._log, offset))
            try:
                processes = self._processes()
                fresh = [pid for pid in processes.workers if pid not in previous]
                seen = self._listed(fresh[0]) if fresh else None
            except _NoAnswer:
                # The master CLI is away while the master re-executes itself.
                processes, seen = _Processes(failed_reloads=failed), None
            if processes.failed_reloads > failed:
                message = (
                    f"front door {self.name}: HAProxy refused the new configuration and keeps "
                    f"serving the previous one; its log {self._log} says:"
                )
                raise FrontDoorError(_with_tail(message, self._log, offset))
            if seen == wanted:
                return
            if time.monotonic() > deadline:
                message = (
                    f"front door {self.name}: the new configuration was not serving after "
                    f"{APPLY_TIMEOUT:.0f} s (wanted {_describe(backends)}, "
                    f"the new worker lists {seen if seen is not None else 'nothing yet'}); "
                    f"HAProxy's log {self._log} says:"
                )
                raise FrontDoorError(_with_tail(message, self._log, offset))
            time.sleep(0.05)

    def _serves(self, backends: Mapping[str, int]) -> bool:
        """Whether the current worker serves exactly these. The file on disk alone does not
        say: a run killed during a reload leaves the new file written and HAProxy not told."""
        try:
            return self._listed(self._current_worker()) == set(backends.items())
        except (_NoAnswer, FrontDoorError):
            return False

    def _listed(self, worker: int) -> set[tuple[str, int]] | None:
        rows = _state_rows(self._ask(f"@!{worker} show servers state {self._backend}"))
        if rows is None:
            return None
        return {(row["srv_name"], int(row["srv_port"])) for row in rows}

    def _save_states(self, backends: Mapping[str, int]) -> None:
        # HAProxy would also restore a server's address and port from this file: keep only the
        # servers that stay exactly as they are, so a name given a new port starts afresh.
        worker = self._current_worker()
        text = self._ask(f"@!{worker} show servers state {self._backend}")
        lines = text.strip().splitlines()
        kept = []
        for line, row in zip(lines[2:], _state_rows(text) or [], strict=True):
            if row["srv_addr"] == ADDRESS and backends.get(row["srv_name"]) == int(row["srv_port"]):
                kept.append(line)
        # Without a readable answer, every server starts afresh (UP, see _render).
        header = lines[:2] if _state_rows(text) is not None else ["1"]
        write_text_atomic(self._state_file, "\n".join([*header, *kept]) + "\n")

    # --- processes and sockets --------------------------------------------------------------

    def _is_ours(self, pid: int) -> bool:
        # The master re-executes itself on a reload (and once as it starts): for that instant
        # its command line reads empty, though its name is already haproxy.
        deadline = time.monotonic() + EXEC_GRACE
        while True:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                return False
            # A zombie serves nothing; its state is the first field after comm's ")".
            comm, _, rest = stat.partition(" (")[2].rpartition(")")
            if rest.split()[:1] in (["Z"], ["X"]) or comm != "haproxy":
                return False
            if cmdline or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        args = cmdline.split(b"\0")
        return os.path.basename(args[0]) == b"haproxy" and os.fsencode(self._config) in args

    def _our_pids(self) -> list[int]:
        # Master and workers alike, including workers whose master is gone.
        return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()
                and self._is_ours(int(entry.name))]  # fmt: skip

    def _processes(self) -> _Processes:
        # Lines of pids under "# workers", "# old workers" and "# programs"; the master's own
        # line counts its failed reloads.
        found = _Processes()
        sections = {"workers": found.workers, "old workers": found.old_workers}
        pids: list[int] | None = None
        for line in self._ask("show proc").splitlines():
            words = line.split()
            if line.startswith("#"):
                pids = sections.get(line.lstrip("#").strip())
            elif len(words) >= 2 and words[1] == "master":
                failed = re.search(r"\[failed: (\d+)\]", line)
                found.failed_reloads = int(failed.group(1)) if failed else 0
            elif words and words[0].isdigit() and pids is not None:
                pids.append(int(words[0]))
        return found

    def _current_worker(self) -> int:
        workers = self._processes().workers
        if not workers:
            raise FrontDoorError(f"front door {self.name}: HAProxy's master has no worker")
        return workers[0]

    def _config_port(self) -> int | None:
        try:
            found = re.search(rf"^\s*bind {re.escape(ADDRESS)}:(\d+)", self._config.read_text(),
                              re.MULTILINE)  # fmt: skip
        except OSError:
            return None
        return int(found.group(1)) if found else None

    def _ask(self, command: str) -> str:
        # The master CLI answers once the request is closed for writing, then hangs up.
        chunks = []
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(CLI_TIMEOUT)
                conn.connect(str(self._master_socket))
                conn.sendall(command.encode() + b"\n")
                conn.shutdown(socket.SHUT_WR)
                while chunk := conn.recv(65536):
                    chunks.append(chunk)
        except OSError as exc:
            message = f"front door {self.name}: no answer on {self._master_socket}: {exc}"
            raise _NoAnswer(message) from None
        return b"".join(chunks).decode(errors="replace")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # Two processes applying to one front door at once would reload under each other.
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _read_record(self) -> dict[str, Any]:
        try:
            data = json.loads(self._record_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise UsageError(f"unreadable front door record {self._record_path}: {exc}") from None
        return data if isinstance(data, dict) else {}

    def _write_record(self, backends: Mapping[str, int]) -> None:
        record = {"name": self.name, "port": self.port, "backends": dict(backends)}
        write_json_atomic(self._record_path, record)
        self._recorded_port = self.port

    def _tool_error(self, what: str, argv: list[str], returncode: int, offset: int) -> ToolError:
        tail = _log_lines(self._log, offset)
        cause = ""
        if any("cannot bind socket" in line or "Address already in use" in line for line in tail):
            cause = f"port {self.port} on {ADDRESS} is taken by another program"
        return ToolError(
            f"{what} for front door {self.name}", argv, returncode, tail, str(self._log),
            cause=cause,
        )  # fmt: skip


def _check_backends(backends: Mapping[str, int], own_port: int) -> dict[str, int]:
    checked = {}
    for name, port in backends.items():
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise UsageError(f"not a usable server name: {name!r} (letters, digits, . _ -)")
        _check_port(port, f"port of server {name}")
        if port == own_port:
            raise UsageError(f"server {name} points at the front door's own port {port}")
        checked[name] = port
    return checked


def _check_port(port: object, what: str) -> None:
    if not _is_int(port) or not 1 <= port <= 65535:
        raise UsageError(f"not a usable {what}: {port!r} (a whole number, 1 to 65535)")


def _check_port_free(port: int, name: str) -> None:
    # HAProxy would say so too, in its own words and after daemonizing; and where SO_REUSEPORT
    # is allowed, it would share the port with another process instead of failing.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((ADDRESS, port))
        except OSError as exc:
            message = (
                f"front door {name} cannot listen on {ADDRESS}:{port}: {exc.strerror}; "
                f"free the port or configure another one"
            )
            raise PortTaken(message) from None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((ADDRESS, 0))
        return int(probe.getsockname()[1])


def _haproxy() -> str:
    path = os.pathsep.join([os.environ.get("PATH", os.defpath), *SBIN_DIRS])
    found = shutil.which("haproxy", path=path)
    if found is None:
        raise MissingTool("the front door needs HAProxy: `haproxy` is not installed")
    return found


def _state_rows(text: str) -> list[dict[str, str]] | None:
    # `show servers state`: a version line, a "# be_id be_name ..." header, one line a server.
    lines = text.strip().splitlines()
    if len(lines) < 2 or not lines[1].startswith("# be_id"):
        return None
    header = lines[1][2:].split()
    return [dict(zip(header, line.split(), strict=False)) for line in lines[2:]]


def _wait_gone(pids: Callable[[], list[int]], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while pids():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _log_lines(path: Path, offset: int) -> list[str]:
    try:
        with path.open("rb") as output:
            output.seek(offset)
            text = output.read().decode(errors="replace")
    except OSError:
        return []
    return text.splitlines()[-LOG_TAIL:]


def _with_tail(message: str, path: Path, offset: int) -> str:
    lines = _log_lines(path, offset) or ["(nothing)"]
    return message + "\n" + "\n".join(f"  | {line}" for line in lines)


def _describe(backends: Mapping[str, int]) -> str:
    if not backends:
        return "no servers"
    return ", ".join(f"{name}={ADDRESS}:{port}" for name, port in sorted(backends.items()))


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return None
