"""The crash matrix: the pipeline killed at a point, then what it left, then the next run.

Each cell runs a real `pipeline` command with PIPELINE_FAILPOINT naming the point and the signal
(SIGKILL, which nothing can handle, and SIGINT, which the pipeline handles as an interruption),
then checks what the issue asks of a crash: no process of the dead run left running once the
next run has started, no data lost or half written, and the next run completes. Each cell adds
a row to the matrix printed at the end of the test run.
"""

from __future__ import annotations

import json
import signal
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from projects import MINIMAL, run_pipeline

from pipeline import reaper
from pipeline.registry import URL_VARIABLE, open_registry

SIGNALS = {"KILL": -signal.SIGKILL, "INT": 130}


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project whose registry holds two verified versions of `web`, dev on the first."""
    monkeypatch.delenv(URL_VARIABLE, raising=False)
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "pipeline.yml").write_text(MINIMAL)
    registry = open_registry(folder / ".pipeline")
    try:
        registry.add(
            "debian", "1.0.0", build_id="base-1", fingerprint="b" * 16, state="built",
            path=str(_disk(folder, "base", "1.0.0")), manifest={"suite": "bookworm"}, kind="base",
        )  # fmt: skip
        for number in ("1.0.0", "1.0.1"):
            registry.add(
                "web", number, build_id=f"build-{number}", fingerprint=f"fp-{number}",
                state="verified", path=str(_disk(folder, "images", "web", number)),
                parent=("debian", "1.0.0"), manifest={"image": "web", "version": number},
            )  # fmt: skip
        registry.promote("web", "dev", "1.0.0")
    finally:
        registry.close()
    return folder


def _disk(project: Path, *parts: str) -> Path:
    path = project.joinpath(".pipeline", *parts)
    path.mkdir(parents=True)
    (path / "disk.qcow2").write_bytes(b"QFI\xfb")
    return path


def _registry_state(project: Path) -> dict[str, Any]:
    """What a user reads of the registry: versions with their states, channels, history."""
    registry = open_registry(project / ".pipeline")
    try:
        return {
            "versions": [(v.version, v.state) for v in registry.versions("web")],
            "dev": registry.channel("web", "dev").version,  # type: ignore[union-attr]
            "history": [m.current for m in registry.history("web", "dev")],
        }
    finally:
        registry.close()


def _integrity(project: Path) -> str:
    with sqlite3.connect(project / ".pipeline" / "registry.db") as db:
        return str(db.execute("PRAGMA integrity_check").fetchone()[0])


def _orphans(project: Path) -> list[int]:
    """Live processes marked with a run of this project whose run is over."""
    return [item.pid for item in reaper.leftovers(project / ".pipeline")]


def _row(tally: Counter[str], matrix: list[str], point: str, how: str, **cell: Any) -> None:
    tally["cells"] += 1
    tally["ok"] += cell["next_ok"] and not cell["lost"] and not cell["orphans_after"]
    matrix.append(
        f"{point:<24} {how:<5} orphans found {cell['orphans']}, left after the next run"
        f" {cell['orphans_after']}; data lost: {cell['lost'] or 'none'};"
        f" next run ok: {'yes' if cell['next_ok'] else 'NO'}"
    )


@pytest.mark.parametrize("how", ["KILL", "INT"])
def test_a_promote_killed_at_the_registry_commit_loses_nothing(
    project: Path, how: str, crash_matrix: tuple[Counter[str], list[str]]
) -> None:
    before = _registry_state(project)
    killed = run_pipeline(
        "promote", "web", "dev", "1.0.1", cwd=project, PIPELINE_FAILPOINT=f"registry.commit:{how}"
    )
    assert killed.returncode == SIGNALS[how], killed.stderr
    assert "Traceback" not in killed.stderr

    after = _registry_state(project)
    lost = [] if after == before else [f"registry changed: {before} -> {after}"]
    assert _integrity(project) == "ok"
    orphans = _orphans(project)

    done = run_pipeline("promote", "web", "dev", "1.0.1", cwd=project)
    assert done.returncode == 0, done.stderr
    final = _registry_state(project)
    assert final["dev"] == "1.0.1"
    assert final["history"] == before["history"] + ["1.0.1"]
    _row(
        *crash_matrix, "registry commit (promote)", how, orphans=len(orphans),
        orphans_after=len(_orphans(project)), lost="; ".join(lost), next_ok=True,
    )  # fmt: skip
    assert not lost


def test_an_unknown_failpoint_is_refused_by_name(project: Path) -> None:
    done = run_pipeline("promote", "web", "dev", "1.0.1", cwd=project, PIPELINE_FAILPOINT="nope")
    assert done.returncode == 2
    assert "PIPELINE_FAILPOINT='nope'" in done.stderr and "registry.commit" in done.stderr
    assert _registry_state(project)["dev"] == "1.0.0"


def test_a_killed_runs_status_is_recorded_dead_by_the_next_run(project: Path) -> None:
    """A run that died holding nothing still said "running"; the next run records it dead."""
    runs = project / ".pipeline" / "runs"
    stale = runs / "20261205t000000-abcdef"
    stale.mkdir(parents=True)
    status = {"build_id": stale.name, "state": "running", "pid": 2**22 + 11, "pid_start": 1}
    (stale / "status.json").write_text(json.dumps(status))

    done = run_pipeline("gc", cwd=project)

    assert done.returncode == 0, done.stderr
    assert json.loads((stale / "status.json").read_text())["state"] == "dead"
