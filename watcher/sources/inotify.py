"""Changes of the service's PID file, from inotify (pyinotify) on the file's directory.

The directory is watched, not the file: services replace PID files by rename or by delete and
recreate, and a rename kills a watch on the file itself. When the directory does not exist (or
is deleted or moved away) the nearest existing ancestor is watched instead and the watch moves
back down when the directory reappears.

Limits of the facility: inotify says that a name changed, not what the file now holds (the
probe reads it); events of a busy directory can overflow the kernel queue (IN_Q_OVERFLOW,
reported here as a HINT); network and FUSE file systems may not report remote changes; a
directory reached through a symlink is watched where the symlink pointed when it was armed.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyinotify

from watcher.core.catalogue import Event
from watcher.core.triggers import Evidence, Source, Trigger

__all__ = ["PidFileWatch"]

_FILE_EVENTS = {
    pyinotify.IN_CREATE: "create",
    pyinotify.IN_CLOSE_WRITE: "close_write",
    pyinotify.IN_MOVED_TO: "moved_to",
    pyinotify.IN_DELETE: "delete",
    pyinotify.IN_MOVED_FROM: "moved_from",
}
_SELF_EVENTS = pyinotify.IN_DELETE_SELF | pyinotify.IN_MOVE_SELF | pyinotify.IN_IGNORED
_DIR_MASK = (pyinotify.IN_CREATE | pyinotify.IN_CLOSE_WRITE | pyinotify.IN_MOVED_TO
             | pyinotify.IN_DELETE | pyinotify.IN_MOVED_FROM
             | pyinotify.IN_DELETE_SELF | pyinotify.IN_MOVE_SELF | pyinotify.IN_ONLYDIR)
_ANCESTOR_MASK = (pyinotify.IN_CREATE | pyinotify.IN_MOVED_TO
                  | pyinotify.IN_DELETE_SELF | pyinotify.IN_MOVE_SELF | pyinotify.IN_ONLYDIR)


class PidFileWatch:
    """Emits a HINT trigger whenever the PID file's name is created, written, moved or deleted."""

    def __init__(self, pid_file: Path, emit: Callable[[Trigger], None], log: Any, *,
                 clock: Callable[[], int] = time.monotonic_ns) -> None:
        self.pid_file = Path(os.path.abspath(pid_file))
        self._emit = emit
        self._log = log
        self._clock = clock
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wm: Any = None
        self._notifier: Any = None
        self._wd: int | None = None
        self._watched: Path | None = None
        self._now = 0

    @property
    def watched_dir(self) -> Path | None:
        """The directory watched now: the PID file's directory, or its nearest existing ancestor."""
        return self._watched

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Create the inotify instance, arm the watch and start reading on ``loop``."""
        if self._wm is not None:
            return
        try:
            self._wm = pyinotify.WatchManager()
        except OSError as exc:
            # No inotify instance to be had (fs.inotify.max_user_instances reached): the pidfd,
            # sock_diag and the safety-net timer still work; say so once and do without.
            self._log.error(Event.PIDFILE_WATCH_FAILED, path=str(self.pid_file.parent),
                            reason=f"inotify unavailable: {exc}")
            return
        self._notifier = pyinotify.Notifier(self._wm, default_proc_fun=self._on_event)
        self._loop = loop
        loop.add_reader(self._wm.get_fd(), self._on_readable)
        self._arm(self._clock(), announce=False)

    def close(self) -> None:
        """Remove the reader and close the inotify instance; safe to call twice."""
        wm, self._wm = self._wm, None
        if wm is None:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(wm.get_fd())
        self._loop = None
        self._notifier = None
        self._wd = self._watched = None
        wm.close()

    # -- arming -----------------------------------------------------------------------------

    def _target_chain(self) -> list[Path]:
        """The PID file's directory followed by its ancestors, nearest first."""
        directory = self.pid_file.parent
        return [directory, *directory.parents]

    def _arm(self, now: int, *, announce: bool) -> None:
        """Watch the nearest existing directory on the way to the PID file's directory."""
        wm = self._wm
        if wm is None:
            return
        if self._wd is not None:
            wm.rm_watch(self._wd, quiet=True)
            self._wd = self._watched = None
        for directory in self._target_chain():
            if not directory.is_dir():
                continue  # checked first only to keep pyinotify from logging ENOENT
            mask = _DIR_MASK if directory == self.pid_file.parent else _ANCESTOR_MASK
            wds = wm.add_watch(str(directory), mask, quiet=True)
            wd = wds.get(str(directory), -1)
            if wd >= 0:
                self._wd, self._watched = wd, directory
                break
        else:
            self._log.error(Event.PIDFILE_WATCH_FAILED, path=str(self.pid_file.parent))
            return
        if self._watched == self.pid_file.parent:
            if announce:
                self._hint("directory appeared", now)
        else:
            self._log.warning(Event.PIDFILE_DIRECTORY_MISSING, path=str(self.pid_file.parent),
                              watching=str(self._watched))
            # The next directory down may have appeared between the lookup and the watch.
            step = self._next_step()
            if step is not None and step.is_dir():
                self._arm(now, announce=announce)

    def _next_step(self) -> Path | None:
        """The child of the watched ancestor that leads to the PID file's directory."""
        watched = self._watched
        if watched is None:
            return None
        rel = self.pid_file.parent.relative_to(watched).parts
        return watched / rel[0] if rel else None

    # -- events -----------------------------------------------------------------------------

    def _hint(self, detail: str, now: int) -> None:
        self._emit(Trigger(Source.INOTIFY, detail, now, Evidence.HINT))

    def _on_readable(self) -> None:
        notifier = self._notifier
        if notifier is None:
            return
        self._now = self._clock()
        try:
            notifier.read_events()
        except Exception as exc:  # pyinotify raises bare errors on undecodable names
            self._log.warning(Event.INOTIFY_READ_FAILED, reason=str(exc))
            self._hint("read error", self._now)
            return
        notifier.process_events()

    def _on_event(self, event: Any) -> None:
        now = self._now
        mask = int(event.mask)
        wd = getattr(event, "wd", None)
        if mask & pyinotify.IN_Q_OVERFLOW:
            self._log.warning(Event.INOTIFY_OVERFLOW)
            self._hint("overflow", now)
            return
        if wd is None or wd != self._wd:
            return  # a watch we already replaced
        watched = self._watched
        if mask & _SELF_EVENTS:
            if mask & pyinotify.IN_MOVE_SELF and self._wm is not None:
                self._wm.rm_watch(self._wd, quiet=True)  # still alive on the moved directory
            self._wd = self._watched = None  # a deleted directory's watch is already gone
            if watched == self.pid_file.parent:
                self._hint("directory gone", now)
            self._arm(now, announce=True)
            return
        name = getattr(event, "name", "") or ""
        if watched == self.pid_file.parent:
            if name != self.pid_file.name:
                return
            for bit, action in _FILE_EVENTS.items():
                if mask & bit:
                    self._hint(f"{action} pidfile", now)
                    return
            return
        step = self._next_step()
        if step is not None and name == step.name:
            self._arm(now, announce=True)
