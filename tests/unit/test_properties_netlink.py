"""Fuzzing the netlink decoders we wrote ourselves: only the documented error, ever.

``iter_messages``, ``decode_proc_events`` and ``decode_sock_diag`` read bytes from the kernel;
a malformed datagram must raise ``NetlinkDecodeError`` (a ValueError) and nothing else: no
struct.error, IndexError, OSError from inet_ntop, or an endless loop. Random bytes alone rarely
get past the header, so datagrams are also built from well-formed headers around random
payloads, and well-formed messages are checked to round-trip.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from watcher.sources._netlink import NLMSG_HDR, NetlinkDecodeError, iter_messages, pack_message
from watcher.sources.proc_connector import (
    CN_IDX_PROC,
    ProcEventKind,
    decode_proc_events,
)
from watcher.sources.sock_diag import SOCK_DIAG_BY_FAMILY, decode_sock_diag

NLMSG_DONE = 3
CN_VAL_PROC = 1
_CN_MSG = struct.Struct("=IIIIHH")
_PROC_HDR = struct.Struct("=IIQ")
KINDS = [k.value for k in ProcEventKind if k.value >= 0]


def _header(length: int, typ: int) -> bytes:
    return NLMSG_HDR.pack(length, typ, 0, 0, 0)


# A message whose header length may lie about its payload.
lying = st.builds(lambda typ, payload, delta: _header(max(0, NLMSG_HDR.size + len(payload) + delta)
                                                       % (1 << 32), typ) + payload,
                  st.sampled_from([NLMSG_DONE, SOCK_DIAG_BY_FAMILY, 1, 2, 4, 0xFFFF]),
                  st.binary(max_size=120), st.integers(-40, 40))


def _cn(payload: bytes, length: int | None = None, idx: int = CN_IDX_PROC) -> bytes:
    body = _CN_MSG.pack(idx, CN_VAL_PROC, 1, 2, len(payload) if length is None else length, 0)
    return pack_message(NLMSG_DONE, 0, 0, body + payload)


proc_payloads = st.builds(
    lambda what, cpu, ts, rest: _PROC_HDR.pack(what, cpu, ts) + rest,
    st.one_of(st.sampled_from(KINDS), st.integers(0, 2**32 - 1)),
    st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1), st.binary(max_size=40))
proc_datagrams = st.lists(
    st.one_of(
        st.builds(_cn, proc_payloads),
        st.builds(_cn, proc_payloads, st.integers(0, 0xFFFF)),  # cn_msg.len may lie
        st.builds(_cn, st.binary(max_size=40), st.none(), st.integers(0, 5)),
        lying,
    ),
    max_size=5).map(b"".join)

diag_payloads = st.builds(
    lambda family, state, rest: bytes([family, state, 0, 0]) + rest,
    st.sampled_from([socket.AF_INET, socket.AF_INET6, 0, 1, 255]), st.integers(0, 255),
    st.binary(min_size=0, max_size=100))
diag_datagrams = st.lists(
    st.one_of(st.builds(lambda p: pack_message(SOCK_DIAG_BY_FAMILY, 2, 0, p), diag_payloads),
              lying),
    max_size=5).map(b"".join)


def _only_decode_error(fn: Callable[[bytes], object], data: bytes) -> None:
    with contextlib.suppress(NetlinkDecodeError):
        fn(data)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200), lying, proc_datagrams, diag_datagrams))
def test_iter_messages_raises_only_the_decode_error(data: bytes) -> None:
    """Any bytes: iter_messages yields in-bounds messages or raises NetlinkDecodeError, and ends."""
    try:
        msgs = list(iter_messages(data))
    except NetlinkDecodeError:
        return
    assert sum(NLMSG_HDR.size + len(m.payload) for m in msgs) <= len(data)
    assert len(msgs) <= len(data) // NLMSG_HDR.size


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200), proc_datagrams))
def test_decode_proc_events_raises_only_the_decode_error(data: bytes) -> None:
    """Any bytes: decode_proc_events returns events or raises NetlinkDecodeError, nothing else."""
    _only_decode_error(decode_proc_events, data)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200), diag_datagrams))
def test_decode_sock_diag_raises_only_the_decode_error(data: bytes) -> None:
    """Any bytes: decode_sock_diag returns events or raises NetlinkDecodeError, nothing else."""
    _only_decode_error(decode_sock_diag, data)


@given(st.lists(st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 2**32 - 1),
                          st.binary(max_size=64)), max_size=6))
def test_pack_then_iter_round_trips(msgs: list[tuple[int, int, int, bytes]]) -> None:
    """Messages packed with pack_message (padded to 4 bytes) come back with the same fields."""
    data = b""
    for typ, flags, seq, payload in msgs:
        one = pack_message(typ, flags, seq, payload)
        data += one + b"\0" * (-len(one) % 4)
    got = [(m.type, m.flags, m.seq, m.payload) for m in iter_messages(data)]
    assert got == msgs


@given(st.integers(1, 2**31 - 1), st.integers(1, 2**31 - 1), st.integers(0, 255),
       st.integers(0, 64), st.booleans())
def test_exit_event_round_trips(pid: int, tgid: int, code: int, sig: int, with_parent: bool) -> None:
    """An EXIT proc event (with or without the 4.17+ parent fields) decodes to its fields."""
    tail = struct.pack("=IIII", pid, tgid, code, sig)
    if with_parent:
        tail += struct.pack("=II", 7, 8)
    [ev] = decode_proc_events(_cn(_PROC_HDR.pack(ProcEventKind.EXIT, 0, 5) + tail))
    assert (ev.kind, ev.pid, ev.tgid, ev.exit_code, ev.exit_signal) == (
        ProcEventKind.EXIT, pid, tgid, code, sig)
    assert (ev.parent_pid, ev.parent_tgid) == ((7, 8) if with_parent else (0, 0))


@given(st.sampled_from([socket.AF_INET, socket.AF_INET6]), st.integers(0, 0xFFFF),
       st.integers(0, 0xFFFF), st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1))
def test_inet_diag_msg_round_trips(family: int, sport: int, dport: int, inode: int,
                                   cookie: int) -> None:
    """An inet_diag_msg decodes to its ports (network order), addresses, inode and cookie."""
    src = bytes(range(1, 17))
    body = (bytes([family, 10, 0, 0]) + struct.pack(">HH", sport, dport) + src + bytes(16)
            + struct.pack("=IIIIIIII", 0, cookie & 0xFFFFFFFF, cookie >> 32, 0, 0, 0, 0, inode))
    [ev] = decode_sock_diag(pack_message(SOCK_DIAG_BY_FAMILY, 2, 0, body))
    want_src = socket.inet_ntop(family, src[:4] if family == socket.AF_INET else src)
    assert (ev.family, ev.sport, ev.dport, ev.src, ev.inode, ev.cookie) == (
        family, sport, dport, want_src, inode, cookie)
    assert ev.dst in ("0.0.0.0", "::")
