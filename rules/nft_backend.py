"""The ``nft`` backend: our chain's content swapped by one nf_tables netlink batch, in process.

On a host whose iptables is iptables-nft, ``iptables-restore`` spends most of a swap starting,
asking the kernel about the table, and closing its netlink socket; the kernel's own commit takes
about a tenth of a millisecond. This backend sends that commit itself: one batch per family on a
``NETLINK_NETFILTER`` socket kept open, holding exactly the messages iptables-nft-restore
--noflush sends for ``:CHAIN - [0:0]`` followed by ``-A CHAIN RULE``: a DELRULE of the whole
chain (a flush) and a NEWRULE per rule, carrying the very expressions iptables-nft writes (meta
iifname, meta l4proto, payload for the tcp flags and port, a counter, the xt ``REJECT`` target
with its info struct and the rule's compat protocol), so ``iptables -L`` and ``iptables-save``
print the manual's lines unchanged.

Only the hot path goes over netlink: changing the content of the existing chain whose jump is
already first in INPUT. Creating the chain, mending jumps and deleting the chain (start-up,
repair, cleanup: rare, and they would need the positions of other programs' rules) are left to
``iptables-restore``. Reads are ``iptables-save``'s. After every netlink commit the next read
must show exactly the rules the restore backend would have produced; if it shows as many rules
but printed differently (or cannot read the table), the backend re-applies that plan through
``iptables-restore``, says so once, and never uses netlink again. A chain gone, flushed or
grown in the meantime is someone else's change, left to the engine as with any backend: taking
it for a fault of this backend would fall back for good on an administrator's unlucky timing.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Sequence
from typing import Any, Protocol

from rules.base import Runner, SubprocessRunner
from rules.errors import BackendUnavailable, RulesError, TransactionFailed
from rules.model import Family, RejectRule
from rules.render import Plan, TableState
from rules.restore import RestoreBackend

__all__ = [
    "NETLINK_NETFILTER",
    "SIBLING_WINDOW_NS",
    "NftBackend",
    "acks",
    "batch",
    "rule_compat",
    "rule_expressions",
]

NETLINK_NETFILTER = 12
_NLMSG_ERROR = 2
_NLM_F_REQUEST, _NLM_F_ACK, _NLM_F_APPEND, _NLM_F_CREATE = 0x1, 0x4, 0x800, 0x400
_NLA_F_NESTED = 0x8000
_NFNL_SUBSYS_NFTABLES = 10
_NFNL_MSG_BATCH_BEGIN, _NFNL_MSG_BATCH_END = 0x10, 0x11
_NFT_MSG_NEWRULE, _NFT_MSG_DELRULE = 6, 8
_NFPROTO = {Family.V4: 2, Family.V6: 10}  # NFPROTO_IPV4, NFPROTO_IPV6
_NFTA_RULE_TABLE, _NFTA_RULE_CHAIN, _NFTA_RULE_EXPRESSIONS, _NFTA_RULE_COMPAT = 1, 2, 4, 5
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
# How long a read-back after a netlink commit waits for the other family's commit to go out
# first (the engine commits the families from two threads): a read-back waits at most this.
SIBLING_WINDOW_NS = 2_000_000


class EventLog(Protocol):
    """What this backend logs through (a structlog bound logger fits)."""

    def warning(self, event: str, **kw: Any) -> Any:
        """Log a warning event."""
        ...


def _attr(kind: int, payload: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    head = struct.pack("=HH", 4 + len(payload), kind)
    return head + payload + b"\0" * (-len(payload) % 4)


def _nest(kind: int, *children: bytes) -> bytes:
    return _attr(kind | _NLA_F_NESTED, b"".join(children))


def _u32(kind: int, value: int) -> bytes:
    return _attr(kind, struct.pack("!I", value))


def _str(kind: int, value: str) -> bytes:
    return _attr(kind, value.encode() + b"\0")


def _expr(name: str, *data: bytes) -> bytes:
    """An NFTA_LIST_ELEM holding NFTA_EXPR_NAME and NFTA_EXPR_DATA."""
    return _nest(1, _str(1, name), _nest(2, *data))


def _meta(key: int) -> bytes:
    return _expr("meta", _u32(2, key), _u32(1, _NFT_REG_1))  # KEY, DREG (iptables-nft's order)


def _cmp(op: int, value: bytes) -> bytes:
    return _expr("cmp", _u32(1, _NFT_REG_1), _u32(2, op), _nest(3, _attr(1, value)))


def _payload(offset: int, length: int) -> bytes:
    return _expr("payload", _u32(1, _NFT_REG_1), _u32(2, _NFT_PAYLOAD_TRANSPORT_HEADER),
                 _u32(3, offset), _u32(4, length))


def _bitwise(mask: bytes, xor: bytes) -> bytes:
    return _expr("bitwise", _u32(1, _NFT_REG_1), _u32(2, _NFT_REG_1), _u32(3, len(mask)),
                 _nest(4, _attr(1, mask)), _nest(5, _attr(1, xor)))


def rule_expressions(rule: RejectRule, family: Family) -> bytes:
    """NFTA_RULE_EXPRESSIONS of ``rule``, byte for byte as iptables-nft 1.8 writes it.

    ``! -i lo``: meta iifname != "lo\\0"; ``-p tcp``: meta l4proto == 6; ``-m tcp`` becomes
    payload expressions (``--tcp-flags FIN,SYN,RST,ACK SYN``: byte 13 masked with 0x17 == 0x02,
    then ``--dport``: bytes 2-3), no xt match; then the counter every iptables-nft rule carries
    and the xt ``REJECT`` target, revision 0, its ``*_reject_info`` padded to 8 bytes.
    """
    exprs = [_meta(_NFT_META_IIFNAME), _cmp(_NFT_CMP_NEQ, b"lo\0"),
             _meta(_NFT_META_L4PROTO), _cmp(_NFT_CMP_EQ, bytes([_IPPROTO_TCP]))]
    if rule.syn_only:
        exprs += [_payload(13, 1), _bitwise(bytes([_TCP_FLAGS_MASK]), b"\0"),
                  _cmp(_NFT_CMP_EQ, bytes([_TCP_FLAG_SYN]))]
    exprs += [_payload(2, 2), _cmp(_NFT_CMP_EQ, struct.pack("!H", rule.port))]
    exprs.append(_expr("counter", _attr(1, bytes(8)), _attr(2, bytes(8))))  # BYTES, PACKETS
    info = struct.pack("=I", _REJECT_WITH[(family, rule.reject_with)]) + bytes(4)  # XT_ALIGN
    exprs.append(_expr("target", _str(1, "REJECT"), _u32(2, 0), _attr(3, info)))
    return _nest(_NFTA_RULE_EXPRESSIONS, *exprs)


def rule_compat() -> bytes:
    """NFTA_RULE_COMPAT: protocol tcp, not inverted (the xt target checks it, as for -p tcp)."""
    return _nest(_NFTA_RULE_COMPAT, _u32(1, _IPPROTO_TCP), _u32(2, 0))


def _message(kind: int, flags: int, seq: int, nfproto: int, res_id: int, body: bytes) -> bytes:
    head = struct.pack("=IHHII", 16 + 4 + len(body), kind, flags, seq, 0)
    return head + struct.pack("!BBH", nfproto, 0, res_id) + body


def batch(plans: Sequence[Plan], first_seq: int) -> tuple[bytes, tuple[int, ...]]:
    """The batch that flushes each plan's chain and appends its rules, all in one transaction
    (plans of several families may share it: each message names its family).

    Returns the bytes and the sequence numbers of the messages that ask for an acknowledgement
    (all but the batch's begin and end, which the kernel never acknowledges).
    """
    subsys = _NFNL_SUBSYS_NFTABLES << 8
    seq = first_seq
    parts = [_message(_NFNL_MSG_BATCH_BEGIN, _NLM_F_REQUEST, seq, 0, _NFNL_SUBSYS_NFTABLES, b"")]
    acked = []
    for plan in plans:
        if plan.rules is None:
            raise ValueError("a chain deletion is not a content swap")
        fam = _NFPROTO[plan.family]
        where = _str(_NFTA_RULE_TABLE, _TABLE) + _str(_NFTA_RULE_CHAIN, plan.chain)
        seq += 1
        parts.append(_message(subsys | _NFT_MSG_DELRULE, _NLM_F_REQUEST | _NLM_F_ACK, seq, fam,
                              0, where))
        acked.append(seq)
        for rule in plan.rules:
            seq += 1
            flags = _NLM_F_REQUEST | _NLM_F_CREATE | _NLM_F_APPEND | _NLM_F_ACK
            body = where + rule_expressions(rule, plan.family) + rule_compat()
            parts.append(_message(subsys | _NFT_MSG_NEWRULE, flags, seq, fam, 0, body))
            acked.append(seq)
    seq += 1
    parts.append(_message(_NFNL_MSG_BATCH_END, _NLM_F_REQUEST, seq, 0, _NFNL_SUBSYS_NFTABLES, b""))
    return b"".join(parts), tuple(acked)


def acks(buf: bytes) -> list[tuple[int, int]]:
    """(sequence number, error code) of each NLMSG_ERROR in a datagram; 0 is an acknowledgement.

    Other messages are skipped; a truncated tail is ignored, and every step advances.
    """
    out = []
    off = 0
    while off + 16 <= len(buf):
        length, kind, _, seq, _ = struct.unpack_from("=IHHII", buf, off)
        if kind == _NLMSG_ERROR and off + 20 <= len(buf):
            out.append((seq, struct.unpack_from("=i", buf, off + 16)[0]))
        off += max(length + (-length % 4), 16)
    return out


class _Channel:
    """One NETLINK_NETFILTER socket, used by one family's transactions at a time."""

    def __init__(self) -> None:
        try:
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                      NETLINK_NETFILTER)
            self.sock.bind((0, 0))
        except OSError as exc:
            raise BackendUnavailable(f"no nf_tables netlink socket: {exc.strerror}") from None
        self.seq = int(time.time()) & 0x3FFFFFFF
        self.lock = threading.Lock()

    def commit(self, plans: Sequence[Plan], timeout: float) -> None:
        """Send the plans' batch and wait for every acknowledgement; any error aborts it all."""
        with self.lock:
            data, acked = batch(plans, self.seq)
            self.seq = (self.seq + len(acked) + 2) & 0x3FFFFFFF
            try:
                self.sock.send(data)
            except OSError as exc:
                raise TransactionFailed(f"nf_tables batch not sent: {exc.strerror}") from None
            want = set(acked)
            errors: list[str] = []
            deadline = time.monotonic() + timeout
            while want:
                try:
                    buf = self.sock.recv(65536, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    left = deadline - time.monotonic()
                    if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                        raise TransactionFailed(
                            f"nf_tables batch: no answer from the kernel within {timeout:g}s"
                        ) from None
                    continue
                for seq, code in acks(buf):
                    if seq in want:
                        want.discard(seq)
                        if code:
                            errors.append(f"{errno.errorcode.get(-code, str(-code))} "
                                          f"({os.strerror(-code)})")
                if errors:
                    # the kernel aborted the whole batch: drain the other answers, then fail
                    want.clear()
            if errors:
                self._drain()
                chains = ", ".join(sorted({f"{p.family} {p.chain}" for p in plans}))
                raise TransactionFailed(f"nf_tables refused the batch for {chains}: "
                                        + "; ".join(errors))

    def _drain(self) -> None:
        while True:
            try:
                self.sock.recv(65536, socket.MSG_DONTWAIT)
            except OSError:
                return

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()


def _is_swap(plan: Plan) -> bool:
    """True for a content swap of the existing chain whose jump is in place: netlink's part."""
    return plan.rules is not None and not plan.insert_jump and plan.delete_jumps == 0


def _default_log() -> EventLog:
    import structlog

    log: EventLog = structlog.get_logger("sslvpn_heartbeat.rules")
    return log


class NftBackend:
    """Content swaps over nf_tables netlink, everything else through iptables-restore/-save."""

    name = "nft"
    parallel_safe = True  # one socket per family; the restore path is parallel-safe too

    def __init__(self, runner: Runner | None = None, lock_wait_s: float = 5.0, *,
                 prestart: bool = False, log: EventLog | None = None) -> None:
        self._runner: Runner = runner or SubprocessRunner()
        self.lock_wait_s = lock_wait_s
        self._prestart = prestart
        # The structural changes it does are rare: no iptables-restore is kept started for them.
        self._restore = RestoreBackend(self._runner, lock_wait_s)
        flavour = self._restore.flavour(Family.V4)
        if flavour != "nf_tables":
            raise BackendUnavailable(
                f"backend nft drives nf_tables only, but this system's iptables is {flavour}")
        self._log = log
        self._channels: dict[Family, _Channel] = {}
        self._channels[Family.V4] = _Channel()  # BackendUnavailable now if netlink is closed to us
        self._pending: dict[Family, Plan] = {}
        self._guard = threading.Lock()
        self._inflight = 0
        self._started: dict[Family, int] = {}  # monotonic ns each family's last commit began
        self._inflight_cv = threading.Condition()
        self.fallen_back: str | None = None  # why netlink was given up, once it was
        self.netlink_commits = 0  # transactions the kernel took over netlink

    @property
    def via_netlink(self) -> bool:
        """True while content swaps still go over netlink."""
        return self.fallen_back is None

    def flavour(self, family: Family) -> str:
        """``nf_tables``, the flavour of the iptables it must agree with."""
        return self._restore.flavour(family)

    def plans_from_fresh_read(self, family: Family) -> bool:
        """False: nf_tables changes only what a transaction names; nothing stale is written back."""
        return False

    def _channel(self, family: Family) -> _Channel:
        with self._guard:
            ch = self._channels.get(family)
            if ch is None:
                ch = self._channels[family] = _Channel()
            return ch

    def apply(self, plan: Plan, *, wait_s: float) -> None:
        """A content swap of the existing chain over netlink; any other plan by iptables-restore
        (within ``wait_s``: nf_tables takes no lock, so only the restore path waits)."""
        if not _is_swap(plan) or not self.via_netlink:
            self._pending.pop(plan.family, None)
            self._restore.apply(plan, wait_s=wait_s)
            return
        self._pending.pop(plan.family, None)
        channel = self._channel(plan.family)
        with self._inflight_cv:
            self._inflight += 1
            self._started[plan.family] = time.monotonic_ns()
        try:
            channel.commit((plan,), wait_s)
        finally:
            with self._inflight_cv:
                self._inflight -= 1
                self._inflight_cv.notify_all()
        self._pending[plan.family] = plan  # only once the kernel took it
        with self._inflight_cv:
            self.netlink_commits += 1
        # The caller reads back next, starting iptables-save: Python holds the interpreter lock
        # through most of a process start (about a millisecond). Hand the lock over first, so
        # the other family's transaction, if its thread is waiting for it, goes out now.
        time.sleep(0)

    def apply_many(self, plans: Sequence[Plan]) -> bool:
        """Commit several families' content swaps as one netlink batch, one kernel transaction
        for all; True once the kernel took it. False, having changed nothing, when any plan is
        not a content swap of an existing chain or netlink was given up: apply each instead.

        For an engine that commits every family before it reads any back: one system call
        instead of a thread per family, which Python's interpreter lock and process starts slow.
        """
        if (not self.via_netlink or len({p.family for p in plans}) != len(plans)
                or not all(_is_swap(p) for p in plans)):
            return False
        for plan in plans:
            self._pending.pop(plan.family, None)
        self._channel(plans[0].family).commit(plans, self.lock_wait_s + 1)
        now = time.monotonic_ns()
        with self._inflight_cv:
            for plan in plans:
                self._pending[plan.family] = plan
                self._started[plan.family] = now
            self.netlink_commits += 1
        return True

    def _sibling_commits_done(self, family: Family) -> bool:
        """True when no commit is under way and every other family swapped over netlink before
        has started one since just before ``family``'s (the engine does families side by side)."""
        if self._inflight:
            return False
        since = self._started.get(family, 0) - SIBLING_WINDOW_NS
        return all(t >= since for f, t in self._started.items() if f is not family)

    def read(self, family: Family, chain: str) -> TableState:
        """``iptables-save``'s view; the first read after a netlink commit is also its proof."""
        plan = self._pending.pop(family, None)
        if plan is not None:
            # The rule is in effect already; the read-back may wait a little. The other
            # family's commit, under way or about to start in the engine's other thread, goes
            # first, before this thread starts a process and holds the interpreter lock.
            with self._inflight_cv:
                self._inflight_cv.wait_for(lambda: self._sibling_commits_done(family),
                                           timeout=SIBLING_WINDOW_NS / 1e9)
        try:
            state = self._restore.read(family, chain)
        except RulesError as exc:
            if plan is None or isinstance(exc, BackendUnavailable):
                raise
            return self._give_up(plan, f"iptables-save could not read the table: {exc}")
        if plan is None or plan.chain != chain or plan.rules is None:
            return state
        want = tuple(r.save_form(family, chain) for r in plan.rules)
        if not state.chain_present or len(state.rules) != len(want) or state.rules == want:
            # Right, or changed by someone else since (chain gone, flushed, a rule added): that
            # is the engine's to see and mend, as with any backend, not a fault of this one.
            return state
        return self._give_up(plan, f"iptables-save shows rules={state.rules}, "
                                   f"iptables-restore would have written rules={want}")

    def _give_up(self, plan: Plan, reason: str) -> TableState:
        """Fall back to iptables-restore for good: say so once, re-apply ``plan``, read again."""
        with self._guard:
            first = self.fallen_back is None
            if first:
                self.fallen_back = reason
                self._restore = RestoreBackend(self._runner, self.lock_wait_s,
                                               prestart=self._prestart)
        if first:
            (self._log or _default_log()).warning(
                "firewall-backend-fallback", family=str(plan.family), reason=reason,
                message="nf_tables netlink swap given up for good: iptables-restore from now on")
        self._restore.apply(plan, wait_s=self.lock_wait_s + 1.0)
        return self._restore.read(plan.family, plan.chain)

    def close(self) -> None:
        """Close the netlink sockets and end what the restore path keeps started."""
        with self._guard:
            channels, self._channels = self._channels, {}
        for ch in channels.values():
            ch.close()
        self._restore.close()
