"""Syslog addresses, RFC 5424 framing, and the network sink's never-block contract."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tests.netns import wait_for
from watcher.logsinks import (
    FACILITIES,
    Meta,
    NetSyslogSink,
    Sink,
    SyslogAddress,
    parse_syslog_address,
    rfc5424,
)

META = Meta(6, "firewall-block", "2025-11-25T13:10:00.123Z")


@pytest.mark.parametrize(("text", "want"), [
    ("/dev/log", SyslogAddress("unix", path="/dev/log")),
    ("udp://10.1.2.3:514", SyslogAddress("udp", host="10.1.2.3", port=514)),
    ("tcp://siem.example.org:6514", SyslogAddress("tcp", host="siem.example.org", port=6514)),
    ("tcp://[fd00::1]:601", SyslogAddress("tcp", host="fd00::1", port=601)),
])
def test_parse_syslog_address_accepts(text: str, want: SyslogAddress) -> None:
    """Socket paths, udp:// and tcp:// with a name, IPv4 or bracketed IPv6 parse, and print back."""
    assert parse_syslog_address(text) == want
    assert str(want) == text


@pytest.mark.parametrize("text", [
    "dev/log", "", "tcp://host", "tcp://:514", "udp://h:0", "udp://h:65536", "tcp://h:x",
    "http://h:80", "tcp://fd00::1:514", "tcp://[10.0.0.1]:514", "tcp://[fd00::1]514",
    "tcp://bad host:514", "/" + "x" * 200,
])
def test_parse_syslog_address_refuses(text: str) -> None:
    """Anything else is a ValueError (config.py turns it into an error naming the key)."""
    with pytest.raises(ValueError):
        parse_syslog_address(text)


def test_rfc5424_header_carries_facility_severity_msgid_and_json_as_msg() -> None:
    """PRI is facility*8+severity, MSGID the action, no structured data, then the JSON line."""
    line = json.dumps({"event.action": "firewall-block", "detail": "ü"})
    msg = rfc5424(line, META, FACILITIES["local3"], "vpn1", 812).decode()
    assert msg == f"<158>1 2025-11-25T13:10:00.123Z vpn1 sslvpn-heartbeat 812 firewall-block - {line}"


def test_rfc5424_msgid_is_printable_ascii_of_at_most_32() -> None:
    """A MSGID with spaces or non-ASCII is cleaned, never breaks the header's fields."""
    msg = rfc5424("{}", Meta(3, "a b\u00e9" + "x" * 40, "t"), 3, "h", 1).decode()
    assert msg.split(" ")[5] == "ab" + "x" * 30


class Blackhole:
    """A connect() that hangs like a SYN to a dropping firewall until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.attempts = 0
        self.peer: socket.socket | None = None
        self.fail = True

    def __call__(self, addr: SyslogAddress, timeout: float) -> socket.socket:
        self.attempts += 1
        if self.fail:
            self.release.wait(30)
            raise TimeoutError("timed out")
        mine, self.peer = socket.socketpair()
        return mine


@pytest.fixture
def hole() -> Iterator[Blackhole]:
    """A Blackhole released at the end so no worker thread outlives the test."""
    h = Blackhole()
    yield h
    h.release.set()
    if h.peer is not None:
        h.peer.close()


def test_writes_never_wait_for_a_hanging_connect_and_a_full_queue_drops(hole: Blackhole) -> None:
    """While connect hangs, writes return at once; past the queue bound they raise EAGAIN."""
    sink = NetSyslogSink(SyslogAddress("tcp", host="10.9.9.9", port=514), "h", 3,
                         queue_max=8, connect=hole)
    reports: list[Exception] = []
    sink.report_failure = lambda s, exc: reports.append(exc)
    t0 = time.monotonic()
    full = 0
    for _ in range(50):
        try:
            sink.write("{}", META, 0.0)
        except BlockingIOError:
            full += 1
    assert time.monotonic() - t0 < 0.5
    assert full >= 50 - 9  # 8 queued plus the one the worker holds
    hole.release.set()
    wait_for(lambda: reports, 5, "the worker's failure report")
    assert len(reports) == 1 and isinstance(reports[0], TimeoutError)
    sink.close()


def test_failed_collector_raises_until_a_reconnect_gets_through(hole: Blackhole) -> None:
    """After a failure write raises (and asks for a retry); a retry that connects ends it, and
    later frames arrive with octet-counting framing."""
    hole.release.set()
    sink = NetSyslogSink(SyslogAddress("tcp", host="10.9.9.9", port=514), "h", 3, connect=hole)
    reports: list[Exception] = []
    sink.report_failure = lambda s, exc: reports.append(exc)
    sink.write('{"n":1}', META, 0.0)
    wait_for(lambda: reports, 5, "a failure report")
    hole.fail = False
    with pytest.raises(OSError):
        sink.write('{"n":2}', META, 0.0)  # the retry: its frame is the worker's attempt
    wait_for(sink.ready_again, 5, "the reconnect")
    sink.write('{"n":3}', META, 0.0)
    assert sink.flush(5)
    assert hole.peer is not None
    hole.peer.settimeout(5)
    data = b""
    while data.count(b"{") < 2:
        data += hole.peer.recv(65536)
    frames = []
    while data:
        size, _, rest = data.partition(b" ")
        frames.append(rest[:int(size)])
        data = rest[int(size):]
    assert [json.loads(f.split(b" - ", 1)[1]) for f in frames] == [{"n": 2}, {"n": 3}]
    assert sink.dropped == 1 and len(reports) == 1
    sink.close()


def test_base_sink_never_claims_recovery() -> None:
    """Only sinks with a background worker end a back-off early."""
    assert not Sink().ready_again()
