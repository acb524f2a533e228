"""pipeline.yml: the example loads, and every mistake names the file, the key and the bad value."""

from __future__ import annotations

from pathlib import Path

import pytest
from projects import MINIMAL

from pipeline import config
from pipeline.errors import ConfigError, UsageError
from pipeline.stages.bake import PACKER_TIMEOUT

REPO = Path(__file__).resolve().parent.parent

GOOD = MINIMAL


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pipeline.yml"
    path.write_text(text, encoding="utf-8")
    return path


def test_the_example_pipeline_yml_loads() -> None:
    loaded = config.load(REPO / "pipeline.yml")

    web = loaded.image("web")
    assert web.version == "1.0.0"
    assert web.roles == ("base", "webservice")
    assert web.vars == {"webservice_message": "Hello from an immutable image"}
    dev = loaded.environment("dev")
    assert (dev.image, dev.channel, dev.instances, dev.target) == ("web", "dev", 2, "local")
    assert (dev.health.path, dev.health.timeout) == ("/healthz", 600)
    # The README's second run shows two waves of one.
    assert (dev.rollout.strategy, dev.rollout.max_surge) == ("rolling", 1)
    assert loaded.state_dir == REPO / ".pipeline"
    assert loaded.roles_dir == REPO / "roles"


def test_defaults_fill_what_a_minimal_file_leaves_out(tmp_path: Path) -> None:
    loaded = config.load(_write(tmp_path, GOOD))

    web = loaded.image("web")
    assert (web.bump, web.service_port, web.template) == ("patch", 8080, "packer/local.pkr.hcl.j2")
    assert web.provision_timeout is None
    dev = loaded.environment("dev")
    assert (dev.channel, dev.instances, dev.health.path) == ("dev", 2, "/healthz")


# (id, pipeline.yml text, dotted key or None, the bad value as the message shows it)
BAD = [
    (
        "malformed-yaml",
        "images:\n  web:\n    roles: [base\n    version: 1.0.0\nenvironments: {}\n",
        None,
        "malformed YAML at line 4",
    ),
    ("unknown-top-level-key", GOOD + "colour: blue\n", "colour", "unknown key"),
    (
        "unknown-image-key",
        GOOD.replace("    version: 1.0.0\n", "    version: 1.0.0\n    colour: blue\n"),
        "images.web.colour",
        "unknown key",
    ),
    (
        "instances-as-string",
        GOOD + "    instances: two\n",
        "environments.dev.instances",
        "a string 'two'",
    ),
    (
        "instances-as-boolean",
        GOOD + "    instances: yes\n",
        "environments.dev.instances",
        "bool True",
    ),
    (
        "images-as-list",
        "images: [web]\nenvironments: {}\n",
        "images",
        "a list ['web']",
    ),
    (
        "roles-as-int",
        GOOD.replace("[base, webservice]", "5"),
        "images.web.roles",
        "int 5",
    ),
    (
        "version-not-semantic",
        GOOD.replace("1.0.0", '"1.0"'),
        "images.web.version",
        "'1.0' is not a semantic version",
    ),
    (
        "version-as-float",
        GOOD.replace("1.0.0", "1.0"),
        "images.web.version",
        "float 1.0",
    ),
    (
        "version-with-leading-zero",
        GOOD.replace("1.0.0", "01.0.0"),
        "images.web.version",
        "'01.0.0' is not a semantic version",
    ),
    (
        "version-with-trailing-newline",
        GOOD.replace("1.0.0", '"1.0.0\\n"'),
        "images.web.version",
        "'1.0.0\\n' is not a semantic version",
    ),
    (
        "version-with-non-ascii-digit",
        GOOD.replace("1.0.0", "1\u0663.0.0"),
        "images.web.version",
        "'1\u0663.0.0' is not a semantic version",
    ),
    (
        "role-escaping-the-roles-folder",
        GOOD.replace("[base, webservice]", "[base, ../etc]"),
        "images.web.roles[1]",
        "'../etc'",
    ),
    (
        "role-with-trailing-newline",
        GOOD.replace("[base, webservice]", '["base\\n"]'),
        "images.web.roles[0]",
        "'base\\n'",
    ),
    (
        "empty-roles-list",
        GOOD.replace("[base, webservice]", "[]"),
        "images.web.roles",
        "[]",
    ),
    (
        "image-name-with-capitals",
        GOOD.replace("  web:", "  Web:").replace("image: web", "image: Web"),
        "images.Web",
        "'Web'",
    ),
    (
        "environment-naming-an-unknown-image",
        GOOD.replace("image: web", "image: db"),
        "environments.dev.image",
        "'db'",
    ),
    (
        "too-many-instances",
        GOOD + "    instances: 33\n",
        "environments.dev.instances",
        "33 is out of range",
    ),
    (
        "negative-instances",
        GOOD + "    instances: -1\n",
        "environments.dev.instances",
        "-1 is out of range",
    ),
    (
        "health-path-without-slash",
        GOOD + "    health:\n      path: healthz\n",
        "environments.dev.health.path",
        "'healthz' must start with /",
    ),
    (
        "empty-file",
        "",
        None,
        "the file is empty (or only comments); it must hold images: and environments:",
    ),
    (
        "a-date-in-vars",
        GOOD.replace(
            "    version: 1.0.0\n", "    version: 1.0.0\n    vars:\n      day: 2024-01-01\n"
        ),
        "images.web.vars.day",
        "is a date; quote it",
    ),
    (
        "template-outside-the-templates-folder",
        GOOD.replace("    version: 1.0.0\n", "    version: 1.0.0\n    template: ../pipeline.yml\n"),
        "images.web.template",
        "must be a path inside the templates folder",
    ),
    (
        "names-too-long-for-a-host-name",
        GOOD.replace("  dev:\n", "  development-environment-one:\n"),
        "environments.development-environment-one",
        "make instance names too long",
    ),
    (
        "an-empty-channel",
        GOOD + "    channel: ''\n",
        "environments.dev.channel",
        "must be a non-empty string, got an empty string",
    ),
    (
        "roles-an-empty-mapping",
        GOOD.replace("[base, webservice]", "{}"),
        "images.web.roles",
        "must be a list, got an empty mapping",
    ),
    (
        "registry-url-of-another-kind",
        "registry: mysql://db/registry\n" + GOOD,
        "registry",
        "'mysql://db/registry' is not sqlite:///PATH (PATH relative to the project folder)",
    ),
    (
        "base-that-is-not-declared",
        GOOD.replace("    version: 1.0.0\n", "    version: 1.0.0\n    base: ubuntu\n"),
        "images.web.base",
        "'ubuntu' is not a base declared here (debian)",
    ),
    (
        "image-named-like-a-base",
        GOOD.replace("  web:\n", "  debian:\n").replace("image: web", "image: debian"),
        "images.debian",
        "'debian' is already the name of a base image",
    ),
    (
        "bump-for-an-unknown-kind-of-input",
        GOOD.replace("    version: 1.0.0\n", "    version: 1.0.0\n    bump: {colour: minor}\n"),
        "images.web.bump.colour",
        "unknown key",
    ),
    (
        "bump-of-an-unknown-size",
        GOOD.replace("    version: 1.0.0\n", "    version: 1.0.0\n    bump: {roles: huge}\n"),
        "images.web.bump.roles",
        "'huge' is not one of: patch, minor, major",
    ),
    (
        "base-with-a-bad-package-name",
        "bases:\n  slim:\n    packages: ['curl; rm -rf /']\n" + GOOD,
        "bases.slim.packages[0]",
        "curl; rm -rf /",
    ),
    (
        "unknown-strategy",
        GOOD + "    rollout: {strategy: canary}\n",
        "environments.dev.rollout.strategy",
        "'canary' is not one of: rolling, blue_green",
    ),
    (
        "surge-as-a-fraction",
        GOOD + "    rollout: {max_surge: 0.5}\n",
        "environments.dev.rollout.max_surge",
        "0.5 must be a count (0-32) or a percentage such as 25%",
    ),
    (
        "no-wave-could-move",
        GOOD + "    rollout: {max_surge: 0, max_unavailable: 0%}\n",
        "environments.dev.rollout",
        "cannot both be 0",
    ),
    (
        "keep-old-with-rolling",
        GOOD + "    rollout: {keep_old: 60}\n",
        "environments.dev.rollout.keep_old",
        "keep_old belongs to strategy blue_green",
    ),
    (
        "an-expected-status-out-of-range",
        GOOD + "    health: {status: 2000}\n",
        "environments.dev.health.status",
        "2000",
    ),
    (
        "a-smoke-playbook-that-does-not-exist",
        GOOD + "    health: {smoke: playbooks/smoke.yml}\n",
        "environments.dev.health.smoke",
        "no playbook 'playbooks/smoke.yml'",
    ),
    (
        "a-health-path-with-a-space",
        GOOD + "    health: {path: /health check}\n",
        "environments.dev.health.path",
        "'/health check' must start with / and hold no spaces, quotes or '#'",
    ),
    (
        "a-provision-timeout-as-a-duration",
        GOOD.replace("    version: 1.0.0\n", "    version: 1.0.0\n    provision_timeout: 10m\n"),
        "images.web.provision_timeout",
        "must be a whole number, got a string '10m'",
    ),
    (
        "a-provision-timeout-too-short",
        GOOD.replace("    version: 1.0.0\n", "    version: 1.0.0\n    provision_timeout: 5\n"),
        "images.web.provision_timeout",
        "5 is out of range (10 to 3000)",
    ),
    (
        "a-provision-timeout-beyond-packers-own",
        GOOD.replace("    version: 1.0.0\n", "    version: 1.0.0\n    provision_timeout: 3601\n"),
        "images.web.provision_timeout",
        "3601 is out of range (10 to 3000)",
    ),
    (
        "a-front-door-on-a-privileged-port",
        GOOD + "    front_door: {port: 80}\n",
        "environments.dev.front_door.port",
        "80",
    ),
]
BAD_IDS = [case[0] for case in BAD]


@pytest.mark.parametrize(("text", "key", "value"), [case[1:] for case in BAD], ids=BAD_IDS)
def test_a_mistake_names_the_file_the_key_and_the_bad_value(
    tmp_path: Path, text: str, key: str | None, value: str
) -> None:
    path = _write(tmp_path, text)

    with pytest.raises(ConfigError) as caught:
        config.load(path)

    error = caught.value
    assert error.exit_code == 3
    assert error.path == str(path)
    assert error.key == key
    where = f"{path}: {key}: " if key else f"{path}: "
    assert str(error).startswith(where)
    assert value in str(error).removeprefix(where)


def test_a_provision_timeout_is_read_and_ends_before_the_whole_packer_run(
    tmp_path: Path,
) -> None:
    text = GOOD.replace("    version: 1.0.0\n", "    version: 1.0.0\n    provision_timeout: 900\n")

    loaded = config.load(_write(tmp_path, text))

    assert loaded.image("web").provision_timeout == 900
    # Past the top, the pipeline would stop Packer before Packer stopped the provisioner.
    assert config.PROVISION_TIMEOUT[1] < PACKER_TIMEOUT


def test_rollout_and_health_settings_are_read(tmp_path: Path) -> None:
    (tmp_path / "smoke.yml").write_text("- hosts: all\n  tasks: []\n")
    text = GOOD + (
        "    rollout: {strategy: rolling, max_surge: 25%, max_unavailable: 1}\n"
        "    health: {path: /ready, status: 204, passes: 5, failures: 2, interval: 0.5,"
        " smoke: smoke.yml}\n"
        "    front_door: {port: 18080}\n"
    )
    env = config.load(_write(tmp_path, text)).environments["dev"]

    assert (env.rollout.max_surge, env.rollout.max_unavailable) == ("25%", 1)
    assert (env.rollout.surge(8), env.rollout.unavailable(8)) == (2, 1)
    assert (env.health.path, env.health.status, env.health.passes) == ("/ready", 204, 5)
    assert (env.health.failures, env.health.interval) == (2, 0.5)
    assert env.health.smoke == (tmp_path / "smoke.yml").resolve()
    assert env.port == 18080


@pytest.mark.parametrize(
    ("playbook", "problem"),
    [
        ("- hosts: all\n  tasks: [\n", "malformed YAML at line 3"),
        ("hosts: all\n", "not a playbook: it must be a list of plays"),
        ("", "not a playbook"),
        ("- hosts: all\n- name: stray task\n  ansible.builtin.ping:\n", "play 2 is not a play"),
    ],
)
def test_a_smoke_playbook_that_is_no_playbook_is_named(
    tmp_path: Path, playbook: str, problem: str
) -> None:
    (tmp_path / "smoke.yml").write_text(playbook)
    path = _write(tmp_path, GOOD + "    health: {smoke: smoke.yml}\n")

    with pytest.raises(ConfigError) as caught:
        config.load(path)

    assert caught.value.key == "environments.dev.health.smoke"
    assert f"{(tmp_path / 'smoke.yml').resolve()}: {problem}" in str(caught.value)


def test_a_smoke_playbook_with_vaulted_values_and_imports_is_accepted(tmp_path: Path) -> None:
    (tmp_path / "smoke.yml").write_text(
        "- ansible.builtin.import_playbook: other.yml\n"
        "- hosts: all\n  vars:\n    token: !vault |\n      $ANSIBLE_VAULT;1.1;AES256\n"
        "      6162\n  tasks: []\n"
    )
    config.load(_write(tmp_path, GOOD + "    health: {smoke: smoke.yml}\n"))


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "elsewhere.yml"

    with pytest.raises(ConfigError) as caught:
        config.load(path)

    assert str(caught.value).startswith(f"{path}: no such file")


def test_text_that_is_not_utf8_is_reported_as_such(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.yml"
    path.write_bytes(GOOD.encode() + b"# caf\xe9\n")

    with pytest.raises(ConfigError) as caught:
        config.load(path)

    assert str(caught.value).startswith(f"{path}: not UTF-8 text")


TWO_IMAGES = """\
images:
  web:
    version: 1.0.0
    roles: [base, webservice]
  api:
    version: 2.0.0
    roles: [base]
environments:
  dev:
    image: web
"""


def test_asking_for_an_unknown_image_lists_the_known_ones(tmp_path: Path) -> None:
    loaded = config.load(_write(tmp_path, TWO_IMAGES))

    with pytest.raises(UsageError) as caught:
        loaded.image("db")

    assert caught.value.exit_code == 2
    assert str(caught.value) == "unknown image 'db' (images in pipeline.yml: api, web)"


def test_asking_for_an_unknown_environment_lists_the_known_ones(tmp_path: Path) -> None:
    loaded = config.load(_write(tmp_path, TWO_IMAGES))

    with pytest.raises(UsageError) as caught:
        loaded.environment("prod")

    assert caught.value.exit_code == 2
    assert str(caught.value) == "unknown environment 'prod' (environments in pipeline.yml: dev)"


def test_the_embedded_terraform_is_the_default_and_a_named_one_must_exist(tmp_path: Path) -> None:
    from pipeline.errors import MissingTool
    from pipeline.stages.deploy import terraform_for

    default = config.load(_write(tmp_path, GOOD))
    assert default.terraform == "embedded"

    named = config.load(_write(tmp_path, "terraform: no-such-terraform-here\n" + GOOD))
    with pytest.raises(MissingTool, match="no-such-terraform-here"):
        terraform_for(named, named.environment("dev"), tmp_path / "logs")


def test_a_terraform_path_is_read_from_the_project_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tool = tmp_path / "bin" / "tofu"
    tool.parent.mkdir()
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    monkeypatch.chdir(tmp_path / "bin")

    loaded = config.load(_write(tmp_path, "terraform: bin/tofu\n" + GOOD))

    assert loaded.terraform == str(tmp_path.resolve() / "bin" / "tofu")


def test_bases_are_named_and_shared_and_an_inline_base_is_named_after_its_image(
    tmp_path: Path,
) -> None:
    text = (
        "bases:\n  tools:\n    packages: [curl]\n"
        "images:\n"
        "  web:\n    version: 1.0.0\n    roles: [base]\n    base: tools\n"
        "  api:\n    version: 1.0.0\n    roles: [base]\n    base: {packages: [jq]}\n"
        "  job:\n    version: 1.0.0\n    roles: [base]\n"
        "environments: {}\n"
    )

    loaded = config.load(_write(tmp_path, text))

    assert loaded.image("web").base == config.BaseConfig("tools", "bookworm", ("curl",))
    assert loaded.image("api").base == config.BaseConfig("api-base", "bookworm", ("jq",))
    assert loaded.image("job").base == config.BaseConfig("debian", "bookworm", ())
    assert sorted(loaded.bases) == ["api-base", "debian", "tools"]


def test_a_bump_can_be_declared_per_kind_of_input(tmp_path: Path) -> None:
    text = GOOD.replace(
        "    version: 1.0.0\n", "    version: 1.0.0\n    bump: {default: patch, roles: minor}\n"
    )

    web = config.load(_write(tmp_path, text)).image("web")

    assert (web.bump, web.bump_on) == ("patch", {"roles": "minor"})


def test_a_relative_sqlite_registry_is_beside_pipeline_yml(tmp_path: Path) -> None:
    loaded = config.load(_write(tmp_path, "registry: sqlite:///shared/registry.db\n" + GOOD))

    assert loaded.registry == f"sqlite:///{tmp_path.resolve() / 'shared' / 'registry.db'}"


def test_an_image_can_be_built_on_another_and_takes_its_debian_base(tmp_path: Path) -> None:
    text = (
        "bases:\n  tools:\n    packages: [curl]\n"
        "images:\n"
        "  api:\n    version: 0.1.0\n    roles: [base]\n    base: web\n"
        "  web:\n    version: 1.0.0\n    roles: [base]\n    base: tools\n"
        "environments: {}\n"
    )

    loaded = config.load(_write(tmp_path, text))

    api = loaded.image("api")
    assert (api.parent, api.base.name) == ("web", "tools")
    assert loaded.image("web").parent is None


@pytest.mark.parametrize(
    ("images", "key", "message"),
    [
        (
            {"a": "b", "b": "c", "c": "a"},
            "images.a.base",
            "images built on each other: a -> b -> c -> a",
        ),
        ({"a": "a"}, "images.a.base", "'a' cannot be built on itself"),
        (
            {"a": "nowhere", "b": None},
            "images.a.base",
            "'nowhere' is not a base declared here (debian) nor another image (b)",
        ),
    ],
    ids=["cycle", "itself", "unknown"],
)
def test_a_wrong_parent_image_is_named(
    tmp_path: Path, images: dict[str, str | None], key: str, message: str
) -> None:
    text = "images:\n"
    for name, base in images.items():
        text += f"  {name}:\n    version: 1.0.0\n    roles: [base]\n"
        text += f"    base: {base}\n" if base else ""
    path = _write(tmp_path, text + "environments: {}\n")

    with pytest.raises(ConfigError) as caught:
        config.load(path)

    assert str(caught.value) == f"{path}: {key}: {message}"


def _scheduled(schedule: str) -> str:
    """GOOD with `schedule:` (YAML flow text) under image web."""
    roles = "    roles: [base, webservice]\n"
    return GOOD.replace(roles, roles + f"    schedule: {schedule}\n")


def test_a_schedule_is_read_with_its_triggers_and_defaults(tmp_path: Path) -> None:
    text = _scheduled(
        "{cron: '0 3 * * *', do: run, env: dev, pause_after: 2,"
        " triggers: [inputs_changed, base_packages, parent_rebuilt, {max_age_days: 7}]}"
    )

    web = config.load(_write(tmp_path, text)).image("web")
    plain = config.load(_write(tmp_path, _scheduled("{cron: '*/5 * * * *'}"))).image("web")

    assert web.schedule == config.ScheduleConfig(
        cron="0 3 * * *",
        do="run",
        env="dev",
        triggers=("inputs_changed", "base_packages", "parent_rebuilt", "max_age_days"),
        max_age_days=7,
        pause_after=2,
    )
    assert plain.schedule == config.ScheduleConfig(cron="*/5 * * * *")
    assert (plain.schedule.do, plain.schedule.triggers) == ("bake", ("inputs_changed",))
    assert config.load(_write(tmp_path, GOOD)).image("web").schedule is None


SCHEDULE_BAD = [
    ("no-cron", "{do: bake}", "images.web.schedule.cron", "is required"),
    ("cron-4-fields", "{cron: '0 3 * *'}", "images.web.schedule.cron", "has 4 field(s)"),
    (
        "cron-hour-25",
        "{cron: '0 25 * * *'}",
        "images.web.schedule.cron",
        "hour field '25': 25 is out of range (0-23)",
    ),
    (
        "cron-never",
        "{cron: '0 0 31 feb *'}",
        "images.web.schedule.cron",
        "never comes: no day 31 in feb",
    ),
    (
        "unknown-action",
        "{cron: '* * * * *', do: deploy}",
        "images.web.schedule.do",
        "'deploy' is not one of: bake, verify, run",
    ),
    (
        "run-without-env",
        "{cron: '* * * * *', do: run}",
        "images.web.schedule.env",
        "is required with do: run",
    ),
    (
        "env-without-run",
        "{cron: '* * * * *', env: dev}",
        "images.web.schedule.env",
        "belongs to do: run, not do: bake",
    ),
    (
        "unknown-env",
        "{cron: '* * * * *', do: run, env: prod}",
        "images.web.schedule.env",
        "'prod' is not an environment declared here (dev)",
    ),
    (
        "unknown-trigger",
        "{cron: '* * * * *', triggers: [inputs_changed, moon_phase]}",
        "images.web.schedule.triggers[1]",
        "'moon_phase' is not one of: inputs_changed, base_packages",
    ),
    (
        "no-triggers",
        "{cron: '* * * * *', triggers: []}",
        "images.web.schedule.triggers",
        "must list at least one trigger, got an empty list",
    ),
    (
        "max-age-without-days",
        "{cron: '* * * * *', triggers: [max_age_days]}",
        "images.web.schedule.triggers[0]",
        "max_age_days needs a number of days",
    ),
    (
        "max-age-zero",
        "{cron: '* * * * *', triggers: [{max_age_days: 0}]}",
        "images.web.schedule.triggers[0].max_age_days",
        "0 is out of range (1 to 3650)",
    ),
    (
        "trigger-twice",
        "{cron: '* * * * *', triggers: [parent_rebuilt, parent_rebuilt]}",
        "images.web.schedule.triggers[1]",
        "parent_rebuilt is listed twice",
    ),
    (
        "pause-after-string",
        "{cron: '* * * * *', pause_after: three}",
        "images.web.schedule.pause_after",
        "a string 'three'",
    ),
    ("unknown-key", "{cron: '* * * * *', at: noon}", "images.web.schedule.at", "unknown key"),
]


@pytest.mark.parametrize(
    ("schedule", "key", "message"),
    [case[1:] for case in SCHEDULE_BAD],
    ids=[case[0] for case in SCHEDULE_BAD],
)
def test_a_schedule_mistake_names_the_file_and_the_key(
    tmp_path: Path, schedule: str, key: str, message: str
) -> None:
    path = _write(tmp_path, _scheduled(schedule))

    with pytest.raises(ConfigError) as caught:
        config.load(path)

    assert caught.value.key == key
    assert str(caught.value).startswith(f"{path}: {key}: ")
    assert message in str(caught.value)


def test_base_packages_is_refused_for_an_image_built_on_another(tmp_path: Path) -> None:
    text = (
        "images:\n"
        "  web:\n    version: 1.0.0\n    roles: [base]\n"
        "  api:\n    version: 1.0.0\n    roles: [base]\n    base: web\n"
        "    schedule: {cron: '0 3 * * *', triggers: [parent_rebuilt, base_packages]}\n"
        "environments: {}\n"
    )
    path = _write(tmp_path, text)

    with pytest.raises(ConfigError) as caught:
        config.load(path)

    assert str(caught.value) == (
        f"{path}: images.api.schedule.triggers[1]: base_packages is for an image built on a"
        " Debian base; this one is built on image web: give web that trigger, and this one"
        " parent_rebuilt"
    )


def test_a_scheduled_run_goes_to_an_environment_of_its_own_image(tmp_path: Path) -> None:
    text = _scheduled("{cron: '* * * * *', do: run, env: other}") + (
        "  other:\n    image: api\n"
    ).replace("environments:\n", "")
    text = text.replace(
        "environments:\n", "  api:\n    version: 1.0.0\n    roles: [base]\nenvironments:\n"
    )
    path = _write(tmp_path, text)

    with pytest.raises(ConfigError) as caught:
        config.load(path)

    assert str(caught.value) == (
        f"{path}: images.web.schedule.env: environment 'other' runs image 'api', not 'web'"
    )


def test_environments_on_different_front_door_ports_load(tmp_path: Path) -> None:
    text = GOOD + "    front_door: {port: 18080}\n  staging:\n    image: web\n"
    text += "    front_door: {port: 18081}\n"

    loaded = config.load(_write(tmp_path, text))

    assert [env.port for env in loaded.environments.values()] == [18080, 18081]
