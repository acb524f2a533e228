"""Choose how QEMU runs guests here: hardware KVM when it really works, emulation otherwise.

`/dev/kvm` existing proves nothing: inside some cloud VMs it is a paravirtual KVM where
`-cpu host` aborts (MSR 0x10a) and other CPU models let a stock kernel hang without a word. So
the probe boots a real Linux kernel under KVM with no root disk and `panic=-1`: a kernel that
works runs until it panics for want of a root and QEMU exits within seconds; a broken KVM aborts
or hangs, and the probe's short timeout ends it. The verdict is cached per QEMU version.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from pipeline.errors import UsageError
from pipeline.files import write_json_atomic
from pipeline.log import context

log = context("local", "accel")

KVM_ARGS = ["-accel", "kvm", "-cpu", "host"]
# Emulation runs a guest faster on a plain x86-64 CPU model than on "max": with fewer features
# the guest's kernel and libraries take code paths that are cheaper to emulate (the web image
# boots to SSH 4-5 s sooner, see bench/boot.py). PIPELINE_TCG_CPU names another model for
# software that needs newer instructions.
TCG_CPU = "qemu64"
TCG_CPU_ENV = "PIPELINE_TCG_CPU"
PROBE_TIMEOUT = 10.0
# A kernel that got this far switched to long mode, set up its CPU and ran its drivers: the
# places where the broken KVM described above fails.
PROBE_SUCCESS = "Kernel panic"
CACHE_NAME = "accel.json"


def _tcg_args() -> list[str]:
    cpu = os.environ.get(TCG_CPU_ENV, "").strip()
    return ["-accel", "tcg", "-cpu", cpu or TCG_CPU]


def accel_args(state_dir: Path, *, kernel: Path | None = None) -> list[str]:
    """QEMU arguments for the best accelerator that works here (KVM or TCG emulation).

    `PIPELINE_ACCEL=kvm|tcg` overrides the probe. Without an override the verdict is read from
    `state_dir/accel.json`, or probed by booting `kernel` (default: the newest base image's
    kernel) under KVM. With no kernel to probe with, emulation is chosen and nothing is cached.
    """
    forced = os.environ.get("PIPELINE_ACCEL", "").strip().lower()
    if forced == "kvm":
        return list(KVM_ARGS)
    if forced == "tcg":
        return _tcg_args()
    if forced:
        message = f"PIPELINE_ACCEL must be 'kvm' or 'tcg', not {forced!r}"
        raise UsageError(message)

    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return _tcg_args()

    qemu = _qemu_version()
    cache = state_dir / CACHE_NAME
    cached = _read_cache(cache)
    if cached is not None and cached.get("qemu") == qemu:
        return list(KVM_ARGS if cached["kvm"] else _tcg_args())

    kernel = kernel or _find_kernel(state_dir)
    if kernel is None:
        log.info("no kernel to probe KVM with yet; using emulation for now")
        return _tcg_args()

    works, reason = probe_kvm(kernel)
    log.info("KVM probe: %s (%s)", "works" if works else "unusable, using emulation", reason)
    _write_cache(cache, {"kvm": works, "reason": reason, "qemu": qemu, "probed_at": time.time()})
    return list(KVM_ARGS if works else _tcg_args())


def probe_kvm(kernel: Path, *, timeout: float = PROBE_TIMEOUT) -> tuple[bool, str]:
    """Boot `kernel` under KVM until it panics for want of a root; say whether it got there."""
    argv = [
        "qemu-system-x86_64",
        *KVM_ARGS,
        "-m",
        "256",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-monitor",
        "none",
        "-no-reboot",
        "-kernel",
        str(kernel),
        "-append",
        "console=ttyS0 panic=-1 root=/dev/nonexistent",
    ]
    try:
        done = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        seen = (exc.output or b"").decode(errors="replace").strip().splitlines()
        last = seen[-1] if seen else "no output"
        return False, f"kernel hung under KVM for {timeout:.0f} s (last line: {last})"
    except FileNotFoundError:
        return False, "qemu-system-x86_64 is not installed"

    output = done.stdout.decode(errors="replace")
    if PROBE_SUCCESS in output:
        return True, "a kernel booted under KVM"
    tail = output.strip().splitlines()[-1:] or [f"exit code {done.returncode}"]
    return False, f"QEMU under KVM failed: {tail[0]}"


def _find_kernel(state_dir: Path) -> Path | None:
    kernels = sorted(
        (state_dir / "base").glob("*/vmlinuz"), key=lambda p: p.stat().st_mtime, reverse=True
    )
    return kernels[0] if kernels else None


def _qemu_version() -> str:
    try:
        out = subprocess.run(
            ["qemu-system-x86_64", "--version"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout
    except FileNotFoundError:
        return "missing"
    return out.splitlines()[0] if out else "unknown"


def _read_cache(path: Path) -> dict[str, object] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "kvm" in data else None


def _write_cache(path: Path, data: dict[str, object]) -> None:
    write_json_atomic(path, data)
