"""Helpers of the packaging tests: build the .deb from a copy of the tree, install it with apt.

The build runs on a copy of the tracked files in a temporary directory, so it never leaves
anything in the work tree. A policy-rc.d keeps the package's services from starting.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.netns import REPO, Netns

__all__ = [
    "BUILD_TOOLS",
    "CLEAN_ENV",
    "LOCK_FILE",
    "PACKAGE",
    "BuiltPackage",
    "Installed",
    "build_package",
    "dpkg_status",
    "services_held_back",
    "unit_settings",
]

PACKAGE = "sslvpn-heartbeat"
# Debian's tools, not a pyenv shim or a venv that happens to be first on PATH.
CLEAN_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "LC_ALL": "C.UTF-8",
    "HOME": "/root",
    "DEBIAN_FRONTEND": "noninteractive",
    # If an init script runs on a systemd host, lsb's hook must not hand it to systemctl.
    "SYSTEMCTL_SKIP_REDIRECT": "1",
}
BUILD_TOOLS = ("dpkg-buildpackage", "dh", "lintian", "systemd-analyze", "apt-get")
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")
LOCK_FILE = Path("/run/lock/sslvpn-heartbeat-packaging-tests.lock")


@dataclass(frozen=True)
class BuiltPackage:
    """The result of one dpkg-buildpackage run."""

    deb: Path
    changes: Path
    tree: Path
    log: str


def _tracked_files() -> list[str]:
    """The work tree's files that git tracks or would track (ignored ones, like venvs, left out).

    In CI (a clean checkout) that is exactly the tracked files; on a shared work tree it also
    takes the files others have not committed yet, as the tree's own tests see them.
    """
    out = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others",
                          "--exclude-standard"], capture_output=True, check=True).stdout
    return sorted({p for p in out.decode().split("\0") if p})


def _copy_tree(dest: Path) -> None:
    """Copy the tracked files, as they are in the work tree now, to ``dest``."""
    for rel in _tracked_files():
        src = REPO / rel
        if not src.exists() and not src.is_symlink():
            continue  # deleted in the work tree, not yet committed
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            target.symlink_to(os.readlink(src))
        else:
            shutil.copy2(src, target)


def _bump_version(tree: Path, version: str) -> None:
    """Put a changelog entry for ``version`` on top of the copy's debian/changelog."""
    changelog = tree / "debian" / "changelog"
    old = changelog.read_text()
    trailer = next(ln for ln in old.splitlines() if ln.startswith(" -- "))
    maintainer = trailer[4:].split("  ")[0]
    date = subprocess.run(["date", "-R"], capture_output=True, text=True, check=True).stdout.strip()
    changelog.write_text(f"{PACKAGE} ({version}) unstable; urgency=medium\n\n"
                         "  * Rebuilt by the tests with a higher version (an upgrade).\n\n"
                         f" -- {maintainer}  {date}\n\n" + old)


def build_package(top: Path, *, version: str | None = None, nocheck: bool = False) -> BuiltPackage:
    """Copy the work tree under ``top`` and run ``dpkg-buildpackage -us -uc -b`` there.

    ``version``: the copy's changelog gets an entry for it first (a higher version: an upgrade).
    ``nocheck``: skip the unit tests of the build (DEB_BUILD_OPTIONS=nocheck).
    """
    tree = top / f"{PACKAGE}-src"
    _copy_tree(tree)
    if version is not None:
        _bump_version(tree, version)
    env = dict(CLEAN_ENV, DEB_BUILD_OPTIONS="nocheck") if nocheck else CLEAN_ENV
    proc = subprocess.run(["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"dpkg-buildpackage failed:\n{log[-6000:]}"
    debs = sorted(top.glob(f"{PACKAGE}_*_all.deb"))
    changes = sorted(top.glob(f"{PACKAGE}_*.changes"))
    assert len(debs) == 1 and len(changes) == 1, f"unexpected build products in {top}"
    return BuiltPackage(deb=debs[0], changes=changes[0], tree=tree, log=log)


def unit_settings(path: Path) -> dict[str, list[str]]:
    """A unit file's settings, each key with all its values in order (comments skipped)."""
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def dpkg_status(package: str = PACKAGE) -> str:
    """dpkg's status word for ``package`` ("installed", "config-files", "not-installed")."""
    proc = subprocess.run(["dpkg-query", "-W", "-f=${db:Status-Status}", package],
                          capture_output=True, text=True, env=CLEAN_ENV)
    return proc.stdout.strip() if proc.returncode == 0 else "not-installed"


@contextlib.contextmanager
def services_held_back() -> Iterator[None]:
    """A policy-rc.d that forbids starting services, removed again if this created it."""
    if POLICY_RC_D.exists():
        yield  # the machine already has one (a container's, or the bootstrap's)
        return
    POLICY_RC_D.write_text("#!/bin/sh\n# sslvpn-heartbeat packaging tests\nexit 101\n")
    POLICY_RC_D.chmod(0o755)
    try:
        yield
    finally:
        POLICY_RC_D.unlink(missing_ok=True)


class Installed:
    """The package installed with apt; every dpkg action runs inside ``self.ns``."""

    def __init__(self, built: BuiltPackage, ns: Netns) -> None:
        self.built = built
        self.ns = ns

    def apt(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run apt-get in the namespace (maintainer scripts may run iptables); assert success."""
        with services_held_back():
            proc = self.ns.run(["apt-get", "-y", "-q", *args], env=CLEAN_ENV, check=False,
                               timeout=600)
        assert proc.returncode == 0, f"apt-get {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}"
        return proc

    def ensure(self) -> None:
        """Install the built .deb unless it is installed already."""
        if dpkg_status() != "installed":
            self.apt("install", "--no-install-recommends", str(self.built.deb))

    def purge(self) -> subprocess.CompletedProcess[str]:
        """Remove the package and its configuration."""
        return self.apt("purge", PACKAGE)
