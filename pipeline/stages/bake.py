"""Bake: render the Packer template, run Packer with the image's roles, register the result.

A bake whose inputs have the same fingerprint as an existing version bakes nothing. A bake takes
its version number when it starts (recorded as `building`) and ends with the version `built`, or
`failed` with the reason; either way the number is never handed out again. Packer writes into a
temporary folder that is renamed into place only once the image and its manifest are complete,
so a failed bake leaves no image files.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline import fingerprint as fp
from pipeline import reaper, render, secret, shell_pipes
from pipeline.config import BUMPS, Config, ImageConfig
from pipeline.errors import ConfigError, Interrupted, ToolError, UsageError
from pipeline.log import context
from pipeline.registry import ImageVersion, Registry
from pipeline.runs import Run, write_json_atomic
from pipeline.semver import sort_key
from pipeline.targets.local import accel, baseimage, qemu
from pipeline.tools import process
from pipeline.tools.ansible_output import current_task, failed_tasks, output_of
from pipeline.tools.versions import binary_version, python_package_version

# Bumped when the way this module turns a recipe into an image changes.
BAKE_RECIPE = "1"
PACKER_TIMEOUT = 3600
# What Packer prints when a provisioner's `timeout` fires (Packer 1.6.6, as an error line).
PROVISIONER_TIMED_OUT = "Cancelling provisioner after a timeout"


@dataclass(frozen=True)
class Inputs:
    """Everything a bake of one image depends on, and its fingerprint."""

    image: ImageConfig
    base: baseimage.BaseImage
    base_version: ImageVersion
    parts: dict[str, str]
    roles: dict[str, str]
    tools: dict[str, str]
    # The secret variables' values (for Ansible only) and their keyed hashes (for the record).
    secrets: dict[str, str] = field(default_factory=dict, repr=False)
    secret_digests: dict[str, str] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        return fp.combine(self.parts)[:16]


@dataclass(frozen=True)
class BakeResult:
    version: ImageVersion
    baked: bool


def applied_roles(config: Config, image: ImageConfig) -> list[str]:
    """The roles a bake applies: those the image lists (a missing one is named), then those they
    pull in (a meta dependency, a role included by name), whose changes make a new version as
    well. The same walk refuses a shell task that would hide its failure behind a pipe."""
    role_dirs(config, image)
    return shell_pipes.check(config.roles_dir, image.roles)


def role_hashes(config: Config, names: Iterable[str]) -> dict[str, str]:
    """The hash of each of these roles' folders."""
    return {name: fp.hash_tree(config.roles_dir / name) for name in names}


def role_dirs(config: Config, image: ImageConfig) -> dict[str, Path]:
    """The folder of each role the image lists; a missing role is an error naming it."""
    found = {}
    for index, role in enumerate(image.roles):
        folder = config.roles_dir / role
        if not (folder / "tasks" / "main.yml").is_file():
            key = f"images.{image.name}.roles[{index}]"
            message = f"role {role!r} does not exist (no {folder}/tasks/main.yml)"
            raise ConfigError(str(config.path), key, message)
        found[role] = folder
    return found


def template_path(config: Config, image: ImageConfig) -> Path:
    """The image's Packer template; a missing one is an error naming the key that names it."""
    template = config.templates_dir / image.template
    if not template.is_file():
        key = f"images.{image.name}.template"
        raise ConfigError(str(config.path), key, f"template {template} does not exist")
    return template


def check_inputs(config: Config, image: ImageConfig) -> list[str]:
    """Find a mistake in an image's roles or template before anything is written or built.

    The template is rendered with stand-ins for what only a bake knows (the base's files, the
    accelerator, the run's folder), so that a name it uses and a bake does not give fails now,
    not after the base image is built and a version number is spent. A shell task that would
    hide its failure behind a pipe is refused here too (see pipeline.shell_pipes). Returns the
    roles a bake applies (applied_roles).
    """
    roles = applied_roles(config, image)
    template_path(config, image)
    secret_values(config, image)
    stand_in = config.state_dir / "check"
    base = {
        "disk": stand_in / "disk.qcow2",
        "sha256": "0" * 64,
        "kernel": stand_in / "vmlinuz",
        "initrd": stand_in / "initrd.img",
        "append": qemu.kernel_args(baseimage.APPEND),
    }
    context_vars = packer_context(
        config,
        image,
        image.version,
        build_id="check",
        base=base,
        accel={"packer": "tcg", "cpu": accel.TCG_CPU},
        ssh_key=config.state_dir / "keys" / "id_ed25519",
        run_dir=stand_in,
        work=stand_in,
        vars_file=stand_in / "bake-vars.json",
    )
    render.render(config.templates_dir, image.template, context_vars)
    return roles


# Where ansible-playbook places the first error: 2.19 says "Origin: PATH:LINE:COLUMN", earlier
# versions "The error appears to be in 'PATH': line LINE".
_ERROR_ORIGIN = (
    re.compile(r"^Origin: (?P<path>/.+?):(?P<line>\d+)(?::\d+)?$", re.MULTILINE),
    re.compile(r"The error appears to be in '(?P<path>[^']+)': line (?P<line>\d+)"),
)
_ERROR_LINE = re.compile(r"^(?:\[ERROR\]: |ERROR! )(?P<message>.+)$", re.MULTILINE)
SYNTAX_CHECK_TIMEOUT = 300


def syntax_check(config: Config, image: ImageConfig) -> None:
    """Parse the play a bake runs, as ansible-playbook does, without running it.

    A task naming a module that does not exist, or a role file whose YAML does not parse, is
    found here in about a second, before a version number is spent and before Packer boots a
    VM to find it. Takes the roles' variables, secret ones as stand-ins: parsing needs names,
    never a secret's value. Raises ConfigError naming the file and line Ansible names.
    """
    variables = {
        **role_vars(image, image.version, "check"),
        **{name: "(secret)" for name in image.secret_vars},
    }
    with tempfile.TemporaryDirectory(prefix="pipeline-syntax-") as folder:
        playbook = Path(folder) / "bake.yml"
        play = _bake_playbook(image, Path(folder) / "packages.tsv")
        playbook.write_text(yaml.safe_dump(play, sort_keys=False), encoding="utf-8")
        vars_file = Path(folder) / "vars.json"
        vars_file.write_text(json.dumps(variables), encoding="utf-8")
        done = process.run(
            [
                str(Path(sys.executable).with_name("ansible-playbook")), "--syntax-check",
                "-i", "localhost,", "--extra-vars", f"@{vars_file}", str(playbook),
            ],
            what="ansible-playbook --syntax-check",
            cwd=Path(folder),
            env=_ansible_env(config),
            timeout=SYNTAX_CHECK_TIMEOUT,
            check=False,
        )  # fmt: skip
    if done.returncode != 0:
        raise _syntax_error(config, image, done.output)


def _syntax_error(config: Config, image: ImageConfig, output: str) -> ConfigError:
    found = _ERROR_LINE.search(output)
    last = (output.strip().splitlines() or ["it printed nothing"])[-1]
    message = found.group("message").strip() if found else last
    problem = f"the roles do not parse (ansible-playbook --syntax-check): {message}"
    for pattern in _ERROR_ORIGIN:
        origin = pattern.search(output)
        if origin is not None:
            return ConfigError(f"{origin.group('path')}:{origin.group('line')}", None, problem)
    return ConfigError(str(config.path), f"images.{image.name}.roles", problem)


def secret_values(config: Config, image: ImageConfig) -> dict[str, str]:
    """The values of the image's secret variables, each now masked in everything written.

    Also reads the vault password and decrypts what Ansible Vault encrypts in the image's roles,
    so that those values are masked too and a wrong password is found before a VM boots.
    """
    password = None
    if config.vault_password_file is not None:
        password = secret.read_vault_password(config.vault_password_file, config.path)
    secret.vault_values(role_dirs(config, image).values(), password, config.path)
    return {name: var.resolve(config.path) for name, var in image.secret_vars.items()}


def gather_inputs(config: Config, image: ImageConfig, *, run: Run, registry: Registry) -> Inputs:
    """Collect and hash every input; builds and registers the base image if it is new."""
    roles = role_hashes(config, check_inputs(config, image))
    template = template_path(config, image)

    if image.parent is not None:
        base_version = parent_version(registry, image)
        base = baseimage.baked(
            Path(base_version.path), base_version.manifest, base_version.fingerprint
        )
        base_part = str(base_version.manifest.get("disk_sha256") or base_version.fingerprint)
    else:
        spec = baseimage.BaseSpec(suite=image.base.suite, packages=image.base.packages)
        base = baseimage.ensure_base_image(config.state_dir, spec, log_dir=run.dir / "logs")
        base_version = register_base(registry, image.base.name, base, build_id=run.build_id)
        base_part = base.fingerprint
    values = secret_values(config, image)
    key = secret.digest_key(config.state_dir, create=True) if values else b""
    digests = secret.digests(values, key)
    parts, tools = _parts(config, image, roles, template, base_part, digests)
    return Inputs(
        image=image,
        base=base,
        base_version=base_version,
        parts=parts,
        roles=roles,
        tools=tools,
        secrets=values,
        secret_digests=digests,
    )


def _parts(
    config: Config,
    image: ImageConfig,
    roles: dict[str, str],
    template: Path,
    base_part: str,
    secret_digests: dict[str, str],
) -> tuple[dict[str, str], dict[str, str]]:
    tools = {
        "packer": binary_version(config.state_dir, "packer", ("version",)),
        "ansible-core": python_package_version("ansible-core"),
    }
    parts = {
        "recipe": BAKE_RECIPE,
        "declared_version": image.version,
        "role_order": fp.hash_value(list(image.roles)),
        "roles": fp.hash_value(roles),
        "vars": fp.hash_value(image.vars),
        "template": fp.hash_bytes(template.read_bytes()),
        "service_port": str(image.service_port),
        "base": base_part,
        "tools": fp.hash_value(tools),
    }
    if secret_digests:
        # Only when there are secrets: the fingerprints of images without any stay as they were.
        parts["secret_vars"] = fp.hash_value(secret_digests)
    return parts, tools


def preview(config: Config, image_name: str, *, registry: Registry) -> dict[str, Any]:
    """Whether `bake` would make a new version, and why: which inputs changed. Changes nothing.

    `refused` says why `bake` would refuse instead (the inputs are a revoked version's).

    A base image that is not built yet is not built here: its new version is announced.
    """
    image = config.image(image_name)
    roles = role_hashes(config, check_inputs(config, image))
    # Roles a bake would fail to parse are named now, changed or not: parsing takes a second.
    syntax_check(config, image)
    template = template_path(config, image)
    notes: list[str] = []
    if image.parent is not None:
        base_version = parent_version(registry, image)
        base_part = str(base_version.manifest.get("disk_sha256") or base_version.fingerprint)
        base_label = base_version.label
    else:
        spec = baseimage.BaseSpec(suite=image.base.suite, packages=image.base.packages)
        base_fp = baseimage.planned_fingerprint(config.state_dir, spec)
        newest_base = registry.newest_parent(image.base.name)
        if base_fp is not None and newest_base is not None and newest_base.fingerprint == base_fp:
            base_label = newest_base.label
        else:
            base_label = f"a new version of base {image.base.name}"
            notes.append(f"base {image.base.name} would get a new version (built from packages)")
        base_part = base_fp or "new"
    values = secret_values(config, image)
    digests = secret.digests(values, secret.digest_key(config.state_dir, create=False))
    parts, _tools = _parts(config, image, roles, template, base_part, digests)
    fingerprint = fp.combine(parts)[:16]
    existing = registry.by_fingerprint(image.name, fingerprint)
    if existing is not None and (Path(existing.path) / "disk.qcow2").is_file():
        return {
            "image": image.name,
            "rebuild": False,
            "fingerprint": fingerprint,
            "version": existing.version,
            "state": existing.state,
            "reasons": [f"unchanged: these inputs are version {existing.version}"],
            "refused": None,
        }
    previous = previous_inputs(registry, image.name)
    bump = choose_bump(image, previous, parts)
    reasons = notes + _changes(previous, parts, roles, image, digests)
    for building in registry.abandoned_builds(image.name):
        reasons.append(f"version {building.version} is being baked now (or its bake died)")
    if existing is not None:
        reasons.insert(0, f"version {existing.version} has these inputs, its image file is gone")
    return {
        "image": image.name,
        "rebuild": True,
        "fingerprint": fingerprint,
        "version": registry.next_number(image.name, image.version, bump),
        "bump": bump,
        "on": base_label,
        "reasons": reasons,
        "refused": refusal_to_bake(registry, image.name, fingerprint),
    }


def previous_inputs(registry: Registry, image: str) -> ImageVersion | None:
    """The newest version whose inputs are recorded: what a new bake is compared with.

    A version still `building`, or one whose bake failed or was interrupted before its inputs
    were recorded, says nothing about them; taking it would call every input changed.
    """
    for version in sorted(
        registry.versions(image), key=lambda v: sort_key(v.version), reverse=True
    ):
        if version.state == "building":
            continue
        full = registry.get(image, version.version)
        if full.manifest.get("inputs"):
            return full
    return None


def _changes(
    previous: ImageVersion | None,
    parts: dict[str, str],
    roles: dict[str, str],
    image: ImageConfig,
    secret_digests: dict[str, str],
) -> list[str]:
    """In words: which inputs differ from the newest version's."""
    if previous is None:
        return ["no version yet"]
    before = previous.manifest.get("inputs", {})
    reasons = []
    if before.get("roles") != parts["roles"] or before.get("role_order") != parts["role_order"]:
        old_roles = previous.manifest.get("roles", {})
        changed = sorted(
            name for name in set(roles) | set(old_roles) if roles.get(name) != old_roles.get(name)
        )
        what = ", ".join(changed) if changed else "their order"
        reasons.append(f"roles changed: {what}")
    if (
        before.get("vars") != parts["vars"]
        or before.get("secret_vars") != parts.get("secret_vars")
        or before.get("service_port") != parts["service_port"]
    ):
        old_vars = {
            k: v
            for k, v in previous.manifest.get("vars", {}).items()
            if not k.startswith("base_") and k != "webservice_port"
        }
        keys = sorted(
            k for k in set(image.vars) | set(old_vars) if image.vars.get(k) != old_vars.get(k)
        )
        old_secrets = previous.manifest.get("secret_vars", {})
        keys += sorted(
            name
            for name in set(secret_digests) | set(old_secrets)
            if secret_digests.get(name) != old_secrets.get(name)
        )
        reasons.append("variables changed" + (f": {', '.join(keys)}" if keys else ""))
    if before.get("template") != parts["template"]:
        reasons.append(f"template changed: {image.template}")
    if before.get("base") != parts["base"]:
        reasons.append(f"base changed (built on {previous.parent or 'another base'} before)")
    if before.get("tools") != parts["tools"]:
        tools = previous.manifest.get("tools", {})
        reasons.append(f"tools changed (were {', '.join(f'{k} {v}' for k, v in tools.items())})")
    if before.get("declared_version") != parts["declared_version"]:
        reasons.append(f"declared version changed to {image.version}")
    if before.get("recipe") != parts["recipe"]:
        reasons.append("the pipeline's bake recipe changed")
    return reasons or ["inputs differ from every recorded version"]


def parent_version(registry: Registry, image: ImageConfig) -> ImageVersion:
    """The version of its parent image an image is built on: the newest verified, unrevoked."""
    assert image.parent is not None
    found = registry.newest_parent(image.parent)
    if found is None:
        raise UsageError(
            f"{image.name} is built on image {image.parent}, which has no verified, unrevoked"
            f" version yet (run `pipeline bake {image.parent}` and `pipeline verify"
            f" {image.parent}` first)"
        )
    found = registry.get(found.image, found.version)
    disk = Path(found.path) / "disk.qcow2"
    if not disk.is_file():
        raise UsageError(
            f"{image.name} is built on {found.label}, whose image file is gone ({found.path});"
            f" bake {image.parent} again"
        )
    problem = qemu.disk_problem(disk)
    if problem:
        message = f"{image.name} is built on {found.label}, but {problem}"
        raise UsageError(f"{message}; bake {image.parent} again")
    return found


def register_base(
    registry: Registry, name: str, base: baseimage.BaseImage, *, build_id: str
) -> ImageVersion:
    """The registry's version of this base: the newest one if it has these inputs, else new."""
    newest = registry.newest_parent(name)
    if newest is not None and newest.fingerprint == base.fingerprint:
        return newest
    recorded = registry.record_base(
        name,
        fingerprint=base.fingerprint,
        build_id=f"{build_id}-{name}",
        path=str(base.dir),
        manifest=base.manifest,
    )
    if newest is None or recorded.version != newest.version:
        context(f"base {name}", "register").info(
            "base %s is now version %s (fingerprint %s)", name, recorded.version, base.fingerprint
        )
    return recorded


# Which kind of input (for `bump:` in pipeline.yml) each part of the fingerprint belongs to.
PART_KINDS = {
    "role_order": "roles",
    "roles": "roles",
    "vars": "vars",
    "secret_vars": "vars",
    "service_port": "vars",
    "template": "template",
    "base": "base",
    "tools": "tools",
    "recipe": "tools",
}


def choose_bump(image: ImageConfig, previous: ImageVersion | None, parts: dict[str, str]) -> str:
    """The bump for this bake: the largest declared for a kind of input that changed."""
    if previous is None:
        return image.bump
    before = previous.manifest.get("inputs", {})
    changed = {PART_KINDS[k] for k, v in parts.items() if k in PART_KINDS and before.get(k) != v}
    wanted = [image.bump_on.get(kind, image.bump) for kind in changed] or [image.bump]
    return max(wanted, key=BUMPS.index)


def abandon_stale_builds(config: Config, registry: Registry, image: str) -> None:
    """Mark as failed the versions whose bake died before it finished, and remove their files.

    Only called with the image's lock held, so no bake of this image is running.
    """
    for stale in registry.abandoned_builds(image):
        reason = f"its bake (build {stale.build_id}) stopped before it finished"
        registry.set_state(image, stale.version, "failed", reason)
        shutil.rmtree(config.state_dir / "images" / image / f".tmp-{stale.build_id}", True)
        # A bake killed outright could not delete the file its secrets were in.
        shutil.rmtree(config.state_dir / "private" / f"{stale.build_id}-bake", True)
        context(stale.label, "bake").warning("recorded as failed: %s", reason)


def role_vars(image: ImageConfig, version: str, build_id: str) -> dict[str, Any]:
    """The variables the roles get, at bake and again at verify, but for the secret ones."""
    return {
        "webservice_port": image.service_port,
        **image.vars,
        "base_image_name": image.name,
        "base_image_version": version,
        "base_build_id": build_id,
    }


def refusal_to_bake(registry: Registry, image_name: str, fingerprint: str) -> str | None:
    """Why inputs with this fingerprint may not be baked (they are a revoked version's), or None.

    Baking them again would only bring back what was revoked, under a new number.
    """
    twins = registry.revoked_with_fingerprint(image_name, fingerprint)
    if not twins:
        return None
    twin = twins[0]
    assert twin.revocation is not None
    return (
        f"these inputs are exactly those of {twin.label}, revoked: {twin.revocation.reason};"
        " change the roles, variables, template or base before baking again"
    )


def bake(config: Config, image_name: str, *, run: Run, registry: Registry) -> BakeResult:
    """Bake `image_name` unless a version with the same fingerprint exists."""
    image = config.image(image_name)
    log = context(image.name, "bake")
    inputs = gather_inputs(config, image, run=run, registry=registry)
    existing = registry.by_fingerprint(image.name, inputs.fingerprint)
    if existing is not None and not (Path(existing.path) / "disk.qcow2").is_file():
        log.warning(
            "version %s has these inputs but its image file is gone (%s); baking again",
            existing.version,
            existing.path,
        )
        existing = None
    if existing is not None:
        log.info(
            "unchanged: fingerprint %s is version %s (%s); nothing to bake",
            inputs.fingerprint,
            existing.version,
            existing.state,
        )
        run.event("bake.unchanged", version=existing.version, fingerprint=inputs.fingerprint)
        return BakeResult(existing, baked=False)

    refusal = refusal_to_bake(registry, image.name, inputs.fingerprint)
    if refusal is not None:
        raise UsageError(refusal)
    syntax_check(config, image)
    abandon_stale_builds(config, registry, image.name)
    previous = previous_inputs(registry, image.name)
    bump = choose_bump(image, previous, inputs.parts)
    images_dir = config.state_dir / "images" / image.name
    reserved = registry.reserve(
        image.name,
        declared=image.version,
        bump=bump,
        build_id=run.build_id,
        fingerprint=inputs.fingerprint,
        path=str(images_dir / "pending"),
        parent=(inputs.base_version.image, inputs.base_version.version),
    )
    version = reserved.version
    log = context(reserved.label, "bake")
    log.info(
        "baking build %s (fingerprint %s, on %s, %s bump)",
        run.build_id,
        inputs.fingerprint,
        inputs.base_version.label,
        bump,
    )
    run.event("bake.start", version=version, fingerprint=inputs.fingerprint, bump=bump)

    work = images_dir / f".tmp-{run.build_id}"
    final = images_dir / version
    images_dir.mkdir(parents=True, exist_ok=True)
    try:
        manifest = _packer_build(config, inputs, version, run=run, work=work)
        _finish_image_folder(work, inputs.base, manifest)
        work.rename(final)
        finished = registry.finish(
            image.name, version, state="built", manifest=manifest, path=str(final)
        )
    except BaseException as exc:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)
        _record_failure(registry, reserved, exc)
        raise
    log.info("baked %s in %s", final / "disk.qcow2", _elapsed(run))
    run.event("bake.done", version=version, path=str(final))
    return BakeResult(finished, baked=True)


def _record_failure(registry: Registry, reserved: ImageVersion, exc: BaseException) -> None:
    """Mark a bake that did not finish as failed, with the first line of its reason."""
    if isinstance(exc, KeyboardInterrupt):
        reason = "interrupted"
    elif isinstance(exc, Interrupted):
        reason = str(exc)
    else:
        text = secret.redact(str(exc)).strip()
        reason = text.splitlines()[0] if text else type(exc).__name__
        if isinstance(exc, ToolError) and exc.cause:
            reason = secret.redact(exc.cause).splitlines()[0]
    try:
        registry.set_state(reserved.image, reserved.version, "failed", reason[:500])
    except Exception as record_error:  # the bake's own error is the one to report
        context(reserved.label, "bake").error("could not record the failure: %s", record_error)


def _packer_build(
    config: Config, inputs: Inputs, version: str, *, run: Run, work: Path
) -> dict[str, Any]:
    # Ansible reads the variables, secret ones included, from a file outside the run folder
    # that is deleted when Packer ends; the run folder keeps them with the secrets masked.
    with secret.private_folder(config.state_dir, f"{run.build_id}-bake") as private:
        return _packer_build_with(config, inputs, version, run=run, work=work, private=private)


def _packer_build_with(
    config: Config, inputs: Inputs, version: str, *, run: Run, work: Path, private: Path
) -> dict[str, Any]:
    image = inputs.image
    base = inputs.base
    key = baseimage.ssh_key(config.state_dir)
    packages_file = run.dir / "packages.tsv"
    qemu_accel = accel.accel_args(config.state_dir, kernel=base.kernel)
    context_vars = packer_context(
        config,
        image,
        version,
        build_id=run.build_id,
        base={
            "disk": base.disk,
            "sha256": _base_sha256(config.state_dir, base),
            "kernel": base.kernel,
            "initrd": base.initrd,
            "append": qemu.kernel_args(base.append),
        },
        accel={
            "packer": _arg_after(qemu_accel, "-accel"),
            "cpu": _arg_after(qemu_accel, "-cpu"),
        },
        ssh_key=key,
        run_dir=run.dir,
        work=work,
        vars_file=private / "bake-vars.json",
    )
    variables = {**role_vars(image, version, run.build_id), **inputs.secrets}
    secret.write_private_json(context_vars["vars_file"], variables)
    write_json_atomic(run.dir / "bake-vars.json", secret.masked(variables, inputs.secrets))
    playbook = _bake_playbook(image, packages_file)
    context_vars["playbook"].write_text(yaml.safe_dump(playbook, sort_keys=False))

    rendered = render.render(config.templates_dir, image.template, context_vars)
    template = run.dir / "image.pkr.hcl"
    template.write_text(rendered, encoding="utf-8")

    try:
        run.command(
            ["packer", "build", "-color=false", "-on-error=cleanup", str(template)],
            what="packer build",
            prefix=f"[{image.name} {version} > bake] ",
            timeout=PACKER_TIMEOUT,
            env={"PACKER_CACHE_DIR": str(config.state_dir / "cache" / "packer")},
            cwd=run.dir,
            # Packer 1.6.6 says it cancels the provisioner at its timeout, but its ansible
            # provisioner does not stop ansible-playbook, and the build goes on to succeed once
            # the play ends (seen: a role sleeping 600 s past a 30 s timeout was baked). The
            # pipeline stops the build at that line instead.
            stop_when=_provisioner_timed_out,
        )
    except ToolError as exc:
        raise _explain_packer_failure(exc, image, config.path) from None
    finally:
        _stop_leftovers(config, run, image, version)
    disk = work / "disk.qcow2"
    if not disk.is_file():
        raise ConfigError(str(template), None, f"Packer finished but wrote no {disk.name}")

    return {
        "image": image.name,
        "version": version,
        "build_id": run.build_id,
        "fingerprint": inputs.fingerprint,
        "inputs": inputs.parts,
        "roles": inputs.roles,
        "role_order": list(image.roles),
        "vars": role_vars(image, version, run.build_id),
        # Keyed hashes, not values: enough to tell that a secret changed, not what it is.
        "secret_vars": inputs.secret_digests,
        "base": {
            "name": inputs.base_version.image,
            "version": inputs.base_version.version,
            "fingerprint": base.fingerprint,
            "suite": base.manifest.get("suite") or base.manifest.get("base", {}).get("suite"),
            "path": str(base.dir),
        },
        "packages": _read_packages(packages_file),
        "tools": inputs.tools,
        "boot": {"kernel": "vmlinuz", "initrd": "initrd.img", "append": base.append},
        "disk_sha256": fp.hash_file(disk),
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def packer_context(
    config: Config,
    image: ImageConfig,
    version: str,
    *,
    build_id: str,
    base: dict[str, Any],
    accel: dict[str, str],
    ssh_key: Path,
    run_dir: Path,
    work: Path,
    vars_file: Path,
) -> dict[str, Any]:
    """The names the Packer template is rendered with: the same for a bake and its check."""
    return {
        "image": image.name,
        "version": version,
        "build_id": build_id,
        "base": base,
        "output_dir": work,
        "hostname": f"bake-{image.name}",
        "serial_log": run_dir / "logs" / "bake-serial.log",
        "accel": accel,
        "memory": 1024,
        "cpus": 2,
        "ssh_key": ssh_key,
        "ssh_timeout": "10m",
        "playbook": run_dir / "bake.yml",
        "vars_file": vars_file,
        # Packer's ansible_env_vars: a list of NAME=VALUE.
        "ansible_env": [f"{name}={value}" for name, value in _ansible_env(config).items()],
        "ansible_playbook": Path(sys.executable).with_name("ansible-playbook"),
        "provision_timeout": image.provision_timeout,
    }


def _bake_playbook(image: ImageConfig, packages_file: Path) -> list[dict[str, Any]]:
    return [
        {
            "name": f"Bake {image.name}",
            "hosts": "all",
            "gather_facts": True,
            "roles": list(image.roles),
            "post_tasks": [
                {
                    "name": "List the installed packages for the manifest",
                    "ansible.builtin.command": {
                        "argv": ["dpkg-query", "-W", "-f=${Package}\t${Version}\n"]
                    },
                    "register": "pipeline_packages",
                    "changed_when": False,
                },
                {
                    "name": "Save the package list beside the build",
                    "ansible.builtin.copy": {
                        "content": "{{ pipeline_packages.stdout }}\n",
                        "dest": str(packages_file),
                        "mode": "0644",
                    },
                    "delegate_to": "localhost",
                },
                {
                    "name": "Forget this machine's identity, so that each instance gets its own",
                    "ansible.builtin.shell": "rm -f /etc/ssh/ssh_host_*_key* && "
                    ": > /etc/machine-id && rm -f /var/lib/dbus/machine-id",
                    "changed_when": True,
                },
            ],
        }
    ]


def _ansible_env(config: Config) -> dict[str, str]:
    """The environment Ansible runs a bake's play in (and parses it in, see syntax_check)."""
    vault = config.vault_password_file
    return {
        **({"ANSIBLE_VAULT_PASSWORD_FILE": str(vault)} if vault is not None else {}),
        "ANSIBLE_ROLES_PATH": str(config.roles_dir),
        "ANSIBLE_HOST_KEY_CHECKING": "False",
        "ANSIBLE_PIPELINING": "True",
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_RETRY_FILES_ENABLED": "False",
        "ANSIBLE_SSH_ARGS": "-o ControlMaster=auto -o ControlPersist=60s"
        " -o UserKnownHostsFile=/dev/null",
    }


def _provisioner_timed_out(line: str) -> bool:
    # Packer's own lines start with ==>; Ansible's output, which a role controls, does not.
    return line.startswith("==> ") and PROVISIONER_TIMED_OUT in line


def _stop_leftovers(config: Config, run: Run, image: ImageConfig, version: str) -> None:
    """Stop what Packer left running when it ended: on a cancelled provisioner, the workers of
    ansible-playbook and their SSH, which live in sessions of their own."""
    for item in reaper.stop_run(config.state_dir, run.build_id):
        context(f"{image.name} {version}", "bake").warning(
            "stopped pid %d (%s), which Packer left behind", item.pid, item.command
        )


def _explain_packer_failure(exc: ToolError, image: ImageConfig, config_path: Path) -> ToolError:
    """Put the failing Ansible task (or Packer's own error) first: it is what the user needs."""
    lines = output_of(exc)
    if image.provision_timeout is not None and any(map(_provisioner_timed_out, lines)):
        task = current_task(lines, prefix="qemu.image: ")
        cause = (
            f"the ansible provisioner ran past provision_timeout ({image.provision_timeout} s,"
            f" images.{image.name}.provision_timeout in {config_path.name})"
        )
        cause += f" during task [{task}]" if task else ""
        return ToolError(exc.what, exc.argv, exc.returncode, exc.tail, exc.log, cause=cause)
    causes = failed_tasks(lines, prefix="qemu.image: ")
    causes += [line.strip() for line in lines if "Build 'qemu.image' errored" in line]
    if not causes:
        return exc
    cause = "\n  ".join(causes)[:4000]
    return ToolError(exc.what, exc.argv, exc.returncode, exc.tail, exc.log, cause=cause)


def _finish_image_folder(work: Path, base: baseimage.BaseImage, manifest: dict[str, Any]) -> None:
    shutil.copy2(base.kernel, work / "vmlinuz")
    shutil.copy2(base.initrd, work / "initrd.img")
    write_json_atomic(work / "manifest.json", manifest)


def _base_sha256(state_dir: Path, base: baseimage.BaseImage) -> str:
    if base.manifest.get("disk_sha256"):  # an image built on another: its manifest has it
        return str(base.manifest["disk_sha256"])
    cache = state_dir / "cache" / "base-sha256" / base.fingerprint
    if cache.is_file():
        return cache.read_text().strip()
    digest = fp.hash_file(base.disk)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(digest)
    return digest


def _read_packages(path: Path) -> dict[str, str]:
    packages = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            name, _, version = line.partition("\t")
            if name:
                packages[name] = version
    return packages


def _arg_after(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def _elapsed(run: Run) -> str:
    return f"{time.time() - run.started:.0f} s"


def load_manifest(version: ImageVersion) -> dict[str, Any]:
    return json.loads((Path(version.path) / "manifest.json").read_text())
