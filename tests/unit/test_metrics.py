"""watcher.outputs.metrics: the pure rendering, the histogram, the coalescing writer and atomic files."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from rules.model import Mode
from watcher.core.control import AdminBlock, Health, Status
from watcher.outputs.metrics import LATENCY_BUCKETS_S, MODES, Metrics, Snapshot, render, write_textfile


def _samples(data: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(data.decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _v(data: bytes, name: str, **labels: str) -> float:
    return _samples(data)[(name, tuple(sorted(labels.items())))]


def test_render_names_every_metric_of_the_contract() -> None:
    """The rendering holds every metric the issue names, with the documented labels."""
    data = render(Snapshot(version="1.2.3", status=Status(Health.UP, Mode.OPEN, None, "")))
    names = {n for n, _ in _samples(data)}
    assert {"sslvpn_heartbeat_up", "sslvpn_heartbeat_service_healthy",
            "sslvpn_heartbeat_chain_mode", "sslvpn_heartbeat_admin_block",
            "sslvpn_heartbeat_transitions_total",
            "sslvpn_heartbeat_last_transition_timestamp_seconds",
            "sslvpn_heartbeat_failover_latency_seconds_bucket",
            "sslvpn_heartbeat_failover_latency_seconds_count",
            "sslvpn_heartbeat_failover_latency_seconds_sum",
            "sslvpn_heartbeat_apply_failures_total", "sslvpn_heartbeat_log_dropped_total",
            "sslvpn_heartbeat_build_info"} <= names
    assert _v(data, "sslvpn_heartbeat_build_info", version="1.2.3") == 1
    assert not any(n.endswith("_created") for n in names)  # same output on every library version


@given(health=st.sampled_from(["starting", "up", "down"]),
       mode=st.none() | st.sampled_from(MODES), admin=st.booleans(), up=st.booleans())
def test_gauges_follow_the_snapshot(health: str, mode: str | None, admin: bool, up: bool) -> None:
    """up, service_healthy, admin_block and exactly one chain_mode (none if unknown) are 0/1."""
    status = Status(Health(health), None if mode is None else Mode(mode),
                    AdminBlock(False, "") if admin else None, "")
    data = render(Snapshot(version="v", up=up, status=status))
    assert _v(data, "sslvpn_heartbeat_up") == int(up)
    assert _v(data, "sslvpn_heartbeat_service_healthy") == int(health == "up")
    assert _v(data, "sslvpn_heartbeat_admin_block") == int(admin)
    modes = {m: _v(data, "sslvpn_heartbeat_chain_mode", mode=m) for m in MODES}
    assert modes == {m: float(m == mode) for m in MODES}


@settings(deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=100, allow_nan=False), max_size=40))
def test_histogram_buckets_are_cumulative_and_count_every_failover(lat: list[float]) -> None:
    """Each bucket counts the failovers at or under its bound; +Inf and _count count all."""
    m = Metrics(Path("/nonexistent/x.prom"), "v", writer=lambda p, d: None)
    try:
        for x in lat:
            m.failover(x)
        data = render(m.snapshot())
    finally:
        m.close()
    name = "sslvpn_heartbeat_failover_latency_seconds"
    buckets = {float(dict(labels)["le"]): v for (n, labels), v in _samples(data).items()
               if n == f"{name}_bucket"}
    assert sorted(buckets) == [*LATENCY_BUCKETS_S, float("inf")]
    for b in LATENCY_BUCKETS_S:
        assert buckets[b] == sum(1 for x in lat if x <= b)
    assert _v(data, f"{name}_bucket", le="+Inf") == len(lat)
    assert _v(data, f"{name}_count") == len(lat)
    assert _v(data, f"{name}_sum") == pytest.approx(sum(lat))


def test_buckets_span_a_millisecond_to_ten_seconds() -> None:
    """The latency buckets run from 1 ms to 10 s, increasing."""
    assert LATENCY_BUCKETS_S[0] == 0.001 and LATENCY_BUCKETS_S[-1] == 10.0
    assert list(LATENCY_BUCKETS_S) == sorted(set(LATENCY_BUCKETS_S))


def test_counters_count_and_the_transition_time_is_kept() -> None:
    """transition/probe_failure/apply_failure/log_dropped land in their counters."""
    m = Metrics(Path("/x.prom"), "v", writer=lambda p, d: None)
    try:
        m.transition("down", 1000.5)
        m.transition("up", 1002.0)
        m.transition("down", 1003.0)
        for check in ("pidfile", "pidfile", "connect"):
            m.probe_failure(check)
        m.apply_failure()
        m.log_dropped(7)
        data = render(m.snapshot())
    finally:
        m.close()
    assert _v(data, "sslvpn_heartbeat_transitions_total", to="down") == 2
    assert _v(data, "sslvpn_heartbeat_transitions_total", to="up") == 1
    assert _v(data, "sslvpn_heartbeat_last_transition_timestamp_seconds") == 1003.0
    assert _v(data, "sslvpn_heartbeat_probe_failures_total", check="pidfile") == 2
    assert _v(data, "sslvpn_heartbeat_probe_failures_total", check="connect") == 1
    assert _v(data, "sslvpn_heartbeat_apply_failures_total") == 1
    assert _v(data, "sslvpn_heartbeat_log_dropped_total") == 7


def test_known_checks_start_at_zero() -> None:
    """The probe's check names given at construction are rendered at 0 before any failure."""
    m = Metrics(Path("/x.prom"), "v", checks=("pid_file", "connect"), writer=lambda p, d: None)
    try:
        data = render(m.snapshot())
    finally:
        m.close()
    assert _v(data, "sslvpn_heartbeat_probe_failures_total", check="pid_file") == 0
    assert _v(data, "sslvpn_heartbeat_probe_failures_total", check="connect") == 0


def test_check_labels_are_bounded() -> None:
    """However many distinct check names arrive, the label set stays small ("other" beyond)."""
    m = Metrics(Path("/x.prom"), "v", writer=lambda p, d: None)
    try:
        for i in range(100):
            m.probe_failure(f"c{i}")
        fails = m.snapshot().probe_failures
    finally:
        m.close()
    assert len(fails) <= 17 and sum(fails.values()) == 100 and fails["other"] > 0


def test_writes_are_coalesced_while_the_disk_is_slow() -> None:
    """While one write is stuck, a burst of changes makes one more write, with the last values."""
    gate, started = threading.Event(), threading.Event()
    written: list[bytes] = []

    def slow(path: Path, data: bytes) -> None:
        written.append(data)
        started.set()
        assert gate.wait(10)

    m = Metrics(Path("/x.prom"), "v", writer=slow)
    try:
        assert started.wait(5)
        for i in range(200):  # returns at once although the writer is stuck
            m.log_dropped(i)
        gate.set()
        assert m.flush(5)
    finally:
        gate.set()
        m.close()
    assert 2 <= len(written) <= 4  # the first, the coalesced burst, the close
    assert _v(written[-2], "sslvpn_heartbeat_log_dropped_total") == 199
    assert _v(written[-1], "sslvpn_heartbeat_up") == 0


def test_a_failing_disk_is_reported_once_then_recovery_once(tmp_path: Path) -> None:
    """The writer reports an error once while it lasts, "" once it writes again; it never dies."""
    reports: list[str] = []
    target = tmp_path / "gone" / "m.prom"
    m = Metrics(target, "v", report=reports.append)
    try:
        for _ in range(5):
            m.tick()
            assert m.flush(5)
        assert len(reports) == 1 and "gone" in reports[0]
        target.parent.mkdir()
        m.tick()
        assert m.flush(5)
        assert reports[1:] == [""]
        assert _v(target.read_bytes(), "sslvpn_heartbeat_up") == 1
    finally:
        m.close()
    assert _v(target.read_bytes(), "sslvpn_heartbeat_up") == 0


def test_write_textfile_replaces_with_mode_0644_whatever_the_umask(tmp_path: Path) -> None:
    """The file is world-readable under umask 077 and no temporary file is left behind."""
    target = tmp_path / "m.prom"
    target.write_text("old")
    old = os.umask(0o077)
    try:
        write_textfile(target, b"new\n")
    finally:
        os.umask(old)
    assert target.read_bytes() == b"new\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert os.listdir(tmp_path) == ["m.prom"]


def test_write_textfile_never_follows_a_planted_temporary_symlink(tmp_path: Path) -> None:
    """Symlinks planted where a predictable temporary file would go are never followed: the
    write goes through a fresh file, the links' target untouched."""
    victim = tmp_path / "victim"
    victim.write_text("keep")
    for name in (f".m.prom.{os.getpid()}.tmp", ".m.prom.tmp", ".m.prom"):
        (tmp_path / name).symlink_to(victim)
    write_textfile(tmp_path / "m.prom", b"x")
    assert victim.read_text() == "keep"
    assert (tmp_path / "m.prom").read_bytes() == b"x" and not (tmp_path / "m.prom").is_symlink()


def test_connections_reset_are_counted_by_mode_and_family_from_zero() -> None:
    """connections_reset adds per (mode, family); every pair is shown from the start at 0."""
    m = Metrics(Path("/x.prom"), "v", writer=lambda p, d: None)
    try:
        first = render(m.snapshot())
        m.connections_reset("block", "ipv4", 3)
        m.connections_reset("drain", "ipv6", 1)
        m.connections_reset("block", "ipv4", 2)
        data = render(m.snapshot())
    finally:
        m.close()
    name = "sslvpn_heartbeat_connections_reset_total"
    assert _v(first, name, mode="drain", family="ipv4") == 0
    assert _v(data, name, mode="block", family="ipv4") == 5
    assert _v(data, name, mode="drain", family="ipv6") == 1
    assert _v(data, name, mode="block", family="ipv6") == 0
