"""Ansible callback: write what the verify stage checks of a playbook run to PIPELINE_CHANGES_FILE.

The verify stage runs the image's roles against a fresh boot of the candidate image, and then its
checks, with this callback enabled. It writes every task that reported a change (any change at
all in the converge means the image is not what its roles describe) and every play that matched
no host, which Ansible skips while still ending the run with 0: a converge or a verify of such a
play would pass without having checked anything.
"""

from __future__ import annotations

import json
import os
from typing import Any

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = """
    name: pipeline_changes
    type: aggregate
    short_description: records changed tasks and plays that matched no host, for the image pipeline
    description: Writes the tasks that reported a change, per host, and the plays that matched no
      host, as JSON.
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
        self.unmatched: list[dict[str, str]] = []
        self.playbook = ""
        self.play: Any = None

    def v2_playbook_on_start(self, playbook) -> None:  # type: ignore[no-untyped-def]
        self.playbook = os.path.basename(getattr(playbook, "_file_name", "") or "")

    def v2_playbook_on_play_start(self, play) -> None:  # type: ignore[no-untyped-def]
        self.play = play

    def v2_playbook_on_no_hosts_matched(self) -> None:
        hosts = getattr(self.play, "hosts", "")
        pattern = ",".join(hosts) if isinstance(hosts, list) else str(hosts)
        name = self.play.get_name().strip() if self.play is not None else ""
        self.unmatched.append({"playbook": self.playbook, "play": name, "hosts": pattern})

    def v2_runner_on_ok(self, result) -> None:  # type: ignore[no-untyped-def]
        if result._result.get("changed"):
            self.changed.append({"host": result._host.get_name(), "task": result._task.get_name()})

    def v2_playbook_on_stats(self, stats) -> None:  # type: ignore[no-untyped-def]
        path = os.environ.get("PIPELINE_CHANGES_FILE")
        if not path:
            return
        hosts = {host: stats.summarize(host) for host in sorted(stats.processed)}
        report = {"changed": self.changed, "unmatched": self.unmatched, "hosts": hosts}
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as out:
            json.dump(report, out, indent=2)
        os.replace(tmp, path)
