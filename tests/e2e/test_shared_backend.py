"""The shared-cause scenario: four servers behind HAProxy whose health path needs one back end.

The back end (an LDAP/RADIUS stand-in in its own namespace) dies: every server's health path
fails while each service stays alive and listening (a *suspect* DOWN for the agent). Without a
fleet guard every agent then blocks and users get nothing, which is what the guard exists to
prevent; these tests pin the testbed's side and that baseline.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from tests.testbed.cluster import Cluster, default_agent_config, socket_in
from tests.testbed.scenario import BackendOutage, run_backend_outage

pytestmark = [pytest.mark.netns, pytest.mark.slow]

HEALTH, LOGIN = "/health", "/login"


def _accepts(ns_name: str, addr: str, port: int) -> bool:
    s = socket_in(ns_name)
    s.settimeout(2.0)
    try:
        s.connect((addr, port))
    except OSError:
        return False
    finally:
        s.close()
    return True


@pytest.mark.once  # fake services and HAProxy only: no library version changes the outcome
def test_backend_death_fails_every_health_check_while_services_live(tmp_path: Path) -> None:
    """Four servers, back end killed: each server's /health and /login answer 503 "backend
    down" while its core lives and its port accepts connections, and pages that need no back
    end still answer 200 (through HAProxy too); once the back end is back all pass again. A
    hung back end (accepting, silent) fails them the same way."""
    with Cluster(4, workdir=tmp_path, backend=True, backend_paths=(HEALTH, LOGIN)) as cluster:
        assert cluster.gateway is not None
        for srv in cluster.servers:
            assert srv.get(HEALTH).ok and srv.get(LOGIN).ok
        cluster.backend_down()
        assert not cluster.backend_reachable()
        for srv in cluster.servers:
            assert srv.get(HEALTH) == (503, f"{srv.name} backend down\n")
            assert srv.get(LOGIN).status == 503
            assert srv.get("/") == (200, f"{srv.name}\n")
            assert srv.core_pid() is not None
            assert _accepts(cluster.gateway.name, srv.addr, srv.port)
        assert cluster.client_get("/").ok
        assert cluster.client_get(LOGIN).status == 503  # users cannot log in anywhere
        cluster.backend_up()
        assert all(srv.get(HEALTH).ok for srv in cluster.servers)
        cluster.backend_hang()
        try:
            got = [srv.get(HEALTH, timeout=3.0) for srv in cluster.servers]
            assert [r.status for r in got] == [503] * 4, got
        finally:
            cluster.backend_resume()
        assert all(srv.get(HEALTH).ok for srv in cluster.servers)


def test_without_fleet_guard_every_agent_blocks_and_users_get_nothing(tmp_path: Path) -> None:
    """Baseline for the fleet guard: agents probing /health (no [fleet]) all block when the
    shared back end dies, so every user request through the gateway fails until it returns;
    then all four unblock and users are served again."""
    agent_config = functools.partial(default_agent_config, http_path=HEALTH)
    with Cluster(4, workdir=tmp_path, agents=True, agent_config=agent_config, backend=True,
                 backend_paths=(HEALTH, LOGIN), ready_timeout=30.0) as cluster:
        outcome = run_backend_outage(cluster, tmp_path / "load.jsonl",
                                     BackendOutage(rate=60.0, down_s=8.0))
    assert outcome.before and not any(r.bad for r in outcome.before)
    assert outcome.max_blocked_during == 4, outcome.samples
    assert outcome.blocked_at_up == {"server1", "server2", "server3", "server4"}
    tail = outcome.during_tail(0.3)
    assert tail and all(r.bad for r in tail), [r for r in tail if not r.bad][:5]
    settled = outcome.window(outcome.end_at - 1.0, outcome.end_at)
    assert settled and not any(r.bad for r in settled), [r for r in settled if r.bad][:5]
