"""watcher.outputs.notify: sd_notify datagrams on a real unix socket, and the watchdog interval."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from watcher.outputs.notify import Notifier


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A datagram socket bound in tmp_path, standing in for systemd's notification socket."""
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind(path)
        rx.settimeout(5)
        yield path, rx


def test_ready_stopping_watchdog_status(manager: tuple[str, socket.socket]) -> None:
    """Each call sends exactly its assignment as one datagram to NOTIFY_SOCKET."""
    path, rx = manager
    n = Notifier.from_env({"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready() and n.stopping() and n.watchdog() and n.status("UP, chain open")
    got = [rx.recv(4096) for _ in range(4)]
    assert got == [b"READY=1", b"STOPPING=1", b"WATCHDOG=1", b"STATUS=UP, chain open"]
    n.close()


def test_reloading_sends_monotonic_usec(manager: tuple[str, socket.socket]) -> None:
    """reloading() sends RELOADING=1 and MONOTONIC_USEC taken from the injected clock."""
    path, rx = manager
    n = Notifier.from_env({"NOTIFY_SOCKET": path}, monotonic_ns=lambda: 123_456_789_000)
    assert n.reloading()
    assert rx.recv(4096) == b"RELOADING=1\nMONOTONIC_USEC=123456789"
    n.close()


def test_reloading_uses_clock_monotonic_by_default(manager: tuple[str, socket.socket]) -> None:
    """Without an injected clock MONOTONIC_USEC is CLOCK_MONOTONIC now, in microseconds."""
    path, rx = manager
    n = Notifier.from_env({"NOTIFY_SOCKET": path})
    before = time_usec()
    n.reloading()
    after = time_usec()
    lines = rx.recv(4096).decode().split("\n")
    assert lines[0] == "RELOADING=1"
    assert before <= int(lines[1].removeprefix("MONOTONIC_USEC=")) <= after
    n.close()


def time_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def test_status_newline_cannot_inject_an_assignment(manager: tuple[str, socket.socket]) -> None:
    """A newline in the status text is flattened, so it cannot smuggle in READY=1."""
    path, rx = manager
    n = Notifier.from_env({"NOTIFY_SOCKET": path})
    n.status("bad\nREADY=1")
    assert rx.recv(4096) == b"STATUS=bad READY=1"
    n.close()


def test_abstract_socket_address() -> None:
    """NOTIFY_SOCKET=@name reaches an abstract-namespace socket."""
    name = f"svh-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind(b"\0" + name.encode())
        rx.settimeout(5)
        n = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
        assert n.ready()
        assert rx.recv(4096) == b"READY=1"
        n.close()


def test_unset_socket_is_a_no_op() -> None:
    """Without NOTIFY_SOCKET (or with a relative one) nothing is sent and nothing raises."""
    for env in ({}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "relative/sock"},
                {"NOTIFY_SOCKET": "@"}):
        n = Notifier.from_env(env)
        assert not n.enabled
        assert not n.ready() and not n.reloading() and not n.stopping()
        assert not n.watchdog() and not n.status("x")


def test_absent_manager_returns_false(tmp_path: Path) -> None:
    """A socket path nobody listens on gives False, never an exception; a later send retries."""
    path = tmp_path / "gone.sock"
    n = Notifier.from_env({"NOTIFY_SOCKET": str(path)})
    assert n.ready() is False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind(str(path))
        rx.settimeout(5)
        assert n.ready() is True
        assert rx.recv(4096) == b"READY=1"
    n.close()


def test_reads_process_environment_by_default(
    manager: tuple[str, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    """from_env() without arguments reads os.environ."""
    path, rx = manager
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "3000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    n = Notifier.from_env()
    assert n.watchdog_interval_s() == 1.5
    assert n.watchdog()
    assert rx.recv(4096) == b"WATCHDOG=1"
    n.close()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "2000000"}, 1.0),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}, 1.0),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "x"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    """Half of WATCHDOG_USEC in seconds, only when WATCHDOG_PID (if set) is this process."""
    assert Notifier.from_env(env).watchdog_interval_s() == expected
