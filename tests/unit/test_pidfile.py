"""PID file parsing and the bounded, symlink-refusing read."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from watcher.pidfile import (
    MAX_PID_FILE_BYTES,
    PID_MAX_LIMIT,
    PidFileError,
    PidFileInfo,
    parse_pid,
    read_pid_file,
)

OWN = os.getpid()


@pytest.mark.parametrize(
    ("data", "pid"),
    [
        (b"1234", 1234),
        (b"1234\n", 1234),
        (b"1234\r\n", 1234),
        (b"1234 \n", 1234),
        (b"  1234\n", 1234),
        (b"2", 2),
        (b"%d\n" % PID_MAX_LIMIT, PID_MAX_LIMIT),
    ],
)
def test_parse_pid_accepts(data: bytes, pid: int) -> None:
    """A decimal PID with optional blanks and one trailing newline parses to that PID."""
    assert parse_pid(data) == pid


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"", "empty"),
        (b"\n", "empty"),
        (b"   \n", "empty"),
        (b"abc\n", "not a number"),
        (b"+12\n", "not a number"),
        (b"0x1f\n", "trailing garbage"),
        (b"12abc", "trailing garbage"),
        (b"12\n13\n", "trailing garbage"),
        (b"12\n\n", "trailing garbage"),
        (b"12 13", "trailing garbage"),
        (b"12\x00", "trailing garbage"),
        (b"0\n", "PID 0"),
        (b"000\n", "PID 0"),
        (b"-5\n", "negative"),
        (b"1\n", "PID 1 is init"),
        (b"%d\n" % (PID_MAX_LIMIT + 1), "larger than the kernel's maximum"),
        (b"9" * 40, "larger than the kernel's maximum"),
        ("\u0661\u0662".encode(), "not a number"),
    ],
)
def test_parse_pid_rejects_with_reason(data: bytes, words: str) -> None:
    """Every malformed content raises PidFileError whose message names the problem."""
    with pytest.raises(PidFileError, match=words) as info:
        parse_pid(data)
    assert words in info.value.reason


def test_pid_file_error_is_value_error() -> None:
    """PidFileError is a ValueError, so callers catching ValueError also catch it."""
    assert issubclass(PidFileError, ValueError)


@given(st.binary(max_size=80))
def test_parse_pid_only_raises_pid_file_error(data: bytes) -> None:
    """Arbitrary bytes either parse to a PID in 2..PID_MAX_LIMIT or raise PidFileError."""
    try:
        pid = parse_pid(data)
    except PidFileError:
        return
    assert 2 <= pid <= PID_MAX_LIMIT


@given(st.integers(min_value=2, max_value=PID_MAX_LIMIT))
def test_parse_pid_round_trips(pid: int) -> None:
    """Every valid PID written as b"%d\\n" parses back to itself."""
    assert parse_pid(b"%d\n" % pid) == pid


@given(st.from_regex(rb"\A[ \t]*[0-9]{1,8}[ \t\r]*\n?\Z"))
def test_parse_pid_well_formed_never_garbage(data: bytes) -> None:
    """Well-formed content is never called garbage: it parses or fails on the PID's value."""
    try:
        parse_pid(data)
    except PidFileError as exc:
        assert exc.reason.startswith("PID ")


def test_read_pid_file_returns_pid_and_mtime(tmp_path: Path) -> None:
    """A regular PID file yields its PID and its st_mtime_ns."""
    f = tmp_path / "svc.pid"
    f.write_bytes(b"4242\n")
    os.utime(f, ns=(1_000_000_000, 1_234_567_890_123))
    assert read_pid_file(f, own_pid=OWN) == PidFileInfo(pid=4242, mtime_ns=1_234_567_890_123)


def test_read_pid_file_missing(tmp_path: Path) -> None:
    """A missing PID file is an error naming the path and 'no such file'."""
    f = tmp_path / "absent.pid"
    with pytest.raises(PidFileError, match="no such file") as info:
        read_pid_file(f, own_pid=OWN)
    assert str(f) in info.value.reason


def test_read_pid_file_refuses_symlink(tmp_path: Path) -> None:
    """A symlink is refused even when it points to a valid PID file."""
    target = tmp_path / "real.pid"
    target.write_bytes(b"4242\n")
    link = tmp_path / "link.pid"
    link.symlink_to(target)
    with pytest.raises(PidFileError, match="symlink"):
        read_pid_file(link, own_pid=OWN)


def test_read_pid_file_refuses_fifo_without_blocking(tmp_path: Path) -> None:
    """A FIFO is refused at once (never opened, so no writer is needed)."""
    f = tmp_path / "fifo.pid"
    os.mkfifo(f)
    with pytest.raises(PidFileError, match="a FIFO"):
        read_pid_file(f, own_pid=OWN)


def test_read_pid_file_refuses_directory(tmp_path: Path) -> None:
    """A directory is refused as not a regular file."""
    d = tmp_path / "dir.pid"
    d.mkdir()
    with pytest.raises(PidFileError, match="a directory"):
        read_pid_file(d, own_pid=OWN)


def test_read_pid_file_refuses_device() -> None:
    """A character device is refused without being read."""
    with pytest.raises(PidFileError, match="a character device"):
        read_pid_file(Path("/dev/null"), own_pid=OWN)


def test_read_pid_file_refuses_socket(tmp_path: Path) -> None:
    """A UNIX socket in the PID file's place is refused."""
    f = tmp_path / "sock.pid"
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(f))
        with pytest.raises(PidFileError, match="a socket"):
            read_pid_file(f, own_pid=OWN)
    finally:
        s.close()


def test_read_pid_file_bound_is_inclusive(tmp_path: Path) -> None:
    """A file of exactly 64 bytes is read; one byte more is an error, never truncated."""
    f = tmp_path / "svc.pid"
    f.write_bytes(b" " * (MAX_PID_FILE_BYTES - 5) + b"4242\n")
    assert read_pid_file(f, own_pid=OWN).pid == 4242
    f.write_bytes(b" " * (MAX_PID_FILE_BYTES - 4) + b"4242\n")
    with pytest.raises(PidFileError, match="larger than 64 bytes"):
        read_pid_file(f, own_pid=OWN)


def test_read_pid_file_rejects_own_pid(tmp_path: Path) -> None:
    """A PID file naming the agent itself is rejected."""
    f = tmp_path / "svc.pid"
    f.write_bytes(b"%d\n" % OWN)
    with pytest.raises(PidFileError, match="agent's own PID"):
        read_pid_file(f, own_pid=OWN)


def test_read_pid_file_bad_content_names_path(tmp_path: Path) -> None:
    """A parse failure is reported with the path and the parser's reason."""
    f = tmp_path / "svc.pid"
    f.write_bytes(b"")
    with pytest.raises(PidFileError, match=r"svc\.pid: empty"):
        read_pid_file(f, own_pid=OWN)

