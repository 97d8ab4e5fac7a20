"""watcher.logsetup: ECS fields, stdlib records, exceptions, console mode and failing sinks."""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from watcher.config import LogConfig
from watcher.events import Source
from watcher.logsetup import ACTIONS, ECS_VERSION, Logging, configure

T0 = 1_764_076_200.123456  # 2025-11-25T13:10:00.123456Z
HOST = "vpn1.example"

# The allowed values of ECS 8.11 categorization fields, and category -> expected types.
ECS_KINDS = {"alert", "asset", "enrichment", "event", "metric", "state", "pipeline_error", "signal"}
ECS_OUTCOMES = {"failure", "success", "unknown"}
ECS_TYPES_BY_CATEGORY = {
    "configuration": {"access", "change", "creation", "deletion", "info"},
    "file": {"access", "change", "creation", "deletion", "info"},
    "host": {"access", "change", "end", "info", "start"},
    "network": {"access", "allowed", "connection", "denied", "end", "info", "protocol", "start"},
    "process": {"access", "change", "end", "info", "start"},
}
BRIEF_ACTIONS = [
    "service-down", "service-up", "firewall-block", "firewall-unblock", "firewall-drain",
    "firewall-repair", "probe-failed", "admin-block", "admin-unblock", "agent-start",
    "agent-ready", "agent-stop", "config-reload", "config-invalid", "apply-retry",
    "apply-failed", "proc-connector-unavailable", "proc-connector-overrun", "ipv6-unavailable",
    "sink-failed",
]


class Clock:
    """A hand-driven clock, for both the wall time and the monotonic time."""

    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Setup:
    """A configured pipeline writing to a StringIO, with hand-driven clocks."""

    def __init__(self, cfg: LogConfig | None = None, **kw: Any) -> None:
        self.stream = io.StringIO()
        self.wall = Clock(T0)
        self.mono = Clock(100.0)
        kw.setdefault("stream", self.stream)
        self.logging: Logging = configure(
            cfg or LogConfig(), service_name="novell-sslvpn", clock=self.wall,
            monotonic=self.mono, hostname=HOST, **kw)
        self.log = self.logging.logger()

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stream.getvalue().splitlines()]

    def actions(self) -> list[str]:
        return [d.get("event.action", "") for d in self.lines()]


@pytest.fixture
def made() -> Iterator[list[Setup]]:
    """Every Setup a test makes is closed afterwards, so the root logger is left clean."""
    setups: list[Setup] = []
    yield setups
    for s in setups:
        s.logging.close()


@pytest.fixture
def mk(made: list[Setup]) -> Any:
    def make(cfg: LogConfig | None = None, **kw: Any) -> Setup:
        s = Setup(cfg, **kw)
        made.append(s)
        return s

    return make


def file_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_event_line_has_every_ecs_field_typed(mk: Any) -> None:
    """A firewall-block event is one JSON object with every contract field, typed as ECS says."""
    s = mk()
    s.log.info("firewall-block", trigger=Source.PIDFD, reason="process 4242 exited",
               latency_ns=1_234_567, rule_count=1)
    [d] = s.lines()
    assert d["@timestamp"] == "2025-11-25T13:10:00.123Z"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", d["@timestamp"])
    assert d["log.level"] == "info"
    assert d["message"] == "firewall-block"
    assert d["ecs.version"] == ECS_VERSION
    assert d["event.action"] == "firewall-block"
    assert d["event.reason"] == "process 4242 exited"
    assert d["trigger"] == "pidfd"
    assert d["service.name"] == "novell-sslvpn"
    assert d["host.hostname"] == HOST
    assert d["process.pid"] == os.getpid()
    assert d["event.duration"] == 1_234_567 and isinstance(d["event.duration"], int)
    assert d["latency_ms"] == pytest.approx(1.235)
    assert d["event.kind"] == "event"
    assert d["event.category"] == ["configuration", "network"]
    assert d["event.type"] == ["change", "denied"]
    assert d["event.outcome"] == "success"
    assert d["rule_count"] == 1
    assert list(d)[:3] == ["@timestamp", "log.level", "message"]


def test_latency_ms_alone_gives_duration_in_nanoseconds(mk: Any) -> None:
    """latency_ms=2.5 is written as event.duration 2500000 ns and kept as latency_ms."""
    s = mk()
    s.log.info("service-up", latency_ms=2.5)
    [d] = s.lines()
    assert d["event.duration"] == 2_500_000
    assert d["latency_ms"] == 2.5


def test_explicit_event_duration_beats_rounded_latency_ms(mk: Any) -> None:
    """event.duration given in ns is kept exactly even when a rounded latency_ms comes along."""
    s = mk()
    s.log.info("firewall-block", latency_ms=1.235, **{"event.duration": 1_234_567})
    [d] = s.lines()
    assert (d["event.duration"], d["latency_ms"]) == (1_234_567, pytest.approx(1.235))


def test_every_known_action_has_valid_ecs_categorization(mk: Any) -> None:
    """Each action the brief names is in the table, with ECS-allowed kind/category/type/outcome."""
    assert set(BRIEF_ACTIONS) <= set(ACTIONS)
    s = mk()
    for action in ACTIONS:
        s.log.warning(action)
    for d in s.lines():
        assert d["event.kind"] in ECS_KINDS
        assert d["event.outcome"] in ECS_OUTCOMES
        allowed = set().union(*(ECS_TYPES_BY_CATEGORY[c] for c in d["event.category"]))
        assert set(d["event.type"]) <= allowed, d
    assert s.actions() == list(ACTIONS)


def test_unknown_action_is_an_event_without_categories(mk: Any) -> None:
    """An action outside the table still gets event.action and kind, but no guessed category."""
    s = mk()
    s.log.info("something-new")
    [d] = s.lines()
    assert d["event.action"] == "something-new" and d["event.kind"] == "event"
    assert "event.category" not in d and "event.outcome" not in d


def test_message_keyword_replaces_message_not_action(mk: Any) -> None:
    """message= sets the human text while event.action stays the event name."""
    s = mk()
    s.log.info("admin-block", message="maintenance window")
    [d] = s.lines()
    assert (d["message"], d["event.action"]) == ("maintenance window", "admin-block")


def test_bound_and_context_values_appear(mk: Any) -> None:
    """Values bound with logger(**bind) and structlog contextvars are written with the event."""
    s = mk()
    structlog.contextvars.bind_contextvars(run_id="r1")
    try:
        s.logging.logger(component="probe").info("probe-failed", check="listen")
    finally:
        structlog.contextvars.clear_contextvars()
    [d] = s.lines()
    assert (d["component"], d["run_id"], d["check"]) == ("probe", "r1", "listen")


def test_newlines_in_values_stay_on_one_line(mk: Any) -> None:
    """A value with newlines is escaped inside the JSON: the stream gets exactly one line."""
    s = mk()
    s.log.info("config-invalid", reason="one\ntwo\rthree\u2028four\x85five\u2029")
    assert len(s.stream.getvalue().splitlines()) == 1
    assert s.lines()[0]["event.reason"] == "one\ntwo\rthree\u2028four\x85five\u2029"


def test_structlog_exception_goes_into_error_fields(mk: Any) -> None:
    """log.exception() writes error.type/.message/.stack_trace in the same single line."""
    s = mk()
    try:
        raise PermissionError(errno.EACCES, "no CAP_NET_ADMIN")
    except PermissionError:
        s.log.exception("apply-failed", reason="iptables-restore failed")
    assert len(s.stream.getvalue().splitlines()) == 1
    [d] = s.lines()
    assert d["log.level"] == "error"
    assert d["error.type"] == "PermissionError"
    assert d["error.message"] == "[Errno 13] no CAP_NET_ADMIN"
    assert d["error.stack_trace"].startswith("Traceback (most recent call last):")
    assert "no CAP_NET_ADMIN" in d["error.stack_trace"]


def test_exception_instance_as_exc_info(mk: Any) -> None:
    """exc_info=<exception> outside an except block still fills the error fields."""
    s = mk()
    s.log.error("apply-retry", exc_info=TimeoutError("xtables lock"))
    [d] = s.lines()
    assert (d["error.type"], d["error.message"]) == ("TimeoutError", "xtables lock")


def test_stdlib_records_become_the_same_json(mk: Any) -> None:
    """A record from another library's stdlib logger is an ECS line with its logger and origin."""
    s = mk()
    logging.getLogger("pyroute2.ndb").warning("netlink %s closed", "socket")
    [d] = s.lines()
    assert d["message"] == "netlink socket closed"
    assert d["log.level"] == "warning"
    assert d["log.logger"] == "pyroute2.ndb"
    assert d["log.origin.file.name"] == "test_logsetup.py"
    assert isinstance(d["log.origin.file.line"], int)
    assert d["service.name"] == "novell-sslvpn" and d["ecs.version"] == ECS_VERSION
    assert "event.action" not in d
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", d["@timestamp"])


def test_stdlib_exception_goes_into_error_fields(mk: Any) -> None:
    """logging.exception() in another library gives error.* fields, not a multi-line traceback."""
    s = mk()
    try:
        {}["missing"]
    except KeyError:
        logging.getLogger("somelib").exception("lookup failed")
    assert len(s.stream.getvalue().splitlines()) == 1
    [d] = s.lines()
    assert d["error.type"] == "KeyError" and "Traceback" in d["error.stack_trace"]


def test_stdlib_record_with_bad_arguments_does_not_raise(mk: Any) -> None:
    """A stdlib record whose %-arguments do not match is reported as a line, never raised."""
    s = mk()
    # pytest's own capture handler re-raises formatting errors, so only ours may see this record.
    lib = logging.getLogger("somelib.isolated")
    lib.propagate = False
    lib.handlers = [h for h in logging.getLogger().handlers if type(h).__name__ == "_RootHandler"]
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
    structlog.get_logger().info("agent-start", version="0.1.0")
    [d] = s.lines()
    assert (d["event.action"], d["version"]) == ("agent-start", "0.1.0")


def test_level_filters_structlog_and_stdlib(mk: Any) -> None:
    """With level warning, info events from either API are not written."""
    s = mk(LogConfig(level="warning"))
    s.log.info("service-up")
    logging.getLogger("somelib").info("chatter")
    s.log.warning("probe-failed")
    logging.getLogger("somelib").error("bad")
    assert [d["message"] for d in s.lines()] == ["probe-failed", "bad"]


def test_console_format_is_readable_text(mk: Any) -> None:
    """force_format="console" prints time, level, action and key=value, not JSON."""
    s = mk(force_format="console")
    s.log.info("firewall-block", trigger=Source.PIDFD, reason="process exited", latency_ms=1.5)
    line = s.stream.getvalue()
    assert line.startswith("13:10:00.123 info ")
    assert "firewall-block" in line and "trigger=pidfd" in line
    assert 'event.reason="process exited"' in line and "latency_ms=1.5" in line
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)


def test_console_format_from_config_and_json_override(mk: Any) -> None:
    """format = "console" in the config gives text; force_format="json" overrides it."""
    text = mk(LogConfig(format="console"))
    text.log.info("service-up")
    assert not text.stream.getvalue().startswith("{")
    forced = mk(LogConfig(format="console"), force_format="json")
    forced.log.info("service-up")
    assert forced.lines()[0]["event.action"] == "service-up"


def test_console_format_keeps_the_file_json(mk: Any, tmp_path: Path) -> None:
    """The console format applies to the stream only; the file sink still gets ECS JSON."""
    path = tmp_path / "agent.log"
    s = mk(LogConfig(file=str(path)), force_format="console")
    s.log.info("service-up")
    assert not s.stream.getvalue().startswith("{")
    assert file_lines(path)[0]["event.action"] == "service-up"


def test_bad_format_or_level_is_a_value_error() -> None:
    """An unknown format or level is refused before anything is installed."""
    with pytest.raises(ValueError, match="format"):
        configure(LogConfig(), service_name="x", stream=io.StringIO(), force_format="xml")
    with pytest.raises(ValueError, match="level"):
        configure(LogConfig(level="loud"), service_name="x", stream=io.StringIO())


def test_file_sink_writes_the_same_lines(mk: Any, tmp_path: Path) -> None:
    """The file sink receives the same JSON lines as the stream, mode 0640."""
    path = tmp_path / "agent.log"
    s = mk(LogConfig(file=str(path)))
    s.log.info("service-up")
    logging.getLogger("lib").warning("w")
    assert file_lines(path) == s.lines()
    assert path.stat().st_mode & 0o777 == 0o640


def test_file_sink_follows_a_rename_after_reopen(mk: Any, tmp_path: Path) -> None:
    """After a logrotate-style rename and reopen(), new lines go to a new file at the path."""
    path = tmp_path / "agent.log"
    s = mk(LogConfig(file=str(path)))
    s.log.info("service-down")
    path.rename(tmp_path / "agent.log.1")
    s.logging.reopen()
    s.log.info("service-up")
    assert [d["message"] for d in file_lines(tmp_path / "agent.log.1")] == ["service-down"]
    assert [d["message"] for d in file_lines(path)] == ["service-up"]


def test_file_sink_notices_a_rename_within_a_second(mk: Any, tmp_path: Path) -> None:
    """Without reopen(), the sink compares inode/device at most once a second and follows."""
    path = tmp_path / "agent.log"
    s = mk(LogConfig(file=str(path)))
    s.log.info("service-down")
    path.rename(tmp_path / "agent.log.1")
    path.write_text("")  # logrotate's "create"
    s.mono.t += 0.5
    s.log.info("probe-failed")  # not checked yet: still the old file
    s.mono.t += 0.6
    s.log.info("service-up")
    assert [d["message"] for d in file_lines(tmp_path / "agent.log.1")] == [
        "service-down", "probe-failed"]
    assert [d["message"] for d in file_lines(path)] == ["service-up"]


def test_file_sink_recreates_a_deleted_file(mk: Any, tmp_path: Path) -> None:
    """A deleted log file is created again at the next check."""
    path = tmp_path / "agent.log"
    s = mk(LogConfig(file=str(path)))
    s.log.info("service-down")
    path.unlink()
    s.mono.t += 1.0
    s.log.info("service-up")
    assert [d["message"] for d in file_lines(path)] == ["service-up"]


def test_unwritable_file_sink_does_not_raise(mk: Any, tmp_path: Path) -> None:
    """A file sink that cannot open never raises; the stream gets the event and one sink-failed."""
    path = tmp_path / "no-such-dir" / "agent.log"
    s = mk(LogConfig(file=str(path)))
    s.log.info("service-down")
    s.log.info("service-up")
    assert s.actions() == ["service-down", "sink-failed", "service-up"]
    failed = s.lines()[1]
    assert failed["log.level"] == "error"
    assert (failed["sink.name"], failed["sink.target"]) == ("file", str(path))
    assert failed["error.code"] == "ENOENT"
    st = s.logging.stats()["file"]
    assert (st.healthy, st.failures, st.written) == (False, 1, 0)
    assert st.dropped == 3  # both events and the notice about itself
    assert s.logging.failures == 1


def test_full_disk_is_counted_not_raised(mk: Any) -> None:
    """Writes failing with ENOSPC (/dev/full) are counted; sink-failed is logged once."""
    s = mk(LogConfig(file="/dev/full"))
    for _ in range(3):
        s.log.info("probe-failed")
        s.mono.t += 0.4
    assert s.actions().count("sink-failed") == 1
    assert s.lines()[1]["error.code"] == "ENOSPC"
    assert s.logging.stats()["file"].failures >= 1


def test_failed_sink_is_retried_with_backoff_and_recovery_logged(mk: Any, tmp_path: Path) -> None:
    """A failed sink is skipped for a second, then retried; recovery reports the lines lost."""
    path = tmp_path / "later" / "agent.log"
    s = mk(LogConfig(file=str(path)))
    s.log.info("service-down")  # fails: directory missing
    path.parent.mkdir()
    s.log.info("probe-failed")  # within the back-off: dropped, not retried
    assert not path.exists()
    s.mono.t += 1.0
    s.log.info("service-up")
    assert s.actions() == ["service-down", "sink-failed", "probe-failed", "service-up",
                           "sink-recovered"]
    assert s.lines()[-1]["sink.dropped"] == 3
    assert [d["message"] for d in file_lines(path)] == ["service-up", "sink-recovered"]
    assert s.logging.stats()["file"].healthy


def test_reopen_retries_a_failed_sink_at_once(mk: Any, tmp_path: Path) -> None:
    """reopen() (SIGHUP) retries a failed file sink without waiting for the back-off."""
    path = tmp_path / "later" / "agent.log"
    s = mk(LogConfig(file=str(path)))
    s.log.info("service-down")
    path.parent.mkdir()
    s.logging.reopen()
    s.log.info("service-up")
    assert file_lines(path)[0]["message"] == "service-up"


class BrokenStream(io.StringIO):
    """A stream whose writes fail like a closed pipe."""

    def write(self, s: str) -> int:
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")


def test_failing_stream_does_not_raise_and_file_hears_of_it(mk: Any, tmp_path: Path) -> None:
    """A broken stdout never raises into the caller; the file sink gets the event and sink-failed."""
    path = tmp_path / "agent.log"
    s = mk(LogConfig(file=str(path)), stream=BrokenStream())
    s.log.info("service-down")
    logging.getLogger("lib").error("still fine")
    msgs = [d["message"] for d in file_lines(path)]
    assert msgs == ["service-down", "sink-failed", "still fine"]
    assert file_lines(path)[1]["error.code"] == "EPIPE"


class InterruptingStream(io.StringIO):
    """A stream that, on its first write, runs a callback the way a signal handler would."""

    def __init__(self) -> None:
        super().__init__()
        self.callback: Any = None

    def write(self, s: str) -> int:
        callback, self.callback = self.callback, None
        if callback is not None:
            callback()
        return super().write(s)


def test_logging_and_reopen_from_inside_a_write_do_not_deadlock(mk: Any, tmp_path: Path) -> None:
    """A handler that logs and calls reopen() while a line is being written neither hangs nor
    loses a line; the reopen waits for the write to finish and applies at the next event."""
    path = tmp_path / "agent.log"
    stream = InterruptingStream()
    s = mk(LogConfig(file=str(path)), stream=stream)

    def handler() -> None:
        path.rename(tmp_path / "agent.log.1")
        s.logging.reopen()
        s.log.warning("agent-stop", reason="signal")

    s.log.info("agent-start")  # the file exists from here on
    stream.callback = handler
    worker = threading.Thread(target=s.log.info, args=("service-down",), daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive(), "deadlock: emit() re-entered from a handler"
    s.log.info("service-up")
    lines = [json.loads(x)["message"] for x in stream.getvalue().splitlines()]
    assert sorted(lines) == ["agent-start", "agent-stop", "service-down", "service-up"]
    assert sorted(messages(tmp_path / "agent.log.1")) == ["agent-start", "agent-stop",
                                                          "service-down"]
    assert messages(path) == ["service-up"]


def messages(path: Path) -> list[str]:
    return [d["message"] for d in file_lines(path)]


def test_syslog_sink_sends_rfc5424_with_json_message(mk: Any, tmp_path: Path) -> None:
    """Each event is one datagram: RFC 5424 header (facility daemon) and the JSON line as MSG."""
    addr = str(tmp_path / "log.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind(addr)
        rx.settimeout(5)
        s = mk(LogConfig(syslog=True), syslog_address=addr)
        s.log.info("firewall-block", trigger="pidfd")
        s.log.error("apply-failed")
        first, second = rx.recv(65536).decode(), rx.recv(65536).decode()
    m = re.fullmatch(r"<(\d+)>1 (\S+) (\S+) (\S+) (\d+) (\S+) - (\{.*\})", first)
    assert m is not None, first
    pri, ts, host, app, pid, msgid, msg = m.groups()
    assert int(pri) == 3 * 8 + 6
    assert (ts, host, app, int(pid), msgid) == (
        "2025-11-25T13:10:00.123Z", HOST, "sslvpn-heartbeat", os.getpid(), "firewall-block")
    assert json.loads(msg) == s.lines()[0]
    assert second.startswith("<27>1 ")  # daemon.err


def test_syslog_collector_down_does_not_raise(mk: Any, tmp_path: Path) -> None:
    """With nothing listening on the syslog socket, events still reach the stream."""
    s = mk(LogConfig(syslog=True), syslog_address=str(tmp_path / "absent.sock"))
    s.log.info("service-up")
    assert s.actions() == ["service-up", "sink-failed"]
    assert s.lines()[1]["sink.name"] == "syslog"
    assert s.logging.stats()["syslog"].failures == 1


def test_close_detaches_from_stdlib_and_structlog(tmp_path: Path) -> None:
    """After close(), stdlib records and structlog.get_logger() no longer reach the sinks."""
    s = Setup()
    s.logging.close()
    s.logging.close()  # idempotent
    logging.getLogger("lib").error("after close")
    assert s.stream.getvalue() == ""
    assert structlog.get_config()["logger_factory"] is not None
    assert not any(type(h).__name__ == "_RootHandler" for h in logging.getLogger().handlers)


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


_REPO = Path(__file__).resolve().parents[2]
_LOG_CALL = re.compile(r"""\.(?:debug|info|warning|error|exception|critical)\(\s*["']([a-z0-9-]+)["']""")
# Actions logged through a variable (health transitions, the firewall mode table) and the
# logging pipeline's own notices about its sinks.
_INDIRECT = {"sink-failed", "sink-recovered", "service-up", "service-down", "service-initial-up",
             "service-initial-down",
             "firewall-block", "firewall-unblock", "firewall-drain", "admin-block",
             "admin-unblock"}


def _logged_actions() -> set[str]:
    found = set(_INDIRECT)
    for package in ("watcher", "rules"):
        for path in (_REPO / package).rglob("*.py"):
            found |= set(_LOG_CALL.findall(path.read_text()))
    return found


def test_every_logged_action_is_categorized_and_documented() -> None:
    """Each event.action the code logs has ECS categories and a row in docs/events.md."""
    doc = (_REPO / "docs" / "events.md").read_text()
    logged = _logged_actions()
    assert {"agent-start", "probe-failed", "apply-failed", "inotify-overflow"} <= logged
    assert logged - set(ACTIONS) == set()
    assert {a for a in ACTIONS if f"`{a}`" not in doc} == set()
    assert f"**version {ECS_VERSION}**" in doc


def test_every_catalogued_action_is_still_logged() -> None:
    """No row of the catalogue describes an event the code no longer logs."""
    assert set(ACTIONS) - _logged_actions() == set()
