"""A classic BPF socket filter that keeps, in the kernel, only the destroys that can be a listener.

The sock_diag destroy groups report every TCP socket freed in the network namespace: with a
busy service that is two messages per client connection (the client's socket where it runs
here, the accepted one), and each woke the agent to be thrown away in Python. The program built
here runs on every datagram before it is queued on the socket (``SO_ATTACH_FILTER``: classic
BPF, no ``bpf()`` system call, no CAP_BPF) and drops the datagrams the user-space check
(:meth:`watcher.sources.sock_diag.SockEvent.is_listener_on`) would ignore anyway. A drop in the
filter happens before the receive buffer is charged, so dropped traffic cannot overrun it.

What it keeps (the user-space check stays the truth; the filter may only keep too much):

* every datagram that is not exactly one well-formed message of at least 88 bytes (16 header +
  72 inet_diag_msg): a classic BPF program cannot loop over messages, so a datagram holding a
  second message, or a malformed one that user space reports, always reaches user space (the
  kernel sends one message per destroy datagram, see ``sock_diag_broadcast_destroy_work``);
* a SOCK_DIAG_BY_FAMILY message of family AF_INET or AF_INET6, source port ``port``,
  destination port 0, state TCP_LISTEN or TCP_CLOSE, and an all-zero destination address
  (4 bytes for AF_INET, 16 for AF_INET6).

Classic BPF loads words and half-words in network byte order; netlink headers are in host
byte order, so the program is built for a byte order (the host's by default): the message
type is compared with its byte-swapped value, the length is assembled byte by byte.
"""

from __future__ import annotations

import ctypes
import socket
import struct
import sys
from typing import Literal

__all__ = ["INSN", "KEEP_ALL", "MIN_DATAGRAM", "SO_ATTACH_FILTER", "attach_filter", "listener_filter"]

SO_ATTACH_FILTER = 26

# Classic BPF opcode parts (linux/filter.h, linux/bpf_common.h): only those used here.
BPF_LD, BPF_ST, BPF_ALU, BPF_JMP, BPF_RET, BPF_MISC = 0x00, 0x02, 0x04, 0x05, 0x06, 0x07
BPF_W, BPF_H, BPF_B = 0x00, 0x08, 0x10
BPF_ABS, BPF_LEN, BPF_MEM = 0x20, 0x80, 0x60
BPF_ADD, BPF_OR, BPF_AND, BPF_LSH = 0x00, 0x40, 0x50, 0x60
BPF_JEQ, BPF_JGT, BPF_JGE = 0x10, 0x20, 0x30
BPF_K, BPF_X = 0x00, 0x08
BPF_TAX = 0x00

# struct sock_filter { __u16 code; __u8 jt; __u8 jf; __u32 k; } in host byte order.
INSN = struct.Struct("=HBBI")
KEEP_ALL = 0xFFFFFFFF  # return value: keep the whole datagram
MIN_DATAGRAM = 16 + 72  # nlmsghdr + inet_diag_msg

SOCK_DIAG_BY_FAMILY = 20
TCP_CLOSE = 7
TCP_LISTEN = 10
# Absolute offsets in the datagram: nlmsghdr (16 bytes), then struct inet_diag_msg.
_LEN, _TYPE = 0, 4
_FAMILY, _STATE, _SPORT, _DPORT, _DST = 16, 17, 20, 22, 40


class _Program:
    """A tiny assembler: instructions with forward jumps to named labels."""

    def __init__(self) -> None:
        self._code: list[tuple[int, int | str, int | str, int]] = []
        self._labels: dict[str, int] = {}

    def op(self, code: int, k: int = 0) -> None:
        self._code.append((code, 0, 0, k))

    def jump(self, code: int, k: int, jt: int | str, jf: int | str) -> None:
        self._code.append((code, jt, jf, k))

    def label(self, name: str) -> None:
        self._labels[name] = len(self._code)

    def assemble(self) -> bytes:
        out = []
        for i, (code, jt, jf, k) in enumerate(self._code):
            offsets = []
            for target in (jt, jf):
                off = target if isinstance(target, int) else self._labels[target] - i - 1
                if not 0 <= off <= 255:
                    raise ValueError(f"jump out of range at instruction {i}")
                offsets.append(off)
            out.append(INSN.pack(code, offsets[0], offsets[1], k))
        return b"".join(out)


def listener_filter(port: int, byteorder: Literal["little", "big"] | None = None) -> bytes:
    """The classic BPF program (struct sock_filter array) that keeps only the destroy datagrams
    that can be a TCP listener on ``port``, or that user space must see for another reason.

    Pure; ``byteorder`` is that of the netlink headers (the host's by default). Raises
    ValueError for a port outside 1..65535.
    """
    if not 1 <= port <= 0xFFFF:
        raise ValueError(f"port {port} is not in 1..65535")
    order = byteorder or sys.byteorder
    host_type = int.from_bytes(SOCK_DIAG_BY_FAMILY.to_bytes(2, order), "big")
    p = _Program()
    # A = nlmsg_len, read in host byte order.
    if order == "big":
        p.op(BPF_LD | BPF_W | BPF_ABS, _LEN)
    else:
        p.op(BPF_LD | BPF_B | BPF_ABS, _LEN + 3)
        for i in (2, 1, 0):
            p.op(BPF_ALU | BPF_LSH | BPF_K, 8)
            p.op(BPF_MISC | BPF_TAX)
            p.op(BPF_LD | BPF_B | BPF_ABS, _LEN + i)
            p.op(BPF_ALU | BPF_OR | BPF_X)
    p.op(BPF_ST, 0)  # M[0] = nlmsg_len
    p.jump(BPF_JMP | BPF_JGE | BPF_K, MIN_DATAGRAM, 0, "keep")  # short or malformed: keep
    p.op(BPF_MISC | BPF_TAX)
    p.op(BPF_LD | BPF_W | BPF_LEN)
    p.jump(BPF_JMP | BPF_JGE | BPF_X, 0, 0, "keep")  # nlmsg_len past the datagram: keep
    p.op(BPF_LD | BPF_MEM, 0)
    p.op(BPF_ALU | BPF_ADD | BPF_K, 3)
    p.op(BPF_ALU | BPF_AND | BPF_K, 0xFFFFFFFC)
    p.op(BPF_MISC | BPF_TAX)
    p.op(BPF_LD | BPF_W | BPF_LEN)
    p.jump(BPF_JMP | BPF_JGT | BPF_X, 0, "keep", 0)  # bytes after the first message: keep
    # One whole message from here on: every load below is inside it.
    p.op(BPF_LD | BPF_H | BPF_ABS, _TYPE)
    p.jump(BPF_JMP | BPF_JEQ | BPF_K, host_type, 0, "drop")
    p.op(BPF_LD | BPF_B | BPF_ABS, _FAMILY)
    p.jump(BPF_JMP | BPF_JEQ | BPF_K, socket.AF_INET, "dst4", 0)
    p.jump(BPF_JMP | BPF_JEQ | BPF_K, socket.AF_INET6, 0, "drop")
    for word in (4, 8, 12):  # the last 12 bytes of an IPv6 destination address
        p.op(BPF_LD | BPF_W | BPF_ABS, _DST + word)
        p.jump(BPF_JMP | BPF_JEQ | BPF_K, 0, 0, "drop")
    p.label("dst4")
    p.op(BPF_LD | BPF_W | BPF_ABS, _DST)
    p.jump(BPF_JMP | BPF_JEQ | BPF_K, 0, 0, "drop")
    p.op(BPF_LD | BPF_H | BPF_ABS, _SPORT)  # ports are big-endian in inet_diag_sockid
    p.jump(BPF_JMP | BPF_JEQ | BPF_K, port, 0, "drop")
    p.op(BPF_LD | BPF_H | BPF_ABS, _DPORT)
    p.jump(BPF_JMP | BPF_JEQ | BPF_K, 0, 0, "drop")
    p.op(BPF_LD | BPF_B | BPF_ABS, _STATE)
    p.jump(BPF_JMP | BPF_JEQ | BPF_K, TCP_CLOSE, "keep", 0)
    p.jump(BPF_JMP | BPF_JEQ | BPF_K, TCP_LISTEN, "keep", "drop")
    p.label("drop")
    p.op(BPF_RET | BPF_K, 0)
    p.label("keep")
    p.op(BPF_RET | BPF_K, KEEP_ALL)
    return p.assemble()


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def attach_filter(sock: socket.socket, program: bytes) -> None:
    """Attach the classic BPF ``program`` to ``sock`` (SO_ATTACH_FILTER; replaces an earlier one).

    Raises OSError from the kernel as is (EINVAL for a program its checker refuses).
    """
    if not program or len(program) % INSN.size:
        raise ValueError(f"a program is a non-empty array of {INSN.size}-byte instructions")
    insns = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // INSN.size, ctypes.addressof(insns))
    # The kernel copies the instructions during the call; ``insns`` outlives it.
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, bytes(fprog))
