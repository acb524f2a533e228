"""A Terraform provider for fleet instances on this machine: `pipeline_instance` is a QEMU VM.

Terraform starts this module as its plugin `local/pipeline` (through the `dev_overrides` the
adapter writes) and talks to it over the plugin protocol, served by the `tf` package. Stdout
belongs to the plugin handshake, so everything this module says goes to a log file:
`$PIPELINE_PROVIDER_LOG`, or `pipeline-provider.log` in Terraform's working directory.

- create boots the VM and returns only once its service answers HTTP on the health path (with
  any status: whether the answer is the right one is the pipeline's health gate, which can then
  fail fast) and its SSH server greets; if it never does, the VM is stopped and the error
  carries the tail of its serial console. Nothing is left running.
- read reports an instance whose VM record is gone or whose QEMU is dead as gone, so that
  Terraform shows it as drift and the next apply creates it again.
- delete stops the VM and removes its overlay and record.

`--serve` runs it for the pipeline instead: one process serves every Terraform command of a
deploy (Terraform attaches to it through `TF_REATTACH_PROVIDERS` rather than starting the
provider three times per plan and twice per apply), on a private Unix socket, until the pipeline
closes its stdin, Terraform stops it, or a signal comes.

Every attribute given by the configuration forces a new instance when it changes: instances are
immutable, a rollout always replaces them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from tf import runner
from tf.iface import (
    Config,
    CreateContext,
    DeleteContext,
    Provider,
    ReadContext,
    Resource,
    State,
    UpdateContext,
)
from tf.schema import Attribute, Schema
from tf.types import Map, Number, String
from tf.utils import Diagnostics

from pipeline.errors import UsageError
from pipeline.targets.local import qemu
from pipeline.tools.terraform import DELETES_FIRST_ENV, INSTANCE_SCHEMA_VERSION, SERVE_FLAG

log = logging.getLogger("pipeline.provider")

PROVIDER_NAME = "local/pipeline"
LOG_ENV = "PIPELINE_PROVIDER_LOG"
DEFAULT_LOG = "pipeline-provider.log"
LOG_FORMAT = "%(asctime)s.%(msecs)03d pid=%(process)d %(levelname)s %(message)s"
ADDRESS = "127.0.0.1"
SERIAL_TAIL_LINES = 30
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# How often a create waiting for health looks up from the wait to see if it should give up.
HEALTH_POLL_SECONDS = 2.0
DEFAULTS: dict[str, Any] = {
    "health_path": "/healthz",
    "health_timeout": 300,
    "memory": 1024,
    "cpus": 2,
    "http_guest_port": 8080,
}

# Set by SIGINT/SIGTERM: Terraform is being interrupted, so a create still waiting for health
# gives up and stops its VM instead of leaving one running that no state will ever record.
_stopping = threading.Event()
# VMs booted by creates that have not returned yet: the ones to stop if the provider is told to
# stop, since Terraform will not record them.
_inflight: dict[str, qemu.VmRecord] = {}
_inflight_lock = threading.Lock()
DELETES_FIRST_WAIT = 60.0
# gRPC threads of a serving provider: a blue/green switch of the largest fleet (32 instances)
# creates and deletes them all at once, each call holding a thread, with room to spare.
SERVE_THREADS = 80


def _replace(name: str, kind: Any, *, required: bool = False) -> Attribute:
    return Attribute(name, kind, required=required, optional=not required, requires_replace=True)


def _computed(name: str, kind: Any) -> Attribute:
    return Attribute(name, kind, computed=True)


class Instance(Resource):
    """`pipeline_instance`: one fleet VM, healthy from the moment Terraform records it."""

    def __init__(self, provider: PipelineProvider) -> None:
        self.provider = provider

    @classmethod
    def get_name(cls) -> str:
        return "instance"

    @classmethod
    def get_schema(cls) -> Schema:
        return Schema(
            version=INSTANCE_SCHEMA_VERSION,
            attributes=[
                _replace("name", String(), required=True),
                _replace("image", String(), required=True),
                _replace("image_version", String(), required=True),
                _replace("kernel", String(), required=True),
                _replace("initrd", String(), required=True),
                _replace("append", String(), required=True),
                _replace("vm_root", String(), required=True),
                _replace("state_dir", String(), required=True),
                _replace("health_path", String()),
                _replace("health_timeout", Number()),
                _replace("memory", Number()),
                _replace("cpus", Number()),
                _replace("http_guest_port", Number()),
                _replace("labels", Map(String())),
                _computed("pid", Number()),
                _computed("ssh_port", Number()),
                _computed("http_port", Number()),
                _computed("address", String()),
                _computed("url", String()),
                _computed("started_at", String()),
            ],
        )

    def validate(self, diags: Diagnostics, type_name: str, config: Config) -> None:
        """Check the configuration before any plan: known paths must exist."""
        super().validate(diags, type_name, config)
        for key in ("image", "kernel", "initrd"):
            value = config.get(key)
            # Unknown (computed elsewhere) or null values cannot be checked yet.
            if isinstance(value, str) and not Path(value).is_file():
                diags.add_error(f"{type_name}.{key}: no such file", value, path=[key])
        path = config.get("health_path")
        if isinstance(path, str) and not path.startswith("/"):
            diags.add_error(
                f"{type_name}.health_path must start with '/'", path, path=["health_path"]
            )

    def create(self, ctx: CreateContext, planned: State) -> State | None:
        """Boot the VM and wait until it is healthy; on any failure stop it and report why."""
        name = planned["name"]
        spec = {key: _value(planned, key) for key in DEFAULTS}
        if not _deletes_first.wait(name):
            ctx.diagnostics.add_error(
                f"{name}: not booted",
                f"the instances leaving before it ({_deletes_first.leaving()}) were not"
                f" deleted within {DELETES_FIRST_WAIT:.0f} s",
            )
            return None
        if _stopping.is_set():
            ctx.diagnostics.add_error(f"{name}: not booted", "Terraform was interrupted")
            return None
        log.info(
            "create %s: booting %s (version %s)", name, planned["image"], planned["image_version"]
        )
        started = time.monotonic()
        try:
            record = qemu.boot(
                name,
                image=Path(planned["image"]),
                kernel=Path(planned["kernel"]),
                initrd=Path(planned["initrd"]),
                append=planned["append"],
                vm_root=Path(planned["vm_root"]),
                state_dir=Path(planned["state_dir"]),
                http_guest_port=int(spec["http_guest_port"]),
                memory=int(spec["memory"]),
                cpus=int(spec["cpus"]),
                labels=dict(planned.get("labels") or {}),
                hostname=name,
            )
        except Exception as exc:
            log.exception("create %s: boot failed", name)
            ctx.diagnostics.add_error(f"{name}: the VM did not start", str(exc))
            return None

        log.info(
            "create %s: pid %s, ssh 127.0.0.1:%s, http 127.0.0.1:%s",
            name,
            record.pid,
            record.ssh_port,
            record.http_port,
        )
        with _inflight_lock:
            _inflight[name] = record
        try:
            problem = _wait_healthy(record, spec["health_path"], float(spec["health_timeout"]))
        except BaseException:
            _stop_quietly(record)
            raise
        finally:
            with _inflight_lock:
                _inflight.pop(name, None)
        if problem is not None:
            lines = qemu.serial_tail(record, SERIAL_TAIL_LINES)
            tail = "\n".join(_plain(line) for line in lines if line.strip())
            log.error("create %s: %s; stopping it. Serial console tail:\n%s", name, problem, tail)
            _stop_quietly(record)
            detail = f"{problem}. Last lines of its serial console ({record.serial_log}):\n{tail}"
            ctx.diagnostics.add_error(f"{name}: the instance never became healthy", detail)
            return None

        log.info("create %s: healthy after %.1f s", name, time.monotonic() - started)
        # Optional inputs go back exactly as planned (null stays null) or Terraform rejects the
        # result as inconsistent; only the computed attributes are filled in.
        return {**planned, **_computed_state(record)}

    def read(self, ctx: ReadContext, current: State) -> State | None:
        """The instance as it is now; None (gone) if its record or its QEMU is gone."""
        record = _find(current)
        if record is None or not qemu.is_running(record):
            log.info("read %s: not running; Terraform will see it as gone", current["name"])
            return None
        return {**current, **_computed_state(record)}

    def update(self, ctx: UpdateContext, current: State, planned: State) -> State | None:
        """Never reached: every input forces a replacement. Refuse rather than pretend."""
        ctx.diagnostics.add_error(
            f"{current['name']}: instances are immutable",
            "pipeline_instance cannot be changed in place; this is a bug in the provider schema.",
        )
        return current

    def delete(self, ctx: DeleteContext, current: State) -> None:
        """Stop the VM and remove its overlay and record; an already dead VM is fine."""
        name = current["name"]
        record = _find(current)
        if record is None:
            log.info("delete %s: no record left, nothing to stop", name)
            _deletes_first.deleted(name)
            return None
        log.info("delete %s: stopping pid %s", name, record.pid)
        try:
            qemu.stop(record, remove=True)
        except Exception as exc:
            log.exception("delete %s: stop failed", name)
            ctx.diagnostics.add_error(f"{name}: the VM could not be stopped", str(exc))
            return None
        finally:
            _deletes_first.deleted(name)
        log.info("delete %s: stopped", name)
        return None


class PipelineProvider(Provider):
    """The `local/pipeline` provider: no configuration, one resource type."""

    def get_model_prefix(self) -> str:
        return "pipeline_"

    def full_name(self) -> str:
        return PROVIDER_NAME

    def get_provider_schema(self, diags: Diagnostics) -> Schema:
        return Schema(version=1)

    def validate_config(self, diags: Diagnostics, config: Config) -> None:
        return None

    def configure_provider(self, diags: Diagnostics, config: Config) -> None:
        # Every command configures the provider before it touches a resource: an apply's
        # deletes that go first are known by then.
        _deletes_first.load()
        return None

    def get_data_sources(self) -> list[Any]:
        return []

    def get_resources(self) -> list[Any]:
        return [Instance]


def _value(state: State, key: str) -> Any:
    value = state.get(key)
    return DEFAULTS[key] if value is None else value


def _computed_state(record: qemu.VmRecord) -> dict[str, Any]:
    return {
        "pid": record.pid,
        "ssh_port": record.ssh_port,
        "http_port": record.http_port,
        "address": ADDRESS,
        "url": f"http://{ADDRESS}:{record.http_port}",
        "started_at": str(record.started_at),
    }


def _find(state: State) -> qemu.VmRecord | None:
    """The VM record of the instance in `state`, or None if there is none (or it is unreadable)."""
    try:
        return qemu.load(Path(state["vm_root"]), state["name"])
    except (UsageError, OSError, ValueError, KeyError):
        return None


def _wait_healthy(record: qemu.VmRecord, path: str, timeout: float) -> str | None:
    """Wait for the health check; None once it answers, else what went wrong."""
    deadline = time.monotonic() + timeout
    parent = os.getppid()
    last = "no answer yet"
    while True:
        if _stopping.is_set():
            return "Terraform was interrupted while the instance was starting"
        if os.getppid() != parent:
            return "Terraform went away while the instance was starting"
        if not qemu.is_running(record):
            return "QEMU exited while the instance was starting"
        left = deadline - time.monotonic()
        if left <= 0:
            return f"no healthy answer on {path} within {timeout:.0f} s (last: {last})"
        try:
            qemu.wait_http(
                record, path=path, timeout=min(HEALTH_POLL_SECONDS, left), any_status=True
            )
            # Healthy also means manageable: Ansible reaches instances over SSH.
            if qemu.ssh_banner(record):
                return None
            last = "the service answers, SSH does not greet yet"
            time.sleep(1)
        except Exception as exc:
            # qemu's message goes on with the serial tail, which the caller adds once at the end.
            last = str(exc).split(";", 1)[0] or type(exc).__name__


def _plain(line: str) -> str:
    """A console line without its colour codes."""
    return ANSI_ESCAPE.sub("", line)


class DeletesFirst:
    """Instances an apply deletes before it boots anything, named by the pipeline in the file
    DELETES_FIRST_ENV points at.

    Terraform runs the deletes and creates of one apply side by side, and the leaving instances
    must make room first, or the fleet would briefly hold more than max_surge extra. Each create
    waits until these deletes have returned (they take well under a second). The file names its
    apply: a serving provider takes a new list only from a new apply.
    """

    def __init__(self) -> None:
        self.names: set[str] = set()
        self.apply: str | None = None
        self.changed = threading.Condition()

    def load(self) -> None:
        """Take the list, if the pipeline wrote one for a new apply."""
        path = os.environ.get(DELETES_FIRST_ENV)
        if not path:
            return
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            apply, names = str(data["apply"]), [str(name) for name in data["names"]]
        except (OSError, ValueError, KeyError, TypeError):
            return
        with self.changed:
            if self.apply == apply:
                return
            self.apply = apply
            self.names = set(names)
            self.changed.notify_all()

    def deleted(self, name: str) -> None:
        with self.changed:
            self.names.discard(name)
            self.changed.notify_all()

    def wait(self, name: str) -> bool:
        """Wait until they have all been deleted; False if they never are."""
        with self.changed:
            if self.names:
                log.info("create %s: waiting for %s to go first", name, self.leaving())
            return self.changed.wait_for(
                lambda: not self.names or _stopping.is_set(), timeout=DELETES_FIRST_WAIT
            )

    def leaving(self) -> str:
        return ", ".join(sorted(self.names))


_deletes_first = DeletesFirst()


def _stop_quietly(record: qemu.VmRecord) -> None:
    try:
        qemu.stop(record, remove=True)
    except Exception:
        log.exception("stopping %s failed", record.name)


def _setup_logging() -> None:
    path = Path(os.environ.get(LOG_ENV) or DEFAULT_LOG)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Append, line-buffered: Terraform starts the provider several times per command, and each
    # process adds its lines to the same file.
    stream = path.open("a", encoding="utf-8", buffering=1)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, "%Y-%m-%dT%H:%M:%S"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)

    # Tracebacks the tf package prints go to stderr, which Terraform only shows with TF_LOG;
    # sending fd 2 to the same file keeps every diagnostic in one place.
    os.dup2(stream.fileno(), sys.stderr.fileno())


def _stop_inflight(why: str) -> None:
    """Stop every VM whose create has not returned: Terraform will never record it."""
    with _inflight_lock:
        records = list(_inflight.values())
    for record in records:
        log.warning("stopping %s (pid %s): %s", record.name, record.pid, why)
        _stop_quietly(record)


def _on_signal(signum: int, _frame: Any) -> None:
    # Terraform handles the interrupt itself (StopProvider, then it waits and writes its state).
    # Here: make waiting creates give up, and stop their VMs at once, because Terraform's plugin
    # client kills a provider that has not exited two seconds after it is done with it.
    _stopping.set()
    _stop_inflight(f"signal {signum} received")


def serve(folder: str) -> None:
    """Serve the provider on a Unix socket in `folder` for every Terraform command that
    attaches to it.

    Prints one JSON line on stdout (the socket, this pid, the protocol version) once it serves.
    It stops when stdin reaches its end (the pipeline is done, or died), when Terraform sends
    StopProvider (an interrupt), or on SIGINT/SIGTERM; creates still waiting then stop their VMs.
    """
    from concurrent import futures

    import grpc
    from tf.gen import (
        grpc_controller_pb2,
        grpc_controller_pb2_grpc,
        grpc_stdio_pb2_grpc,
        tfplugin_pb2_grpc,
    )
    from tf.provider import ProviderServicer

    class Servicer(ProviderServicer):  # type: ignore[misc]
        def StopProvider(self, request: Any, context: Any) -> Any:
            log.info("Terraform stops the provider (an interrupt)")
            _stopping.set()
            _stop_inflight("Terraform stopped the provider")
            return super().StopProvider(request, context)

    class Controller(grpc_controller_pb2_grpc.GRPCControllerServicer):  # type: ignore[misc]
        def Shutdown(self, request: Any, context: Any) -> Any:
            # Terraform's plugin client ends its use of an attached provider so; others may come.
            return grpc_controller_pb2.Empty()

    class Stdio(grpc_stdio_pb2_grpc.GRPCStdioServicer):  # type: ignore[misc]
        def StreamStdio(self, request: Any, context: Any) -> Any:
            return iter(())

    # One thread per call in flight: creates hold theirs for a whole boot, and a create that
    # waits for a delete to go first must never hold the thread that delete needs.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=SERVE_THREADS))
    tfplugin_pb2_grpc.add_ProviderServicer_to_server(Servicer(PipelineProvider()), server)
    grpc_controller_pb2_grpc.add_GRPCControllerServicer_to_server(Controller(), server)
    grpc_stdio_pb2_grpc.add_GRPCStdioServicer_to_server(Stdio(), server)
    socket_path = os.path.join(folder, "provider.sock")
    try:
        server.add_insecure_port(f"unix://{socket_path}")
        server.start()
        log.info("provider serving on %s", socket_path)
        print(json.dumps({"socket": socket_path, "pid": os.getpid(), "protocol": 6}), flush=True)
        threading.Thread(target=_until_stdin_ends, name="stdin", daemon=True).start()
        # Set by the end of stdin, by StopProvider or by a signal, whichever comes first.
        while not _stopping.wait(1.0):
            pass
        # Calls in flight (creates whose VMs were just stopped) end with their own errors.
        server.stop(grace=5.0).wait()
    finally:
        # The folder too, once empty: the pipeline removes it as well, unless it was killed.
        with contextlib.suppress(OSError):
            os.unlink(socket_path)
        with contextlib.suppress(OSError):
            os.rmdir(folder)


def _until_stdin_ends() -> None:
    # The file descriptor itself, not sys.stdin: a thread blocked inside a buffered reader at
    # interpreter shutdown holds its lock, and Python aborts ("could not acquire lock").
    with contextlib.suppress(OSError):
        while os.read(0, 4096):
            pass
    # The pipeline is done with the provider, or died: a create still waiting has lost its
    # caller, as when the serving ends any other way.
    _stopping.set()


def main(argv: list[str] | None = None) -> None:
    """Serve the provider to Terraform over the plugin protocol (`--serve`: to the pipeline)."""
    args = sys.argv if argv is None else argv
    _setup_logging()
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    log.info("provider starting (python %s)", sys.executable)
    try:
        if SERVE_FLAG in args[1:]:
            # The folder for the socket comes next (the pipeline makes it and removes it).
            after = args[args.index(SERVE_FLAG) + 1 :]
            serve(after[0] if after else tempfile.mkdtemp(prefix="pipeline-provider-"))
        else:
            runner.run_provider(PipelineProvider(), args)
    finally:
        # The serving loop ends on Terraform's StopProvider too (an interrupt): a create still
        # waiting at that point has lost its caller.
        _stopping.set()
        _stop_inflight("the provider is stopping")
        log.info("provider stopped")


if __name__ == "__main__":
    main()
