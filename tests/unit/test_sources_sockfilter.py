"""The classic BPF destroy filter, run by a small interpreter on captured kernel bytes.

The interpreter below is written from the classic BPF semantics of the kernel's
``linux/filter.h`` (opcode classes, sizes, modes) for the opcodes the filter uses, and refuses
any other: a program the kernel would run differently cannot pass here unnoticed. Loads in
network byte order; a load past the end of the datagram ends the program with 0 (drop), as in
the kernel. The kernel itself runs the same program in tests/integration/test_sources_sock_diag.
"""

from __future__ import annotations

import json
import socket
import struct
from pathlib import Path
from typing import Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from watcher.sources._netlink import NLMSG_HDR, NetlinkDecodeError, iter_messages, pack_message
from watcher.sources._sockfilter import MIN_DATAGRAM, listener_filter
from watcher.sources.sock_diag import SOCK_DIAG_BY_FAMILY, decode_sock_diag

DATA = Path(__file__).parent / "data"
EXPECTED = json.loads((DATA / "expected.json").read_text())["diag"]
LISTENERS = ("v4", "v6", "dual", "bound")  # "bound": bound to the port, never listened, closed
OTHERS = ("accepted", "client", "unbound", "other_port")
CAPTURES = {name: (DATA / f"diag_destroy_{name}.bin").read_bytes()
            for name in LISTENERS + OTHERS}

_SIZES = {0x00: 4, 0x08: 2, 0x10: 1}  # BPF_W, BPF_H, BPF_B


def run_cbpf(program: bytes, packet: bytes) -> int:
    """Run a classic BPF program on ``packet``; return its verdict (bytes to keep, 0 = drop)."""
    insns = [struct.unpack_from("=HBBI", program, i) for i in range(0, len(program), 8)]
    a = x = 0
    mem = [0] * 16
    pc = 0
    for _ in range(len(insns)):  # jumps only go forward: at most one pass
        code, jt, jf, k = insns[pc]
        pc += 1
        cls = code & 0x07
        if cls == 0x00:  # BPF_LD
            mode, size = code & 0xE0, code & 0x18
            if mode == 0x20:  # BPF_ABS
                n = _SIZES[size]
                if k + n > len(packet):
                    return 0
                a = int.from_bytes(packet[k:k + n], "big")
            elif mode == 0x80 and size == 0x00:  # BPF_LEN
                a = len(packet)
            elif mode == 0x60 and size == 0x00:  # BPF_MEM
                a = mem[k]
            else:
                raise AssertionError(f"unsupported load {code:#x}")
        elif cls == 0x02 and code == 0x02:  # BPF_ST
            mem[k] = a
        elif cls == 0x04:  # BPF_ALU
            src = x if code & 0x08 else k
            op = code & 0xF0
            if op == 0x00:  # BPF_ADD
                a = (a + src) & 0xFFFFFFFF
            elif op == 0x40:  # BPF_OR
                a |= src
            elif op == 0x50:  # BPF_AND
                a &= src
            elif op == 0x60 and src < 32:  # BPF_LSH
                a = (a << src) & 0xFFFFFFFF
            else:
                raise AssertionError(f"unsupported alu {code:#x} k={k}")
        elif cls == 0x05:  # BPF_JMP
            src = x if code & 0x08 else k
            op = code & 0xF0
            if op not in (0x10, 0x20, 0x30):  # BPF_JEQ, BPF_JGT, BPF_JGE
                raise AssertionError(f"unsupported jump {code:#x}")
            taken = a == src if op == 0x10 else a > src if op == 0x20 else a >= src
            pc += jt if taken else jf
        elif cls == 0x06 and code == 0x06:  # BPF_RET | BPF_K
            return k
        elif code == 0x07:  # BPF_MISC | BPF_TAX
            x = a
        else:
            raise AssertionError(f"unsupported opcode {code:#x}")
    raise AssertionError("the program ran off its end")


def keeps(port: int, data: bytes, byteorder: Literal["little", "big"] | None = None) -> bool:
    """The filter's verdict for ``port`` on one datagram."""
    return run_cbpf(listener_filter(port, byteorder), data) != 0


def user_space_wants(port: int, data: bytes) -> bool:
    """What the Python side needs to see: a matching event, or a datagram it reports as bad."""
    try:
        return any(e.is_listener_on(port) for e in decode_sock_diag(data))
    except NetlinkDecodeError:
        return True


@pytest.mark.parametrize("name", LISTENERS)
def test_a_listener_destroy_is_kept_on_its_port_only(name: str) -> None:
    """The captured destroy of a listener (v4, v6, dual-stack, bound) passes for 8080, not 8081."""
    assert keeps(8080, CAPTURES[name])
    assert not keeps(8081, CAPTURES[name])
    assert not keeps(80, CAPTURES[name])


@pytest.mark.parametrize("name", OTHERS)
def test_other_sockets_are_dropped(name: str) -> None:
    """Accepted connections, clients, unbound sockets and other ports' listeners are dropped."""
    assert not keeps(8080, CAPTURES[name])


def test_the_client_is_dropped_on_its_own_port_too() -> None:
    """The client's socket (source port its ephemeral one, a peer on 8080) has a peer: dropped."""
    assert not keeps(EXPECTED["client_port"], CAPTURES["client"])


def test_the_kernel_sent_one_message_per_datagram() -> None:
    """Every captured datagram, and a burst of 500 destroys, held exactly one message."""
    assert EXPECTED["burst_messages_per_datagram"] == [1]
    for data in CAPTURES.values():
        assert len(list(iter_messages(data))) == 1
        assert NLMSG_HDR.unpack_from(data)[0] == len(data)


@pytest.mark.parametrize("first", OTHERS)
@pytest.mark.parametrize("listener", LISTENERS)
def test_a_listener_after_another_message_is_kept(first: str, listener: str) -> None:
    """A datagram whose first message is irrelevant and second a listener's reaches user space."""
    for data in (CAPTURES[first] + CAPTURES[listener], CAPTURES[listener] + CAPTURES[first]):
        assert user_space_wants(8080, data)
        assert keeps(8080, data)


def test_short_and_inconsistent_datagrams_are_kept() -> None:
    """What user space reports as malformed (short, lying length, trailing bytes) is kept."""
    v4 = CAPTURES["v4"]
    cases = [v4[:MIN_DATAGRAM - 1], v4[:200], v4 + b"\0" * 4, v4 + b"\0",
             pack_message(SOCK_DIAG_BY_FAMILY, 0, 0, v4[16:16 + 71])]
    for data in cases:
        assert user_space_wants(8080, data), data
        assert keeps(8080, data), data


def test_another_message_type_is_dropped() -> None:
    """A whole message of another type, whatever its body, is dropped (user space skips it)."""
    data = pack_message(SOCK_DIAG_BY_FAMILY + 1, 0, 0, CAPTURES["v4"][16:])
    assert not user_space_wants(8080, data)
    assert not keeps(8080, data)


@pytest.mark.parametrize("port", [0, -1, 65536])
def test_a_port_out_of_range_is_refused(port: int) -> None:
    """listener_filter refuses a port outside 1..65535 with a ValueError naming it."""
    with pytest.raises(ValueError, match=str(port)):
        listener_filter(port)


def test_the_program_is_small_and_ends_in_a_return() -> None:
    """The program fits the kernel's limits many times over and its last instruction returns."""
    for order in ("little", "big"):
        prog = listener_filter(8080, order)  # type: ignore[arg-type]
        assert len(prog) % 8 == 0 and 8 <= len(prog) // 8 <= 64
        assert struct.unpack_from("=H", prog, len(prog) - 8)[0] == 0x06


def _rewrite(data: bytes, *, typ: int, family: int, state: int, sport: int, dport: int,
             dst: bytes) -> bytes:
    raw = bytearray(data)
    struct.pack_into("=H", raw, 4, typ)
    raw[16], raw[17] = family, state
    struct.pack_into(">HH", raw, 20, sport, dport)
    raw[40:56] = dst
    return bytes(raw)


def _to_big_endian_headers(data: bytes) -> bytes:
    """The same datagram as a big-endian host's kernel would send it (netlink header swapped)."""
    out = bytearray()
    for msg in iter_messages(data):
        length = NLMSG_HDR.size + len(msg.payload)
        one = struct.pack(">IHHII", length, msg.type, msg.flags, msg.seq, msg.port_id) + msg.payload
        out += one + b"\0" * (-len(one) % 4)
    return bytes(out)


ports = st.one_of(st.sampled_from([8080, 8081, 443, 1, 65535]), st.integers(1, 65535))
dsts = st.one_of(st.just(bytes(16)), st.binary(min_size=16, max_size=16),
                 st.builds(lambda i, b: bytes(i) + b + bytes(15 - i), st.integers(0, 15),
                           st.binary(min_size=1, max_size=1)))
messages = st.builds(
    _rewrite, st.sampled_from(sorted(CAPTURES.values())),
    typ=st.sampled_from([SOCK_DIAG_BY_FAMILY, SOCK_DIAG_BY_FAMILY + 1, 0x1400, 2, 3]),
    family=st.sampled_from([socket.AF_INET, socket.AF_INET6, 0, 1, 255]),
    state=st.one_of(st.sampled_from([1, 7, 10]), st.integers(0, 255)),
    sport=st.one_of(st.sampled_from([8080, 0]), st.integers(0, 65535)),
    dport=st.one_of(st.just(0), st.integers(0, 65535)),
    dst=dsts)


@settings(max_examples=500, deadline=None)
@given(ports, st.sampled_from(sorted(CAPTURES)))
def test_on_every_capture_the_verdict_is_the_user_space_check(port: int, name: str) -> None:
    """For any port and any captured destroy, the filter keeps it iff user space matches it."""
    data = CAPTURES[name]
    assert keeps(port, data) == user_space_wants(port, data)


@settings(max_examples=1000, deadline=None)
@given(ports, messages)
def test_on_rewritten_captures_the_verdict_is_the_user_space_check(port: int, data: bytes) -> None:
    """Captured messages with type, family, state, ports and peer address rewritten: the
    filter keeps exactly those the user-space check matches, on either host byte order."""
    want = user_space_wants(port, data)
    assert keeps(port, data) == want
    assert keeps(port, _to_big_endian_headers(data), "big") == want


@settings(max_examples=500, deadline=None)
@given(ports, st.lists(messages, min_size=2, max_size=4))
def test_several_messages_are_never_dropped_when_one_matters(port: int,
                                                             parts: list[bytes]) -> None:
    """A datagram of several messages is kept whenever any of them matches."""
    data = b"".join(parts)
    if user_space_wants(port, data):
        assert keeps(port, data)


@settings(max_examples=500, deadline=None)
@given(ports, st.sampled_from(sorted(CAPTURES.values())), st.integers(0, 379),
       st.binary(min_size=1, max_size=8), st.integers(-8, 8))
def test_mutated_bytes_never_drop_what_user_space_needs(port: int, data: bytes, at: int,
                                                       noise: bytes, cut: int) -> None:
    """Any bytes overwritten or cut: whatever user space would match or report is kept."""
    raw = bytearray(data)
    raw[at:at + len(noise)] = noise
    mutated = bytes(raw[:len(raw) + cut] if cut < 0 else raw + bytes(cut))
    if user_space_wants(port, mutated):
        assert keeps(port, mutated)
