"""Running an external command: a line the caller watches for stops it and what it started."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.errors import ToolError
from pipeline.tools import process


def test_a_line_the_caller_stops_at_stops_the_command_and_its_children(tmp_path: Path) -> None:
    # The child holds the command's output open: the run can only end once it is gone.
    script = 'sleep 302 & echo "child $!"; echo "Cancelling the job"; wait; echo "not reached"'
    lines: list[str] = []

    with pytest.raises(ToolError) as caught:
        process.run(
            ["sh", "-c", script],
            what="the job",
            log=tmp_path / "job.log",
            on_line=lines.append,
            stop_when=lambda line: line.startswith("Cancelling"),
        )

    assert str(caught.value).startswith(
        "the job (stopped by the pipeline at: Cancelling the job) failed:"
    )
    assert lines[-1] == "Cancelling the job"
    child = int(lines[0].split()[1])
    assert process.start_ticks(child) is None


def test_a_command_that_never_prints_the_line_runs_to_its_end(tmp_path: Path) -> None:
    done = process.run(
        ["sh", "-c", "echo one; echo two"],
        what="the job",
        stop_when=lambda line: line.startswith("Cancelling"),
    )

    assert (done.returncode, done.output) == (0, "one\ntwo")
