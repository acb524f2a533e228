"""The scheduler, driven by a clock the tests set: one run per slot, missed slots collapse,
overlapping slots are skipped, failures pause, and a slot with no trigger firing does nothing.

Everything is the real code except the clock and the action (bake/verify/run), which a test
passes in to record what the scheduler asked for.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
import zoneinfo
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline import api, config, locks
from pipeline.config import ScheduleConfig
from pipeline.errors import Interrupted, PipelineError, VerifyFailed
from pipeline.registry import open_registry
from pipeline.schedule import engine

REPO = Path(__file__).resolve().parent.parent
UTC = dt.UTC
BERLIN = zoneinfo.ZoneInfo("Europe/Berlin")


def project_text(schedule: str) -> str:
    return (
        "images:\n"
        "  web:\n"
        "    version: 1.0.0\n"
        "    roles: [base, webservice]\n"
        f"    schedule: {schedule}\n"
        "environments:\n"
        "  dev:\n"
        "    image: web\n"
    )


# No version of web yet: the max-age trigger fires at every slot.
DAILY = "{cron: '0 3 * * *', triggers: [{max_age_days: 7}], pause_after: 2}"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    path = tmp_path / "pipeline.yml"
    path.write_text(project_text(DAILY))
    return path


class Recorder:
    """An action that records each call; it fails while `failing` is set."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ScheduleConfig]] = []
        self.failing: PipelineError | None = None

    def __call__(self, image: str, schedule: ScheduleConfig, config_path: Path) -> str:
        self.calls.append((image, schedule))
        if self.failing is not None:
            raise self.failing
        return f"baked {image} (recorded)"


@pytest.fixture
def action() -> Recorder:
    return Recorder()


@pytest.fixture
def logs() -> Iterator[list[str]]:
    """The lines the pipeline logs while the test runs."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = logging.getLogger("pipeline")
    handler = Collect()
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(level)


def at(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).replace(tzinfo=UTC)


def tick(project: Path, now: dt.datetime, action: Recorder) -> dict:
    outcomes = api.schedule_tick(now=now, action=action, config_path=project)
    assert len(outcomes) == 1
    return outcomes[0]


def state(project: Path) -> dict:
    return json.loads((project.parent / ".pipeline" / "schedules" / "web.json").read_text())


def test_a_due_slot_runs_once_and_records_why(
    project: Path, action: Recorder, logs: list[str]
) -> None:
    early = tick(project, at("2026-05-01 02:59:59"), action)
    first = tick(project, at("2026-05-01 03:00:20"), action)
    again = tick(project, at("2026-05-01 03:01:00"), action)

    # The first tick also handled the previous day's slot: a new schedule catches up once.
    assert (early["slot"], early["result"]) == ("2026-04-30T03:00:00Z", "ok")
    assert (first["slot"], first["result"]) == ("2026-05-01T03:00:00Z", "ok")
    assert first["reason"] == ("max age: web has no usable version yet -> baked web (recorded)")
    assert (again["result"], again["reason"]) == ("due-later", "next slot 2026-05-02T03:00:00Z")
    assert len(action.calls) == 2
    assert state(project) == {
        "failures": 0,
        "last_at": "2026-05-01T03:00:20Z",
        "last_reason": first["reason"],
        "last_result": "ok",
        "last_slot": "2026-05-01T03:00:00Z",
        "paused": False,
    }
    assert (
        "[web > schedule] trigger max_age_days fired: max age: web has no usable version yet"
        in logs
    )


def test_slots_missed_while_the_machine_was_off_run_once(
    project: Path, action: Recorder, logs: list[str]
) -> None:
    tick(project, at("2026-05-01 03:00:00"), action)

    # Off from just after that run until three days and nine hours later.
    back = tick(project, at("2026-05-04 12:00:00"), action)
    later = tick(project, at("2026-05-04 12:01:00"), action)

    assert (back["slot"], back["result"], back["missed"]) == ("2026-05-04T03:00:00Z", "ok", 3)
    assert later["result"] == "due-later"
    assert len(action.calls) == 2
    assert (
        "[web > schedule] 2 slot(s) after 2026-05-01T03:00:00Z went by unhandled (the machine"
        " was off, or a run took longer); only the latest, 2026-05-04T03:00:00Z, runs"
    ) in logs


def test_a_slot_that_comes_while_the_previous_run_goes_is_skipped_not_queued(
    tmp_path: Path, action: Recorder, logs: list[str]
) -> None:
    project = tmp_path / "pipeline.yml"
    project.write_text(project_text("{cron: '*/10 * * * *', triggers: [{max_age_days: 1}]}"))
    started, release = threading.Event(), threading.Event()
    first: list[dict] = []

    def slow(image: str, schedule: ScheduleConfig, config_path: Path) -> str:
        started.set()
        assert release.wait(30)
        return action(image, schedule, config_path)

    def first_tick() -> None:
        first.extend(
            api.schedule_tick(now=at("2026-05-01 10:00:05"), action=slow, config_path=project)
        )

    runner = threading.Thread(target=first_tick)
    runner.start()
    try:
        assert started.wait(30)
        during = tick(project, at("2026-05-01 10:10:00"), action)
        listed = api.schedule_list(now=at("2026-05-01 10:10:30"), config_path=project)
    finally:
        release.set()
        runner.join()
    after = tick(project, at("2026-05-01 10:11:00"), action)
    next_slot = tick(project, at("2026-05-01 10:20:00"), action)

    assert during["slot"] == "2026-05-01T10:10:00Z"
    assert during["result"] == "skipped"
    assert during["reason"].startswith(
        f"skipped: previous run still going (pid {os.getpid()}, build schedule 2026-05-01T10:00:00Z"
    )
    assert listed[0]["running"].startswith(f"pid {os.getpid()}, build schedule 2026-05-01T10:00")
    assert [o["result"] for o in first] == ["ok"]
    # The skipped slot is not run once the first run ends; the next slot is.
    assert after["result"] == "due-later"
    assert (next_slot["slot"], next_slot["result"]) == ("2026-05-01T10:20:00Z", "ok")
    assert len(action.calls) == 2
    assert any(
        line.startswith("[web > schedule] slot 2026-05-01T10:10:00Z skipped: previous run")
        for line in logs
    )


# Takes an image's lock as a `pipeline bake` in another process would, until stdin closes.
HOLDER = """\
import sys
from pathlib import Path
from pipeline import locks

with locks.hold(Path(sys.argv[1]), "image-web", build_id="20260501t095900-abcdef"):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_a_slot_is_skipped_while_another_process_bakes_the_image(
    project: Path, action: Recorder
) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(project.parent / ".pipeline")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "held\n"
        skipped = tick(project, at("2026-05-01 03:00:00"), action)
    finally:
        holder.kill()
        holder.wait()
    # Its holder gone (killed, no chance to clean up), the lock is free for the next slot.
    ran = tick(project, at("2026-05-02 03:00:00"), action)

    assert skipped["result"] == "skipped"
    assert f"(pid {holder.pid}, build 20260501t095900-abcdef" in skipped["reason"]
    assert ran["result"] == "ok"
    assert len(action.calls) == 1


def test_slots_across_daylight_saving_changes_run_once_each_in_utc(
    tmp_path: Path, action: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The machine's zone is Berlin, whose clocks jump at 01:00 UTC on both days below.
    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    project = tmp_path / "pipeline.yml"
    project.write_text(project_text("{cron: '0 1 * * *', triggers: [{max_age_days: 30}]}"))
    slots = []
    try:
        for start in ("2026-03-27 12:00", "2026-10-23 12:00"):
            # A clock that tells Berlin time, every 10 minutes for three days.
            moment = at(start).astimezone(BERLIN)
            for _ in range(3 * 24 * 6):
                outcome = tick(project, moment, action)
                if outcome["result"] == "ok":
                    slots.append(outcome["slot"])
                moment += dt.timedelta(minutes=10)
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()

    assert slots == [
        # The first tick catches up the slot of the day before, once.
        "2026-03-27T01:00:00Z",
        "2026-03-28T01:00:00Z",
        "2026-03-29T01:00:00Z",
        "2026-03-30T01:00:00Z",
        # The jump from March to October is a machine off for months: one catch-up run.
        "2026-10-23T01:00:00Z",
        "2026-10-24T01:00:00Z",
        "2026-10-25T01:00:00Z",
        "2026-10-26T01:00:00Z",
    ]
    assert len(action.calls) == len(slots)


def test_failures_in_a_row_pause_the_schedule_until_resumed(
    project: Path, action: Recorder, logs: list[str]
) -> None:
    action.failing = VerifyFailed("web 1.0.1 failed verification: /healthz answered 500")

    one = tick(project, at("2026-05-01 03:00:00"), action)
    two = tick(project, at("2026-05-02 03:00:00"), action)
    paused = tick(project, at("2026-05-03 03:00:00"), action)
    listed = api.schedule_list(now=at("2026-05-03 04:00:00"), config_path=project)
    action.failing = None
    resumed = api.schedule_resume("web", config_path=project)
    after = tick(project, at("2026-05-04 03:00:00"), action)

    assert [one["result"], two["result"], paused["result"]] == ["failed", "failed", "paused"]
    assert one["reason"] == "web 1.0.1 failed verification: /healthz answered 500"
    assert paused["reason"] == "paused after 2 failures in a row; slot 2026-05-03T03:00:00Z not run"
    assert len(action.calls) == 3  # the two failures and the run after resuming
    assert (listed[0]["paused"], listed[0]["failures"]) == (True, 2)
    assert listed[0]["last_result"] == "failed"
    assert (resumed["was_paused"], resumed["paused"], resumed["failures"]) == (True, False, 0)
    assert api.schedule_resume("web", config_path=project)["was_paused"] is False
    assert after["result"] == "ok"
    assert state(project)["failures"] == 0
    assert (
        "[web > schedule] paused after 2 failures in a row; resume with"
        " `pipeline schedule resume web`"
    ) in logs


def test_a_due_slot_with_no_trigger_firing_does_nothing_and_says_why(
    tmp_path: Path, action: Recorder, logs: list[str]
) -> None:
    project = tmp_path / "pipeline.yml"
    project.write_text(
        project_text("{cron: '0 3 * * *', triggers: [parent_rebuilt, {max_age_days: 7}]}")
    )
    now = _versions(project) + dt.timedelta(days=2)

    outcome = tick(project, now, action)

    assert outcome["result"] == "nothing"
    assert outcome["reason"] == (
        "no trigger fired: parent_rebuilt: web 1.0.0 is built on debian 1.0.0, the newest;"
        " max_age_days: web 1.0.0 is 2.0 days old (at most 7 days)"
    )
    assert action.calls == []
    assert f"[web > schedule] {outcome['reason']}; nothing done" in logs


# A tick in its own process whose action hangs, as a bake would, until the process is killed.
DYING_TICK = """\
import datetime as dt, sys, time
from pipeline import api

def hang(image, schedule, config_path):
    print("running", flush=True)
    time.sleep(600)

api.schedule_tick(
    now=dt.datetime(2026, 5, 1, 3, 0, tzinfo=dt.UTC), action=hang, config_path=sys.argv[1]
)
"""


def test_a_run_whose_process_died_is_recorded_as_failed_and_its_lock_is_free(
    project: Path, action: Recorder, logs: list[str]
) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    dying = subprocess.Popen(
        [sys.executable, "-c", DYING_TICK, str(project)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert dying.stdout is not None
        assert dying.stdout.readline() == "running\n"
        while_running = api.schedule_list(now=at("2026-05-01 03:01:00"), config_path=project)
    finally:
        dying.kill()
        dying.wait()
    after_death = api.schedule_list(now=at("2026-05-01 03:02:00"), config_path=project)
    next_slot = tick(project, at("2026-05-02 03:00:00"), action)

    assert while_running[0]["last_result"] == "running"
    assert while_running[0]["running"].startswith(f"pid {dying.pid}, build schedule ")
    assert (after_death[0]["last_result"], after_death[0]["running"]) == ("died", None)
    assert (
        "[web > schedule] the run of slot 2026-05-01T03:00:00Z died before it recorded a result"
    ) in logs
    assert next_slot["result"] == "ok"
    assert len(action.calls) == 1
    assert locks.holder(project.parent / ".pipeline", "schedule-web") is None


def test_run_ticks_and_sleeps_until_the_next_slot_until_interrupted(
    tmp_path: Path, action: Recorder
) -> None:
    project = tmp_path / "pipeline.yml"
    project.write_text(project_text("{cron: '*/30 * * * *', triggers: [{max_age_days: 1}]}"))
    clock = [at("2026-05-01 10:05:00")]
    naps: list[float] = []

    def sleep(seconds: float) -> None:
        naps.append(seconds)
        if len(naps) == 40:
            raise KeyboardInterrupt
        clock[0] += dt.timedelta(seconds=seconds)

    with pytest.raises(KeyboardInterrupt):
        api.schedule_run(clock=lambda: clock[0], sleep=sleep, action=action, config_path=project)

    # 40 naps of at most a minute from 10:05: the catch-up of 10:00, then 10:30.
    assert clock[0] == at("2026-05-01 10:44:00")
    assert max(naps) == api.SCHEDULE_NAP
    assert len(action.calls) == 2


def test_run_without_any_schedule_says_so(tmp_path: Path) -> None:
    project = tmp_path / "pipeline.yml"
    project.write_text(project_text("null"))

    with pytest.raises(PipelineError, match=r"no image in .* has a schedule: nothing to run"):
        api.schedule_run(sleep=lambda seconds: None, config_path=project)


def test_a_broken_state_file_is_named(project: Path, action: Recorder) -> None:
    path = project.parent / ".pipeline" / "schedules" / "web.json"
    path.parent.mkdir(parents=True)
    path.write_text("{not json")

    with pytest.raises(config.ConfigError) as caught:
        tick(project, at("2026-05-01 03:00:00"), action)

    assert str(caught.value).startswith(f"{path}: unreadable schedule state (")
    assert action.calls == []


def test_the_default_action_is_the_librarys(tmp_path: Path) -> None:
    import inspect

    assert inspect.signature(engine.tick).parameters["action"].default is engine.perform


def _versions(project: Path) -> dt.datetime:
    """Records base debian 1.0.0 and web 1.0.0 built on it; returns when web's was made."""
    registry = open_registry(project.parent / ".pipeline")
    try:
        registry.record_base("debian", fingerprint="f1", build_id="b", path="/nowhere", manifest={})
        version = registry.add(
            "web",
            "1.0.0",
            build_id="b1",
            fingerprint="fp",
            state="verified",
            path=str(project.parent / "web"),
            parent=("debian", "1.0.0"),
        )
        return dt.datetime.fromisoformat(version.created_at)
    finally:
        registry.close()


def test_a_newer_parent_fires_parent_rebuilt(tmp_path: Path, action: Recorder) -> None:
    project = tmp_path / "pipeline.yml"
    project.write_text(project_text("{cron: '0 3 * * *', triggers: [parent_rebuilt]}"))
    created = _versions(project)
    quiet = tick(project, created + dt.timedelta(hours=1), action)
    registry = open_registry(tmp_path / ".pipeline")
    try:
        registry.record_base("debian", fingerprint="f2", build_id="c", path="/else", manifest={})
    finally:
        registry.close()

    fired = tick(project, created + dt.timedelta(days=1, hours=1), action)

    assert quiet["result"] == "nothing"
    assert fired["result"] == "ok"
    assert fired["reason"] == (
        "parent rebuilt: web 1.0.0 is built on debian 1.0.0; debian 1.0.1 is newer"
        " -> baked web (recorded)"
    )
    assert len(action.calls) == 1


def test_an_old_version_fires_max_age(tmp_path: Path, action: Recorder) -> None:
    project = tmp_path / "pipeline.yml"
    project.write_text(project_text("{cron: '0 3 * * *', triggers: [{max_age_days: 7}]}"))
    created = _versions(project)

    outcome = tick(project, created + dt.timedelta(days=9, hours=12), action)

    assert outcome["result"] == "ok"
    assert outcome["reason"] == (
        "max age: web 1.0.0 is 9.5 days old (more than 7 days) -> baked web (recorded)"
    )


def test_changed_inputs_fire_with_the_reasons_plan_gives(tmp_path: Path, action: Recorder) -> None:
    for folder in ("templates", "roles"):
        shutil.copytree(REPO / folder, tmp_path / folder)
    project = tmp_path / "pipeline.yml"
    project.write_text(project_text("{cron: '0 3 * * *', triggers: [inputs_changed]}"))

    outcome = tick(project, at("2026-05-01 03:00:00"), action)

    assert outcome["result"] == "ok"
    assert outcome["reason"] == (
        "inputs changed: base debian would get a new version (built from packages);"
        " no version yet -> baked web (recorded)"
    )


# Another machine's scheduler in the middle of a run of web: holds its advisory lock on the
# registry until stdin closes or the process is killed.
OTHER_MACHINE = """\
import sys
from pathlib import Path
from pipeline.registry import open_registry
from pipeline.schedule import engine

registry = open_registry(Path(sys.argv[1]), sys.argv[2])
with engine.across_machines(registry, "web"):
    pid = registry.backend.query("SELECT pg_backend_pid() AS pid")[0]["pid"]
    print(f"held {pid}", flush=True)
    sys.stdin.read()
"""


def test_machines_sharing_a_postgresql_registry_run_an_image_one_at_a_time(
    tmp_path: Path, action: Recorder, postgres_db_url: str
) -> None:
    project = tmp_path / "pipeline.yml"
    project.write_text(f"registry: {postgres_db_url}\n" + project_text(DAILY))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    other = subprocess.Popen(
        [sys.executable, "-c", OTHER_MACHINE, str(tmp_path / "elsewhere"), postgres_db_url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert other.stdout is not None
        word, backend = other.stdout.readline().split()
        assert word == "held"
        skipped = tick(project, at("2026-05-01 03:00:00"), action)
    finally:
        # That machine dies: its connection goes, and the server drops its lock.
        other.kill()
        other.wait()
    _wait_until_the_server_ends(postgres_db_url, int(backend))
    ran = tick(project, at("2026-05-02 03:00:00"), action)

    assert skipped["result"] == "skipped"
    assert (
        "another machine's scheduler runs web (advisory lock on the registry" in (skipped["reason"])
    )
    assert (ran["result"], len(action.calls)) == ("ok", 1)


def _wait_until_the_server_ends(url: str, backend: int) -> None:
    """The server ends a dead client's session on its own, a moment later; this waits for it
    (up to 10 s) so the next tick does not race it."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as db:
        db.execute("SELECT pg_terminate_backend(%s, 10000)", (backend,))


def test_an_interrupted_run_is_recorded_as_such_and_is_no_failure(
    project: Path, action: Recorder
) -> None:
    action.failing = Interrupted("interrupted during packer build; the command was stopped")

    with pytest.raises(Interrupted):
        tick(project, at("2026-05-01 03:00:00"), action)

    recorded = state(project)
    assert recorded["last_result"] == "interrupted"
    assert recorded["last_reason"] == "interrupted during packer build; the command was stopped"
    assert (recorded["failures"], recorded["paused"]) == (0, False)


def test_an_interruption_ends_the_scheduler_loop(project: Path) -> None:
    calls: list[str] = []

    def second_run_interrupted(image: str, schedule: ScheduleConfig, config_path: Path) -> str:
        calls.append(image)
        if len(calls) == 2:
            raise Interrupted("interrupted during packer build; the command was stopped")
        return "baked"

    def clock() -> dt.datetime:
        return at("2026-05-01 03:00:00") if not calls else at("2026-05-02 03:00:00")

    with pytest.raises(Interrupted):
        api.schedule_run(
            clock=clock, sleep=lambda _s: None, action=second_run_interrupted, config_path=project
        )
    assert len(calls) == 2
