"""The `pipeline` command: one clear line and the right exit code for each kind of failure."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from projects import MINIMAL, run_pipeline

from pipeline import api, cli, locks
from pipeline.errors import EXIT_CODES

REPO = Path(__file__).resolve().parent.parent

PROJECT = MINIMAL


def pipeline(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run `python -m pipeline ARGS` in `cwd` with this venv's Python, as a user would."""
    return run_pipeline(*args, cwd=cwd)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "pipeline.yml").write_text(PROJECT)
    return tmp_path


def _only_error_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert lines[0].startswith("pipeline: error: ")
    return lines[0].removeprefix("pipeline: error: ")


def test_an_unknown_image_is_a_usage_error_in_one_line(project: Path) -> None:
    done = pipeline("images", "list", "db", cwd=project)

    assert done.returncode == 2
    assert done.stdout == ""
    message = _only_error_line(done.stderr)
    assert message == "unknown image 'db' (images in pipeline.yml: web)"


def test_verify_of_an_unknown_image_fails_before_any_vm_work(project: Path) -> None:
    done = pipeline("verify", "db", cwd=project)

    assert done.returncode == 2
    assert _only_error_line(done.stderr).startswith("unknown image 'db'")
    assert not (project / ".pipeline" / "runs").exists()


def test_verify_with_nothing_baked_says_what_to_run(project: Path) -> None:
    done = pipeline("verify", "web", cwd=project)

    assert done.returncode == 2
    assert _only_error_line(done.stderr) == (
        "web has no baked version yet (run `pipeline bake web`)"
    )


def test_debug_shows_the_traceback_before_the_message(project: Path) -> None:
    done = pipeline("--debug", "images", "list", "db", cwd=project)

    assert done.returncode == 2
    assert done.stderr.startswith("Traceback (most recent call last):")
    assert done.stderr.splitlines()[-1].startswith("pipeline: error: unknown image 'db'")


def test_a_malformed_pipeline_yml_is_a_config_error_naming_the_file(project: Path) -> None:
    path = project / "pipeline.yml"
    path.write_text(PROJECT.replace("[base, webservice]", "[base, webservice"))

    done = pipeline("images", "list", "web", cwd=project)

    assert done.returncode == 3
    message = _only_error_line(done.stderr)
    assert message.startswith(f"{path}: malformed YAML at line 5, column ")


def test_no_pipeline_yml_in_the_folder_is_a_config_error_naming_it(tmp_path: Path) -> None:
    done = pipeline("images", "list", "web", cwd=tmp_path)

    assert done.returncode == 3
    assert _only_error_line(done.stderr).startswith(f"{tmp_path / 'pipeline.yml'}: no such file")


@pytest.mark.parametrize(
    "args",
    [["-c", "{config}", "images", "list", "db"], ["images", "list", "db", "-c", "{config}"]],
    ids=["before-command", "after-command"],
)
def test_the_config_option_works_before_and_after_the_command(
    project: Path, tmp_path_factory: pytest.TempPathFactory, args: list[str]
) -> None:
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    config = str(project / "pipeline.yml")

    done = pipeline(*(config if a == "{config}" else a for a in args), cwd=elsewhere)

    # Exit 2 (unknown image), not 3: the file given with -c was read, not ./pipeline.yml.
    assert done.returncode == 2
    assert _only_error_line(done.stderr).startswith("unknown image 'db'")


def test_the_config_option_takes_the_project_folder(
    project: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    elsewhere = tmp_path_factory.mktemp("elsewhere")

    done = pipeline("-c", str(project), "images", "list", "db", cwd=elsewhere)

    # Exit 2 (unknown image), not 3: the folder's pipeline.yml was read.
    assert done.returncode == 2
    assert _only_error_line(done.stderr).startswith("unknown image 'db'")


def test_a_folder_without_pipeline_yml_names_the_file_looked_for(tmp_path: Path) -> None:
    folder = tmp_path / "empty-project"
    folder.mkdir()

    done = pipeline("-c", str(folder), "images", "list", cwd=tmp_path)

    assert done.returncode == 3
    assert _only_error_line(done.stderr).startswith(f"{folder / 'pipeline.yml'}: no such file")


def test_a_wrong_command_line_exits_2(project: Path) -> None:
    done = pipeline("images", "show", cwd=project)

    assert done.returncode == 2
    assert "the following arguments are required: image, version" in done.stderr


@pytest.mark.parametrize("args", [["--help"], ["images", "--help"]], ids=["top", "command"])
def test_help_lists_every_exit_code(project: Path, args: list[str]) -> None:
    done = pipeline(*args, cwd=project)

    assert done.returncode == 0
    lines = done.stdout.splitlines()
    for code, meaning in EXIT_CODES.items():
        assert f"  {code:<4}{meaning}" in lines


@pytest.mark.parametrize(
    ("argv", "verbosity"),
    [
        (["images", "list", "web"], 0),
        (["-v", "images", "list", "web"], 1),
        (["images", "list", "web", "-v"], 1),
        (["-v", "images", "list", "web", "-v"], 2),
        (["-vv", "images", "list", "web", "--verbose"], 3),
    ],
)
def test_verbose_counts_wherever_it_is_given(argv: list[str], verbosity: int) -> None:
    assert cli.parse_args(argv).verbose == verbosity


def test_heal_and_finish_of_an_environment_never_deployed_make_no_front_door(
    project: Path,
) -> None:
    for folder in ("templates", "roles"):
        shutil.copytree(REPO / folder, project / folder)

    healed = pipeline("heal", "dev", cwd=project)
    finished = pipeline("finish", "dev", "--json", cwd=project)

    assert healed.returncode == 0, healed.stderr
    assert "no instances: nothing to heal" in healed.stderr
    assert finished.returncode == 0, finished.stderr
    assert '"front_door": null' in finished.stdout
    assert not (project / ".pipeline" / "envs" / "dev" / "frontdoor").exists()


def _keep_until(project: Path, until: str) -> Path:
    record = project / ".pipeline" / "envs" / "dev" / "record.json"
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"kept": {"names": ["web-dev-b1-abc-0"], "until": until}}))
    return record


def test_a_due_background_finisher_waits_for_a_rollout_holding_the_environment(
    project: Path,
) -> None:
    for folder in ("templates", "roles"):
        shutil.copytree(REPO / folder, project / folder)
    record = _keep_until(project, "2026-01-01T00:00:00Z")
    released = threading.Event()

    def rollout_holding_the_lock() -> None:
        with locks.hold(project / ".pipeline", "env-dev", build_id="b2"):
            started.set()
            time.sleep(3)
            released.set()

    started = threading.Event()
    holder = threading.Thread(target=rollout_holding_the_lock)
    holder.start()
    started.wait(10)
    result = api.finish(
        "dev", when_due="2026-01-01T00:00:00Z", config_path=project / "pipeline.yml"
    )
    holder.join()

    assert released.is_set()
    assert result["finished"] == ["web-dev-b1-abc-0"]
    assert "kept" not in json.loads(record.read_text())


def test_a_background_finisher_leaves_a_fleet_a_later_rollout_keeps(project: Path) -> None:
    record = _keep_until(project, "2026-01-02T00:00:00Z")

    result = api.finish(
        "dev", when_due="2026-01-01T00:00:00Z", config_path=project / "pipeline.yml"
    )

    assert result["finished"] == []
    assert json.loads(record.read_text())["kept"]["until"] == "2026-01-02T00:00:00Z"


def test_destroy_ends_a_scaled_size(project: Path) -> None:
    for folder in ("templates", "roles"):
        shutil.copytree(REPO / folder, project / folder)

    assert pipeline("scale", "dev", "3", cwd=project).returncode != 0  # nothing to add from
    assert pipeline("scale", "dev", "0", cwd=project).returncode == 0
    scaled = json.loads(pipeline("status", "dev", "--json", cwd=project).stdout)
    destroyed = pipeline("destroy", "dev", cwd=project)
    after = json.loads(pipeline("status", "dev", "--json", cwd=project).stdout)

    assert destroyed.returncode == 0, destroyed.stderr
    assert (scaled["size"], after["size"]) == (0, 2)


def test_a_finisher_with_nothing_left_says_so_instead_of_listing_no_instances(
    project: Path,
) -> None:
    done = pipeline("finish", "dev", "--when-due", "2026-01-01T00:00:00Z", cwd=project)

    assert done.returncode == 0, done.stderr
    assert done.stdout == "nothing kept until then any more\n"
