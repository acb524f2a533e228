"""A throwaway PostgreSQL server for the tests, listening on 127.0.0.1 only.

`python tests/postgres_server.py start DIR` prints the server's URL on stdout; `stop DIR` stops
it. A second `start` on a running DIR prints the same URL; `stop` on a stopped one does nothing.
DIR holds the data folder (`data/`), the unix socket (`socket/`) and the server's log
(`server.log`).

Only the standard library is used, so `.ci/run` can call this before `.venv` exists. initdb and
pg_ctl refuse to run as root, so when we are root they run as the `postgres` user, who owns DIR.
"""

from __future__ import annotations

import argparse
import logging
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

log = logging.getLogger("postgres_server")

SUPERUSER = "pipeline"
DATABASE = "pipeline_test"
START_TIMEOUT = 60
PORT_ATTEMPTS = 3
TAIL_LINES = 20

# A test server loses nothing worth keeping in a crash, so durability is traded for speed.
SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
}


class PostgresServerError(RuntimeError):
    """The test server could not be set up, started or stopped."""

    exit_code = 1


class PostgresNotInstalled(PostgresServerError):
    """No initdb and pg_ctl were found."""

    exit_code = 3


@dataclass(frozen=True)
class Layout:
    """Where a server's files live inside its folder."""

    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def socket(self) -> Path:
        return self.root / "socket"

    @property
    def log(self) -> Path:
        return self.root / "server.log"


def find_bindir() -> Path:
    """The folder holding initdb and pg_ctl: the one on PATH first, else the newest Debian one.

    Raises PostgresNotInstalled when there is none.
    """
    candidates = []
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    debian = Path("/usr/lib/postgresql").glob("*/bin")
    candidates += sorted(debian, key=_major_version, reverse=True)

    for bindir in candidates:
        if all(os.access(bindir / tool, os.X_OK) for tool in ("initdb", "pg_ctl", "psql")):
            return bindir
    message = (
        "PostgreSQL is not installed: no initdb, pg_ctl and psql on PATH or in "
        "/usr/lib/postgresql/*/bin (apt-get install --no-install-recommends postgresql)"
    )
    raise PostgresNotInstalled(message)


def start(root: Path) -> str:
    """Start the server kept in `root` (creating it on first use) and return its URL.

    The server listens on 127.0.0.1 on a free port and holds an empty database `pipeline_test`
    the first time. If it already runs, its URL is returned and nothing else is done.
    """
    bindir = find_bindir()
    layout = Layout(root.resolve())
    runner = _Runner.for_current_user(layout.root)

    port = _running_port(bindir, layout, runner)
    if port is not None:
        log.info("already running on 127.0.0.1:%d (%s)", port, layout.data)
        return _url(port)

    _prepare(layout, runner)
    if not (layout.data / "PG_VERSION").exists():
        _initdb(bindir, layout, runner)
    port = _start_on_free_port(bindir, layout, runner)
    _ensure_database(bindir, port)
    log.info("started on 127.0.0.1:%d (%s)", port, layout.data)
    return _url(port)


def stop(root: Path) -> None:
    """Stop the server kept in `root`; nothing happens if it does not run or was never made."""
    layout = Layout(root.resolve())
    if not (layout.data / "PG_VERSION").exists():
        return
    bindir = find_bindir()
    runner = _Runner.for_current_user(layout.root)
    if _running_port(bindir, layout, runner) is None:
        return

    argv = [str(bindir / "pg_ctl"), "stop", "-D", str(layout.data), "-m", "fast", "-w"]
    argv += ["-t", str(START_TIMEOUT)]
    result = runner.run(argv)
    if result.returncode != 0:
        _fail("pg_ctl stop", argv, result, layout)
    log.info("stopped (%s)", layout.data)


@dataclass(frozen=True)
class _Runner:
    """Runs the server's tools as the account that owns its folder."""

    cwd: Path
    uid: int | None = None
    gid: int | None = None

    @classmethod
    def for_current_user(cls, cwd: Path) -> _Runner:
        if os.geteuid() != 0:
            return cls(cwd)
        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            message = "running as root needs a `postgres` user to run the server; there is none"
            raise PostgresServerError(message) from None
        return cls(cwd, account.pw_uid, account.pw_gid)

    def run(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv,
            cwd=self.cwd,
            env=_clean_env(),
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT + 30,
            check=False,
            user=self.uid,
            group=self.gid,
            extra_groups=None if self.uid is None else [],
        )


def _clean_env() -> dict[str, str]:
    # A PG* variable from the caller's shell must not point our tools at another server.
    return {name: value for name, value in os.environ.items() if not name.startswith("PG")}


def _major_version(bindir: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", bindir.parent.name))


def _url(port: int) -> str:
    return f"postgresql://{SUPERUSER}@127.0.0.1:{port}/{DATABASE}"


def _running_port(bindir: Path, layout: Layout, runner: _Runner) -> int | None:
    """The port of the server running on `layout.data`, or None when it does not run."""
    if not (layout.data / "PG_VERSION").exists():
        return None
    status = runner.run([str(bindir / "pg_ctl"), "status", "-D", str(layout.data)])
    if status.returncode != 0:
        return None
    # postmaster.pid: pid, data folder, start time, port, socket folder, listen address, ...
    lines = (layout.data / "postmaster.pid").read_text().splitlines()
    return int(lines[3])


def _prepare(layout: Layout, runner: _Runner) -> None:
    """Make the folder and its socket folder, owned by the account that runs the server."""
    for folder in (layout.root, layout.socket):
        folder.mkdir(parents=True, exist_ok=True)
        if runner.uid is not None:
            os.chown(folder, runner.uid, -1 if runner.gid is None else runner.gid)

    if runner.uid is not None and runner.run(["test", "-w", str(layout.root)]).returncode != 0:
        message = (
            f"the postgres user cannot write to {layout.root}: every folder above it must be "
            "searchable by others (initdb refuses root, so the server runs as postgres)"
        )
        raise PostgresServerError(message)


def _initdb(bindir: Path, layout: Layout, runner: _Runner) -> None:
    """Create the cluster: superuser `pipeline`, trust auth, UTF8, settings for loopback tests."""
    argv = [str(bindir / "initdb"), "-D", str(layout.data), "-U", SUPERUSER, "--auth=trust"]
    argv += ["--encoding=UTF8", "--no-locale", "--no-instructions"]
    log.info("initdb %s", layout.data)
    result = runner.run(argv)
    if result.returncode != 0:
        _fail("initdb", argv, result, layout, server_log=False)

    settings = {**SETTINGS, "unix_socket_directories": str(layout.socket)}
    lines = [f"{name} = {_quoted(value)}" for name, value in settings.items()]
    with (layout.data / "postgresql.conf").open("a") as conf:
        conf.write("\n# Added for the pipeline's tests\n" + "\n".join(lines) + "\n")


def _quoted(value: str) -> str:
    escaped = value.replace("'", "''")
    return f"'{escaped}'"


def _start_on_free_port(bindir: Path, layout: Layout, runner: _Runner) -> int:
    """Start the server on a free port, picking another if someone takes it in between."""
    for attempt in range(1, PORT_ATTEMPTS + 1):
        port = _free_port()
        log_start = layout.log.stat().st_size if layout.log.exists() else 0
        argv = [str(bindir / "pg_ctl"), "start", "-D", str(layout.data), "-l", str(layout.log)]
        argv += ["-w", "-t", str(START_TIMEOUT), "-o", f"-p {port}"]
        result = runner.run(argv)
        if result.returncode == 0:
            return port

        port_taken = "could not bind" in _read_from(layout.log, log_start)
        if not port_taken or attempt == PORT_ATTEMPTS:
            _fail("pg_ctl start", argv, result, layout)
        log.info("port %d was taken before the server bound it; trying another", port)
    raise AssertionError("the loop above returns or raises")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _ensure_database(bindir: Path, port: int) -> None:
    """Create `pipeline_test` unless it exists (it does when the server was started before)."""
    psql = [str(bindir / "psql"), "-X", "-At", "--no-password", "-v", "ON_ERROR_STOP=1"]
    psql += ["-h", "127.0.0.1", "-p", str(port), "-U", SUPERUSER, "-d", "postgres"]
    env = _clean_env()

    query = f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'"
    found = subprocess.run(
        [*psql, "-c", query], env=env, capture_output=True, text=True, check=False
    )
    if found.returncode == 0 and found.stdout.strip() == "1":
        return
    argv = [*psql, "-c", f'CREATE DATABASE "{DATABASE}"']
    created = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if created.returncode != 0:
        _fail("creating the database", argv, created, None)


def _read_from(path: Path, offset: int) -> str:
    try:
        with path.open(errors="replace") as file:
            file.seek(offset)
            return file.read()
    except FileNotFoundError:
        return ""


def _fail(
    what: str,
    argv: Sequence[str],
    result: subprocess.CompletedProcess[str],
    layout: Layout | None,
    *,
    server_log: bool = True,
) -> NoReturn:
    """Raise an error naming the command, its exit code, its output and the server log's tail."""
    message = f"{what} failed: `{' '.join(argv)}` exited with code {result.returncode}"
    output = (result.stdout + result.stderr).strip().splitlines()[-TAIL_LINES:]
    if output:
        message += "\n  output:\n" + "\n".join(f"  | {line}" for line in output)
    if layout is not None and server_log:
        tail = _read_from(layout.log, 0).strip().splitlines()[-TAIL_LINES:]
        message += f"\n  last lines of {layout.log}:\n" + "\n".join(f"  | {line}" for line in tail)
    raise PostgresServerError(message)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: `start DIR` prints the URL, `stop DIR`, `bindir`; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("start", "start the server, print its URL"), ("stop", "stop it")):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("dir", type=Path, help="the server's folder")
    commands.add_parser("bindir", help="print the folder of initdb and pg_ctl (exit 3: none)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="postgres_server: %(message)s")

    try:
        if args.command == "start":
            print(start(args.dir))
        elif args.command == "stop":
            stop(args.dir)
        else:
            print(find_bindir())
    except PostgresServerError as error:
        print(f"postgres_server: {error}", file=sys.stderr)
        return error.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
