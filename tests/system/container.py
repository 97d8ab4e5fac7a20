"""A Debian 12 that really boots systemd: a root file system made by mmdebstrap, booted by
systemd-nspawn in a network namespace of its own, driven through nsenter.

The host need not run systemd itself. What nspawn then needs (found by trying, systemd 252):

* ``--register=no --keep-unit``: no machined and no scope unit to ask for over D-Bus;
* a cgroup made for the container (``cgroup.procs`` of a directory of ours in the unified
  hierarchy, and in ``name=systemd`` on a hybrid host), so that nspawn's ``payload`` cgroup
  lands there and not at the host's cgroup root, and two runs never share one;
* ``--system-call-filter=bpf``: nspawn's default seccomp filter refuses ``bpf()``, and the
  container's systemd then gives every unit's ``IPAddressDeny=`` no effect without a word;
* ``--private-network``: only a loopback of its own, so the package's maintainer scripts and
  the agent change the container's firewall, never the host's.

The root file system is cached as a tarball outside the work tree, keyed by everything that
defines it (the apt sources, the package list, mmdebstrap's version, the recipe below), and
unpacked afresh for every run.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from tests.netns import wait_for

__all__ = [
    "BASE_PACKAGES",
    "CACHE_DIR",
    "SYSTEM_TOOLS",
    "Container",
    "apt_sources",
    "rootfs_tarball",
    "unpack",
]

CACHE_DIR = Path(os.environ.get("SSLVPN_HEARTBEAT_TEST_CACHE", "/var/cache/sslvpn-heartbeat-tests"))
SYSTEM_TOOLS = ("mmdebstrap", "systemd-nspawn", "nsenter", "tar")
SUITE = "bookworm"
# What a Debian 12 server of the manual has besides the package's own dependencies: systemd as
# init, D-Bus, both iptables flavours, /etc/services (iptables -L prints port 8080 as http-alt),
# and rsyslog with RELP, which ships the events to a SIEM (packaging/rsyslog/).
BASE_PACKAGES = ("systemd", "systemd-sysv", "dbus", "iptables", "iproute2", "procps", "netbase",
                 "sysvinit-utils", "python3", "rsyslog", "rsyslog-relp")
# Changing how the tree is made below changes this, and with it the cache key.
RECIPE = "mmdebstrap --variant=apt --format=tar --include=...; v1"
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", "HOME": "/root",
       "DEBIAN_FRONTEND": "noninteractive"}


def apt_sources() -> list[Path]:
    """This machine's active apt source files, as apt itself reads them."""
    files = [Path("/etc/apt/sources.list")] if Path("/etc/apt/sources.list").is_file() else []
    d = Path("/etc/apt/sources.list.d")
    files += sorted(p for p in d.glob("*") if p.suffix in (".list", ".sources") and p.is_file())
    files = [p for p in files if p.read_text().strip()]
    assert files, "no apt sources on this machine to make the container from"
    return files


def _mmdebstrap_version() -> str:
    return subprocess.run(["mmdebstrap", "--version"], capture_output=True, text=True,
                          check=True).stdout.strip()


def rootfs_tarball(packages: Iterable[str]) -> tuple[Path, bool]:
    """The cached root file system holding ``packages`` (made now if absent) and whether it
    was made by this call."""
    pkgs = sorted(set(BASE_PACKAGES) | set(packages))
    sources = apt_sources()
    key_text = "\n".join([RECIPE, SUITE, _mmdebstrap_version(), " ".join(pkgs),
                          *(f"{p}\n{p.read_text()}" for p in sources)])
    key = hashlib.sha256(key_text.encode()).hexdigest()[:16]
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tarball = CACHE_DIR / f"rootfs-{SUITE}-{key}.tar"
    with open(CACHE_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one maker at a time; the others then find it made
        if tarball.exists():
            return tarball, False
        part = tarball.with_suffix(".part")
        proc = subprocess.run(["mmdebstrap", "--variant=apt", "--format=tar", "--include=" + ",".join(pkgs),
                               "--quiet", SUITE, str(part), *map(str, sources)],
                              capture_output=True, text=True, env=ENV, timeout=1200)
        if proc.returncode != 0:
            part.unlink(missing_ok=True)
            raise AssertionError(f"mmdebstrap failed:\n{proc.stderr[-4000:]}")
        (CACHE_DIR / f"rootfs-{SUITE}-{key}.key").write_text(key_text)
        part.rename(tarball)
        return tarball, True


def _cgroup_roots() -> list[Path]:
    """The hierarchies a container's cgroup is made in: unified only, or unified + name=systemd."""
    base = Path("/sys/fs/cgroup")
    if (base / "cgroup.controllers").exists():
        return [base]
    roots = [base / "unified", base / "systemd"]
    assert all(r.is_dir() for r in roots), "neither a unified nor a hybrid cgroup hierarchy"
    return roots


def _rmdir_tree(top: Path) -> None:
    """Remove an (empty of processes) cgroup and the ones below it, deepest first."""
    if not top.exists():
        return
    for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):
            d.rmdir()
    with contextlib.suppress(OSError):
        top.rmdir()


class Container:
    """A booted container on an unpacked tree; ``run`` executes in all its namespaces."""

    def __init__(self, tree: Path, name: str, log: Path) -> None:
        self.tree, self.name, self.log = tree, name, log
        self.cgroups = [r / f"sslvpn-heartbeat-test-{name}" for r in _cgroup_roots()]
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader = 0

    def boot(self, timeout: float = 120) -> None:
        """Boot systemd in the container and wait until it has finished starting up."""
        for cg in self.cgroups:
            cg.mkdir(exist_ok=True)
        procs = [str(cg / "cgroup.procs") for cg in self.cgroups]

        def into_cgroup() -> None:  # in the child, before exec: nspawn starts in our cgroup
            for p in procs:
                with open(p, "w") as f:
                    f.write("0")

        argv = ["systemd-nspawn", "--quiet", "-D", str(self.tree), "-M", self.name, "--boot",
                "--private-network", "--register=no", "--keep-unit", "--console=passive",
                "--link-journal=no", "--system-call-filter=bpf"]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                         env=ENV, preexec_fn=into_cgroup, start_new_session=True)
        self.leader = wait_for(self._find_leader, 30, "the container's PID 1", interval=0.05)
        # "offline" until systemd's private socket is up; then --wait waits for the boot's end
        state = wait_for(lambda: (self.run(["systemctl", "is-system-running", "--wait"],
                                           check=False, timeout=timeout).stdout.strip()
                                  .replace("offline", "")), 30, "systemd in the container")
        assert state in ("running", "degraded"), f"container boot ended {state!r}:\n" + \
            self.run(["systemctl", "--failed", "--no-pager"], check=False).stdout + self.boot_log()

    def _find_leader(self) -> int:
        """The PID (on the host) of the container's init: nspawn's child that is PID 1 inside."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"systemd-nspawn exited {self.proc.returncode}:\n{self.boot_log()}")
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        with contextlib.suppress(OSError):
            for pid in children.read_text().split():
                # nspawn's inner child is PID 1 before it pivots into the tree and execs systemd
                if Path(f"/proc/{pid}/comm").read_text().strip() != "systemd":
                    continue
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("NSpid:") and line.split()[-1] == "1" and \
                            len(line.split()) > 2:
                        return int(pid)
        return 0

    def boot_log(self) -> str:
        """What nspawn printed (its own errors; the console is passive)."""
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""

    def argv(self, argv: Sequence[str], env: dict[str, str] | None = None) -> list[str]:
        """The argument list running ``argv`` in every namespace of the container, clean env."""
        assert self.leader, "the container is not running"
        pairs = [f"{k}={v}" for k, v in {**ENV, **(env or {})}.items()]
        return ["nsenter", "-t", str(self.leader), "-a", "env", "-i", *pairs, *argv]

    def run(self, argv: Sequence[str], *, check: bool = True, input: str | None = None,
            env: dict[str, str] | None = None, timeout: float = 120
            ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the container as root and wait for it (output captured)."""
        proc = subprocess.run(self.argv(argv, env), input=input, capture_output=True, text=True,
                              timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {proc.returncode}:\n"
                                 f"{proc.stdout}{proc.stderr}")
        return proc

    def sh(self, script: str, **kw: object) -> subprocess.CompletedProcess[str]:
        """Run a shell script inside the container."""
        return self.run(["sh", "-c", script], **kw)  # type: ignore[arg-type]

    def shutdown(self, timeout: float = 60) -> None:
        """Halt the container (SIGTERM to nspawn: systemd shuts down); kill it if it hangs.
        Removes its cgroups. Safe to call twice."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                # SIGKILL to PID 1 of a PID namespace ends everything in it
                if self.leader:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.leader, signal.SIGKILL)
                self.proc.kill()
                self.proc.wait(30)
        self.leader = 0
        deadline = time.monotonic() + 10
        for cg in self.cgroups:
            while cg.exists() and any(Path(p).read_text().strip()
                                      for p in [*cg.rglob("cgroup.procs")]):
                assert time.monotonic() < deadline, f"processes left in {cg}"
                time.sleep(0.05)
            _rmdir_tree(cg)
        # nspawn leaves an empty directory per machine behind when the host runs no systemd
        with contextlib.suppress(OSError):
            Path("/run/systemd/nspawn/propagate", self.name).rmdir()


def unpack(tarball: Path, dest: Path) -> None:
    """Unpack the cached root file system into ``dest`` (made empty)."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    subprocess.run(["tar", "-C", str(dest), "--numeric-owner", "-xpf", str(tarball)], check=True)
