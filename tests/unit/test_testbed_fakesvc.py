"""The fake service's helpers: PID files, liveness of a PID, and the shared back end option."""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netns import wait_for
from tests.testbed.fakesvc import (
    PID_FILE,
    Backend,
    _Listener,
    backend_ok,
    depends_on_backend,
    parse_backend_paths,
    parse_hostport,
    pid_alive,
    read_pid,
    write_pid_atomic,
)
from tests.testbed.fakesvc import main as fakesvc_main


@pytest.mark.parametrize("content", [b"", b"abc\n", b"-5\n", b"0\n", b"12 34\n"])
def test_read_pid_rejects_what_is_not_a_positive_pid(tmp_path: Path, content: bytes) -> None:
    """read_pid returns None for empty, non-numeric, zero, negative or two-word content."""
    f = tmp_path / "x.pid"
    f.write_bytes(content)
    assert read_pid(f) is None


def test_read_pid_reads_a_pid_and_tolerates_absence(tmp_path: Path) -> None:
    """read_pid parses '1234\\n' and returns None when the file does not exist."""
    f = tmp_path / "x.pid"
    assert read_pid(f) is None
    f.write_text("1234\n")
    assert read_pid(f) == 1234


def test_write_pid_atomic_replaces_the_file_by_rename(tmp_path: Path) -> None:
    """The PID file is replaced by a new inode, never rewritten in place; no temp file remains."""
    f = tmp_path / "svc.pid"
    write_pid_atomic(f, 111)
    first = f.stat().st_ino
    with open(f) as keep_open:  # holds the old inode, so the new file cannot reuse its number
        write_pid_atomic(f, 222)
        assert f.stat().st_ino != first
        assert keep_open.read() == "111\n"  # the old file was not rewritten in place
    assert read_pid(f) == 222
    assert sorted(p.name for p in tmp_path.iterdir()) == ["svc.pid"]


def test_pid_alive_counts_a_zombie_as_dead() -> None:
    """A live child is alive; once it exits (a zombie, not yet reaped) it is dead."""
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)
    try:
        assert pid_alive(child.pid)
        assert child.stdin is not None
        child.stdin.close()

        def zombie() -> bool:
            with open(f"/proc/{child.pid}/stat", "rb") as f:
                return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"

        wait_for(zombie, 5, "the child to become a zombie")
        assert not pid_alive(child.pid)
    finally:
        child.kill()
        child.wait()
    assert not pid_alive(child.pid)
    assert pid_alive(os.getpid())


# --- the shared back end (--backend) ----------------------------------------------------------

@pytest.mark.parametrize(("text", "want"), [
    ("10.201.0.1:389", ("10.201.0.1", 389)),
    ("[fd00::1]:1812", ("fd00::1", 1812)),
    ("backend:65535", ("backend", 65535)),
])
def test_parse_hostport_reads_host_and_port(text: str, want: tuple[str, int]) -> None:
    """HOST:PORT and [IPv6]:PORT parse to (host, port)."""
    assert parse_hostport(text) == want


@pytest.mark.parametrize("text", ["10.201.0.1", ":389", "h:0", "h:70000", "h:ldap", ""])
def test_parse_hostport_names_what_is_wrong(text: str) -> None:
    """A missing host, a missing, zero, too large or named port is refused with ValueError."""
    with pytest.raises(ValueError, match="back end"):
        parse_hostport(text)


def test_parse_backend_paths_needs_slash_prefixed_paths() -> None:
    """Comma-separated /-prefixed paths parse (blanks dropped); an empty list or a bare word fails."""
    assert parse_backend_paths("/health, /login,") == ("/health", "/login")
    for bad in ("", ",", "health", "/a,b"):
        with pytest.raises(ValueError, match="back-end paths"):
            parse_backend_paths(bad)


@pytest.mark.parametrize(("path", "prefixes", "want"), [
    ("/", ("/",), True),
    ("/anything/at/all?x=1", ("/",), True),
    ("/health", ("/health", "/login"), True),
    ("/health?probe=1", ("/health",), True),
    ("/login/step2", ("/login",), True),
    ("/loginx", ("/login",), False),
    ("/", ("/health",), False),
    ("/portal", ("/health/", "/login"), False),
    ("/health", ("/health/",), True),
])
def test_depends_on_backend_matches_whole_path_segments(path: str, prefixes: tuple[str, ...],
                                                        want: bool) -> None:
    """A prefix covers itself and what lies below it, never a longer sibling; / covers all."""
    assert depends_on_backend(path, prefixes) is want


@pytest.fixture
def backend() -> Iterator[Backend]:
    """The back-end stand-in on a free loopback port, served by a thread."""
    srv = Backend("127.0.0.1", 0)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(5)


def test_backend_ok_needs_the_greeting_in_time(backend: Backend) -> None:
    """backend_ok is True against the stand-in, False once it is gone, False against a port
    that accepts but stays silent (within the timeout), False against a wrong greeting."""
    addr = backend.server_address[:2]
    assert backend_ok(addr, 1.0)
    with socket.socket() as silent:  # listening, never accepting: the kernel completes handshakes
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        assert not backend_ok(silent.getsockname(), 0.3)
    with socket.socket() as liar:
        liar.bind(("127.0.0.1", 0))
        liar.listen(8)

        def greet_wrong() -> None:
            conn, _ = liar.accept()
            with conn:
                conn.sendall(b"NO\n")

        t = threading.Thread(target=greet_wrong, daemon=True)
        t.start()
        assert not backend_ok(liar.getsockname(), 1.0)
        t.join(5)
    backend.shutdown()
    backend.server_close()
    assert not backend_ok(addr, 0.5)


class _Served:
    """A fake-service listener on loopback, its core stood in by this test process's PID."""

    def __init__(self, state_dir: Path, **kw: object) -> None:
        write_pid_atomic(state_dir / PID_FILE, os.getpid())
        self.httpd = _Listener("127.0.0.1", 0, "server9", state_dir, **kw)  # type: ignore[arg-type]
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def get(self, path: str) -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.httpd.server_address[1], timeout=5)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read().decode()
        finally:
            conn.close()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


def test_listener_without_backend_is_unchanged(tmp_path: Path) -> None:
    """Without a back end every path answers 200 naming the server while the core lives."""
    served = _Served(tmp_path)
    try:
        assert served.get("/") == (200, "server9\n")
        assert served.get("/health") == (200, "server9\n")
    finally:
        served.close()


def test_listener_fails_only_backend_paths_while_the_backend_is_down(tmp_path: Path,
                                                                    backend: Backend) -> None:
    """With the back end up every path answers 200; with it gone the back-end paths answer
    503 "backend down" (the core alive, the port serving) and the other paths still 200; a
    dead core still answers plain "down"."""
    served = _Served(tmp_path, backend=backend.server_address[:2],
                     backend_paths=("/health", "/login"), backend_timeout=0.5)
    try:
        assert served.get("/health") == (200, "server9\n")
        assert served.get("/login") == (200, "server9\n")
        backend.shutdown()
        backend.server_close()
        assert served.get("/health") == (503, "server9 backend down\n")
        assert served.get("/login/form") == (503, "server9 backend down\n")
        assert served.get("/") == (200, "server9\n")
        (tmp_path / PID_FILE).write_text("999999999\n")  # no such process: the core is dead
        assert served.get("/health") == (503, "server9 down\n")
    finally:
        served.close()


@pytest.mark.parametrize("argv", [
    ["--backend", "nohost"], ["--backend", "h:1", "--backend-paths", "health"],
    ["--backend", "h:1", "--backend-timeout", "0"],
])
def test_main_refuses_bad_backend_options(tmp_path: Path, argv: list[str],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """serve exits 2 (usage) on a bad --backend, --backend-paths or --backend-timeout."""
    with pytest.raises(SystemExit) as exc:
        fakesvc_main(["serve", "--state-dir", str(tmp_path), *argv])
    assert exc.value.code == 2
    assert "back" in capsys.readouterr().err
