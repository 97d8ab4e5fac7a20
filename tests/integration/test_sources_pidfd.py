"""ProcessWatch on real processes: the pidfd reports the exit of exactly the tracked process."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time

from tests.sources import Log, until
from watcher.core.triggers import Evidence, Source, Trigger
from watcher.sources.pidfd import ProcessWatch


async def _first(got: list[Trigger], timeout: float = 5.0) -> Trigger:
    await until(lambda: got, "a trigger", timeout)
    return got[0]


def test_exit_emits_death_with_pid() -> None:
    """Killing the tracked process emits one DEATH trigger with its pid and stops tracking."""
    async def main() -> None:
        got: list[Trigger] = []
        watch = ProcessWatch(got.append, Log())
        watch.attach(asyncio.get_running_loop())
        proc = subprocess.Popen(["sleep", "60"])
        try:
            assert watch.track(proc.pid)
            assert watch.tracked == proc.pid
            sent = time.monotonic_ns()
            proc.send_signal(signal.SIGKILL)
            trig = await _first(got)
            assert (trig.source, trig.evidence, trig.detail) == (
                Source.PIDFD, Evidence.DEATH, f"exit pid {proc.pid}")
            assert trig.monotonic_ns >= sent
            assert watch.tracked is None
        finally:
            proc.kill()
            proc.wait()
            watch.close()
            watch.close()
    asyncio.run(main())


def test_track_before_attach_and_unreaped_zombie() -> None:
    """A pid tracked before attach() is reported, even if it is an unreaped zombie by then."""
    async def main() -> None:
        got: list[Trigger] = []
        watch = ProcessWatch(got.append, Log())
        proc = subprocess.Popen(["sleep", "60"])
        try:
            assert watch.track(proc.pid)
            proc.kill()
            os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped
            watch.attach(asyncio.get_running_loop())
            assert (await _first(got)).detail == f"exit pid {proc.pid}"
        finally:
            proc.wait()
            watch.close()
    asyncio.run(main())


def test_gone_process_returns_false() -> None:
    """track() of a reaped pid returns False and tracks nothing."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    watch = ProcessWatch(lambda t: None, Log())
    assert watch.track(proc.pid) is False
    assert watch.tracked is None


def test_exited_unreaped_process_returns_false() -> None:
    """track() of a zombie (exited, its parent has not waited) returns False and tracks nothing,
    so the daemon does not re-track it, and hear of its death, on every probe."""
    proc = subprocess.Popen(["true"])
    try:
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped
        watch = ProcessWatch(lambda t: None, Log())
        assert watch.track(proc.pid) is False
        assert watch.tracked is None
    finally:
        proc.wait()


def test_replacing_the_pid_forgets_the_old_one() -> None:
    """After track(b), the exit of the previously tracked a emits nothing; b's exit does."""
    async def main() -> None:
        got: list[Trigger] = []
        watch = ProcessWatch(got.append, Log())
        watch.attach(asyncio.get_running_loop())
        a = subprocess.Popen(["sleep", "60"])
        b = subprocess.Popen(["sleep", "60"])
        try:
            assert watch.track(a.pid) and watch.track(b.pid)
            a.kill()
            a.wait()
            b.kill()
            # a died first: had it still been watched, its trigger would be the first.
            assert (await _first(got)).detail == f"exit pid {b.pid}"
        finally:
            for p in (a, b):
                p.kill()
                p.wait()
            watch.close()
    asyncio.run(main())


def test_track_none_stops() -> None:
    """track(None) stops tracking: the old process's exit emits nothing."""
    async def main() -> None:
        got: list[Trigger] = []
        watch = ProcessWatch(got.append, Log())
        watch.attach(asyncio.get_running_loop())
        loop = asyncio.get_running_loop()
        proc = subprocess.Popen(["sleep", "60"])
        own = os.pidfd_open(proc.pid)  # our own view of the same exit, as a barrier
        exited: asyncio.Future[None] = loop.create_future()
        loop.add_reader(own, lambda: exited.done() or exited.set_result(None))
        try:
            assert watch.track(proc.pid)
            assert watch.track(None) and watch.tracked is None
            proc.kill()
            # Readers ready in the same poll run before this coroutine resumes.
            await asyncio.wait_for(exited, 5)
            await asyncio.sleep(0)
            assert got == []
        finally:
            loop.remove_reader(own)
            os.close(own)
            proc.kill()
            proc.wait()
            watch.close()
    asyncio.run(main())
