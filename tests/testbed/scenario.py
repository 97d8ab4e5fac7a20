"""The failover scenario the end-to-end tests run with and without agents, so the two compare.

Under a steady client load, each failover takes one service down (``stop``: SIGTERM, PID file
removed; or ``kill_core``: SIGKILL, PID file left, as a crash), keeps it down while the client
sends ``rate * down_s`` requests, starts it again, waits until it is back in rotation (its chain
holds no REJECT rule and it answers a client request again) and lets the load run ``up_s`` more.
Bad answers are counted per failover, from the moment the failover began to the next one.

The same :data:`FAILOVERS` drives the runs with agents and without, so the only difference
between the two figures is the agent.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.netns import wait_for
from tests.testbed.cluster import Cluster, Server
from tests.testbed.load import Record, read_records

__all__ = ["FAILOVERS", "Failover", "FailoverOutcome", "RecordTail", "Scenario",
           "ScenarioOutcome", "run_scenario"]

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
