"""Fixtures of the packaging tests: the .deb built once per session, installed with apt.

Installation and removal run inside a throwaway network namespace: the maintainer scripts run
``sslvpn-heartbeat cleanup`` and must never touch the firewall of the initial namespace.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Iterator

import pytest

from tests.netns import Netns
from tests.packaging.debpkg import (
    BUILD_TOOLS,
    CLEAN_ENV,
    LOCK_FILE,
    PACKAGE,
    BuiltPackage,
    Installed,
    build_package,
    dpkg_status,
)


@pytest.fixture(scope="session")
def packaging_lock() -> Iterator[None]:
    """Serialise packaging sessions on this machine: they share dpkg and the installed package."""
    if os.geteuid() != 0:
        pytest.skip("packaging tests need root (apt, dpkg, network namespaces)")
    missing = [t for t in BUILD_TOOLS if shutil.which(t, path=CLEAN_ENV["PATH"]) is None]
    if missing:  # a project dependency: its absence fails, it never skips
        pytest.fail(f"packaging tools missing: {', '.join(missing)} (see scripts/bootstrap)")
    LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK_FILE, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@pytest.fixture(scope="session")
def built(packaging_lock: None, tmp_path_factory: pytest.TempPathFactory) -> BuiltPackage:
    """The .deb built by ``dpkg-buildpackage -us -uc -b`` from a copy of the work tree."""
    return build_package(tmp_path_factory.mktemp("deb"))


@pytest.fixture(scope="module")
def installed(built: BuiltPackage) -> Iterator[Installed]:
    """The package installed (services held back); purged at the end, even on failure."""
    before = dpkg_status()
    if before not in ("not-installed", "config-files"):
        pytest.skip(f"{PACKAGE} is already installed on this machine; not touching it")
    ns = Netns("pkg")
    inst = Installed(built, ns)
    try:
        inst.ensure()
        yield inst
    finally:
        try:
            if dpkg_status() != "not-installed":
                inst.purge()
        finally:
            ns.close()
