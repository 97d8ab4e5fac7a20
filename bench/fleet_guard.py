"""What the fleet guard costs and does, against a real three-member etcd 3.4 cluster.

    sudo .venv-pypi/bin/python -m bench.fleet_guard [--rounds N] [--members 200] [--idle-s 20]

All in one run, on one cluster (tests/etcdcluster.py), every server in its own namespace:

1. **proven failover**: the service SIGKILLed; the agent's own ``latency_ms`` of the
   ``firewall-block`` (kernel event to rule committed), for an agent without ``[fleet]`` and
   one with it, rounds alternating so load falls on both alike.
2. **suspect block**: the service's back end dies (alive, listening, ``GET /health`` 503);
   from the ``service-down`` event to the ``firewall-block`` event (the agents' own
   timestamps, ms), without ``[fleet]`` (blocks at once) and with it (a permit first: size 2,
   min_open 1, the other server open). The difference is the permit's etcd round trip.
3. **a whole group failing at once**: ``--members`` simulated members (the agent's own etcd
   client, one thread each, in the cluster's client namespace) registered open, then all
   asking for a permit within 10 ms; the granted count must equal the budget
   (size - min_open) exactly; the time until every member has its answer.
4. **idle**: four agents guarding healthy services for ``--idle-s``: etcd requests per second
   by method, summed over the members' ``grpc_server_started_total`` (keep-alives only, no
   polling).

Prints distributions; passes or fails on nothing (a budget mismatch is printed as such).
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.machine import machine_line
from tests.etcdcluster import EtcdCluster
from tests.fleetbed import FleetBed, FleetServer
from tests.netns import wait_for
from tests.testbed.cluster import http_get


def _pct(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def _dist(name: str, values: Sequence[float], unit: str = "ms") -> str:
    if not values:
        return f"{name:<34} no samples"
    return (f"{name:<34} n={len(values):<4} p50={_pct(values, 0.5):8.2f} p90={_pct(values, 0.9):8.2f} "
            f"min={min(values):8.2f} max={max(values):8.2f} {unit}")


def _ts(ev: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(ev["@timestamp"]).replace("Z", "+00:00")).timestamp()


def _proven_round(srv: FleetServer) -> float:
    mark = srv.agent.mark()
    srv.kill_service()
    ev = srv.agent.wait_event("firewall-block", 20, after=mark)
    srv.start_service()
    srv.agent.wait_event("firewall-unblock", 20, after=mark)
    return float(ev["sslvpn_heartbeat.latency_ms"])


def _suspect_round(bed: FleetBed, srv: FleetServer) -> float:
    mark = srv.agent.mark()
    bed.backend(False)
    down = srv.agent.wait_event("service-down", 20, after=mark)
    block = srv.agent.wait_event("firewall-block", 20, after=mark)
    bed.backend(True)
    srv.agent.wait_event("firewall-unblock", 20, after=mark)
    return (_ts(block) - _ts(down)) * 1000


def failovers(etcd: EtcdCluster, tmp: Path, rounds: int) -> None:
    """Parts 1 and 2."""
    with FleetBed(etcd, tmp / "plain", "bench-plain", n=1, guard=False) as plain, \
            FleetBed(etcd, tmp / "guard", "bench-guard", n=2, min_open=1) as guard:
        # The guarded pair must not block at all on the other's failure: only server 1 fails.
        g1, g2 = guard.server(1), guard.server(2)
        g2.flag = tmp / "g2-backend"  # server 2's service keeps its own back end up
        g2.flag.touch()
        g2.kill_service()
        g2.start_service()
        wait_for(g2.opened, 20, "server 2 open")
        proven: dict[str, list[float]] = {"without [fleet]": [], "with [fleet]": []}
        suspect: dict[str, list[float]] = {"without [fleet]": [], "with [fleet]": []}
        for _ in range(rounds):
            proven["without [fleet]"].append(_proven_round(plain.server(1)))
            proven["with [fleet]"].append(_proven_round(g1))
        for _ in range(rounds):
            suspect["without [fleet]"].append(_suspect_round(plain, plain.server(1)))
            suspect["with [fleet]"].append(_suspect_round(guard, g1))
        granted = len(g1.agent.find("fleet-guard-granted"))
    print("\n== 1. proven failover: service SIGKILLed, the agent's latency_ms (kernel event to rule)")
    for k, v in proven.items():
        print(_dist(k, v))
    p0, p1 = statistics.median(proven["without [fleet]"]), statistics.median(proven["with [fleet]"])
    print(f"ratio of medians with/without: {p1 / p0:.2f}")
    print("\n== 2. suspect block: back end down, service-down -> firewall-block (agents' own timestamps)")
    for k, v in suspect.items():
        print(_dist(k, v))
    s0, s1 = statistics.median(suspect["without [fleet]"]), statistics.median(suspect["with [fleet]"])
    print(f"median difference (the permit): {s1 - s0:.2f} ms; permits granted: {granted}/{rounds}")
    rtt = etcd.call(_round_trips, etcd.endpoints(), 30)
    print(_dist("one etcd transaction, for scale", rtt))


def _round_trips(endpoints: list[str], n: int) -> list[float]:
    """``n`` single-put transactions through the agent's client, each timed (ms)."""
    from watcher.config import parse_config
    from watcher.fleet.etcd import Etcd

    cfg = parse_config({"fleet": {"etcd": endpoints, "size": 1, "group": "bench-rtt",
                                  "member": "rtt"}}).fleet
    assert cfg is not None
    e = Etcd(cfg)
    lease = e.grant_lease()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        e.register(lease, "open", "health", time.time(), slot=True)
        out.append((time.perf_counter() - t) * 1000)
    e.revoke(lease)
    return out


def stampede(etcd: EtcdCluster, members: int) -> None:
    """Part 3."""
    from watcher.config import parse_config
    from watcher.core.fleet import min_open_count
    from watcher.fleet.etcd import Etcd

    group = f"bench-stampede-{int(time.time())}"

    def run() -> tuple[int, list[float], list[str]]:
        clients, leases = [], []
        for i in range(members):
            cfg = parse_config({"fleet": {"etcd": etcd.endpoints(), "size": members,
                                          "group": group, "member": f"m{i:03d}", "lease_s": 300,
                                          "min_open": "50%"}}).fleet
            assert cfg is not None
            e = Etcd(cfg, timeout=10.0)
            e.current = i % len(e.clients)  # spread over the members, as real agents would be
            lease = e.grant_lease()
            e.register(lease, "open", "health", time.time(), slot=False)
            clients.append(e)
            leases.append(lease)
        barrier = threading.Barrier(members + 1)
        answers: list[float] = [0.0] * members
        granted: list[bool] = [False] * members
        errors: list[str] = []
        start = [0.0]

        def ask(i: int) -> None:
            barrier.wait()
            time.sleep(random.uniform(0, 0.010))  # all fail within 10 ms
            try:
                granted[i] = clients[i].ask_permit(leases[i], time.time(), attempts=1000).granted
            except Exception as exc:
                errors.append(f"m{i:03d}: {exc}")
            answers[i] = time.monotonic() - start[0]

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(members)]
        for t in threads:
            t.start()
        start[0] = time.monotonic()
        barrier.wait()
        for t in threads:
            t.join(120)
        for e, lease in zip(clients, leases, strict=True):
            e.revoke(lease)
        return sum(granted), [a * 1000 for a in answers], errors

    n_granted, answers, errors = etcd.call(run, timeout=600)
    budget = members - min_open_count("50%", members)
    print(f"\n== 3. {members} members of one group fail within 10 ms (min_open 50 %)")
    print(f"granted {n_granted}, budget {budget}: {'EXACT' if n_granted == budget else 'MISMATCH'}"
          f"; errors: {len(errors)} {errors[:3]}")
    print(_dist("time until each member's answer", answers))
    print(f"every member answered after {max(answers):.1f} ms")


_STARTED = re.compile(r'^grpc_server_started_total\{grpc_method="(\w+)".*\} (\S+)$', re.M)


def _started(etcd: EtcdCluster) -> dict[str, float]:
    total: dict[str, float] = {}
    for i in range(1, 4):
        m = etcd.member(i)
        body = http_get(m.ns.name, m.addr, 2379, "/metrics", timeout=5).body
        for method, value in _STARTED.findall(body):
            total[method] = total.get(method, 0.0) + float(value)
    return total


def idle(etcd: EtcdCluster, tmp: Path, seconds: float) -> None:
    """Part 4."""
    with FleetBed(etcd, tmp / "idle", "bench-idle", n=4, lease_s=10):
        time.sleep(3)  # registration done, watches open
        before = _started(etcd)
        time.sleep(seconds)
        after = _started(etcd)
    print(f"\n== 4. four idle agents (lease_s 10) for {seconds:g} s: etcd requests/s by method")
    for method in sorted(after):
        rate = (after[method] - before.get(method, 0.0)) / seconds
        if rate:
            print(f"  {method:<18} {rate:6.2f}/s")
    print("  (expected: LeaseKeepAlive only, 4 agents / (10 s / 3) = 1.2/s)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the four parts on one cluster and print their figures."""
    p = argparse.ArgumentParser(prog="bench.fleet_guard", description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--members", type=int, default=200)
    p.add_argument("--idle-s", type=float, default=20.0)
    args = p.parse_args(argv)
    print(machine_line())
    with tempfile.TemporaryDirectory(prefix="fleet-guard-") as d, EtcdCluster() as etcd:
        tmp = Path(d)
        failovers(etcd, tmp, args.rounds)
        stampede(etcd, args.members)
        idle(etcd, tmp, args.idle_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
