"""iptables busy, failing or gone: the daemon retries and converges, never dies; start-up without
iptables exits 69 having changed nothing; SIGTERM while a swap waits for the lock still exits.

The lock tests run the legacy (x_tables) flavour through ``tests.netns.legacy_path_dir`` and a
private ``XTABLES_LOCKFILE``, so the host's /run/xtables.lock is never held.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

from tests.agent import child_env
from tests.faults.bed import Bed, hold_lock, valid
from tests.integration.test_daemon_notify import Receiver
from tests.netns import Netns, legacy_path_dir

pytestmark = pytest.mark.netns

LOCK_WAIT = {"lock_wait_s": 1.0}


def _legacy_bed(netns: Netns, tmp_path: Path, backend: str, **sections: dict[str, object]) -> Bed:
    lock = tmp_path / "xtables.lock"
    with legacy_path_dir(tmp_path) as path:
        env = {"PATH": path, "XTABLES_LOCKFILE": str(lock)}
    return Bed(netns, tmp_path, env=env, flavour="legacy",
               firewall={"backend": backend, **LOCK_WAIT}, **sections)


@pytest.mark.parametrize(("backend", "reload"), [("restore", False), ("iptc", False),
                                               ("restore", True)],
                         ids=["restore", "iptc", "restore-sighup-meanwhile"])
def test_lock_held_by_another_program_delays_the_block_until_released(
        netns: Netns, tmp_path: Path, backend: str, reload: bool) -> None:
    """Lock held while the core dies: retries logged, daemon alive; released -> blocked. With a
    SIGHUP between the failed block and its retry, the retry is not lost either, although no
    probe result changes any more."""
    bed = _legacy_bed(netns, tmp_path, backend)
    bed.start_agent()
    bed.wait_both("open")
    mark = bed.agent.mark()
    with hold_lock(tmp_path / "xtables.lock"):
        bed.svc.ctl("kill-core")
        bed.agent.wait_event("apply-failed", 10.0, after=mark)
        assert bed.alive()
        assert bed.both("open")  # nothing could change while the lock was held
        if reload:
            reload_mark = bed.agent.mark()
            bed.agent.signal(signal.SIGHUP)
            bed.agent.wait_event("config-reload", 5.0, after=reload_mark)
        released = time.monotonic()
    ev = bed.agent.wait_event("firewall-block", 10.0, after=mark)
    bed.wait_both("blocked")
    print(f"\n{backend}: blocked {time.monotonic() - released:.2f} s after the lock was released; "
          f"{len(bed.agent.find('apply-failed', mark))} apply-failed")
    assert ev["event.reason"].startswith("retry after failure: "), ev
    assert bed.alive()
    bed.agent.check_clean()


@pytest.mark.parametrize(("backend", "lock_wait_s"), [("restore", 1.0), ("restore", 5.0),
                                                    ("iptc", 5.0)])
def test_sigterm_while_the_lock_stays_held_exits_within_10s_with_a_whole_chain(
        netns: Netns, tmp_path: Path, backend: str, lock_wait_s: float) -> None:
    """Blocked, then another program takes the xtables lock for a minute and the service comes
    back (its unblock now waits for the lock), then SIGTERM: the daemon exits within 10 s (75:
    on_exit could not open the chain), and the chain is whole and blocked, as it was."""
    lock = tmp_path / "xtables.lock"
    with legacy_path_dir(tmp_path) as path:
        env = {"PATH": path, "XTABLES_LOCKFILE": str(lock)}
    bed = Bed(netns, tmp_path, env=env, flavour="legacy",
              firewall={"backend": backend, "lock_wait_s": lock_wait_s})
    bed.start_agent()
    bed.svc.ctl("kill-core")
    bed.wait_both("blocked")
    mark = bed.agent.mark()
    with hold_lock(lock):  # held until the agent is gone, whatever the agent waits for
        bed.svc.ctl("start")
        bed.agent.wait_event("service-up", 10.0, after=mark)  # its unblock waits for the lock
        t0 = time.monotonic()
        bed.agent.signal(signal.SIGTERM)
        rc = bed.agent.wait(15.0)
        took = time.monotonic() - t0
        views = [bed.view(family) for family in (4, 6)]
    print(f"\nSIGTERM during a lock wait ({backend}, lock_wait_s {lock_wait_s}): exit {rc} "
          f"after {took:.2f} s")
    assert took < 10.0, bed.agent.dump()
    assert rc == 75, bed.agent.stderr()
    stop = bed.agent.find("agent-stop", mark)
    assert stop and stop[-1]["sslvpn_heartbeat.exit_code"] == 75, bed.agent.dump()
    assert any("on_exit=open" in e["event.reason"] for e in bed.agent.find("apply-failed", mark))
    for view in views:
        assert valid(view) and view.blocked, views  # nothing could change under the held lock
    bed.agent.check_clean()


def _wrappers(tmp_path: Path) -> tuple[Path, Path]:
    """A bin dir whose iptables programs exec the real ones unless the returned flag file (or
    FLAG.PROGRAM, for that program alone) exists."""
    d, flag = tmp_path / "ipt-bin", tmp_path / "fail-iptables"
    d.mkdir()
    for fam in ("iptables", "ip6tables"):
        for suffix in ("", "-save", "-restore"):
            real = shutil.which(f"{fam}{suffix}")
            assert real
            script = d / f"{fam}{suffix}"
            script.write_text(f'#!/bin/sh\nif [ -e "{flag}" ] || [ -e "{flag}.{fam}{suffix}" ]; then '
                              f'echo "injected failure" >&2; exit 1; fi\nexec "{real}" "$@"\n')
            script.chmod(0o755)
    return d, flag


@pytest.mark.parametrize("how", ["failing", "missing"])
def test_iptables_failing_or_gone_at_run_time_is_retried_until_it_works(
        netns: Netns, tmp_path: Path, how: str) -> None:
    """restore/save fail (exit 1) or vanish while the core dies: apply-failed, alive, then blocked."""
    bindir, flag = _wrappers(tmp_path)
    bed = Bed(netns, tmp_path, env={"PATH": str(bindir)}, firewall={"backend": "restore"})
    bed.start_agent()
    bed.wait_both("open")
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    if how == "failing":
        flag.touch()
    else:
        for prog in bindir.iterdir():
            prog.rename(hidden / prog.name)
    mark = bed.agent.mark()
    bed.svc.ctl("kill-core")
    failed = bed.agent.wait_event("apply-failed", 5.0, after=mark)
    word = "exited 1" if how == "failing" else "not installed"
    assert word in failed["event.reason"], failed
    # An iptables-restore started ahead of need may still commit; the read-back then fails.
    # Either way the chain is whole: open or blocked, one jump.
    assert bed.alive() and valid(bed.view(4)) and valid(bed.view(6))
    if how == "failing":
        flag.unlink()
    else:
        for prog in hidden.iterdir():
            prog.rename(bindir / prog.name)
    ev = bed.agent.wait_event("firewall-block", 10.0, after=mark)
    bed.wait_both("blocked")
    assert ev["event.reason"].startswith("retry after failure: "), ev
    assert bed.alive()
    bed.agent.check_clean()


def test_run_without_iptables_exits_69_and_changes_nothing(netns: Netns, tmp_path: Path) -> None:
    """`run` with no iptables on PATH exits 69 naming iptables; no chain in either flavour."""
    bed_cfg = tmp_path / "agent.toml"
    from tests.agent import agent_config

    agent_config(bed_cfg, tmp_path / "svc", tmp_path / "state")
    env = child_env(PATH=str(Path(sys.executable).parent))
    res = netns.run([sys.executable, "-m", "watcher", "run", "--config", str(bed_cfg)],
                    env=env, check=False, timeout=20)
    assert res.returncode == 69, (res.returncode, res.stderr)
    assert "iptables" in res.stderr and "Traceback" not in res.stderr, res.stderr
    for flavour in ("nft", "legacy"):
        for family in (4, 6):
            assert "sslvpn" not in netns.save(family, flavour)
    assert not os.path.exists(tmp_path / "state" / "daemon.json")


def test_ip6tables_failing_once_at_start_up_does_not_drop_ipv6_for_good(
        netns: Netns, tmp_path: Path) -> None:
    """ip6tables-save fails at start-up only: once it works, a dead service is blocked in IPv6 too."""
    bindir, flag = _wrappers(tmp_path)
    once = Path(f"{flag}.ip6tables-save")
    once.touch()
    bed = Bed(netns, tmp_path, env={"PATH": str(bindir)}, firewall={"backend": "restore"},
              probe={"interval_s": 0.5})
    bed.agent.start()  # READY waits for the first decision in both families
    bed.agent.wait_event("ipv6-read-failed", 10.0)
    once.unlink()
    bed.agent.wait_ready()
    mark = bed.agent.mark()
    bed.svc.ctl("kill-core")
    bed.agent.wait_event("firewall-block", 3.0, after=mark)
    bed.wait_both("blocked", 3.0)
    assert bed.alive()
    bed.agent.check_clean()


def test_a_second_sigterm_during_a_held_lock_exits_143_at_once(netns: Netns, tmp_path: Path) -> None:
    """Blocked, the xtables lock taken by another program, the service back (its unblock waits),
    SIGTERM (STOPPING=1 seen), then a second SIGTERM: the agent exits 143 (128 + SIGTERM) within
    a few seconds, not 1 ("unhealthy"), logs why at warning, and the chain stays whole."""
    receiver = Receiver(tmp_path / "notify.sock")
    lock = tmp_path / "xtables.lock"
    with legacy_path_dir(tmp_path) as path:
        env = {"PATH": path, "XTABLES_LOCKFILE": str(lock), "NOTIFY_SOCKET": str(receiver.path)}
    try:
        bed = Bed(netns, tmp_path, env=env, flavour="legacy",
                  firewall={"backend": "restore", "lock_wait_s": 5.0})
        bed.start_agent()
        bed.svc.ctl("kill-core")
        bed.wait_both("blocked")
        mark = bed.agent.mark()
        with hold_lock(lock):  # held until the agent is gone
            bed.svc.ctl("start")
            bed.agent.wait_event("service-up", 10.0, after=mark)  # its unblock waits for the lock
            bed.agent.signal(signal.SIGTERM)
            receiver.wait("STOPPING=1", 10.0)
            t0 = time.monotonic()
            bed.agent.signal(signal.SIGTERM)
            rc = bed.agent.wait(10.0)
            took = time.monotonic() - t0
            views = [bed.view(family) for family in (4, 6)]
        print(f"\nsecond SIGTERM: exit {rc} after {took:.2f} s")
        assert rc == 128 + signal.SIGTERM, bed.agent.stderr()
        stop = bed.agent.find("agent-stop", mark)
        assert stop and stop[-1]["sslvpn_heartbeat.exit_code"] == 143, bed.agent.dump()
        assert stop[-1]["log.level"] == "warning", stop[-1]
        for view in views:
            assert valid(view) and view.blocked, views
        bed.agent.check_clean()
    finally:
        receiver.sock.close()
