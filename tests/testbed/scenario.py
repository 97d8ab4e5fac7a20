"""The failover scenario the end-to-end tests run with and without agents, so the two compare.

Under a steady client load, each failover takes one service down (``stop``: SIGTERM, PID file
removed; or ``kill_core``: SIGKILL, PID file left, as a crash), keeps it down while the client
sends ``rate * down_s`` requests, starts it again, waits until it is back in rotation (its chain
holds no REJECT rule and it answers a client request again) and lets the load run ``up_s`` more.
Bad answers are counted per failover, from the moment the failover began to the next one.

The same :data:`FAILOVERS` drives the runs with agents and without, so the only difference
between the two figures is the agent.

:func:`run_backend_outage` is the shared-cause scenario: under a steady client load the back
end every server depends on dies (a cluster started with ``backend=True``), stays dead for
``down_s``, comes back; which servers the agents blocked is sampled all along. Without a fleet
guard every agent blocks and every user request fails; with it only the budget may block.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.netns import wait_for
from tests.testbed.cluster import Cluster, Server
from tests.testbed.load import Record, read_records

__all__ = ["FAILOVERS", "BackendOutage", "BackendOutageOutcome", "Failover", "FailoverOutcome",
           "RecordTail", "Scenario", "ScenarioOutcome", "run_backend_outage", "run_scenario"]

ACTIONS = ("stop", "kill_core")


@dataclass(frozen=True)
class Failover:
    """One failover: which server (from 1) and how its service goes down."""

    server: int
    action: str  # "stop" or "kill_core"

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, got {self.action!r}")


@dataclass(frozen=True)
class Scenario:
    """Load and timing of a failover run; ``load_bound_s`` bounds the whole run."""

    n_servers: int = 2
    rate: float = 150.0  # client requests per second through the gateway
    down_s: float = 2.0  # the service stays down while the client sends rate * down_s requests
    up_s: float = 0.5  # load kept running after a server is back, before the next failover
    warmup_s: float = 0.5
    back_timeout_s: float = 5.0  # from start() until the server must be back in rotation
    failovers: tuple[Failover, ...] = (
        Failover(1, "stop"), Failover(2, "kill_core"), Failover(1, "kill_core"),
        Failover(2, "stop"),
    )

    @property
    def load_bound_s(self) -> float:
        """A load duration that outlasts the run even when every recovery takes its full timeout."""
        per = self.down_s + self.up_s + self.back_timeout_s + 1.0  # + 1 s for the ctl commands
        return self.warmup_s + len(self.failovers) * per + 1.0


FAILOVERS = Scenario()


@dataclass(frozen=True)
class FailoverOutcome:
    """What one failover cost: bad answers in its window and how the server came back."""

    failover: Failover
    bad: tuple[Record, ...]  # bad answers to requests sent from this failover to the next
    requests: int  # requests sent in the same window
    back_in_rotation_s: float  # from start() returning to the server answering a client again
    chain_after_start: list[str] | None  # the agent chain's -A lines once back (None: no chain)


@dataclass(frozen=True)
class ScenarioOutcome:
    """Every failover's outcome and the load's records."""

    failovers: tuple[FailoverOutcome, ...]
    records: tuple[Record, ...] = field(repr=False)
    bad_before: int  # bad answers before the first failover (0 on a healthy cluster)

    @property
    def bad_per_failover(self) -> list[int]:
        """The number of bad answers of each failover, in order."""
        return [len(f.bad) for f in self.failovers]


class RecordTail:
    """Reads a load's JSON-lines file incrementally (complete lines only)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: list[Record] = []
        self._offset = 0
        self._partial = b""

    def poll(self) -> list[Record]:
        """Parse lines appended since the last call; returns every record read so far."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return self.records
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            try:
                self.records.append(Record(**json.loads(line)))
            except (ValueError, TypeError):
                continue
        return self.records

    def newest_sent(self) -> float:
        """The latest send time (load clock) among the records read, or -1 before any."""
        return max((r.t for r in self.poll()), default=-1.0)

    def reached(self, t: float) -> bool:
        """True once a request sent at or after ``t`` (load clock) has been answered."""
        return self.newest_sent() >= t

    def mark(self) -> float:
        """The load's clock now, to within one request: waits for an answer newer than any seen."""
        seen = self.newest_sent()
        return float(wait_for(lambda: (t := self.newest_sent()) > seen and t, 5.0,
                              "the load's next answer", interval=0.002))


def _take_down(srv: Server, action: str) -> None:
    if action == "stop":
        srv.stop()
    else:
        srv.kill_core()


def run_scenario(cluster: Cluster, out: Path, scenario: Scenario = FAILOVERS) -> ScenarioOutcome:
    """Run ``scenario``'s failovers under load on a started ``cluster``; the load ends before return."""
    if cluster.n_servers != scenario.n_servers:
        raise ValueError(f"scenario needs {scenario.n_servers} servers, cluster has "
                         f"{cluster.n_servers}")
    tail = RecordTail(out)
    load = cluster.start_load(out, rate=scenario.rate, duration=scenario.load_bound_s)
    try:
        wait_for(functools.partial(tail.reached, scenario.warmup_s), 5.0 + scenario.warmup_s,
                 "the load's warm-up")
        marks: list[float] = []
        backs: list[tuple[float, list[str] | None]] = []
        for fo in scenario.failovers:
            srv = cluster.server(fo.server)
            began = tail.mark()
            marks.append(began)
            _take_down(srv, fo.action)
            # Pacing, measured in requests: the service stays down for rate * down_s of them.
            wait_for(functools.partial(tail.reached, began + scenario.down_s),
                     scenario.down_s + 5.0, "the load to run while the service is down")
            srv.start()
            started_at, started_mark = time.monotonic(), tail.mark()

            def back(s: Server = srv, since: float = started_mark) -> bool:
                answered = any(r.t > since and not r.bad and r.server == s.name
                               for r in tail.poll()[-int(scenario.rate * 2):])
                return answered and not s.is_blocked()

            wait_for(back, scenario.back_timeout_s, f"{srv.name} back in rotation",
                     interval=0.02)
            backs.append((time.monotonic() - started_at, srv.chain_rules()))
            up_from = tail.newest_sent()
            wait_for(functools.partial(tail.reached, up_from + scenario.up_s),
                     scenario.up_s + 5.0, "the load to run with every server up")
        end = tail.mark()
    finally:
        if load.poll() is None:
            load.terminate()  # the load we started; its bound only guards a failed run
        load.wait(timeout=10)
    recs = read_records(out)
    bounds = [*marks, end]
    outcomes = []
    for k, fo in enumerate(scenario.failovers):
        window = [r for r in recs if bounds[k] <= r.t < bounds[k + 1]]
        outcomes.append(FailoverOutcome(fo, tuple(r for r in window if r.bad), len(window),
                                        round(backs[k][0], 3), backs[k][1]))
    before = sum(1 for r in recs if r.t < marks[0] and r.bad)
    return ScenarioOutcome(tuple(outcomes), tuple(recs), before)


# --- the shared back end dies ------------------------------------------------------------------

@dataclass(frozen=True)
class BackendOutage:
    """Load and timing of a shared back-end outage; ``load_bound_s`` bounds the whole run."""

    rate: float = 100.0  # client requests per second through the gateway
    path: str = "/"  # what the clients ask for (a path that needs the back end fails anyway)
    warmup_s: float = 1.0
    down_s: float = 6.0  # the back end stays dead while the client sends rate * down_s requests
    how: str = "kill"  # "kill" (connections refused) or "hang" (accepted, never answered)
    settle_timeout_s: float = 20.0  # from the back end's return until no server is blocked
    after_s: float = 2.0  # load kept running once every server is open again
    sample_interval_s: float = 0.25  # how often the servers' chains are read
    # Further loads running alongside, as (path, rate): e.g. ("/login", 20.0) for new logins.
    # Each has its own clock, started within a fraction of a second of the main one.
    extra_loads: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if self.how not in ("kill", "hang"):
            raise ValueError(f"how must be kill or hang, got {self.how!r}")

    @property
    def load_bound_s(self) -> float:
        """A load duration that outlasts the run even when recovery takes its full timeout."""
        return self.warmup_s + self.down_s + self.settle_timeout_s + self.after_s + 10.0


@dataclass(frozen=True)
class BackendOutageOutcome:
    """What the clients got and which servers were blocked, before, during and after."""

    records: tuple[Record, ...] = field(repr=False)
    down_at: float  # load clock when the back end was killed
    up_at: float  # load clock when it was back
    end_at: float  # load clock when the run ended
    samples: tuple[tuple[float, frozenset[str]], ...]  # (load clock, servers blocked)
    recovered_s: float  # from the back end's return until no server was blocked
    extra: dict[str, tuple[Record, ...]] = field(default_factory=dict, repr=False)  # by path

    def window(self, start: float, end: float, path: str | None = None) -> list[Record]:
        """The records of requests sent in ``[start, end)`` (load clock), of the main load or
        of the extra load of ``path``."""
        recs = self.records if path is None else self.extra[path]
        return [r for r in recs if start <= r.t < end]

    @property
    def before(self) -> list[Record]:
        """Requests sent before the back end died."""
        return self.window(float("-inf"), self.down_at)

    @property
    def during(self) -> list[Record]:
        """Requests sent while the back end was dead."""
        return self.window(self.down_at, self.up_at)

    def during_tail(self, fraction: float = 0.5, path: str | None = None) -> list[Record]:
        """Requests sent in the last ``fraction`` of the outage (agents have decided by then) and
        answered before the back end came back: one still in flight at its return (a login that
        HAProxy redispatched) may be answered by the returned back end, which is not what users
        got during the outage."""
        start = self.up_at - fraction * (self.up_at - self.down_at)
        return [r for r in self.window(start, self.up_at, path)
                if r.t + r.latency_ms / 1000 < self.up_at]

    @property
    def after(self) -> list[Record]:
        """Requests sent after the back end came back."""
        return self.window(self.up_at, float("inf"))

    def blocked_between(self, start: float, end: float) -> list[frozenset[str]]:
        """The blocked sets sampled in ``[start, end)`` (load clock)."""
        return [b for t, b in self.samples if start <= t < end]

    @property
    def max_blocked_during(self) -> int:
        """The most servers blocked at once while the back end was dead."""
        return max((len(b) for b in self.blocked_between(self.down_at, self.up_at)), default=0)

    @property
    def blocked_at_up(self) -> frozenset[str]:
        """The servers blocked at the last sample before the back end came back."""
        during = self.blocked_between(self.down_at, self.up_at)
        return during[-1] if during else frozenset()


def _blocked(cluster: Cluster) -> frozenset[str]:
    return frozenset(s.name for s in cluster.servers if s.is_blocked())


def run_backend_outage(cluster: Cluster, out: Path, outage: BackendOutage = BackendOutage(),
                       before_up: Callable[[], object] | None = None) -> BackendOutageOutcome:
    """Kill (or hang) ``cluster``'s shared back end under load, bring it back, wait until no
    server is blocked; the load ends before return. ``before_up`` (e.g. a demo's narration)
    runs once the outage has lasted ``down_s``, before the back end returns."""
    if cluster.backend_ns is None:
        raise ValueError("the cluster has no shared back end (Cluster(backend=True))")
    tail = RecordTail(out)
    samples: list[tuple[float, frozenset[str]]] = []
    load = cluster.start_load(out, rate=outage.rate, duration=outage.load_bound_s, path=outage.path)
    extra_out = {path: out.with_name(f"{out.stem}-{k}{out.suffix}")
                 for k, (path, _rate) in enumerate(outage.extra_loads, 1)}
    extra_procs = [cluster.start_load(extra_out[path], rate=rate, duration=outage.load_bound_s,
                                      path=path) for path, rate in outage.extra_loads]

    def sample_until(t_end: float) -> None:
        while tail.newest_sent() < t_end:
            samples.append((tail.newest_sent(), _blocked(cluster)))
            if load.poll() is not None:
                raise RuntimeError(f"the load ended early (exit {load.returncode})")
            time.sleep(outage.sample_interval_s)  # pacing the samples, not waiting on a condition

    try:
        wait_for(functools.partial(tail.reached, outage.warmup_s), 5.0 + outage.warmup_s,
                 "the load's warm-up")
        down_at = tail.mark()
        if outage.how == "kill":
            cluster.backend_down()
        else:
            cluster.backend_hang()
        sample_until(down_at + outage.down_s)
        samples.append((tail.newest_sent(), _blocked(cluster)))
        if before_up is not None:
            before_up()
            samples.append((tail.newest_sent(), _blocked(cluster)))
        up_at = tail.mark()
        if outage.how == "kill":
            cluster.backend_up()
        else:
            cluster.backend_resume()
        back = time.monotonic()

        def all_open() -> bool:
            blocked = _blocked(cluster)
            samples.append((tail.newest_sent(), blocked))
            return not blocked

        wait_for(all_open, outage.settle_timeout_s, "every server open again", interval=0.1)
        recovered = time.monotonic() - back
        sample_until(tail.newest_sent() + outage.after_s)
        end_at = tail.mark()
    finally:
        for proc in (load, *extra_procs):
            if proc.poll() is None:
                proc.terminate()  # the loads we started; their bound only guards a failed run
        for proc in (load, *extra_procs):
            proc.wait(timeout=10)
    return BackendOutageOutcome(tuple(read_records(out)), down_at, up_at, end_at, tuple(samples),
                                round(recovered, 3),
                                {path: tuple(read_records(f)) for path, f in extra_out.items()})
