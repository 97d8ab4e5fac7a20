"""Daemon lifecycle: SIGTERM and firewall.on_exit, restart while blocked, tamper repair, SIGHUP."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.agent import CHAIN, Agent, Sampler, Service, agent_config, chain_view
from tests.netns import Netns, wait_for

pytestmark = pytest.mark.netns

EVENT_ONLY_INTERVAL_S = 30.0  # no safety-net tick can happen within a test


class Bed:
    """The fake service and an agent config in ``tmp_path``; the agent is not started."""

    def __init__(self, netns: Netns, tmp_path: Path, **sections: dict[str, Any]) -> None:
        self.ns, self.tmp = netns, tmp_path
        self.svc = Service(netns, tmp_path / "svc").start()
        self.state = tmp_path / "state"
        probe = {"interval_s": EVENT_ONLY_INTERVAL_S, **sections.pop("probe", {})}
        self.cfg = self.write(probe=probe, **sections)
        self.agent = Agent(netns, self.cfg, tmp_path)

    def write(self, **sections: dict[str, Any]) -> Path:
        """(Re)write the agent's config file with ``sections`` over the defaults."""
        return agent_config(self.tmp / "agent.toml", self.svc.d, self.state, **sections)

    def run_blocked(self) -> None:
        """Start the agent, then kill the core; return once the chain blocks the port."""
        self.agent.start().wait_ready()
        mark = self.agent.mark()
        self.svc.ctl("kill-core")
        self.agent.wait_event("firewall-block", 3.0, after=mark)
        assert chain_view(self.ns).blocked and chain_view(self.ns, 6).blocked


def _ipt(ns: Netns, *args: str, family: int = 4) -> None:
    ns.run(["ip6tables" if family == 6 else "iptables", "-t", "filter", *args])


@pytest.mark.parametrize("on_exit", ["open", "keep", "remove"])
def test_sigterm_applies_on_exit(netns: Netns, tmp_path: Path, on_exit: str) -> None:
    """SIGTERM while blocked: open empties the chain, keep leaves the block, remove deletes all."""
    bed = Bed(netns, tmp_path, firewall={"on_exit": on_exit})
    bed.run_blocked()
    daemon_file = bed.state / "daemon.json"
    info = json.loads(daemon_file.read_text())
    assert info["pid"] == bed.agent.pid and info["mode"] == "block", info
    assert bed.agent.stop() == 0
    stop = bed.agent.find("agent-stop")
    assert stop and stop[-1]["sslvpn_heartbeat.on_exit"] == on_exit, bed.agent.dump()
    assert not daemon_file.exists()
    for family in (4, 6):
        view = chain_view(netns, family)
        if on_exit == "open":
            assert view.open, (family, view)
        elif on_exit == "keep":
            assert view.blocked, (family, view)
        else:
            assert view.absent, (family, view)
    bed.agent.check_clean()


def test_restart_while_blocked_keeps_one_jump_and_the_block_with_no_open_window(
        netns: Netns, tmp_path: Path) -> None:
    """on_exit=keep, service down: across stop + start the REJECT never lapses; duplicates go."""
    bed = Bed(netns, tmp_path, firewall={"on_exit": "keep"})
    bed.run_blocked()
    with Sampler(netns) as sampler:
        assert bed.agent.stop() == 0
        bed.agent.check_clean()
        # Someone adds a second jump while no agent runs: the next start must reconcile to one.
        _ipt(netns, "-A", "INPUT", "-j", CHAIN)
        assert chain_view(netns).jumps == 2
        bed.agent.start()
        ready = bed.agent.wait_ready()
        sampler.wait_more()  # samples taken after the restart, and none cut off by the cap
    assert ready["sslvpn_heartbeat.mode"] == "block", ready
    lapses = sampler.lapses()
    print(f"\n{len(sampler.samples)} samples during the restart, {len(lapses)} without the block")
    assert not lapses, lapses[:3]
    assert chain_view(netns).blocked and chain_view(netns, 6).blocked  # one jump again
    bed.agent.check_clean()


TAMPER: dict[str, list[tuple[str, ...]]] = {
    "flush-chain": [("-F", CHAIN)],
    "delete-jump": [("-D", "INPUT", "-j", CHAIN)],
    "duplicate-jumps": [("-I", "INPUT", "-j", CHAIN), ("-A", "INPUT", "-j", CHAIN)],
}


@pytest.mark.parametrize("how", sorted(TAMPER))
def test_tampering_while_blocked_is_repaired_by_the_next_tick(
        netns: Netns, tmp_path: Path, how: str) -> None:
    """Chain emptied / jump removed / jumps duplicated (both families): restored, firewall-repair."""
    bed = Bed(netns, tmp_path, probe={"interval_s": 0.5})
    bed.run_blocked()
    mark = bed.agent.mark()
    t0 = time.monotonic()
    for family in (4, 6):
        for args in TAMPER[how]:
            _ipt(netns, *args, family=family)
    # the tamper shows, unless the next tick has already mended it (that takes under a ms)
    assert not chain_view(netns).blocked or bed.agent.find("firewall-repair", mark)
    ev = bed.agent.wait_event("firewall-repair", 3.0, after=mark)
    took = time.monotonic() - t0
    print(f"\n{how}: repaired after {took * 1000:.0f} ms (interval 0.5 s)")
    assert ev["sslvpn_heartbeat.trigger"] == "timer", ev
    wait_for(lambda: chain_view(netns).blocked and chain_view(netns, 6).blocked, 3.0,
             "both families blocked again")
    assert took < 2.0
    bed.agent.check_clean()


def test_foreign_rule_in_the_open_chain_is_removed_by_the_next_tick(
        netns: Netns, tmp_path: Path) -> None:
    """A rule someone adds to our chain while open is removed (the agent owns the chain)."""
    bed = Bed(netns, tmp_path, probe={"interval_s": 0.5})
    bed.agent.start().wait_ready()
    mark = bed.agent.mark()
    _ipt(netns, "-A", CHAIN, "-p", "tcp", "--dport", "8080", "-j", "DROP")
    assert not chain_view(netns).open
    bed.agent.wait_event("firewall-repair", 3.0, after=mark, trigger="timer")
    wait_for(lambda: chain_view(netns).open, 3.0, "the chain empty again")
    bed.agent.check_clean()


def test_sighup_with_a_bad_config_keeps_the_old_one_and_keeps_reacting(
        netns: Netns, tmp_path: Path) -> None:
    """SIGHUP with an invalid file: config-invalid logged, the daemon lives on, kill-core blocks."""
    bed = Bed(netns, tmp_path)
    bed.agent.start().wait_ready()
    bed.write(probe={"interval_s": EVENT_ONLY_INTERVAL_S, "rise": 0})
    mark = bed.agent.mark()
    bed.agent.signal(1)  # SIGHUP
    ev = bed.agent.wait_event("config-invalid", 3.0, after=mark)
    assert "rise" in ev["event.reason"], ev
    assert not bed.agent.find("config-reload", mark), bed.agent.dump()
    assert chain_view(netns).open
    mark = bed.agent.mark()
    bed.svc.ctl("kill-core")
    ev = bed.agent.wait_event("firewall-block", 3.0, after=mark)
    assert ev["sslvpn_heartbeat.trigger"] == "pidfd", ev
    assert chain_view(netns).blocked
    bed.agent.check_clean()


def test_sighup_with_a_good_config_applies_the_new_rise(netns: Netns, tmp_path: Path) -> None:
    """SIGHUP after probe.rise 2 -> 4: config-reload logged; the next recovery needs 4 passes."""
    bed = Bed(netns, tmp_path, probe={"rise": 2, "rise_interval_ms": 100})
    bed.agent.start().wait_ready()
    bed.write(probe={"interval_s": EVENT_ONLY_INTERVAL_S, "rise": 4, "rise_interval_ms": 100})
    mark = bed.agent.mark()
    bed.agent.signal(1)  # SIGHUP
    bed.agent.wait_event("config-reload", 3.0, after=mark)
    assert not bed.agent.find("config-invalid", mark)
    mark = bed.agent.mark()
    bed.svc.ctl("kill-core")
    ev = bed.agent.wait_event("firewall-block", 3.0, after=mark)
    assert ev["sslvpn_heartbeat.trigger"] == "pidfd", ev  # the pidfd was re-armed after the reload
    mark = bed.agent.mark()
    bed.svc.ctl("start")
    up = bed.agent.wait_event("service-up", 5.0, after=mark)
    assert up["event.reason"].startswith("4 passes in a row"), up
    wait_for(lambda: chain_view(netns).open, 2.0, "the chain open again")
    bed.agent.check_clean()


def test_core_killed_right_after_sighup_is_still_blocked_at_once(
        netns: Netns, tmp_path: Path) -> None:
    """A core that dies a few ms after a SIGHUP reload is blocked from kernel events, not the timer."""
    bed = Bed(netns, tmp_path, probe={"rise": 1})
    bed.agent.start().wait_ready()
    # The kill lands a few milliseconds after the SIGHUP, inside the reload (several offsets,
    # so the window is hit on any machine); each round must block well before the safety net.
    for delay_ms in (2, 3, 4, 6, 1):
        core = bed.svc.core_pid
        assert core is not None
        mark = bed.agent.mark()
        bed.agent.signal(signal.SIGHUP)
        time.sleep(delay_ms / 1000)  # fault placement, not synchronisation
        os.kill(core, signal.SIGKILL)
        bed.agent.wait_event("firewall-block", 1.5, after=mark)
        mark = bed.agent.mark()
        bed.svc.ctl("start")
        bed.agent.wait_event("firewall-unblock", 3.0, after=mark)
    bed.agent.check_clean()


@pytest.mark.parametrize("blocked", [False, True], ids=["open", "blocked"])
def test_a_second_agent_on_the_same_state_directory_exits_75_and_changes_nothing(
        netns: Netns, tmp_path: Path, blocked: bool) -> None:
    """A second `run` with the same configuration: exit 75 at once, naming the running agent's
    PID; the chain (both families) is byte for byte as the first agent keeps it, which runs on."""
    bed = Bed(netns, tmp_path, firewall={"on_exit": "open"})
    bed.agent.start().wait_ready()
    if blocked:
        mark = bed.agent.mark()
        bed.svc.ctl("kill-core")
        bed.agent.wait_event("firewall-block", 3.0, after=mark)
    before = [netns.save(family) for family in (4, 6)]
    second = Agent(netns, bed.cfg, tmp_path / "second")
    (tmp_path / "second").mkdir()
    t0 = time.monotonic()
    rc = second.start().wait(10.0)
    took = time.monotonic() - t0
    print(f"\nsecond agent: exit {rc} after {took:.2f} s")
    assert rc == 75, second.stderr()
    assert f"pid {bed.agent.pid}" in second.stderr() and "Traceback" not in second.stderr()
    assert not second.find("firewall-unblock") and not second.find("firewall-block")
    assert [netns.save(family) for family in (4, 6)] == before
    assert bed.agent.proc is not None and bed.agent.proc.poll() is None
    assert json.loads((bed.state / "daemon.json").read_text())["pid"] == bed.agent.pid
    bed.agent.check_clean()


def test_a_reload_cannot_move_the_instance_lock(netns: Netns, tmp_path: Path) -> None:
    """SIGHUP with [state] dir changed: a second `run` on the new directory still exits 75
    naming the running agent (which also holds the new directory's lock), and the reload
    keeps the running directory with a warning naming [state]."""
    bed = Bed(netns, tmp_path)
    bed.agent.start().wait_ready()
    moved = tmp_path / "moved-state"
    bed.write(probe={"interval_s": EVENT_ONLY_INTERVAL_S}, state={"dir": str(moved)})
    mark = bed.agent.mark()
    bed.agent.signal(signal.SIGHUP)
    bed.agent.wait_event("config-reload", 3.0, after=mark, path=str(bed.cfg))
    (tmp_path / "second").mkdir()
    second = Agent(netns, bed.cfg, tmp_path / "second")  # the rewritten config: the new directory
    try:
        rc = second.start().wait(15.0)
    finally:
        if second.proc is not None and second.proc.poll() is None:
            second.stop()
    assert rc == 75, second.stderr()
    assert f"pid {bed.agent.pid}" in second.stderr(), second.stderr()
    assert bed.agent.proc is not None and bed.agent.proc.poll() is None
    warned = [e for e in bed.agent.find("config-reload", mark) if e["log.level"] == "warning"]
    assert len(warned) == 1 and "[state]" in warned[0]["event.reason"], warned
    assert json.loads((bed.state / "daemon.json").read_text())["pid"] == bed.agent.pid
    assert not (moved / "daemon.json").exists()
    bed.agent.check_clean()


def _waiting_for_the_lock_with_sigterm_blocked(pid: int, lock: Path) -> bool:
    """True while ``pid`` has ``lock`` open (it is in its initialisation, taking the instance
    lock) and its main thread has SIGTERM blocked (SigBlk in /proc/PID/status)."""
    try:
        fds = [os.readlink(f"/proc/{pid}/fd/{n}") for n in os.listdir(f"/proc/{pid}/fd")]
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = next(int(ln.split()[1], 16) for ln in text.splitlines() if ln.startswith("SigBlk:"))
    return str(lock) in fds and bool(mask >> (signal.SIGTERM - 1) & 1)


def test_a_sigterm_while_the_daemon_initialises_is_a_stop_not_a_death(
        netns: Netns, tmp_path: Path) -> None:
    """A command holds the instance lock shared for a moment while the agent starts, so the
    agent waits in its initialisation with SIGTERM blocked; a SIGTERM sent then is delivered
    once the handlers are in place: the agent stops in order (agent-stop, exit 0), it is not
    killed by the signal half-built."""
    bed = Bed(netns, tmp_path)
    bed.state.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(bed.state / "agent.lock", os.O_RDONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # as StateDir.agent() does, for a moment
        bed.agent.start()
        wait_for(lambda: _waiting_for_the_lock_with_sigterm_blocked(
            bed.agent.pid, bed.state / "agent.lock"), 20.0, "init with SIGTERM blocked",
            interval=0.001)
        bed.agent.signal(signal.SIGTERM)
    finally:
        os.close(fd)  # the agent takes the lock now and goes on initialising
    rc = bed.agent.wait(15.0)
    assert rc == 0, (rc, bed.agent.stderr())
    assert bed.agent.find("agent-stop"), bed.agent.dump()
    assert not bed.agent.find("agent-ready")  # it stopped before its first decision
    bed.agent.check_clean()
