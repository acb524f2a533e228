"""Fingerprints: one hash of every input of a bake, and the hashes of its parts.

Two bakes with the same fingerprint would produce the same image, so the second is skipped.
The parts are kept in the manifest so that a changed fingerprint can be explained.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Files that never change what a role does.
IGNORED = {"__pycache__", ".pytest_cache", ".DS_Store"}
IGNORED_SUFFIXES = (".pyc", ".swp", "~")


def hash_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_value(value: Any) -> str:
    """Hash a JSON-able value independently of key order."""
    return hash_bytes(json.dumps(value, sort_keys=True, separators=(",", ":")).encode())


def hash_tree(root: Path) -> str:
    """Hash a folder: every file's relative path, mode bit for execute, and content."""
    digest = hashlib.sha256()
    for path in sorted(_files(root)):
        relative = path.relative_to(root).as_posix()
        executable = "x" if path.stat().st_mode & 0o111 else "-"
        digest.update(f"{relative}\0{executable}\0".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def hash_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def combine(parts: Mapping[str, str]) -> str:
    """The fingerprint of named parts (each already a hash)."""
    return hash_value(dict(parts))


def _files(root: Path) -> list[Path]:
    found = []
    for path in root.rglob("*"):
        if any(part in IGNORED for part in path.relative_to(root).parts):
            continue
        if path.is_file() and not path.name.endswith(IGNORED_SUFFIXES):
            found.append(path)
    return found
