"""The running daemon reacts to kernel events: core exit, PID file changes, listener closed or hung.

Each test runs the fake service and ``python -m watcher run`` in a throwaway namespace and reads
the firewall back from the kernel. Where a kernel event must do the work, the safety-net timer is
set far beyond the test's deadlines (EVENT_ONLY_INTERVAL_S), so the timer cannot stand in for a
missed event; where the timer is the mechanism under test, it is short.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.agent import Agent, Service, agent_config, chain_view
from tests.netns import Netns, veth_pair, wait_for
from tests.testbed.fakesvc import write_pid_atomic

pytestmark = pytest.mark.netns

EVENT_ONLY_INTERVAL_S = 30.0  # no safety-net tick can happen within a test
SERVER_ADDR, CLIENT_ADDR = "10.77.0.1", "10.77.0.2"
SERVER_ADDR6, CLIENT_ADDR6 = "fd77::1", "fd77::2"


def _start(netns: Netns, tmp_path: Path, bind: str = "0.0.0.0",
           **sections: dict[str, object]) -> tuple[Service, Agent]:
    """Start the fake service, then the agent on it; return once the agent opened the chain."""
    svc = Service(netns, tmp_path / "svc", bind=bind).start()
    probe = {"interval_s": EVENT_ONLY_INTERVAL_S, **sections.pop("probe", {})}
    cfg = agent_config(tmp_path / "agent.toml", svc.d, tmp_path / "state", probe=probe, **sections)
    agent = Agent(netns, cfg, tmp_path).start()
    agent.wait_ready()
    assert chain_view(netns).open and chain_view(netns, 6).open
    return svc, agent


def test_core_killed_blocks_the_port_for_a_remote_client_through_pidfd(
        netns: Netns, client_ns: Netns, tmp_path: Path) -> None:
    """SIGKILL of the core: REJECT applied from the pidfd event, a remote client is refused."""
    veth_pair(netns, client_ns, SERVER_ADDR, CLIENT_ADDR)
    svc, agent = _start(netns, tmp_path)
    assert svc.get(SERVER_ADDR, client_ns).ok
    mark = agent.mark()
    svc.ctl("kill-core")
    ev = agent.wait_event("firewall-block", 3.0, after=mark)
    assert ev["sslvpn_heartbeat.trigger"] == "pidfd", ev
    latency = ev["sslvpn_heartbeat.latency_ms"]
    assert isinstance(latency, int | float) and latency >= 0, ev
    print(f"\nkill-core -> firewall-block latency_ms={ev['sslvpn_heartbeat.latency_ms']}")
    down = agent.find("service-down", mark)
    assert down and down[0]["sslvpn_heartbeat.trigger"] == "pidfd", agent.dump()
    assert chain_view(netns).blocked and chain_view(netns, 6).blocked
    t0 = time.monotonic()
    reply = svc.get(SERVER_ADDR, client_ns)
    print(f"IPv4 client refused after {(time.monotonic() - t0) * 1000:.0f} ms")
    assert reply.status == 0 and "ConnectionRefused" in reply.body, reply
    assert svc.get().status == 503  # loopback is exempt: the agent can still probe
    agent.check_clean()


def test_core_restarted_by_rename_is_served_again_after_rise_passes(
        netns: Netns, tmp_path: Path) -> None:
    """A new core's PID file (renamed into place) unblocks after probe.rise spaced passes."""
    svc, agent = _start(netns, tmp_path, probe={"rise": 3, "rise_interval_ms": 200})
    mark = agent.mark()
    svc.ctl("kill-core")
    agent.wait_event("firewall-block", 3.0, after=mark, trigger="pidfd")
    mark = agent.mark()
    t0 = time.monotonic()
    svc.ctl("start")  # the core writes its PID file by temp file + rename (IN_MOVED_TO)
    up = agent.wait_event("service-up", 5.0, after=mark)
    took = time.monotonic() - t0
    ev = agent.wait_event("firewall-unblock", 2.0, after=mark)
    # The inotify event started the rise; the passes after it came from the rise timer,
    # not from the safety net (which cannot fire within this test).
    assert up["event.reason"].startswith("3 passes in a row"), up
    assert ev["sslvpn_heartbeat.detail"] == "rise", ev
    assert 0.4 <= took < 3.0, took  # two rise intervals at least, far below the safety net
    print(f"\ncore start -> unblock {took * 1000:.0f} ms (rise 3 x 200 ms)")
    assert chain_view(netns).open and chain_view(netns, 6).open
    assert svc.get().ok
    # The new core is tracked: killing it blocks again through its pidfd.
    mark = agent.mark()
    new_pid = svc.core_pid
    svc.ctl("kill-core")
    ev = agent.wait_event("firewall-block", 3.0, after=mark)
    assert ev["sslvpn_heartbeat.trigger"] == "pidfd", ev
    assert ev["sslvpn_heartbeat.detail"] == f"exit pid {new_pid}", ev
    agent.check_clean()


def test_pid_file_deleted_fails_the_probe_at_once_and_blocks_at_the_next_tick(
        netns: Netns, tmp_path: Path) -> None:
    """PID file deleted while the core lives: inotify probe fails (no block, fall=2), the timer confirms."""
    svc, agent = _start(netns, tmp_path, probe={"interval_s": 1.0, "fall": 2})
    mark = agent.mark()
    core = svc.core_pid
    assert core is not None
    svc.pid_file.unlink()
    failed = agent.wait_event("probe-failed", 2.0, after=mark)
    assert failed["sslvpn_heartbeat.trigger"] == "inotify", failed
    assert failed["sslvpn_heartbeat.check"] == "pid_file", failed
    down = agent.wait_event("service-down", 3.0, after=mark)
    assert down["sslvpn_heartbeat.trigger"] == "timer", down  # a missing file alone is not proof of death
    assert down["event.reason"].startswith("2 failures in a row"), down
    block = agent.wait_event("firewall-block", 1.0, after=mark)
    assert block["sslvpn_heartbeat.trigger"] == "timer", block
    assert chain_view(netns).blocked
    # Putting the PID file back (the core still lives) serves again.
    mark = agent.mark()
    write_pid_atomic(svc.pid_file, core)
    agent.wait_event("firewall-unblock", 3.0, after=mark)
    assert chain_view(netns).open
    agent.check_clean()


@pytest.mark.parametrize("bind", ["0.0.0.0", "::"])
def test_listener_closed_while_the_core_lives_blocks_through_sock_diag(
        netns: Netns, tmp_path: Path, bind: str) -> None:
    """stop-listener (core alive; IPv4 or dual-stack listener): blocked at once by sock_diag."""
    svc, agent = _start(netns, tmp_path, bind)
    core = svc.core_pid
    mark = agent.mark()
    svc.ctl("stop-listener")
    ev = agent.wait_event("firewall-block", 3.0, after=mark)
    assert ev["sslvpn_heartbeat.trigger"] == "sock_diag", ev
    print(f"\nstop-listener -> firewall-block latency_ms={ev['sslvpn_heartbeat.latency_ms']}")
    failed = agent.find("probe-failed", mark)
    assert failed and failed[0]["sslvpn_heartbeat.check"] == "listen", agent.dump()
    assert core is not None and svc.core_pid == core and os.path.exists(f"/proc/{core}")
    assert chain_view(netns).blocked and chain_view(netns, 6).blocked
    agent.check_clean()


def test_listener_hung_is_blocked_by_the_timer_and_unblocked_after_sigcont(
        netns: Netns, tmp_path: Path) -> None:
    """SIGSTOP of the listener: HTTP probes time out and the timer blocks; SIGCONT unblocks."""
    svc, agent = _start(netns, tmp_path, probe={
        "interval_s": 0.5, "timeout_ms": 200, "http_path": "/", "fall": 2, "rise": 2,
        "rise_interval_ms": 100})
    listener = svc.listener_pid
    assert listener is not None
    mark = agent.mark()
    t0 = time.monotonic()
    os.kill(listener, signal.SIGSTOP)
    try:
        ev = agent.wait_event("firewall-block", 4.0, after=mark)
        print(f"\nSIGSTOP -> firewall-block {(time.monotonic() - t0) * 1000:.0f} ms "
              "(interval 0.5 s, timeout 200 ms, fall 2)")
        assert ev["sslvpn_heartbeat.trigger"] == "timer", ev
        failed = agent.find("probe-failed", mark)
        assert failed and failed[0]["sslvpn_heartbeat.check"] in ("connect", "http"), agent.dump()
        assert chain_view(netns).blocked
        mark = agent.mark()
    finally:
        os.kill(listener, signal.SIGCONT)
    t0 = time.monotonic()
    ev = agent.wait_event("firewall-unblock", 4.0, after=mark)
    print(f"SIGCONT -> firewall-unblock {(time.monotonic() - t0) * 1000:.0f} ms")
    assert chain_view(netns).open
    wait_for(lambda: svc.get().ok, 2.0, "the service answering again")
    agent.check_clean()


def test_graceful_stop_removing_the_pid_file_blocks_at_once(netns: Netns, tmp_path: Path) -> None:
    """ctl stop (SIGTERM: the core removes its PID file and exits) blocks from kernel events."""
    svc, agent = _start(netns, tmp_path)
    mark = agent.mark()
    svc.ctl("stop")
    ev = agent.wait_event("firewall-block", 3.0, after=mark)
    assert ev["sslvpn_heartbeat.trigger"] in ("pidfd", "inotify"), ev
    down = agent.find("service-down", mark)
    assert down and down[0]["event.reason"].startswith("confirmed by kernel event"), agent.dump()
    assert chain_view(netns).blocked
    mark = agent.mark()
    svc.ctl("start")
    agent.wait_event("firewall-unblock", 3.0, after=mark)
    assert chain_view(netns).open
    agent.check_clean()


@pytest.mark.parametrize("reject_with", ["icmp-port-unreachable", "tcp-reset"])
def test_core_killed_refuses_a_remote_ipv6_client_of_a_dual_stack_listener(
        netns: Netns, client_ns: Netns, tmp_path: Path, reject_with: str) -> None:
    """Dual-stack listener, client over IPv6: served, then refused (ip6tables) after kill-core."""
    veth_pair(netns, client_ns, SERVER_ADDR6, CLIENT_ADDR6, prefix_len=64)
    svc, agent = _start(netns, tmp_path, "::", firewall={"reject_with": reject_with})
    wait_for(lambda: svc.get(SERVER_ADDR6, client_ns).ok, 3.0, "the IPv6 client served")
    mark = agent.mark()
    svc.ctl("kill-core")
    ev = agent.wait_event("firewall-block", 3.0, after=mark)
    assert ev["sslvpn_heartbeat.trigger"] == "pidfd", ev
    assert chain_view(netns, 6).blocked
    # Over a veth pair the ICMPv6 error for the first SYN comes back while connect() still
    # holds the socket lock, and the kernel counts it as a soft error (TcpExtLockDroppedIcmps):
    # the refusal then comes with the SYN retransmission, about 1 s later. A TCP reset does not
    # have that delay. Hence the client's 3 s timeout; the figure is printed.
    t0 = time.monotonic()
    reply = svc.get(SERVER_ADDR6, client_ns, timeout=3.0)
    print(f"\nIPv6 client refused after {(time.monotonic() - t0) * 1000:.0f} ms ({reject_with})")
    assert reply.status == 0 and "ConnectionRefused" in reply.body, reply
    agent.check_clean()
