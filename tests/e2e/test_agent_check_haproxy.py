"""End to end: Debian's HAProxy asks each server's agent (agent-check) and follows what it says.

Every server of the cluster testbed runs the agent with ``[agent_check] listen``; HAProxy has
``agent-check agent-port ... agent-inter ...`` on each server line. Its stats socket
(``show stat``) must show DRAIN after ``block --drain``, MAINT after a full block, DOWN with the
agent's reason after the service dies, and UP again after recovery and unblock.

The testbed's HAProxy has no health check of its own (like the Access Gateway), only the agent
check: HAProxy 2.6 then shows an UP server as ``no check`` in the status column, and the agent's
verdict as ``via agent : up`` in ``last_agt``; both together are what UP means here.
"""

from __future__ import annotations

import csv
import io
import sys
from collections.abc import Iterator

import pytest

from tests.agent import child_env
from tests.netns import wait_for
from tests.testbed.cluster import Cluster, Server, default_agent_config

# once: HAProxy's health checks: no library version changes them
pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.once]

AGENT_PORT = 5555
INTER = "100ms"
WAIT_S = 10.0  # HAProxy asks every 100 ms; the bound is loose for a loaded host


def _config(server: Server) -> str:
    return default_agent_config(server) + f'\n[agent_check]\nlisten = "0.0.0.0:{AGENT_PORT}"\n'


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """Two servers, each with an agent answering HAProxy's agent check."""
    with Cluster(2, agents=True, agent_config=_config, agent_check=(AGENT_PORT, INTER)) as c:
        yield c


def stat(c: Cluster, name: str) -> dict[str, str]:
    """The ``show stat`` row of server ``name`` in backend sslvpn."""
    text = c.haproxy_cmd("show stat").lstrip("# ")
    rows = [r for r in csv.DictReader(io.StringIO(text))
            if r.get("pxname") == "sslvpn" and r.get("svname") == name]
    assert len(rows) == 1, text
    return rows[0]


UP_WITHOUT_HEALTH_CHECK = "no check"


def _shows(row: dict[str, str], status: str) -> bool:
    if status == "UP":
        return (row["status"] == UP_WITHOUT_HEALTH_CHECK and row["last_agt"] == "via agent : up"
                and row["agent_status"] == "L7OK")
    return row["status"].split()[0] == status


def wait_status(c: Cluster, name: str, status: str) -> dict[str, str]:
    """Wait until HAProxy shows server ``name`` in ``status`` (UP, DRAIN, MAINT, DOWN)."""
    def now() -> dict[str, str] | None:
        row = stat(c, name)
        return row if _shows(row, status) else None

    try:
        row: dict[str, str] = wait_for(now, WAIT_S, f"{name} {status} in show stat", interval=0.05)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: last row {stat(c, name)}") from None
    return row


def cli(srv: Server, *args: str) -> None:
    """Run ``python -m watcher ARGS`` against the server's agent config, in its namespace."""
    r = srv.ns.run([sys.executable, "-m", "watcher", *args, "--config", str(srv.config_path)],
                   check=False, env=child_env())
    assert r.returncode == 0, (r.stdout, r.stderr)


def test_haproxy_sees_every_agent_up(cluster: Cluster) -> None:
    """With both services healthy, HAProxy shows both servers UP, from the agent's answer."""
    for srv in cluster.servers:
        wait_status(cluster, srv.name, "UP")


def test_drain_then_unblock(cluster: Cluster) -> None:
    """block --drain: DRAIN (the other server takes the new requests); unblock: UP again."""
    srv = cluster.server(1)
    cli(srv, "block", "--drain", "--reason", "rolling update")
    row = wait_status(cluster, srv.name, "DRAIN")
    assert row["status"] == "DRAIN (agent)", row
    answers = {cluster.client_get().server for _ in range(6)}
    assert answers == {"server2"}, answers
    cli(srv, "unblock")
    wait_status(cluster, srv.name, "UP")


def test_full_block_is_maint_with_the_reason(cluster: Cluster) -> None:
    """A full admin block: MAINT, the agent still asked meanwhile; unblock: UP."""
    srv = cluster.server(2)
    cli(srv, "block", "--reason", "disk swap")
    wait_status(cluster, srv.name, "MAINT")
    assert {cluster.client_get().server for _ in range(6)} == {"server1"}
    cli(srv, "unblock")
    wait_status(cluster, srv.name, "UP")


def test_service_death_is_down_with_the_reason_and_recovery_is_up(cluster: Cluster) -> None:
    """The service dies: DOWN with the agent's reason; restarted: UP again."""
    srv = cluster.server(1)
    srv.kill_core()
    row = wait_status(cluster, srv.name, "DOWN")
    assert row["status"] == "DOWN (agent)", row
    # the agent's reason, as HAProxy shows it: "via agent : down (process: PID N is not running)"
    assert row["last_agt"].startswith("via agent : down ("), row
    assert "not running" in row["last_agt"] or "zombie" in row["last_agt"], row  # reaped or not
    assert {cluster.client_get().server for _ in range(6)} == {"server2"}
    srv.start()
    wait_status(cluster, srv.name, "UP")
    assert "server1" in {cluster.client_get().server for _ in range(6)}
