"""The state directory's files: atomic JSON, mode 0600, owned like their directory."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from watcher.errors import EX_TEMPFAIL, AlreadyRunning
from watcher.statedir import ADMIN_FILE, DAEMON_FILE, LOCK_FILE, RunningAgent, StateDir

# A child that takes the instance lock of the directory argv[1], says so, and sleeps.
_HOLDER = """
import sys, time
from pathlib import Path
from watcher.statedir import StateDir
with StateDir(Path(sys.argv[1])).lock():
    print("locked", flush=True)
    time.sleep(60)
"""
REPO = Path(__file__).resolve().parents[2]


def _holder(state: Path) -> subprocess.Popen[str]:
    """A process (named like the agent: its command line says watcher) holding the lock."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(state)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "locked\n"
    return proc


def test_admin_record_round_trips_and_is_private(tmp_path: Path) -> None:
    """set_admin writes a 0600 file with the directory's owner; admin() reads the drain back."""
    sd = StateDir(tmp_path / "state")
    rec = sd.set_admin(True, "maintenance")
    st = (tmp_path / "state" / ADMIN_FILE).stat()
    assert stat.S_IMODE(st.st_mode) == 0o600
    dir_st = (tmp_path / "state").stat()
    assert (st.st_uid, st.st_gid) == (dir_st.st_uid, dir_st.st_gid)
    assert stat.S_IMODE(dir_st.st_mode) == 0o700
    got = sd.admin()
    assert got is not None and got.drain and got.reason == "maintenance"
    assert got.since == rec.since


def test_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    """After set_admin and write_daemon only the two named files are in the directory."""
    sd = StateDir(tmp_path)
    sd.set_admin(False, "")
    sd.write_daemon({"pid": os.getpid()})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ADMIN_FILE, DAEMON_FILE])


def test_unreadable_admin_file_counts_as_full_block(tmp_path: Path) -> None:
    """An admin file that is not a JSON object reads as a full block (never as a drain)."""
    (tmp_path / ADMIN_FILE).write_text("[1, 2]\n")
    got = StateDir(tmp_path).admin()
    assert got is not None and not got.drain


@given(st.dictionaries(st.sampled_from(["drain", "reason", "since", "other"]),
                       st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                                 st.text(max_size=20), st.lists(st.integers(), max_size=2))))
@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_admin_json_object_reads_without_raising(tmp_path: Path, data: dict[str, Any]) -> None:
    """Whatever JSON object the admin file holds, admin() returns a record; fields of the wrong
    type make it a full block (a drain only from a real true)."""
    (tmp_path / ADMIN_FILE).write_text(json.dumps(data))
    got = StateDir(tmp_path).admin()
    assert got is not None
    if got.drain:
        assert data.get("drain") is True
    typed = (isinstance(data.get("drain", False), bool) and isinstance(data.get("reason", ""), str)
             and type(data.get("since", 0.0)) in (int, float))
    if not typed:
        assert not got.drain and "malformed" in got.reason


def test_timed_block_stores_until_and_counts_as_none_once_expired(tmp_path: Path) -> None:
    """set_admin(until=T) stores T; admin() returns it before T and None from T on, while
    admin_record() still reads the stored record."""
    sd = StateDir(tmp_path)
    rec = sd.set_admin(True, "kernel upgrade", until=1000.0)
    assert json.loads((tmp_path / ADMIN_FILE).read_text())["until"] == 1000.0
    assert sd.admin(now=999.9) == rec
    assert rec.remaining(999.0) == 1.0
    assert sd.admin(now=1000.0) is None
    assert sd.admin_record() == rec and rec.remaining(2000.0) == 0.0


def test_untimed_record_has_no_until_key(tmp_path: Path) -> None:
    """An untimed block is written without ``until`` and never expires."""
    sd = StateDir(tmp_path)
    rec = sd.set_admin(False, "")
    assert "until" not in json.loads((tmp_path / ADMIN_FILE).read_text())
    assert rec.until is None and rec.remaining(1e12) is None
    assert sd.admin(now=1e12) == rec
    assert sd.expire_admin(now=1e12) is None and (tmp_path / ADMIN_FILE).exists()


def test_expire_admin_removes_only_an_expired_record(tmp_path: Path) -> None:
    """expire_admin leaves a live timed block, removes an expired one once and returns it."""
    sd = StateDir(tmp_path)
    rec = sd.set_admin(False, "x", until=50.0)
    assert sd.expire_admin(now=49.0) is None and (tmp_path / ADMIN_FILE).exists()
    assert sd.expire_admin(now=50.0) == rec
    assert not (tmp_path / ADMIN_FILE).exists()
    assert sd.expire_admin(now=50.0) is None


@given(st.one_of(st.booleans(), st.text(max_size=5), st.just(float("nan")),
                 st.just(float("inf")), st.lists(st.integers(), max_size=2)))
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_bad_until_is_a_full_untimed_block(tmp_path: Path, until: Any) -> None:
    """An ``until`` that is not a finite number makes the record a full block that never
    expires (fail safe), never a crash."""
    (tmp_path / ADMIN_FILE).write_text(json.dumps({"drain": True, "reason": "", "since": 1.0,
                                                   "until": until}))
    got = StateDir(tmp_path).admin(now=1e12)
    assert got is not None and not got.drain and got.until is None


# ---- the instance lock: the one truth of "an agent runs here"

def test_agent_is_none_where_no_agent_ever_ran_and_nothing_is_created(tmp_path: Path) -> None:
    """agent() on a directory without a lock file says no agent, and creates nothing."""
    sd = StateDir(tmp_path / "state")
    assert sd.agent() is None
    assert not (tmp_path / "state").exists()


def test_agent_is_the_lock_holder_with_its_pid(tmp_path: Path) -> None:
    """While another process holds the lock, agent() names that process's PID."""
    proc = _holder(tmp_path / "state")
    try:
        assert StateDir(tmp_path / "state").agent() == RunningAgent(proc.pid)
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_holder_is_gone_whatever_daemon_json_and_command_lines_say(tmp_path: Path) -> None:
    """SIGKILL the holder; a live process whose command line names watcher now holds the PID
    place in daemon.json: agent() still says no agent runs, and daemon() of a holder ignores it."""
    sd = StateDir(tmp_path / "state")
    proc = _holder(tmp_path / "state")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    impostor = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                                 "watcher", "sslvpn-heartbeat"])
    try:
        sd.write_daemon({"pid": impostor.pid, "health": "up", "mode": "open"})
        assert b"watcher" in Path(f"/proc/{impostor.pid}/cmdline").read_bytes()
        assert sd.agent() is None
        assert sd.daemon(RunningAgent(impostor.pid + 1)) == {}
        assert sd.daemon(RunningAgent(impostor.pid))["mode"] == "open"
    finally:
        impostor.kill()
        impostor.wait()


def test_a_second_lock_is_refused_naming_the_holder(tmp_path: Path) -> None:
    """lock() while another process holds it raises AlreadyRunning (exit 75) with its PID."""
    proc = _holder(tmp_path / "state")
    try:
        with pytest.raises(AlreadyRunning) as err, StateDir(tmp_path / "state").lock(readers_s=0.05):
            pass
        assert err.value.exit_code == EX_TEMPFAIL
        assert f"pid {proc.pid}" in str(err.value)
    finally:
        proc.kill()
        proc.wait()


def test_lock_writes_our_pid_and_agent_from_another_open_sees_it(tmp_path: Path) -> None:
    """Inside lock() the lock file holds this PID; after it, agent() says none runs."""
    sd = StateDir(tmp_path / "state")
    with sd.lock():
        assert (tmp_path / "state" / LOCK_FILE).read_text() == f"{os.getpid()}\n"
        assert sd.agent() == RunningAgent(os.getpid())  # flock: a second open contends
    assert sd.agent() is None


def test_a_reader_asking_the_lock_does_not_stop_an_agent_from_starting(tmp_path: Path) -> None:
    """A command holding the lock shared (as agent() does, for a moment) while an agent starts
    delays the start at most until it lets go; the agent then holds the lock."""
    sd = StateDir(tmp_path / "state")
    sd.ensure()
    fd = os.open(tmp_path / "state" / LOCK_FILE, os.O_RDONLY | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_SH)
    release = threading.Timer(0.2, os.close, (fd,))
    release.start()
    try:
        with sd.lock(readers_s=30.0):
            assert (tmp_path / "state" / LOCK_FILE).read_text() == f"{os.getpid()}\n"
    finally:
        release.join()  # the timer closed fd
