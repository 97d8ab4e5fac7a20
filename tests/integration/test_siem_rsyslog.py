"""The agent's events through a real rsyslog, as a SIEM receives them; a dead collector costs nothing.

Each test runs Debian's rsyslogd on a private configuration inside a throwaway namespace: a
relay that loads packaging/rsyslog/sslvpn-heartbeat.conf (its own /dev/log stand-in, a unix
socket, in; mmjsonparse; forward over RELP through a disk-assisted queue) and a collector that
loads packaging/rsyslog/collector.conf (imrelp, mmjsonparse, one JSON object per line to a
file), both from tests/rsyslogd.py. The agent only ever writes to the local socket: remote
shipping, queueing and retries are rsyslog's. The real daemon watches the fake service in the
same namespace.
"""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
from pathlib import Path
from typing import Any

import pytest

from tests.agent import Agent, Service, agent_config
from tests.ecs import check_event
from tests.netns import Netns, wait_for
from tests.rsyslogd import RSYSLOGD, received, start_collector, start_relay
from watcher.core.catalogue import Event
from watcher.outputs.logpipeline import ECS_VERSION

pytestmark = pytest.mark.netns

if not os.path.exists(RSYSLOGD):
    pytestmark = [pytestmark, pytest.mark.skip(reason="rsyslog is not installed")]

TRANSITIONS = ("service-down", "firewall-block", "service-up", "firewall-unblock")
EVENT_ONLY_INTERVAL_S = 30.0
DEAD_HOST = "127.0.0.66"
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def failover(svc: Service, agent: Agent) -> tuple[dict[str, Any], int]:
    """Kill the core, wait for the block, restart it, wait for the unblock; returns the block
    event and the log mark taken before the kill."""
    mark = agent.mark()
    svc.ctl("kill-core")
    block = agent.wait_event("firewall-block", 5.0, after=mark)
    svc.ctl("start")
    agent.wait_event("firewall-unblock", 10.0, after=mark)
    return block, mark


NS = "sslvpn_heartbeat."


def check_catalogue_fields(ev: dict[str, Any], pid: int) -> None:
    """The fields docs/events.md promises for a transition event, ECS-clean."""
    check_event(ev)
    action = ev["event.action"]
    cls = Event(action)
    assert ev["ecs.version"] == ECS_VERSION, ev
    assert TIMESTAMP.match(ev["@timestamp"]), ev
    assert ev["log.level"] == "info" and ev["message"] == action, ev
    assert ev["event.kind"] == "event" and ev["event.category"] == list(cls.category), ev
    assert ev["event.type"] == list(cls.type) and ev["event.outcome"] == cls.outcome, ev
    assert ev["service.name"] == "fakevpn" and ev["process.pid"] == pid, ev
    assert ev["host.hostname"] and ev["event.reason"] and ev[NS + "trigger"], ev
    assert NS + "detail" in ev, ev
    if action.startswith("service-"):
        assert ev["service.state"] == action.split("-")[1], ev
    else:
        assert isinstance(ev["event.duration"], int) and ev["event.duration"] >= 0, ev
        assert ev[NS + "latency_ms"] == round(ev["event.duration"] / 1e6, 3), ev
        assert ev[NS + "families"] == ["ipv4", "ipv6"] and ev[NS + "transactions"] >= 1, ev
        assert isinstance(ev[NS + "apply_ms"], int | float), ev


def test_failover_events_reach_the_collector_as_catalogued_json(netns: Netns, tmp_path: Path) -> None:
    """Two failovers: every event reaches the collector through the relay intact as ECS JSON
    with the catalogue's fields, and the file sink loses nothing across a logrotate-style
    rename with SIGUSR1."""
    collector, out = start_collector(netns, tmp_path / "collector")
    relay, address = start_relay(netns, tmp_path / "relay")
    svc = Service(netns, tmp_path / "svc").start()
    log_file = tmp_path / "agent.json"
    cfg = agent_config(tmp_path / "agent.toml", svc.d, tmp_path / "state",
                       probe={"interval_s": EVENT_ONLY_INTERVAL_S, "rise_interval_ms": 50},
                       log={"syslog": True, "syslog_address": address, "file": str(log_file)})
    agent = Agent(netns, cfg, tmp_path).start()
    agent.wait_ready()
    start_mark = agent.mark()  # before: the initial verdict and the first firewall-unblock
    _, mark = failover(svc, agent)
    os.rename(log_file, tmp_path / "agent.json.1")  # logrotate's "create" step, then its signal
    agent.signal(signal.SIGUSR1)
    failover(svc, agent)
    assert agent.stop() == 0
    sent = agent.events()
    assert sent[-1]["event.action"] == "agent-stop"

    got = wait_for(lambda: (lambda r: r if len(r) >= len(sent) else None)(received(out)),
                   10, "every event at the collector")
    assert got == sent  # the same objects, in order: nothing lost, added or re-encoded
    print("\none failover as the collector received it:")
    for ev in got[mark:]:
        if ev["event.action"] in TRANSITIONS or ev["event.action"] == "probe-failed":
            print(json.dumps(ev, separators=(",", ":")))
    transitions = [e for e in got[start_mark:] if e["event.action"] in TRANSITIONS]
    assert [e["event.action"] for e in transitions] == list(TRANSITIONS) * 2, transitions
    for ev in transitions:
        check_catalogue_fields(ev, agent.pid)
    for ev in got:
        check_event(ev)
    assert not (tmp_path / "relay" / "unparsed.log").exists()
    assert not (tmp_path / "collector" / "sslvpn-heartbeat-rejected.log").exists()

    rotated = [json.loads(x) for x in (tmp_path / "agent.json.1").read_text().splitlines()]
    current = [json.loads(x) for x in log_file.read_text().splitlines()]
    assert rotated + current == sent and current, (len(rotated), len(current), len(sent))
    assert current[0]["@timestamp"] >= rotated[-1]["@timestamp"]
    relay.stop()
    collector.stop()
    agent.check_clean()


def block_latencies(svc: Service, agent: Agent, rounds: int) -> list[float]:
    """latency_ms of ``rounds`` core-kill blocks (kernel event to rule committed, which
    includes logging service-down before the apply)."""
    lat = []
    for _ in range(rounds):
        block, _ = failover(svc, agent)
        assert block[NS + "trigger"] == "pidfd", block
        lat.append(float(block[NS + "latency_ms"]))
    return lat


def run_agent(netns: Netns, d: Path, svc: Service, address: str) -> Agent:
    """The daemon on ``svc`` with syslog to ``address``; returned once ready."""
    d.mkdir()
    cfg = agent_config(d / "agent.toml", svc.d, d / "state",
                       probe={"interval_s": EVENT_ONLY_INTERVAL_S, "rise_interval_ms": 50},
                       log={"syslog": True, "syslog_address": address})
    agent = Agent(netns, cfg, d).start()
    agent.wait_ready()
    return agent


def test_dead_collector_does_not_delay_a_block(netns: Netns, tmp_path: Path) -> None:
    """A TCP collector that swallows SYNs (blackholed) behind the relay costs a block no
    measurable time and the agent no line: its only peer is the local relay socket."""
    rounds = 6
    collector, out = start_collector(netns, tmp_path / "collector")
    relay, address = start_relay(netns, tmp_path / "relay")
    svc = Service(netns, tmp_path / "svc").start()
    live = run_agent(netns, tmp_path / "live", svc, address)
    block_latencies(svc, live, 1)  # warm-up (imports, first connect)
    alive = block_latencies(svc, live, rounds)
    assert live.stop() == 0
    wait_for(lambda: any(e["event.action"] == "agent-stop" for e in received(out)), 10,
             "the live agent's events at the collector")
    relay.stop()
    collector.stop()

    # The namespace's OUTPUT drops every packet to the dead collector: the relay's SYN is never
    # answered nor refused (the agent owns only its own chain, so this rule is ours alone).
    netns.run(["iptables", "-A", "OUTPUT", "-d", DEAD_HOST, "-j", "DROP"])
    dead_relay, dead_address = start_relay(netns, tmp_path / "dead-relay", DEAD_HOST)
    dead_agent = run_agent(netns, tmp_path / "dead", svc, dead_address)
    block_latencies(svc, dead_agent, 1)
    dead = block_latencies(svc, dead_agent, rounds)
    assert dead_agent.stop() == 0
    print(f"\nblock latency_ms with a live collector: {alive}\n"
          f"block latency_ms with a dead collector: {dead}\n"
          f"medians: live {statistics.median(alive):.3f} ms, dead {statistics.median(dead):.3f} ms")
    assert not dead_agent.find("sink-failed") and not dead_agent.find("log-dropped")
    assert statistics.median(dead) < statistics.median(alive) + 20.0
    assert max(dead) < 1000.0
    dead_relay.stop()
    dead_agent.check_clean()
