"""The roles' parse before a bake: ansible-playbook --syntax-check on the play a bake runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import config
from pipeline.errors import ConfigError
from pipeline.stages.bake import _syntax_error, syntax_check

PROJECT = """\
images:
  web:
    version: 1.0.0
    roles: [site]
    vars:
      site_extra: extra
environments: {}
"""


@pytest.fixture
def project(tmp_path: Path) -> config.Config:
    (tmp_path / "pipeline.yml").write_text(PROJECT)
    tasks = tmp_path / "roles" / "site" / "tasks"
    tasks.mkdir(parents=True)
    # A static import whose name is a variable: parsing it needs the image's vars.
    (tasks / "main.yml").write_text(
        '---\n- name: The extra tasks\n  ansible.builtin.import_tasks: "{{ site_extra }}.yml"\n'
    )
    (tasks / "extra.yml").write_text(
        "---\n- name: Say hello\n  ansible.builtin.debug:\n    msg: hello\n"
    )
    return config.load(tmp_path / "pipeline.yml")


def test_roles_that_parse_pass_with_the_images_vars(project: config.Config) -> None:
    syntax_check(project, project.image("web"))


def test_a_module_that_does_not_exist_is_named_with_its_file_and_line(
    project: config.Config,
) -> None:
    extra = project.roles_dir / "site" / "tasks" / "extra.yml"
    extra.write_text(extra.read_text() + "\n- name: Typo\n  ansible.builtin.debugg:\n    msg: x\n")

    with pytest.raises(ConfigError) as caught:
        syntax_check(project, project.image("web"))

    assert str(caught.value).startswith(f"{extra}:6: the roles do not parse")
    assert "couldn't resolve module/action 'ansible.builtin.debugg'" in str(caught.value)


def test_an_older_ansibles_error_is_placed_too(project: config.Config) -> None:
    output = (
        "ERROR! couldn't resolve module/action 'copyy'. This often indicates a misspelling.\n\n"
        "The error appears to be in '/p/roles/r/tasks/main.yml': line 5, column 3, but may\n"
        "be elsewhere in the file depending on the exact syntax problem.\n"
    )
    error = _syntax_error(project, project.image("web"), output)
    assert str(error) == (
        "/p/roles/r/tasks/main.yml:5: the roles do not parse (ansible-playbook --syntax-check):"
        " couldn't resolve module/action 'copyy'. This often indicates a misspelling."
    )


def test_an_error_without_a_place_names_the_images_roles(project: config.Config) -> None:
    error = _syntax_error(project, project.image("web"), "[ERROR]: something else\n")
    assert str(error) == (
        f"{project.path}: images.web.roles: the roles do not parse"
        " (ansible-playbook --syntax-check): something else"
    )
