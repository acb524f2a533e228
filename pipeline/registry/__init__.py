"""The image registry and how to open it: SQLite by default, PostgreSQL given a URL."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

from pipeline import secret
from pipeline.errors import VariableError
from pipeline.registry import picture, retention
from pipeline.registry.backends import (
    RegistryUnavailable,
    anchored,
    connect,
    redact,
    url_problem,
)
from pipeline.registry.store import (
    Channel,
    ChannelMove,
    ChannelMoved,
    ImageVersion,
    Registry,
    Revocation,
)

# Overrides `registry:` in pipeline.yml, so one project can point at a team's server.
URL_VARIABLE = "PIPELINE_REGISTRY_URL"

__all__ = [
    "URL_VARIABLE",
    "Channel",
    "ChannelMove",
    "ChannelMoved",
    "ImageVersion",
    "Registry",
    "RegistryUnavailable",
    "Revocation",
    "default_url",
    "open_registry",
    "picture",
    "redact",
    "retention",
]


def default_url(state_dir: Path) -> str:
    return f"sqlite:///{state_dir / 'registry.db'}"


def open_registry(state_dir: Path, url: str | None = None, *, root: Path | None = None) -> Registry:
    """The registry named by $PIPELINE_REGISTRY_URL, else by `url`, else the state folder's.

    A relative SQLite path in the variable is read from `root`, the project folder (by default
    the state folder's parent, as for the default `.pipeline`), never from the current folder.
    """
    chosen = url
    note = ""
    from_variable = os.environ.get(URL_VARIABLE)
    if from_variable:
        # pipeline.yml's URL was checked and anchored as the file was read; this one is not.
        problem = url_problem(from_variable)
        if problem:
            raise VariableError(URL_VARIABLE, problem)
        project = root or state_dir.parent
        chosen = anchored(from_variable, project)
        if chosen != from_variable:
            note = (
                f" ({URL_VARIABLE} names a path relative to the project folder {project};"
                " an absolute path takes four slashes: sqlite:////PATH)"
            )
    if not chosen:
        return Registry(connect(default_url(state_dir), create_folder=True))

    password = urlsplit(chosen).password
    if password:
        secret.remember(password)  # masked should a tool or message ever show it
    try:
        return Registry(connect(chosen))
    except RegistryUnavailable as exc:
        raise RegistryUnavailable(f"{exc}{note}") from None
