"""Fixtures of the booted-systemd tests: the .deb twice (a version and a higher one), a cached
Debian 12 root file system with a fake novell-sslvpn service, and the container booted on it.

Root is needed (nspawn, cgroups, mmdebstrap); without it the tests are skipped like every other
root test. As root, a missing tool is a failure, never a skip.
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.packaging.debpkg import BUILD_TOOLS, CLEAN_ENV, BuiltPackage, build_package
from tests.system.container import SYSTEM_TOOLS, Container, rootfs_tarball, unpack

HERE = Path(__file__).resolve().parent
DEB_DIR = Path("/root/debs")  # inside the container (its /tmp is a fresh tmpfs at every boot)
# The host's rule sets: none may ever hold anything of the agent.
HOST_SAVERS = (["iptables-save"], ["ip6tables-save"], ["iptables-legacy-save"],
               ["ip6tables-legacy-save"], ["nft", "list", "ruleset"])


@dataclass(frozen=True)
class Debs:
    """The package as built from the tree, and the same rebuilt with a higher version."""

    first: BuiltPackage
    upgrade: BuiltPackage
    upgrade_version: str


def host_rulesets() -> dict[str, str]:
    """Every rule set of the host (initial network namespace), read only."""
    out = {}
    for argv in HOST_SAVERS:
        proc = subprocess.run(argv, capture_output=True, text=True, env=CLEAN_ENV, check=False)
        assert proc.returncode == 0, f"{' '.join(argv)}: {proc.stderr}"
        out[" ".join(argv)] = proc.stdout
    return out


@pytest.fixture(scope="session")
def system_host() -> None:
    """Root, and every tool the booted-systemd tests use (missing ones fail the tests)."""
    if os.geteuid() != 0:
        pytest.skip("booted-systemd tests need root (systemd-nspawn, cgroups, mmdebstrap)")
    tools = (*SYSTEM_TOOLS, *BUILD_TOOLS, "nft", "iptables-legacy-save")
    missing = [t for t in tools if shutil.which(t, path=CLEAN_ENV["PATH"]) is None]
    if missing:
        pytest.fail(f"tools missing: {', '.join(missing)} (scripts/bootstrap installs them)")


@pytest.fixture(scope="session")
def debs(system_host: None, tmp_path_factory: pytest.TempPathFactory) -> Debs:
    """Both builds, side by side (the unit tests of the build run in tests/packaging)."""
    changelog = (Path(__file__).resolve().parents[2] / "debian" / "changelog").read_text()
    version = changelog.split("(", 1)[1].split(")", 1)[0]
    upgrade = f"{version}+upgrade1"
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        a = pool.submit(build_package, tmp_path_factory.mktemp("deb"), nocheck=True)
        b = pool.submit(build_package, tmp_path_factory.mktemp("deb-up"), version=upgrade,
                        nocheck=True)
        return Debs(a.result(), b.result(), upgrade)


def deb_depends(deb: Path) -> list[str]:
    """The package names of a .deb's Depends (first alternative, no version or arch)."""
    field = subprocess.run(["dpkg-deb", "-f", str(deb), "Depends"], capture_output=True,
                           text=True, check=True).stdout
    return [d.split("|")[0].split("(")[0].strip().split(":")[0]
            for d in field.split(",") if d.strip()]


def prepare_tree(tree: Path, debs: Debs) -> None:
    """The fake novell-sslvpn service (unit + init script, enabled), a hostname, the debs."""
    shutil.copy(HERE / "novell" / "novell-sslvpn", tree / "usr/local/sbin/novell-sslvpn")
    (tree / "usr/local/sbin/novell-sslvpn").chmod(0o755)
    shutil.copy(HERE / "novell" / "novell-sslvpn.service",
                tree / "etc/systemd/system/novell-sslvpn.service")
    shutil.copy(HERE / "novell" / "novell-sslvpn.init", tree / "etc/init.d/novell-sslvpn")
    (tree / "etc/init.d/novell-sslvpn").chmod(0o755)
    wants = tree / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / "novell-sslvpn.service").symlink_to("/etc/systemd/system/novell-sslvpn.service")
    (tree / "etc/hostname").write_text("sslvpn1\n")
    # no login prompt on the (passive) console
    (tree / "etc/systemd/system/console-getty.service").symlink_to("/dev/null")
    d = tree / str(DEB_DIR).lstrip("/")
    d.mkdir(parents=True)
    for b in (debs.first, debs.upgrade):
        shutil.copy(b.deb, d)


@dataclass
class Machine:
    """The booted container and how it was made."""

    container: Container
    debs: Debs
    rootfs_made: bool
    host_before: dict[str, str]


@pytest.fixture(scope="module")
def machine(debs: Debs) -> Iterator[Machine]:
    """A Debian 12 booted by systemd-nspawn, the fake service running, the package not yet
    installed; halted and removed at the end, even on failure."""
    host_before = host_rulesets()
    tarball, made = rootfs_tarball(deb_depends(debs.first.deb))
    top = Path(tempfile.mkdtemp(prefix="sslvpn-system-"))
    tree = top / "root"
    c = Container(tree, f"sslvpn{os.getpid()}", top / "nspawn.log")
    try:
        unpack(tarball, tree)
        prepare_tree(tree, debs)
        c.boot()
        yield Machine(c, debs, made, host_before)
    finally:
        try:
            c.shutdown()
        finally:
            shutil.rmtree(top, ignore_errors=True)
