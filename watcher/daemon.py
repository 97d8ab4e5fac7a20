"""The daemon: kernel events -> coalesced probe -> health.step -> one firewall swap -> JSON event.

One asyncio loop, no polling threads. Every source only *asks* for a probe; the probe and the
pure state machine decide; the firewall is changed only through rules.firewall.Firewall, in a
single worker thread so a long xtables-lock wait never stalls event intake.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import logging as stdlib_logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rules.errors import ForeignChain, RulesError
from rules.firewall import ApplyReport, Firewall
from rules.model import Mode as RuleMode
from watcher import health
from watcher.config import Config, load_config
from watcher.errors import EX_OK, AgentError
from watcher.events import Evidence, Source, Trigger
from watcher.logsetup import Logging, configure
from watcher.notify import Notifier
from watcher.probe import Prober, ProbeResult
from watcher.sources.inotify import PidFileWatch
from watcher.sources.pidfd import ProcessWatch
from watcher.sources.proc_connector import ProcConnectorSource
from watcher.sources.sock_diag import ListenerWatch, listening
from watcher.statedir import ADMIN_FILE, StateDir

__all__ = ["Daemon", "run_daemon"]

_RETRY_MIN_S = 0.1
_RETRY_MAX_S = 5.0
_STOP_GRACE_S = 10.0  # a round in progress may finish (an xtables lock wait is bounded too)


def _to_rule_mode(mode: health.Mode) -> RuleMode:
    return RuleMode(mode.value)


def _outranks(new: Trigger, cur: Trigger) -> bool:
    """True when ``new`` should replace the pending ``cur``: stronger evidence, or as strong
    and earlier."""
    if new.evidence is not cur.evidence:
        return new.evidence is Evidence.DEATH
    return new.monotonic_ns < cur.monotonic_ns


_ACTION = {RuleMode.OPEN: "firewall-unblock", RuleMode.BLOCK: "firewall-block",
           RuleMode.DRAIN: "firewall-drain"}


class Daemon:
    """The running agent. ``run()`` returns the process exit code."""

    def __init__(
        self,
        cfg: Config,
        *,
        firewall_factory: Callable[[Config, Any], Firewall],
        logging_: Logging,
        config_path: Path | None = None,
        notifier: Notifier | None = None,
        clock: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self.cfg = cfg
        self._fw_factory = firewall_factory
        self._logging = logging_
        self.log = logging_.logger(**{"service.name": cfg.service.name})
        self._config_path = config_path
        self._notify = notifier or Notifier.from_env()
        self._clock = clock
        self._fw = firewall_factory(cfg, self.log)
        self._state = StateDir(cfg.state.dir)
        self._params = health.Params.from_config(cfg.probe)
        self._health = health.initial()
        self._applied: RuleMode | None = None  # what the kernel holds, as far as we applied it
        self._pending: Trigger | None = None
        self._wake = asyncio.Event()
        self._stop: asyncio.Event | None = None
        self._exec = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="firewall")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sources: list[Any] = []
        self._pidfd: ProcessWatch | None = None
        self._proc: ProcConnectorSource | None = None
        # One handle per purpose, replaced (never accumulated) each time it is re-armed.
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._retry_s = 0.0
        # Set by the timers that fire them, consumed by the next round: whatever trigger that
        # round was coalesced into, it still repairs (safety net) and retries a failed apply.
        self._repair_due = False
        self._retry_due = False
        self._ready = False
        self._stopping = False
        self._last_fail_reason = ""
        self._known_dead: int | None = None

    # ------------------------------------------------------------------ event intake

    def emit(self, trig: Trigger) -> None:
        """Ask for a probe. Coalesced, never a queue: while one is pending, the pending trigger
        is the strongest (a proof of death over a hint), the earliest among equals, so a
        transition names the event that proved it and its latency runs from that event."""
        cur = self._pending
        if cur is None or _outranks(trig, cur):
            self._pending = trig
        self._wake.set()

    def _emit_admin(self, trig: Trigger) -> None:
        self.emit(dataclasses.replace(trig, source=Source.ADMIN))

    def _tick(self) -> None:
        self._repair_due = True
        self.emit(Trigger(Source.TIMER, "safety-net", self._clock()))
        assert self._loop is not None
        self._arm("tick", self.cfg.probe.interval_s, self._tick)

    def _start_process_sources(self, loop: asyncio.AbstractEventLoop) -> None:
        """pidfd and proc connector: independent of the config, kept across reloads so the
        tracked process's exit is never missed while the config sources are re-armed."""
        self._pidfd = ProcessWatch(self.emit, self.log)
        self._proc = ProcConnectorSource(self.emit, self.log)
        self._pidfd.attach(loop)
        self._proc.attach(loop)

    def _stop_process_sources(self) -> None:
        for s in (self._pidfd, self._proc):
            if s is not None:
                with contextlib.suppress(Exception):
                    s.close()

    def _arm(self, name: str, delay: float, callback: Callable[..., object], *args: object) -> None:
        """(Re)arm the timer called ``name``: an earlier one of the same name is cancelled."""
        assert self._loop is not None
        old = self._timers.pop(name, None)
        if old is not None:
            old.cancel()
        self._timers[name] = self._loop.call_later(delay, callback, *args)

    def _start_sources(self, loop: asyncio.AbstractEventLoop) -> None:
        cfg = self.cfg
        self._sources = [
            PidFileWatch(cfg.service.pid_file, self.emit, self.log),
            PidFileWatch(cfg.state.dir / ADMIN_FILE, self._emit_admin, self.log),
            ListenerWatch(cfg.service.port, self.emit, self.log),
        ]
        for s in self._sources:
            s.attach(loop)
        self._arm("tick", cfg.probe.interval_s, self._tick)
        wd = self._notify.watchdog_interval_s()
        if wd:
            self._arm("watchdog", wd, self._watchdog, wd)

    def _stop_sources(self) -> None:
        """Stop what the config defines (tick, watchdog, PID file and listener watches). A
        pending rise or apply retry is kept: a reload must not lose a decision under way."""
        for name in ("tick", "watchdog"):
            t = self._timers.pop(name, None)
            if t is not None:
                t.cancel()
        for s in self._sources:
            with contextlib.suppress(Exception):
                s.close()
        self._sources = []

    def _watchdog(self, interval: float) -> None:
        self._notify.watchdog()
        assert self._loop is not None
        self._arm("watchdog", interval, self._watchdog, interval)

    # ------------------------------------------------------------------ decisions

    async def _probe_and_step(self, trig: Trigger) -> None:
        repair, self._repair_due = self._repair_due, False
        retry, self._retry_due = self._retry_due, False
        prober = Prober(self.cfg.service, self.cfg.probe, own_pid=os.getpid(), listening=listening)
        admin = self._state.admin()
        block = None if admin is None else health.AdminBlock(admin.drain, admin.reason)
        if block != self._health.admin and await self._step(health.AdminChange(block), trig):
            retry = False  # the admin change applied the mode the health now calls for
        result = await prober.probe()
        self._track(result)
        if not result.ok:
            if result.reason != self._last_fail_reason:
                self.log.info("probe-failed", reason=result.reason, check=result.check,
                              trigger=str(trig.source), detail=trig.detail)
            self._last_fail_reason = result.reason
        else:
            self._last_fail_reason = ""
        outcome = health.ProbeOutcome(result.ok, result.check, result.reason,
                                      trig.evidence if not result.ok else Evidence.HINT)
        applied = await self._step(outcome, trig, result)
        mode = health.desired_mode(self._health)
        if retry and not applied and self._applied is None and mode is not None:
            # The retry of a failed apply runs here, in the worker like every change, with the
            # mode the health calls for now (not the one that failed): never a stale decision.
            await self._apply(_to_rule_mode(mode), "retry after failure", trig)
        elif repair:
            # Repair: whatever the decision, make sure the kernel still holds what we applied
            # (someone may have emptied the chain, removed the jump, added duplicates).
            await self._ensure_current(trig)

    def _track(self, result: ProbeResult) -> None:
        """Follow the PID the probe read. A probe that read no PID (file gone) keeps the old
        watch: that process's exit is still the proof of death we wait for."""
        pid = result.pid
        if pid is None:
            return
        # A process gone before the watch was armed (or a PID file naming a dead process) is the
        # same proof of death a pidfd event would have given: say so, once per PID.
        if (self._pidfd is not None and self._pidfd.tracked != pid
                and not self._pidfd.track(pid) and pid != self._known_dead):
            self._known_dead = pid
            self.emit(Trigger(Source.PIDFD, f"exit pid {pid} (before tracking)", self._clock(),
                              Evidence.DEATH, {"pid": pid}))
        if self._proc is not None and self._proc.watched != pid:
            self._proc.watch_pid(pid)

    async def _step(self, inp: health.ProbeOutcome | health.AdminChange, trig: Trigger,
                    result: ProbeResult | None = None) -> bool:
        """Feed ``inp`` to the state machine and carry out its actions; True if it applied."""
        applied = False
        now = self._clock()
        nxt, actions = health.step(self._health, inp, now, self._params)
        self._health = nxt
        for act in actions:
            if isinstance(act, health.Transition):
                name = "service-down" if act.new is health.State.DOWN else "service-up"
                if act.old is health.State.STARTING:
                    name = "service-initial-" + act.new.value.lower()
                self.log.info(name, reason=act.reason, trigger=str(trig.source),
                              detail=trig.detail, **{"health.state": act.new.value})
            elif isinstance(act, health.ProbeAgain):
                assert self._loop is not None
                delay = max(0.0, (act.after_ns - now) / 1e9)
                self._arm("rise", delay, self.emit, Trigger(Source.TIMER, "rise", act.after_ns))
            elif isinstance(act, health.SetFirewall):
                await self._apply(_to_rule_mode(act.mode), act.reason, trig, result)
                applied = True
        if isinstance(inp, health.AdminChange):
            kind = "admin-block" if inp.block is not None else "admin-unblock"
            self.log.info(kind, trigger=str(trig.source),
                          reason=inp.block.reason if inp.block else "")
        self._publish()
        return applied

    async def _apply(self, mode: RuleMode, reason: str, trig: Trigger,
                     result: ProbeResult | None = None) -> None:
        assert self._loop is not None
        started = self._clock()
        try:
            report: ApplyReport = await self._loop.run_in_executor(
                self._exec, functools.partial(self._fw.ensure, mode, fresh=False))
        except RulesError as exc:
            self._schedule_retry(exc, mode)
            return
        self._retry_s = 0.0
        done = self._clock()
        changed = self._applied is not mode or bool(report.changed)
        self._applied = mode
        if changed:
            # from the kernel event to the commit that made the rule take effect; the read-back
            # that follows the commit is included in apply_ms
            latency = (report.committed_ns or done) - trig.monotonic_ns
            self.log.info(_ACTION[mode], reason=reason, trigger=str(trig.source), detail=trig.detail,
                          latency_ms=round(latency / 1e6, 3), **{"event.duration": latency},
                          transactions=report.transactions,
                          families=[str(f) for f in self._fw.families],
                          probe_ms=None if result is None else round(result.duration_ns / 1e6, 3),
                          apply_ms=round((done - started) / 1e6, 3))

    async def _ensure_current(self, trig: Trigger) -> None:
        mode = self._applied
        if mode is None:
            return
        assert self._loop is not None
        try:
            report = await self._loop.run_in_executor(self._exec, self._fw.ensure, mode)
        except RulesError as exc:
            self._schedule_retry(exc, mode)
            return
        self._retry_s = 0.0
        if report.changed:
            self.log.warning("firewall-repair", trigger=str(trig.source), mode=str(mode),
                             families=[str(f) for f in report.changed],
                             reason="chain or jump changed by someone else; restored")

    def _schedule_retry(self, exc: Exception, mode: RuleMode) -> None:
        self._retry_s = min(_RETRY_MAX_S, max(_RETRY_MIN_S, self._retry_s * 2))
        self.log.error("apply-failed", reason=str(exc), mode=str(mode), retry_in_s=self._retry_s)
        # Forget what we think is applied so the retry applies the health-derived mode again.
        self._applied = None
        self._arm("retry", self._retry_s, self._retry_apply)

    def _retry_apply(self) -> None:
        self._retry_due = True
        self.emit(Trigger(Source.TIMER, "apply-retry", self._clock()))

    def _publish(self) -> None:
        info = {"pid": os.getpid(), "health": self._health.state.value,
                "mode": None if self._applied is None else str(self._applied),
                "admin": self._health.admin is not None, "since": time.time()}
        try:
            self._state.write_daemon(info)
        except OSError as exc:
            self.log.warning("state-write-failed", reason=str(exc))
        self._notify.status(f"service {info['health']}, firewall {info['mode']}")

    # ------------------------------------------------------------------ lifecycle

    async def _worker(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._stopping:
                return
            trig, self._pending = self._pending, None
            if trig is None:
                continue
            try:
                await self._probe_and_step(trig)
            except Exception as exc:  # the agent never dies of one bad round
                self.log.exception("internal-error", reason=str(exc))
            if not self._ready:
                self._ready = True
                self._notify.ready()
                self.log.info("agent-ready", mode=None if self._applied is None else str(self._applied),
                              **{"health.state": self._health.state.value})

    def _on_hup(self) -> None:
        self._notify.reloading()
        self._logging.reopen()
        path = self._config_path
        try:
            new = load_config(path) if path is not None else self.cfg
        except AgentError as exc:
            self.log.error("config-invalid", reason=str(exc), path=str(path))
            self._notify.ready()
            return
        firewall_changed = (new.firewall, new.service.port) != (self.cfg.firewall, self.cfg.service.port)
        if firewall_changed:
            self.log.warning("config-reload", reason="firewall settings change on restart only; "
                             "kept the running ones for [firewall] and service.port")
            new = dataclasses.replace(new, firewall=self.cfg.firewall,
                                      service=dataclasses.replace(new.service, port=self.cfg.service.port))
        self.cfg = new
        self._params = health.Params.from_config(new.probe)
        self._state = StateDir(new.state.dir)
        assert self._loop is not None
        self._stop_sources()
        self._start_sources(self._loop)
        self.log.info("config-reload", path=str(path))
        self.emit(Trigger(Source.SIGNAL, "SIGHUP", self._clock()))
        self._notify.ready()

    def _on_term(self, signame: str) -> None:
        if self._stopping:  # a second SIGTERM/SIGINT: exit at once
            self.log.warning("agent-stop", reason=f"second {signame}: exiting at once")
            os._exit(1)
        self._stopping = True
        assert self._stop is not None
        self._stop.set()

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT; then apply firewall.on_exit and return the exit code."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, self._on_term, "SIGTERM")
        loop.add_signal_handler(signal.SIGINT, self._on_term, "SIGINT")
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)
        loop.add_signal_handler(signal.SIGUSR1, self._logging.reopen)
        self.log.info("agent-start", pid_file=str(self.cfg.service.pid_file),
                      port=self.cfg.service.port, chain=self.cfg.firewall.chain,
                      backend=self._fw.backend.name)
        try:  # a chain of someone else's: refuse at start (exit 78), having changed nothing
            await loop.run_in_executor(self._exec, self._fw.check_ownership)
        except ForeignChain as exc:
            self.log.error("config-invalid", reason=str(exc), path=str(self._config_path))
            await loop.run_in_executor(self._exec, self._fw.close)
            raise
        except RulesError:
            pass  # a read that failed now: the first apply checks again and is retried
        with contextlib.suppress(OSError):
            self._state.ensure()
        self._start_process_sources(loop)
        self._start_sources(loop)
        worker = loop.create_task(self._worker())
        self.emit(Trigger(Source.STARTUP, "first probe", self._clock()))
        await self._stop.wait()
        self._notify.stopping()
        # Let a round in progress finish (its swap and its log line), bounded; then stop.
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(worker), timeout=_STOP_GRACE_S)
        except TimeoutError:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        self._stop_sources()
        for t in self._timers.values():
            t.cancel()
        self._timers = {}
        self._stop_process_sources()
        await loop.run_in_executor(self._exec, self._on_exit)
        await loop.run_in_executor(self._exec, self._fw.close)
        self._exec.shutdown(wait=True)
        self._state.clear_daemon()
        self.log.info("agent-stop", on_exit=self.cfg.firewall.on_exit)
        return EX_OK

    def _on_exit(self) -> None:
        how = self.cfg.firewall.on_exit
        try:
            if how == "remove":
                self._fw.remove()
            elif how == "open":
                if self._state.admin() is not None:
                    self.log.info("firewall-keep", reason="admin block recorded: kept on exit")
                    return
                self._fw.ensure(RuleMode.OPEN)
        except RulesError as exc:
            self.log.error("apply-failed", reason=f"on_exit={how}: {exc}", on_exit=how)


def run_daemon(cfg: Config, *, config_path: Path, config_given: bool, log_format: str | None) -> int:
    """Build the daemon from ``cfg`` and run it until SIGTERM (the CLI's ``run``)."""
    from watcher.cli import build_firewall

    fmt = log_format or ("console" if sys.stdout.isatty() else None)
    logging_ = configure(cfg.log, service_name=cfg.service.name, force_format=fmt)
    logging_.install()
    # pyinotify logs through a stderr handler of its own; send its records to the JSON sinks.
    pyinotify_log = stdlib_logging.getLogger("pyinotify")
    pyinotify_log.handlers.clear()
    pyinotify_log.propagate = True
    try:
        daemon = Daemon(cfg, firewall_factory=functools.partial(build_firewall, prestart=True),
                        logging_=logging_,
                        config_path=config_path if config_given or config_path.exists() else None)
        return asyncio.run(daemon.run())
    finally:
        logging_.close()
