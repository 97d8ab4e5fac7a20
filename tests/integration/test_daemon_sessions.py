"""Established connections under a block: the running daemon ends them with SOCK_DESTROY (all
of them on a full block, the idle ones in a drain), never loopback ones; ``block --drain --wait
--then-reset``; a destroy the kernel refuses.

A client namespace holds HTTP/1.1 keep-alive connections to the fake service over a veth pair,
as a pooling gateway does; loopback connections stand for the agent's own probes.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agent import PORT, Agent, Service, agent_config, chain_view, child_env
from tests.netns import Netns, veth_pair, wait_for
from tests.testbed.cluster import socket_in
from watcher.statedir import StateDir

pytestmark = pytest.mark.netns

SERVER, CLIENT = "10.78.0.1", "10.78.0.2"
REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


class Conn:
    """One keep-alive HTTP connection made from namespace ``ns`` to ``addr``."""

    def __init__(self, ns: Netns, addr: str) -> None:
        self.sock = socket_in(ns.name)
        self.sock.settimeout(5.0)
        self.sock.connect((addr, PORT))

    def ask(self) -> bytes:
        """Send one GET and read its whole answer; its status line."""
        self.sock.sendall(REQUEST)
        return self.answer()

    def answer(self) -> bytes:
        """Read one whole answer (the fake service sends Content-Length); its status line."""
        data = b""
        while b"\r\n\r\n" not in data:
            data += self.sock.recv(4096)
        head, _, body = data.partition(b"\r\n\r\n")
        length = next(int(ln.split(b":")[1]) for ln in head.split(b"\r\n")
                      if ln.lower().startswith(b"content-length"))
        while len(body) < length:
            body += self.sock.recv(4096)
        return head.split(b"\r\n")[0]

    def reset_by_peer(self) -> bool:
        """True once the server ended the connection with a reset (False while it is open)."""
        try:
            data = self.sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK)
        except (BlockingIOError, TimeoutError):  # nothing to read: still open
            return False
        except ConnectionResetError:
            return True
        raise AssertionError(f"the connection ended without a reset: {data!r}")

    def close(self) -> None:
        """Close the client side."""
        with contextlib.suppress(OSError):
            self.sock.close()


@pytest.fixture
def conns() -> Iterator[list[Conn]]:
    made: list[Conn] = []
    try:
        yield made
    finally:
        for c in made:
            c.close()


def _start(netns: Netns, client_ns: Netns, tmp_path: Path,
           **firewall: object) -> tuple[Service, Agent, Path]:
    veth_pair(netns, client_ns, SERVER, CLIENT)
    svc = Service(netns, tmp_path / "svc").start()
    cfg = agent_config(tmp_path / "agent.toml", svc.d, tmp_path / "state",
                       probe={"interval_s": 30.0}, firewall=dict(firewall))
    agent = Agent(netns, cfg, tmp_path).start()
    agent.wait_ready()
    return svc, agent, cfg


def test_full_block_resets_remote_keepalive_connections_and_never_loopback(
        netns: Netns, client_ns: Netns, tmp_path: Path, conns: list[Conn]) -> None:
    """The core dies: the REJECT goes in, then the gateway-side keep-alive connections get a
    reset (connections-reset, ipv4 count) while a loopback connection lives on."""
    svc, agent, _ = _start(netns, client_ns, tmp_path)
    remote = [Conn(client_ns, SERVER) for _ in range(3)]
    local = Conn(netns, "127.0.0.1")
    conns += [*remote, local]
    for c in conns:
        assert c.ask().endswith(b"200 OK")
    mark = agent.mark()
    svc.ctl("kill-core")
    block = agent.wait_event("firewall-block", 5.0, after=mark)
    ev = agent.wait_event("connections-reset", 5.0, after=mark)
    assert agent.events().index(block) < agent.events().index(ev), "reset before the rule"
    assert ev["sslvpn_heartbeat.reset_ipv4"] == 3 and ev["sslvpn_heartbeat.reset_ipv6"] == 0, ev
    assert ev["sslvpn_heartbeat.drain"] is False
    for c in remote:
        wait_for(c.reset_by_peer, 5.0, "the remote connection reset")
    assert not local.reset_by_peer()
    assert local.ask().endswith(b"503 Service Unavailable")  # alive, and the core is gone
    assert chain_view(netns).blocked
    agent.check_clean()


def test_established_keep_leaves_connections_alone(
        netns: Netns, client_ns: Netns, tmp_path: Path, conns: list[Conn]) -> None:
    """established = "keep": the block goes in and the keep-alive connection is not reset."""
    svc, agent, _ = _start(netns, client_ns, tmp_path, established="keep")
    c = Conn(client_ns, SERVER)
    conns.append(c)
    assert c.ask().endswith(b"200 OK")
    mark = agent.mark()
    svc.ctl("kill-core")
    agent.wait_event("firewall-block", 5.0, after=mark)
    # The daemon's next step after the block would be the reset: a probe round later it has
    # had every chance (the kill-core round and the rise timer are done by then).
    agent.signal(1)  # SIGHUP: one more round through the core
    agent.wait_event("config-reload", 5.0, after=mark)
    assert not agent.find("connections-reset", mark)
    assert not c.reset_by_peer()


def _half_request(c: Conn) -> None:
    """Send a request without its end, in a later kernel tick than the answer before it (a
    request in the same tick counts as answered: watcher.core.sessions): the service has read
    it and owes an answer."""
    time.sleep(0.02)  # five jiffies at HZ=250: the times must differ, not a condition to await
    c.sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")


def test_drain_resets_idle_connections_and_a_busy_one_once_it_is_answered(
        netns: Netns, client_ns: Netns, tmp_path: Path, conns: list[Conn]) -> None:
    """Drain: the idle keep-alive connections are reset at once; one carrying a request is
    not, its request is answered, and once idle it is reset by a later sweep; loopback never."""
    _svc, agent, _ = _start(netns, client_ns, tmp_path)
    idle = [Conn(client_ns, SERVER) for _ in range(2)]
    busy = Conn(client_ns, SERVER)
    local = Conn(netns, "127.0.0.1")
    conns += [*idle, busy, local]
    for c in conns:
        assert c.ask().endswith(b"200 OK")
    _half_request(busy)
    mark = agent.mark()
    StateDir(tmp_path / "state").set_admin(True, "drain test")
    agent.wait_event("firewall-drain", 5.0, after=mark)
    ev = agent.wait_event("connections-reset", 5.0, after=mark)
    assert ev["sslvpn_heartbeat.drain"] is True and ev["sslvpn_heartbeat.reset_ipv4"] == 2, ev
    assert ev["sslvpn_heartbeat.kept"] == 1, ev
    for c in idle:
        wait_for(c.reset_by_peer, 5.0, "an idle connection reset")
    assert not busy.reset_by_peer()
    busy.sock.sendall(b"\r\n")  # the request ends: its answer comes on the drained server
    assert busy.answer().endswith(b"200 OK")
    wait_for(busy.reset_by_peer, 5.0, "the answered connection reset by a later sweep")
    assert not local.reset_by_peer()
    assert chain_view(netns).drained
    agent.check_clean()


def _cli(ns: Netns, cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return ns.run([sys.executable, "-m", "watcher", *args, "--config", str(cfg)], check=False,
                  env=child_env(), timeout=30)


def test_then_reset_ends_what_the_timeout_left_and_exits_1(
        netns: Netns, client_ns: Netns, tmp_path: Path, conns: list[Conn]) -> None:
    """block --drain --wait --timeout 1 --then-reset, no daemon, one busy remote connection:
    the wait times out, the connection is reset, exit 1; the drain stays in force."""
    veth_pair(netns, client_ns, SERVER, CLIENT)
    svc = Service(netns, tmp_path / "svc").start()
    cfg = agent_config(tmp_path / "agent.toml", svc.d, tmp_path / "state")
    c = Conn(client_ns, SERVER)
    conns.append(c)
    assert c.ask().endswith(b"200 OK")
    _half_request(c)
    r = _cli(netns, cfg, "block", "--drain", "--wait", "--timeout", "1", "--then-reset")
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "1 established connection to port 8080 ended" in r.stderr, r.stderr
    wait_for(c.reset_by_peer, 5.0, "the connection left reset")
    assert chain_view(netns).drained


def test_then_reset_never_touches_loopback_and_exits_75(
        netns: Netns, tmp_path: Path, conns: list[Conn]) -> None:
    """Only a loopback connection left: --then-reset ends nothing, says so, exits 75."""
    svc = Service(netns, tmp_path / "svc").start()
    cfg = agent_config(tmp_path / "agent.toml", svc.d, tmp_path / "state")
    local = Conn(netns, "127.0.0.1")
    conns.append(local)
    assert local.ask().endswith(b"200 OK")
    r = _cli(netns, cfg, "block", "--drain", "--wait", "--timeout", "1", "--then-reset")
    assert r.returncode == 75, (r.returncode, r.stdout, r.stderr)
    assert "0 established connections" in r.stderr and "1 remains" in r.stderr, r.stderr
    assert not local.reset_by_peer()


def test_then_reset_needs_a_timeout(netns: Netns, tmp_path: Path) -> None:
    """--then-reset without --timeout is a usage error (exit 2) that changes nothing."""
    cfg = agent_config(tmp_path / "agent.toml", tmp_path / "svc", tmp_path / "state")
    r = _cli(netns, cfg, "block", "--drain", "--wait", "--then-reset")
    assert r.returncode == 2 and "--then-reset needs" in r.stderr, r.stderr
    assert chain_view(netns).absent


_AS_NOBODY = """
import sys
from watcher.sources.sock_destroy import reset_connections
out = reset_connections(int(sys.argv[1]), lambda c: False)
print(out.error, out.unsupported, sum(out.reset.values()))
"""


def test_destroy_refused_by_the_kernel_is_reported_not_raised(
        netns: Netns, client_ns: Netns, tmp_path: Path, conns: list[Conn]) -> None:
    """A process without CAP_NET_ADMIN asks for SOCK_DESTROY: the kernel refuses (EPERM); the
    round reports it, raises nothing, and the connection lives on."""
    veth_pair(netns, client_ns, SERVER, CLIENT)
    Service(netns, tmp_path / "svc").start()
    c = Conn(client_ns, SERVER)
    conns.append(c)
    assert c.ask().endswith(b"200 OK")
    r = netns.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                   "--inh-caps=-all", "--bounding-set=-all", sys.executable, "-c", _AS_NOBODY,
                   str(PORT)], check=False, env=child_env(), timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["SOCK_DESTROY:", "Operation", "not", "permitted", "False", "0"], \
        r.stdout
    assert not c.reset_by_peer()
    assert c.ask().endswith(b"200 OK")
