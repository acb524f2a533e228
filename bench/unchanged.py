"""How long `pipeline bake IMAGE` takes to decide "unchanged", including the CLI's start.

Goal: < 0.3 s. Run from a project whose image has been baked once:
    .venv/bin/python bench/unchanged.py [IMAGE] [--runs N]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("image", nargs="?", default="web")
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()

    command = [sys.executable, "-m", "pipeline", "bake", args.image]
    first = subprocess.run(command, capture_output=True, text=True, check=False)
    if first.returncode != 0 or "unchanged" not in first.stdout:
        print(f"bake is not unchanged (bake {args.image} once first):\n{first.stderr}")
        return 1

    times = []
    for _ in range(args.runs):
        started = time.perf_counter()
        subprocess.run(command, capture_output=True, check=True)
        times.append(time.perf_counter() - started)
    print(f"pipeline bake {args.image} (unchanged), {args.runs} runs:")
    print(
        f"  min {min(times):.3f} s  median {statistics.median(times):.3f} s"
        f"  max {max(times):.3f} s  (goal < 0.3 s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
