"""The state directory's files: atomic JSON, mode 0600, owned like their directory."""

from __future__ import annotations

import os
import stat
from pathlib import Path

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
