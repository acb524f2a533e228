"""What makes the scheduler tick every minute: a systemd timer and service, or a crontab line.

Both call `pipeline -c <pipeline.yml> schedule tick` with the Python and the pipeline package
that wrote them, so the tick runs the same code as the command that installed it.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import pipeline
from pipeline.config import Config
from pipeline.errors import UsageError
from pipeline.files import write_text_atomic

SERVICE = "pipeline-schedule.service"
TIMER = "pipeline-schedule.timer"
CRONTAB = "pipeline-schedule.crontab"


def user_unit_dir() -> Path:
    """Where systemd looks for a user's own units."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "systemd" / "user"


def tick_command(config: Config) -> list[str]:
    return [sys.executable, "-m", "pipeline", "-c", str(config.path.resolve()), "schedule", "tick"]


def _package_root() -> str:
    # The folder holding the running `pipeline` package: the tick imports the same code.
    return str(Path(pipeline.__file__).resolve().parent.parent)


def _unit_value(text: str) -> str:
    # In a unit file "%" starts a specifier: a literal one is written "%%".
    return text.replace("%", "%%")


def _cron_value(text: str) -> str:
    # In a crontab line an unescaped "%" ends the command and starts its standard input.
    return text.replace("%", "\\%")


def _owner_mark(config: Config) -> str:
    """The part of the tick command that names this project (the same in every file)."""
    return f"-c {shlex.quote(str(config.path.resolve()))} schedule tick"


def service_text(config: Config) -> str:
    command = shlex.join(tick_command(config))
    pythonpath = f"PYTHONPATH={_package_root()}"
    return _unit_value(
        "[Unit]\n"
        f"Description=Scheduled image rebuilds of {config.root}\n"
        "\n"
        "[Service]\n"
        "Type=oneshot\n"
        f"WorkingDirectory={config.root}\n"
        f"Environment={shlex.quote(pythonpath)}\n"
        "Environment=PIPELINE_LOG_TIMES=1\n"
        f"ExecStart={command}\n"
    )


def timer_text(config: Config) -> str:
    return (
        "[Unit]\n"
        f"Description=Tick the image scheduler of {config.root} every minute\n"
        "\n"
        "[Timer]\n"
        "OnCalendar=*-*-* *:*:00\n"
        "AccuracySec=1s\n"
        "\n"
        "[Install]\n"
        "WantedBy=timers.target\n"
    )


def crontab_line(config: Config) -> str:
    log = shlex.quote(str(config.state_dir / "logs" / "schedule.log"))
    environment = f"PYTHONPATH={shlex.quote(_package_root())} PIPELINE_LOG_TIMES=1"
    command = shlex.join(tick_command(config))
    root = shlex.quote(str(config.root))
    return _cron_value(f"* * * * * cd {root} && {environment} {command} >> {log} 2>&1")


def install(config: Config, *, directory: Path | None, crontab: bool) -> list[Path]:
    """Write the files (never enabling anything); a file of another project is not replaced."""
    # The crontab line appends to this log, and cron opens it before the command runs.
    (config.state_dir / "logs").mkdir(parents=True, exist_ok=True)
    if crontab:
        if directory is None:
            return []
        files = {directory / CRONTAB: crontab_line(config) + "\n"}
    else:
        folder = directory if directory is not None else user_unit_dir()
        files = {folder / SERVICE: service_text(config), folder / TIMER: timer_text(config)}
    marks = (_unit_value(_owner_mark(config)), _cron_value(_owner_mark(config)))
    for path, text in files.items():
        if path.is_file() and path.read_text(encoding="utf-8") != text:
            old = path.read_text(encoding="utf-8")
            if not any(mark in old for mark in marks) and path.name != TIMER:
                message = f"{path} exists and is not this project's; move it away or give --dir"
                raise UsageError(message)

    for path, text in files.items():
        try:
            write_text_atomic(path, text)
        except OSError as exc:
            raise UsageError(f"cannot write {path}: {exc.strerror}") from None
    return list(files)
