"""The chain engine: read, plan every family, commit once, read back; one attempt per call.

``Firewall`` is what the CLI and the daemon use. It owns one chain and its jump from INPUT, for
IPv4 and (where the system has it) IPv6, and touches nothing else. It runs in one thread: each
step reads each family (or takes the last read-back), plans each with the pure functions of
``rules.plan``, hands every plan to the backend in one ``commit``, and reads back and compares
in one place. The backend policy lives here too: which backend ``auto`` is (``open_backend``),
and the one fallback (an nf_tables netlink batch refused, or its read-back wrong: iptables-restore
from then on, said once).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from rules.base import Backend, Runner, SubprocessRunner, detect_tools
from rules.errors import (
    BackendUnavailable,
    BatchRefused,
    ForeignChain,
    LockContention,
    ReadBackMismatch,
    TransactionFailed,
)
from rules.iptc_backend import IptcBackend
from rules.model import BACKENDS, ChainSpec, Family, Mode
from rules.nft_backend import NftBackend
from rules.plan import (
    Plan,
    TableState,
    backend_fault,
    desired_state,
    foreign_conflict,
    holds,
    plan_apply,
    plan_remove,
)
from rules.restore import RestoreBackend

__all__ = ["BACKENDS", "ApplyReport", "EventLog", "Firewall", "make_backend", "open_backend"]


class EventLog(Protocol):
    """The logging surface the engine needs (a structlog bound logger fits)."""

    def info(self, event: str, **kw: Any) -> Any:
        """Log an event."""
        ...

    def warning(self, event: str, **kw: Any) -> Any:
        """Log a warning event."""
        ...


class _Silent:
    def info(self, event: str, **kw: Any) -> None:
        pass

    def warning(self, event: str, **kw: Any) -> None:
        pass


def open_backend(name: str, *, runner: Runner | None = None, lock_wait_s: float = 5.0,
                 prestart: bool = False) -> tuple[Backend, Callable[[], Backend] | None]:
    """The backend called ``name`` and what to fall back to if it proves wrong (or None).

    ``auto`` is iptc on legacy hosts where it loads, nft (netlink) on nf_tables hosts where a
    netlink socket opens (only with the real runner: netlink writes the kernel itself), else
    restore; nft, named or chosen, falls back to restore. ``prestart`` (the daemon's) keeps an
    iptables-restore started ahead of each transaction. Raises BackendUnavailable when iptables
    is missing or the named backend cannot work here.
    """
    run = runner or SubprocessRunner()

    def restore() -> Backend:
        backend = RestoreBackend(run, lock_wait_s, prestart=prestart)
        backend.tools(Family.V4)  # fail now, clearly, if iptables is missing
        return backend

    if name == "restore":
        return restore(), None
    if name == "iptc":
        return IptcBackend(run, lock_wait_s), None
    if name == "nft":
        return NftBackend(run, lock_wait_s), restore
    if name == "auto":
        legacy = detect_tools(Family.V4, run).flavour == "legacy"
        try:
            if legacy:
                return IptcBackend(run, lock_wait_s), None
            if runner is None:
                return NftBackend(run, lock_wait_s), restore
        except BackendUnavailable:
            pass
        return restore(), None
    raise BackendUnavailable(f"unknown backend {name!r} ({', '.join(BACKENDS)})")


def make_backend(name: str, *, runner: Runner | None = None, lock_wait_s: float = 5.0,
                 prestart: bool = False) -> Backend:
    """The backend called ``name`` alone, without its fallback (see ``open_backend``)."""
    return open_backend(name, runner=runner, lock_wait_s=lock_wait_s, prestart=prestart)[0]


@dataclass(frozen=True)
class ApplyReport:
    """What one ensure()/remove() did: the families it changed and the transactions it took."""

    changed: tuple[Family, ...]
    transactions: int
    # monotonic_ns when the last commit returned (before its read-back): the moment the rule
    # took effect, for latency reports
    committed_ns: int | None = None


class Firewall:
    """Keeps our chain in the desired mode with exactly one jump at the top of INPUT.

    Each call is one attempt: it either reaches the mode, read back, or raises having changed
    nothing more than whole transactions. Trying again is the caller's decision. (A plan made
    from the last read-back that proves stale is made once more from a fresh read within the
    same call: a cache miss, not a retry; so is the one switch to the fallback backend.)
    """

    def __init__(
        self,
        backend: Backend,
        spec: ChainSpec,
        *,
        ipv6: bool = True,
        log: EventLog | None = None,
        clock: Callable[[], int] = time.monotonic_ns,
        kernel_has_ipv6: Callable[[], bool] = lambda: os.path.exists("/proc/sys/net/ipv6"),
        fallback: Callable[[], Backend] | None = None,
    ) -> None:
        self.backend = backend
        self.spec = spec
        self._log: EventLog = log or _Silent()
        self._clock = clock
        self._kernel_has_ipv6 = kernel_has_ipv6
        self._want_v6 = ipv6
        self._fallback = fallback
        self.families: tuple[Family, ...] = ()  # set by detect_families()
        self._known: dict[Family, TableState] = {}
        self._owned = False  # check_ownership() passed once

    @classmethod
    def open(cls, backend: str, spec: ChainSpec, *, ipv6: bool = True, log: EventLog | None = None,
             lock_wait_s: float = 5.0, prestart: bool = False) -> Firewall:
        """The Firewall on the backend called ``backend`` (see ``open_backend``), with its fallback."""
        chosen, fallback = open_backend(backend, lock_wait_s=lock_wait_s, prestart=prestart)
        return cls(chosen, spec, ipv6=ipv6, log=log, fallback=fallback)

    def detect_families(self) -> tuple[Family, ...]:
        """Read each family once: IPv4, plus IPv6 when configured and present (its absence is
        logged once). Call it before anything else; it sets ``families``."""
        fams = [Family.V4]
        if self._want_v6:
            try:
                self.backend.read(Family.V6, self.spec.name)
                fams.append(Family.V6)
            except BackendUnavailable as exc:
                self._log.warning("ipv6-unavailable", reason=str(exc),
                                  message="IPv6 chain skipped: ip6tables missing")
            except TransactionFailed as exc:
                if not self._kernel_has_ipv6():
                    self._log.warning("ipv6-unavailable", reason=str(exc),
                                      message="IPv6 chain skipped: the kernel has no IPv6")
                else:
                    # ip6tables exists and so does IPv6: a failure now is transient, and
                    # dropping IPv6 for good would leave IPv6 clients of a dead service in.
                    fams.append(Family.V6)
                    self._log.warning("ipv6-read-failed", reason=str(exc),
                                      message="IPv6 chain kept; applying will be retried")
        self.families = tuple(fams)
        return self.families

    def _fams(self) -> tuple[Family, ...]:
        if not self.families:
            raise RuntimeError("Firewall.detect_families() was not called")
        return self.families

    def read(self) -> dict[Family, TableState]:
        """The kernel's state of our chain in each family."""
        return {f: self.backend.read(f, self.spec.name) for f in self._fams()}

    def check_ownership(self) -> dict[Family, TableState]:
        """Read every family; raise ForeignChain, having changed nothing, if the chain holds or
        is referenced by anything the agent never writes. The one place that check is made."""
        states = self.read()
        conflicts = tuple(c for f, st in states.items()
                          if (c := foreign_conflict(st, self.spec.name, f)) is not None)
        if conflicts:
            raise ForeignChain(self.spec.name, conflicts)
        self._owned = True
        return states

    def _wait_s(self, deadline_ns: int | None) -> float:
        """Seconds left before ``deadline_ns`` (monotonic), at least a little; the backend's
        own bound when there is no deadline."""
        if deadline_ns is None:
            return self.backend.lock_wait_s + 1.0  # the lock wait, and the commit itself
        return max(0.05, (deadline_ns - self._clock()) / 1e9)

    def _fall_back(self, family: Family, reason: str) -> bool:
        """Give up the first backend for good, say so once; False when there is no fallback."""
        if self._fallback is None:
            return False
        make, self._fallback = self._fallback, None
        old, self.backend = self.backend, make()
        old.close()
        self._log.warning("firewall-backend-fallback", family=str(family), reason=reason,
                          message=f"backend {old.name} given up for good: {self.backend.name} "
                                  "from now on")
        return True

    def ensure(self, mode: Mode, *, fresh: bool = True, deadline_ns: int | None = None) -> ApplyReport:
        """Make every family hold ``mode``: one commit for all that need it, then read back.

        ``fresh=False`` plans from the state read back after the previous change instead of
        reading the table first (the hot path of a transition: one process less per family).
        No transaction outlives ``deadline_ns`` (monotonic): a lock wait past it fails. Raises
        ReadBackMismatch if the kernel then disagrees, LockContention when the xtables lock
        stayed busy, TransactionFailed when iptables refused; after any failure the next call
        plans from a fresh read; ForeignChain (before any change) on the first call when the
        chain is someone else's.
        """
        fams = self._fams()
        known, self._known = self._known, {}  # until read back, nothing is known
        if not self._owned:
            observed, cached = self.check_ownership(), set()  # a fresh read of every family
        else:
            cached = set() if fresh else {f for f in fams if f in known}
            observed = {f: known[f] if f in cached else self.backend.read(f, self.spec.name)
                        for f in fams}
        want: dict[Family, TableState] = {}  # made after the first commit: it is not in the way
        changed: set[Family] = set()
        tx = 0
        committed: int | None = None
        for _ in range(4):  # a stale cache, the fallback, and the attempt after each
            plans = [p for f in fams if not (p := plan_apply(self.spec, f, mode, observed[f])).is_noop]
            if not plans:
                self._known = observed
                return ApplyReport(tuple(f for f in fams if f in changed), tx, committed)
            try:
                self.backend.commit(plans, self._wait_s(deadline_ns))
            except LockContention:
                raise  # the deadline is spent: no second wait
            except TransactionFailed as exc:
                if cached & {p.family for p in plans}:
                    observed, cached = self.read(), set()  # planned from a stale read-back
                    continue
                if isinstance(exc, BatchRefused) and self._fall_back(plans[0].family, str(exc)):
                    continue
                raise
            committed = self._clock()
            tx += len(plans)
            want = want or {f: desired_state(self.spec, f, mode) for f in fams}
            after = {p.family: self.backend.read(p.family, self.spec.name) for p in plans}
            changed.update(after)
            observed.update(after)
            wrong = [f for f, st in after.items() if not holds(st, want[f])]
            if not wrong:
                self._known = observed
                return ApplyReport(tuple(f for f in fams if f in changed), tx, committed)
            fault = next((f for f in wrong if backend_fault(after[f], want[f])), None)
            if fault is not None and self._fall_back(
                    fault, f"{fault}: the kernel holds rules={after[fault].rules} after the commit; "
                           f"iptables-restore would have written rules={want[fault].rules}"):
                cached = set()
                continue
            if cached & set(wrong):
                # Planned from the last read-back, which someone changed since (a firewall
                # reload): plan once more, at once, from what the kernel holds now.
                cached = set()
                continue
            break
        want = want or {f: desired_state(self.spec, f, mode) for f in fams}
        f = next((f for f in fams if not holds(observed[f], want[f])), fams[0])
        st = observed[f]
        raise ReadBackMismatch(
            f"{f}: after applying {mode}, the kernel holds rules={st.rules} jumps={st.jumps}; "
            f"expected rules={want[f].rules} jumps={want[f].jumps}")

    def remove(self, *, deadline_ns: int | None = None) -> ApplyReport:
        """Delete our jumps and our chain in every family, in one commit; read back that both
        are gone. Raises ForeignChain, before any change, when the chain is someone else's."""
        states = self.check_ownership()
        self._known.clear()
        plans: Sequence[Plan] = [p for f, st in states.items()
                                 if not (p := plan_remove(self.spec, f, st)).is_noop]
        if not plans:
            return ApplyReport((), 0)
        self.backend.commit(plans, self._wait_s(deadline_ns))
        committed = self._clock()
        for plan in plans:
            after = self.backend.read(plan.family, self.spec.name)
            if after.chain_present or after.jumps:
                raise ReadBackMismatch(f"{plan.family}: chain {self.spec.name} still present after removal")
        return ApplyReport(tuple(p.family for p in plans), len(plans), committed)

    def close(self) -> None:
        """Release whatever the backend keeps running."""
        self.backend.close()
