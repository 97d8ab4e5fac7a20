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

from rules.model import Mode
from watcher import __version__
from watcher.config import Config, parse_listen
from watcher.core import control
from watcher.core.catalogue import Event
from watcher.core.fleet import summary
from watcher.core.triggers import Source
from watcher.outputs import agentcheck
from watcher.outputs.metrics import Metrics, fleet_metrics
from watcher.outputs.notify import Notifier
from watcher.probe import CHECKS
from watcher.statedir import StateDir

__all__ = ["Outputs", "check_health"]

_MOVES = {Event.FIREWALL_BLOCK, Event.FIREWALL_UNBLOCK, Event.FIREWALL_DRAIN}


def check_health(status: control.Status) -> str:
    """The health HAProxy's agent check reports: "up" while the fleet guard keeps a failing
    service open (refused: taking it out of rotation there would undo the guard), else the
    service's health."""
    g = status.fleet
    if (g is not None and g.refused is not None and status.mode is Mode.OPEN
            and status.admin is None):
        return "up"
    return str(status.health)


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
        self._loop = asyncio.get_running_loop()

    def start(self) -> None:
        """Start the metrics writer and prepare the agent check (it listens once READY)."""
        cfg = self.cfg
        if cfg.metrics.textfile:
            def report(reason: str) -> None:  # on the writer thread
                with contextlib.suppress(RuntimeError):  # the loop has closed
                    self._loop.call_soon_threadsafe(self._metrics_report, reason)

            self._metrics = Metrics(Path(cfg.metrics.textfile), __version__, checks=CHECKS,
                                    report=report)
        if cfg.agent_check.listen:
            self._check = agentcheck.AgentCheck(*parse_listen(cfg.agent_check.listen))

    def seen(self, inp: control.Input, actions: Iterable[control.Action]) -> None:
        """Account for one core step: its input and the actions it returned."""
        m = self._metrics
        if m is not None:
            if isinstance(inp, control.Probed) and not inp.ok:
                m.probe_failure(inp.check)
            elif isinstance(inp, control.Tick):
                m.tick()  # the file's mtime says the agent is alive
        for act in actions:
            if isinstance(act, control.Publish):
                self._publish(act.status)
            elif act == control.Notify("ready") and self._check is not None:
                self._loop.create_task(self._listen())
            elif isinstance(act, control.Log) and m is not None:
                self._count(m, act)

    @staticmethod
    def _count(m: Metrics, act: control.Log) -> None:
        if act.event in (Event.SERVICE_DOWN, Event.SERVICE_UP):
            m.transition(act.event.removeprefix("service-"), time.time())
        elif act.event in _MOVES and act.fields.get("trigger") != str(Source.STARTUP):
            latency = act.fields.get("event.duration")
            if isinstance(latency, int):
                m.failover(latency / 1e9)
        elif act.event is Event.APPLY_FAILED:
            m.apply_failure()

    def _publish(self, status: control.Status) -> None:
        mode = None if status.mode is None else str(status.mode)
        self._io.submit(self._write_status, status, mode)
        if self._metrics is not None:
            self._metrics.status(str(status.health), mode, status.admin is not None)
            if status.fleet is not None:
                self._metrics.fleet(fleet_metrics(status.fleet))
            self._metrics.log_dropped(self._dropped())
        if self._check is not None:
            admin = status.admin
            self._check.update(agentcheck.Status(
                health=check_health(status), admin=admin is not None,
                drain=admin is not None and admin.drain,
                admin_reason="" if admin is None else admin.reason, failure=status.reason))

    def _write_status(self, status: control.Status, mode: str | None) -> None:
        """The status file and STATUS= (in the status thread, off the event loop)."""
        info: dict[str, Any] = {"pid": os.getpid(), "health": str(status.health), "mode": mode,
                                "admin": status.admin is not None, "since": self._wall()}
        if status.fleet is not None:
            info["fleet"] = summary(status.fleet)
        try:
            StateDir(self.cfg.state.dir).write_daemon(info)
        except OSError as exc:
            self.log.warning(Event.STATE_WRITE_FAILED, reason=str(exc))
        self._notify.status(f"service {status.health}, firewall {mode}")

    async def _listen(self) -> None:
        """Open the agent-check listener only after the first decision, so that a restarted
        agent never tells HAProxy "down" for a healthy server while its first probe runs."""
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
