"""The fake service's pure helpers: PID file reading and atomic writing, liveness of a PID."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.netns import wait_for
from tests.testbed.fakesvc import pid_alive, read_pid, write_pid_atomic


@pytest.mark.parametrize("content", [b"", b"abc\n", b"-5\n", b"0\n", b"12 34\n"])
def test_read_pid_rejects_what_is_not_a_positive_pid(tmp_path: Path, content: bytes) -> None:
    """read_pid returns None for empty, non-numeric, zero, negative or two-word content."""
    f = tmp_path / "x.pid"
    f.write_bytes(content)
    assert read_pid(f) is None


def test_read_pid_reads_a_pid_and_tolerates_absence(tmp_path: Path) -> None:
    """read_pid parses '1234\\n' and returns None when the file does not exist."""
    f = tmp_path / "x.pid"
    assert read_pid(f) is None
    f.write_text("1234\n")
    assert read_pid(f) == 1234


def test_write_pid_atomic_replaces_the_file_by_rename(tmp_path: Path) -> None:
    """The PID file is replaced by a new inode, never rewritten in place; no temp file remains."""
    f = tmp_path / "svc.pid"
    write_pid_atomic(f, 111)
    first = f.stat().st_ino
    with open(f) as keep_open:  # holds the old inode, so the new file cannot reuse its number
        write_pid_atomic(f, 222)
        assert f.stat().st_ino != first
        assert keep_open.read() == "111\n"  # the old file was not rewritten in place
    assert read_pid(f) == 222
    assert sorted(p.name for p in tmp_path.iterdir()) == ["svc.pid"]


def test_pid_alive_counts_a_zombie_as_dead() -> None:
    """A live child is alive; once it exits (a zombie, not yet reaped) it is dead."""
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)
    try:
        assert pid_alive(child.pid)
        assert child.stdin is not None
        child.stdin.close()

        def zombie() -> bool:
            with open(f"/proc/{child.pid}/stat", "rb") as f:
                return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"

        wait_for(zombie, 5, "the child to become a zombie")
        assert not pid_alive(child.pid)
    finally:
        child.kill()
        child.wait()
    assert not pid_alive(child.pid)
    assert pid_alive(os.getpid())
