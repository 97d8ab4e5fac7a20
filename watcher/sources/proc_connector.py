"""Fork, exec and exit of every process, from the kernel's proc connector (NETLINK_CONNECTOR).

Limits of the facility:

* It exists only in the initial network namespace: elsewhere the subscription is refused
  (ECONNREFUSED) and the source degrades with one warning line and does nothing; the daemon
  then relies on the pidfd.
* Subscribing needs CAP_NET_ADMIN (the kernel acknowledges with EPERM otherwise).
* PIDs are those of the initial PID namespace.
* It reports every process of the host: a busy host sends many messages, and when the socket
  buffer fills the kernel drops them (ENOBUFS on our side). The source then grows the buffer,
  logs ``proc-connector-overrun`` and emits a HINT so the daemon probes at once.
* An exit is reported per thread; only the thread-group leader's exit (pid == tgid) counts as
  the process's death. A leader that calls pthread_exit while other threads run is reported as
  dead too early: the pidfd remains the authority.

Implemented with the standard library's socket and struct on every pyroute2 version: pyroute2
0.7.2 has no ProcEventSocket, and 0.9's is built on its own asyncio core whose synchronous
``get()`` cannot run inside the daemon's running loop, so it does not fit ``add_reader``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from watcher.core.catalogue import Event
from watcher.core.triggers import Evidence, Source, Trigger
from watcher.sources._netlink import (
    NLMSG_DONE,
    NetlinkDecodeError,
    iter_messages,
    open_netlink,
    pack_message,
    read_ready,
)

__all__ = [
    "CN_IDX_PROC",
    "NETLINK_CONNECTOR",
    "NetlinkDecodeError",
    "ProcConnectorSource",
    "ProcEvent",
    "ProcEventKind",
    "decode_proc_events",
    "subscribe_message",
]

NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN = 1
PROC_CN_MCAST_IGNORE = 2

# struct cn_msg: cb_id {u32 idx, u32 val}, u32 seq, u32 ack, u16 len, u16 flags.
_CN_MSG = struct.Struct("=IIIIHH")
# struct proc_event header: u32 what, u32 cpu, u64 timestamp_ns (aligned).
_PROC_HDR = struct.Struct("=IIQ")
_U32x2 = struct.Struct("=II")
_U32x4 = struct.Struct("=IIII")
_U32x6 = struct.Struct("=IIIIII")
_U32 = struct.Struct("=I")


class ProcEventKind(enum.IntEnum):
    """``enum what`` of linux/cn_proc.h (the kinds this module names; others are OTHER)."""

    NONE = 0  # the acknowledgement of a (un)subscription, carries an errno
    FORK = 0x00000001
    EXEC = 0x00000002
    UID = 0x00000004
    GID = 0x00000040
    SID = 0x00000080
    PTRACE = 0x00000100
    COMM = 0x00000200
    NONZERO_EXIT = 0x20000000
    COREDUMP = 0x40000000
    EXIT = 0x80000000
    OTHER = -1


@dataclass(frozen=True)
class ProcEvent:
    """One decoded proc connector event; fields that the kind does not carry are 0.

    ``pid``/``tgid`` are the subject (the child for FORK); ``parent_*`` the parent for FORK and
    EXIT; ``timestamp_ns`` is the kernel's CLOCK_MONOTONIC time of the event; ``err`` is the
    errno of an acknowledgement (kind NONE).
    """

    kind: ProcEventKind
    what: int
    cpu: int
    timestamp_ns: int
    pid: int = 0
    tgid: int = 0
    parent_pid: int = 0
    parent_tgid: int = 0
    exit_code: int = 0
    exit_signal: int = 0
    err: int = 0
    cn_seq: int = 0
    cn_ack: int = 0


def _need(data: bytes, offset: int, size: int, what: str) -> None:
    if len(data) - offset < size:
        raise NetlinkDecodeError(f"{what}: need {size} bytes at {offset}, have {len(data) - offset}")


def _decode_one(payload: bytes) -> ProcEvent | None:
    _need(payload, 0, _CN_MSG.size, "cn_msg")
    idx, val, seq, ack, length, _flags = _CN_MSG.unpack_from(payload, 0)
    if (idx, val) != (CN_IDX_PROC, CN_VAL_PROC):
        return None  # another connector user: not ours to decode
    body = payload[_CN_MSG.size:]
    if length > len(body):
        raise NetlinkDecodeError(f"cn_msg.len {length} exceeds the {len(body)} bytes present")
    body = body[:length]
    _need(body, 0, _PROC_HDR.size, "proc_event")
    what, cpu, ts = _PROC_HDR.unpack_from(body, 0)
    off = _PROC_HDR.size
    try:
        kind = ProcEventKind(what)
    except ValueError:
        kind = ProcEventKind.OTHER
    base = {"kind": kind, "what": what, "cpu": cpu, "timestamp_ns": ts, "cn_seq": seq,
            "cn_ack": ack}
    if kind is ProcEventKind.NONE:
        _need(body, off, _U32.size, "ack")
        return ProcEvent(**base, err=_U32.unpack_from(body, off)[0])
    if kind is ProcEventKind.FORK:
        _need(body, off, _U32x4.size, "fork")
        ppid, ptgid, cpid, ctgid = _U32x4.unpack_from(body, off)
        return ProcEvent(**base, pid=cpid, tgid=ctgid, parent_pid=ppid, parent_tgid=ptgid)
    if kind is ProcEventKind.EXIT:
        # Kernels before 4.17 end after exit_signal (no parent fields): accept both sizes.
        _need(body, off, _U32x4.size, "exit")
        if len(body) - off >= _U32x6.size:
            pid, tgid, code, sig, ppid, ptgid = _U32x6.unpack_from(body, off)
        else:
            (pid, tgid, code, sig), ppid, ptgid = _U32x4.unpack_from(body, off), 0, 0
        return ProcEvent(**base, pid=pid, tgid=tgid, exit_code=code, exit_signal=sig,
                         parent_pid=ppid, parent_tgid=ptgid)
    # Every other kind starts with process_pid, process_tgid.
    _need(body, off, _U32x2.size, kind.name.lower())
    pid, tgid = _U32x2.unpack_from(body, off)
    return ProcEvent(**base, pid=pid, tgid=tgid)


def decode_proc_events(data: bytes) -> list[ProcEvent]:
    """Decode one datagram from the proc connector.

    Returns the proc events in it (messages of other connector users and other netlink types
    are skipped); raises NetlinkDecodeError, and nothing else, on malformed bytes.
    """
    events = []
    for msg in iter_messages(data):
        if msg.type != NLMSG_DONE:
            continue
        event = _decode_one(msg.payload)
        if event is not None:
            events.append(event)
    return events


def subscribe_message(op: int, seq: int, ack: int) -> bytes:
    """The netlink datagram that (un)subscribes to proc events (PROC_CN_MCAST_LISTEN/IGNORE)."""
    body = _U32.pack(op)
    cn = _CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, seq, ack, len(body), 0) + body
    return pack_message(NLMSG_DONE, 0, seq, cn)


class ProcConnectorSource:
    """Watches one tgid: its EXIT emits a DEATH trigger, its EXEC a HINT.

    ``on_event``, when given, sees every decoded event (all processes of the host);
    ``rcvbuf``, when given, is the initial socket receive buffer size in bytes.
    """

    def __init__(self, emit: Callable[[Trigger], None], log: Any, *,
                 clock: Callable[[], int] = time.monotonic_ns,
                 on_event: Callable[[ProcEvent], None] | None = None,
                 rcvbuf: int | None = None) -> None:
        self._emit = emit
        self._log = log
        self._clock = clock
        self._on_event = on_event
        self._rcvbuf = rcvbuf
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sock: socket.socket | None = None
        self._pid: int | None = None
        self._seq = os.getpid() & 0xFFFFFFFF
        self._nonce = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
        self.available = False

    @property
    def watched(self) -> int | None:
        """The tgid whose exit and exec are reported, or None."""
        return self._pid

    def watch_pid(self, pid: int | None) -> None:
        """Report the exit and exec of ``pid`` from now on (None: report nothing)."""
        self._pid = pid

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Subscribe and start reading; where the facility is missing, log one warning and idle."""
        if self._sock is not None:
            return
        try:
            sock = open_netlink(NETLINK_CONNECTOR, groups=(CN_IDX_PROC,), rcvbuf=self._rcvbuf)
        except OSError as exc:
            self._unavailable(exc)
            return
        try:
            sock.send(subscribe_message(PROC_CN_MCAST_LISTEN, self._seq, self._nonce))
        except OSError as exc:
            sock.close()
            self._unavailable(exc)
            return
        self._sock, self._loop, self.available = sock, loop, True
        loop.add_reader(sock.fileno(), self._on_readable)

    def close(self) -> None:
        """Unsubscribe, remove the reader and close the socket; safe to call twice."""
        sock, self._sock = self._sock, None
        self.available = False
        if sock is None:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(sock.fileno())
        self._loop = None
        with contextlib.suppress(OSError):
            sock.send(subscribe_message(PROC_CN_MCAST_IGNORE, self._seq + 1, self._nonce))
        sock.close()

    def _unavailable(self, exc: OSError) -> None:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        if exc.errno == errno.ECONNREFUSED:
            reason += " (not the initial network namespace)"
        self._log.warning(Event.PROC_CONNECTOR_UNAVAILABLE, reason=reason)

    def _on_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        read_ready(sock, decode_proc_events, self._handle, clock=self._clock,
                   alive=lambda: self._sock is sock, overrun=self._overrun, bad=self._bad,
                   failed=self._failed)

    def _overrun(self, rcvbuf: int) -> None:
        self._log.warning(Event.PROC_CONNECTOR_OVERRUN, rcvbuf=rcvbuf)
        self._emit(Trigger(Source.PROC_CONNECTOR, "overrun", self._clock(), Evidence.HINT))

    def _bad(self, exc: NetlinkDecodeError, size: int) -> None:
        self._log.warning(Event.PROC_CONNECTOR_BAD_MESSAGE, reason=str(exc), size=size)

    def _failed(self, exc: OSError) -> None:
        self._log.error(Event.PROC_CONNECTOR_ERROR, reason=os.strerror(exc.errno or 0))
        self.close()

    def _handle(self, event: ProcEvent, now: int) -> None:
        if self._on_event is not None:
            self._on_event(event)
        kind = event.kind
        if kind is ProcEventKind.NONE:
            # The kernel echoes our ack + 1 (its seq is its own counter): ours, not a neighbour's.
            if event.cn_ack == self._nonce + 1 and event.err:
                self._log.warning(Event.PROC_CONNECTOR_UNAVAILABLE, reason=os.strerror(event.err))
                self.close()
            return
        pid = self._pid
        if pid is None or event.tgid != pid:
            return
        if kind is ProcEventKind.EXIT and event.pid == event.tgid:
            self._pid = None
            self._emit(Trigger(Source.PROC_CONNECTOR, f"exit pid {pid}", now, Evidence.DEATH))
        elif kind is ProcEventKind.EXEC:
            self._emit(Trigger(Source.PROC_CONNECTOR, f"exec pid {pid}", now, Evidence.HINT))
