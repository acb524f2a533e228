"""Fingerprints follow what a role does, not the litter around it; missing roles are named."""

from __future__ import annotations

from pathlib import Path

import pytest
from projects import MINIMAL

from pipeline import config
from pipeline import fingerprint as fp
from pipeline.errors import ConfigError
from pipeline.stages.bake import applied_roles, role_dirs, role_hashes


def _role(root: Path) -> Path:
    """A small role: tasks, a file it installs, a script it runs."""
    (root / "tasks").mkdir(parents=True)
    (root / "tasks" / "main.yml").write_text("- name: Install\n  ansible.builtin.copy: {}\n")
    (root / "files").mkdir()
    (root / "files" / "app.py").write_text("print('hello')\n")
    (root / "files" / "start.sh").write_text("#!/bin/sh\nexec python3 app.py\n")
    return root


@pytest.fixture
def role(tmp_path: Path) -> Path:
    return _role(tmp_path / "roles" / "webservice")


def test_the_same_content_elsewhere_has_the_same_hash(role: Path, tmp_path: Path) -> None:
    twin = _role(tmp_path / "elsewhere" / "webservice")

    assert fp.hash_tree(twin) == fp.hash_tree(role)


def test_changing_a_files_content_changes_the_hash(role: Path) -> None:
    before = fp.hash_tree(role)

    (role / "files" / "app.py").write_text("print('hello, world')\n")

    assert fp.hash_tree(role) != before


def test_renaming_a_file_changes_the_hash(role: Path) -> None:
    before = fp.hash_tree(role)

    (role / "files" / "app.py").rename(role / "files" / "service.py")

    assert fp.hash_tree(role) != before


def test_moving_a_file_to_another_folder_changes_the_hash(role: Path) -> None:
    before = fp.hash_tree(role)

    (role / "templates").mkdir()
    (role / "files" / "app.py").rename(role / "templates" / "app.py")

    assert fp.hash_tree(role) != before


def test_making_a_file_executable_changes_the_hash(role: Path) -> None:
    before = fp.hash_tree(role)

    (role / "files" / "start.sh").chmod(0o755)

    assert fp.hash_tree(role) != before


def test_adding_a_file_changes_the_hash(role: Path) -> None:
    before = fp.hash_tree(role)

    (role / "defaults").mkdir()
    (role / "defaults" / "main.yml").write_text("webservice_port: 8080\n")

    assert fp.hash_tree(role) != before


@pytest.mark.parametrize(
    "litter",
    [
        "files/__pycache__/app.cpython-311.pyc",
        "files/app.pyc",
        "__pycache__/conftest.cpython-311.pyc",
        "tasks/.main.yml.swp",
        "tasks/main.yml~",
        ".pytest_cache/v/cache/lastfailed",
    ],
)
def test_caches_and_editor_files_do_not_change_the_hash(role: Path, litter: str) -> None:
    before = fp.hash_tree(role)

    path = role / litter
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x00compiled or scratch bytes")

    assert fp.hash_tree(role) == before


def test_combine_does_not_depend_on_the_order_parts_are_given() -> None:
    forward = fp.combine({"roles": "r1", "template": "t1"})

    assert fp.combine({"template": "t1", "roles": "r1"}) == forward
    assert fp.combine({"template": "t2", "roles": "r1"}) != forward


# Roles named in pipeline.yml


PROJECT = MINIMAL


@pytest.fixture
def project(tmp_path: Path) -> config.Config:
    (tmp_path / "pipeline.yml").write_text(PROJECT)
    _role(tmp_path / "roles" / "base")
    return config.load(tmp_path / "pipeline.yml")


def test_every_listed_role_is_found_in_order(project: config.Config) -> None:
    _role(project.roles_dir / "webservice")

    found = role_dirs(project, project.image("web"))

    assert list(found.items()) == [
        ("base", project.roles_dir / "base"),
        ("webservice", project.roles_dir / "webservice"),
    ]


def test_a_missing_role_folder_is_named_by_its_place_in_the_list(project: config.Config) -> None:
    with pytest.raises(ConfigError) as caught:
        role_dirs(project, project.image("web"))

    assert caught.value.exit_code == 3
    assert caught.value.key == "images.web.roles[1]"
    assert str(caught.value).startswith(
        f"{project.path}: images.web.roles[1]: role 'webservice' does not exist"
    )


def test_a_role_folder_without_tasks_is_treated_as_missing(project: config.Config) -> None:
    (project.roles_dir / "webservice" / "files").mkdir(parents=True)

    with pytest.raises(ConfigError) as caught:
        role_dirs(project, project.image("web"))

    assert caught.value.key == "images.web.roles[1]"
    assert f"no {project.roles_dir / 'webservice'}/tasks/main.yml" in str(caught.value)


def test_roles_pulled_in_by_a_meta_dependency_or_an_include_are_inputs_too(
    project: config.Config,
) -> None:
    web = _role(project.roles_dir / "webservice")
    _role(project.roles_dir / "common")
    _role(project.roles_dir / "tls")
    (web / "meta").mkdir()
    (web / "meta" / "main.yml").write_text("dependencies:\n  - role: common\n")
    with (web / "tasks" / "main.yml").open("a") as tasks:
        tasks.write("- name: Certificates\n  ansible.builtin.include_role:\n    name: tls\n")

    before = role_hashes(project, applied_roles(project, project.image("web")))
    assert list(before) == ["base", "webservice", "common", "tls"]

    (project.roles_dir / "common" / "tasks" / "main.yml").write_text("- name: Changed\n")
    after = role_hashes(project, applied_roles(project, project.image("web")))
    assert after["common"] != before["common"]
    assert {k: v for k, v in after.items() if k != "common"} == {
        k: v for k, v in before.items() if k != "common"
    }
