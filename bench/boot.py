"""How long a baked image takes to boot to a working service and SSH, alone and two at once.

A rolling update with max_surge 2 boots two instances per wave, so the ratio the rollout bench
reports (update time / (one instance's boot + health check) x waves) cannot fall below what
two boots at once cost against one boot alone on this machine: this prints that floor, measured
with the pipeline's own VM launcher and nothing else of the pipeline around it.

It also boots the image the ways it booted before (CPU model "max", a loud kernel console), to
show what each choice buys. Uses the newest baked image of ./.pipeline (or the image folder given),
boots only on 127.0.0.1 and stops every VM it starts. About 4 minutes under emulation:
    .venv/bin/python bench/boot.py [IMAGE_FOLDER]
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.targets.local import qemu  # noqa: E402

TIMEOUT = 600.0


def newest_image(state_dir: Path) -> Path:
    found = sorted(
        (p.parent for p in state_dir.glob("images/*/*/manifest.json")),
        key=lambda folder: folder.stat().st_mtime,
    )
    if not found:
        sys.exit(f"no baked image under {state_dir}: run `pipeline run web --env dev` first")
    return found[-1]


def ready(record: qemu.VmRecord, path: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{record.http_port}{path}", timeout=5):
            pass
    except OSError:
        return False
    return qemu.ssh_banner(record)


def boot_many(image: Path, count: int, append: str, state_dir: Path) -> list[float]:
    """Boot `count` VMs at once; seconds until each answers HTTP and greets on SSH."""
    manifest = json.loads((image / "manifest.json").read_text())
    port = int(manifest["inputs"].get("service_port", 8080))
    with tempfile.TemporaryDirectory(prefix="bench-boot-") as root:
        records, started, took = [], {}, {}
        try:
            for i in range(count):
                name = f"bench-boot-{i}"
                started[name] = time.monotonic()
                records.append(
                    qemu.boot(
                        name, image=image / "disk.qcow2", kernel=image / "vmlinuz",
                        initrd=image / "initrd.img", append=append, vm_root=Path(root),
                        state_dir=state_dir, http_guest_port=port, cpus=1,
                    )
                )  # fmt: skip
            deadline = time.monotonic() + TIMEOUT
            while len(took) < count and time.monotonic() < deadline:
                for record in records:
                    if record.name not in took and ready(record, "/healthz"):
                        took[record.name] = time.monotonic() - started[record.name]
                time.sleep(0.2)
        finally:
            for record in records:
                qemu.stop(record)
    if len(took) < count:
        sys.exit(f"not every VM came up within {TIMEOUT:.0f} s")
    return sorted(took.values())


def main() -> None:
    state_dir = REPO / ".pipeline"
    image = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else newest_image(state_dir)
    append = json.loads((image / "manifest.json").read_text())["boot"]["append"]
    print(f"image: {image}")
    ways = [
        ("as the pipeline boots it", append, None),
        ("CPU model max", append, "max"),
        ("loud console (loglevel=7)", f"{append} loglevel=7", None),
    ]
    rows = []
    for label, line, cpu in ways:
        saved = os.environ.get("PIPELINE_TCG_CPU")
        if cpu:
            os.environ["PIPELINE_TCG_CPU"] = cpu
        try:
            alone = boot_many(image, 1, line, state_dir)[0]
            pair = max(boot_many(image, 2, line, state_dir)) if not rows else None
        finally:
            if saved is None:
                os.environ.pop("PIPELINE_TCG_CPU", None)
            else:
                os.environ["PIPELINE_TCG_CPU"] = saved
        rows.append((label, alone, pair))
        shown = f", two at once {pair:.1f} s" if pair else ""
        print(f"{label}: boot to HTTP + SSH alone {alone:.1f} s{shown}", flush=True)
    _, alone, pair = rows[0]
    assert pair is not None
    print(
        f"two boots at once take {pair / alone:.2f} x one alone: the floor of the rollout "
        f"bench's ratio with max_surge 2 on this machine (its goal is <= 1.2)"
    )


if __name__ == "__main__":
    main()
