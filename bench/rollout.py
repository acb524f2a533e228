"""A rolling update of a fleet of N = 4 with max_surge 2, through the front door.

Goals: the update takes at most 1.2 x (one instance's boot + health check) x waves, and not one
request sent to the front door every 50 ms during it fails.

Works in a copy of this project (its own state; base images are shared with ./.pipeline when
there are any): runs `pipeline run web --env bench` (bake, verify, four instances), measures
one instance's boot + health check by scaling 4 -> 5 and back (the provider's own "healthy
after" figure plus the health gate), bakes and verifies a second version, then times `pipeline
deploy bench` with a probe on the front door. The one boot is the median of three samples, two
before the update and one after: on a shared machine one sample moved by 4 s from one run to
the next. Takes 15-25 minutes under emulation:
    .venv/bin/python bench/rollout.py
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
SIZE, SURGE = 4, 2


class Probe:
    """Requests a URL every 50 ms in a thread and counts what fails."""

    def __init__(self, url: str) -> None:
        assert url.startswith("http://127.0.0.1:"), url
        self.url, self.ok, self.failed = url, 0, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)

    def loop(self) -> None:
        while not self.stop.wait(0.05):
            try:
                with urllib.request.urlopen(self.url, timeout=10) as response:
                    response.read()
                self.ok += 1
            except Exception:
                self.failed += 1


def pipeline(root: Path, *args: str, timeline: list[str] | None = None) -> dict:
    """Run a pipeline command; `timeline` gets its log lines, each stamped with the time."""
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", *args, "--json"],
        cwd=root, capture_output=True, text=True, check=False,
        env={**os.environ, "PIPELINE_LOG_TIMES": "1"},
    )  # fmt: skip
    if done.returncode != 0:
        sys.exit(f"pipeline {' '.join(args)} exited {done.returncode}:\n{done.stderr}")
    if timeline is not None:
        timeline += done.stderr.splitlines()
    return json.loads(done.stdout)


def healthy_after(root: Path) -> list[float]:
    """The provider's boot-to-healthy seconds for each instance the newest run created."""
    newest = max((root / ".pipeline" / "runs").iterdir())
    log = newest / "logs" / "provider.log"
    return [float(x) for x in re.findall(r"healthy after ([0-9.]+) s", log.read_text())]


def one_boot(root: Path) -> float:
    """Scale the fleet out by one and back: the provider's boot-to-healthy time of that one."""
    scaled = pipeline(root, "scale", "bench", str(SIZE + 1))
    assert len(scaled["instances"]) == SIZE + 1, scaled
    [boot] = healthy_after(root)
    pipeline(root, "scale", "bench", str(SIZE))
    return boot


def main() -> int:
    root = Path(tempfile.mkdtemp(prefix="pipeline-bench-rollout-"))
    for name in ("roles", "templates", "molecule", "inventories", "playbooks"):
        shutil.copytree(REPO / name, root / name)
    config = yaml.safe_load((REPO / "pipeline.yml").read_text())
    config["images"]["web"].setdefault("vars", {})["bench_nonce"] = str(time.time())
    config["environments"] = {
        "bench": {
            "image": "web",
            "instances": SIZE,
            "rollout": {"strategy": "rolling", "max_surge": SURGE},
        }
    }
    (root / "pipeline.yml").write_text(yaml.safe_dump(config))
    shared = REPO / ".pipeline"
    (root / ".pipeline").mkdir()
    for name in ("base", "keys", "accel.json"):
        if (shared / name).exists():
            (root / ".pipeline" / name).symlink_to(shared / name)
    try:
        first = pipeline(root, "run", "web", "--env", "bench")
        door = first["deploy"]["front_door"]

        env = config["environments"]["bench"]
        gate = (env.get("health", {}).get("passes", 3) - 1) * env.get("health", {}).get(
            "interval", 1.0
        )
        boots = [one_boot(root), one_boot(root)]
        print(
            f"one instance's boot, before the update: {boots[0]:.1f}, {boots[1]:.1f} s", flush=True
        )

        config["images"]["web"]["vars"]["bench_nonce"] = str(time.time())
        (root / "pipeline.yml").write_text(yaml.safe_dump(config))
        # `bake --json` gives the version's whole record under "version".
        version = pipeline(root, "bake", "web")["version"]["version"]
        pipeline(root, "verify", "web", version)
        pipeline(root, "promote", "web", "bench", version)

        probe = Probe(door)
        probe.thread.start()
        started = time.perf_counter()
        timeline: list[str] = []
        rolled = pipeline(root, "deploy", "bench", timeline=timeline)
        seconds = time.perf_counter() - started
        probe.stop.set()
        probe.thread.join()
        waves = rolled["waves"]
        booted = ", ".join(f"{s:.1f}" for s in healthy_after(root))
        boots.append(one_boot(root))
        boot = statistics.median(boots)
        one = boot + gate
        ratio = seconds / (one * waves)
        print("the rolling update's log:")
        for line in timeline:
            print(f"  {line}")
        print(f"its instances' boot + first answer (provider): {booted} s")
        print(f"fleet of {SIZE}, max_surge {SURGE}: {waves} waves")
        samples = ", ".join(f"{s:.1f}" for s in boots)
        print(
            f"one instance: boot + health check {one:.1f} s (provider {boot:.1f} s, the median"
            f" of {samples} s, two before the update and one after; + gate {gate:.1f} s)"
        )
        print(f"rolling update: {seconds:.1f} s; ratio {ratio:.3f} (goal <= 1.2)")
        print(f"front door probe: {probe.ok} answered, {probe.failed} failed (goal 0)")
        return 0 if ratio <= 1.2 and probe.failed == 0 else 1
    finally:
        subprocess.run(
            [sys.executable, "-m", "pipeline", "destroy", "bench"],
            cwd=root, capture_output=True, check=False,
        )  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
