"""The image registry and how to open it: SQLite by default, PostgreSQL given a URL."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

from pipeline import secret
from pipeline.registry import picture, retention
from pipeline.registry.backends import RegistryUnavailable, connect, redact
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


def open_registry(state_dir: Path, url: str | None = None) -> Registry:
    """The registry named by $PIPELINE_REGISTRY_URL, else by `url`, else the state folder's."""
    chosen = os.environ.get(URL_VARIABLE) or url
    if chosen:
        password = urlsplit(chosen).password
        if password:
            secret.remember(password)  # masked should a tool or message ever show it
        return Registry(connect(chosen))
    return Registry(connect(default_url(state_dir), create_folder=True))
