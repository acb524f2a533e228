"""Human output: one logger, to stderr, each line carrying its context like `[web 1.4.0 > bake]`.

Data (listings, --json) goes to stdout and never through here.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

LOGGER = "pipeline"


def setup(verbosity: int) -> None:
    """-v shows the tools' own output as it comes; -vv also our debug detail."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger(LOGGER)
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbosity >= 1 else logging.INFO)
    root.propagate = False


class Context(logging.LoggerAdapter):  # type: ignore[type-arg]
    """A logger whose lines start with `[subject > stage]`."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        return f"{self.extra['prefix']} {msg}", kwargs  # type: ignore[index]


def context(subject: str, stage: str) -> Context:
    return Context(logging.getLogger(LOGGER), {"prefix": f"[{subject} > {stage}]"})
