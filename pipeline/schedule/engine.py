"""The scheduler: at each due slot of an image's schedule, run it once if a trigger fires.

A tick looks at every schedule at one moment (the clock is a parameter, so tests move it):
- the latest slot at or before now that was not handled yet is due; slots missed while the
  machine was off collapse into that one;
- a slot that comes while the image's previous run still goes is skipped and recorded, not
  queued;
- the triggers decide whether the slot does anything, each with its reason;
- the action (bake, bake + verify, or the whole run to an environment) goes through the
  library, and its result is recorded; after `pause_after` failures in a row the schedule
  pauses until `pipeline schedule resume`.

What each schedule did last is kept in `<state_dir>/schedules/<image>.json`, written whole to a
temporary name and renamed, changed only under a short lock so concurrent ticks never lose each
other's records. A run holds the lock `schedule-<image>` while it goes; a run whose process
died leaves the lock free (the kernel drops it) and is recorded as failed by the next tick.
With a PostgreSQL registry a run also holds an advisory lock on it, so that machines sharing
the registry do not run the same image's schedule at once.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from pipeline import cron, locks, secret
from pipeline.config import Config, ImageConfig, ScheduleConfig
from pipeline.errors import ConfigError, Interrupted, LockHeld, PipelineError
from pipeline.files import write_json_atomic
from pipeline.log import context
from pipeline.registry import Registry, redact
from pipeline.schedule import triggers as triggers_mod
from pipeline.targets.local import baseimage, basepackages

# An action: (image, its schedule, the pipeline.yml path) -> one line saying what it did.
Action = Callable[[str, ScheduleConfig, Path], str]
# Missed slots are counted up to this many for the log line; beyond it "at least".
MISSED_COUNT_LIMIT = 1000
STATE_LOCK_WAIT = 30.0


@dataclass
class State:
    """What a schedule did last."""

    last_slot: str | None = None
    # ok, failed, nothing (no trigger fired), skipped, interrupted, or running.
    last_result: str | None = None
    last_reason: str = ""
    # When the last result was recorded (by the scheduler's clock).
    last_at: str | None = None
    failures: int = 0
    paused: bool = False


@dataclass(frozen=True)
class Outcome:
    """What one tick did for one image."""

    image: str
    slot: str | None
    # due-later, ok, failed, nothing, skipped, paused
    result: str
    reason: str
    missed: int = 0


def perform(image: str, schedule: ScheduleConfig, config_path: Path) -> str:
    """The real action: the library's bake, bake then verify, or run to an environment."""
    from pipeline import api

    if schedule.do == "run":
        assert schedule.env is not None
        result = api.run(image, schedule.env, config_path=config_path)
        how = "baked" if result.baked else "unchanged"
        return f"ran {image} {result.version} ({how}) to environment {schedule.env}"
    baked = api.bake(image, config_path=config_path)
    version = baked.version
    what = f"{version.label} {'baked' if baked.baked else 'unchanged, nothing baked'}"
    if schedule.do == "verify" and version.state != "verified":
        verified = api.verify(image, version.version, config_path=config_path)
        what += f", {verified.state}"
    return what


def tick(
    config: Config,
    registry: Registry,
    *,
    now: dt.datetime,
    action: Action = perform,
    resolve: triggers_mod.Resolver = basepackages.resolve,
) -> list[Outcome]:
    """Handle the due slot of every schedule, one image after the other."""
    return [
        _tick_image(config, registry, image, now=now, action=action, resolve=resolve)
        for image in config.images.values()
        if image.schedule is not None
    ]


def _tick_image(
    config: Config,
    registry: Registry,
    image: ImageConfig,
    *,
    now: dt.datetime,
    action: Action,
    resolve: triggers_mod.Resolver,
) -> Outcome:
    assert image.schedule is not None
    schedule = image.schedule
    log = context(image.name, "schedule")
    expression = cron.parse(schedule.cron)
    state_dir = config.state_dir
    _recover_dead_run(state_dir, image.name, now, schedule.pause_after)

    # Which slot is due, and how many went by unhandled.
    state = load(state_dir, image.name)
    due = expression.latest_at_or_before(now)
    last = _parse_time(state.last_slot) if state.last_slot else None
    if last is not None and due <= last:
        upcoming = format_slot(expression.next_after(now))
        return Outcome(image.name, None, "due-later", f"next slot {upcoming}")
    slot = format_slot(due)
    missed = _count_slots(expression, last, due)
    if missed > 1:
        more = "at least " if missed >= MISSED_COUNT_LIMIT else ""
        log.info(
            "%s%d slot(s) after %s went by unhandled (the machine was off, or a run took longer);"
            " only the latest, %s, runs",
            more,
            missed - 1,
            state.last_slot,
            slot,
        )

    if state.paused:
        reason = f"paused after {state.failures} failures in a row; slot {slot} not run"
        log.warning("%s (resume with `pipeline schedule resume %s`)", reason, image.name)
        _update(state_dir, image.name, lambda s: setattr(s, "last_slot", slot))
        return Outcome(image.name, slot, "paused", reason, missed)

    holder = locks.holder(state_dir, f"schedule-{image.name}") or locks.holder(
        state_dir, f"image-{image.name}"
    )
    if holder is not None:
        return _skipped(state_dir, image.name, slot, now, holder, missed)

    try:
        with (
            locks.hold(state_dir, f"schedule-{image.name}", build_id=f"schedule {slot}"),
            across_machines(registry, image.name),
        ):
            if not _claim(state_dir, image.name, slot, now):
                return Outcome(image.name, None, "due-later", f"slot {slot} handled by another")
            log.info("slot %s is due (%s)", slot, schedule.cron)
            return _run_slot(config, registry, image, slot, missed, now, action, resolve)
    except LockHeld as exc:
        return _skipped(state_dir, image.name, slot, now, str(exc), missed)


@contextlib.contextmanager
def across_machines(registry: Registry, image: str) -> Iterator[None]:
    """With a PostgreSQL registry, one scheduled run of `image` at a time among all machines
    sharing it: a session advisory lock, which the server drops if our connection dies."""
    if registry.backend.name != "postgresql":
        yield
        return
    digest = hashlib.sha256(f"pipeline schedule {image}".encode()).digest()
    key = int.from_bytes(digest[:7], "big")  # a positive bigint
    rows = registry.backend.query("SELECT pg_try_advisory_lock(?) AS held", (key,))
    if not rows[0]["held"]:
        message = (
            f"another machine's scheduler runs {image} (advisory lock on the registry"
            f" {redact(registry.url)})"
        )
        raise LockHeld(message)
    try:
        yield
    finally:
        registry.backend.query("SELECT pg_advisory_unlock(?)", (key,))


def _run_slot(
    config: Config,
    registry: Registry,
    image: ImageConfig,
    slot: str,
    missed: int,
    now: dt.datetime,
    action: Action,
    resolve: triggers_mod.Resolver,
) -> Outcome:
    """Under the image's schedule lock: evaluate the triggers, act, record the result."""
    assert image.schedule is not None
    schedule = image.schedule
    log = context(image.name, "schedule")
    try:
        verdicts = triggers_mod.evaluate(config, image, registry, now=now, resolve=resolve)
        fired = [v for v in verdicts if v.fired]
        if not fired:
            reason = "no trigger fired: " + "; ".join(f"{v.trigger}: {v.reason}" for v in verdicts)
            log.info("%s; nothing done", reason)
            _record(config.state_dir, image.name, "nothing", reason, now)
            return Outcome(image.name, slot, "nothing", reason, missed)
        for verdict in fired:
            log.info("trigger %s fired: %s", verdict.trigger, verdict.reason)
            if verdict.packages is not None:
                _refresh_base(config, image, verdict.packages)

        log.info("%s %s", schedule.do, image.name + (f" to {schedule.env}" if schedule.env else ""))
        done = action(image.name, schedule, config.path)
    except LockHeld as exc:
        # The image or its environment was taken between our look and the action's.
        reason = f"skipped: {exc}"
        log.info("%s", reason)
        _record(config.state_dir, image.name, "skipped", reason, now)
        return Outcome(image.name, slot, "skipped", reason, missed)
    except (KeyboardInterrupt, Interrupted) as exc:
        # Stopped by the user or a service manager: not a failure of the image, and the
        # scheduler stops too (an Interrupted is a PipelineError, so this comes first).
        reason = str(exc) if isinstance(exc, Interrupted) else "interrupted (Ctrl-C or SIGTERM)"
        _record(config.state_dir, image.name, "interrupted", reason, now)
        raise
    except PipelineError as exc:
        return _failed(config.state_dir, image.name, schedule, str(exc), now, missed, slot)
    except Exception as exc:
        _failed(config.state_dir, image.name, schedule, f"internal error: {exc!r}", now, 0, slot)
        raise

    reason = "; ".join(v.reason for v in fired) + f" -> {done}"
    log.info("done: %s", done)
    _record(config.state_dir, image.name, "ok", reason, now, failures=0)
    return Outcome(image.name, slot, "ok", reason, missed)


def _refresh_base(config: Config, image: ImageConfig, packages: dict[str, str]) -> None:
    """Make the next bake build the base anew: a cached one has the old packages."""
    spec = baseimage.BaseSpec(suite=image.base.suite, packages=image.base.packages)
    token = baseimage.request_refresh(config.state_dir, spec, packages)
    context(image.name, "schedule").info(
        "base %s will be built anew from the archive's packages (refresh %s)",
        image.base.name,
        token,
    )


def _failed(
    state_dir: Path,
    image: str,
    schedule: ScheduleConfig,
    message: str,
    now: dt.datetime,
    missed: int,
    slot: str,
) -> Outcome:
    log = context(image, "schedule")
    first_line = message.strip().splitlines()[0] if message.strip() else "failed"
    recorded = _update(
        state_dir, image, lambda s: _count_failure(s, first_line, now, schedule.pause_after)
    )
    log.error("failed (%d in a row): %s", recorded.failures, first_line)
    if recorded.paused:
        log.warning(
            "paused after %d failures in a row; resume with `pipeline schedule resume %s`",
            recorded.failures,
            image,
        )
    return Outcome(image, slot, "failed", first_line, missed)


def _count_failure(state: State, reason: str, now: dt.datetime, pause_after: int) -> None:
    state.last_result, state.last_reason, state.last_at = "failed", reason, format_slot(now)
    state.failures += 1
    state.paused = state.paused or state.failures >= pause_after


def _skipped(
    state_dir: Path, image: str, slot: str, now: dt.datetime, holder: str, missed: int
) -> Outcome:
    """A slot that came while the previous run still goes: recorded as handled, not queued."""
    reason = f"skipped: previous run still going ({holder})"

    def skip(state: State) -> None:
        if state.last_slot is not None and _parse_time(state.last_slot) >= _parse_time(slot):
            return  # another tick took this very slot; its record stands
        state.last_slot, state.last_result = slot, "skipped"
        state.last_reason, state.last_at = reason, format_slot(now)

    _update(state_dir, image, skip)
    context(image, "schedule").info("slot %s %s", slot, reason)
    return Outcome(image, slot, "skipped", reason, missed)


def _claim(state_dir: Path, image: str, slot: str, now: dt.datetime) -> bool:
    """Mark `slot` as being run; False if another tick already handled it."""
    claimed = False

    def claim(state: State) -> None:
        nonlocal claimed
        if state.last_slot is not None and _parse_time(state.last_slot) >= _parse_time(slot):
            return
        state.last_slot, state.last_result = slot, "running"
        state.last_reason, state.last_at = f"started at {format_slot(now)}", format_slot(now)
        claimed = True

    _update(state_dir, image, claim)
    return claimed


def _recover_dead_run(state_dir: Path, image: str, now: dt.datetime, pause_after: int) -> None:
    """A run recorded as going whose process died (its lock is free) counts as a failure."""
    if load(state_dir, image).last_result != "running":
        return
    if locks.holder(state_dir, f"schedule-{image}") is not None:
        return

    def recover(state: State) -> None:
        if state.last_result == "running":
            reason = f"the run of slot {state.last_slot} died before it recorded a result"
            _count_failure(state, reason, now, pause_after)

    recovered = _update(state_dir, image, recover)
    context(image, "schedule").warning("%s", recovered.last_reason)


def _record(
    state_dir: Path,
    image: str,
    result: str,
    reason: str,
    now: dt.datetime,
    *,
    failures: int | None = None,
) -> State:
    def change(state: State) -> None:
        masked = secret.redact(reason)
        state.last_result, state.last_reason, state.last_at = result, masked, format_slot(now)
        if failures is not None:
            state.failures = failures

    return _update(state_dir, image, change)


def resume(state_dir: Path, image: str) -> State:
    """Unpause a schedule and forget its failures; its next due slot runs."""

    def unpause(state: State) -> None:
        state.paused = False
        state.failures = 0

    return _update(state_dir, image, unpause)


def state_path(state_dir: Path, image: str) -> Path:
    return state_dir / "schedules" / f"{image}.json"


def load(state_dir: Path, image: str) -> State:
    """The schedule's recorded state (an empty one if it never ran)."""
    path = state_path(state_dir, image)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return State()
    except (OSError, ValueError) as exc:
        raise ConfigError(
            str(path), None, f"unreadable schedule state ({exc}); delete it"
        ) from None
    known = {f.name for f in fields(State)}
    if not isinstance(data, dict) or not set(data) <= known:
        raise ConfigError(str(path), None, "not a schedule state; delete it to start afresh")
    return State(**data)


def _update(state_dir: Path, image: str, change: Callable[[State], Any]) -> State:
    """Read, change and write a schedule's state under its own short lock."""
    with locks.hold(
        state_dir, f"schedule-state-{image}", build_id="schedule", wait=STATE_LOCK_WAIT
    ):
        state = load(state_dir, image)
        change(state)
        write_json_atomic(state_path(state_dir, image), asdict(state))
        return state


def _count_slots(expression: cron.Cron, last: dt.datetime | None, due: dt.datetime) -> int:
    """Slots after `last` up to `due` (1 when nothing ran before)."""
    if last is None:
        return 1
    count = 0
    at = last
    while count < MISSED_COUNT_LIMIT:
        at = expression.next_after(at)
        if at > due:
            break
        count += 1
    return count


def describe(config: Config, *, now: dt.datetime) -> list[dict[str, Any]]:
    """Each schedule: its expression, action, triggers, next slot and what it did last."""
    described = []
    for image in config.images.values():
        if image.schedule is None:
            continue
        schedule = image.schedule
        state = load(config.state_dir, image.name)
        holder = locks.holder(config.state_dir, f"schedule-{image.name}")
        result = state.last_result
        if result == "running" and holder is None:
            result = "died"  # the next tick records it as failed
        triggers = [
            f"max_age_days: {schedule.max_age_days}" if name == "max_age_days" else name
            for name in schedule.triggers
        ]
        described.append(
            {
                "image": image.name,
                "cron": schedule.cron,
                "do": schedule.do,
                "env": schedule.env,
                "triggers": triggers,
                "next_slot": format_slot(cron.parse(schedule.cron).next_after(now)),
                "last_slot": state.last_slot,
                "last_result": result,
                "last_reason": state.last_reason,
                "last_at": state.last_at,
                "failures": state.failures,
                "pause_after": schedule.pause_after,
                "paused": state.paused,
                "running": holder,
            }
        )
    return described


def next_wakeup(config: Config, *, now: dt.datetime) -> dt.datetime | None:
    """The earliest next slot of any schedule; None when no image has one."""
    slots = [
        cron.parse(image.schedule.cron).next_after(now)
        for image in config.images.values()
        if image.schedule is not None
    ]
    return min(slots) if slots else None


def format_slot(moment: dt.datetime) -> str:
    """A slot or moment as shown and stored: UTC, to the second, with a Z."""
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
