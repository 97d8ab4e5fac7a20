"""The daemon's fleet client: carries out the core's fleet actions off the event loop and
feeds the answers back. It decides nothing.

Two threads. The *fleet* thread owns the lease: it keeps it alive every ``lease_s / 3``,
carries out ``AskPermit`` and ``Register`` in order, and reports ``FleetUnreachable`` once
no endpoint has answered for a whole ``lease_s`` (by then etcd has dropped the member key,
so the others already count this server as not open) and ``FleetReachable`` when a new lease
is granted. The *watch* thread streams the group's changes (one long request, never polling)
and feeds ``FleetChanged`` with the group as it is. ``carry_out`` only queues: the proven-block
path never waits for etcd.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import requests

from watcher.config import FleetConfig
from watcher.core import control
from watcher.core.catalogue import Event
from watcher.fleet.etcd import Etcd, EtcdError, Kv, Snapshot

__all__ = ["FleetClient"]


class FleetClient:
    """The lease, the member key, the permit and the watch of one agent."""

    def __init__(self, cfg: FleetConfig, feed: Callable[[control.Input], None], log: Any, *,
                 clock: Callable[[], int] = time.monotonic_ns,
                 wall: Callable[[], float] = time.time) -> None:
        """``feed`` must be safe to call from any thread (it hands the input to the loop)."""
        self.cfg = cfg
        self._feed = feed
        self.log = log
        self._clock = clock
        self._wall = wall
        self.etcd = Etcd(cfg, wall=wall)
        self._actions: queue.Queue[control.Action | None] = queue.Queue()
        self._stop = threading.Event()
        self._lease = 0
        self._reachable: bool | None = None
        self._last_ok = clock()
        self._watch_gen = 0  # bumped to make the watch thread start over
        self._watch_resp: requests.Response | None = None
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._main, name="fleet", daemon=True),
                         threading.Thread(target=self._watch_main, name="fleet-watch", daemon=True)]
        self._watch_wake = threading.Event()
        self._known: Snapshot | None = None  # the group as the watch has it (revision 0)

    # ------------------------------------------------------------------ the daemon's side

    def start(self) -> None:
        """Start both threads."""
        for t in self._threads:
            t.start()

    def carry_out(self, act: control.Action) -> None:
        """Queue a fleet action (AskPermit, Register); never blocks."""
        self._actions.put(act)

    def close(self, timeout: float = 3.0) -> None:
        """Stop the threads and revoke the lease (the member key and any slot go at once)."""
        self._stop.set()
        self._actions.put(None)
        self._kick_watch()
        for t in self._threads:
            t.join(timeout)

    @property
    def lease(self) -> int:
        """The lease held now (0: none)."""
        return self._lease

    # ------------------------------------------------------------------ the fleet thread

    def _main(self) -> None:
        period = max(0.3, self.cfg.lease_s / 3)
        next_beat = 0.0
        while not self._stop.is_set():
            wait = max(0.0, next_beat - time.monotonic())
            try:
                act = self._actions.get(timeout=wait if self._lease else min(wait, 0.5))
            except queue.Empty:
                act = None
                if self._stop.is_set():
                    break
            if self._stop.is_set():
                break
            if time.monotonic() >= next_beat or not self._lease:
                self._beat()
                next_beat = time.monotonic() + (period if self._lease else 0.5)
            if act is not None:
                self._do(act)
        if self._lease:
            with contextlib.suppress(EtcdError):
                self.etcd.revoke(self._lease)

    def _ok(self) -> None:
        self._last_ok = self._clock()

    def _failed(self, what: str, exc: Exception) -> None:
        """A request failed: after a whole lease without an answer, etcd is unreachable."""
        if self._reachable is not False:  # once fleet-unreachable is said, the retries are quiet
            self.log.warning(Event.FLEET_ERROR, reason=f"{what}: {exc}", member=self.cfg.member)
        self._kick_watch()  # the watch follows this thread's endpoint, which may have moved
        if self._reachable is not False and self._clock() - self._last_ok > self.cfg.lease_s * 1e9:
            self._reachable = False
            self._lease = 0
            self._kick_watch()
            self._feed(control.FleetUnreachable(str(exc)))

    def _beat(self) -> None:
        """Keep the lease alive, or get a new one (then the member key is registered anew)."""
        try:
            if self._lease and self.etcd.keep_alive(self._lease):
                self._ok()
                return
            self._lease = self.etcd.grant_lease()
        except EtcdError as exc:
            self._failed("lease", exc)
            return
        self._ok()
        self._reachable = True
        self._kick_watch()
        self._feed(control.FleetReachable())

    def _since(self, since_ns: int) -> float:
        return self._wall() - max(0, self._clock() - since_ns) / 1e9

    def _do(self, act: control.Action) -> None:
        if not self._lease:  # queued before the connection was lost: a key without a lease
            if isinstance(act, control.AskPermit):  # would outlive this agent
                self._feed(control.PermitAnswer(False, (), 0, error="no lease"))
            return
        match act:
            case control.AskPermit(since_ns=since):
                try:
                    with self._lock:
                        known = self._known
                    v = self.etcd.ask_permit(self._lease, self._since(since), known=known)
                except EtcdError as exc:
                    self._failed("permit", exc)
                    self._feed(control.PermitAnswer(False, (), 0, error=str(exc)))
                    return
                self._ok()
                self._feed(control.PermitAnswer(v.granted, v.not_open, v.open_count))
            case control.Register(mode=mode, cause=cause, since_ns=since, slot=slot):
                try:
                    self.etcd.register(self._lease, str(mode), cause, self._since(since), slot=slot)
                except EtcdError as exc:
                    self._failed("register", exc)
                    return
                self._ok()

    # ------------------------------------------------------------------ the watch thread

    def _kick_watch(self) -> None:
        """Make the watch start over (new endpoint, new lease, stop)."""
        with self._lock:
            self._watch_gen += 1
            resp = self._watch_resp
            self._known = None
        self._watch_wake.set()
        if resp is not None:
            _shut(resp)

    def _set_resp(self, resp: requests.Response) -> None:
        with self._lock:
            self._watch_resp = resp

    def _watch_main(self) -> None:
        # Its own Etcd: a thread-confined session, and its own endpoint rotation.
        etcd = Etcd(self.cfg, wall=self._wall)
        while not self._stop.is_set():
            with self._lock:
                gen = self._watch_gen
            if self._reachable is not True:
                self._watch_wake.wait(0.5)
                self._watch_wake.clear()
                continue
            etcd.current = self.etcd.current
            try:
                snap = etcd.snapshot()
                self._feed(control.FleetChanged(snap.view()))
                self._follow(etcd, snap, gen)
            except (EtcdError, requests.RequestException, ValueError) as exc:
                if not self._stop.is_set():
                    self.log.warning(Event.FLEET_ERROR, reason=f"watch: {exc}", member=self.cfg.member)
                    etcd.current = (etcd.current + 1) % len(etcd.clients)
                    self._watch_wake.wait(0.5)
                    self._watch_wake.clear()

    def _follow(self, etcd: Etcd, snap: Snapshot, gen: int) -> None:
        members, slots = dict(snap.members), dict(snap.slots)
        with self._lock:
            if self._watch_gen == gen:
                self._known = Snapshot(0, dict(members), dict(slots))

        def stale() -> bool:
            return self._stop.is_set() or self._watch_gen != gen

        for key, kv in etcd.watch(snap.revision + 1, stale, self._set_resp):
            if key.startswith(etcd.members_prefix):
                _apply(members, key.removeprefix(etcd.members_prefix), kv)
            elif key.startswith(etcd.slots_prefix) and key.removeprefix(etcd.slots_prefix).isdigit():
                _apply(slots, int(key.removeprefix(etcd.slots_prefix)), kv)
            known = Snapshot(0, dict(members), dict(slots))
            with self._lock:
                if self._watch_gen == gen:
                    self._known = known
            self._feed(control.FleetChanged(known.view()))
        if not stale():
            raise EtcdError("watch stream ended")


def _apply(d: dict[Any, Kv], k: Any, kv: Kv | None) -> None:
    if kv is None:
        d.pop(k, None)
    else:
        d[k] = kv


def _shut(resp: requests.Response) -> None:
    """Unblock a thread reading the streaming ``resp`` (shut its socket down)."""
    with contextlib.suppress(Exception):
        fp: Any = resp.raw._fp  # no public way to interrupt a blocked read
        s = socket.socket(fileno=fp.fileno())
        try:
            s.shutdown(socket.SHUT_RDWR)
        finally:
            s.detach()
    with contextlib.suppress(Exception):
        resp.close()
