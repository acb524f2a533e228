"""Reading what failed out of Ansible's output, as Packer and Molecule print it."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.stages.verify import report_problem
from pipeline.tools.ansible_output import failed_tasks

MOLECULE_VERIFY = """\
TASK [The health check answers from the host] **********************************
ok: [verify-web-1 -> localhost]

TASK [The front page names this image version] *********************************
fatal: [verify-web-1 -> localhost]: FAILED! => {"changed": false, "failed_when_result": "Error \
rendering expression: 'in <string>' requires string as left operand", "msg": "OK (117 bytes)"}

PLAY RECAP *********************************************************************
verify-web-1 : ok=1    changed=0    unreachable=0    failed=1    skipped=0
""".splitlines()

PACKER_BAKE = """\
==> qemu.image: Executing Ansible: ansible-playbook -e packer_build_name="image"
    qemu.image: TASK [base : Insist on the basic packages] *************************************
    qemu.image: ok: [default]
    qemu.image: TASK [failing : Refuse to bake] ************************************************
    qemu.image: fatal: [default]: FAILED! => {"changed": false, "msg": "this role always fails"}
    qemu.image: PLAY RECAP *********************************************************************
Build 'qemu.image' errored after 1 minute 2 seconds: Error executing Ansible: Non-zero exit status
""".splitlines()


def test_a_failed_when_names_the_task_and_the_reason() -> None:
    [cause] = failed_tasks(MOLECULE_VERIFY)

    assert cause.startswith("task [The front page names this image version] on verify-web-1")
    assert "failed_when: Error rendering expression" in cause


def test_packer_prefixed_lines_give_the_failing_role_task_and_its_message() -> None:
    assert failed_tasks(PACKER_BAKE, prefix="qemu.image: ") == [
        "task [failing : Refuse to bake] on default: this role always fails"
    ]


def test_successful_output_has_no_failed_task() -> None:
    assert failed_tasks(line for line in MOLECULE_VERIFY[:3]) == []


def test_a_converge_that_changed_nothing_passes(tmp_path: Path) -> None:
    report = tmp_path / "changes.json"
    report.write_text(json.dumps({"changed": [], "hosts": {}}))

    assert report_problem("converge", report) == ""


def test_a_converge_that_changed_something_names_the_tasks(tmp_path: Path) -> None:
    report = tmp_path / "changes.json"
    changed = [
        {"host": "vm", "task": "Write the service configuration"},
        {"host": "vm", "task": "Restart webservice"},
    ]
    report.write_text(json.dumps({"changed": changed, "hosts": {}}))

    reason = report_problem("converge", report)

    assert reason.startswith("the image is not what its roles describe")
    assert "Restart webservice; Write the service configuration" in reason


def test_a_verify_may_change_things_its_checks_need(tmp_path: Path) -> None:
    report = tmp_path / "changes.json"
    changed = [{"host": "vm", "task": "Fetch the page"}]
    report.write_text(json.dumps({"changed": changed, "unmatched": [], "hosts": {}}))

    assert report_problem("verify", report) == ""


def test_a_converge_without_the_report_is_not_taken_as_unchanged(tmp_path: Path) -> None:
    assert "did not run" in report_problem("converge", tmp_path / "missing.json")
