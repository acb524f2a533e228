"""Deploy: roll an environment's fleet onto the version its channel points at, via Terraform.

Terraform owns the fleet: each instance is a `pipeline_instance` resource whose every attribute
forces a replacement and whose name carries the build id, with create_before_destroy. So a new
version is a plan that replaces every instance, new ones first (each created only once it
answers its health check), then the old ones go; a VM that died shows up as drift and is
recreated. Nothing is ever changed inside a running VM.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from pipeline import render
from pipeline.config import Config, EnvironmentConfig
from pipeline.errors import DeployFailed, PipelineError, UsageError
from pipeline.files import write_text_atomic
from pipeline.log import context
from pipeline.registry import ImageVersion, Registry
from pipeline.runs import Run
from pipeline.targets.local import qemu
from pipeline.tools.terraform import Plan, Terraform

TEMPLATE = "terraform/{target}/main.tf.j2"
HEALTH_PROBE_SECONDS = 3.0


def workdir(config: Config, environment: EnvironmentConfig) -> Path:
    """Where the environment's Terraform configuration and state live."""
    return config.state_dir / "envs" / environment.name / "terraform"


def terraform_for(config: Config, environment: EnvironmentConfig, log_dir: Path) -> Terraform:
    return Terraform(
        binary=config.terraform,
        workdir=workdir(config, environment),
        plugin_dir=config.state_dir / "plugins",
        log_dir=log_dir,
    )


def channel_version(registry: Registry, environment: EnvironmentConfig) -> ImageVersion:
    """The version the environment must run; refuses one that is not verified or is revoked."""
    version = registry.channel(environment.image, environment.channel)
    if version is None:
        message = (
            f"channel {environment.channel!r} of image {environment.image!r} points at no"
            f" version yet (run `pipeline run {environment.image} --env {environment.name}`)"
        )
        raise UsageError(message)
    refusal = version.why_unusable()
    if refusal is not None:
        hint = ""
        if version.revoked():
            hint = (
                f"; move the channel with `pipeline promote {version.image} {environment.channel}"
                " --rollback` or promote a newer version"
            )
        raise DeployFailed(
            f"cannot deploy {environment.name}: channel {environment.channel} points at"
            f" {version.label}, and {refusal}{hint}"
        )
    return version


def deploy(
    config: Config, environment: EnvironmentConfig, *, run: Run, registry: Registry
) -> dict[str, Any]:
    """Bring the fleet to the channel's version and size; return its instances."""
    version = channel_version(registry, environment)
    log = context(f"{environment.name} {version.version}", "deploy")
    image = config.image(environment.image)

    # Render first: a broken template stops here, before Terraform or its state is touched.
    main_tf = render.render(
        config.templates_dir,
        TEMPLATE.format(target=environment.target),
        {
            "image": image.name,
            "environment": environment.name,
            "size": environment.instances,
            "memory": environment.memory,
            "cpus": 1,
            "health_path": environment.health.path,
            "health_timeout": environment.health.timeout,
            "http_guest_port": image.service_port,
        },
    )
    tf = terraform_for(config, environment, run.dir / "logs")
    tf.workdir.mkdir(parents=True, exist_ok=True)
    variables = _variables(config, version)
    _check_image_files(version, variables)

    # A configuration Terraform rejects must not stay in place: status and destroy read the
    # state through it. The previous one comes back unless the new one plans.
    main_path = tf.workdir / "main.tf"
    previous = main_path.read_text(encoding="utf-8") if main_path.is_file() else None
    _write_if_changed(main_path, main_tf)
    try:
        for name in reap_orphans(config, environment, tf):
            log.warning("stopped %s: a VM of this environment that Terraform does not know", name)
        plan = tf.plan(variables)
    except BaseException:
        if previous is not None:
            _write_if_changed(main_path, previous)
        raise
    _report_plan(plan, log)
    changes = [c for c in plan.changes if c.type == "pipeline_instance"]
    run.event("deploy.plan", changes=[(c.name, c.action) for c in changes])
    if plan.has_changes:
        try:
            tf.apply(plan)
        except BaseException:
            # An interrupted or failed apply may leave VMs Terraform never recorded.
            for name in reap_orphans(config, environment, tf):
                log.warning("stopped %s after the failed apply (not in Terraform state)", name)
            raise
    else:
        log.info(
            "fleet already on %s: %d instance(s), nothing to change",
            version.label,
            environment.instances,
        )

    instances = fleet(config, environment, tf)
    unhealthy = [item["name"] for item in instances if item["health"] != "healthy"]
    if unhealthy:
        raise DeployFailed(f"instances not healthy after deploy: {', '.join(unhealthy)}")
    run.event("deploy.done", version=version.version, instances=[i["name"] for i in instances])
    return {
        "env": environment.name,
        "version": version.version,
        "changed": plan.has_changes,
        "created": [c.name for c in changes if c.action in ("create", "replace")],
        "destroyed": [_before_name(c) for c in changes if c.action in ("delete", "replace")],
        "instances": instances,
    }


def destroy(
    config: Config, environment: EnvironmentConfig, *, run: Run, registry: Registry
) -> list[str]:
    """Destroy every instance of the environment through Terraform; return their names."""
    log = context(environment.name, "destroy")
    tf = terraform_for(config, environment, run.dir / "logs")
    names = [str(item.get("name")) for item in tf.state_instances()]
    if names:
        version = registry.channel(environment.image, environment.channel)
        variables = _variables(config, version) if version else _placeholder_variables(config)
        tf.destroy(variables)
        log.info("destroyed %s", ", ".join(names))
    for name in reap_orphans(config, environment, tf):
        log.warning("stopped %s: a VM of this environment that Terraform did not know", name)
        names.append(name)
    if not names:
        log.info("no instances to destroy")
    run.event("destroy.done", instances=names)
    return names


def fleet(config: Config, environment: EnvironmentConfig, tf: Terraform) -> list[dict[str, Any]]:
    """Every instance Terraform knows, with whether its VM runs and answers its health check."""
    vm_root = config.state_dir / "vms"
    found = []
    for item in sorted(tf.state_instances(), key=lambda i: str(i.get("name"))):
        name = str(item.get("name"))
        running = _running(vm_root, name)
        url = str(item.get("url") or "")
        health = "down"
        if running:
            health = "healthy" if _healthy(url + environment.health.path) else "unhealthy"
        found.append(
            {
                "name": name,
                "version": item.get("image_version"),
                "url": url,
                "ssh_port": item.get("ssh_port"),
                "http_port": item.get("http_port"),
                "running": running,
                "health": health,
                "deposed": item.get("deposed"),
            }
        )
    return found


def inventory(config: Config, environment: EnvironmentConfig) -> dict[str, Any]:
    """The running instances as an Ansible inventory (the `--list` JSON of a dynamic inventory)."""
    key = config.state_dir / "keys" / "id_ed25519"
    tf = terraform_for(config, environment, config.state_dir / "logs" / "inventory")
    hostvars = {}
    for item in fleet(config, environment, tf):
        if not item["running"]:
            continue
        hostvars[item["name"]] = {
            "ansible_host": "127.0.0.1",
            "ansible_port": item["ssh_port"],
            "ansible_user": "root",
            "ansible_ssh_private_key_file": str(key),
            # Every instance gets fresh host keys at first boot, and its port is reused later.
            "ansible_ssh_common_args": "-o StrictHostKeyChecking=no"
            " -o UserKnownHostsFile=/dev/null",
            "ansible_python_interpreter": "/usr/bin/python3",
            "image_version": item["version"],
            "instance_url": item["url"],
        }
    group = environment.name.replace("-", "_")
    return {
        "_meta": {"hostvars": hostvars},
        "all": {"children": [group]},
        group: {"hosts": sorted(hostvars)},
    }


def status(config: Config, environment: EnvironmentConfig, *, registry: Registry) -> dict[str, Any]:
    """What runs in the environment, and how it differs from what should."""
    channel = registry.channel(environment.image, environment.channel)
    tf = terraform_for(config, environment, config.state_dir / "logs" / "status")
    instances = fleet(config, environment, tf)
    drift = []
    warnings = []
    for item in instances:
        if not item["running"]:
            drift.append(f"{item['name']} is in Terraform's state but its VM is not running")
        elif channel is not None and item["version"] != channel.version:
            drift.append(f"{item['name']} runs {item['version']}, channel is on {channel.version}")
        item["revoked"] = None
        item["outdated"] = None
        running = registry.find(environment.image, str(item.get("version")))
        if running is None or not item["running"]:
            continue
        if running.revoked() and running.revocation is not None:
            item["revoked"] = running.revocation.reason
            warnings.append(
                f"{item['name']} runs {running.label}, revoked since"
                f" {running.revocation.effective_at}: {running.revocation.reason}"
            )
        newer_parent = registry.outdated(running)
        if newer_parent is not None:
            item["outdated"] = newer_parent.label
            warnings.append(
                f"{item['name']} runs {running.label}, outdated: built on {running.parent},"
                f" {newer_parent.label} is newer"
            )
    if len(instances) != environment.instances:
        drift.append(f"{len(instances)} instance(s), pipeline.yml asks for {environment.instances}")
    known = {item["name"] for item in instances}
    for record in _environment_vms(config, environment):
        if record.name not in known:
            drift.append(f"{record.name} runs but Terraform does not know it")
    return {
        "env": environment.name,
        "image": environment.image,
        "channel": environment.channel,
        "channel_version": channel.version if channel else None,
        "instances": instances,
        "drift": drift,
        "warnings": warnings,
    }


def reap_orphans(config: Config, environment: EnvironmentConfig, tf: Terraform) -> list[str]:
    """Stop VMs labelled with this environment that Terraform's state does not hold."""
    records = _environment_vms(config, environment)
    if not records:
        return []
    known = {str(item.get("name")) for item in tf.state_instances()}
    reaped = []
    for record in records:
        if record.name not in known:
            qemu.stop(record)
            reaped.append(record.name)
    return reaped


def _running(vm_root: Path, name: str) -> bool:
    if not (vm_root / name / "record.json").is_file():
        return False
    try:
        return qemu.is_running(qemu.load(vm_root, name))
    except (PipelineError, OSError, ValueError):
        # An unreadable record is a VM nobody can manage: report it as not running.
        return False


def _environment_vms(config: Config, environment: EnvironmentConfig) -> list[qemu.VmRecord]:
    return [
        record
        for record in qemu.list_vms(config.state_dir / "vms")
        if record.labels.get("environment") == environment.name
        and record.labels.get("image") == environment.image
    ]


def _variables(config: Config, version: ImageVersion) -> dict[str, Any]:
    folder = Path(version.path)
    boot = version.manifest.get("boot", {})
    return {
        "image_version": version.version,
        "build_id": version.build_id,
        "image_path": str(folder / "disk.qcow2"),
        "kernel": str(folder / boot.get("kernel", "vmlinuz")),
        "initrd": str(folder / boot.get("initrd", "initrd.img")),
        "append": boot.get("append", ""),
        "vm_root": str(config.state_dir / "vms"),
        "state_dir": str(config.state_dir),
    }


def _placeholder_variables(config: Config) -> dict[str, Any]:
    # Destroying needs the variables declared, not meaningful values.
    names = ("image_version", "build_id", "image_path", "kernel", "initrd", "append")
    return {name: "none" for name in names} | {
        "vm_root": str(config.state_dir / "vms"),
        "state_dir": str(config.state_dir),
    }


def _report_plan(plan: Plan, log: Any) -> None:
    for change in plan.drift:
        if change.type == "pipeline_instance" and (change.action == "delete" or not change.after):
            log.warning("drift: %s is gone; it will be created again", _before_name(change))
    for change in plan.changes:
        if change.type != "pipeline_instance":
            continue
        if change.action == "replace":
            order = "new first" if change.create_before_destroy else "old first"
            log.info("replace %s -> %s (%s)", _before_name(change), change.name, order)
        elif change.action in ("create", "delete"):
            log.info(
                "%s %s",
                change.action,
                change.name if change.action == "create" else _before_name(change),
            )


def _before_name(change: Any) -> str | None:
    before = change.before or {}
    return str(before.get("name")) if before.get("name") else change.name


def _healthy(url: str) -> bool:
    # Instances only ever listen on loopback; refuse to probe anything else.
    if not url.startswith("http://127.0.0.1:"):
        return False
    try:
        with urllib.request.urlopen(url, timeout=HEALTH_PROBE_SECONDS) as response:
            return 200 <= int(response.status) < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _check_image_files(version: ImageVersion, variables: dict[str, Any]) -> None:
    """The files Terraform will be given must exist: say so before it does, in our words."""
    folder = Path(version.path)
    paths = [Path(variables[key]) for key in ("image_path", "kernel", "initrd")]
    missing = [path.name for path in paths if not path.is_file()]
    if missing:
        message = (
            f"{version.label} cannot be deployed: {', '.join(missing)} missing from {folder}"
            f" (bake a new version with `pipeline run {version.image} --env ENV`)"
        )
        raise DeployFailed(message)


def _write_if_changed(path: Path, text: str) -> None:
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    write_text_atomic(path, text)
