"""The crash matrix's cells inside the long steps and between a run's stages, on real tools
and VMs.

One project, one chain of commands: each long step (the base build's mmdebstrap, Packer's build,
Molecule's verify, Terraform's apply, the front door's reload) is interrupted with SIGINT, as a
terminal's Ctrl-C does (to the whole process group), then killed with SIGKILL, as `kill -9` or
the OOM killer does (to the pipeline alone, whose children go on), then run again to the end.
Terraform's apply also gets SIGTERM, as `kill PID` sends it. So the SIGKILL cell's next run is
a complete one, and each earlier cell's next run is the following cell's, which must get past
what the first left to the same step. `pipeline run` is then stopped after each of its stages.

After each kill the test counts what the dead run left: processes marked with its run id still
running (Packer, QEMU, mmdebstrap, Molecule, a Terraform provider), VMs outside Terraform's
state, temporary folders and mounts. After the next run none may be left, the registry must be
whole and unchanged but for the dead runs' own records, and Terraform's state readable and its
lock free (the next apply takes it: nothing here passes -lock=false). Between the cells, while a
scale-out holds the environment, a second deploy, a whole run and a scheduled run give way at
once, naming the holder; so does a second run while a run of the same environment bakes.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from projects import Probe, Project, share_base, take_ctrl_c

from pipeline import locks, reaper
from pipeline.targets.local import qemu
from pipeline.targets.local.baseimage import BaseSpec, cached_base_image

pytestmark = [pytest.mark.vm, pytest.mark.e2e]

REPO = Path(__file__).resolve().parent.parent
SIGNALS = {"KILL": -signal.SIGKILL, "INT": 130, "TERM": 130}
Matrix = tuple[Counter[str], list[str]]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, state_dir: Path) -> Iterator[Project]:
    """The example project, with no base image built yet, so that the chain builds one.

    On a fresh clone (CI) the session's base is not built yet: the chain builds it, for the
    tests after it. Where the session has it already, the chain builds one in its own state.
    """
    root = tmp_path_factory.mktemp("crash")
    if cached_base_image(state_dir, BaseSpec()) is None:
        (state_dir / "base").mkdir(exist_ok=True)
        share_base(root / ".pipeline", state_dir)
    for name in ("roles", "templates", "molecule"):
        shutil.copytree(REPO / name, root / name)
    config = yaml.safe_load((REPO / "pipeline.yml").read_text())
    dev = config["environments"]["dev"]
    dev["instances"] = 1
    dev["health"].pop("smoke", None)
    (root / "pipeline.yml").write_text(yaml.safe_dump(config))
    project = Project(root)
    yield project
    project.pipeline("destroy", "dev", check=False)
    for record in qemu.list_vms(project.state / "vms"):
        qemu.stop(record)


class Killed:
    """A `pipeline` command stopped by a signal, and how it ended."""

    def __init__(self, project: Project, how: str, args: tuple[str, ...]) -> None:
        self.project = project
        self.how = how
        self.args = args
        self.returncode = 0
        self.stderr = ""

    def run(
        self,
        at: Callable[[], bool] | str,
        settle: float = 3.0,
        meanwhile: Callable[[subprocess.Popen[str]], None] | None = None,
    ) -> Killed:
        """Signal the command once `at()` holds, or let it signal itself at the failpoint `at`
        (the pipeline alone, then, for both signals); `meanwhile` runs while it goes."""
        env = dict(os.environ)
        if isinstance(at, str):
            env["PIPELINE_FAILPOINT"] = f"{at}:{self.how}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", *self.args],
            cwd=self.project.root,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            preexec_fn=take_ctrl_c,
        )
        if meanwhile is not None:
            meanwhile(proc)
        if not isinstance(at, str):
            _wait_while_it_runs(proc, at, f"pipeline {' '.join(self.args)}", 900)
            time.sleep(settle)
            if self.how == "KILL":
                os.kill(proc.pid, signal.SIGKILL)  # the pipeline alone: its children go on
            elif self.how == "TERM":
                os.kill(proc.pid, signal.SIGTERM)  # `kill PID`: the pipeline alone, too
            else:
                os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C: the whole group
        _, self.stderr = proc.communicate(timeout=600)
        self.returncode = proc.returncode
        assert self.returncode == SIGNALS[self.how], self.stderr
        assert "Traceback" not in self.stderr
        return self


def _wait_while_it_runs(
    proc: subprocess.Popen[str], condition: Callable[[], bool], what: str, timeout: float
) -> None:
    """Wait until `condition()` holds; fail if `proc` ends first or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"{what} ended first"
        assert time.monotonic() < deadline, f"{what} did not get there in {timeout:.0f} s"
        time.sleep(0.2)


def _mounts(project: Project) -> list[str]:
    """Mount points under the project's folder or its base images' (mmdebstrap's /proc, /sys
    and /dev in the root tree it fills)."""
    folders = (str(project.root) + "/", str((project.state / "base").resolve()) + "/")
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4]
        if point.startswith(folders):
            found.append(point)
    return found


def _left(project: Project) -> list[str]:
    """Everything a dead run may have left: its processes, VMs, work folders and mounts."""
    state = project.state
    left = [f"pid {item.pid} {item.command}" for item in reaper.leftovers(state)]
    left += [f"mount {point}" for point in _mounts(project)]
    left += [f"folder {path}" for path in sorted(state.glob("base/.*"))]
    left += [f"folder {path}" for path in sorted(state.glob("images/*/.tmp-*"))]
    left += [f"vm folder {path}" for path in sorted(state.glob("vms/verify-*"))]
    left += [f"secrets folder {path}" for path in sorted(state.glob("private/*"))]
    fleet_known = _terraform_instances(project)
    outside = [path for path in sorted(state.glob("vms/web-dev-*")) if path.name not in fleet_known]
    left += [f"vm folder outside Terraform's state: {path}" for path in outside]
    for line in project.vm_processes():
        if "/vms/web-dev-" in line and not any(f"/vms/{name}/" in line for name in fleet_known):
            left.append(f"fleet vm outside Terraform's state: {line[:120]}")
    return left


def _terraform_instances(project: Project) -> set[str]:
    path = project.state / "envs" / "dev" / "terraform" / "terraform.tfstate"
    if not path.is_file():
        return set()
    state = json.loads(path.read_text())  # readable, or the test fails here
    return {
        instance["attributes"]["name"]
        for resource in state.get("resources", [])
        for instance in resource.get("instances", [])
    }


def _registry(project: Project) -> dict[str, str]:
    db = project.state / "registry.db"
    if not db.is_file():
        return {}
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    listed = json.loads(project.pipeline("images", "list", "web", "--json").stdout)
    return {item["version"]: item["status"] for item in listed}


def _row(matrix: Matrix, point: str, how: str, found: list[str], after: list[str], lost: str,
         next_run: str) -> None:  # fmt: skip
    tally, rows = matrix
    tally["cells"] += 1
    tally["ok"] += not after and not lost
    rows.append(
        f"{point:<24} {how:<5} orphans found {len(found)}, left after the next run"
        f" {len(after)}; data lost: {lost or 'none'}; next run ok: {next_run}"
    )


def _cell(
    project: Project,
    matrix: Matrix,
    point: str,
    args: tuple[str, ...],
    at: Callable[[], bool] | str,
    next_run: Callable[[], None],
    expect: Callable[[dict[str, str], dict[str, str]], str],
    hows: tuple[str, ...] = ("INT", "KILL"),
) -> None:
    """Stop `args` with each signal of `hows` in turn (when `at()` holds, or at the failpoint
    `at`), then run `next_run`; add a row per signal to the matrix.

    `expect(before, after)` compares the registry before and after a kill and returns what was
    lost or wrongly written ('' when nothing).
    """
    cells = []
    for how in hows:
        before = _registry(project)
        killed = Killed(project, how, args).run(at)
        found = _left(project)
        lost = expect(before, _registry(project))
        if how != "KILL":
            # Interrupted, the pipeline stops what it started itself.
            assert found == [], found
            assert "interrupted" in killed.stderr
        elif not isinstance(at, str):
            assert found, "SIGKILL left nothing running: the cell did not kill inside the step"
        cells.append((how, found, lost))
    next_run()
    after = _left(project)
    _registry(project)
    for index, (how, found, lost) in enumerate(cells):
        if index == len(cells) - 1:
            _row(matrix, point, how, found, after, lost, "yes, to the end")
        else:
            _row(matrix, point, how, found, [], lost, f"yes (the {cells[index + 1][0]} cell's run)")
    assert after == [], after
    assert not any(lost for _, _, lost in cells), cells


def _only_new_versions_failed(before: dict[str, str], after: dict[str, str]) -> str:
    """A killed bake may add its own version, failed or still building; nothing else changes."""
    wrong = [f"{v} gone" for v in before if v not in after]
    for version, state in after.items():
        if version in before and before[version] != state:
            wrong.append(f"{version}: {before[version]} -> {state}")
        elif version not in before and state not in ("failed", "building"):
            wrong.append(f"{version} recorded {state} by a run that did not finish")
    return "; ".join(wrong)


def _unchanged(before: dict[str, str], after: dict[str, str]) -> str:
    if before == after:
        return ""
    return f"registry changed: {before} -> {after}"


def _set_message(project: Project, message: str) -> None:
    path = project.root / "pipeline.yml"
    config = yaml.safe_load(path.read_text())
    config["images"]["web"]["vars"]["webservice_message"] = message
    path.write_text(yaml.safe_dump(config))


def test_killed_in_each_long_step_the_next_run_finds_and_finishes(
    project: Project, crash_matrix: Matrix
) -> None:
    # Base build: mmdebstrap has mounted /proc, /sys and /dev in the root tree it fills.
    _cell(
        project, crash_matrix, "base build (mmdebstrap)", ("bake", "web"),
        at=lambda: bool(_mounts(project)),
        next_run=lambda: project.pipeline("bake", "web"),
        expect=_unchanged,
    )  # fmt: skip
    assert _registry(project) == {"1.0.0": "built"}

    # Packer's build: its QEMU runs the base image.
    _set_message(project, "Hello from the crash chain")
    _cell(
        project, crash_matrix, "Packer build", ("bake", "web"),
        at=lambda: any("/images/web/.tmp-" in line for line in project.vm_processes()),
        next_run=lambda: project.pipeline("bake", "web"),
        expect=_only_new_versions_failed,
    )  # fmt: skip
    versions = _registry(project)
    listed = json.loads(project.pipeline("images", "list", "web", "--json").stdout)
    failures = sorted(v["failure"] for v in listed if v["status"] == "failed")
    assert len(failures) == 2 and failures[0].startswith("interrupted"), failures
    assert "stopped before it finished" in failures[1], failures
    built = max((v for v, s in versions.items() if s == "built"), key=_semver)
    assert built != "1.0.0" and all(s == "failed" for v, s in versions.items()
                                     if v not in ("1.0.0", built)), versions  # fmt: skip

    # Molecule's verify: its throwaway VM runs.
    _cell(
        project, crash_matrix, "Molecule verify", ("verify", "web", built),
        at=lambda: any("/vms/verify-web-" in line for line in project.vm_processes()),
        next_run=lambda: project.pipeline("verify", "web", built),
        expect=_unchanged,
    )  # fmt: skip
    assert _registry(project)[built] == "verified"

    # Terraform's apply: the provider has started the instance's VM.
    project.pipeline("promote", "web", "dev", built)
    _cell(
        project, crash_matrix, "Terraform apply", ("deploy", "dev"),
        at=lambda: any("/vms/web-dev-" in line for line in project.vm_processes()),
        next_run=lambda: _deploy_after_a_killed_deploy(project),
        expect=_unchanged,
        hows=("INT", "TERM", "KILL"),
    )  # fmt: skip
    status, _ = project.run_json("status", "dev")
    assert [i["health"] for i in status["instances"]] == ["healthy"], status
    assert len(project.vm_processes()) == 1

    # The front door's reload, while scaling in: the leaving instance still serves until the
    # reload; a run killed there must not let the next one destroy what the door still uses.
    _race_while_scaling_out(project)
    with Probe(status["front_door"]) as probe:
        _cell(
            project, crash_matrix, "front door reload", ("scale", "dev", "1"),
            at="frontdoor.reload",
            next_run=lambda: project.pipeline("scale", "dev", "1"),
            expect=_unchanged,
        )  # fmt: skip
    assert probe.ok > 0 and probe.failed == [], probe.failed[:5]
    status, _ = project.run_json("status", "dev")
    assert len(status["instances"]) == 1 and len(project.vm_processes()) == 1
    _between_the_stages_of_a_run(project, crash_matrix)
    project.pipeline("destroy", "dev")
    assert project.vm_processes() == []


def _deploy_after_a_killed_deploy(project: Project) -> None:
    """The killed deploy's rollout says running in its record; nothing runs it any more."""
    status, _ = project.run_json("status", "dev")
    assert status["last_rollout"]["result"] == "dead", status["last_rollout"]

    project.pipeline("deploy", "dev")

    record = json.loads((project.root / ".pipeline/envs/dev/record.json").read_text())
    assert [r["result"] for r in record["rollouts"][:3]] == ["done", "dead", "interrupted"]


def _between_the_stages_of_a_run(project: Project, matrix: Matrix) -> None:
    """`pipeline run` of changed inputs, stopped after each stage in turn: each kill's next run
    is the next cell's, which takes up where the dead one stopped; the last one finishes."""
    _set_message(project, "Hello from a run stopped between its stages")
    rows = []
    for point in ("run.baked", "run.verified", "run.promoted"):
        for how in ("INT", "KILL"):
            before = _registry(project)
            race = None
            if (point, how) == ("run.baked", "INT"):  # it bakes for a minute first
                race = functools.partial(_a_second_run_gives_way, project)
            killed = Killed(project, how, ("run", "web", "--env", "dev")).run(point, meanwhile=race)
            assert how == "KILL" or "interrupted" in killed.stderr, killed.stderr
            found = _left(project)
            assert found == [], found  # between stages no tool runs
            rows.append((f"run, at {point}", how, _progressed(before, _registry(project))))
    done, _ = project.run_json("run", "web", "--env", "dev")
    assert done["version"] == done["deploy"]["version"], done
    status, _ = project.run_json("status", "dev")
    assert [(i["version"], i["health"]) for i in status["instances"]] == [
        (done["version"], "healthy")
    ], status
    after = _left(project)
    for index, (point, how, lost) in enumerate(rows):
        last = index == len(rows) - 1
        _row(matrix, point, how, [], after if last else [], lost,
             "yes, to the end" if last else "yes (the next cell's run)")  # fmt: skip
    assert after == [], after
    assert not any(lost for _, _, lost in rows), rows


def _a_second_run_gives_way(project: Project, first: subprocess.Popen[str]) -> None:
    """Two `run`s of one environment at once: the second exits at once, naming the first, and
    leaves the first's processes alone (it reaps only dead runs')."""
    _wait_while_it_runs(
        first,
        lambda: locks.holder(project.state, "env-dev") is not None,
        "the first run, to take dev's lock,",
        300,
    )
    second = project.pipeline("run", "web", "--env", "dev", check=False)
    assert second.returncode == 7, second.stderr
    assert f"env-dev is locked by another run (pid {first.pid}, build " in second.stderr
    assert first.poll() is None


def _progressed(before: dict[str, str], after: dict[str, str]) -> str:
    """Versions only move forward (a new one appears built, a built one becomes verified)."""
    order = ("building", "built", "verified")
    wrong = [f"{v} gone" for v in before if v not in after]
    for version, state in after.items():
        was = before.get(version)
        if (
            was is not None
            and was != state
            and not (was in order and state in order and order.index(state) > order.index(was))
        ):
            wrong.append(f"{version}: {was} -> {state}")
    return "; ".join(wrong)


def _race_while_scaling_out(project: Project) -> None:
    """While `scale dev 2` holds dev, a second deploy, a whole run and a scheduled run of
    changed inputs each give way at once, naming the holder; the scale-out is not disturbed."""
    before = _registry(project)
    path = project.root / "pipeline.yml"
    original = path.read_text()
    config = yaml.safe_load(original)
    config["images"]["web"]["schedule"] = {"cron": "* * * * *", "do": "run", "env": "dev"}
    config["images"]["web"]["vars"]["webservice_message"] = "Hello from a scheduled rebuild"
    path.write_text(yaml.safe_dump(config))
    scaling = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "scale", "dev", "2"],
        cwd=project.root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_while_it_runs(
            scaling,
            lambda: len([p for p in project.vm_processes() if "/vms/web-dev-" in p]) >= 2,
            "scale dev 2, to start its VM,",
            900,
        )
        holder = f"env-dev is locked by another run (pid {scaling.pid}, build "
        for args in (("deploy", "dev"), ("run", "web", "--env", "dev")):
            second = project.pipeline(*args, check=False)
            assert second.returncode == 7, second.stderr
            assert holder in second.stderr, second.stderr
        tick = project.pipeline("schedule", "tick", "--json", check=False)
        assert tick.returncode == 0, tick.stderr
        (outcome,) = json.loads(tick.stdout)
        assert outcome["result"] == "skipped" and holder in outcome["reason"], outcome
    finally:
        _, stderr = scaling.communicate(timeout=900)
        path.write_text(original)
    assert scaling.returncode == 0, stderr
    status, _ = project.run_json("status", "dev")
    assert [i["health"] for i in status["instances"]] == ["healthy", "healthy"], status
    assert len(project.vm_processes()) == 2
    assert _registry(project) == before


def _semver(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))
