"""The pipeline_changes callback under real ansible-playbook, and what verify makes of its report.

Molecule's converge and verify run ansible-playbook with the callback enabled as here; the host
uses Ansible's local connection, so no VM is needed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline.stages.verify import callback_env, report_problem

ANSIBLE_PLAYBOOK = Path(sys.executable).with_name("ansible-playbook")
INVENTORY = {
    "all": {
        "hosts": {
            "verify-web-1": {
                "ansible_connection": "local",
                "ansible_python_interpreter": sys.executable,
            }
        }
    }
}


def _play(name: str, hosts: str, task: dict) -> dict:
    return {"name": name, "hosts": hosts, "gather_facts": False, "tasks": [task]}


PING = {"name": "Answer", "ansible.builtin.ping": {}}
CHANGE = {"name": "Touch the marker", "ansible.builtin.command": "true", "changed_when": True}


def _run(tmp_path: Path, name: str, plays: list[dict]) -> tuple[int, Path]:
    """Run the plays as playbook `name` with the callback on; the exit code and the report."""
    playbook = tmp_path / name
    playbook.write_text(yaml.safe_dump(plays, sort_keys=False), encoding="utf-8")
    inventory = tmp_path / "inventory.yml"
    inventory.write_text(yaml.safe_dump(INVENTORY), encoding="utf-8")
    report = tmp_path / f"{name}.json"
    done = subprocess.run(
        [str(ANSIBLE_PLAYBOOK), "-i", str(inventory), str(playbook)],
        env={
            **os.environ,
            **callback_env(),
            "PIPELINE_CHANGES_FILE": str(report),
            "ANSIBLE_NOCOLOR": "1",
        },
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert "[WARNING]: Skipping callback" not in done.stderr, done.stderr
    return done.returncode, report


def test_a_converge_play_matching_no_host_fails_the_step_naming_the_play(
    tmp_path: Path,
) -> None:
    plays = [_play("Converge", "webservers", PING), _play("Answer from all", "all", PING)]

    returncode, report = _run(tmp_path, "converge.yml", plays)

    assert returncode == 0  # Ansible skips the play and calls the run a success
    assert report_problem("converge", report) == (
        "molecule converge: play 'Converge' of converge.yml matched no host"
        " (hosts: webservers), so it checked nothing there"
    )


def test_a_verify_play_matching_no_host_fails_the_step_naming_the_play(tmp_path: Path) -> None:
    plays = [_play("Verify from outside the VM", "web:&dev", PING)]

    returncode, report = _run(tmp_path, "verify.yml", plays)

    assert returncode == 0
    assert report_problem("verify", report) == (
        "molecule verify: play 'Verify from outside the VM' of verify.yml matched no host"
        " (hosts: web:&dev), so it checked nothing there"
    )


def test_plays_that_reach_the_instance_pass_and_only_a_converge_may_not_change(
    tmp_path: Path,
) -> None:
    plays = [_play("Converge", "all", PING), _play("Check", "verify-web-1", CHANGE)]

    returncode, report = _run(tmp_path, "verify.yml", plays)

    assert returncode == 0
    assert report_problem("verify", report) == ""
    assert report_problem("converge", report) == (
        "the image is not what its roles describe: applying them changed Touch the marker"
    )
