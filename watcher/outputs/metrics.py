"""Prometheus metrics for node_exporter's textfile collector: no listening port of our own.

The daemon only reports what happened (``status``, ``transition``, ``failover``, ...): each call
updates counters under a lock held for a few assignments and sets a "dirty" event. A writer
thread renders the exposition text and replaces the file atomically (a temporary file in the same
directory, then ``rename``), so node_exporter never reads half a file and a slow or full disk
delays only the next write, never the event loop or a firewall change. Calls made while a write
is under way are coalesced into the next one.

Rendering is pure: ``render(snapshot)`` returns the bytes, built with prometheus_client's metric
families and its text exposition writer (the same output on 0.16, Debian 12's, and current ones).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import CollectorRegistry

from rules.model import Mode
from watcher.atomicfile import write_atomic
from watcher.core.control import Health, Status
from watcher.core.fleet import Guard

__all__ = [
    "LATENCY_BUCKETS_S",
    "MODES",
    "FleetMetrics",
    "Metrics",
    "Snapshot",
    "fleet_metrics",
    "render",
    "write_textfile",
]

PREFIX = "sslvpn_heartbeat"
MODES = tuple(str(m) for m in Mode)
_STARTING = Status(Health.STARTING, None, None, "")
# Kernel event to rule in effect: ~1 ms on an idle host, seconds behind a held xtables lock.
LATENCY_BUCKETS_S = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
_MAX_CHECK_LABELS = 16  # probe check names are a small fixed set; never let labels grow unbounded


@dataclass(frozen=True)
class Snapshot:
    """Everything the metrics file says, at one instant."""

    version: str
    up: bool = True
    status: Status = _STARTING  # the core's: health, the chain's mode (None: unknown), admin
    transitions: Mapping[str, int] = field(default_factory=lambda: {"down": 0, "up": 0})
    last_transition_s: float = 0.0  # Unix time; 0: none since the agent started
    latency_counts: tuple[int, ...] = (0,) * (len(LATENCY_BUCKETS_S) + 1)  # per bucket, +Inf last
    latency_sum_s: float = 0.0
    probe_failures: Mapping[str, int] = field(default_factory=dict)
    apply_failures: int = 0
    log_dropped: int = 0
    # connections the agent ended, by (mode: block | drain, peer family: ipv4 | ipv6)
    connections_reset: Mapping[tuple[str, str], int] = field(default_factory=lambda: {
        (m, f): 0 for m in ("block", "drain") for f in ("ipv4", "ipv6")})
    fleet: FleetMetrics | None = None  # with [fleet]


@dataclass(frozen=True)
class FleetMetrics:
    """The fleet guard's gauges: members by mode, refused, reachable, slot held."""

    by_mode: Mapping[str, int] = field(default_factory=dict)
    refused: bool = False
    reachable: bool = False
    slot_held: bool = False


def fleet_metrics(g: Guard) -> FleetMetrics:
    """The gauges of the guard ``g``."""
    by_mode = dict.fromkeys(MODES, 0)
    for m in g.view.members:
        if m.mode in by_mode:
            by_mode[m.mode] += 1
    return FleetMetrics(by_mode, g.refused is not None, g.reachable is True, g.member in g.view.slots)


def _fleet_families(f: FleetMetrics) -> Iterator[Metric]:
    p = PREFIX
    members = GaugeMetricFamily(f"{p}_fleet_members", "Registered members of the fleet group, "
                                "by the mode their kernel holds.", labels=["mode"])
    for m in MODES:
        members.add_metric([m], float(f.by_mode.get(m, 0)))
    yield members
    yield GaugeMetricFamily(f"{p}_fleet_guard_refused", "1 while the fleet guard refuses this "
                            "server's suspect block (it fails its probe and stays open).",
                            value=1.0 if f.refused else 0.0)
    yield GaugeMetricFamily(f"{p}_fleet_reachable", "1 while etcd answers, else 0.",
                            value=1.0 if f.reachable else 0.0)
    yield GaugeMetricFamily(f"{p}_fleet_slot_held", "1 while this member holds a maintenance slot.",
                            value=1.0 if f.slot_held else 0.0)


def _families(s: Snapshot) -> Iterator[Metric]:
    p = PREFIX
    yield GaugeMetricFamily(f"{p}_up", "1 while the agent runs, 0 once it has stopped.",
                            value=1.0 if s.up else 0.0)
    yield GaugeMetricFamily(f"{p}_service_healthy",
                            "1 while the watched service is healthy (UP), else 0.",
                            value=1.0 if s.status.health is Health.UP else 0.0)
    mode = GaugeMetricFamily(f"{p}_chain_mode",
                             "1 for the mode the agent's chain holds (all 0 before it is known).",
                             labels=["mode"])
    for m in MODES:
        mode.add_metric([m], 1.0 if s.status.mode == m else 0.0)
    yield mode
    yield GaugeMetricFamily(f"{p}_admin_block",
                            "1 while an operator's block (full or drain) is in force.",
                            value=1.0 if s.status.admin is not None else 0.0)
    trans = CounterMetricFamily(f"{p}_transitions", "Health transitions of the service.",
                                labels=["to"])
    for to in ("down", "up"):
        trans.add_metric([to], float(s.transitions.get(to, 0)))
    yield trans
    yield GaugeMetricFamily(f"{p}_last_transition_timestamp_seconds",
                            "Unix time of the last health transition (0: none since start).",
                            value=s.last_transition_s)
    cumulative, buckets = 0, []
    for le, n in zip((*(repr(float(b)) for b in LATENCY_BUCKETS_S), "+Inf"), s.latency_counts,
                     strict=True):
        cumulative += n
        buckets.append((le, float(cumulative)))
    yield HistogramMetricFamily(f"{p}_failover_latency_seconds",
                                "From the kernel event to the rule change in effect.",
                                buckets=buckets, sum_value=s.latency_sum_s)
    probes = CounterMetricFamily(f"{p}_probe_failures", "Failed verification probes, by check.",
                                 labels=["check"])
    for check, n in sorted(s.probe_failures.items()):
        probes.add_metric([check], float(n))
    yield probes
    yield CounterMetricFamily(f"{p}_apply_failures", "Firewall changes that failed (retried).",
                              value=float(s.apply_failures))
    yield CounterMetricFamily(f"{p}_log_dropped", "Log lines a stalled sink lost.",
                              value=float(s.log_dropped))
    resets = CounterMetricFamily(f"{p}_connections_reset",
                                 "Established connections the agent ended (SOCK_DESTROY): all "
                                 "of them on a full block, idle ones in a drain.",
                                 labels=["mode", "family"])
    for (mode_, family), n in sorted(s.connections_reset.items()):
        resets.add_metric([mode_, family], float(n))
    yield resets
    if s.fleet is not None:
        yield from _fleet_families(s.fleet)
    info = GaugeMetricFamily(f"{p}_build_info", "Always 1; the agent's version as a label.",
                             labels=["version"])
    info.add_metric([s.version], 1.0)
    yield info


class _Collector:
    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap

    def collect(self) -> Iterator[Metric]:
        return _families(self.snap)

    def describe(self) -> list[Metric]:
        return []  # nothing to check against: the registry is used once and thrown away


def render(snap: Snapshot) -> bytes:
    """The Prometheus text exposition of ``snap`` (pure: no clock, no file)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(snap))
    return generate_latest(registry)


def write_textfile(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` (watcher.atomicfile), mode 0644 whatever the umask:
    node_exporter runs as another user; its temporary name never ends in ``.prom``."""
    write_atomic(path, data, mode=0o644)


Reporter = Callable[[str], None]  # "" after a success that follows failures, else the error


class Metrics:
    """The agent's metrics, rewritten to ``path`` by a background thread after every change."""

    def __init__(self, path: Path, version: str, *, checks: Iterable[str] = (),
                 report: Reporter | None = None, clock: Callable[[], float] = time.time,
                 writer: Callable[[Path, bytes], None] = write_textfile) -> None:
        """``checks``: the probe's check names, shown at 0 from the start (rate() needs a
        first sample); ``report`` is called on the writer thread with each new error, and
        with "" when writing works again."""
        self.path = path
        self._report = report or (lambda reason: None)
        self._clock = clock
        self._write = writer
        self._lock = threading.Lock()
        self._snap = Snapshot(version=version,
                              probe_failures=dict.fromkeys(list(checks)[:_MAX_CHECK_LABELS], 0))
        self._counts = list(self._snap.latency_counts)
        self._dirty = threading.Event()
        self._closing = False
        self._written = 0  # writes done (successful or not), for flush()
        self._wanted = 0  # changes asked for
        self._done = threading.Condition(threading.Lock())
        self._last_error = ""
        self._thread = threading.Thread(target=self._run, name="metrics-writer", daemon=True)
        self._thread.start()
        self._changed()

    # ---------------------------------------------------------------- what the daemon reports

    def _update(self, **changes: object) -> None:
        with self._lock:
            if self._closing:
                return
            new = _replace(self._snap, **changes)
            if new == self._snap:
                return
            self._snap = new
        self._changed()

    def status(self, status: Status) -> None:
        """The core's current status (health, the chain's mode, the admin block)."""
        self._update(status=status)

    def transition(self, to: str, at: float | None = None) -> None:
        """The service went ``to`` "down" or "up" at Unix time ``at`` (default: now)."""
        with self._lock:
            trans = dict(self._snap.transitions)
            trans[to] = trans.get(to, 0) + 1
        self._update(transitions=trans, last_transition_s=self._clock() if at is None else at)

    def failover(self, latency_s: float) -> None:
        """A rule change took effect ``latency_s`` seconds after the kernel event behind it."""
        i = next((n for n, b in enumerate(LATENCY_BUCKETS_S) if latency_s <= b),
                 len(LATENCY_BUCKETS_S))
        with self._lock:
            self._counts[i] += 1
            counts, total = tuple(self._counts), self._snap.latency_sum_s + max(0.0, latency_s)
        self._update(latency_counts=counts, latency_sum_s=total)

    def probe_failure(self, check: str) -> None:
        """One probe failed at ``check`` (pid, listen, connect, tls, http, ...)."""
        with self._lock:
            fails = dict(self._snap.probe_failures)
            if check not in fails and len(fails) >= _MAX_CHECK_LABELS:
                check = "other"
            fails[check] = fails.get(check, 0) + 1
        self._update(probe_failures=fails)

    def apply_failure(self) -> None:
        """One firewall change failed (it will be retried)."""
        with self._lock:
            n = self._snap.apply_failures + 1
        self._update(apply_failures=n)

    def connections_reset(self, mode: str, family: str, n: int) -> None:
        """``n`` established connections from ``family`` peers were ended in ``mode``."""
        with self._lock:
            counts = dict(self._snap.connections_reset)
            counts[mode, family] = counts.get((mode, family), 0) + n
        self._update(connections_reset=counts)

    def fleet(self, f: FleetMetrics) -> None:
        """The fleet guard's gauges now."""
        self._update(fleet=f)

    def log_dropped(self, total: int) -> None:
        """The log sinks have dropped ``total`` lines since the agent started."""
        self._update(log_dropped=total)

    def tick(self) -> None:
        """The safety-net tick: rewrite the file even if nothing changed (its mtime says alive)."""
        self._changed()

    def snapshot(self) -> Snapshot:
        """What the next write will say."""
        with self._lock:
            return self._snap

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every change reported so far was written (tests, shutdown)."""
        with self._done:
            want = self._wanted
            return self._done.wait_for(lambda: self._written >= want, timeout)

    def close(self, timeout: float = 2.0) -> None:
        """Write a last file saying ``up 0`` and stop the writer (waits at most ``timeout``)."""
        with self._lock:
            if self._closing:
                return
            self._snap = _replace(self._snap, up=False)
            self._closing = True
        self._changed()
        self._thread.join(timeout)

    # ---------------------------------------------------------------- the writer thread

    def _changed(self) -> None:
        with self._done:
            self._wanted += 1
        self._dirty.set()

    def _run(self) -> None:
        while True:
            self._dirty.wait()
            self._dirty.clear()
            with self._done:
                upto = self._wanted
            with self._lock:
                snap, closing = self._snap, self._closing
            error = ""
            try:
                self._write(self.path, render(snap))
            except Exception as exc:  # the writer never dies of a bad disk
                error = f"{self.path}: {exc}"
            if error != self._last_error:
                self._last_error = error
                with contextlib.suppress(Exception):
                    self._report(error)
            with self._done:
                self._written = max(self._written, upto)
                self._done.notify_all()
            if closing and not self._dirty.is_set():
                return


def _replace(snap: Snapshot, **changes: object) -> Snapshot:
    return dataclasses.replace(snap, **changes)  # type: ignore[arg-type]
