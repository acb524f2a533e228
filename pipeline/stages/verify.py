"""Verify: boot a throwaway copy of a baked version with Molecule and check it.

Molecule's scenario `molecule/<image>/` creates the VM (through the pipeline's QEMU launcher),
converges the image's roles (which must change nothing: the image must already be what its
roles describe), verifies the service from outside the VM, and is always destroyed, also after a
failure or Ctrl-C. A play of the converge or the verify that matches no host fails it too: Ansible
skips such a play and ends with 0, and the version would be called verified on checks that never
ran. The version is then recorded as verified or failed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pipeline import secret
from pipeline.config import Config
from pipeline.errors import ConfigError, PipelineError, ToolError, UsageError, VerifyFailed
from pipeline.log import context
from pipeline.registry import ImageVersion, Registry
from pipeline.runs import Run, write_json_atomic
from pipeline.targets.local import baseimage, qemu
from pipeline.tools.ansible_output import failed_tasks_of

PLUGINS = Path(__file__).resolve().parent.parent / "ansible_plugins"
MOLECULE_TIMEOUT = 1800
# The steps whose playbook runs report, through the pipeline_changes callback, what they did.
REPORTED_STEPS = ("converge", "verify")


def check(config: Config, version: ImageVersion) -> None:
    """What verify needs before it starts anything: a Molecule scenario for the image and, for
    a version still to be verified, a disk that is a qcow2 image."""
    scenario = config.molecule_dir / version.image
    if not (scenario / "molecule.yml").is_file():
        message = f"no Molecule scenario for image {version.image!r} (expected {scenario})"
        raise ConfigError(str(scenario / "molecule.yml"), None, message)
    if version.state != "built":
        return
    problem = qemu.disk_problem(Path(version.path) / "disk.qcow2")
    if problem:
        message = f"{version.label} cannot be verified: {problem}; bake {version.image} again"
        raise UsageError(message)


def verify(config: Config, version: ImageVersion, *, run: Run, registry: Registry) -> ImageVersion:
    """Verify `version`; record it as verified, or as failed and raise VerifyFailed."""
    log = context(version.label, "verify")
    check(config, version)
    if version.revoked():
        assert version.revocation is not None
        reason = version.revocation.reason
        raise VerifyFailed(f"{version.label} is revoked ({reason}) and cannot be verified")
    if version.state not in ("built", "verified"):
        raise VerifyFailed(f"{version.label} is {version.state} and cannot be verified")
    if version.state == "verified":
        # Verifying again would check the version against today's roles, not the ones it was
        # baked from, and could fail a version that is deployed and must stay healable.
        log.info("already verified; nothing to do")
        return version

    values = baked_secrets(config, version)
    log.info("booting a throwaway copy of build %s", version.build_id)
    run.event("verify.start", version=version.version)
    with secret.private_folder(config.state_dir, f"{run.build_id}-verify") as private:
        env = _molecule_env(config, version, run, values, private)
        failure = ""
        try:
            failure = _run_steps(version, env, run)
        finally:
            _destroy(version, env, run)

    if failure:
        registry.set_state(version.image, version.version, "failed", failure)
        run.event("verify.failed", version=version.version, reason=failure)
        raise VerifyFailed(f"{version.label} failed verification: {failure} (run {run.dir})")
    registry.set_state(version.image, version.version, "verified")
    run.event("verify.done", version=version.version)
    log.info("verified")
    return registry.get(version.image, version.version)


def _run_steps(version: ImageVersion, env: dict[str, str], run: Run) -> str:
    """Create, converge (no change allowed), verify; return why it failed, or ''."""
    log = context(version.label, "verify")
    try:
        for step in ("create", "converge", "verify"):
            log.info("molecule %s", step)
            step_env = dict(env)
            report = run.dir / f"molecule-{step}.json"
            if step in REPORTED_STEPS:
                step_env["PIPELINE_CHANGES_FILE"] = str(report)
            _molecule(step, version, step_env, run)
            if step in REPORTED_STEPS and (failure := report_problem(step, report)):
                return failure
    except ToolError as exc:
        if (
            exc.argv[1] == "create"
            and not (Path(env["PIPELINE_VM_ROOT"]) / env["PIPELINE_INSTANCE"]).exists()
        ):
            # The VM never started: the tools failed, not the image. Leave the version as built.
            raise
        step = exc.argv[1]
        causes = failed_tasks_of(exc)
        if not causes:
            causes = [next((line.strip() for line in reversed(exc.tail) if line.strip()), "")]
        log.error("molecule %s failed (exit code %s, log %s)", step, exc.returncode, exc.log)
        return f"molecule {step} failed: " + "; ".join(causes)
    return ""


def instance_name(version: ImageVersion, run: Run) -> str:
    # The run's build id makes the name unique, so destroy only ever touches this run's VM.
    return f"verify-{version.image}-{run.build_id}"


def baked_secrets(config: Config, version: ImageVersion) -> dict[str, str]:
    """The secret variables `version` was baked with, from pipeline.yml and the environment.

    The converge applies the roles again with them; a value that differs now would change the
    image and fail a good version, so it is refused before anything boots.
    """
    from pipeline.stages.bake import secret_values

    recorded = version.manifest.get("secret_vars") or {}
    image = config.image(version.image)
    values = secret_values(config, image)
    key = secret.digest_key(config.state_dir, create=False)
    now = secret.digests({name: values[name] for name in recorded if name in values}, key)
    differ = sorted(name for name in recorded if now.get(name) != recorded[name])
    if differ:
        message = (
            f"{version.label} was baked with other values of secret variable(s)"
            f" {', '.join(differ)} than are given now (or they are no longer declared);"
            " verify needs the values it was baked with"
        )
        raise UsageError(message)
    return {name: values[name] for name in recorded}


def _molecule_env(
    config: Config, version: ImageVersion, run: Run, secrets: dict[str, str], private: Path
) -> dict[str, str]:
    manifest = version.manifest
    vars_file = private / "verify-vars.json"
    roles = manifest.get("role_order") or list(config.image(version.image).roles)
    variables = {**manifest.get("vars", {}), **secrets, "pipeline_roles": roles}
    secret.write_private_json(vars_file, variables)
    write_json_atomic(run.dir / "verify-vars.json", secret.masked(variables, secrets))
    (run.dir / "molecule").mkdir(exist_ok=True)
    vault = config.vault_password_file
    return {
        **({"ANSIBLE_VAULT_PASSWORD_FILE": str(vault)} if vault is not None else {}),
        "PIPELINE_INSTANCE": instance_name(version, run),
        "PIPELINE_IMAGE_DIR": version.path,
        "PIPELINE_APPEND": baseimage.baked(
            Path(version.path), manifest, version.fingerprint
        ).append,
        "PIPELINE_VM_ROOT": str(config.state_dir / "vms"),
        "PIPELINE_STATE_DIR": str(config.state_dir),
        "PIPELINE_SSH_KEY": str(baseimage.ssh_key(config.state_dir)),
        "PIPELINE_PYTHON": sys.executable,
        "PIPELINE_SERVICE_PORT": str(config.image(version.image).service_port),
        "PIPELINE_VARS_FILE": str(vars_file),
        "PIPELINE_PROJECT": str(config.root),
        "MOLECULE_EPHEMERAL_DIRECTORY": str(run.dir / "molecule"),
        **callback_env(),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
        "PY_COLORS": "0",
        "NO_COLOR": "1",
    }


def callback_env() -> dict[str, str]:
    """The environment that makes ansible-playbook run the pipeline_changes callback, which
    writes its report where PIPELINE_CHANGES_FILE says."""
    return {
        "ANSIBLE_CALLBACK_PLUGINS": str(PLUGINS / "callback"),
        "ANSIBLE_CALLBACKS_ENABLED": "pipeline_changes",
    }


def _molecule(step: str, version: ImageVersion, env: dict[str, str], run: Run) -> None:
    molecule = Path(sys.executable).with_name("molecule")
    run.command(
        [str(molecule), step, "-s", version.image],
        what=f"molecule {step}",
        prefix=f"[{version.label} > verify] ",
        env=env,
        cwd=Path(env["PIPELINE_PROJECT"]),
        timeout=MOLECULE_TIMEOUT,
    )


def _destroy(version: ImageVersion, env: dict[str, str], run: Run) -> None:
    """Destroy through Molecule; if that fails, stop the VM directly. Never leave it running."""
    try:
        _molecule("destroy", version, env, run)
    except PipelineError as exc:
        context(version.label, "verify").warning("molecule destroy failed: %s", exc)
    vm_root = Path(env["PIPELINE_VM_ROOT"])
    name = env["PIPELINE_INSTANCE"]
    if (vm_root / name).exists():
        qemu.stop(qemu.load(vm_root, name))


def report_problem(step: str, path: Path) -> str:
    """Why a converge or verify that Ansible ended with 0 still fails, from what the callback
    wrote: a play that matched no host (both steps), or a change (converge); '' if none."""
    if not path.is_file():
        return f"molecule {step} reported nothing (the pipeline_changes callback did not run)"
    report = json.loads(path.read_text())
    unmatched = report.get("unmatched", [])
    if unmatched:
        plays = "; ".join(
            f"play {item['play']!r} of {item['playbook']} matched no host (hosts: {item['hosts']})"
            for item in unmatched
        )
        return f"molecule {step}: {plays}, so it checked nothing there"
    changed = report.get("changed", [])
    if step != "converge" or not changed:
        return ""
    tasks = "; ".join(sorted({item["task"] for item in changed}))
    return f"the image is not what its roles describe: applying them changed {tasks}"
