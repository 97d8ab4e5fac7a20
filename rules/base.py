"""The Backend protocol, the command runner, and detection of the system's iptables flavour."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from rules.errors import BackendUnavailable
from rules.model import Family
from rules.plan import Plan, TableState

__all__ = [
    "Backend",
    "CommandResult",
    "Runner",
    "StartedCommand",
    "SubprocessRunner",
    "Tools",
    "detect_tools",
]


@dataclass(frozen=True)
class CommandResult:
    """What a finished command returned."""

    returncode: int
    stdout: str
    stderr: str


class Runner(Protocol):
    """Runs an argument list (never a shell string) and returns its result."""

    def __call__(
        self, argv: Sequence[str], *, input: str | None = None, timeout: float = 30.0
    ) -> CommandResult:
        """Run ``argv`` to completion."""
        ...


def _child_env() -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "LC_ALL": "C"}
    if "XTABLES_LOCKFILE" in os.environ:  # iptables-legacy's lock path, honoured as given
        env["XTABLES_LOCKFILE"] = os.environ["XTABLES_LOCKFILE"]
    return env


class StartedCommand:
    """A child already started and waiting for its standard input.

    Starting a program (fork, exec, dynamic loading) costs about a millisecond; a command
    started ahead of need pays that before the event it serves, not after.
    """

    def __init__(self, argv: Sequence[str]) -> None:
        self.argv = list(argv)
        try:
            self._p = subprocess.Popen(
                self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True, env=_child_env(),
            )
        except FileNotFoundError:
            raise BackendUnavailable(f"{argv[0]}: not installed (install Debian's iptables)") from None
        except PermissionError as exc:
            raise BackendUnavailable(f"{argv[0]}: cannot execute: {exc.strerror}") from None

    @property
    def alive(self) -> bool:
        """True while the child has not exited (it should be waiting for input)."""
        return self._p.poll() is None

    def finish(self, input: str | None, timeout: float) -> CommandResult:
        """Feed ``input``, close stdin, and wait for the result; killed after ``timeout``."""
        # The bound is a kill timer, not communicate(timeout=): with a timeout, Python waits for
        # the child's exit by sleeping in steps of 0.5, 1, 2 ms, a millisecond lost per call.
        timer = threading.Timer(timeout, self._p.kill)
        timer.daemon = True
        timer.start()
        try:
            out, err = self._p.communicate(input or "")
        finally:
            timer.cancel()
        if self._p.returncode < 0:
            err = f"{err}\n{self.argv[0]} killed after {timeout:g}s".strip()
        return CommandResult(self._p.returncode, out, err)

    def discard(self) -> None:
        """End an unused child: closing its input makes it exit having done nothing."""
        with contextlib.suppress(OSError, ValueError):
            if self._p.stdin is not None:
                self._p.stdin.close()
        try:
            self._p.communicate(timeout=5)
        except (subprocess.TimeoutExpired, ValueError):
            self._p.kill()
            self._p.wait()


class SubprocessRunner:
    """The real runner: subprocess with an argument list, output captured, C locale."""

    def __call__(
        self, argv: Sequence[str], *, input: str | None = None, timeout: float = 30.0
    ) -> CommandResult:
        """Run ``argv``; a missing program becomes BackendUnavailable, never a traceback."""
        return StartedCommand(argv).finish(input, timeout)

    def start(self, argv: Sequence[str]) -> StartedCommand:
        """Start ``argv`` now; feed it later with ``finish``."""
        return StartedCommand(argv)


@dataclass(frozen=True)
class Tools:
    """The iptables programs of one family, all of the same flavour (nf_tables or legacy)."""

    family: Family
    flavour: str  # "nf_tables" or "legacy"
    save: str
    restore: str


def detect_tools(family: Family, runner: Runner) -> Tools:
    """Find the family's save/restore programs of the flavour that ``iptables`` on PATH is.

    The flavour is read from ``iptables -V`` ("(nf_tables)" or "(legacy)"), not assumed.
    Raises BackendUnavailable when the family's programs are missing.
    """
    prog = family.program
    if shutil.which(prog) is None:
        raise BackendUnavailable(f"{prog} not found on PATH")
    res = runner([prog, "-V"], timeout=10)
    if res.returncode != 0:
        raise BackendUnavailable(f"{prog} -V failed: {res.stderr.strip() or res.stdout.strip()}")
    flavour = "nf_tables" if "nf_tables" in res.stdout else "legacy"
    # A bare "iptables" symlinked into PATH (tests, containers) decides; the plain
    # save/restore beside it are the same flavour, so prefer those names.
    save, restore = f"{prog}-save", f"{prog}-restore"
    if shutil.which(save) is None or shutil.which(restore) is None:
        short = "nft" if flavour == "nf_tables" else "legacy"
        save, restore = f"{prog}-{short}-save", f"{prog}-{short}-restore"
    if shutil.which(save) is None or shutil.which(restore) is None:
        raise BackendUnavailable(f"{prog}-save/{prog}-restore not found")
    return Tools(family, flavour, save, restore)


class Backend(Protocol):
    """Reads one family's table and commits the plans of one engine step.

    ``commit`` takes the plans of every family the step changes (at most one each) and either
    commits each whole or leaves it unchanged (raising TransactionFailed, LockContention or
    BatchRefused); it never plans, retries or falls back: that is the engine's. ``read`` returns
    the table's state as the kernel holds it now and changes nothing.
    """

    name: str
    lock_wait_s: float  # the bound on waiting for the xtables lock when no deadline is given

    def flavour(self, family: Family) -> str:
        """The iptables flavour this backend writes for ``family``."""
        ...

    def read(self, family: Family, chain: str) -> TableState:
        """The kernel's current state of ``chain`` and its jumps."""
        ...

    def commit(self, plans: Sequence[Plan], wait_s: float) -> None:
        """Commit ``plans`` (one per family) within ``wait_s`` seconds, lock wait included."""
        ...

    def close(self) -> None:
        """Release what the backend keeps (started programs, sockets)."""
