"""The fleet guard in the control core: the budget arithmetic, the permit rules by example, and a
hypothesis state machine of a whole group of agents against a model of etcd."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from rules.model import Mode
from watcher.core import control
from watcher.core.control import (
    Applied,
    AskPermit,
    FleetChanged,
    FleetReachable,
    FleetUnreachable,
    Health,
    Log,
    Params,
    PermitAnswer,
    Probed,
    Register,
    SetFirewall,
    State,
    Tick,
    desired_mode,
    initial,
    step,
)
from watcher.core.fleet import (
    FleetView,
    Guard,
    Member,
    budget_left,
    grant,
    is_proven,
    min_open_count,
    witnesses,
)
from watcher.core.triggers import Evidence, Source, Trigger

MS = 1_000_000
T0 = 10_000 * MS
HINT = Trigger(Source.TIMER, "safety-net", T0)
DEATH = Trigger(Source.PIDFD, "exit pid 7", T0, Evidence.DEATH)
P = Params(rise=1, fall=1, rise_interval_ns=0)


def m(name: str, mode: str = "open") -> Member:
    """A registered member."""
    return Member(name, mode, "health", 0.0)


@pytest.mark.parametrize(("min_open", "size", "want"), [
    ("50%", 4, 2), ("50%", 5, 3), ("0%", 4, 0), ("100%", 3, 3), ("34%", 3, 2), (2, 4, 2), (9, 4, 4),
    (0, 1, 0), ("50%", 1, 1),
])
def test_min_open_count(min_open: int | str, size: int, want: int) -> None:
    """A count stays (capped at size); a percentage of size rounds up."""
    assert min_open_count(min_open, size) == want


def test_proven_checks() -> None:
    """Process gone, no PID, no listener prove death; connect, TLS, HTTP failures are suspect."""
    assert all(is_proven(c, False) for c in ("pid_file", "process", "process_name", "listen"))
    assert not any(is_proven(c, False) for c in ("connect", "tls", "http"))
    assert is_proven("http", True)


def test_grant_counts_other_open_members_and_unregistered_as_not_open() -> None:
    """A permit needs min_open *other* open members; missing members count as not open."""
    ms = [m("a"), m("b"), m("c", "block"), m("d")]
    v = grant(ms, "d", 4, 2)
    assert v.granted and v.open_count == 2 and v.not_open == ("c",)
    v = grant(ms[:3], "b", 4, 2)
    assert not v.granted and v.open_count == 1 and v.not_open == ("c", "1 unregistered")
    assert budget_left(ms, 4, 2) == 1
    assert budget_left([m("a", "drain")], 4, 2) == 0


def guarded(unreachable: str = "block") -> State:
    """An agent of a group of four (min_open 2), reachable, UP and open, registered."""
    s = initial(P, guard=Guard.new(4, "50%", unreachable, "me"))
    s, _ = run(s, FleetReachable())
    s, _ = run(s, Probed(HINT, True, "connect", "fine"))
    assert s.applied is Mode.OPEN and s.guard is not None and s.guard.registered == ("open", "health")
    return s


def run(s: State, inp: control.Input, now: int = T0) -> tuple[State, list[control.Action]]:
    """Feed ``inp`` and answer every firewall change at once with success; all actions."""
    out: list[control.Action] = []
    pending: deque[control.Input] = deque([inp])
    while pending:
        s, acts = step(s, pending.popleft(), now)
        out += acts
        pending += [Applied(("ipv4",), 1, now, MS) for a in acts if isinstance(a, SetFirewall)]
    return s, out


def fail(check: str = "http", trig: Trigger = HINT) -> Probed:
    """A failed probe of ``check``."""
    return Probed(trig, False, check, f"{check}: failed", check == "process", MS)


def test_proven_down_blocks_at_once_and_never_asks() -> None:
    """A proven DOWN blocks in the same step, with no AskPermit; the key follows the kernel."""
    _, acts = run(guarded(), fail("process", DEATH))
    assert [a.mode for a in acts if isinstance(a, SetFirewall)] == [Mode.BLOCK]
    assert not any(isinstance(a, AskPermit) for a in acts)
    assert [a.mode for a in acts if isinstance(a, Register)] == [Mode.BLOCK]


def test_suspect_down_asks_and_blocks_only_when_granted() -> None:
    """A suspect DOWN keeps the port open and asks; a grant blocks at once."""
    s, acts = run(guarded(), fail())
    assert s.health is Health.DOWN and desired_mode(s) is Mode.OPEN
    assert [type(a) for a in acts if isinstance(a, AskPermit | SetFirewall)] == [AskPermit]
    s, acts = run(s, PermitAnswer(True, ("x",), 2))
    assert s.applied is Mode.BLOCK and "fleet-guard-granted" in [a.event for a in acts if isinstance(a, Log)]
    assert not any(isinstance(a, Register) for a in acts)  # the transaction wrote the key already


def test_refused_stays_open_logs_once_and_asks_again_on_change_and_tick() -> None:
    """Refused: open, one warning naming the members, a new ask on each fleet change and tick."""
    s, _ = run(guarded(), fail())
    s, acts = run(s, PermitAnswer(False, ("a", "b"), 1))
    assert s.applied is Mode.OPEN
    warn = [a for a in acts if isinstance(a, Log) and a.event == "fleet-guard-refused"]
    assert len(warn) == 1 and warn[0].level == "warning" and warn[0].fields["not_open"] == ["a", "b"]
    assert not any(isinstance(a, AskPermit) for a in acts)
    s, acts = run(s, FleetChanged(FleetView((m("a"),))))
    assert any(isinstance(a, AskPermit) for a in acts)
    s, acts = run(s, PermitAnswer(False, ("a", "b"), 1))
    assert not any(isinstance(a, Log) and a.event == "fleet-guard-refused" for a in acts)
    s, acts = run(s, Tick(HINT))
    assert any(isinstance(a, AskPermit) for a in acts)
    s, acts = run(s, PermitAnswer(True, ("b",), 2))
    assert s.applied is Mode.BLOCK


def test_unreachable_block_policy_decides_alone_and_open_policy_stays_open() -> None:
    """etcd away: a suspect DOWN blocks as a lone agent (block) or stays open (open); the
    outage alone changes no rule of a healthy agent, and logs once."""
    for policy, want in (("block", Mode.BLOCK), ("open", Mode.OPEN)):
        s, acts = run(guarded(policy), FleetUnreachable("all endpoints down"))
        assert not any(isinstance(a, SetFirewall) for a in acts)
        assert [a.level for a in acts if isinstance(a, Log)] == ["warning"]
        s, acts = run(s, FleetUnreachable("still down"))
        assert not any(isinstance(a, Log) for a in acts)
        s, _ = run(s, fail())
        assert s.applied is want


def test_a_refusal_from_before_an_outage_stands_through_it() -> None:
    """Refused, then etcd goes away: the port stays open (the outage changes no rule), and the
    permit is asked again once etcd is back."""
    s, _ = run(guarded("block"), fail())
    s, _ = run(s, PermitAnswer(False, ("a", "b"), 1))
    s, acts = run(s, FleetUnreachable("down"))
    assert s.applied is Mode.OPEN and not any(isinstance(a, SetFirewall) for a in acts)
    s, acts = run(s, Tick(HINT))
    assert s.applied is Mode.OPEN and not any(isinstance(a, AskPermit) for a in acts)
    s, acts = run(s, FleetReachable())
    assert any(isinstance(a, AskPermit) for a in acts)


def test_reachable_again_reregisters_and_rechecks_a_lone_block_holding_it_meanwhile() -> None:
    """Back from an outage: fleet-reachable, the kernel's mode registered anew, a block taken
    alone is held while the permit is asked, and opened if refused."""
    s, _ = run(guarded(), FleetUnreachable("down"))
    s, _ = run(s, fail())
    assert s.applied is Mode.BLOCK
    s, acts = run(s, FleetReachable())
    assert "fleet-reachable" in [a.event for a in acts if isinstance(a, Log)]
    assert [a.mode for a in acts if isinstance(a, Register)] == [Mode.BLOCK]
    assert any(isinstance(a, AskPermit) for a in acts) and s.applied is Mode.BLOCK
    s, _ = run(s, PermitAnswer(False, ("a", "b"), 1))
    assert s.applied is Mode.OPEN


def test_a_permit_held_block_survives_an_outage_and_recovery_releases_it() -> None:
    """An outage never lifts a permitted block; UP opens and registers open."""
    s, _ = run(guarded("open"), fail())
    s, _ = run(s, PermitAnswer(True, (), 3))
    s, acts = run(s, FleetUnreachable("down"))
    assert s.applied is Mode.BLOCK and not any(isinstance(a, SetFirewall) for a in acts)
    s, _ = run(s, FleetReachable())
    s, acts = run(s, Probed(HINT, True, "connect", "fine"))
    assert s.applied is Mode.OPEN and s.guard is not None and not s.guard.permit
    assert [(a.mode, a.cause) for a in acts if isinstance(a, Register)] == [(Mode.OPEN, "health")]


def test_admin_block_registers_admin_with_its_slot_and_unblock_releases_it() -> None:
    """An admin block registers cause admin holding the slot; lifting it registers health."""
    s, acts = run(guarded(), control.AdminRead(HINT, control.AdminBlock(True, "upgrade")))
    assert [(a.mode, a.cause, a.slot) for a in acts if isinstance(a, Register)] == [
        (Mode.DRAIN, "admin", True)]
    s, acts = run(s, control.AdminRead(HINT, None))
    assert [(a.mode, a.cause, a.slot) for a in acts if isinstance(a, Register)] == [
        (Mode.OPEN, "health", False)]


def test_without_a_guard_nothing_fleet_happens() -> None:
    """No [fleet]: a suspect DOWN blocks at once and no fleet action is ever returned."""
    s = initial(P)
    s, _ = run(s, Probed(HINT, True, "connect", "fine"))
    s, acts = run(s, fail())
    assert s.applied is Mode.BLOCK
    assert not any(isinstance(a, AskPermit | Register) for a in acts)


# ------------------------------------------------------------------------ the group, as a machine

@dataclass
class Agent:
    """One simulated agent: its core state and its queue of answers to deliver."""

    name: str
    state: State
    inbox: deque[control.Input] = field(default_factory=deque)
    ops: deque[control.Action] = field(default_factory=deque)  # etcd requests not yet served
    connected: bool = True


class Fleet(RuleBasedStateMachine):
    """A group of agents sharing one linearizable key-value store (etcd's model): requests
    are served one at a time in any order, answers and watch events delivered in any order."""

    def __init__(self) -> None:
        super().__init__()
        self.store: dict[str, Member] = {}
        self.agents: list[Agent] = []
        self.size = 0
        self.min_open = 0

    @initialize(size=st.integers(1, 6), min_open=st.sampled_from(["50%", "0%", "100%", 1, 2, 3]),
                policy=st.sampled_from(["block", "open"]))
    def start(self, size: int, min_open: int | str, policy: str) -> None:
        """Start ``size`` agents, reachable, healthy, open and registered."""
        self.size, self.min_open = size, min_open_count(min_open, size)
        for i in range(size):
            a = Agent(f"m{i}", initial(P, guard=Guard.new(size, min_open, policy, f"m{i}")))
            self.agents.append(a)
            self.feed(a, FleetReachable())
            self.feed(a, Probed(HINT, True, "connect", "fine"))
        self.quiesce()

    def view(self) -> FleetView:
        return FleetView(tuple(sorted(self.store.values(), key=lambda x: x.name)))

    def feed(self, a: Agent, inp: control.Input) -> None:
        """Step ``a`` with ``inp`` and queue what its actions ask for."""
        a.state, acts = step(a.state, inp, T0)
        for act in acts:
            if isinstance(act, SetFirewall):
                a.inbox.append(Applied(("ipv4",), 1, T0, MS))
            elif isinstance(act, AskPermit | Register) and a.connected:
                a.ops.append(act)

    def changed(self) -> None:
        """The watch: every connected agent hears of the change."""
        for a in self.agents:
            if a.connected:
                a.inbox.append(FleetChanged(self.view()))

    def serve(self, a: Agent) -> None:
        """Carry out ``a``'s oldest etcd request atomically against the store."""
        op = a.ops.popleft()
        if isinstance(op, Register):
            self.store[a.name] = Member(a.name, str(op.mode), op.cause, 0.0)
            self.changed()
            return
        v = grant(self.store.values(), a.name, self.size, self.min_open)
        if v.granted:
            self.store[a.name] = Member(a.name, "block", "health", 0.0)
            self.changed()
        a.inbox.append(PermitAnswer(v.granted, v.not_open, v.open_count))

    def quiesce(self) -> None:
        """Serve and deliver everything until nothing is left."""
        for _ in range(10_000):
            busy = [a for a in self.agents if a.ops or a.inbox]
            if not busy:
                return
            a = busy[0]
            if a.ops:
                self.serve(a)
            else:
                self.feed(a, a.inbox.popleft())
        raise AssertionError("the group never settles")

    @rule(i=st.integers(0, 5), kind=st.sampled_from(["http", "connect", "tls", "process", "ok"]))
    def probe(self, i: int, kind: str) -> None:
        """Agent i's probe passes or fails one check."""
        a = self.agents[i % self.size]
        if kind == "ok":
            self.feed(a, Probed(HINT, True, "connect", "fine"))
        else:
            self.feed(a, fail(kind, DEATH if kind == "process" else HINT))

    @rule(data=st.data())
    def everyone_fails(self, data: st.DataObject) -> None:
        """The shared back end dies: every agent's probe fails a suspect check."""
        for a in data.draw(st.permutations(self.agents)):
            self.feed(a, fail("http"))

    @precondition(lambda self: any(a.ops for a in self.agents))
    @rule(i=st.integers(0, 5))
    def serve_one(self, i: int) -> None:
        """etcd serves one request of some agent."""
        busy = [a for a in self.agents if a.ops]
        self.serve(busy[i % len(busy)])

    @precondition(lambda self: any(a.inbox for a in self.agents))
    @rule(i=st.integers(0, 5))
    def deliver(self, i: int) -> None:
        """One answer or watch event reaches some agent."""
        busy = [a for a in self.agents if a.inbox]
        a = busy[i % len(busy)]
        self.feed(a, a.inbox.popleft())

    @rule(i=st.integers(0, 5))
    def tick(self, i: int) -> None:
        """Agent i's safety-net tick."""
        self.feed(self.agents[i % self.size], Tick(HINT))

    @rule(i=st.integers(0, 5))
    def cut_off(self, i: int) -> None:
        """Agent i loses etcd: its requests are lost, its key expires, it is told."""
        a = self.agents[i % self.size]
        if not a.connected:
            return
        a.connected = False
        a.ops.clear()
        a.inbox = deque(x for x in a.inbox if isinstance(x, Applied))
        if self.store.pop(a.name, None) is not None:
            self.changed()
        self.feed(a, FleetUnreachable("cut off"))

    @rule(i=st.integers(0, 5))
    def reconnect(self, i: int) -> None:
        """Agent i reaches etcd again."""
        a = self.agents[i % self.size]
        if a.connected:
            return
        a.connected = True
        self.feed(a, FleetReachable())
        self.feed(a, FleetChanged(self.view()))

    @invariant()
    def permits_never_exceed_the_budget(self) -> None:
        """At most size - min_open agents ever hold a permit at once."""
        held = [a.name for a in self.agents if a.state.guard and a.state.guard.permit]
        assert len(held) <= self.size - self.min_open, held

    @rule()
    def settle(self) -> None:
        """Once everything is delivered: keys say what kernels hold; a suspect DOWN is blocked
        exactly when it holds a permit (or decides alone without etcd); no agent stays refused
        while the budget would admit it; a proven DOWN is blocked."""
        self.quiesce()
        for a in self.agents:
            s, g = a.state, a.state.guard
            assert g is not None
            if s.health is Health.DOWN and not g.suspect:
                assert s.applied is Mode.BLOCK
            if not a.connected:
                if s.health is Health.DOWN and g.suspect and not g.permit:
                    alone = g.unreachable == "block" and g.refused is None
                    assert s.applied is (Mode.BLOCK if alone else Mode.OPEN)
                continue
            assert self.store[a.name].mode == str(s.applied), (a.name, self.store, s.applied)
            if s.health is Health.DOWN and g.suspect:
                assert (s.applied is Mode.BLOCK) == g.permit
                if not g.permit:
                    assert not grant(self.store.values(), a.name, self.size, self.min_open).granted


Fleet.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestFleet = Fleet.TestCase


def test_a_whole_group_failing_at_once_blocks_exactly_the_budget() -> None:
    """Four agents, min_open 50 %, all fail a suspect check in one instant: exactly two block,
    whatever order etcd serves them in."""
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2]):
        f = Fleet()
        f.start(4, "50%", "block")
        for i in order:
            f.feed(f.agents[i], fail("http"))
        f.quiesce()
        blocked = [a.name for a in f.agents if a.state.applied is Mode.BLOCK]
        assert len(blocked) == 2, blocked
        f.teardown()


@given(size=st.integers(1, 12), min_open=st.integers(0, 12), data=st.data())
@settings(max_examples=300, deadline=None)
def test_witness_transactions_never_leave_fewer_than_min_open_open(
        size: int, min_open: int, data: st.DataObject) -> None:
    """Racing askers read the store, then commit in any order a transaction comparing only
    their witnesses' revisions (etcd's compare on mod revision): after every commit at least
    min_open members are open, and once all are answered every asker still open is refused
    by the final store (none left waiting while the budget would admit it)."""
    min_open = min(min_open, size)
    names = [f"m{i:02d}" for i in range(size)]
    store = {n: ("open", 1) for n in names}  # name -> (mode, mod revision)
    rev = 1
    askers = data.draw(st.lists(st.sampled_from(names), unique=True))
    pending: dict[str, dict[str, int] | None] = dict.fromkeys(askers)  # read: witness revisions
    granted: set[str] = set()
    while pending:
        who = data.draw(st.sampled_from(sorted(pending)))
        read = pending[who]
        members = [Member(n, mode, "health", 0.0) for n, (mode, _) in store.items()]
        if read is None:  # read the store, decide, pick the witnesses
            if not grant(members, who, size, min_open).granted:
                del pending[who]
                continue
            pending[who] = {w: store[w][1] for w in witnesses(members, who, min_open)}
            continue
        if all(store[w][1] == r for w, r in read.items()):  # the transaction commits
            rev += 1
            store[who] = ("block", rev)
            granted.add(who)
            del pending[who]
            assert sum(mode == "open" for mode, _ in store.values()) >= min_open
        else:
            pending[who] = None  # compare failed: read again
    members = [Member(n, mode, "health", 0.0) for n, (mode, _) in store.items()]
    for n in set(askers) - granted:
        assert not grant(members, n, size, min_open).granted
    assert len(granted) == min(len(askers), size - min_open)
