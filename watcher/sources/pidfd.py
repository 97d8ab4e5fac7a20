"""Exact exit of the tracked process through a pidfd (Linux >= 5.3, Python's os.pidfd_open).

A pidfd refers to one process, not to a number: once the process has exited its pidfd stays
readable even if the kernel hands the same PID to a newcomer, so the watch is immune to PID
reuse by construction. Limits: only a thread-group leader can be opened (a thread id gives
EINVAL on kernels before 6.9), the exit status is not available (that needs waitid and a child
of ours), and a PID that is already gone when ``track`` is called cannot be tracked at all (the
caller must then treat the service as stopped and probe).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import select
import time
from collections.abc import Callable
from typing import Any

from watcher.core.catalogue import Event
from watcher.core.triggers import Evidence, Source, Trigger

__all__ = ["ProcessWatch"]


def _readable(fd: int) -> bool:
    """True when a pidfd already reports its process's exit."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


class ProcessWatch:
    """Emits a DEATH trigger when the tracked process exits; tracks at most one PID at a time."""

    def __init__(self, emit: Callable[[Trigger], None], log: Any, *,
                 clock: Callable[[], int] = time.monotonic_ns) -> None:
        self._emit = emit
        self._log = log
        self._clock = clock
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pid: int | None = None
        self._fd: int | None = None

    @property
    def tracked(self) -> int | None:
        """The PID being watched, or None."""
        return self._pid

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start watching on ``loop`` (the PID may be tracked before or after this call)."""
        self._loop = loop
        if self._fd is not None:
            loop.add_reader(self._fd, self._on_readable)

    def track(self, pid: int | None) -> bool:
        """Replace the tracked PID; True when ``tracked`` is now ``pid``, False if it is gone
        (no such process, or one that has exited and awaits its parent's wait).

        ``None`` stops tracking. A process that exits right after this call is still
        reported: its pidfd becomes readable and the DEATH trigger follows.
        """
        self._release()
        if pid is None:
            return True
        if pid <= 0:
            raise ValueError(f"not a process id: {pid}")
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return False
        except OSError as exc:
            if exc.errno == errno.EINVAL:  # a thread, not a process (thread-group leader)
                self._log.warning(Event.PIDFD_OPEN_FAILED, pid=pid, reason=os.strerror(exc.errno))
                return False
            raise
        if _readable(fd):
            # Exited already (a zombie its parent has not reaped): as gone as a missing PID.
            # Tracking it would report its death again on every call, a loop of probes.
            os.close(fd)
            return False
        self._fd, self._pid = fd, pid
        if self._loop is not None:
            self._loop.add_reader(fd, self._on_readable)
        return True

    def close(self) -> None:
        """Stop tracking, remove the reader and close the pidfd; safe to call twice."""
        self._release()
        self._loop = None

    def _release(self) -> None:
        fd, self._fd, self._pid = self._fd, None, None
        if fd is None:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(fd)
        with contextlib.suppress(OSError):
            os.close(fd)

    def _on_readable(self) -> None:
        now = self._clock()
        pid = self._pid
        self._release()
        if pid is None:
            return
        self._emit(Trigger(Source.PIDFD, f"exit pid {pid}", now, Evidence.DEATH))
