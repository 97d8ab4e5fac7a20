"""The nft backend's pure part: the netlink batch it builds and the answers it reads.

The kernel tests (tests/integration/test_rules_nft_netlink.py) compare these bytes with what
iptables-nft-restore sends; here the structure is pinned: attribute lengths that add up, the
values each rule must carry, the batch's order and sequence numbers.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rules.model import Family, RejectRule
from rules.nft_backend import acks, batch, rule_message
from rules.plan import Plan

CHAIN = "sslvpn-heartbeat-chain"
ports = st.integers(1, 65535)
rules = st.builds(RejectRule, ports, st.sampled_from(["icmp-port-unreachable", "tcp-reset"]),
                  st.booleans())
families = st.sampled_from([Family.V4, Family.V6])


def _attrs(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(type without flags, payload) of each attribute; fails on lengths that do not add up."""
    off = 0
    while off < len(data):
        length, kind = struct.unpack_from("=HH", data, off)
        assert 4 <= length <= len(data) - off, (off, length, len(data))
        yield kind & 0x3FFF, data[off + 4:off + length]
        off += length + (-length % 4)
    assert off == len(data)


def _rule_attrs(rule: RejectRule, family: Family) -> dict[int, bytes]:
    """The NEWRULE's attributes by type: a 16-byte header, 4 of nfgenmsg, then the attributes."""
    msg = rule_message(rule, family, CHAIN)
    assert struct.unpack_from("=I", msg)[0] == len(msg)
    return dict(_attrs(msg[20:]))


def _exprs(rule: RejectRule, family: Family) -> list[tuple[str, dict[int, bytes]]]:
    body = _rule_attrs(rule, family)[4]  # NFTA_RULE_EXPRESSIONS
    out = []
    for elem_kind, elem in _attrs(body):
        assert elem_kind == 1  # NFTA_LIST_ELEM
        fields = dict(_attrs(elem))
        out.append((fields[1].rstrip(b"\0").decode(), dict(_attrs(fields[2]))))
    return out


@given(rules, families)
def test_expressions_nest_cleanly_and_carry_the_port(rule: RejectRule, family: Family) -> None:
    """Every length adds up, and the last cmp before the counter holds the port, big-endian."""
    exprs = _exprs(rule, family)
    names = [n for n, _ in exprs]
    tail = ["payload", "cmp", "counter", "target"]
    flags = ["payload", "bitwise", "cmp"] if rule.syn_only else []
    assert names == ["meta", "cmp", "meta", "cmp", *flags, *tail]
    port_cmp = exprs[-3][1]
    assert dict(_attrs(port_cmp[3]))[1] == struct.pack("!H", rule.port)


@pytest.mark.parametrize(("family", "reject_with", "code"), [
    (Family.V4, "icmp-port-unreachable", 3), (Family.V4, "tcp-reset", 7),
    (Family.V6, "icmp-port-unreachable", 4), (Family.V6, "tcp-reset", 6)])
def test_reject_target_is_xt_reject_rev0_with_the_familys_code(family: Family, reject_with: str,
                                                               code: int) -> None:
    """The target is xt REJECT revision 0, its info the family's enum value padded to 8 bytes."""
    _, target = _exprs(RejectRule(8080, reject_with), family)[-1]
    assert target[1] == b"REJECT\0" and target[2] == b"\0\0\0\0"
    assert target[3] == struct.pack("=I", code) + bytes(4)


def test_iifname_is_lo_with_its_nul_and_protocol_is_tcp() -> None:
    """``! -i lo`` compares three bytes, "lo" and its NUL, with NEQ; the compat proto is 6."""
    exprs = _exprs(RejectRule(8080, "tcp-reset"), Family.V4)
    assert exprs[0][1] == {2: struct.pack("!I", 6), 1: struct.pack("!I", 1)}  # meta iifname
    assert exprs[1][1][2] == struct.pack("!I", 1)  # NFT_CMP_NEQ
    assert dict(_attrs(exprs[1][1][3]))[1] == b"lo\0"
    assert dict(_attrs(_rule_attrs(RejectRule(8080, "tcp-reset"), Family.V4)[5])) == {
        1: struct.pack("!I", 6), 2: bytes(4)}


@given(rules, families)
def test_every_nest_carries_nla_f_nested_and_every_list_element_is_type_1(
        rule: RejectRule, family: Family) -> None:
    """As libnftnl writes them: NLA_F_NESTED on each nest (expressions, their elements, their data,
    cmp/bitwise values, compat), and every element of the list numbered NFTA_LIST_ELEM (1)."""
    msg = rule_message(rule, family, CHAIN)
    raw = {kind: (flags, body) for flags, kind, body in _raw_attrs(msg[20:])}
    assert raw[4][0] & 0x8000 and raw[5][0] & 0x8000 and not raw[1][0] & 0x8000
    for flags, kind, elem in _raw_attrs(raw[4][1]):
        assert (flags & 0x8000, kind) == (0x8000, 1)
        inner = {k: (f, b) for f, k, b in _raw_attrs(elem)}
        assert inner[2][0] & 0x8000
        name = inner[1][1].rstrip(b"\0")
        values = {b"cmp": (3,), b"bitwise": (4, 5)}.get(name, ())
        if values:
            nests = [f for f, k, _ in _raw_attrs(inner[2][1]) if k in values]
            assert nests and all(f & 0x8000 for f in nests)


def _raw_attrs(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    off = 0
    while off < len(data):
        length, kind = struct.unpack_from("=HH", data, off)
        yield kind & 0xC000, kind & 0x3FFF, data[off + 4:off + length]
        off += length + (-length % 4)


@given(st.lists(rules, max_size=3), families, st.integers(0, 2**30))
def test_batch_is_begin_flush_rules_end_with_consecutive_sequence_numbers(
        content: list[RejectRule], family: Family, seq: int) -> None:
    """BEGIN, a DELRULE of the chain, one NEWRULE per rule, END, numbered from ``seq``; only the
    last message before END asks for an acknowledgement, and its number is returned."""
    data, last = batch((Plan(family, CHAIN, tuple(content), 0, False),), seq)
    msgs = []
    off = 0
    while off < len(data):
        length, kind, flags, s, _ = struct.unpack_from("=IHHII", data, off)
        msgs.append((kind, flags, s, data[off + 16]))
        off += length
    assert off == len(data)
    kinds = [k for k, *_ in msgs]
    assert kinds == [0x10, (10 << 8) | 8, *[(10 << 8) | 6] * len(content), 0x11]
    assert [s for _, _, s, _ in msgs] == list(range(seq, seq + len(content) + 3))
    assert last == seq + len(content) + 1
    nfproto = 10 if family is Family.V6 else 2
    assert [m[3] for m in msgs[1:-1]] == [nfproto] * (len(content) + 1)
    assert [bool(m[1] & 0x4) for m in msgs] == [False] * (len(content) + 1) + [True, False]


def test_a_chain_deletion_is_not_a_content_swap() -> None:
    """batch() refuses a plan that deletes the chain (that goes through iptables-restore)."""
    with pytest.raises(ValueError, match="not a content swap"):
        batch((Plan(Family.V4, CHAIN, None, 1, False),), 1)


def _error(seq: int, code: int) -> bytes:
    return struct.pack("=IHHIIi", 36, 2, 0, seq, 0, code) + bytes(16)


def test_acks_reads_acknowledgements_and_errors_and_skips_the_rest() -> None:
    """Each NLMSG_ERROR gives (seq, errno); other messages and a truncated tail are skipped."""
    other = struct.pack("=IHHII", 20, 3, 0, 9, 0) + bytes(4)
    assert acks(_error(5, 0) + other + _error(6, -2) + b"\1\2\3") == [(5, 0), (6, 2)]


@given(st.binary(max_size=200))
def test_acks_never_raises_and_always_ends(data: bytes) -> None:
    """Random bytes: a list, never an exception or an endless loop (zero lengths advance)."""
    assert isinstance(acks(data), list)


def test_one_batch_carries_both_families_each_message_naming_its_own() -> None:
    """Two families' swaps share one BEGIN/END: IPv4's DELRULE and NEWRULE, then IPv6's."""
    rule = (RejectRule(8080, "tcp-reset"),)
    data, last = batch((Plan(Family.V4, CHAIN, rule, 0, False),
                        Plan(Family.V6, CHAIN, rule, 0, False)), 7)
    msgs = []
    off = 0
    while off < len(data):
        length, kind = struct.unpack_from("=IH", data, off)
        msgs.append((kind & 0xFF, data[off + 16]))
        off += length
    assert msgs == [(0x10, 0), (8, 2), (6, 2), (8, 10), (6, 10), (0x11, 0)]
    assert last == 11
