"""The base image of the local target: a bootable Debian qcow2 built from Debian packages.

mmdebstrap makes the root tree in a folder, `mkfs.ext4 -d` turns the folder into a filesystem
without mounting anything, and `qemu-img convert` makes the qcow2. The kernel and initrd are
copied beside the disk because every local VM boots them directly (`-kernel -initrd -append`):
no bootloader, no partition table, nothing that needs a loop device.

The result is cached under `state_dir/base/<fingerprint>/`; the fingerprint hashes every input,
so a changed package list, recipe or tool version builds a new image beside the old one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import ToolError
from pipeline.files import remove_tree, write_json_atomic, write_text_atomic
from pipeline.log import context
from pipeline.tools import process
from pipeline.tools.process import run
from pipeline.tools.versions import binary_version

# A base build's work folder: .<fingerprint>-<builder pid>-<its start time>-<random>.
WORK_NAME = re.compile(r"\.[0-9a-f]{16}-(?P<pid>[0-9]+)-(?P<ticks>[0-9]+)-[A-Za-z0-9_]+")

# Bump when the steps below change in a way the hashed file contents do not show.
RECIPE_VERSION = "3"

BASE_PACKAGES = (
    "systemd",
    "systemd-sysv",
    "udev",
    "dbus",
    "libnss-myhostname",
    "linux-image-amd64",
    "initramfs-tools",
    "openssh-server",
    "python3",
    "sudo",
    "ca-certificates",
    "curl",
    "iproute2",
)

# The guest's DNS under QEMU user-mode networking; the host's resolv.conf means nothing there.
RESOLV_CONF = "nameserver 10.0.2.3\n"

NETWORK_UNIT = """\
[Match]
Name=en* eth*

[Network]
DHCP=ipv4
"""

# The image ships without host keys so that every VM gets its own; this runs before sshd.
# One ed25519 key: `ssh-keygen -A` also makes RSA and ECDSA keys, and under emulation the RSA
# key alone held SSH back by about 8 s of every boot.
HOSTKEYS_UNIT = """\
[Unit]
Description=Generate the SSH host key on first boot
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -q -t ed25519 -N "" -f /etc/ssh/ssh_host_ed25519_key
RemainAfterExit=yes

[Install]
RequiredBy=ssh.service
"""

SSHD_CONFIG = """\
HostKey /etc/ssh/ssh_host_ed25519_key
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UseDNS no
"""

FSTAB = "/dev/vda / ext4 defaults,errors=remount-ro 0 1\n"

# Units masked in every image. The apt timers would patch a running server in place, which an
# immutable image never is (a new image is baked instead). e2scrub checks LVM snapshots, which
# these disks do not have; it cost about 10 s of CPU at each boot under emulation.
MASKED_UNITS = (
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
)

# systemd.firstboot=off: an empty machine-id marks a first boot, and the firstboot wizard would
# otherwise wait for answers on the console.
APPEND = "root=/dev/vda rw console=ttyS0 systemd.firstboot=off"


@dataclass(frozen=True)
class BaseSpec:
    """What goes into a base image: the Debian suite, extra packages and the disk size."""

    suite: str = "bookworm"
    packages: tuple[str, ...] = ()
    disk_size: str = "3G"


@dataclass(frozen=True)
class BaseImage:
    """A built base image: its disk, the kernel and initrd to boot it with, and its manifest."""

    dir: Path
    disk: Path
    kernel: Path
    initrd: Path
    fingerprint: str
    append: str
    manifest: dict[str, Any] = field(default_factory=dict)


def baked(folder: Path, manifest: dict[str, Any], fingerprint: str) -> BaseImage:
    """A baked image's files as the pipeline boots them: its disk, and the kernel, initrd and
    command line its manifest keeps under "boot"."""
    boot = manifest.get("boot") or {}
    return BaseImage(
        dir=folder,
        disk=folder / "disk.qcow2",
        kernel=folder / str(boot.get("kernel", "vmlinuz")),
        initrd=folder / str(boot.get("initrd", "initrd.img")),
        fingerprint=fingerprint,
        append=str(boot.get("append", APPEND)),
        manifest=manifest,
    )


def ssh_key(state_dir: Path) -> Path:
    """The pipeline's private SSH key (ed25519), created once under `state_dir/keys/`."""
    keys = state_dir / "keys"
    private = keys / "id_ed25519"
    if private.exists() and private.with_suffix(".pub").exists():
        return private
    keys.mkdir(parents=True, exist_ok=True)
    keys.chmod(0o700)

    # Generate into a temporary name and rename both halves, so that a crash never leaves a
    # private key without its public half (or the reverse) for the next caller to trust.
    with tempfile.TemporaryDirectory(dir=keys) as tmp:
        tmp_key = Path(tmp) / "id_ed25519"
        run(
            [
                "ssh-keygen",
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                "image-pipeline",
                "-f",
                str(tmp_key),
            ],
            what="create the pipeline's SSH key",
        )
        tmp_key.with_suffix(".pub").rename(private.with_suffix(".pub"))
        tmp_key.rename(private)
    return private


def mmdebstrap_version(state_dir: Path) -> str:
    """The installed mmdebstrap's version line; part of every base image fingerprint.

    Cached per binary: asking costs a Perl start (about 0.1 s), too much for a bake that only
    has to find out that nothing changed.
    """
    return binary_version(state_dir, "mmdebstrap", ("--version",))


def fingerprint(spec: BaseSpec, *, public_key: str, tool_version: str, refresh: str = "") -> str:
    """Hash every input of a base image: suite, packages, recipe, key and builder version, and
    the package versions a refresh asked for (see request_refresh)."""
    inputs = {
        "recipe": RECIPE_VERSION,
        "suite": spec.suite,
        "sources": sources(spec.suite),
        "packages": sorted(set(BASE_PACKAGES) | set(spec.packages)),
        "disk_size": spec.disk_size,
        "files": [RESOLV_CONF, NETWORK_UNIT, HOSTKEYS_UNIT, SSHD_CONFIG, FSTAB],
        "masked": list(MASKED_UNITS),
        "append": APPEND,
        "public_key": public_key.strip(),
        "mmdebstrap": tool_version,
    }
    if refresh:
        # Only when asked: the fingerprints of bases never refreshed stay as they were.
        inputs["refresh"] = refresh
    blob = json.dumps(inputs, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def planned_fingerprint(state_dir: Path, spec: BaseSpec) -> str | None:
    """The fingerprint a base image for `spec` would have, without building or writing
    anything; None when it cannot be known yet (no SSH key made so far)."""
    public = state_dir / "keys" / "id_ed25519.pub"
    if not public.is_file():
        return None
    return fingerprint(
        spec,
        public_key=public.read_text(),
        tool_version=mmdebstrap_version(state_dir),
        refresh=_refresh_token(state_dir, spec),
    )


def request_refresh(state_dir: Path, spec: BaseSpec, packages: dict[str, str]) -> str:
    """Ask for a base built anew because the archive has other package versions.

    The package names of a base are among its inputs, their versions are not (they are only
    known once it is built), so a cached base would be reused forever. This records a hash of
    the versions the archive offers now; it becomes an input of the base's fingerprint, and the
    next bake builds a new base (and the images on it get a new version).
    """
    token = hashlib.sha256(json.dumps(packages, sort_keys=True).encode()).hexdigest()[:16]
    write_text_atomic(_refresh_path(state_dir, spec), token + "\n")
    return token


def _refresh_path(state_dir: Path, spec: BaseSpec) -> Path:
    key = json.dumps([spec.suite, sorted(set(BASE_PACKAGES) | set(spec.packages)), spec.disk_size])
    return state_dir / "base-refresh" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _refresh_token(state_dir: Path, spec: BaseSpec) -> str:
    path = _refresh_path(state_dir, spec)
    return path.read_text(encoding="utf-8").strip() if path.is_file() else ""


def cached_base_image(state_dir: Path, spec: BaseSpec) -> BaseImage | None:
    """The base image for `spec` if it is built, else None; builds nothing."""
    final = _base_folder(state_dir, spec)
    return _load(final) if (final / "manifest.json").exists() else None


def _base_folder(state_dir: Path, spec: BaseSpec) -> Path:
    public_key = ssh_key(state_dir).with_suffix(".pub").read_text()
    fp = fingerprint(
        spec,
        public_key=public_key,
        tool_version=mmdebstrap_version(state_dir),
        refresh=_refresh_token(state_dir, spec),
    )
    return state_dir / "base" / fp


def ensure_base_image(state_dir: Path, spec: BaseSpec, *, log_dir: Path) -> BaseImage:
    """Return the cached base image for `spec`, building it first if it is not there."""
    final = _base_folder(state_dir, spec)
    if (final / "manifest.json").exists():
        return _load(final)
    fp = final.name
    public_key = ssh_key(state_dir).with_suffix(".pub").read_text()

    context(f"base {spec.suite}", "build").info(
        "building the Debian base image %s from packages (about a minute; cached after)", fp
    )
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_builds(final.parent)
    # The builder's pid and start time in the name tell a later build whether it still runs.
    owner = f"{os.getpid()}-{process.start_ticks(os.getpid())}"
    work = Path(tempfile.mkdtemp(prefix=f".{fp}-{owner}-", dir=final.parent))
    try:
        _build(work, spec, public_key=public_key, fp=fp, log_dir=log_dir)
        try:
            work.rename(final)
        except OSError:
            # Another process finished the same image first; its copy is as good as ours.
            if not (final / "manifest.json").exists():
                raise
    finally:
        if work.exists():
            remove_tree(work)
    return _load(final)


def remove_abandoned_builds(base_dir: Path) -> list[Path]:
    """Remove the work folders of base builds whose builder is gone (killed outright, so its
    own cleanup never ran), with whatever mmdebstrap left mounted in them."""
    removed = []
    for folder in base_dir.glob(".*-*-*-*"):
        match = WORK_NAME.fullmatch(folder.name)
        if match is None or not folder.is_dir():
            continue
        pid, ticks = int(match["pid"]), int(match["ticks"])
        if process.start_ticks(pid) == ticks:
            continue
        stuck = remove_tree(folder)
        log = context("base", "cleanup")
        if stuck:
            log.warning("left %s: cannot unmount %s", folder, ", ".join(stuck))
        else:
            log.info("removed %s, left by a base build that died", folder.name)
        removed.append(folder)
    return removed


def _load(folder: Path) -> BaseImage:
    manifest = json.loads((folder / "manifest.json").read_text())
    return BaseImage(
        dir=folder,
        disk=folder / "disk.qcow2",
        kernel=folder / "vmlinuz",
        initrd=folder / "initrd.img",
        fingerprint=manifest["fingerprint"],
        append=manifest["append"],
        manifest=manifest,
    )


def _build(work: Path, spec: BaseSpec, *, public_key: str, fp: str, log_dir: Path) -> None:
    started = time.monotonic()
    root = work / "root"
    packages = sorted(set(BASE_PACKAGES) | set(spec.packages))

    # The root tree, from Debian packages only.
    run(
        [
            "mmdebstrap",
            "--variant=minbase",
            "--mode=root",
            "--format=directory",
            f"--include={','.join(packages)}",
            "--customize-hook=chroot $1 systemctl enable systemd-networkd",
            spec.suite,
            str(root),
            *sources(spec.suite),
        ],
        what=f"build the {spec.suite} root tree (mmdebstrap)",
        log=log_dir / "base-mmdebstrap.log",
        timeout=1800,
    )

    # What makes it a VM image rather than a chroot.
    _configure(root, public_key=public_key)
    versions = _package_versions(root)

    # Kernel and initrd go beside the disk for direct kernel boot.
    shutil.copyfile(_single(root / "boot", "vmlinuz-*"), work / "vmlinuz")
    shutil.copyfile(_single(root / "boot", "initrd.img-*"), work / "initrd.img")

    # Folder -> ext4 -> qcow2, without mounting anything.
    raw = work / "disk.raw"
    run(
        ["mkfs.ext4", "-q", "-F", "-L", "root", "-d", str(root), str(raw), spec.disk_size],
        what="make the root filesystem (mkfs.ext4 -d)",
        log=log_dir / "base-mkfs.log",
    )
    remove_tree(root)
    run(
        ["qemu-img", "convert", "-O", "qcow2", str(raw), str(work / "disk.qcow2")],
        what="convert the root filesystem to qcow2",
        log=log_dir / "base-qemu-img.log",
    )
    raw.unlink()

    manifest = {
        "fingerprint": fp,
        "suite": spec.suite,
        "packages_requested": packages,
        "packages": versions,
        "append": APPEND,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_seconds": round(time.monotonic() - started, 1),
        "sizes": {
            name: (work / name).stat().st_size for name in ("disk.qcow2", "vmlinuz", "initrd.img")
        },
        "disk_size": spec.disk_size,
    }
    write_json_atomic(work / "manifest.json", manifest)


def _configure(root: Path, *, public_key: str) -> None:
    etc = root / "etc"

    # mmdebstrap leaves the host's view of the network behind; the guest has its own.
    (etc / "resolv.conf").unlink(missing_ok=True)
    (etc / "resolv.conf").write_text(RESOLV_CONF)
    (etc / "systemd" / "network" / "80-dhcp.network").write_text(NETWORK_UNIT)
    (etc / "hostname").write_text("debian\n")
    (etc / "hosts").write_text("127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n")
    (etc / "fstab").write_text(FSTAB)

    # Each VM gets its own identity at first boot: machine-id and SSH host keys.
    (etc / "machine-id").write_text("")
    (root / "var" / "lib" / "dbus" / "machine-id").unlink(missing_ok=True)
    for host_key in (etc / "ssh").glob("ssh_host_*"):
        host_key.unlink()
    unit = etc / "systemd" / "system" / "ssh-hostkeys.service"
    unit.write_text(HOSTKEYS_UNIT)
    wants = etc / "systemd" / "system" / "ssh.service.requires"
    wants.mkdir(exist_ok=True)
    (wants / unit.name).symlink_to(f"/etc/systemd/system/{unit.name}")
    for name in MASKED_UNITS:
        masked = etc / "systemd" / "system" / name
        masked.unlink(missing_ok=True)
        masked.symlink_to("/dev/null")

    # Root logs in with the pipeline's key and nothing else.
    (etc / "ssh" / "sshd_config.d" / "pipeline.conf").write_text(SSHD_CONFIG)
    ssh_dir = root / "root" / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    (ssh_dir / "authorized_keys").write_text(public_key)
    (ssh_dir / "authorized_keys").chmod(0o600)


def _package_versions(root: Path) -> dict[str, str]:
    out = run(
        ["dpkg-query", f"--admindir={root}/var/lib/dpkg", "-W", "-f", "${Package}\t${Version}\n"],
        what="list the packages of the base image",
    ).output
    return dict(line.split("\t", 1) for line in out.splitlines() if "\t" in line)


def sources(suite: str) -> list[str]:
    """The archive lines a base of `suite` is built from (and the guest keeps)."""
    # Updates and security fixes too: the guest's apt keeps these sources for later bakes.
    main = "http://deb.debian.org/debian"
    if suite in ("sid", "unstable"):
        return [f"deb {main} {suite} main"]
    return [
        f"deb {main} {suite} main",
        f"deb {main} {suite}-updates main",
        f"deb http://deb.debian.org/debian-security {suite}-security main",
    ]


def _single(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    if len(found) != 1:
        message = f"expected one {pattern} in {folder}, found {[p.name for p in found]}"
        raise ToolError("build the base image", ["mmdebstrap"], 0, [message])
    return found[0]
