"""The testbed without agents: round robin works, and a stopped service costs hundreds of 503s.

This is the contrast the agent's end-to-end test is measured against: HAProxy has no health
checks of its own, so without the agent it keeps sending every other request to the server whose
listener answers 503. The 503 test below uses the load of the shared failover scenario
(tests/testbed/scenario.py), which test_failover.py runs with and without agents.
"""

from __future__ import annotations

import subprocess
from collections import Counter
from pathlib import Path

import pytest

from tests.netns import wait_for
from tests.testbed.cluster import CHAIN, Cluster
from tests.testbed.fakesvc import pid_alive
from tests.testbed.load import read_records, summarize
from tests.testbed.scenario import FAILOVERS

# once: no agent at all
pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.once]


def test_round_robin_spreads_requests_over_every_server(tmp_path: Path) -> None:
    """Nine sequential requests through the gateway reach each of three servers three times."""
    with Cluster(3, workdir=tmp_path) as c:
        seen = Counter(c.client_get().body for _ in range(9))
    assert seen == {"server1\n": 3, "server2\n": 3, "server3\n": 3}


def test_close_kills_every_process_and_deletes_every_namespace(tmp_path: Path) -> None:
    """After the with block no namespace of the cluster is listed and no process it ran lives."""
    with Cluster(2, workdir=tmp_path) as c:
        names = [ns.name for ns in (c.gateway, c.client, *(s.ns for s in c.servers)) if ns]
        pids = [c.haproxy.pid if c.haproxy else 0, *(s.core_pid() or 0 for s in c.servers)]
        assert all(pids)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(n in listed.split() for n in names)
    assert not any(pid_alive(p) for p in pids)


def test_stopped_service_without_agent_costs_hundreds_of_503s(tmp_path: Path) -> None:
    """Without an agent, stopping server 1 under load gives the client many 503s, all from it."""
    out = tmp_path / "load.jsonl"
    with Cluster(FAILOVERS.n_servers, agents=False, workdir=tmp_path) as c:
        load = c.start_load(out, rate=FAILOVERS.rate, duration=4)
        wait_for(lambda: len(read_records(out)) >= 100, 5, "the first 100 answers")
        before = read_records(out)  # all answered before the stop began
        c.server(1).stop()
        stopped_at = max(r.t for r in read_records(out))
        load.wait(timeout=10)
    recs = read_records(out)
    after = [r for r in recs if r.t > stopped_at]
    assert summarize(before).bad == 0
    bad = [r for r in after if r.bad]
    assert len(bad) >= 100, summarize(recs)
    assert {(r.status, r.server) for r in bad} == {(503, "server1")}
    assert summarize(after).by_server.keys() == {"server2"}


def test_reject_rule_on_a_server_loses_no_request(tmp_path: Path) -> None:
    """The agent's REJECT rule, put in by hand under load, makes HAProxy redispatch: 0 bad answers."""
    out = tmp_path / "load.jsonl"
    with Cluster(2, agents=False, workdir=tmp_path) as c:
        load = c.start_load(out, rate=200, duration=3)
        wait_for(lambda: len(read_records(out)) >= 100, 5, "the first 100 answers")
        s1 = c.server(1)
        s1.ns.run(["iptables", "-N", CHAIN])
        s1.ns.run(["iptables", "-I", "INPUT", "1", "-j", CHAIN])
        s1.ns.run(["iptables", "-A", CHAIN, "!", "-i", "lo", "-p", "tcp", "--dport", "8080",
                   "-j", "REJECT", "--reject-with", "icmp-port-unreachable"])
        assert s1.is_blocked()
        blocked_at = max(r.t for r in read_records(out))
        s1.stop()
        load.wait(timeout=10)
        assert "REJECT" in s1.iptables_L(CHAIN) and "dpt:http-alt" in s1.iptables_L(CHAIN)
    recs = read_records(out)
    s = summarize(recs)
    assert s.bad == 0, [r for r in recs if r.bad][:5]
    assert s.total == 600
    late = [r for r in recs if r.t > blocked_at + 0.05]
    assert late and {r.server for r in late} == {"server2"}
