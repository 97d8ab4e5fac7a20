"""The chain engine: read, plan, apply once per family, read back; retry lock contention.

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
from rules.errors import BackendUnavailable, LockContention, ReadBackMismatch, TransactionFailed
from rules.model import ChainSpec, Family, Mode
from rules.render import Plan, TableState, desired_state, plan_apply, plan_remove

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
    retries: int
    repaired: bool
    committed_ns: int | None = None


@dataclass(frozen=True)
class ApplyReport:
    """What one ensure()/remove() did: the families it changed and the transactions it took."""

    changed: tuple[Family, ...]
    transactions: int
    retries: int
    repaired: tuple[Family, ...] = ()
    # monotonic_ns when the last family's transaction was committed (before its read-back):
    # the moment the rule took effect, for latency reports
    committed_ns: int | None = None


class Firewall:
    """Keeps our chain in the desired mode with exactly one jump at the top of INPUT."""

    def __init__(
        self,
        backend: Backend,
        spec: ChainSpec,
        *,
        ipv6: bool = True,
        log: EventLog | None = None,
        attempts: int = 4,
        backoff_s: float = 0.05,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], int] = time.monotonic_ns,
        kernel_has_ipv6: Callable[[], bool] = lambda: os.path.exists("/proc/sys/net/ipv6"),
    ) -> None:
        self.backend = backend
        self.spec = spec
        self._log: EventLog = log or _Silent()
        self._attempts = attempts
        self._backoff = backoff_s
        self._sleep = sleep
        self._clock = clock
        self._kernel_has_ipv6 = kernel_has_ipv6
        self._want_v6 = ipv6
        self._families: tuple[Family, ...] | None = None
        self._known: dict[Family, TableState] = {}
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    @property
    def families(self) -> tuple[Family, ...]:
        """IPv4, plus IPv6 when configured and present (its absence is logged once)."""
        if self._families is None:
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
            self._families = tuple(fams)
        return self._families

    def read(self) -> dict[Family, TableState]:
        """The kernel's state of our chain in each family."""
        return {f: self.backend.read(f, self.spec.name) for f in self.families}

    def ensure(self, mode: Mode, *, force: bool = False, fresh: bool = True) -> ApplyReport:
        """Make every family hold ``mode``: one transaction each where needed, then read back.

        ``fresh=False`` plans from the state read back after the previous change instead of
        reading the table first (the hot path of a transition: one process less); a stale plan
        fails as a whole and is retried from a fresh read. Families are done concurrently when
        the backend allows it. Raises ReadBackMismatch if the kernel then disagrees,
        LockContention when the xtables lock stayed busy through every retry,
        TransactionFailed when iptables refused.
        """
        fams = self.families
        pre = self._commit_together(fams, mode, force) if not fresh else {}
        if len(fams) > 1 and getattr(self.backend, "parallel_safe", False):
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(len(fams), "family")
            futures = [self._pool.submit(self._ensure_family, f, mode, force, fresh, pre.get(f))
                       for f in fams]
            results = [fut.result() for fut in futures]
        else:
            results = [self._ensure_family(f, mode, force, fresh, pre.get(f)) for f in fams]
        return ApplyReport(
            tuple(f for f, r in zip(fams, results, strict=True) if r.changed),
            sum(r.transactions for r in results),
            sum(r.retries for r in results),
            tuple(f for f, r in zip(fams, results, strict=True) if r.repaired),
            max((r.committed_ns for r in results if r.committed_ns is not None), default=None),
        )

    def _commit_together(self, fams: tuple[Family, ...], mode: Mode,
                         force: bool) -> dict[Family, tuple[Plan, int]]:
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
            plan = plan_apply(self.spec, f, mode, cached, force=force)
            if not plan.is_noop:
                plans.append(plan)
        try:
            if len(plans) < 2 or not many(plans):
                return {}
        except (LockContention, TransactionFailed):
            return {}  # one transaction: nothing changed; each family is tried on its own
        committed = self._clock()
        return {p.family: (p, committed) for p in plans}

    def _ensure_family(self, fam: Family, mode: Mode, force: bool, fresh: bool,
                       pre: tuple[Plan, int] | None = None) -> _FamilyResult:
        want = desired_state(self.spec, fam, mode)
        tx = retries = 0
        fresh = fresh or self.backend.plans_from_fresh_read(fam)
        cached = None if fresh else self._known.get(fam)
        self._known.pop(fam, None)  # until read back, nothing is known
        observed = cached if cached is not None else self.backend.read(fam, self.spec.name)
        first = observed
        for attempt in range(self._attempts):
            plan = plan_apply(self.spec, fam, mode, observed, force=force)
            if plan.is_noop:
                self._known[fam] = observed
                return _FamilyResult(False, tx, retries, False)
            try:
                tx += 1
                if pre is not None and attempt == 0 and plan == pre[0]:
                    committed = pre[1]  # committed with the other families (_commit_together)
                else:
                    self.backend.apply(plan)
                    committed = self._clock()
            except (LockContention, TransactionFailed) as exc:
                # A failed transaction changed nothing; the table may have changed under us
                # (a stale -D), so the next attempt reads it again.
                if attempt + 1 >= self._attempts:
                    raise
                retries += 1
                delay = self._backoff * (2**attempt)
                self._log.warning("apply-retry", family=str(fam), attempt=attempt + 1,
                                  delay_s=delay, reason=str(exc))
                self._sleep(delay)
                observed = self.backend.read(fam, self.spec.name)
                continue
            after = self.backend.read(fam, self.spec.name)
            if (after.chain_present, after.rules, after.jumps) == (
                    want.chain_present, want.rules, want.jumps):
                self._known[fam] = after
                # content already right: only the jump needed mending
                repaired = first.chain_present and first.rules == want.rules
                return _FamilyResult(True, tx, retries, repaired, committed)
            if observed is not cached:
                raise ReadBackMismatch(
                    f"{fam}: after applying {mode}, the kernel holds rules={after.rules} "
                    f"jumps={after.jumps}; expected rules={want.rules} jumps={want.jumps}"
                )
            # Planned from a cached state that someone changed since (a firewall reload, say):
            # plan again at once from what the kernel holds now.
            retries += 1
            observed = after
        raise ReadBackMismatch(f"{fam}: {mode} not reached after {self._attempts} attempts")

    def close(self) -> None:
        """Release the worker threads and whatever the backend keeps running."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()

    def remove(self) -> ApplyReport:
        """Delete our jumps and our chain in every family; read back that both are gone."""
        changed: list[Family] = []
        tx = 0
        for fam in self.families:
            observed = self.backend.read(fam, self.spec.name)
            plan = plan_remove(self.spec, fam, observed)
            if plan.is_noop:
                continue
            tx += 1
            self._known.pop(fam, None)
            self.backend.apply(plan)
            after = self.backend.read(fam, self.spec.name)
            if after.chain_present or after.jumps:
                raise ReadBackMismatch(f"{fam}: chain {self.spec.name} still present after removal")
            changed.append(fam)
        return ApplyReport(tuple(changed), tx, 0)
