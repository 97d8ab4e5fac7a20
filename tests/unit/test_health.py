"""The pure health state machine: every (state, input) pair, and properties over random runs."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from watcher.config import ProbeConfig
from watcher.events import Evidence
from watcher.health import (
    Action,
    AdminBlock,
    AdminChange,
    Health,
    Input,
    Mode,
    Params,
    ProbeAgain,
    ProbeOutcome,
    SetFirewall,
    State,
    Transition,
    desired_mode,
    initial,
    step,
)

MS = 1_000_000
P = Params(rise=3, fall=2, rise_interval_ns=250 * MS)
T0 = 10_000 * MS

PASS = ProbeOutcome(ok=True, check="http", reason="http: status 200")
FAIL = ProbeOutcome(ok=False, check="connect", reason="connect: refused")
DEATH = ProbeOutcome(ok=False, check="process", reason="process: dead", evidence=Evidence.DEATH)
PASS_DEATH = replace(PASS, evidence=Evidence.DEATH)
BLOCK = AdminBlock(drain=False, reason="maintenance")
DRAIN = AdminBlock(drain=True, reason="upgrade")


def modes(actions: tuple[Action, ...]) -> list[Mode]:
    """The modes of the SetFirewall actions, in order."""
    return [a.mode for a in actions if isinstance(a, SetFirewall)]


def test_params_from_config() -> None:
    """Params.from_config converts rise_interval_ms to ns and keeps rise and fall."""
    p = Params.from_config(ProbeConfig(rise=4, fall=3, rise_interval_ms=125))
    assert p == Params(rise=4, fall=3, rise_interval_ns=125 * MS)


def test_params_reject_nonsense() -> None:
    """Zero rise or fall, or a negative interval, is refused when building Params."""
    for bad in ((0, 1, 0), (1, 0, 0), (1, 1, -1)):
        with pytest.raises(ValueError):
            Params(*bad)


@pytest.mark.parametrize(
    ("h", "mode"),
    [
        (Health(State.STARTING), None),
        (Health(State.UP), Mode.OPEN),
        (Health(State.DOWN), Mode.BLOCK),
        (Health(State.STARTING, admin=BLOCK), Mode.BLOCK),
        (Health(State.UP, admin=BLOCK), Mode.BLOCK),
        (Health(State.DOWN, admin=DRAIN), Mode.DRAIN),
        (Health(State.UP, admin=DRAIN), Mode.DRAIN),
    ],
)
def test_desired_mode(h: Health, mode: Mode | None) -> None:
    """The mode is admin first, then UP->OPEN, DOWN->BLOCK, STARTING->leave as is."""
    assert desired_mode(h) == mode


def test_initial_carries_admin_block() -> None:
    """initial() starts in STARTING with the persisted admin block, whose mode applies at once."""
    assert initial() == Health(State.STARTING)
    assert desired_mode(initial(DRAIN)) is Mode.DRAIN


# Every reachable kind of state, by name, for the exhaustive table below.
UP_CLEAN = Health(State.UP, passes=5, last_pass_ns=T0 - MS)
UP_ONE_FAIL = Health(State.UP, fails=1)
DOWN_CLEAN = Health(State.DOWN, fails=4)
DOWN_RISING = Health(State.DOWN, passes=1, last_pass_ns=T0 - 100 * MS)  # next pass due T0+150ms
DOWN_RISING_DUE = Health(State.DOWN, passes=1, last_pass_ns=T0 - 250 * MS)  # exactly due
DOWN_LAST = Health(State.DOWN, passes=2, last_pass_ns=T0 - 300 * MS)  # one pass from UP

CASES: list[tuple[str, Health, Input, Health, tuple[Action, ...]]] = [
    # STARTING
    ("starting+pass", Health(), PASS,
     Health(State.UP, passes=1, last_pass_ns=T0),
     (Transition(State.STARTING, State.UP, PASS.reason), SetFirewall(Mode.OPEN, PASS.reason))),
    ("starting+fail", Health(), FAIL,
     Health(State.DOWN, fails=1),
     (Transition(State.STARTING, State.DOWN, FAIL.reason), SetFirewall(Mode.BLOCK, FAIL.reason))),
    ("starting+death", Health(), DEATH,
     Health(State.DOWN, fails=1),
     (Transition(State.STARTING, State.DOWN, DEATH.reason),
      SetFirewall(Mode.BLOCK, DEATH.reason))),
    ("starting+block", Health(), AdminChange(BLOCK),
     Health(admin=BLOCK), (SetFirewall(Mode.BLOCK, "admin: maintenance"),)),
    ("starting+drain", Health(), AdminChange(DRAIN),
     Health(admin=DRAIN), (SetFirewall(Mode.DRAIN, "admin: upgrade"),)),
    ("starting+unblock (none)", Health(), AdminChange(None), Health(), ()),
    ("starting(blocked)+unblock leaves chain as is", Health(admin=BLOCK), AdminChange(None),
     Health(), ()),
    # UP
    ("up+pass", UP_CLEAN, PASS, replace(UP_CLEAN, passes=6, last_pass_ns=T0), ()),
    ("up(1 fail)+pass resets fails", UP_ONE_FAIL, PASS,
     Health(State.UP, passes=1, last_pass_ns=T0), ()),
    ("up+fail below fall", UP_CLEAN, FAIL, Health(State.UP, fails=1), ()),
    ("up(1 fail)+fail reaches fall", UP_ONE_FAIL, FAIL,
     Health(State.DOWN, fails=2),
     (Transition(State.UP, State.DOWN, "2 failures in a row: connect: refused"),
      SetFirewall(Mode.BLOCK, "2 failures in a row: connect: refused"))),
    ("up+death at once", UP_CLEAN, DEATH,
     Health(State.DOWN, fails=1),
     (Transition(State.UP, State.DOWN, "confirmed by kernel event: process: dead"),
      SetFirewall(Mode.BLOCK, "confirmed by kernel event: process: dead"))),
    ("up+pass with death evidence is believed", UP_CLEAN, PASS_DEATH,
     replace(UP_CLEAN, passes=6, last_pass_ns=T0), ()),
    ("up+block", UP_CLEAN, AdminChange(BLOCK), replace(UP_CLEAN, admin=BLOCK),
     (SetFirewall(Mode.BLOCK, "admin: maintenance"),)),
    ("up+drain", UP_CLEAN, AdminChange(DRAIN), replace(UP_CLEAN, admin=DRAIN),
     (SetFirewall(Mode.DRAIN, "admin: upgrade"),)),
    ("up(blocked)+unblock", replace(UP_CLEAN, admin=BLOCK), AdminChange(None), UP_CLEAN,
     (SetFirewall(Mode.OPEN, "admin block removed"),)),
    ("up(blocked)+drain", replace(UP_CLEAN, admin=BLOCK), AdminChange(DRAIN),
     replace(UP_CLEAN, admin=DRAIN), (SetFirewall(Mode.DRAIN, "admin: upgrade"),)),
    ("up(drain)+drain again", replace(UP_CLEAN, admin=DRAIN), AdminChange(DRAIN),
     replace(UP_CLEAN, admin=DRAIN), ()),
    ("up(blocked)+death keeps block, no firewall change", replace(UP_CLEAN, admin=BLOCK), DEATH,
     Health(State.DOWN, fails=1, admin=BLOCK),
     (Transition(State.UP, State.DOWN, "confirmed by kernel event: process: dead"),)),
    # DOWN
    ("down+pass counts first", DOWN_CLEAN, PASS,
     Health(State.DOWN, passes=1, last_pass_ns=T0), (ProbeAgain(T0 + 250 * MS),)),
    ("down(rising)+early pass neither counts nor resets", DOWN_RISING, PASS,
     DOWN_RISING, (ProbeAgain(T0 + 150 * MS),)),
    ("down(rising)+pass exactly due counts", DOWN_RISING_DUE, PASS,
     Health(State.DOWN, passes=2, last_pass_ns=T0), (ProbeAgain(T0 + 250 * MS),)),
    ("down(last)+pass goes up", DOWN_LAST, PASS,
     Health(State.UP, passes=3, last_pass_ns=T0),
     (Transition(State.DOWN, State.UP, "3 passes in a row: http: status 200"),
      SetFirewall(Mode.OPEN, "3 passes in a row: http: status 200"))),
    ("down(rising)+fail resets passes", DOWN_RISING, FAIL, Health(State.DOWN, fails=1), ()),
    ("down(rising)+death resets passes", DOWN_LAST, DEATH, Health(State.DOWN, fails=1), ()),
    ("down+fail", DOWN_CLEAN, FAIL, Health(State.DOWN, fails=5), ()),
    ("down+block (already blocked)", DOWN_CLEAN, AdminChange(BLOCK),
     replace(DOWN_CLEAN, admin=BLOCK), ()),
    ("down+drain", DOWN_CLEAN, AdminChange(DRAIN), replace(DOWN_CLEAN, admin=DRAIN),
     (SetFirewall(Mode.DRAIN, "admin: upgrade"),)),
    ("down(drain)+unblock", replace(DOWN_CLEAN, admin=DRAIN), AdminChange(None), DOWN_CLEAN,
     (SetFirewall(Mode.BLOCK, "admin block removed"),)),
    ("down(blocked,last)+pass goes up, stays blocked", replace(DOWN_LAST, admin=BLOCK), PASS,
     Health(State.UP, passes=3, last_pass_ns=T0, admin=BLOCK),
     (Transition(State.DOWN, State.UP, "3 passes in a row: http: status 200"),)),
]


@pytest.mark.parametrize(("name", "h", "inp", "want", "actions"), CASES, ids=[c[0] for c in CASES])
def test_step_table(name: str, h: Health, inp: Input, want: Health,
                    actions: tuple[Action, ...]) -> None:
    """Each (state, input) pair gives exactly the expected health and actions."""
    assert step(h, inp, T0, P) == (want, actions)


STATES = [Health(), UP_CLEAN, UP_ONE_FAIL, DOWN_CLEAN, DOWN_RISING, DOWN_RISING_DUE, DOWN_LAST]
ADMINS = [None, BLOCK, DRAIN]
INPUTS: list[Input] = [PASS, FAIL, DEATH, PASS_DEATH, AdminChange(None), AdminChange(BLOCK),
                       AdminChange(DRAIN)]


@pytest.mark.parametrize(("h", "admin", "inp"), list(itertools.product(STATES, ADMINS, INPUTS)))
def test_step_product_invariants(h: Health, admin: AdminBlock | None, inp: Input) -> None:
    """For every pair: SetFirewall iff the desired mode changed, Transition iff the state did."""
    h = replace(h, admin=admin)
    nxt, actions = step(h, inp, T0, P)
    kinds = [type(a) for a in actions]
    assert kinds == sorted(kinds, key=[Transition, SetFirewall, ProbeAgain].index)
    want_modes = [desired_mode(nxt)] if desired_mode(nxt) not in (None, desired_mode(h)) else []
    assert modes(actions) == want_modes
    transitions = [a for a in actions if isinstance(a, Transition)]
    assert transitions == ([] if nxt.state is h.state else
                           [Transition(h.state, nxt.state, transitions[0].reason)])
    assert all(a.reason for a in transitions)
    if isinstance(inp, AdminChange):
        assert nxt == replace(h, admin=inp.block)
    else:
        assert nxt.admin == admin
        assert nxt.state is not State.STARTING
    again = [a for a in actions if isinstance(a, ProbeAgain)]
    assert all(a.after_ns > T0 for a in again)
    rising = isinstance(inp, ProbeOutcome) and nxt.state is State.DOWN and nxt.passes > 0
    assert bool(again) == rising


# --- properties over random runs -------------------------------------------------------------

outcomes = st.builds(
    ProbeOutcome,
    ok=st.booleans(),
    check=st.sampled_from(["pid_file", "process", "listen", "connect", "http"]),
    reason=st.just("r"),
    evidence=st.sampled_from(list(Evidence)),
)
admin_changes = st.builds(AdminChange, st.sampled_from(ADMINS))
inputs = st.one_of(outcomes, outcomes, admin_changes)
params = st.builds(Params, rise=st.integers(1, 5), fall=st.integers(1, 5),
                   rise_interval_ns=st.integers(0, 500 * MS))
runs = st.lists(st.tuples(inputs, st.integers(0, 400 * MS)), max_size=40)


def replay(p: Params, run: list[tuple[Input, int]]) -> list[tuple[Health, tuple[Action, ...]]]:
    """All (health, actions) after each step of ``run`` (each input after its delay)."""
    h, now, out = initial(), T0, []
    for inp, delay in run:
        now += delay
        h, actions = step(h, inp, now, p)
        out.append((h, actions))
    return out


@given(params, runs)
def test_step_is_deterministic(p: Params, run: list[tuple[Input, int]]) -> None:
    """(e) The same inputs at the same times always give the same healths and actions."""
    assert replay(p, run) == replay(p, run)


@given(params, runs)
def test_firewall_actions_track_desired_mode(p: Params, run: list[tuple[Input, int]]) -> None:
    """Applying every SetFirewall in order leaves the chain in desired_mode (once it has one)."""
    applied: Mode | None = None
    previous: Mode | None = None  # desired mode before the step
    for h, actions in replay(p, run):
        for m in modes(actions):
            assert m is not previous  # never a SetFirewall for an unchanged desired mode
            applied = m
        assert applied == desired_mode(h) or desired_mode(h) is None
        previous = desired_mode(h)


class HealthMachine(RuleBasedStateMachine):
    """Drives step() with random outcomes, delays and admin changes, checking properties a-d."""

    def __init__(self) -> None:
        super().__init__()
        self.p = P
        self.h = initial()
        self.now = T0
        self.applied: Mode | None = None
        self.history: list[bool] = []  # ok of each probe outcome since start
        self.last_death = False
        self.next_due: int | None = None  # from the latest ProbeAgain

    @initialize(p=params)
    def setup(self, p: Params) -> None:
        self.p = p

    def _do(self, inp: Input) -> tuple[Action, ...]:
        old = self.h
        self.h, actions = step(self.h, inp, self.now, self.p)
        for m in modes(actions):
            self.applied = m
        for a in actions:
            if isinstance(a, ProbeAgain):
                self.next_due = a.after_ns
        if isinstance(inp, ProbeOutcome):
            self.history.append(inp.ok)
            self.last_death = not inp.ok and inp.evidence is Evidence.DEATH
        assert step(old, inp, self.now, self.p) == (self.h, actions)  # (e) deterministic
        return actions

    @rule(o=outcomes)
    def probe(self, o: ProbeOutcome) -> None:
        self._do(o)

    @rule(delay=st.integers(0, 600 * MS))
    def wait(self, delay: int) -> None:
        self.now += delay

    @rule(block=st.sampled_from(ADMINS))
    def admin(self, block: AdminBlock | None) -> None:
        before = self.applied
        self._do(AdminChange(block))
        # (d) an admin block overrides everything; unblock returns to the health-derived mode.
        if block is not None:
            assert self.applied is (Mode.DRAIN if block.drain else Mode.BLOCK)
        else:
            health_mode = desired_mode(replace(self.h, admin=None))
            assert self.applied is (health_mode if health_mode is not None else before)

    @rule()
    def recover(self) -> None:
        """(c) Healthy from now on: OPEN after at most `rise` passes spaced rise_interval apart."""
        for _ in range(self.p.rise):
            self._do(PASS)
            self.now += self.p.rise_interval_ns
        if self.h.admin is None:
            assert self.applied is Mode.OPEN
            assert self.h.state is State.UP

    @rule()
    def follow_probe_again(self) -> None:
        """A pass at the time ProbeAgain named is always counted while rising."""
        if self.h.state is not State.DOWN or self.h.passes == 0 or self.next_due is None:
            return
        self.now = max(self.now, self.next_due)
        before = self.h.passes
        self._do(PASS)
        assert self.h.state is State.UP or self.h.passes == before + 1

    @invariant()
    def death_blocks(self) -> None:
        """(a) After a DEATH-evidence failure the chain is BLOCK, or DRAIN under an admin drain."""
        if self.last_death:
            want = Mode.DRAIN if self.h.admin is not None and self.h.admin.drain else Mode.BLOCK
            assert self.applied is want

    @invariant()
    def never_open_after_fall_failures(self) -> None:
        """(b) The chain is never OPEN while the last `fall` outcomes were all failures."""
        tail = self.history[-self.p.fall:]
        if len(tail) == self.p.fall and not any(tail):
            assert self.applied is not Mode.OPEN

    @invariant()
    def applied_matches_desired(self) -> None:
        """The chain as set by the actions is the desired mode whenever one is defined."""
        if desired_mode(self.h) is not None:
            assert self.applied is desired_mode(self.h)


TestHealthMachine = HealthMachine.TestCase
TestHealthMachine.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
