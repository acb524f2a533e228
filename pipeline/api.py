"""The library's entry points: bake, verify, promote, deploy, run and status.

The CLI, tests and (later) the Ansible module and the scheduler all call these. Each opens the
project, takes the lock it needs, records a run folder and returns plain data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from pipeline import config as config_mod
from pipeline import failpoints, locks, reaper
from pipeline.config import NAME, Config
from pipeline.errors import Interrupted, PipelineError, UsageError
from pipeline.files import write_text_atomic
from pipeline.log import context
from pipeline.registry import (
    ChannelMove,
    ChannelMoved,
    ImageVersion,
    Registry,
    open_registry,
    picture,
    retention,
)
from pipeline.registry.store import USABLE, format_time, no_collection
from pipeline.runs import Run
from pipeline.semver import sort_key
from pipeline.stages import bake as bake_stage
from pipeline.stages import verify as verify_stage


class Stage(Enum):
    """The stages of a run, in order."""

    BAKE = "bake"
    VERIFY = "verify"
    PROMOTE = "promote"
    DEPLOY = "deploy"


@dataclass
class RunResult:
    """What a run did, stage by stage."""

    image: str
    version: str
    build_id: str
    baked: bool
    verified: bool
    promoted: bool
    promotion: str = ""
    deploy: dict[str, Any] = field(default_factory=dict)
    run_dir: str = ""


@contextlib.contextmanager
def _project(
    config_path: Path | str | None, *, bakes: str | None = None, deploys: str | None = None
) -> Iterator[tuple[Config, Registry]]:
    config = config_mod.load(config_path)
    # A mistake in the roles or templates of the image to bake or the environment to deploy is
    # found before the registry or a run folder is made: a bad input leaves nothing behind.
    if bakes is not None:
        bake_stage.check_inputs(config, config.image(bakes))
    if deploys is not None:
        from pipeline.stages import fleet

        fleet.configuration(config, config.environment(deploys))
    registry = open_registry(config.state_dir, config.registry, root=config.root)
    try:
        yield config, registry
    finally:
        registry.close()


@contextlib.contextmanager
def _recorded(run: Run) -> Iterator[Run]:
    # Every process the run starts carries its build id, so that a later run can find and
    # stop what this one leaves behind if it is killed (see pipeline/reaper.py).
    with reaper.tagged(run.build_id), _finished(run):
        yield run


@contextlib.contextmanager
def _finished(run: Run) -> Iterator[Run]:
    try:
        yield run
    except Interrupted as exc:
        run.finish("interrupted", exc.exit_code, str(exc))
        raise
    except PipelineError as exc:
        run.finish("failed", exc.exit_code, str(exc))
        raise
    except KeyboardInterrupt:
        run.finish("interrupted", 130, "interrupted")
        raise
    except BaseException as exc:
        run.finish("crashed", 1, repr(exc))
        raise


def bake(image: str, *, config_path: Path | str | None = None) -> bake_stage.BakeResult:
    """Bake `image` unless its inputs are unchanged."""
    with _project(config_path, bakes=image) as (config, registry):
        config.image(image)
        run = Run(config.state_dir, "bake", image)
        with _recorded(run), locks.hold(config.state_dir, f"image-{image}", build_id=run.build_id):
            result = bake_stage.bake(config, image, run=run, registry=registry)
            run.finish("ok", 0, version=result.version.version, baked=result.baked)
            return result


def verify(
    image: str, version: str | None = None, *, config_path: Path | str | None = None
) -> ImageVersion:
    """Verify a version of `image` (by default its newest)."""
    with _project(config_path) as (config, registry):
        config.image(image)
        target = _pick_version(registry, image, version)
        verify_stage.check(config, target)
        run = Run(config.state_dir, "verify", f"{image} {target.version}")
        with _recorded(run), locks.hold(config.state_dir, f"image-{image}", build_id=run.build_id):
            verified = verify_stage.verify(config, target, run=run, registry=registry)
            run.finish("ok", 0, version=verified.version)
            return verified


def promote(
    image: str,
    channel: str,
    version: str | None = None,
    *,
    rollback: bool = False,
    allow_older: bool = False,
    config_path: Path | str | None = None,
) -> tuple[ChannelMove, ImageVersion]:
    """Point `channel` at a verified, unrevoked version (by default the newest such one), or
    with `rollback` back at the version it held before.

    Returns the move (`moved` is False when the channel stayed, with a note saying why) and the
    version the channel is on afterwards.
    """
    with _project(config_path) as (config, registry):
        config.image(image)
        if not NAME.match(channel):
            raise UsageError(f"{channel!r} is not a channel name (expected {NAME.pattern})")
        if rollback:
            if version is not None:
                raise UsageError("give either a version or --rollback, not both")
            move = registry.rollback(image, channel)
        else:
            if version is None:
                target = registry.latest(image, states=("verified",), unrevoked=True)
                if target is None:
                    raise UsageError(f"{image} has no verified, unrevoked version to promote")
                version = target.version
            move = _promote(registry, image, channel, version, allow_older=allow_older)
            if not move.moved and move.current != version and version is not None:
                raise UsageError(
                    f"channel {channel} of {image} is {move.note}; to move it back, use"
                    " `--rollback` or `--allow-older`"
                )
        return move, registry.get(image, move.current or version or "")


def bake_preview(image: str, *, config_path: Path | str | None = None) -> dict[str, Any]:
    """Whether `bake IMAGE` would make a new version, and why. Changes nothing; refuses what
    `bake` refuses (the inputs of a revoked version) with the same error."""
    with _project(config_path) as (config, registry):
        preview = bake_stage.preview(config, image, registry=registry)
        if preview["refused"]:
            raise UsageError(preview["refused"])
        return preview


def promote_preview(
    image: str, channel: str, version: str | None = None, *, config_path: Path | str | None = None
) -> dict[str, Any]:
    """Where `promote` would move `channel`, changing nothing: `from`, `to` and `moves`.

    Refuses what `promote` refuses (an unusable version, an older one than the channel's) with
    the same error.
    """
    with _project(config_path) as (config, registry):
        config.image(image)
        if not NAME.match(channel):
            raise UsageError(f"{channel!r} is not a channel name (expected {NAME.pattern})")
        if version is None:
            newest = registry.latest(image, states=("verified",), unrevoked=True)
            if newest is None:
                raise UsageError(f"{image} has no verified, unrevoked version to promote")
            version = newest.version
        target = registry.get(image, version)
        refusal = target.why_unusable()
        if refusal is not None:
            raise UsageError(f"cannot promote to {channel}: {refusal}")
        held = registry.channel(image, channel)
        current = held.version if held else None
        moves = current is None or sort_key(version) > sort_key(current)
        if not moves and current != version:
            raise UsageError(
                f"channel {channel} of {image} is already on {current}, newer than {version};"
                " to move it back, use `--rollback` or `--allow-older`"
            )
        return {"image": image, "channel": channel, "from": current, "to": version, "moves": moves}


def _promote(
    registry: Registry, image: str, channel: str, version: str, *, allow_older: bool = False
) -> ChannelMove:
    """A compare-and-swap promotion that, on losing a race, decides again on what it found."""
    current = registry.channel(image, channel)
    expect = current.version if current else None
    for _ in range(5):
        try:
            return registry.promote(image, channel, version, expect=expect, allow_older=allow_older)
        except ChannelMoved as moved:
            expect = moved.found
    return registry.promote(image, channel, version, allow_older=allow_older)


def run(image: str, env: str, *, config_path: Path | str | None = None) -> RunResult:
    """Bake, verify, promote and deploy: the whole chain for one environment."""
    from pipeline.stages import deploy as deploy_stage

    with _project(config_path, bakes=image, deploys=env) as (config, registry):
        environment = config.environment(env)
        if environment.image != image:
            message = f"environment {env!r} runs image {environment.image!r}, not {image!r}"
            raise UsageError(message)
        run_ = Run(config.state_dir, "run", f"{image} {env}")
        with (
            _recorded(run_),
            locks.hold(config.state_dir, f"env-{env}", build_id=run_.build_id),
            locks.hold(config.state_dir, f"image-{image}", build_id=run_.build_id),
        ):
            baked = bake_stage.bake(config, image, run=run_, registry=registry)
            failpoints.reach("run.baked")
            version = baked.version
            verified = False
            if version.state == "built":
                version = verify_stage.verify(config, version, run=run_, registry=registry)
                verified = True
            failpoints.reach("run.verified")
            move = _promote(registry, image, environment.channel, version.version)
            failpoints.reach("run.promoted")
            log = context(version.label, Stage.PROMOTE.value)
            if move.moved:
                log.info("channel %s now points at %s", environment.channel, version.version)
            elif move.current == version.version:
                log.info("channel %s already on %s", environment.channel, version.version)
            else:
                log.info(
                    "channel %s stays on %s: %s (pipeline.yml now describes %s; to run it, "
                    "`pipeline promote %s %s %s --allow-older`, then deploy)",
                    environment.channel,
                    move.current,
                    move.note,
                    version.version,
                    image,
                    environment.channel,
                    version.version,
                )
            deployed = deploy_stage.deploy(config, environment, run=run_, registry=registry)
            result = RunResult(
                image=image,
                version=version.version,
                build_id=version.build_id,
                baked=baked.baked,
                verified=verified,
                promoted=move.moved,
                promotion=move.note,
                deploy=deployed,
                run_dir=str(run_.dir),
            )
            run_.finish("ok", 0, **result.__dict__)
            return result


def plan(image: str, env: str, *, config_path: Path | str | None = None) -> dict[str, Any]:
    """What `run IMAGE --env ENV` would do, changing nothing: whether the image would be
    baked and why, where the channel would move, and Terraform's plan for the fleet."""
    from pipeline.stages import deploy as deploy_stage

    with _project(config_path, bakes=image, deploys=env) as (config, registry):
        environment = config.environment(env)
        if environment.image != image:
            message = f"environment {env!r} runs image {environment.image!r}, not {image!r}"
            raise UsageError(message)
        bake = bake_stage.preview(config, image, registry=registry)
        if bake["refused"]:
            # `run` would stop at its bake: say so, rather than plan a version never baked.
            raise UsageError(bake["refused"])
        channel = registry.channel(image, environment.channel)
        now = channel.version if channel else None
        target = channel
        if bake["rebuild"]:
            basis = channel or registry.latest(image, states=USABLE)
            target = (
                dataclasses.replace(basis, version=bake["version"], build_id="next")
                if basis
                else None
            )
            move = {"from": now, "to": bake["version"], "when": "after bake and verify"}
        else:
            existing = registry.get(image, bake["version"])
            if channel is None or sort_key(existing.version) > sort_key(channel.version):
                when = "now" if existing.state == "verified" else "after verify"
                target = existing
                move = {"from": now, "to": existing.version, "when": when}
            else:
                move = {"from": now, "to": now, "when": "stays"}
                # `run` would deploy what the channel holds: a revoked version it refuses.
                target = deploy_stage.channel_version(registry, environment)
        fleet = deploy_stage.plan(
            config, environment, registry=registry, target=target, future=bake["rebuild"]
        )
        return {
            "image": image,
            "bake": bake,
            "channel": environment.channel,
            "move": move,
            "fleet": fleet,
        }


def deploy_preview(env: str, *, config_path: Path | str | None = None) -> dict[str, Any]:
    """What `deploy ENV` would do, changing nothing: Terraform's plan for putting the fleet on
    the version its channel points at now.

    Refuses what `deploy` refuses (a channel pointing nowhere, or at a revoked or unverified
    version) with the same error, rather than planning a rollout that would not happen.
    """
    from pipeline.stages import deploy as deploy_stage

    with _project(config_path) as (config, registry):
        environment = config.environment(env)
        target = deploy_stage.channel_version(registry, environment)
        return deploy_stage.plan(
            config, environment, registry=registry, target=target, future=False
        )


def deploy(env: str, *, config_path: Path | str | None = None) -> dict[str, Any]:
    """Roll environment `env` onto the version its channel points at."""
    from pipeline.stages import deploy as deploy_stage

    with _project(config_path, deploys=env) as (config, registry):
        environment = config.environment(env)
        run_ = Run(config.state_dir, "deploy", env)
        with _recorded(run_), locks.hold(config.state_dir, f"env-{env}", build_id=run_.build_id):
            result = deploy_stage.deploy(config, environment, run=run_, registry=registry)
            run_.finish("ok", 0, **result)
            return result


def scale(env: str, count: int, *, config_path: Path | str | None = None) -> dict[str, Any]:
    """Change environment `env`'s number of instances (kept until pipeline.yml's changes)."""
    from pipeline.stages.deploy import check_count

    check_count(count)
    return _fleet_change("scale", env, config_path, count=count)


def heal(env: str, *, config_path: Path | str | None = None) -> dict[str, Any]:
    """Replace `env`'s instances that died or fail their health check, same version."""
    return _fleet_change("heal", env, config_path)


def finish(
    env: str, *, when_due: str | None = None, config_path: Path | str | None = None
) -> dict[str, Any]:
    """End `env`'s blue/green rollout now: destroy the old fleet it kept.

    `when_due`: wait until that time first, and finish only if the fleet kept until then is
    still kept (what a deploy starts in the background to end its kept fleet on time).
    """
    if when_due is not None:
        from pipeline.stages import rollout

        with _project(config_path) as (config, _registry):
            record_of = functools.partial(rollout.Record, config, config.environment(env))
        while True:
            kept = record_of().kept
            if not kept or kept.get("until") != when_due:
                return {"env": env, "finished": [], "note": "nothing kept until then any more"}
            if format_time(dt.datetime.now(dt.UTC)) >= when_due:
                break
            time.sleep(2)
        # Due: a rollout holding the environment then is waited for, not given up on; under
        # the lock the stage finishes only the fleet kept until `when_due`, if still kept.
        return _fleet_change(
            "finish", env, config_path, lock_wait=FINISH_LOCK_WAIT, when_due=when_due
        )
    return _fleet_change("finish", env, config_path)


# How long a background finisher waits for a rollout that holds the environment when it is due.
FINISH_LOCK_WAIT = 6 * 3600.0


def _fleet_change(
    action: str,
    env: str,
    config_path: Path | str | None,
    *,
    lock_wait: float = 0.0,
    **options: Any,
) -> dict[str, Any]:
    from pipeline.stages import deploy as deploy_stage

    with _project(config_path, deploys=env) as (config, registry):
        environment = config.environment(env)
        run_ = Run(config.state_dir, action, env)
        lock = locks.hold(config.state_dir, f"env-{env}", build_id=run_.build_id, wait=lock_wait)
        with _recorded(run_), lock:
            change = getattr(deploy_stage, action)
            result: dict[str, Any] = change(
                config, environment, **options, run=run_, registry=registry
            )
            run_.finish("ok", 0, **result)
            return result


def destroy(env: str, *, config_path: Path | str | None = None) -> list[str]:
    """Destroy every instance of environment `env`."""
    from pipeline.stages import deploy as deploy_stage

    with _project(config_path) as (config, registry):
        environment = config.environment(env)
        run_ = Run(config.state_dir, "destroy", env)
        with _recorded(run_), locks.hold(config.state_dir, f"env-{env}", build_id=run_.build_id):
            names = deploy_stage.destroy(config, environment, run=run_, registry=registry)
            run_.finish("ok", 0, destroyed=names)
            return names


def status(env: str, *, config_path: Path | str | None = None) -> dict[str, Any]:
    """The instances of `env`: version, address, health, and drift from Terraform's view."""
    from pipeline.stages import deploy as deploy_stage

    with _project(config_path) as (config, registry):
        environment = config.environment(env)
        return deploy_stage.status(config, environment, registry=registry)


def inventory(env: str, *, config_path: Path | str | None = None) -> dict[str, Any]:
    """Environment `env`'s running instances as an Ansible dynamic inventory."""
    from pipeline.stages import deploy as deploy_stage

    with _project(config_path) as (config, _registry):
        return deploy_stage.inventory(config, config.environment(env))


def images(
    image: str | None = None, *, config_path: Path | str | None = None
) -> list[dict[str, Any]]:
    """Every version of `image` (or of every image and base), oldest first, described."""
    with _project(config_path) as (config, registry):
        if image is not None:
            _known_image(config, registry, image)
            versions = registry.versions(image)
        else:
            versions = registry.all_versions()
        with no_collection():
            return _describe_all(registry, versions)


def show(image: str, version: str, *, config_path: Path | str | None = None) -> dict[str, Any]:
    """One version in full: record, manifest, channels, parent, children, channel history."""
    with _project(config_path) as (config, registry):
        _known_image(config, registry, image)
        if registry.lineage(image) is None:
            raise UsageError(f"{image} has no versions yet (run `pipeline bake {image}`)")
        found = registry.get(image, version)
        described = _describe_all(registry, [found])[0]
        described["manifest"] = found.manifest
        described["children"] = [v.label for v in registry.children(image, version)]
        described["history"] = [
            move
            for channel in registry.channels(image)
            for move in registry.history(image, channel.channel)
            if version in (move.previous, move.current)
        ]
        return described


def tree(
    image: str | None = None,
    *,
    output: Path | str | None = None,
    config_path: Path | str | None = None,
) -> dict[str, Any]:
    """The lineage: bases, the versions built on them, channels; optionally drawn as SVG."""
    target = Path(output) if output is not None else None
    if target is not None and target.suffix.lower() != ".svg":
        raise UsageError(f"--output {target}: the picture is written as SVG; name it *.svg")
    if target is not None and not target.parent.resolve().is_dir():
        raise UsageError(f"--output {target}: the folder {target.parent} does not exist")
    with _project(config_path) as (config, registry):
        if image is not None:
            _known_image(config, registry, image)
        versions = registry.all_versions()
        if image is not None:
            wanted = _ancestry_of(registry, image, versions)
            versions = [v for v in versions if (v.image, v.version) in wanted]
        described = _describe_all(registry, versions)
    by_id = {f"{d['image']}@{d['version']}": d for d in described}
    # Bases first, then images, each oldest first: the picture reads left to right, top down.
    ordered = sorted(described, key=lambda d: (d["kind"] != "base", d["image"]))
    nodes = [
        picture.Node(
            id=f"{d['image']}@{d['version']}",
            title=f"{d['image']} {d['version']}",
            detail=f"{d['status']} · {d['created_at'][:10]} · build {d['build_id']}",
            kind=d["kind"],
            parent=f"{d['parent_image']}@{d['parent_version']}" if d["parent_image"] else None,
            channels=tuple(d["channels"]),
            revoked=d["revocation"]["reason"] if d["status"] == "revoked" else None,
            outdated=bool(d["outdated"]),
        )
        for d in ordered
    ]
    if target is not None:
        title = f"Lineage of {image}" if image else "Image lineage"
        svg = picture.lineage_svg(nodes, title=title)
        try:
            write_text_atomic(target, svg)
        except OSError as exc:
            raise UsageError(f"--output {target}: cannot write it: {exc.strerror}") from None
    roots = [
        d
        for d in ordered
        if not d["parent_image"] or f"{d['parent_image']}@{d['parent_version']}" not in by_id
    ]
    return {
        "versions": ordered,
        "roots": [f"{d['image']}@{d['version']}" for d in roots],
        "output": str(target) if target else None,
    }


def revoke(
    image: str,
    version: str,
    *,
    reason: str,
    at: str | None = None,
    descendants: bool = False,
    config_path: Path | str | None = None,
) -> dict[str, Any]:
    """Revoke a version (and optionally every version built on it) from `at` (default now)."""
    moment = parse_time(at) if at is not None else None
    if any(ord(char) < 32 or ord(char) == 127 for char in reason):
        raise UsageError("--reason must be one line of text, without control characters")
    with _project(config_path) as (config, registry):
        _known_image(config, registry, image)
        before = {
            (v.image, v.version): v.revocation
            for v in [registry.get(image, version), *registry.descendants(image, version)]
        }
        revoked = registry.revoke(image, version, reason=reason, at=moment, descendants=descendants)
        described = _describe_all(registry, revoked)
        for item, after in zip(described, revoked, strict=True):
            item["unchanged"] = before.get((after.image, after.version)) == after.revocation
        by_key = {(v.image, v.version): v for v in revoked}
        channels = []
        for channel in registry.channels():
            held = by_key.get((channel.image, channel.version))
            if held is None or held.revocation is None:
                continue
            back = registry.usable_rollback_target(channel.image, channel.channel)
            channels.append(
                {
                    "image": channel.image,
                    "channel": channel.channel,
                    "version": channel.version,
                    "in_force": held.revoked(),
                    "effective_at": held.revocation.effective_at,
                    "rollback_to": back.version if back is not None else None,
                }
            )
        return {"revoked": described, "channels": channels}


def gc(
    *, keep: int = 3, dry_run: bool = False, config_path: Path | str | None = None
) -> dict[str, Any]:
    """Delete old versions' records and files, keeping what is used or needed (see retention)."""
    if keep < 1:
        raise UsageError(f"--keep {keep}: keep at least 1 version of each image")
    from pipeline.stages import deploy as deploy_stage

    with _project(config_path) as (config, registry), contextlib.ExitStack() as held:
        run_ = None if dry_run else Run(config.state_dir, "gc", "registry")
        if run_ is not None:
            held.enter_context(_recorded(run_))
            # No bake may add, and no deploy start using, a version while gc decides and
            # deletes. A dry run deletes nothing: it reads a snapshot and stands in no run's way.
            names = [f"image-{n}" for n in sorted(config.images)]
            names += [f"env-{n}" for n in sorted(config.environments)]
            for name in names:
                held.enter_context(locks.hold(config.state_dir, name, build_id=run_.build_id))

        in_use = _versions_in_use(config, registry, deploy_stage)
        decided = retention.plan(registry, keep=keep, in_use=in_use)
        deleted = [_gc_entry(v, []) for v in decided.delete]
        # In the registry's order: by image, then semantic version.
        kept = [
            _gc_entry(version, decided.keep[key])
            for key, version in decided.versions.items()
            if key in decided.keep
        ]
        strays = _stray_folders(config, registry)
        if not dry_run and decided.delete:
            registry.delete([(v.image, v.version) for v in decided.delete])
            remaining = {v.path for v in registry.all_versions()}
            for version in decided.delete:
                _remove_files(config, version, remaining)
        if not dry_run:
            for folder in strays:
                shutil.rmtree(folder, ignore_errors=True)
        if run_ is not None:
            run_.finish("ok", 0, deleted=[d["label"] for d in deleted])
        return {
            "dry_run": dry_run,
            "keep": keep,
            "deleted": deleted,
            "kept": kept,
            "stray_folders": [str(folder) for folder in strays],
        }


def _stray_folders(config: Config, registry: Registry) -> list[Path]:
    """Image folders whose version was deleted from the registry but not from disk (a gc that
    was interrupted between the two)."""
    strays = []
    for lineage in registry.lineages():
        folder = config.state_dir / "images" / lineage.image
        if not folder.is_dir():
            continue
        known = {v.version for v in registry.versions(lineage.image)}
        for child in sorted(folder.iterdir()):
            name = child.name
            if child.is_dir() and name not in known and registry.number_used(lineage.image, name):
                strays.append(child)
    return strays


def _versions_in_use(
    config: Config, registry: Registry, deploy_stage: Any
) -> dict[tuple[str, str], list[str]]:
    """Versions that environments' Terraform states and running VMs use, with who uses them."""
    from pipeline.targets.local import qemu

    counts: dict[tuple[str, str], dict[str, int]] = {}

    def count(key: tuple[str, str], user: str) -> None:
        users = counts.setdefault(key, {})
        users[user] = users.get(user, 0) + 1

    for environment in config.environments.values():
        tf = deploy_stage.terraform_for(config, environment, config.state_dir / "logs" / "gc")
        for item in tf.state_instances():
            version = (item.get("labels") or {}).get("version")
            if version:
                count((environment.image, str(version)), f"environment {environment.name}")
    for record in qemu.list_vms(config.state_dir / "vms"):
        image, version = record.labels.get("image"), record.labels.get("version")
        if image and version and qemu.is_running(record):
            count((image, version), "running VM")
    return {
        key: [
            f"{users['running VM']} running VM(s) use it"
            if user == "running VM"
            else f"{user} runs it ({n} instance(s) in its Terraform state)"
            for user, n in users.items()
        ]
        for key, users in counts.items()
    }


def _gc_entry(version: ImageVersion, reasons: list[str]) -> dict[str, Any]:
    return {
        "label": version.label,
        "image": version.image,
        "version": version.version,
        "status": version.status(),
        "path": version.path,
        "reasons": reasons,
    }


def _remove_files(config: Config, version: ImageVersion, remaining: set[str]) -> None:
    """Delete a deleted version's folder: only one the pipeline made, and no other uses."""
    path = Path(version.path)
    own = (config.state_dir / "images", config.state_dir / "base")
    if version.path in remaining or not any(path.is_relative_to(root) for root in own):
        return
    shutil.rmtree(path, ignore_errors=True)


def _known_image(config: Config, registry: Registry, image: str) -> None:
    """Accept an image or base that pipeline.yml declares or the registry holds."""
    if image in config.images or image in config.bases or registry.lineage(image) is not None:
        return
    known = f"images in {config.path.name}: {', '.join(sorted(config.images))}"
    others = sorted({lin.image for lin in registry.lineages()} - set(config.images))
    if others:
        known += f"; also in the registry: {', '.join(others)}"
    raise UsageError(f"unknown image {image!r} ({known})")


def _ancestry_of(
    registry: Registry, image: str, versions: list[ImageVersion]
) -> set[tuple[str, str]]:
    """The versions of `image` with every ancestor they have."""
    by_key = {(v.image, v.version): v for v in versions}
    wanted: set[tuple[str, str]] = set()
    for version in versions:
        if version.image != image:
            continue
        key: tuple[str, str] | None = (version.image, version.version)
        while key is not None and key in by_key and key not in wanted:
            wanted.add(key)
            found = by_key[key]
            key = (
                (found.parent_image, found.parent_version)
                if found.parent_image and found.parent_version
                else None
            )
    return wanted


def _describe_all(registry: Registry, versions: list[ImageVersion]) -> list[dict[str, Any]]:
    """Versions as plain data: status (revocation applied), channels, kind, outdated."""
    channels: dict[tuple[str, str], list[str]] = {}
    for channel in registry.channels():
        channels.setdefault((channel.image, channel.version), []).append(channel.channel)
    kinds = {lineage.image: lineage.kind for lineage in registry.lineages()}
    # Versions share few parents: ask the registry once per parent, not once per version.
    newer_parent: dict[tuple[str, str], ImageVersion | None] = {}
    described = []
    for version in versions:
        outdated = None
        if version.parent_image and version.parent_version:
            parent = (version.parent_image, version.parent_version)
            if parent not in newer_parent:
                newer_parent[parent] = registry.outdated(version)
            outdated = newer_parent[parent]
        revocation = version.revocation
        described.append(
            {
                "image": version.image,
                "version": version.version,
                "kind": kinds.get(version.image, "image"),
                "state": version.state,
                "status": version.status(),
                "build_id": version.build_id,
                "fingerprint": version.fingerprint,
                "parent_image": version.parent_image,
                "parent_version": version.parent_version,
                "path": version.path,
                "failure": version.failure,
                "created_at": version.created_at,
                "channels": channels.get((version.image, version.version), []),
                "revocation": None
                if revocation is None
                else {
                    "reason": revocation.reason,
                    "effective_at": revocation.effective_at,
                    "in_force": revocation.active(),
                    "recorded_at": revocation.recorded_at,
                    "by": revocation.actor,
                },
                "outdated": outdated.label if outdated else None,
            }
        )
    return described


# How long `schedule run` sleeps at most before it looks at the clock again: a machine that
# was suspended wakes to a clock far ahead, and pipeline.yml may have changed meanwhile.
SCHEDULE_NAP = 60.0


def schedule_list(
    *, now: dt.datetime | None = None, config_path: Path | str | None = None
) -> list[dict[str, Any]]:
    """Each image's schedule: cron, action, triggers, next slot (UTC), last result, paused."""
    from pipeline.schedule import engine

    config = config_mod.load(config_path)
    return engine.describe(config, now=now or dt.datetime.now(dt.UTC))


def schedule_tick(
    *,
    now: dt.datetime | None = None,
    action: Any = None,
    config_path: Path | str | None = None,
) -> list[dict[str, Any]]:
    """Handle every schedule's due slot once (what the timer calls every minute).

    `action` replaces the real bake/verify/run (tests); `now` the clock.
    """
    from pipeline.schedule import engine

    with _project(config_path) as (config, registry):
        outcomes = engine.tick(
            config,
            registry,
            now=now or dt.datetime.now(dt.UTC),
            action=action or engine.perform,
        )
        return [dataclasses.asdict(outcome) for outcome in outcomes]


def schedule_run(
    *,
    clock: Any = None,
    sleep: Any = time.sleep,
    action: Any = None,
    config_path: Path | str | None = None,
) -> None:
    """Tick, then sleep until the next slot, until interrupted (KeyboardInterrupt goes up).

    pipeline.yml is read again at every tick; a mistake in it found after the start is logged
    and tried again a minute later rather than ending the scheduler.
    """
    from pipeline.schedule import engine

    now_of = clock or (lambda: dt.datetime.now(dt.UTC))
    log = context("scheduler", "run")
    first = True
    while True:
        try:
            schedule_tick(now=now_of(), action=action, config_path=config_path)
            config = config_mod.load(config_path)
            wake = engine.next_wakeup(config, now=now_of())
            if first and wake is None:
                raise UsageError(f"no image in {config.path} has a schedule: nothing to run")
        except Interrupted:
            raise
        except PipelineError as exc:
            if first:
                raise
            log.error("%s; trying again in %.0f s", exc, SCHEDULE_NAP)
            wake = None
        first = False
        pause = SCHEDULE_NAP
        if wake is not None:
            pause = min(max((wake - now_of()).total_seconds(), 0.0), SCHEDULE_NAP)
            log.debug("next slot %s", engine.format_slot(wake))
        sleep(pause)


def schedule_install(
    *,
    directory: Path | str | None = None,
    crontab: bool = False,
    config_path: Path | str | None = None,
) -> dict[str, Any]:
    """Write the systemd timer and service (or a crontab line) that tick the scheduler.

    Nothing is enabled: the result says how to.
    """
    from pipeline.schedule import units

    config = config_mod.load(config_path)
    if not any(image.schedule for image in config.images.values()):
        raise UsageError(f"no image in {config.path} has a schedule; add one before installing")
    folder = Path(directory).resolve() if directory is not None else None
    written = units.install(config, directory=folder, crontab=crontab)
    if crontab:
        how = "add the line to your crontab: crontab -e"
        if written:
            how = f"(crontab -l 2>/dev/null; cat {written[0]}) | crontab -"
    else:
        unit_dir = folder or units.user_unit_dir()
        how = f"systemctl --user daemon-reload && systemctl --user enable --now {units.TIMER}"
        if folder is not None and folder != units.user_unit_dir():
            how = (
                f"systemctl --user link {unit_dir / units.SERVICE} {unit_dir / units.TIMER}"
                f" && {how}"
            )
    return {
        "written": [str(path) for path in written],
        "crontab": units.crontab_line(config) if crontab else None,
        "enable": how,
    }


def schedule_resume(image: str, *, config_path: Path | str | None = None) -> dict[str, Any]:
    """Unpause `image`'s schedule and forget its failures."""
    from pipeline.schedule import engine

    config = config_mod.load(config_path)
    if config.image(image).schedule is None:
        raise UsageError(f"image {image} has no schedule in {config.path.name}")
    was_paused = engine.load(config.state_dir, image).paused
    state = engine.resume(config.state_dir, image)
    return {"image": image, "was_paused": was_paused, **dataclasses.asdict(state)}


def parse_time(text: str) -> str:
    """A time given on the command line (ISO 8601; without a zone it is UTC), as stored."""
    try:
        moment = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise UsageError(
            f"--at {text!r} is not a time (use ISO 8601, like 2026-12-24T18:00:00Z)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    try:
        return format_time(moment)
    except OverflowError:
        raise UsageError(f"--at {text!r} is out of range once turned into UTC") from None


def _pick_version(registry: Registry, image: str, version: str | None) -> ImageVersion:
    if version is not None:
        return registry.get(image, version)
    versions = registry.versions(image)
    if not versions:
        raise UsageError(f"{image} has no baked version yet (run `pipeline bake {image}`)")
    # A listing carries no manifests; verify needs the newest version's (its variables, boot).
    return registry.get(image, versions[-1].version)
