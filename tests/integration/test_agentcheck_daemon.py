"""The running agent's agent-check listener: its answer follows the real service and admin block.

Each test starts the real daemon in a namespace with ``[agent_check] listen`` on loopback and
reads answers the way HAProxy does (connect, read to EOF), from inside the namespace.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from tests.agent import Agent, Service, agent_config, chain_view, child_env
from tests.netns import Netns, wait_for
from tests.testbed.cluster import socket_in

pytestmark = pytest.mark.netns

PORT = 5555


def ask(ns: Netns, timeout: float = 2.0) -> str:
    """One agent-check answer, or "" if nothing listens."""
    s = socket_in(ns.name)
    s.settimeout(timeout)
    try:
        s.connect(("127.0.0.1", PORT))
        chunks = []
        while chunk := s.recv(4096):
            chunks.append(chunk)
        return b"".join(chunks).decode("ascii")
    except ConnectionRefusedError:
        return ""
    finally:
        s.close()


def cli(ns: Netns, cfg: Path, *args: str) -> None:
    """``python -m watcher ARGS --config CFG`` in the namespace, expected to succeed."""
    r = ns.run([sys.executable, "-m", "watcher", *args, "--config", str(cfg)], check=False,
               env=child_env())
    assert r.returncode == 0, (r.stdout, r.stderr)


def test_answers_follow_health_and_admin_block(netns: Netns, tmp_path: Path) -> None:
    """up ready 100% -> up drain -> maint # -> down ready #reason -> up ready 100%."""
    svc = Service(netns, tmp_path / "svc").start()
    cfg = agent_config(tmp_path / "agent.toml", svc.d, tmp_path / "state",
                       probe={"interval_s": 30.0},
                       agent_check={"listen": f"127.0.0.1:{PORT}"})
    agent = Agent(netns, cfg, tmp_path)
    agent.start().wait_ready()
    ev = agent.wait_event("agent-check-listen", 2.0)
    assert ev["server.port"] == PORT
    assert ask(netns) == "up ready 100%\n"
    cli(netns, cfg, "block", "--drain", "--reason", "rolling update")
    wait_for(lambda: ask(netns) == "up drain\n", 5.0, "up drain")
    cli(netns, cfg, "block", "--reason", "disk swap caf\u00e9")
    wait_for(lambda: ask(netns) == "maint #admin block: disk swap caf?\n", 5.0, "maint")
    cli(netns, cfg, "unblock")
    wait_for(lambda: ask(netns) == "up ready 100%\n", 5.0, "up again after unblock")
    svc.ctl("kill-core")
    answer = wait_for(lambda: (a := ask(netns)).startswith("down ready #") and a, 5.0, "down")
    assert "not running" in answer or "zombie" in answer, answer  # reaped yet or not
    svc.ctl("start")
    wait_for(lambda: ask(netns) == "up ready 100%\n", 10.0, "up after the restart")
    assert agent.stop() == 0
    assert ask(netns) == ""  # the listener closed with the agent
    agent.check_clean()


def test_clients_that_never_read_do_not_delay_a_failover(netns: Netns, tmp_path: Path) -> None:
    """With the connection bound held by silent clients, the service's death still blocks fast."""
    svc = Service(netns, tmp_path / "svc").start()
    cfg = agent_config(tmp_path / "agent.toml", svc.d, tmp_path / "state",
                       probe={"interval_s": 30.0},
                       agent_check={"listen": f"127.0.0.1:{PORT}"})
    agent = Agent(netns, cfg, tmp_path)
    agent.start().wait_ready()
    agent.wait_event("agent-check-listen", 2.0)
    held: list[socket.socket] = []
    try:
        for _ in range(100):  # beyond the 32 the listener serves at once, none of them reading
            s = socket_in(netns.name)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
            s.connect(("127.0.0.1", PORT))
            held.append(s)
        mark = agent.mark()
        svc.ctl("kill-core")
        ev = agent.wait_event("firewall-block", 5.0, after=mark)
        assert chain_view(netns).blocked
        latency = ev["sslvpn_heartbeat.latency_ms"]
        print(f"\nfailover with 100 silent agent-check clients: {latency} ms")
        assert latency < 1000, ev
        assert ask(netns).startswith("down ready #")  # and the listener still answers
    finally:
        for s in held:
            s.close()
    assert agent.stop() == 0
    agent.check_clean()
