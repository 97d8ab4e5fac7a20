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

from watcher.events import Evidence, Source, Trigger
from watcher.sources.proc_connector import ProcConnectorSource

pytestmark = pytest.mark.initns


class _Log:
    """Records what the source logs."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str, dict[str, Any]]] = []

    def _add(self, level: str, event: str, **kw: Any) -> None:
        self.records.append((level, event, kw))

    def info(self, event: str, **kw: Any) -> None:
        self._add("info", event, **kw)

    def warning(self, event: str, **kw: Any) -> None:
        self._add("warning", event, **kw)

    def error(self, event: str, **kw: Any) -> None:
        self._add("error", event, **kw)


async def _watch(argv: list[str], act: Any, timeout: float = 5.0) -> tuple[
        int, list[Trigger], _Log]:
    """Start ``argv`` (stdin a pipe), watch its PID, call ``act(proc)``; collect until DEATH."""
    loop = asyncio.get_running_loop()
    got: list[Trigger] = []
    done = asyncio.Event()

    def emit(t: Trigger) -> None:
        got.append(t)
        if t.evidence is Evidence.DEATH:
            done.set()

    log = _Log()
    src = ProcConnectorSource(emit, log)
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
    return proc.pid, got, log


def test_exit_of_a_killed_child_is_a_death_trigger_with_its_signal() -> None:
    """SIGKILL of a watched ``sleep``: one DEATH trigger naming the PID, wait status "killed by 9"."""
    pid, got, log = asyncio.run(_watch(["sleep", "30"], lambda p: p.send_signal(signal.SIGKILL)))
    death = [t for t in got if t.evidence is Evidence.DEATH]
    assert len(death) == 1 and death == got[-1:], got
    t = death[0]
    assert t.source is Source.PROC_CONNECTOR and t.detail == f"exit pid {pid}", t
    # exit_code is the wait status (low 7 bits: the killing signal); exit_signal is the signal
    # the parent is sent (SIGCHLD), as the kernel's struct exit_proc_event has them.
    assert t.data["pid"] == pid and t.data["exit_code"] & 0x7F == signal.SIGKILL, t.data
    assert t.data["exit_signal"] == signal.SIGCHLD, t.data
    assert not [r for r in log.records if r[0] != "info"], log.records


def _go(proc: subprocess.Popen[Any]) -> None:
    assert proc.stdin is not None
    proc.stdin.write(b"go\n")
    proc.stdin.close()


def test_exec_of_the_watched_process_is_a_hint_then_its_exit_a_death() -> None:
    """A watched shell that execs ``true`` on our go: an EXEC HINT, then its exit as DEATH."""
    # The shell waits for the go, so the watch is armed before this exec (the exec of ``sh``
    # by Popen may be reported too: it is read after the watch was set).
    pid, got, _ = asyncio.run(_watch(["sh", "-c", "read _; exec true"], _go))
    assert got and all(t.source is Source.PROC_CONNECTOR for t in got), got
    kinds = [(t.evidence, t.detail) for t in got]
    assert kinds[-2:] == [(Evidence.HINT, f"exec pid {pid}"), (Evidence.DEATH, f"exit pid {pid}")], kinds
    assert set(kinds[:-2]) <= {(Evidence.HINT, f"exec pid {pid}")}, kinds
    assert got[-1].data["exit_code"] == 0, got[-1].data
