"""The rollout strategies' order of steps, on a fleet that records what it is told to do.

The real steps (Terraform, HAProxy, VMs) are tested in test_frontdoor, test_terraform_local and
the end-to-end tests; here every combination of size, surge and unavailability is checked for
the promises a rollout makes: the front door never has fewer than size - max_unavailable
members of the fleet, Terraform never holds more than size + max_surge, a new member serves only
after its gate, an old one is destroyed only after it left the front door, and a failed gate
ends with the old fleet serving as before.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import EnvironmentConfig, HealthConfig, RolloutConfig
from pipeline.errors import Interrupted, RolledBack
from pipeline.stages import deploy, rollout
from pipeline.stages.fleet import GateFailed, Member


@dataclass
class Version:
    version: str
    build_id: str


class Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def _say(self, message: str, *args: Any) -> None:
        self.lines.append(message % args if args else message)

    info = warning = error = _say


@dataclass
class Door:
    fleet: RecordingFleet
    served: set[str] = field(default_factory=set)

    def running(self) -> bool:
        return True

    def servers(self) -> dict[str, str]:
        return {name: "UP" for name in self.served}

    def drain(self) -> None:
        self.fleet.steps.append(("drain", ()))


class RecordingFleet:
    """The Fleet's interface, with members that are names and checks on every step."""

    def __init__(
        self,
        rollout_config: RolloutConfig,
        size: int,
        fail_gate_on: str | None = None,
        interrupt_gate_on: str | None = None,
    ):
        self.environment = EnvironmentConfig(
            name="dev", image="web", channel="dev", instances=size, rollout=rollout_config,
            health=HealthConfig(),
        )  # fmt: skip
        self.log = Log()
        self.door = Door(self)
        self.members: dict[str, Member] = {}
        self.gated: set[str] = set()
        self.steps: list[tuple[str, tuple[str, ...]]] = []
        self.fail_gate_on = fail_gate_on
        self.interrupt_gate_on = interrupt_gate_on
        self.passed: set[str] = set()
        self.max_members = 0
        self.min_served: int | None = None
        self.created: list[str] = []
        self.destroyed: list[str] = []
        # The members a plan was made for ahead of time, and how often a converge used it.
        self.prepared: dict[str, Member] | None = None
        self.prepares = self.prepared_hits = 0

    def start(self, version: Version, size: int) -> None:
        for member in self.new_members(version, size):
            self.members[member.name] = member
            self.gated.add(member.name)
        self.door.served = set(self.members)

    def member(self, version: Any, index: int) -> Member:
        name = f"web-dev-{version.build_id}-abcdef-{index}"
        return Member(name, version.version, version.build_id, "disk", "k", "i", "")

    def new_members(self, version: Any, count: int) -> list[Member]:
        found, index = [], 0
        while len(found) < count:
            candidate = self.member(version, index)
            if candidate.name not in self.members:
                found.append(candidate)
            index += 1
        return found

    def healthy(self, name: str) -> bool:
        return name in self.members

    def running(self, name: str) -> bool:
        return name in self.members

    def prepare(self, members: dict[str, Member]) -> None:
        self.prepares += 1
        self.prepared = dict(members)

    def converge(self, members: dict[str, Member]) -> None:
        going = set(self.members) - set(members)
        assert not going & self.door.served, f"destroyed while serving: {going & self.door.served}"
        if self.prepared is not None:
            self.prepared_hits += self.prepared == members
        self.prepared = None
        self.steps.append(("converge", tuple(sorted(members))))
        self.created += [n for n in members if n not in self.members]
        self.destroyed += sorted(going)
        self.members = dict(members)
        self.max_members = max(self.max_members, len(self.members))

    def gate(self, names: list[str]) -> None:
        self.steps.append(("gate", tuple(names)))
        for name in names:
            if self.fail_gate_on and self.fail_gate_on in name:
                raise GateFailed(f"health check failed: {name}: HTTP 503")
            if self.interrupt_gate_on and self.interrupt_gate_on in name:
                raise Interrupted("interrupted during playbook smoke.yml; it was stopped")
            self.gated.add(name)
        self.passed.update(names)

    def refresh(self) -> None:
        pass

    def serve(self, names: Any) -> None:
        names = set(names)
        assert names <= set(self.members), f"serving what is not there: {names - set(self.members)}"
        ungated = names - self.gated
        assert not ungated, f"serving before the gate: {ungated}"
        self.steps.append(("serve", tuple(sorted(names))))
        self.door.served = names
        count = len(names)
        self.min_served = count if self.min_served is None else min(self.min_served, count)

    def serving(self) -> set[str]:
        return set(self.door.servers())

    def leave(self, names: Any) -> list[str]:
        going = [n for n in names if n in self.members]
        if set(going) & self.door.served:
            self.serve(self.door.served - set(going))
            self.door.drain()
        return going

    def retire(self, names: Any) -> None:
        going = self.leave(names)
        if going:
            self.converge({n: m for n, m in self.members.items() if n not in going})


OLD = Version("1.0.0", "b1")
NEW = Version("1.0.1", "b2")


def versions_served(fleet: RecordingFleet) -> set[str]:
    return {fleet.members[n].version for n in fleet.door.served}


@settings(max_examples=200, deadline=None)
@given(
    size=st.integers(1, 8),
    surge=st.integers(0, 8),
    unavailable=st.integers(0, 8),
)
def test_rolling_keeps_its_promises_for_any_size_and_limits(
    size: int, surge: int, unavailable: int
) -> None:
    if surge == 0 and unavailable == 0:
        return
    config = RolloutConfig(max_surge=surge, max_unavailable=unavailable)
    fleet = RecordingFleet(config, size)
    fleet.start(OLD, size)

    rollout.rolling(fleet, NEW, size, rollout.Moves())  # type: ignore[arg-type]

    assert len(fleet.members) == size
    assert {m.version for m in fleet.members.values()} == {"1.0.1"}
    assert fleet.door.served == set(fleet.members)
    assert fleet.max_members <= size + surge
    assert fleet.min_served is not None
    assert fleet.min_served >= size - min(unavailable, size)
    # Each plan made ahead during a gate is the one the next apply needed.
    assert fleet.prepares == fleet.prepared_hits


def test_waves_of_surge_2_on_4_instances_add_two_serve_them_then_retire_two() -> None:
    fleet = RecordingFleet(RolloutConfig(max_surge=2), 4)
    fleet.start(OLD, 4)
    moves = rollout.Moves()

    rollout.rolling(fleet, NEW, 4, moves)  # type: ignore[arg-type]

    assert moves.waves == 2
    kinds = [kind for kind, _ in fleet.steps]
    # serve (start) | converge+gate (2 new) serve, serve(old out) drain converge | again | serve
    # The first wave's two old members are destroyed by the second wave's apply, which
    # the provider runs deletes first; each apply after the first was planned during a gate.
    assert kinds == [
        "serve",
        "converge", "gate", "serve", "serve", "drain",
        "converge", "gate", "serve", "serve", "drain",
        "converge",
        "serve",
    ]  # fmt: skip
    converges = [names for kind, names in fleet.steps if kind == "converge"]
    assert [sum(n.startswith("web-dev-b1") for n in names) for names in converges] == [4, 2, 0]
    assert [len(names) for names in converges] == [6, 6, 4]
    assert fleet.prepared_hits == 2
    assert fleet.max_members == 6
    assert fleet.min_served == 4


def test_percentages_round_surge_up_and_unavailable_down() -> None:
    config = RolloutConfig(max_surge="25%", max_unavailable="25%")
    assert (config.surge(4), config.unavailable(4)) == (1, 1)
    assert (config.surge(3), config.unavailable(3)) == (1, 0)
    assert RolloutConfig().surge(5) == 5


def test_a_failed_gate_in_the_second_wave_brings_the_first_waves_old_members_back() -> None:
    fleet = RecordingFleet(RolloutConfig(max_surge=1), 2, fail_gate_on="b2-abcdef-1")
    fleet.start(OLD, 2)
    before = set(fleet.members)
    moves = rollout.Moves()

    with pytest.raises(GateFailed) as failed:
        rollout.rolling(fleet, NEW, 2, moves)  # type: ignore[arg-type]
    undone = rollout.roll_back(fleet, moves, str(failed.value))  # type: ignore[arg-type]

    assert isinstance(undone, RolledBack)
    assert "rolled back: health check failed" in str(undone)
    assert set(fleet.members) == before
    assert fleet.door.served == before
    assert versions_served(fleet) == {"1.0.0"}
    assert fleet.min_served is not None and fleet.min_served >= 1


def test_blue_green_switches_in_one_step_and_keeps_the_old_fleet_when_asked() -> None:
    fleet = RecordingFleet(RolloutConfig(strategy="blue_green", keep_old=600), 3)
    fleet.start(OLD, 3)
    old = set(fleet.members)

    kept = rollout.blue_green(fleet, NEW, 3, rollout.Moves())  # type: ignore[arg-type]

    assert set(kept) == old
    assert versions_served(fleet) == {"1.0.1"}
    serves = [names for kind, names in fleet.steps if kind == "serve"]
    # The old fleet serves until one switch puts the whole new one in its place.
    assert set(serves[-2]) == old
    assert {fleet.members[n].version for n in serves[-1]} == {"1.0.1"}
    assert len(serves[-1]) == 3
    assert fleet.max_members == 6


def test_blue_green_without_keep_destroys_the_old_fleet_after_the_switch() -> None:
    config = dataclasses.replace(RolloutConfig(strategy="blue_green"), keep_old=0)
    fleet = RecordingFleet(config, 2)
    fleet.start(OLD, 2)

    kept = rollout.blue_green(fleet, NEW, 2, rollout.Moves())  # type: ignore[arg-type]

    assert kept == []
    assert {m.version for m in fleet.members.values()} == {"1.0.1"}
    assert fleet.min_served == 2


def test_nothing_happens_to_a_fleet_already_on_the_version() -> None:
    fleet = RecordingFleet(RolloutConfig(), 2)
    fleet.start(NEW, 2)
    moves = rollout.Moves()

    rollout.rolling(fleet, NEW, 2, moves)  # type: ignore[arg-type]

    assert moves.waves == 0
    assert [kind for kind, _ in fleet.steps] == ["serve", "serve"]


def test_after_an_interruption_in_a_gate_only_members_that_passed_or_served_are_served() -> None:
    fleet = RecordingFleet(RolloutConfig(max_surge=2, max_unavailable=0), 4, interrupt_gate_on="-2")
    fleet.start(OLD, 4)

    with pytest.raises(Interrupted):
        rollout.rolling(fleet, NEW, 4, rollout.Moves())  # type: ignore[arg-type]
    deploy._serve_what_runs(fleet)  # type: ignore[arg-type]

    stopped = {n for n in fleet.members if n.startswith("web-dev-b2") and n.endswith("-2")}
    assert stopped and not stopped & fleet.door.served
    assert versions_served(fleet) == {"1.0.0", "1.0.1"}
    assert len(fleet.door.served) == 4


def test_a_scaled_size_ends_for_good_when_the_configured_count_changes(tmp_path: Any) -> None:
    def record(instances: int) -> rollout.Record:
        environment = EnvironmentConfig(name="dev", image="web", channel="dev", instances=instances)
        config = SimpleNamespace(state_dir=tmp_path)
        return rollout.Record(config, environment)  # type: ignore[arg-type]

    scaled = record(2)
    scaled.scale(0)
    scaled.save()
    assert record(2).size() == 0

    changed = record(1)
    assert changed.size() == 1
    changed.save()  # what a deploy with the new count does

    assert record(2).size() == 2


def test_a_rollout_left_running_by_a_dead_run_is_shown_and_then_recorded_dead(
    tmp_path: Any,
) -> None:
    environment = EnvironmentConfig(name="dev", image="web", channel="dev", instances=1)
    config = SimpleNamespace(state_dir=tmp_path)
    record = rollout.Record(config, environment)  # type: ignore[arg-type]
    record.start("b1", "rolling", "1.0.1", ["1.0.0"])  # and the run is killed

    record = rollout.Record(config, environment)  # type: ignore[arg-type]
    assert record.last_seen(busy=True)["result"] == "running"  # type: ignore[index]
    assert record.last_seen(busy=False)["result"] == "dead"  # type: ignore[index]
    assert record.last["result"] == "running"  # type: ignore[index]  # status changes nothing

    assert record.end_dead() is not None  # the next run, holding the lock
    assert record.end_dead() is None
    last = rollout.Record(config, environment).last  # type: ignore[arg-type]
    assert last is not None and last["result"] == "dead" and "finished" in last


def test_waves_from_an_empty_fleet_are_one_and_replacements_go_by_surge() -> None:
    assert rollout.waves(4, 0, 2, 0) == [(0, 4, 0)]
    assert rollout.waves(4, 4, 2, 0) == [(0, 2, 2), (0, 2, 2)]
    assert rollout.waves(4, 4, 1, 1) == [(1, 2, 1), (1, 2, 1)]
    assert rollout.waves(2, 0, 0, 1) == [(0, 2, 0)]


@pytest.mark.parametrize("strategy", ["rolling", "blue_green"])
def test_a_member_on_the_version_left_out_of_the_front_door_passes_the_gate_before_serving(
    strategy: str,
) -> None:
    fleet = RecordingFleet(RolloutConfig(strategy=strategy, max_surge=1), 2)
    fleet.start(OLD, 2)
    # An earlier rollout was interrupted in this member's gate: it runs, it is not served.
    [stopped] = fleet.new_members(NEW, 1)
    fleet.members[stopped.name] = stopped

    run = rollout.rolling if strategy == "rolling" else rollout.blue_green
    run(fleet, NEW, 2, rollout.Moves())  # type: ignore[arg-type]

    assert ("gate", (stopped.name,)) in fleet.steps
    assert fleet.steps.index(("gate", (stopped.name,))) < min(
        i
        for i, (step, names) in enumerate(fleet.steps)
        if step == "serve" and stopped.name in names
    )
    assert versions_served(fleet) == {"1.0.1"}
