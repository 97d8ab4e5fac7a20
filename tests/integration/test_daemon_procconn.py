"""The proc connector source on the real kernel, in the initial namespace, touching no firewall.

The daemon itself is not run here (it would change the initial namespace's firewall): the
source it uses is driven directly in an asyncio loop, watching a child process of the test.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
from typing import Any

import pytest

from tests.sources import Log
from watcher.core.triggers import Evidence, Source, Trigger
from watcher.sources.proc_connector import ProcConnectorSource, ProcEvent, ProcEventKind

pytestmark = pytest.mark.initns


async def _watch(argv: list[str], act: Any, timeout: float = 5.0) -> tuple[
        int, list[Trigger], Log, list[ProcEvent]]:
    """Start ``argv`` (stdin a pipe), watch its PID, call ``act(proc)``; collect until DEATH,
    with every decoded kernel event the source saw."""
    loop = asyncio.get_running_loop()
    got: list[Trigger] = []
    seen: list[ProcEvent] = []
    done = asyncio.Event()

    def emit(t: Trigger) -> None:
        got.append(t)
        if t.evidence is Evidence.DEATH:
            done.set()

    log = Log()
    src = ProcConnectorSource(emit, log, on_event=seen.append)
    src.attach(loop)
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE)
    try:
        assert src.available, log.records
        src.watch_pid(proc.pid)
        act(proc)
        await asyncio.wait_for(done.wait(), timeout)
    finally:
        src.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait(5)
    return proc.pid, got, log, seen


def _exit_of(seen: list[ProcEvent], pid: int) -> ProcEvent:
    return next(e for e in seen if e.kind is ProcEventKind.EXIT and e.pid == e.tgid == pid)


def test_exit_of_a_killed_child_is_a_death_trigger_with_its_signal() -> None:
    """SIGKILL of a watched ``sleep``: one DEATH trigger naming the PID, wait status "killed by 9"."""
    pid, got, log, seen = asyncio.run(_watch(["sleep", "30"],
                                              lambda p: p.send_signal(signal.SIGKILL)))
    death = [t for t in got if t.evidence is Evidence.DEATH]
    assert len(death) == 1 and death == got[-1:], got
    t = death[0]
    assert t.source is Source.PROC_CONNECTOR and t.detail == f"exit pid {pid}", t
    # exit_code is the wait status (low 7 bits: the killing signal); exit_signal is the signal
    # the parent is sent (SIGCHLD), as the kernel's struct exit_proc_event has them.
    ev = _exit_of(seen, pid)
    assert ev.exit_code & 0x7F == signal.SIGKILL, ev
    assert ev.exit_signal == signal.SIGCHLD, ev
    assert not [r for r in log.lines if r[0] != "info"], log.lines


def _go(proc: subprocess.Popen[Any]) -> None:
    assert proc.stdin is not None
    proc.stdin.write(b"go\n")
    proc.stdin.close()


def test_exec_of_the_watched_process_is_a_hint_then_its_exit_a_death() -> None:
    """A watched shell that execs ``true`` on our go: an EXEC HINT, then its exit as DEATH."""
    # The shell waits for the go, so the watch is armed before this exec (the exec of ``sh``
    # by Popen may be reported too: it is read after the watch was set).
    pid, got, _, seen = asyncio.run(_watch(["sh", "-c", "read _; exec true"], _go))
    assert got and all(t.source is Source.PROC_CONNECTOR for t in got), got
    kinds = [(t.evidence, t.detail) for t in got]
    assert kinds[-2:] == [(Evidence.HINT, f"exec pid {pid}"), (Evidence.DEATH, f"exit pid {pid}")], kinds
    assert set(kinds[:-2]) <= {(Evidence.HINT, f"exec pid {pid}")}, kinds
    assert _exit_of(seen, pid).exit_code == 0
