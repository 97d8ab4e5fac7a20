"""The fleet guard's etcd client against a real three-member etcd 3.4: racing permits and
racing maintenance slots, each decided by one compare-and-swap transaction."""

from __future__ import annotations

import concurrent.futures
import hashlib
import threading
import time
from typing import Any

import pytest

from tests.conftest import NEEDS_ROOT
from tests.etcdcluster import EtcdCluster
from watcher.config import FleetConfig, parse_config
from watcher.fleet.etcd import Etcd, SlotTaken

pytestmark = pytest.mark.skipif(NEEDS_ROOT, reason="needs root (namespaces)")


def _cfg(etcd: EtcdCluster, group: str, member: str, **kw: Any) -> FleetConfig:
    f = parse_config({"fleet": {"etcd": etcd.endpoints(), "group": group, "member": member,
                                "lease_s": 30, **kw}}).fleet
    assert f is not None
    return f


def _group(request: pytest.FixtureRequest) -> str:
    return "r" + hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:10]


def _race(n: int, work: Any) -> list[Any]:
    """Run ``work(i)`` for i < n on n threads released at once (threads inherit the caller's
    network namespace); their results or exceptions, in order."""
    barrier = threading.Barrier(n)

    def one(i: int) -> Any:
        barrier.wait()
        try:
            return work(i)
        except Exception as exc:
            return exc

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def test_racing_permits_grant_exactly_the_budget(etcd: EtcdCluster,
                                                 request: pytest.FixtureRequest) -> None:
    """Eight registered members all ask at once (min_open 50 %): exactly four are granted,
    whatever endpoint each uses, and the store then holds four open members."""
    group = _group(request)

    def run() -> tuple[list[Any], dict[str, str]]:
        clients = [Etcd(_cfg(etcd, group, f"m{i}", size=8)) for i in range(8)]
        leases = []
        for i, c in enumerate(clients):
            c.current = i % len(c.clients)
            leases.append(c.grant_lease())
            c.register(leases[-1], "open", "health", time.time(), slot=False)
        answers = _race(8, lambda i: clients[i].ask_permit(leases[i], time.time()))
        modes = {m.name: m.mode for m in clients[0].snapshot().view().members}
        for c, lease in zip(clients, leases, strict=True):
            c.revoke(lease)
        return answers, modes

    answers, modes = etcd.call(run)
    assert not [a for a in answers if isinstance(a, Exception)], answers
    assert sum(a.granted for a in answers) == 4
    assert sorted(modes.values()) == ["block"] * 4 + ["open"] * 4
    for a in answers:
        if not a.granted:
            assert len(a.not_open) == 4 and a.open_count == 3


def test_racing_operators_get_one_slot_and_the_others_learn_the_holder(
        etcd: EtcdCluster, request: pytest.FixtureRequest) -> None:
    """Three members race for one maintenance slot: one takes it, the other two get SlotTaken
    naming it; a revoked lease frees the slot at once."""
    group = _group(request)

    def run() -> tuple[list[Any], list[str]]:
        clients = [Etcd(_cfg(etcd, group, f"op{i}", size=3)) for i in range(3)]
        leases = [c.grant_lease() for c in clients]
        got = _race(3, lambda i: clients[i].take_slot(leases[i], "upgrade"))
        winner = next(i for i, g in enumerate(got) if not isinstance(g, Exception))
        clients[winner].revoke(leases[winner])
        after = list(clients[0].snapshot().view().slots)
        for i, c in enumerate(clients):
            if i != winner:
                c.revoke(leases[i])
        return got, after

    got, after = etcd.call(run)
    won = [g for g in got if not isinstance(g, Exception)]
    lost = [g for g in got if isinstance(g, Exception)]
    assert len(won) == 1 and len(lost) == 2, got
    holder = won[0][-1]
    assert all(isinstance(e, SlotTaken) and e.holders == (holder,) for e in lost), lost
    assert after == []
