"""The daemon SIGKILLed (no on_exit runs) in each state and started again.

A killed daemon leaves the chain as it was; the next run must converge from its first probe to
exactly one jump, and must never open the port of a service that is down, not even for the
time between its start and its first probe. A sampler reads the chain from the kernel in a loop
across the kill and the restart.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from tests.agent import CHAIN, child_env
from tests.faults.bed import Bed, Sampler, ipt
from tests.netns import Netns, wait_for

pytestmark = pytest.mark.netns


def _kill_and_restart(bed: Bed) -> None:
    bed.agent.signal(signal.SIGKILL)
    assert bed.agent.wait(5.0) == -signal.SIGKILL
    # Someone adds a second jump while no agent runs: the next run must leave one.
    ipt(bed.ns, "-A", "INPUT", "-j", CHAIN)
    bed.start_agent()


@pytest.mark.parametrize("state", ["down", "admin-block", "admin-drain", "down-rising"])
def test_killed_while_blocking_restarts_with_no_open_window(
        netns: Netns, tmp_path: Path, state: str) -> None:
    """SIGKILL while DOWN, admin-blocked, draining, or DOWN with the service back but its rise
    not yet complete: across kill + restart the REJECT never lapses, and the restarted daemon
    holds the same block (or, for the risen service, opens only through its first probe)."""
    # down-rising: a rise long enough that the kill lands inside it
    bed = Bed(netns, tmp_path, probe={"rise": 3, "rise_interval_ms": 2000}) \
        if state == "down-rising" else Bed(netns, tmp_path)
    bed.start_agent()
    mark = bed.agent.mark()
    if state.startswith("down"):
        bed.svc.ctl("kill-core")
    else:
        netns.run([sys.executable, "-m", "watcher", "block", "--reason", "maintenance",
                   *(["--drain"] if state == "admin-drain" else []),
                   "--config", str(bed.cfg)], env=child_env())
    want = "drained" if state == "admin-drain" else "blocked"
    bed.agent.wait_event("firewall-drain" if want == "drained" else "firewall-block", 3.0,
                         after=mark)
    bed.wait_both(want)
    if state == "down-rising":
        rising = bed.agent.mark()
        bed.svc.ctl("start")
        wait_for(lambda: bed.svc.get().ok, 5.0, "the service answering again")
        assert not bed.agent.find("service-up", rising)
        assert bed.both("blocked")  # 1 of 3 passes at most, 2 s apart: still DOWN
    with Sampler(netns) as sampler:
        _kill_and_restart(bed)
        sampler.wait_more()
    ready = bed.agent.events()
    if state == "down-rising":
        # The new daemon starts from STARTING: its first probe finds the service healthy and
        # opens the chain at once (a healthy service needs no rise from STARTING).
        (first,) = bed.agent.find("service-initial-up")
        assert first["sslvpn_heartbeat.trigger"] == "startup", first
        bed.wait_both("open")
        assert ready and bed.alive()
        bed.agent.check_clean()
        return
    assert bed.both(want), (bed.view(4), bed.view(6))  # one jump again, both families
    lapses = sampler.lapses()
    print(f"\n{state}: {len(sampler.samples)} samples across kill + restart, {len(lapses)} open")
    assert not lapses, lapses[:3]
    assert ready and bed.alive()
    bed.agent.check_clean()


def test_killed_while_up_restarts_open_with_one_jump(netns: Netns, tmp_path: Path) -> None:
    """SIGKILL while UP: the chain stays open through the restart, duplicates are removed."""
    bed = Bed(netns, tmp_path)
    bed.start_agent()
    bed.wait_both("open")
    with Sampler(netns) as sampler:
        _kill_and_restart(bed)
        sampler.wait_more()
    bed.wait_both("open")
    blocked = [s for s in sampler.samples if s.rules]
    assert not blocked, blocked[:3]  # a healthy service is never blocked by the restart
    assert bed.svc.get().ok
    bed.agent.check_clean()


def test_service_dies_while_no_daemon_runs_is_blocked_by_the_next_start(
        netns: Netns, tmp_path: Path) -> None:
    """SIGKILL while UP, core killed while no daemon runs: the next start blocks at once."""
    bed = Bed(netns, tmp_path)
    bed.start_agent()
    bed.agent.signal(signal.SIGKILL)
    bed.agent.wait(5.0)
    bed.svc.ctl("kill-core")
    assert bed.both("open")  # nobody is watching: the stale open chain is the fault
    bed.start_agent()
    ev = bed.agent.wait_event("firewall-block", 3.0)
    assert ev["sslvpn_heartbeat.trigger"] == "startup", ev
    bed.wait_both("blocked")
    assert bed.alive()
    bed.agent.check_clean()
