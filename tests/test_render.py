"""Rendering: golden cases, HCL values Packer reads back unchanged, errors naming file and line.

Each folder under tests/golden/render holds template.j2, context.json and expected.txt, the exact
output. The packer-local case renders the real templates/packer/local.pkr.hcl.j2 (its template.j2
is a link to it), so a change to that template shows up here as a diff to review.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from pipeline import render
from pipeline.errors import TemplateError

REPO = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden" / "render"
CASES = sorted(path for path in GOLDEN.iterdir() if path.is_dir())
CASE_FILES = ["context.json", "expected.txt", "template.j2"]
REAL_TEMPLATES = REPO / "templates"
PACKER_TEMPLATE = "packer/local.pkr.hcl.j2"

needs_packer = pytest.mark.skipif(shutil.which("packer") is None, reason="packer is not installed")


def _context(case: Path) -> dict[str, Any]:
    return json.loads((case / "context.json").read_text(encoding="utf-8"))


def _expected(case: Path) -> str:
    # Bytes, so that no newline translation hides a difference.
    return (case / "expected.txt").read_bytes().decode("utf-8")


def _packer(*args: str, cwd: Path, stdin: str = "") -> subprocess.CompletedProcess[str]:
    # Offline: CHECKPOINT_DISABLE stops Packer's version check, the only network call these make.
    env = {**os.environ, "CHECKPOINT_DISABLE": "1", "PACKER_CACHE_DIR": str(cwd / "cache")}
    return subprocess.run(
        ["packer", *args],
        cwd=cwd,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# Golden cases


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_golden_case_renders_exactly_as_expected(case: Path) -> None:
    rendered = render.render(case, "template.j2", _context(case))

    assert rendered == _expected(case)


def test_every_golden_case_has_its_three_files() -> None:
    assert [case.name for case in CASES] == [
        "hcl-collections",
        "hcl-scalars",
        "hcl-strings",
        "packer-local",
        "terraform-local",
    ]
    for case in CASES:
        assert sorted(path.name for path in case.iterdir()) == CASE_FILES, case.name


def test_the_packer_local_case_is_the_real_template() -> None:
    linked = (GOLDEN / "packer-local" / "template.j2").resolve()

    assert linked == REAL_TEMPLATES / PACKER_TEMPLATE


@needs_packer
def test_packer_accepts_the_rendered_real_template(tmp_path: Path) -> None:
    (tmp_path / "image.pkr.hcl").write_text(_expected(GOLDEN / "packer-local"), encoding="utf-8")

    done = _packer("validate", "-syntax-only", "image.pkr.hcl", cwd=tmp_path)

    assert done.returncode == 0, done.stdout + done.stderr
    assert "Syntax-only check passed" in done.stdout


def test_without_a_provision_timeout_the_provisioner_has_none() -> None:
    context = {**_context(GOLDEN / "packer-local"), "provision_timeout": None}

    rendered = render.render(REAL_TEMPLATES, PACKER_TEMPLATE, context)

    assert 'timeout       = "1800s"' in _expected(GOLDEN / "packer-local")
    assert "timeout       =" not in rendered
    assert rendered == _expected(GOLDEN / "packer-local").replace(
        "    # The image's provision_timeout: Packer cancels the provisioner when it runs longer.\n"
        '    timeout       = "1800s"\n',
        "",
    )


# Values Packer reads back unchanged

TRICKY = [
    "${var.secret}",
    "%{ if true }yes%{ endif }",
    '${upper("a")}',
    "${1 + 1}",
    "$${already doubled}",
    "%%{already doubled}",
    "$$${x}",
    "\\${x}",
    "ends with $",
    "ends with %",
    "${",
    'say "hi" \\ back\\slash \\\\ \\n',
    "line\nbreak\r\n\ttab",
    "bell\x07 nul\x00 esc\x1b us\x1f del\x7f",
    "café 日本 🙂 \u2028 \u00a0",
    "",
    None,
    True,
    False,
    0,
    -17,
    12345678901234567890,
    0.1,
    [],
    ["${x}", 1, None, [True, "%{y}"]],
    {},
    {"${key}": "%{value}", "a b": {"c": [1, 2]}, 'quo"te': "\\"},
]


def _read_back(value: Any, tmp_path: Path) -> Any:
    """What Packer's own HCL parser makes of `{{ value | hcl }}`, as JSON."""
    (tmp_path / "value.j2").write_text("locals {\n  value = {{ value | hcl }}\n}\n")
    rendered = render.render(tmp_path, "value.j2", {"value": value})
    (tmp_path / "value.pkr.hcl").write_text(rendered, encoding="utf-8")

    # Wrapped in a list: jsonencode refuses a bare null.
    done = _packer("console", "value.pkr.hcl", cwd=tmp_path, stdin="jsonencode([local.value])\n")

    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)[0]


@needs_packer
@pytest.mark.parametrize("value", TRICKY, ids=[repr(value)[:40] for value in TRICKY])
def test_packer_reads_an_hcl_value_back_unchanged(value: Any, tmp_path: Path) -> None:
    assert _read_back(value, tmp_path) == value


@needs_packer
def test_packer_would_evaluate_a_string_quoted_without_the_filter(tmp_path: Path) -> None:
    # The check above can fail: a plain JSON-quoted string is a template to HCL.
    (tmp_path / "value.pkr.hcl").write_text(
        "locals {\n  value = " + json.dumps("${1 + 1}") + "\n}\n", encoding="utf-8"
    )

    done = _packer("console", "value.pkr.hcl", cwd=tmp_path, stdin="jsonencode(local.value)\n")

    # A template that is one interpolation yields the bare result, here a number.
    assert json.loads(done.stdout) == 2


def test_paths_and_tuples_are_written_as_strings_and_lists() -> None:
    assert render.hcl(Path("/srv/a b/${x}")) == '"/srv/a b/$${x}"'
    assert render.hcl(("a", 1, Path("/p"))) == '["a", 1, "/p"]'
    assert render.hcl({1: "one"}) == '{"1" = "one"}'


# Errors name the template file, its line and the cause


def _template(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "broken.j2"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "line", "cause"),
    [
        ("a = 1\nb = {{ missing }}\n", 2, "undefined name: 'missing' is undefined"),
        ("a = 1\n\nb = {{ missing | hcl }}\n", 3, "undefined name: 'missing' is undefined"),
        ("b = {{ [1, missing] | hcl }}\n", 1, "undefined name: 'missing' is undefined"),
        (
            "a = 1\nb = {{ base.kernal | hcl }}\n",
            2,
            "undefined name: 'dict object' has no attribute 'kernal'",
        ),
    ],
    ids=["bare", "through-hcl", "inside-a-list", "missing-attribute"],
)
def test_an_undefined_name_is_named_with_file_and_line(
    tmp_path: Path, text: str, line: int, cause: str
) -> None:
    path = _template(tmp_path, text)

    with pytest.raises(TemplateError) as caught:
        render.render(tmp_path, path.name, {"base": {"kernel": "/vmlinuz"}})

    assert caught.value.exit_code == 3
    assert str(caught.value) == f"{path}:{line}: {cause}"


def test_a_name_missing_from_the_real_templates_context_is_named(tmp_path: Path) -> None:
    context = _context(GOLDEN / "packer-local")
    del context["ssh_key"]
    path = REAL_TEMPLATES / PACKER_TEMPLATE
    lines = path.read_text().splitlines()
    line = next(number for number, text in enumerate(lines, 1) if "{{ ssh_key " in text)

    with pytest.raises(TemplateError) as caught:
        render.render(REAL_TEMPLATES, PACKER_TEMPLATE, context)

    assert str(caught.value) == f"{path}:{line}: undefined name: 'ssh_key' is undefined"


def test_a_syntax_error_is_named_with_file_and_line(tmp_path: Path) -> None:
    path = _template(tmp_path, "a = 1\nb = 2\n{% if %}\n")

    with pytest.raises(TemplateError) as caught:
        render.render(tmp_path, path.name, {})

    assert str(caught.value).startswith(f"{path}:3: template syntax: ")


def test_a_missing_template_is_named(tmp_path: Path) -> None:
    with pytest.raises(TemplateError) as caught:
        render.render(tmp_path, "nowhere.j2", {})

    assert str(caught.value) == f"{tmp_path / 'nowhere.j2'}: template not found"


@pytest.mark.parametrize(
    ("value", "cause"),
    [
        ({"a"}, "cannot write a set as HCL"),
        (math.nan, "cannot write nan as HCL"),
        (math.inf, "cannot write inf as HCL"),
    ],
    ids=["set", "nan", "inf"],
)
def test_a_value_hcl_cannot_hold_is_named_with_file_and_line(
    tmp_path: Path, value: Any, cause: str
) -> None:
    path = _template(tmp_path, "a = 1\nb = {{ value | hcl }}\n")

    with pytest.raises(TemplateError) as caught:
        render.render(tmp_path, path.name, {"value": value})

    assert str(caught.value).startswith(f"{path}:2: {cause}")


@pytest.mark.parametrize(
    ("text", "cause"),
    [
        ("a = {{ 1 // 0 }}\n", "ZeroDivisionError"),
        ('{% include "nope.j2" %}\n', "includes a template that does not exist"),
    ],
    ids=["division-by-zero", "missing-include"],
)
def test_any_failure_while_rendering_is_the_templates_and_named(
    tmp_path: Path, text: str, cause: str
) -> None:
    path = _template(tmp_path, text)

    with pytest.raises(TemplateError) as caught:
        render.render(tmp_path, path.name, {})

    assert str(caught.value).startswith(f"{path}")
    assert cause in str(caught.value)
