"""TCP listeners on the service port, from NETLINK_SOCK_DIAG.

Two uses:

* ``listening``: whether a TCP LISTEN socket is on a port, IPv4 and IPv6, through pyroute2's
  DiagSocket, run in a worker thread (pyroute2 0.9's synchronous sockets refuse to run inside a
  running asyncio loop). The port is filtered on our side (0.7 has no ``sport=``).
* ``ListenerWatch``: the SKNLGRP_INET_TCP_DESTROY and SKNLGRP_INET6_TCP_DESTROY multicast
  groups, read with a stdlib netlink socket registered with ``loop.add_reader``. The groups
  report every TCP socket freed in the namespace; a classic BPF socket filter
  (``_sockfilter.listener_filter``) drops in the kernel those that cannot be a listener on the
  port, so the service's own traffic does not wake the agent. The check in Python stays the
  truth.

Limits of the facility: everything is per network namespace (the one this process is in);
joining the destroy groups may need CAP_NET_ADMIN (6.18 lets any process join and receive);
a destroy is sent only when the last holder of the socket closes it (a child that inherited
the fd keeps the listener alive); the kernel may drop destroy messages under memory pressure;
a destroy message carries inode 0 and the state the socket had when freed (TCP_CLOSE for a
closed listener, not LISTEN), so a listener is recognised by its local port with no peer (port
0, unspecified address); a dual-stack ``::`` listener reports on the IPv6 group; with
SO_REUSEPORT one of several listeners closing is reported although others remain. A fast
path, not the truth: the probe decides.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pyroute2 import DiagSocket
from pyroute2.netlink.diag import SS_LISTEN

from watcher.core.catalogue import Event
from watcher.core.triggers import Evidence, Source, Trigger
from watcher.sources._netlink import NetlinkDecodeError, iter_messages, open_netlink, read_ready
from watcher.sources._sockfilter import listener_filter

__all__ = [
    "NETLINK_SOCK_DIAG",
    "SKNLGRP_INET6_TCP_DESTROY",
    "SKNLGRP_INET_TCP_DESTROY",
    "Listener",
    "ListenerWatch",
    "NetlinkDecodeError",
    "SockEvent",
    "decode_sock_diag",
    "established",
    "listening",
]

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
SKNLGRP_INET_TCP_DESTROY = 1
SKNLGRP_INET6_TCP_DESTROY = 3
TCP_CLOSE = 7
TCP_LISTEN = 10

# struct inet_diag_msg: u8 family, state, timer, retrans; inet_diag_sockid {be16 sport, dport;
# be32 src[4], dst[4]; u32 if; u32 cookie[2]}; u32 expires, rqueue, wqueue, uid, inode.
_MSG_HEAD = struct.Struct("=BBBB")
_PORTS = struct.Struct(">HH")
_TAIL = struct.Struct("=IIIIIIII")  # if, cookie[2], expires, rqueue, wqueue, uid, inode
INET_DIAG_MSG_SIZE = _MSG_HEAD.size + _PORTS.size + 32 + _TAIL.size  # 72


@dataclass(frozen=True)
class Listener:
    """A TCP LISTEN socket: address family (AF_INET/AF_INET6), local address, port, inode."""

    family: int
    address: str
    port: int
    inode: int


@dataclass(frozen=True)
class SockEvent:
    """One inet_diag_msg as sent by the kernel (dump answer or destroy broadcast)."""

    family: int
    state: int
    sport: int
    dport: int
    src: str
    dst: str
    inode: int
    cookie: int

    def is_listener_on(self, port: int) -> bool:
        """True when this is a socket bound to ``port`` with no peer (a listener or a closed one)."""
        return (self.sport == port and self.dport == 0
                and self.state in (TCP_LISTEN, TCP_CLOSE)
                and self.dst in ("0.0.0.0", "::"))


def _address(family: int, raw: bytes) -> str:
    return socket.inet_ntop(family, raw[:4] if family == socket.AF_INET else raw)


def decode_sock_diag(data: bytes) -> list[SockEvent]:
    """Decode a datagram of inet_diag messages (TCP over IPv4/IPv6; others are skipped).

    Raises NetlinkDecodeError, and nothing else, on malformed bytes.
    """
    events = []
    for msg in iter_messages(data):
        if msg.type != SOCK_DIAG_BY_FAMILY:
            continue
        body = msg.payload
        if len(body) < INET_DIAG_MSG_SIZE:
            raise NetlinkDecodeError(
                f"inet_diag_msg needs {INET_DIAG_MSG_SIZE} bytes, have {len(body)}")
        family, state, _timer, _retrans = _MSG_HEAD.unpack_from(body, 0)
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        sport, dport = _PORTS.unpack_from(body, 4)
        src, dst = body[8:24], body[24:40]
        _if, c0, c1, _exp, _rq, _wq, _uid, inode = _TAIL.unpack_from(body, 40)
        events.append(SockEvent(family, state, sport, dport, _address(family, src),
                                _address(family, dst), inode, c0 | (c1 << 32)))
    return events


def _dump(port: int) -> list[Listener]:
    found = []
    with DiagSocket() as ds:
        ds.bind()
        for family in (socket.AF_INET, socket.AF_INET6):
            for msg in ds.get_sock_stats(family=family, states=1 << SS_LISTEN):
                if msg["idiag_sport"] == port and msg["idiag_state"] == TCP_LISTEN:
                    found.append(Listener(msg["idiag_family"], str(msg["idiag_src"]), port,
                                          msg["idiag_inode"]))
    return found


async def listening(port: int) -> bool:
    """True when a TCP LISTEN socket on ``port`` exists; never blocks the running loop."""
    return bool(await asyncio.to_thread(_dump, port))


class ListenerWatch:
    """Emits a DEATH trigger when a TCP listener on ``port`` is destroyed (IPv4 or IPv6).

    ``rcvbuf``, when given, is the initial socket receive buffer size in bytes. When destroys
    were dropped (ENOBUFS) the buffer is grown and a HINT asks for a probe at once.
    ``kernel_filter`` attaches the classic BPF filter for ``port`` (the default).
    """

    def __init__(self, port: int, emit: Callable[[Trigger], None], log: Any, *,
                 clock: Callable[[], int] = time.monotonic_ns, rcvbuf: int | None = None,
                 kernel_filter: bool = True) -> None:
        self.port = port
        self._emit = emit
        self._log = log
        self._clock = clock
        self._rcvbuf = rcvbuf
        self._program = listener_filter(port) if kernel_filter else None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sock: socket.socket | None = None
        self.available = False

    @property
    def filtered(self) -> bool:
        """True when the kernel filter is (to be) attached to the destroy socket."""
        return self._program is not None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Join the destroy groups and start reading; if the kernel refuses, log once and idle."""
        if self._sock is not None:
            return
        try:
            sock = open_netlink(NETLINK_SOCK_DIAG, sock_type=socket.SOCK_RAW,
                                groups=(SKNLGRP_INET_TCP_DESTROY, SKNLGRP_INET6_TCP_DESTROY),
                                rcvbuf=self._rcvbuf, program=self._program)
        except OSError as exc:
            self._log.warning(Event.SOCK_DIAG_DESTROY_UNAVAILABLE,
                              reason=os.strerror(exc.errno) if exc.errno else str(exc))
            return
        self._sock, self._loop, self.available = sock, loop, True
        loop.add_reader(sock.fileno(), self._on_readable)

    def close(self) -> None:
        """Remove the reader and close the socket; safe to call twice."""
        sock, self._sock = self._sock, None
        self.available = False
        if sock is None:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(sock.fileno())
        self._loop = None
        with contextlib.suppress(OSError):
            sock.close()

    def _on_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        read_ready(sock, decode_sock_diag, self._destroyed, clock=self._clock,
                   alive=lambda: self._sock is sock, overrun=self._overrun,
                   bad=self._bad, failed=self._failed)

    def _destroyed(self, event: SockEvent, now: int) -> None:
        if event.is_listener_on(self.port):
            self._emit(Trigger(Source.SOCK_DIAG, f"listener destroyed {event.src} port {self.port}",
                               now, Evidence.DEATH))

    def _overrun(self, rcvbuf: int) -> None:
        # Destroys were dropped: one of them may have been ours. Without the kernel filter
        # every TCP socket of the namespace is reported here, so a busy server can fill the
        # buffer; with it only sockets bound to the port with no peer.
        self._log.warning(Event.SOCK_DIAG_OVERRUN, rcvbuf=rcvbuf)
        self._emit(Trigger(Source.SOCK_DIAG, "overrun", self._clock(), Evidence.HINT))

    def _bad(self, exc: NetlinkDecodeError, size: int) -> None:
        self._log.warning(Event.SOCK_DIAG_BAD_MESSAGE, reason=str(exc), size=size)

    def _failed(self, exc: OSError) -> None:
        self._log.error(Event.SOCK_DIAG_ERROR, reason=os.strerror(exc.errno or 0))
        self.close()


TCP_ESTABLISHED = 1


def established(port: int) -> int:
    """How many ESTABLISHED TCP connections (IPv4 and IPv6) have ``port`` as their local port
    in this network namespace: the sessions a drain waits for. One sock_diag dump of the
    established sockets per call (the port is filtered here); for the CLI, not the event loop;
    raises OSError from netlink."""
    count = 0
    with DiagSocket() as ds:
        ds.bind()
        for family in (socket.AF_INET, socket.AF_INET6):
            for msg in ds.get_sock_stats(family=family, states=1 << TCP_ESTABLISHED):
                if msg["idiag_sport"] == port and msg["idiag_state"] == TCP_ESTABLISHED:
                    count += 1
    return count
