"""The health state machine: pure, no I/O, no clock reads (``now_ns`` is passed in).

``step(health, input, now_ns, params)`` returns the next ``Health`` and the actions the daemon
must carry out, in order: a ``Transition`` to log, a ``SetFirewall`` to apply, a ``ProbeAgain``
to schedule. The firewall mode is a pure function of the health (``desired_mode``), and a
``SetFirewall`` is emitted exactly when that function's value changes to a mode.

Rules:

* STARTING: the first probe decides at once (a pass goes UP, a failure goes DOWN: an unknown,
  broken service is blocked).
* UP: ``fall`` consecutive failures go DOWN; a failure whose triggering kernel event proves
  death (``Evidence.DEATH``) goes DOWN at once. Evidence only strengthens a failure: a pass is
  believed even after a death event (the service was already restarted).
* DOWN: ``rise`` counted passes in a row go UP. A pass is counted only if it comes at least
  ``rise_interval_ns`` after the previous counted pass; an earlier pass is neither counted nor a
  reset. Any failure resets the count. While rising, ``ProbeAgain`` names the monotonic time at
  which the next pass will count.
* An admin block overrides the mode (BLOCK, or DRAIN when draining) and leaves the health
  tracking untouched, so an unblock returns to the mode the health calls for.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from watcher.config import ProbeConfig
from watcher.events import Evidence

__all__ = [
    "Action",
    "AdminBlock",
    "AdminChange",
    "Health",
    "Input",
    "Mode",
    "Params",
    "ProbeAgain",
    "ProbeOutcome",
    "SetFirewall",
    "State",
    "Transition",
    "desired_mode",
    "initial",
    "step",
]


class State(enum.StrEnum):
    """The service's health as the agent believes it."""

    STARTING = "starting"
    UP = "up"
    DOWN = "down"


class Mode(enum.StrEnum):
    """What the firewall chain should hold (the daemon maps this to the rules package)."""

    OPEN = "open"
    BLOCK = "block"
    DRAIN = "drain"


@dataclass(frozen=True)
class Params:
    """Thresholds of the machine, in the units ``step`` uses."""

    rise: int
    fall: int
    rise_interval_ns: int

    def __post_init__(self) -> None:
        if self.rise < 1 or self.fall < 1 or self.rise_interval_ns < 0:
            raise ValueError(f"invalid health parameters: {self!r}")

    @classmethod
    def from_config(cls, probe: ProbeConfig) -> Params:
        """The parameters configured in ``[probe]`` (rise, fall, rise_interval_ms)."""
        return cls(
            rise=probe.rise,
            fall=probe.fall,
            rise_interval_ns=probe.rise_interval_ms * 1_000_000,
        )


@dataclass(frozen=True)
class AdminBlock:
    """An operator's block (``drain``: reject only new connections) and the reason given."""

    drain: bool
    reason: str


@dataclass(frozen=True)
class Health:
    """The machine's state: consecutive counted passes and failures, the last counted pass."""

    state: State = State.STARTING
    passes: int = 0
    fails: int = 0
    last_pass_ns: int | None = None
    admin: AdminBlock | None = None


@dataclass(frozen=True)
class ProbeOutcome:
    """A probe's verdict; ``evidence`` is DEATH when the triggering kernel event proved death."""

    ok: bool
    check: str
    reason: str
    evidence: Evidence = Evidence.HINT


@dataclass(frozen=True)
class AdminChange:
    """The operator set (``block``) or removed (``None``) an admin block."""

    block: AdminBlock | None


Input = ProbeOutcome | AdminChange


@dataclass(frozen=True)
class SetFirewall:
    """Make the chain hold ``mode``."""

    mode: Mode
    reason: str


@dataclass(frozen=True)
class Transition:
    """The health state changed (logged as service-down / service-up)."""

    old: State
    new: State
    reason: str


@dataclass(frozen=True)
class ProbeAgain:
    """Probe again at monotonic time ``after_ns`` (same clock as ``now_ns``), not earlier."""

    after_ns: int


Action = SetFirewall | Transition | ProbeAgain


def initial(admin: AdminBlock | None = None) -> Health:
    """The health at start-up: STARTING, no history, with the persisted admin block if any."""
    return Health(admin=admin)


def desired_mode(h: Health) -> Mode | None:
    """The firewall mode ``h`` calls for; None while STARTING without admin block (leave as is)."""
    if h.admin is not None:
        return Mode.DRAIN if h.admin.drain else Mode.BLOCK
    if h.state is State.UP:
        return Mode.OPEN
    if h.state is State.DOWN:
        return Mode.BLOCK
    return None


def _on_pass(h: Health, o: ProbeOutcome, now_ns: int, p: Params) -> tuple[Health, str, int | None]:
    """Next health after a pass, the reason of a transition, and when to probe again."""
    if h.state is State.STARTING:
        return replace(h, state=State.UP, passes=1, fails=0, last_pass_ns=now_ns), o.reason, None
    if h.state is State.UP:
        return replace(h, passes=h.passes + 1, fails=0, last_pass_ns=now_ns), "", None
    # DOWN: count the pass only if it is spaced from the previous counted one.
    if h.passes > 0 and h.last_pass_ns is not None:
        due = h.last_pass_ns + p.rise_interval_ns
        if now_ns < due:
            return replace(h, fails=0), "", due
    passes = h.passes + 1
    if passes >= p.rise:
        reason = f"{passes} passes in a row: {o.reason}"
        return replace(h, state=State.UP, passes=passes, fails=0, last_pass_ns=now_ns), reason, None
    nxt = replace(h, passes=passes, fails=0, last_pass_ns=now_ns)
    return nxt, "", now_ns + p.rise_interval_ns


def _on_fail(h: Health, o: ProbeOutcome, p: Params) -> tuple[Health, str]:
    """Next health after a failure and the reason of a transition ("" if none)."""
    fails = h.fails + 1
    nxt = replace(h, passes=0, fails=fails, last_pass_ns=None)
    if h.state is State.STARTING:
        return replace(nxt, state=State.DOWN), o.reason
    if h.state is State.UP:
        if o.evidence is Evidence.DEATH:
            return replace(nxt, state=State.DOWN), f"confirmed by kernel event: {o.reason}"
        if fails >= p.fall:
            return replace(nxt, state=State.DOWN), f"{fails} failures in a row: {o.reason}"
    return nxt, ""


def _mode_reason(h: Health, transition_reason: str, fallback: str) -> str:
    if h.admin is not None:
        return f"admin: {h.admin.reason}" if h.admin.reason else "admin"
    return transition_reason or fallback


def step(h: Health, inp: Input, now_ns: int, p: Params) -> tuple[Health, tuple[Action, ...]]:
    """The next health and the actions (Transition, SetFirewall, ProbeAgain, in that order)."""
    actions: list[Action] = []
    again: int | None = None
    reason = ""
    if isinstance(inp, AdminChange):
        nxt = replace(h, admin=inp.block)
        fallback = "admin block removed"
    elif inp.ok:
        nxt, reason, again = _on_pass(h, inp, now_ns, p)
        fallback = inp.reason
    else:
        nxt, reason = _on_fail(h, inp, p)
        fallback = inp.reason
    if nxt.state is not h.state:
        actions.append(Transition(old=h.state, new=nxt.state, reason=reason))
    old_mode, new_mode = desired_mode(h), desired_mode(nxt)
    if new_mode is not None and new_mode is not old_mode:
        actions.append(SetFirewall(mode=new_mode, reason=_mode_reason(nxt, reason, fallback)))
    if again is not None:
        actions.append(ProbeAgain(after_ns=again))
    return nxt, tuple(actions)
