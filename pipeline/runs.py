"""Run folders and build ids.

Every run gets a build id, used in every name it creates (image folder, VM names, logs), and a
folder under `<state_dir>/runs/<build id>/` with the exact commands run, their output, events as
JSON lines, and `status.json` (written to a temporary name and renamed, so it is never half
written).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import secrets
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline import reaper, secret
from pipeline.files import write_json_atomic
from pipeline.tools import process


def new_build_id() -> str:
    """A sortable, unique id: UTC time plus randomness, safe in file, VM and Terraform names."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dt%H%M%S")
    return f"{stamp}-{secrets.token_hex(3)}"


class Run:
    """One invocation's folder: commands, logs, events and final status."""

    def __init__(self, state_dir: Path, kind: str, subject: str, build_id: str | None = None):
        # What a killed run left running is stopped before another starts beside it.
        reaper.reap(state_dir)
        self.build_id = build_id or new_build_id()
        self.dir = state_dir / "runs" / self.build_id
        self.dir.mkdir(parents=True, exist_ok=False)
        self.kind = kind
        self.subject = subject
        self.started = time.time()
        self._step = 0
        self.log = logging.getLogger("pipeline")
        self._status: dict[str, Any] = {
            "build_id": self.build_id,
            "kind": kind,
            "subject": subject,
            "argv": sys.argv,
            "pid": os.getpid(),
            "pid_start": process.start_ticks(os.getpid()),
            "state": "running",
            "started_at": _now(),
        }
        write_json_atomic(self.dir / "status.json", self._status)

    def event(self, name: str, **data: Any) -> None:
        """Append one event to events.jsonl."""
        record = {"time": _now(), "event": name, **data}
        line = secret.redact(json.dumps(record, sort_keys=True, default=str))
        with (self.dir / "events.jsonl").open("a", encoding="utf-8") as out:
            out.write(line + "\n")

    def command(
        self, argv: Sequence[str], *, what: str, prefix: str = "", **kwargs: Any
    ) -> process.Completed:
        """Run a command with its output logged in this run's folder, and record it."""
        self._step += 1
        slug = "".join(c if c.isalnum() else "-" for c in what.lower()).strip("-")
        log = self.dir / "logs" / f"{self._step:02d}-{slug}.log"
        started = _now()
        logger = self.log

        def echo(line: str) -> None:
            logger.debug("%s%s", prefix, line)

        kwargs.setdefault("on_line", echo)
        try:
            done = process.run(argv, what=what, log=log, **kwargs)
        except Exception as exc:
            rc = getattr(exc, "returncode", None)
            self._record_command(argv, what, log, started, rc)
            raise
        self._record_command(argv, what, log, started, done.returncode, done.seconds)
        return done

    def finish(self, state: str, exit_code: int, message: str = "", **result: Any) -> None:
        """Write the final status of the run, and mask any secret left in the run folder."""
        self._status.update(
            state=state,
            exit_code=exit_code,
            message=message,
            finished_at=_now(),
            seconds=round(time.time() - self.started, 1),
            result=result,
        )
        self._status = json.loads(secret.redact(json.dumps(self._status, default=str)))
        write_json_atomic(self.dir / "status.json", self._status)
        secret.REDACTOR.scrub(self.dir)

    def _record_command(
        self,
        argv: Sequence[str],
        what: str,
        log: Path,
        started: str,
        rc: int | None,
        seconds: float | None = None,
    ) -> None:
        record = {
            "what": what,
            "argv": [str(a) for a in argv],
            "log": str(log.relative_to(self.dir)),
            "started_at": started,
            "returncode": rc,
            "seconds": None if seconds is None else round(seconds, 1),
        }
        with (self.dir / "commands.jsonl").open("a", encoding="utf-8") as out:
            out.write(secret.redact(json.dumps(record)) + "\n")


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
