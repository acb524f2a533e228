"""Human output: one logger, to stderr, each line carrying its context like `[web 1.4.0 > bake]`.

Data (listings, --json) goes to stdout and never through here. A process whose output goes to a
file rather than a person (the background finisher of a blue/green rollout) sets
PIPELINE_LOG_TIMES=1 and gets each line stamped with the time in UTC.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import MutableMapping
from typing import Any

from pipeline import secret

LOGGER = "pipeline"
TIMES_VARIABLE = "PIPELINE_LOG_TIMES"


def setup(verbosity: int) -> None:
    """-v shows the tools' own output as it comes; -vv also our debug detail."""
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get(TIMES_VARIABLE) == "1":
        # Milliseconds: a rollout's steps are seconds apart, and benches read their timing here.
        stamped = logging.Formatter("%(asctime)s.%(msecs)03dZ %(message)s", "%Y-%m-%dT%H:%M:%S")
        stamped.converter = time.gmtime
        handler.setFormatter(stamped)
    else:
        handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(_mask_secrets)
    root = logging.getLogger(LOGGER)
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbosity >= 1 else logging.INFO)
    root.propagate = False


def _mask_secrets(record: logging.LogRecord) -> bool:
    """Every line shown masks the secrets the pipeline knows (a tool's output at -v too)."""
    record.msg = secret.redact(record.getMessage())
    record.args = None
    return True


class Context(logging.LoggerAdapter):  # type: ignore[type-arg]
    """A logger whose lines start with `[subject > stage]`."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        return f"{self.extra['prefix']} {msg}", kwargs  # type: ignore[index]


def context(subject: str, stage: str) -> Context:
    return Context(logging.getLogger(LOGGER), {"prefix": f"[{subject} > {stage}]"})
