"""PID files: a strict parser and one bounded, symlink-refusing read.

A PID file is written by the service and read by an agent running as root, so it is treated
as untrusted input: no symlink is followed (``O_NOFOLLOW`` on the last component), nothing but
a regular file is opened (a FIFO would block, a device open can have side effects), at most
``MAX_PID_FILE_BYTES`` are read, and the content must be one decimal PID, optionally followed
by whitespace and at most one newline.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "MAX_PID_FILE_BYTES",
    "PID_MAX_LIMIT",
    "PidFileError",
    "PidFileInfo",
    "parse_pid",
    "read_pid_file",
]

# The kernel's hard ceiling for /proc/sys/kernel/pid_max (PID_MAX_LIMIT on 64-bit).
PID_MAX_LIMIT = 4_194_304
MAX_PID_FILE_BYTES = 64

# Optional leading blanks, the digits, then blanks/CR and at most one final newline.
_PID_RE = re.compile(rb"[ \t]*([0-9]+)[ \t\r]*\n?")
_NEGATIVE_RE = re.compile(rb"[ \t]*-[0-9]+[ \t\r]*\n?")


class PidFileError(ValueError):
    """The PID file is missing, unreadable or does not name a usable PID; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True)
class PidFileInfo:
    """A PID read from a PID file and the file's last modification (CLOCK_REALTIME, ns)."""

    pid: int
    mtime_ns: int


def _show(data: bytes, limit: int = 20) -> str:
    """A short printable rendering of untrusted bytes for an error message."""
    shown = repr(data[:limit])
    return shown + ("..." if len(data) > limit else "")


def parse_pid(data: bytes) -> int:
    """The PID in ``data``, a PID file's content; anything else raises PidFileError naming why."""
    if not data.strip():
        raise PidFileError("empty")
    m = _PID_RE.fullmatch(data)
    if m is None:
        if _NEGATIVE_RE.fullmatch(data):
            raise PidFileError(f"negative PID {_show(data.strip())}")
        head = _PID_RE.match(data)
        if head is None:
            raise PidFileError(f"not a number: {_show(data)}")
        raise PidFileError(f"trailing garbage after the PID: {_show(data[head.end():])}")
    pid = int(m.group(1))
    if pid == 0:
        raise PidFileError("PID 0 is not a process")
    if pid == 1:
        raise PidFileError("PID 1 is init, never the service")
    if pid > PID_MAX_LIMIT:
        raise PidFileError(f"PID {pid} is larger than the kernel's maximum {PID_MAX_LIMIT}")
    return pid


def _kind(mode: int) -> str:
    """Name a non-regular file type for an error message."""
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a symlink (refused)"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _os_reason(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "is a symlink (refused)"
    if exc.errno == errno.ENOENT:
        return "no such file"
    return (exc.strerror or str(exc)).lower()


def read_pid_file(path: Path, *, own_pid: int) -> PidFileInfo:
    """PID and mtime of the regular file ``path`` (no symlink, <= 64 bytes); else PidFileError."""
    try:
        # lstat first so a FIFO or device is never opened at all; fstat below closes the race.
        st = os.lstat(path)
    except OSError as exc:
        raise PidFileError(f"{path}: {_os_reason(exc)}") from None
    if not stat.S_ISREG(st.st_mode):
        raise PidFileError(f"{path}: is {_kind(st.st_mode)}, not a regular file")
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise PidFileError(f"{path}: {_os_reason(exc)}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise PidFileError(f"{path}: is {_kind(st.st_mode)}, not a regular file")
        if st.st_size > MAX_PID_FILE_BYTES:
            raise PidFileError(f"{path}: larger than {MAX_PID_FILE_BYTES} bytes ({st.st_size})")
        data = b""
        while len(data) <= MAX_PID_FILE_BYTES:
            chunk = os.read(fd, MAX_PID_FILE_BYTES + 1 - len(data))
            if not chunk:
                break
            data += chunk
    except OSError as exc:
        raise PidFileError(f"{path}: {_os_reason(exc)}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_PID_FILE_BYTES:
        raise PidFileError(f"{path}: larger than {MAX_PID_FILE_BYTES} bytes")
    try:
        pid = parse_pid(data)
    except PidFileError as exc:
        raise PidFileError(f"{path}: {exc.reason}") from None
    if pid == own_pid:
        raise PidFileError(f"{path}: names the agent's own PID {pid}")
    return PidFileInfo(pid=pid, mtime_ns=st.st_mtime_ns)
