"""Behind a pooling gateway: what users meet when server 1 hangs and is blocked, or is drained.

Both scenarios run on a ``Cluster`` whose gateway keeps persistent connections to the servers
(HAProxy ``http-reuse always``, nginx upstream ``keepalive``), with the kernel's ICMP rate
limits as every namespace starts (on), under a steady client load:

* ``run_hang``: server 1's service hangs (alive, listening, silent) until its agent blocks it;
  the outcome counts the requests sent after the block that waited (``WAIT_S`` or more) or
  failed.
* ``run_drain``: ``block --drain`` on server 1 (the CLI in its namespace, as an operator runs
  it), with long requests in flight; the outcome gives server 1's share of the requests sent
  from one second after the drain on, the failed requests and the long requests' answers.

``tests/e2e/test_sessions.py`` pins them; ``bench/sessions.py`` prints them per setting.
"""

from __future__ import annotations

import functools
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.netns import wait_for
from tests.testbed import fakesvc
from tests.testbed.cluster import (
    GATEWAY_CLIENT_ADDR,
    GATEWAY_PORT,
    Cluster,
    Reply,
    Server,
    default_agent_config,
    http_get,
)
from tests.testbed.load import Record, read_records
from tests.testbed.scenario import RecordTail

__all__ = [
    "WAIT_S",
    "DrainOutcome",
    "HangOutcome",
    "cli_in",
    "pooled_cluster",
    "run_drain",
    "run_hang",
]

WAIT_S = 0.5  # a request answered this long after it was sent waited (the fake answers in ~1 ms)
LOAD_RATE = 100.0  # requests a second, each on a new client connection
SETTLE_S = 1.0  # the first second after a drain: pooled connections still being ended


def pooled_cluster(gateway: str, workdir: Path, *, reject_with: str | None = None,
                   established: str | None = None) -> Cluster:
    """Two servers with agents (the shipped defaults unless a setting is given) behind
    ``gateway`` reusing its server connections, a 1 s connect timeout and a 5 s answer timeout
    (a gateway's defaults are longer still: nginx 60 s, the Access Gateway 30 s to connect),
    so the gateway has not given up on the hung server by itself before its agent blocks it;
    no health checks of the gateway's own (nginx: ``max_fails=0``), like the Access Gateway."""
    return Cluster(2, agents=True, gateway=gateway, http_mode="keep-alive", workdir=workdir,
                   connect_timeout="1s", server_timeout="5s", nginx_max_fails=0,
                   agent_config=functools.partial(default_agent_config, reject_with=reject_with,
                                                  established=established))


@dataclass(frozen=True)
class HangOutcome:
    """Requests sent after server 1 was blocked: how many, how many waited, how many failed."""

    after: int
    waited: int
    failed: int
    block_s: float  # from the hang to the block seen in the kernel
    slowest_ms: float


def run_hang(c: Cluster, out: Path, *, seconds: float = 6.0) -> HangOutcome:
    """Load through the gateway, hang server 1 after a second, wait for its block; count."""
    s1 = c.server(1)
    tail = RecordTail(out)
    load = c.start_load(out, rate=LOAD_RATE, duration=seconds, timeout=5.0)
    try:
        wait_for(lambda: tail.reached(1.0), 10, "the load's first second")
        hung_at = tail.mark()
        s1.hang()
        wait_for(s1.is_blocked, 10, "server 1's agent to block its hung service", interval=0.01)
        blocked_at = tail.mark()
        load.wait(timeout=seconds + 15)
    finally:
        s1.unhang()
        if load.poll() is None:
            load.kill()
    after = [r for r in read_records(out) if r.t > blocked_at]
    return HangOutcome(len(after), sum(r.latency_ms >= WAIT_S * 1e3 for r in after),
                       sum(r.bad for r in after), round(blocked_at - hung_at, 3),
                       max((r.latency_ms for r in after), default=0.0))


@dataclass(frozen=True)
class DrainOutcome:
    """Requests sent from SETTLE_S after the drain on, server 1's share of them, the failed
    requests of the whole run, and the long requests in flight at the drain."""

    after: int
    on_drained: int
    failed: int
    long_replies: list[Reply] = field(default_factory=list)

    @property
    def share(self) -> float:
        """Server 1's share of the requests sent after the first second of the drain."""
        return self.on_drained / self.after if self.after else 0.0


def _long_requests(c: Cluster, n: int, ms: int) -> tuple[list[threading.Thread], list[Reply]]:
    """Start ``n`` requests for ``/slow/MS`` through the gateway, each in a thread."""
    replies: list[Reply] = []
    lock = threading.Lock()
    assert c.client is not None

    def one() -> None:
        assert c.client is not None
        r = http_get(c.client.name, GATEWAY_CLIENT_ADDR, GATEWAY_PORT, f"/slow/{ms}",
                     timeout=ms / 1000 + 5.0)
        with lock:
            replies.append(r)

    threads = [threading.Thread(target=one, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    return threads, replies


def run_drain(c: Cluster, out: Path, cli: Callable[[Server, list[str]], object], *,
              seconds: float = 6.0, long_ms: int = 1500) -> DrainOutcome:
    """Load through the gateway; after a second, long requests, then ``block --drain`` on
    server 1 through ``cli``; server 1's share of what follows."""
    s1 = c.server(1)
    tail = RecordTail(out)
    load = c.start_load(out, rate=LOAD_RATE, duration=seconds, timeout=5.0)
    threads: list[threading.Thread] = []
    replies: list[Reply] = []
    try:
        wait_for(lambda: tail.reached(1.0), 10, "the load's first second")
        threads, replies = _long_requests(c, 6, long_ms)
        wait_for(lambda: _slow_in_flight(c), 5, "the long requests on the servers",
                 interval=0.01)
        cli(s1, ["block", "--drain", "--reason", "drain test"])
        drained_at = tail.mark()
        load.wait(timeout=seconds + 15)
        for t in threads:
            t.join(long_ms / 1000 + 10)
    finally:
        if load.poll() is None:
            load.kill()
    recs: list[Record] = read_records(out)
    after = [r for r in recs if r.t >= drained_at + SETTLE_S]
    return DrainOutcome(len(after), sum(r.server == s1.name for r in after),
                        sum(r.bad for r in recs), replies)


def _slow_in_flight(c: Cluster) -> bool:
    """True once server 1 is serving at least one long request (the fake service marks each)."""
    return any(c.server(1).state_dir.glob(f"{fakesvc.SLOW_PREFIX}*"))


def cli_in(srv: Server, args: list[str]) -> None:
    """Run ``python -m watcher ARGS --config CFG`` in ``srv``'s namespace (exit 0 expected)."""
    srv.ns.run([sys.executable, "-m", "watcher", *args, "--config", str(srv.config_path)],
               timeout=30)
