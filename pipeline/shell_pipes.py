"""Shell tasks whose failure a pipe would hide, found in an image's roles before a bake.

`make | tee build.log` ends with the status of `tee`: when `make` fails the shell still reports
success, Ansible goes on, and the bake registers an image that is not what its roles describe.
The rule is ansible-lint's `risky-shell-pipe`: a task of the shell module whose command has a
pipe (`|`, not `||`) outside quotes and Jinja, and no `set -o pipefail` (or `set -euo pipefail`)
at the start of one of its lines. As there, a task with `ignore_errors`, the tag
`skip_ansible_lint`, or a `# noqa: risky-shell-pipe` (or `# noqa risky-shell-pipe`) comment among
its lines is left alone.

Every YAML file under a role's tasks/ and handlers/ is read, so that what a role includes from
there is covered whatever the include's name; task files included from elsewhere by a plain path,
roles included by a plain name and roles named in meta/main.yml's dependencies are followed.
Names built with Jinja cannot be followed, and a task file Ansible Vault encrypts whole is not
read.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import yaml_problem
from pipeline.errors import ConfigError

RULE = "risky-shell-pipe"
SHELL_MODULES = ("shell", "ansible.builtin.shell", "ansible.legacy.shell")
TASK_INCLUDES = tuple(
    prefix + name
    for name in ("include_tasks", "import_tasks")
    for prefix in ("", "ansible.builtin.", "ansible.legacy.")
)
ROLE_INCLUDES = tuple(
    prefix + name
    for name in ("include_role", "import_role")
    for prefix in ("", "ansible.builtin.", "ansible.legacy.")
)
TASK_LISTS = ("block", "rescue", "always")
JINJA = re.compile(r"\{\{.*?\}\}|\{%.*?%\}|\{#.*?#\}", re.DOTALL)
# ansible-lint's own test for pipefail.
PIPEFAIL = re.compile(r"^\s*set.*[+-][A-Za-z]*o\s*pipefail", re.MULTILINE)
NOQA = re.compile(rf"#\s*noqa:?\s[^\n]*(?<![\w-]){RULE}(?![\w-])")


@dataclass(frozen=True)
class RiskyPipe:
    """A shell task that pipes without pipefail: where it is and what it is called."""

    path: Path
    line: int
    task: str


class _Loader(yaml.SafeLoader):
    """Reads task files; Ansible's own tags (!unsafe, !vault) read as their plain text."""


_Loader.add_multi_constructor(
    "!",
    lambda loader, _tag, node: (
        loader.construct_scalar(node) if isinstance(node, yaml.ScalarNode) else None
    ),
)


def check(roles_dir: Path, roles: Iterable[str]) -> list[str]:
    """Refuse a shell task that would hide a failure behind a pipe, in `roles` or what they
    pull in, with a ConfigError naming its file, line and name and what to do. Return the roles
    reached (see reached_roles), which the same walk finds."""
    found, reached = _scan(roles_dir, roles)
    if not found:
        return reached
    first = found[0]
    others = f" ({len(found) - 1} more such task(s) after it)" if len(found) > 1 else ""
    message = (
        f"task {first.task!r} pipes a shell command without pipefail, so a failure before the"
        f" last `|` would pass unnoticed and the bake go on{others}: begin the command with"
        " `set -o pipefail &&` and give the task `args: {executable: /bin/bash}` (/bin/sh has no"
        f" pipefail), or mark the task `# noqa: {RULE}` if that failure may pass"
    )
    raise ConfigError(f"{first.path}:{first.line}", None, message)


def find(roles_dir: Path, roles: Iterable[str]) -> list[RiskyPipe]:
    """Every shell task in `roles` (and the roles and task files they pull in) that pipes
    without pipefail, in the order met."""
    return _scan(roles_dir, roles)[0]


def reached_roles(roles_dir: Path, roles: Iterable[str]) -> list[str]:
    """The names of `roles` and of every role they pull in (meta dependencies, a role included
    by a plain name), in the order met: all of them are inputs of a bake."""
    return _scan(roles_dir, roles)[1]


def _scan(roles_dir: Path, roles: Iterable[str]) -> tuple[list[RiskyPipe], list[str]]:
    """One walk of the roles: the risky pipes, and the roles reached under `roles_dir`."""
    found: list[RiskyPipe] = []
    reached: list[str] = []
    top = Path(os.path.normpath(roles_dir))
    for kind, path, task, source, line in _walk_roles(roles_dir, roles):
        if kind == "role":
            if path.is_dir() and path.parent == top:
                reached.append(path.name)
        elif _is_risky(task, source):
            found.append(RiskyPipe(path, line, str(task.get("name") or "(unnamed)")))
    return found, reached


def _walk_roles(
    roles_dir: Path, roles: Iterable[str]
) -> Iterator[tuple[str, Path, dict[str, Any], str, int]]:
    """Each role reached (kind "role") and each task of their task files (kind "task"), once."""
    queue: list[tuple[str, Path]] = [("role", roles_dir / name) for name in roles]
    seen: set[Path] = set()
    while queue:
        kind, path = queue.pop(0)
        if path.resolve() in seen:
            continue
        seen.add(path.resolve())
        path = Path(os.path.normpath(path))
        if kind == "role":
            yield "role", path, {}, "", 0
            queue += [("role", roles_dir / name) for name in _dependencies(path)]
            queue += [("file", file) for file in _task_files(path)]
            continue
        for task, source, line in _tasks(path):
            yield "task", path, task, source, line
            queue += _included(task, path, roles_dir)


def _task_files(role: Path) -> list[Path]:
    files = []
    for folder in ("tasks", "handlers"):
        for pattern in ("*.yml", "*.yaml"):
            files += sorted(p for p in (role / folder).rglob(pattern) if p.is_file())
    return files


def _dependencies(role: Path) -> list[str]:
    """The roles meta/main.yml names under `dependencies`, by plain name."""
    loaded = _load(role / "meta" / "main.yml") or _load(role / "meta" / "main.yaml")
    data = loaded[2] if loaded is not None and isinstance(loaded[2], dict) else {}
    listed = data.get("dependencies")
    names = []
    for item in listed if isinstance(listed, list) else []:
        if isinstance(item, dict):
            item = item.get("role") or item.get("name")
        if isinstance(item, str) and _plain(item):
            names.append(item)
    return names


def _included(task: dict[str, Any], path: Path, roles_dir: Path) -> list[tuple[str, Path]]:
    """The task files (by a path from this file's folder) and roles a task includes."""
    for key in TASK_INCLUDES:
        if key in task:
            value = task[key]
            target = value.get("file") if isinstance(value, dict) else value
            if isinstance(target, str) and _plain(target) and (path.parent / target).is_file():
                return [("file", path.parent / target)]
    for key in ROLE_INCLUDES:
        if key in task and isinstance(task[key], dict):
            name = task[key].get("name")
            if isinstance(name, str) and _plain(name) and (roles_dir / name).is_dir():
                return [("role", roles_dir / name)]
    return []


def _plain(name: str) -> bool:
    return "{{" not in name and "{%" not in name


def _load(path: Path) -> tuple[str, yaml.Node, Any] | None:
    """A YAML file's text, node tree and data; None if there is no such file or it is empty."""
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8")
        loader = _Loader(text)
        try:
            node = loader.get_single_node()
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), None, f"not UTF-8 text: {exc.reason}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), None, yaml_problem(exc)) from None
    return (text, node, data) if node is not None else None


def _tasks(path: Path) -> Iterator[tuple[dict[str, Any], str, int]]:
    """Every task of a task file, those in blocks too, with its own lines as written (comments
    included, which PyYAML does not keep) and the number of its first line."""
    loaded = _load(path)
    if loaded is None:
        return
    text, node, data = loaded
    if not isinstance(node, yaml.SequenceNode):
        return
    for task_node, task in _walk(node, data):
        start, end = task_node.start_mark, task_node.end_mark
        yield task, text[start.index : end.index], start.line + 1


def _walk(node: yaml.SequenceNode, data: Any) -> Iterator[tuple[yaml.Node, dict[str, Any]]]:
    if not isinstance(data, list):
        return
    for item_node, task in zip(node.value, data, strict=True):
        if not isinstance(task, dict) or not isinstance(item_node, yaml.MappingNode):
            continue
        yield item_node, task
        for key_node, value_node in item_node.value:
            if key_node.value in TASK_LISTS and isinstance(value_node, yaml.SequenceNode):
                yield from _walk(value_node, task.get(key_node.value))


def _is_risky(task: dict[str, Any], source: str) -> bool:
    command, executable = _shell_command(task)
    if command is None or task.get("ignore_errors") or "pwsh" in executable:
        return False
    if "skip_ansible_lint" in _tags(task) or NOQA.search(source):
        return False
    command = JINJA.sub("JINJA", command)
    return has_pipe(command) and not PIPEFAIL.search(command)


def _shell_command(task: dict[str, Any]) -> tuple[str | None, str]:
    """The command of a shell task and its `executable`, or None if it is no shell task."""
    given = task.get("args")
    args: dict[str, Any] = given if isinstance(given, dict) else {}
    module = next((key for key in SHELL_MODULES if key in task), None)
    value = task.get(module) if module else None
    action = task.get("action", task.get("local_action"))
    if module is None and isinstance(action, str):
        module, _, value = action.strip().partition(" ")
    elif module is None and isinstance(action, dict):
        module, value = action.get("module"), action
    if module not in SHELL_MODULES:
        return None, ""
    if isinstance(value, dict):
        args = {**args, **value}
        value = value.get("cmd", value.get("_raw_params"))
    if not value:
        value = args.get("cmd")
    executable = args.get("executable")
    return (value if isinstance(value, str) else None), str(executable or "")


def _tags(task: dict[str, Any]) -> set[str]:
    tags = task.get("tags") or []
    if isinstance(tags, str):
        tags = tags.split(",")
    return {str(tag).strip() for tag in tags} if isinstance(tags, list) else set()


def has_pipe(command: str) -> bool:
    """Whether a shell command pipes one command into another: a `|` outside quotes and
    comments that is not part of `||`."""
    quote = ""
    index = 0
    while index < len(command):
        char = command[index]
        if quote == "'":
            quote = "" if char == "'" else quote
        elif char == "\\":
            index += 1  # the next character is taken literally
        elif quote == '"':
            quote = "" if char == '"' else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or command[index - 1].isspace()):
            newline = command.find("\n", index)
            index = len(command) if newline < 0 else newline
        elif char == "|":
            if command[index + 1 : index + 2] != "|":
                return True
            index += 1
        index += 1
    return False
