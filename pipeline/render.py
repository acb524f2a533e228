"""Jinja2 rendering of the Packer and Terraform templates.

Undefined names are errors (StrictUndefined), and values reach HCL only through the `hcl` filter,
which quotes and escapes them so that `${`, `%{`, quotes and backslashes survive literally.
"""

from __future__ import annotations

import json
import math
import traceback
import unicodedata
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jinja2

from pipeline.errors import TemplateError


def hcl(value: Any) -> str:
    """Turn a Python value into an HCL expression that evaluates to exactly that value."""
    if isinstance(value, jinja2.Undefined):
        # Raises the undefined name's own error, which names it, instead of a TypeError below.
        value._fail_with_undefined_error()
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        raise TypeError(f"cannot write {value} as HCL: its numbers are finite")
    if isinstance(value, int | float):
        return json.dumps(value)
    if isinstance(value, str | Path):
        return hcl_string(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(hcl(item) for item in value) + "]"
    if isinstance(value, Mapping):
        items = ", ".join(f"{hcl_string(str(k))} = {hcl(v)}" for k, v in value.items())
        return "{" + items + "}"
    raise TypeError(f"cannot write a {type(value).__name__} as HCL")


def hcl_string(text: str) -> str:
    """A quoted HCL string literal whose value is `text`, with templates sequences escaped.

    HCL turns every string literal into Unicode NFC, escapes included, so a text in another
    form (a path with a decomposed é) is refused: Packer would be given a different one.
    """
    if not unicodedata.is_normalized("NFC", text):
        raise TypeError(f"cannot write {text!r} as HCL: HCL would change it to its NFC form")
    out = []
    i = 0
    while i < len(text):
        char = text[i]
        pair = text[i : i + 2]
        if pair in ("${", "%{"):
            # HCL's own escape for a literal template opener is the doubled sigil.
            out.append(pair[0] * 2 + "{")
            i += 2
            continue
        out.append(_HCL_ESCAPES.get(char) or (char if char >= " " else f"\\u{ord(char):04x}"))
        i += 1
    return '"' + "".join(out) + '"'


_HCL_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def environment(templates_dir: Path) -> jinja2.Environment:
    """The Jinja2 environment every template is rendered in."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["hcl"] = hcl
    env.filters["json"] = lambda value: json.dumps(value, sort_keys=True)
    return env


def render(templates_dir: Path, name: str, context: Mapping[str, Any]) -> str:
    """Render `templates_dir/name`; any failure names the template file, its line and the cause."""
    path = templates_dir / name
    if not path.is_file():
        raise TemplateError(str(path), None, "template not found")
    env = environment(templates_dir)
    try:
        return env.get_template(name).render(**context)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(
            f"{path}:{exc.lineno}", None, f"template syntax: {exc.message}"
        ) from None
    except jinja2.UndefinedError as exc:
        line = _template_line(exc, path)
        where = f"{path}:{line}" if line else str(path)
        raise TemplateError(where, None, f"undefined name: {exc.message}") from None
    except jinja2.TemplateNotFound as exc:
        line = _template_line(exc, path)
        where = f"{path}:{line}" if line else str(path)
        raise TemplateError(
            where, None, f"includes a template that does not exist: {exc}"
        ) from None
    except TypeError as exc:
        # The hcl filter's refusals: the message already says what could not be written.
        line = _template_line(exc, path)
        where = f"{path}:{line}" if line else str(path)
        raise TemplateError(where, None, str(exc)) from None
    except Exception as exc:
        # Anything else raised while rendering (a division by zero, a bad filter argument) is
        # still a fault of the template, not of the pipeline.
        line = _template_line(exc, path)
        where = f"{path}:{line}" if line else str(path)
        raise TemplateError(where, None, f"{type(exc).__name__}: {exc}") from None


def _template_line(exc: BaseException, path: Path) -> int | None:
    # Jinja2 rewrites tracebacks so that template frames carry the template's own file and line.
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if frame.filename == str(path):
            return frame.lineno
    return None
