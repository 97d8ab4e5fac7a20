"""The service flapping in a tight loop, and SIGHUP with bad configs or in a storm.

Flapping: the core is SIGKILLed and restarted (through the fake service's master, SIGUSR1) as
fast as it can come back, a bounded number of times. The agent must end in the right state,
keep one jump, spend a bounded number of rule transactions and leak no descriptor.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.faults.bed import Bed, fd_count
from tests.netns import Netns, wait_for
from tests.testbed.fakesvc import core_alive

pytestmark = pytest.mark.netns

FLAPS = 25


def _restart_core(bed: Bed) -> int:
    """SIGKILL the core, ask the master for a new one, return the new core's PID once written."""
    old = bed.svc.core_pid
    listener = bed.svc.listener_pid
    assert old is not None and listener is not None
    os.kill(old, signal.SIGKILL)
    # The master starts a core only once the old one is gone (reaped).
    wait_for(lambda: core_alive(bed.svc.d) is None, 5.0, "the old core reaped")
    os.kill(listener, signal.SIGUSR1)
    new: int = wait_for(lambda: (p := bed.svc.core_pid) != old and p, 5.0, "a new core")
    return new


def test_flapping_service_ends_in_the_right_state_with_bounded_transactions(
        netns: Netns, tmp_path: Path) -> None:
    """25 kill/start cycles back to back: final open then blocked, one jump, bounded swaps, no
    descriptor more than after the first block and open."""
    bed = Bed(netns, tmp_path, probe={"rise": 2, "rise_interval_ms": 50})
    agent = bed.start_agent()
    bed.wait_both("open")
    # One block and open first: what the first swaps allocate once (pyroute2 0.9 gives the
    # firewall thread its own event loop at its first netlink batch) is no leak; what grows
    # with the flaps below is.
    bed.svc.ctl("kill-core")
    bed.wait_both("blocked", 5.0)
    bed.svc.ctl("start")
    bed.wait_both("open", 5.0)
    fds = fd_count(agent.pid)
    mark = agent.mark()
    for _ in range(FLAPS):
        _restart_core(bed)
    bed.agent.wait_event("firewall-unblock", 5.0, after=mark)
    bed.wait_both("open", 5.0)
    swaps = [e for e in agent.events()[mark:]
             if e.get("event.action") in ("firewall-block", "firewall-unblock", "firewall-repair")]
    blocks = [e for e in swaps if e["event.action"] == "firewall-block"]
    transactions = sum(int(e.get("sslvpn_heartbeat.transactions") or 0) for e in swaps)
    print(f"\n{FLAPS} flaps: {len(blocks)} blocks, {len(swaps)} swaps, {transactions} transactions, "
          f"fds {fds} -> {fd_count(agent.pid)}")
    assert 1 <= len(blocks) <= FLAPS
    assert len(swaps) <= 2 * FLAPS + 1
    assert transactions <= 2 * len(swaps)  # one per family per swap: no retry storm
    assert not agent.find("apply-failed", mark) and not agent.find("internal-error", mark)
    # The last core is the one tracked: its death blocks from the kernel event.
    mark = agent.mark()
    core = bed.svc.core_pid
    bed.svc.ctl("kill-core")
    ev = agent.wait_event("firewall-block", 3.0, after=mark)
    assert ev["sslvpn_heartbeat.trigger"] == "pidfd", ev
    assert ev["sslvpn_heartbeat.detail"] == f"exit pid {core}", ev
    bed.wait_both("blocked")
    wait_for(lambda: fd_count(agent.pid) <= fds, 3.0, f"the agent back to {fds} descriptors")
    agent.check_clean()


@pytest.mark.parametrize("bad", ["toml-garbage", "missing", "unreadable-dir", "unknown-key"])
def test_sighup_with_a_broken_config_file_keeps_the_running_one(
        netns: Netns, tmp_path: Path, bad: str) -> None:
    """SIGHUP when the file is garbage, gone or has an unknown key: config-invalid, still reacts."""
    bed = Bed(netns, tmp_path)
    agent = bed.start_agent()
    if bad == "toml-garbage":
        bed.cfg.write_bytes(b"[service\nname = \xff\xfe\n")
    elif bad == "missing":
        bed.cfg.unlink()
    elif bad == "unreadable-dir":
        bed.cfg.unlink()
        bed.cfg.mkdir()  # a directory where the file was
    else:
        bed.write(probe={"interval_s": 30.0, "rize": 2})
    mark = agent.mark()
    agent.signal(signal.SIGHUP)
    ev = agent.wait_event("config-invalid", 3.0, after=mark)
    if bad == "unknown-key":
        assert "rize" in ev["event.reason"], ev
    assert bed.alive() and not agent.find("config-reload", mark)
    mark = agent.mark()
    bed.svc.ctl("kill-core")
    ev = agent.wait_event("firewall-block", 3.0, after=mark)
    assert ev["sslvpn_heartbeat.trigger"] == "pidfd", ev  # the running sources were kept
    bed.wait_both("blocked")
    agent.check_clean()


def test_sighup_storm_leaks_nothing_and_the_daemon_keeps_working(
        netns: Netns, tmp_path: Path) -> None:
    """40 good reloads one after another: same descriptor count, still blocks and unblocks."""
    bed = Bed(netns, tmp_path, probe={"interval_s": 1.0, "fall": 1, "rise": 1})
    agent = bed.start_agent()
    fds = fd_count(agent.pid)
    for _ in range(40):
        mark = agent.mark()
        agent.signal(signal.SIGHUP)
        agent.wait_event("config-reload", 3.0, after=mark)
    # A probe in flight holds a socket or two for a moment: wait for it to settle.
    wait_for(lambda: fd_count(agent.pid) <= fds, 3.0, f"the agent back to {fds} descriptors")
    print(f"\n40 reloads: fds {fds} -> {fd_count(agent.pid)}")
    mark = agent.mark()
    bed.svc.ctl("kill-core")
    agent.wait_event("firewall-block", 3.0, after=mark)
    bed.wait_both("blocked")
    mark = agent.mark()
    bed.svc.ctl("start")
    agent.wait_event("firewall-unblock", 3.0, after=mark)
    bed.wait_both("open")
    agent.check_clean()
