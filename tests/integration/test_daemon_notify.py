"""sd_notify from the running daemon: READY only once the chain is in place, RELOADING, STOPPING."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agent import Agent, ChainView, Service, agent_config, chain_view
from tests.netns import Netns

pytestmark = pytest.mark.netns


class Receiver:
    """A bound unix datagram socket standing in for systemd's notification socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.seen: list[str] = []

    def wait(self, key: str, timeout: float = 5.0) -> tuple[str, list[str]]:
        """Receive until a datagram holds the line ``key``; return it and the ones before it."""
        before: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {key} within {timeout}s; got {self.seen}")
            self.sock.settimeout(left)
            try:
                msg = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            self.seen.append(msg)
            if key in msg.splitlines():
                return msg, before
            before.append(msg)


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    r = Receiver(tmp_path / "notify.sock")
    try:
        yield r
    finally:
        r.sock.close()


def test_ready_after_first_swap_reloading_on_sighup_stopping_on_sigterm(
        netns: Netns, tmp_path: Path, receiver: Receiver) -> None:
    """READY=1 arrives with the chain already in the kernel; SIGHUP: RELOADING=1 then READY=1."""
    svc = Service(netns, tmp_path / "svc").start()
    svc.ctl("kill-core")  # a down service: READY must come with the block already applied
    cfg = agent_config(tmp_path / "agent.toml", svc.d, tmp_path / "state")
    agent = Agent(netns, cfg, tmp_path, NOTIFY_SOCKET=str(receiver.path),
                  WATCHDOG_USEC="200000")
    assert chain_view(netns).absent
    agent.start()
    _, before = receiver.wait("READY=1")
    at_ready: ChainView = chain_view(netns)
    assert at_ready.blocked, at_ready  # first probe done and swap applied before READY
    assert not any("READY=1" in m for m in before)
    actions = [e["event.action"] for e in agent.events()]
    assert "firewall-block" in actions
    assert actions.index("firewall-block") < actions.index("agent-ready"), actions
    receiver.wait("WATCHDOG=1", 2.0)
    receiver.wait("WATCHDOG=1", 2.0)
    mark = agent.mark()
    agent.signal(signal.SIGHUP)
    msg, _ = receiver.wait("RELOADING=1")
    assert any(ln.startswith("MONOTONIC_USEC=") and int(ln.split("=", 1)[1]) > 0
               for ln in msg.splitlines()), msg
    receiver.wait("READY=1")
    agent.wait_event("config-reload", 2.0, after=mark)
    agent.signal(signal.SIGTERM)
    receiver.wait("STOPPING=1")
    assert agent.wait() == 0
    assert chain_view(netns).open  # on_exit=open
    agent.check_clean()
