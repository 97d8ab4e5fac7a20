"""The chain engine: read, plan, apply once per family, read back; one attempt per call.

``Firewall`` is what the CLI and the daemon use. It owns one chain and its jump from INPUT, for
IPv4 and (where the system has it) IPv6, and touches nothing else.
"""

from __future__ import annotations

import concurrent.futures
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from rules.base import Backend
from rules.errors import BackendUnavailable, ForeignChain, LockContention, ReadBackMismatch, TransactionFailed
from rules.model import ChainSpec, Family, Mode
from rules.render import Plan, TableState, desired_state, foreign_conflict, plan_apply, plan_remove

__all__ = ["ApplyReport", "EventLog", "Firewall"]


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


@dataclass(frozen=True)
class _FamilyResult:
    changed: bool
    transactions: int
    committed_ns: int | None = None


@dataclass(frozen=True)
class ApplyReport:
    """What one ensure()/remove() did: the families it changed and the transactions it took."""

    changed: tuple[Family, ...]
    transactions: int
    # monotonic_ns when the last family's transaction was committed (before its read-back):
    # the moment the rule took effect, for latency reports
    committed_ns: int | None = None


class Firewall:
    """Keeps our chain in the desired mode with exactly one jump at the top of INPUT.

    Each call is one attempt: it either reaches the mode, read back, or raises having changed
    nothing more than whole transactions. Trying again is the caller's decision. (A plan made
    from the last read-back that proves stale is made once more from a fresh read within the
    same call: a cache miss, not a retry.)
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
    ) -> None:
        self.backend = backend
        self.spec = spec
        self._log: EventLog = log or _Silent()
        self._clock = clock
        self._kernel_has_ipv6 = kernel_has_ipv6
        self._want_v6 = ipv6
        self.families: tuple[Family, ...] = ()  # set by detect_families()
        self._known: dict[Family, TableState] = {}
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._owned = False  # check_ownership() passed once

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

    def ensure(self, mode: Mode, *, fresh: bool = True, deadline_ns: int | None = None) -> ApplyReport:
        """Make every family hold ``mode``: one transaction each where needed, then read back.

        ``fresh=False`` plans from the state read back after the previous change instead of
        reading the table first (the hot path of a transition: one process less). Families are
        done concurrently when the backend allows it. No transaction outlives ``deadline_ns``
        (monotonic): a lock wait past it fails. Raises ReadBackMismatch if the kernel then
        disagrees, LockContention when the xtables lock stayed busy, TransactionFailed when
        iptables refused; after any failure the next call plans from a fresh read;
        ForeignChain (before any change) on the first call when the chain is someone else's.
        """
        if not self._owned:
            self.check_ownership()
        fams = self._fams()
        pre = {} if fresh else self._commit_together(fams, mode)
        if len(fams) > 1 and self.backend.parallel_safe:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(len(fams), "family")
            futures = [self._pool.submit(self._ensure_family, f, mode, fresh, deadline_ns,
                                         pre.get(f)) for f in fams]
            results = [fut.result() for fut in futures]
        else:
            results = [self._ensure_family(f, mode, fresh, deadline_ns, pre.get(f)) for f in fams]
        return ApplyReport(
            tuple(f for f, r in zip(fams, results, strict=True) if r.changed),
            sum(r.transactions for r in results),
            max((r.committed_ns for r in results if r.committed_ns is not None), default=None),
        )

    def _commit_together(self, fams: tuple[Family, ...], mode: Mode) -> dict[Family, tuple[Plan, int]]:
        """On the hot path, with a backend that can (``apply_many``), commit every family's plan
        from the last read-backs in one transaction before any read-back; {} when not done."""
        many = getattr(self.backend, "apply_many", None)
        if many is None or len(fams) < 2:
            return {}
        plans = []
        for f in fams:
            cached = self._known.get(f)
            if cached is None or self.backend.plans_from_fresh_read(f):
                return {}
            plan = plan_apply(self.spec, f, mode, cached)
            if not plan.is_noop:
                plans.append(plan)
        try:
            if len(plans) < 2 or not many(plans):
                return {}
        except TransactionFailed:
            return {}  # one transaction: nothing changed; each family is tried on its own
        committed = self._clock()
        return {p.family: (p, committed) for p in plans}

    def _ensure_family(self, fam: Family, mode: Mode, fresh: bool, deadline_ns: int | None,
                       pre: tuple[Plan, int] | None = None) -> _FamilyResult:
        want = desired_state(self.spec, fam, mode)
        fresh = fresh or self.backend.plans_from_fresh_read(fam)
        cached = self._known.pop(fam, None)  # until read back, nothing is known
        observed = cached if cached is not None and not fresh else self.backend.read(fam, self.spec.name)
        tx = 0
        while True:
            plan = plan_apply(self.spec, fam, mode, observed)
            if plan.is_noop:
                self._known[fam] = observed
                return _FamilyResult(tx > 0, tx)
            tx += 1
            try:
                if pre is not None and observed is cached and plan == pre[0]:
                    committed = pre[1]  # committed with the other families (_commit_together)
                else:
                    self.backend.apply(plan, wait_s=self._wait_s(deadline_ns))
                    committed = self._clock()
            except LockContention:
                raise  # the deadline is spent: no second wait
            except TransactionFailed:
                if observed is not cached:
                    raise
                observed = self.backend.read(fam, self.spec.name)  # the cache was stale
                continue
            after = self.backend.read(fam, self.spec.name)
            if (after.chain_present, after.rules, after.jumps) == (want.chain_present, want.rules,
                                                                   want.jumps):
                self._known[fam] = after
                return _FamilyResult(True, tx, committed)
            if observed is not cached:
                raise ReadBackMismatch(
                    f"{fam}: after applying {mode}, the kernel holds rules={after.rules} "
                    f"jumps={after.jumps}; expected rules={want.rules} jumps={want.jumps}"
                )
            # Planned from the last read-back, which someone changed since (a firewall reload):
            # plan once more, at once, from what the kernel holds now.
            observed = after

    def close(self) -> None:
        """Release the worker threads and whatever the backend keeps running."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self.backend.close()

    def remove(self, *, deadline_ns: int | None = None) -> ApplyReport:
        """Delete our jumps and our chain in every family; read back that both are gone.
        Raises ForeignChain, before any change, when the chain is someone else's."""
        self.check_ownership()
        changed: list[Family] = []
        for fam in self._fams():
            observed = self.backend.read(fam, self.spec.name)
            plan = plan_remove(self.spec, fam, observed)
            if plan.is_noop:
                continue
            self._known.pop(fam, None)
            self.backend.apply(plan, wait_s=self._wait_s(deadline_ns))
            after = self.backend.read(fam, self.spec.name)
            if after.chain_present or after.jumps:
                raise ReadBackMismatch(f"{fam}: chain {self.spec.name} still present after removal")
            changed.append(fam)
        return ApplyReport(tuple(changed), len(changed))
