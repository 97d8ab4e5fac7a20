"""sock_diag requests and answers for ending connections: packed and parsed as the kernel does."""

from __future__ import annotations

import contextlib
import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from watcher.sources._netlink import NLMSG_DONE, NetlinkDecodeError, iter_messages, pack_message
from watcher.sources.sock_destroy import (
    SOCK_DESTROY,
    Conn,
    decode_dump,
    is_local_peer,
    pack_destroy,
    pack_dump,
)


def _diag_msg(port: int, peer: str, rq: int, wq: int, times: tuple[int, int, int, int],
              family: int = socket.AF_INET, state: int = 1, cookie: int = 0x1_0000_0002) -> bytes:
    """An inet_diag_msg with an INET_DIAG_INFO attribute, laid out as the kernel sends it."""
    local = "10.0.0.1" if family == socket.AF_INET else "fd00::1"
    raw = lambda a: socket.inet_pton(family, a).ljust(16, b"\0")  # noqa: E731
    head = (struct.pack("=BBBB", family, state, 0, 0) + struct.pack(">HH", port, 40000)
            + raw(local) + raw(peer) + struct.pack("=III", 0, cookie & 0xFFFFFFFF, cookie >> 32)
            + struct.pack("=IIIII", 0, rq, wq, 0, 1234))
    info = bytearray(232)
    struct.pack_into("=IIII", info, 44, *times)
    struct.pack_into("=I", info, 36, 0)
    struct.pack_into("=I", info, 144, 0)
    struct.pack_into("=I", info, 148, 55)
    attr = struct.pack("=HH", 4 + len(info), 2) + bytes(info)
    return pack_message(20, 2, 1, head + attr)


def test_dump_answer_gives_the_port_s_established_connections_with_tcp_info() -> None:
    """Queues, times, cookie, min RTT; another port and another state are left out; DONE ends."""
    data = (_diag_msg(8080, "10.0.0.9", 0, 164, (12, 0, 30, 12))
            + _diag_msg(9090, "10.0.0.9", 0, 0, (1, 1, 1, 1))
            + _diag_msg(8080, "10.0.0.9", 0, 0, (1, 1, 1, 1), state=10)
            + pack_message(NLMSG_DONE, 2, 1, struct.pack("=i", 0)))
    conns, done, err = decode_dump(data, 8080)
    assert done and err == 0 and len(conns) == 1
    c = conns[0]
    assert (c.dst, c.dport, c.rqueue, c.wqueue, c.cookie) == ("10.0.0.9", 40000, 0, 164,
                                                               0x1_0000_0002)
    assert (c.last_data_sent_ms, c.last_data_recv_ms, c.last_ack_recv_ms) == (12, 30, 12)
    assert (c.notsent_bytes, c.retrans, c.min_rtt_us) == (0, 0, 55)


def test_dump_error_answer_reports_its_errno() -> None:
    """NLMSG_ERROR in a dump answer: done, with the positive errno."""
    _conns, done, err = decode_dump(pack_message(2, 0, 1, struct.pack("=i", -95) + bytes(16)), 80)
    assert done and err == 95


def test_destroy_request_names_the_socket_by_id_and_cookie() -> None:
    """SOCK_DESTROY with ACK asked, TCP, the sockid of the dump (ports, addresses, cookie)."""
    c = Conn(socket.AF_INET6, "fd00::1", 8080, "fd00::9", 40000, 3, 0xAABB_CCDD_0011_2233, 0, 0)
    msg = next(iter_messages(pack_destroy(c)))
    assert msg.type == SOCK_DESTROY and msg.flags & 0x5 == 0x5
    family, proto = struct.unpack_from("=BB", msg.payload)
    sport, dport = struct.unpack_from(">HH", msg.payload, 8)
    ifindex, c0, c1 = struct.unpack_from("=III", msg.payload, 44)
    assert (family, proto, sport, dport, ifindex) == (socket.AF_INET6, socket.IPPROTO_TCP,
                                                      8080, 40000, 3)
    assert c0 | (c1 << 32) == c.cookie
    assert socket.inet_ntop(socket.AF_INET6, msg.payload[28:44]) == "fd00::9"
    assert len(msg.payload) == 56


def test_dump_request_asks_for_established_tcp_with_tcp_info() -> None:
    """The dump asks for TCP, state ESTABLISHED only, INET_DIAG_INFO, with NLM_F_DUMP."""
    msg = next(iter_messages(pack_dump(socket.AF_INET)))
    family, proto, ext, states = struct.unpack_from("=BBBxI", msg.payload)
    assert (family, proto, ext, states) == (socket.AF_INET, socket.IPPROTO_TCP, 2, 2)
    assert msg.flags & 0x300 == 0x300


@pytest.mark.parametrize(("src", "dst", "local"), [
    ("10.0.0.1", "127.0.0.1", True), ("::ffff:10.0.0.1", "::ffff:127.0.0.5", True),
    ("::1", "::1", True), ("10.0.0.1", "10.0.0.1", True), ("10.0.0.1", "10.0.0.2", False),
    ("fd00::1", "fd00::2", False)])
def test_local_peers_are_loopback_or_the_socket_s_own_address(src: str, dst: str,
                                                              local: bool) -> None:
    """Loopback (also IPv4-mapped) and a peer at the local address go over lo: never reset."""
    fam = socket.AF_INET6 if ":" in src else socket.AF_INET
    assert is_local_peer(Conn(fam, src, 8080, dst, 1, 0, 0, 0, 0)) is local


def test_ipv4_mapped_peer_counts_as_ipv4() -> None:
    """A dual-stack listener's IPv4 client is counted as an IPv4 peer."""
    assert Conn(socket.AF_INET6, "::ffff:10.0.0.1", 1, "::ffff:10.0.0.2", 2, 0, 0, 0,
                0).peer_family == "ipv4"
    assert Conn(socket.AF_INET6, "fd00::1", 1, "fd00::2", 2, 0, 0, 0, 0).peer_family == "ipv6"


@given(st.binary(max_size=400))
def test_malformed_answers_raise_only_the_decode_error(data: bytes) -> None:
    """Any bytes: decoded, or NetlinkDecodeError, never another exception."""
    with contextlib.suppress(NetlinkDecodeError):
        decode_dump(data, 8080)


@given(st.binary(min_size=72, max_size=300))
def test_malformed_payloads_raise_only_the_decode_error(body: bytes) -> None:
    """A well-framed message with any payload: decoded, or NetlinkDecodeError."""
    with contextlib.suppress(NetlinkDecodeError):
        decode_dump(pack_message(20, 2, 1, body), 8080)
