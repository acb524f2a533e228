"""The library's entry points: bake, verify, promote, deploy, run and status.

The CLI, tests and (later) the Ansible module and the scheduler all call these. Each opens the
project, takes the lock it needs, records a run folder and returns plain data.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from pipeline import config as config_mod
from pipeline import locks
from pipeline.config import NAME, Config
from pipeline.errors import Interrupted, PipelineError, UsageError
from pipeline.log import context
from pipeline.registry.sqlite import ImageVersion, Registry, open_registry
from pipeline.runs import Run
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
    deploy: dict[str, Any] = field(default_factory=dict)
    run_dir: str = ""


@contextlib.contextmanager
def _project(config_path: Path | str | None) -> Iterator[tuple[Config, Registry]]:
    config = config_mod.load(config_path)
    registry = open_registry(config.state_dir)
    try:
        yield config, registry
    finally:
        registry.close()


@contextlib.contextmanager
def _recorded(run: Run) -> Iterator[Run]:
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
    with _project(config_path) as (config, registry):
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
        run = Run(config.state_dir, "verify", f"{image} {target.version}")
        with _recorded(run), locks.hold(config.state_dir, f"image-{image}", build_id=run.build_id):
            verified = verify_stage.verify(config, target, run=run, registry=registry)
            run.finish("ok", 0, version=verified.version)
            return verified


def promote(
    image: str, channel: str, version: str | None = None, *, config_path: Path | str | None = None
) -> tuple[bool, ImageVersion]:
    """Point `channel` at a verified version (by default the newest verified one).

    Returns whether the channel moved (False when it already pointed there), and the version.
    """
    with _project(config_path) as (config, registry):
        config.image(image)
        if not NAME.match(channel):
            raise UsageError(f"{channel!r} is not a channel name (expected {NAME.pattern})")
        if version is None:
            verified = [v for v in registry.versions(image) if v.state == "verified"]
            if not verified:
                raise UsageError(f"{image} has no verified version to promote")
            target = verified[-1]
        else:
            target = registry.get(image, version)
        with locks.hold(config.state_dir, f"image-{image}", build_id="promote"):
            return registry.promote(image, channel, target.version), target


def run(image: str, env: str, *, config_path: Path | str | None = None) -> RunResult:
    """Bake, verify, promote and deploy: the whole chain for one environment."""
    from pipeline.stages import deploy as deploy_stage

    with _project(config_path) as (config, registry):
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
            version = baked.version
            verified = False
            if version.state == "built":
                version = verify_stage.verify(config, version, run=run_, registry=registry)
                verified = True
            promoted = registry.promote(image, environment.channel, version.version)
            log = context(version.label, Stage.PROMOTE.value)
            if promoted:
                log.info("channel %s now points at %s", environment.channel, version.version)
            else:
                log.info("channel %s already on %s", environment.channel, version.version)
            deployed = deploy_stage.deploy(config, environment, run=run_, registry=registry)
            result = RunResult(
                image=image,
                version=version.version,
                build_id=version.build_id,
                baked=baked.baked,
                verified=verified,
                promoted=promoted,
                deploy=deployed,
                run_dir=str(run_.dir),
            )
            run_.finish("ok", 0, **result.__dict__)
            return result


def deploy(env: str, *, config_path: Path | str | None = None) -> dict[str, Any]:
    """Roll environment `env` onto the version its channel points at."""
    from pipeline.stages import deploy as deploy_stage

    with _project(config_path) as (config, registry):
        environment = config.environment(env)
        run_ = Run(config.state_dir, "deploy", env)
        with _recorded(run_), locks.hold(config.state_dir, f"env-{env}", build_id=run_.build_id):
            result = deploy_stage.deploy(config, environment, run=run_, registry=registry)
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


def images(image: str, *, config_path: Path | str | None = None) -> list[ImageVersion]:
    with _project(config_path) as (config, registry):
        config.image(image)
        return registry.versions(image)


def _pick_version(registry: Registry, image: str, version: str | None) -> ImageVersion:
    if version is not None:
        return registry.get(image, version)
    versions = registry.versions(image)
    if not versions:
        raise UsageError(f"{image} has no baked version yet (run `pipeline bake {image}`)")
    return versions[-1]
