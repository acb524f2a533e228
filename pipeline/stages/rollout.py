"""Moving a fleet onto a version without dropping a request: rolling waves and blue/green.

Both strategies are made of the fleet's steps (converge, gate, serve, retire): new members are
created and must pass the health gate before the front door sends them traffic; old members
leave the front door, finish their requests and only then are destroyed. If a new member fails
the gate (or the smoke test), the rollout rolls back: the wave's new members go, any old member
an earlier wave retired comes back, and the front door ends on the members it started with
(RolledBack). The fleet is never below its size with its old members already gone, except by
the `max_unavailable` the environment allows.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pipeline.config import Config, EnvironmentConfig
from pipeline.errors import DeployFailed, RolledBack, ToolError
from pipeline.files import write_text_atomic
from pipeline.registry import ImageVersion
from pipeline.registry.store import format_time, utcnow
from pipeline.stages.fleet import Fleet, GateFailed, Member

HISTORY = 20


@dataclass
class Moves:
    """What a rollout did so far: the members it made and the ones it retired."""

    created: list[Member] = field(default_factory=list)
    retired: list[Member] = field(default_factory=list)
    waves: int = 0


def waves(need: int, old: int, surge: int, unavailable: int) -> list[tuple[int, int, int]]:
    """The waves of a rolling update: (old leaving first, new created, old leaving after).

    `need` new members are wanted and `old` members are to be replaced; old members beyond the
    last wave leave at the end.
    """
    planned = []
    while need > 0:
        early = min(unavailable, old)
        old -= early
        count = min(need, surge + early) if old else need
        late = min(old, max(0, count - early))
        old -= late
        need -= count
        planned.append((early, count, late))
    return planned


def rolling(fleet: Fleet, version: ImageVersion, size: int, moves: Moves) -> None:
    """Replace the fleet in waves of at most `max_surge` extra and `max_unavailable` fewer.

    The old members a wave replaces leave the front door once its new ones serve, finish their
    requests, and are destroyed by the next wave's apply, before its new members boot (or by
    the last apply). Each apply after the first is planned while the previous gate runs.
    """
    rollout = fleet.environment.rollout
    keep, broken, old = sort_members(fleet, version, size)
    _retire_broken(fleet, broken)
    keep, old = _confirm_unserved(fleet, keep, old)
    need = size - len(keep)
    fleet.serve(keep + old)
    planned = waves(need, len(old), rollout.surge(size), rollout.unavailable(size))
    # Every wave's new members, named at once (the lowest indices no member uses).
    created = iter(fleet.new_members(version, need))
    batches = [list(itertools.islice(created, count)) for _, count, _ in planned]
    going: list[str] = []  # out of the front door and drained: the next apply destroys them
    for number, ((early_count, count, late_count), new) in enumerate(
        zip(planned, batches, strict=True), 1
    ):
        moves.waves += 1
        early, old = old[:early_count], old[early_count:]
        if early:
            fleet.log.info("wave %d: %d old instance(s) leave first", number, len(early))
            going += _leave(fleet, early, moves)
            fleet.converge(_without(fleet, going))
            going = []
        fleet.log.info(
            "wave %d: %d new instance(s) on %s, %d to go", number, count, version.version, need
        )
        late, old = old[:late_count], old[late_count:]
        wanted = {**_without(fleet, going), **{m.name: m for m in new}}
        going = []
        # What follows this wave's gate: the next wave's apply (or the last one).
        after = _without(fleet, late, wanted)
        if number < len(planned):
            next_early, _, _ = planned[number]
            if next_early:
                after = _without(fleet, old[:next_early], after)
            else:
                after |= {m.name: m for m in batches[number]}
        else:
            after = _without(fleet, old, after)
        _add(fleet, new, moves, wanted=wanted, then=after)
        keep += [m.name for m in new]
        fleet.serve(keep + old + late)
        going += _leave(fleet, late, moves)
        need -= count
    # Extra members (a smaller fleet, or more than its size on the version) leave last.
    going += _leave(fleet, old, moves)
    if going:
        fleet.converge(_without(fleet, going))
    fleet.serve(keep)


def blue_green(fleet: Fleet, version: ImageVersion, size: int, moves: Moves) -> list[str]:
    """A whole new fleet beside the old one, then the front door switches in one reload.

    Returns the old members that stay (out of the front door) for `keep_old` seconds.
    """
    keep, broken, old = sort_members(fleet, version, size)
    _retire_broken(fleet, broken)
    keep, old = _confirm_unserved(fleet, keep, old)
    if not old and len(keep) == size:
        fleet.serve(keep)
        return []
    moves.waves = 1
    if old:
        # A blue/green fleet is a whole new one, whatever of the old runs the same version.
        old, keep = old + keep, []
    fleet.serve(old)
    new = fleet.new_members(version, size - len(keep))
    fleet.log.info("green fleet: %d new instance(s) on %s", len(new), version.version)
    keep_old = fleet.environment.rollout.keep_old
    wanted = {**fleet.members, **{m.name: m for m in new}}
    _add(fleet, new, moves, wanted=wanted, then=None if keep_old else _without(fleet, old, wanted))
    fleet.serve(keep + [m.name for m in new])
    fleet.log.info("front door switched to the green fleet (%d instance(s))", size)
    if not old:
        return []
    # The old fleet's last requests finish before it is kept aside or destroyed.
    fleet.door.drain()
    if keep_old:
        return old
    moves.retired += [fleet.members[n] for n in old if n in fleet.members]
    fleet.converge(_without(fleet, old))
    return []


def roll_back(fleet: Fleet, moves: Moves, reason: str) -> RolledBack:
    """Undo a rollout whose new members failed: the fleet ends as it was, serving as before.

    The failing wave's members (never served) go first; old members that earlier waves
    retired come back and pass the gate; then the front door returns to the old members and
    the new ones that served are drained and destroyed.
    """
    fleet.log.error("rolling back: %s", reason)
    created = {m.name for m in moves.created}
    try:
        serving = fleet.serving()
        unserved = created - serving
        if unserved & set(fleet.members):
            fleet.converge({n: m for n, m in fleet.members.items() if n not in unserved})
        back = [m for m in moves.retired if m.name not in fleet.members]
        if back:
            fleet.log.info("bringing back %d retired instance(s)", len(back))
            fleet.converge({**fleet.members, **{m.name: m for m in back}})
            fleet.gate([m.name for m in back])
        fleet.serve([n for n in fleet.members if n not in created])
        fleet.retire(created & set(fleet.members))
    except Exception as exc:
        raise DeployFailed(f"{reason}; and the rollback failed too: {exc}") from exc
    return RolledBack(f"rolled back: {reason}")


def sort_members(
    fleet: Fleet, version: ImageVersion, size: int
) -> tuple[list[str], list[Member], list[str]]:
    """The members to keep (healthy, on the version), dead ones, and the others to replace.

    A member whose VM is gone serves nothing and goes at once; one that runs but fails its
    health check is replaced first, new ones before it goes, like any old member.
    """
    keep: list[str] = []
    dead: list[Member] = []
    failing: list[str] = []
    old: list[str] = []
    wanted = fleet.member(version, 0).prefix
    for name in sorted(fleet.members, key=_index_order):
        member = fleet.members[name]
        if not fleet.running(name):
            dead.append(member)
        elif not fleet.healthy(name):
            failing.append(name)
        elif member.prefix == wanted and len(keep) < size:
            keep.append(name)
        else:
            old.append(name)
    for name in failing:
        member = fleet.members[name]
        fleet.log.warning("drift: %s (%s) fails its health check", name, member.version)
    return keep, dead, failing + old


def _confirm_unserved(fleet: Fleet, keep: list[str], old: list[str]) -> tuple[list[str], list[str]]:
    """Members on the version that the front door does not serve (a rollout stopped in their
    gate left them) pass the gate before they serve; those that fail it are replaced."""
    serving = fleet.serving()
    unserved = [n for n in keep if n not in serving]
    if not unserved:
        return keep, old
    fleet.log.info("%d instance(s) not in the front door go through the gate first", len(unserved))
    try:
        fleet.gate(unserved)
    except GateFailed as exc:
        fleet.log.warning("replacing them: %s", exc)
        return [n for n in keep if n not in unserved], old + unserved
    return keep, old


def _retire_broken(fleet: Fleet, dead: list[Member]) -> None:
    for member in dead:
        fleet.log.warning("drift: %s (%s): its VM is not running", member.name, member.version)
    if dead:
        fleet.retire(m.name for m in dead)


def _add(
    fleet: Fleet,
    new: list[Member],
    moves: Moves,
    *,
    wanted: dict[str, Member],
    then: dict[str, Member] | None,
) -> None:
    """Create new members and put them through the gate; any failure is a GateFailed.

    `wanted`: the members Terraform holds after this step, the new ones among them; `then`:
    those of the step after the gate, planned while the gate runs.
    """
    moves.created += new
    try:
        fleet.converge(wanted)
    except (ToolError, DeployFailed) as exc:
        raise GateFailed(f"new instances did not come up: {exc}") from exc
    if then is not None and then != fleet.members:
        fleet.prepare(then)
    fleet.gate([m.name for m in new])


def _leave(fleet: Fleet, names: list[str], moves: Moves) -> list[str]:
    """Members out of the front door, their requests finished; returns them, to destroy."""
    going = fleet.leave(names)
    moves.retired += [fleet.members[n] for n in going]
    return going


def _without(
    fleet: Fleet, names: list[str], members: dict[str, Member] | None = None
) -> dict[str, Member]:
    """The members (default: the fleet's), but these."""
    return {
        n: m for n, m in (fleet.members if members is None else members).items() if n not in names
    }


def _index_order(name: str) -> tuple[str, int]:
    head, _, tail = name.rpartition("-")
    return (head, int(tail)) if tail.isdigit() else (name, 0)


# -- the environment's record -------------------------------------------------------------------


# Why a rollout that says running is not: the lock its run held was released by the kernel.
DIED = "its run died before the rollout finished (killed?)"


class Record:
    """What the pipeline remembers of an environment: its scaled size, a kept old fleet,
    and its recent rollouts with their outcome."""

    def __init__(self, config: Config, environment: EnvironmentConfig) -> None:
        self.environment = environment
        self.path = config.state_dir / "envs" / environment.name / "record.json"
        self.data: dict[str, Any] = {}
        if self.path.is_file():
            try:
                self.data = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                self.data = {}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, json.dumps(self.data, indent=2, sort_keys=True) + "\n")

    def size(self) -> int:
        """The size `pipeline scale` set, while pipeline.yml's count stays what it was then.

        A changed count ends the scaled size for good: it is forgotten here and with the next
        save, so going back to the old count later does not bring the old size back.
        """
        scaled = self.data.get("scale")
        if scaled and scaled.get("config") == self.environment.instances:
            return int(scaled["instances"])
        self.forget_scale()
        return self.environment.instances

    def scale(self, count: int) -> None:
        self.data["scale"] = {"instances": count, "config": self.environment.instances}

    def forget_scale(self) -> None:
        self.data.pop("scale", None)

    @property
    def kept(self) -> dict[str, Any] | None:
        return self.data.get("kept")

    def keep(self, names: list[str], seconds: int) -> None:
        until = datetime.now(UTC) + timedelta(seconds=seconds)
        self.data["kept"] = {"names": names, "until": format_time(until)}

    def kept_due(self, now: datetime | None = None) -> bool:
        kept = self.kept
        if not kept:
            return False
        return format_time(now or datetime.now(UTC)) >= str(kept["until"])

    def forget_kept(self) -> None:
        self.data.pop("kept", None)

    def start(self, run_id: str, strategy: str, version: str, running: list[str]) -> dict[str, Any]:
        entry = {
            "run": run_id,
            "started": utcnow(),
            "strategy": strategy,
            "to": version,
            "from": sorted(set(running)),
            "result": "running",
        }
        self.data["rollouts"] = ([entry, *list(self.data.get("rollouts", []))])[:HISTORY]
        self.save()
        return entry

    def finish(self, entry: dict[str, Any], result: str, reason: str | None = None) -> None:
        entry["result"] = result
        entry["finished"] = utcnow()
        if reason:
            entry["reason"] = reason
        self.save()

    @property
    def last(self) -> dict[str, Any] | None:
        rollouts = self.data.get("rollouts") or []
        return rollouts[0] if rollouts else None

    def last_seen(self, *, busy: bool) -> dict[str, Any] | None:
        """The last rollout as it stands: one that says running while no run holds the
        environment's lock was left so by a run that died."""
        last = self.last
        if last and last.get("result") == "running" and not busy:
            return {**last, "result": "dead", "reason": DIED}
        return last

    def end_dead(self) -> dict[str, Any] | None:
        """Record as dead a last rollout that still says running. Only for a run that holds
        the environment's lock: the run that started that rollout is then gone."""
        last = self.last
        if not last or last.get("result") != "running":
            return None
        self.finish(last, "dead", DIED)
        return last


__all__ = ["GateFailed", "Moves", "Record", "blue_green", "roll_back", "rolling", "waves"]
