"""Properties over inputs nobody wrote by hand.

The config loader: any text, and any valid pipeline.yml with a key dropped, added or given a
value of another kind, either loads or fails with a ConfigError naming the file (and the key,
when the file is a mapping), in one line. Nothing else may escape.

The HCL escaper: a value written by the `hcl` filter is read back unchanged by the embedded
Terraform's own HCL parser, many values per Terraform call.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import subprocess
import sys
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from projects import MINIMAL

from pipeline import config, render
from pipeline.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = yaml.safe_load((REPO / "pipeline.yml").read_text(encoding="utf-8"))
# A complete configuration, so that mutations reach every reader: one image with a base, vars,
# bump and schedule, and one environment with health, rollout and front door.
FULL = {
    "state_dir": ".pipeline",
    "bases": {"slim": {"suite": "bookworm", "packages": ["curl"]}},
    "images": {
        "web": {
            "version": "1.0.0",
            "roles": ["base", "webservice"],
            "base": "slim",
            "vars": {"webservice_message": "hi", "nested": {"a": [1, 2]}},
            "bump": {"default": "patch", "roles": "minor"},
            "service_port": 8080,
            "health_path": "/healthz",
            "schedule": {"cron": "0 3 * * *", "do": "bake", "triggers": ["inputs_changed"]},
        }
    },
    "environments": {
        "dev": {
            "image": "web",
            "channel": "dev",
            "instances": 2,
            "memory": 512,
            "health": {"path": "/healthz", "status": 200, "interval": 1},
            "rollout": {"strategy": "rolling", "max_surge": 1, "max_unavailable": 0},
            "front_door": {"port": 18080},
        }
    },
}
VALID = [yaml.safe_load(MINIMAL), EXAMPLE, FULL]

# Pieces of YAML syntax, so that random text often gets past the first character.
YAML_PIECES = [
    "images:", "environments:", "web:", "dev:", "version: 1.0.0", "roles: [base]", "image: web",
    "\n", "\n  ", "\n    ", ": ", "- ", "[", "]", "{", "}", ", ", "#", "&a ", "*a", "!!set ", "? ",
    "|", ">", "'", '"', "\\", "\t", "%YAML 1.1", "---", "...", "<<: ", "~", "null", "yes", "0x1F",
    "1e3", ".nan", "2026-12-05", "{{", "${", "%{", "\x00", "\ufeff", "é",
]  # fmt: skip

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=12),
    st.sampled_from(["1.0", "v1.0.0", "../etc", "{{ x }}", "${x}", "%{x}", '"', "\\", "25%"]),
    st.dates(),
)
yamlish = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.one_of(st.text(max_size=8), st.integers(), st.booleans()), inner, max_size=3
        )
    ),
    max_leaves=8,
)


def _paths(data: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value in nested mappings and lists, the root included."""
    found = [prefix]
    if isinstance(data, dict):
        for key, value in data.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            found += _paths(value, (*prefix, index))
    return found


@st.composite
def mutated_configs(draw: st.DrawFn) -> Any:
    """A valid pipeline.yml with one to three changes: a key dropped, a key added, a value of
    another kind (or an odd string) put in place of one."""
    data = copy.deepcopy(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(data)))
        if not path:
            data = draw(yamlish) if draw(st.integers(0, 9)) == 0 else data
            continue
        parent = data
        for step in path[:-1]:
            parent = parent[step]
        how = draw(st.sampled_from(["drop", "replace", "add"]))
        if how == "drop":
            del parent[path[-1]]
        elif how == "replace":
            parent[path[-1]] = draw(yamlish)
        elif isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=10))] = draw(yamlish)
        else:
            parent.append(draw(yamlish))
    return data


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("configs")


def _load_or_refuse(path: Path, tally: Counter[str]) -> ConfigError | None:
    """Load `path`; return the ConfigError it gave, after checking it names the file in one line."""
    tally["generated"] += 1
    try:
        config.load(path)
    except ConfigError as error:
        tally["refused"] += 1
        assert error.path == str(path)
        assert str(error).startswith(f"{path}: ")
        assert "\n" not in str(error), str(error)
        return error
    tally["loaded"] += 1
    return None


SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(text=st.lists(st.sampled_from(YAML_PIECES) | st.text(max_size=6), max_size=30).map("".join))
def test_any_text_loads_or_is_refused_naming_the_file(
    text: str, folder: Path, bad_input_tally: Counter[str]
) -> None:
    path = folder / "pipeline.yml"
    path.write_text(text, encoding="utf-8")

    _load_or_refuse(path, bad_input_tally)


@SETTINGS
@given(data=mutated_configs())
def test_a_mutated_pipeline_yml_loads_or_is_refused_naming_the_file_and_key(
    data: Any, folder: Path, bad_input_tally: Counter[str]
) -> None:
    path = folder / "pipeline.yml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")

    error = _load_or_refuse(path, bad_input_tally)

    if error is not None and isinstance(data, dict):
        assert error.key, str(error)


# The HCL escaper


TEMPLATE_SEQUENCES = [
    "{{", "}}", "${", "%{", "$${", "%%{", "$", "%", "{", "}", '"', "\\", "\\n", "\n", "\r", "\t",
    "\x00", "\x07", "\x1b", "\x7f", "\u2028", "\u00a0", "é", "日本", "🙂", "~}", "<<EOT",
]  # fmt: skip
# Text in Unicode NFC: HCL normalises every string literal to it, so the filter refuses the rest
# (see the test below).
tricky_text = (
    st.lists(st.sampled_from(TEMPLATE_SEQUENCES) | st.text(max_size=8), max_size=12)
    .map("".join)
    .filter(lambda text: unicodedata.is_normalized("NFC", text))
)
hcl_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | tricky_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(tricky_text, inner, max_size=4),
    max_leaves=10,
)


def _same(read: Any, wanted: Any) -> bool:
    """Equal, where a float may come back as a whole number that reads as the same float: HCL
    has one number type, and Terraform writes 5.061405859547931e16 as 50614058595479310."""
    if isinstance(wanted, float):
        return (
            isinstance(read, int | float) and not isinstance(read, bool) and float(read) == wanted
        )
    if isinstance(wanted, list):
        return isinstance(read, list) and len(read) == len(wanted) and all(map(_same, read, wanted))
    if isinstance(wanted, dict):
        return (
            isinstance(read, dict)
            and read.keys() == wanted.keys()
            and all(_same(read[key], item) for key, item in wanted.items())
        )
    return type(read) is type(wanted) and read == wanted


def _terraform_reads(values: list[Any], folder: Path) -> list[Any]:
    """What the embedded Terraform makes of `{{ values | hcl }}`, in one console call."""
    (folder / "values.tf.j2").write_text("locals {\n  values = {{ values | hcl }}\n}\n")
    rendered = render.render(folder, "values.tf.j2", {"values": values})
    (folder / "main.tf").write_text(rendered, encoding="utf-8")
    # base64 of the JSON: the console prints it as a quoted string that holds nothing to unescape.
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.tools.embedded_terraform", "console"],
        input="base64encode(jsonencode(local.values))\n",
        cwd=folder,
        env={**os.environ, "PYTHONPATH": str(REPO), "CHECKPOINT_DISABLE": "1"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, rendered + done.stderr
    return list(json.loads(base64.b64decode(done.stdout.strip().strip('"'))))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=st.lists(hcl_values, min_size=5, max_size=40))
def test_terraform_reads_back_every_value_the_hcl_filter_writes(
    values: list[Any], tmp_path_factory: pytest.TempPathFactory, bad_input_tally: Counter[str]
) -> None:
    folder = tmp_path_factory.mktemp("hcl")

    read = _terraform_reads(values, folder)

    assert _same(read, values), read
    bad_input_tally["escaped"] += len(values)


@pytest.mark.parametrize("text", ["e\u0301", "\u212b", "/srv/cafe\u0301/disk.qcow2"])
def test_text_hcl_would_change_to_nfc_is_refused(text: str) -> None:
    with pytest.raises(TypeError, match="would change it to its NFC form"):
        render.hcl({"path": [text]})
