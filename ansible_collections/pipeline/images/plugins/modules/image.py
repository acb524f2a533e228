"""Ansible module pipeline.images.image: bake, verify, promote and deploy through the library."""

from __future__ import annotations

DOCUMENTATION = r"""
module: image
short_description: Bake, verify, promote and deploy machine images with the image pipeline
description:
  - "Calls the pipeline library (C(pipeline.api)) on the controller; it does not run the CLI."
  - "Run it with C(delegate_to: localhost) or C(connection: local), under a Python that can
    import the C(pipeline) package (the project's venv as C(ansible_python_interpreter), or
    C(PYTHONPATH) pointing at the project's code)."
  - "C(changed) is true only when something changed: a new version baked, a version verified,
    a channel moved, a fleet instance created or destroyed."
  - "In check mode nothing changes; the result carries C(plan), what the action would do."
options:
  project:
    description: pipeline.yml, or its folder (by default pipeline.yml in the current folder).
    type: path
  action:
    description: The stage to run; C(run) is bake, verify, promote and deploy for C(env).
    type: str
    choices: [bake, verify, promote, deploy, run]
    default: run
  image:
    description: The image (for deploy and run, the environment's image when left out).
    type: str
  env:
    description: The environment (deploy and run; for promote, its channel is the default).
    type: str
  channel:
    description: The channel to promote (default the channel of C(env)).
    type: str
  version:
    description: The version to verify or promote (default the newest, or newest verified).
    type: str
"""

RETURN = r"""
version: {description: The version acted on (for deploy, the one the fleet runs), type: str}
build_id: {description: Its build id, type: str}
instances: {description: The fleet's instances after deploy or run, type: list}
promotion: {description: "promote: channel, from, to, moved, note", type: dict}
deploy: {description: "deploy and run: the library's deploy result", type: dict}
plan: {description: Check mode only, what the action would do, type: dict}
rc: {description: On failure, the pipeline's exit code, type: int}
"""

import contextlib
import dataclasses
import sys
from pathlib import Path
from typing import Any

from ansible.module_utils.basic import AnsibleModule

try:
    from pipeline import api
    from pipeline import config as config_mod
    from pipeline.errors import PipelineError
except ImportError as exc:
    IMPORT_ERROR: str | None = str(exc)
else:
    IMPORT_ERROR = None


def _config_path(project: str | None) -> Path | None:
    if project is None:
        return None
    path = Path(project)
    return path / "pipeline.yml" if path.is_dir() else path


def _version_fields(version: Any) -> dict[str, Any]:
    return {"version": version.version, "build_id": version.build_id}


def _described(image: str, version: str | None, config_path: Path | None) -> dict[str, Any]:
    """The version `verify` would take (the given one, or the newest), as `api.images` says."""
    versions = api.images(image, config_path=config_path)
    if version is None:
        if not versions:
            # The library's own message, from the call that would be made.
            api.verify(image, config_path=config_path)
        return versions[-1]
    api.show(image, version, config_path=config_path)
    return next(v for v in versions if v["version"] == version)


def bake(p: dict[str, Any], config_path: Path | None, check: bool) -> dict[str, Any]:
    if check:
        preview = api.bake_preview(p["image"], config_path=config_path)
        return {"changed": preview["rebuild"], "version": preview["version"], "plan": preview}
    result = api.bake(p["image"], config_path=config_path)
    return {"changed": result.baked, **_version_fields(result.version)}


def verify(p: dict[str, Any], config_path: Path | None, check: bool) -> dict[str, Any]:
    found = _described(p["image"], p["version"], config_path)
    fields = {"version": found["version"], "build_id": found["build_id"]}
    # A verified version stays verified: verifying it again would boot a VM to change nothing.
    if found["state"] == "verified":
        return {"changed": False, **fields}
    if check:
        return {"changed": True, **fields, "plan": {"verify": found["version"]}}
    verified = api.verify(p["image"], found["version"], config_path=config_path)
    return {"changed": True, **_version_fields(verified)}


def promote(p: dict[str, Any], config_path: Path | None, check: bool) -> dict[str, Any]:
    channel = p["channel"] or config_mod.load(config_path).environment(p["env"]).channel
    if check:
        preview = api.promote_preview(p["image"], channel, p["version"], config_path=config_path)
        return {"changed": preview["moves"], "version": preview["to"], "plan": preview}
    move, version = api.promote(p["image"], channel, p["version"], config_path=config_path)
    return {
        "changed": move.moved,
        **_version_fields(version),
        "promotion": dataclasses.asdict(move),
    }


def deploy(p: dict[str, Any], config_path: Path | None, check: bool) -> dict[str, Any]:
    if check:
        plan = api.deploy_preview(p["env"], config_path=config_path)
        return {"changed": bool(plan["changes"]), "version": plan["target"], "plan": plan}
    result = api.deploy(p["env"], config_path=config_path)
    out = _deployed(result, result["changed"])
    out["build_id"] = api.show(p["image"], result["version"], config_path=config_path)["build_id"]
    return out


def run(p: dict[str, Any], config_path: Path | None, check: bool) -> dict[str, Any]:
    if check:
        plan = api.plan(p["image"], p["env"], config_path=config_path)
        changed = plan["bake"]["rebuild"] or plan["move"]["when"] != "stays"
        changed = changed or bool(plan["fleet"]["changes"])
        return {"changed": changed, "version": plan["move"]["to"], "plan": plan}
    result = api.run(p["image"], p["env"], config_path=config_path)
    changed = result.baked or result.verified or result.promoted or result.deploy["changed"]
    out = _deployed(result.deploy, changed)
    # The version baked and verified, with its build id (the fleet's is in `deploy`: a channel
    # already on a newer version stays there).
    out.update(version=result.version, build_id=result.build_id)
    out["promotion"] = {"moved": result.promoted, "note": result.promotion}
    return out


def _deployed(result: dict[str, Any], changed: bool) -> dict[str, Any]:
    return {
        "changed": changed,
        "version": result["version"],
        "instances": result.get("instances", []),
        "deploy": result,
    }


ACTIONS = {"bake": bake, "verify": verify, "promote": promote, "deploy": deploy, "run": run}

# What each action cannot do without.
NEEDS = {
    "bake": ("image",),
    "verify": ("image",),
    "promote": ("image",),
    "deploy": ("env",),
    "run": ("env",),
}


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "project": {"type": "path"},
            "action": {"type": "str", "default": "run", "choices": sorted(ACTIONS)},
            "image": {"type": "str"},
            "env": {"type": "str"},
            "channel": {"type": "str"},
            "version": {"type": "str"},
        },
        supports_check_mode=True,
    )
    if IMPORT_ERROR is not None:
        message = (
            f"cannot import the pipeline library ({IMPORT_ERROR}) with {sys.executable}: set"
            " ansible_python_interpreter to the project's venv Python, or PYTHONPATH"
        )
        module.fail_json(msg=message)
    params = dict(module.params)
    action = params["action"]
    missing = [name for name in NEEDS[action] if not params[name]]
    if action == "promote" and not (params["channel"] or params["env"]):
        missing.append("channel (or env)")
    if missing:
        module.fail_json(msg=f"action={action} needs {', '.join(missing)}")

    config_path = _config_path(params["project"])
    try:
        if action in ("deploy", "run") and not params["image"]:
            params["image"] = config_mod.load(config_path).environment(params["env"]).image
        # The library logs to stderr; anything printed would spoil the JSON answer on stdout.
        with contextlib.redirect_stdout(sys.stderr):
            result = ACTIONS[action](params, config_path, module.check_mode)
    except PipelineError as exc:
        module.fail_json(msg=str(exc), rc=exc.exit_code)
    result.setdefault("build_id", "")
    result.setdefault("instances", [])
    module.exit_json(action=action, image=params["image"], **result)


if __name__ == "__main__":
    main()
