"""Timed admin blocks (``block --for``): lifted by the daemon at ``until``, across restarts;
an expired record counts as none for a starting daemon and for the CLI."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.agent import AdminBed, chain_view
from tests.netns import Netns, wait_for
from watcher.statedir import ADMIN_FILE, StateDir

pytestmark = pytest.mark.netns

LIFT_LATE_S = 1.5  # how late after `until` the chain may open (target: a few ms; load margin)


@pytest.fixture
def bed(netns: Netns, tmp_path: Path) -> AdminBed:
    return AdminBed(netns, tmp_path)


def _opened_at(ns: Netns, timeout: float) -> float:
    wait_for(lambda: chain_view(ns).open, timeout, "the chain open again", interval=0.01)
    return time.time()


def test_the_running_daemon_lifts_a_timed_block_at_until(bed: AdminBed) -> None:
    """block --for 5s: blocked at once, status shows the time left; at until (not before, and
    soon after) the daemon opens the chain, removes the record and logs admin-unblock expired."""
    bed.agent.start().wait_ready()
    mark = bed.agent.mark()
    out, _ = bed.cli("block", "--for", "5s", "--reason", "patching")
    assert "lifts itself at" in out and "(in 5s)" in out, out
    rec = StateDir(bed.state).admin()
    assert rec is not None and rec.until is not None
    assert chain_view(bed.ns).blocked and chain_view(bed.ns, 6).blocked
    text, _ = bed.cli("status")
    st = bed.status()
    assert time.time() < rec.until, "two status commands took the whole 5 s block"
    assert "lifts itself at" in text, text
    assert st["admin_block"]["until"] == rec.until
    assert 0 < st["admin_block"]["remaining_s"] <= 5.0
    opened = _opened_at(bed.ns, 5.0 + LIFT_LATE_S + 3.0)
    print(f"\nchain opened {(opened - rec.until) * 1000:.1f} ms after until")
    assert rec.until <= opened < rec.until + LIFT_LATE_S
    ev = bed.agent.wait_event("admin-unblock", 2.0, after=mark, reason="expired")
    assert ev["sslvpn_heartbeat.trigger"] == "admin", ev
    unblock = bed.agent.wait_event("firewall-unblock", 2.0, after=mark, trigger="admin")
    assert unblock["sslvpn_heartbeat.detail"] == "timed block expired", unblock
    assert not (bed.state / ADMIN_FILE).exists()
    assert chain_view(bed.ns, 6).open
    assert bed.status()["admin_block"] is None
    bed.agent.check_clean()


def test_a_timed_drain_survives_a_daemon_restart_and_lifts_at_until(bed: AdminBed) -> None:
    """block --drain --for 6s, daemon restarted meanwhile: the new daemon comes up drained and
    still lifts the drain at the stored wall-clock time."""
    bed.agent.start().wait_ready()
    bed.cli("block", "--drain", "--for", "6s")
    rec = StateDir(bed.state).admin()
    assert rec is not None and rec.until is not None and rec.drain
    assert bed.agent.stop() == 0
    assert chain_view(bed.ns).drained  # on_exit=open keeps an admin block
    bed.agent.start()
    assert bed.agent.wait_ready()["sslvpn_heartbeat.mode"] == "drain"
    assert time.time() < rec.until, "the restart took the whole block: raise the duration"
    mark = bed.agent.mark()
    opened = _opened_at(bed.ns, 6.0 + LIFT_LATE_S + 3.0)
    assert rec.until <= opened < rec.until + LIFT_LATE_S
    bed.agent.wait_event("admin-unblock", 2.0, after=mark, reason="expired")
    bed.agent.check_clean()


def test_a_daemon_starting_on_an_expired_record_treats_it_as_no_block(bed: AdminBed) -> None:
    """A timed block that expired while no daemon ran (a reboot): the starting daemon opens the
    chain on a healthy service, removes the record and logs admin-unblock expired."""
    StateDir(bed.state).set_admin(False, "before the reboot", until=time.time() - 5)
    bed.agent.start()
    assert bed.agent.wait_ready()["sslvpn_heartbeat.mode"] == "open"
    ev = bed.agent.wait_event("admin-unblock", 2.0, reason="expired")
    assert ev["sslvpn_heartbeat.until"] is not None, ev
    assert not bed.agent.find("admin-block")
    assert not (bed.state / ADMIN_FILE).exists()
    assert chain_view(bed.ns).open
    bed.agent.check_clean()


def test_cli_status_removes_an_expired_record(bed: AdminBed) -> None:
    """No daemon: status finds an expired timed block, removes it, shows no block and logs
    admin-unblock expired; an untimed block is left alone."""
    until = time.time() - 1
    StateDir(bed.state).set_admin(True, "", until=until)
    out, err = bed.cli("status")
    assert "admin block: none (a timed block expired at" in out, out
    assert not (bed.state / ADMIN_FILE).exists()
    logged = [json.loads(ln) for ln in err.splitlines() if ln.startswith("{")]
    assert [e["event.reason"] for e in logged if e["event.action"] == "admin-unblock"] == \
        ["expired"], err
    StateDir(bed.state).set_admin(False, "untimed")
    assert bed.status()["admin_block"]["until"] is None
    assert (bed.state / ADMIN_FILE).exists()


@pytest.mark.parametrize("bad", ["10", "1.5h", "5w", "0s", "-5m", "2h30"])
def test_a_bad_duration_is_exit_2_and_records_nothing(bed: AdminBed, bad: str) -> None:
    """block --for BAD: exit 2 naming the accepted forms; no record, no chain made."""
    _, err = bed.cli("block", f"--for={bad}", code=2)
    assert "--for" in err and ("90s, 30m, 2h" in err or "longer than 0s" in err), err
    assert not (bed.state / ADMIN_FILE).exists()
    assert chain_view(bed.ns).absent
