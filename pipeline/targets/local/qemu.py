"""The one way a local VM is started, found, checked and stopped.

Every VM (Packer's build VM, Molecule's test VM, a fleet instance) is a daemonized QEMU over a
copy-on-write overlay in `vm_root/<name>/`, with user-mode networking whose SSH and service
ports are forwarded on 127.0.0.1 only. Its record (`record.json`: pid, ports, paths, labels)
lets any later command, in any process, find it, check it and stop it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError, ToolError, UsageError
from pipeline.files import write_json_atomic
from pipeline.targets.local.accel import accel_args
from pipeline.tools import process
from pipeline.tools.process import run

log = logging.getLogger(__name__)

QEMU = "qemu-system-x86_64"
# Under emulation one Debian boot to SSH takes 22-27 s alone; several at once on two cores take
# several times that.
DEFAULT_TIMEOUT = 300.0
PORT_ATTEMPTS = 5
# What systemd.hostname= accepts and a shell-free kernel command line can carry.
HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,62})")
STOP_GRACE = 10.0
# How often a booting VM is asked again: an HTTP request costs next to nothing, while each SSH
# try starts a client; every second waited here is a second added to a rollout's wave.
HTTP_POLL_SECONDS = 0.5
SSH_POLL_SECONDS = 1.0
# Under emulation each character on the serial console costs the guest CPU time: a guest
# without the base image's trims answered HTTP after 33.8 s with a loud console and 23.6 s with
# a quiet one; the trimmed guest gains less (bench/boot.py). Errors still reach the console.
QUIET = "quiet"
SERIAL_TAIL = 20
SSH_OPTIONS = [
    "-o", "BatchMode=yes",
    "-o", "StrictHostKeyChecking=no",
    "-o", "UserKnownHostsFile=/dev/null",
    "-o", "LogLevel=ERROR",
    "-o", "ConnectTimeout=10",
]  # fmt: skip


class VmError(PipelineError):
    """A VM did not start, did not come up in time, or died; carries its serial log's tail."""

    exit_code = ToolError.exit_code


@dataclass
class VmRecord:
    """What is known about one running VM: enough to find, reach, check and stop it."""

    name: str
    pid: int
    ssh_port: int
    http_port: int
    overlay: Path
    image: Path
    serial_log: Path
    labels: dict[str, str] = field(default_factory=dict)
    started_at: float = 0.0

    @property
    def dir(self) -> Path:
        """The VM's own folder: overlay, serial log, pidfile and record."""
        return self.overlay.parent

    def to_json(self) -> dict[str, Any]:
        """The record as plain JSON types (paths as strings)."""
        data = dataclasses.asdict(self)
        for key in ("overlay", "image", "serial_log"):
            data[key] = str(data[key])
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VmRecord:
        """Read a record written by `to_json`."""
        return cls(
            name=data["name"],
            pid=int(data["pid"]),
            ssh_port=int(data["ssh_port"]),
            http_port=int(data["http_port"]),
            overlay=Path(data["overlay"]),
            image=Path(data["image"]),
            serial_log=Path(data["serial_log"]),
            labels=dict(data.get("labels") or {}),
            started_at=float(data.get("started_at") or 0.0),
        )


# The first bytes of every qcow2 file (QEMU's "QFI\xfb"); the pipeline's disks are all qcow2.
QCOW2_MAGIC = b"QFI\xfb"


def disk_problem(disk: Path) -> str:
    """Why `disk` cannot be booted as a qcow2 image, or "" if it looks like one.

    Reads four bytes: cheap enough to ask before anything is started, so that a damaged or
    replaced file is named here rather than by qemu-img deep inside Molecule or Terraform.
    """
    try:
        with disk.open("rb") as handle:
            head = handle.read(len(QCOW2_MAGIC))
    except FileNotFoundError:
        return f"{disk} does not exist"
    except OSError as exc:
        return f"{disk} cannot be read: {exc.strerror or exc}"
    if head != QCOW2_MAGIC:
        return f"{disk} is not a qcow2 disk image (it starts with {head!r})"
    return ""


def boot(
    name: str,
    *,
    image: Path,
    kernel: Path,
    initrd: Path,
    append: str,
    vm_root: Path,
    state_dir: Path,
    http_guest_port: int = 8080,
    memory: int = 1024,
    cpus: int = 2,
    labels: dict[str, str] | None = None,
    hostname: str | None = None,
) -> VmRecord:
    """Start VM `name` over a fresh overlay of `image`; return its record once QEMU runs.

    The VM is not yet reachable when this returns: call `wait_ssh` or `wait_http`. A
    `hostname` is set at boot through the `systemd.hostname=` kernel argument.
    """
    if not name or "/" in name or name.startswith("."):
        raise UsageError(f"not a usable VM name: {name!r}")
    if hostname is not None and not HOSTNAME.fullmatch(hostname):
        raise UsageError(f"not a usable hostname for VM {name}: {hostname!r}")
    # Absolute paths only: QEMU changes to / when it daemonizes, and is_running matches the
    # overlay's path in QEMU's command line against the record.
    vm_dir = vm_root.resolve() / name
    image, kernel, initrd = image.resolve(), kernel.resolve(), initrd.resolve()
    _claim(vm_dir)

    try:
        overlay = vm_dir / "overlay.qcow2"
        run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2",
             "-b", str(image), str(overlay)],
            what=f"create the overlay of VM {name}",
        )  # fmt: skip
        append = kernel_args(append)
        if hostname:
            append = f"{append} systemd.hostname={hostname}"
        accel = accel_args(state_dir, kernel=kernel)
        record = _start(
            name, vm_dir, overlay, image, kernel, initrd, append, accel,
            http_guest_port=http_guest_port, memory=memory, cpus=cpus, labels=labels or {},
        )  # fmt: skip
    except BaseException:
        _kill_from_pidfile(vm_dir)
        shutil.rmtree(vm_dir, ignore_errors=True)
        raise
    log.info("[%s] started: pid %d, ssh 127.0.0.1:%d", name, record.pid, record.ssh_port)
    return record


def kernel_args(append: str) -> str:
    """The kernel command line a VM boots with: the image's own, kept quiet on the console
    unless it already says how loud to be."""
    words = append.split()
    if QUIET in words or any(word.startswith("loglevel=") for word in words):
        return append
    return f"{append} {QUIET}".strip()


def wait_ssh(record: VmRecord, key: Path, timeout: float = DEFAULT_TIMEOUT) -> float:
    """Wait until root can log in over SSH and run `true`; return the seconds it took."""
    started = time.monotonic()
    last = ""
    while True:
        done = subprocess.run(
            ssh_argv(record, key, "true"),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode == 0:
            return time.monotonic() - started
        last = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        _check_progress(record, started, timeout, f"SSH login ({last})")
        time.sleep(SSH_POLL_SECONDS)


def ssh_banner(record: VmRecord, timeout: float = 5.0) -> bool:
    """Whether the guest's SSH server greets on the forwarded port (no login needed).

    QEMU's user-mode network accepts a connection on the host side even while nothing listens
    in the guest, then drops it; only the server's greeting shows that SSH is up.
    """
    try:
        with socket.create_connection(("127.0.0.1", record.ssh_port), timeout=timeout) as conn:
            conn.settimeout(timeout)
            return conn.recv(255).startswith(b"SSH-")
    except OSError:
        return False


def wait_http(
    record: VmRecord,
    path: str = "/healthz",
    timeout: float = DEFAULT_TIMEOUT,
    *,
    any_status: bool = False,
) -> float:
    """Wait until the forwarded service port answers `path` with a 2xx (or, with `any_status`,
    with any HTTP answer at all); return seconds taken."""
    url = f"http://127.0.0.1:{record.http_port}{path}"
    started = time.monotonic()
    while True:
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                if 200 <= response.status < 300:
                    return time.monotonic() - started
                last = f"HTTP {response.status}"
        except urllib.error.HTTPError as exc:
            if any_status:
                return time.monotonic() - started
            last = f"HTTP {exc.code}"
        except (OSError, urllib.error.URLError) as exc:
            last = str(exc)
        _check_progress(record, started, timeout, f"GET {url} ({last})")
        time.sleep(HTTP_POLL_SECONDS)


def ssh_argv(record: VmRecord, key: Path, *command: str) -> list[str]:
    """The ssh command line that runs `command` as root on the VM."""
    return [
        "ssh", *SSH_OPTIONS, "-i", str(key), "-p", str(record.ssh_port), "root@127.0.0.1",
        *command,
    ]  # fmt: skip


def is_running(record: VmRecord) -> bool:
    """True if the record's pid is alive and is our QEMU for this overlay (not a reused pid)."""
    try:
        cmdline = Path(f"/proc/{record.pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    # A zombie has no cmdline and will never serve again: no start time either.
    if process.start_ticks(record.pid) is None:
        return False
    overlay = str(record.overlay).encode()
    return (
        bool(cmdline)
        and cmdline[0].endswith(QEMU.encode())
        and any(overlay in arg for arg in cmdline)
    )


def stop(record: VmRecord, *, remove: bool = True) -> None:
    """Stop the VM (SIGTERM, then SIGKILL) and, with `remove`, delete its folder."""
    if is_running(record):
        _signal(record.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        while is_running(record) and time.monotonic() < deadline:
            time.sleep(0.1)
        if is_running(record):
            _signal(record.pid, signal.SIGKILL)
            deadline = time.monotonic() + STOP_GRACE
            while is_running(record) and time.monotonic() < deadline:
                time.sleep(0.1)
        if is_running(record):
            raise VmError(f"VM {record.name} (pid {record.pid}) survived SIGKILL")
        log.info("[%s] stopped", record.name)
    if remove:
        shutil.rmtree(record.dir, ignore_errors=True)


def load(vm_root: Path, name: str) -> VmRecord:
    """The record of VM `name` under `vm_root`."""
    path = vm_root / name / "record.json"
    try:
        return VmRecord.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        raise UsageError(f"no VM named {name!r} under {vm_root}") from None


def list_vms(vm_root: Path) -> list[VmRecord]:
    """Every VM with a record under `vm_root`, running or not, by name."""
    records = []
    for path in sorted(vm_root.glob("*/record.json")):
        with contextlib.suppress(OSError, ValueError, KeyError):
            records.append(VmRecord.from_json(json.loads(path.read_text())))
    return records


def serial_tail(record: VmRecord, lines: int = SERIAL_TAIL) -> list[str]:
    """The last lines the guest wrote to its serial console."""
    try:
        text = record.serial_log.read_bytes().decode(errors="replace")
    except OSError:
        return []
    return [line.rstrip("\r") for line in text.splitlines()[-lines:]]


def _claim(vm_dir: Path) -> None:
    vm_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        vm_dir.mkdir()
        return
    except FileExistsError:
        pass

    # A folder left by a VM that died (or a boot that crashed) may be reused; a live one not.
    record_path = vm_dir / "record.json"
    if record_path.exists():
        record = VmRecord.from_json(json.loads(record_path.read_text()))
        if is_running(record):
            raise UsageError(f"VM {vm_dir.name} is already running (pid {record.pid})")
    _kill_from_pidfile(vm_dir)
    shutil.rmtree(vm_dir)
    vm_dir.mkdir()


def _start(
    name: str,
    vm_dir: Path,
    overlay: Path,
    image: Path,
    kernel: Path,
    initrd: Path,
    append: str,
    accel: list[str],
    *,
    http_guest_port: int,
    memory: int,
    cpus: int,
    labels: dict[str, str],
) -> VmRecord:
    serial_log = vm_dir / "serial.log"
    pidfile = vm_dir / "qemu.pid"
    for attempt in range(1, PORT_ATTEMPTS + 1):
        ssh_port, http_port = _free_ports(2)
        netdev = (
            f"user,id=net0,hostfwd=tcp:127.0.0.1:{ssh_port}-:22,"
            f"hostfwd=tcp:127.0.0.1:{http_port}-:{http_guest_port}"
        )
        argv = [
            QEMU, *accel, "-name", f"pipeline-{name}",
            "-m", str(memory), "-smp", str(cpus),
            # Only the devices named here: no VGA card, parallel port, floppy or CD-ROM drive,
            # whose drivers the guest would load at every boot (about 1 s of emulated CPU).
            "-nodefaults",
            "-display", "none", "-monitor", "none", "-daemonize", "-pidfile", str(pidfile),
            "-serial", f"file:{serial_log}",
            "-drive", f"file={overlay},if=virtio,format=qcow2",
            "-netdev", netdev, "-device", "virtio-net-pci,netdev=net0",
            # First boot generates SSH host keys: without a hardware RNG it can stall on entropy.
            "-device", "virtio-rng-pci",
            "-kernel", str(kernel), "-initrd", str(initrd), "-append", append,
        ]  # fmt: skip
        done = run(argv, what=f"start VM {name}", log=vm_dir / "qemu.log", check=False, timeout=60)
        if done.returncode == 0:
            break
        if "host forwarding" in done.output and attempt < PORT_ATTEMPTS:
            log.info("[%s] a port was taken (%s/%s); retrying", name, ssh_port, http_port)
            continue
        raise ToolError(f"start VM {name}", argv, done.returncode, done.tail, str(done.log))

    record = VmRecord(
        name=name,
        pid=int(pidfile.read_text().strip()),
        ssh_port=ssh_port,
        http_port=http_port,
        overlay=overlay,
        image=image,
        serial_log=serial_log,
        labels=dict(labels),
        started_at=time.time(),
    )
    write_json_atomic(vm_dir / "record.json", record.to_json())
    return record


def _free_ports(count: int) -> list[int]:
    # Hold all sockets open until each has a port, so the ports differ; QEMU binds them a moment
    # later, and a port taken in between is caught by the retry in _start.
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _check_progress(record: VmRecord, started: float, timeout: float, waiting_for: str) -> None:
    if not is_running(record):
        message = f"VM {record.name} died while waiting for {waiting_for}"
    elif time.monotonic() - started > timeout:
        message = f"VM {record.name}: no {waiting_for} after {timeout:.0f} s"
    else:
        return
    tail = "\n".join(f"  | {line}" for line in serial_tail(record))
    raise VmError(f"{message}; serial log {record.serial_log}, last lines:\n{tail}")


def _kill_from_pidfile(vm_dir: Path) -> None:
    # A QEMU whose record was never written is still ours if its cmdline names our overlay.
    try:
        pid = int((vm_dir / "qemu.pid").read_text().strip())
    except (OSError, ValueError):
        return
    ghost = VmRecord(
        name=vm_dir.name, pid=pid, ssh_port=0, http_port=0, overlay=vm_dir / "overlay.qcow2",
        image=Path(), serial_log=vm_dir / "serial.log",
    )  # fmt: skip
    stop(ghost, remove=False)


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def main(argv: list[str] | None = None) -> int:
    """`python -m pipeline.targets.local.qemu boot|stop|list`: JSON on stdout, for playbooks."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.targets.local.qemu")
    parser.add_argument("--vm-root", type=Path, required=True, help="folder of the VM folders")
    sub = parser.add_subparsers(dest="command", required=True)

    p_boot = sub.add_parser("boot", help="start a VM and print its record")
    p_boot.add_argument("name")
    p_boot.add_argument("--image", type=Path, required=True, help="qcow2 to overlay")
    p_boot.add_argument("--kernel", type=Path, help="default: vmlinuz beside the image")
    p_boot.add_argument("--initrd", type=Path, help="default: initrd.img beside the image")
    p_boot.add_argument("--append", help="default: `append` of manifest.json beside the image")
    p_boot.add_argument("--state-dir", type=Path, required=True, help="keys and KVM verdict")
    p_boot.add_argument("--hostname")
    p_boot.add_argument("--memory", type=int, default=1024, help="MiB (default: 1024)")
    p_boot.add_argument("--cpus", type=int, default=2, help="(default: 2)")
    p_boot.add_argument("--http-guest-port", type=int, default=8080, help="(default: 8080)")
    p_boot.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    p_boot.add_argument("--wait-ssh", type=float, metavar="SECONDS", help="wait for SSH login")

    p_stop = sub.add_parser("stop", help="stop a VM and remove its folder")
    p_stop.add_argument("name")
    p_stop.add_argument("--keep", action="store_true", help="keep the folder (overlay, log)")

    sub.add_parser("list", help="print every VM's record, with whether it runs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    try:
        if args.command == "boot":
            print(json.dumps(_cli_boot(args), indent=2))
        elif args.command == "stop":
            record = load(args.vm_root, args.name)
            stop(record, remove=not args.keep)
            print(json.dumps({"name": record.name, "stopped": True}))
        else:
            listing = [{**r.to_json(), "running": is_running(r)} for r in list_vms(args.vm_root)]
            print(json.dumps(listing, indent=2))
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


def manifest_append(folder: Path) -> str:
    """The kernel command line that `folder/manifest.json` gives: a base image's names it at
    the top, a baked image's under "boot"."""
    manifest = folder / "manifest.json"
    try:
        found = json.loads(manifest.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"--append not given and no {manifest} to take it from") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"--append not given and {manifest} cannot be read: {exc}") from None
    if not isinstance(found, dict):
        found = {}
    boot = found.get("boot")
    append = found.get("append") or (boot.get("append") if isinstance(boot, dict) else None)
    if not isinstance(append, str) or not append.strip():
        raise UsageError(f"--append not given and {manifest} names no kernel command line")
    return append


def _cli_boot(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.targets.local.baseimage import ssh_key

    beside = args.image.resolve().parent
    append = args.append if args.append is not None else manifest_append(beside)
    labels = dict(item.split("=", 1) for item in args.label if "=" in item)
    record = boot(
        args.name,
        image=args.image,
        kernel=args.kernel or beside / "vmlinuz",
        initrd=args.initrd or beside / "initrd.img",
        append=append,
        vm_root=args.vm_root,
        state_dir=args.state_dir,
        http_guest_port=args.http_guest_port,
        memory=args.memory,
        cpus=args.cpus,
        labels=labels,
        hostname=args.hostname,
    )
    key = ssh_key(args.state_dir)
    if args.wait_ssh is not None:
        try:
            wait_ssh(record, key, timeout=args.wait_ssh)
        except BaseException:
            stop(record)
            raise
    return {**record.to_json(), "ssh_key": str(key), "ssh_user": "root", "address": "127.0.0.1"}


if __name__ == "__main__":
    sys.exit(main())
