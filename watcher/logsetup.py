"""Structured logging: one ECS JSON object per line, from structlog and stdlib logging, to sinks.

Field names are ECS dotted keys kept flat (``{"log.level": "info"}``), which ECS allows and
which is what Elastic's own ecs-logging libraries write; see docs/events.md for the catalogue.
Three sinks can run at once (watcher.logsinks): a text stream (stdout, captured by journald),
a file that follows logrotate, and syslog with RFC 5424 framing to a unix socket (/dev/log) or a
remote collector over UDP or TCP (octet counting). A sink that fails never raises into the
caller and never makes it wait: it is counted, reported once as ``sink-failed`` on the other
sinks, skipped for a growing back-off, then retried.
"""

from __future__ import annotations

import datetime as dt
import enum
import errno
import json
import logging
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TextIO, cast

import structlog
from structlog.typing import EventDict, FilteringBoundLogger, Processor, WrappedLogger

from watcher.config import LogConfig
from watcher.logsinks import (
    APP_NAME,
    BACKOFF_FIRST_S,
    FACILITIES,
    FileSink,
    Meta,
    NetSyslogSink,
    Sink,
    StreamSink,
    UnixSyslogSink,
    parse_syslog_address,
)

__all__ = [
    "ACTIONS",
    "APP_NAME",
    "ECS_VERSION",
    "EventClass",
    "Logging",
    "SinkStats",
    "configure",
]

ECS_VERSION = "8.11.0"
BACKOFF_MAX_S = 60.0


@dataclass(frozen=True)
class EventClass:
    """The ECS categorization fields of one ``event.action``."""

    kind: str
    category: tuple[str, ...]
    type: tuple[str, ...]
    outcome: str


def _ec(category: str, type_: str, outcome: str) -> EventClass:
    return EventClass("event", tuple(category.split()), tuple(type_.split()), outcome)


ACTIONS: Mapping[str, EventClass] = {
    "service-down": _ec("network", "end", "failure"),
    "service-up": _ec("network", "start", "success"),
    "firewall-block": _ec("configuration network", "change denied", "success"),
    "firewall-unblock": _ec("configuration network", "change allowed", "success"),
    "firewall-drain": _ec("configuration network", "change denied", "success"),
    "firewall-repair": _ec("configuration", "change", "success"),
    "firewall-backend-fallback": _ec("configuration", "info", "failure"),
    "probe-failed": _ec("network", "info", "failure"),
    "admin-block": _ec("configuration", "change", "success"),
    "admin-unblock": _ec("configuration", "change", "success"),
    "agent-start": _ec("process", "start", "success"),
    "agent-ready": _ec("process", "info", "success"),
    "agent-stop": _ec("process", "end", "success"),
    "config-reload": _ec("configuration", "change", "success"),
    "config-invalid": _ec("configuration", "info", "failure"),
    "apply-retry": _ec("configuration", "change", "failure"),
    "apply-failed": _ec("configuration", "change", "failure"),
    "proc-connector-unavailable": _ec("host", "info", "failure"),
    "proc-connector-overrun": _ec("host", "info", "failure"),
    "ipv6-unavailable": _ec("network", "info", "failure"),
    "ipv6-read-failed": _ec("network", "info", "failure"),
    "sink-failed": _ec("host", "info", "failure"),
    "sink-recovered": _ec("host", "info", "success"),
    # Further actions the agent's modules log today.
    "service-initial-up": _ec("network", "start", "success"),
    "service-initial-down": _ec("network", "end", "failure"),
    "firewall-keep": _ec("configuration", "info", "success"),
    "firewall-remove": _ec("configuration", "deletion", "success"),
    "internal-error": _ec("process", "info", "failure"),
    "state-write-failed": _ec("file", "change", "failure"),
    "pidfile-watch-failed": _ec("file", "info", "failure"),
    "pidfile-directory-missing": _ec("file", "info", "failure"),
    "inotify-read-failed": _ec("host", "info", "failure"),
    "inotify-overflow": _ec("host", "info", "failure"),
    "pidfd-open-failed": _ec("process", "info", "failure"),
    "proc-connector-error": _ec("host", "info", "failure"),
    "proc-connector-bad-message": _ec("host", "info", "failure"),
    "sock-diag-destroy-unavailable": _ec("network", "info", "failure"),
    "sock-diag-overrun": _ec("network", "info", "failure"),
    "sock-diag-error": _ec("network", "info", "failure"),
    "sock-diag-bad-message": _ec("network", "info", "failure"),
}

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR, "critical": logging.CRITICAL}
_METHOD_LEVEL = {"warn": "warning", "exception": "error", "fatal": "critical", "msg": "info",
                 "err": "error", "failure": "error"}
# RFC 5424 severities.
_SEVERITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}


def _iso_ms(t: float) -> str:
    d = dt.datetime.fromtimestamp(t, tz=dt.UTC)
    return d.strftime("%Y-%m-%dT%H:%M:%S.") + f"{d.microsecond // 1000:03d}Z"


def _exc_fields(exc_info: Any) -> dict[str, str]:
    if isinstance(exc_info, BaseException):
        exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
    elif not isinstance(exc_info, tuple):
        exc_info = sys.exc_info()
    if len(exc_info) != 3 or exc_info[0] is None:
        return {}
    etype, value, tb = exc_info
    name = etype.__qualname__
    if etype.__module__ not in ("builtins", "__main__"):
        name = f"{etype.__module__}.{name}"
    return {
        "error.type": name,
        "error.message": str(value),
        "error.stack_trace": "".join(traceback.format_exception(etype, value, tb)).rstrip("\n"),
    }


class _Ecs:
    """The processor that turns a structlog or stdlib event dict into ECS fields, in order."""

    def __init__(self, service_name: str, hostname: str, clock: Callable[[], float]) -> None:
        self._service = service_name
        self._host = hostname
        self._clock = clock

    def __call__(self, _logger: WrappedLogger, method: str, ed: EventDict) -> EventDict:
        try:
            return self._map(method, ed)
        except Exception as exc:  # a field that cannot even be str()-ed must not kill the caller
            return {"@timestamp": _iso_ms(self._clock()), "log.level": "error",
                    "message": "log-processing-failed", "ecs.version": ECS_VERSION,
                    **_exc_fields(exc)}

    def _map(self, method: str, ed: EventDict) -> EventDict:
        record: logging.LogRecord | None = ed.pop("_record", None)
        ed.pop("_from_structlog", None)
        ed.pop("level", None)
        level = _METHOD_LEVEL.get(method, method)
        out: dict[str, Any] = {
            "@timestamp": _iso_ms(record.created if record is not None else self._clock()),
            "log.level": level,
        }
        event = ed.pop("event", "")
        message = ed.pop("message", None)
        if record is None:
            action = str(event)
            out["message"] = action if message is None else str(message)
        else:
            action = ""
            out["message"] = str(event).rstrip("\n")  # warnings.formatwarning ends with one
        out["ecs.version"] = ECS_VERSION
        if action:
            out["event.action"] = action
            cls = ACTIONS.get(action)
            out["event.kind"] = cls.kind if cls else "event"
            if cls is not None:
                out["event.category"] = list(cls.category)
                out["event.type"] = list(cls.type)
                out["event.outcome"] = cls.outcome
        if "reason" in ed:
            out["event.reason"] = str(ed.pop("reason"))
        # The most precise of event.duration= / latency_ns= (ns) / latency_ms= wins.
        given = [ed.pop(k, None) for k in ("event.duration", "latency_ns", "latency_ms")]
        if any(v is not None for v in given):
            dur_ns, lat_ns, lat_ms = given
            ns = (int(dur_ns) if dur_ns is not None else int(lat_ns) if lat_ns is not None
                  else round(float(lat_ms) * 1e6))
            out["event.duration"] = ns
            out["latency_ms"] = round(ns / 1e6, 3)
        if "trigger" in ed:
            out["trigger"] = ed.pop("trigger")
        out["service.name"] = self._service
        out["host.hostname"] = self._host
        out["process.pid"] = os.getpid()
        if record is not None:
            out["log.logger"] = record.name
            out["log.origin.file.name"] = record.filename
            out["log.origin.file.line"] = record.lineno
            out["log.origin.function"] = record.funcName
        exc_info = ed.pop("exc_info", None)
        if exc_info:
            out.update(_exc_fields(exc_info))
        stack = ed.pop("stack_info", None)
        if stack and "error.stack_trace" not in out:
            out["error.stack_trace"] = (
                stack if isinstance(stack, str) else "".join(traceback.format_stack()[:-1])
            )
        for key, value in ed.items():
            out.setdefault(key, value)
        return out


def _json_default(o: Any) -> Any:
    if isinstance(o, enum.Enum):
        return o.value
    if isinstance(o, set | frozenset | tuple):
        return list(o)
    if isinstance(o, bytes | bytearray):
        return bytes(o).decode("utf-8", "backslashreplace")
    return str(o)


# JSON leaves these raw, but str.splitlines() and some log shippers treat them as line breaks.
_UNICODE_BREAKS = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}


def _render_json(ed: Mapping[str, Any]) -> str:
    """One line of JSON, always: newlines, control and Unicode line-break characters are escaped."""
    line = json.dumps(ed, ensure_ascii=False, separators=(",", ":"), default=_json_default)
    line = line.translate(_UNICODE_BREAKS)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates (undecodable file names): escape everything
        line = json.dumps(ed, ensure_ascii=True, separators=(",", ":"), default=_json_default)
    return line


_CONSOLE_HIDDEN = frozenset({
    "@timestamp", "log.level", "message", "ecs.version", "event.kind", "event.category",
    "event.type", "event.outcome", "service.name", "host.hostname", "process.pid",
    "log.origin.file.name", "log.origin.file.line", "log.origin.function", "error.stack_trace",
})


def _render_console(ed: Mapping[str, Any]) -> str:
    """A line for humans: time, level, message, then key=value; a stack trace follows indented."""
    ts = str(ed.get("@timestamp", ""))
    parts = [ts[11:23] if len(ts) >= 23 else ts, f"{ed.get('log.level', ''):<8}",
             str(ed.get("message", ""))]
    for key, value in ed.items():
        if key in _CONSOLE_HIDDEN or (key == "event.action" and value == ed.get("message")):
            continue
        text = value if isinstance(value, str) and value and " " not in value else None
        parts.append(f"{key}={text if text is not None else _render_json(value)}")
    line = " ".join(parts)
    stack = ed.get("error.stack_trace")
    if stack:
        line += "\n" + "\n".join("    " + s for s in str(stack).splitlines())
    return line


_RENDERERS: Mapping[str, Callable[[Mapping[str, Any]], str]] = {
    "json": _render_json,
    "console": _render_console,
}


# ---------------------------------------------------------------------------------------- sinks


@dataclass(frozen=True)
class SinkStats:
    """Counters of one sink: lines written, failed writes, lines dropped (failed or skipped)."""

    name: str
    target: str
    healthy: bool
    written: int
    failures: int
    dropped: int
    last_error: str


def _stats(sink: Sink) -> SinkStats:
    return SinkStats(sink.name, sink.target, sink.healthy, sink.written, sink.failures,
                     sink.dropped, sink.last_error)


def _describe(exc: BaseException) -> dict[str, Any]:
    fields: dict[str, Any] = {"error.type": type(exc).__name__, "error.message": str(exc)}
    if isinstance(exc, OSError) and exc.errno is not None:
        fields["error.code"] = errno.errorcode.get(exc.errno, str(exc.errno))
    return fields


_Notice = tuple[str, str, dict[str, Any]]  # (level method, action, fields)


class _FanOut:
    """The structlog "logger" at the end of the chain: writes one event to every sink."""

    def __init__(self, sinks: list[Sink], monotonic: Callable[[], float]) -> None:
        self.sinks = sinks
        self._monotonic = monotonic
        self._lock = threading.RLock()
        self._busy = 0
        self._reopen_wanted = False
        self.notify: Callable[[_Notice], None] = lambda notice: None
        for sink in sinks:
            sink.report_failure = self._report_failure

    # structlog calls the method named after the level with what the last processor returned.
    def _structlog(self, ed: EventDict) -> None:
        level = str(ed.get("log.level", "info"))
        meta = Meta(_SEVERITY.get(level, 6), str(ed.get("event.action", "-"))[:32] or "-",
                     str(ed.get("@timestamp", "-")))
        self.emit(lambda fmt: _RENDERERS[fmt](ed), meta)

    debug = info = warning = warn = error = err = critical = fatal = exception = msg = log = (
        _structlog
    )

    def emit(self, render: Callable[[str], str], meta: Meta) -> None:
        """Write one event everywhere it can go; never raises, whatever the sinks do."""
        notices: list[_Notice] = []
        # An RLock, so that logging from a signal handler that interrupted emit() cannot deadlock.
        with self._lock:
            self._busy += 1
            try:
                self._write_all(render, meta, notices)
            finally:
                self._busy -= 1
        for notice in notices:
            self.notify(notice)

    def _write_all(self, render: Callable[[str], str], meta: Meta, notices: list[_Notice]) -> None:
        if self._reopen_wanted and self._busy == 1:  # not in a write interrupted by a handler
            self._reopen_locked()
        lines: dict[str, str] = {}
        now = self._monotonic()
        for sink in self.sinks:
            if not sink.healthy and now < sink.retry_at and not sink.ready_again():
                sink.dropped += 1
                sink.dropped_in_outage += 1
                continue
            try:
                if sink.fmt not in lines:
                    lines[sink.fmt] = _safe_render(render, sink.fmt)
                sink.write(lines[sink.fmt], meta, now)
            except Exception as exc:  # any sink error is counted, never propagated
                self._failed(sink, exc, now, notices)
                continue
            sink.written += 1
            if not sink.healthy:
                sink.healthy = True
                sink.backoff = BACKOFF_FIRST_S
                notices.append(("info", "sink-recovered", {
                    "sink.name": sink.name, "sink.target": sink.target,
                    "sink.dropped": sink.dropped_in_outage}))
                sink.dropped_in_outage = 0

    def _report_failure(self, sink: Sink, exc: Exception) -> None:
        """A sink's background worker failed: report it now, not at the next event's write."""
        notices: list[_Notice] = []
        with self._lock:
            if sink.healthy:
                self._failed(sink, exc, self._monotonic(), notices, dropped=0)
            else:
                sink.last_error = f"{type(exc).__name__}: {exc}"
        for notice in notices:
            self.notify(notice)

    def _failed(self, sink: Sink, exc: Exception, now: float, notices: list[_Notice],
                dropped: int = 1) -> None:
        sink.failures += 1
        sink.dropped += dropped
        sink.dropped_in_outage += dropped
        sink.last_error = f"{type(exc).__name__}: {exc}"
        if sink.healthy:
            sink.healthy = False
            sink.backoff = BACKOFF_FIRST_S
            notices.append(("error", "sink-failed", {
                "sink.name": sink.name, "sink.target": sink.target, **_describe(exc)}))
        else:
            sink.backoff = min(sink.backoff * 2, BACKOFF_MAX_S)
        # A full datagram queue (EAGAIN; net.unix.max_dgram_qlen is often 10) is a burst, not a
        # dead collector: drop this line but try the next one at once.
        sink.retry_at = now if isinstance(exc, BlockingIOError) else now + sink.backoff

    def reopen(self) -> None:
        """Reopen file and socket sinks now, or at the next event if a write is under way."""
        self._reopen_wanted = True
        if self._lock.acquire(blocking=False):
            try:
                if not self._busy:  # a signal handler that interrupted emit() leaves it to emit
                    self._reopen_locked()
            finally:
                self._lock.release()

    def _reopen_locked(self) -> None:
        self._reopen_wanted = False
        for sink in self.sinks:
            try:
                sink.reopen()
            except Exception as exc:  # closing a broken handle: nothing to do but note it
                sink.last_error = f"{type(exc).__name__}: {exc}"
            sink.retry_at = 0.0  # an explicit reopen retries a failed sink at once

    def close(self) -> None:
        with self._lock:
            for sink in self.sinks:
                try:
                    sink.close()
                except Exception as exc:  # closing is best effort
                    sink.last_error = f"{type(exc).__name__}: {exc}"


def _safe_render(render: Callable[[str], str], fmt: str) -> str:
    try:
        return render(fmt)
    except Exception as exc:  # e.g. a stdlib record whose %-arguments do not match
        return _render_json({"@timestamp": _iso_ms(time.time()), "log.level": "error",
                            "message": "log-render-failed", "ecs.version": ECS_VERSION,
                            **_exc_fields(exc)})


class _RootHandler(logging.Handler):
    """Sends other libraries' stdlib records through the same ECS chain to the same sinks."""

    def __init__(self, fanout: _FanOut, ecs: _Ecs, level: int) -> None:
        super().__init__(level)
        self.previous_root_level = logging.getLogger().level
        self._fanout = fanout
        self._formatters = {
            fmt: structlog.stdlib.ProcessorFormatter(processors=[ecs, renderer])
            for fmt, renderer in (("json", _last(_render_json)), ("console", _last(_render_console)))
        }

    def emit(self, record: logging.LogRecord) -> None:
        level = _METHOD_LEVEL.get(record.levelname.lower(), record.levelname.lower())
        meta = Meta(_SEVERITY.get(level, 6), "-", _iso_ms(record.created))
        self._fanout.emit(lambda fmt: self._formatters[fmt].format(record), meta)


def _last(render: Callable[[Mapping[str, Any]], str]) -> Processor:
    def processor(_logger: WrappedLogger, _method: str, ed: EventDict) -> str:
        return render(ed)

    return cast(Processor, processor)


def _deliver(_logger: WrappedLogger, _method: str, ed: EventDict) -> tuple[Any, ...]:
    """The last processor: hands the whole event dict to _FanOut, which renders per sink."""
    return (ed,), {}


# -------------------------------------------------------------------------------------- public


class Logging:
    """The configured pipeline: hands out bound loggers, reopens and closes the sinks."""

    def __init__(self, fanout: _FanOut, processors: list[Processor], level: int,
                 handler: _RootHandler) -> None:
        self._fanout = fanout
        self._processors = processors
        self._wrapper = structlog.make_filtering_bound_logger(level)
        self._handler = handler
        self._closed = False
        fanout.notify = self._notice

    def logger(self, **bind: Any) -> FilteringBoundLogger:
        """A structlog logger writing to this pipeline, with ``bind`` in every event."""
        make = cast(Callable[..., FilteringBoundLogger], self._wrapper)  # the class, untyped init
        return make(self._fanout, processors=self._processors, context=dict(bind))

    def _notice(self, notice: _Notice) -> None:
        method, action, fields = notice
        getattr(self.logger(), method)(action, **fields)

    def reopen(self) -> None:
        """Reopen the file and syslog sinks (call on SIGHUP/SIGUSR1 after logrotate); never raises."""
        self._fanout.reopen()

    def stats(self) -> dict[str, SinkStats]:
        """Counters per sink name (``stream``, ``file``, ``syslog``)."""
        return {s.name: _stats(s) for s in self._fanout.sinks}

    @property
    def failures(self) -> int:
        """Failed writes over all sinks since configure()."""
        return sum(s.failures for s in self._fanout.sinks)

    def close(self) -> None:
        """Detach from stdlib logging and structlog's defaults, close the sinks; idempotent."""
        if self._closed:
            return
        self._closed = True
        root = logging.getLogger()
        if self._handler in root.handlers:  # not replaced by a later configure()
            root.removeHandler(self._handler)
            root.setLevel(self._handler.previous_root_level)
            logging.captureWarnings(False)
        if structlog.get_config().get("logger_factory") == self._factory:
            structlog.reset_defaults()
        self._fanout.close()

    def _factory(self, *_args: Any) -> _FanOut:
        return self._fanout

    def install(self) -> None:
        """Make structlog.get_logger() (and structlog.configure's other users) use this pipeline."""
        structlog.configure(processors=self._processors, wrapper_class=self._wrapper,
                            logger_factory=self._factory, context_class=dict,
                            cache_logger_on_first_use=False)

    def __enter__(self) -> Logging:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _syslog_sink(address: str, facility: str, hostname: str) -> Sink:
    addr = parse_syslog_address(address)  # ValueError: config.py has validated it already
    code = FACILITIES[facility]
    if addr.transport == "unix":
        return UnixSyslogSink(addr.path, hostname, code)
    return NetSyslogSink(addr, hostname, code)


def configure(
    cfg: LogConfig,
    *,
    service_name: str,
    stream: TextIO | None = None,
    force_format: str | None = None,
    clock: Callable[[], float] = time.time,
    monotonic: Callable[[], float] = time.monotonic,
    hostname: str | None = None,
    syslog_address: str | None = None,
) -> Logging:
    """Set up structlog and the root stdlib logger to write ECS lines to the configured sinks.

    ``stream`` defaults to sys.stdout at call time. ``force_format`` ("json" or "console")
    overrides ``cfg.format`` for the stream; the file and syslog sinks always carry JSON.
    ``syslog_address`` overrides ``cfg.syslog_address`` ("/dev/log", "udp://HOST:PORT",
    "tcp://HOST:PORT"). Never raises for a sink that cannot be opened or reached: that sink
    reports ``sink-failed`` instead.
    """
    fmt = force_format or cfg.format
    if fmt not in _RENDERERS:
        raise ValueError(f"log format must be json or console, got {fmt!r}")
    level = _LEVELS.get(cfg.level.lower())
    if level is None:
        raise ValueError(f"log level must be one of {', '.join(_LEVELS)}, got {cfg.level!r}")
    host = hostname if hostname is not None else socket.gethostname()
    sinks: list[Sink] = [StreamSink(stream if stream is not None else sys.stdout, fmt)]
    if cfg.file:
        sinks.append(FileSink(cfg.file))
    if cfg.syslog:
        sinks.append(_syslog_sink(syslog_address or cfg.syslog_address, cfg.syslog_facility, host))
    fanout = _FanOut(sinks, monotonic)
    ecs = _Ecs(service_name, host, clock)
    processors: list[Processor] = [structlog.contextvars.merge_contextvars, ecs, _deliver]

    root = logging.getLogger()
    handler = _RootHandler(fanout, ecs, level)
    for old in [h for h in root.handlers if isinstance(h, _RootHandler)]:
        root.removeHandler(old)  # a reload: the level to restore is the one before the first
        handler.previous_root_level = old.previous_root_level
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)

    result = Logging(fanout, processors, level, handler)
    result.install()
    return result
