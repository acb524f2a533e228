"""`pipeline bake` against a raw `packer build` of the same rendered template.

Goal: ratio <= 1.03. Bakes a new version of IMAGE (a nonce variable forces new inputs), then runs
Packer directly on the template that bake rendered, into a scratch folder, and compares the
wall times. Takes two full bakes (several minutes under emulation):
    .venv/bin/python bench/bake_vs_packer.py [IMAGE]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("image", nargs="?", default="web")
    args = parser.parse_args()
    root = Path.cwd()

    # A copy of pipeline.yml with a nonce variable: new inputs, so a real bake happens.
    config = yaml.safe_load((root / "pipeline.yml").read_text())
    config["images"][args.image].setdefault("vars", {})["bench_nonce"] = str(time.time())
    with tempfile.NamedTemporaryFile("w", suffix=".yml", dir=root, delete=False) as handle:
        yaml.safe_dump(config, handle)
        config_path = Path(handle.name)
    try:
        started = time.perf_counter()
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pipeline",
                "-c",
                str(config_path),
                "bake",
                args.image,
                "--json",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        pipeline_seconds = time.perf_counter() - started
    finally:
        config_path.unlink()
    if done.returncode != 0:
        print(done.stderr)
        return 1
    version = json.loads(done.stdout)["version"]
    run_dir = Path(version["path"]).parents[2] / "runs" / version["build_id"]

    # The same rendered template, straight through Packer, into a scratch folder.
    scratch = Path(tempfile.mkdtemp(dir=root / ".pipeline"))
    output = scratch / "out"
    template = (run_dir / "image.pkr.hcl").read_text()
    template = re.sub(r'output_directory = ".*"', f'output_directory = "{output}"', template)
    raw = scratch / "image.pkr.hcl"
    raw.write_text(template)
    env = {
        **os.environ,
        "CHECKPOINT_DISABLE": "1",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    try:
        started = time.perf_counter()
        subprocess.run(
            ["packer", "build", "-color=false", str(raw)],
            cwd=run_dir,
            env=env,
            check=True,
            capture_output=True,
        )
        packer_seconds = time.perf_counter() - started
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    print(f"pipeline bake {args.image}: {pipeline_seconds:.1f} s (version {version['version']})")
    print(f"raw packer build of the same template: {packer_seconds:.1f} s")
    print(f"ratio: {pipeline_seconds / packer_seconds:.3f} (goal <= 1.03)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
