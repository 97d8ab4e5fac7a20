"""Log sinks against the real thing: logrotate, a syslog socket that goes or stalls, pipes.

A pipe nobody reads is what a stalled journald looks like from the agent; journald's own wire
format (the priority prefix on a stream that JOURNAL_STREAM names) is read back from a pipe.
"""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.netns import wait_for
from watcher.config import LogConfig
from watcher.core.catalogue import Event
from watcher.outputs.logpipeline import Logging, configure

LOGROTATE = shutil.which("logrotate") or (
    "/usr/sbin/logrotate" if os.path.exists("/usr/sbin/logrotate") else None)
needs_logrotate = pytest.mark.skipif(LOGROTATE is None, reason="logrotate is not installed")


def messages(path: Path) -> list[str]:
    """The message of every line of a JSON log file (each line must parse)."""
    return [json.loads(line)["message"] for line in path.read_text().splitlines()]


def rotate(tmp_path: Path, log: Path, directives: str) -> None:
    """Force one logrotate run over ``log`` with its own state file."""
    conf = tmp_path / "logrotate.conf"
    conf.write_text(f"{log} {{\n{textwrap.indent(directives, '    ')}\n}}\n")
    subprocess.run([LOGROTATE or "logrotate", "-f", "-s", str(tmp_path / "state"), str(conf)],
                   check=True, capture_output=True, timeout=30)


@pytest.fixture
def pipeline(tmp_path: Path) -> Iterator[tuple[Logging, Path, io.StringIO]]:
    """A JSON pipeline writing to a StringIO and to tmp_path/agent.log, closed afterwards."""
    log = tmp_path / "agent.log"
    stream = io.StringIO()
    lg = configure(LogConfig(file=str(log)), service_name="novell-sslvpn", stream=stream)
    try:
        yield lg, log, stream
    finally:
        lg.close()


@needs_logrotate
def test_logrotate_create_then_reopen(
    tmp_path: Path, pipeline: tuple[Logging, Path, io.StringIO]
) -> None:
    """After logrotate renames the file and creates a new one, reopen() writes to the new one."""
    lg, log, _ = pipeline
    log_ = lg.logger()
    for action in ("agent-start", "service-up"):
        log_.info(action)
    assert lg.flush()
    rotate(tmp_path, log, "rotate 3\ncreate 0640\nmissingok")
    assert log.stat().st_size == 0
    lg.reopen()
    log_.info("service-down")
    assert lg.flush()
    assert messages(tmp_path / "agent.log.1") == ["agent-start", "service-up"]
    assert messages(log) == ["service-down"]


@needs_logrotate
def test_logrotate_without_signal_is_followed_at_the_next_line(
    tmp_path: Path, pipeline: tuple[Logging, Path, io.StringIO]
) -> None:
    """Without reopen(), the sink notices the rotation by itself: the next line is in the new file."""
    lg, log, _ = pipeline
    log_ = lg.logger()
    log_.info("agent-start")
    assert lg.flush()
    rotate(tmp_path, log, "rotate 3\ncreate 0640")
    log_.info("probe-failed")
    assert lg.flush()
    assert messages(tmp_path / "agent.log.1") == ["agent-start"]
    assert messages(log) == ["probe-failed"]
    assert lg.dropped_total() == 0


@needs_logrotate
def test_logrotate_copytruncate_leaves_no_hole(
    tmp_path: Path, pipeline: tuple[Logging, Path, io.StringIO]
) -> None:
    """With copytruncate the append-mode descriptor writes at the new end: no NUL bytes, no gap."""
    lg, log, _ = pipeline
    log_ = lg.logger()
    for _ in range(50):
        log_.info("probe-failed", reason="x" * 200)
    assert lg.flush()
    rotate(tmp_path, log, "rotate 3\ncopytruncate")
    log_.info("service-up")
    assert lg.flush()
    assert b"\0" not in log.read_bytes()
    assert messages(log) == ["service-up"]
    assert len(messages(tmp_path / "agent.log.1")) == 50


CHILD = """
import signal, sys
from watcher.config import LogConfig
from watcher.outputs.logpipeline import configure
lg = configure(LogConfig(file=sys.argv[1]), service_name="novell-sslvpn", stream=sys.stderr)
signal.signal(signal.SIGHUP, lambda *_: lg.reopen())
log = lg.logger()
print("ready", flush=True)
for line in sys.stdin:
    log.info("probe-failed", seq=int(line))
    lg.flush()
    print("done", flush=True)
"""


@needs_logrotate
def test_daemon_reopens_on_sighup_from_postrotate(tmp_path: Path) -> None:
    """A process that calls reopen() on SIGHUP follows logrotate's postrotate kill -HUP."""
    log = tmp_path / "agent.log"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(log)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True, cwd=Path(__file__).resolve().parents[2])
    stdin, stdout = child.stdin, child.stdout
    assert stdin is not None and stdout is not None

    def step(seq: int) -> None:
        stdin.write(f"{seq}\n")
        stdin.flush()
        assert stdout.readline() == "done\n"

    try:
        assert stdout.readline() == "ready\n"
        step(1)
        step(2)
        rotate(tmp_path, log, f"rotate 3\ncreate 0640\npostrotate\n    kill -HUP {child.pid}\n"
                              "endscript")
        step(3)
        key = "sslvpn_heartbeat.seq"
        assert [json.loads(x)[key] for x in (tmp_path / "agent.log.1").read_text().splitlines()] == [1, 2]
        assert [json.loads(x)[key] for x in log.read_text().splitlines()] == [3]
    finally:
        stdin.close()
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGKILL)
            child.wait()


def recv_json(rx: socket.socket) -> dict[str, Any]:
    """The JSON MSG part of one RFC 5424 datagram."""
    data = rx.recv(65536).decode()
    return dict(json.loads(data[data.index(" - {") + 3:]))


def test_syslog_socket_gone_and_back_is_reported_and_counted(tmp_path: Path) -> None:
    """When the syslog socket goes away for longer than the hold, one sink-failed on the stream;
    when it is back, the next line gets through and log-dropped names the numbers it lost."""
    addr = tmp_path / "dev-log"
    stream = io.StringIO()
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(str(addr))
    rx.settimeout(5)
    lg = configure(LogConfig(syslog=True, syslog_address=str(addr)), service_name="novell-sslvpn",
                   stream=stream, syslog_hold_s=0.2)
    try:
        log = lg.logger()
        log.info(Event.AGENT_START)
        assert recv_json(rx)["event.action"] == "agent-start"
        rx.close()
        addr.unlink()
        for _ in range(3):
            log.info(Event.SERVICE_DOWN)  # the socket is gone: counted, reported on the stream
        assert lg.flush()
        rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        rx.bind(str(addr))
        rx.settimeout(5)
        log.info(Event.PROBE_FAILED)
        assert recv_json(rx)["event.action"] == "probe-failed"
        assert lg.flush()
        actions = [json.loads(x).get("event.action") for x in stream.getvalue().splitlines()]
        assert actions == ["agent-start", "service-down", "sink-failed", "service-down",
                           "service-down", "probe-failed", "log-dropped"], actions
        dropped = json.loads(stream.getvalue().splitlines()[-1])
        assert (dropped["sslvpn_heartbeat.sink"], dropped["sslvpn_heartbeat.dropped"]) == ("syslog", 4)
        assert (dropped["sslvpn_heartbeat.dropped_first"], dropped["sslvpn_heartbeat.dropped_last"]) == (2, 5)
        assert recv_json(rx)["event.action"] == "log-dropped"
        assert lg.dropped_total() == 4
    finally:
        rx.close()
        lg.close()


def test_a_syslog_restart_within_the_hold_loses_nothing(tmp_path: Path) -> None:
    """The syslog socket goes away after taking lines (a daemon restarting) and comes back
    within the hold: the lines logged meanwhile wait in the queue and all arrive, numbered
    without a gap, with no sink-failed; the callers never waited."""
    addr = tmp_path / "dev-log"
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(str(addr))
    rx.settimeout(5)
    lg = configure(LogConfig(syslog=True, syslog_address=str(addr)), service_name="novell-sslvpn",
                   stream=io.StringIO(), syslog_hold_s=30.0)
    try:
        log = lg.logger()
        log.info(Event.AGENT_START)
        got = [recv_json(rx)]
        rx.close()
        addr.unlink()
        t0 = time.monotonic()
        for _ in range(20):
            log.info(Event.SERVICE_DOWN)
        took = time.monotonic() - t0
        assert not lg.flush(0.5), "the writer should be holding a line for the socket"
        rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        rx.bind(str(addr))
        rx.settimeout(5)
        got += [recv_json(rx) for _ in range(20)]  # read as it comes: a datagram queue is short
        assert lg.flush(10)
        assert [e["event.sequence"] for e in got] == list(range(1, 22))
        assert lg.dropped_total() == 0
        print(f"\n20 calls while the socket was gone: {took * 1e6 / 20:.1f} us per call")
    finally:
        rx.close()
        lg.close()


def test_a_syslog_reader_that_stops_costs_lines_never_time(tmp_path: Path) -> None:
    """A syslog reader that stops reading blocks the writer thread: further lines are dropped
    and counted, logging never waits; once it reads again, log-dropped says how many."""
    addr = tmp_path / "dev-log"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind(str(addr))
        lg = configure(LogConfig(syslog=True, syslog_address=str(addr)),
                       service_name="novell-sslvpn", stream=io.StringIO(), queue_lines=100)
        try:
            log = lg.logger()
            t0 = time.monotonic()
            for i in range(2000):  # far beyond net.unix.max_dgram_qlen and the queue
                log.info(Event.PROBE_FAILED, seq=i)
            took = time.monotonic() - t0  # the reader never read meanwhile: no call waited for it
            assert lg.dropped_total() > 0
            rx.settimeout(5)
            got: list[dict[str, Any]] = []
            while not any(e["event.action"] == "log-dropped" for e in got):
                got.append(recv_json(rx))
            [dropped] = [e for e in got if e["event.action"] == "log-dropped"]
            assert dropped["sslvpn_heartbeat.sink"] == "queue"
            seqs = [e["sslvpn_heartbeat.seq"] for e in got if "sslvpn_heartbeat.seq" in e]
            assert seqs == sorted(seqs) and seqs[0] == 0
            print(f"\n2000 lines against a stalled syslog reader: {took * 1e6 / 2000:.1f} us per "
                  f"call, {dropped['sslvpn_heartbeat.dropped']} dropped")
        finally:
            lg.close()


def _pipe(size: int = 4096) -> tuple[int, int]:
    """A pipe whose buffer holds ``size`` bytes (the kernel's minimum is a page)."""
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, size)
    return r, w


def _read_all(fd: int) -> bytes:
    """Everything in the pipe until the write end is closed."""
    out = b""
    while chunk := os.read(fd, 65536):
        out += chunk
    return out


def test_stdout_as_journald_sees_it_carries_each_lines_priority(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With JOURNAL_STREAM naming the stream's device and inode, each line starts with the
    syslog priority journald's stdout stream parses (``<6>`` info, ``<4>`` warning, ``<3>``
    error), then the JSON line; otherwise the same lines are plain JSON."""
    for journal in (True, False):
        r, w = _pipe(1 << 16)
        st = os.fstat(w)
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}" if journal
                           else f"{st.st_dev}:{st.st_ino + 1}")
        stream = os.fdopen(w, "w")
        lg = configure(LogConfig(), service_name="novell-sslvpn", stream=stream)
        log = lg.logger()
        log.info(Event.FIREWALL_BLOCK, trigger="pidfd")
        log.warning(Event.FIREWALL_REPAIR)
        log.error(Event.APPLY_FAILED)
        logging.getLogger("somelib").critical("gone")
        lg.close()
        stream.close()
        raw = _read_all(r)
        os.close(r)
        lines = raw.split(b"\n")
        assert lines[-1] == b"" and len(lines) == 5, raw
        prefixes = [line[:3] for line in lines[:4]]
        if journal:
            assert prefixes == [b"<6>", b"<4>", b"<3>", b"<2>"], raw
            objs = [json.loads(line[3:]) for line in lines[:4]]
        else:
            assert all(p.startswith(b"{") for p in prefixes), raw
            objs = [json.loads(line) for line in lines[:4]]
        assert [o["log.level"] for o in objs] == ["info", "warning", "error", "critical"]


def test_a_pipe_nobody_reads_costs_lines_never_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """stdout on a full pipe that nobody reads: log calls return at once, lines beyond the queue
    are dropped and counted; once the pipe is read, the queued lines and the log-dropped events
    (one per run of lost numbers, naming exactly the numbers missing, as many as
    dropped_total() counts) come out, every line JSON."""
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    r, w = _pipe()
    stream = os.fdopen(w, "w")
    lg = configure(LogConfig(), service_name="novell-sslvpn", stream=stream, queue_lines=50)
    log = lg.logger()
    worst = 0.0
    for i in range(1000):
        t0 = time.monotonic()
        log.info(Event.PROBE_FAILED, seq=i)
        worst = max(worst, time.monotonic() - t0)
    lost = lg.dropped_total()  # every call returned although nobody read the pipe so far
    assert lost >= 1000 - 50 - 20, lost  # the pipe holds a few lines, the queue 50
    reader = threading.Thread(target=lambda: out.append(_read_all(r)))
    out: list[bytes] = []
    reader.start()
    lg.close()
    stream.close()
    reader.join(10)
    os.close(r)
    events = [json.loads(line) for line in out[0].splitlines()]
    seqs = [e["sslvpn_heartbeat.seq"] for e in events if e["event.action"] == "probe-failed"]
    dropped = [e for e in events if e["event.action"] == "log-dropped"]
    assert sum(d["sslvpn_heartbeat.dropped"] for d in dropped) == lost == 1000 - len(seqs)
    named = {n for d in dropped for n in range(d["sslvpn_heartbeat.dropped_first"],
                                               d["sslvpn_heartbeat.dropped_last"] + 1)}
    written = {e["event.sequence"] for e in events}
    assert named | written == set(range(1, max(named | written) + 1)) and not named & written
    assert seqs == sorted(seqs) and seqs[0] == 0
    print(f"\n1000 lines against a full pipe: worst call {worst * 1e3:.2f} ms, {lost} dropped")


PACKAGED_LOGROTATE = Path(__file__).resolve().parents[2] / "packaging" / "sslvpn-heartbeat.logrotate"
AGENT_GLOB = "/var/log/sslvpn-heartbeat/*.log"


def packaged_stanza() -> str:
    """The packaged logrotate stanza for the agent's own files (the one whose glob is *.log)."""
    text = PACKAGED_LOGROTATE.read_text()
    m = re.search(r"^" + re.escape(AGENT_GLOB) + r"\s*\{.*?^\}", text, re.M | re.S)
    assert m, f"no stanza for {AGENT_GLOB} in {PACKAGED_LOGROTATE.name}"
    return m.group(0)


@needs_logrotate
def test_packaged_logrotate_stanza_loses_no_line(tmp_path: Path) -> None:
    """The packaged stanza under a burst of events: every line is in agent.log.1 or agent.log
    exactly once and in order (the sink follows the rename by itself, no signal needed)."""
    log = tmp_path / "agent.log"
    conf = tmp_path / "logrotate.conf"
    # Rotated as root here (the test's files are root's): what is tested is the loss of lines;
    # tests/packaging runs the installed entry as the agent's user.
    stanza = packaged_stanza().replace(AGENT_GLOB, f"{tmp_path}/*.log")
    stanza = stanza.replace("sslvpn-heartbeat sslvpn-heartbeat", "root root")
    conf.write_text(stanza)
    lg = configure(LogConfig(file=str(log)), service_name="novell-sslvpn", stream=io.StringIO())
    stop, count = threading.Event(), [0]

    def writer() -> None:
        while not stop.is_set():
            lg.logger().info(Event.PROBE_FAILED, seq=count[0])
            count[0] += 1
            if count[0] % 200 == 0:  # bursts within the queue's bound: what is tested is the rotation
                lg.flush(10)

    worker = threading.Thread(target=writer)
    worker.start()
    try:
        wait_for(lambda: count[0] > 1000, 10, "a thousand lines before the rotation")
        subprocess.run([LOGROTATE or "logrotate", "-f", "-s", str(tmp_path / "state"), str(conf)],
                       check=True, capture_output=True, timeout=30)
        wait_for(lambda: log.exists() and log.stat().st_size > 0, 10, "lines in the new file")
    finally:
        stop.set()
        worker.join()
        lg.close()
    assert lg.dropped_total() == 0, "the queue overflowed: the count below would be wrong"
    found: list[int] = []
    for f in (tmp_path / "agent.log.1", log):
        found += [json.loads(x)["sslvpn_heartbeat.seq"] for x in f.read_text().splitlines()]
    print(f"\npackaged logrotate stanza: {count[0]} lines logged, "
          f"{count[0] - len(set(found))} lost")
    assert found == list(range(count[0]))
