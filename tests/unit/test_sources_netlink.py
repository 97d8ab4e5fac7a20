"""The receive loop the netlink sources share (watcher.sources._netlink.read_ready), on real
datagram sockets: everything queued is read and handed on in order, a datagram that does not
decode is reported and skipped, an error ends the reading, and a source that closes its socket
from a handler stops the loop."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from watcher.sources._netlink import NetlinkDecodeError, read_ready


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A non-blocking datagram socket to read from, and its peer to send with."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.setblocking(False)
    yield a, b
    a.close()
    b.close()


def _decode(data: bytes) -> list[str]:
    if data.startswith(b"!"):
        raise NetlinkDecodeError(f"bad datagram {data!r}")
    return data.decode().split(",")


def test_every_queued_datagram_is_read_and_its_items_handled_in_order(
        pair: tuple[socket.socket, socket.socket]) -> None:
    """Three datagrams queued (one malformed): the two good ones' items arrive in order with
    the clock of their read, the bad one is reported with its size, and all three are counted."""
    a, b = pair
    for d in (b"x,y", b"!oops", b"z"):
        b.send(d)
    got: list[tuple[str, int]] = []
    bad: list[tuple[str, int]] = []
    ticks = iter(range(100, 200))
    n = read_ready(a, _decode, lambda item, now: got.append((item, now)), clock=lambda: next(ticks),
                   alive=lambda: True, overrun=lambda size: pytest.fail("no overrun here"),
                   bad=lambda exc, size: bad.append((str(exc), size)),
                   failed=lambda exc: pytest.fail(f"unexpected {exc}"))
    assert n == 3
    assert got == [("x", 100), ("y", 100), ("z", 102)]
    assert bad == [("bad datagram b'!oops'", 5)]


def test_nothing_queued_reads_nothing(pair: tuple[socket.socket, socket.socket]) -> None:
    """An empty socket: no handler is called and zero datagrams are counted."""
    a, _ = pair
    assert read_ready(a, _decode, lambda *_: pytest.fail("handled"), clock=lambda: 0,
                      alive=lambda: True, overrun=lambda _: None, bad=lambda *_: None,
                      failed=lambda _: None) == 0


def test_a_handler_that_closes_the_source_stops_the_loop(
        pair: tuple[socket.socket, socket.socket]) -> None:
    """alive() turning false after the first datagram: the second stays queued, unread."""
    a, b = pair
    b.send(b"first")
    b.send(b"second")
    open_ = [True]

    def handle(item: str, now: int) -> None:
        open_[0] = False

    assert read_ready(a, _decode, handle, clock=lambda: 0, alive=lambda: open_[0],
                      overrun=lambda _: None, bad=lambda *_: None, failed=lambda _: None) == 1
    assert a.recv(100) == b"second"


def test_a_socket_error_is_reported_and_ends_the_reading() -> None:
    """A closed descriptor: the OSError goes to ``failed`` once and nothing else happens."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    b.close()
    a.close()
    failures: list[OSError] = []
    assert read_ready(a, _decode, lambda *_: pytest.fail("handled"), clock=lambda: 0,
                      alive=lambda: True, overrun=lambda _: None, bad=lambda *_: None,
                      failed=failures.append) == 0
    assert len(failures) == 1
