"""Terraform on the local target: the adapter, the embedded Terraform and the pipeline provider.

The fast tests run real Terraform (embedded, and a `terraform` binary when one is installed)
with the real provider, up to a plan. The `vm` tests apply it: real QEMU VMs whose health check
is a web server started from the kernel command line of the plain base image.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import operator
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from pipeline.errors import DeployFailed, MissingTool, ToolError
from pipeline.render import render
from pipeline.stages.fleet import moved_blocks
from pipeline.targets.local import qemu
from pipeline.targets.local.baseimage import BaseImage
from pipeline.tools import process
from pipeline.tools import terraform as tfmod
from pipeline.tools.terraform import Terraform

REPO = Path(__file__).resolve().parent.parent
TEMPLATES = REPO / "templates"
TEMPLATE = "terraform/local/main.tf.j2"

# The plain base image has no service of its own: a web server started from the kernel command
# line stands in for the baked one. systemd.run alone would make its target the default and
# skip networking, hence the explicit multi-user target that also wants the command's service.
HEALTH_SERVICE = (
    ' systemd.run="/usr/bin/python3 -m http.server 8080 --directory /tmp"'
    " systemd.unit=multi-user.target systemd.wants=kernel-command-line.service"
)


def fleet_config(*, health_timeout: int = 600) -> str:
    """The rendered fleet configuration of image `web` in environment `test`."""
    context = {
        "image": "web",
        "environment": "test",
        "memory": 768,
        "cpus": 1,
        "health_path": "/",
        "health_timeout": health_timeout,
        "http_guest_port": 8080,
    }
    return render(TEMPLATES, TEMPLATE, context)


@dataclass
class Fleet:
    """One environment's working directory, its Terraform and where its VMs live."""

    tf: Terraform
    vm_root: Path
    state_dir: Path
    log_dir: Path
    size: int = 1

    def vars(
        self, image: BaseImage, version: str, build_id: str, *, append: str | None = None
    ) -> dict[str, Any]:
        """Variables for a fleet of `size` instances on one version, named as the pipeline does."""
        append = image.append + HEALTH_SERVICE if append is None else append
        settings = hashlib.sha1(append.encode()).hexdigest()[:6]
        instance = {
            "image_version": version,
            "build_id": build_id,
            "image_path": str(image.disk),
            "kernel": str(image.kernel),
            "initrd": str(image.initrd),
            "append": append,
        }
        return {
            "instances": {
                f"web-test-{build_id.lower()}-{settings}-{index}": instance
                for index in range(self.size)
            },
            "vm_root": str(self.vm_root),
            "state_dir": str(self.state_dir),
        }

    def provider_events(self, event: str) -> dict[str, datetime]:
        """When the provider logged `event` (`healthy`, `delete`) for each instance name."""
        patterns = {
            "healthy": r"create (\S+): healthy after",
            "delete": r"delete (\S+): stopping pid",
        }
        found = {}
        text = (self.log_dir / tfmod.PROVIDER_LOG_NAME).read_text(encoding="utf-8")
        for line in text.splitlines():
            match = re.search(patterns[event], line)
            if match:
                found[short(match.group(1))] = datetime.fromisoformat(line.split(" ", 1)[0])
        return found


SETTINGS_HASH = re.compile(r"-[0-9a-f]{6}(-\d+)$")


def short(name: str | None) -> str:
    """An instance name without the hash of its settings: `web-test-b1-0`."""
    assert name is not None and SETTINGS_HASH.search(name), name
    return SETTINGS_HASH.sub(r"\1", name)


def make_fleet(
    root: Path,
    state_dir: Path,
    *,
    binary: str | None = None,
    size: int = 1,
    health_timeout: int = 600,
) -> Fleet:
    workdir = root / "env"
    workdir.mkdir(parents=True)
    config = fleet_config(health_timeout=health_timeout)
    (workdir / "main.tf").write_text(config, encoding="utf-8")
    log_dir = root / "logs"
    tf = Terraform(binary, workdir, root / "plugins", log_dir)
    return Fleet(tf=tf, vm_root=root / "vms", state_dir=state_dir, log_dir=log_dir, size=size)


def qemu_pids(vm_root: Path) -> list[int]:
    """Live (non-zombie) QEMU processes whose command line names a path under `vm_root`."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmdline = (proc / "cmdline").read_bytes()
            state = (proc / "stat").read_text().rsplit(")", 1)[-1].split()[0]
            if b"qemu-system" in cmdline and str(vm_root).encode() in cmdline and state != "Z":
                pids.append(int(proc.name))
    return pids


def http_status(url: str) -> int:
    with urllib.request.urlopen(url, timeout=10) as response:
        return int(response.status)


@pytest.fixture
def fake_image(tmp_path: Path) -> BaseImage:
    """Files that exist where an image would be: enough to plan, never booted."""
    folder = tmp_path / "image"
    folder.mkdir()
    for name in ("disk.qcow2", "vmlinuz", "initrd.img"):
        (folder / name).write_bytes(b"not booted by these tests")
    return BaseImage(
        dir=folder,
        disk=folder / "disk.qcow2",
        kernel=folder / "vmlinuz",
        initrd=folder / "initrd.img",
        fingerprint="0" * 16,
        append="root=/dev/vda rw console=ttyS0",
    )


# -- the adapter's plumbing ---------------------------------------------------------------------


def test_cli_config_points_the_pipeline_provider_at_the_plugin_dir(tmp_path: Path) -> None:
    text = tfmod.cli_config_text(tmp_path / "plugins")

    assert f'"local/pipeline" = "{tmp_path / "plugins"}"' in text
    assert re.search(r"provider_installation \{\s+dev_overrides \{", text)
    assert "direct {}" in text


def test_plugin_script_runs_this_python_and_is_executable(tmp_path: Path) -> None:
    script = tfmod.write_plugin(tmp_path)

    assert script.name == "terraform-provider-pipeline"
    assert os.access(script, os.X_OK)
    assert f"exec '{sys.executable}' -m pipeline.targets.local.provider" in script.read_text()


def test_every_run_gets_its_config_and_no_update_check(tmp_path: Path) -> None:
    tf = Terraform(None, tmp_path / "env", tmp_path / "plugins", tmp_path / "logs")

    env = tf.env()

    assert env["CHECKPOINT_DISABLE"] == "1"
    assert env["TF_IN_AUTOMATION"] == "1"
    config = Path(env["TF_CLI_CONFIG_FILE"]).read_text()
    assert config == tfmod.cli_config_text(tmp_path / "plugins")
    assert (tmp_path / "plugins" / "terraform-provider-pipeline").exists()


def test_embedded_is_the_default_and_a_missing_binary_is_named() -> None:
    assert tfmod.command_for(None) == [sys.executable, "-m", "pipeline.tools.embedded_terraform"]
    with pytest.raises(MissingTool, match="no-such-terraform"):
        tfmod.command_for("no-such-terraform")


def test_resource_change_words() -> None:
    def change(*actions: str) -> tfmod.ResourceChange:
        return tfmod.ResourceChange("a.b[0]", "a", 0, actions, None, {"name": "n"})

    assert change("create", "delete").action == "replace"
    assert change("create", "delete").create_before_destroy
    assert not change("delete", "create").create_before_destroy
    assert change("delete", "create").action == "replace"
    assert change("no-op").action == "no-op"
    assert change("create").name == "n"


# -- the embedded Terraform as a command line ---------------------------------------------------


def embedded(args: list[str], cwd: Path, **kwargs: Any) -> subprocess.Popen[str]:
    env = {**os.environ, "CHECKPOINT_DISABLE": "1", "TF_CLI_CONFIG_FILE": os.devnull}
    argv = [*tfmod.command_for(None), *args]
    return subprocess.Popen(argv, cwd=cwd, env=env, text=True, **kwargs)


def test_embedded_terraform_passes_output_and_exit_code_through(tmp_path: Path) -> None:
    ok = embedded(["version"], tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, _ = ok.communicate(timeout=60)
    bad = embedded(["plan", "-no-color", "-input=false"], tmp_path,
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    bad_out, err = bad.communicate(timeout=60)

    assert ok.returncode == 0
    assert re.match(r"Terraform v1\.\d+\.\d+", out)
    assert bad.returncode == 1
    assert "Error: No configuration files" in err
    assert "Error" not in bad_out


def test_sigterm_stops_embedded_terraform_gracefully_with_state_written(tmp_path: Path) -> None:
    (tmp_path / "main.tf").write_text(
        'resource "terraform_data" "slow" {\n'
        '  provisioner "local-exec" {\n'
        '    command = "sleep 60"\n'
        "  }\n"
        "}\n"
    )
    init = embedded(["init", "-no-color", "-input=false"], tmp_path, stdout=subprocess.DEVNULL)
    assert init.wait(timeout=60) == 0
    apply = embedded(
        ["apply", "-no-color", "-input=false", "-auto-approve"], tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    assert apply.stdout is not None
    for line in apply.stdout:
        if "Executing:" in line:
            break
    started = time.monotonic()
    os.killpg(apply.pid, signal.SIGTERM)
    rest = apply.stdout.read()
    code = apply.wait(timeout=30)

    assert code != 0
    assert time.monotonic() - started < 20
    assert "Gracefully shutting down" in rest
    state = json.loads((tmp_path / "terraform.tfstate").read_text())
    statuses = [i.get("status") for r in state["resources"] for i in r["instances"]]
    assert statuses == ["tainted"]


# -- plans with the real provider, no VM --------------------------------------------------------


def test_plan_creates_every_instance_with_its_version_in_the_name(
    tmp_path: Path, fake_image: BaseImage, state_dir: Path
) -> None:
    fleet = make_fleet(tmp_path, state_dir, size=2)

    plan = fleet.tf.plan(fleet.vars(fake_image, "1.0.0", "b100"))

    instances = [c for c in plan.changes if c.type == "pipeline_instance"]
    assert [c.action for c in instances] == ["create", "create"]
    assert [short(c.name) for c in instances] == ["web-test-b100-0", "web-test-b100-1"]
    assert [c.type for c in plan.changes if c.type != "pipeline_instance"] == []
    assert plan.drift == []
    assert plan.path.exists()
    assert [i["version"] for i in plan.outputs["instances"]] == ["1.0.0", "1.0.0"]
    assert fleet.tf.state_instances() == []


def test_provider_rejects_an_image_that_does_not_exist(
    tmp_path: Path, fake_image: BaseImage, state_dir: Path
) -> None:
    fleet = make_fleet(tmp_path, state_dir)
    fake_image.disk.unlink()

    with pytest.raises(ToolError, match="terraform plan") as caught:
        fleet.tf.plan(fleet.vars(fake_image, "1.0.0", "b1"))

    assert "no such file" in "\n".join(caught.value.tail)


def test_a_build_id_unfit_for_a_name_is_refused(
    tmp_path: Path, fake_image: BaseImage, state_dir: Path
) -> None:
    fleet = make_fleet(tmp_path, state_dir)

    with pytest.raises(ToolError) as caught:
        fleet.tf.plan(fleet.vars(fake_image, "1.0.0", "../b1"))

    assert "Instance names are host names" in " ".join("\n".join(caught.value.tail).split())


def provider_starts(fleet: Fleet) -> list[int]:
    """The pid of every provider process that has started for this fleet, in order."""
    path = fleet.log_dir / tfmod.PROVIDER_LOG_NAME
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    return [int(pid) for pid in re.findall(r"pid=(\d+) INFO provider starting", text)]


def gone(pid: int) -> bool:
    """Whether process `pid` has ended: a zombie counts, once no thread of it runs any more
    (its first thread is a zombie while the others still close its files)."""
    try:
        threads = len(list(Path(f"/proc/{pid}/task").iterdir()))
    except OSError:
        return True
    return process.start_ticks(pid) is None and threads <= 1


def test_a_served_provider_answers_every_command_and_ends_with_them(
    tmp_path: Path, fake_image: BaseImage, state_dir: Path
) -> None:
    fleet = make_fleet(tmp_path, state_dir, size=2)
    variables = fleet.vars(fake_image, "1.0.0", "b100")
    fleet.tf.plan(variables)
    # Alone, Terraform starts the provider itself, several times for one plan and its show.
    assert len(provider_starts(fleet)) >= 3

    before = provider_starts(fleet)
    with fleet.tf.serving():
        first = fleet.tf.plan(variables)
        again = fleet.tf.plan(variables)
        served = provider_starts(fleet)[len(before) :]
        assert len(served) == 1
    [pid] = served

    assert [short(c.name) for c in first.changes] == ["web-test-b100-0", "web-test-b100-1"]
    assert again.changes == first.changes
    assert provider_starts(fleet) == before + served
    assert gone(pid)
    assert tfmod.REATTACH_ENV not in fleet.tf.env()


@pytest.mark.parametrize("odd", ["too long", "percent", "not UTF-8"])
def test_a_temporary_directory_unfit_for_a_socket_leaves_both_providers_working(
    tmp_path: Path,
    fake_image: BaseImage,
    state_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
    odd: str,
) -> None:
    """Both providers listen on a Unix socket in a folder of the temporary directory: a
    socket's path holds at most 107 bytes, and gRPC reads it as a URI."""
    fleet = make_fleet(tmp_path, state_dir, size=1)
    variables = fleet.vars(fake_image, "1.0.0", "b100")
    # Short enough but for what is odd about it: pytest's own folder is long already.
    short_root = Path(tempfile.mkdtemp(prefix="tf-", dir="/tmp"))
    request.addfinalizer(lambda: shutil.rmtree(short_root))
    unfit = {
        "too long": tmp_path / ("t" * (100 - len(str(tmp_path)))),
        "percent": short_root / "p%41",
        "not UTF-8": short_root / os.fsdecode(b"\xff\xfe"),
    }[odd]
    unfit.mkdir()
    monkeypatch.setenv("TMPDIR", str(unfit))
    monkeypatch.setattr(tempfile, "tempdir", None)
    assert tempfile.gettempdir() == str(unfit)

    own = fleet.tf.plan(variables)
    with fleet.tf.serving():
        served = fleet.tf.plan(variables)

    assert [short(c.name) for c in own.changes] == ["web-test-b100-0"]
    assert served.changes == own.changes
    assert list(unfit.iterdir()) == []


def test_a_served_provider_that_dies_leaves_terraform_to_start_its_own(
    tmp_path: Path, fake_image: BaseImage, state_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fleet = make_fleet(tmp_path, state_dir)
    variables = fleet.vars(fake_image, "1.0.0", "b1")

    with fleet.tf.serving():
        fleet.tf.plan(variables)
        [pid] = provider_starts(fleet)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while not gone(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        plan = fleet.tf.plan(variables)

    assert [c.action for c in plan.changes] == ["create"]
    assert len(provider_starts(fleet)) > 1
    # The killed provider could not remove its socket's folder; the pipeline did.
    assert not Path(served_socket(fleet)).parent.exists()
    assert "the Terraform provider the pipeline started was killed by signal 9" in caplog.text
    assert "Terraform starts its own from now on" in caplog.text


def served_socket(fleet: Fleet) -> str:
    text = (fleet.log_dir / tfmod.PROVIDER_LOG_NAME).read_text(encoding="utf-8")
    [path] = re.findall(r"INFO provider serving on (\S+)", text)
    return path


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_served_provider_stopped_by_a_signal_exits_cleanly(
    tmp_path: Path, state_dir: Path, signum: int
) -> None:
    fleet = make_fleet(tmp_path, state_dir)

    with fleet.tf.serving():
        fleet.tf.env()
        [pid] = provider_starts(fleet)
        os.kill(pid, signum)
        deadline = time.monotonic() + 30
        while not gone(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gone(pid)

    text = (fleet.log_dir / tfmod.PROVIDER_LOG_NAME).read_text(encoding="utf-8")
    assert text.rstrip().endswith("INFO provider stopped"), text[-2000:]
    assert "Fatal Python error" not in text


def test_an_unwritable_deletes_first_file_stops_the_apply_with_its_name(
    tmp_path: Path, state_dir: Path
) -> None:
    fleet = make_fleet(tmp_path, state_dir)
    listed = fleet.tf.workdir / tfmod.DELETES_FIRST_NAME
    listed.mkdir()
    plan = tfmod.Plan(path=fleet.tf.workdir / "none.tfplan", changes=[], drift=[], outputs={})

    with pytest.raises(DeployFailed, match=f"cannot write {re.escape(str(listed))}: "):
        fleet.tf.apply(plan)

    assert sorted(p.name for p in fleet.tf.workdir.iterdir()) == [listed.name, "main.tf"]


SERVING_SCRIPT = """
import sys, time
from pathlib import Path
from pipeline.tools.terraform import Terraform
root = Path(sys.argv[1])
tf = Terraform(None, root / "env", root / "plugins", root / "logs")
with tf.serving():
    tf.env()
    print("serving", flush=True)
    time.sleep(600)
"""


def test_a_served_provider_ends_when_the_pipeline_is_killed(tmp_path: Path) -> None:
    pipeline = subprocess.Popen(
        [sys.executable, "-c", SERVING_SCRIPT, str(tmp_path)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    try:
        assert pipeline.stdout is not None and pipeline.stdout.readline() == "serving\n"
        log = (tmp_path / "logs" / tfmod.PROVIDER_LOG_NAME).read_text(encoding="utf-8")
        [pid] = [int(p) for p in re.findall(r"pid=(\d+) INFO provider serving", log)]
        assert not gone(pid)
        pipeline.kill()
        pipeline.wait()
        # Its own session keeps the provider out of the pipeline's signals: the closed stdin
        # alone must end it.
        deadline = time.monotonic() + 30
        while not gone(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert gone(pid)
        [socket_path] = re.findall(r"INFO provider serving on (\S+)", log)
        assert not Path(socket_path).parent.exists()
    finally:
        pipeline.kill()
        pipeline.wait()


def test_the_provider_takes_an_applys_deletes_first_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.targets.local import provider

    listed = tmp_path / tfmod.DELETES_FIRST_NAME
    monkeypatch.setenv(tfmod.DELETES_FIRST_ENV, str(listed))
    deletes = provider.DeletesFirst()

    listed.write_text(json.dumps({"apply": "a", "names": ["old-0", "old-1"]}))
    deletes.load()
    assert deletes.names == {"old-0", "old-1"}
    deletes.deleted("old-0")
    # Another command of the same apply (or a plan between) configures the provider again.
    deletes.load()
    assert deletes.names == {"old-1"}
    listed.write_text(json.dumps({"apply": "b", "names": []}))
    deletes.load()
    assert deletes.names == set()
    assert deletes.wait("new-0")


def state_with(fleet: Fleet, image: BaseImage, *, schema_version: int = 1) -> dict[str, Any]:
    """A state file such as an apply writes: one instance and a deposed object of the same key
    (an old instance whose delete failed after its replacement came up)."""

    def attributes(port: int, version: str) -> dict[str, Any]:
        return {
            "address": "127.0.0.1", "append": image.append, "cpus": 1, "health_path": "/",
            "health_timeout": 600, "http_guest_port": 8080, "http_port": port,
            "image": str(image.disk), "image_version": version, "initrd": str(image.initrd),
            "kernel": str(image.kernel), "labels": {"build_id": "b1", "environment": "test"},
            "memory": 768, "name": "web-test-b1-0", "pid": 4242, "ssh_port": port + 1,
            "started_at": "1796476485.3", "state_dir": str(fleet.state_dir),
            "url": f"http://127.0.0.1:{port}", "vm_root": str(fleet.vm_root),
        }  # fmt: skip

    def instance(port: int, version: str, deposed: str | None = None) -> dict[str, Any]:
        item = {
            "index_key": "web-test-b1-0",
            "schema_version": schema_version,
            "attributes": attributes(port, version),
            "sensitive_attributes": [],
            "create_before_destroy": True,
        }
        return {**item, "deposed": deposed} if deposed else item

    return {
        "version": 4,
        "terraform_version": "1.15.5",
        "serial": 3,
        "lineage": "0f4c1b1e-8d0a-4c5e-9d36-1f5a3b0c7e21",
        "outputs": {},
        "resources": [
            {
                "mode": "managed",
                "type": "pipeline_instance",
                "name": "fleet",
                "provider": 'provider["registry.terraform.io/local/pipeline"]',
                "instances": [instance(40001, "2.0.0"), instance(40003, "1.0.0", "1a2b3c4d")],
            }
        ],
        "check_results": None,
    }


def test_the_state_file_reads_as_terraform_shows_it(
    tmp_path: Path, fake_image: BaseImage, state_dir: Path
) -> None:
    """Rollouts read the state from the file after every step; `terraform show -json` is what
    it must agree with, a deposed object included."""
    fleet = make_fleet(tmp_path, state_dir)
    state = fleet.tf.workdir / tfmod.STATE_FILE_NAME
    state.write_text(json.dumps(state_with(fleet, fake_image)), encoding="utf-8")

    from_file = tfmod.read_state_file(state)
    shown = fleet.tf._run(["show", "-json", "-no-color"], what="terraform show")
    values = tfmod._json_object(shown)["values"]["root_module"]["resources"]

    assert from_file is not None
    key = operator.itemgetter("address", "deposed")
    assert sorted(from_file, key=lambda i: str(key(i))) == sorted(
        (
            {**r["values"], "address": r["address"], "index": r["index"],
             "deposed": r.get("deposed_key")}
            for r in values
        ),
        key=lambda i: str(key(i)),
    )  # fmt: skip
    assert [(i["http_port"], i["deposed"]) for i in from_file] == [
        (40001, None),
        (40003, "1a2b3c4d"),
    ]
    assert fleet.tf.state_instances() == from_file


def test_a_state_file_of_another_schema_or_half_written_goes_through_terraform(
    tmp_path: Path, fake_image: BaseImage, state_dir: Path
) -> None:
    fleet = make_fleet(tmp_path, state_dir)
    state = fleet.tf.workdir / tfmod.STATE_FILE_NAME
    text = json.dumps(state_with(fleet, fake_image, schema_version=0))
    state.write_text(text, encoding="utf-8")
    assert tfmod.read_state_file(state) is None

    state.write_text(json.dumps(state_with(fleet, fake_image))[:-40], encoding="utf-8")
    assert tfmod.read_state_file(state) is None
    with pytest.raises(ToolError, match="terraform show"):
        fleet.tf.state_instances()  # Terraform refuses a broken state file too


@pytest.mark.skipif(shutil.which("terraform") is None, reason="no terraform binary installed")
def test_a_terraform_binary_plans_the_same_fleet(
    tmp_path: Path, fake_image: BaseImage, state_dir: Path
) -> None:
    fleet = make_fleet(tmp_path, state_dir, binary="terraform")

    plan = fleet.tf.plan(fleet.vars(fake_image, "1.0.0", "b1"))

    assert re.match(r"\d+\.\d+\.\d+", fleet.tf.version())
    instances = [c for c in plan.changes if c.type == "pipeline_instance"]
    assert [(c.action, short(c.name)) for c in instances] == [("create", "web-test-b1-0")]


# -- real VMs -----------------------------------------------------------------------------------


@pytest.fixture
def vm_fleet(tmp_path: Path, state_dir: Path) -> Iterator[Fleet]:
    """A fleet whose VMs are all stopped afterwards, whatever the test did."""
    fleet = make_fleet(tmp_path, state_dir)
    try:
        yield fleet
    finally:
        for record in qemu.list_vms(fleet.vm_root):
            qemu.stop(record, remove=True)
        for pid in qemu_pids(fleet.vm_root):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.vm
def test_a_wave_adds_beside_the_old_then_removes_it_and_drift_is_recreated(
    vm_fleet: Fleet, base_image: BaseImage
) -> None:
    tf = vm_fleet.tf
    # As the pipeline runs it: one provider serves every command.
    with tf.serving():
        # Version A: one healthy instance.
        started = time.monotonic()
        tf.apply(tf.plan(vm_fleet.vars(base_image, "1.0.0", "a1")))
        outputs = tf.outputs()
        first_apply = time.monotonic() - started
        [old] = outputs["instances"]
        assert short(old["name"]) == "web-test-a1-0"
        assert http_status(old["url"]) == 200
        [old_record] = qemu.list_vms(vm_fleet.vm_root)
        assert qemu.is_running(old_record)
        assert not tf.plan(vm_fleet.vars(base_image, "1.0.0", "a1")).has_changes

        # A state from the count-based configuration of earlier releases (fleet[0]) moves to the
        # instance's name with the pipeline's `moved` blocks: the VM is kept, not replaced.
        state_path = tf.workdir / "terraform.tfstate"
        state = json.loads(state_path.read_text())
        for resource in state["resources"]:
            for instance in resource["instances"]:
                instance["index_key"] = 0
        state_path.write_text(json.dumps(state))
        [counted] = tf.state_instances()
        assert counted["index"] == 0
        (tf.workdir / "moved.tf").write_text(moved_blocks([counted]))
        plan = tf.plan(vm_fleet.vars(base_image, "1.0.0", "a1"))
        assert [(c.action, short(c.name)) for c in plan.changes] == [("no-op", "web-test-a1-0")]
        tf.apply(plan)
        (tf.workdir / "moved.tf").unlink()
        [moved] = tf.state_instances()
        assert moved["index"] == old["name"]
        assert qemu.list_vms(vm_fleet.vm_root)[0].pid == old_record.pid
        assert moved_blocks([moved]) == ""

        # Version B beside A: the plan creates B and leaves A alone (the pipeline's wave).
        both = vm_fleet.vars(base_image, "1.0.0", "a1")
        both["instances"].update(vm_fleet.vars(base_image, "2.0.0", "b2")["instances"])
        plan = tf.plan(both)
        assert [(c.action, short(c.name)) for c in plan.changes] == [
            ("no-op", "web-test-a1-0"),
            ("create", "web-test-b2-0"),
        ]
        started = time.monotonic()
        tf.apply(plan)
        outputs = tf.outputs()
        replace_seconds = time.monotonic() - started
        assert sorted(i["version"] for i in outputs["instances"]) == ["1.0.0", "2.0.0"]
        assert qemu.is_running(old_record)

        # Then B alone: A is deleted, really: from the state, from the disk, from the processes.
        plan = tf.plan(vm_fleet.vars(base_image, "2.0.0", "b2"))
        assert [(c.action, short(c.name)) for c in plan.changes] == [
            ("delete", "web-test-a1-0"),
            ("no-op", "web-test-b2-0"),
        ]
        tf.apply(plan)
        outputs = tf.outputs()
        [new] = outputs["instances"]
        assert new["version"] == "2.0.0"
        assert http_status(new["url"]) == 200
        assert [(short(i["name"]), i["deposed"]) for i in tf.state_instances()] == [
            ("web-test-b2-0", None)
        ]
        assert not qemu.is_running(old_record)
        assert [short(r.name) for r in qemu.list_vms(vm_fleet.vm_root)] == ["web-test-b2-0"]

        # Killed from outside: drift, and the next apply brings it back.
        [victim] = qemu.list_vms(vm_fleet.vm_root)
        os.kill(victim.pid, signal.SIGKILL)
        plan = tf.plan(vm_fleet.vars(base_image, "2.0.0", "b2"))
        assert [(d.address, d.action) for d in plan.drift] == [
            (f'pipeline_instance.fleet["{victim.name}"]', "delete")
        ]
        assert [(c.action, short(c.name)) for c in plan.changes if c.action != "no-op"] == [
            ("create", "web-test-b2-0")
        ]
        tf.apply(plan)
        outputs = tf.outputs()
        [back] = qemu.list_vms(vm_fleet.vm_root)
        assert back.pid != victim.pid
        assert qemu.is_running(back)
        assert http_status(outputs["instances"][0]["url"]) == 200

        # Destroy leaves nothing running.
        tf.destroy(vm_fleet.vars(base_image, "2.0.0", "b2"))
        assert tf.state_instances() == []
        assert qemu_pids(vm_fleet.vm_root) == []
        print(f"\napply of 1 instance: {first_apply:.0f} s; replace: {replace_seconds:.0f} s")


@pytest.mark.vm
@pytest.mark.parametrize("served", [False, True], ids=["own-provider", "served-provider"])
def test_interrupted_apply_leaves_no_vm_and_no_instance_in_state(
    vm_fleet: Fleet, base_image: BaseImage, served: bool
) -> None:
    tf = vm_fleet.tf
    with tf.serving() if served else contextlib.nullcontext():
        interrupted_apply(vm_fleet, base_image)

    assert qemu_pids(vm_fleet.vm_root) == []
    assert tf.state_instances() == []
    assert qemu.list_vms(vm_fleet.vm_root) == []


def interrupted_apply(vm_fleet: Fleet, base_image: BaseImage) -> None:
    """Stop an apply as Ctrl-C does once its provider has booted the VM."""
    tf = vm_fleet.tf
    plan = tf.plan(vm_fleet.vars(base_image, "1.0.0", "i1"))
    provider_log = vm_fleet.log_dir / tfmod.PROVIDER_LOG_NAME

    # As process.run stops a command on Ctrl-C: SIGTERM to its whole process group (a served
    # provider is not in it: Terraform stops that one).
    apply = subprocess.Popen(
        [*tf.command, "apply", "-input=false", "-no-color", plan.path.name],
        cwd=tf.workdir, env={**os.environ, **tf.env()}, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not re.search(
            r"create web-test-i1-[0-9a-f]{6}-0: pid", provider_log.read_text(encoding="utf-8")
        ):
            assert time.monotonic() < deadline, "the provider never booted the VM"
            time.sleep(0.5)
        assert qemu_pids(vm_fleet.vm_root) != []
        os.killpg(apply.pid, signal.SIGTERM)
        output, _ = apply.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(apply.pid, signal.SIGKILL)

    assert apply.returncode != 0
    assert "Interrupt received" in output


@pytest.mark.vm
def test_an_instance_that_never_gets_healthy_is_stopped_and_explained(
    tmp_path: Path, state_dir: Path, base_image: BaseImage
) -> None:
    fleet = make_fleet(tmp_path, state_dir, health_timeout=15)
    plain = fleet.vars(base_image, "1.0.0", "h1", append=base_image.append)

    try:
        with pytest.raises(ToolError, match="terraform apply") as caught:
            fleet.tf.apply(fleet.tf.plan(plain))
        log = Path(str(caught.value).split("full output: ")[1].split(")")[0])
        # Terraform wraps diagnostics to its terminal width.
        output = " ".join(log.read_text().split())
    finally:
        for record in qemu.list_vms(fleet.vm_root):
            qemu.stop(record, remove=True)

    assert re.search(r"web-test-h1-[0-9a-f]{6}-0: the instance never became healthy", output)
    assert "no healthy answer on / within 15 s" in output
    assert "Last lines of its serial console" in output
    assert qemu_pids(fleet.vm_root) == []
    assert fleet.tf.state_instances() == []
