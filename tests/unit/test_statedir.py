"""The state directory's files: atomic JSON, mode 0600, owned like their directory."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from watcher.statedir import ADMIN_FILE, DAEMON_FILE, StateDir


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
