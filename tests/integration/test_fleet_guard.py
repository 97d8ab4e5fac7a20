"""The fleet guard end to end: four real agents in their own namespaces, each with real
iptables, a service depending on one shared back end, and a real three-member etcd 3.4
cluster (tests/etcdcluster.py), shared by the module and put back healthy between tests."""

from __future__ import annotations

import hashlib
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import NEEDS_ROOT
from tests.etcdcluster import EtcdCluster
from tests.fleetbed import FleetBed
from tests.netns import wait_for

pytestmark = pytest.mark.skipif(NEEDS_ROOT, reason="needs root (namespaces, iptables)")


def _group(request: pytest.FixtureRequest) -> str:
    return "t" + hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:10]


@pytest.fixture
def bed(etcd: EtcdCluster, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[FleetBed]:
    """Four servers of one group (size 4, min_open 50 %, lease 3 s), all open and registered."""
    with FleetBed(etcd, tmp_path, _group(request)) as b:
        yield b


def _states(bed: FleetBed) -> dict[str, str]:
    return {s.name: "block" if s.blocked() else "open" if s.opened() else "other"
            for s in bed.servers}


def test_shared_back_end_down_blocks_exactly_the_budget_and_all_recover(bed: FleetBed) -> None:
    """Every probe fails (suspect): exactly size - min_open = 2 servers block, the other two
    stay open logging fleet-guard-refused naming the members not open; all open again when
    the back end returns."""
    marks = [s.agent.mark() for s in bed.servers]
    bed.backend(False)
    wait_for(lambda: sum(s.blocked() for s in bed.servers) == 2
             and all(s.agent.find("fleet-guard-refused", m) for s, m in zip(bed.servers, marks, strict=True)
                     if not s.blocked()), 30, "two blocked, two refused", interval=0.2)
    blocked = sorted(s.name for s in bed.servers if s.blocked())
    refused = [s for s in bed.servers if s.name not in blocked]
    for s, m in zip(bed.servers, marks, strict=True):
        if s in refused:
            ev = s.agent.find("fleet-guard-refused", m)[0]
            assert ev["log.level"] == "warning"
            assert sorted(ev["sslvpn_heartbeat.not_open"]) == blocked
    # It stays that way over several ticks and fleet changes: never a third block.
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        assert sum(s.blocked() for s in bed.servers) == 2, _states(bed)
        time.sleep(0.2)
    view = bed.view()
    assert view["open"] == 2 and view["budget_left"] == 0
    srv = refused[0]
    nagios = srv.cli("check", "--nagios")
    assert nagios.returncode == 2 and "fleet guard keeps it open" in nagios.stdout, nagios
    status = json.loads(srv.cli("status", "--json").stdout)["fleet"]
    assert status["refused"] is True and sorted(status["not_open"]) == blocked
    assert status["reachable"] is True and status["permit"] is False
    text = srv.cli("status").stdout
    assert "refused: the guard keeps it open" in text, text
    prom = (srv.dir / "metrics.prom").read_text()
    assert "sslvpn_heartbeat_fleet_guard_refused 1.0" in prom
    assert 'sslvpn_heartbeat_fleet_members{mode="block"} 2.0' in prom
    assert "sslvpn_heartbeat_fleet_reachable 1.0" in prom
    bed.backend(True)
    wait_for(lambda: all(s.opened() for s in bed.servers), 30, "all open again", interval=0.2)
    bed.wait_members({s.name: "open" for s in bed.servers})


def test_proven_deaths_block_at_once_beyond_the_budget(bed: FleetBed) -> None:
    """Three services killed for real: all three block (a proven DOWN never asks), more than
    the suspect budget of two; restarted, they open again."""
    for s in bed.servers[:3]:
        s.kill_service()
    wait_for(lambda: all(s.blocked() for s in bed.servers[:3]), 15, "three blocked", interval=0.1)
    for s in bed.servers[:3]:
        ev = s.agent.wait_event("firewall-block", 5)
        assert ev["sslvpn_heartbeat.trigger"] in ("pidfd", "sock_diag", "proc_connector", "inotify")
        assert not s.agent.find("fleet-guard-refused") and not s.agent.find("fleet-guard-granted")
    assert bed.server(4).opened()
    bed.wait_members({"srv1": "block", "srv2": "block", "srv3": "block", "srv4": "open"})
    for s in bed.servers[:3]:
        s.start_service()
    wait_for(lambda: all(s.opened() for s in bed.servers), 30, "all open again", interval=0.2)


def _split(bed: FleetBed) -> tuple[list[str], list[str]]:
    """Back end down; wait for two blocked and two refused; (blocked, refused) names."""
    bed.backend(False)
    wait_for(lambda: sum(s.blocked() for s in bed.servers) == 2
             and all(s.agent.find("fleet-guard-refused") for s in bed.servers if not s.blocked()),
             30, "two blocked, two refused", interval=0.2)
    blocked = [s.name for s in bed.servers if s.blocked()]
    return blocked, [s.name for s in bed.servers if s.name not in blocked]


def test_leader_killed_and_a_member_partitioned_change_no_rule(bed: FleetBed) -> None:
    """With the budget spent (two blocked, two refused), the etcd leader SIGKILLed, then a
    member partitioned: no agent changes a rule because of it."""
    etcd = bed.etcd
    blocked, _ = _split(bed)
    before = _states(bed)
    changes: list[dict[str, str]] = []

    def steady() -> None:
        now = _states(bed)
        if now != before:
            changes.append(now)

    leader = etcd.leader()
    etcd.kill(leader, signal.SIGKILL)
    wait_for(lambda: (steady(), etcd.wait_healthy(60))[1], 60, "a new leader")
    etcd.start_member(leader)
    etcd.wait_healthy(60)
    other = etcd.leader()
    etcd.partition(other)
    deadline = time.monotonic() + 8  # more than two leases: any expiry would show
    while time.monotonic() < deadline:
        steady()
        time.sleep(0.2)
    etcd.heal(other)
    etcd.wait_healthy(60)
    for _ in range(10):
        steady()
        time.sleep(0.2)
    assert changes == [], changes
    bed.backend(True)
    wait_for(lambda: all(s.opened() for s in bed.servers), 30, "all open again", interval=0.2)
    assert sorted(blocked) == sorted(n for n, st in before.items() if st == "block")


def test_an_agent_cut_off_from_etcd_decides_alone_and_the_others_count_it_not_open(
        bed: FleetBed) -> None:
    """Server 4 loses etcd: it logs fleet-unreachable once, its key expires, the others count
    it not open (one more suspect block left, not two); with the back end down it blocks as a
    lone agent and exactly one of the other three does; reconnected, it says fleet-reachable
    and registers the mode its kernel holds."""
    cut = bed.server(4)
    cut.etcd_link(False)
    cut.agent.wait_event("fleet-unreachable", 20)
    bed.wait_members({"srv1": "open", "srv2": "open", "srv3": "open"}, 20)
    assert bed.view()["budget_left"] == 1
    bed.backend(False)
    wait_for(lambda: cut.blocked() and sum(s.blocked() for s in bed.servers[:3]) == 1
             and sum(bool(s.agent.find("fleet-guard-refused")) for s in bed.servers[:3]) == 2,
             30, "the cut-off server and one other blocked", interval=0.2)
    for _ in range(10):
        assert sum(s.blocked() for s in bed.servers) == 2, _states(bed)
        time.sleep(0.2)
    assert len(cut.agent.find("fleet-unreachable")) == 1
    mark = cut.agent.mark()
    cut.etcd_link(True)
    cut.agent.wait_event("fleet-reachable", 20, after=mark)
    bed.backend(True)
    wait_for(lambda: all(s.opened() for s in bed.servers), 30, "all open again", interval=0.2)
    bed.wait_members({s.name: "open" for s in bed.servers})


def test_all_etcd_members_down_changes_no_rule_and_proven_deaths_still_block(bed: FleetBed) -> None:
    """Every etcd member stopped: each agent logs fleet-unreachable, no rule changes; a killed
    service still blocks at once; etcd back: fleet-reachable and the kernel's modes registered."""
    etcd = bed.etcd
    etcd.stop_all()
    for s in bed.servers:
        s.agent.wait_event("fleet-unreachable", 30)
    assert all(s.opened() for s in bed.servers)
    nagios = bed.server(2).cli("check", "--nagios")
    assert nagios.returncode == 1 and "etcd unreachable" in nagios.stdout, nagios
    bed.server(1).kill_service()
    wait_for(bed.server(1).blocked, 15, "srv1 blocked", interval=0.1)
    assert all(s.opened() for s in bed.servers[1:])
    etcd.start_all()
    for s in bed.servers:
        s.agent.wait_event("fleet-reachable", 60)
    bed.wait_members({"srv1": "block", "srv2": "open", "srv3": "open", "srv4": "open"}, 30)
    bed.server(1).start_service()
    wait_for(bed.server(1).opened, 30, "srv1 open again", interval=0.2)


def test_maintenance_slot_is_exclusive_waitable_and_freed_by_a_dead_holder(bed: FleetBed) -> None:
    """One slot: srv1's block --drain takes it; srv2's exits 75 naming srv1 with nothing
    changed; srv2's --wait-slot gets it after srv1's unblock; srv2's agent SIGKILLed frees it
    within the lease, so srv3 can take it; srv3's timed block gives it back when it ends."""
    s1, s2, s3 = bed.server(1), bed.server(2), bed.server(3)
    r = s1.cli("block", "--drain", "--reason", "kernel upgrade")
    assert r.returncode == 0, r.stderr
    r = s2.cli("block", "--drain")
    assert r.returncode == 75 and "srv1" in r.stderr, (r.returncode, r.stderr)
    assert s2.opened() and not (s2.dir / "state" / "admin.json").exists()
    waiting = s2.cli_popen("block", "--drain", "--wait-slot", "--timeout", "60")
    wait_for(lambda: bed.view()["slot_holders"] == ["srv1"], 10, "srv1 holding the slot")
    time.sleep(0.5)
    assert waiting.poll() is None, waiting.communicate()
    r = s1.cli("unblock")
    assert r.returncode == 0, r.stderr
    _, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 0, err
    assert "srv1" in err  # it showed who held the slot while it waited
    wait_for(lambda: bed.view()["slot_holders"] == ["srv2"], 10, "srv2 holding the slot")
    r = s3.cli("block", "--drain")
    assert r.returncode == 75 and "srv2" in r.stderr
    s2.agent.signal(signal.SIGKILL)
    s2.agent.wait(10)
    killed = time.monotonic()
    wait_for(lambda: bed.view()["slot_holders"] == [], 3 * 3 + 10, "the dead holder's slot freed",
             interval=0.2)
    freed_after = time.monotonic() - killed
    r = s3.cli("block", "--drain", "--for", "3s")
    assert r.returncode == 0, r.stderr
    assert freed_after < 3 + 10  # lease_s plus etcd's expiry check and a busy machine's slack
    wait_for(lambda: bed.view()["slot_holders"] == ["srv3"], 10, "srv3 holding the slot")
    # A timed block's end gives the slot back (the agent registers its health again).
    wait_for(lambda: bed.view()["slot_holders"] == [] and s3.opened(), 30,
             "the timed block's slot released", interval=0.2)


def test_tls_with_client_certificates(etcd_tls: EtcdCluster, tmp_path: Path,
                                      request: pytest.FixtureRequest) -> None:
    """Against a cluster that demands client certificates from a CA the test made: two
    servers, min_open 1; the back end dies: exactly one blocks, the other is refused."""
    with FleetBed(etcd_tls, tmp_path, _group(request), n=2) as bed:
        assert bed.fleet["etcd"][0].startswith("https://")
        bed.backend(False)
        wait_for(lambda: sum(s.blocked() for s in bed.servers) == 1
                 and any(s.agent.find("fleet-guard-refused") for s in bed.servers),
                 30, "one blocked, one refused", interval=0.2)
        bed.backend(True)
        wait_for(lambda: all(s.opened() for s in bed.servers), 30, "both open", interval=0.2)
