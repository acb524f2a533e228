"""A corpus of broken inputs, each with the command that meets it and what it must answer.

Every case starts from a copy of the example project (pipeline.yml, roles, templates,
playbooks, molecule), changes it as the case says, runs one `pipeline` command, and expects one
line on stderr holding every fragment of `says`, the exit code `exit`, no traceback, and not
one file written. `{project}` in a fragment stands for the project's folder.

A case may start from a state: "registry" (an empty registry, as after a first command),
"web-built" (web 1.0.0 baked, not verified) or "web-verified" (web 1.0.0 verified, channel dev
on it), made by tests/test_badinput.py. Their disks start as qcow2 files do and are never booted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PIPELINE_YML = "{project}/pipeline.yml"
ROLES = "[base, webservice]"
ROLES_LINE = "    roles: [base, webservice]\n"
# A whole pipeline.yml of one image and no environment, for cases that write their own.
SMALL = "images: {web: {version: 1.0.0, roles: [base]}}\nenvironments: {}\n"
DISK = ".pipeline/images/web/1.0.0/disk.qcow2"

# An image built on web, and an environment for it: the cases about a missing base use it.
ON_WEB = """\
  api:
    version: 2.0.0
    roles: [base]
    base: web
"""
API_ENV = "  edge:\n    image: api\n"

# A shell task whose failing curl the pipe into tee would hide.
RISKY_PIPE_TASK = """
- name: Keep a copy of the page
  ansible.builtin.shell: curl -fsS http://127.0.0.1:8080/ | tee /var/tmp/page
  changed_when: false
"""

# A task whose module does not exist: only Ansible's own parser knows the modules.
MISSPELT_MODULE_TASK = """
- name: Install the page
  ansible.builtin.copyy:
    content: hello
    dest: /var/tmp/page
"""

# The example template, with one line taken out to put a broken one in its place.
TEMPLATE = "templates/packer/local.pkr.hcl.j2"
TIMEOUT_LINE = "  ssh_timeout          = {{ ssh_timeout | hcl }}\n"
TF_TEMPLATE = "templates/terraform/local/main.tf.j2"


@dataclass(frozen=True)
class Bad:
    """One broken input: how to break the project, what to run, and what must come back."""

    name: str
    run: str
    exit: int
    says: tuple[str, ...]
    # path -> [(text that must be there, what replaces it)]
    replace: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    # path -> text added at the end of the file
    append: dict[str, str] = field(default_factory=dict)
    # path -> the whole new content (bytes for what is not text)
    write: dict[str, str | bytes] = field(default_factory=dict)
    remove: tuple[str, ...] = ()
    state: str | None = None
    # Environment variables the command runs with.
    env: dict[str, str] = field(default_factory=dict)


def _yml(*pairs: tuple[str, str]) -> dict[str, list[tuple[str, str]]]:
    return {"pipeline.yml": list(pairs)}


def _image_key(text: str) -> dict[str, list[tuple[str, str]]]:
    """A line added to image web's keys in pipeline.yml."""
    return _yml((ROLES_LINE, ROLES_LINE + text))


def _template_line(line: str) -> dict[str, list[tuple[str, str]]]:
    """The example Packer template with its ssh_timeout line replaced by `line`."""
    return {TEMPLATE: [(TIMEOUT_LINE, line)]}


PLAN = "plan web --env dev"
BAKE = "bake web"

CASES = [
    # pipeline.yml that is not YAML, or not the YAML of a pipeline.yml
    Bad(
        "yaml-tab-indentation",
        PLAN,
        3,
        (PIPELINE_YML, "malformed YAML at line 4, column 1"),
        replace=_yml(("    version: 1.0.0", "\tversion: 1.0.0")),
    ),
    Bad(
        "yaml-unclosed-quote",
        PLAN,
        3,
        (PIPELINE_YML, "malformed YAML at line"),
        replace=_yml(("webservice_message: Hello", 'webservice_message: "Hello')),
    ),
    Bad(
        "yaml-environment-given-twice",
        PLAN,
        3,
        (PIPELINE_YML, "duplicate key 'dev' (first given at line 10)"),
        append={"pipeline.yml": "  dev:\n    image: web\n    instances: 5\n"},
    ),
    Bad(
        "yaml-key-given-twice-in-one-mapping",
        PLAN,
        3,
        (PIPELINE_YML, "duplicate key 'instances'"),
        replace=_yml(("    instances: 2\n", "    instances: 2\n    instances: 3\n")),
    ),
    Bad(
        "yaml-nul-byte",
        PLAN,
        3,
        (PIPELINE_YML, "not YAML text: U+0000"),
        append={"pipeline.yml": "# a stray \x00\n"},
    ),
    Bad(
        "yaml-not-utf8",
        PLAN,
        3,
        (PIPELINE_YML, "not UTF-8 text"),
        write={"pipeline.yml": b"images:\n  caf\xe9: {}\n"},
    ),
    Bad(
        "yaml-nested-too-deeply",
        PLAN,
        3,
        (PIPELINE_YML, "malformed YAML: nested too deeply"),
        write={"pipeline.yml": "images: " + "[" * 5000 + "]" * 5000 + "\n"},
    ),
    Bad(
        "yaml-python-object-tag",
        PLAN,
        3,
        (PIPELINE_YML, "could not determine a constructor for the tag"),
        write={"pipeline.yml": "images: !!python/object/apply:os.system ['touch pwned']\n"},
    ),
    Bad(
        "yaml-set-tag-on-a-word",
        PLAN,
        3,
        (PIPELINE_YML, "malformed YAML at line 1, column 1: expected a mapping node"),
        write={"pipeline.yml": "!!set images\n"},
    ),
    Bad(
        "yaml-a-list-not-a-mapping",
        PLAN,
        3,
        (PIPELINE_YML, "must be a mapping, got a list"),
        write={"pipeline.yml": "- images\n- environments\n"},
    ),
    Bad(
        "yaml-only-a-comment",
        PLAN,
        3,
        (PIPELINE_YML, "pipeline.yml: the file is empty (or only comments); it must hold images:"),
        write={"pipeline.yml": "# images: to come\n"},
    ),
    Bad(
        "yaml-empty-file",
        PLAN,
        3,
        (PIPELINE_YML, "pipeline.yml: the file is empty (or only comments); it must hold images:"),
        write={"pipeline.yml": ""},
    ),
    Bad(
        "config-option-on-a-device",
        "-c /dev/null " + PLAN,
        3,
        ("/dev/null: not a regular file",),
    ),
    # the registry's URL
    Bad(
        "registry-variable-not-a-url",
        "images list",
        3,
        (
            "environment variable PIPELINE_REGISTRY_URL: 'bogus' is not sqlite:///PATH"
            " (PATH relative to the project folder), sqlite:////ABSOLUTE/PATH or postgresql://",
        ),
        env={"PIPELINE_REGISTRY_URL": "bogus"},
    ),
    Bad(
        "registry-variable-relative-path-in-no-folder",
        "images list",
        4,
        (
            "cannot open the registry {project}/tmp/x/r.db: no folder {project}/tmp/x",
            "PIPELINE_REGISTRY_URL names a path relative to the project folder {project};",
        ),
        env={"PIPELINE_REGISTRY_URL": "sqlite:///tmp/x/r.db"},
    ),
    Bad(
        "registry-key-in-memory",
        "images list",
        3,
        (PIPELINE_YML, "registry: 'sqlite:///:memory:' is not sqlite:///PATH"),
        replace=_yml(("images:\n", "registry: 'sqlite:///:memory:'\nimages:\n")),
    ),
    Bad(
        "terraform-path-that-does-not-exist",
        PLAN,
        3,
        (PIPELINE_YML, "pipeline.yml: terraform: '/nonexistent/tofu': no such file"),
        replace=_yml(("images:\n", "terraform: /nonexistent/tofu\nimages:\n")),
    ),
    Bad(
        "terraform-path-to-a-folder",
        PLAN,
        3,
        (
            PIPELINE_YML,
            "pipeline.yml: terraform: 'roles/' is not an executable file ({project}/roles)",
        ),
        replace=_yml(("images:\n", "terraform: roles/\nimages:\n")),
    ),
    # unknown keys
    Bad(
        "unknown-key-environment-for-environments",
        PLAN,
        3,
        (PIPELINE_YML, "environment: unknown key (allowed: "),
        replace=_yml(("environments:", "environment:")),
    ),
    Bad(
        "unknown-key-holding-a-line-break",
        PLAN,
        3,
        (PIPELINE_YML, "pipeline.yml: colour\\nred: unknown key"),
        append={"pipeline.yml": '"colour\\nred": 1\n'},
    ),
    Bad(
        "unknown-key-instance-for-instances",
        PLAN,
        3,
        (PIPELINE_YML, "environments.dev.instance: unknown key"),
        replace=_yml(("    instances: 2", "    instance: 2")),
    ),
    Bad(
        "unknown-key-in-health",
        PLAN,
        3,
        (PIPELINE_YML, "environments.dev.health.pth: unknown key"),
        replace=_yml(("      path: /healthz", "      pth: /healthz")),
    ),
    # wrong types
    Bad(
        "wrong-type-instances-a-word",
        PLAN,
        3,
        (PIPELINE_YML, "environments.dev.instances: must be a whole number, got a string 'two'"),
        replace=_yml(("    instances: 2", "    instances: two")),
    ),
    Bad(
        "wrong-type-roles-a-string",
        PLAN,
        3,
        (PIPELINE_YML, "images.web.roles: must be a list, got a string 'base'"),
        replace=_yml((ROLES, "base")),
    ),
    Bad(
        "wrong-type-vars-a-list",
        PLAN,
        3,
        (PIPELINE_YML, "images.web.vars: must be a mapping, got a list"),
        replace=_yml(("      webservice_message: Hello", "      - webservice_message: Hello")),
    ),
    Bad(
        "wrong-type-a-set-in-vars",
        PLAN,
        3,
        (PIPELINE_YML, "images.web.vars.x: {'a'} is a set; quote it"),
        replace=_yml(("webservice_message: Hello from an immutable image", "x: !!set {a}")),
    ),
    Bad(
        "wrong-type-health-a-string",
        PLAN,
        3,
        (PIPELINE_YML, "environments.dev.health: must be a mapping, got a string '/healthz'"),
        write={"pipeline.yml": SMALL.replace("{}", "{dev: {image: web, health: /healthz}}")},
    ),
    Bad(
        "wrong-type-port-a-fraction",
        PLAN,
        3,
        (PIPELINE_YML, "images.web.service_port: must be a whole number, got float 8080.5"),
        replace=_image_key("    service_port: 8080.5\n"),
    ),
    Bad(
        "wrong-type-environments-empty",
        PLAN,
        3,
        (PIPELINE_YML, "environments: must be a mapping, got no value (the key is empty)"),
        write={"pipeline.yml": SMALL.replace(" {}", "")},
    ),
    Bad(
        "front-door-port-of-two-environments",
        PLAN,
        3,
        (
            PIPELINE_YML,
            "environments.staging.front_door.port: 18080 is already the port of"
            " environments.dev.front_door.port",
        ),
        append={
            "pipeline.yml": "    front_door: {port: 18080}\n"
            "  staging:\n    image: web\n    front_door: {port: 18080}\n"
        },
    ),
    # versions that are not semantic
    Bad(
        "version-with-a-v",
        PLAN,
        3,
        (PIPELINE_YML, "images.web.version: 'v1.0.0' is not a semantic version"),
        replace=_yml(("version: 1.0.0", "version: v1.0.0")),
    ),
    Bad(
        "version-of-four-numbers",
        PLAN,
        3,
        (PIPELINE_YML, "images.web.version: '1.0.0.0' is not a semantic version"),
        replace=_yml(("version: 1.0.0", "version: 1.0.0.0")),
    ),
    Bad(
        "version-with-an-empty-pre-release",
        PLAN,
        3,
        (PIPELINE_YML, "images.web.version: '1.0.0-' is not a semantic version"),
        replace=_yml(("version: 1.0.0", "version: 1.0.0-")),
    ),
    Bad(
        "version-a-date",
        PLAN,
        3,
        (PIPELINE_YML, "images.web.version: must be a non-empty string, got the date 2026-12-05"),
        replace=_yml(("version: 1.0.0", "version: 2026-12-05")),
    ),
    # roles that are missing or reach outside the roles folder
    Bad(
        "role-missing-at-plan",
        PLAN,
        3,
        (PIPELINE_YML, "images.web.roles[1]: role 'nosuch' does not exist", "nosuch/tasks/"),
        replace=_yml((ROLES, "[base, nosuch]")),
    ),
    Bad(
        "role-missing-at-bake",
        BAKE,
        3,
        (PIPELINE_YML, "images.web.roles[1]: role 'nosuch' does not exist"),
        replace=_yml((ROLES, "[base, nosuch]")),
    ),
    Bad(
        "role-missing-with-a-registry",
        BAKE,
        3,
        (PIPELINE_YML, "images.web.roles[0]: role 'nosuch' does not exist"),
        replace=_yml((ROLES, "[nosuch, base]")),
        state="registry",
    ),
    Bad(
        "role-folder-without-tasks",
        PLAN,
        3,
        (PIPELINE_YML, "images.web.roles[1]: role 'webservice' does not exist", "tasks/main.yml"),
        remove=("roles/webservice/tasks/main.yml",),
    ),
    Bad(
        "role-name-with-dot-dot",
        PLAN,
        3,
        (PIPELINE_YML, "images.web.roles[1]: '../base' is not valid"),
        replace=_yml((ROLES, "[base, ../base]")),
    ),
    Bad(
        "role-name-an-absolute-path",
        BAKE,
        3,
        (PIPELINE_YML, "images.web.roles[0]: '/etc' is not valid"),
        replace=_yml((ROLES, "[/etc]")),
    ),
    # role tasks that would hide a failure
    Bad(
        "role-shell-pipe-without-pipefail-at-plan",
        PLAN,
        3,
        (
            "{project}/roles/webservice/tasks/main.yml:37: task 'Keep a copy of the page'",
            "pipes a shell command without pipefail",
            "`set -o pipefail &&`",
            "# noqa: risky-shell-pipe",
        ),
        append={"roles/webservice/tasks/main.yml": RISKY_PIPE_TASK},
    ),
    Bad(
        "role-task-with-a-module-that-does-not-exist",
        PLAN,
        3,
        (
            "{project}/roles/webservice/tasks/main.yml:37: the roles do not parse",
            "couldn't resolve module/action 'ansible.builtin.copyy'",
        ),
        append={"roles/webservice/tasks/main.yml": MISSPELT_MODULE_TASK},
        state="registry",
    ),
    Bad(
        "role-shell-pipe-without-pipefail-at-bake",
        BAKE,
        3,
        ("{project}/roles/webservice/tasks/main.yml:37: task 'Keep a copy of the page'",),
        append={"roles/webservice/tasks/main.yml": RISKY_PIPE_TASK},
        state="registry",
    ),
    # templates that cannot be rendered
    Bad(
        "template-undefined-name-at-plan",
        PLAN,
        3,
        (f"{{project}}/{TEMPLATE}:39: undefined name: 'ssh_timout' is undefined",),
        replace=_template_line("  ssh_timeout          = {{ ssh_timout | hcl }}\n"),
    ),
    Bad(
        "template-undefined-name-at-bake",
        BAKE,
        3,
        (f"{{project}}/{TEMPLATE}:39: undefined name: 'ssh_timout' is undefined",),
        replace=_template_line("  ssh_timeout          = {{ ssh_timout | hcl }}\n"),
        state="registry",
    ),
    Bad(
        "template-undefined-attribute",
        PLAN,
        3,
        (f"{{project}}/{TEMPLATE}:39: undefined name:", "has no attribute 'kernal'"),
        replace=_template_line("  ssh_timeout          = {{ base.kernal | hcl }}\n"),
    ),
    Bad(
        "template-syntax-error",
        BAKE,
        3,
        (f"{{project}}/{TEMPLATE}:39: template syntax:",),
        replace=_template_line("  {% if %}\n"),
    ),
    Bad(
        "template-a-value-hcl-cannot-hold",
        PLAN,
        3,
        (f"{{project}}/{TEMPLATE}:39: cannot write a range as HCL",),
        replace=_template_line("  ssh_timeout          = {{ range(3) | hcl }}\n"),
    ),
    Bad(
        "template-includes-a-missing-one",
        PLAN,
        3,
        (f"{{project}}/{TEMPLATE}", "includes a template that does not exist"),
        replace=_template_line('{% include "nope.j2" %}\n'),
    ),
    Bad(
        "terraform-template-undefined-name-at-plan",
        PLAN,
        3,
        (f"{{project}}/{TF_TEMPLATE}:77: undefined name: 'health_timeot' is undefined",),
        replace={TF_TEMPLATE: [("{{ health_timeout | hcl }}", "{{ health_timeot | hcl }}")]},
    ),
    Bad(
        "terraform-template-undefined-name-at-deploy",
        "deploy dev",
        3,
        (f"{{project}}/{TF_TEMPLATE}:77: undefined name: 'health_timeot' is undefined",),
        replace={TF_TEMPLATE: [("{{ health_timeout | hcl }}", "{{ health_timeot | hcl }}")]},
        state="web-verified",
    ),
    Bad(
        "template-missing",
        PLAN,
        3,
        (PIPELINE_YML, "images.web.template: template", "packer/gone.pkr.hcl.j2 does not exist"),
        replace=_image_key("    template: packer/gone.pkr.hcl.j2\n"),
    ),
    Bad(
        "template-outside-the-templates-folder",
        PLAN,
        3,
        (PIPELINE_YML, "images.web.template: '../pipeline.yml' must be a path inside"),
        replace=_image_key("    template: ../pipeline.yml\n"),
    ),
    # values holding {{, ${, %{, quotes or backslashes where they cannot be carried
    Bad(
        "value-state-dir-with-a-go-template",
        PLAN,
        3,
        (PIPELINE_YML, "state_dir: '{project}/st{{ .Path }}' holds '{{'"),
        write={"pipeline.yml": 'state_dir: "st{{ .Path }}"\n' + SMALL},
    ),
    Bad(
        "value-health-path-with-an-interpolation",
        PLAN,
        3,
        (PIPELINE_YML, "environments.dev.health.path: '/h\"${x}' must start with /"),
        replace=_yml(("      path: /healthz", "      path: '/h\"${x}'")),
    ),
    Bad(
        "value-image-health-path-with-a-space-and-a-fragment",
        "deploy dev",
        3,
        (PIPELINE_YML, "images.web.health_path: '/he alth#x' must start with /"),
        replace=_image_key("    health_path: '/he alth#x'\n"),
    ),
    Bad(
        "value-channel-with-a-directive",
        PLAN,
        3,
        (PIPELINE_YML, "environments.dev.channel: 'dev%{x}' is not valid"),
        replace=_yml(("channel: dev ", "channel: 'dev%{x}' ")),
    ),
    Bad(
        "value-image-name-with-a-quote",
        PLAN,
        3,
        (PIPELINE_YML, "images.we\"b: 'we\"b' is not valid"),
        replace=_yml(("  web:\n", "  'we\"b':\n")),
    ),
    Bad(
        "value-variable-name-with-an-interpolation",
        PLAN,
        3,
        (PIPELINE_YML, "images.web.vars.${x}: '${x}' is not valid"),
        replace=_yml(("      webservice_message:", "      ${x}:")),
    ),
    Bad(
        "value-package-with-a-backslash",
        PLAN,
        3,
        (PIPELINE_YML, "bases.slim.packages[0]: 'curl\\\\' is not valid"),
        write={"pipeline.yml": "bases:\n  slim:\n    packages: ['curl\\']\n" + SMALL},
    ),
    # image files that are not images
    Bad(
        "image-file-a-png-at-verify",
        "verify web",
        2,
        ("web 1.0.0 cannot be verified:", f"{{project}}/{DISK} is not a qcow2 disk image"),
        write={DISK: b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"},
        state="web-built",
    ),
    Bad(
        "image-file-empty-at-verify",
        "verify web 1.0.0",
        2,
        (f"{{project}}/{DISK} is not a qcow2 disk image (it starts with b'')",),
        write={DISK: b""},
        state="web-built",
    ),
    Bad(
        "image-file-of-a-parent-is-text",
        "plan api --env edge",
        2,
        ("api is built on web 1.0.0, but", f"{DISK} is not a qcow2 disk image"),
        append={"pipeline.yml": API_ENV},
        replace=_yml(("\nenvironments:", ON_WEB + "\nenvironments:")),
        write={DISK: "not a disk\n"},
        state="web-verified",
    ),
    # missing bases
    Bad(
        "base-not-declared",
        PLAN,
        3,
        (PIPELINE_YML, "images.web.base: 'ubuntu' is not a base declared here (debian)"),
        replace=_image_key("    base: ubuntu\n"),
    ),
    Bad(
        "base-image-with-no-version",
        "plan api --env edge",
        2,
        ("api is built on image web, which has no verified, unrevoked version yet",),
        append={"pipeline.yml": API_ENV},
        replace=_yml(("\nenvironments:", ON_WEB + "\nenvironments:")),
        state="web-built",
    ),
    Bad(
        "base-image-whose-file-is-gone",
        "plan api --env edge",
        2,
        ("api is built on web 1.0.0, whose image file is gone",),
        append={"pipeline.yml": API_ENV},
        replace=_yml(("\nenvironments:", ON_WEB + "\nenvironments:")),
        remove=(DISK,),
        state="web-verified",
    ),
    Bad(
        "base-of-an-unknown-suite",
        PLAN,
        3,
        (PIPELINE_YML, "bases.slim.suite: 'sid' is not one of: bookworm"),
        replace=_yml(("images:\n", "bases:\n  slim: {suite: sid}\nimages:\n")),
    ),
    # other files pipeline.yml names
    Bad(
        "smoke-playbook-a-mapping",
        PLAN,
        3,
        (PIPELINE_YML, "environments.dev.health.smoke:", "not a playbook: it must be a list"),
        write={"playbooks/smoke.yml": "hosts: all\ntasks: []\n"},
    ),
    Bad(
        "provision-timeout-in-minutes",
        BAKE,
        3,
        (PIPELINE_YML, "images.web.provision_timeout: must be a whole number, got a string '5m'"),
        replace=_image_key("    provision_timeout: 5m\n"),
    ),
    Bad(
        "schedule-minute-out-of-range",
        PLAN,
        3,
        (PIPELINE_YML, "images.web.schedule.cron:", "61"),
        replace=_image_key("    schedule: {cron: '61 * * * *'}\n"),
    ),
    # command lines
    Bad(
        "command-scale-beyond-the-limit",
        "scale dev 99",
        2,
        ("instance count 99: it must be between 0 and 32",),
    ),
    Bad(
        "command-promote-to-a-channel-with-a-space",
        "promote web 'dev channel' 1.0.0",
        2,
        ("'dev channel' is not a channel name",),
        state="web-verified",
    ),
    Bad(
        "command-revoke-at-no-time",
        "revoke web 1.0.0 --reason test --at yesterday",
        2,
        ("--at 'yesterday' is not a time",),
        state="web-verified",
    ),
    Bad(
        "command-tree-into-a-png",
        "images tree --output lineage.png",
        2,
        ("--output lineage.png: the picture is written as SVG",),
    ),
]
