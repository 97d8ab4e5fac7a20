"""The ``restore`` backend: iptables-restore --noflush of the system's own flavour.

This module holds the only subprocess calls that change the firewall. One call = one
transaction: iptables-restore commits the whole ``*filter`` block or nothing (nf_tables: one
netlink batch; legacy: one replacement of the table blob under the xtables lock).
"""

from __future__ import annotations

from rules.base import CommandResult, Runner, SubprocessRunner, Tools, detect_tools
from rules.errors import LockContention, TransactionFailed
from rules.model import Family
from rules.render import Plan, TableState, parse_save, render_restore

__all__ = ["XTABLES_RESOURCE_PROBLEM", "RestoreBackend"]

# iptables exits 4 for a "resource problem": above all, the xtables lock held past --wait.
XTABLES_RESOURCE_PROBLEM = 4


class RestoreBackend:
    """Applies plans with one iptables-restore call per family; reads with iptables-save."""

    name = "restore"
    parallel_safe = True  # each call is its own process: IPv4 and IPv6 may run side by side

    def __init__(self, runner: Runner | None = None, lock_wait_s: float = 5.0) -> None:
        self._run: Runner = runner or SubprocessRunner()
        self._wait = max(1, round(lock_wait_s))
        self._tools: dict[Family, Tools] = {}

    def tools(self, family: Family) -> Tools:
        """The family's programs, detected once (BackendUnavailable if absent)."""
        if family not in self._tools:
            self._tools[family] = detect_tools(family, self._run)
        return self._tools[family]

    def flavour(self, family: Family) -> str:
        """``nf_tables`` or ``legacy``: what the system's iptables is."""
        return self.tools(family).flavour

    def read(self, family: Family, chain: str) -> TableState:
        """Our chain's state from ``iptables-save -t filter`` (never from ``iptables -L``)."""
        t = self.tools(family)
        res = self._run([t.save, "-t", "filter"], timeout=self._wait + 10)
        self._check(res, f"{t.save} -t filter")
        return parse_save(res.stdout, chain)

    def apply(self, plan: Plan) -> None:
        """Commit ``plan`` with ``iptables-restore --noflush --wait``: all of it or nothing."""
        t = self.tools(plan.family)
        legacy = t.flavour == "legacy"
        text = render_restore(plan, keep_policy_counters=legacy)
        argv = [t.restore, "--noflush", "--wait", str(self._wait)]
        if legacy:
            argv.append("--counters")
        res = self._run(argv, input=text, timeout=self._wait + 10)
        self._check(res, f"{t.restore} --noflush")

    @staticmethod
    def _check(res: CommandResult, what: str) -> None:
        if res.returncode == 0:
            return
        if res.returncode == XTABLES_RESOURCE_PROBLEM:
            raise LockContention(f"{what}: xtables lock or resource busy", stderr=res.stderr,
                                 returncode=res.returncode)
        raise TransactionFailed(f"{what} exited {res.returncode}", stderr=res.stderr,
                                returncode=res.returncode)
