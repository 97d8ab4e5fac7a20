"""Small stdlib netlink helpers shared by the proc connector and sock_diag sources.

Only what the two sources need: open a non-blocking netlink socket (with a socket filter
when asked), split a datagram into
netlink messages (a pure function that raises :class:`NetlinkDecodeError` on malformed input,
never anything else), grow the receive buffer after an overrun, and the one receive loop both
sources run when their socket is readable (``read_ready``).
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

from watcher.sources._sockfilter import attach_filter

__all__ = [
    "NLMSG_DONE",
    "NLMSG_HDR",
    "SOL_NETLINK",
    "NetlinkDecodeError",
    "NlMessage",
    "grow_rcvbuf",
    "iter_messages",
    "open_netlink",
    "pack_message",
    "read_ready",
]

T = TypeVar("T")

SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NLMSG_DONE = 3
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)

# struct nlmsghdr: u32 len, u16 type, u16 flags, u32 seq, u32 port id (host byte order).
NLMSG_HDR = struct.Struct("=IHHII")


class NetlinkDecodeError(ValueError):
    """Bytes that are not a well-formed netlink message (truncated, bad length, bad payload)."""


@dataclass(frozen=True)
class NlMessage:
    """One netlink message: header fields and the payload after the 16-byte header."""

    type: int
    flags: int
    seq: int
    port_id: int
    payload: bytes


def _align4(n: int) -> int:
    return (n + 3) & ~3


def iter_messages(data: bytes) -> Iterator[NlMessage]:
    """Yield each netlink message of a datagram; raise NetlinkDecodeError on a malformed one."""
    offset = 0
    size = len(data)
    while offset < size:
        if size - offset < NLMSG_HDR.size:
            raise NetlinkDecodeError(f"truncated netlink header at offset {offset}")
        length, typ, flags, seq, port_id = NLMSG_HDR.unpack_from(data, offset)
        if length < NLMSG_HDR.size or offset + length > size:
            raise NetlinkDecodeError(
                f"netlink length {length} at offset {offset} does not fit {size} bytes")
        yield NlMessage(typ, flags, seq, port_id, bytes(data[offset + NLMSG_HDR.size:
                                                             offset + length]))
        offset += _align4(length)


def pack_message(typ: int, flags: int, seq: int, payload: bytes) -> bytes:
    """A netlink message with a correct header (port id 0: the kernel fills ours in)."""
    return NLMSG_HDR.pack(NLMSG_HDR.size + len(payload), typ, flags, seq, 0) + payload


def open_netlink(protocol: int, *, sock_type: int = socket.SOCK_DGRAM,
                 groups: tuple[int, ...] = (), rcvbuf: int | None = None,
                 program: bytes | None = None) -> socket.socket:
    """A bound, non-blocking, close-on-exec netlink socket joined to the given multicast groups,
    with an initial receive buffer of ``rcvbuf`` bytes when given, and the classic BPF
    ``program`` attached before it is bound, so no datagram reaches it unfiltered.

    Raises OSError from the kernel as is (EPROTONOSUPPORT, EPERM, ...); the socket is closed
    on failure.
    """
    sock = socket.socket(socket.AF_NETLINK, sock_type | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                         protocol)
    try:
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if program is not None:
            attach_filter(sock, program)
        sock.bind((0, 0))
        for group in groups:
            sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
    except BaseException:
        sock.close()
        raise
    return sock


def grow_rcvbuf(sock: socket.socket) -> int:
    """Double the receive buffer (forcing past rmem_max when permitted); return the new size."""
    current = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    # At least 1 MiB, at most 64 MiB (the kernel stores and reports twice what is asked).
    wanted = min(max(current * 2, 1 << 20), 64 << 20)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, wanted)
    except PermissionError:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, wanted)
    return int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))


def read_ready(sock: socket.socket, decode: Callable[[bytes], Sequence[T]],
               handle: Callable[[T, int], None], *, clock: Callable[[], int],
               alive: Callable[[], bool], overrun: Callable[[int], None],
               bad: Callable[[NetlinkDecodeError, int], None],
               failed: Callable[[OSError], None]) -> int:
    """Read every datagram queued on the non-blocking ``sock`` while ``alive()``; return how many.

    Each datagram is decoded and each item handed to ``handle`` with the ``clock()`` of its
    read. ENOBUFS (datagrams were dropped) grows the receive buffer and calls ``overrun`` with
    its new size, then reading goes on; a datagram that does not decode goes to ``bad`` (the
    error and its size) and is skipped; any other error goes to ``failed`` and ends the reading.
    """
    read = 0
    while alive():
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return read
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:
                overrun(grow_rcvbuf(sock))
                continue
            failed(exc)
            return read
        read += 1
        now = clock()
        try:
            items = decode(data)
        except NetlinkDecodeError as exc:
            bad(exc, len(data))
            continue
        for item in items:
            handle(item, now)
    return read
