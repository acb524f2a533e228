"""Shell tasks that would hide a failure behind a pipe are refused before a bake.

The cases follow ansible-lint's risky-shell-pipe; `tests/badinputs.py` has one met through
`pipeline plan`, which must write nothing.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from pipeline.shell_pipes import RiskyPipe, check, find, has_pipe


@pytest.mark.parametrize(
    ("command", "pipes"),
    [
        ("curl -s http://x | tee /tmp/page", True),
        ("grep x file|wc -l", True),
        ("make 2>&1 |& tee build.log", True),
        ("a || b | c", True),
        ('echo "it\'s" | cat', True),
        ("test -f /x || touch /x", False),
        ("echo 'a | b'", False),
        ('echo "a | b"', False),
        ("echo a \\| b", False),
        ("true # then | nothing", False),
        ("a && b", False),
    ],
)
def test_a_pipe_is_a_bar_outside_quotes_comments_and_or(command: str, pipes: bool) -> None:
    assert has_pipe(command) is pipes


def _role(roles: Path, name: str, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = roles / name / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    return roles / name


@pytest.mark.parametrize(
    ("task", "risky"),
    [
        ("ansible.builtin.shell: curl -s http://x | tee /tmp/page\n", True),
        ("shell: curl -s http://x | tee /tmp/page\n", True),
        ("ansible.legacy.shell:\n  cmd: curl -s http://x | tee /tmp/page\n", True),
        ("ansible.builtin.shell:\nargs:\n  cmd: curl -s http://x | tee /tmp/page\n", True),
        ("action: ansible.builtin.shell curl -s http://x | tee /tmp/page\n", True),
        ("ansible.builtin.shell: curl | tee x  # noqa: no-changed-when\n", True),
        (
            "ansible.builtin.shell: set -o pipefail && curl -s http://x | tee /tmp/page\n"
            "args:\n  executable: /bin/bash\n",
            False,
        ),
        ("ansible.builtin.shell: |\n  set -euo pipefail\n  curl -s http://x | tee /tmp/p\n", False),
        (
            "ansible.builtin.shell: curl -s http://x | tee /tmp/page  # noqa: risky-shell-pipe\n",
            False,
        ),
        ("ansible.builtin.shell: curl | tee x  # noqa no-changed-when risky-shell-pipe\n", False),
        ("ansible.builtin.shell: curl | tee /tmp/page\ntags: [skip_ansible_lint]\n", False),
        ("ansible.builtin.shell: curl | tee /tmp/page\nignore_errors: true\n", False),
        ("ansible.builtin.shell: echo {{ page | default('none') }} > /tmp/page\n", False),
        ("ansible.builtin.command: curl -s http://x | tee /tmp/page\n", False),
        ("ansible.builtin.shell: test -f /x || touch /x\n", False),
    ],
)
def test_a_shell_task_is_risky_as_ansible_lint_says(tmp_path: Path, task: str, risky: bool) -> None:
    indented = textwrap.indent(task, "  ")
    _role(tmp_path, "web", {"tasks/main.yml": f"---\n- name: Fetch the page\n{indented}"})

    found = find(tmp_path, ["web"])

    main = tmp_path / "web" / "tasks" / "main.yml"
    assert found == ([RiskyPipe(main, 2, "Fetch the page")] if risky else [])


def test_tasks_in_blocks_handlers_included_files_and_other_roles_are_searched(
    tmp_path: Path,
) -> None:
    risky = "ansible.builtin.shell: false | cat\n"
    roles = tmp_path / "roles"
    _role(
        roles,
        "web",
        {
            "tasks/main.yml": f"""\
                - name: Some steps
                  block:
                    - name: Fine
                      ansible.builtin.command: "true"
                  rescue:
                    - name: In a rescue
                      {risky}
                - name: From elsewhere
                  ansible.builtin.include_tasks: ../../../shared/steps.yml
                - name: Another role
                  ansible.builtin.include_role:
                    name: helper
                """,
            "tasks/never-named.yml": f"- name: In a file of tasks/\n  {risky}",
            "handlers/main.yml": f"- name: A handler\n  {risky}",
            "meta/main.yml": "dependencies: [{role: common}]\n",
        },
    )
    _role(roles, "helper", {"tasks/main.yml": f"- name: Included role\n  {risky}"})
    _role(roles, "common", {"tasks/main.yml": f"- name: Dependency\n  {risky}"})
    _role(roles, "unused", {"tasks/main.yml": f"- name: Not reached\n  {risky}"})
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "steps.yml").write_text(f"- name: Included file\n  {risky}")

    found = find(roles, ["web"])

    assert sorted(item.task for item in found) == [
        "A handler",
        "Dependency",
        "In a file of tasks/",
        "In a rescue",
        "Included file",
        "Included role",
    ]


def test_the_refusal_names_the_file_line_task_and_what_to_do(tmp_path: Path) -> None:
    _role(
        tmp_path,
        "web",
        {
            "tasks/main.yml": """\
                ---
                - name: Fine
                  ansible.builtin.command: "true"

                - name: Save the page
                  ansible.builtin.shell: curl -s http://127.0.0.1/ | tee /tmp/page
                """
        },
    )

    with pytest.raises(ConfigError) as caught:
        check(tmp_path, ["web"])

    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'web' / 'tasks' / 'main.yml'}:5: ")
    assert "task 'Save the page' pipes a shell command without pipefail" in message
    assert "`set -o pipefail &&`" in message and "executable: /bin/bash" in message
    assert "# noqa: risky-shell-pipe" in message
    assert "\n" not in message


def test_roles_without_a_risky_pipe_pass(tmp_path: Path) -> None:
    repo_roles = Path(__file__).resolve().parent.parent / "roles"

    check(repo_roles, ["base", "webservice"])


def test_a_task_file_that_is_not_yaml_is_named(tmp_path: Path) -> None:
    _role(tmp_path, "web", {"tasks/main.yml": "- name: Broken\n  shell: 'a | b\n"})

    with pytest.raises(ConfigError, match=r"tasks/main\.yml: malformed YAML at line"):
        check(tmp_path, ["web"])
