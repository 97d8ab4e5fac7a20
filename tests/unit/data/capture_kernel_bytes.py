"""Re-record the kernel bytes the decoder tests read (root; Linux; run from the repository root).

    python -m tests.unit.data.capture_kernel_bytes cn      # in the initial network namespace
    ip netns exec NAME python -m tests.unit.data.capture_kernel_bytes diag   # in a throwaway one

``cn`` spawns ``true`` and saves the proc connector datagrams about it (ack, fork, exec, exit);
``diag`` opens and closes listeners on port 8080 and saves the sock_diag destroy broadcasts,
and those of sockets that are not listeners (an accepted connection, its client, a socket bound
to the port that never listened, an unbound one, a listener on another port); it also closes a
burst of sockets and records how many messages each destroy datagram held.
``expected.json`` records the facts the tests assert (pids, ports, addresses).
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
from pathlib import Path

from watcher.sources._netlink import SO_RCVBUFFORCE, open_netlink
from watcher.sources.proc_connector import (
    CN_IDX_PROC,
    NETLINK_CONNECTOR,
    PROC_CN_MCAST_LISTEN,
    ProcEventKind,
    decode_proc_events,
    subscribe_message,
)
from watcher.sources.sock_diag import (
    NETLINK_SOCK_DIAG,
    SKNLGRP_INET6_TCP_DESTROY,
    SKNLGRP_INET_TCP_DESTROY,
    decode_sock_diag,
)

HERE = Path(__file__).resolve().parent


def _recv(sock: socket.socket, timeout: float = 2.0) -> bytes:
    ready, _, _ = select.select([sock], [], [], timeout)
    if not ready:
        raise TimeoutError("no datagram from the kernel")
    return sock.recv(65536)


def _update_expected(key: str, value: object) -> None:
    path = HERE / "expected.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = value
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def capture_cn() -> None:
    sock = open_netlink(NETLINK_CONNECTOR, groups=(CN_IDX_PROC,))
    sock.send(subscribe_message(PROC_CN_MCAST_LISTEN, 7, 41))
    wanted: dict[str, bytes] = {}
    child = None
    while len(wanted) < 4:
        data = _recv(sock)
        for event in decode_proc_events(data):
            if event.kind is ProcEventKind.NONE and event.cn_ack == 42:
                wanted["ack"] = data
                child = subprocess.Popen(["true"])
            elif child is not None and event.tgid == child.pid:
                name = event.kind.name.lower()
                if name in ("fork", "exec", "exit") and event.pid == child.pid:
                    wanted.setdefault(name, data)
    assert child is not None
    child.wait()
    for name, data in wanted.items():
        (HERE / f"cn_{name}.bin").write_bytes(data)
    _update_expected("cn", {"child_pid": child.pid, "parent_pid": os.getpid()})


def capture_diag() -> None:
    sock = open_netlink(NETLINK_SOCK_DIAG, sock_type=socket.SOCK_RAW,
                        groups=(SKNLGRP_INET_TCP_DESTROY, SKNLGRP_INET6_TCP_DESTROY))
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)  # the burst below must fit
    cases = {"v4": (socket.AF_INET, "127.0.0.1"), "v6": (socket.AF_INET6, "::1"),
             "dual": (socket.AF_INET6, "::")}
    for name, (family, address) in cases.items():
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((address, 8080))
        listener.listen()
        listener.close()
        (HERE / f"diag_destroy_{name}.bin").write_bytes(_recv(sock))
    # An accepted connection on the port: it has a peer, so it is not the listener.
    listener = socket.create_server(("127.0.0.1", 8080), reuse_port=False)
    client = socket.create_connection(("127.0.0.1", 8080))
    conn, _ = listener.accept()
    listener.close()
    _recv(sock)  # the listener's own destroy
    client_port = client.getsockname()[1]
    conn.close()
    (HERE / "diag_destroy_accepted.bin").write_bytes(_recv(sock))
    client.close()
    (HERE / "diag_destroy_client.bin").write_bytes(_recv(sock))
    bound = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    bound.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the accepted one's TIME_WAIT
    bound.bind(("127.0.0.1", 8080))
    bound.close()
    (HERE / "diag_destroy_bound.bin").write_bytes(_recv(sock))
    socket.socket(socket.AF_INET6, socket.SOCK_STREAM).close()
    (HERE / "diag_destroy_unbound.bin").write_bytes(_recv(sock))
    socket.create_server(("127.0.0.1", 8081)).close()
    (HERE / "diag_destroy_other_port.bin").write_bytes(_recv(sock))
    # A burst: do the destroy groups ever pack several messages into one datagram?
    burst = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(500)]
    for s in burst:
        s.close()
    per_datagram: set[int] = set()
    seen = 0
    while seen < len(burst):
        n = len(decode_sock_diag(_recv(sock)))
        per_datagram.add(n)
        seen += n
    _update_expected("diag", {"port": 8080, "accepted_peer_port": client_port,
                              "client_port": client_port,
                              "burst_messages_per_datagram": sorted(per_datagram)})


if __name__ == "__main__":
    {"cn": capture_cn, "diag": capture_diag}[sys.argv[1]]()
