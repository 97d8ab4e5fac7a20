"""watcher.outputs.logpipeline: ECS fields, the catalogue in the code, the queue, the sinks, failures."""

from __future__ import annotations

import ast
import errno
import io
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from tests.ecs import check_event, custom_fields, ecs_fields
from watcher.config import LogConfig
from watcher.core.catalogue import Event
from watcher.core.triggers import Source
from watcher.outputs.logpipeline import (
    CLOSE_WITHIN_S,
    ECS_VERSION,
    FIELDS,
    NAMESPACE,
    Logging,
    configure,
    field_name,
)

T0 = 1_764_076_200.123456  # 2025-11-25T13:10:00.123456Z
HOST = "vpn1.example"
REPO = Path(__file__).resolve().parents[2]

# The allowed values of ECS 8.11 categorization fields, and category -> allowed types.
ECS_OUTCOMES = {"failure", "success", "unknown"}
ECS_TYPES_BY_CATEGORY = {
    "configuration": {"access", "change", "creation", "deletion", "info"},
    "file": {"access", "change", "creation", "deletion", "info"},
    "host": {"access", "change", "end", "info", "start"},
    "network": {"access", "allowed", "connection", "denied", "end", "info", "protocol", "start"},
    "process": {"access", "change", "end", "info", "start"},
}


class Setup:
    """A configured pipeline writing to a StringIO, with a fixed wall clock."""

    def __init__(self, cfg: LogConfig | None = None, **kw: Any) -> None:
        self.stream = kw.setdefault("stream", io.StringIO())
        self.logging: Logging = configure(cfg or LogConfig(), service_name="novell-sslvpn",
                                          clock=lambda: T0, hostname=HOST, **kw)
        self.log = self.logging.logger()

    def text(self) -> str:
        """What the stream holds once every queued line was written."""
        assert self.logging.flush(), "the writer thread did not drain the queue"
        return str(self.stream.getvalue())

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.text().splitlines()]

    def actions(self) -> list[str]:
        return [d.get("event.action", "") for d in self.lines()]


@pytest.fixture
def mk() -> Iterator[Any]:
    """Makes Setups; every one is closed afterwards, so the root logger is left clean."""
    made: list[Setup] = []

    def make(cfg: LogConfig | None = None, **kw: Any) -> Setup:
        made.append(Setup(cfg, **kw))
        return made[-1]

    yield make
    for s in made:
        s.logging.close()


def file_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def messages(path: Path) -> list[str]:
    return [d["message"] for d in file_lines(path)]


# ---------------------------------------------------------------------------- fields


def test_event_line_has_every_ecs_field_typed(mk: Any) -> None:
    """A firewall-block event: ECS fields typed as ECS says, the call's keywords under the namespace."""
    s = mk()
    s.log.info(Event.FIREWALL_BLOCK, trigger=Source.PIDFD, reason="process 4242 exited",
               latency_ms=1.235, transactions=2, families=["ipv4", "ipv6"],
               **{"event.duration": 1_234_567})
    [d] = s.lines()
    assert list(d)[:4] == ["@timestamp", "log.level", "message", "ecs.version"]
    assert (d["@timestamp"], d["log.level"], d["message"]) == (
        "2025-11-25T13:10:00.123Z", "info", "firewall-block")
    assert (d["ecs.version"], d["event.action"], d["event.kind"]) == (
        ECS_VERSION, "firewall-block", "event")
    assert d["event.category"] == ["configuration", "network"]
    assert d["event.type"] == ["change", "denied"] and d["event.outcome"] == "success"
    assert d["event.reason"] == "process 4242 exited"
    assert d["event.duration"] == 1_234_567 and d["sslvpn_heartbeat.latency_ms"] == 1.235
    assert d["sslvpn_heartbeat.trigger"] == "pidfd"
    assert d["sslvpn_heartbeat.transactions"] == 2
    assert d["sslvpn_heartbeat.families"] == ["ipv4", "ipv6"]
    assert (d["service.name"], d["host.hostname"], d["process.pid"]) == (
        "novell-sslvpn", HOST, os.getpid())
    check_event(d)


def test_latency_ms_alone_gives_duration_in_nanoseconds(mk: Any) -> None:
    """latency_ms=2.5 is written as event.duration 2500000 ns and kept in milliseconds."""
    s = mk()
    s.log.info(Event.FIREWALL_UNBLOCK, latency_ms=2.5)
    [d] = s.lines()
    assert (d["event.duration"], d["sslvpn_heartbeat.latency_ms"]) == (2_500_000, 2.5)


def test_the_one_table_maps_short_names() -> None:
    """reason, health.state and path are ECS fields; other keywords go under sslvpn_heartbeat."""
    assert field_name("reason") == "event.reason"
    assert field_name("health.state") == "service.state"
    assert field_name("path") == "file.path"
    assert field_name("trigger") == "sslvpn_heartbeat.trigger"
    assert field_name("sink.name") == "sslvpn_heartbeat.sink.name"
    assert field_name("event.duration") == "event.duration"
    assert field_name("sslvpn_heartbeat.x") == "sslvpn_heartbeat.x"
    assert {v for v in FIELDS.values() if not v.startswith(NAMESPACE)} <= set(ecs_fields())


def test_unknown_action_is_an_event_without_categories(mk: Any) -> None:
    """An action outside the catalogue still gets event.action and kind, no guessed category."""
    s = mk()
    s.log.info("something-new")
    [d] = s.lines()
    assert d["event.action"] == "something-new" and d["event.kind"] == "event"
    assert "event.category" not in d and "event.outcome" not in d


def test_message_keyword_replaces_message_not_action(mk: Any) -> None:
    """message= sets the human text while event.action stays the event name."""
    s = mk()
    s.log.info(Event.ADMIN_BLOCK, message="maintenance window")
    [d] = s.lines()
    assert (d["message"], d["event.action"]) == ("maintenance window", "admin-block")


def test_bound_and_context_values_appear_under_the_namespace(mk: Any) -> None:
    """Values bound with logger(**bind) and structlog contextvars are written with the event."""
    s = mk()
    structlog.contextvars.bind_contextvars(run_id="r1")
    try:
        s.logging.logger(component="probe").info(Event.PROBE_FAILED, check="listen")
    finally:
        structlog.contextvars.clear_contextvars()
    [d] = s.lines()
    assert (d["sslvpn_heartbeat.component"], d["sslvpn_heartbeat.run_id"],
            d["sslvpn_heartbeat.check"]) == ("probe", "r1", "listen")


def test_newlines_in_values_stay_on_one_line(mk: Any) -> None:
    """A value with newlines and Unicode line breaks is escaped: exactly one ASCII line."""
    s = mk()
    text = "one\ntwo\rthree\u2028four\x85five\u2029 \udcff ü"
    s.log.info(Event.CONFIG_INVALID, reason=text)
    out = s.text()
    assert len(out.splitlines()) == 1 and out.isascii()
    assert json.loads(out)["event.reason"] == text


def test_structlog_exception_goes_into_error_fields(mk: Any) -> None:
    """log.exception() writes error.type/.message/.code/.stack_trace in the same single line."""
    s = mk()
    try:
        raise PermissionError(errno.EACCES, "no CAP_NET_ADMIN")
    except PermissionError:
        s.log.exception(Event.APPLY_FAILED, reason="iptables-restore failed")
    [d] = s.lines()
    assert d["log.level"] == "error"
    assert (d["error.type"], d["error.code"]) == ("PermissionError", "EACCES")
    assert d["error.message"] == "[Errno 13] no CAP_NET_ADMIN"
    assert d["error.stack_trace"].startswith("Traceback (most recent call last):")
    check_event(d)


def test_exception_instance_as_exc_info(mk: Any) -> None:
    """exc_info=<exception> outside an except block still fills the error fields."""
    s = mk()
    s.log.error(Event.APPLY_FAILED, exc_info=TimeoutError("xtables lock"))
    [d] = s.lines()
    assert (d["error.type"], d["error.message"]) == ("TimeoutError", "xtables lock")


def test_unprintable_value_gives_an_error_line_not_an_exception(mk: Any) -> None:
    """A value whose str() raises never reaches the caller: an error line says what happened."""
    class Bad:
        def __str__(self) -> str:
            raise RuntimeError("no")

    s = mk()
    s.log.info(Event.SERVICE_UP, reason=Bad())
    [d] = s.lines()
    assert (d["message"], d["error.type"]) == ("log-render-failed", "RuntimeError")


def test_stdlib_records_become_the_same_json(mk: Any) -> None:
    """A record from another library's stdlib logger is an ECS line with its logger and origin."""
    s = mk()
    logging.getLogger("pyroute2.ndb").warning("netlink %s closed", "socket")
    [d] = s.lines()
    assert (d["message"], d["log.level"], d["log.logger"]) == (
        "netlink socket closed", "warning", "pyroute2.ndb")
    assert d["log.origin.file.name"] == "test_logpipeline.py"
    assert "event.action" not in d
    check_event(d)


def test_stdlib_exception_goes_into_error_fields(mk: Any) -> None:
    """logging.exception() in another library gives error.* fields, not a multi-line traceback."""
    s = mk()
    try:
        {}["missing"]
    except KeyError:
        logging.getLogger("somelib").exception("lookup failed")
    [d] = s.lines()
    assert d["error.type"] == "KeyError" and "Traceback" in d["error.stack_trace"]


def test_stdlib_record_with_bad_arguments_does_not_raise(mk: Any) -> None:
    """A stdlib record whose %-arguments do not match is reported as a line, never raised."""
    s = mk()
    # pytest's own capture handler re-raises formatting errors, so only ours may see this record.
    lib = logging.getLogger("somelib.isolated")
    lib.propagate = False
    lib.handlers = [h for h in logging.getLogger().handlers if type(h).__name__ == "_Intake"]
    try:
        lib.warning("%d items", "not a number")
    finally:
        lib.handlers = []
        lib.propagate = True
    [d] = s.lines()
    assert d["message"] == "log-render-failed" and d["error.type"] == "TypeError"


def test_structlog_get_logger_writes_to_the_pipeline(mk: Any) -> None:
    """Modules using structlog.get_logger() write through the configured chain."""
    s = mk()
    structlog.get_logger().info(Event.AGENT_START, version="0.1.0")
    [d] = s.lines()
    assert (d["event.action"], d["sslvpn_heartbeat.version"]) == ("agent-start", "0.1.0")


def test_level_filters_structlog_and_stdlib(mk: Any) -> None:
    """With level warning, info events from either API are not written."""
    s = mk(LogConfig(level="warning"))
    s.log.info(Event.SERVICE_UP)
    logging.getLogger("somelib").info("chatter")
    s.log.warning(Event.PROBE_FAILED)
    logging.getLogger("somelib").error("bad")
    assert [d["message"] for d in s.lines()] == ["probe-failed", "bad"]


def test_console_format_is_readable_text(mk: Any) -> None:
    """force_format="console" prints time, level, action and key=value, not JSON."""
    s = mk(force_format="console")
    s.log.info(Event.FIREWALL_BLOCK, trigger=Source.PIDFD, reason="process exited", latency_ms=1.5)
    line = s.text()
    assert line.startswith("13:10:00.123 info     firewall-block ")
    assert "trigger=pidfd" in line and 'event.reason="process exited"' in line
    assert "latency_ms=1.5" in line
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)


def test_console_format_keeps_the_file_json(mk: Any, tmp_path: Path) -> None:
    """The console format applies to the stream only; the file still gets ECS JSON."""
    path = tmp_path / "agent.log"
    s = mk(LogConfig(format="console", file=str(path)))
    s.log.info(Event.SERVICE_UP)
    assert not s.text().startswith("{")
    assert file_lines(path)[0]["event.action"] == "service-up"


def test_bad_format_or_level_is_a_value_error() -> None:
    """An unknown format or level is refused before anything is installed."""
    with pytest.raises(ValueError, match="format"):
        configure(LogConfig(), service_name="x", stream=io.StringIO(), force_format="xml")
    with pytest.raises(ValueError, match="level"):
        configure(LogConfig(level="loud"), service_name="x", stream=io.StringIO())


# ---------------------------------------------------------------------------- the catalogue

_LEVEL_METHODS = {"debug", "info", "warning", "error", "exception", "critical"}


def _code() -> Iterator[tuple[Path, ast.AST]]:
    for package in ("watcher", "rules"):
        for path in sorted((REPO / package).rglob("*.py")):
            yield path, ast.parse(path.read_text())


def _log_calls() -> Iterator[tuple[Path, ast.Call]]:
    """Every call of a log method whose first argument names the event in the code itself,
    and every ``Log(level, event, {fields})`` action of the control core, as the same call."""
    for path, tree in _code():
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in _LEVEL_METHODS and node.args
                    and _event_of(node.args[0]) is not None):
                yield path, node
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id == "Log" and len(node.args) >= 2
                    and _event_of(node.args[1]) is not None):
                fields = [ast.keyword(arg=None, value=a) for a in node.args[2:3]]
                yield path, ast.Call(func=node.func, args=[node.args[1]], keywords=fields,
                                     lineno=node.lineno, col_offset=node.col_offset)


def _event_of(node: ast.AST) -> str | None:
    """The event a log call's first argument names: a literal, or a member of Event."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and "-" in node.value:
        return node.value
    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
            and node.value.id == "Event"):
        return str(Event[node.attr])
    return None


def _keywords(call: ast.Call) -> list[str]:
    names = [k.arg for k in call.keywords if k.arg]
    for k in call.keywords:
        if k.arg is None and isinstance(k.value, ast.Dict):
            names += [key.value for key in k.value.keys if isinstance(key, ast.Constant)]
    return [n for n in names if n not in ("exc_info", "stack_info")]


def _named_in_code() -> set[str]:
    """Every event the code names: Event members, string literals, and names built from a
    literal prefix (``"service-initial-" + state``) count for every event with that prefix."""
    found: set[str] = set()
    for _path, tree in _code():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id == "Event" and node.attr in Event.__members__:
                found.add(str(Event[node.attr]))
            elif isinstance(node, ast.Constant) and node.value in set(Event):
                found.add(str(node.value))
            elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add) \
                    and isinstance(node.left, ast.Constant) and isinstance(node.left.value, str) \
                    and len(node.left.value) > 3 and node.left.value.endswith("-"):
                found |= {e for e in Event if e.startswith(node.left.value)}
    return found


def test_every_event_the_code_logs_is_in_the_catalogue() -> None:
    """Each event a log call in watcher/ or rules/ names is a member of Event."""
    logged = {(path.name, _event_of(call.args[0])) for path, call in _log_calls()}
    assert {name for _, name in logged} >= {"agent-start", "probe-failed", "apply-failed",
                                            "inotify-overflow", "admin-block"}
    assert {(f, name) for f, name in logged if name not in set(Event)} == set()


def test_every_catalogued_event_is_named_by_the_code_and_documented() -> None:
    """No member of Event is dead: the code names each one, and docs/events.md has its row."""
    doc = (REPO / "docs" / "events.md").read_text()
    assert set(Event) - _named_in_code() == set()
    assert {e for e in Event if f"`{e}`" not in doc} == set()
    assert f"**version {ECS_VERSION}**" in doc


def test_every_catalogued_event_has_valid_ecs_categorization(mk: Any) -> None:
    """Each member's category, type and outcome are values ECS 8.11 allows together."""
    for event in Event:
        assert event.category and event.outcome in ECS_OUTCOMES, event
        allowed = set().union(*(ECS_TYPES_BY_CATEGORY[c] for c in event.category))
        assert set(event.type) <= allowed, event


_SAMPLES = {"keyword": "x", "long": 3, "float": 1.5, "boolean": True}


def test_every_call_site_writes_ecs_clean_fields(mk: Any) -> None:
    """Each log call of the code, with the keywords it really passes (values of the documented
    type), gives a line whose every key is an ECS 8.11 field of its type or a documented own
    field: checked against the official ECS field list."""
    ecs, own = ecs_fields(), custom_fields()
    s = mk()
    calls = list(_log_calls())
    assert len(calls) > 30
    for path, call in calls:
        fields: dict[str, Any] = {}
        for key in _keywords(call):
            name = field_name(key)
            assert name in own or name in ecs, f"{path.name}:{call.lineno}: {key} -> {name}"
            kind = own.get(name) or ecs[name]
            fields[key] = _SAMPLES.get(kind, 7 if kind == "long" else "x")
        s.log.info(_event_of(call.args[0]), **fields)
    lines = s.lines()
    assert len(lines) == len(calls)
    for d in lines:
        check_event(d)


def test_the_logging_pipelines_own_events_are_ecs_clean(mk: Any, tmp_path: Path) -> None:
    """sink-failed and log-dropped, as the pipeline writes them, pass the ECS check."""
    path = tmp_path / "later" / "agent.log"
    s = mk(LogConfig(file=str(path)))
    s.log.info(Event.SERVICE_DOWN)
    assert s.logging.flush()
    path.parent.mkdir()
    s.log.info(Event.SERVICE_UP)
    assert s.actions() == ["service-down", "sink-failed", "service-up", "log-dropped"]
    for d in s.lines():
        check_event(d)


# ---------------------------------------------------------------------------- file sink


def test_file_sink_writes_the_same_lines(mk: Any, tmp_path: Path) -> None:
    """The file receives the same JSON lines as the stream, mode 0640."""
    path = tmp_path / "agent.log"
    s = mk(LogConfig(file=str(path)))
    s.log.info(Event.SERVICE_UP)
    logging.getLogger("lib").warning("w")
    lines = s.lines()
    assert file_lines(path) == lines and len(lines) == 2
    assert path.stat().st_mode & 0o777 == 0o640


def test_file_sink_refuses_a_symlink_at_the_path(mk: Any, tmp_path: Path) -> None:
    """A symlink planted at the log path is never written through (O_NOFOLLOW): sink-failed."""
    target = tmp_path / "elsewhere"
    target.write_text("")
    (tmp_path / "agent.log").symlink_to(target)
    s = mk(LogConfig(file=str(tmp_path / "agent.log")))
    s.log.info(Event.SERVICE_UP)
    assert s.actions() == ["service-up", "sink-failed"]
    assert s.lines()[1]["error.code"] == "ELOOP"
    assert target.read_text() == ""


def test_file_sink_follows_a_rename_without_a_signal(mk: Any, tmp_path: Path) -> None:
    """After a logrotate-style rename (create), the very next line goes to the new file."""
    path = tmp_path / "agent.log"
    s = mk(LogConfig(file=str(path)))
    s.log.info(Event.SERVICE_DOWN)
    s.log.info(Event.PROBE_FAILED)
    assert s.logging.flush()
    path.rename(tmp_path / "agent.log.1")
    path.write_text("")
    s.log.info(Event.SERVICE_UP)
    assert s.logging.flush()
    assert messages(tmp_path / "agent.log.1") == ["service-down", "probe-failed"]
    assert messages(path) == ["service-up"]


def test_file_sink_recreates_a_deleted_file_and_reopen_works(mk: Any, tmp_path: Path) -> None:
    """A deleted log file is created again; reopen() (SIGHUP) reopens before the next line."""
    path = tmp_path / "agent.log"
    s = mk(LogConfig(file=str(path)))
    s.log.info(Event.SERVICE_DOWN)
    assert s.logging.flush()
    path.unlink()
    s.log.info(Event.SERVICE_UP)
    assert s.logging.flush()
    assert messages(path) == ["service-up"]
    path.rename(tmp_path / "agent.log.1")
    s.logging.reopen()
    s.log.info(Event.AGENT_STOP)
    assert s.logging.flush()
    assert messages(path) == ["agent-stop"]


def test_unwritable_file_reports_once_then_counts_its_loss(mk: Any, tmp_path: Path) -> None:
    """A file that cannot be opened never raises: one sink-failed (ENOENT) on the stream; once
    it can be written, log-dropped says how many lines it lost, and the total counts them."""
    path = tmp_path / "no-such-dir" / "agent.log"
    s = mk(LogConfig(file=str(path)))
    for _ in range(3):
        s.log.info(Event.PROBE_FAILED)
    assert s.actions() == ["probe-failed", "sink-failed", "probe-failed", "probe-failed"]
    failed = s.lines()[1]
    assert (failed["log.level"], failed["error.code"]) == ("error", "ENOENT")
    assert (failed["sslvpn_heartbeat.sink"], failed["sslvpn_heartbeat.sink_target"]) == (
        "file", str(path))
    assert s.logging.dropped_total() == 4  # three events and the notice about itself
    path.parent.mkdir()
    s.log.info(Event.SERVICE_UP)
    dropped = s.lines()[-1]
    assert (dropped["event.action"], dropped["log.level"]) == ("log-dropped", "warning")
    assert (dropped["sslvpn_heartbeat.sink"], dropped["sslvpn_heartbeat.dropped"]) == ("file", 4)
    assert messages(path) == ["service-up", "log-dropped"]
    assert s.logging.dropped_total() == 4


def test_full_disk_is_counted_not_raised(mk: Any) -> None:
    """Writes failing with ENOSPC (/dev/full) are counted; sink-failed is written once."""
    s = mk(LogConfig(file="/dev/full"))
    for _ in range(3):
        s.log.info(Event.PROBE_FAILED)
    assert s.actions().count("sink-failed") == 1
    assert s.lines()[1]["error.code"] == "ENOSPC"
    assert s.logging.dropped_total() == 4


def test_a_line_cut_by_a_full_disk_is_ended_before_the_next(mk: Any, tmp_path: Path) -> None:
    """If the file ends inside a line (a write cut short), the next line starts on a new line."""
    path = tmp_path / "agent.log"
    path.write_text('{"message":"whole"}\n{"message":"cut sh')
    s = mk(LogConfig(file=str(path)))
    s.log.info(Event.SERVICE_UP)
    assert s.logging.flush()
    assert path.read_text().splitlines()[1:] == ['{"message":"cut sh', s.text().rstrip("\n")]


class BrokenStream(io.StringIO):
    """A stream whose writes fail like a closed pipe."""

    def write(self, s: str) -> int:
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")


def test_failing_stream_does_not_raise_and_the_file_hears_of_it(mk: Any, tmp_path: Path) -> None:
    """A broken stdout never raises into the caller; the file gets the event and sink-failed."""
    path = tmp_path / "agent.log"
    s = mk(LogConfig(file=str(path)), stream=BrokenStream())
    s.log.info(Event.SERVICE_DOWN)
    logging.getLogger("lib").error("still fine")
    assert s.logging.flush()
    assert messages(path) == ["service-down", "sink-failed", "still fine"]
    assert file_lines(path)[1]["error.code"] == "EPIPE"


# ---------------------------------------------------------------------------- the queue


class BlockingStream(io.StringIO):
    """A stream whose writes wait until ``release`` is set, like a pipe nobody reads."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.entered = threading.Event()

    def write(self, s: str) -> int:
        self.entered.set()
        self.release.wait(30)
        return super().write(s)


def test_a_blocked_sink_never_blocks_the_caller_and_drops_are_reported(mk: Any) -> None:
    """With the stream blocked, log calls return at once; lines beyond the queue are dropped and
    counted; once the stream drains, one log-dropped event says how many."""
    stream = BlockingStream()
    s = mk(stream=stream, queue_lines=8)
    s.log.info(Event.AGENT_START)
    assert stream.entered.wait(5)  # the writer holds the first line, blocked
    caller = threading.Thread(target=lambda: [s.log.info(Event.PROBE_FAILED, seq=i) for i in range(100)])
    caller.start()
    caller.join(10)  # a call that waited for the sink would wait for the release below
    assert not caller.is_alive() and not stream.release.is_set(), "a log call waited for the sink"
    assert s.logging.dropped_total() == 100 - 8
    stream.release.set()
    lines = s.lines()
    assert [d.get("sslvpn_heartbeat.seq") for d in lines if "sslvpn_heartbeat.seq" in d] == list(range(8))
    assert len(lines) == 10, [d["event.action"] for d in lines]
    [dropped] = [d for d in lines if d["event.action"] == "log-dropped"]
    assert (dropped["event.action"], dropped["sslvpn_heartbeat.sink"],
            dropped["sslvpn_heartbeat.dropped"]) == ("log-dropped", "queue", 92)
    s.log.info(Event.SERVICE_UP)
    assert s.actions()[-1] == "service-up" and s.logging.dropped_total() == 92


def test_close_is_bounded_when_a_sink_blocks_for_ever() -> None:
    """close() returns within about 2 s even when the stream never takes a line."""
    stream = BlockingStream()
    s = Setup(stream=stream)
    s.log.info(Event.AGENT_STOP)
    assert stream.entered.wait(5)
    t0 = time.monotonic()
    s.logging.close()
    took = time.monotonic() - t0
    stream.release.set()
    assert took < CLOSE_WITHIN_S + 1.0, took  # without the bound it would wait the stream's 30 s


def test_close_writes_what_is_queued(tmp_path: Path) -> None:
    """Lines logged just before close() are written by it."""
    path = tmp_path / "agent.log"
    s = Setup(LogConfig(file=str(path)))
    for i in range(50):
        s.log.info(Event.PROBE_FAILED, seq=i)
    s.logging.close()
    assert [d["sslvpn_heartbeat.seq"] for d in file_lines(path)] == list(range(50))


def test_close_detaches_from_stdlib_and_structlog() -> None:
    """After close(), stdlib records and structlog.get_logger() no longer reach the sinks."""
    s = Setup()
    s.logging.close()
    s.logging.close()  # idempotent
    logging.getLogger("lib").error("after close")
    assert s.stream.getvalue() == ""
    assert not any(type(h).__name__ == "_Intake" for h in logging.getLogger().handlers)


def test_configure_twice_keeps_one_root_handler() -> None:
    """A second configure() (reload) replaces the first's root handler; closing the old one
    then leaves the new one working, and closing both restores the original root level."""
    root = logging.getLogger()
    original = root.level
    first = Setup(LogConfig(level="debug"))
    second = Setup(LogConfig(level="info"))
    try:
        logging.getLogger("lib").warning("once")
        first.logging.close()
        logging.getLogger("lib").warning("twice")
        assert first.stream.getvalue() == ""
        assert [d["message"] for d in second.lines()] == ["once", "twice"]
    finally:
        first.logging.close()
        second.logging.close()
    assert root.level == original


# ---------------------------------------------------------------------------- syslog sink


def test_syslog_sink_sends_rfc5424_with_json_message(mk: Any, tmp_path: Path) -> None:
    """Each event is one datagram: RFC 5424 header (facility daemon) and the JSON line as MSG."""
    addr = str(tmp_path / "log.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind(addr)
        rx.settimeout(5)
        s = mk(LogConfig(syslog=True, syslog_address=addr))
        s.log.info(Event.FIREWALL_BLOCK, trigger="pidfd")
        s.log.error(Event.APPLY_FAILED)
        first, second = rx.recv(65536).decode(), rx.recv(65536).decode()
    m = re.fullmatch(r"<(\d+)>1 (\S+) (\S+) (\S+) (\d+) (\S+) - (\{.*\})", first)
    assert m is not None, first
    pri, ts, host, app, pid, msgid, msg = m.groups()
    assert int(pri) == 3 * 8 + 6
    assert (ts, host, app, int(pid), msgid) == (
        "2025-11-25T13:10:00.123Z", HOST, "sslvpn-heartbeat", os.getpid(), "firewall-block")
    assert json.loads(msg) == s.lines()[0]
    assert second.startswith("<27>1 ")  # daemon.err


def test_syslog_facility_from_the_config(mk: Any, tmp_path: Path) -> None:
    """syslog_facility local3 gives PRI 19*8+4 for a warning."""
    addr = str(tmp_path / "log.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind(addr)
        rx.settimeout(5)
        s = mk(LogConfig(syslog=True, syslog_address=addr, syslog_facility="local3"))
        s.log.warning(Event.IPV6_UNAVAILABLE)
        assert rx.recv(65536).startswith(b"<156>1 ")


def test_syslog_socket_absent_does_not_raise(mk: Any, tmp_path: Path) -> None:
    """With nothing at the syslog socket, events still reach the stream, with one sink-failed."""
    s = mk(LogConfig(syslog=True, syslog_address=str(tmp_path / "absent.sock")))
    s.log.info(Event.SERVICE_UP)
    s.log.info(Event.SERVICE_DOWN)
    assert s.actions() == ["service-up", "sink-failed", "service-down"]
    assert s.lines()[1]["sslvpn_heartbeat.sink"] == "syslog"
