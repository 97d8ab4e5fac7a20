"""The ``restore`` backend: iptables-restore --noflush of the system's own flavour.

This module holds the only subprocess calls that change the firewall. One call = one
transaction: iptables-restore commits the whole ``*filter`` block or nothing (nf_tables: one
netlink batch; legacy: one replacement of the table blob under the xtables lock).
"""

from __future__ import annotations

import math

from rules.base import CommandResult, Runner, StartedCommand, SubprocessRunner, Tools, detect_tools
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

    def __init__(self, runner: Runner | None = None, lock_wait_s: float = 5.0, *,
                 prestart: bool = False) -> None:
        self._run: Runner = runner or SubprocessRunner()
        self.lock_wait_s = lock_wait_s
        # iptables takes whole seconds; the caller's deadline is kept by the kill timer instead
        self._wait = max(1, math.ceil(lock_wait_s))
        self._tools: dict[Family, Tools] = {}
        # A long-running agent keeps one iptables-restore per family started and waiting for
        # its transaction, so a transition does not wait for a program to start. (It takes no
        # xtables lock until it reads its input.) Only with the real runner.
        self._prestart = prestart and isinstance(self._run, SubprocessRunner)
        self._ready: dict[Family, StartedCommand] = {}

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
        state = parse_save(res.stdout, chain)
        if self._prestart and family not in self._ready:
            self._ready[family] = StartedCommand(self._restore_argv(t))
        return state

    def plans_from_fresh_read(self, family: Family) -> bool:
        """True on legacy x_tables: each transaction re-declares the built-in chains with the
        policies and counters it was planned from, so a plan made from an old read would
        write old policies and counters back. Plan from a read made just before."""
        return self.tools(family).flavour == "legacy"

    def _restore_argv(self, t: Tools) -> list[str]:
        argv = [t.restore, "--noflush", "--wait", str(self._wait)]
        if t.flavour == "legacy":
            argv.append("--counters")
        return argv

    def apply(self, plan: Plan, *, wait_s: float) -> None:
        """Commit ``plan`` with ``iptables-restore --noflush --wait``: all of it or nothing.

        A restore still running after ``wait_s`` (waiting for the xtables lock) is killed; it
        commits in one system call or not at all, so killing it changes nothing."""
        t = self.tools(plan.family)
        text = render_restore(plan, keep_policy_counters=t.flavour == "legacy")
        started = self._ready.pop(plan.family, None)
        if started is not None and started.alive:
            res = started.finish(text, timeout=wait_s)
        else:
            res = self._run(self._restore_argv(t), input=text, timeout=wait_s)
        if res.returncode < 0:
            raise LockContention(f"{t.restore} --noflush: not done within {wait_s:.2g}s",
                                 stderr=res.stderr, returncode=res.returncode)
        self._check(res, f"{t.restore} --noflush")

    def close(self) -> None:
        """End the programs started ahead of need (they exit without changing anything)."""
        ready, self._ready = self._ready, {}
        for started in ready.values():
            started.discard()

    @staticmethod
    def _check(res: CommandResult, what: str) -> None:
        if res.returncode == 0:
            return
        if res.returncode == XTABLES_RESOURCE_PROBLEM:
            raise LockContention(f"{what}: xtables lock or resource busy", stderr=res.stderr,
                                 returncode=res.returncode)
        raise TransactionFailed(f"{what} exited {res.returncode}", stderr=res.stderr,
                                returncode=res.returncode)
