"""The pipeline.images collection, run by real ansible-playbook and ansible-inventory: the module
in check mode and promoting, the fleet inventory plugin. No VM is booted."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from projects import MINIMAL, run_pipeline

from pipeline import api
from pipeline import config as config_mod
from pipeline.registry import open_registry

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def ansible(tool: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run an Ansible command as a user of the project would: the collection found through
    ANSIBLE_COLLECTIONS_PATH, the library through PYTHONPATH."""
    env = {
        **os.environ,
        "ANSIBLE_COLLECTIONS_PATH": str(REPO),
        "ANSIBLE_INVENTORY_ENABLED": "pipeline.images.fleet",
        "PYTHONPATH": str(REPO),
        "ANSIBLE_NOCOLOR": "1",
    }
    return subprocess.run(
        [str(BIN / tool), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    for name in ("templates", "roles"):
        shutil.copytree(REPO / name, root / name)
    (root / "pipeline.yml").write_text(MINIMAL)
    return root


def image_task(tmp_path: Path, project: Path, options: dict[str, str], *, check: bool) -> Path:
    """A playbook that runs the module once and writes what it returned to result.json."""
    result = tmp_path / "result.json"
    playbook = [
        {
            "name": "Drive the pipeline",
            "hosts": "localhost",
            "connection": "local",
            "gather_facts": False,
            "tasks": [
                {
                    "name": "The module",
                    "pipeline.images.image": {"project": str(project), **options},
                    "register": "out",
                    "check_mode": check,
                    "ignore_errors": True,
                },
                {
                    "name": "Keep its result",
                    "ansible.builtin.copy": {"content": "{{ out | to_json }}", "dest": str(result)},
                    "check_mode": False,
                },
            ],
        }
    ]
    path = tmp_path / "play.yml"
    path.write_text(json.dumps(playbook))
    return path


def run_module(
    tmp_path: Path, project: Path, *, check: bool = False, **options: str
) -> dict[str, object]:
    playbook = image_task(tmp_path, project, options, check=check)
    done = ansible(
        "ansible-playbook",
        "-i",
        "localhost,",
        "-e",
        f"ansible_python_interpreter={sys.executable}",
        str(playbook),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result: dict[str, object] = json.loads((tmp_path / "result.json").read_text())
    return result


def add_verified(
    project: Path, tmp_path: Path, version: str, *, fingerprint: str | None = None
) -> None:
    """A verified version in the project's registry, with files where an image would be."""
    folder = tmp_path / "images" / version
    folder.mkdir(parents=True)
    for name in ("disk.qcow2", "vmlinuz", "initrd.img"):
        (folder / name).write_bytes(b"not booted by these tests")
    config = config_mod.load(project / "pipeline.yml")
    registry = open_registry(config.state_dir, config.registry)
    try:
        registry.add(
            "web",
            version,
            build_id=f"b-{version}",
            fingerprint=fingerprint or version.replace(".", "") * 4,
            state="verified",
            path=str(folder),
        )
    finally:
        registry.close()


def test_check_mode_reports_the_plan_and_changes_nothing(tmp_path: Path, project: Path) -> None:
    result = run_module(tmp_path, project, check=True, action="run", image="web", env="dev")

    assert result["changed"] is True
    assert result["version"] == "1.0.0"
    plan = result["plan"]
    assert isinstance(plan, dict)
    assert plan["bake"]["rebuild"] is True
    assert plan["move"] == {"from": None, "to": "1.0.0", "when": "after bake and verify"}
    # Nothing baked yet, so Terraform has nothing to plan; the note says what the deploy does.
    assert plan["fleet"]["changes"] == []
    assert plan["fleet"]["note"].endswith("the first deploy creates 2")
    assert not (project / ".pipeline" / "runs").exists()
    config = config_mod.load(project / "pipeline.yml")
    registry = open_registry(config.state_dir, config.registry)
    try:
        assert registry.all_versions() == []
    finally:
        registry.close()


def test_promote_is_a_change_once_then_not(tmp_path: Path, project: Path) -> None:
    add_verified(project, tmp_path, "1.0.0")

    first = run_module(tmp_path, project, action="promote", image="web", env="dev")
    second = run_module(tmp_path, project, action="promote", image="web", env="dev")

    assert first["changed"] is True
    assert (first["version"], first["build_id"]) == ("1.0.0", "b-1.0.0")
    assert second["changed"] is False
    assert second["version"] == "1.0.0"
    assert second["promotion"]["note"] == "already there"  # type: ignore[index]


def test_promote_in_check_mode_says_where_the_channel_would_move(
    tmp_path: Path, project: Path
) -> None:
    add_verified(project, tmp_path, "1.0.0")
    run_module(tmp_path, project, action="promote", image="web", channel="dev")
    add_verified(project, tmp_path, "1.0.1")

    planned = run_module(tmp_path, project, check=True, action="promote", image="web", env="dev")
    after = run_module(tmp_path, project, check=True, action="promote", image="web", env="dev")

    assert planned["changed"] is True
    assert planned["plan"] == {
        "image": "web",
        "channel": "dev",
        "from": "1.0.0",
        "to": "1.0.1",
        "moves": True,
    }
    # Check mode moved nothing: asked again, the channel is still where it was.
    assert after["plan"] == planned["plan"]


def test_an_unknown_image_fails_with_the_library_message(tmp_path: Path, project: Path) -> None:
    result = run_module(tmp_path, project, action="promote", image="db", env="dev")

    assert result["failed"] is True
    assert result["rc"] == 2
    assert str(result["msg"]).startswith("unknown image 'db'")


def test_the_fleet_of_an_environment_without_instances_is_an_empty_group(
    tmp_path: Path, project: Path
) -> None:
    source = project / "inventories" / "dev"
    source.mkdir(parents=True)
    shutil.copy2(REPO / "inventories" / "dev" / "fleet.yml", source / "fleet.yml")

    done = ansible("ansible-inventory", "-i", str(source), "--list", cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    assert "Unable to parse" not in done.stderr
    listed = json.loads(done.stdout)
    assert "dev" in listed["all"]["children"]
    assert listed["_meta"]["hostvars"] == {}
    assert listed.get("dev", {}).get("hosts", []) == []


def test_an_unknown_environment_in_the_source_is_an_inventory_error(
    tmp_path: Path, project: Path
) -> None:
    source = project / "inventories" / "qa"
    source.mkdir(parents=True)
    (source / "fleet.yml").write_text("plugin: pipeline.images.fleet\nenv: qa\n")

    done = ansible("ansible-inventory", "-i", str(source / "fleet.yml"), "--list", cwd=tmp_path)

    assert "unknown environment 'qa' (environments in pipeline.yml: dev)" in done.stderr
    assert json.loads(done.stdout)["_meta"]["hostvars"] == {}


def test_the_roll_playbook_in_check_mode_shows_the_plan_and_bakes_nothing(
    tmp_path: Path, project: Path
) -> None:
    done = ansible(
        "ansible-playbook",
        "-i",
        "localhost,",
        "--check",
        "-e",
        f"ansible_python_interpreter={sys.executable}",
        "-e",
        f"roll_project={project}",
        str(REPO / "playbooks" / "roll.yml"),
        cwd=tmp_path,
    )

    assert done.returncode == 0, done.stdout + done.stderr
    assert '"when": "after bake and verify"' in done.stdout
    assert "changed=1" in done.stdout
    assert not (project / ".pipeline" / "runs").exists()
    assert not (project / ".pipeline" / "images").exists()


def test_bake_in_check_mode_says_why_it_would_rebuild(tmp_path: Path, project: Path) -> None:
    bake = run_module(tmp_path, project, check=True, action="bake", image="web")

    assert bake["changed"] is True
    assert bake["version"] == "1.0.0"
    assert "no version yet" in bake["plan"]["reasons"]  # type: ignore[index]
    assert not (project / ".pipeline" / "runs").exists()


def test_deploy_in_check_mode_gives_terraforms_plan_for_the_channel(
    tmp_path: Path, project: Path
) -> None:
    add_verified(project, tmp_path, "1.0.0")
    api.promote("web", "dev", config_path=project / "pipeline.yml")

    deploy = run_module(tmp_path, project, check=True, action="deploy", env="dev")

    assert deploy["changed"] is True
    assert deploy["version"] == "1.0.0"
    plan = deploy["plan"]
    assert isinstance(plan, dict)
    assert [change["action"] for change in plan["changes"]] == ["create", "create"]
    assert not (project / ".pipeline" / "runs").exists()
    assert not (project / ".pipeline" / "envs" / "dev" / "terraform" / "terraform.tfstate").exists()


def test_verifying_a_verified_version_changes_nothing(tmp_path: Path, project: Path) -> None:
    add_verified(project, tmp_path, "1.0.0")

    result = run_module(tmp_path, project, action="verify", image="web")

    assert result["changed"] is False
    assert (result["version"], result["build_id"]) == ("1.0.0", "b-1.0.0")
    assert not (project / ".pipeline" / "runs").exists()


def test_deploy_in_check_mode_refuses_a_revoked_channel_version_as_deploy_does(
    tmp_path: Path, project: Path
) -> None:
    add_verified(project, tmp_path, "1.0.0")
    config_path = project / "pipeline.yml"
    api.promote("web", "dev", config_path=config_path)
    api.revoke("web", "1.0.0", reason="CVE-2026-0007 in the service", config_path=config_path)

    planned = run_module(tmp_path, project, check=True, action="deploy", env="dev")

    assert planned["failed"] is True
    assert planned["rc"] == 6
    assert "cannot deploy dev: channel dev points at web 1.0.0" in str(planned["msg"])
    assert "CVE-2026-0007 in the service" in str(planned["msg"])
    assert "plan" not in planned


def test_a_run_in_check_mode_and_plan_refuse_a_channel_left_on_a_revoked_version(
    tmp_path: Path, project: Path
) -> None:
    """The inputs are those of a verified older version, so the channel stays on the revoked
    newer one, which `run` then refuses to deploy (found by a new user's trial: plan said all
    was well)."""
    config_path = project / "pipeline.yml"
    fingerprint = api.bake_preview("web", config_path=config_path)["fingerprint"]
    add_verified(project, tmp_path, "1.0.0", fingerprint=fingerprint)
    add_verified(project, tmp_path, "1.0.1")
    api.promote("web", "dev", "1.0.1", config_path=config_path)
    api.revoke("web", "1.0.1", reason="CVE-2026-0009 in the message", config_path=config_path)

    ran = run_module(tmp_path, project, check=True, action="run", image="web", env="dev")
    planned = run_pipeline("plan", "web", "--env", "dev", cwd=project)

    assert ran["failed"] is True and ran["rc"] == 6
    assert "cannot deploy dev: channel dev points at web 1.0.1" in str(ran["msg"])
    assert planned.returncode == 6, planned.stderr
    assert "CVE-2026-0009 in the message" in planned.stderr


def test_bake_in_check_mode_refuses_the_inputs_of_a_revoked_version_as_bake_does(
    tmp_path: Path, project: Path
) -> None:
    config_path = project / "pipeline.yml"
    fingerprint = api.bake_preview("web", config_path=config_path)["fingerprint"]
    add_verified(project, tmp_path, "1.0.0", fingerprint=fingerprint)
    api.revoke("web", "1.0.0", reason="CVE-2026-0008 in the role", config_path=config_path)

    baked = run_module(tmp_path, project, check=True, action="bake", image="web")
    ran = run_module(tmp_path, project, check=True, action="run", image="web", env="dev")

    for result in (baked, ran):
        assert result["failed"] is True
        assert result["rc"] == 2
        assert "these inputs are exactly those of web 1.0.0, revoked" in str(result["msg"])
    assert not (project / ".pipeline" / "runs").exists()
