"""Throwaway network namespaces for tests, demos and benchmarks: made, used, always removed.

Nothing here touches the initial network namespace's firewall: every iptables command runs
through ``ip netns exec NAME``.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "REPO",
    "Netns",
    "legacy_path_dir",
    "veth_pair",
    "wait_for",
]

REPO = Path(__file__).resolve().parent.parent
# Resolved once, so commands run with a test's own PATH (e.g. one without iptables) still start.
IP = shutil.which("ip") or "ip"
_counter = itertools.count()


def wait_for(cond: Callable[[], Any], timeout: float = 5.0, what: str = "condition",
             interval: float = 0.005) -> Any:
    """Return cond()'s first truthy value; raise AssertionError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Netns:
    """A named network namespace with loopback up; ``close()`` kills what it started and deletes it."""

    def __init__(self, prefix: str = "svh") -> None:
        self.name = f"{prefix}{os.getpid()}x{next(_counter)}"
        self._procs: list[subprocess.Popen[Any]] = []
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        try:
            self.run(["ip", "link", "set", "lo", "up"])
        except BaseException:
            subprocess.run(["ip", "netns", "del", self.name], check=False)
            raise

    def argv(self, argv: Sequence[str]) -> list[str]:
        """The argument list that runs ``argv`` inside this namespace."""
        return [IP, "netns", "exec", self.name, *argv]

    def run(self, argv: Sequence[str], *, check: bool = True, input: str | None = None,
            env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run a command inside the namespace and wait for it (text mode, output captured)."""
        proc = subprocess.run(self.argv(argv), input=input, capture_output=True, text=True,
                              env=env, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, proc.args, proc.stdout, proc.stderr)
        return proc

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start a process inside the namespace; it is killed (its whole group) on ``close()``."""
        kw.setdefault("start_new_session", True)
        p = subprocess.Popen(self.argv(argv), **kw)
        self._procs.append(p)
        return p

    def python(self, *args: str) -> list[str]:
        """argv running this test interpreter with ``args`` (to be passed to run/popen)."""
        return [sys.executable, *args]

    def save(self, family: int = 4, flavour: str = "nft") -> str:
        """The namespace's filter table as iptables-save prints it, comments dropped."""
        tool = f"ip{'6' if family == 6 else ''}tables-{flavour}-save"
        out = self.run([tool, "-t", "filter"]).stdout
        return "\n".join(ln for ln in out.splitlines() if not ln.startswith("#"))

    def close(self) -> None:
        """Kill every process started here (SIGKILL to its group) and delete the namespace."""
        for p in self._procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=5)
        # Processes still inside (started by commands we ran) die with the namespace's pids.
        pids = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True)
        for pid in pids.stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", self.name], check=False, capture_output=True)

    def __enter__(self) -> Netns:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def veth_pair(a: Netns, b: Netns, a_addr: str, b_addr: str, prefix_len: int = 24) -> None:
    """Connect two namespaces with a veth pair and give each end an address (IPv4 or IPv6)."""
    ia, ib = f"v{a.name[-10:]}", f"v{b.name[-10:]}"
    subprocess.run(["ip", "link", "add", ia, "netns", a.name, "type", "veth",
                    "peer", "name", ib, "netns", b.name], check=True)
    for ns, ifname, addr in ((a, ia, a_addr), (b, ib, b_addr)):
        extra = ["nodad"] if ":" in addr else []
        ns.run(["ip", "addr", "add", f"{addr}/{prefix_len}", "dev", ifname, *extra])
        ns.run(["ip", "link", "set", ifname, "up"])


@contextlib.contextmanager
def legacy_path_dir(tmp: Path) -> Iterator[str]:
    """A PATH whose ``iptables*`` commands are the legacy (x_tables) variants.

    Lets a test run the agent on a host whose ``iptables`` is iptables-legacy without changing
    the system's alternatives. Yields the new PATH value.
    """
    d = tmp / "legacy-bin"
    d.mkdir(exist_ok=True)
    for fam in ("iptables", "ip6tables"):
        for suffix in ("", "-save", "-restore"):
            target = shutil.which(f"{fam}-legacy{suffix}")
            assert target, f"{fam}-legacy{suffix} not installed"
            link = d / f"{fam}{suffix}"
            if not link.exists():
                link.symlink_to(target)
    yield f"{d}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
