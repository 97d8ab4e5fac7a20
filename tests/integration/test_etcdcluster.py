"""The etcd test harness (tests/etcdcluster.py) against Debian's etcd 3.4: what the fleet tests rely on.

Each test asks the members themselves (their JSON gateway, inside their own namespaces) or a
client in the client namespace, so a harness that only pretended to kill, partition or restart
a member would fail here.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from tests.etcdcluster import CLIENT_PORT, EtcdCluster
from tests.netns import Netns, wait_for
from tests.testbed.cluster import Cluster
from tests.testbed.fakesvc import pid_alive

# once: the harness and Debian's etcd: no library of ours
pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.once]


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _post(addr: str, path: str, body: dict[str, object], timeout: float = 2.0) -> dict[str, object]:
    """POST to ``addr``'s JSON gateway from the calling thread (run it through ``etcd.call``)."""
    conn = http.client.HTTPConnection(addr, CLIENT_PORT, timeout=timeout)
    try:
        conn.request("POST", f"/v3/{path}", body=json.dumps(body),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        assert resp.status == 200, f"{path} on {addr}: HTTP {resp.status} {data[:200]!r}"
        answer: dict[str, object] = json.loads(data)
        return answer
    finally:
        conn.close()


def _put(addr: str, key: str, value: str) -> None:
    _post(addr, "kv/put", {"key": _b64(key), "value": _b64(value)})


def _get(addr: str, key: str, serializable: bool = False) -> str | None:
    kvs = _post(addr, "kv/range", {"key": _b64(key), "serializable": serializable}).get("kvs")
    if not kvs:
        return None
    assert isinstance(kvs, list)
    return base64.b64decode(kvs[0].get("value", "")).decode()


def _connects(addr: str, timeout: float = 1.0) -> bool:
    try:
        socket.create_connection((addr, CLIENT_PORT), timeout=timeout).close()
    except OSError:
        return False
    return True


def test_three_members_serve_one_store(etcd: EtcdCluster, etcd_prefix: str) -> None:
    """Three members on distinct addresses agree on one leader; a write through one member is
    read back through every other (the client namespace reaches them all)."""
    eps = etcd.endpoints()
    assert len(set(eps)) == 3 and all(e.startswith("http://10.210.0.") for e in eps)
    leader = etcd.leader()
    assert leader in (1, 2, 3)
    ids = {etcd.status(i)["header"]["member_id"] for i in (1, 2, 3)}  # type: ignore[index]
    assert len(ids) == 3
    key = etcd_prefix + "k"
    etcd.call(_put, etcd.member(1).addr, key, "one")
    for i in (2, 3):
        assert etcd.call(_get, etcd.member(i).addr, key) == "one"


def test_kill_leader_elects_another_and_restart_rejoins(etcd: EtcdCluster, etcd_prefix: str) -> None:
    """SIGKILL on the leader's PID ends that process; the two others elect a new leader and
    keep serving; restart() brings the same member (same ID, same data) back."""
    old = etcd.leader()
    old_id = etcd.status(old)["header"]["member_id"]  # type: ignore[index]
    pid = etcd.member(old).proc.pid  # type: ignore[union-attr]
    etcd.kill(old, signal.SIGKILL)
    assert not etcd.running(old)
    assert not pid_alive(pid)
    new = etcd.leader()
    assert new != old
    key = etcd_prefix + "during"
    etcd.call(_put, etcd.member(new).addr, key, "x")
    assert not etcd.call(_connects, etcd.member(old).addr)
    etcd.restart(old)
    assert etcd.status(old)["header"]["member_id"] == old_id  # type: ignore[index]
    assert etcd.call(_get, etcd.member(old).addr, key) == "x"


def test_partition_cuts_member_and_heal_catches_up(etcd: EtcdCluster, etcd_prefix: str) -> None:
    """partition(i) makes member i unreachable from clients and peers (packets dropped: a
    connect times out) while the other two keep a quorum; heal(i) lets it catch up."""
    etcd.wait_healthy()
    victim = etcd.leader()  # the hardest case: the leader itself is cut off
    etcd.partition(victim)
    assert etcd.partitioned(victim)
    assert not etcd.call(_connects, etcd.member(victim).addr, 1.0)
    new = etcd.leader()
    assert new != victim
    key = etcd_prefix + "while-cut"
    etcd.call(_put, etcd.member(new).addr, key, "y")
    # Asked on its own loopback, the cut-off member cannot serve a linearizable read.
    assert etcd.gateway(victim, "kv/range", {"key": _b64(key)}, timeout=3.0) is None
    etcd.heal(victim)
    etcd.wait_healthy()
    assert etcd.call(_get, etcd.member(victim).addr, key) == "y"


def test_stop_all_then_start_all_keeps_data(etcd: EtcdCluster, etcd_prefix: str) -> None:
    """stop_all() leaves no member answering; start_all() brings the cluster back with its data."""
    key = etcd_prefix + "durable"
    etcd.call(_put, etcd.member(1).addr, key, "z")
    etcd.stop_all()
    assert not any(etcd.running(i) for i in (1, 2, 3))
    assert not any(etcd.call(_connects, etcd.member(i).addr) for i in (1, 2, 3))
    etcd.start_all()
    assert etcd.call(_get, etcd.member(2).addr, key) == "z"


def test_attach_gives_another_namespace_the_segment(etcd: EtcdCluster, etcd_prefix: str) -> None:
    """A namespace attached with attach() (an agent's server) reaches every member; its address
    is freed for reuse once that namespace is gone."""
    key = etcd_prefix + "attached"
    with Netns("svx") as ns:
        addr = etcd.attach(ns)
        assert addr.startswith("10.210.0.")
        for i in (1, 2, 3):
            out = ns.run(["etcdctl", "--endpoints", etcd.endpoint(i), "put", key, f"v{i}"],
                         env={**os.environ, "ETCDCTL_API": "3"})
            assert out.stdout.strip() == "OK"
    with Netns("svx") as ns2:
        assert etcd.attach(ns2) == addr
    assert etcd.call(_get, etcd.member(1).addr, key) == "v3"


def test_close_leaves_no_process_or_namespace() -> None:
    """close() after a start kills every member by its PID and deletes every namespace made."""
    cluster = EtcdCluster(size=3)
    try:
        cluster.start()
        pids = [m.proc.pid for m in cluster.members]  # type: ignore[union-attr]
        names = [m.ns.name for m in cluster.members] + [cluster.client_ns.name]  # type: ignore[union-attr]
    finally:
        cluster.close()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for name in names:
        assert name not in listed
    assert not any(pid_alive(pid) for pid in pids)


def test_tls_members_demand_a_client_certificate(etcd_tls: EtcdCluster, etcd_prefix: str) -> None:
    """In TLS mode the endpoints are https, the harness itself gets through with its own
    certificate, and plain http to a member gets no answer from etcd."""
    assert all(e.startswith("https://") for e in etcd_tls.endpoints())
    assert etcd_tls.ca_file and etcd_tls.cert_file and etcd_tls.key_file
    assert etcd_tls.status(1) is not None

    def plain_http(addr: str) -> str:
        try:
            _post(addr, "maintenance/status", {})
        except (AssertionError, OSError, http.client.HTTPException, ValueError) as e:
            return type(e).__name__
        return "answered"

    assert etcd_tls.call(plain_http, etcd_tls.member(1).addr) != "answered"


def test_wait_healthy_fails_without_quorum_naming_the_cause(etcd: EtcdCluster) -> None:
    """With two of three members down there is no quorum: wait_healthy() raises (it cannot pass
    on a broken cluster) and the fixture's restore() puts the cluster back."""
    leader = etcd.leader()
    others = [i for i in (1, 2, 3) if i != leader]
    etcd.kill(others[0])
    etcd.kill(others[1])
    with pytest.raises(AssertionError, match="healthy"):
        etcd.wait_healthy(timeout=6.0)
    wait_for(lambda: etcd.gateway(leader, "kv/range", {"key": _b64("q")}, 2.0) is None, 15.0,
             "the lone member to stop serving linearizable reads")


def test_testbed_servers_join_the_etcd_segment(etcd: EtcdCluster, etcd_prefix: str,
                                               tmp_path: Path) -> None:
    """Cluster(etcd=...) attaches every server namespace before agents start: each server
    reaches all three members (etcdctl from the server's namespace)."""
    with Cluster(2, workdir=tmp_path, etcd=etcd) as cluster:
        for srv in cluster.servers:
            assert srv.etcd_addr is not None and srv.etcd_addr.startswith("10.210.0.")
            out = srv.ns.run(["etcdctl", "--endpoints", ",".join(etcd.endpoints()),
                              "put", etcd_prefix + srv.name, "open"],
                             env={**os.environ, "ETCDCTL_API": "3"})
            assert out.stdout.strip() == "OK"
    for i, name in zip((1, 2, 3), ("server1", "server2", "server2"), strict=True):
        assert etcd.call(_get, etcd.member(i).addr, etcd_prefix + name) == "open"


def test_a_failed_start_names_the_cause_and_leaves_nothing_behind() -> None:
    """Members that cannot start (an unknown flag) make the start fail at once with their exit
    status and log lines in the message; every namespace made is gone afterwards."""
    cluster = EtcdCluster(size=3, extra_args=["--no-such-flag"], start_timeout=30.0)
    with pytest.raises(AssertionError) as exc, cluster:
        pass
    message = str(exc.value)
    assert "no etcd member is running" in message and "etcd1 exited" in message, message
    assert "no-such-flag" in message, message
    names = [m.ns.name for m in cluster.members]
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert names and not any(n in listed for n in names)
