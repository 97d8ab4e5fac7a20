"""Shared fixtures: throwaway network namespaces that are removed even when a test fails."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from tests.netns import Netns

NEEDS_ROOT = os.geteuid() != 0 or shutil.which("ip") is None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked netns or initns are skipped, with a reason, where root or iproute2 is missing."""
    skip = pytest.mark.skip(reason="needs root and iproute2 (ip netns)")
    for item in items:
        if NEEDS_ROOT and ("netns" in item.keywords or "initns" in item.keywords):
            item.add_marker(skip)


@pytest.fixture
def netns() -> Iterator[Netns]:
    """A fresh network namespace with loopback up."""
    ns = Netns()
    try:
        yield ns
    finally:
        ns.close()


@pytest.fixture
def client_ns() -> Iterator[Netns]:
    """A second namespace, to be connected to ``netns`` with tests.netns.veth_pair."""
    ns = Netns("svc")
    try:
        yield ns
    finally:
        ns.close()
