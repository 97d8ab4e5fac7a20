"""The imperative shell: sources -> coalesced trigger -> probe -> control.step -> carry out.

One asyncio loop, no polling. Every source only *asks* for a probe; each round reads the admin
record and probes, and hands both to the control core (``watcher.core.control``), which decides
everything. The daemon carries out the actions the core returns: a firewall change in one
worker thread (``watcher.worker``: a lock wait never stalls intake), timers, log lines,
sd_notify, the exit; ``watcher.outputs.publisher`` publishes the status (file, STATUS=, metrics, agent
check).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from rules.firewall import Firewall
from watcher.config import Config, LogLevel, for_reload
from watcher.core import control
from watcher.core.catalogue import Event
from watcher.core.fleet import Guard
from watcher.core.triggers import Source, Trigger
from watcher.errors import AgentError, AlreadyRunning
from watcher.outputs.logpipeline import Logging
from watcher.outputs.notify import Notifier
from watcher.outputs.publisher import Outputs
from watcher.probe import Prober
from watcher.resetter import ConnectionResetter
from watcher.sources.inotify import PidFileWatch
from watcher.sources.pidfd import ProcessWatch
from watcher.sources.proc_connector import ProcConnectorSource
from watcher.sources.sock_diag import ListenerWatch, listening
from watcher.statedir import ADMIN_FILE, StateDir
from watcher.worker import FirewallWorker

__all__ = ["HANDLED_SIGNALS", "Daemon"]

# Blocked by the composition root while the agent initialises, unblocked once handled (as
# Knot Resolver's manager does): a SIGTERM during start-up is a stop, never a half-built death.
HANDLED_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1})


class Daemon:
    """The running agent. ``run()`` returns the process exit code."""

    def __init__(self, cfg: Config, *, firewall: Firewall, logging_: Logging, notifier: Notifier,
                 load: Callable[[], Config], config_path: str = "",
                 clock: Callable[[], int] = time.monotonic_ns) -> None:
        """Build the daemon on the running event loop (call it from a coroutine)."""
        self.cfg = cfg
        self._fw = firewall
        self._logging = logging_
        self.log = logging_.logger(**{"service.name": cfg.service.name})
        self._notify = notifier
        self._load = load
        self._config_path = config_path
        self._clock = clock
        self._state = StateDir(cfg.state.dir)
        self._core = control.initial(control.Params.from_config(cfg), guard=_guard(cfg))
        self._pending: Trigger | None = None
        self._wake = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._outputs = Outputs(cfg, self.log, notifier, logging_.dropped_total)
        self._worker = FirewallWorker(firewall, self.feed, self.log, clock)
        self._resetter = ConnectionResetter(cfg.service.port, self.feed)
        self._exit: asyncio.Future[int] = self._loop.create_future()
        self._sources: list[Any] = []
        self._timers: dict[str, asyncio.TimerHandle] = {}  # one per purpose, re-armed in place
        self._pidfd = ProcessWatch(self.emit, self.log)
        self._proc = ProcConnectorSource(self.emit, self.log)
        self._reserved = contextlib.ExitStack()  # instance locks of state directories a reload named
        self._reserved_dirs: set[Path] = {cfg.state.dir}
        self._fleet = self._make_fleet()  # with [fleet]; its threads start in run()

    # ------------------------------------------------------------------ the core and its actions

    def feed(self, inp: control.Input) -> None:
        """Hand ``inp`` to the control core and carry out what it returns, in order."""
        self._core, actions = control.step(self._core, inp, self._clock())
        self._outputs.seen(actions)
        for act in actions:
            self._do(act)

    def _do(self, act: control.Action) -> None:
        match act:
            case control.SetFirewall() | control.RemoveChain():
                self._worker.carry_out(act)
            case control.ProbeAt(at_ns=at):
                self._arm("rise", at, self.emit, Trigger(Source.TIMER, "rise", at))
            case control.RetryAt(at_ns=at):
                self._arm("retry", at, self.feed, control.RetryDue())
            case control.ReadAdminAt(at_ns=at):
                self._arm("admin", at, self.emit, Trigger(Source.ADMIN, "timed block expired", at))
            case control.StopBoundAt(at_ns=at):
                self._arm("stop", at, self.feed, control.StopBound())
            case control.Log(level=level, event=event, fields=fields):
                self._log(level, event, fields)
            case control.Notify(what=control.NotifyKind.READY):
                self._notify.ready()
            case control.Notify(what=control.NotifyKind.STOPPING):
                self._notify.stopping()
            case control.Exit(code=code, flush_ns=None):
                self._finish(code)
            case control.Exit(code=code, flush_ns=int(flush_ns)):
                self._logging.flush(flush_ns / 1e9)
                os._exit(code)
            case control.ResetConnections():
                self._resetter.carry_out(act)
            case control.SweepAt(at_ns=at):
                self._arm("sweep", at, self.feed, control.SweepDue())
            case control.AskPermit() | control.Register():
                if self._fleet is not None:
                    self._fleet.carry_out(act)  # queued for the fleet thread: never waits
            case control.Count() | control.Publish():
                pass  # the outputs saw them

    def _log(self, level: LogLevel, event: Event, fields: Mapping[str, Any]) -> None:
        match level:
            case LogLevel.DEBUG:
                self.log.debug(event, **fields)
            case LogLevel.INFO:
                self.log.info(event, **fields)
            case LogLevel.WARNING:
                self.log.warning(event, **fields)
            case LogLevel.ERROR:
                self.log.error(event, **fields)

    def _arm(self, name: str, at_ns: int, callback: Callable[..., object], *args: object) -> None:
        """(Re)arm the timer called ``name`` for monotonic time ``at_ns``."""
        old = self._timers.pop(name, None)
        if old is not None:
            old.cancel()
        delay = max(0.0, (at_ns - self._clock()) / 1e9)
        self._timers[name] = self._loop.call_later(delay, callback, *args)

    def _every(self, name: str, interval_s: float, callback: Callable[[], object]) -> None:
        def fire() -> None:
            callback()
            self._every(name, interval_s, callback)

        self._arm(name, self._clock() + int(interval_s * 1e9), fire)

    # ------------------------------------------------------------------ intake and rounds

    def emit(self, trig: Trigger) -> None:
        """Ask for a probe. Coalesced, never a queue: the pending trigger is the one that
        ``control.outranks`` the others."""
        if self._pending is None or control.outranks(trig, self._pending):
            self._pending = trig
        self._wake.set()

    def _tick(self) -> None:
        trig = Trigger(Source.TIMER, "safety-net", self._clock())
        self.feed(control.Tick(trig))
        self.emit(trig)

    async def _rounds(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            trig, self._pending = self._pending, None
            if trig is None:
                continue
            try:
                await self._round(trig)
            except Exception as exc:  # the agent never dies of one bad round
                self.log.exception(Event.INTERNAL_ERROR, reason=str(exc))

    async def _round(self, trig: Trigger) -> None:
        wall = time.time()
        rec, gone = self._state.read_admin(wall)
        left = None if rec is None else rec.remaining(wall)
        self.feed(control.AdminRead(
            trig, None if rec is None else control.AdminBlock(rec.drain, rec.reason, rec.until),
            wall, None if gone is None else gone.until,
            None if left is None else self._clock() + int(left * 1e9)))
        prober = Prober(self.cfg.service, self.cfg.probe, own_pid=os.getpid(), listening=listening)
        result = await prober.probe()
        if result.pid is not None:  # follow the PID the probe read; a vanished file keeps the watch
            if self._pidfd.tracked != result.pid:
                self._pidfd.track(result.pid)
            self._proc.watch_pid(result.pid)
        self.feed(control.Probed(trig, result.ok, result.check, result.reason,
                                 result.proves_death, result.duration_ns))

    # ------------------------------------------------------------------ configuration and signals

    def _start_sources(self) -> None:
        cfg = self.cfg
        self._sources = [
            PidFileWatch(cfg.service.pid_file, self.emit, self.log),
            PidFileWatch(cfg.state.dir / ADMIN_FILE, self._emit_admin, self.log),
            ListenerWatch(cfg.service.port, self.emit, self.log),
        ]
        for s in self._sources:
            s.attach(self._loop)
        self._every("tick", cfg.probe.interval_s, self._tick)
        wd = self._notify.watchdog_interval_s()
        if wd:
            self._every("watchdog", wd, self._notify.watchdog)

    def _emit_admin(self, trig: Trigger) -> None:
        self.emit(Trigger(Source.ADMIN, trig.detail, trig.monotonic_ns, trig.evidence))

    def _stop_sources(self) -> None:
        """Stop what the config defines; a pending rise, retry or admin expiry is kept."""
        for name in ("tick", "watchdog"):
            t = self._timers.pop(name, None)
            if t is not None:
                t.cancel()
        for s in self._sources:
            with contextlib.suppress(Exception):
                s.close()
        self._sources = []

    def _on_hup(self) -> None:
        self._notify.reloading()
        self._logging.reopen()
        try:
            new = self._load()
        except AgentError as exc:
            self.feed(control.Reloaded(None, self._config_path, error=str(exc)))
            return
        self._reserve(new.state.dir)
        new, note = for_reload(self.cfg, new)
        self.cfg = self._outputs.cfg = new
        self._stop_sources()
        self._start_sources()
        self.feed(control.Reloaded(control.Params.from_config(new), self._config_path, note=note))
        self.emit(Trigger(Source.SIGNAL, "SIGHUP", self._clock()))

    def _reserve(self, path: Path) -> None:
        """Also hold the instance lock of a state directory a reload named: the agent keeps its
        own directory until restart, and no second agent may start on the configuration file's
        new one and fight it for the chain."""
        if path in self._reserved_dirs:
            return
        try:
            self._reserved.enter_context(StateDir(path).lock(readers_s=0.1))
        except (AlreadyRunning, OSError) as exc:
            self.log.warning(Event.CONFIG_RELOAD, reason=f"state.dir {path} not reserved: {exc}")
            return
        self._reserved_dirs.add(path)

    def _on_term(self, sig: signal.Signals) -> None:
        self._stop_sources()
        self.feed(control.Stop(sig.name, int(sig)))  # the core decides, also for a second one

    def _finish(self, code: int) -> None:
        if not self._exit.done():
            self._exit.set_result(code)

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT and the core's exit; return its exit code."""
        loop = self._loop
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_term, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)
        loop.add_signal_handler(signal.SIGUSR1, self._logging.reopen)
        # Handled from here on: what arrived while the agent initialised is delivered now.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
        self.log.info(Event.AGENT_START, pid_file=str(self.cfg.service.pid_file),
                      port=self.cfg.service.port, chain=self.cfg.firewall.chain,
                      backend=self._fw.backend.name)
        with contextlib.suppress(OSError):
            self._state.ensure()
        self._outputs.start()
        self._pidfd.attach(loop)
        self._proc.attach(loop)
        self._start_sources()
        if self._fleet is not None:
            self._fleet.start()
        rounds = loop.create_task(self._rounds())
        self.emit(Trigger(Source.STARTUP, "first probe", self._clock()))
        try:
            code = await self._exit
        finally:
            rounds.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await rounds
            for t in self._timers.values():
                t.cancel()
            self._stop_sources()
            self._pidfd.close()
            self._proc.close()
            self._reserved.close()
        if self._fleet is not None:
            await loop.run_in_executor(None, self._fleet.close)
        await self._outputs.close()
        self._resetter.close()
        self._worker.close(stuck=self._core.in_flight is not None)
        return code

    def _make_fleet(self) -> Any:
        """With [fleet]: the etcd client (FacilityMissing without etcd3gw), feeding its answers
        back to the loop from its threads; else None."""
        if self.cfg.fleet is None:
            return None
        from watcher.fleet.agent import FleetClient  # imports etcd3gw: only with [fleet]

        def feed(inp: control.Input) -> None:  # from the fleet threads
            with contextlib.suppress(RuntimeError):  # the loop has closed
                self._loop.call_soon_threadsafe(self.feed, inp)

        return FleetClient(self.cfg.fleet, feed, self.log, clock=self._clock)


def _guard(cfg: Config) -> Guard | None:
    """The fleet guard's initial state with [fleet], else None."""
    f = cfg.fleet
    return None if f is None else Guard.new(f.size, f.min_open, f.unreachable, f.member)
