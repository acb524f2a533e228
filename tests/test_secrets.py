"""Secrets: declared in pipeline.yml, read from the environment or opened with Ansible Vault, they
reach the roles and nothing the pipeline writes. Packer is a stand-in here (a script that reads
the variables Ansible would get, prints them as a careless role would, and writes a disk), so
that every file a bake leaves can be searched without booting a VM.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from projects import MINIMAL, run_pipeline

from pipeline import api, config, log, secret
from pipeline import fingerprint as fp
from pipeline.errors import ConfigError, ToolError, UsageError
from pipeline.registry import open_registry
from pipeline.stages import bake as bake_stage
from pipeline.stages import verify as verify_stage
from pipeline.targets.local import baseimage
from pipeline.tools import playbook, process

REPO = Path(__file__).resolve().parent.parent
CANARY = "canary-3f9a1c7e-secret-value"
FROM_ENV = "env-canary-81d0b2-token"
VAULTED = "vault-canary-5e6b44-password"
VAULT_PASSWORD = "vault-password-c02e9a"

SECRET_IMAGE = MINIMAL.replace(
    "    roles: [base, webservice]\n",
    "    roles: [base, webservice]\n"
    "    vars:\n      webservice_message: Hello\n"
    "    secret_vars:\n"
    f"      webservice_api_token: {CANARY}\n"
    "      webservice_db_password: {env: TEST_DB_PASSWORD}\n",
)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pipeline.yml"
    path.write_text(text, encoding="utf-8")
    return path


# (id, the image's secret_vars as YAML, dotted key, what the message says)
BAD_SECRETS = [
    ("a-number", "{token: 12345678}", "images.web.secret_vars.token", "got int (quote it)"),
    ("too-short", "{token: abc12}", "images.web.secret_vars.token", "at least 6 characters"),
    ("a-list", "{token: [hunter22]}", "images.web.secret_vars.token", "got a list"),
    ("empty", "{token: }", "images.web.secret_vars.token", "got no value (the key is empty)"),
    ("bad-name", "{'not a name': hunter22}", "images.web.secret_vars.not a name", "not valid"),
    ("env-typo", "{token: {evn: TOKEN}}", "images.web.secret_vars.token.evn", "unknown key"),
    ("env-bad", "{token: {env: 'A-B'}}", "images.web.secret_vars.token.env", "not valid"),
    ("not-a-mapping", "[token]", "images.web.secret_vars", "must be a mapping"),
]


@pytest.mark.parametrize(
    ("declared", "key", "problem"),
    [case[1:] for case in BAD_SECRETS],
    ids=[case[0] for case in BAD_SECRETS],
)
def test_a_bad_secret_declaration_names_file_and_key_but_not_the_value(
    tmp_path: Path, declared: str, key: str, problem: str
) -> None:
    text = MINIMAL.replace(
        "    version: 1.0.0\n", f"    version: 1.0.0\n    secret_vars: {declared}\n"
    )
    path = _write(tmp_path, text)

    with pytest.raises(ConfigError) as caught:
        config.load(path)

    message = str(caught.value)
    assert message.startswith(f"{path}: {key}: "), message
    assert problem in message
    for value in ("12345678", "abc12", "hunter22"):
        assert value not in message.split(": ", 2)[2]


def test_a_variable_is_either_secret_or_not(tmp_path: Path) -> None:
    text = SECRET_IMAGE.replace("webservice_message: Hello", "webservice_api_token: plain")
    with pytest.raises(ConfigError, match=r"secret_vars\.webservice_api_token: is declared under"):
        config.load(_write(tmp_path, text))


def test_a_vault_password_file_packer_would_misread_is_refused(tmp_path: Path) -> None:
    text = MINIMAL + "vault_password_file: 'vault{{pass}}'\n"
    with pytest.raises(ConfigError, match=r"vault_password_file: .*Packer would read"):
        config.load(_write(tmp_path, text))


def test_secret_values_stay_out_of_the_config_s_repr(tmp_path: Path) -> None:
    loaded = config.load(_write(tmp_path, SECRET_IMAGE))

    image = loaded.image("web")
    assert set(image.secret_vars) == {"webservice_api_token", "webservice_db_password"}
    assert "webservice_api_token" not in image.vars
    assert CANARY not in repr(loaded)


@pytest.fixture(autouse=True)
def _nothing_withheld(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with no environment variable withheld by an earlier test's config."""
    monkeypatch.setattr(secret, "_WITHHELD", {})


def test_a_secret_s_environment_variable_is_out_of_every_tool_s_reach_once_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by the e2e canary: a scale's smoke playbook, which reads no secret, left the
    variable in ansible-runner's artifacts, which copy the whole environment."""
    monkeypatch.setenv("TEST_DB_PASSWORD", CANARY)
    _copy_project(tmp_path)
    loaded = config.load(_write(tmp_path, SECRET_IMAGE))

    assert "TEST_DB_PASSWORD" not in os.environ
    assert "TEST_DB_PASSWORD" not in process.command_env()
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(sorted(os.environ.items()))"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert CANARY not in child.stdout
    # The bake still gets it, and it is masked.
    assert bake_stage.secret_values(loaded, loaded.image("web"))["webservice_db_password"] == CANARY
    assert secret.redact(f"token {CANARY}") == f"token {secret.MASK}"


def test_a_secret_from_an_unset_environment_variable_names_key_and_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TEST_DB_PASSWORD", raising=False)
    _copy_project(tmp_path)
    loaded = config.load(_write(tmp_path, SECRET_IMAGE))

    with pytest.raises(ConfigError) as caught:
        bake_stage.secret_values(loaded, loaded.image("web"))

    assert str(caught.value) == (
        f"{tmp_path / 'pipeline.yml'}: images.web.secret_vars.webservice_db_password:"
        " environment variable TEST_DB_PASSWORD is not set (it holds this secret)"
    )


def test_the_redactor_masks_each_line_and_the_json_form_of_a_secret() -> None:
    redactor = secret.Redactor()
    redactor.add('line-one-of-a-key\nline "two" of it\nab')

    shown = redactor('got line-one-of-a-key and {"v": "line \\"two\\" of it"} ab')

    assert shown == 'got ******** and {"v": "********"} ab'
    assert redactor("nothing secret here") == "nothing secret here"


def test_a_secret_inside_a_longer_one_is_masked_as_part_of_the_longer(tmp_path: Path) -> None:
    redactor = secret.Redactor()
    redactor.add("inner-secret")
    redactor.add("outer-inner-secret-value")
    (tmp_path / "logs").mkdir()
    log = tmp_path / "logs" / "tool.log"
    log.write_text("outer-inner-secret-value / inner-secret\n")
    untouched = tmp_path / "other.log"
    untouched.write_text("nothing here\n")

    assert redactor.scrub(tmp_path) == [log]
    assert log.read_text() == "******** / ********\n"
    assert untouched.read_text() == "nothing here\n"


def test_the_pipeline_s_own_log_lines_mask_a_known_secret(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    logger = logging.getLogger(log.LOGGER)
    for name in ("handlers", "level", "propagate"):
        monkeypatch.setattr(logger, name, [] if name == "handlers" else getattr(logger, name))
    log.setup(0)
    secret.remember("log-line-canary-77")

    log.context("web 1.0.0", "bake").info("a tool said %s", "token=log-line-canary-77")

    assert capsys.readouterr().err == f"[web 1.0.0 > bake] a tool said token={secret.MASK}\n"


# A bake through a stand-in Packer.

FAKE_PACKER = """\
#!{python}
import os, re, shutil, sys
from pathlib import Path

if sys.argv[1] == "version":
    print("Packer v1.6.6")
    sys.exit(0)
template = Path(sys.argv[-1]).read_text()
vars_file = Path(re.search(r'"@([^"]+)"', template).group(1))
proof = Path(os.environ["FAKE_PACKER_PROOF"])
shutil.copy(vars_file, proof / "vars.json")
(proof / "vars-file").write_text(str(vars_file))
(proof / "vars-mode").write_text(oct(vars_file.stat().st_mode & 0o777))
(proof / "env").write_text(repr(sorted(os.environ)))
# A careless role prints what it got, as a debug task would, and so the vault password.
print("ok: [default] => " + vars_file.read_text())
vault = re.search(r'ANSIBLE_VAULT_PASSWORD_FILE=([^"]+)"', template)
print("vault: " + Path(vault.group(1)).read_text())
if os.environ.get("FAKE_PACKER_FAIL"):
    print("fatal: [default]: FAILED! => " + vars_file.read_text())
    sys.exit(1)
output = Path(re.search(r'output_directory\\s*=\\s*"([^"]+)"', template).group(1))
output.mkdir(parents=True)
(output / "disk.qcow2").write_bytes(b"a disk")
"""


def _copy_project(root: Path) -> None:
    for name in ("roles", "templates", "playbooks"):
        shutil.copytree(REPO / name, root / name)


def _vault_encrypt(text: str) -> str:
    from ansible.constants import DEFAULT_VAULT_ID_MATCH
    from ansible.parsing.vault import VaultLib, VaultSecret

    vault = VaultLib([(DEFAULT_VAULT_ID_MATCH, VaultSecret(VAULT_PASSWORD.encode()))])
    return vault.encrypt(text.encode()).decode()


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project whose image has a secret in pipeline.yml, one from the environment and one
    in a role, encrypted with Ansible Vault; its base image and Packer are stand-ins."""
    root = tmp_path / "project"
    root.mkdir()
    _copy_project(root)
    defaults = root / "roles" / "webservice" / "defaults" / "main.yml"
    encrypted = _vault_encrypt(VAULTED).replace("\n", "\n  ")
    defaults.write_text(defaults.read_text() + f"webservice_vaulted: !vault |\n  {encrypted}\n")
    # Beside the project, as a password file should be: not in the folder that is shared.
    password = tmp_path / "vault-password"
    password.write_text(VAULT_PASSWORD + "\n")
    _write(root, SECRET_IMAGE + f"vault_password_file: {password}\n")

    tools = tmp_path / "bin"
    tools.mkdir()
    packer = tools / "packer"
    packer.write_text(FAKE_PACKER.replace("{python}", sys.executable))
    packer.chmod(0o755)
    proof = tmp_path / "proof"
    proof.mkdir()
    monkeypatch.setenv("PATH", f"{tools}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_PACKER_PROOF", str(proof))
    monkeypatch.setenv("TEST_DB_PASSWORD", FROM_ENV)
    monkeypatch.setenv("PIPELINE_ACCEL", "tcg")
    monkeypatch.chdir(root)

    def fake_base(state_dir: Path, spec: baseimage.BaseSpec, **_: object) -> baseimage.BaseImage:
        folder = state_dir / "base" / "fake"
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("disk.qcow2", "vmlinuz", "initrd.img"):
            (folder / name).write_bytes(name.encode())
        return baseimage.BaseImage(
            dir=folder,
            disk=folder / "disk.qcow2",
            kernel=folder / "vmlinuz",
            initrd=folder / "initrd.img",
            fingerprint="f" * 16,
            append=baseimage.APPEND,
            manifest={"suite": "bookworm"},
        )

    monkeypatch.setattr(baseimage, "ensure_base_image", fake_base)
    return root


def _files_holding(root: Path, *values: str) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            found += [f"{path}: {v}" for v in values if v.encode() in data]
    return found


SECRETS = (CANARY, FROM_ENV, VAULTED, VAULT_PASSWORD)


def test_a_failed_bake_gave_ansible_the_secrets_and_left_none_behind(project: Path) -> None:
    proof = project.parent / "proof"
    os.environ["FAKE_PACKER_FAIL"] = "1"
    try:
        with pytest.raises(ToolError) as caught:
            api.bake("web")
    finally:
        del os.environ["FAKE_PACKER_FAIL"]

    # Ansible's variables held the secrets, in a file only its owner could read, outside the
    # run folder, gone once Packer ended; the tool did not inherit the environment's secret.
    given = json.loads((proof / "vars.json").read_text())
    assert given["webservice_api_token"] == CANARY
    assert given["webservice_db_password"] == FROM_ENV
    assert given["webservice_message"] == "Hello"
    assert (proof / "vars-mode").read_text() == "0o600"
    vars_file = Path((proof / "vars-file").read_text())
    assert vars_file.parent.parent == project / ".pipeline" / "private"
    assert not vars_file.exists()
    assert list((project / ".pipeline" / "private").iterdir()) == []
    assert "TEST_DB_PASSWORD" not in (proof / "env").read_text()

    # What Packer printed was masked: in the error, its log and everything else written.
    message = str(caught.value)
    assert secret.MASK in message
    assert [m for m in SECRETS if m in message] == []
    assert _files_holding(project / ".pipeline", *SECRETS) == []
    run_dir = next((project / ".pipeline" / "runs").iterdir())
    recorded = json.loads((run_dir / "bake-vars.json").read_text())
    assert recorded["webservice_api_token"] == secret.MASK
    assert recorded["webservice_message"] == "Hello"
    logs = "".join(p.read_text() for p in (run_dir / "logs").glob("*packer*"))
    assert secret.MASK in logs


def test_a_plan_and_its_json_hold_no_secret(project: Path) -> None:
    done = run_pipeline("plan", "web", "--env", "dev", "--json", cwd=project, timeout=300)

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["bake"]["rebuild"] is True
    assert [s for s in SECRETS if s in done.stdout + done.stderr] == []
    # Terraform's logs of the dry run are kept, for a plan that failed, and hold none either.
    assert list((project / ".pipeline/logs/plan/dev").glob("terraform-*-plan.log"))
    assert _files_holding(project / ".pipeline", *SECRETS) == []


def _plain_hashes(name: str, value: str) -> set[str]:
    return {
        hashlib.sha256(value.encode()).hexdigest(),
        fp.hash_value(value),
        fp.hash_value({name: value}),
        fp.hash_bytes(f"{name}\0{value}".encode()),
    }


def test_a_changed_secret_bakes_a_new_version_whose_manifest_holds_no_plain_hash(
    project: Path,
) -> None:
    first = api.bake("web")
    again = api.bake("web")
    text = (project / "pipeline.yml").read_text()
    (project / "pipeline.yml").write_text(text.replace(CANARY, CANARY + "-rotated"))
    planned = api.plan("web", "dev")
    second = api.bake("web")

    assert (first.baked, again.baked, second.baked) == (True, False, True)
    assert again.version.version == first.version.version
    assert second.version.fingerprint != first.version.fingerprint
    assert "variables changed: webservice_api_token" in planned["bake"]["reasons"]

    for result, value in ((first, CANARY), (second, CANARY + "-rotated")):
        manifest_file = Path(result.version.path) / "manifest.json"
        manifest = json.loads(manifest_file.read_text())
        assert set(manifest["secret_vars"]) == {"webservice_api_token", "webservice_db_password"}
        assert "webservice_api_token" not in manifest["vars"]
        hashes = _plain_hashes("webservice_api_token", value)
        assert [h for h in hashes if h in manifest_file.read_text()] == []
    key = project / ".pipeline" / "keys" / "secrets.key"
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    assert _files_holding(project / ".pipeline", *SECRETS) == []

    shown = run_pipeline("images", "show", "web", second.version.version, "--json", cwd=project)
    assert shown.returncode == 0, shown.stderr
    assert "secret_vars" in shown.stdout and CANARY not in shown.stdout


def test_vaulted_content_without_a_password_file_is_found_before_anything_runs(
    project: Path,
) -> None:
    text = (project / "pipeline.yml").read_text()
    (project / "pipeline.yml").write_text(text.split("vault_password_file:")[0])

    done = run_pipeline("bake", "web", cwd=project, TEST_DB_PASSWORD=FROM_ENV)

    assert done.returncode == 3, done.stderr
    defaults = project / "roles" / "webservice" / "defaults" / "main.yml"
    assert done.stderr == (
        f"pipeline: error: {defaults}: holds Ansible Vault content, but pipeline.yml has no"
        " vault_password_file\n"
    )
    assert not (project / ".pipeline").exists()


def test_a_wrong_vault_password_is_found_before_anything_runs(project: Path) -> None:
    (project.parent / "vault-password").write_text("not-the-password\n")

    done = run_pipeline("bake", "web", cwd=project, TEST_DB_PASSWORD=FROM_ENV)

    assert done.returncode == 3, done.stderr
    assert "Ansible Vault content that vault_password_file does not decrypt" in done.stderr
    assert not (project / ".pipeline").exists()


def test_a_vault_password_script_is_refused(project: Path) -> None:
    (project.parent / "vault-password").chmod(0o755)

    loaded = config.load(project / "pipeline.yml")
    with pytest.raises(ConfigError, match=r"vault_password_file: .* is executable"):
        bake_stage.secret_values(loaded, loaded.image("web"))


def test_verify_refuses_a_secret_other_than_the_one_baked_with(project: Path) -> None:
    baked = api.bake("web").version
    loaded = config.load(project / "pipeline.yml")
    assert verify_stage.baked_secrets(loaded, baked) == {
        "webservice_api_token": CANARY,
        "webservice_db_password": FROM_ENV,
    }
    os.environ["TEST_DB_PASSWORD"] = FROM_ENV + "-rotated"
    loaded = config.load(project / "pipeline.yml")  # as the next command would read it

    with pytest.raises(UsageError) as caught:
        verify_stage.baked_secrets(loaded, baked)

    assert str(caught.value) == (
        f"web {baked.version} was baked with other values of secret variable(s)"
        " webservice_db_password than are given now (or they are no longer declared);"
        " verify needs the values it was baked with"
    )


def test_verify_of_the_newest_version_gets_its_manifest_and_so_its_secrets(project: Path) -> None:
    api.bake("web")
    registry = open_registry(project / ".pipeline")
    try:
        newest = api._pick_version(registry, "web", None)
    finally:
        registry.close()
    loaded = config.load(project / "pipeline.yml")

    assert set(newest.manifest["secret_vars"]) == {"webservice_api_token", "webservice_db_password"}
    assert verify_stage.baked_secrets(loaded, newest)["webservice_api_token"] == CANARY


SMOKE = """\
---
- name: Smoke
  hosts: all
  gather_facts: false
  vars:
    smoke_token: !vault |
      {encrypted}
  tasks:
    - name: A careless check prints the token it opened
      ansible.builtin.debug:
        msg: "token {{{{ smoke_token }}}}"
"""


def test_a_smoke_playbook_opens_vaulted_values_and_the_runner_keeps_them_masked(
    tmp_path: Path,
) -> None:
    book = tmp_path / "playbooks" / "smoke.yml"
    book.parent.mkdir()
    book.write_text(SMOKE.format(encrypted=_vault_encrypt(VAULTED).replace("\n", "\n      ")))
    password = tmp_path / "vault-password"
    password.write_text(VAULT_PASSWORD + "\n")
    local = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}

    opened = secret.read_vault_password(password, tmp_path / "pipeline.yml")
    assert secret.vault_values([book.parent], opened, tmp_path / "pipeline.yml") == 1
    outcome = playbook.run(
        book,
        {"one": local},
        group="dev",
        folder=tmp_path / "smoke",
        timeout=120,
        vault_password_file=password,
    )

    assert outcome.ok, outcome.summary
    assert _files_holding(tmp_path / "smoke", VAULTED, VAULT_PASSWORD) == []
    events = "".join(p.read_text() for p in (tmp_path / "smoke").rglob("job_events/*.json"))
    assert f"token {secret.MASK}" in events
