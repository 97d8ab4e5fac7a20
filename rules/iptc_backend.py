"""The ``iptc`` backend: python-iptables (libiptc) in process, for legacy x_tables hosts only.

libiptc reads the whole table, changes it in memory and replaces it with one
setsockopt(IPT_SO_SET_REPLACE): one transaction, no process spawned. It drives only legacy
x_tables: on a host whose ``iptables`` is iptables-nft its rules would be invisible to
``iptables -L``, so this backend refuses to start there. libiptc does not take the xtables lock
that iptables programs take; this module takes it around every commit.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from rules.base import Runner, SubprocessRunner, detect_tools
from rules.errors import BackendUnavailable, LockContention, TransactionFailed
from rules.model import Family, RejectRule
from rules.plan import Plan, TableState

__all__ = ["XTABLES_LOCK", "IptcBackend", "xtables_lock"]

XTABLES_LOCK = os.environ.get("XTABLES_LOCKFILE", "/run/xtables.lock")


@contextlib.contextmanager
def xtables_lock(wait_s: float, *, path: str = XTABLES_LOCK,
                 clock: Callable[[], float] = time.monotonic) -> Iterator[None]:
    """Hold the xtables lock (the flock iptables-legacy takes), waiting at most ``wait_s``."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = clock() + wait_s
        delay = 0.001
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if clock() >= deadline:
                    raise LockContention(
                        f"xtables lock {path} held by another program for more than {wait_s:g}s"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def _load_iptc() -> Any:
    try:
        import iptc
    except Exception as exc:  # iptc raises plain exceptions when libxtables is missing
        raise BackendUnavailable(f"python-iptables cannot be loaded: {exc}") from None
    return iptc


class IptcBackend:
    """Applies plans through libiptc; refuses on hosts whose iptables is nf_tables."""

    name = "iptc"

    def __init__(self, runner: Runner | None = None, lock_wait_s: float = 5.0) -> None:
        run = runner or SubprocessRunner()
        flavour = detect_tools(Family.V4, run).flavour
        if flavour != "legacy":
            raise BackendUnavailable(
                "backend iptc drives legacy x_tables only, but this system's iptables is "
                f"{flavour}: its rules would not show in 'iptables -L'; use backend = \"restore\""
            )
        self._iptc = _load_iptc()
        self.lock_wait_s = lock_wait_s

    def flavour(self, family: Family) -> str:
        """Always ``legacy``."""
        return "legacy"

    def _table(self, family: Family) -> Any:
        iptc = self._iptc
        t = iptc.Table(iptc.Table.FILTER) if family is Family.V4 else iptc.Table6(iptc.Table6.FILTER)
        t.autocommit = False
        t.refresh()
        return t

    def read(self, family: Family, chain: str) -> TableState:
        """Our chain's state as libiptc sees the kernel's table now."""
        try:
            table = self._table(family)
            if not table.is_chain(chain):
                return TableState(False, (), self._jumps(table, chain), 0)
            rules = tuple(self._save_form(family, chain, r)
                          for r in self._iptc.Chain(table, chain).rules)
            refs: list[str] = []
            for ch in table.chains:
                if ch.name == chain:
                    continue
                for r in ch.rules:
                    if r.target is not None and r.target.name == chain and not (
                        ch.name == "INPUT" and self._plain(r)):
                        refs.append(f"-A {ch.name} (a rule with conditions) -j {chain}")
            return TableState(True, rules, self._jumps(table, chain), len(refs),
                              reference_rules=tuple(refs))
        except self._iptc.IPTCError as exc:
            raise TransactionFailed(f"libiptc read failed: {exc}") from None

    def _plain(self, r: Any) -> bool:
        return (not r.matches and r.in_interface is None and r.out_interface is None
                and r.protocol in ("ip", "ipv6", "all", None)
                and r.src in ("0.0.0.0/0.0.0.0", "::/0") and r.dst in ("0.0.0.0/0.0.0.0", "::/0"))

    def _jumps(self, table: Any, chain: str) -> tuple[int, ...]:
        rules = self._iptc.Chain(table, "INPUT").rules
        return tuple(i + 1 for i, r in enumerate(rules)
                     if r.target is not None and r.target.name == chain and self._plain(r))

    def _save_form(self, family: Family, chain: str, r: Any) -> str:
        """Our rule's iptables-save form if ``r`` is one of ours; a distinct marker otherwise."""
        try:
            params = [m.get_all_parameters() for m in r.matches]
            tparams = r.target.get_all_parameters() if r.target is not None else {}
            if (r.in_interface == "!lo" and r.protocol == "tcp" and len(r.matches) == 1
                    and r.matches[0].name == "tcp" and r.target.name == "REJECT"):
                p = params[0]
                dport = int(p["dport"][0])
                syn = p.get("tcp-flags") == ["FIN,SYN,RST,ACK", "SYN"]
                if set(p) - {"dport", "tcp-flags"} or ("tcp-flags" in p and not syn):
                    raise ValueError("other tcp options")
                rw = tparams.get("reject-with", [""])[0]
                base = "icmp-port-unreachable" if rw.startswith("icmp") else rw
                rule = RejectRule(dport, base, syn_only=syn)
                if rule.save_form(family, chain).endswith(rw):
                    return rule.save_form(family, chain)
        except (ValueError, KeyError, IndexError, AttributeError):
            pass
        return f"(foreign rule: target {getattr(r.target, 'name', None)})"

    def _rule(self, family: Family, spec: RejectRule) -> Any:
        iptc = self._iptc
        r = iptc.Rule() if family is Family.V4 else iptc.Rule6()
        r.in_interface = "!lo"
        r.protocol = "tcp"
        m = r.create_match("tcp")
        m.dport = str(spec.port)
        if spec.syn_only:
            m.tcp_flags = ["FIN,SYN,RST,ACK", "SYN"]
        t = r.create_target("REJECT")
        rw = spec.save_form(family, "x").rsplit(" ", 1)[1]
        t.reject_with = rw
        return r

    def commit(self, plans: Sequence[Plan], wait_s: float) -> None:
        """Each family's table changed in memory and committed once, under the xtables lock
        (waited for at most ``wait_s`` in all, and never longer than ``lock_wait_s``)."""
        deadline = time.monotonic() + min(wait_s, self.lock_wait_s)
        for plan in plans:
            self._commit_one(plan, max(0.0, deadline - time.monotonic()))

    def _commit_one(self, plan: Plan, wait_s: float) -> None:
        iptc = self._iptc
        try:
            with xtables_lock(wait_s):
                table = self._table(plan.family)
                # A table replacement zeroes the built-in chains' policy counters: carry them over
                # from the snapshot this commit replaces.
                for ch in table.chains:
                    if table.builtin_chain(ch.name):
                        ch.set_policy(ch.get_policy(), ch.get_counters())
                inp = iptc.Chain(table, "INPUT")
                jumps = [r for r in inp.rules
                         if r.target is not None and r.target.name == plan.chain and self._plain(r)]
                for r in jumps[: plan.delete_jumps]:
                    inp.delete_rule(r)
                if plan.rules is None:
                    if table.is_chain(plan.chain):
                        table.flush_entries(plan.chain)
                        table.delete_chain(plan.chain)
                else:
                    if table.is_chain(plan.chain):
                        table.flush_entries(plan.chain)
                    else:
                        table.create_chain(plan.chain)
                    ch = iptc.Chain(table, plan.chain)
                    for spec in plan.rules:
                        ch.append_rule(self._rule(plan.family, spec))
                    if plan.insert_jump:
                        j = iptc.Rule() if plan.family is Family.V4 else iptc.Rule6()
                        j.create_target(plan.chain)
                        inp.insert_rule(j)
                table.commit()
        except iptc.IPTCError as exc:
            msg = str(exc)
            if "Resource temporarily unavailable" in msg or str(errno.EAGAIN) in msg:
                raise LockContention(f"libiptc commit: {msg}") from None
            raise TransactionFailed(f"libiptc commit failed: {msg}") from None

    def close(self) -> None:
        """Nothing to release: libiptc handles live only within one read or apply."""
