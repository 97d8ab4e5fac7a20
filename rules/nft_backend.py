"""The ``nft`` backend: our chain's content swapped by one nf_tables netlink batch, in process.

On a host whose iptables is iptables-nft, ``iptables-restore`` spends most of a swap starting,
asking the kernel about the table, and closing its netlink socket; the kernel's own commit takes
about a tenth of a millisecond. This backend sends that commit itself, through pyroute2: one
batch for every family of the step on a ``NETLINK_NETFILTER`` socket kept open, holding the
messages iptables-nft-restore --noflush sends for ``:CHAIN - [0:0]`` followed by
``-A CHAIN RULE``: a DELRULE of the whole chain (a flush) and a NEWRULE per rule, carrying the
very expressions iptables-nft writes (meta iifname, meta l4proto, payload for the tcp flags and
port, a counter, the xt ``REJECT`` target with its info struct and the rule's compat protocol),
so ``iptables -L`` and ``iptables-save`` print the manual's lines unchanged.

Only content swaps of the existing chain whose jump is already first in INPUT go over netlink.
Creating the chain, mending jumps and deleting the chain (start-up, repair, cleanup: rare, and
they would need the positions of other programs' rules) are left to ``iptables-restore``, and
reads are ``iptables-save``'s. Whether a netlink swap was right is the engine's to judge from
its read-back, and so is falling back to iptables-restore (``rules.firewall``).

The messages are pyroute2's (``nla``, ``nfgen_msg``, ``NFTSocket``). Its own ``nft_rule_msg``
cannot be used as is, in 0.7.2 nor in 0.9: it sets ``NLA_F_NESTED`` only on the outermost
attribute (iptables-nft sets it on every nest, and numbers every list element 1), and it carries
``NFTA_RULE_COMPAT`` as opaque bytes. The few attribute layouts below declare what we send on
pyroute2's classes, with those flags.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import time
from collections.abc import Sequence
from typing import Any

from pyroute2.netlink import (
    NLA_F_NESTED,
    NLM_F_ACK,
    NLM_F_APPEND,
    NLM_F_CREATE,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    nla,
    nlmsgerr,
)
from pyroute2.netlink.exceptions import NetlinkDecodeError
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_NFTABLES, nfgen_msg
from pyroute2.netlink.nfnetlink.nftsocket import NFT_MSG_DELRULE, NFT_MSG_NEWRULE, NFTSocket

from rules.base import Runner
from rules.errors import BackendUnavailable, BatchRefused
from rules.model import Family, RejectRule
from rules.plan import Plan, TableState
from rules.restore import RestoreBackend

__all__ = ["NftBackend", "acks", "batch", "is_swap", "rule_message"]

_NFNL_MSG_BATCH_BEGIN, _NFNL_MSG_BATCH_END = 0x10, 0x11
_NFPROTO = {Family.V4: 2, Family.V6: 10}  # NFPROTO_IPV4, NFPROTO_IPV6
_NFT_META_IIFNAME, _NFT_META_L4PROTO = 6, 16
_NFT_PAYLOAD_TRANSPORT_HEADER = 2
_NFT_CMP_EQ, _NFT_CMP_NEQ = 0, 1
_NFT_REG_1 = 1
_IPPROTO_TCP = 6
# the values of enum ipt_reject_with / ip6t_reject_with (linux/netfilter_ipv{4,6}/ip*t_REJECT.h)
_REJECT_WITH = {
    (Family.V4, "icmp-port-unreachable"): 3,  # IPT_ICMP_PORT_UNREACHABLE
    (Family.V4, "tcp-reset"): 7,  # IPT_TCP_RESET
    (Family.V6, "icmp-port-unreachable"): 4,  # IP6T_ICMP6_PORT_UNREACH
    (Family.V6, "tcp-reset"): 6,  # IP6T_TCP_RESET
}
_TCP_FLAGS_MASK, _TCP_FLAG_SYN = 0x17, 0x02  # FIN|SYN|RST|ACK, SYN
_TABLE = "filter"
_NLMSGERR_SIZE = 20  # struct nlmsghdr and the error code
_N = NLA_F_NESTED

# pyroute2's classes are untyped (Any): subclassing them is what its API asks for.


class _Value(nla):  # type: ignore[misc]
    """NFTA_DATA_*: a value compared or masked with."""

    nla_flags = _N
    nla_map = ((1, "NFTA_DATA_VALUE", "cdata"),)


class _Meta(nla):  # type: ignore[misc]
    nla_map = ((1, "NFTA_META_DREG", "be32"), (2, "NFTA_META_KEY", "be32"))


class _Cmp(nla):  # type: ignore[misc]
    nla_map = ((1, "NFTA_CMP_SREG", "be32"), (2, "NFTA_CMP_OP", "be32"),
               (3, "NFTA_CMP_DATA", "nft_value", _N))
    nft_value = _Value


class _Payload(nla):  # type: ignore[misc]
    nla_map = ((1, "NFTA_PAYLOAD_DREG", "be32"), (2, "NFTA_PAYLOAD_BASE", "be32"),
               (3, "NFTA_PAYLOAD_OFFSET", "be32"), (4, "NFTA_PAYLOAD_LEN", "be32"))


class _Bitwise(nla):  # type: ignore[misc]
    nla_map = ((1, "NFTA_BITWISE_SREG", "be32"), (2, "NFTA_BITWISE_DREG", "be32"),
               (3, "NFTA_BITWISE_LEN", "be32"), (4, "NFTA_BITWISE_MASK", "nft_value", _N),
               (5, "NFTA_BITWISE_XOR", "nft_value", _N))
    nft_value = _Value


class _Counter(nla):  # type: ignore[misc]
    nla_map = ((1, "NFTA_COUNTER_BYTES", "be64"), (2, "NFTA_COUNTER_PACKETS", "be64"))


class _Target(nla):  # type: ignore[misc]
    nla_map = ((1, "NFTA_TARGET_NAME", "asciiz"), (2, "NFTA_TARGET_REV", "be32"),
               (3, "NFTA_TARGET_INFO", "cdata"))


_EXPRESSIONS = {"meta": _Meta, "cmp": _Cmp, "payload": _Payload, "bitwise": _Bitwise,
                "counter": _Counter, "target": _Target}


class _Expr(nla):  # type: ignore[misc]
    """One NFTA_LIST_ELEM of NFTA_RULE_EXPRESSIONS: the expression's name and its data."""

    header_type = _N | 1  # every element is NFTA_LIST_ELEM, nested (pyroute2 would count 1, 2, ..)
    nla_map = ((1, "NFTA_EXPR_NAME", "asciiz"), (2, "NFTA_EXPR_DATA", "expr_data", _N))

    @staticmethod
    def expr_data(self: Any, *argv: Any, **kwarg: Any) -> Any:
        """The class of NFTA_EXPR_DATA, chosen by the expression's name."""
        return _EXPRESSIONS[self.get_attr("NFTA_EXPR_NAME")]


class _Compat(nla):  # type: ignore[misc]
    nla_map = ((1, "NFTA_RULE_COMPAT_PROTO", "be32"), (2, "NFTA_RULE_COMPAT_FLAGS", "be32"))


class _RuleMsg(nfgen_msg):  # type: ignore[misc]
    """NFT_MSG_NEWRULE / NFT_MSG_DELRULE with the attributes iptables-nft sends."""

    nla_map = ((1, "NFTA_RULE_TABLE", "asciiz"), (2, "NFTA_RULE_CHAIN", "asciiz"),
               (4, "NFTA_RULE_EXPRESSIONS", "*nft_expr", _N),
               (5, "NFTA_RULE_COMPAT", "nft_compat", _N))
    nft_expr = _Expr
    nft_compat = _Compat


def _expr(name: str, *attrs: tuple[str, Any]) -> dict[str, Any]:
    return {"attrs": [("NFTA_EXPR_NAME", name), ("NFTA_EXPR_DATA", {"attrs": list(attrs)})]}


def _value(data: bytes) -> dict[str, Any]:
    return {"attrs": [("NFTA_DATA_VALUE", data)]}


def _meta(key: int) -> dict[str, Any]:
    return _expr("meta", ("NFTA_META_KEY", key), ("NFTA_META_DREG", _NFT_REG_1))  # iptables' order


def _cmp(op: int, data: bytes) -> dict[str, Any]:
    return _expr("cmp", ("NFTA_CMP_SREG", _NFT_REG_1), ("NFTA_CMP_OP", op),
                 ("NFTA_CMP_DATA", _value(data)))


def _payload(offset: int, length: int) -> dict[str, Any]:
    return _expr("payload", ("NFTA_PAYLOAD_DREG", _NFT_REG_1),
                 ("NFTA_PAYLOAD_BASE", _NFT_PAYLOAD_TRANSPORT_HEADER),
                 ("NFTA_PAYLOAD_OFFSET", offset), ("NFTA_PAYLOAD_LEN", length))


def _expressions(rule: RejectRule, family: Family) -> list[dict[str, Any]]:
    """The expressions of ``rule`` in iptables-nft 1.8's order and values.

    ``! -i lo``: meta iifname != "lo\\0"; ``-p tcp``: meta l4proto == 6; ``-m tcp`` becomes
    payload expressions (``--tcp-flags FIN,SYN,RST,ACK SYN``: byte 13 masked with 0x17 == 0x02,
    then ``--dport``: bytes 2-3), no xt match; then the counter every iptables-nft rule carries
    and the xt ``REJECT`` target, revision 0, its ``*_reject_info`` padded to 8 bytes.
    """
    out = [_meta(_NFT_META_IIFNAME), _cmp(_NFT_CMP_NEQ, b"lo\0"),
           _meta(_NFT_META_L4PROTO), _cmp(_NFT_CMP_EQ, bytes([_IPPROTO_TCP]))]
    if rule.syn_only:
        out += [_payload(13, 1),
                _expr("bitwise", ("NFTA_BITWISE_SREG", _NFT_REG_1), ("NFTA_BITWISE_DREG", _NFT_REG_1),
                      ("NFTA_BITWISE_LEN", 1), ("NFTA_BITWISE_MASK", _value(bytes([_TCP_FLAGS_MASK]))),
                      ("NFTA_BITWISE_XOR", _value(b"\0"))),
                _cmp(_NFT_CMP_EQ, bytes([_TCP_FLAG_SYN]))]
    out += [_payload(2, 2), _cmp(_NFT_CMP_EQ, struct.pack("!H", rule.port)),
            _expr("counter", ("NFTA_COUNTER_BYTES", 0), ("NFTA_COUNTER_PACKETS", 0))]
    info = struct.pack("=I", _REJECT_WITH[(family, rule.reject_with)]) + bytes(4)  # XT_ALIGN
    out.append(_expr("target", ("NFTA_TARGET_NAME", "REJECT"), ("NFTA_TARGET_REV", 0),
                     ("NFTA_TARGET_INFO", info)))
    return out


def _encode(msg: Any, kind: int, flags: int, seq: int) -> bytes:
    msg["header"]["type"] = kind
    msg["header"]["flags"] = flags
    msg["header"]["sequence_number"] = seq
    msg.encode()
    return bytes(msg.data)


def _rule_msg(family: Family, chain: str) -> Any:
    msg = _RuleMsg()
    msg["nfgen_family"] = _NFPROTO[family]
    msg["attrs"] = [("NFTA_RULE_TABLE", _TABLE), ("NFTA_RULE_CHAIN", chain)]
    return msg


def rule_message(rule: RejectRule, family: Family, chain: str, seq: int = 0, *,
                 ack: bool = True) -> bytes:
    """The NFT_MSG_NEWRULE that appends ``rule`` to ``chain``, as iptables-nft-restore sends it:
    its NFTA_RULE_EXPRESSIONS and NFTA_RULE_COMPAT (protocol tcp, not inverted) byte for byte;
    ``ack``: it asks for an acknowledgement."""
    msg = _rule_msg(family, chain)
    msg["attrs"] += [("NFTA_RULE_EXPRESSIONS", _expressions(rule, family)),
                     ("NFTA_RULE_COMPAT", {"attrs": [("NFTA_RULE_COMPAT_PROTO", _IPPROTO_TCP),
                                                     ("NFTA_RULE_COMPAT_FLAGS", 0)]})]
    flags = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_APPEND | (NLM_F_ACK if ack else 0)
    return _encode(msg, (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE, flags, seq)


def _batch_edge(kind: int, seq: int) -> bytes:
    msg = nfgen_msg()
    msg["res_id"] = NFNL_SUBSYS_NFTABLES
    return _encode(msg, kind, NLM_F_REQUEST, seq)


def batch(plans: Sequence[Plan], first_seq: int = 1) -> tuple[bytes, int]:
    """The batch that flushes each plan's chain and appends its rules, all in one transaction
    (plans of several families share it: each message names its family).

    Returns the bytes and the sequence number of the one message that asks for an
    acknowledgement: the last before the batch's end. The kernel processes a whole batch before
    it answers, reports every message that failed (in order), then that acknowledgement; so
    its arrival means every answer is in, and one answer is read instead of one per message.
    """
    seq = first_seq
    parts = [_batch_edge(_NFNL_MSG_BATCH_BEGIN, seq)]
    last = sum(1 + len(p.rules or ()) for p in plans) + first_seq
    for plan in plans:
        if plan.rules is None:
            raise ValueError("a chain deletion is not a content swap")
        seq += 1
        parts.append(_encode(_rule_msg(plan.family, plan.chain),
                             (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_DELRULE,
                             NLM_F_REQUEST | (NLM_F_ACK if seq == last else 0), seq))
        for rule in plan.rules:
            seq += 1
            parts.append(rule_message(rule, plan.family, plan.chain, seq, ack=seq == last))
    parts.append(_batch_edge(_NFNL_MSG_BATCH_END, seq + 1))
    return b"".join(parts), last


def acks(data: bytes) -> list[tuple[int, int]]:
    """(sequence number, errno) of each NLMSG_ERROR in a datagram (0: an acknowledgement),
    decoded by pyroute2's ``nlmsgerr``; other messages are skipped, and so is a tail that does
    not decode (the answers before it are kept)."""
    out = []
    offset = 0
    while offset + _NLMSGERR_SIZE <= len(data):
        msg = nlmsgerr(data, offset=offset)
        try:
            msg.decode()
        except (NetlinkDecodeError, struct.error, ValueError, IndexError, KeyError, TypeError):
            break
        length = msg["header"]["length"]
        if msg["header"]["type"] == NLMSG_ERROR:
            out.append((msg["header"]["sequence_number"], abs(msg["error"])))
        offset += max(16, (length + 3) & ~3)
    return out


def is_swap(plan: Plan) -> bool:
    """True for a content swap of the existing chain whose jump is in place: netlink's part."""
    return plan.rules is not None and not plan.insert_jump and plan.delete_jumps == 0


class _Channel:
    """One NETLINK_NETFILTER socket (pyroute2's NFTSocket) and the batches already encoded.

    Encoding a rule with pyroute2 takes about a millisecond, so each distinct batch is encoded
    once and kept (there are a handful: one per mode and set of families); its sequence numbers
    are fixed, which is safe because every commit reads its answers up to the last, and a
    socket that may still hold answers of an earlier batch (an error, a timeout) is replaced.
    """

    def __init__(self) -> None:
        self._batches: dict[tuple[tuple[Family, str, tuple[RejectRule, ...] | None], ...],
                            tuple[bytes, int]] = {}
        self.sock = self._open()

    @staticmethod
    def _open() -> Any:
        try:
            sock = NFTSocket()
            sock.bind()
        except OSError as exc:
            raise BackendUnavailable(f"no nf_tables netlink socket: {exc.strerror}") from None
        return sock

    def _reopen(self) -> None:
        self.sock.close()
        self.sock = self._open()

    def commit(self, plans: Sequence[Plan], timeout: float) -> None:
        """Send the plans' batch and read the answers up to its acknowledgement; any error
        (the kernel then aborted the whole batch) raises BatchRefused."""
        key = tuple((p.family, p.chain, p.rules) for p in plans)
        if key not in self._batches:
            self._batches[key] = batch(plans)
        data, last = self._batches[key]
        try:
            self.sock.sendto(data, (0, 0))
        except OSError as exc:
            raise BatchRefused(f"nf_tables batch not sent: {exc.strerror}") from None
        errors: list[str] = []
        deadline = time.monotonic() + timeout
        done = False
        while not done:
            try:  # the kernel answered within sendto: the answers are normally there already
                datagram = self.sock.recv(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self.sock.fileno()], [], [], left)[0]:
                    self._reopen()
                    raise BatchRefused(
                        f"nf_tables batch: no answer from the kernel within {timeout:g}s") from None
                continue
            for seq, code in acks(datagram):
                if code:
                    errors.append(f"{errno.errorcode.get(code, str(code))} ({os.strerror(code)})")
                done = done or seq == last or (code != 0 and seq < last)
        if errors:
            self._reopen()  # the rest of the aborted batch's answers are not read
            chains = ", ".join(sorted({f"{p.family} {p.chain}" for p in plans}))
            raise BatchRefused(f"nf_tables refused the batch for {chains}: " + "; ".join(errors))

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()


class NftBackend:
    """Content swaps over nf_tables netlink, one batch per commit; everything else, and every
    read, through iptables-restore/-save."""

    name = "nft"

    def __init__(self, runner: Runner | None = None, lock_wait_s: float = 5.0) -> None:
        self.lock_wait_s = lock_wait_s
        # The structural changes it does are rare: no iptables-restore is kept started for them.
        self._restore = RestoreBackend(runner, lock_wait_s)
        flavour = self._restore.flavour(Family.V4)
        if flavour != "nf_tables":
            raise BackendUnavailable(
                f"backend nft drives nf_tables only, but this system's iptables is {flavour}")
        self._channel = _Channel()  # BackendUnavailable now if netlink is closed to us

    def flavour(self, family: Family) -> str:
        """``nf_tables``, the flavour of the iptables it must agree with."""
        return self._restore.flavour(family)

    def read(self, family: Family, chain: str) -> TableState:
        """``iptables-save``'s view of our chain."""
        return self._restore.read(family, chain)

    def commit(self, plans: Sequence[Plan], wait_s: float) -> None:
        """Content swaps of existing chains: one netlink batch for all families (BatchRefused,
        nothing changed, if the kernel refuses any part). Any other step: iptables-restore, one
        per family (nf_tables takes no lock, so only that path waits up to ``wait_s``)."""
        if plans and all(is_swap(p) for p in plans):
            self._channel.commit(plans, wait_s)
        else:
            self._restore.commit(plans, wait_s)

    def close(self) -> None:
        """Close the netlink socket and end what the restore path keeps started."""
        self._channel.close()
        self._restore.close()
