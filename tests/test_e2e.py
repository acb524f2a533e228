"""The whole user story on real VMs: Packer, QEMU, Molecule and Terraform, through the CLI.

run -> change a role -> run (every instance replaced, new ones healthy before old ones go) ->
run unchanged (nothing baked, nothing deployed) -> kill a VM from outside -> deploy (recreated)
-> revoke the running version (status warns, deploy refuses) -> roll the channel back and
deploy -> gc (keeps what Terraform runs, deletes the revoked version's files);
and a bake whose role fails (a pipe that pipefail makes fail), or whose provisioner runs past
its provision_timeout, leaves no image files, no VM, no Packer or Ansible process, and its version
recorded failed with the reason.
Ansible drives the same project: `ansible -i inventories/dev` pings the live fleet, and the
pipeline.images.image module deploys a second environment under ansible-playbook (changed once,
then not; check mode touches nothing), the repository's playbooks/roll.yml finds nothing to roll
there, and the fleet inventory plugin lists it. Crashes and Ctrl-C in each step are the crash
matrix's, in test_crash_vms.py.
Throughout, the image carries a secret from the environment, which Molecule checks reached the
role; at the end no file the runs left but the images holds it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from projects import COMMAND_TIMEOUT, Probe, Project, share_base

from pipeline.reaper import RUN_ENV
from pipeline.targets.local import qemu
from pipeline.targets.local.baseimage import BaseImage
from pipeline.tools import process

pytestmark = [pytest.mark.vm, pytest.mark.e2e]

REPO = Path(__file__).resolve().parent.parent

# The secret every bake of web gives its roles, through secret_vars and the environment.
CANARY_VARIABLE = "PIPELINE_TEST_CANARY"
CANARY = f"canary-{uuid.uuid4().hex}"
CANARY_ROLE = """\
---
- name: Keep the token where a service of the image could read it
  ansible.builtin.copy:
    content: "{{ canary_token }}\\n"
    dest: /etc/canary-token
    owner: root
    group: root
    mode: "0600"
  no_log: true
"""
CANARY_VERIFY = """
- name: The secret reached the role
  hosts: all
  gather_facts: false
  tasks:
    - name: Load the variables the image was baked with, its secrets among them
      ansible.builtin.include_vars:
        file: "{{ lookup('ansible.builtin.env', 'PIPELINE_VARS_FILE') }}"
      no_log: true

    - name: The token file in the image holds the secret
      ansible.builtin.slurp:
        src: /etc/canary-token
      register: verify_canary
      no_log: true
      failed_when: (verify_canary.content | b64decode) != canary_token ~ "\\n"
"""


@pytest.fixture(scope="module")
def project(
    tmp_path_factory: pytest.TempPathFactory, state_dir: Path, base_image: BaseImage
) -> Iterator[Project]:
    root = tmp_path_factory.mktemp("project")
    for name in (
        "roles",
        "templates",
        "molecule",
        "inventories",
        "playbooks",
        "ansible_collections",
    ):
        shutil.copytree(REPO / name, root / name)
    shutil.copy2(REPO / "ansible.cfg", root / "ansible.cfg")
    config = yaml.safe_load((REPO / "pipeline.yml").read_text())
    # The page's text comes from the role's own default, so that editing the role changes it.
    config["images"]["web"].pop("vars", None)
    # Two waves of one for the fleet of two.
    config["environments"]["dev"]["rollout"] = {"strategy": "rolling", "max_surge": 1}
    # A secret from the environment, which a role writes into the image and Molecule checks.
    config["images"]["web"]["roles"].append("canary")
    config["images"]["web"]["secret_vars"] = {"canary_token": {"env": CANARY_VARIABLE}}
    (root / "roles" / "canary" / "tasks").mkdir(parents=True)
    (root / "roles" / "canary" / "tasks" / "main.yml").write_text(CANARY_ROLE)
    with (root / "molecule" / "web" / "verify.yml").open("a") as verify:
        verify.write(CANARY_VERIFY)
    (root / "pipeline.yml").write_text(yaml.safe_dump(config))
    share_base(root / ".pipeline", state_dir)
    os.environ[CANARY_VARIABLE] = CANARY
    project = Project(root)
    yield project
    project.pipeline("destroy", "dev", check=False)
    for record in qemu.list_vms(project.state / "vms"):
        qemu.stop(record)
    del os.environ[CANARY_VARIABLE]


def _set_config(project: Project, change: Callable[[dict], None]) -> None:
    path = project.root / "pipeline.yml"
    config = yaml.safe_load(path.read_text())
    change(config)
    path.write_text(yaml.safe_dump(config))


def _page(url: str) -> str:
    assert url.startswith("http://127.0.0.1:"), url
    with urllib.request.urlopen(url + "/", timeout=10) as response:
        return response.read().decode()


def _set_message(project: Project, message: str) -> None:
    defaults = project.root / "roles" / "webservice" / "defaults" / "main.yml"
    text = defaults.read_text()
    text = re.sub(r"^webservice_message: .*$", f"webservice_message: {message}", text, flags=re.M)
    defaults.write_text(text)


def _most_at_once(project: Project, running: int) -> int:
    """The most instances that ran at once during the newest run's fleet changes, from its
    provider's log, given how many ran before it."""
    [log] = sorted(project.state.glob("runs/*/logs/provider.log"))[-1:]
    most = running
    for line in log.read_text(encoding="utf-8").splitlines():
        if re.search(r"INFO create \S+: pid", line):
            running += 1
        elif re.search(r"INFO delete \S+: stopped", line):
            running -= 1
        most = max(most, running)
    return most


def _ansible(project: Project, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    """An Ansible command of this venv, run from the project's folder as its README says."""
    return subprocess.run(
        [str(Path(sys.executable).with_name(tool)), *args],
        cwd=project.root,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
        # The collection imports this checkout's library, as the tests do.
        env={**os.environ, "PYTHONPATH": str(REPO), "ANSIBLE_NOCOLOR": "1"},
    )


def _image_module(project: Project, folder: Path, *, check: bool = False, **options: str) -> dict:
    """Run the pipeline.images.image module once with ansible-playbook; return its result."""
    result = folder / "result.json"
    play = {
        "name": "Drive the pipeline from Ansible",
        "hosts": "localhost",
        "connection": "local",
        "gather_facts": False,
        "tasks": [
            {
                "name": "The image module",
                "pipeline.images.image": {"project": str(project.root), **options},
                "register": "out",
                "check_mode": check,
            },
            {
                "name": "Keep what it returned",
                "ansible.builtin.copy": {"content": "{{ out | to_json }}", "dest": str(result)},
                "check_mode": False,
            },
        ],
    }
    playbook = folder / "play.yml"
    playbook.write_text(json.dumps([play]))
    result.unlink(missing_ok=True)
    interpreter = f"ansible_python_interpreter={sys.executable}"
    done = _ansible(
        project, "ansible-playbook", "-i", "localhost,", "-e", interpreter, str(playbook)
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(result.read_text())


def test_the_user_story_from_first_run_to_healing(project: Project) -> None:
    # First run: bake, verify, promote, deploy two healthy instances behind the front door.
    first, _ = project.run_json("run", "web", "--env", "dev")
    assert (first["baked"], first["verified"], first["promoted"]) == (True, True, True)
    instances = first["deploy"]["instances"]
    assert len(instances) == 2
    for instance in instances:
        assert instance["health"] == "healthy"
        assert instance["front_door"] == "UP"
        page = _page(instance["url"])
        assert "Hello from an immutable image" in page
        assert f"image: web {first['version']}" in page
        assert f"host: {instance['name']}" in page
    first_names = {i["name"] for i in instances}
    door = first["deploy"]["front_door"]
    assert f"image: web {first['version']}" in _page(door)

    status = json.loads(project.pipeline("status", "dev", "--json").stdout)
    assert {i["url"] for i in status["instances"]} == {i["url"] for i in instances}
    assert status["drift"] == []
    assert status["front_door"] == door

    # Ansible reaches the live fleet through the environment's inventory.
    ping = _ansible(
        project, "ansible", "-i", "inventories/dev", "all", "-m", "ansible.builtin.ping", "-o"
    )
    assert ping.returncode == 0, ping.stdout + ping.stderr
    assert sorted(re.findall(r"^(\S+) \| SUCCESS", ping.stdout, re.M)) == sorted(first_names)

    # A role changes. The dry run says what `run` would do, and changes nothing.
    _set_message(project, "Hello from the second version")
    listed_before = project.pipeline("images", "list", "web").stdout
    planned = json.loads(project.pipeline("plan", "web", "--env", "dev", "--json").stdout)
    assert planned["bake"]["rebuild"] is True
    assert "roles changed: webservice" in planned["bake"]["reasons"]
    assert planned["move"] == {
        "from": first["version"],
        "to": planned["bake"]["version"],
        "when": "after bake and verify",
    }
    changes = planned["fleet"]["changes"]
    assert sorted(c["action"] for c in changes) == ["create", "create", "delete", "delete"]
    assert {c["name"] for c in changes if c["action"] == "delete"} == first_names
    assert planned["fleet"]["waves"] == 2
    assert project.pipeline("images", "list", "web").stdout == listed_before
    text = project.pipeline("plan", "web", "--env", "dev").stdout
    assert f"would bake {planned['bake']['version']}" in text
    assert "because roles changed: webservice" in text

    # The run rolls the new version out in two waves; the front door never fails a request.
    with Probe(door) as probe:
        second, _ = project.run_json("run", "web", "--env", "dev")
    assert probe.failed == [], probe.failed[:10]
    assert probe.ok > 100
    assert second["baked"] and second["version"] == planned["bake"]["version"]
    assert probe.versions == {first["version"], second["version"]}
    assert second["deploy"]["waves"] == 2
    # max_surge 1: the second wave's apply deleted an old instance before it booted a new one.
    assert _most_at_once(project, running=2) == 3
    new_instances = second["deploy"]["instances"]
    new_names = {i["name"] for i in new_instances}
    assert len(new_names) == 2 and not new_names & first_names
    assert set(second["deploy"]["destroyed"]) == first_names
    for instance in new_instances:
        assert "Hello from the second version" in _page(instance["url"])
    for old in instances:
        assert not (project.state / "vms" / old["name"]).exists()
    assert second["deploy"]["front_door"] == door

    # Nothing changed: nothing is baked and the fleet is left alone.
    third, stderr = project.run_json("run", "web", "--env", "dev")
    assert (third["baked"], third["version"]) == (False, second["version"])
    assert third["deploy"]["changed"] is False
    assert "unchanged" in stderr and "already on" in stderr
    assert {i["name"] for i in third["deploy"]["instances"]} == new_names

    # A VM dies behind Terraform's back: status shows it, heal replaces it (same version).
    victim = sorted(new_names)[0]
    record = qemu.load(project.state / "vms", victim)
    os.kill(record.pid, signal.SIGKILL)
    status = json.loads(project.pipeline("status", "dev", "--json").stdout)
    assert any(victim in line for line in status["drift"]), status["drift"]

    healed, stderr = project.run_json("heal", "dev")
    assert "drift" in stderr and victim in stderr
    assert healed["replaced"] == [{"old": victim, "new": victim, "version": second["version"]}]
    assert {i["name"] for i in healed["instances"]} == new_names
    assert qemu.load(project.state / "vms", victim).pid != record.pid
    assert all(i["health"] == "healthy" for i in healed["instances"])
    assert {i["version"] for i in healed["instances"]} == {second["version"]}
    assert all(i["front_door"] == "UP" for i in healed["instances"])
    leftovers = [p.name for p in (project.state / "images" / "web").iterdir()]
    assert not [name for name in leftovers if name.startswith(".tmp")], leftovers

    # A fleet template Terraform rejects fails the deploy and leaves the environment usable.
    template = project.root / "templates" / "terraform" / "local" / "main.tf.j2"
    good = template.read_text()
    template.write_text(good + "\nbroken = = =\n")
    broken = project.pipeline("deploy", "dev", check=False)
    template.write_text(good)
    assert broken.returncode == 4, broken.stderr
    assert "Traceback" not in broken.stderr
    assert re.search(r"terraform (plan|show \(state\)) failed", broken.stderr), broken.stderr
    status = json.loads(project.pipeline("status", "dev", "--json").stdout)
    assert {i["name"] for i in status["instances"]} == new_names

    _revoke_roll_back_and_collect(project, first, second, door)


def _revoke_roll_back_and_collect(project: Project, first: dict, second: dict, door: str) -> None:
    """The registry's part of the story, on the fleet running the second version."""
    old, new = first["version"], second["version"]

    # The lineage: the base, both versions built on it, the channel on the newer one.
    tree = project.pipeline("images", "tree", "--output", "lineage.svg").stdout
    assert re.search(r"^debian 1\.0\.0 \(base\) built", tree, re.M), tree
    assert re.search(rf"── web {re.escape(new)} verified +<- dev$", tree, re.M), tree
    svg = (project.root / "lineage.svg").read_text()
    assert f'data-id="web@{old}"' in svg and f'data-id="web@{new}"' in svg

    # Revoking the running version: status names every instance on it, deploy refuses.
    revoked = project.pipeline("revoke", "web", new, "--reason", "CVE-2026-0042 in the service")
    assert f"channel dev of web points at revoked {new}" in revoked.stderr
    status = json.loads(project.pipeline("status", "dev", "--json").stdout)
    assert [i["revoked"] for i in status["instances"]] == ["CVE-2026-0042 in the service"] * 2
    assert len(status["warnings"]) == 2
    refused = project.pipeline("deploy", "dev", check=False)
    assert refused.returncode == 6, refused.stderr
    assert f"web {new} is revoked since" in refused.stderr
    assert "CVE-2026-0042 in the service" in refused.stderr and "channel dev" in refused.stderr

    # Rolling the channel back and deploying, blue/green: a whole fleet of the older version
    # comes up beside the revoked one, and the front door switches in one reload.
    project.pipeline("promote", "web", "dev", "--rollback")
    _set_config(
        project, lambda c: c["environments"]["dev"].update(rollout={"strategy": "blue_green"})
    )
    with Probe(door) as probe:
        back, _ = project.run_json("deploy", "dev")
    assert probe.failed == [], probe.failed[:10]
    assert probe.versions == {old, new}
    assert (back["strategy"], back["waves"], back["kept"]) == ("blue_green", 1, [])
    assert {i["version"] for i in back["instances"]} == {old}
    assert all(i["health"] == "healthy" for i in back["instances"])

    # Baking the revoked version's very inputs again is refused, and nothing is recorded.
    again = project.pipeline("bake", "web", check=False)
    assert again.returncode == 2, again.stderr
    assert f"these inputs are exactly those of web {new}, revoked" in again.stderr

    # gc keeps what the fleet runs (read from Terraform's state) and deletes the revoked one.
    plan = json.loads(project.pipeline("gc", "--keep", "1", "--dry-run", "--json").stdout)
    assert [d["label"] for d in plan["deleted"]] == [f"web {new}"]
    assert (project.state / "images" / "web" / new).is_dir()
    done = json.loads(project.pipeline("gc", "--keep", "1", "--json").stdout)
    kept = {k["label"]: k["reasons"] for k in done["kept"]}
    assert "channel dev points at it" in kept[f"web {old}"]
    assert any("Terraform state" in reason for reason in kept[f"web {old}"])
    assert kept["debian 1.0.0"][0] == "newest"
    assert not (project.state / "images" / "web" / new).exists()
    listed = json.loads(project.pipeline("images", "list", "web", "--json").stdout)
    assert [v["version"] for v in listed] == [old]


def _ops_vms(project: Project) -> dict[str, int]:
    """The VMs of the environment `ops` that the product's records say run: name -> QEMU pid."""
    records = qemu.list_vms(project.state / "vms")
    return {r.name: r.pid for r in records if r.name.startswith("web-ops-") and qemu.is_running(r)}


def _ops_state(project: Project) -> dict[str, object]:
    """What a deploy of `ops` would change: Terraform's state, the record, runs, VMs, registry."""
    env = project.state / "envs" / "ops"
    return {
        "tfstate": (env / "terraform" / "terraform.tfstate").read_bytes(),
        "record": (env / "record.json").read_bytes(),
        "runs": sorted(p.name for p in (project.state / "runs").iterdir()),
        "vms": _ops_vms(project),
        "registry": project.pipeline("images", "list", "web", "--json").stdout,
    }


def test_ansible_deploys_an_environment_through_the_module_and_lists_it(
    project: Project, tmp_path: Path
) -> None:
    """After the story: a second environment of one instance on the dev channel, deployed by the
    module under ansible-playbook, then listed by the fleet inventory plugin."""
    status = json.loads(project.pipeline("status", "dev", "--json").stdout)
    channel_version = status["channel_version"]
    shown = project.pipeline("images", "show", "web", channel_version, "--json")
    build_id = json.loads(shown.stdout)["build_id"]
    ops = {"image": "web", "channel": "dev", "instances": 1, "health": {"path": "/healthz"}}
    _set_config(project, lambda c: c["environments"].update(ops=ops))
    source = project.root / "inventories" / "ops"
    source.mkdir()
    (source / "fleet.yml").write_text("plugin: pipeline.images.fleet\nenv: ops\n")
    try:
        _deploy_ops_from_ansible(project, tmp_path, channel_version, build_id)
    finally:
        project.pipeline("destroy", "ops", check=False)
        _set_config(project, lambda c: c["environments"].pop("ops"))

    assert _ops_vms(project) == {}
    assert [p for p in project.vm_processes() if "web-ops-" in p] == []
    assert [p for p in project.processes("haproxy") if "/envs/ops/" in p] == []


def _deploy_ops_from_ansible(
    project: Project, folder: Path, channel_version: str, build_id: str
) -> None:
    # Check mode before anything runs: one instance to create, and nothing created.
    planned = _image_module(project, folder, check=True, action="deploy", env="ops")
    assert planned["changed"] is True
    assert planned["version"] == channel_version
    assert [c["action"] for c in planned["plan"]["changes"]] == ["create"]
    assert not (project.state / "envs" / "ops" / "terraform" / "terraform.tfstate").exists()
    assert _ops_vms(project) == {}

    # The deploy boots the instance and says so, with the version, its build and the instance.
    first = _image_module(project, folder, action="deploy", env="ops")
    assert first["changed"] is True
    assert (first["version"], first["build_id"]) == (channel_version, build_id)
    [instance] = first["instances"]
    assert instance["name"].startswith(f"web-ops-{build_id}-")
    assert (instance["version"], instance["health"]) == (channel_version, "healthy")
    assert f"image: web {channel_version}" in _page(instance["url"])
    booted = _ops_vms(project)
    assert list(booted) == [instance["name"]]

    # The same task again: nothing to change, and no VM booted or replaced.
    again = _image_module(project, folder, action="deploy", env="ops")
    assert again["changed"] is False
    assert (again["version"], again["build_id"]) == (channel_version, build_id)
    assert [i["name"] for i in again["instances"]] == [instance["name"]]
    assert _ops_vms(project) == booted

    # The repository's playbook rolls ops onto the role's inputs; put back as the version ops
    # runs was baked from, nothing is baked, verified, promoted or replaced, and it says so.
    defaults = project.root / "roles" / "webservice" / "defaults" / "main.yml"
    shutil.copy2(REPO / "roles" / "webservice" / "defaults" / "main.yml", defaults)
    rolled = _ansible(
        project, "ansible-playbook", "playbooks/roll.yml", "-e", "roll_env=ops",
        "-e", "roll_image=web", "-e", f"ansible_python_interpreter={sys.executable}",
    )  # fmt: skip
    assert rolled.returncode == 0, rolled.stdout + rolled.stderr
    assert re.search(r"^localhost\s*: ok=\d+\s+changed=0\s+unreachable=0\s+failed=0", rolled.stdout,
                     re.M), rolled.stdout  # fmt: skip
    assert instance["url"] in rolled.stdout
    assert _ops_vms(project) == booted

    # Check mode against the live environment: no change, and no state touched.
    before = _ops_state(project)
    checked = _image_module(project, folder, check=True, action="deploy", env="ops")
    assert checked["changed"] is False
    assert (checked["version"], checked["plan"]["changes"]) == (channel_version, [])
    assert _ops_state(project) == before

    # The fleet inventory plugin lists the live instance with what the module returned.
    listed = _ansible(project, "ansible-inventory", "-i", "inventories/ops", "--list")
    assert listed.returncode == 0, listed.stderr
    inventory = json.loads(listed.stdout)
    assert inventory["ops"]["hosts"] == [instance["name"]]
    hostvars = {
        key: _not_wrapped(value)
        for key, value in inventory["_meta"]["hostvars"][instance["name"]].items()
    }
    assert (hostvars["image_version"], hostvars["image_build_id"]) == (channel_version, build_id)
    assert hostvars["instance_url"] == instance["url"]
    assert hostvars["ansible_host"] == "127.0.0.1"


def _not_wrapped(value: object) -> object:
    # ansible-core 2.19 writes a string an inventory plugin set as {"__ansible_unsafe": text},
    # so that Ansible reading the listing back never templates it.
    if isinstance(value, dict) and list(value) == ["__ansible_unsafe"]:
        return value["__ansible_unsafe"]
    return value


LAYER_VERIFY = """\
---
- name: Verify the layer and what it was built on
  hosts: all
  gather_facts: false
  tasks:
    - name: Read the file the layer adds
      ansible.builtin.slurp:
        src: /etc/api-layer.txt
      register: verify_layer
      failed_when: (verify_layer.content | b64decode) != "built on web\\n"

    - name: The service of the parent image still runs
      ansible.builtin.systemd_service:
        name: webservice
      register: verify_unit
      failed_when: verify_unit.status.ActiveState != "active"
"""


def test_a_version_failing_its_health_check_is_rolled_back_and_the_fleet_scales(
    project: Project,
) -> None:
    """After the story: the fleet runs its older version behind the front door."""
    before = json.loads(project.pipeline("status", "dev", "--json").stdout)
    running = {i["name"] for i in before["instances"]}
    old = before["channel_version"]
    assert len(running) == 2 and {i["version"] for i in before["instances"]} == {old}
    door = before["front_door"]

    # A version baked in maintenance mode passes verification (its service says it is in
    # maintenance) but fails the environment's health check: the rollout is rolled back.
    _set_config(project, lambda c: c["images"]["web"].update(vars={"webservice_maintenance": True}))
    _set_config(project, lambda c: c["environments"]["dev"].update(rollout={"max_surge": 1}))
    with Probe(door) as probe:
        failed = project.pipeline("run", "web", "--env", "dev", check=False)
    assert failed.returncode == 8, failed.stderr
    assert "Traceback" not in failed.stderr
    assert "rolled back: health check failed" in failed.stderr
    assert "HTTP 503 on /healthz" in failed.stderr
    assert probe.failed == [], probe.failed[:10]
    assert probe.versions == {old}

    after = json.loads(project.pipeline("status", "dev", "--json").stdout)
    bad = after["channel_version"]
    assert bad != old
    assert {i["name"] for i in after["instances"]} == running
    assert all(i["health"] == "healthy" for i in after["instances"])
    last = after["last_rollout"]
    assert (last["to"], last["result"]) == (bad, "rolled back")
    assert "HTTP 503" in last["reason"]
    assert len(project.vm_processes()) == 2

    # Scaling: out to 4 (on the version the fleet runs, not the channel's), in to 1, back to 2.
    project.pipeline("promote", "web", "dev", "--rollback")
    _set_config(project, lambda c: c["images"]["web"].pop("vars"))
    out, _ = project.run_json("scale", "dev", "4")
    assert len(out["instances"]) == 4
    assert {i["version"] for i in out["instances"]} == {old}
    assert all(i["health"] == "healthy" and i["front_door"] == "UP" for i in out["instances"])
    with Probe(door) as probe:
        shrunk, _ = project.run_json("scale", "dev", "1")
    assert probe.failed == [], probe.failed[:10]
    assert len(shrunk["instances"]) == 1
    assert len(project.vm_processes()) == 1
    status = json.loads(project.pipeline("status", "dev", "--json").stdout)
    assert (status["size"], status["drift"]) == (1, [])
    grown, _ = project.run_json("scale", "dev", "2")
    assert len(grown["instances"]) == 2
    assert all(i["health"] == "healthy" for i in grown["instances"])

    # Tearing down leaves no VM and no front door of this project running.
    project.pipeline("destroy", "dev")
    assert project.vm_processes() == []
    assert project.processes("haproxy") == []


def test_an_image_built_on_another_records_its_parent(project: Project) -> None:
    """`base: web` bakes on web's newest verified version; ancestry and revocation follow."""
    web = json.loads(project.pipeline("images", "list", "web", "--json").stdout)
    parent = [v for v in web if v["status"] == "verified"][-1]["version"]
    tasks = project.root / "roles" / "layer" / "tasks"
    tasks.mkdir(parents=True)
    (tasks / "main.yml").write_text(
        "---\n- name: Add the layer's file\n  ansible.builtin.copy:\n"
        '    content: "built on web\\n"\n    dest: /etc/api-layer.txt\n    mode: "0644"\n'
    )
    scenario = project.root / "molecule" / "api"
    shutil.copytree(project.root / "molecule" / "web", scenario)
    (scenario / "verify.yml").write_text(LAYER_VERIFY)
    config = yaml.safe_load((project.root / "pipeline.yml").read_text())
    config["images"]["api"] = {"version": "0.1.0", "roles": ["layer"], "base": "web"}
    (project.root / "pipeline.yml").write_text(yaml.safe_dump(config))

    baked, _ = project.run_json("bake", "api")
    assert baked["baked"] is True
    shown = json.loads(project.pipeline("images", "show", "api", "0.1.0", "--json").stdout)
    assert (shown["parent_image"], shown["parent_version"]) == ("web", parent)
    assert shown["manifest"]["base"]["name"] == "web"
    verified, _ = project.run_json("verify", "api")
    assert verified["state"] == "verified"

    tree = project.pipeline("images", "tree", "api").stdout
    lines = tree.splitlines()
    assert lines[0].startswith("debian 1.0.0 (base) built"), tree
    assert lines[1].startswith(f"└── web {parent} verified"), tree
    assert lines[2] == "    └── api 0.1.0 verified", tree

    # Revoking the base with its descendants, from a time to come, reaches both generations.
    later = "2099-01-01T00:00:00Z"
    done = project.pipeline(
        "revoke",
        "debian",
        "1.0.0",
        "--reason",
        "end of life",
        "--at",
        later,
        "--descendants",
        "--json",
    )
    revoked = json.loads(done.stdout)["revoked"]
    assert {f"{r['image']} {r['version']}" for r in revoked} >= {
        "debian 1.0.0",
        f"web {parent}",
        "api 0.1.0",
    }
    assert not any(r["revocation"]["in_force"] for r in revoked)
    assert project.vm_processes() == []


# A task whose failure hides behind a pipe but for pipefail: the check before a bake lets it
# through (pipefail is set), and the bake must then fail on it.
FAILING_PIPE_TASK = """\
---
- name: Count the pages of a listing that fails
  ansible.builtin.shell: set -o pipefail && false | wc -l
  args:
    executable: /bin/bash
  changed_when: false
"""


def test_a_failing_role_bakes_nothing_and_leaves_nothing_running(project: Project) -> None:
    project.pipeline("destroy", "dev")
    failing = project.root / "roles" / "failing" / "tasks"
    failing.mkdir(parents=True)
    (failing / "main.yml").write_text(FAILING_PIPE_TASK)
    config = yaml.safe_load((project.root / "pipeline.yml").read_text())
    config["images"]["broken"] = {"version": "0.1.0", "roles": ["failing"]}
    (project.root / "pipeline.yml").write_text(yaml.safe_dump(config))

    done = project.pipeline("bake", "broken", check=False)

    task = "task [failing : Count the pages of a listing that fails] on default"
    assert done.returncode == 4, done.stderr
    assert "packer build failed" in done.stderr
    assert f"{task}: non-zero return code" in done.stderr
    assert "Traceback" not in done.stderr
    listed = json.loads(project.pipeline("images", "list", "broken", "--json").stdout)
    assert [(v["version"], v["status"]) for v in listed] == [("0.1.0", "failed")]
    assert listed[0]["failure"].startswith(task), listed[0]
    images = project.state / "images" / "broken"
    assert not images.exists() or list(images.iterdir()) == []
    assert project.vm_processes() == []
    assert project.processes("packer") == []

    # A module that does not exist is found by Ansible's parser before a version is spent.
    (failing / "main.yml").write_text(MISSPELT_MODULE_TASK)
    done = project.pipeline("bake", "broken", check=False)
    assert done.returncode == 3, done.stderr
    assert f"{failing / 'main.yml'}:2: the roles do not parse" in done.stderr
    listed = json.loads(project.pipeline("images", "list", "broken", "--json").stdout)
    assert [(v["version"], v["status"]) for v in listed] == [("0.1.0", "failed")]
    assert project.vm_processes() == []


MISSPELT_MODULE_TASK = """\
---
- name: Install the page
  ansible.builtin.copyy:
    content: hello
    dest: /var/tmp/page
"""

SLEEPING_ROLE = """\
---
- name: Wait for a mirror that never answers
  ansible.builtin.command: sleep 600
  changed_when: false
"""


def test_a_provisioner_past_its_timeout_bakes_nothing_and_leaves_nothing_running(
    project: Project,
) -> None:
    project.pipeline("destroy", "dev")
    sleeping = project.root / "roles" / "sleeping" / "tasks"
    sleeping.mkdir(parents=True)
    (sleeping / "main.yml").write_text(SLEEPING_ROLE)
    config = yaml.safe_load((project.root / "pipeline.yml").read_text())
    # The sleeping role first, so that the timeout fires in it and nothing else is installed.
    config["images"]["stuck"] = {
        "version": "0.1.0",
        "roles": ["sleeping", "base"],
        "provision_timeout": 30,
    }
    (project.root / "pipeline.yml").write_text(yaml.safe_dump(config))

    done = project.pipeline("bake", "stuck", check=False)

    reason = (
        "the ansible provisioner ran past provision_timeout (30 s,"
        " images.stuck.provision_timeout in pipeline.yml)"
        " during task [sleeping : Wait for a mirror that never answers]"
    )
    assert done.returncode == 4, done.stderr
    assert f"failed: {reason}" in done.stderr
    assert "Traceback" not in done.stderr
    listed = json.loads(project.pipeline("images", "list", "stuck", "--json").stdout)
    assert [(v["version"], v["status"]) for v in listed] == [("0.1.0", "failed")]
    assert listed[0]["failure"] == reason
    images = project.state / "images" / "stuck"
    assert not images.exists() or list(images.iterdir()) == []
    assert project.vm_processes() == []
    assert project.processes("packer") == []
    # Packer leaves Ansible's workers and their SSH (in sessions of their own) running; the
    # bake stops every process marked with its run before it returns.
    build_id = listed[0]["build_id"]
    assert [pid for pid, run in process.marked_processes(RUN_ENV) if run == build_id] == []
    assert project.processes("ansible-playbook") == []
    assert project.processes("ssh ") == []


def _regular_files(root: Path) -> Iterator[Path]:
    """Every regular file under `root`, not following links (the shared base and keys)."""
    for folder, _dirs, names in os.walk(root):
        for name in names:
            path = Path(folder, name)
            if path.is_file() and not path.is_symlink():
                yield path


def _holds(path: Path, needle: bytes, chunk: int = 16 << 20) -> bool:
    """Whether the file's bytes hold `needle`, read in chunks (image disks are large)."""
    tail = b""
    with path.open("rb") as data:
        while block := data.read(chunk):
            if needle in tail + block:
                return True
            tail = block[-len(needle) :]
    return False


def test_no_file_the_runs_left_holds_the_secret(project: Project) -> None:
    """Run folders, logs, manifests, the registry, Terraform's state, Molecule's and
    ansible-runner's files, the front door's: none holds the secret the roles were given.
    The image disks do, which shows the secret reached the role."""
    listed = json.loads(project.pipeline("images", "list", "web", "--json").stdout)
    if not any(version["status"] == "verified" for version in listed):
        # This test alone: one bake and verify, for a role to have been given the secret.
        project.pipeline("bake", "web")
        project.pipeline("verify", "web")
    needle = CANARY.encode()
    disks = []
    holding = []
    for path in _regular_files(project.root):
        if path.name == "disk.qcow2" and path.parent.parent.parent == project.state / "images":
            disks.append(path)
        elif _holds(path, needle):
            holding.append(str(path))

    assert holding == []
    assert list((project.state / "private").iterdir()) == []
    web_disks = [disk for disk in disks if disk.parent.parent.name == "web"]
    assert any(_holds(disk, needle) for disk in web_disks), web_disks
