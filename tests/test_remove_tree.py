"""Removing a build's folder never reaches through a file system mounted inside it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from pipeline.files import mounts_under, remove_tree
from pipeline.targets.local import baseimage
from pipeline.tools import process

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")


@needs_root
def test_a_folder_mounted_inside_is_detached_not_emptied(tmp_path: Path) -> None:
    """As mmdebstrap killed mid-way leaves the machine's file systems mounted in its root."""
    outside = tmp_path / "machine"
    (outside / "shm").mkdir(parents=True)
    (outside / "shm" / "precious").write_text("keep me")
    tree = tmp_path / ".0123456789abcdef-1-2-x" / "root"
    (tree / "dev").mkdir(parents=True)
    (tree / "etc").mkdir()
    (tree / "etc" / "hostname").write_text("debian\n")
    subprocess.run(["mount", "--bind", str(outside), str(tree / "dev")], check=True)
    try:
        assert mounts_under(tree.parent) == [str(tree / "dev")]

        assert remove_tree(tree.parent) == []

        assert not tree.parent.exists()
        assert (outside / "shm" / "precious").read_text() == "keep me"
        assert mounts_under(tmp_path) == []
    finally:
        subprocess.run(["umount", "--lazy", str(tree / "dev")], check=False, capture_output=True)


def test_work_folders_of_dead_base_builds_go_and_live_or_foreign_ones_stay(
    tmp_path: Path,
) -> None:
    me = f"{os.getpid()}-{process.start_ticks(os.getpid())}"
    dead = tmp_path / f".{'a' * 16}-{2**22 + 13}-1-abc_1"
    live = tmp_path / f".{'b' * 16}-{me}-def2"
    older = tmp_path / f".{'c' * 16}-q1w2e3"  # named before builders were recorded: unknown
    built = tmp_path / ("d" * 16)
    for folder in (dead, live, older, built):
        (folder / "root" / "etc").mkdir(parents=True)

    assert baseimage.remove_abandoned_builds(tmp_path) == [dead]

    assert not dead.exists()
    assert live.exists() and older.exists() and built.exists()


def test_remove_tree_of_nothing_or_a_file(tmp_path: Path) -> None:
    assert remove_tree(tmp_path / "missing") == []
    single = tmp_path / "file"
    single.write_text("x")
    remove_tree(single)
    assert not single.exists()
