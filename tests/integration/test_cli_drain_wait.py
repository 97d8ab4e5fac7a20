"""``block --drain --wait``: real connections in a namespace, counted by sock_diag as they end.

The listener and its connections are real sockets made inside the test's namespace (IPv4 and
IPv6); the CLI runs there too (``ip netns exec``), so it counts exactly those.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from tests.agent import agent_config, chain_view, child_env
from tests.netns import REPO, Netns, wait_for
from tests.testbed.cluster import socket_in
from watcher.statedir import StateDir

pytestmark = pytest.mark.netns

PORT = 8090  # no service is needed: the drain counts whatever holds connections to the port


class Conns:
    """A listener on PORT (IPv4 and IPv6 loopback) in ``ns`` and accepted connections to it."""

    def __init__(self, ns: Netns) -> None:
        self.ns = ns
        self.listeners: list[socket.socket] = []
        self.clients: list[socket.socket] = []
        self.served: list[socket.socket] = []
        for fam, addr in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            s = socket_in(ns.name, fam)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((addr, PORT))
            s.listen(64)
            self.listeners.append(s)

    def open(self, family: int = socket.AF_INET) -> None:
        """One more established connection (client and accepted server side)."""
        c = socket_in(self.ns.name, family)
        c.connect(("127.0.0.1" if family == socket.AF_INET else "::1", PORT))
        self.clients.append(c)
        lst = self.listeners[0 if family == socket.AF_INET else 1]
        srv, _ = lst.accept()
        self.served.append(srv)

    def close_one(self) -> None:
        """End one connection from both sides."""
        self.served.pop().close()
        self.clients.pop().close()

    def close(self) -> None:
        """Close every socket made here."""
        for s in (*self.served, *self.clients, *self.listeners):
            with contextlib.suppress(OSError):
                s.close()


@pytest.fixture
def conns(netns: Netns) -> Iterator[Conns]:
    c = Conns(netns)
    try:
        yield c
    finally:
        c.close()


def _config(tmp_path: Path) -> tuple[Path, Path]:
    state = tmp_path / "state"
    cfg = agent_config(tmp_path / "agent.toml", tmp_path / "svc", state,
                       service={"port": PORT})
    return cfg, state


def _cli(ns: Netns, cfg: Path, *args: str, stdout: Any = subprocess.PIPE) -> subprocess.Popen[bytes]:
    return ns.popen([sys.executable, "-m", "watcher", *args, "--config", str(cfg)],
                    cwd=str(REPO), env=child_env(), stdin=subprocess.DEVNULL, stdout=stdout,
                    stderr=subprocess.PIPE)


def _read_json_line(out: IO[bytes], timeout: float = 5.0) -> dict[str, Any]:
    ready, _, _ = select.select([out], [], [], timeout)
    assert ready, "no progress line within the timeout"
    line = out.readline()
    assert line, "the command closed its output"
    obj: dict[str, Any] = json.loads(line)
    return obj


def test_waits_for_each_connection_and_exits_0_when_drained(netns: Netns, conns: Conns,
                                                            tmp_path: Path) -> None:
    """Three connections (two IPv4, one IPv6): one JSON line per change, 3 -> 2 -> 1 -> 0,
    exit 0; the drain is recorded and held in both families; status counted them too."""
    cfg, state = _config(tmp_path)
    for fam in (socket.AF_INET, socket.AF_INET, socket.AF_INET6):
        conns.open(fam)
    # a connection to another port is not counted (nor are listeners and client sides)
    other = socket_in(netns.name)
    other.bind(("127.0.0.1", PORT + 1))
    other.listen(1)
    peer = socket_in(netns.name)
    peer.connect(("127.0.0.1", PORT + 1))
    conns.clients.insert(0, peer)  # kept last: close_one() ends the PORT connections first
    conns.served.insert(0, other.accept()[0])
    conns.listeners.append(other)
    status = netns.run([sys.executable, "-m", "watcher", "status", "--json", "--config",
                        str(cfg)], env=child_env())
    assert json.loads(status.stdout)["established"] == 3
    proc = _cli(netns, cfg, "block", "--drain", "--wait", "--timeout", "30")
    assert proc.stdout is not None and proc.stderr is not None
    try:
        first = _read_json_line(proc.stdout)
        assert first["established"] == 3 and first["port"] == PORT, first
        assert chain_view(netns).drained and chain_view(netns, 6).drained
        seen = [3]
        for want in (2, 1, 0):
            conns.close_one()
            line = _read_json_line(proc.stdout)
            seen.append(line["established"])
            assert line["established"] == want, (seen, line)
        assert proc.wait(10) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert b"drained" in proc.stderr.read()
    assert proc.stdout.read() == b""  # nothing after the 0 line: stdout is JSON lines only
    rec = StateDir(state).admin()
    assert rec is not None and rec.drain
    assert chain_view(netns).drained and chain_view(netns, 6).drained


def test_timeout_exits_75_and_keeps_the_drain(netns: Netns, conns: Conns, tmp_path: Path) -> None:
    """A connection that never ends: exit 75 after --timeout (not long after), a message naming
    the count left on stderr, the drain still recorded and in force."""
    cfg, state = _config(tmp_path)
    conns.open(socket.AF_INET6)
    t0 = time.monotonic()
    proc = _cli(netns, cfg, "block", "--drain", "--wait", "--timeout", "1")
    out, err = proc.communicate(timeout=30)
    took = time.monotonic() - t0
    assert proc.returncode == 75, err
    assert b"timed out after 1s: 1 established connection" in err, err
    assert b"drain stays in force" in err
    lines = [json.loads(ln) for ln in out.splitlines()]
    assert [ln["established"] for ln in lines] == [1]
    assert took >= 1.0
    rec = StateDir(state).admin()
    assert rec is not None and rec.drain
    assert chain_view(netns).drained


def test_already_drained_returns_at_once(netns: Netns, conns: Conns, tmp_path: Path) -> None:
    """No connection at all: one line with 0, exit 0."""
    cfg, _ = _config(tmp_path)
    proc = _cli(netns, cfg, "block", "--drain", "--wait")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert [json.loads(ln)["established"] for ln in out.splitlines()] == [0]


def test_on_a_terminal_the_count_is_one_live_line(netns: Netns, conns: Conns,
                                                  tmp_path: Path) -> None:
    """With a terminal as stdout the progress rewrites one line in place (carriage return,
    erase line) and ends with a newline once drained."""
    cfg, _ = _config(tmp_path)
    conns.open()
    conns.open()
    master, slave = os.openpty()
    try:
        proc = _cli(netns, cfg, "block", "--drain", "--wait", "--timeout", "30", stdout=slave)
        os.close(slave)
        slave = -1
        buf = b""

        def has(text: bytes) -> bool:
            nonlocal buf
            while select.select([master], [], [], 0.05)[0]:
                try:
                    chunk = os.read(master, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                buf += chunk
            return text in buf

        wait_for(lambda: has(b"2 established connections"), 10, "the first count on the tty")
        conns.close_one()
        wait_for(lambda: has(b"1 established connection ("), 10, "the count falling to 1")
        conns.close_one()
        wait_for(lambda: has(b"0 established connections"), 10, "the count falling to 0")
        assert proc.wait(10) == 0
        has(b"")
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    assert buf.count(b"\r\x1b[K") == 3, buf
    before, _, after = buf.partition(b"0 established connections")
    assert b"\n" not in before and after.endswith(b"\n"), buf  # one line, ended once drained
