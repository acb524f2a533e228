"""Deploy: roll an environment's fleet onto the version its channel points at, via Terraform.

Terraform owns the fleet's instances; the environment's front door (HAProxy on 127.0.0.1) owns
the address users hit. A rollout (see rollout.py) creates new instances, lets them take traffic
only once they pass the health gate, and destroys old ones only after they have left the front
door and finished their requests; a failed gate rolls the rollout back. `scale` changes the
number of instances, `heal` replaces the ones that died or stopped answering, `finish` ends a
blue/green rollout's kept old fleet. Nothing is ever changed inside a running VM.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline import locks, reaper
from pipeline.config import MAX_INSTANCES, Config, EnvironmentConfig
from pipeline.errors import DeployFailed, Interrupted, RolledBack, UsageError
from pipeline.log import TIMES_VARIABLE, context
from pipeline.registry import ImageVersion, Registry
from pipeline.runs import Run
from pipeline.semver import sort_key
from pipeline.stages import rollout
from pipeline.stages.fleet import (
    Fleet,
    GateFailed,
    answer,
    environment_vms,
    existing_front_door,
    host_vars,
    plan_logs,
    reap_orphans,
    terraform_for,
    vm_running,
    workdir,
)
from pipeline.targets.local import qemu
from pipeline.tools.terraform import Terraform

__all__ = ["reap_orphans", "terraform_for", "workdir"]


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
    _check_image_files(version)
    with _opened(config, environment, run, "deploy", version.version) as (fleet, record, log):
        size = record.size()
        strategy = environment.rollout.strategy
        entry = record.start(
            run.build_id, strategy, version.version, [m.version for m in fleet.members.values()]
        )
        moves = rollout.Moves()
        try:
            if strategy == "blue_green":
                kept = rollout.blue_green(fleet, version, size, moves)
                if kept:
                    record.keep(kept, environment.rollout.keep_old)
                    record.save()
                    _finish_later(config, environment, record)
                    log.info(
                        "old fleet kept out of the front door for %d s"
                        " (`pipeline finish %s` ends it)",
                        environment.rollout.keep_old,
                        environment.name,
                    )
            else:
                rollout.rolling(fleet, version, size, moves)
        except GateFailed as exc:
            undone = rollout.roll_back(fleet, moves, str(exc))
            record.finish(entry, "rolled back", str(exc))
            run.event("deploy.rolled_back", reason=str(exc))
            raise undone from exc
        except (KeyboardInterrupt, Interrupted) as exc:
            _serve_what_runs(fleet)
            record.finish(entry, "interrupted", str(exc) or "interrupted")
            raise
        except BaseException as exc:
            record.finish(entry, "failed", str(exc) or type(exc).__name__)
            raise
        finally:
            # A plan made ahead for a step that did not come is waited for, never left running.
            fleet.settle()
        if not moves.created and not fleet.destroyed:
            log.info("fleet already on %s: %d instance(s), nothing to change", version.label, size)
        record.finish(entry, "done")
        instances = listing(config, environment, fleet.tf)
        unhealthy = [item["name"] for item in instances if item["health"] != "healthy"]
        if unhealthy and not record.kept:
            raise DeployFailed(f"instances not healthy after deploy: {', '.join(unhealthy)}")
        run.event("deploy.done", version=version.version, instances=[i["name"] for i in instances])
        return {
            "env": environment.name,
            "version": version.version,
            "strategy": strategy,
            "changed": bool(moves.created or fleet.destroyed),
            "waves": moves.waves,
            "created": fleet.created,
            "destroyed": fleet.destroyed,
            "front_door": fleet.door.url,
            "kept": (record.kept or {}).get("names", []),
            "instances": instances,
        }


def scale(
    config: Config, environment: EnvironmentConfig, count: int, *, run: Run, registry: Registry
) -> dict[str, Any]:
    """Change the number of instances; new ones run the version the fleet runs."""
    check_count(count)
    with _opened(config, environment, run, "scale") as (fleet, record, log):
        dead = [m for n, m in fleet.members.items() if not fleet.running(n)]
        for member in dead:
            log.warning(
                "drift: %s (%s): its VM is not running; removing it", member.name, member.version
            )
        if dead:
            fleet.retire(m.name for m in dead)
        version = _running_version(fleet, registry, environment)
        before = len(fleet.members)
        if count > before and version is None:
            raise UsageError(
                f"environment {environment.name} runs no version yet: deploy it first"
                f" (`pipeline deploy {environment.name}`)"
            )
        names = sorted(fleet.members, key=rollout._index_order)
        healthy = [n for n in names if fleet.healthy(n)]
        fleet.serve(healthy)
        if count > before:
            assert version is not None
            new = fleet.new_members(version, count - before)
            log.info("adding %d instance(s) on %s", len(new), version.version)
            fleet.converge({**fleet.members, **{m.name: m for m in new}})
            try:
                fleet.gate([m.name for m in new])
            except GateFailed as exc:
                added = {m.name for m in new}
                fleet.converge({n: m for n, m in fleet.members.items() if n not in added})
                raise RolledBack(f"rolled back: {exc}") from exc
            fleet.serve(healthy + [m.name for m in new])
        elif count < before:
            # Broken ones go first, then the newest indices.
            going = [n for n in names if n not in healthy][: before - count]
            going += [n for n in reversed(healthy)][: before - count - len(going)]
            log.info("removing %s", ", ".join(going))
            fleet.retire(going)
        else:
            log.info("already %d instance(s)", count)
        # Recorded once it holds: a scale-out that was rolled back leaves the size as it was.
        record.scale(count)
        record.save()
        return _summary(config, environment, fleet, registry)


def check_count(count: int) -> None:
    """A count `pipeline scale` accepts (checked before anything is locked or read)."""
    if not 0 <= count <= MAX_INSTANCES:
        raise UsageError(f"instance count {count}: it must be between 0 and {MAX_INSTANCES}")


def heal(
    config: Config, environment: EnvironmentConfig, *, run: Run, registry: Registry
) -> dict[str, Any]:
    """Replace instances that died or stopped answering with new ones on the same version."""
    with _opened(config, environment, run, "heal") as (fleet, _record, log):
        if not fleet.members:
            log.info(
                "no instances: nothing to heal (`pipeline deploy %s` makes the fleet)",
                environment.name,
            )
            return {**_summary(config, environment, fleet, registry), "replaced": []}
        dead = [m for n, m in fleet.members.items() if not fleet.running(n)]
        for member in dead:
            log.warning("drift: %s (%s): its VM is not running", member.name, member.version)
        failing = [m for n, m in fleet.members.items() if m not in dead and not fleet.healthy(n)]
        healthy = [n for n in fleet.members if fleet.healthy(n)]
        fleet.serve(healthy)
        versions = {}
        for member in dead + failing:
            version = registry.find(environment.image, member.version)
            if version is None or version.build_id != member.build_id:
                raise DeployFailed(
                    f"cannot heal {member.name}: its version {member.version} is no longer in the"
                    f" registry; deploy a version instead (`pipeline deploy {environment.name}`)"
                )
            versions[member.name] = version
        replaced = []
        if dead:
            # Terraform sees them gone (drift) and creates them again, same name, same version.
            fleet.converge(dict(fleet.members))
            fleet.gate([m.name for m in dead])
            healthy += [m.name for m in dead]
            fleet.serve(healthy)
            replaced += [{"old": m.name, "new": m.name, "version": m.version} for m in dead]
        for member in failing:
            # A running VM that fails its check is replaced by a new one before it goes.
            log.warning("drift: %s (%s) fails its health check", member.name, member.version)
            [new] = fleet.new_members(versions[member.name], 1)
            fleet.converge({**fleet.members, new.name: new})
            fleet.gate([new.name])
            healthy.append(new.name)
            fleet.serve(healthy)
            replaced.append({"old": member.name, "new": new.name, "version": member.version})
        if failing:
            fleet.retire(m.name for m in failing)
        if not dead and not failing:
            log.info("all %d instance(s) healthy, nothing to heal", len(fleet.members))
        return {**_summary(config, environment, fleet, registry), "replaced": replaced}


def finish(
    config: Config,
    environment: EnvironmentConfig,
    *,
    run: Run,
    registry: Registry,
    when_due: str | None = None,
) -> dict[str, Any]:
    """End a blue/green rollout now: destroy the old fleet it kept.

    `when_due`: only the fleet kept until then (a background finisher's); if another command
    finished it, or a later rollout keeps another fleet, nothing is done.
    """
    kept_record = rollout.Record(config, environment).kept or {}
    if when_due is not None and kept_record.get("until") != when_due:
        log = context(environment.name, "finish")
        log.info("the old fleet kept until %s is gone already, nothing to finish", when_due)
        return {"env": environment.name, "finished": [], "note": "nothing kept until then any more"}
    kept = list(kept_record.get("names", []))
    with _opened(config, environment, run, "finish") as (fleet, _record, log):
        if not kept:
            log.info("no old fleet kept, nothing to finish")
        return {**_summary(config, environment, fleet, registry), "finished": kept}


def plan(
    config: Config,
    environment: EnvironmentConfig,
    *,
    registry: Registry,
    target: ImageVersion | None,
    future: bool,
) -> dict[str, Any]:
    """Which instances Terraform would create and destroy to put the fleet on `target`.

    Terraform plans in a copy of the environment's folder (configuration and state), so the
    real one is not touched. `future`: the target is not baked yet, so its instances are named
    with the build id `next` and planned with the files of the version before it.
    """
    log = context(environment.name, "plan")
    record = rollout.Record(config, environment)
    size = record.size()
    shutil.rmtree(plan_logs(config, environment), ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix="pipeline-plan-") as tmp:
        fleet = Fleet(config, environment, run=None, log=log, terraform_dir=Path(tmp))
        real = workdir(config, environment)
        for name in ("terraform.tfstate", "moved.tf"):
            if (real / name).is_file():
                shutil.copy2(real / name, Path(tmp) / name)
        (Path(tmp) / "main.tf").write_text(fleet.configuration(), encoding="utf-8")
        fleet.refresh()
        rollout_config = environment.rollout
        waves = 0
        if target is None:
            members: dict[str, Any] = {}
            note = (
                f"no version of {environment.image} to plan with yet: Terraform cannot plan"
                f" instances of an image not baked; the first deploy creates {size}"
            )
        else:
            keep, _dead, old = rollout.sort_members(fleet, target, size)
            new = fleet.new_members(target, size - len(keep))
            members = {n: fleet.members[n] for n in keep} | {m.name: m for m in new}
            note = ""
            if new and rollout_config.strategy == "blue_green":
                waves = 1
            elif new:
                surge, unavailable = rollout_config.surge(size), rollout_config.unavailable(size)
                waves = len(rollout.waves(len(new), len(old), surge, unavailable))
        with fleet.tf.serving():
            terraform_plan = fleet.tf.plan(fleet.variables(members))
    changes = [
        {"action": c.action, "name": c.name}
        for c in terraform_plan.changes
        if c.type == "pipeline_instance" and c.action != "no-op"
    ]
    drift = [
        c.name
        for c in terraform_plan.drift
        if c.type == "pipeline_instance" and (c.action == "delete" or not c.after)
    ]
    return {
        "env": environment.name,
        "size": size,
        "strategy": rollout_config.strategy,
        "waves": waves,
        "target": target.version if target is not None else None,
        "future": future,
        "note": note,
        "changes": changes,
        "drift": drift,
    }


def destroy(
    config: Config, environment: EnvironmentConfig, *, run: Run, registry: Registry
) -> list[str]:
    """Destroy every instance of the environment through Terraform, and its front door."""
    log = context(environment.name, "destroy")
    tf = terraform_for(config, environment, run.dir / "logs")
    names = [str(item.get("name")) for item in tf.state_instances()]
    door = existing_front_door(config, environment)
    if door is not None and door.running():
        door.stop()
        log.info("stopped the front door %s", door.url)
    if names:
        with tf.serving():
            tf.destroy(
                {
                    "instances": {},
                    "vm_root": str(config.state_dir / "vms"),
                    "state_dir": str(config.state_dir),
                }
            )
        log.info("destroyed %s", ", ".join(names))
    for name in reap_orphans(config, environment, tf):
        log.warning("stopped %s: a VM of this environment that Terraform did not know", name)
        names.append(name)
    if not names:
        log.info("no instances to destroy")
    # Nothing of the fleet is left: neither a kept old fleet nor a size set by `scale`.
    record = rollout.Record(config, environment)
    if record.kept or "scale" in record.data:
        record.forget_kept()
        record.forget_scale()
        record.save()
    run.event("destroy.done", instances=names)
    return names


def listing(config: Config, environment: EnvironmentConfig, tf: Terraform) -> list[dict[str, Any]]:
    """Every instance Terraform knows, with whether its VM runs and gives the expected answer."""
    vm_root = config.state_dir / "vms"
    door = existing_front_door(config, environment)
    served = door.servers() if door is not None and door.running() else {}
    found = []
    for item in sorted(tf.state_instances(), key=lambda i: str(i.get("name"))):
        name = str(item.get("name"))
        running = vm_running(vm_root, name)
        url = str(item.get("url") or "")
        health = "down"
        if running:
            got = answer(url, environment.health.path)
            health = "healthy" if got == environment.health.status else "unhealthy"
        found.append(
            {
                "name": name,
                "version": item.get("image_version"),
                "url": url,
                "ssh_port": item.get("ssh_port"),
                "http_port": item.get("http_port"),
                "running": running,
                "health": health,
                "front_door": served.get(name, "out"),
                "deposed": item.get("deposed"),
            }
        )
    return found


def inventory(config: Config, environment: EnvironmentConfig) -> dict[str, Any]:
    """The running instances as an Ansible inventory (the `--list` JSON of a dynamic inventory)."""
    tf = terraform_for(config, environment, config.state_dir / "logs" / "inventory")
    hostvars = {
        str(item.get("name")): host_vars(config, item)
        for item in tf.state_instances()
        if vm_running(config.state_dir / "vms", str(item.get("name")))
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
    instances = listing(config, environment, tf)
    record = rollout.Record(config, environment)
    kept = set((record.kept or {}).get("names", []))
    # While a run changes the environment, VMs booting or going are its work, not drift.
    busy = locks.holder(config.state_dir, f"env-{environment.name}")
    drift = []
    warnings = []
    for item in instances:
        if busy and (not item["running"] or item["health"] != "healthy"):
            pass
        elif not item["running"]:
            drift.append(f"{item['name']} is in Terraform's state but its VM is not running")
        elif item["health"] != "healthy":
            drift.append(f"{item['name']} runs but fails its health check")
        elif (
            channel is not None and item["version"] != channel.version and item["name"] not in kept
        ):
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
    size = record.size()
    serving = [i for i in instances if i["name"] not in kept]
    if len(serving) != size and not busy:
        wanted = f"pipeline.yml asks for {size}"
        if size != environment.instances:
            wanted = f"scaled to {size} (pipeline.yml says {environment.instances})"
        drift.append(f"{len(serving)} instance(s), {wanted}")
    known = {item["name"] for item in instances}
    for vm in environment_vms(config, environment):
        if vm.name not in known and not busy:
            drift.append(f"{vm.name} runs but Terraform does not know it")
    door = existing_front_door(config, environment)
    door_running = door is not None and door.running()
    if instances and not door_running:
        where = door.url if door is not None else "(never started)"
        drift.append(f"the front door {where} is not running")
    return {
        "env": environment.name,
        "image": environment.image,
        "channel": environment.channel,
        "channel_version": channel.version if channel else None,
        "size": size,
        "configured_size": environment.instances,
        "busy": busy,
        "front_door": door.url if door is not None and door_running else None,
        "instances": instances,
        "kept": record.kept,
        "last_rollout": record.last_seen(busy=bool(busy)),
        "drift": drift,
        "warnings": warnings,
    }


@contextlib.contextmanager
def _opened(
    config: Config, environment: EnvironmentConfig, run: Run, action: str, label: str = ""
) -> Iterator[tuple[Fleet, rollout.Record, Any]]:
    """Every change of a fleet: its configuration written and checked, its record read, an old
    fleet a blue/green rollout kept destroyed first, and one provider serving every Terraform
    command until the change is done."""
    log = context(f"{environment.name} {label}".strip(), action)
    fleet = Fleet(config, environment, run=run, log=log)
    with fleet.tf.serving():
        fleet.render()
        record = rollout.Record(config, environment)
        dead = record.end_dead()
        if dead:
            log.warning("the last rollout, to %s, did not finish: %s", dead["to"], rollout.DIED)
        _finish_kept(fleet, record, log, action)
        yield fleet, record, log


def _finish_kept(fleet: Fleet, record: rollout.Record, log: Any, action: str) -> None:
    """Destroy the old fleet a blue/green rollout kept: its time is up, or a change comes."""
    kept = record.kept
    if not kept:
        return
    if action != "finish" and not record.kept_due():
        log.info(
            "the old fleet kept until %s is destroyed now, before this %s", kept["until"], action
        )
    names = [n for n in kept.get("names", []) if n in fleet.members]
    if names:
        fleet.retire(names)
        log.info("destroyed the kept old fleet: %s", ", ".join(names))
    record.forget_kept()
    record.save()


def _finish_later(config: Config, environment: EnvironmentConfig, record: rollout.Record) -> None:
    """Start a process of its own that finishes the kept old fleet when its time is up.

    It outlives this command (its own session, its output in the environment's folder); if it
    finds the kept fleet gone or replaced by then (`pipeline finish`, another rollout), it
    does nothing. If the machine stops before, the next command on the environment finishes.
    """
    kept = record.kept
    assert kept is not None
    log_path = record.path.with_name("finish-later.log")
    with open(log_path, "ab") as output:
        subprocess.Popen(
            [
                sys.executable, "-m", "pipeline", "-c", str(config.path),
                "finish", environment.name, "--when-due", str(kept["until"]),
            ],
            stdin=subprocess.DEVNULL, stdout=output, stderr=output,
            start_new_session=True, cwd=config.root,
            # Unmarked: it outlives this run on purpose, and must not be taken for its leftover.
            env={**reaper.untagged_environ(), TIMES_VARIABLE: "1"},
        )  # fmt: skip


def _serve_what_runs(fleet: Fleet) -> None:
    """After an interruption: the front door serves the members that still run and either
    served already or passed their health gate (one stopped in its gate never joins)."""
    try:
        serving = fleet.serving()
        fleet.refresh()
        fleet.serve(
            [n for n in fleet.members if fleet.running(n) and (n in serving or n in fleet.passed)]
        )
    except Exception as exc:  # the interruption is what the user must hear about
        fleet.log.warning("front door not updated after the interruption: %s", exc)


def _running_version(
    fleet: Fleet, registry: Registry, environment: EnvironmentConfig
) -> ImageVersion | None:
    """The version the fleet runs (the newest of its members'), else the channel's."""
    versions = [registry.find(environment.image, m.version) for m in fleet.members.values()]
    found = [v for v in versions if v is not None]
    if found:
        return max(found, key=lambda v: sort_key(v.version))
    return registry.channel(environment.image, environment.channel)


def _summary(
    config: Config, environment: EnvironmentConfig, fleet: Fleet, registry: Registry
) -> dict[str, Any]:
    return {
        "env": environment.name,
        "created": fleet.created,
        "destroyed": fleet.destroyed,
        "front_door": _front_door_url(config, environment),
        "instances": listing(config, environment, fleet.tf),
    }


def _front_door_url(config: Config, environment: EnvironmentConfig) -> str | None:
    """The environment's address, if it has a front door; asking never makes one."""
    door = existing_front_door(config, environment)
    return door.url if door is not None else None


def _check_image_files(version: ImageVersion) -> None:
    """The files Terraform will be given must exist: say so before it does, in our words."""
    folder = Path(version.path)
    boot = version.manifest.get("boot", {})
    paths = [
        folder / "disk.qcow2",
        folder / boot.get("kernel", "vmlinuz"),
        folder / boot.get("initrd", "initrd.img"),
    ]
    missing = [path.name for path in paths if not path.is_file()]
    if missing:
        message = (
            f"{version.label} cannot be deployed: {', '.join(missing)} missing from {folder}"
            f" (bake a new version with `pipeline run {version.image} --env ENV`)"
        )
        raise DeployFailed(message)
    problem = qemu.disk_problem(paths[0])
    if problem:
        message = (
            f"{version.label} cannot be deployed: {problem}"
            f" (bake a new version with `pipeline run {version.image} --env ENV`)"
        )
        raise DeployFailed(message)
