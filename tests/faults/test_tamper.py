"""Someone else changes the firewall under the agent: chain deleted, a reload that wipes all.

The existing lifecycle tests cover the chain flushed, the jump deleted and duplicated jumps
while blocked; these cover the chain deleted outright and ``iptables -F; iptables -X`` (what a
firewall service does on reload) in both families, while blocked and while open, and a kernel
event that arrives right after a wipe, before any repair.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.faults.bed import CHAIN, Bed
from tests.netns import Netns

pytestmark = pytest.mark.netns

TICK_S = 0.5


# Each family's tamper is one transaction: as separate commands, the agent's next tick could
# land between them and repair the chain before the -X, which then fails (the chain in use).
def _wipe(ns: Netns) -> None:
    for family in (4, 6):
        ns.run([f"ip{'6' if family == 6 else ''}tables-restore", "--noflush"],
               input="*filter\n-F\n-X\nCOMMIT\n")


def _delete_chain(ns: Netns) -> None:
    for family in (4, 6):
        ns.run([f"ip{'6' if family == 6 else ''}tables-restore", "--noflush"],
               input=f"*filter\n-D INPUT -j {CHAIN}\n-F {CHAIN}\n-X {CHAIN}\nCOMMIT\n")


@pytest.mark.parametrize("how", ["delete-chain", "wipe"])
@pytest.mark.parametrize("state", ["blocked", "open"])
def test_chain_gone_is_rebuilt_by_the_next_tick(
        netns: Netns, tmp_path: Path, how: str, state: str) -> None:
    """Chain deleted, or the whole table wiped: the next tick rebuilds chain, jump and content."""
    bed = Bed(netns, tmp_path, probe={"interval_s": TICK_S})
    bed.start_agent()
    if state == "blocked":
        mark = bed.agent.mark()
        bed.svc.ctl("kill-core")
        bed.agent.wait_event("firewall-block", 3.0, after=mark)
    bed.wait_both(state)
    mark = bed.agent.mark()
    t0 = time.monotonic()
    (_wipe if how == "wipe" else _delete_chain)(netns)
    # gone, unless the next tick has already rebuilt it (that takes a few ms)
    assert (bed.view(4).absent and bed.view(6).absent) or bed.agent.find("firewall-repair", mark)
    ev = bed.agent.wait_event("firewall-repair", 3.0, after=mark)
    took = time.monotonic() - t0
    print(f"\n{how} while {state}: repaired after {took * 1000:.0f} ms (tick {TICK_S} s)")
    assert ev["sslvpn_heartbeat.trigger"] == "timer", ev
    assert sorted(ev["sslvpn_heartbeat.families"]) == ["ipv4", "ipv6"], ev
    bed.wait_both(state, 3.0)
    assert bed.alive()
    bed.agent.check_clean()


def test_core_killed_right_after_a_wipe_is_blocked_without_waiting_for_the_tick(
        netns: Netns, tmp_path: Path) -> None:
    """Wipe, then the core dies before any tick: the block is built from a fresh read at once."""
    bed = Bed(netns, tmp_path)  # the safety net cannot fire within this test
    bed.start_agent()
    bed.wait_both("open")
    _wipe(netns)
    mark = bed.agent.mark()
    bed.svc.ctl("kill-core")
    bed.wait_both("blocked", 3.0)
    ev = bed.agent.wait_event("firewall-block", 3.0, after=mark)
    print(f"\nblock after a wipe: trigger {ev['sslvpn_heartbeat.trigger']}, "
          f"{ev.get('sslvpn_heartbeat.transactions')} transactions, "
          f"{len(bed.agent.find('apply-failed', mark))} apply-failed")
    assert bed.alive()
    bed.agent.check_clean()


def test_block_right_after_a_wipe_comes_from_the_kernel_event_in_one_round(
        netns: Netns, tmp_path: Path) -> None:
    """Wipe, then core killed: the pidfd round itself blocks, with no apply-failed in between."""
    bed = Bed(netns, tmp_path)
    bed.start_agent()
    bed.wait_both("open")
    _wipe(netns)
    mark = bed.agent.mark()
    bed.svc.ctl("kill-core")
    ev = bed.agent.wait_event("firewall-block", 3.0, after=mark)
    assert not bed.agent.find("apply-failed", mark), bed.agent.dump()
    assert ev["sslvpn_heartbeat.trigger"] == "pidfd", ev
