"""Inventory plugin pipeline.images.fleet: an environment's running instances as hosts."""

from __future__ import annotations

DOCUMENTATION = r"""
name: fleet
short_description: The running instances of one image-pipeline environment
description:
  - "Lists the environment's instances that Terraform's state holds and whose VM runs, as
    C(pipeline inventory ENV) does (both call the library's C(api.inventory)), with
    ansible_host, ansible_port, ansible_user, ansible_ssh_private_key_file and the instance's
    version, build id and URL."
  - "The source file is named fleet.yml (or ends in .fleet.yml). Ansible's Python must import
    the C(pipeline) package: run it from the project's venv, or set PYTHONPATH."
options:
  plugin:
    description: The name of this plugin.
    required: true
    choices: [pipeline.images.fleet]
  env:
    description: The environment whose instances are listed.
    required: true
    type: str
  project:
    description:
      - pipeline.yml, or its folder; a relative path is taken from the source file's folder.
      - By default the nearest pipeline.yml in the source file's folder or one above it.
    type: path
"""

from pathlib import Path
from typing import Any

from ansible.errors import AnsibleParserError
from ansible.plugins.inventory import BaseInventoryPlugin


def find_project(source: Path, project: str | None) -> Path:
    """The pipeline.yml a source file names, or the nearest one at or above its folder."""
    if project:
        path = Path(project).expanduser()
        if not path.is_absolute():
            path = source.parent / path
        return path / "pipeline.yml" if path.is_dir() else path
    for folder in source.resolve().parents:
        if (folder / "pipeline.yml").is_file():
            return folder / "pipeline.yml"
    raise AnsibleParserError(f"{source}: no pipeline.yml in its folder or above; set `project:`")


class InventoryModule(BaseInventoryPlugin):
    """Hosts and groups from `api.inventory(env)`, the same answer as the CLI's."""

    NAME = "pipeline.images.fleet"

    def verify_file(self, path: str) -> bool:
        name = Path(path).name
        wanted = name in ("fleet.yml", "fleet.yaml") or name.endswith((".fleet.yml", ".fleet.yaml"))
        return wanted and super().verify_file(path)

    def parse(self, inventory: Any, loader: Any, path: str, cache: bool = True) -> None:
        super().parse(inventory, loader, path, cache)
        self._read_config_data(path)
        try:
            from pipeline import api
            from pipeline.errors import PipelineError
        except ImportError as exc:
            message = f"{path}: cannot import the pipeline library ({exc}); set PYTHONPATH"
            raise AnsibleParserError(message) from exc

        config_path = find_project(Path(path), self.get_option("project"))
        try:
            listed = api.inventory(self.get_option("env"), config_path=config_path)
        except PipelineError as exc:
            raise AnsibleParserError(f"{path}: {exc}") from exc

        hostvars = listed["_meta"]["hostvars"]
        for group in listed["all"]["children"]:
            self.inventory.add_group(group)
            for host in listed.get(group, {}).get("hosts", []):
                self.inventory.add_host(host, group=group)
                for key, value in hostvars.get(host, {}).items():
                    self.inventory.set_variable(host, key, value)
