"""Admin block / unblock / drain while the daemon runs, and the block surviving a daemon restart."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.agent import AdminBed, Sampler, chain_view
from tests.netns import Netns, wait_for
from watcher.statedir import StateDir

pytestmark = pytest.mark.netns

REACTION_LIMIT_S = 1.0  # the target is 100 ms; the bound is loose so a loaded host does not flake


def _until(bed: AdminBed, pred: str, act: Callable[[], object]) -> float:
    """Do ``act`` (a CLI call, a write); seconds from its end until the chain satisfies
    ChainView.<pred> (polled iptables-save)."""
    act()
    t0 = time.monotonic()
    wait_for(lambda: getattr(chain_view(bed.ns), pred), 5.0, f"chain {pred}", interval=0.0)
    return time.monotonic() - t0


@pytest.fixture
def bed(netns: Netns, tmp_path: Path) -> AdminBed:
    return AdminBed(netns, tmp_path)


def test_cli_block_and_unblock_take_effect_quickly_while_running(bed: AdminBed) -> None:
    """block: chain blocked, daemon logs admin-block; unblock: the daemon reopens within 1 s."""
    bed.agent.start().wait_ready()
    assert chain_view(bed.ns).open
    mark = bed.agent.mark()
    bed.cli("block", "--reason", "maintenance")
    assert chain_view(bed.ns).blocked  # the CLI applied the block before it returned
    ev = bed.agent.wait_event("admin-block", 2.0, after=mark)
    assert ev["sslvpn_heartbeat.trigger"] == "admin" and ev["event.reason"] == "maintenance", ev
    assert chain_view(bed.ns, 6).blocked
    mark = bed.agent.mark()
    t_unblock = _until(bed, "open", lambda: bed.cli("unblock"))
    print(f"\nCLI unblock return -> open {t_unblock * 1000:.1f} ms")
    ev = bed.agent.wait_event("firewall-unblock", 2.0, after=mark)
    assert ev["sslvpn_heartbeat.trigger"] == "admin", ev
    print(f"daemon unblock latency_ms={ev['sslvpn_heartbeat.latency_ms']}")
    assert t_unblock < REACTION_LIMIT_S
    assert chain_view(bed.ns, 6).open
    bed.agent.check_clean()


def test_block_recorded_in_the_state_dir_is_applied_by_the_daemon_alone(bed: AdminBed) -> None:
    """An admin file written (as the CLI does) but not applied: the daemon applies it within 1 s."""
    bed.agent.start().wait_ready()
    mark = bed.agent.mark()
    took = _until(bed, "blocked", lambda: StateDir(bed.state).set_admin(False, "written directly"))
    ev = bed.agent.wait_event("firewall-block", 2.0, after=mark)
    print(f"\nadmin file written -> blocked {took * 1000:.1f} ms (daemon latency_ms="
          f"{ev['sslvpn_heartbeat.latency_ms']})")
    assert ev["sslvpn_heartbeat.trigger"] == "admin", ev
    assert took < REACTION_LIMIT_S
    took = _until(bed, "open", StateDir(bed.state).clear_admin)
    print(f"admin file removed -> open {took * 1000:.1f} ms")
    assert took < REACTION_LIMIT_S
    bed.agent.check_clean()


def test_block_drain_rejects_only_syn_and_the_daemon_keeps_it(bed: AdminBed) -> None:
    """block --drain: one SYN-only REJECT rule; the daemon holds drain (not full block, not open)."""
    bed.agent.start().wait_ready()
    mark = bed.agent.mark()
    _until(bed, "drained", lambda: bed.cli("block", "--drain"))
    ev = bed.agent.wait_event("firewall-drain", 2.0, after=mark)
    assert ev["sslvpn_heartbeat.trigger"] == "admin", ev
    assert chain_view(bed.ns).drained and chain_view(bed.ns, 6).drained
    rule = chain_view(bed.ns).rules[0]
    assert "--tcp-flags FIN,SYN,RST,ACK SYN" in rule, rule
    # A kernel event during the drain (core killed and restarted) does not end it.
    mark = bed.agent.mark()
    bed.svc.ctl("kill-core")
    bed.agent.wait_event("service-down", 3.0, after=mark, trigger="pidfd")
    assert chain_view(bed.ns).drained
    bed.svc.ctl("start")
    bed.agent.wait_event("service-up", 3.0, after=mark)
    assert chain_view(bed.ns).drained
    _until(bed, "open", lambda: bed.cli("unblock"))
    bed.agent.check_clean()


def test_admin_block_persists_across_a_daemon_restart_with_no_open_window(bed: AdminBed) -> None:
    """Stop (on_exit=open) and start the agent while admin-blocked: never open, still blocked."""
    bed.agent.start().wait_ready()
    _until(bed, "blocked", lambda: bed.cli("block", "--reason", "upgrade"))
    bed.agent.wait_event("admin-block", 2.0)
    with Sampler(bed.ns) as sampler:
        assert bed.agent.stop() == 0
        stopped = bed.agent.find("firewall-keep")
        assert stopped, bed.agent.dump()
        bed.agent.check_clean()
        bed.agent.start()
        ready = bed.agent.wait_ready()
        assert ready["sslvpn_heartbeat.mode"] == "block", ready
        sampler.wait_more()  # samples taken after the restart, and none cut off by the cap
    assert bed.svc.get().ok  # the service is healthy, yet the block holds
    not_blocked = [s for s in sampler.samples if not s.blocked]
    print(f"\n{len(sampler.samples)} samples during the restart, {len(not_blocked)} not blocked")
    assert not not_blocked, not_blocked[:3]
    assert chain_view(bed.ns).blocked and chain_view(bed.ns, 6).blocked
    assert bed.agent.find("admin-block"), bed.agent.dump()
    _until(bed, "open", lambda: bed.cli("unblock"))
    bed.agent.check_clean()


def test_admin_block_made_while_no_daemon_runs_is_held_by_the_next_start(bed: AdminBed) -> None:
    """block with no daemon, then start it on a healthy service: it comes up blocked, not open."""
    bed.cli("block")
    assert chain_view(bed.ns).blocked
    bed.agent.start()
    ready = bed.agent.wait_ready()
    assert ready["sslvpn_heartbeat.mode"] == "block", ready
    assert not bed.agent.find("firewall-unblock"), bed.agent.dump()
    assert chain_view(bed.ns).blocked
    bed.agent.check_clean()


def test_unblock_while_the_service_is_down_leaves_the_health_block(bed: AdminBed) -> None:
    """Admin block over a dead core, then unblock: the chain stays blocked (health says DOWN)."""
    bed.agent.start().wait_ready()
    bed.cli("block", "--drain")
    bed.agent.wait_event("firewall-drain", 2.0)
    mark = bed.agent.mark()
    bed.svc.ctl("kill-core")
    bed.agent.wait_event("service-down", 3.0, after=mark, trigger="pidfd")
    assert chain_view(bed.ns).drained  # the admin block overrides the health
    mark = bed.agent.mark()
    _until(bed, "blocked", lambda: bed.cli("unblock"))
    ev = bed.agent.wait_event("firewall-block", 2.0, after=mark)
    assert ev["sslvpn_heartbeat.trigger"] == "admin", ev
    assert not bed.agent.find("firewall-unblock", mark), bed.agent.dump()
    assert chain_view(bed.ns).blocked and chain_view(bed.ns, 6).blocked
    bed.agent.check_clean()


def _on_pid(pid: int, argv: list[str]) -> subprocess.Popen[bytes]:
    """Start ``argv``, on ``pid`` if the kernel gives it back (ns_last_pid, a few tries: other
    processes of the host may take it first); else on whatever PID it gets."""
    last = Path("/proc/sys/kernel/ns_last_pid")
    for _ in range(5):
        try:
            last.write_text(str(pid - 1))
        except OSError:
            break
        proc = subprocess.Popen(argv)
        if proc.pid == pid:
            return proc
        proc.kill()
        proc.wait()
    return subprocess.Popen(argv)


def test_unblock_after_the_daemon_was_killed_opens_even_if_its_pid_is_taken(bed: AdminBed) -> None:
    """The daemon SIGKILLed while admin-blocked; a process whose command line says watcher and
    sslvpn-heartbeat holds its PID (and its place in daemon.json): unblock asks the instance
    lock, finds no agent, and opens the chain in both families; status says not running."""
    bed.agent.start().wait_ready()
    bed.cli("block", "--reason", "maintenance")
    assert chain_view(bed.ns).blocked
    dead = bed.agent.pid
    bed.agent.signal(signal.SIGKILL)
    assert bed.agent.wait(5.0) == -signal.SIGKILL
    impostor = _on_pid(dead, [sys.executable, "-c", "import time; time.sleep(60)",
                              "-m", "watcher", "run", "sslvpn-heartbeat"])
    try:
        daemon_json = bed.state / "daemon.json"
        info = json.loads(daemon_json.read_text())
        info["pid"] = impostor.pid  # the impostor holds the killed daemon's place
        daemon_json.write_text(json.dumps(info))
        print(f"\nkilled daemon pid {dead}, impostor pid {impostor.pid}")
        assert b"watcher" in Path(f"/proc/{impostor.pid}/cmdline").read_bytes()
        out, _ = bed.cli("unblock")
        assert out.startswith("unblocked:"), out
        assert chain_view(bed.ns).open and chain_view(bed.ns, 6).open
        assert bed.status()["daemon"] is None
    finally:
        impostor.kill()
        impostor.wait()


def test_cleanup_refuses_while_an_agent_runs_and_removes_once_it_stopped(bed: AdminBed) -> None:
    """cleanup asks the instance lock: with the agent running it exits 75 naming the agent's
    PID and removes nothing (the agent would put the chain back); once the agent stopped, it
    removes the chain and its jump in both families."""
    bed.agent.start().wait_ready()
    _, err = bed.cli("cleanup", code=75)
    assert f"pid {bed.agent.pid}" in err and "nothing removed" in err, err
    assert chain_view(bed.ns).open and chain_view(bed.ns, 6).open
    assert bed.agent.stop() == 0
    out, _ = bed.cli("cleanup")
    assert out.startswith("removed chain"), out
    assert not chain_view(bed.ns).present and not chain_view(bed.ns, 6).present
