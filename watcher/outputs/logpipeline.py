"""Structured logging that can never stop a failover: ECS JSON lines behind one bounded queue.

The caller's thread only builds a line (ECS fields mapped, JSON rendered) and puts it on one
bounded in-memory queue; one thread writes it to every sink with the standard library's handlers:
the stream (stdout; with journald's ``<N>`` priority prefix when ``JOURNAL_STREAM`` names it), a
watched file (``log.file``) and RFC 5424 datagrams to a unix socket (``log.syslog``). A full queue
drops the line and counts it; a failing sink is reported once (``sink-failed``); one
``log-dropped`` event per run of lost sequence numbers says which lines were lost, as soon as
lines get through again.

Every line carries ``event.sequence`` (1, 2, 3... per pipeline, that is per agent process) and
``event.id`` (the run's random 128-bit ``process.entity_id`` and the sequence), numbered when the
line is built: a line dropped later has used its number, so every loss is a gap a SIEM can see.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import datetime as dt
import enum
import errno
import json
import logging
import logging.handlers
import os
import queue
import secrets
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any, TextIO, cast

import structlog
from structlog.typing import EventDict, FilteringBoundLogger, Processor, WrappedLogger

from watcher.config import LogConfig, LogFormat
from watcher.core.catalogue import Event

__all__ = ["APP_NAME", "ECS_VERSION", "FIELDS", "NAMESPACE", "QUEUE_LINES", "Gaps", "Logging", "configure",
           "field_name"]

APP_NAME = "sslvpn-heartbeat"
ECS_VERSION = "8.11.0"
NAMESPACE = "sslvpn_heartbeat."
QUEUE_LINES = 1000  # lines waiting for the sinks; beyond that they are dropped and counted
CLOSE_WITHIN_S = 2.0  # how long close() lets the queued lines reach the sinks
SYSLOG_HOLD_S = 10.0  # how long the writer waits for a syslog socket that went away to come back
SYSLOG_RETRY_S = 0.05
GAP_RUNS = 64  # runs of lost numbers kept before they are reported even while the queue is full

# The one table of names: a call site's keyword -> the ECS field it is written as (some are
# ECS names already). Any other keyword is written under sslvpn_heartbeat.
FIELDS: Mapping[str, str] = {
    "reason": "event.reason", "health.state": "service.state", "path": "file.path", "message": "message",
    "latency_ms": NAMESPACE + "latency_ms",
    **{k: k for k in ("event.duration", "service.name", "error.type", "error.message", "error.code",
                      "file.path", "server.address", "server.port")}}
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR, "critical": logging.CRITICAL}
_ALIASES = {"warn": "warning", "exception": "error", "fatal": "critical", "msg": "info", "err": "error"}
_SEVERITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def field_name(key: str) -> str:
    """The field a call site's keyword is written as: an ECS field or one under sslvpn_heartbeat."""
    return FIELDS.get(key) or (key if key.startswith(NAMESPACE) else NAMESPACE + key)


def _iso_ms(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def _error_fields(exc_info: Any, stack: bool = True) -> dict[str, str]:
    exc = (exc_info if isinstance(exc_info, BaseException) else
           exc_info[1] if isinstance(exc_info, tuple) else sys.exc_info()[1])
    if exc is None:
        return {}
    t = type(exc)
    name = t.__qualname__ if t.__module__ in ("builtins", "__main__") else f"{t.__module__}.{t.__qualname__}"
    out = {"error.type": name, "error.message": str(exc)}
    if stack:
        out["error.stack_trace"] = "".join(traceback.format_exception(exc)).rstrip("\n")
    if isinstance(exc, OSError) and exc.errno is not None:
        out["error.code"] = errno.errorcode.get(exc.errno, str(exc.errno))
    return out


_IDENTITY = ("event.sequence", "event.id", "process.entity_id")


def _failed(what: str, exc: Exception, of: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The line written instead of an event that could not be mapped or rendered; it keeps the
    sequence number and id of the line it replaces."""
    out = {"@timestamp": _iso_ms(time.time()), "log.level": "error", "message": what,
           "ecs.version": ECS_VERSION, **_error_fields(exc)}
    out.update({k: of[k] for k in _IDENTITY if of and k in of})
    return out


class Gaps:
    """The sequence numbers lost so far, kept as runs; ``take`` hands them over and forgets them."""

    def __init__(self) -> None:
        self._runs: list[list[int]] = []
        self.count = 0
        self._mu = threading.Lock()

    def add(self, seq: int) -> None:
        """Record one lost number: it extends a run it touches, or starts a new one."""
        with self._mu:
            self.count += 1
            for run in reversed(self._runs):  # losses come nearly in order: the last runs match
                if run[0] - 1 <= seq <= run[1] + 1:
                    run[0], run[1] = min(run[0], seq), max(run[1], seq)
                    self._merge()
                    return
            self._runs.append([seq, seq])
            self._runs.sort()

    def _merge(self) -> None:
        self._runs.sort()
        merged: list[list[int]] = []
        for run in self._runs:
            if merged and run[0] <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], run[1])
            else:
                merged.append(run)
        self._runs = merged

    def runs(self) -> int:
        """How many runs are waiting to be reported."""
        with self._mu:
            return len(self._runs)

    def take(self) -> list[tuple[int, int]]:
        """The runs lost since the last call, as (first, last), in order."""
        with self._mu:
            runs, self._runs, self.count = [(a, b) for a, b in self._runs], [], 0
            return runs


class _Ecs:
    """The structlog processor that turns an event dict into ECS fields, in a fixed order."""

    def __init__(self, service_name: str, hostname: str, clock: Callable[[], float],
                 run_id: str | None = None) -> None:
        self.run_id = run_id or secrets.token_hex(16)  # 128 random bits: unique across restarts and hosts
        self._common = {"service.name": service_name, "host.hostname": hostname, "process.pid": os.getpid()}
        self._clock = clock
        self._started = clock()
        self._seq = 0
        self._mu = threading.Lock()

    def __call__(self, _logger: WrappedLogger, method: str, ed: EventDict) -> dict[str, Any]:
        number = self.number()
        try:
            return self._map(_ALIASES.get(method, method), ed, number)
        except Exception as exc:  # a value whose str() raises must not reach the caller
            return _failed("log-processing-failed", exc, number)

    def number(self) -> dict[str, Any]:
        """The next sequence number and the event id made of it (and the run's entity id)."""
        with self._mu:  # numbered as built: callers on several threads, the writer's notices
            self._seq += 1
            seq = self._seq
        return {"event.sequence": seq, "event.id": f"{self.run_id}-{seq}", "process.entity_id": self.run_id}

    def start_identity(self) -> dict[str, Any]:
        """What names this run besides its entity id: the boot, the PID and the start time."""
        out: dict[str, Any] = {"process.start": _iso_ms(self._started)}
        with contextlib.suppress(OSError), open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            out["host.boot.id"] = f.read().strip()
        return out

    def _map(self, level: str, ed: EventDict, number: Mapping[str, Any]) -> dict[str, Any]:
        record: logging.LogRecord | None = ed.pop("_record", None)
        event, message = ed.pop("event", ""), ed.pop("message", None)
        out: dict[str, Any] = {"@timestamp": _iso_ms(record.created if record else self._clock()),
                               "log.level": level, "message": str(event if message is None else message),
                               "ecs.version": ECS_VERSION}
        if record is None:
            out["event.action"], out["event.kind"] = str(event), "event"
            known = Event._value2member_map_.get(str(event))
            if isinstance(known, Event):
                out["event.category"], out["event.type"] = list(known.category), list(known.type)
                out["event.outcome"] = known.outcome
            if known is Event.AGENT_START:  # the start event names the run's identity in full
                out.update(self.start_identity())
        ns, ms = ed.pop("event.duration", None), ed.pop("latency_ms", None)
        if ns is not None or ms is not None:  # nanoseconds (ECS), and milliseconds for people
            ns = int(ns) if ns is not None else round(float(ms) * 1e6)
            out["event.duration"], out[FIELDS["latency_ms"]] = ns, round(ns / 1e6, 3)
        out.update(self._common)
        out.update(number)
        if record is not None:
            out.update({"log.logger": record.name, "log.origin.file.name": record.filename,
                        "log.origin.file.line": record.lineno, "log.origin.function": record.funcName})
        exc_info = ed.pop("exc_info", None)
        ed.pop("stack_info", None)
        if exc_info:
            out.update(_error_fields(exc_info))
        for key, value in ed.items():
            out.setdefault(field_name(key), value)
        return out


def _json(ed: Mapping[str, Any]) -> str:
    """One line, always: ASCII only, so newlines and Unicode line breaks are escaped too."""
    return json.dumps(ed, ensure_ascii=True, separators=(",", ":"), default=lambda o: (
        o.value if isinstance(o, enum.Enum) else sorted(o, key=str) if isinstance(o, set | frozenset)
        else o.decode("utf-8", "backslashreplace") if isinstance(o, bytes) else str(o)))


_HIDDEN = frozenset({"@timestamp", "log.level", "message", "ecs.version", "event.kind", "event.category",
                     "event.type", "event.outcome", "service.name", "host.hostname", "process.pid",
                     "event.sequence", "event.id", "process.entity_id",
                     "log.origin.file.name", "log.origin.file.line", "log.origin.function",
                     "error.stack_trace"})


class _Console(logging.Formatter):
    """For people: time, level, message, then key=value; a stack trace follows indented."""

    def format(self, record: logging.LogRecord) -> str:
        ed: dict[str, Any] = record.__dict__["ecs"]
        parts = [str(ed.get("@timestamp"))[11:23], f"{ed.get('log.level', ''):<8}", str(ed.get("message"))]
        for key, value in ed.items():
            if key not in _HIDDEN and not (key == "event.action" and value == ed.get("message")):
                text = value if isinstance(value, str) and value and " " not in value else _json(value)
                parts.append(f"{key.removeprefix(NAMESPACE)}={text}")
        stack = str(ed.get("error.stack_trace", "")).splitlines()
        return " ".join(parts) + "".join("\n    " + s for s in stack)


def _finish(ed: dict[str, Any], rec: logging.LogRecord | None = None) -> logging.LogRecord:
    """Render the line now, on the caller's thread; what the sinks' formatters need goes along."""
    if rec is None:
        level = _LEVELS.get(str(ed.get("log.level")), logging.ERROR)
        rec = logging.LogRecord(APP_NAME, level, "", 0, "", None, None)
    try:
        line = _json(ed)
    except Exception as exc:  # e.g. a list that contains itself
        ed = _failed("log-render-failed", exc, ed)
        line = _json(ed)
    rec.msg, rec.args, rec.exc_info, rec.exc_text, rec.stack_info = line, None, None, None, None
    msgid = "".join(c for c in str(ed.get("event.action", "")) if 33 <= ord(c) < 127)[:32] or "-"
    rec.__dict__.update(ecs=ed, stamp=ed["@timestamp"], severity=_SEVERITY.get(rec.levelno, 6), msgid=msgid)
    return rec


class _Intake(logging.handlers.QueueHandler):
    """The callers' side (root handler and structlog's last processor): queue or drop, never block."""

    def __init__(self, ecs: _Ecs, level: int, lines: int) -> None:
        self.q: queue.SimpleQueue[Any] = queue.SimpleQueue()  # C and reentrant: signal-safe
        super().__init__(self.q)
        self.setLevel(level)
        self.ecs, self.lines, self.closed, self.dropped = ecs, lines, False, 0
        self.gaps = Gaps()
        self._mu = threading.RLock()
        self.previous_root_level = logging.getLogger().level

    def __call__(self, _logger: WrappedLogger, _method: str, ed: EventDict) -> EventDict:
        """structlog's last processor: the ECS dict becomes a queued record, structlog stops."""
        self.handle(_finish(cast(dict[str, Any], ed)))
        raise structlog.DropEvent

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        """Another library's stdlib record: the same ECS line, on a copy of the record."""
        if "ecs" in record.__dict__:
            return record
        record = copy.copy(record)
        try:
            ed = self.ecs(None, record.levelname.lower(),
                          {"event": record.getMessage(), "_record": record, "exc_info": record.exc_info})
        except Exception as exc:  # %-arguments that do not match
            ed = _failed("log-render-failed", exc, self.ecs.number())
        return _finish(ed, record)

    def enqueue(self, record: logging.LogRecord) -> None:
        if self.closed or self.q.qsize() >= self.lines:
            self.handleError(record)
        else:
            self.q.put_nowait(record)

    def handleError(self, record: logging.LogRecord) -> None:
        """Nothing is ever printed on the callers' path: the line counts as dropped, its number
        as lost."""
        with self._mu:
            self.dropped += 1
        seq = record.__dict__.get("ecs", {}).get("event.sequence")
        if isinstance(seq, int):
            self.gaps.add(seq)


class _Fd:
    """A text stream writing straight to a descriptor: nothing buffered, no lock held while blocked."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, text: str) -> int:
        data = text.encode("utf-8", "backslashreplace")
        while data:
            data = data[os.write(self.fd, data):]
        return len(text)

    def fileno(self) -> int:
        return self.fd

    def flush(self) -> None:
        """Nothing is buffered."""

    def close(self) -> None:
        os.close(self.fd)


class _Sink:
    """Mixed in first: the sink's name and target, and its failure kept for the writer thread."""

    sink_name = target = ""
    error: BaseException | None = None
    down, lost = False, 0
    gaps: Gaps  # the numbers of the lines this sink lost, set per sink by Logging

    def handleError(self, record: logging.LogRecord) -> None:
        self.error = sys.exc_info()[1]  # the writer reports it; nothing goes to stderr


class _Stream(_Sink, logging.StreamHandler):  # type: ignore[type-arg]  # generic only in typeshed
    sink_name = "stream"
    journal = False  # the stream is journald's (JOURNAL_STREAM names it)


class _File(_Sink, logging.handlers.WatchedFileHandler):
    """Reopened when the path names another file (logrotate); a symlink at the path is refused."""

    sink_name = "file"

    def _open(self) -> Any:
        fd = os.open(self.baseFilename, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
                     | os.O_NONBLOCK | os.O_NOCTTY, 0o640)
        with contextlib.suppress(OSError):  # a line cut short by a full disk is ended, not continued
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                os.write(fd, b"\n")
        return _Fd(fd)


class _Syslog(_Sink, logging.handlers.SysLogHandler):
    """One datagram per line; a socket that took lines and then went away (the syslog daemon is
    restarting) is waited for, up to ``hold_s``, before the line counts as lost."""

    sink_name = "syslog"
    hold_s, delivered = SYSLOG_HOLD_S, False
    stop = threading.Event()  # replaced per sink; set by close(): stop holding at once

    def emit(self, record: logging.LogRecord) -> None:
        deadline = time.monotonic() + self.hold_s
        while (error := self._attempt(record)) is not None:
            gone = isinstance(error, FileNotFoundError | ConnectionRefusedError)
            if not (gone and self.delivered and not self.down) or time.monotonic() >= deadline:
                return  # never worked, already down, or not back in time: the line is lost
            if self.stop.wait(SYSLOG_RETRY_S):
                return
        self.delivered = True

    def _attempt(self, record: logging.LogRecord) -> BaseException | None:
        """Send once (SysLogHandler reconnects once); the error it met, if any."""
        self.error = None
        super().emit(record)
        return self.error


class Logging:
    """The configured pipeline: bound loggers, the writer thread, reopen, drop count, close."""

    def __init__(self, intake: _Intake, sinks: list[_Sink], level: int) -> None:
        self._intake, self._sinks, self._queue, self._lost = intake, sinks, intake.q, 0
        for sink in sinks:
            sink.gaps = Gaps()
        self._reopen = False
        self._processors: list[Processor] = [structlog.contextvars.merge_contextvars, intake.ecs, intake]
        self._wrapper = structlog.make_filtering_bound_logger(level)
        self._factory: Callable[..., None] = lambda *_args: None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()
        atexit.register(self.close)  # a one-shot command's last lines are written too

    def logger(self, **bind: Any) -> FilteringBoundLogger:
        """A structlog logger writing to this pipeline, with ``bind`` in every event."""
        make = cast(Callable[..., FilteringBoundLogger], self._wrapper)
        return make(None, processors=self._processors, context=dict(bind))

    def install(self) -> None:
        """Make structlog.get_logger() use this pipeline."""
        structlog.configure(processors=self._processors, wrapper_class=self._wrapper,
                            logger_factory=self._factory, context_class=dict, cache_logger_on_first_use=False)

    def dropped_total(self) -> int:
        """Lines lost since configure(): dropped at the full queue, or not written by a failing sink."""
        return self._intake.dropped + self._lost

    def reopen(self) -> None:
        """Reopen the file and the syslog socket before the next line (SIGHUP, SIGUSR1)."""
        self._reopen = True

    def flush(self, timeout: float = CLOSE_WITHIN_S) -> bool:
        """Wait until the lines queued before this call reached the sinks; False on timeout."""
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)

    def close(self) -> None:
        """Detach from stdlib logging and structlog, write what is queued within about 2 s."""
        if self._closed:
            return
        self._closed = self._intake.closed = True
        for sink in self._sinks:
            if isinstance(sink, _Syslog):
                sink.stop.set()
        atexit.unregister(self.close)
        root = logging.getLogger()
        if self._intake in root.handlers:  # not replaced by a later configure()
            root.removeHandler(self._intake)
            root.setLevel(self._intake.previous_root_level)
            logging.captureWarnings(False)
        if structlog.get_config().get("logger_factory") == self._factory:
            structlog.reset_defaults()
        self._queue.put(None)
        self._thread.join(CLOSE_WITHIN_S)
        if not self._thread.is_alive():  # a sink still blocked in a write keeps its handle
            self._close_sinks()

    def __enter__(self) -> Logging:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _close_sinks(self) -> None:
        for sink in self._sinks:
            with contextlib.suppress(Exception):
                cast(logging.Handler, sink).close()  # a file or socket is opened again on its next line

    def _run(self) -> None:
        """The writer thread."""
        while (rec := self._queue.get()) is not None:
            if isinstance(rec, threading.Event):
                rec.set()
                continue
            if self._reopen:
                self._reopen = False
                self._close_sinks()
            try:
                self._write(rec)
            except Exception:  # the writer thread must outlive any bug in a sink
                self._lost += 1

    def _write(self, rec: logging.LogRecord) -> None:
        notices: list[logging.LogRecord] = []
        seq = rec.__dict__.get("ecs", {}).get("event.sequence")
        for sink in self._sinks:
            sink.error = None
            try:
                cast(logging.Handler, sink).emit(rec)
            except Exception as exc:  # WatchedFileHandler opens the file outside its own try
                sink.error = exc
            if sink.error is not None:
                self._lost, sink.lost = self._lost + 1, sink.lost + 1
                if isinstance(seq, int):
                    sink.gaps.add(seq)
                with contextlib.suppress(Exception):  # opened afresh for its next line
                    cast(logging.Handler, sink).close()
                if not sink.down:
                    sink.down = True
                    notices.append(self._notice("error", Event.SINK_FAILED, sink=sink.sink_name,
                                                sink_target=sink.target, **_error_fields(sink.error, False)))
            elif sink.down:
                notices += self._dropped(sink.sink_name, sink.gaps, sink.lost)
                sink.down, sink.lost = False, 0
        gaps = self._intake.gaps
        if gaps.runs() and (self._queue.qsize() <= self._intake.lines // 2 or gaps.runs() >= GAP_RUNS):
            notices += self._dropped("queue", gaps, 0)
        for notice in notices:
            self._write(notice)

    def _dropped(self, sink: str, gaps: Gaps, lost: int) -> list[logging.LogRecord]:
        """One log-dropped notice per run of lost numbers (one without a range if none were
        numbered); ``dropped`` is the run's length."""
        runs = gaps.take()
        if not runs:
            return [self._notice("warning", Event.LOG_DROPPED, sink=sink, dropped=lost)]
        return [self._notice("warning", Event.LOG_DROPPED, sink=sink, dropped=last - first + 1,
                             dropped_first=first, dropped_last=last) for first, last in runs]

    def _notice(self, level: str, event: Event, **fields: Any) -> logging.LogRecord:
        return _finish(self._intake.ecs(None, level, {"event": event, **fields}))


def _stream_sink(stream: TextIO, fmt: str) -> _Stream:
    """stdout or stderr by its descriptor, with journald's prefix if JOURNAL_STREAM names it."""
    out, journal = cast(Any, stream), False
    with contextlib.suppress(AttributeError, OSError, ValueError):  # io.StringIO: used as it is
        st = os.fstat(stream.fileno())
        out, journal = _Fd(stream.fileno()), os.environ.get("JOURNAL_STREAM") == f"{st.st_dev}:{st.st_ino}"
        stream.flush()  # what was printed before goes first
    sink = _Stream(out)
    sink.target, sink.journal = str(getattr(stream, "name", "stream")), journal
    prefix = "<%(severity)d>" if journal else ""
    sink.setFormatter(_Console() if fmt == "console" else logging.Formatter(prefix + "%(message)s"))
    return sink


def configure(cfg: LogConfig, *, service_name: str, stream: TextIO | None = None,
              force_format: str | None = None, clock: Callable[[], float] = time.time,
              hostname: str | None = None, queue_lines: int = QUEUE_LINES,
              syslog_hold_s: float = SYSLOG_HOLD_S) -> Logging:
    """Route structlog and the root stdlib logger to the configured sinks, through one bounded queue.

    ``stream`` defaults to sys.stdout; ``force_format`` ("json" or "console") overrides ``cfg.format``
    for it (the file and syslog always get JSON). A sink that cannot be opened or reached never
    raises: it reports ``sink-failed``. A syslog socket that worked and went away is waited for
    up to ``syslog_hold_s`` (lines queue meanwhile) before lines count as lost.
    """
    fmt = force_format or cfg.format
    if fmt not in tuple(LogFormat):
        raise ValueError(f"log format must be one of {', '.join(LogFormat)}, got {fmt!r}")
    level = _LEVELS.get(cfg.level.lower())
    if level is None:
        raise ValueError(f"log level must be one of {', '.join(_LEVELS)}, got {cfg.level!r}")
    host = hostname if hostname is not None else socket.gethostname()
    first = _stream_sink(stream if stream is not None else sys.stdout, fmt)
    sinks: list[_Sink] = [first]
    # Under journald the journal already holds every line, and /dev/log is journald's too: a
    # syslog sink would deliver each event twice to the journal and to what reads it (rsyslog).
    skip_syslog = cfg.syslog and first.journal
    if cfg.file:
        sinks.append(_File(cfg.file, delay=True))
        sinks[-1].target = cfg.file
    if cfg.syslog and not skip_syslog:
        # RFC 5424, "<PRI>1 TIMESTAMP HOST APP PID MSGID - JSON", one datagram an event
        syslog = _Syslog(cfg.syslog_address, cfg.syslog_facility, socket.SOCK_DGRAM)
        syslog.target, syslog.append_nul = cfg.syslog_address, False
        syslog.hold_s, syslog.stop = syslog_hold_s, threading.Event()
        name = "".join(c for c in host if c.isascii() and (c.isalnum() or c in "-._"))[:255] or "-"
        syslog.setFormatter(logging.Formatter(f"1 %(stamp)s {name} {APP_NAME} %(process)d %(msgid)s - "
                                              "%(message)s"))
        sinks.append(syslog)
    intake = _Intake(_Ecs(service_name, host, clock), level, queue_lines)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Intake)]:
        root.removeHandler(old)  # a reload: the level to restore is the one before the first
        intake.previous_root_level = old.previous_root_level
    root.addHandler(intake)
    root.setLevel(level)
    logging.captureWarnings(True)
    result = Logging(intake, sinks, level)
    result.install()
    if skip_syslog:
        result.logger().warning(Event.SINK_SKIPPED, sink="syslog", sink_target=cfg.syslog_address,
                                reason="the agent's output is the journal, which has every line; "
                                       "rsyslog reads them from there")
    return result
