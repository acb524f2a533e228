"""Reading what failed out of Ansible's output, as Packer and Molecule print it."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import ImageConfig
from pipeline.errors import ToolError
from pipeline.stages.bake import _explain_packer_failure
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

CONFIG = Path("/srv/project/pipeline.yml")

PACKER_BAKE = """\
==> qemu.image: Executing Ansible: ansible-playbook -e packer_build_name="image"
    qemu.image: TASK [base : Insist on the basic packages] *************************************
    qemu.image: ok: [default]
    qemu.image: TASK [failing : Refuse to bake] ************************************************
    qemu.image: fatal: [default]: FAILED! => {"changed": false, "msg": "this role always fails"}
    qemu.image: PLAY RECAP *********************************************************************
Build 'qemu.image' errored after 1 minute 2 seconds: Error executing Ansible: Non-zero exit status
""".splitlines()

# Packer 1.6.6 at a provisioner's timeout, stopped by the pipeline at its "Cancelling" line.
PACKER_TIMEOUT = """\
==> qemu.image: Setting a 30s timeout for the next provisioner...
==> qemu.image: Provisioning with Ansible...
    qemu.image: TASK [Gathering Facts] *********************************************************
    qemu.image: ok: [default]
    qemu.image:
    qemu.image: TASK [sleeping : Wait for a mirror that never answers] *************************
==> qemu.image: Cancelling provisioner after a timeout...
Cancelling build after receiving terminated
==> qemu.image: Deleting output directory...
Build 'qemu.image' errored after 1 minute 16 seconds: Build was cancelled.

==> Wait completed after 1 minute 16 seconds
Cleanly cancelled builds after being interrupted.
""".splitlines()


def _packer_error(tmp_path: Path, lines: list[str]) -> ToolError:
    log = tmp_path / "01-packer-build.log"
    log.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return ToolError("packer build", ["packer", "build"], 1, lines[-15:], str(log))


def test_a_provisioner_timeout_names_the_key_its_seconds_and_the_task_it_stopped(
    tmp_path: Path,
) -> None:
    image = ImageConfig(name="stuck", version="0.1.0", roles=("sleeping",), provision_timeout=30)

    explained = _explain_packer_failure(_packer_error(tmp_path, PACKER_TIMEOUT), image, CONFIG)

    assert explained.cause == (
        "the ansible provisioner ran past provision_timeout (30 s,"
        " images.stuck.provision_timeout in pipeline.yml)"
        " during task [sleeping : Wait for a mirror that never answers]"
    )


def test_a_failing_task_in_a_bake_is_its_cause(tmp_path: Path) -> None:
    image = ImageConfig(name="broken", version="0.1.0", roles=("failing",))

    explained = _explain_packer_failure(_packer_error(tmp_path, PACKER_BAKE), image, CONFIG)

    assert explained.cause.splitlines()[0] == (
        "task [failing : Refuse to bake] on default: this role always fails"
    )
    assert "provision_timeout" not in explained.cause


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
