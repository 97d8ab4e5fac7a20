"""The ``restore`` backend: iptables-restore --noflush of the system's own flavour.

This module holds the only subprocess calls that change the firewall. One call = one
transaction per family: iptables-restore commits the whole ``*filter`` block or nothing
(nf_tables: one netlink batch; legacy: one replacement of the table blob under the xtables lock).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

from rules.base import CommandResult, Runner, StartedCommand, SubprocessRunner, Tools, detect_tools
from rules.errors import LockContention, TransactionFailed
from rules.model import Family
from rules.plan import Plan, TableState, parse_save
from rules.render import render_restore

__all__ = ["XTABLES_RESOURCE_PROBLEM", "RestoreBackend"]

# iptables exits 4 for a "resource problem": above all, the xtables lock held past --wait.
XTABLES_RESOURCE_PROBLEM = 4


class RestoreBackend:
    """Commits plans with one iptables-restore per family; reads with iptables-save."""

    name = "restore"

    def __init__(self, runner: Runner | None = None, lock_wait_s: float = 5.0, *,
                 prestart: bool = False) -> None:
        self._run: Runner = runner or SubprocessRunner()
        self.lock_wait_s = lock_wait_s
        # iptables takes whole seconds; the caller's deadline is kept by the kill timer instead
        self._wait = max(1, math.ceil(lock_wait_s))
        self._tools: dict[Family, Tools] = {}
        # A long-running agent keeps one iptables-restore per family started and waiting for
        # its next transaction, so a transition does not wait for a program to start. (It
        # takes no xtables lock until it reads its input.) Only with the real runner.
        self._real = isinstance(self._run, SubprocessRunner)
        self._prestart = prestart and self._real
        self._ready: dict[Family, StartedCommand] = {}

    def tools(self, family: Family) -> Tools:
        """The family's programs, detected once (BackendUnavailable if absent)."""
        if family not in self._tools:
            self._tools[family] = detect_tools(family, self._run)
        return self._tools[family]

    def flavour(self, family: Family) -> str:
        """``nf_tables`` or ``legacy``: what the system's iptables is."""
        return self.tools(family).flavour

    def _save(self, family: Family) -> str:
        t = self.tools(family)
        res = self._run([t.save, "-t", "filter"], timeout=self._wait + 10)
        self._check(res, f"{t.save} -t filter")
        return res.stdout

    def read(self, family: Family, chain: str) -> TableState:
        """Our chain's state from ``iptables-save -t filter`` (never from ``iptables -L``).

        It changes nothing; with ``prestart``, once the save is read, it starts the family's
        idle iptables-restore for the next commit if none waits (off the path from a decision
        to the rule in effect: the engine reads back after its commit)."""
        state = parse_save(self._save(family), chain)
        if self._prestart and family not in self._ready:
            self._ready[family] = StartedCommand(self._restore_argv(self.tools(family)))
        return state

    def _restore_argv(self, t: Tools) -> list[str]:
        argv = [t.restore, "--noflush", "--wait", str(self._wait)]
        if t.flavour == "legacy":
            argv.append("--counters")
        return argv

    def _text(self, plan: Plan) -> str:
        """The plan as restore text; on legacy with the built-in chains' headers as they are now
        (a legacy table replacement would zero their counters, so they are written back)."""
        if self.tools(plan.family).flavour != "legacy":
            return render_restore(plan)
        return render_restore(plan, policies=parse_save(self._save(plan.family), plan.chain).policies)

    def commit(self, plans: Sequence[Plan], wait_s: float) -> None:
        """Commit each plan with its family's ``iptables-restore --noflush --wait``: all of it or
        nothing, per family. Every family's program is started before the first is fed.

        A restore still running ``wait_s`` after the call began (waiting for the xtables lock) is
        killed; it commits in one system call or not at all, so killing it changes nothing."""
        deadline = time.monotonic() + wait_s
        texts = [(plan, self._text(plan)) for plan in plans]
        started = [(plan, text, self._started(plan.family)) for plan, text in texts]
        failure: TransactionFailed | None = None
        for plan, text, cmd in started:
            t = self.tools(plan.family)
            left = max(0.05, deadline - time.monotonic())
            if cmd is None:
                res = self._run(self._restore_argv(t), input=text, timeout=left)
            else:
                res = cmd.finish(text, timeout=left)
            try:
                if res.returncode < 0:
                    raise LockContention(f"{t.restore} --noflush: not done within {wait_s:.2g}s",
                                         stderr=res.stderr, returncode=res.returncode)
                self._check(res, f"{t.restore} --noflush")
            except TransactionFailed as exc:
                failure = failure or exc
        if failure is not None:
            raise failure

    def _started(self, family: Family) -> StartedCommand | None:
        """The program started ahead for ``family``, if it still waits; else None."""
        cmd = self._ready.pop(family, None)
        if cmd is not None and cmd.alive:
            return cmd
        if cmd is not None:
            cmd.discard()
        if self._real:  # started now, fed once every family's program runs
            return StartedCommand(self._restore_argv(self.tools(family)))
        return None  # a runner that is not the real one: run through it

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
