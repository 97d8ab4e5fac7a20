"""sock_diag in a throwaway namespace: listener dumps and destroy broadcasts of real sockets.

The checks run inside the namespace (sock_diag sees the namespace of the process), through
this module's own driver: ``python -m tests.integration.test_sources_sock_diag SCENARIO``.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

import pytest

from tests.netns import REPO, Netns
from watcher.core.triggers import Evidence, Source, Trigger
from watcher.sources._netlink import open_netlink
from watcher.sources.sock_diag import (
    NETLINK_SOCK_DIAG,
    SKNLGRP_INET6_TCP_DESTROY,
    SKNLGRP_INET_TCP_DESTROY,
    Listener,
    ListenerWatch,
    _dump,
    decode_sock_diag,
    listening,
)

PORT = 8080
OTHER = 8081


def _listen(family: int, address: str, port: int, *, v6only: bool = True) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
    sock.bind((address, port))
    sock.listen()
    return sock


def _as_json(listeners: list[Listener]) -> list[list[Any]]:
    return sorted([lst.family, lst.address, lst.port] for lst in listeners)


class _Log:
    def __getattr__(self, level: str) -> Any:
        return lambda event, **kw: print(json.dumps({"log": level, "event": event, **kw}),
                                         file=sys.stderr)


class _CountingSocket:
    """The watch's netlink socket, seen from outside: counts the datagrams read from it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.datagrams = 0

    def recv(self, size: int) -> bytes:
        data = self.sock.recv(size)
        self.datagrams += 1
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


class CountedWatch(ListenerWatch):
    """A ListenerWatch whose wakeups (reader callbacks) and datagrams a test can count: the
    shipped class carries no counters of its own."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.wakeups = 0
        self._counter: _CountingSocket | None = None

    @property
    def datagrams(self) -> int:
        """Datagrams read from the destroy socket so far."""
        return 0 if self._counter is None else self._counter.datagrams

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        super().attach(loop)
        if self._sock is not None:  # the reader reads self._sock at each wakeup
            self._counter = _CountingSocket(self._sock)
            self._sock = self._counter  # type: ignore[assignment]  # a counting stand-in

    def _on_readable(self) -> None:
        self.wakeups += 1
        super()._on_readable()


async def _next(queue: asyncio.Queue[Trigger]) -> Trigger:
    return await asyncio.wait_for(queue.get(), 5)


async def _scenario_dump() -> dict[str, Any]:
    out: dict[str, Any] = {}
    v4 = _listen(socket.AF_INET, "127.0.0.1", PORT)
    v6 = _listen(socket.AF_INET6, "::1", PORT)
    other = _listen(socket.AF_INET, "127.0.0.1", OTHER)
    out["in_loop"] = _as_json(await asyncio.to_thread(_dump, PORT))
    out["inodes"] = sorted(lst.inode for lst in await asyncio.to_thread(_dump, PORT))
    out["expected_inodes"] = sorted(os.fstat(s.fileno()).st_ino for s in (v4, v6))
    out["listening"] = [await listening(PORT), await listening(8082)]
    for s in (v4, v6, other):
        s.close()
    dual = _listen(socket.AF_INET6, "::", PORT, v6only=False)
    out["dual"] = _as_json(await asyncio.to_thread(_dump, PORT))
    dual.close()
    out["after_close"] = _as_json(await asyncio.to_thread(_dump, PORT))
    return out


async def _scenario_destroy(family: str, address: str, v6only: str) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    mine: asyncio.Queue[Trigger] = asyncio.Queue()
    barrier: asyncio.Queue[Trigger] = asyncio.Queue()
    watch = ListenerWatch(PORT, mine.put_nowait, _Log())
    bwatch = ListenerWatch(OTHER, barrier.put_nowait, _Log())
    watch.attach(loop)
    bwatch.attach(loop)
    fam = socket.AF_INET if family == "4" else socket.AF_INET6
    # Another port first: its destroy reaches the barrier watch, never ours.
    _listen(socket.AF_INET, "127.0.0.1", OTHER).close()
    await _next(barrier)
    other_port_events = mine.qsize()
    sock = _listen(fam, address, PORT, v6only=v6only == "1")
    closed = time.monotonic_ns()
    sock.close()
    trig = await _next(mine)
    watch.close()
    bwatch.close()
    return {"other_port_events": other_port_events, "source": trig.source,
            "evidence": trig.evidence, "detail": trig.detail, "filtered": watch.filtered,
            "latency_us": (trig.monotonic_ns - closed) / 1000}


async def _scenario_inherit() -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    mine: asyncio.Queue[Trigger] = asyncio.Queue()
    barrier: asyncio.Queue[Trigger] = asyncio.Queue()
    watch = ListenerWatch(PORT, mine.put_nowait, _Log())
    bwatch = ListenerWatch(OTHER, barrier.put_nowait, _Log())
    watch.attach(loop)
    bwatch.attach(loop)
    sock = _listen(socket.AF_INET, "0.0.0.0", PORT)
    child = subprocess.Popen(["sleep", "60"], pass_fds=(sock.fileno(),))
    try:
        sock.close()
        # Barrier: a later destroy on another port has been delivered.
        _listen(socket.AF_INET, "127.0.0.1", OTHER).close()
        await _next(barrier)
        while_child_holds = mine.qsize()
        still_listed = _as_json(await asyncio.to_thread(_dump, PORT))
        child.kill()
        child.wait()
        trig = await _next(mine)
    finally:
        child.kill()
        child.wait()
        watch.close()
        bwatch.close()
    return {"while_child_holds": while_child_holds, "still_listed": still_listed,
            "detail": trig.detail, "evidence": trig.evidence}


async def _scenario_overrun() -> dict[str, Any]:
    """Many sockets die while the loop does not read: the smallest buffer overflows."""
    got: list[Trigger] = []
    lines: list[tuple[str, str, dict[str, Any]]] = []

    class Log:
        def __getattr__(self, level: str) -> Any:
            return lambda event, **kw: lines.append((level, event, kw))

    # Unfiltered: the filter would keep these unbound sockets out of the buffer (the traffic
    # scenario shows it); the overrun path after the filter is the same code.
    watch = ListenerWatch(PORT, got.append, Log(), rcvbuf=1, kernel_filter=False)  # minimum
    watch.attach(asyncio.get_running_loop())
    # The kernel sends destroys from a workqueue, after close() returns. A second subscriber
    # with a large buffer, read here without yielding to the loop, tells when all of them were
    # sent: by then the watch's small buffer has overflowed, as nothing read it meanwhile.
    barrier = open_netlink(NETLINK_SOCK_DIAG, sock_type=socket.SOCK_RAW,
                           groups=(SKNLGRP_INET_TCP_DESTROY, SKNLGRP_INET6_TCP_DESTROY))
    barrier.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    barrier.setblocking(True)
    barrier.settimeout(5)
    try:
        sockets = 200
        for _ in range(sockets):  # every TCP socket of the namespace is reported when it dies
            socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()
        seen = 0
        while seen < sockets:
            seen += len(decode_sock_diag(barrier.recv(65536)))
        deadline = time.monotonic() + 5
        while not any(t.detail == "overrun" for t in got) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        # After the overrun the grown buffer holds a listener's destroy again.
        _listen(socket.AF_INET, "127.0.0.1", PORT).close()
        while not any(t.evidence is Evidence.DEATH for t in got) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
    finally:
        watch.close()
        barrier.close()
    overruns = [t for t in got if t.detail == "overrun"]
    return {"overruns": len(overruns),
            "evidence": [t.evidence for t in overruns],
            "logged": [[lvl, ev, kw.get("rcvbuf", 0)] for lvl, ev, kw in lines],
            "deaths": sum(t.evidence is Evidence.DEATH for t in got)}


async def _scenario_traffic(connections: str) -> dict[str, Any]:
    """Thousands of connections to the port open and close; then the listener closes."""
    n = int(connections)
    loop = asyncio.get_running_loop()
    mine: list[Trigger] = []
    theirs: list[Trigger] = []
    lines: list[tuple[str, str]] = []
    plain_lines: list[tuple[str, str]] = []

    class Log:
        def __init__(self, into: list[tuple[str, str]]) -> None:
            self.into = into

        def __getattr__(self, level: str) -> Any:
            return lambda event, **kw: self.into.append((level, event))

    # The filtered watch gets the kernel's smallest buffer: the traffic must not overrun it.
    watch = CountedWatch(PORT, mine.append, Log(lines), rcvbuf=1)
    plain = CountedWatch(PORT, theirs.append, Log(plain_lines), rcvbuf=4 << 20,
                         kernel_filter=False)
    # A third subscriber, read here, tells when the kernel has sent every destroy of the load.
    counter = open_netlink(NETLINK_SOCK_DIAG, sock_type=socket.SOCK_RAW,
                           groups=(SKNLGRP_INET_TCP_DESTROY, SKNLGRP_INET6_TCP_DESTROY))
    counter.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE (root)
    counter.setblocking(True)
    counter.settimeout(5)
    watch.attach(loop)
    plain.attach(loop)
    listener = _listen(socket.AF_INET, "127.0.0.1", PORT)
    listener.listen(4096)
    per_datagram: set[int] = set()
    try:
        for i in range(n):
            client = socket.create_connection(("127.0.0.1", PORT), timeout=5)
            conn, _ = listener.accept()
            client.close()
            conn.close()
            if i % 20 == 19:
                await asyncio.sleep(0)  # the loop reads both watches now and then
        seen = 0
        while seen < 2 * n:  # the client's and the accepted socket of every connection
            events = decode_sock_diag(counter.recv(65536))
            per_datagram.add(len(events))
            seen += sum(PORT in (e.sport, e.dport) for e in events)
        deadline = time.monotonic() + 5
        while plain.datagrams < 2 * n and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        during = {"wakeups": watch.wakeups, "datagrams": watch.datagrams, "triggers": len(mine),
                  "plain_wakeups": plain.wakeups, "plain_datagrams": plain.datagrams}
        listener.close()
        while not mine and time.monotonic() < deadline + 5:
            await asyncio.sleep(0.01)
    finally:
        watch.close()
        plain.close()
        counter.close()
    return {"during": during, "after_close": [[t.evidence, t.detail] for t in mine],
            "datagrams_after": watch.datagrams, "filtered": watch.filtered,
            "plain_filtered": plain.filtered, "logged": lines, "plain_logged": plain_lines,
            "messages_per_datagram": sorted(per_datagram)}


def _drive(netns: Netns, *args: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = netns.run(netns.python("-m", "tests.integration.test_sources_sock_diag", *args),
                     env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


@pytest.mark.netns
def test_dump_sees_v4_v6_and_dual_stack(netns: Netns) -> None:
    """The dump behind listening() finds IPv4, IPv6 and dual-stack listeners on the port only."""
    out = _drive(netns, "dump")
    assert out["in_loop"] == [[socket.AF_INET, "127.0.0.1", PORT], [socket.AF_INET6, "::1", PORT]]
    assert out["inodes"] == out["expected_inodes"]
    assert out["listening"] == [True, False]
    assert out["dual"] == [[socket.AF_INET6, "::", PORT]]
    assert out["after_close"] == []


@pytest.mark.netns
@pytest.mark.parametrize(("family", "address", "v6only", "reported"), [
    ("4", "127.0.0.1", "1", socket.AF_INET),
    ("6", "::1", "1", socket.AF_INET6),
    ("6", "::", "0", socket.AF_INET6),  # dual-stack reports on the IPv6 group
])
def test_closing_the_listener_is_a_death_trigger(netns: Netns, family: str, address: str,
                                                 v6only: str, reported: int) -> None:
    """Closing the listener emits DEATH with its family and address; another port nothing."""
    out = _drive(netns, "destroy", family, address, v6only)
    assert out["other_port_events"] == 0
    assert (out["source"], out["evidence"]) == (Source.SOCK_DIAG, Evidence.DEATH)
    assert out["detail"] == f"listener destroyed {address} port {PORT}"
    assert out["filtered"]
    print(f"destroy latency {out['latency_us']:.0f} us")


@pytest.mark.netns
def test_inherited_fd_keeps_the_listener_alive(netns: Netns) -> None:
    """A child holding the fd keeps the listener: no event until the child closes it."""
    out = _drive(netns, "inherit")
    assert out["while_child_holds"] == 0
    assert out["still_listed"] == [[socket.AF_INET, "0.0.0.0", PORT]]
    assert (out["evidence"], out["detail"]) == (Evidence.DEATH,
                                                f"listener destroyed 0.0.0.0 port {PORT}")


@pytest.mark.netns
def test_overrun_grows_buffer_logs_and_hints(netns: Netns) -> None:
    """Dropped destroys (ENOBUFS) grow the buffer, log sock-diag-overrun and emit a HINT; the
    listener's destroy is still seen after that."""
    out = _drive(netns, "overrun")
    assert out["overruns"] >= 1
    assert set(out["evidence"]) == {Evidence.HINT}
    overrun_lines = [ln for ln in out["logged"] if ln[1] == "sock-diag-overrun"]
    assert overrun_lines and all(lvl == "warning" and size >= 1 << 20
                                 for lvl, _, size in overrun_lines)
    assert out["deaths"] == 1


@pytest.mark.netns
def test_the_kernel_filter_keeps_traffic_out_and_the_listener_in(netns: Netns) -> None:
    """3000 connections to the port open and close: the filtered watch is never woken (the
    unfiltered one reads a datagram per socket, one message each), its smallest buffer never
    overruns, and the listener's destroy still reaches it."""
    n = 3000
    out = _drive(netns, "traffic", str(n))
    assert out["filtered"] and not out["plain_filtered"]
    assert out["during"]["plain_datagrams"] >= 2 * n
    assert out["messages_per_datagram"] == [1]
    assert out["during"]["wakeups"] == out["during"]["datagrams"] == out["during"]["triggers"] == 0
    assert out["after_close"] == [[Evidence.DEATH, f"listener destroyed 127.0.0.1 port {PORT}"]]
    assert out["datagrams_after"] == 1
    assert out["logged"] == []
    print(f"unfiltered: {out['during']['plain_wakeups']} wakeups, "
          f"{out['during']['plain_datagrams']} datagrams; filtered: 0 and 0")


if __name__ == "__main__":
    scenarios = {"dump": _scenario_dump, "destroy": _scenario_destroy,
                 "inherit": _scenario_inherit, "overrun": _scenario_overrun,
                 "traffic": _scenario_traffic}
    result = asyncio.run(scenarios[sys.argv[1]](*sys.argv[2:]))
    print(json.dumps(result))
