"""The control core: every decision of the agent, as one pure function.

``step(state, input, now_ns) -> (state, actions)``: no I/O, no clock reads (``now_ns`` is the
monotonic clock, passed in), no exceptions for ill health. The daemon feeds it every input
(probe verdicts, the admin record it read, firewall results, timers, reload, stop) and carries
out the actions it returns, in order. The core owns:

* **health**: STARTING, UP, DOWN. The first probe decides at once (a failure blocks an unknown,
  broken service). ``fall`` consecutive failures go DOWN; a failure that proves death (the
  trigger was a kernel death event, or the probe itself saw the process gone) goes DOWN at once.
  ``rise`` counted passes go UP, a pass counting only ``rise_interval`` after the previous
  counted one (an earlier pass is neither counted nor a reset); any failure resets the count.
* **the admin block**, which overrides health (BLOCK, or DRAIN when draining) and, when timed,
  ends by itself: the core asks for the record to be read again when it expires.
* **what the kernel holds**: ``applied`` changes only when a change succeeded; at most one change
  is in flight; whenever none is and the kernel does not hold the wanted mode (or a repair is
  due), the next change is issued. A failed change is retried with bounded backoff, always
  with the mode wanted at that moment.
* **READY**: only once the kernel holds the first decision.
* **stop**: waits for the change in flight, applies ``on_exit`` (an admin block is kept), and
  ends in exactly one ``Exit``; it arms its own outer bound (``StopBoundAt``: past it, exit 75
  whatever is in flight), and a second signal exits at once with 128 + its number after a
  bounded log flush.
* **what the outputs show**: the one ``Status`` that the status file, STATUS=, the metrics and
  the agent check render (``ready``: the agent check may answer), and what the metrics count
  (``Count``: a failover is a new mode in effect after an event other than start-up).
* **established connections** (``established = "reset"``): once a full block is in effect,
  the established connections to the port from other hosts are ended (``ResetConnections``);
  while a drain is in effect, the idle ones are, again every ``drain_sweep`` while it lasts
  (``watcher.core.sessions`` says which are idle). At most one such round is in flight; a
  kernel without SOCK_DESTROY is reported once and never asked again.
* **the fleet guard** (``[fleet]``, ``State.guard``; rules in ``watcher.core.fleet``): a suspect
  DOWN blocks only with a permit (``AskPermit`` -> ``PermitAnswer``), asked again on every
  ``FleetChanged`` and tick while refused; a proven DOWN never asks. The member key follows
  what the kernel holds (``Register``); ``FleetUnreachable``/``FleetReachable`` switch to the
  ``unreachable`` policy and back, and never change a rule by themselves.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from rules.model import Mode
from watcher.config import Config, LogLevel, OnExit
from watcher.core.catalogue import Event
from watcher.core.fleet import FleetView, Guard, allows_suspect_block, is_proven
from watcher.core.sessions import DEFAULT_QUIET_MS
from watcher.core.triggers import Evidence, Source, Trigger
from watcher.errors import EX_OK, EX_TEMPFAIL

__all__ = [
    "Action",
    "AdminBlock",
    "AdminRead",
    "Applied",
    "ApplyFailed",
    "AskPermit",
    "ConnectionsReset",
    "Count",
    "Exit",
    "FleetChanged",
    "FleetReachable",
    "FleetUnreachable",
    "Health",
    "Input",
    "Log",
    "Notify",
    "NotifyKind",
    "Params",
    "PermitAnswer",
    "ProbeAt",
    "Probed",
    "Publish",
    "ReadAdminAt",
    "Register",
    "Reloaded",
    "RemoveChain",
    "ResetConnections",
    "RetryAt",
    "RetryDue",
    "SetFirewall",
    "State",
    "Status",
    "Stop",
    "StopBound",
    "StopBoundAt",
    "SweepAt",
    "SweepDue",
    "Tally",
    "Tick",
    "desired_mode",
    "initial",
    "outranks",
    "step",
]

_S = 1_000_000_000
_DEFAULT = Config()  # the defaults are the configuration's, declared once in watcher.config


def _attempt_ns(lock_wait_s: float) -> int:
    """The bound on one firewall change: the xtables lock wait plus a second for the commands."""
    return int((lock_wait_s + 1.0) * _S)


class Health(enum.StrEnum):
    """The service's health as the agent believes it."""

    STARTING = "starting"
    UP = "up"
    DOWN = "down"


@dataclass(frozen=True)
class Params:
    """Thresholds and bounds of the core, in nanoseconds where they are times."""

    rise: int = _DEFAULT.probe.rise
    fall: int = _DEFAULT.probe.fall
    rise_interval_ns: int = _DEFAULT.probe.rise_interval_ms * 1_000_000
    on_exit: OnExit = _DEFAULT.firewall.on_exit
    attempt_ns: int = _attempt_ns(_DEFAULT.firewall.lock_wait_s)
    stop_grace_ns: int = 8 * _S  # SIGTERM to exit, whatever the xtables lock does
    abort_flush_ns: int = 500_000_000  # a second SIGTERM: how long the log may take to flush
    retry_min_ns: int = 100_000_000
    retry_max_ns: int = 5 * _S
    established: str = "reset"  # reset | keep: what a block does to established connections
    drain_quiet_ms: int = DEFAULT_QUIET_MS  # a drain ends connections idle this long
    # and looks for newly idle ones this often: a pooling gateway reuses an idle connection
    # within tens of ms, so at 100 ms nginx still sent the drained server 0.3-4.9 % of new
    # requests (three runs), at 25 ms 0.5-0.8 %; a sweep is one sock_diag dump of the port
    drain_sweep_ns: int = 25_000_000

    def __post_init__(self) -> None:
        if self.rise < 1 or self.fall < 1 or self.rise_interval_ns < 0:
            raise ValueError(f"invalid health parameters: {self!r}")
        if self.on_exit not in tuple(OnExit):
            raise ValueError(f"invalid on_exit: {self.on_exit!r}")
        object.__setattr__(self, "on_exit", OnExit(self.on_exit))  # a plain string becomes one
        if self.established not in ("reset", "keep"):
            raise ValueError(f"invalid established: {self.established!r}")
        if self.drain_quiet_ms < 0 or self.drain_sweep_ns <= 0:
            raise ValueError(f"invalid drain bounds: {self!r}")

    @classmethod
    def from_config(cls, cfg: Config) -> Params:
        """The parameters ``cfg`` configures ([probe] rise, fall, rise_interval_ms; [firewall])."""
        return cls(rise=cfg.probe.rise, fall=cfg.probe.fall,
                   rise_interval_ns=cfg.probe.rise_interval_ms * 1_000_000,
                   on_exit=cfg.firewall.on_exit,
                   attempt_ns=_attempt_ns(cfg.firewall.lock_wait_s),
                   established=cfg.firewall.established,
                   drain_quiet_ms=cfg.firewall.drain_idle_ms)


@dataclass(frozen=True)
class AdminBlock:
    """An operator's block (``drain``: only new connections), its reason, its end (UNIX time)."""

    drain: bool
    reason: str
    until: float | None = None


@dataclass(frozen=True)
class _Change:
    """The firewall change in flight and what it is for."""

    mode: Mode | None  # None: remove the chain
    cause: Trigger | None  # the event that made it wanted (latency runs from it)
    reason: str
    probe_ns: int | None
    repair: bool = False
    final: bool = False  # the on_exit change: its result ends the process


@dataclass(frozen=True)
class State:
    """Everything the agent decides from. Build the first one with ``initial()``."""

    params: Params = field(default_factory=Params)
    health: Health = Health.STARTING
    passes: int = 0
    fails: int = 0
    last_pass_ns: int | None = None
    admin: AdminBlock | None = None
    applied: Mode | None = None  # what the kernel holds, as far as a change succeeded
    in_flight: _Change | None = None
    failures: int = 0  # consecutive failed changes
    retry_at_ns: int | None = None
    repair_due: Trigger | None = None  # the safety-net tick that asked for a repair
    cause: Trigger | None = None  # the event behind the wanted mode
    why: str = ""  # the reason of the wanted mode
    probe_ns: int | None = None  # how long the probe behind the wanted mode took
    last_failure: str = ""  # the last probe failure's reason ("" after a pass)
    ready: bool = False
    stop_at_ns: int | None = None  # set by Stop
    exited: bool = False
    resetting: bool = False  # a ResetConnections is in flight
    reset_next: bool | None = None  # the next one's idle_only, issued when it answers
    sweep_at_ns: int | None = None  # the drain's next look for idle connections
    reset_off: str = ""  # why connections are never reset in this run ("": they are)
    reset_error: str = ""  # the last failed round's reason, warned about once
    guard: Guard | None = None  # the fleet guard, with [fleet]


# ------------------------------------------------------------------------------------ inputs

@dataclass(frozen=True)
class Probed:
    """A verification probe's verdict, for the round ``trigger`` started."""

    trigger: Trigger
    ok: bool
    check: str
    reason: str
    proves_death: bool = False  # the probe itself saw the process gone
    duration_ns: int = 0


@dataclass(frozen=True)
class AdminRead:
    """The admin block in force, as read at UNIX time ``wall``; ``expired``: the reader found
    a timed record past its end (and removed it), and this was its end."""

    trigger: Trigger
    block: AdminBlock | None
    wall: float = 0.0
    expired: float | None = None  # the end (UNIX time) of the expired record the reader removed
    expires_at_ns: int | None = None  # a timed block's end on the monotonic clock


@dataclass(frozen=True)
class Applied:
    """The change in flight succeeded: the kernel holds its mode (read back)."""

    changed: tuple[str, ...]  # the families whose chain or jump changed
    transactions: int
    committed_ns: int | None  # when the rule took effect (the last family's commit)
    duration_ns: int  # the whole change, read-back included


@dataclass(frozen=True)
class ApplyFailed:
    """The change in flight failed and changed nothing; ``fatal``: the exit code if retrying
    cannot help (the chain belongs to someone else, iptables is gone for good)."""

    reason: str
    fatal: int | None = None


@dataclass(frozen=True)
class RetryDue:
    """The retry time a ``RetryAt`` asked for has come."""


@dataclass(frozen=True)
class Tick:
    """The safety-net timer: the kernel is checked to still hold our mode (a repair)."""

    trigger: Trigger


@dataclass(frozen=True)
class Reloaded:
    """SIGHUP: a new valid configuration (``note``: what of it waits for a restart), or a refused
    one (``error``)."""

    params: Params | None
    path: str
    note: str = ""
    error: str = ""


@dataclass(frozen=True)
class Stop:
    """SIGTERM or SIGINT (``signum``: its number, for the exit code of a second one)."""

    signame: str
    signum: int = 15


@dataclass(frozen=True)
class StopBound:
    """The bound a ``StopBoundAt`` set has passed: whatever is in flight, the agent ends."""


@dataclass(frozen=True)
class ConnectionsReset:
    """A ResetConnections round ended: connections ended per peer family, those kept (busy,
    in a drain), and why it stopped early ("" if it did not; ``unsupported``: the kernel has
    no SOCK_DESTROY)."""

    idle_only: bool
    reset: Mapping[str, int] = field(default_factory=dict)
    kept: int = 0
    error: str = ""
    unsupported: bool = False
    duration_ns: int = 0


@dataclass(frozen=True)
class SweepDue:
    """The time a ``SweepAt`` asked for has come: look for newly idle connections."""


@dataclass(frozen=True)
class PermitAnswer:
    """The answer to ``AskPermit``: granted (the member key now says block) or refused, with
    the members counted not open; ``error``: etcd failed to answer (counts as refused)."""

    granted: bool
    not_open: tuple[str, ...] = ()
    open_count: int = 0
    error: str = ""


@dataclass(frozen=True)
class FleetChanged:
    """The watch saw the group change; ``view`` is the group as it is now."""

    view: FleetView


@dataclass(frozen=True)
class FleetReachable:
    """etcd answers (again); the member key must be registered anew."""


@dataclass(frozen=True)
class FleetUnreachable:
    """No etcd endpoint answered for a whole lease: the member key has expired by now."""

    reason: str


Input = (Probed | AdminRead | Applied | ApplyFailed | RetryDue | Tick | Reloaded | Stop
         | StopBound | ConnectionsReset | SweepDue
         | PermitAnswer | FleetChanged | FleetReachable | FleetUnreachable)


# ------------------------------------------------------------------------------------ actions

@dataclass(frozen=True)
class SetFirewall:
    """Make the chain hold ``mode``, within ``deadline_ns``; answer with Applied or ApplyFailed.

    ``fresh``: plan from a read made now (a repair), not from the last read-back."""

    mode: Mode
    fresh: bool
    deadline_ns: int


@dataclass(frozen=True)
class RemoveChain:
    """Delete the chain and its jump (``on_exit = "remove"``); answer like SetFirewall."""

    deadline_ns: int


@dataclass(frozen=True)
class ProbeAt:
    """Probe again at ``at_ns``, not earlier (a pass counts only then)."""

    at_ns: int


@dataclass(frozen=True)
class RetryAt:
    """Feed ``RetryDue`` at ``at_ns``."""

    at_ns: int


@dataclass(frozen=True)
class ReadAdminAt:
    """Read the admin record again at ``at_ns`` (a timed block ends then)."""

    at_ns: int


@dataclass(frozen=True)
class StopBoundAt:
    """Feed ``StopBound`` at ``at_ns``: the stop's outer bound (the changes have their own)."""

    at_ns: int


@dataclass(frozen=True)
class Log:
    """Log ``event`` at ``level`` with ``fields``."""

    level: LogLevel
    event: Event
    fields: Mapping[str, Any] = field(default_factory=dict)


class Tally(enum.StrEnum):
    """What the metrics count; the core decides when each happened."""

    SERVICE_DOWN = "down"  # a health transition UP -> DOWN (not the first decision)
    SERVICE_UP = "up"  # DOWN -> UP
    FAILOVER = "failover"  # a new mode took effect after a kernel or admin event (not start-up)
    PROBE_FAILED = "probe-failed"
    APPLY_FAILED = "apply-failed"
    ALIVE = "alive"  # the safety-net tick: the agent lives (the metrics file is rewritten)
    CONNECTIONS_RESET = "connections-reset"  # ``n`` connections of ``family`` ended in ``mode``


@dataclass(frozen=True)
class Count:
    """Count ``what`` in the metrics; ``latency_ns``: a failover's, from the event to the rule
    in effect; ``check``: the probe check that failed."""

    what: Tally
    latency_ns: int = 0
    check: str = ""
    mode: str = ""
    family: str = ""
    n: int = 0


@dataclass(frozen=True)
class Status:
    """What the agent believes now: the one value the status file, sd_notify STATUS, the
    metrics and the agent check all render from."""

    health: Health
    mode: Mode | None
    admin: AdminBlock | None
    reason: str  # the last probe failure, "" when the last probe passed
    ready: bool = False  # the kernel holds the first decision: the agent check may answer
    fleet: Guard | None = None  # the fleet guard's state, with [fleet]


@dataclass(frozen=True)
class Publish:
    """Publish ``status``."""

    status: Status


class NotifyKind(enum.StrEnum):
    """What the service manager is told."""

    READY = "ready"
    STOPPING = "stopping"


@dataclass(frozen=True)
class Notify:
    """Tell the service manager ``what``."""

    what: NotifyKind


@dataclass(frozen=True)
class Exit:
    """End the process with ``code``; ``flush_ns`` set: at once, after flushing the log for at
    most that long (nothing else is waited for)."""

    code: int
    flush_ns: int | None = None


@dataclass(frozen=True)
class ResetConnections:
    """End the established connections to the port from peers other than this host (off the
    event loop); ``idle_only``: only those idle for ``quiet_ms`` (``watcher.core.sessions``).
    Answer with ConnectionsReset."""

    idle_only: bool
    quiet_ms: int = 0


@dataclass(frozen=True)
class SweepAt:
    """Feed ``SweepDue`` at ``at_ns``."""

    at_ns: int


@dataclass(frozen=True)
class AskPermit:
    """Ask the fleet for a suspect block: one etcd transaction that sets the member key to
    block only if ``fleet.grant`` allows it; answer with ``PermitAnswer``."""

    since_ns: int  # when the suspect DOWN asked (monotonic)


@dataclass(frozen=True)
class Register:
    """Write the member key: ``mode`` the kernel holds, ``cause`` (health or admin), since when
    (monotonic); ``slot``: the member keeps its maintenance slot (else it is released)."""

    mode: Mode
    cause: str
    since_ns: int
    slot: bool = False


Action = (SetFirewall | RemoveChain | ProbeAt | RetryAt | ReadAdminAt | StopBoundAt | Log
          | Count | Publish | Notify | Exit | ResetConnections | SweepAt | AskPermit | Register)


# ------------------------------------------------------------------------------------ pure parts

def outranks(new: Trigger, cur: Trigger) -> bool:
    """True when ``new`` should replace the pending ``cur``: stronger evidence, or as strong
    and earlier (the round names the event that proved it; its latency runs from that event)."""
    if new.evidence is not cur.evidence:
        return new.evidence is Evidence.DEATH
    return new.monotonic_ns < cur.monotonic_ns


def initial(params: Params, admin: AdminBlock | None = None, guard: Guard | None = None) -> State:
    """The state at start-up: STARTING, nothing applied, the persisted admin block if any, the
    fleet guard if configured."""
    return State(params=params, admin=admin, guard=guard)


def desired_mode(s: State) -> Mode | None:
    """The mode ``s`` calls for; None while STARTING without an admin block (leave as is)."""
    if s.admin is not None:
        return Mode.DRAIN if s.admin.drain else Mode.BLOCK
    if s.health is Health.UP:
        return Mode.OPEN
    if s.health is Health.DOWN:
        if s.guard is not None and s.guard.suspect and not allows_suspect_block(s.guard, s.applied):
            return Mode.OPEN  # the fleet guard keeps a suspect DOWN open
        return Mode.BLOCK
    return None


def _status(s: State) -> Status:
    return Status(s.health, s.applied, s.admin, s.last_failure, s.ready, s.guard)


def _trig(t: Trigger | None) -> dict[str, Any]:
    return {} if t is None else {"trigger": str(t.source), "detail": t.detail}


def _on_pass(s: State, reason: str, now: int) -> tuple[State, str, int | None]:
    """Next state after a pass, the reason of a transition ("" if none), when to probe again."""
    p = s.params
    if s.health is Health.STARTING:
        return replace(s, health=Health.UP, passes=1, fails=0, last_pass_ns=now), reason, None
    if s.health is Health.UP:
        return replace(s, passes=s.passes + 1, fails=0, last_pass_ns=now), "", None
    if s.passes > 0 and s.last_pass_ns is not None and now < s.last_pass_ns + p.rise_interval_ns:
        return replace(s, fails=0), "", s.last_pass_ns + p.rise_interval_ns
    passes = s.passes + 1
    if passes >= p.rise:
        return (replace(s, health=Health.UP, passes=passes, fails=0, last_pass_ns=now),
                f"{passes} passes in a row: {reason}", None)
    return replace(s, passes=passes, fails=0, last_pass_ns=now), "", now + p.rise_interval_ns


def _on_fail(s: State, reason: str, death: bool) -> tuple[State, str]:
    """Next state after a failure and the reason of a transition ("" if none)."""
    fails = s.fails + 1
    nxt = replace(s, passes=0, fails=fails, last_pass_ns=None)
    if s.health is Health.STARTING:
        return replace(nxt, health=Health.DOWN), reason
    if s.health is Health.UP:
        if death:
            return replace(nxt, health=Health.DOWN), f"confirmed by kernel event: {reason}"
        if fails >= s.params.fall:
            return replace(nxt, health=Health.DOWN), f"{fails} failures in a row: {reason}"
    return nxt, ""


def _want(s: State, cause: Trigger | None, why: str, probe_ns: int | None) -> State:
    """Remember why the wanted mode is what it is now, if it changed."""
    return replace(s, cause=cause, why=why, probe_ns=probe_ns)


_ACTION = {Mode.OPEN: Event.FIREWALL_UNBLOCK, Mode.BLOCK: Event.FIREWALL_BLOCK,
           Mode.DRAIN: Event.FIREWALL_DRAIN}
_TRANSITION = {(Health.STARTING, Health.UP): Event.SERVICE_INITIAL_UP,
               (Health.STARTING, Health.DOWN): Event.SERVICE_INITIAL_DOWN,
               (Health.DOWN, Health.UP): Event.SERVICE_UP, (Health.UP, Health.DOWN): Event.SERVICE_DOWN}


def _probed(s: State, i: Probed, now: int, out: list[Action]) -> State:
    if not i.ok:
        out.append(Count(Tally.PROBE_FAILED, check=i.check))
    if not i.ok and i.reason != s.last_failure:
        out.append(Log(LogLevel.INFO, Event.PROBE_FAILED, {"reason": i.reason, "check": i.check,
                                                **_trig(i.trigger)}))
    death = i.proves_death or i.trigger.evidence is Evidence.DEATH
    before = desired_mode(s)
    if i.ok:
        nxt, reason, again = _on_pass(s, i.reason, now)
        nxt = replace(nxt, last_failure="")
    else:
        (nxt, reason), again = _on_fail(s, i.reason, death), None
        nxt = replace(nxt, last_failure=i.reason)
        if nxt.guard is not None:
            g = replace(nxt.guard, suspect=not is_proven(i.check, death))
            if s.health is not Health.DOWN:
                g = replace(g, down_cause=i.trigger)
            nxt = replace(nxt, guard=g)
    if nxt.health is not s.health:
        out.append(Log(LogLevel.INFO, _TRANSITION[s.health, nxt.health], {
            "reason": reason, **_trig(i.trigger), "health.state": nxt.health.value}))
        if s.health is not Health.STARTING:
            out.append(Count(Tally.SERVICE_UP if nxt.health is Health.UP else Tally.SERVICE_DOWN))
    if desired_mode(nxt) is not before:
        nxt = _want(nxt, i.trigger, reason or i.reason, i.duration_ns)
    if again is not None:
        out.append(ProbeAt(again))
    return nxt


def _admin(s: State, i: AdminRead, out: list[Action]) -> State:
    if i.expires_at_ns is not None:
        out.append(ReadAdminAt(i.expires_at_ns))
    if i.block == s.admin:
        if i.expired is not None:  # ended before it was honoured here (no agent was running)
            out.append(Log(LogLevel.INFO, Event.ADMIN_UNBLOCK, {"reason": "expired", "until": i.expired,
                                                     **_trig(i.trigger)}))
        return s
    nxt = replace(s, admin=i.block)
    if i.block is not None:
        out.append(Log(LogLevel.INFO, Event.ADMIN_BLOCK, {"reason": i.block.reason, "drain": i.block.drain,
                                               **_trig(i.trigger)}))
        why = f"admin: {i.block.reason}" if i.block.reason else "admin"
    else:
        until = None if s.admin is None else s.admin.until
        ended = i.expired is not None or (until is not None and i.wall >= until)
        reason = "expired" if ended else "lifted"
        out.append(Log(LogLevel.INFO, Event.ADMIN_UNBLOCK, {"reason": reason, "until": until,
                                                 **_trig(i.trigger)}))
        why = f"admin block {reason}"
    if desired_mode(nxt) is not desired_mode(s):
        nxt = _want(nxt, i.trigger, why, None)
    return nxt





def _applied(s: State, i: Applied, out: list[Action]) -> State:
    c = s.in_flight
    assert c is not None
    nxt = replace(s, in_flight=None, applied=c.mode, failures=0, retry_at_ns=None)
    if c.final:
        return _exit(nxt, EX_OK, out)
    assert c.mode is not None
    if not c.repair:  # a new mode (or the first after start or a failure): a transition
        fields: dict[str, Any] = {"reason": c.reason, **_trig(c.cause),
                                  "transactions": i.transactions, "families": list(i.changed)}
        if c.cause is not None:
            latency = (i.committed_ns or 0) - c.cause.monotonic_ns
            if i.committed_ns is not None and latency >= 0:
                fields |= {"latency_ms": round(latency / 1e6, 3), "event.duration": latency}
                if c.cause.source is not Source.STARTUP:  # a start-up decision is no failover
                    out.append(Count(Tally.FAILOVER, latency_ns=latency))
        if c.probe_ns is not None:
            fields["probe_ms"] = round(c.probe_ns / 1e6, 3)
        fields["apply_ms"] = round(i.duration_ns / 1e6, 3)
        out.append(Log(LogLevel.INFO, _ACTION[c.mode], fields))
    elif i.changed:
        out.append(Log(LogLevel.WARNING, Event.FIREWALL_REPAIR, {
            **_trig(c.cause), "mode": str(c.mode), "families": list(i.changed),
            "reason": "chain or jump changed by someone else; restored"}))
    if not nxt.ready:
        nxt = replace(nxt, ready=True)
        out.append(Notify(NotifyKind.READY))
        out.append(Log(LogLevel.INFO, Event.AGENT_READY, {"mode": str(c.mode),
                                               "health.state": nxt.health.value}))
    if (c.mode in (Mode.BLOCK, Mode.DRAIN) and (not c.repair or i.changed)
            and desired_mode(nxt) is c.mode and nxt.stop_at_ns is None):
        nxt = _request_reset(replace(nxt, sweep_at_ns=None), c.mode is Mode.DRAIN, out)
    return nxt


# ------------------------------------------------------------------------------------ sessions

def _request_reset(s: State, idle_only: bool, out: list[Action]) -> State:
    """Issue a ResetConnections (or queue it behind the one in flight) unless resets are off."""
    if s.params.established != "reset" or s.reset_off:
        return s
    if s.resetting:  # a full reset supersedes an idle one
        nxt = idle_only if s.reset_next is None else (s.reset_next and idle_only)
        return replace(s, reset_next=nxt)
    out.append(ResetConnections(idle_only, s.params.drain_quiet_ms if idle_only else 0))
    return replace(s, resetting=True)


def _draining(s: State) -> bool:
    """The kernel holds a drain and a drain is wanted (a repair in flight does not stop it)."""
    return s.applied is Mode.DRAIN and desired_mode(s) is Mode.DRAIN


def _connections_reset(s: State, i: ConnectionsReset, now: int, out: list[Action]) -> State:
    s = replace(s, resetting=False)
    if i.unsupported:
        reason = (f"{i.error}: this kernel cannot end sockets (CONFIG_INET_DIAG_DESTROY); "
                  "established connections are left to end by themselves, the rule stays")
        out.append(Log(LogLevel.WARNING, Event.CONNECTIONS_RESET_FAILED, {"reason": reason}))
        return replace(s, reset_off=reason, reset_next=None, sweep_at_ns=None)
    if i.error and i.error != s.reset_error:
        out.append(Log(LogLevel.WARNING, Event.CONNECTIONS_RESET_FAILED, {
            "reason": f"{i.error}; the rule stays in force", "drain": i.idle_only}))
    s = replace(s, reset_error=i.error)
    ipv4, ipv6 = i.reset.get("ipv4", 0), i.reset.get("ipv6", 0)
    if ipv4 or ipv6 or not i.idle_only:
        out.append(Log(LogLevel.INFO, Event.CONNECTIONS_RESET, {
            "reset_ipv4": ipv4, "reset_ipv6": ipv6, "kept": i.kept, "drain": i.idle_only,
            "event.duration": i.duration_ns}))
        for family, n in (("ipv4", ipv4), ("ipv6", ipv6)):
            if n:
                out.append(Count(Tally.CONNECTIONS_RESET, mode="drain" if i.idle_only else "block",
                                 family=family, n=n))
    if s.reset_next is not None:
        nxt, s = s.reset_next, replace(s, reset_next=None)
        if _draining(s) if nxt else s.applied is Mode.BLOCK and desired_mode(s) is Mode.BLOCK:
            return _request_reset(s, nxt, out)
    if _draining(s):
        out.append(SweepAt(now + s.params.drain_sweep_ns))
        return replace(s, sweep_at_ns=now + s.params.drain_sweep_ns)
    return s


def _sweep_due(s: State, out: list[Action]) -> State:
    if s.sweep_at_ns is None:
        return s
    s = replace(s, sweep_at_ns=None)
    return _request_reset(s, True, out) if _draining(s) else s


def _failed(s: State, i: ApplyFailed, now: int, out: list[Action]) -> State:
    c = s.in_flight
    assert c is not None
    what = "remove" if c.mode is None else str(c.mode)
    # A failed change changed nothing, but what the kernel held before is no longer known for
    # sure (someone may have changed it): the retry plans from a fresh read.
    nxt = replace(s, in_flight=None, applied=None, failures=s.failures + 1)
    out.append(Count(Tally.APPLY_FAILED))
    if c.final:
        out.append(Log(LogLevel.ERROR, Event.APPLY_FAILED, {"reason": f"on_exit={s.params.on_exit}: "
                                                 f"{i.reason}", "mode": what}))
        return _exit(nxt, EX_TEMPFAIL, out)
    if i.fatal is not None:
        out.append(Log(LogLevel.ERROR, Event.APPLY_FAILED, {"reason": i.reason, "mode": what, "fatal": True}))
        return _exit(nxt, i.fatal, out)
    p = s.params
    delay = min(p.retry_max_ns, p.retry_min_ns << min(nxt.failures - 1, 40))
    out.append(Log(LogLevel.ERROR, Event.APPLY_FAILED, {"reason": i.reason, "mode": what,
                                             "retry_in_s": round(delay / 1e9, 3)}))
    if s.stop_at_ns is not None:
        return nxt  # stopping: on_exit comes next, no retry
    out.append(RetryAt(now + delay))
    return replace(nxt, retry_at_ns=now + delay)


def _exit(s: State, code: int, out: list[Action]) -> State:
    out.append(Log(LogLevel.INFO, Event.AGENT_STOP, {"on_exit": s.params.on_exit, "exit_code": code}))
    out.append(Exit(code))
    return replace(s, exited=True, in_flight=None)


def _stop_sequence(s: State, now: int, out: list[Action]) -> State:
    """The on_exit change once nothing is in flight, then the exit."""
    assert s.stop_at_ns is not None
    deadline = min(now + s.params.attempt_ns, s.stop_at_ns + s.params.stop_grace_ns)
    how = s.params.on_exit
    if how is OnExit.KEEP:
        return _exit(s, EX_OK, out)
    if how is OnExit.OPEN and s.admin is not None:
        out.append(Log(LogLevel.INFO, Event.FIREWALL_KEEP, {"reason": "admin block recorded: kept on exit"}))
        return _exit(s, EX_OK, out)
    if how is OnExit.REMOVE:
        out.append(RemoveChain(deadline))
        return replace(s, in_flight=_Change(None, None, "on_exit", None, final=True))
    out.append(SetFirewall(Mode.OPEN, fresh=True, deadline_ns=deadline))
    return replace(s, in_flight=_Change(Mode.OPEN, None, "on_exit", None, final=True))


def _reconcile(s: State, now: int, out: list[Action]) -> State:
    """Issue the next firewall change when none is in flight and one is needed."""
    if s.exited or s.in_flight is not None:
        return s
    if s.stop_at_ns is not None:
        return _stop_sequence(s, now, out)
    if s.retry_at_ns is not None:
        return s  # backing off: RetryDue comes
    want = desired_mode(s)
    if want is None or (want is s.applied and s.repair_due is None):
        return s
    repair = want is s.applied
    out.append(SetFirewall(want, fresh=repair or s.applied is None,
                           deadline_ns=now + s.params.attempt_ns))
    if repair:
        change = _Change(want, s.repair_due, "repair", None, repair=True)
    else:
        why = f"retry after failure: {s.why}" if s.failures else s.why
        change = _Change(want, s.cause, why, s.probe_ns)
    return replace(s, in_flight=change, repair_due=None)


def _needs_permit(s: State) -> bool:
    """A suspect DOWN, no admin block, no permit yet: the guard must ask before blocking."""
    g = s.guard
    return (g is not None and s.health is Health.DOWN and g.suspect and not g.permit
            and s.admin is None and s.stop_at_ns is None)


def _fleet_input(s: State, inp: Input, out: list[Action]) -> tuple[State, bool]:
    """Fold a fleet input into the guard; True when the guard should ask again if refused."""
    g = s.guard
    if g is None:
        return s, False
    nudge = False
    match inp:
        case PermitAnswer() if not g.asking:
            pass  # a late answer from before the connection was lost: re-registering fixes it
        case PermitAnswer(granted=True):
            g = replace(g, asking=False, registered=(str(Mode.BLOCK), "health"), refused=None)
            if _needs_permit(s):
                g = replace(g, permit=True, again=False)
                out.append(Log(LogLevel.INFO, Event.FLEET_GUARD_GRANTED, {
                    "reason": s.last_failure, "open_members": inp.open_count,
                    "not_open": list(inp.not_open), "min_open": g.min_open}))
                s = replace(s, guard=g)
                return (_want(s, g.down_cause, f"fleet permit granted: {s.last_failure}", None),
                        False)
        case PermitAnswer(granted=False):
            nudge, g = g.again, replace(g, asking=False, again=False)
            if _needs_permit(s) and inp.not_open != g.refused:
                out.append(Log(LogLevel.WARNING, Event.FLEET_GUARD_REFUSED, {
                    "reason": inp.error or s.last_failure, "not_open": list(inp.not_open),
                    "open_members": inp.open_count, "min_open": g.min_open,
                    "group_size": g.size, "mode": str(s.applied) if s.applied else None}))
            if _needs_permit(s):
                g = replace(g, refused=inp.not_open)
        case FleetChanged(view=view):
            g, nudge = replace(g, view=view, again=g.asking), True
        case FleetReachable():
            if g.reachable is False:
                out.append(Log(LogLevel.INFO, Event.FLEET_REACHABLE, {"mode": str(s.applied)
                                                               if s.applied else None}))
            g, nudge = replace(g.lost(), reachable=True), True
        case FleetUnreachable(reason=reason):
            if g.reachable is not False:
                out.append(Log(LogLevel.WARNING, Event.FLEET_UNREACHABLE, {
                    "reason": reason, "unreachable_policy": g.unreachable}))
            g = replace(g.lost(), reachable=False)
        case Tick():
            nudge = True
    return replace(s, guard=g), nudge


def _fleet_after(s: State, nudge: bool, now: int, out: list[Action]) -> State:
    """Ask for a permit when one is needed, and keep the member key saying what the kernel
    holds (never before the kernel holds it, except the permit's own block)."""
    g = s.guard
    if g is None or s.exited:
        return s
    if s.health is not Health.DOWN and (g.permit or g.refused is not None):
        g = replace(g, permit=False, refused=None)  # recovered: the next DOWN asks anew
    s = replace(s, guard=g)
    if g.reachable is True and s.applied is not None:
        want = desired_mode(s)
        if g.permit and want is Mode.BLOCK:
            reg = (str(Mode.BLOCK), "health")
        elif g.registered is not None and (g.asking or (want is not None and want is not s.applied)):
            reg = g.registered  # the transaction or the kernel change comes first
        else:
            admin = s.admin is not None and s.applied is not Mode.OPEN
            reg = (str(s.applied), "admin" if admin else "health")
        if reg != g.registered:
            out.append(Register(Mode(reg[0]), reg[1], now, slot=reg[1] == "admin"))
            g = replace(g, registered=reg)
    s = replace(s, guard=g)
    if (_needs_permit(s) and g.reachable is True and not g.asking
            and (g.refused is None or nudge)):
        out.append(AskPermit(now))
        g = replace(g, asking=True, again=False)
    return replace(s, guard=g)


def step(s: State, inp: Input, now_ns: int) -> tuple[State, tuple[Action, ...]]:
    """The next state and the actions to carry out, in order, for ``inp`` at ``now_ns``."""
    if s.exited:
        return s, ()
    out: list[Action] = []
    before = _status(s)
    s, nudge = _fleet_input(s, inp, out)
    match inp:
        case Probed():
            s = _probed(s, inp, now_ns, out)
        case AdminRead():
            s = _admin(s, inp, out)
        case Applied():
            s = _applied(s, inp, out)
        case ApplyFailed():
            s = _failed(s, inp, now_ns, out)
        case RetryDue():
            s = replace(s, retry_at_ns=None)
        case ConnectionsReset():
            s = _connections_reset(s, inp, now_ns, out)
        case SweepDue():
            s = _sweep_due(s, out)
        case Tick(trigger=trigger):
            # Only what was applied can be repaired; a failed change is being retried anyway.
            s = replace(s, repair_due=trigger if s.applied is not None else None)
            out.append(Count(Tally.ALIVE))
        case Reloaded(params=None):
            out.append(Log(LogLevel.ERROR, Event.CONFIG_INVALID, {"reason": inp.error, "path": inp.path}))
            if s.ready:
                out.append(Notify(NotifyKind.READY))
        case Reloaded(params=Params() as params):
            if inp.note:
                out.append(Log(LogLevel.WARNING, Event.CONFIG_RELOAD, {"reason": inp.note}))
            out.append(Log(LogLevel.INFO, Event.CONFIG_RELOAD, {"path": inp.path}))
            s = replace(s, params=params)
            if s.ready:
                out.append(Notify(NotifyKind.READY))
        case Stop():
            if s.stop_at_ns is None:
                out.append(Notify(NotifyKind.STOPPING))
                out.append(StopBoundAt(now_ns + s.params.stop_grace_ns + _S))
                s = replace(s, stop_at_ns=now_ns)
            else:  # a second signal: exit at once, as 128 + its number, the log flushed first
                code = 128 + inp.signum
                out.append(Log(LogLevel.WARNING, Event.AGENT_STOP, {
                    "reason": f"second {inp.signame}: exiting at once", "exit_code": code}))
                out.append(Exit(code, flush_ns=s.params.abort_flush_ns))
                return replace(s, exited=True), tuple(out)
        case StopBound() if s.stop_at_ns is not None:
            # The changes are bounded by their deadlines; this only guards the bound itself.
            # What is in flight stays recorded: the shell does not wait for it.
            out.append(Log(LogLevel.ERROR, Event.AGENT_STOP, {"reason": "stop bound passed",
                                                              "exit_code": EX_TEMPFAIL}))
            out.append(Exit(EX_TEMPFAIL))
            return replace(s, exited=True), tuple(out)
    s = _fleet_after(s, nudge, now_ns, out)  # an AskPermit's "asking" keeps a held block held
    s = _reconcile(s, now_ns, out)
    s = _fleet_after(s, False, now_ns, out)
    if not s.exited and _status(s) != before:
        out.append(Publish(_status(s)))
    return s, tuple(out)

