"""ProcConnectorSource on the real kernel: real fork/exec/exit events, and the netns degrade."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess

import pytest

from tests.netns import REPO, Netns
from tests.sources import Log, until
from watcher.core.triggers import Evidence, Source, Trigger
from watcher.sources.proc_connector import ProcConnectorSource, ProcEvent, ProcEventKind


def _exec_seen(events: list[ProcEvent], pid: int) -> bool:
    return any(e.kind is ProcEventKind.EXEC and e.tgid == pid for e in events)


@pytest.mark.initns
def test_real_exec_and_exit_events_of_true() -> None:
    """Spawning `true` delivers its fork, exec and exit events from the kernel, in order."""
    async def main() -> None:
        events: list[ProcEvent] = []
        log = Log()
        src = ProcConnectorSource(lambda t: None, log, on_event=events.append)
        src.attach(asyncio.get_running_loop())
        try:
            assert src.available, log.lines
            proc = subprocess.Popen(["true"])
            proc.wait()

            def mine() -> list[ProcEventKind]:
                return [e.kind for e in events if e.tgid == proc.pid and e.pid == proc.pid]
            await until(lambda: ProcEventKind.EXIT in mine(), "exit of true")
            assert mine() == [ProcEventKind.FORK, ProcEventKind.EXEC, ProcEventKind.EXIT]
            assert log.lines == []
        finally:
            src.close()
            src.close()
    asyncio.run(main())


@pytest.mark.initns
def test_watched_pid_exec_hint_then_exit_death() -> None:
    """A watched process that execs gives a HINT; its exit a DEATH with pid; then nothing."""
    async def main() -> None:
        got: list[Trigger] = []
        events: list[ProcEvent] = []
        src = ProcConnectorSource(got.append, Log(), on_event=events.append)
        src.attach(asyncio.get_running_loop())
        # The shell waits for a line on stdin, then execs sleep: the exec happens while watched.
        proc = subprocess.Popen(["sh", "-c", "read x; exec sleep 60"], stdin=subprocess.PIPE)
        try:
            src.watch_pid(proc.pid)
            await until(lambda: _exec_seen(events, proc.pid), "the exec of sh itself")
            got.clear()
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
            await until(lambda: got, "the exec hint")
            assert (got[0].source, got[0].evidence, got[0].detail) == (
                Source.PROC_CONNECTOR, Evidence.HINT, f"exec pid {proc.pid}")
            proc.kill()
            await until(lambda: len(got) == 2, "the exit")
            death = got[1]
            assert (death.evidence, death.detail) == (Evidence.DEATH, f"exit pid {proc.pid}")
            assert src.watched is None
        finally:
            proc.kill()
            proc.wait()
            src.close()
    asyncio.run(main())


@pytest.mark.initns
def test_unwatched_processes_emit_nothing() -> None:
    """Exits of processes other than the watched one emit no trigger."""
    async def main() -> None:
        got: list[Trigger] = []
        events: list[ProcEvent] = []
        src = ProcConnectorSource(got.append, Log(), on_event=events.append)
        src.attach(asyncio.get_running_loop())
        watched = subprocess.Popen(["sleep", "60"])
        try:
            src.watch_pid(watched.pid)
            await until(lambda: _exec_seen(events, watched.pid), "the exec of sleep itself")
            got.clear()
            other = subprocess.Popen(["true"])
            other.wait()
            await until(lambda: any(e.kind is ProcEventKind.EXIT and e.tgid == other.pid
                                     for e in events), "the other exit")
            assert got == []
        finally:
            watched.kill()
            watched.wait()
            src.close()
    asyncio.run(main())


@pytest.mark.initns
def test_overrun_grows_buffer_logs_and_hints() -> None:
    """Lost messages (ENOBUFS) grow the buffer, log proc-connector-overrun and emit a HINT."""
    async def main() -> None:
        got: list[Trigger] = []
        log = Log()
        src = ProcConnectorSource(got.append, log, rcvbuf=1)  # the kernel's minimum
        src.attach(asyncio.get_running_loop())
        try:
            for _ in range(40):  # the loop does not read meanwhile: the buffer overflows
                subprocess.run(["true"], check=True)
            await until(lambda: any(t.detail == "overrun" for t in got), "the overrun hint")
            overrun = next(t for t in got if t.detail == "overrun")
            assert overrun.evidence is Evidence.HINT
            (line,) = [ln for ln in log.lines if ln[1] == "proc-connector-overrun"]
            assert line[0] == "warning" and line[2]["rcvbuf"] >= 1 << 20
        finally:
            src.close()
    asyncio.run(main())


_DEGRADE = """
import asyncio, json
from watcher.sources.proc_connector import ProcConnectorSource
class Log:
    def __getattr__(self, level):
        return lambda event, **kw: print(json.dumps({"level": level, "event": event, **kw}))
async def main():
    src = ProcConnectorSource(lambda t: print("TRIGGER"), Log())
    src.attach(asyncio.get_running_loop())
    print(json.dumps({"available": src.available}))
    src.watch_pid(1)
    src.close()
asyncio.run(main())
"""


@pytest.mark.netns
def test_degrades_with_one_line_outside_initial_namespace(netns: Netns) -> None:
    """In another network namespace attach() logs one proc-connector-unavailable and idles."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = netns.run(netns.python("-c", _DEGRADE), env=env).stdout.splitlines()
    records = [json.loads(line) for line in out]
    assert records[-1] == {"available": False}
    (warning,) = records[:-1]
    assert (warning["level"], warning["event"]) == ("warning", "proc-connector-unavailable")
    assert "namespace" in warning["reason"]
