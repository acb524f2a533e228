"""How long the registry takes to list, pick the latest and promote with 10 000 versions.

Goal: each operation under 50 ms on SQLite and under 100 ms on PostgreSQL, judged on the 95th
percentile of --runs runs after a warm-up. Seeds one image, `web`, with --versions versions built
on a `debian` base lineage (manifests of about 2 KB, mostly verified, a few failed, revoked and
pre-release), then times:

  list              Registry.versions, the listing behind `pipeline images list` (no manifests)
  list (described)  api.images, what `pipeline images list web` shows: channels, outdated marks;
                    it opens the project and the registry on each call, as the CLI does
  latest            Registry.latest(web, states=("verified",), unrevoked=True)
  promote           api._promote with allow_older, moving `stable` between two versions each run

and, once, opening the registry (connect and migration check) as information.

PostgreSQL runs in a fresh database on $PIPELINE_TEST_POSTGRES_URL's server when it is set,
otherwise on a throwaway server (tests/postgres_server.py) on 127.0.0.1 that is stopped at the
end. Without PostgreSQL installed only SQLite is benched. A missed goal is a figure, not a
failure: the exit code is non-zero only when the bench itself fails.
    .venv/bin/python bench/registry.py [--versions N] [--runs N] [--backend sqlite|postgresql|both]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import itertools
import json
import math
import os
import platform
import random
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from pipeline import api
from pipeline.errors import PipelineError
from pipeline.registry import URL_VARIABLE, ImageVersion, Registry
from pipeline.registry.backends import connect, redact

IMAGE = "web"
BASE = "debian"
BASE_VERSIONS = 25
CHANNEL = "stable"
GOAL_MS = {"sqlite": 50.0, "postgresql": 100.0}
WARMUP = 3
# Versions are recorded this many to a transaction, through Registry.add all the same.
SEED_BATCH = 500
POSTGRES_SERVER = Path(__file__).resolve().parent.parent / "tests" / "postgres_server.py"
PACKAGES = (
    "adduser",
    "apt",
    "base-files",
    "bash",
    "bsdutils",
    "ca-certificates",
    "coreutils",
    "curl",
    "dash",
    "debconf",
    "dpkg",
    "e2fsprogs",
    "findutils",
    "gpgv",
    "grep",
    "gzip",
    "hostname",
    "init-system-helpers",
    "iproute2",
    "libc6",
    "libssl3",
    "login",
    "mount",
    "nginx",
    "openssh-server",
    "openssl",
    "passwd",
    "perl-base",
    "procps",
    "python3",
    "sed",
    "systemd",
    "sysvinit-utils",
    "tar",
    "tzdata",
    "util-linux",
    "zlib1g",
)
NOT_INSTALLED = 3  # postgres_server.py's exit code when there is no PostgreSQL


class BenchError(Exception):
    """The bench itself could not run (not a missed goal)."""


@dataclass(frozen=True)
class Timing:
    operation: str
    median_ms: float
    p95_ms: float


@dataclass(frozen=True)
class Outcome:
    backend: str
    seed_s: float
    open_ms: float
    timings: list[Timing]


@dataclass(frozen=True)
class Postgres:
    url: str | None  # None: not installed, `why` says so
    version: str = ""
    why: str = ""


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--versions", type=int, default=10_000, help="default: %(default)s")
    parser.add_argument("--runs", type=int, default=30, help="default: %(default)s")
    parser.add_argument(
        "--backend", choices=("sqlite", "postgresql", "both"), default="both", help="default: both"
    )
    args = parser.parse_args()
    if args.versions < 2 * BASE_VERSIONS or args.runs < 1:
        parser.error(f"--versions must be at least {2 * BASE_VERSIONS} and --runs at least 1")

    # api.images must open the registry seeded here, never the one this variable names.
    os.environ.pop(URL_VARIABLE, None)
    # A plain `kill` then still stops the throwaway server and drops the bench's database.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    try:
        with contextlib.ExitStack() as stack:
            postgres = Postgres(None, why="not asked for")
            if args.backend in ("postgresql", "both"):
                postgres = stack.enter_context(postgres_database())
            return run(args, postgres)
    except (BenchError, PipelineError) as error:
        print(f"bench failed: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def run(args: argparse.Namespace, postgres: Postgres) -> int:
    """Bench the backends asked for, then print one summary line for each."""
    backends = []
    if args.backend in ("sqlite", "both"):
        backends.append("sqlite")
    if args.backend in ("postgresql", "both"):
        if postgres.url is None:
            rest = "benching SQLite only" if backends else "nothing to bench"
            print(f"PostgreSQL: {postgres.why}; {rest}")
        else:
            backends.append("postgresql")
    if not backends:
        return 1

    print_header(args, postgres)
    outcomes = []
    for backend in backends:
        with tempfile.TemporaryDirectory(prefix="pipeline-bench-registry-") as work:
            url = f"sqlite:///{work}/registry.db" if backend == "sqlite" else postgres.url
            assert url is not None
            outcomes.append(bench(backend, url, Path(work), args))

    print()
    for outcome in outcomes:
        print(summary(outcome))
    return 0


def print_header(args: argparse.Namespace, postgres: Postgres) -> None:
    sample = len(json.dumps(image_manifest("1.0.0", digest(""), build_id(""), "1.0.0")))
    print(
        f"registry bench: {args.versions:,} versions of {IMAGE} on {BASE_VERSIONS} of {BASE}"
        f" (manifests ~{sample / 1024:.1f} KB), {args.runs} runs after {WARMUP} warm-up"
    )
    versions = [f"SQLite {sqlite3.sqlite_version}"]
    if postgres.url is not None:
        import psycopg

        versions.append(f"PostgreSQL {postgres.version}, psycopg {psycopg.__version__}")
    print(
        f"machine: {os.cpu_count()} cores, {platform.system()} {platform.machine()},"
        f" Python {platform.python_version()}; {', '.join(versions)}"
    )
    goals = ", ".join(f"{name} < {goal:.0f} ms" for name, goal in GOAL_MS.items())
    print(f"goal per operation, on p95: {goals}")


# the bench of one backend


def bench(backend: str, url: str, work: Path, args: argparse.Namespace) -> Outcome:
    """Seed a registry at `url`, then time each operation on it and print the table."""
    goal = GOAL_MS[backend]
    print(f"\n{backend}: seeding {args.versions:,} versions ...", file=sys.stderr)
    registry = Registry(connect(url))
    try:
        started = time.perf_counter()
        first, second = seed(registry, args.versions)
        seed_s = time.perf_counter() - started
        if backend == "postgresql":
            # A live server's autovacuum analyzes a table that grew this much within a minute;
            # without statistics the planner sorts all 10,000 rows for `latest`.
            registry.backend.execute("ANALYZE")
    finally:
        registry.close()

    started = time.perf_counter()
    registry = Registry(connect(url))
    open_ms = (time.perf_counter() - started) * 1000
    try:
        timings = time_operations(registry, url, work, args.runs, first, second)
    finally:
        registry.close()

    print(f"\n{backend}: seeded {args.versions:,} versions in {seed_s:.1f} s")
    print(f"  {'operation':<18} {'median':>10} {'p95':>10}   goal")
    print(f"  {'open (once)':<18} {open_ms:>7.1f} ms {'':>10}   (information)")
    for timing in timings:
        verdict = "PASS" if timing.p95_ms < goal else "MISS"
        print(
            f"  {timing.operation:<18} {timing.median_ms:>7.1f} ms {timing.p95_ms:>7.1f} ms"
            f"   < {goal:.0f} ms {verdict}"
        )
    return Outcome(backend, seed_s, open_ms, timings)


def time_operations(
    registry: Registry, url: str, work: Path, runs: int, first: str, second: str
) -> list[Timing]:
    """Time list, list (described), latest and promote on an open registry."""
    # api.images opens the project's registry itself; the variable points it here, and keeps
    # a password in the URL out of the file.
    config_path = work / "pipeline.yml"
    project = {
        "state_dir": str(work / "state"),
        "images": {IMAGE: {"version": "1.0.0", "roles": ["base"]}},
        "environments": {},
    }
    config_path.write_text(yaml.safe_dump(project))
    os.environ[URL_VARIABLE] = url

    def latest() -> None:
        found = registry.latest(IMAGE, states=("verified",), unrevoked=True)
        if found is None or found.version != first:
            raise BenchError(f"latest found {found and found.version}, not {first}")

    # Each run moves the channel, so each one writes the channel and a line of its history.
    targets = itertools.cycle((first, second))

    def promote() -> None:
        version = next(targets)
        move = api._promote(registry, IMAGE, CHANNEL, version, allow_older=True)
        if not move.moved:
            raise BenchError(f"promoting {IMAGE} {version} to {CHANNEL} moved nothing")

    operations: list[tuple[str, Callable[[], object]]] = [
        ("list", lambda: registry.versions(IMAGE)),
        ("list (described)", lambda: api.images(IMAGE, config_path=config_path)),
        ("latest", latest),
        ("promote", promote),
    ]
    timings = []
    try:
        for name, operation in operations:
            print(f"  timing {name} ...", file=sys.stderr)
            timings.append(time_runs(name, operation, runs))
    finally:
        del os.environ[URL_VARIABLE]
    return timings


def time_runs(name: str, operation: Callable[[], object], runs: int) -> Timing:
    for _ in range(WARMUP):
        operation()
    seconds = []
    for _ in range(runs):
        started = time.perf_counter()
        operation()
        seconds.append(time.perf_counter() - started)
    ordered = sorted(seconds)
    p95 = ordered[math.ceil(0.95 * len(ordered)) - 1]
    return Timing(name, statistics.median(ordered) * 1000, p95 * 1000)


def summary(outcome: Outcome) -> str:
    goal = GOAL_MS[outcome.backend]
    missed = [t for t in outcome.timings if t.p95_ms >= goal]
    passed = len(outcome.timings) - len(missed)
    line = (
        f"{outcome.backend}: {passed} of {len(outcome.timings)} operations under {goal:.0f} ms"
        f" (p95); open {outcome.open_ms:.1f} ms; seeding {outcome.seed_s:.1f} s"
    )
    if missed:
        line += "; MISS " + ", ".join(f"{t.operation} ({t.p95_ms:.0f} ms)" for t in missed)
    return line


# seeding


def seed(registry: Registry, count: int) -> tuple[str, str]:
    """Record `count` versions of the image and their bases; return two promotable versions.

    The first is the newest verified, unrevoked version (what `latest` must find), the second
    the one below it. `stable` is left on the second and `dev` on the first.
    """
    rng = random.Random(20_240_611)
    numbers = version_numbers(count)
    bases: list[str] = []
    for start in range(0, count, SEED_BATCH):
        with registry.backend.transaction():
            for index in range(start, min(start + SEED_BATCH, count)):
                number = numbers[index]
                wanted = index * BASE_VERSIONS // count
                while len(bases) <= wanted:
                    bases.append(add_base(registry, len(bases)))
                state, failure = pick_state(rng, index, count)
                add_image(registry, number, state, failure, bases[-1])
                # Promotions along the way leave a history of realistic length.
                if state == "verified" and index % 50 == 0:
                    channel = "stable" if index % 500 == 0 else "dev"
                    registry.promote(IMAGE, channel, number)
        print(f"  {min(start + SEED_BATCH, count):,} versions", file=sys.stderr)

    verified = [v for v in registry.versions(IMAGE) if v.state == "verified"]
    revoke_some(registry, rng, verified)
    usable = [v.version for v in registry.versions(IMAGE) if v.why_unusable() is None]
    first, second = usable[-1], usable[-2]
    registry.promote(IMAGE, "dev", first)
    registry.promote(IMAGE, CHANNEL, second, allow_older=True)
    return first, second


def version_numbers(count: int) -> list[str]:
    """Release order: mostly patches, a minor every 20, and a major every 2 000 versions with
    two release candidates before it."""
    numbers: list[str] = []
    major, minor, patch = 1, 0, 0
    while len(numbers) < count:
        numbers.append(f"{major}.{minor}.{patch}")
        step = len(numbers)
        if step % 2000 == 0:
            major, minor, patch = major + 1, 0, 0
            numbers += [f"{major}.0.0-rc.1", f"{major}.0.0-rc.2"]
        elif step % 20 == 0:
            minor, patch = minor + 1, 0
        else:
            patch += 1
    return numbers[:count]


def pick_state(rng: random.Random, index: int, count: int) -> tuple[str, str]:
    """Mostly verified; some failed or never verified; the newest three not verified yet."""
    if index >= count - 3:
        return "built", ""
    roll = rng.random()
    if roll < 0.05:
        return "failed", "verify: GET /healthz answered 503 after 600 s"
    if roll < 0.08:
        return "built", ""
    return "verified", ""


def revoke_some(registry: Registry, rng: random.Random, verified: list[ImageVersion]) -> None:
    """Revoke the newest verified version (so `latest` must look past it) and nine others."""
    chosen = {verified[-1].version, *(v.version for v in rng.sample(verified[:-10], 9))}
    for number in sorted(chosen):
        registry.revoke(IMAGE, number, reason="ships openssl 3.0.13 (CVE-2024-5535)")


def add_base(registry: Registry, index: int) -> str:
    number = f"1.0.{index}"
    fingerprint = digest(f"{BASE} {number}")
    manifest = {
        "suite": "bookworm",
        "fingerprint": fingerprint,
        "packages": debian_packages(index),
        "kernel": f"6.1.0-{18 + index}-amd64",
    }
    registry.add(
        BASE,
        number,
        build_id=build_id(f"{BASE} {number}"),
        fingerprint=fingerprint,
        state="built",
        path=f"/var/lib/pipeline/base/{BASE}/{number}",
        manifest=manifest,
        kind="base",
    )
    return number


def add_image(registry: Registry, number: str, state: str, failure: str, base: str) -> None:
    fingerprint = digest(f"{IMAGE} {number}")
    bid = build_id(f"{IMAGE} {number}")
    registry.add(
        IMAGE,
        number,
        build_id=bid,
        fingerprint=fingerprint,
        state=state,
        path=f"/var/lib/pipeline/images/{IMAGE}/{number}",
        parent=(BASE, base),
        manifest=image_manifest(number, fingerprint, bid, base),
        failure=failure,
    )


def image_manifest(number: str, fingerprint: str, bid: str, base: str) -> dict[str, Any]:
    """A manifest shaped like the one bake writes, about 2 KB as JSON."""
    parts = ("roles", "vars", "template", "base", "tools")
    roles = ("base", "webservice")
    return {
        "image": IMAGE,
        "version": number,
        "build_id": bid,
        "fingerprint": fingerprint,
        "inputs": {part: digest(f"{number} {part}") for part in parts},
        "roles": {role: digest(f"{number} {role}") for role in roles},
        "role_order": list(roles),
        "vars": {"webservice_message": "Hello from an immutable image", "service_port": 8080},
        "base": {
            "name": BASE,
            "version": base,
            "fingerprint": digest(f"{BASE} {base}"),
            "suite": "bookworm",
            "path": f"/var/lib/pipeline/base/{BASE}/{base}",
        },
        "packages": dict(list(debian_packages(int(base.rsplit(".", 1)[1])).items())[:24]),
        "tools": {"packer": "1.11.2", "ansible-core": "2.17.5", "qemu": "7.2.13"},
        "boot": {"kernel": "vmlinuz", "initrd": "initrd.img", "append": "console=ttyS0 quiet"},
        "disk_sha256": digest(f"{number} disk"),
        "created_at": "2024-06-11T09:30:00+00:00",
    }


def debian_packages(index: int) -> dict[str, str]:
    """The base's package list at its `index`th version (each version bumps every package)."""
    return {name: f"{1 + len(name) % 7}.{index % 10}.{len(name)}-{index + 1}" for name in PACKAGES}


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def build_id(text: str) -> str:
    # Twice as much randomness as a real build id: 10 000 ids of 6 hex digits would collide.
    return f"20240611t093000-{digest(text)[:12]}"


# PostgreSQL


@contextlib.contextmanager
def postgres_database() -> Iterator[Postgres]:
    """A fresh database on $PIPELINE_TEST_POSTGRES_URL's server or on a throwaway one, dropped
    (and the throwaway server stopped) on the way out, even on an error or Ctrl-C."""
    if importlib.util.find_spec("psycopg") is None:
        yield Postgres(None, why="psycopg is not installed in this venv")
        return

    given = os.environ.get("PIPELINE_TEST_POSTGRES_URL")
    if given:
        with fresh_database(given) as postgres:
            yield postgres
        return

    found = server_command("bindir", check=False)
    if found.returncode == NOT_INSTALLED:
        yield Postgres(None, why="not installed (" + found.stderr.strip() + ")")
        return
    if found.returncode != 0:
        raise BenchError(f"tests/postgres_server.py bindir failed:\n{found.stderr}")

    # Straight under /tmp, not in a private folder: as root, postgres_server.py hands this one
    # to the `postgres` user, who must be able to reach it.
    root = Path(tempfile.mkdtemp(prefix="pipeline-bench-postgres-"))
    try:
        print(f"starting a throwaway PostgreSQL server in {root} ...", file=sys.stderr)
        url = server_command("start", str(root)).stdout.strip()
        with fresh_database(url) as postgres:
            yield postgres
    finally:
        server_command("stop", str(root), check=False)
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def fresh_database(server_url: str) -> Iterator[Postgres]:
    import psycopg
    from psycopg import sql

    name = f"pipeline_bench_{uuid.uuid4().hex[:12]}"
    try:
        with psycopg.connect(server_url, autocommit=True, connect_timeout=15) as admin:
            row = admin.execute("SHOW server_version").fetchone()
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    except psycopg.Error as exc:
        message = f"cannot create a database on {redact(server_url)}: {exc}"
        raise BenchError(message) from None
    version = str(row[0]) if row else "?"
    try:
        yield Postgres(urlsplit(server_url)._replace(path=f"/{name}").geturl(), version)
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            admin.execute(drop)


def server_command(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, str(POSTGRES_SERVER), *argv],
        capture_output=True,
        text=True,
        check=False,
    )
    if check and done.returncode != 0:
        message = f"tests/postgres_server.py {' '.join(argv)} exited {done.returncode}:\n"
        raise BenchError(message + done.stderr.strip())
    return done


if __name__ == "__main__":
    sys.exit(main())
