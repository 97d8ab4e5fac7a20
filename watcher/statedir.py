"""The state directory: the instance lock, the admin block that survives restarts, and the
running daemon's status.

The lock (an ``flock`` on ``agent.lock``, held for as long as ``run`` lives) is the one truth of
"an agent runs here, with this PID": the CLI asks the lock (``StateDir.agent()``), never a
command line or the status file, so a SIGKILLed daemon whose PID another process took is seen
as gone.

A timed admin block carries ``until``, an absolute UNIX time: it means the same after a daemon
restart or a reboot, and once that time has come the record counts as no block anywhere.

Both are small JSON files written atomically (temporary file, fsync, rename) with mode 0600 in
a directory of mode 0700, so a reader never sees half a file and only the directory's owner (the
daemon's user) or root can plant one. Each file gets the directory's owner and group before it
is renamed into place: ``block`` run by root leaves a file that a daemon running as its own
user can read.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from watcher.atomicfile import write_atomic
from watcher.errors import AlreadyRunning

__all__ = [
    "ADMIN_FILE",
    "DAEMON_FILE",
    "LOCK_FILE",
    "AdminRecord",
    "RunningAgent",
    "StateDir",
]

ADMIN_FILE = "admin-block.json"
DAEMON_FILE = "daemon.json"
LOCK_FILE = "agent.lock"
_MAX = 64 * 1024
# A command that asks the lock holds it shared for a moment; a starting agent waits this long
# for such a reader before it concludes that another agent holds the lock.
LOCK_READERS_S = 2.0


@dataclass(frozen=True)
class RunningAgent:
    """The agent that holds the state directory's lock; ``pid`` None while it has not yet
    written its PID into the lock file (the instant after it took the lock)."""

    pid: int | None


@dataclass(frozen=True)
class AdminRecord:
    """An operator's block: drain (new connections only) or full, with a reason and a time."""

    drain: bool
    reason: str
    since: float  # UNIX time
    until: float | None = None  # UNIX time at which a timed block lifts itself; None: never

    def expired(self, now: float) -> bool:
        """True when this is a timed block whose ``until`` has come (at ``now``, UNIX time)."""
        return self.until is not None and now >= self.until

    def remaining(self, now: float) -> float | None:
        """Seconds left until a timed block lifts itself (0 once expired); None if untimed."""
        return None if self.until is None else max(0.0, self.until - now)


class StateDir:
    """Reads and writes the state files under one directory."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def ensure(self) -> None:
        """Create the directory (mode 0700) if it is missing."""
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)

    @contextlib.contextmanager
    def lock(self, readers_s: float = LOCK_READERS_S) -> Iterator[None]:
        """Hold the instance lock for as long as the agent runs (creating the directory).

        The state directory names the chain's owner: a second agent on it would fight the first
        for the chain. Raises AlreadyRunning, naming the holder's PID, when another agent has
        it; a command asking ``agent()`` holds it shared for a moment only, and is waited for
        up to ``readers_s``.
        """
        self.ensure()
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            deadline = time.monotonic() + readers_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        holder = _pid_in(fd)
                        raise AlreadyRunning(
                            f"another sslvpn-heartbeat agent (pid {holder or 'unknown'}) is "
                            f"running with state directory {self.path}; not started") from None
                    time.sleep(0.01)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def agent(self) -> RunningAgent | None:
        """The agent holding this directory's lock, or None when none does: asked of the lock
        itself (a non-blocking shared attempt), never of a PID's command line. Creates nothing;
        OSError other than an absent lock file (e.g. EACCES) is the caller's."""
        try:
            fd = os.open(self.path / LOCK_FILE,
                         os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return None  # no agent ever ran here
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return RunningAgent(_pid_in(fd))
            return None  # free: released when fd closes
        finally:
            os.close(fd)

    def _write(self, name: str, data: dict[str, Any]) -> None:
        self.ensure()
        text = json.dumps(data, sort_keys=True) + "\n"
        write_atomic(self.path / name, text.encode(), mode=0o600, owner_like_dir=True,
                     durable=True)

    def _read(self, name: str) -> dict[str, Any] | None:
        """The JSON object in ``name``; None when it is absent, not a regular file, unreadable
        or not a JSON object. Never blocks (a FIFO is refused) and never raises OSError."""
        try:
            fd = os.open(self.path / name,
                         os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            raw = os.read(fd, _MAX + 1)
        except OSError:
            return None
        finally:
            os.close(fd)
        if len(raw) > _MAX:
            return None
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return None
        return data if isinstance(data, dict) else None

    def admin_record(self) -> AdminRecord | None:
        """The recorded admin block as stored, expired or not, or None when there is none (a
        corrupt file counts as a full, untimed block: fail safe)."""
        if not os.path.lexists(self.path / ADMIN_FILE):
            return None
        data = self._read(ADMIN_FILE)
        if data is None:
            return AdminRecord(False, "unreadable admin-block file: treated as a block", 0.0)
        drain, reason, since = data.get("drain", False), data.get("reason", ""), data.get("since", 0.0)
        until = data.get("until")
        # Fields of the wrong type (a hand-edited or damaged file) make it a full block too.
        if (not isinstance(drain, bool) or not isinstance(reason, str)
                or isinstance(since, bool) or not isinstance(since, (int, float))
                or isinstance(until, bool) or not isinstance(until, (int, float, type(None)))
                or (until is not None and not math.isfinite(until))):
            return AdminRecord(False, "malformed admin-block file: treated as a block", 0.0)
        return AdminRecord(drain, reason[:512], float(since),
                           None if until is None else float(until))

    def admin(self, now: float | None = None) -> AdminRecord | None:
        """The admin block in force at ``now`` (UNIX time, default the current time), or None:
        a timed block past its ``until`` counts as no block, whether or not its file remains."""
        rec = self.admin_record()
        if rec is None or rec.expired(time.time() if now is None else now):
            return None
        return rec

    def expire_admin(self, now: float | None = None) -> AdminRecord | None:
        """Remove the admin record if it is a timed block past its ``until``; return what was
        removed (None when nothing was: no record, an untimed one, or one still in force).

        A record written again between the read and the removal (a new ``block``) is kept: the
        file is removed only while it is still the one read (same inode and change time).
        """
        path = self.path / ADMIN_FILE
        try:
            before = os.lstat(path)
        except OSError:
            return None
        rec = self.admin_record()
        if rec is None or not rec.expired(time.time() if now is None else now):
            return None
        try:
            after = os.lstat(path)
            if (after.st_ino, after.st_ctime_ns) != (before.st_ino, before.st_ctime_ns):
                return None
            os.unlink(path)
        except FileNotFoundError:
            return None  # someone else (the daemon, another command) removed it first
        return rec

    def read_admin(self, now: float) -> tuple[AdminRecord | None, AdminRecord | None]:
        """The daemon's read: the block in force at ``now``, and the expired timed record this
        call removed (None if none; one it may not remove still reads as no block)."""
        try:
            gone = self.expire_admin(now)
        except OSError:
            gone = None
        return self.admin(now), gone

    def set_admin(self, drain: bool, reason: str, *, until: float | None = None) -> AdminRecord:
        """Record an admin block (replacing any earlier one), owned like the directory, mode
        0600; ``until`` (UNIX time) makes it a timed block that lifts itself then."""
        rec = AdminRecord(drain, reason, time.time(), until)
        data = asdict(rec)
        if until is None:
            del data["until"]  # an untimed record reads the same to an older agent
        self._write(ADMIN_FILE, data)
        return rec

    def clear_admin(self) -> bool:
        """Remove the admin block; True if there was one."""
        try:
            os.unlink(self.path / ADMIN_FILE)
            return True
        except FileNotFoundError:
            return False

    def write_daemon(self, info: dict[str, Any]) -> None:
        """Publish the running daemon's status (pid, health state, firewall mode)."""
        self._write(DAEMON_FILE, info)

    def clear_daemon(self) -> None:
        """Remove the daemon's status file (on exit)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path / DAEMON_FILE)

    def daemon(self, agent: RunningAgent) -> dict[str, Any]:
        """What the running ``agent`` last published (health, mode, ...); {} when the status
        file is absent or another process's (a killed agent's file, the holder not written yet)."""
        data = self._read(DAEMON_FILE)
        if not data or agent.pid is None or data.get("pid") != agent.pid:
            return {}
        return data


def _pid_in(fd: int) -> int | None:
    """The PID the lock's holder wrote into the lock file, or None if not (yet) one."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isascii() and text.isdigit() and int(text) > 0 else None
