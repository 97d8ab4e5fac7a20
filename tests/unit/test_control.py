"""The control core: health rules by example, invariants as a hypothesis state machine, and
timed properties over random service timelines."""

from __future__ import annotations

import heapq
from dataclasses import dataclass, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from rules.model import Mode
from watcher.config import Config, FirewallConfig, LogLevel, ProbeConfig
from watcher.core import control
from watcher.core.control import (
    AdminBlock,
    AdminRead,
    Applied,
    ApplyFailed,
    ConnectionsReset,
    Count,
    Exit,
    Health,
    Log,
    Notify,
    NotifyKind,
    Params,
    ProbeAt,
    Probed,
    Publish,
    RemoveChain,
    ResetConnections,
    RetryAt,
    RetryDue,
    SetFirewall,
    State,
    Stop,
    StopBound,
    StopBoundAt,
    SweepAt,
    SweepDue,
    Tally,
    Tick,
    desired_mode,
    initial,
    step,
)
from watcher.core.triggers import Evidence, Source, Trigger

MS = 1_000_000
P = Params(rise=3, fall=2, rise_interval_ns=250 * MS)
T0 = 10_000 * MS
HINT = Trigger(Source.TIMER, "safety-net", T0)
DEATH = Trigger(Source.PIDFD, "exit pid 7", T0, Evidence.DEATH)
BLOCK = AdminBlock(drain=False, reason="maintenance")
DRAIN = AdminBlock(drain=True, reason="upgrade")
OK = Applied(("ipv4",), 1, T0, MS)


def probed(ok: bool, trig: Trigger = HINT, *, death: bool = False) -> Probed:
    """A probe verdict for ``trig``."""
    return Probed(trig, ok, "http" if ok else "connect", "fine" if ok else "refused", death, MS)


def sets(actions: tuple[control.Action, ...]) -> list[Mode]:
    """The modes of the SetFirewall actions, in order."""
    return [a.mode for a in actions if isinstance(a, SetFirewall)]


def logged(actions: tuple[control.Action, ...]) -> list[str]:
    """The events of the Log actions, in order."""
    return [a.event for a in actions if isinstance(a, Log)]


def settle(s: State, inp: control.Input, now: int = T0) -> tuple[State, list[control.Action]]:
    """Feed ``inp``, then answer every firewall change at once with success; all actions."""
    out: list[control.Action] = []
    pending: list[control.Input] = [inp]
    while pending:
        s, acts = step(s, pending.pop(0), now)
        out += acts
        pending += [replace(OK, committed_ns=now) for a in acts
                    if isinstance(a, SetFirewall | RemoveChain)]
    return s, out


def test_params_from_config() -> None:
    """Params.from_config takes rise, fall, rise_interval_ms (as ns), on_exit and the lock bound."""
    cfg = Config(probe=ProbeConfig(rise=4, fall=3, rise_interval_ms=125),
                 firewall=FirewallConfig(on_exit="keep", lock_wait_s=2.0))
    p = Params.from_config(cfg)
    assert (p.rise, p.fall, p.rise_interval_ns, p.on_exit) == (4, 3, 125 * MS, "keep")
    assert p.attempt_ns == 3_000_000_000


def test_params_defaults_are_the_configurations() -> None:
    """Params() holds the configuration's defaults, read from watcher.config, not repeated."""
    assert Params() == Params.from_config(Config())


def test_params_reject_nonsense() -> None:
    """Zero rise or fall, a negative interval or an unknown on_exit is refused."""
    for bad in ({"rise": 0}, {"fall": 0}, {"rise_interval_ns": -1}, {"on_exit": "flush"}):
        with pytest.raises(ValueError):
            Params(**bad)  # type: ignore[arg-type]  # the test passes each field by name


def test_first_probe_decides_and_ready_follows_the_kernel() -> None:
    """STARTING: a failure blocks at once; READY only after the change is applied."""
    s, acts = step(initial(P), probed(False), T0)
    assert s.health is Health.DOWN and sets(acts) == [Mode.BLOCK]
    assert not any(isinstance(a, Notify) for a in acts)
    s, acts = step(s, OK, T0 + MS)
    assert s.applied is Mode.BLOCK and s.ready
    assert Notify("ready") in acts and "firewall-block" in logged(acts)


def test_up_needs_fall_failures_or_one_proof_of_death() -> None:
    """UP: one plain failure keeps the chain open, the fall-th blocks; a death blocks at once."""
    s, _ = settle(initial(P), probed(True))
    s1, acts = settle(s, probed(False))
    assert s1.health is Health.UP and not sets(acts)
    s2, acts = settle(s1, probed(False))
    assert s2.health is Health.DOWN and sets(acts) == [Mode.BLOCK]
    for proof in (probed(False, DEATH), probed(False, death=True)):
        s3, acts = settle(s, proof)
        assert s3.health is Health.DOWN and sets(acts) == [Mode.BLOCK], proof


def test_rise_counts_only_spaced_passes() -> None:
    """DOWN: passes closer than rise_interval neither count nor reset; rise spaced ones go UP."""
    s, _ = settle(initial(P), probed(False))
    s, acts = settle(s, probed(True), T0)
    assert ProbeAt(T0 + 250 * MS) in acts and s.passes == 1
    s, acts = settle(s, probed(True), T0 + 100 * MS)
    assert s.passes == 1 and ProbeAt(T0 + 250 * MS) in acts
    s, _ = settle(s, probed(True), T0 + 250 * MS)
    s, acts = settle(s, probed(True), T0 + 500 * MS)
    assert s.health is Health.UP and sets(acts) == [Mode.OPEN]


def test_admin_block_overrides_health_and_unblock_returns_to_it() -> None:
    """A drain holds whatever health does; lifting it applies the mode health calls for."""
    s, _ = settle(initial(P), probed(True))
    s, acts = settle(s, AdminRead(HINT, DRAIN))
    assert sets(acts) == [Mode.DRAIN] and "admin-block" in logged(acts)
    s, acts = settle(s, probed(False, DEATH))
    assert s.health is Health.DOWN and not sets(acts)
    s, acts = settle(s, AdminRead(HINT, None, expired=T0 / 1e9))
    assert sets(acts) == [Mode.BLOCK]
    unblock = next(a for a in acts if isinstance(a, Log) and a.event == "admin-unblock")
    assert unblock.fields["reason"] == "expired"


def test_a_timed_block_asks_to_be_read_again_when_it_ends() -> None:
    """An admin record with an end on the monotonic clock: ReadAdminAt that time."""
    _, acts = settle(initial(P), AdminRead(HINT, replace(BLOCK, until=1e9), expires_at_ns=T0 * 2))
    assert control.ReadAdminAt(T0 * 2) in acts and sets(acts) == [Mode.BLOCK]


def test_failed_change_is_retried_with_backoff_and_the_mode_wanted_then() -> None:
    """Each failure doubles the delay up to the bound; the retry applies the current wish."""
    s, acts = step(initial(P), probed(False), T0)
    delays = []
    for n in range(8):
        s, acts = step(s, ApplyFailed("lock busy"), T0)
        retry = next(a for a in acts if isinstance(a, RetryAt))
        delays.append(retry.at_ns - T0)
        assert not sets(acts)
        if n == 2:
            s, acts = step(s, probed(True), T0)  # health changes while backing off
        s, acts = step(s, RetryDue(), T0)
        assert len(sets(acts)) == 1
    assert delays == [100 * MS, 200 * MS, 400 * MS, 800 * MS, 1600 * MS, 3200 * MS,
                      5000 * MS, 5000 * MS]


def test_a_fatal_failure_exits_with_its_code() -> None:
    """A failure that retrying cannot mend (a foreign chain) ends the run with its code."""
    s, _ = step(initial(P), probed(True), T0)
    s, acts = step(s, ApplyFailed("chain belongs to someone else", fatal=78), T0)
    assert Exit(78) in acts and s.exited
    assert step(s, probed(False), T0) == (s, ())


@pytest.mark.parametrize(("on_exit", "admin", "final"), [
    ("open", None, Mode.OPEN), ("open", BLOCK, None), ("keep", None, None),
    ("remove", None, "remove")])
def test_stop_waits_for_the_change_in_flight_then_applies_on_exit(
        on_exit: str, admin: AdminBlock | None, final: object) -> None:
    """Stop while a change is in flight: nothing new until it ends; then on_exit; one Exit 0."""
    s = initial(replace(P, on_exit=on_exit), admin)
    s, acts = step(s, probed(False), T0)
    assert sets(acts) == [Mode.BLOCK]
    s, acts = step(s, Stop("SIGTERM"), T0)
    assert Notify("stopping") in acts and not sets(acts) and not any(isinstance(a, Exit) for a in acts)
    s, acts = step(s, OK, T0)
    if final is None:
        assert acts[-1] == Exit(0) and not sets(acts)
        return
    change = next(a for a in acts if isinstance(a, SetFirewall | RemoveChain))
    assert (change.mode if isinstance(change, SetFirewall) else "remove") == final
    assert change.deadline_ns <= T0 + P.stop_grace_ns
    s, acts = step(s, OK, T0)
    assert acts[-1] == Exit(0)


def test_on_exit_that_fails_exits_75() -> None:
    """The on_exit change failing (the lock held to the end) exits 75, logged."""
    s, _ = settle(initial(P), probed(True))
    s, acts = step(s, Stop("SIGTERM"), T0)
    s, acts = step(s, ApplyFailed("lock busy"), T0)
    assert acts[-1] == Exit(75) and "apply-failed" in logged(acts)


def test_tick_repairs_what_was_applied_from_a_fresh_read() -> None:
    """A tick asks for the applied mode again, fresh; a change found is logged as a repair."""
    s, _ = settle(initial(P), probed(True))
    tick = Trigger(Source.TIMER, "safety-net", T0)
    s, acts = step(s, Tick(tick), T0)
    assert [a for a in acts if isinstance(a, SetFirewall)] == [
        SetFirewall(Mode.OPEN, fresh=True, deadline_ns=T0 + P.attempt_ns)]
    s, acts = step(s, OK, T0)
    repair = next(a for a in acts if isinstance(a, Log))
    assert repair.event == "firewall-repair" and repair.fields["trigger"] == "timer"


def test_latency_runs_from_the_event_behind_the_wish() -> None:
    """firewall-block's event.duration is the commit time minus the proving event's time."""
    s, _ = settle(initial(P), probed(True))
    death = Trigger(Source.PIDFD, "exit pid 7", T0 + 5 * MS, Evidence.DEATH)
    s, _ = step(s, probed(False, death), T0 + 6 * MS)
    s, acts = step(s, Applied(("ipv4",), 1, T0 + 8 * MS, 2 * MS), T0 + 9 * MS)
    block = next(a for a in acts if isinstance(a, Log) and a.event == "firewall-block")
    assert block.fields["event.duration"] == 3 * MS and block.fields["trigger"] == "pidfd"


def counts(actions: tuple[control.Action, ...] | list[control.Action]) -> list[Count]:
    """The Count actions, in order."""
    return [a for a in actions if isinstance(a, Count)]


def test_second_stop_exits_128_plus_its_signal_after_a_bounded_flush() -> None:
    """A second SIGTERM while the on_exit change is out: Exit(143) at once, with a bounded log
    flush, logged at warning; nothing after it."""
    s, _ = settle(initial(P), probed(True))
    s, acts = step(s, Stop("SIGTERM", 15), T0)
    assert sets(acts) == [Mode.OPEN] and not any(isinstance(a, Exit) for a in acts)
    s, acts = step(s, Stop("SIGTERM", 15), T0 + MS)
    assert acts[-1] == Exit(143, flush_ns=P.abort_flush_ns) and 0 < P.abort_flush_ns <= 1_000 * MS
    stop = next(a for a in acts if isinstance(a, Log))
    assert stop.level is LogLevel.WARNING and stop.fields["exit_code"] == 143
    assert step(s, OK, T0 + 2 * MS)[1] == ()
    s2, _ = settle(initial(P), probed(True))
    s2, _ = step(s2, Stop("SIGINT", 2), T0)
    assert step(s2, Stop("SIGINT", 2), T0)[1][-1].code == 130  # type: ignore[union-attr]


def test_stop_arms_its_bound_once_and_the_bound_exits_75() -> None:
    """The first Stop asks for StopBound at grace + 1 s; when it comes with the on_exit change
    still out, the core exits 75 (logged at error) and keeps the change recorded as in flight."""
    s, _ = settle(initial(P), probed(True))
    s, acts = step(s, Stop("SIGTERM"), T0)
    assert [a for a in acts if isinstance(a, StopBoundAt)] == [
        StopBoundAt(T0 + P.stop_grace_ns + 1_000 * MS)]
    s, acts = step(s, StopBound(), T0 + P.stop_grace_ns + 1_000 * MS)
    assert acts[-1] == Exit(75) and s.exited and s.in_flight is not None
    assert next(a for a in acts if isinstance(a, Log)).level is LogLevel.ERROR


def test_stop_bound_before_any_stop_is_ignored() -> None:
    """A StopBound with no stop under way changes nothing."""
    s, _ = settle(initial(P), probed(True))
    assert step(s, StopBound(), T0) == (s, ())


def test_what_the_metrics_count_is_decided_by_the_core() -> None:
    """Start-up decisions are no failover; a kernel-proven block is, with its latency; each failed
    probe, health transition after start, failed change and tick is counted once."""
    s, acts = settle(initial(P), probed(True, Trigger(Source.STARTUP, "first probe", T0)))
    assert counts(acts) == []
    death = Trigger(Source.PIDFD, "exit pid 7", T0 + 5 * MS, Evidence.DEATH)
    s, acts = step(s, probed(False, death), T0 + 6 * MS)
    assert counts(acts) == [Count(Tally.PROBE_FAILED, check="connect"), Count(Tally.SERVICE_DOWN)]
    s, acts = step(s, ApplyFailed("busy"), T0 + 7 * MS)
    assert counts(acts) == [Count(Tally.APPLY_FAILED)]
    s, acts = step(s, RetryDue(), T0 + 200 * MS)
    s, acts = step(s, Applied(("ipv4",), 1, T0 + 208 * MS, MS), T0 + 209 * MS)
    assert counts(acts) == [Count(Tally.FAILOVER, latency_ns=203 * MS)]
    s, acts = step(s, Tick(HINT), T0 + 300 * MS)
    assert Count(Tally.ALIVE) in counts(acts)


def test_status_says_ready_once_the_kernel_holds_the_first_decision() -> None:
    """Publish carries ready=False until the first change is applied, then ready=True: the
    agent-check listener opens on the core's word."""
    s, acts = step(initial(P), probed(True), T0)
    assert all(not a.status.ready for a in acts if isinstance(a, Publish))
    s, acts = step(s, OK, T0)
    published = [a.status for a in acts if isinstance(a, Publish)]
    assert published and published[-1].ready and Notify(NotifyKind.READY) in acts
# --------------------------------------------------------------------- established connections

def resets(actions: tuple[control.Action, ...] | list[control.Action]) -> list[ResetConnections]:
    """The ResetConnections actions, in order."""
    return [a for a in actions if isinstance(a, ResetConnections)]


def test_full_block_resets_established_connections_after_the_rule_is_in_effect() -> None:
    """Ill health: SetFirewall(BLOCK) first, ResetConnections(all) only with its Applied."""
    s, _ = settle(initial(P), probed(True))
    s, acts = step(s, probed(False, DEATH), T0)
    assert sets(acts) == [Mode.BLOCK] and not resets(acts)
    s, acts = step(s, OK, T0 + MS)
    assert resets(acts) == [ResetConnections(idle_only=False, quiet_ms=0)]
    s, acts = step(s, ConnectionsReset(False, {"ipv4": 3, "ipv6": 1}, duration_ns=MS), T0 + 2 * MS)
    log = next(a for a in acts if isinstance(a, Log))
    assert log.event == "connections-reset" and log.level == "info"
    assert (log.fields["reset_ipv4"], log.fields["reset_ipv6"], log.fields["drain"]) == (3, 1, False)
    assert not any(isinstance(a, SweepAt) for a in acts), "a full block does not sweep"


def test_established_keep_never_resets() -> None:
    """established = "keep": neither a full block nor a drain ends a connection."""
    s, _ = settle(initial(replace(P, established="keep")), probed(True))
    s, out = settle(s, probed(False, DEATH))
    assert Mode.BLOCK in sets(out) and not resets(out)
    s, out = settle(s, AdminRead(HINT, DRAIN))
    assert Mode.DRAIN in sets(out) and not resets(out)


def test_drain_ends_idle_connections_and_sweeps_while_it_lasts() -> None:
    """Drain: an idle-only reset with the quiet bound once DRAIN is in effect, then one per
    sweep while the drain lasts; the sweep stops when the drain is lifted."""
    p = replace(P, drain_quiet_ms=50)
    s, _ = settle(initial(p), probed(True))
    s, acts = step(s, AdminRead(HINT, DRAIN), T0)
    assert sets(acts) == [Mode.DRAIN] and not resets(acts)
    s, acts = step(s, OK, T0)
    assert resets(acts) == [ResetConnections(idle_only=True, quiet_ms=50)]
    s, acts = step(s, ConnectionsReset(True, {"ipv4": 2}, kept=1), T0 + MS)
    assert SweepAt(T0 + MS + p.drain_sweep_ns) in acts
    assert [a.fields["kept"] for a in acts if isinstance(a, Log)] == [1]
    s, acts = step(s, SweepDue(), T0 + p.drain_sweep_ns)
    assert resets(acts) == [ResetConnections(idle_only=True, quiet_ms=50)]
    s, acts = step(s, ConnectionsReset(True, {}), T0 + p.drain_sweep_ns)
    assert not any(isinstance(a, Log) for a in acts), "an empty sweep is not logged"
    s, _ = settle(s, AdminRead(HINT, None))
    s, acts = step(s, SweepDue(), T0 + 3 * p.drain_sweep_ns)
    assert not resets(acts)


def test_unsupported_kernel_warns_once_and_is_never_asked_again() -> None:
    """EOPNOTSUPP: one warning, no crash, no change to the rule, and no further rounds."""
    s, _ = settle(initial(P), probed(True))
    s, out = settle(s, probed(False, DEATH))
    assert resets(out)
    s, acts = step(s, ConnectionsReset(False, error="SOCK_DESTROY: Operation not supported",
                                       unsupported=True), T0)
    warns = [a for a in acts if isinstance(a, Log)]
    assert [(w.level, w.event) for w in warns] == [("warning", "connections-reset-failed")]
    assert "CONFIG_INET_DIAG_DESTROY" in warns[0].fields["reason"]
    assert s.applied is Mode.BLOCK and not sets(acts)
    s, out = settle(s, AdminRead(HINT, DRAIN))
    s, out2 = settle(s, AdminRead(HINT, BLOCK))
    assert Mode.DRAIN in sets(out) and Mode.BLOCK in sets(out2)
    assert not resets(out + out2)


def test_failed_round_warns_once_per_reason_and_the_drain_goes_on() -> None:
    """A failing destroy (EPERM): one warning per new reason; the drain keeps sweeping."""
    s, _ = settle(initial(P), probed(True))
    s, _ = settle(s, AdminRead(HINT, DRAIN))
    bad = ConnectionsReset(True, error="SOCK_DESTROY: Operation not permitted")
    s, acts = step(s, bad, T0)
    assert [a.event for a in acts if isinstance(a, Log)] == ["connections-reset-failed"]
    assert any(isinstance(a, SweepAt) for a in acts)
    s, _ = step(s, SweepDue(), T0 + P.drain_sweep_ns)
    s, acts = step(s, bad, T0 + P.drain_sweep_ns)
    assert not any(isinstance(a, Log) for a in acts), "the same failure is said once"


def test_drain_sweep_goes_on_through_a_repair_in_flight() -> None:
    """A safety-net repair in flight when a sweep round answers: the next sweep is still set."""
    s, _ = settle(initial(P), probed(True))
    s, _ = settle(s, AdminRead(HINT, DRAIN))
    s, acts = step(s, Tick(HINT), T0)
    assert sets(acts) == [Mode.DRAIN], "the repair"
    s, acts = step(s, ConnectionsReset(True, {}), T0)
    assert SweepAt(T0 + P.drain_sweep_ns) in acts


def test_block_during_a_drain_round_queues_a_full_reset() -> None:
    """A full block while a drain's idle round is out: the full reset follows that round."""
    s, _ = settle(initial(P), probed(True))
    s, out = settle(s, AdminRead(HINT, DRAIN))
    assert resets(out) == [ResetConnections(True, P.drain_quiet_ms)]
    s, out = settle(s, AdminRead(HINT, BLOCK))
    assert not resets(out), "one round in flight at most"
    s, acts = step(s, ConnectionsReset(True, {}), T0)
    assert resets(acts) == [ResetConnections(False, 0)]


# --------------------------------------------------------------------- the state machine

class Core(RuleBasedStateMachine):
    """Random inputs in any order, firewall results when a change is out; invariants hold."""

    def __init__(self) -> None:
        super().__init__()
        self.s = initial(replace(P, rise=2, fall=2))
        self.now = T0
        self.out: list[control.Action] | None = None
        self.in_flight = 0
        self.retry_pending = False
        self.exits = 0
        self.readies = 0
        self.applied_seen = False
        self.bounds = 0
        self.ready_published = False
        self.resets = 0  # ResetConnections in flight
        self.sweep_pending = False
        self.unsupported = False

    def feed(self, inp: control.Input) -> None:
        """Step the core, check each action against what the model knows."""
        before = self.s
        self.s, acts = step(self.s, inp, self.now)
        stopping_again = isinstance(inp, Stop) and before.stop_at_ns is not None and not before.exited
        if stopping_again:  # a second signal: exit at once, 128 + its number, flush bounded
            assert isinstance(acts[-1], Exit) and acts[-1].code == 128 + inp.signum, acts
            assert acts[-1].flush_ns is not None and 0 < acts[-1].flush_ns <= P.stop_grace_ns
        if isinstance(inp, StopBound) and before.stop_at_ns is not None and not before.exited:
            assert acts[-1] == Exit(75), acts
        if isinstance(inp, Tick) and not before.exited:
            assert counts(acts).count(Count(Tally.ALIVE)) == 1
        if isinstance(inp, Probed) and not before.exited:
            assert counts(acts).count(Count(Tally.PROBE_FAILED, check="c")) == (not inp.ok)
        if isinstance(inp, Applied | ApplyFailed):
            self.in_flight -= 1
            self.applied_seen |= isinstance(inp, Applied)
        if isinstance(inp, ConnectionsReset):
            self.resets -= 1
        assert self.exits == 0 or not acts, "actions after Exit"
        for a in acts:
            if isinstance(a, SetFirewall | RemoveChain):
                self.in_flight += 1
                assert self.in_flight == 1, "two firewall changes in flight"
                assert a.deadline_ns - self.now <= P.attempt_ns
                if isinstance(a, SetFirewall) and a.mode is Mode.OPEN:
                    # only health, never while an operator's block is recorded (unless stopping)
                    assert self.s.admin is None or self.s.stop_at_ns is not None
            elif isinstance(a, RetryAt):
                assert P.retry_min_ns <= a.at_ns - self.now <= P.retry_max_ns
                self.retry_pending = True
            elif isinstance(a, Exit):
                self.exits += 1
                assert (a.flush_ns is not None) == stopping_again
            elif a == Notify("ready"):
                self.readies += 1
                assert self.applied_seen, "READY before the kernel held a decision"
            elif isinstance(a, Publish):
                assert a.status.mode is self.s.applied
                assert a.status.ready == self.s.ready
                assert not a.status.ready or self.applied_seen
                assert self.ready_published <= a.status.ready, "ready taken back"
                self.ready_published = a.status.ready
            elif isinstance(a, StopBoundAt):
                self.bounds += 1
                assert a.at_ns == self.now + P.stop_grace_ns + 1_000 * MS
            elif isinstance(a, Log):
                assert isinstance(a.level, LogLevel)
            elif isinstance(a, Notify):
                assert isinstance(a.what, NotifyKind)
            elif isinstance(a, Count) and a.what is Tally.FAILOVER:
                assert isinstance(inp, Applied) and a.latency_ns >= 0
            elif isinstance(a, ResetConnections):
                self.resets += 1
                assert self.resets == 1, "two connection resets in flight"
                assert not self.unsupported, "asked the kernel again after EOPNOTSUPP"
                # a full reset only under a full block, a drain only ends idle connections
                want = Mode.DRAIN if a.idle_only else Mode.BLOCK
                assert self.s.applied is want and desired_mode(self.s) is want, (a, self.s)
            elif isinstance(a, SweepAt):
                assert a.at_ns - self.now == P.drain_sweep_ns
                self.sweep_pending = True
        assert before.admin == self.s.admin or isinstance(inp, AdminRead)

    @rule(ok=st.booleans(), death=st.booleans(), dt=st.integers(0, 400 * MS))
    def probe(self, ok: bool, death: bool, dt: int) -> None:
        """A probe verdict, some time later."""
        self.now += dt
        trig = Trigger(Source.PIDFD if death else Source.TIMER, "t", self.now,
                       Evidence.DEATH if death else Evidence.HINT)
        self.feed(Probed(trig, ok, "c", "r", False, MS))

    @rule(block=st.sampled_from([None, BLOCK, DRAIN]))
    def admin(self, block: AdminBlock | None) -> None:
        """The admin record read in a round."""
        self.feed(AdminRead(HINT, block))

    @precondition(lambda self: self.in_flight == 1)
    @rule(ok=st.booleans())
    def firewall_answers(self, ok: bool) -> None:
        """The change in flight succeeds or fails."""
        self.feed(Applied(("ipv4",), 1, self.now, MS) if ok else ApplyFailed("busy"))

    @precondition(lambda self: self.retry_pending)
    @rule()
    def retry_due(self) -> None:
        """The retry timer fires."""
        self.retry_pending = False
        self.feed(RetryDue())

    @rule()
    def tick(self) -> None:
        """The safety-net timer."""
        self.feed(Tick(HINT))

    @rule(sig=st.sampled_from([("SIGTERM", 15), ("SIGINT", 2)]))
    def stop(self, sig: tuple[str, int]) -> None:
        """SIGTERM or SIGINT (maybe twice: the second exits at once)."""
        self.feed(Stop(*sig))

    @precondition(lambda self: self.s.stop_at_ns is not None)
    @rule(dt=st.integers(0, 10_000 * MS))
    def stop_bound(self, dt: int) -> None:
        """The stop's outer bound passes (the timer the first Stop armed)."""
        self.now += dt
        self.feed(StopBound())
    @precondition(lambda self: self.resets == 1)
    @rule(n=st.integers(0, 3), unsupported=st.booleans(), idle=st.booleans())
    def connections_reset(self, n: int, unsupported: bool, idle: bool) -> None:
        """The reset round in flight ends (or finds no SOCK_DESTROY)."""
        self.unsupported |= unsupported
        self.feed(ConnectionsReset(idle, {"ipv4": n}, error="Operation not supported"
                                   if unsupported else "", unsupported=unsupported))

    @precondition(lambda self: self.sweep_pending)
    @rule()
    def sweep_due(self) -> None:
        """The drain's sweep timer fires."""
        self.sweep_pending = False
        self.feed(SweepDue())

    @invariant()
    def settled_means_wanted(self) -> None:
        """Nothing in flight, no retry pending, not stopping: the kernel holds the wish."""
        s = self.s
        if s.exited or s.in_flight is not None or s.retry_at_ns is not None:
            return
        assert desired_mode(s) in (None, s.applied), s

    @invariant()
    def one_exit_at_most_and_ready_once(self) -> None:
        """Exit at most once; READY at most once; the stop bound armed at most once."""
        assert self.exits <= 1 and self.readies <= 1 and self.bounds <= 1

    def teardown(self) -> None:
        """Stop, answer every change: exactly one Exit."""
        self.feed(Stop("SIGTERM"))
        for _ in range(4):
            if self.exits:
                break
            if self.in_flight:
                self.feed(Applied(("ipv4",), 1, self.now, MS))
        assert self.exits == 1, self.s


TestCore = Core.TestCase
TestCore.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)


# --------------------------------------------------------------------- timelines

@dataclass(frozen=True)
class Period:
    """The service is ``healthy`` (or dead) for ``length_ns``; ``proof``: the kernel reports death;
    ``noise``: extra triggers within the period, as fractions of its length."""

    healthy: bool
    length_ns: int
    proof: bool
    noise: tuple[float, ...] = ()


periods = st.lists(st.builds(Period, st.booleans(), st.integers(1 * MS, 3000 * MS), st.booleans(),
                             st.lists(st.floats(0, 1, exclude_max=True), max_size=6).map(tuple)),
                   min_size=1, max_size=12)
params = st.builds(Params, rise=st.integers(1, 5), fall=st.integers(1, 4),
                   rise_interval_ns=st.integers(0, 400 * MS))


@dataclass(frozen=True)
class Run:
    """The simulated run: period starts and the applied-mode changes, in time order."""

    starts: list[int]
    changes: list[tuple[int, int, Mode]]  # (time, sequence, mode)
    probes_in: list[list[tuple[int, bool]]]  # per period: (time, ok) of each probe in it

    def mode_after(self, t: int, seq: int = 1 << 62) -> Mode | None:
        """The applied mode once every probe at time <= t (and sequence <= seq) has run."""
        mode = None
        for when, s, m in self.changes:
            if (when, s) <= (t, seq):
                mode = m
        return mode


def simulate(p: Params, plan: list[Period]) -> Run:
    """Probe at each change, at the noise and at each ProbeAt; changes apply at once."""
    starts, t = [], 0
    for period in plan:
        starts.append(t)
        t += period.length_ns
    end = t
    queue: list[tuple[int, int, Evidence]] = []
    seq = 0
    for i, s0 in enumerate(starts):
        dies = not plan[i].healthy and plan[i].proof
        heapq.heappush(queue, (s0, seq, Evidence.DEATH if dies else Evidence.HINT))
        seq += 1
    for i, period in enumerate(plan):
        for frac in period.noise:
            heapq.heappush(queue, (starts[i] + int(frac * period.length_ns), seq, Evidence.HINT))
            seq += 1
    s = initial(p)
    changes: list[tuple[int, int, Mode]] = []
    probes: list[list[tuple[int, bool]]] = [[] for _ in plan]
    n = 0
    while queue and n < 2000:
        now, order, evidence = heapq.heappop(queue)
        n += 1
        i = max(k for k, s0 in enumerate(starts) if s0 <= now)
        ok = plan[i].healthy
        probes[i].append((now, ok))
        trig = Trigger(Source.PIDFD, "t", now, evidence if not ok else Evidence.HINT)
        s, acts = settle(s, Probed(trig, ok, "http", "r"), now)
        for a in acts:
            if isinstance(a, SetFirewall):
                changes.append((now, order, a.mode))
            elif isinstance(a, ProbeAt) and a.at_ns < end:
                heapq.heappush(queue, (a.at_ns, seq, Evidence.HINT))
                seq += 1
    assert n < 2000, "the core asked for probes without bound"
    return Run(starts, changes, probes)


@settings(max_examples=300, deadline=None)
@given(params, periods)
def test_healthy_service_is_open_within_rise_intervals(p: Params, plan: list[Period]) -> None:
    """Healthy from s: OPEN by s + (rise-1) x rise_interval, whatever triggers come in between."""
    run = simulate(p, plan)
    for i, period in enumerate(plan):
        if not period.healthy:
            continue
        s = run.starts[i]
        due = s + (p.rise - 1) * p.rise_interval_ns
        if due < s + period.length_ns:
            assert run.mode_after(due) is Mode.OPEN, (i, due, run.changes)


@settings(max_examples=300, deadline=None)
@given(params, periods)
def test_dead_service_is_blocked_after_the_proof_or_fall_failures_and_never_opened(
        p: Params, plan: list[Period]) -> None:
    """Dead: BLOCK from a kernel-proved death or the fall-th failure on; never OPEN meanwhile."""
    run = simulate(p, plan)
    for i, period in enumerate(plan):
        if period.healthy:
            continue
        s, e = run.starts[i], run.starts[i] + period.length_ns
        opened = [c for c in run.changes if s <= c[0] < e and c[2] is Mode.OPEN]
        assert not opened, (i, opened)
        fails = run.probes_in[i]
        if period.proof or i == 0:
            decided = s
        elif len(fails) >= p.fall:
            decided = fails[p.fall - 1][0]
        else:
            continue
        inside = [c for c in run.changes if decided <= c[0] < e]
        assert run.mode_after(decided) is Mode.BLOCK, (i, decided, run.changes)
        assert all(c[2] is Mode.BLOCK for c in inside), (i, inside)
