"""Fixtures shared by the test modules."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import postgres_server
import pytest

from pipeline.targets.local.baseimage import BaseImage, BaseSpec, ensure_base_image

REPO = Path(__file__).resolve().parent.parent
BAD_INPUTS = pytest.StashKey[Counter[str]]()
CRASHES = pytest.StashKey[tuple[Counter[str], list[str]]]()


@pytest.fixture(scope="session")
def state_dir() -> Path:
    """The pipeline state of the test session, kept between runs so base images are reused.

    `PIPELINE_TEST_STATE` moves it; by default it is `.pipeline-test/state` in the checkout.
    """
    path = Path(os.environ.get("PIPELINE_TEST_STATE", REPO / ".pipeline-test" / "state"))
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


@pytest.fixture(scope="session")
def base_image(state_dir: Path) -> BaseImage:
    """The default base image, built once (about a minute) and then taken from the cache."""
    return ensure_base_image(state_dir, BaseSpec(), log_dir=state_dir / "logs")


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """The URL of a PostgreSQL server for the session, on 127.0.0.1.

    `PIPELINE_TEST_POSTGRES_URL` names one (`.ci/run` starts it); otherwise a throwaway server is
    started for the session and stopped at its end. Skips when PostgreSQL is not installed.
    """
    given = os.environ.get("PIPELINE_TEST_POSTGRES_URL")
    if given:
        yield given
        return
    try:
        postgres_server.find_bindir()
    except postgres_server.PostgresNotInstalled:
        pytest.skip("PostgreSQL is not installed; .ci/run installs it")

    # Not under pytest's tmp_path_factory: as root that lives in /tmp/pytest-of-root (mode 0700),
    # which the postgres user the server runs as cannot enter.
    root = Path(tempfile.mkdtemp(prefix="pipeline-test-postgres-"))
    try:
        yield postgres_server.start(root)
    finally:
        postgres_server.stop(root)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def new_postgres_db(postgres_url: str) -> Iterator[Callable[[], str]]:
    """A function that creates an empty database on the session's server and returns its URL.

    Each call makes another one; all are dropped when the test ends.
    """
    # Imported here: the rest of the suite must not need psycopg to be collected.
    import psycopg
    from psycopg import sql

    created: list[str] = []

    def create() -> str:
        name = f"pipeline_test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        created.append(name)
        return urlsplit(postgres_url)._replace(path=f"/{name}").geturl()

    yield create

    with psycopg.connect(postgres_url, autocommit=True) as admin:
        for name in created:
            drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            admin.execute(drop)


@pytest.fixture
def postgres_db_url(new_postgres_db: Callable[[], str]) -> str:
    """The URL of an empty database made for this test alone, dropped when it ends."""
    return new_postgres_db()


@pytest.fixture(scope="session")
def bad_input_tally(request: pytest.FixtureRequest) -> Counter[str]:
    """Counts of the bad inputs tried and how they ended, printed at the end of the run."""
    return request.config.stash.setdefault(BAD_INPUTS, Counter())


@pytest.fixture(scope="session")
def crash_matrix(request: pytest.FixtureRequest) -> tuple[Counter[str], list[str]]:
    """The crash matrix's tally and rows (tests/test_crashes.py), printed at the end."""
    return request.config.stash.setdefault(CRASHES, (Counter(), []))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    tally_rows = terminalreporter.config.stash.get(CRASHES, None)
    if tally_rows is not None and tally_rows[1]:
        tally, rows = tally_rows
        terminalreporter.write_line(
            f"crash matrix: {tally['cells']} kill points, {tally['ok']} with no orphan left,"
            f" no data lost and the next run ok"
        )
        for row in rows:
            terminalreporter.write_line(f"  {row}")
    tally = terminalreporter.config.stash.get(BAD_INPUTS, Counter())
    if tally["tried"]:
        unclear = tally["tried"] - tally["clear"]
        verdict = "all gave one clear message" if not unclear else f"{unclear} did not"
        terminalreporter.write_line(f"bad inputs tried: {tally['tried']}, {verdict}")
    if tally["generated"]:
        terminalreporter.write_line(
            f"generated pipeline.yml files: {tally['generated']}, {tally['loaded']} loaded,"
            f" {tally['refused']} refused with a config error naming the file, none crashed"
        )
    if tally["escaped"]:
        terminalreporter.write_line(
            f"values written by the hcl filter and read back unchanged by Terraform:"
            f" {tally['escaped']}"
        )
