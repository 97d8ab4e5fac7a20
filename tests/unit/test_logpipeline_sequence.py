"""watcher.outputs.logpipeline: event.sequence and event.id, and log-dropped naming the lost numbers."""

from __future__ import annotations

import io
import itertools
import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.ecs import check_event
from watcher.config import LogConfig
from watcher.core.catalogue import Event
from watcher.outputs.logpipeline import Gaps, Logging, configure

HEX128 = re.compile(r"^[0-9a-f]{32}$")


class GateStream(io.StringIO):
    """A stream whose writes wait while the gate is shut, like a stalled journald."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def write(self, s: str) -> int:
        self.entered.set()
        assert self.gate.wait(30), "the gate was never opened again"
        return super().write(s)


def pipeline(stream: TextIO, cfg: LogConfig | None = None, queue_lines: int = 1000) -> Logging:
    """A pipeline on ``stream`` with a fixed host name."""
    return configure(cfg or LogConfig(), service_name="novell-sslvpn", stream=stream,
                     hostname="vpn1.example", queue_lines=queue_lines)


def lines_of(logging_: Logging, stream: io.StringIO) -> list[dict[str, Any]]:
    """The stream's lines once everything queued was written."""
    assert logging_.flush(10)
    return [json.loads(x) for x in stream.getvalue().splitlines()]


@pytest.fixture
def closing() -> Iterator[list[Logging]]:
    """Pipelines appended here are closed after the test."""
    made: list[Logging] = []
    yield made
    for p in made:
        p.close()


def covered(lines: list[dict[str, Any]], sink: str) -> set[int]:
    """The numbers the log-dropped lines of ``sink`` name, checking their runs do not overlap."""
    out: set[int] = set()
    for d in lines:
        if d.get("event.action") == "log-dropped" and d["sslvpn_heartbeat.sink"] == sink:
            first, last = d["sslvpn_heartbeat.dropped_first"], d["sslvpn_heartbeat.dropped_last"]
            run = set(range(first, last + 1))
            assert d["sslvpn_heartbeat.dropped"] == len(run) and not run & out, d
            out |= run
    return out


# ---------------------------------------------------------------------------- numbering


def test_every_line_is_numbered_from_one_with_an_id_of_the_run(closing: list[Logging]) -> None:
    """structlog events and stdlib records alike: event.sequence 1, 2, 3..., event.id the run's
    128-bit entity id and the number, all ECS-clean."""
    import logging

    stream = io.StringIO()
    p = pipeline(stream)
    closing.append(p)
    log = p.logger()
    log.info(Event.AGENT_START)
    logging.getLogger("somelib").warning("chatter")
    log.info(Event.SERVICE_UP)
    lines = lines_of(p, stream)
    assert [d["event.sequence"] for d in lines] == [1, 2, 3]
    run = lines[0]["process.entity_id"]
    assert HEX128.match(run), run
    assert [d["event.id"] for d in lines] == [f"{run}-{n}" for n in (1, 2, 3)]
    assert {d["process.entity_id"] for d in lines} == {run}
    for d in lines:
        check_event(d)


def test_a_new_run_has_a_new_identity(closing: list[Logging]) -> None:
    """Two pipelines (two agent runs) number from 1 each, under different entity ids."""
    ids = []
    for _ in range(2):
        stream = io.StringIO()
        p = pipeline(stream)
        closing.append(p)
        p.logger().info(Event.AGENT_START)
        [d] = lines_of(p, stream)
        p.close()
        assert d["event.sequence"] == 1
        ids.append(d["event.id"])
    assert ids[0] != ids[1]


def test_agent_start_names_the_run_in_full(closing: list[Logging]) -> None:
    """agent-start carries the boot id and the start time beside the entity id; others do not."""
    stream = io.StringIO()
    p = pipeline(stream)
    closing.append(p)
    p.logger().info(Event.AGENT_START, port=8080)
    p.logger().info(Event.SERVICE_UP)
    start, up = lines_of(p, stream)
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert start["host.boot.id"] == boot
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", start["process.start"]), start
    assert "host.boot.id" not in up and "process.start" not in up
    check_event(start)


def test_lines_below_the_level_take_no_number(closing: list[Logging]) -> None:
    """A debug line filtered out by level info is never built: no gap in the numbers."""
    stream = io.StringIO()
    p = pipeline(stream, LogConfig(level="info"))
    closing.append(p)
    log = p.logger()
    log.info(Event.SERVICE_UP)
    log.debug(Event.PROBE_FAILED)
    log.info(Event.SERVICE_DOWN)
    assert [d["event.sequence"] for d in lines_of(p, stream)] == [1, 2]


def test_a_line_that_fails_to_render_keeps_its_number(closing: list[Logging]) -> None:
    """A value that cannot be rendered gives an error line with the number it was given."""
    stream = io.StringIO()
    p = pipeline(stream)
    closing.append(p)
    loop: list[Any] = []
    loop.append(loop)
    p.logger().info(Event.SERVICE_UP)
    p.logger().info(Event.SERVICE_DOWN, detail=loop)
    p.logger().info(Event.SERVICE_UP)
    lines = lines_of(p, stream)
    assert [d["event.sequence"] for d in lines] == [1, 2, 3]
    assert lines[1]["message"] == "log-render-failed"
    assert lines[1]["event.id"].endswith("-2")


# ---------------------------------------------------------------------------- drops name their numbers


def test_a_stalled_sink_drops_and_log_dropped_names_the_run(closing: list[Logging]) -> None:
    """With the stream stalled, lines beyond the queue are dropped; log-dropped (queue) names
    exactly the missing numbers, and every other number is written."""
    stream = GateStream()
    p = pipeline(stream, queue_lines=8)
    closing.append(p)
    log = p.logger()
    stream.gate.clear()
    log.info(Event.AGENT_START)
    assert stream.entered.wait(5)  # the writer holds line 1
    for _ in range(50):
        log.info(Event.PROBE_FAILED)
    stream.gate.set()
    assert p.flush()
    log.info(Event.SERVICE_UP)
    lines = lines_of(p, stream)
    written = {d["event.sequence"] for d in lines}
    dropped = covered(lines, "queue")
    assert dropped == set(range(10, 52))  # 1 in the writer's hands, 2..9 queued, the rest dropped
    assert written | dropped == set(range(1, max(written) + 1)) and not written & dropped
    assert p.dropped_total() == len(dropped)


def test_a_failing_sink_names_the_numbers_it_lost(closing: list[Logging], tmp_path: Path) -> None:
    """A file sink that cannot be written: once it works, log-dropped (file) names exactly the
    numbers the file lacks, the sink-failed notice among them."""
    path = tmp_path / "later" / "agent.log"
    stream = io.StringIO()
    p = pipeline(stream, LogConfig(file=str(path)))
    closing.append(p)
    log = p.logger()
    for _ in range(3):
        log.info(Event.PROBE_FAILED)
    assert p.flush()
    path.parent.mkdir()
    log.info(Event.SERVICE_UP)
    lines = lines_of(p, stream)
    in_file = {json.loads(x)["event.sequence"] for x in path.read_text().splitlines()}
    lost = covered(lines, "file")
    assert lost == {1, 2, 3, 4}  # three events and the sink-failed notice
    assert in_file | lost == {d["event.sequence"] for d in lines} and not in_file & lost


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 12)), min_size=1, max_size=8))
def test_any_interleaving_of_drops_is_named_exactly(steps: list[tuple[bool, int]]) -> None:
    """Bursts of lines with the sink stalled or flowing, in any order: the log-dropped runs
    cover exactly the numbers missing from the output, and nothing written is among them."""
    stream = GateStream()
    p = pipeline(stream, queue_lines=3)
    try:
        log = p.logger()
        for stalled, n in steps:
            if stalled:
                stream.entered.clear()
                stream.gate.clear()
                log.info(Event.PROBE_FAILED)
                assert stream.entered.wait(5)  # the writer is stuck in a write
            for _ in range(n):
                log.info(Event.PROBE_FAILED)
            stream.gate.set()
            assert p.flush(10)
        log.info(Event.SERVICE_UP)  # written with the queue empty: pending drops are reported
        lines = lines_of(p, stream)
    finally:
        stream.gate.set()
        p.close()
    written = [d["event.sequence"] for d in lines]
    assert len(written) == len(set(written))
    dropped = covered(lines, "queue")
    assert set(written) | dropped == set(range(1, max(written) + 1))
    assert not set(written) & dropped
    assert p.dropped_total() == len(dropped)


@given(st.lists(st.integers(1, 200), unique=True))
def test_gaps_keep_exact_runs_whatever_the_order(lost: list[int]) -> None:
    """Numbers added in any order come back as sorted, disjoint, non-touching runs covering
    exactly them."""
    gaps = Gaps()
    for n in lost:
        gaps.add(n)
    assert gaps.count == len(lost)
    runs = gaps.take()
    assert {n for a, b in runs for n in range(a, b + 1)} == set(lost)
    assert all(a <= b for a, b in runs)
    assert all(b1 + 1 < a2 for (_, b1), (a2, _) in itertools.pairwise(runs))
    assert gaps.take() == [] and gaps.count == 0


# ---------------------------------------------------------------------------- one path to the SIEM


def test_under_the_journal_the_syslog_sink_is_skipped(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """When JOURNAL_STREAM names the stream, [log] syslog = true opens no syslog sink (each event
    would reach the journal and rsyslog twice): sink-skipped says so, the socket gets nothing."""
    import os
    import socket

    addr = str(tmp_path / "dev-log")
    r, w = os.pipe()
    st = os.fstat(w)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    stream = os.fdopen(w, "w", closefd=False)  # the stream sink writes to the descriptor
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind(addr)
        rx.setblocking(False)
        p = pipeline(stream, LogConfig(syslog=True, syslog_address=addr))
        p.logger().info(Event.SERVICE_UP)
        assert p.flush()
        p.close()
        os.close(w)
        with os.fdopen(r, "rb") as out:
            lines = [json.loads(x[3:]) for x in out.read().decode().splitlines()]
        with pytest.raises(BlockingIOError):
            rx.recv(65536)
    skipped, up = lines
    assert (skipped["event.action"], skipped["log.level"]) == ("sink-skipped", "warning")
    assert (skipped["sslvpn_heartbeat.sink"], skipped["sslvpn_heartbeat.sink_target"]) == ("syslog", addr)
    assert [d["event.sequence"] for d in lines] == [1, 2] and up["event.action"] == "service-up"
    check_event(skipped)


def test_without_the_journal_the_syslog_sink_is_used(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Without JOURNAL_STREAM (init script, terminal) the syslog sink sends every event."""
    import socket

    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    addr = str(tmp_path / "dev-log")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind(addr)
        rx.settimeout(5)
        stream = io.StringIO()
        p = pipeline(stream, LogConfig(syslog=True, syslog_address=addr))
        try:
            p.logger().info(Event.SERVICE_UP)
            data = rx.recv(65536).decode()
        finally:
            p.close()
    assert json.loads(data[data.index(" - {") + 3:])["event.sequence"] == 1
    assert "sink-skipped" not in stream.getvalue()
