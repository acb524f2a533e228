"""Every broken input of tests/badinputs.py, through the real `pipeline` command.

Each must give one line on stderr naming the file, key or value, a non-zero exit code, no
traceback, and leave the project (its state folder included) exactly as it was.
"""

from __future__ import annotations

import hashlib
import shlex
import shutil
from collections import Counter
from pathlib import Path

import pytest
from badinputs import CASES, Bad
from projects import run_pipeline

from pipeline.errors import EXIT_CODES
from pipeline.registry import open_registry
from pipeline.targets.local.qemu import QCOW2_MAGIC

REPO = Path(__file__).resolve().parent.parent
PROJECT_PARTS = ("pipeline.yml", "roles", "templates", "playbooks", "molecule")


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example project's own files, copied once; each case copies this copy."""
    root = tmp_path_factory.mktemp("example")
    for part in PROJECT_PARTS:
        source = REPO / part
        if source.is_dir():
            shutil.copytree(source, root / part)
        else:
            shutil.copy2(source, root / part)
    return root


def _seed(project: Path, state: str) -> None:
    """What the project holds before the case is met: see tests/badinputs.py."""
    registry = open_registry(project / ".pipeline")
    try:
        if state == "registry":
            return
        base = project / ".pipeline" / "base" / "fp-debian"
        image = project / ".pipeline" / "images" / "web" / "1.0.0"
        for folder in (base, image):
            folder.mkdir(parents=True)
            (folder / "disk.qcow2").write_bytes(QCOW2_MAGIC + bytes(60))
            (folder / "vmlinuz").write_bytes(b"kernel")
            (folder / "initrd.img").write_bytes(b"initrd")
        registry.record_base(
            "debian", fingerprint="fp-debian", build_id="b0-debian", path=str(base), manifest={}
        )
        registry.add(
            "web",
            "1.0.0",
            build_id="b1",
            fingerprint="fp-web",
            state={"web-built": "built", "web-verified": "verified"}[state],
            path=str(image),
            parent=("debian", "1.0.0"),
            manifest={"image": "web", "version": "1.0.0", "roles": ["base", "webservice"]},
        )
        if state == "web-verified":
            registry.promote("web", "dev", "1.0.0")
    finally:
        registry.close()


def _break(project: Path, case: Bad) -> None:
    for name, content in case.write.items():
        path = project / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
    for name, pairs in case.replace.items():
        path = project / name
        text = path.read_text(encoding="utf-8")
        for old, new in pairs:
            assert old in text, f"{case.name}: {old!r} is not in {name}"
            text = text.replace(old, new, 1)
        path.write_text(text, encoding="utf-8")
    for name, text in case.append.items():
        with (project / name).open("a", encoding="utf-8") as handle:
            handle.write(text)
    for name in case.remove:
        (project / name).unlink()


def snapshot(root: Path) -> dict[str, str]:
    """Every path under `root` with what it is: a folder, a link and its target, or a file and
    the hash of its content."""
    found = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if path.is_symlink():
            found[relative] = f"link to {path.readlink()}"
        elif path.is_dir():
            found[relative] = "folder"
        else:
            found[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def _changes(before: dict[str, str], after: dict[str, str]) -> list[str]:
    added = [f"written: {p}" for p in sorted(set(after) - set(before))]
    removed = [f"removed: {p}" for p in sorted(set(before) - set(after))]
    changed = [f"changed: {p}" for p in sorted(set(before) & set(after)) if before[p] != after[p]]
    return added + removed + changed


def test_the_corpus_names_each_case_once_and_expects_a_failure_code() -> None:
    names = Counter(case.name for case in CASES)

    assert [name for name, count in names.items() if count > 1] == []
    assert all(case.exit in EXIT_CODES and case.exit != 0 for case in CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_a_bad_input_gives_one_clear_message_and_writes_nothing(
    case: Bad, example: Path, tmp_path: Path, bad_input_tally: Counter[str]
) -> None:
    project = tmp_path / "project"
    shutil.copytree(example, project, symlinks=True)
    if case.state is not None:
        _seed(project, case.state)
    _break(project, case)
    before = snapshot(project)
    bad_input_tally["tried"] += 1

    # No tool on PATH: should a check ever come too late again, the command fails at once
    # instead of building a base image from the Debian archive or booting a VM. (Molecule and
    # the embedded Terraform are found beside Python, but start no VM without qemu.)
    no_tools = tmp_path / "no-tools"
    no_tools.mkdir()
    done = run_pipeline(
        *shlex.split(case.run), cwd=project, timeout=30, PATH=str(no_tools), **case.env
    )

    output = done.stdout + done.stderr
    assert "Traceback" not in output, output
    assert (done.returncode, done.stdout) == (case.exit, ""), output
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pipeline: error: "), done.stderr
    for fragment in case.says:
        assert fragment.replace("{project}", str(project)) in lines[0]
    assert _changes(before, snapshot(project)) == []
    bad_input_tally["clear"] += 1
