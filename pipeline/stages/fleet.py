"""An environment's fleet as the pipeline steers it: members in Terraform, a front door before them.

Terraform holds one `pipeline_instance` per member, keyed by the member's name; the pipeline
decides which members exist (the `instances` variable) and changes that set one step at a time,
so that every step of a rollout is a plan and an apply of its own:

- `converge(members)`: plan and apply exactly these members (new ones boot and answer before
  Terraform records them; missing ones are destroyed, before any new one boots); the plan may
  have been made ahead by `prepare(members)` while a gate ran;
- `gate(names)`: the health gate, the pipeline's own check of new members (expected status,
  consecutive passes) and the smoke playbook, before they take traffic;
- `serve(names)`: the front door sends traffic to exactly these members (one seamless reload);
- `leave(names)`: out of the front door, in-flight requests drained (a rollout destroys them
  with its next converge);
- `retire(names)`: leave, then destroyed.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import render, secret
from pipeline.config import Config, EnvironmentConfig
from pipeline.errors import DeployFailed, PipelineError
from pipeline.files import write_text_atomic
from pipeline.registry import ImageVersion
from pipeline.runs import Run
from pipeline.targets.local import qemu
from pipeline.targets.local.baseimage import baked
from pipeline.targets.local.frontdoor import FrontDoor, HealthCheck
from pipeline.tools.terraform import Plan, Terraform

TEMPLATE = "terraform/{target}/main.tf.j2"
MOVED_FILE = "moved.tf"
PROBE_SECONDS = 3.0
CPUS = 1
INDEX = re.compile(r"-(\d+)$")


@dataclass(frozen=True)
class Member:
    """One instance as the pipeline wants it: its name and the version it runs."""

    name: str
    version: str
    build_id: str
    image_path: str
    kernel: str
    initrd: str
    append: str

    @property
    def prefix(self) -> str:
        """The name without its index: members with the same prefix are interchangeable."""
        return INDEX.sub("", self.name)

    def variables(self) -> dict[str, str]:
        return {
            "image_version": self.version,
            "build_id": self.build_id,
            "image_path": self.image_path,
            "kernel": self.kernel,
            "initrd": self.initrd,
            "append": self.append,
        }

    @classmethod
    def from_state(cls, item: dict[str, Any]) -> Member:
        labels = item.get("labels") or {}
        return cls(
            name=str(item.get("name")),
            version=str(item.get("image_version")),
            build_id=str(labels.get("build_id", "")),
            image_path=str(item.get("image")),
            kernel=str(item.get("kernel")),
            initrd=str(item.get("initrd")),
            append=str(item.get("append", "")),
        )


class GateFailed(DeployFailed):
    """New members did not pass the health gate or the smoke test."""


def configuration(config: Config, environment: EnvironmentConfig) -> str:
    """An environment's Terraform configuration, rendered from its template.

    It depends on pipeline.yml alone, so a mistake in the template can be found before a
    rollout starts anything.
    """
    image = config.image(environment.image)
    return render.render(
        config.templates_dir,
        TEMPLATE.format(target=environment.target),
        {
            "image": image.name,
            "environment": environment.name,
            "memory": environment.memory,
            "cpus": CPUS,
            "health_path": environment.health.path,
            "health_timeout": environment.health.timeout,
            "http_guest_port": image.service_port,
        },
    )


def plan_logs(config: Config, environment: EnvironmentConfig) -> Path:
    """Where the last dry run of `environment` keeps the logs of Terraform and its provider."""
    return config.state_dir / "logs" / "plan" / environment.name


class Fleet:
    """One environment's members (as Terraform holds them) and its front door."""

    def __init__(
        self,
        config: Config,
        environment: EnvironmentConfig,
        *,
        run: Run | None,
        log: Any,
        terraform_dir: Path | None = None,
    ) -> None:
        """`run` None: a dry run (`plan`), whose Terraform works in `terraform_dir`."""
        self.config = config
        self.environment = environment
        self.run = run
        self.log = log
        self.image = config.image(environment.image)
        folder = terraform_dir or workdir(config, environment)
        # A dry run's logs outlive its temporary folder, until the environment's next one.
        log_dir = run.dir / "logs" if run is not None else plan_logs(config, environment)
        self.tf = terraform_for(config, environment, log_dir, folder=folder)
        self.members: dict[str, Member] = {}
        self.state: dict[str, dict[str, Any]] = {}
        self.created: list[str] = []
        self.destroyed: list[str] = []
        self.passed: set[str] = set()  # members that passed the health gate in this run
        # A plan made in the background (`prepare`) for the next converge: its variables, the
        # thread making it and where the thread puts it.
        self._ahead: tuple[dict[str, Any], threading.Thread, dict[str, Plan]] | None = None

    @functools.cached_property
    def door(self) -> FrontDoor:
        """The environment's front door (made, with its port, when first needed)."""
        return front_door(self.config, self.environment)

    # -- reading -----------------------------------------------------------------------------

    def refresh(self) -> None:
        """Read the members Terraform holds now."""
        self.state = {str(i.get("name")): i for i in self.tf.state_instances()}
        self.members = {name: Member.from_state(item) for name, item in self.state.items()}

    def running(self, name: str) -> bool:
        return vm_running(self.config.state_dir / "vms", name)

    def healthy(self, name: str) -> bool:
        """Whether the member's VM runs and its health check gives the expected answer now."""
        if not self.running(name):
            return False
        return (
            answer(self.url(name), self.environment.health.path) == self.environment.health.status
        )

    def url(self, name: str) -> str:
        return str(self.state.get(name, {}).get("url") or "")

    def member(self, version: ImageVersion, index: int) -> Member:
        """The member at `index` of a fleet on `version`."""
        files = baked(Path(version.path), version.manifest, version.fingerprint)
        settings = settings_hash(self.config, self.environment, files.append)
        name = f"{self.image.name}-{self.environment.name}-{version.build_id}-{settings}-{index}"
        return Member(
            name=name,
            version=version.version,
            build_id=version.build_id,
            image_path=str(files.disk),
            kernel=str(files.kernel),
            initrd=str(files.initrd),
            append=files.append,
        )

    def new_members(self, version: ImageVersion, count: int) -> list[Member]:
        """`count` members on `version` with the lowest indices no current member uses."""
        taken = set(self.members)
        found: list[Member] = []
        index = 0
        while len(found) < count:
            candidate = self.member(version, index)
            if candidate.name not in taken:
                found.append(candidate)
            index += 1
        return found

    # -- changing ----------------------------------------------------------------------------

    def render(self) -> None:
        """Write the environment's Terraform configuration; check a changed one with a plan.

        A configuration Terraform rejects does not stay in place: the previous one comes back
        (or none, if there was none), so the file on disk is always one a plan accepted and an
        unchanged one needs no new check: its first plan in a rollout is the first change's.
        """
        main_tf = self.configuration()
        self.tf.workdir.mkdir(parents=True, exist_ok=True)
        main_path = self.tf.workdir / "main.tf"
        previous = main_path.read_text(encoding="utf-8") if main_path.is_file() else None
        _write_if_changed(main_path, main_tf)
        try:
            self.refresh()
            if self._write_moves():
                self.refresh()
            if main_tf != previous:
                self.tf.plan(self.variables(self.members))
        except BaseException:
            if previous is not None:
                _write_if_changed(main_path, previous)
            else:
                main_path.unlink(missing_ok=True)
            raise

    def configuration(self) -> str:
        """The environment's Terraform configuration, rendered from its template."""
        return configuration(self.config, self.environment)

    def prepare(self, members: dict[str, Member]) -> None:
        """Plan the next step in the background, while a gate runs and the front door changes:
        a `converge` to exactly these members then applies that plan instead of planning.

        Nothing else runs Terraform in between (gates, the front door and draining do not),
        so the state the plan was made against is the one it is applied to.
        """
        self.settle()
        variables = self.variables(members)
        outcome: dict[str, Plan] = {}

        def plan() -> None:
            # A failed plan is planned again by converge, which reports the failure then.
            with contextlib.suppress(Exception):
                outcome["plan"] = self.tf.plan(variables)

        thread = threading.Thread(target=plan, name="terraform-plan-ahead")
        thread.start()
        self._ahead = (variables, thread, outcome)

    def settle(self) -> tuple[dict[str, Any], Plan] | None:
        """Wait for the plan `prepare` started, if any, and hand it over once: its variables
        and the plan (None if there is none, or it failed)."""
        if self._ahead is None:
            return None
        variables, thread, outcome = self._ahead
        self._ahead = None
        thread.join()
        return (variables, outcome["plan"]) if "plan" in outcome else None

    def converge(self, members: dict[str, Member]) -> Plan:
        """Make Terraform hold exactly `members`: create what is new, destroy what is not."""
        variables = self.variables(members)
        ahead = self.settle()
        plan = ahead[1] if ahead and ahead[0] == variables else self.tf.plan(variables)
        for change in plan.changes:
            if change.type != "pipeline_instance" or change.action == "no-op":
                continue
            # A delete has no "after": its name is the one it had.
            self.log.info("%s %s", change.action, change.name)
        if plan.has_changes:
            before = set(self.members)
            try:
                self.tf.apply(plan)
            except BaseException:
                # An interrupted or failed apply may leave VMs Terraform never recorded.
                for name in reap_orphans(self.config, self.environment, self.tf):
                    self.log.warning("stopped %s (a VM Terraform did not record)", name)
                raise
            finally:
                self.refresh()
                self.created += [n for n in self.members if n not in before]
                self.destroyed += [n for n in before if n not in self.members]
        return plan

    def gate(self, names: Iterable[str]) -> None:
        """The health gate: each member answers `passes` times in a row as expected.

        `failures` wrong answers in a row, or no decision within the health timeout, fail the
        gate (GateFailed, naming the member and its last answer). Then the smoke playbook, if
        the environment has one, runs against all of them.
        """
        names = list(names)
        health = self.environment.health
        # Per member: passes in a row, failures in a row, the last wrong answer.
        pending: dict[str, tuple[int, int, str]] = {name: (0, 0, "no answer yet") for name in names}
        deadline = time.monotonic() + health.timeout
        failed: list[str] = []
        while pending:
            for name in list(pending):
                passes, failures, last = pending[name]
                got = answer(self.url(name), health.path)
                if got == health.status:
                    passes, failures = passes + 1, 0
                else:
                    passes, failures = 0, failures + 1
                    last = f"HTTP {got}" if got else "no answer"
                pending[name] = (passes, failures, last)
                if passes >= health.passes:
                    del pending[name]
                elif failures >= health.failures:
                    failed.append(
                        f"{name}: {last} on {health.path} {failures} time(s) in a row"
                        f" (expected HTTP {health.status})"
                    )
                    del pending[name]
            if failed:
                raise GateFailed("health check failed: " + "; ".join(failed))
            if pending and time.monotonic() > deadline:
                late = ", ".join(f"{n} (last: {c[2]})" for n, c in pending.items())
                raise GateFailed(f"health check undecided after {health.timeout} s: {late}")
            if pending:
                time.sleep(health.interval)
        if health.smoke is not None:
            self._smoke(names)
        self.passed.update(names)

    def serve(self, names: Iterable[str]) -> None:
        """Send the front door's traffic to exactly these members."""
        backends = {}
        for name in sorted(set(names)):
            port = self.state.get(name, {}).get("http_port")
            if port:
                backends[name] = int(port)
        if not backends and not self._door_running():
            return  # no front door is started (nor a port picked) to serve nothing
        self.door.apply(backends)

    def _door_running(self) -> bool:
        if (
            "door" not in self.__dict__
            and not front_door_folder(self.config, self.environment).is_dir()
        ):
            return False  # never made: asking would make it
        return self.door.running()

    def serving(self) -> set[str]:
        """The members the front door serves now (none if it does not run)."""
        return set(self.door.servers()) if self._door_running() else set()

    def leave(self, names: Iterable[str]) -> list[str]:
        """Take members out of the front door and let their requests finish; return those of
        them the fleet has (the ones to destroy)."""
        going = [n for n in names if n in self.members]
        serving = self.serving()
        if serving & set(going):
            self.serve(serving - set(going))
            self.door.drain()
        return going

    def retire(self, names: Iterable[str]) -> None:
        """Take members out of the front door, let their requests finish, destroy them."""
        going = self.leave(names)
        if going:
            self.converge({n: m for n, m in self.members.items() if n not in going})

    def variables(self, members: dict[str, Member]) -> dict[str, Any]:
        return {
            "instances": {name: member.variables() for name, member in members.items()},
            "vm_root": str(self.config.state_dir / "vms"),
            "state_dir": str(self.config.state_dir),
        }

    def _write_moves(self) -> bool:
        """Move instances a count-based configuration recorded (fleet[0]) to their names;
        whether there were any."""
        moves = moved_blocks(list(self.state.values()))
        path = self.tf.workdir / MOVED_FILE
        if moves:
            write_text_atomic(path, moves)
            self.log.info("moving %d instance(s) in Terraform's state to keys by name", len(moves))
            self.tf.apply(self.tf.plan(self.variables(self.members)))
            return True
        path.unlink(missing_ok=True)
        return False

    def _smoke(self, names: list[str]) -> None:
        from pipeline.tools import playbook

        smoke = self.environment.health.smoke
        assert smoke is not None and self.run is not None
        hosts = {name: host_vars(self.config, self.state[name]) for name in names}
        vault = self.config.vault_password_file
        if vault is not None:
            # Known, so masked in what the runner keeps: the password, and what it opens there.
            password = secret.read_vault_password(vault, self.config.path)
            secret.vault_values([smoke.parent], password, self.config.path)
        outcome = playbook.run(
            smoke,
            hosts,
            group=self.environment.name,
            folder=self.run.dir / "smoke",
            timeout=self.environment.health.timeout,
            vault_password_file=vault,
        )
        if not outcome.ok:
            raise GateFailed(f"smoke test {smoke.name} failed: {outcome.summary}")
        self.log.info("smoke test %s passed on %s", smoke.name, ", ".join(names))


def moved_blocks(instances: list[dict[str, Any]]) -> str:
    """Terraform `moved` blocks from a count-based fleet's state (fleet[0]) to keys by name;
    "" when no instance in the state is keyed by a number."""
    moves = [
        f"moved {{\n  from = pipeline_instance.fleet[{item['index']}]\n"
        f"  to   = pipeline_instance.fleet[{json.dumps(item['name'])}]\n}}\n"
        for item in instances
        if isinstance(item.get("index"), int)
    ]
    if not moves:
        return ""
    return "# Written by the pipeline: state from a count-based fleet.\n" + "".join(moves)


def terraform_for(
    config: Config, environment: EnvironmentConfig, log_dir: Path, *, folder: Path | None = None
) -> Terraform:
    """The environment's Terraform (in `folder` instead of its own, for a dry run)."""
    return Terraform(
        binary=config.terraform,
        workdir=folder or workdir(config, environment),
        plugin_dir=config.state_dir / "plugins",
        log_dir=log_dir,
    )


def workdir(config: Config, environment: EnvironmentConfig) -> Path:
    """Where the environment's Terraform configuration and state live."""
    return config.state_dir / "envs" / environment.name / "terraform"


def front_door_folder(config: Config, environment: EnvironmentConfig) -> Path:
    return config.state_dir / "envs" / environment.name / "frontdoor"


def existing_front_door(config: Config, environment: EnvironmentConfig) -> FrontDoor | None:
    """The environment's front door if one was ever made; reading never makes one."""
    if not front_door_folder(config, environment).is_dir():
        return None
    return front_door(config, environment)


def front_door(config: Config, environment: EnvironmentConfig) -> FrontDoor:
    health = environment.health
    return FrontDoor(
        front_door_folder(config, environment),
        name=environment.name,
        port=environment.port,
        health=HealthCheck(
            path=health.path,
            status=health.status,
            interval=min(health.interval, 2.0),
            rise=health.passes,
            fall=health.failures,
        ),
    )


def settings_hash(config: Config, environment: EnvironmentConfig, append: str) -> str:
    """A short hash of the settings an instance is started with: a change makes new instances."""
    image = config.image(environment.image)
    settings = [
        environment.memory,
        CPUS,
        environment.health.path,
        environment.health.timeout,
        image.service_port,
        append,
    ]
    return hashlib.sha1(json.dumps(settings, separators=(",", ":")).encode()).hexdigest()[:6]


def host_vars(config: Config, item: dict[str, Any]) -> dict[str, Any]:
    """How Ansible reaches an instance."""
    return {
        "ansible_host": "127.0.0.1",
        "ansible_port": item.get("ssh_port"),
        "ansible_user": "root",
        "ansible_ssh_private_key_file": str(config.state_dir / "keys" / "id_ed25519"),
        # Every instance gets fresh host keys at first boot, and its port is reused later.
        "ansible_ssh_common_args": "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null",
        "ansible_python_interpreter": "/usr/bin/python3",
        "image_version": item.get("image_version"),
        "image_build_id": (item.get("labels") or {}).get("build_id"),
        "instance_url": item.get("url"),
    }


def answer(url: str, path: str) -> int | None:
    """The HTTP status an instance answers `path` with, or None if it does not answer."""
    # Instances only ever listen on loopback; refuse to probe anything else.
    if not url.startswith("http://127.0.0.1:"):
        return None
    try:
        with urllib.request.urlopen(url + path, timeout=PROBE_SECONDS) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError, ValueError):
        return None


def vm_running(vm_root: Path, name: str) -> bool:
    if not (vm_root / name / "record.json").is_file():
        return False
    try:
        return qemu.is_running(qemu.load(vm_root, name))
    except (PipelineError, OSError, ValueError):
        # An unreadable record is a VM nobody can manage: report it as not running.
        return False


def environment_vms(config: Config, environment: EnvironmentConfig) -> list[qemu.VmRecord]:
    return [
        record
        for record in qemu.list_vms(config.state_dir / "vms")
        if record.labels.get("environment") == environment.name
        and record.labels.get("image") == environment.image
    ]


def reap_orphans(config: Config, environment: EnvironmentConfig, tf: Terraform) -> list[str]:
    """Stop VMs labelled with this environment that Terraform's state does not hold."""
    records = environment_vms(config, environment)
    if not records:
        return []
    known = {str(item.get("name")) for item in tf.state_instances()}
    reaped = []
    for record in records:
        if record.name not in known:
            qemu.stop(record)
            reaped.append(record.name)
    return reaped


def _write_if_changed(path: Path, text: str) -> None:
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    write_text_atomic(path, text)
