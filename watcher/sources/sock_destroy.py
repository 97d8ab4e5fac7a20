"""Established TCP connections to the service port, read and ended through NETLINK_SOCK_DIAG.

* ``dump_established(port)``: every ESTABLISHED TCP socket whose local port is ``port`` (IPv4
  and IPv6, one SOCK_DIAG_BY_FAMILY dump per family), with the queue sizes of its
  ``inet_diag_msg`` and the times of its ``struct tcp_info`` (INET_DIAG_INFO).
* ``destroy(conn)``: SOCK_DESTROY (message type 21) naming the socket by its id and cookie; the
  kernel aborts it (``tcp_abort``): the peer gets a reset, the local holder ECONNABORTED.
  Needs CAP_NET_ADMIN and a kernel built with CONFIG_INET_DIAG_DESTROY (EOPNOTSUPP otherwise).
* ``reset_connections(port, keep)``: one dump, then a destroy for each connection from a peer
  other than loopback that ``keep`` does not keep; the counts per family. A kernel without
  SOCK_DESTROY, or a destroy refused, ends the round with what was done so far and the reason.

Blocking, stdlib sockets only: for a worker thread, never the event loop. The parsers are pure
and raise NetlinkDecodeError, and nothing else, on malformed bytes.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from watcher.sources._netlink import NLMSG_DONE, NetlinkDecodeError, iter_messages, pack_message

__all__ = [
    "SOCK_DESTROY",
    "Conn",
    "ResetOutcome",
    "decode_dump",
    "destroy",
    "dump_established",
    "is_local_peer",
    "pack_destroy",
    "pack_dump",
    "reset_connections",
]

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
SOCK_DESTROY = 21
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
TCP_ESTABLISHED = 1
INET_DIAG_INFO = 2
INET_DIAG_NOCOOKIE = 0xFFFFFFFF

# struct inet_diag_req_v2: u8 family, protocol, ext, pad; u32 states; then inet_diag_sockid.
_REQ_HEAD = struct.Struct("=BBBxI")
# struct inet_diag_sockid: be16 sport, dport; be32 src[4], dst[4]; u32 if; u32 cookie[2].
_ID_PORTS = struct.Struct(">HH")
_ID_TAIL = struct.Struct("=III")
# struct inet_diag_msg: u8 family, state, timer, retrans; sockid; u32 expires, rqueue, wqueue,
# uid, inode.
_MSG_HEAD = struct.Struct("=BBBB")
_MSG_TAIL = struct.Struct("=IIIII")
_MSG_SIZE = 72
_RTA = struct.Struct("=HH")
# struct tcp_info: 8 bytes of u8 fields, then u32 rto, ato, snd_mss, rcv_mss, unacked, sacked,
# lost, retrans, fackets, last_data_sent, last_ack_sent, last_data_recv, last_ack_recv (ms ago).
_TCPI_TIMES = struct.Struct("=IIII")
_TCPI_TIMES_AT = 44
_TCPI_RETRANS_AT = 36  # u32 tcpi_retrans: segments retransmitted and not yet acknowledged
_TCPI_NOTSENT_AT = 144  # u32 tcpi_notsent_bytes (Linux 4.6 on)
_TCPI_MIN_RTT_AT = 148  # u32 tcpi_min_rtt, microseconds (Linux 4.6 on)
_U32 = struct.Struct("=I")


@dataclass(frozen=True)
class Conn:
    """One established TCP connection to the port: its id (for SOCK_DESTROY), queues and times.

    ``rqueue``: bytes received that the service has not read; ``wqueue``: bytes written that the
    peer has not acknowledged; ``last_data_*_ms``/``last_ack_recv_ms``: milliseconds since the
    last data sent/received and the last ACK received (None: the kernel sent no tcp_info)."""

    family: int  # the socket's (AF_INET, AF_INET6)
    src: str
    sport: int
    dst: str
    dport: int
    ifindex: int
    cookie: int
    rqueue: int
    wqueue: int
    last_data_sent_ms: int | None = None
    last_data_recv_ms: int | None = None
    last_ack_recv_ms: int | None = None
    notsent_bytes: int | None = None
    retrans: int | None = None
    min_rtt_us: int | None = None

    @property
    def peer_family(self) -> str:
        """"ipv4" or "ipv6": the peer's address family (an IPv4-mapped peer counts as ipv4)."""
        if self.family == socket.AF_INET:
            return "ipv4"
        return "ipv4" if ipaddress.IPv6Address(self.dst).ipv4_mapped is not None else "ipv6"


def is_local_peer(c: Conn) -> bool:
    """True when the peer is this host: a loopback address, or the connection's own local
    address (such traffic goes over ``lo``, which the REJECT rule exempts as well)."""
    addr = ipaddress.ip_address(c.dst)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback or c.dst == c.src


def _raw(family: int, text: str) -> bytes:
    return socket.inet_pton(family, text).ljust(16, b"\0")


def pack_dump(family: int, seq: int = 1) -> bytes:
    """The netlink request dumping ``family``'s ESTABLISHED TCP sockets with their tcp_info."""
    body = (_REQ_HEAD.pack(family, socket.IPPROTO_TCP, 1 << (INET_DIAG_INFO - 1),
                           1 << TCP_ESTABLISHED)
            + _ID_PORTS.pack(0, 0) + bytes(32)
            + _ID_TAIL.pack(0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE))
    return pack_message(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, body)


def pack_destroy(c: Conn, seq: int = 1) -> bytes:
    """The netlink request ending ``c``: SOCK_DESTROY with its full id and cookie, ACK asked."""
    body = (_REQ_HEAD.pack(c.family, socket.IPPROTO_TCP, 0, 1 << TCP_ESTABLISHED)
            + _ID_PORTS.pack(c.sport, c.dport) + _raw(c.family, c.src) + _raw(c.family, c.dst)
            + _ID_TAIL.pack(c.ifindex, c.cookie & 0xFFFFFFFF, c.cookie >> 32))
    return pack_message(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, seq, body)


def _attrs(data: bytes) -> Iterator[tuple[int, bytes]]:
    off = 0
    while off + _RTA.size <= len(data):
        length, typ = _RTA.unpack_from(data, off)
        if length < _RTA.size or off + length > len(data):
            raise NetlinkDecodeError(f"rtattr length {length} at offset {off} does not fit")
        yield typ, data[off + _RTA.size:off + length]
        off += (length + 3) & ~3


def _address(family: int, raw: bytes) -> str:
    return socket.inet_ntop(family, raw[:4] if family == socket.AF_INET else raw)


def decode_dump(data: bytes, port: int) -> tuple[list[Conn], bool, int]:
    """The ESTABLISHED connections with local port ``port`` in one datagram of a dump answer,
    whether the dump is done (NLMSG_DONE), and the errno of an NLMSG_ERROR (0: none)."""
    conns: list[Conn] = []
    for msg in iter_messages(data):
        if msg.type == NLMSG_DONE:
            return conns, True, 0
        if msg.type == NLMSG_ERROR:
            if len(msg.payload) < 4:
                raise NetlinkDecodeError("truncated NLMSG_ERROR")
            err = -struct.unpack_from("=i", msg.payload)[0]
            return conns, True, err
        if msg.type != SOCK_DIAG_BY_FAMILY:
            continue
        body = msg.payload
        if len(body) < _MSG_SIZE:
            raise NetlinkDecodeError(f"inet_diag_msg needs {_MSG_SIZE} bytes, have {len(body)}")
        family, state, _timer, _retrans = _MSG_HEAD.unpack_from(body, 0)
        sport, dport = _ID_PORTS.unpack_from(body, 4)
        if family not in (socket.AF_INET, socket.AF_INET6) or state != TCP_ESTABLISHED \
                or sport != port:
            continue
        ifindex, c0, c1 = _ID_TAIL.unpack_from(body, 40)
        _expires, rqueue, wqueue, _uid, _inode = _MSG_TAIL.unpack_from(body, 52)
        times: tuple[int, ...] | tuple[None, ...] = (None, None, None, None)
        retrans = rtt = notsent = None
        for typ, value in _attrs(body[_MSG_SIZE:]):
            if typ == INET_DIAG_INFO and len(value) >= _TCPI_TIMES_AT + _TCPI_TIMES.size:
                times = _TCPI_TIMES.unpack_from(value, _TCPI_TIMES_AT)
                retrans = _U32.unpack_from(value, _TCPI_RETRANS_AT)[0]
                if len(value) >= _TCPI_MIN_RTT_AT + 4:
                    notsent = _U32.unpack_from(value, _TCPI_NOTSENT_AT)[0]
                    rtt = _U32.unpack_from(value, _TCPI_MIN_RTT_AT)[0]
        sent, _ack_sent, recv, ack_recv = times
        conns.append(Conn(family, _address(family, body[8:24]), sport,
                          _address(family, body[24:40]), dport, ifindex, c0 | (c1 << 32),
                          rqueue, wqueue, sent, recv, ack_recv, notsent, retrans, rtt))
    return conns, False, 0


def _open(timeout_s: float) -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                         NETLINK_SOCK_DIAG)
    sock.settimeout(timeout_s)
    sock.bind((0, 0))
    return sock


def _dump(sock: socket.socket, family: int, port: int) -> list[Conn]:
    sock.send(pack_dump(family))
    found: list[Conn] = []
    while True:
        conns, done, err = decode_dump(sock.recv(1 << 16), port)
        found += conns
        if err:
            raise OSError(err, os.strerror(err))
        if done:
            return found


def dump_established(port: int, *, timeout_s: float = 2.0) -> list[Conn]:
    """Every ESTABLISHED TCP connection whose local port is ``port`` in this network namespace
    (IPv4 and IPv6 sockets); raises OSError from netlink."""
    with _open(timeout_s) as sock:
        return [c for fam in (socket.AF_INET, socket.AF_INET6) for c in _dump(sock, fam, port)]


def _destroy(sock: socket.socket, c: Conn) -> int:
    """SOCK_DESTROY ``c`` on ``sock``; the errno of the kernel's answer (0: destroyed)."""
    sock.send(pack_destroy(c))
    for msg in iter_messages(sock.recv(8192)):
        if msg.type == NLMSG_ERROR:
            if len(msg.payload) < 4:
                raise NetlinkDecodeError("truncated NLMSG_ERROR")
            return int(-struct.unpack_from("=i", msg.payload)[0])
    raise NetlinkDecodeError("no answer to SOCK_DESTROY")


def destroy(c: Conn, *, timeout_s: float = 2.0) -> None:
    """End ``c`` (the peer gets a reset); raises OSError with the kernel's errno."""
    with _open(timeout_s) as sock:
        err = _destroy(sock, c)
    if err:
        raise OSError(err, os.strerror(err))


@dataclass(frozen=True)
class ResetOutcome:
    """What one round did: connections ended per peer family, connections kept (counted only
    from peers other than loopback), and why it stopped early ("" if it did not);
    ``unsupported``: the kernel has no SOCK_DESTROY."""

    reset: dict[str, int] = field(default_factory=lambda: {"ipv4": 0, "ipv6": 0})
    kept: int = 0
    error: str = ""
    unsupported: bool = False
    duration_ns: int = 0


def reset_connections(port: int, keep: Callable[[Conn], bool], *, timeout_s: float = 2.0,
                      clock: Callable[[], int] = time.monotonic_ns) -> ResetOutcome:
    """End every ESTABLISHED connection to ``port`` from a peer other than this host that
    ``keep`` does not keep. Never raises for a kernel refusal: the outcome says it."""
    started = clock()
    reset = {"ipv4": 0, "ipv6": 0}
    kept = 0
    try:
        with _open(timeout_s) as sock:
            conns = [c for fam in (socket.AF_INET, socket.AF_INET6)
                     for c in _dump(sock, fam, port)]
            for c in conns:
                if is_local_peer(c):
                    continue
                if keep(c):
                    kept += 1
                    continue
                err = _destroy(sock, c)
                if err == errno.ENOENT:  # it ended on its own between the dump and now
                    continue
                if err:
                    return ResetOutcome(reset, kept, f"SOCK_DESTROY: {os.strerror(err)}",
                                        err == errno.EOPNOTSUPP, clock() - started)
                reset[c.peer_family] += 1
    except (OSError, NetlinkDecodeError) as exc:
        reason = os.strerror(exc.errno) if isinstance(exc, OSError) and exc.errno else str(exc)
        return ResetOutcome(reset, kept, f"sock_diag: {reason}", False, clock() - started)
    return ResetOutcome(reset, kept, "", False, clock() - started)
