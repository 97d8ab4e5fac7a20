"""The state directory: the admin block that survives restarts, and the running daemon's status.

Both are small JSON files written atomically (temporary file, fsync, rename) with mode 0600 in
a directory of mode 0700, so a reader never sees half a file and only the directory's owner (the
daemon's user) or root can plant one. Each file gets the directory's owner and group before it
is renamed into place: ``block`` run by root leaves a file that a daemon running as its own
user can read.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "ADMIN_FILE",
    "DAEMON_FILE",
    "AdminRecord",
    "StateDir",
]

ADMIN_FILE = "admin-block.json"
DAEMON_FILE = "daemon.json"
_MAX = 64 * 1024


@dataclass(frozen=True)
class AdminRecord:
    """An operator's block: drain (new connections only) or full, with a reason and a time."""

    drain: bool
    reason: str
    since: float  # UNIX time


class StateDir:
    """Reads and writes the state files under one directory."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def ensure(self) -> None:
        """Create the directory (mode 0700) if it is missing."""
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _write(self, name: str, data: dict[str, Any]) -> None:
        self.ensure()
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=self.path)
        try:
            self._own_like_dir(fd)
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, sort_keys=True)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path / name)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def _own_like_dir(self, fd: int) -> None:
        """Give the open file the directory's owner and group, where this process may.

        Root may always; an unprivileged writer (the daemon, writing ``daemon.json`` in its own
        directory) already matches, or keeps its own ownership when the kernel refuses (EPERM).
        """
        want = os.stat(self.path)
        have = os.fstat(fd)
        if (have.st_uid, have.st_gid) == (want.st_uid, want.st_gid):
            return
        with contextlib.suppress(PermissionError):
            os.fchown(fd, want.st_uid, want.st_gid)

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

    def admin(self) -> AdminRecord | None:
        """The recorded admin block, or None (a corrupt file counts as a full block: fail safe)."""
        if not os.path.lexists(self.path / ADMIN_FILE):
            return None
        data = self._read(ADMIN_FILE)
        if data is None:
            return AdminRecord(False, "unreadable admin-block file: treated as a block", 0.0)
        drain, reason, since = data.get("drain", False), data.get("reason", ""), data.get("since", 0.0)
        # Fields of the wrong type (a hand-edited or damaged file) make it a full block too.
        if (not isinstance(drain, bool) or not isinstance(reason, str)
                or isinstance(since, bool) or not isinstance(since, (int, float))):
            return AdminRecord(False, "malformed admin-block file: treated as a block", 0.0)
        return AdminRecord(drain, reason[:512], float(since))

    def set_admin(self, drain: bool, reason: str) -> AdminRecord:
        """Record an admin block (replacing any earlier one), owned like the directory, mode 0600."""
        rec = AdminRecord(drain, reason, time.time())
        self._write(ADMIN_FILE, asdict(rec))
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

    def daemon(self) -> dict[str, Any] | None:
        """The running daemon's status, or None when none runs (a stale file is ignored)."""
        data = self._read(DAEMON_FILE)
        if not data:
            return None
        pid = data.get("pid")
        if not isinstance(pid, int) or pid <= 1:
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        if b"watcher" not in cmdline and b"sslvpn-heartbeat" not in cmdline:
            return None
        return data
