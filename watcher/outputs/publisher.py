"""What the agent tells the world besides its log: the status file, sd_notify STATUS, the
Prometheus textfile and HAProxy's agent check. Fed by the daemon with each core step's input
and actions; nothing here runs on the path from kernel event to rule applied (files are
written by the status thread and the metrics writer thread, the agent check only answers)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from watcher import __version__
from watcher.config import Config, parse_listen
from watcher.core import control
from watcher.core.catalogue import Event
from watcher.core.fleet import summary
from watcher.outputs import agentcheck
from watcher.outputs.metrics import Metrics, fleet_metrics
from watcher.outputs.notify import Notifier
from watcher.probe import CHECKS
from watcher.statedir import StateDir

__all__ = ["Outputs", "status_line", "status_record"]


def status_record(status: control.Status, pid: int, since: float) -> dict[str, Any]:
    """The status file's object (daemon.json) for ``status``, written by agent ``pid``."""
    return {"pid": pid, "health": str(status.health),
            "mode": None if status.mode is None else str(status.mode),
            "admin": status.admin is not None, "since": since,
            **({} if status.fleet is None else {"fleet": summary(status.fleet)})}


def status_line(status: control.Status) -> str:
    """sd_notify's STATUS= text for ``status``."""
    return f"service {status.health}, firewall {status.mode}"


class Outputs:
    """The status file and STATUS always; metrics and the agent check when configured."""

    def __init__(self, cfg: Config, log: Any, notifier: Notifier, dropped: Callable[[], int],
                 wall: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.log = log
        self._notify = notifier
        self._dropped = dropped
        self._wall = wall
        self._io = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="status")
        self._metrics: Metrics | None = None
        self._check: agentcheck.AgentCheck | None = None
        self._opening = False  # the agent-check listener was asked to open
        self._loop = asyncio.get_running_loop()

    def start(self) -> None:
        """Start the metrics writer and prepare the agent check (it listens once the core's
        status says ready)."""
        cfg = self.cfg
        if cfg.metrics.textfile:
            def report(reason: str) -> None:  # on the writer thread
                with contextlib.suppress(RuntimeError):  # the loop has closed
                    self._loop.call_soon_threadsafe(self._metrics_report, reason)

            self._metrics = Metrics(Path(cfg.metrics.textfile), __version__, checks=CHECKS,
                                    report=report)
        if cfg.agent_check.listen:
            self._check = agentcheck.AgentCheck(*parse_listen(cfg.agent_check.listen))

    def seen(self, actions: Iterable[control.Action]) -> None:
        """Carry out what one core step asks of the outputs: Publish and Count."""
        for act in actions:
            if isinstance(act, control.Publish):
                self._publish(act.status)
                if act.status.ready and self._check is not None and not self._opening:
                    self._opening = True
                    self._loop.create_task(self._listen())
            elif isinstance(act, control.Count) and self._metrics is not None:
                self._count(self._metrics, act)

    def _count(self, m: Metrics, act: control.Count) -> None:
        match act.what:
            case control.Tally.SERVICE_DOWN | control.Tally.SERVICE_UP:
                m.transition(str(act.what), self._wall())
            case control.Tally.FAILOVER:
                m.failover(act.latency_ns / 1e9)
            case control.Tally.PROBE_FAILED:
                m.probe_failure(act.check)
            case control.Tally.APPLY_FAILED:
                m.apply_failure()
            case control.Tally.ALIVE:
                m.tick()  # the file's mtime says the agent is alive
            case control.Tally.CONNECTIONS_RESET:
                m.connections_reset(act.mode, act.family, act.n)

    def _publish(self, status: control.Status) -> None:
        self._io.submit(self._write_status, status)
        if self._metrics is not None:
            self._metrics.status(status)
            if status.fleet is not None:
                self._metrics.fleet(fleet_metrics(status.fleet))
            self._metrics.log_dropped(self._dropped())
        if self._check is not None:
            self._check.update(status)

    def _write_status(self, status: control.Status) -> None:
        """The status file and STATUS= (in the status thread, off the event loop)."""
        try:
            StateDir(self.cfg.state.dir).write_daemon(status_record(status, os.getpid(),
                                                                    self._wall()))
        except OSError as exc:
            self.log.warning(Event.STATE_WRITE_FAILED, reason=str(exc))
        self._notify.status(status_line(status))

    async def _listen(self) -> None:
        """Open the agent-check listener once the core's status is ready (the kernel holds the
        first decision): a restarted agent never tells HAProxy "down" for a healthy server
        while its first probe runs."""
        ac = self._check
        if ac is None or ac.listening:
            return
        try:
            await ac.start()
        except OSError as exc:
            self.log.error(Event.AGENT_CHECK_FAILED, reason=f"{self.cfg.agent_check.listen}: {exc}")
            self._check = None
        else:
            self.log.info(Event.AGENT_CHECK_LISTEN, **{"server.address": ac.host,
                                                   "server.port": ac.port})

    def _metrics_report(self, reason: str) -> None:
        if reason:
            self.log.warning(Event.METRICS_WRITE_FAILED, reason=reason)
        else:
            self.log.info(Event.METRICS_WRITE_RECOVERED, **{"file.path": self.cfg.metrics.textfile})

    async def close(self) -> None:
        """Close the agent check; the last metrics file says up 0; the status file goes."""
        if self._check is not None:
            await self._check.close()
        self._io.shutdown(wait=True)
        if self._metrics is not None:
            self._metrics.log_dropped(self._dropped())
            await asyncio.get_running_loop().run_in_executor(None, self._metrics.close)
        StateDir(self.cfg.state.dir).clear_daemon()
