"""The local VM layer: base image, KVM probe, booting, reaching and stopping VMs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.errors import UsageError
from pipeline.targets.local import accel, qemu
from pipeline.targets.local.baseimage import BaseImage, BaseSpec, fingerprint, ssh_key

REPO = Path(__file__).resolve().parent.parent


# Fast tests: no VM.


def _fp(spec: BaseSpec, key: str = "ssh-ed25519 AAAA one", tool: str = "mmdebstrap 1.3.5") -> str:
    return fingerprint(spec, public_key=key, tool_version=tool)


def test_fingerprint_follows_every_input() -> None:
    base = _fp(BaseSpec())
    assert _fp(BaseSpec()) == base
    assert _fp(BaseSpec(packages=("nginx",))) != base
    assert _fp(BaseSpec(suite="trixie")) != base
    assert _fp(BaseSpec(disk_size="4G")) != base
    assert _fp(BaseSpec(), key="ssh-ed25519 AAAA two") != base
    assert _fp(BaseSpec(), tool="mmdebstrap 1.4.0") != base


def test_fingerprint_ignores_package_order_and_duplicates() -> None:
    assert _fp(BaseSpec(packages=("nginx", "jq"))) == _fp(BaseSpec(packages=("jq", "nginx", "jq")))
    # A base package asked for again changes nothing that goes into the image.
    assert _fp(BaseSpec(packages=("curl",))) == _fp(BaseSpec())


def test_ssh_key_is_created_once(tmp_path: Path) -> None:
    key = ssh_key(tmp_path)
    first = key.read_bytes()
    assert key.with_suffix(".pub").read_text().startswith("ssh-ed25519 ")
    assert key.stat().st_mode & 0o077 == 0
    assert ssh_key(tmp_path) == key
    assert key.read_bytes() == first


def test_accel_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PIPELINE_ACCEL", "tcg")
    monkeypatch.delenv("PIPELINE_TCG_CPU", raising=False)
    assert accel.accel_args(tmp_path) == ["-accel", "tcg", "-cpu", "qemu64"]
    monkeypatch.setenv("PIPELINE_TCG_CPU", "Haswell-noTSX")
    assert accel.accel_args(tmp_path) == ["-accel", "tcg", "-cpu", "Haswell-noTSX"]
    monkeypatch.setenv("PIPELINE_ACCEL", "kvm")
    assert accel.accel_args(tmp_path) == ["-accel", "kvm", "-cpu", "host"]
    monkeypatch.setenv("PIPELINE_ACCEL", "xen")
    with pytest.raises(UsageError, match="PIPELINE_ACCEL"):
        accel.accel_args(tmp_path)


@pytest.mark.skipif(not os.access("/dev/kvm", os.W_OK), reason="no /dev/kvm to probe")
def test_accel_uses_a_cached_verdict_for_this_qemu(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("PIPELINE_ACCEL", raising=False)
    verdict = {"kvm": True, "qemu": accel._qemu_version(), "reason": "test"}
    (tmp_path / "accel.json").write_text(json.dumps(verdict))
    assert accel.accel_args(tmp_path) == accel.KVM_ARGS

    # A verdict from another QEMU is probed again; with no kernel to probe, emulation.
    verdict["qemu"] = "QEMU emulator version 0.1"
    (tmp_path / "accel.json").write_text(json.dumps(verdict))
    assert accel.accel_args(tmp_path) == ["-accel", "tcg", "-cpu", accel.TCG_CPU]


def test_vms_boot_quietly_unless_the_image_says_how_loud() -> None:
    assert qemu.kernel_args("root=/dev/vda console=ttyS0") == "root=/dev/vda console=ttyS0 quiet"
    assert qemu.kernel_args("root=/dev/vda quiet") == "root=/dev/vda quiet"
    assert qemu.kernel_args("root=/dev/vda loglevel=7") == "root=/dev/vda loglevel=7"


def test_is_running_rejects_a_pid_that_is_not_our_qemu(tmp_path: Path) -> None:
    record = _record(tmp_path, pid=os.getpid())
    assert not qemu.is_running(record)
    assert not qemu.is_running(_record(tmp_path, pid=2**22 + 7))


def test_record_round_trips_through_json(tmp_path: Path) -> None:
    record = _record(tmp_path, pid=123, labels={"image": "web", "version": "1.0.0"})
    assert qemu.VmRecord.from_json(json.loads(json.dumps(record.to_json()))) == record


def test_the_cli_takes_the_kernel_command_line_from_a_base_or_a_baked_manifest(
    tmp_path: Path,
) -> None:
    base, baked, other, listed = (tmp_path / n for n in ("base", "baked", "other", "listed"))
    for folder, manifest in (
        (base, {"append": "root=/dev/vda base"}),
        (baked, {"boot": {"append": "root=/dev/vda baked", "kernel": "vmlinuz"}}),
        (other, {"boot": {"kernel": "vmlinuz"}}),
        (listed, ["root=/dev/vda"]),
    ):
        folder.mkdir()
        (folder / "manifest.json").write_text(json.dumps(manifest))
    assert qemu.manifest_append(base) == "root=/dev/vda base"
    assert qemu.manifest_append(baked) == "root=/dev/vda baked"
    with pytest.raises(UsageError, match=r"other/manifest.json names no kernel command line"):
        qemu.manifest_append(other)
    with pytest.raises(UsageError, match=r"listed/manifest.json names no kernel command line"):
        qemu.manifest_append(listed)
    with pytest.raises(UsageError, match=r"no .*/missing/manifest.json to take it from"):
        qemu.manifest_append(tmp_path / "missing")


def test_list_vms_of_a_missing_folder_is_empty(tmp_path: Path) -> None:
    assert qemu.list_vms(tmp_path / "nothing") == []


def _record(tmp_path: Path, *, pid: int, labels: dict[str, str] | None = None) -> qemu.VmRecord:
    return qemu.VmRecord(
        name="x",
        pid=pid,
        ssh_port=2222,
        http_port=8080,
        overlay=tmp_path / "x" / "overlay.qcow2",
        image=tmp_path / "disk.qcow2",
        serial_log=tmp_path / "x" / "serial.log",
        labels=labels or {},
        started_at=1.0,
    )


# Real VMs.


@pytest.fixture
def vm_root(tmp_path: Path) -> Iterator[Path]:
    """A folder for the test's VMs; whatever is still running there at the end is stopped."""
    root = tmp_path / "vms"
    yield root
    for record in qemu.list_vms(root):
        qemu.stop(record)


def _ssh(record: qemu.VmRecord, key: Path, command: str) -> str:
    done = subprocess.run(
        qemu.ssh_argv(record, key, command), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _boot(base: BaseImage, name: str, vm_root: Path, state_dir: Path) -> qemu.VmRecord:
    return qemu.boot(
        name,
        image=base.disk,
        kernel=base.kernel,
        initrd=base.initrd,
        append=base.append,
        vm_root=vm_root,
        state_dir=state_dir,
        hostname=f"host-{name}",
        labels={"test": name},
    )


@pytest.mark.vm
def test_base_image_is_complete(base_image: BaseImage) -> None:
    assert base_image.dir.name == base_image.fingerprint
    for path in (base_image.disk, base_image.kernel, base_image.initrd):
        assert path.stat().st_size > 1_000_000, path
    packages = base_image.manifest["packages"]
    for name in ("openssh-server", "python3", "sudo", "systemd", "curl", "ca-certificates"):
        assert name in packages
    assert not list(base_image.dir.parent.glob(".*")), "a temporary build folder was left"


@pytest.mark.vm
def test_two_vms_boot_with_their_own_names_and_host_keys(
    base_image: BaseImage, state_dir: Path, vm_root: Path
) -> None:
    key = ssh_key(state_dir)
    one = _boot(base_image, "one", vm_root, state_dir)
    two = _boot(base_image, "two", vm_root, state_dir)
    assert {one.ssh_port, one.http_port}.isdisjoint({two.ssh_port, two.http_port})
    assert qemu.is_running(one) and qemu.is_running(two)
    assert [r.name for r in qemu.list_vms(vm_root)] == ["one", "two"]

    qemu.wait_ssh(one, key)
    qemu.wait_ssh(two, key)
    assert _ssh(one, key, "hostname") == "host-one"
    assert _ssh(two, key, "hostname") == "host-two"
    host_key = "cat /etc/ssh/ssh_host_ed25519_key.pub"
    assert _ssh(one, key, host_key) != _ssh(two, key, host_key)
    assert _ssh(one, key, "cat /etc/machine-id") != _ssh(two, key, "cat /etc/machine-id")

    # No password anywhere: root's is locked and sshd refuses passwords.
    assert _ssh(one, key, "passwd -S root").split()[1] == "L"
    assert "passwordauthentication no" in _ssh(one, key, "sshd -T")

    # The service port reaches whatever listens on 8080 in the guest.
    _ssh(
        one,
        key,
        "mkdir -p /srv && echo ok > /srv/healthz && "
        "systemd-run --unit=web python3 -m http.server 8080 --directory /srv",
    )
    qemu.wait_http(one, "/healthz", timeout=60)

    for record in (one, two):
        qemu.stop(record)
        assert not qemu.is_running(record)
        assert not Path(f"/proc/{record.pid}").exists() or not _is_qemu(record.pid)
        assert not record.dir.exists()
    assert qemu.list_vms(vm_root) == []


@pytest.mark.vm
def test_a_vm_killed_from_outside_is_seen_as_gone(
    base_image: BaseImage, state_dir: Path, vm_root: Path
) -> None:
    record = _boot(base_image, "victim", vm_root, state_dir)

    # Too short a wait fails with the serial console in the message.
    with pytest.raises(qemu.VmError, match="serial log"):
        qemu.wait_ssh(record, ssh_key(state_dir), timeout=0)

    os.kill(record.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while qemu.is_running(record) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not qemu.is_running(record)
    with pytest.raises(qemu.VmError, match="died"):
        qemu.wait_ssh(record, ssh_key(state_dir), timeout=60)

    qemu.stop(record)
    assert not record.dir.exists()


@pytest.mark.vm
def test_cli_boots_lists_and_stops(base_image: BaseImage, state_dir: Path, vm_root: Path) -> None:
    def cli(*args: str) -> object:
        done = subprocess.run(
            [sys.executable, "-m", "pipeline.targets.local.qemu", "--vm-root", str(vm_root), *args],
            capture_output=True,
            text=True,
            timeout=400,
            cwd=REPO,
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    booted = cli(
        "boot", "cli", "--image", str(base_image.disk), "--state-dir", str(state_dir),
        "--hostname", "from-cli", "--label", "role=web", "--wait-ssh", "300",
    )  # fmt: skip
    assert isinstance(booted, dict)
    assert booted["labels"] == {"role": "web"}
    record = qemu.load(vm_root, "cli")
    assert _ssh(record, Path(booted["ssh_key"]), "hostname") == "from-cli"

    listing = cli("list")
    assert isinstance(listing, list)
    assert [(vm["name"], vm["running"]) for vm in listing] == [("cli", True)]

    assert cli("stop", "cli") == {"name": "cli", "stopped": True}
    assert not qemu.is_running(record)
    assert cli("list") == []


def _is_qemu(pid: int) -> bool:
    try:
        return b"qemu-system" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
