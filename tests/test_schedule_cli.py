"""`pipeline schedule ...` as a user runs it: list, tick, install, resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from projects import run_pipeline

REPO = Path(__file__).resolve().parent.parent

PROJECT = """\
images:
  web:
    version: 1.0.0
    roles: [base, webservice]
    schedule:
      cron: "* * * * *"
      triggers: [{triggers}]
environments:
  dev:
    image: web
"""


def pipeline(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return run_pipeline(*args, cwd=cwd, timeout=120, **env)


def make_project(tmp_path: Path, triggers: str, *, with_roles: bool = True) -> Path:
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "pipeline.yml").write_text(PROJECT.format(triggers=triggers))
    shutil.copytree(REPO / "templates", tmp_path / "templates")
    if with_roles:
        shutil.copytree(REPO / "roles", tmp_path / "roles")
    return tmp_path


def test_a_tick_whose_trigger_does_not_fire_does_nothing_and_list_shows_it(
    tmp_path: Path,
) -> None:
    project = make_project(tmp_path, "parent_rebuilt")

    before = pipeline("schedule", "list", "--json", cwd=project)
    ticked = pipeline("schedule", "tick", cwd=project)
    after = pipeline("schedule", "list", cwd=project)

    assert before.returncode == 0, before.stderr
    listed = json.loads(before.stdout)
    assert [(s["image"], s["cron"], s["do"], s["last_result"]) for s in listed] == [
        ("web", "* * * * *", "bake", None)
    ]
    assert listed[0]["next_slot"].endswith(":00Z")
    assert ticked.returncode == 0, ticked.stderr
    reason = "no trigger fired: parent_rebuilt: web has no usable version yet"
    assert ticked.stdout.split(None, 3)[2:] == ["nothing", reason + "\n"]
    assert f"[web > schedule] {reason}; nothing done" in ticked.stderr.splitlines()
    assert after.returncode == 0
    assert after.stdout.splitlines()[0].split() == [
        "IMAGE",
        "CRON",
        "DO",
        "NEXT",
        "SLOT",
        "(UTC)",
        "LAST",
    ]
    assert f"nothing: {reason}" in after.stdout
    # Nothing was baked: no run folder, no image.
    assert not (project / ".pipeline" / "runs").exists()
    assert not (project / ".pipeline" / "images").exists()


@pytest.mark.parametrize(
    "do",
    ["", "      do: verify\n", "      do: run\n      env: dev\n"],
    ids=["bake", "verify", "run"],
)
def test_a_firing_trigger_runs_the_librarys_action_whose_failure_is_recorded(
    tmp_path: Path, do: str
) -> None:
    # No roles folder: the library's bake (alone or in a run) stops before any VM work.
    project = make_project(tmp_path, "{max_age_days: 7}", with_roles=False)
    path = project / "pipeline.yml"
    path.write_text(path.read_text().replace("    schedule:\n", "    schedule:\n" + do))

    ticked = pipeline("schedule", "tick", "--json", cwd=project)
    listed = pipeline("schedule", "list", "--json", cwd=project)

    assert ticked.returncode == 0, ticked.stderr
    [outcome] = json.loads(ticked.stdout)
    assert outcome["result"] == "failed"
    assert outcome["reason"].startswith(f"{path}: images.web.roles[0]: role 'base' does not exist")
    assert (
        "[web > schedule] trigger max_age_days fired: max age: web has no usable version yet"
        in ticked.stderr
    )
    [item] = json.loads(listed.stdout)
    assert (item["last_result"], item["failures"], item["paused"]) == ("failed", 1, False)
    # The library's bake or run found the missing role before it made a run folder: the
    # failure is in the schedule's record alone.
    assert not (project / ".pipeline" / "runs").exists()


def test_install_writes_a_timer_and_a_service_that_tick_this_project(tmp_path: Path) -> None:
    project = make_project(tmp_path / "project", "parent_rebuilt")
    units = tmp_path / "units"

    done = pipeline("schedule", "install", "--dir", str(units), cwd=project)

    assert done.returncode == 0, done.stderr
    service = (units / "pipeline-schedule.service").read_text()
    timer = (units / "pipeline-schedule.timer").read_text()
    exec_line = [line for line in service.splitlines() if line.startswith("ExecStart=")]
    assert exec_line == [
        f"ExecStart={sys.executable} -m pipeline -c {project / 'pipeline.yml'} schedule tick"
    ]
    assert f"WorkingDirectory={project}" in service.splitlines()
    assert "OnCalendar=*-*-* *:*:00" in timer.splitlines()
    assert "WantedBy=timers.target" in timer.splitlines()
    assert done.stderr.splitlines() == [
        f"wrote {units / 'pipeline-schedule.service'}",
        f"wrote {units / 'pipeline-schedule.timer'}",
        f"to enable it: systemctl --user link {units / 'pipeline-schedule.service'}"
        f" {units / 'pipeline-schedule.timer'} && systemctl --user daemon-reload"
        " && systemctl --user enable --now pipeline-schedule.timer",
    ]


def test_the_installed_service_command_really_ticks(tmp_path: Path) -> None:
    project = make_project(tmp_path / "project", "parent_rebuilt")
    units = tmp_path / "units"
    assert pipeline("schedule", "install", "--dir", str(units), cwd=project).returncode == 0
    service = (units / "pipeline-schedule.service").read_text().splitlines()
    command = next(line for line in service if line.startswith("ExecStart="))
    env = dict(
        line.removeprefix("Environment=").split("=", 1)
        for line in service
        if line.startswith("Environment=")
    )

    done = subprocess.run(
        command.removeprefix("ExecStart=").split(),
        cwd=tmp_path,  # systemd sets WorkingDirectory; the -c path is absolute anyway
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    assert "nothing" in done.stdout.split()
    # Times in the log, as the unit asks.
    assert done.stderr.splitlines()[0][:2] == "20"


def test_install_by_default_goes_to_the_users_systemd_folder(tmp_path: Path) -> None:
    project = make_project(tmp_path / "project", "parent_rebuilt")
    home_config = tmp_path / "config"

    done = pipeline("schedule", "install", cwd=project, XDG_CONFIG_HOME=str(home_config))

    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (home_config / "systemd" / "user").iterdir()) == [
        "pipeline-schedule.service",
        "pipeline-schedule.timer",
    ]
    assert done.stderr.splitlines()[-1] == (
        "to enable it: systemctl --user daemon-reload"
        " && systemctl --user enable --now pipeline-schedule.timer"
    )


def test_install_does_not_replace_another_projects_units(tmp_path: Path) -> None:
    project = make_project(tmp_path / "project", "parent_rebuilt")
    units = tmp_path / "units"
    units.mkdir()
    (units / "pipeline-schedule.service").write_text("[Service]\nExecStart=/bin/elsewhere\n")

    done = pipeline("schedule", "install", "--dir", str(units), cwd=project)

    assert done.returncode == 2
    assert done.stderr == (
        f"pipeline: error: {units / 'pipeline-schedule.service'} exists and is not this"
        " project's; move it away or give --dir\n"
    )
    assert not (units / "pipeline-schedule.timer").exists()


def test_install_crontab_prints_a_line_that_ticks_every_minute(tmp_path: Path) -> None:
    project = make_project(tmp_path / "project", "parent_rebuilt")

    done = pipeline("schedule", "install", "--crontab", "--dir", str(tmp_path), cwd=project)

    assert done.returncode == 0, done.stderr
    line = done.stdout.strip()
    assert line.startswith(f"* * * * * cd {project} && ")
    assert f"-m pipeline -c {project / 'pipeline.yml'} schedule tick >> " in line
    assert (tmp_path / "pipeline-schedule.crontab").read_text() == line + "\n"


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["schedule", "resume", "db"], 2, "unknown image 'db' (images in pipeline.yml: web)"),
        (["schedule"], 2, "the following arguments are required: ACTION"),
    ],
)
def test_schedule_mistakes_exit_with_a_message(
    tmp_path: Path, args: list[str], code: int, message: str
) -> None:
    project = make_project(tmp_path, "parent_rebuilt")

    done = pipeline(*args, cwd=project)

    assert done.returncode == code
    assert message in done.stderr


def test_a_bad_schedule_in_pipeline_yml_is_named_by_every_schedule_command(tmp_path: Path) -> None:
    project = make_project(tmp_path, "parent_rebuilt")
    path = project / "pipeline.yml"
    path.write_text(path.read_text().replace('"* * * * *"', '"* * * *"'))

    for args in (["list"], ["tick"], ["run"], ["install", "--dir", str(tmp_path)]):
        done = pipeline("schedule", *args, cwd=project)

        assert done.returncode == 3
        assert done.stderr == (
            f"pipeline: error: {path}: images.web.schedule.cron: '* * * *' has 4 field(s);"
            " a cron expression has 5: minute hour day-of-month month day-of-week\n"
        )
    assert not (project / ".pipeline" / "schedules").exists()


def test_sigterm_stops_the_scheduler_as_an_interruption(tmp_path: Path) -> None:
    project = make_project(tmp_path, "parent_rebuilt")
    scheduler = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "schedule", "run"],
        cwd=project,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stderr=subprocess.PIPE,
        text=True,
    )
    assert scheduler.stderr is not None
    for line in scheduler.stderr:
        if "nothing done" in line:  # the first tick is over; it sleeps until the next slot
            break
    scheduler.send_signal(signal.SIGTERM)

    assert scheduler.wait(timeout=60) == 130
    assert "interrupted" in scheduler.stderr.read()


def test_the_crontab_line_runs_from_a_folder_with_a_space_and_a_percent_sign(
    tmp_path: Path,
) -> None:
    project = make_project(tmp_path / "my 100% project", "parent_rebuilt")

    done = pipeline("schedule", "install", "--crontab", cwd=project)
    line = done.stdout.strip()
    # What cron does with the line: the five time fields go, "\%" becomes "%", sh runs the rest.
    assert "%" not in line.replace("\\%", "")
    command = line.split(" ", 5)[5].replace("\\%", "%")
    ran = subprocess.run(
        ["sh", "-c", command],
        env={"PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    assert ran.returncode == 0, ran.stderr
    log = (project / ".pipeline" / "logs" / "schedule.log").read_text()
    assert "no trigger fired" in log


def test_install_tells_a_project_from_one_whose_path_it_starts_with(tmp_path: Path) -> None:
    first = make_project(tmp_path / "cfg", "parent_rebuilt")
    second = make_project(tmp_path / "c", "parent_rebuilt")
    units = tmp_path / "units"

    assert pipeline("schedule", "install", "--dir", str(units), cwd=first).returncode == 0
    again = pipeline("schedule", "install", "--dir", str(units), cwd=first)
    other = pipeline("schedule", "install", "--dir", str(units), cwd=second)

    assert again.returncode == 0, again.stderr
    assert other.returncode == 2
    assert "is not this project's" in other.stderr
    assert (
        f"-c {first / 'pipeline.yml'} schedule tick"
        in (units / "pipeline-schedule.service").read_text()
    )
