"""Shared fixtures: throwaway network namespaces that are removed even when a test fails."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator

import pytest

from tests.etcdcluster import EtcdCluster
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


# --- a real etcd cluster (tests/etcdcluster.py), shared where that is safe ----------------------

@pytest.fixture(scope="session")
def etcd_session() -> Iterator[EtcdCluster]:
    """One three-member etcd cluster (plain http) for the whole session; use ``etcd`` instead."""
    with EtcdCluster() as cluster:
        yield cluster


@pytest.fixture
def etcd(etcd_session: EtcdCluster) -> Iterator[EtcdCluster]:
    """The shared etcd cluster, healthy when the test starts and put back healthy (partitions
    healed, killed members started) after it, whatever the test did."""
    etcd_session.restore()
    yield etcd_session
    etcd_session.restore()


@pytest.fixture(scope="session")
def etcd_tls_session() -> Iterator[EtcdCluster]:
    """One three-member etcd cluster demanding client certificates; use ``etcd_tls`` instead."""
    with EtcdCluster(tls=True) as cluster:
        yield cluster


@pytest.fixture
def etcd_tls(etcd_tls_session: EtcdCluster) -> Iterator[EtcdCluster]:
    """The shared TLS etcd cluster (``ca_file``, ``cert_file``, ``key_file`` for clients),
    healthy at the start and put back healthy after the test."""
    etcd_tls_session.restore()
    yield etcd_tls_session
    etcd_tls_session.restore()


@pytest.fixture
def etcd_prefix(request: pytest.FixtureRequest) -> str:
    """A key prefix of this test's own (``/svh-test/<hash of the test id>/``) on a shared cluster."""
    digest = hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:12]
    return f"/svh-test/{digest}/"
