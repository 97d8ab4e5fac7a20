"""Throwaway network namespaces for tests, demos and benchmarks: made, used, always removed.

Nothing here touches the initial network namespace's firewall: every iptables command runs
through ``ip netns exec NAME``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
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
    "Lan",
    "Netns",
    "NetnsExecutor",
    "enter_netns",
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


_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def enter_netns(ns_name: str) -> None:
    """Move the calling thread (only it) into network namespace ``ns_name``.

    Sockets the thread makes afterwards, and threads it starts, live in that namespace.
    """
    fd = os.open(f"/run/netns/{ns_name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({ns_name}): {os.strerror(err)}")
    finally:
        os.close(fd)


class NetnsExecutor:
    """Worker threads living inside one network namespace: ``call(fn, ...)`` runs ``fn`` there.

    Lets a test use a client library (whose sockets are made by the calling thread) against
    addresses that exist only inside namespaces the test made. ``close()`` waits for the workers.
    """

    def __init__(self, ns_name: str, workers: int = 4) -> None:
        self.ns_name = ns_name
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix=f"in-{ns_name}",
            initializer=enter_netns, initargs=(ns_name,))

    def submit(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> concurrent.futures.Future[Any]:
        """Start ``fn(*args, **kw)`` on a worker inside the namespace; returns its future."""
        return self._pool.submit(fn, *args, **kw)

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float = 120.0, **kw: Any) -> Any:
        """Run ``fn(*args, **kw)`` inside the namespace and return (or raise) what it does."""
        return self._pool.submit(fn, *args, **kw).result(timeout)

    def close(self) -> None:
        """Stop the workers once their current calls end (calls not yet started are dropped)."""
        self._pool.shutdown(wait=True, cancel_futures=True)


class Lan:
    """An Ethernet segment: a bridge in its own namespace, to which namespaces attach by veth.

    ``attach(ns, host)`` gives ``ns`` an interface with address ``SUBNET.host/24`` on the
    bridge. Deleting the switch namespace (``close()``) removes every link at once.
    """

    def __init__(self, subnet: str = "10.210.0", prefix: str = "svl") -> None:
        if subnet.count(".") != 2:
            raise ValueError(f"subnet must be the first three octets (a /24), got {subnet!r}")
        self.subnet = subnet
        self.switch = Netns(prefix)
        self._ports = itertools.count(1)
        self.attached: dict[int, str] = {}  # host number -> name of the namespace holding it
        try:
            self.switch.run(["ip", "link", "add", "br0", "type", "bridge"])
            self.switch.run(["ip", "link", "set", "br0", "up"])
        except BaseException:
            self.switch.close()
            raise

    def addr(self, host: int) -> str:
        """The address of host number ``host`` on this segment."""
        return f"{self.subnet}.{host}"

    def attach(self, ns: Netns, host: int, ifname: str = "lan0") -> str:
        """Connect ``ns`` to the bridge through ``ifname`` addressed ``SUBNET.host/24``; returns it."""
        if not 1 <= host <= 254:
            raise ValueError(f"host must be 1..254, got {host}")
        holder = self.attached.get(host)
        if holder is not None and os.path.exists(f"/run/netns/{holder}"):
            raise ValueError(f"{self.addr(host)} is already held by namespace {holder}")
        port = f"p{next(self._ports)}"
        addr = self.addr(host)
        subprocess.run([IP, "link", "add", ifname, "netns", ns.name, "type", "veth",
                        "peer", "name", port, "netns", self.switch.name],
                       check=True, capture_output=True)
        self.switch.run(["ip", "link", "set", port, "master", "br0"])
        self.switch.run(["ip", "link", "set", port, "up"])
        ns.run(["ip", "addr", "add", f"{addr}/24", "dev", ifname])
        ns.run(["ip", "link", "set", ifname, "up"])
        self.attached[host] = ns.name
        return addr

    def free_host(self, first: int, last: int = 254) -> int:
        """The lowest host number in ``first..last`` not held by a namespace that still exists."""
        for host in range(first, last + 1):
            holder = self.attached.get(host)
            if holder is None or not os.path.exists(f"/run/netns/{holder}"):
                return host
        raise RuntimeError(f"no free address in {self.subnet}.{first}-{last}")

    def close(self) -> None:
        """Delete the switch namespace and with it every link attached to the bridge."""
        self.switch.close()
