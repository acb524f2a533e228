"""Named points where the pipeline can be made to die on purpose, so that tests can show what a
crash at that very point leaves behind (the crash matrix of tests/test_crashes.py).

`PIPELINE_FAILPOINT=POINT` makes the process send itself SIGKILL when it reaches POINT;
`PIPELINE_FAILPOINT=POINT:INT` (or `:TERM`) sends that signal instead, which the pipeline
handles as an interruption. Unset, as it is outside tests, reaching a point costs one lookup in
the environment.
"""

from __future__ import annotations

import os
import signal

from pipeline.errors import UsageError

VARIABLE = "PIPELINE_FAILPOINT"
SIGNALS = {"KILL": signal.SIGKILL, "INT": signal.SIGINT, "TERM": signal.SIGTERM}
POINTS = frozenset(
    {
        # Inside a registry transaction, after its changes and before its commit.
        "registry.commit",
        # In a front door reload, with the new configuration on disk and HAProxy not yet told.
        "frontdoor.reload",
        # Between the stages of `pipeline run`: baked, verified, channel moved, not deployed.
        "run.baked",
        "run.verified",
        "run.promoted",
    }
)


def reach(point: str) -> None:
    """Die here if PIPELINE_FAILPOINT names this point."""
    wanted = os.environ.get(VARIABLE)
    if not wanted:
        return
    name, _, how = wanted.partition(":")
    if name not in POINTS or (how or "KILL") not in SIGNALS:
        choices = ", ".join(sorted(POINTS))
        message = f"{VARIABLE}={wanted!r}: expected POINT[:KILL|INT|TERM], POINT one of {choices}"
        raise UsageError(message)
    if name == point:
        # raise_signal, not kill: the signal goes to this thread, and an interruption is raised
        # right here rather than wherever the main thread happens to be when it notices.
        signal.raise_signal(SIGNALS[how or "KILL"])
