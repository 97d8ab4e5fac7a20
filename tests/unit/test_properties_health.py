"""Timed properties of the health machine driven like the daemon drives it.

A generated timeline alternates healthy and dead periods of the real service. The simulated
daemon probes at each change (a kernel event: DEATH evidence when the change is a death that
the kernel reports, a hint otherwise), at random extra triggers (noise: inotify, sock_diag, the
safety net) and whenever a ``ProbeAgain`` asks; each probe sees the service's true state.
Properties (issue 6):

* healthy from time s on: the chain is OPEN by ``s + (rise - 1) * rise_interval``, so never
  blocked for longer than ``rise * rise_interval`` while the service is healthy;
* dead from a kernel-reported death on: the chain is BLOCK from that event to the next healthy
  period; dead without such proof: BLOCK from the ``fall``-th failed probe on;
* a dead service is never opened: no OPEN is applied during a dead period.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from watcher.events import Evidence
from watcher.health import Mode, Params, ProbeAgain, ProbeOutcome, SetFirewall, initial, step

MS = 1_000_000


@dataclass(frozen=True)
class Period:
    """The service is ``healthy`` (or dead) for ``length_ns``; ``proof``: the kernel reports death.

    ``noise`` are extra triggers within the period, as fractions of its length.
    """

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
    """The simulated run: period start times and the applied-mode changes, in time order."""

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
    """Drive ``step`` through ``plan`` with triggers at changes, its noise and at ProbeAgain."""
    starts, t = [], 0
    for period in plan:
        starts.append(t)
        t += period.length_ns
    end = t

    def period_at(now: int) -> int:
        return max(i for i, s in enumerate(starts) if s <= now)

    # (time, order, evidence): order keeps the simulation deterministic for equal times
    queue: list[tuple[int, int, Evidence]] = []
    seq = 0
    for i, s in enumerate(starts):
        dies = not plan[i].healthy and plan[i].proof
        heapq.heappush(queue, (s, seq, Evidence.DEATH if dies else Evidence.HINT))
        seq += 1
    for i, period in enumerate(plan):
        for frac in period.noise:
            heapq.heappush(queue, (starts[i] + int(frac * period.length_ns), seq, Evidence.HINT))
            seq += 1
    h = initial()
    changes: list[tuple[int, int, Mode]] = []
    probes: list[list[tuple[int, bool]]] = [[] for _ in plan]
    n = 0
    while queue and n < 2000:
        now, order, evidence = heapq.heappop(queue)
        n += 1
        i = period_at(now)
        ok = plan[i].healthy
        probes[i].append((now, ok))
        h, actions = step(h, ProbeOutcome(ok, "http", "r", evidence if not ok else Evidence.HINT),
                          now, p)
        for a in actions:
            if isinstance(a, SetFirewall):
                changes.append((now, order, a.mode))
            elif isinstance(a, ProbeAgain) and a.after_ns < end:
                heapq.heappush(queue, (a.after_ns, seq, Evidence.HINT))
                seq += 1
    assert n < 2000, "the machine asked for probes without bound"
    return Run(starts, changes, probes)


@settings(max_examples=400, deadline=None)
@given(params, periods)
def test_healthy_service_is_open_within_rise_intervals(
        p: Params, plan: list[Period]) -> None:
    """Healthy from s: OPEN by s + (rise-1) x rise_interval, whatever triggers come in between."""
    run = simulate(p, plan)
    for i, period in enumerate(plan):
        if not period.healthy:
            continue
        s = run.starts[i]
        due = s + (p.rise - 1) * p.rise_interval_ns
        if due < s + period.length_ns:
            assert run.mode_after(due) is Mode.OPEN, (i, due, run.changes)


@settings(max_examples=400, deadline=None)
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
            decided = s  # the death event itself (or the very first probe) decides
        elif len(fails) >= p.fall:
            decided = fails[p.fall - 1][0]
        else:
            continue
        inside = [c for c in run.changes if decided <= c[0] < e]
        assert run.mode_after(decided) is Mode.BLOCK, (i, decided, run.changes)
        assert all(c[2] is Mode.BLOCK for c in inside), (i, inside)
