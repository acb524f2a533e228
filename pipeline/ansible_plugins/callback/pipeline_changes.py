"""Ansible callback: write every task that reported a change to the file PIPELINE_CHANGES_FILE.

The verify stage runs the image's roles against a fresh boot of the candidate image with this
callback enabled; any change at all means the image is not what its roles describe.
"""

from __future__ import annotations

import json
import os

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = """
    name: pipeline_changes
    type: aggregate
    short_description: records changed tasks for the image pipeline's verify stage
    description: Writes the tasks that reported a change, per host, as JSON.
    requirements:
      - PIPELINE_CHANGES_FILE set to the file to write
"""


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "pipeline_changes"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self) -> None:
        super().__init__()
        self.changed: list[dict[str, str]] = []

    def v2_runner_on_ok(self, result) -> None:  # type: ignore[no-untyped-def]
        if result._result.get("changed"):
            self.changed.append({"host": result._host.get_name(), "task": result._task.get_name()})

    def v2_playbook_on_stats(self, stats) -> None:  # type: ignore[no-untyped-def]
        path = os.environ.get("PIPELINE_CHANGES_FILE")
        if not path:
            return
        hosts = {host: stats.summarize(host) for host in sorted(stats.processed)}
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as out:
            json.dump({"changed": self.changed, "hosts": hosts}, out, indent=2)
        os.replace(tmp, path)
