"""The sock_diag destroy decoder, on bytes captured from the real kernel and on garbage."""

from __future__ import annotations

import contextlib
import json
import socket
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from watcher.sources._netlink import NetlinkDecodeError, iter_messages, pack_message
from watcher.sources._sockfilter import listener_filter
from watcher.sources.sock_diag import (
    SOCK_DIAG_BY_FAMILY,
    ListenerWatch,
    SockEvent,
    decode_sock_diag,
)

DATA = Path(__file__).parent / "data"
EXPECTED = json.loads((DATA / "expected.json").read_text())["diag"]


def _captured(name: str) -> SockEvent:
    (event,) = decode_sock_diag((DATA / f"diag_destroy_{name}.bin").read_bytes())
    return event


@pytest.mark.parametrize(("name", "family", "address"), [
    ("v4", socket.AF_INET, "127.0.0.1"),
    ("v6", socket.AF_INET6, "::1"),
    ("dual", socket.AF_INET6, "::"),
])
def test_listener_destroy_captured(name: str, family: int, address: str) -> None:
    """A closed listener's destroy names family, address and port, inode 0, and matches."""
    event = _captured(name)
    assert (event.family, event.src, event.sport, event.inode) == (family, address, 8080, 0)
    assert event.is_listener_on(8080)
    assert not event.is_listener_on(8081)


def test_listener_destroy_reports_close_not_listen() -> None:
    """The kernel reports a destroyed listener in TCP_CLOSE with no peer (why we match so)."""
    event = _captured("v4")
    assert (event.state, event.dport, event.dst) == (7, 0, "0.0.0.0")


def test_accepted_connection_is_not_a_listener() -> None:
    """The destroy of an accepted connection on the port (it has a peer) does not match."""
    event = _captured("accepted")
    assert event.sport == 8080 and event.dport == EXPECTED["accepted_peer_port"]
    assert not event.is_listener_on(8080)


@pytest.mark.parametrize("name", ["client", "unbound", "other_port"])
def test_other_sockets_are_not_listeners_on_the_port(name: str) -> None:
    """A client of the port, an unbound socket and another port's listener do not match."""
    assert not _captured(name).is_listener_on(8080)


def test_a_bound_socket_that_never_listened_matches() -> None:
    """A socket bound to the port with no peer matches like a listener (the probe decides)."""
    event = _captured("bound")
    assert (event.sport, event.dport, event.state) == (8080, 0, 7)
    assert event.is_listener_on(8080)


def test_other_message_types_are_skipped() -> None:
    """A netlink message of another type in the datagram yields nothing."""
    (msg,) = iter_messages((DATA / "diag_destroy_v4.bin").read_bytes())
    assert decode_sock_diag(pack_message(SOCK_DIAG_BY_FAMILY + 1, 0, 0, msg.payload)) == []


def test_short_message_is_an_error() -> None:
    """An inet_diag_msg shorter than 72 bytes raises NetlinkDecodeError."""
    (msg,) = iter_messages((DATA / "diag_destroy_v4.bin").read_bytes())
    with pytest.raises(NetlinkDecodeError):
        decode_sock_diag(pack_message(SOCK_DIAG_BY_FAMILY, 0, 0, msg.payload[:71]))


@given(st.binary(max_size=200))
def test_garbage_never_crashes(data: bytes) -> None:
    """Arbitrary bytes decode to events or raise NetlinkDecodeError, never anything else."""
    with contextlib.suppress(NetlinkDecodeError):
        decode_sock_diag(data)


@given(st.sampled_from(["v4", "v6", "dual", "accepted", "client", "bound", "unbound"]),
       st.integers(0, 379),
       st.binary(min_size=1, max_size=8))
def test_mutated_capture_never_crashes(name: str, at: int, noise: bytes) -> None:
    """A captured datagram with bytes overwritten decodes or raises NetlinkDecodeError."""
    raw = bytearray((DATA / f"diag_destroy_{name}.bin").read_bytes())
    raw[at:at + len(noise)] = noise
    with contextlib.suppress(NetlinkDecodeError):
        decode_sock_diag(bytes(raw))


def test_the_watch_builds_the_filter_for_its_own_port() -> None:
    """A watch (made anew on each reload) filters for its port unless built without the filter;
    no environment variable turns it off (the benchmark builds its own variant)."""
    watch = ListenerWatch(8081, lambda t: None, None)
    assert watch.filtered and watch._program == listener_filter(8081) != listener_filter(8080)
    assert not ListenerWatch(8081, lambda t: None, None, kernel_filter=False).filtered
