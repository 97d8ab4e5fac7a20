"""PidFileWatch on a real directory: PID file changes and a directory that comes and goes."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.sources import Log, until
from watcher.core.triggers import Evidence, Source, Trigger
from watcher.sources.inotify import PidFileWatch


def _run(pid_file: Path, body: Callable[[PidFileWatch, list[Trigger]], Any]) -> Log:
    log = Log()

    async def main() -> None:
        got: list[Trigger] = []
        watch = PidFileWatch(pid_file, got.append, log)
        watch.attach(asyncio.get_running_loop())
        try:
            await body(watch, got)
        finally:
            watch.close()
            watch.close()
    asyncio.run(main())
    return log


def _details(got: list[Trigger]) -> list[str]:
    return [t.detail for t in got]


def test_rename_delete_and_write(tmp_path: Path) -> None:
    """An atomic rename, a delete, and a create+write of the PID file each emit HINTs."""
    pid_file = tmp_path / "svc.pid"

    async def body(watch: PidFileWatch, got: list[Trigger]) -> None:
        (tmp_path / "svc.pid.tmp").write_text("123\n")
        os.rename(tmp_path / "svc.pid.tmp", pid_file)
        await until(lambda: "moved_to pidfile" in _details(got), "moved_to")
        pid_file.unlink()
        await until(lambda: "delete pidfile" in _details(got), "delete")
        pid_file.write_text("456\n")
        await until(lambda: "close_write pidfile" in _details(got), "close_write")
        os.rename(pid_file, tmp_path / "old.pid")
        await until(lambda: "moved_from pidfile" in _details(got), "moved_from")
        assert _details(got) == ["moved_to pidfile", "delete pidfile", "create pidfile",
                                 "close_write pidfile", "moved_from pidfile"]
        assert {(t.source, t.evidence) for t in got} == {(Source.INOTIFY, Evidence.HINT)}

    _run(pid_file, body)


def test_other_names_are_ignored(tmp_path: Path) -> None:
    """Files other than the PID file in its directory emit nothing."""
    pid_file = tmp_path / "svc.pid"

    async def body(watch: PidFileWatch, got: list[Trigger]) -> None:
        (tmp_path / "other.pid").write_text("1\n")
        (tmp_path / "other.pid").unlink()
        pid_file.write_text("2\n")  # the barrier: its events come after the others
        await until(lambda: got, "the PID file's event")
        assert _details(got)[0] == "create pidfile"

    _run(pid_file, body)


def test_missing_directory_is_rearmed(tmp_path: Path) -> None:
    """A missing directory is watched through its ancestor and re-armed when it appears."""
    pid_file = tmp_path / "a" / "b" / "svc.pid"

    async def body(watch: PidFileWatch, got: list[Trigger]) -> None:
        assert watch.watched_dir == tmp_path
        pid_file.parent.mkdir(parents=True)
        await until(lambda: "directory appeared" in _details(got), "directory appeared")
        assert watch.watched_dir == pid_file.parent
        pid_file.write_text("7\n")
        await until(lambda: "close_write pidfile" in _details(got), "close_write")

    log = _run(pid_file, body)
    assert [e for _, e, _ in log.lines] == ["pidfile-directory-missing"]


def test_deleted_directory_recovers(tmp_path: Path) -> None:
    """Deleting the directory emits 'directory gone'; recreating it re-arms the watch."""
    pid_file = tmp_path / "run" / "svc.pid"
    pid_file.parent.mkdir()

    async def body(watch: PidFileWatch, got: list[Trigger]) -> None:
        assert watch.watched_dir == pid_file.parent
        shutil.rmtree(pid_file.parent)
        await until(lambda: "directory gone" in _details(got), "directory gone")
        await until(lambda: watch.watched_dir == tmp_path, "watch on the parent")
        pid_file.parent.mkdir()
        await until(lambda: "directory appeared" in _details(got), "directory appeared")
        pid_file.write_text("9\n")
        await until(lambda: "close_write pidfile" in _details(got), "close_write")

    _run(pid_file, body)


def test_moved_directory_recovers(tmp_path: Path) -> None:
    """Moving the directory away re-arms on the parent; events in the moved one are ignored."""
    pid_file = tmp_path / "run" / "svc.pid"
    pid_file.parent.mkdir()

    async def body(watch: PidFileWatch, got: list[Trigger]) -> None:
        os.rename(pid_file.parent, tmp_path / "moved")
        await until(lambda: "directory gone" in _details(got), "directory gone")
        (tmp_path / "moved" / "svc.pid").write_text("1\n")
        pid_file.parent.mkdir()  # barrier: comes after the write in the moved directory
        await until(lambda: "directory appeared" in _details(got), "directory appeared")
        assert _details(got) == ["directory gone", "directory appeared"]

    _run(pid_file, body)


_NO_INSTANCE = """
import asyncio, json, os, resource, sys
from pathlib import Path
from watcher.sources.inotify import PidFileWatch
lines = []
class Log:
    def __getattr__(self, level):
        return lambda event, **kw: lines.append([level, event, kw])
async def main():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
    held = []
    try:
        while True:  # use up every descriptor: inotify_init then fails with EMFILE
            held.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        pass
    try:
        watch = PidFileWatch(Path(sys.argv[1]), lambda t: None, Log())
        watch.attach(asyncio.get_running_loop())
        watch.close()
    finally:
        for fd in held:
            os.close(fd)
asyncio.run(main())
print(json.dumps(lines))
"""


def test_no_inotify_instance_is_one_error_line_not_a_crash(tmp_path: Path) -> None:
    """When the kernel gives no inotify instance (descriptors used up), attach() logs one
    pidfile-watch-failed naming inotify and returns, so the daemon runs on its other sources."""
    import json
    import subprocess
    import sys

    from tests.netns import REPO

    proc = subprocess.run([sys.executable, "-c", _NO_INSTANCE, str(tmp_path / "svc.pid")],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    lines = json.loads(proc.stdout)
    assert [(lvl, ev) for lvl, ev, _ in lines] == [("error", "pidfile-watch-failed")], lines
    assert "inotify unavailable" in lines[0][2]["reason"]
