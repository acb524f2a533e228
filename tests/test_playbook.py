"""Playbooks the pipeline runs itself (the smoke test), through real ansible-runner runs.

The hosts use Ansible's local connection, so no VM is needed to see a play pass, fail with
the task named, fail for matching no host, and be stopped at its timeout.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.errors import Interrupted
from pipeline.tools import playbook

LOCAL = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}


def _write(tmp_path: Path, tasks: str) -> Path:
    path = tmp_path / "smoke.yml"
    path.write_text(
        "---\n- name: Smoke\n  hosts: all\n  gather_facts: false\n  tasks:\n" + tasks,
        encoding="utf-8",
    )
    return path


def test_a_passing_play_is_ok_and_leaves_its_events_in_a_fresh_folder(tmp_path: Path) -> None:
    book = _write(tmp_path, "    - name: Answer\n      ansible.builtin.ping:\n")

    first = playbook.run(book, {"one": LOCAL}, group="dev", folder=tmp_path / "runs", timeout=120)
    second = playbook.run(book, {"one": LOCAL}, group="dev", folder=tmp_path / "runs", timeout=120)

    assert (first.ok, first.status, first.rc) == (True, "successful", 0)
    assert second.ok
    folders = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert folders == ["run-01", "run-02"]
    assert list((tmp_path / "runs" / "run-01").rglob("job_events/*.json"))


def test_a_failing_task_fails_the_run_and_is_named_with_its_host(tmp_path: Path) -> None:
    book = _write(
        tmp_path,
        "    - name: The page says hello\n"
        "      ansible.builtin.assert:\n"
        '        that: [\'"hello" in "goodbye"\']\n'
        "        fail_msg: the page does not say hello\n",
    )

    outcome = playbook.run(
        book, {"one": LOCAL, "two": LOCAL}, group="dev", folder=tmp_path, timeout=120
    )

    assert not outcome.ok
    assert outcome.status == "failed" and outcome.rc != 0
    assert sorted(f.split(":")[0] for f in outcome.failed) == ["one", "two"]
    assert "The page says hello: the page does not say hello" in outcome.failed[0]
    assert "the page does not say hello" in outcome.summary


def test_a_failed_when_condition_is_named_as_such(tmp_path: Path) -> None:
    book = _write(
        tmp_path,
        "    - name: The answer is right\n"
        "      ansible.builtin.command: echo wrong\n"
        "      register: answer\n"
        "      changed_when: false\n"
        "      failed_when: answer.stdout != 'right'\n",
    )

    outcome = playbook.run(book, {"one": LOCAL}, group="dev", folder=tmp_path, timeout=120)

    assert outcome.failed == ["one: The answer is right: its failed_when condition held"]


def test_a_play_that_matches_no_host_fails_naming_it_and_the_groups_there_are(
    tmp_path: Path,
) -> None:
    book = tmp_path / "smoke.yml"
    book.write_text(
        "---\n"
        "- name: Check\n  hosts: dbservers\n  gather_facts: false\n  tasks:\n"
        "    - name: Answer\n      ansible.builtin.ping:\n"
        "- name: Smoke\n  hosts: all\n  gather_facts: false\n  tasks:\n"
        "    - name: Answer\n      ansible.builtin.ping:\n",
        encoding="utf-8",
    )

    outcome = playbook.run(book, {"one": LOCAL}, group="web-dev", folder=tmp_path, timeout=120)

    # Ansible skips the play and calls the run a success; the pipeline does not.
    assert (outcome.status, outcome.rc, outcome.failed) == ("successful", 0, [])
    assert not outcome.ok
    assert outcome.summary == (
        "play 'Check' matched no host (hosts: dbservers); the new instances are in groups"
        " all, web_dev"
    )


def test_a_play_aimed_at_the_environment_group_runs_on_its_instances(tmp_path: Path) -> None:
    book = tmp_path / "smoke.yml"
    book.write_text(
        "---\n- name: Check\n  hosts: web_dev\n  gather_facts: false\n  tasks:\n"
        "    - name: Answer\n      ansible.builtin.ping:\n",
        encoding="utf-8",
    )

    outcome = playbook.run(
        book, {"one": LOCAL, "two": LOCAL}, group="web-dev", folder=tmp_path, timeout=120
    )

    assert outcome.ok, outcome.summary
    assert outcome.unmatched == []


def test_a_play_past_its_timeout_is_stopped(tmp_path: Path) -> None:
    book = _write(tmp_path, "    - name: Hang\n      ansible.builtin.command: sleep 300\n")

    started = time.monotonic()
    outcome = playbook.run(book, {"one": LOCAL}, group="dev", folder=tmp_path, timeout=5)

    assert time.monotonic() - started < 60
    assert not outcome.ok
    assert outcome.status == "timeout"
    assert "stopped after 5 s" in outcome.summary
    # What the play started went with it.
    time.sleep(0.5)
    assert _running(b"sleep\x00300\x00") == []


def test_a_run_leaves_the_signal_handlers_it_found(tmp_path: Path) -> None:
    book = _write(tmp_path, "    - name: Answer\n      ansible.builtin.ping:\n")
    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))

    playbook.run(book, {"one": LOCAL}, group="dev", folder=tmp_path, timeout=120)

    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_a_run_stops_it_as_an_interruption(tmp_path: Path, number: int) -> None:
    book = _write(tmp_path, "    - name: Hang\n      ansible.builtin.command: sleep 301\n")
    threading.Timer(4, os.kill, (os.getpid(), number)).start()

    with pytest.raises(Interrupted, match=r"interrupted during playbook smoke\.yml"):
        playbook.run(book, {"one": LOCAL}, group="dev", folder=tmp_path, timeout=120)

    # Without the signal the run would have ended at its timeout, with an outcome, not raised.
    time.sleep(0.5)
    assert _running(b"sleep\x00301\x00") == []


def _running(cmdline: bytes) -> list[Path]:
    """The processes whose command line is exactly `cmdline` (arguments NUL-separated)."""
    return [p for p in Path("/proc").iterdir() if p.name.isdigit() and _cmdline(p) == cmdline]


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""
