"""Secrets: where their values come from, how they reach Ansible, how they are masked, and how
they count among a bake's inputs without being written down.

A secret is a variable an image declares under `secret_vars:` in pipeline.yml (its value there,
or read from an environment variable when a bake needs it), a value Ansible Vault encrypts in
the image's roles, or the vault password itself. Every value the pipeline learns is remembered
by the process's redactor, which masks it in each line a tool prints, in the pipeline's own log
lines and messages, and in every file of the run folder when the run ends.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets as random
import shutil
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import ConfigError

MASK = "********"
# Shorter values would mask ordinary words and numbers everywhere (and are guessed anyway).
MIN_LENGTH = 6
VAULT_HEADER = b"$ANSIBLE_VAULT;"
# Files larger than this in a run folder are images or caches, not logs: never rewritten.
SCRUB_LIMIT = 64 << 20


@dataclass(frozen=True)
class SecretVar:
    """One entry of an image's `secret_vars:`: a literal value, or an environment variable."""

    name: str
    key: str
    env: str | None = None
    value: str | None = field(default=None, repr=False)

    def resolve(self, config_path: Path) -> str:
        """The value, read from the environment when declared so; remembered for masking."""
        if self.env is None:
            assert self.value is not None
            return self.value
        value = _WITHHELD.get(self.env) or os.environ.get(self.env, "")
        if not value:
            problem = f"environment variable {self.env} is not set (it holds this secret)"
            raise ConfigError(str(config_path), self.key, problem)
        if len(value) < MIN_LENGTH:
            problem = (
                f"environment variable {self.env} holds fewer than {MIN_LENGTH} characters;"
                " a secret that short cannot be masked"
            )
            raise ConfigError(str(config_path), self.key, problem)
        remember(value)
        return value


# The values of environment variables that hold secrets, taken out of this process's environment
# as soon as a configuration names them. Every tool inherits the environment, however it is
# started (ansible-runner copies it into its artifacts, Terraform into its providers), and the
# commands that never read a secret (a deploy, a scale) start tools too.
_WITHHELD: dict[str, str] = {}


def withhold(variables: Iterable[str]) -> None:
    """Move these environment variables out of os.environ, keeping their values for resolve(),
    and mask those values from now on."""
    for name in variables:
        value = os.environ.pop(name, None)
        if value is None:
            continue
        _WITHHELD[name] = value
        if len(value) >= MIN_LENGTH:
            remember(value)


class Redactor:
    """Replaces every known secret value in a text by MASK.

    Each line of a value is masked on its own (tools print line by line), and so is its form
    inside a JSON string (Ansible's events and the run's records are JSON).
    """

    def __init__(self) -> None:
        self._needles: list[str] = []
        self._lock = threading.Lock()

    def add(self, value: str) -> None:
        forms = set()
        for line in value.splitlines():
            forms |= {line, json.dumps(line)[1:-1], json.dumps(line, ensure_ascii=False)[1:-1]}
        with self._lock:
            # Longest first: a secret inside another is masked as part of the longer one.
            needles = {*self._needles, *(form for form in forms if len(form) >= MIN_LENGTH)}
            self._needles = sorted(needles, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for needle in self._needles:
            if needle in text:
                text = text.replace(needle, MASK)
        return text

    def clear(self) -> None:
        with self._lock:
            self._needles = []

    def holds_secret(self, data: bytes) -> bool:
        return any(needle.encode() in data for needle in self._needles)

    def scrub(self, folder: Path) -> list[Path]:
        """Mask the secrets in every file under `folder`; return the files rewritten.

        The net under everything tools write there themselves: QEMU's serial log, Packer's
        crash log, Molecule's and ansible-runner's artifacts.
        """
        rewritten: list[Path] = []
        if not self._needles or not folder.is_dir():
            return rewritten
        for path in sorted(folder.rglob("*")):
            if path.is_symlink() or not path.is_file() or path.stat().st_size > SCRUB_LIMIT:
                continue
            data = path.read_bytes()
            if not self.holds_secret(data):
                continue
            masked = self(data.decode("utf-8", errors="surrogateescape"))
            path.write_bytes(masked.encode("utf-8", errors="surrogateescape"))
            rewritten.append(path)
        return rewritten


REDACTOR = Redactor()


def remember(value: str) -> None:
    """Mask `value` from now on, in this process."""
    REDACTOR.add(value)


def redact(text: str) -> str:
    return REDACTOR(text)


def masked(variables: Mapping[str, Any], secret_names: Iterable[str]) -> dict[str, Any]:
    """`variables` as a record may show them: each secret's value replaced by MASK."""
    hidden = set(secret_names)
    return {name: MASK if name in hidden else value for name, value in variables.items()}


# Fingerprints. A plain hash of a short secret is as good as the secret to whoever reads the
# manifest (try every candidate); a keyed hash, under a key that never leaves this machine's
# state folder, still changes when the secret does.


def digest_key(state_dir: Path, *, create: bool) -> bytes:
    """The key secrets are hashed under: state_dir/keys/secrets.key, made on first need.

    With `create` false (a plan, which writes nothing) a missing key gives a throwaway one: no
    version can have been baked with secrets under a key that does not exist yet.
    """
    path = state_dir / "keys" / "secrets.key"
    if path.is_file():
        return path.read_bytes()
    key = random.token_bytes(32)
    if not create:
        return key
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(FileExistsError):
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as out:
            out.write(key)
    return path.read_bytes()


def digests(values: Mapping[str, str], key: bytes) -> dict[str, str]:
    """A keyed hash of each secret variable, its name included (two equal secrets differ)."""
    return {
        name: hmac.new(key, f"{name}\0{value}".encode(), hashlib.sha256).hexdigest()
        for name, value in values.items()
    }


# Files Ansible reads the secrets from: outside the run folder, readable by this user alone,
# and gone when the step that needed them ends.


@contextlib.contextmanager
def private_folder(state_dir: Path, build_id: str) -> Iterator[Path]:
    """state_dir/private/<build id>/ (mode 0700) for the duration of the block."""
    parent = state_dir / "private"
    parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder = parent / build_id
    folder.mkdir(mode=0o700)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def write_private_json(path: Path, data: Any) -> None:
    """Write `data` as JSON to a new file only its owner may read."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as out:
        json.dump(data, out, sort_keys=True)


# Ansible Vault.


def read_vault_password(path: Path, config_path: Path) -> str:
    """The vault password in `path` (as Ansible reads it: surrounding whitespace dropped)."""
    key = "vault_password_file"
    if not path.is_file():
        raise ConfigError(str(config_path), key, f"no such file: {path}")
    if os.access(path, os.X_OK):
        # Ansible would run it and take what it prints; the pipeline could not mask that.
        problem = f"{path} is executable: give a file holding the password, not a script"
        raise ConfigError(str(config_path), key, problem)
    try:
        password = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(config_path), key, f"{path} cannot be read: {exc}") from None
    if not password:
        raise ConfigError(str(config_path), key, f"{path} is empty")
    remember(password)
    return password


def vault_values(folders: Iterable[Path], password: str | None, config_path: Path) -> int:
    """Decrypt what Ansible Vault encrypts in `folders` and remember every value for masking;
    return how many encrypted files or values were found.

    Encrypted content with no vault_password_file, or one that does not open it, is an error
    now rather than after a VM has booted.
    """
    found = 0
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if not path.is_file():
                continue
            data = path.read_bytes()
            if VAULT_HEADER not in data:
                continue
            if password is None:
                problem = "holds Ansible Vault content, but pipeline.yml has no vault_password_file"
                raise ConfigError(str(path), None, problem)
            found += _remember_vaulted(path, data, password)
    return found


def _remember_vaulted(path: Path, data: bytes, password: str) -> int:
    from ansible.constants import DEFAULT_VAULT_ID_MATCH
    from ansible.errors import AnsibleError
    from ansible.parsing.vault import VaultLib, VaultSecret, is_encrypted

    vault = VaultLib([(DEFAULT_VAULT_ID_MATCH, VaultSecret(password.encode()))])

    def decrypt(text: bytes) -> str:
        try:
            return vault.decrypt(text.strip()).decode("utf-8", errors="replace")
        except AnsibleError:
            problem = "Ansible Vault content that vault_password_file does not decrypt"
            raise ConfigError(str(path), None, problem) from None

    if is_encrypted(data):
        plain = decrypt(data)
        _remember_leaves(_yaml_or_text(plain))
        return 1

    class Loader(yaml.SafeLoader):
        pass

    found: list[str] = []

    def vaulted(loader: yaml.SafeLoader, node: yaml.Node) -> str:
        found.append(decrypt(str(loader.construct_scalar(node)).encode()))  # type: ignore[arg-type]
        return ""

    Loader.add_constructor("!vault", vaulted)
    Loader.add_multi_constructor("!", lambda _loader, _tag, _node: None)
    try:
        yaml.load(data, Loader=Loader)
    except yaml.YAMLError:
        problem = "holds Ansible Vault text the pipeline cannot read (not a vaulted file nor YAML)"
        raise ConfigError(str(path), None, problem) from None
    for value in found:
        remember(value)
    return len(found)


def _yaml_or_text(plain: str) -> Any:
    try:
        loaded = yaml.safe_load(plain)
    except yaml.YAMLError:
        return plain
    return loaded if isinstance(loaded, dict | list) else plain


def _remember_leaves(value: Any) -> None:
    if isinstance(value, dict):
        for item in value.values():
            _remember_leaves(item)
    elif isinstance(value, list):
        for item in value:
            _remember_leaves(item)
    elif value is not None and not isinstance(value, bool):
        remember(str(value))
