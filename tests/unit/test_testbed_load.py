"""The bounded client load: its schedule, answer parsing, record files and self-ending runs."""

from __future__ import annotations

import io
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.netns import REPO, wait_for
from tests.testbed.load import Record, parse_answer, read_records, run_load, schedule, summarize


def test_schedule_is_fixed_rate_and_bounded() -> None:
    """rate x duration requests spaced 1/rate apart, capped by max_requests."""
    due = schedule(200, 5)
    assert len(due) == 1000
    assert due[:3] == [0.0, 0.005, 0.01]
    assert max(due) < 5
    assert len(schedule(200, 5, max_requests=7)) == 7
    with pytest.raises(ValueError):
        schedule(0, 5)


def test_parse_answer_names_status_and_server() -> None:
    """A raw answer gives (status, first body word, ""); garbage gives status 0 and an error."""
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nserver2\n"
    assert parse_answer(ok) == (200, "server2", "")
    assert parse_answer(b"HTTP/1.1 503 Service Unavailable\r\n\r\nserver1 down\n")[:2] == (
        503, "server1")
    status, server, error = parse_answer(b"")
    assert (status, server) == (0, "") and error


def test_summarize_and_read_records(tmp_path: Path) -> None:
    """Records round-trip through JSON lines (a torn last line is skipped); bad = not 2xx."""
    recs = [Record(1, 0.005, 0.005, 1.0, 503, "server1", ""),
            Record(0, 0.0, 0.0, 1.0, 200, "server2", ""),
            Record(2, 0.01, 0.01, 2000.0, 0, "", "TimeoutError: ")]
    f = tmp_path / "r.jsonl"
    f.write_text("".join(json.dumps(r.__dict__) + "\n" for r in recs) + '{"i": 3, "du')
    back = read_records(f)
    assert [r.i for r in back] == [0, 1, 2]
    s = summarize(back)
    assert (s.total, s.ok, s.bad) == (3, 1, 2)
    assert s.by_server == {"server2": 1}
    assert s.by_status == {200: 1, 503: 1, 0: 1}


class _Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"loopback\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(ThreadingHTTPServer):
    # The load below has up to ~100 connections in flight: the default listen queue of 5
    # overflows, and a dropped SYN is retried only after the client's whole timeout.
    request_queue_size = 512


@pytest.fixture
def http_server() -> Iterator[int]:
    """A loopback HTTP server whose listen queue the tests' load cannot overflow."""
    srv = _Server(("127.0.0.1", 0), _Hello)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()


def test_run_load_records_every_request(http_server: int) -> None:
    """Every scheduled request is recorded once, as a good answer naming the server."""
    out = io.StringIO()
    s = run_load(f"http://127.0.0.1:{http_server}/", 100, 0.3, out, timeout=1.0)
    lines = [json.loads(ln) for ln in out.getvalue().splitlines()]
    assert sorted(d["i"] for d in lines) == list(range(30))
    assert (s.total, s.ok, s.by_server) == (30, 30, {"loopback": 30})


def test_run_load_ends_by_itself_when_nothing_answers() -> None:
    """Against a listener that never answers, the run still ends within its bound, all bad."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        port = silent.getsockname()[1]
        start = time.monotonic()
        s = run_load(f"http://127.0.0.1:{port}/", 50, 0.2, io.StringIO(), timeout=0.3)
        assert time.monotonic() - start < 0.2 + 0.3 + 1.5
    assert (s.total, s.bad) == (10, 10)


def test_sigterm_ends_the_schedule_but_records_requests_in_flight(tmp_path: Path) -> None:
    """SIGTERM sends nothing more, yet every request already sent is recorded (here as a
    timeout), so the window that ends at the stop loses none of its requests."""
    out = tmp_path / "load.jsonl"
    with socket.socket() as silent:  # accepts (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(512)
        port = silent.getsockname()[1]
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.testbed.load", "--url", f"http://127.0.0.1:{port}/",
             "--rate", "50", "--duration", "20", "--timeout", "1.0", "--out", str(out)],
            cwd=REPO, stdout=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: out.exists() and len(out.read_text().splitlines()) >= 5, 10,
                     "the first timed-out requests")
            before = len(out.read_text().splitlines())
            proc.send_signal(signal.SIGTERM)
            stdout, _ = proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0
    recs = read_records(out)
    # At 50/s with a 1 s timeout about 50 requests were in flight at the stop.
    assert len(recs) >= before + 20, (before, len(recs))
    assert sorted(r.i for r in recs) == list(range(len(recs)))  # nothing sent goes unrecorded
    assert len(recs) < 50 * 20 / 2  # and the schedule really stopped
    assert json.loads(stdout)["total"] == len(recs)
