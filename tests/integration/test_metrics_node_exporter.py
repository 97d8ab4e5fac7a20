"""The agent's metrics through Debian's real node_exporter (textfile collector), during a failover.

node_exporter runs in the test's namespace as an unprivileged user (nobody), reading only the
textfile directory the agent writes to; the test scrapes it with curl, checks the whole scrape
with ``promtool check metrics`` and follows the values through a real kill and restart of the
fake service.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.agent import Agent, Service, agent_config, chain_view
from tests.netns import Netns, wait_for

pytestmark = pytest.mark.netns

NODE_EXPORTER = "/usr/bin/prometheus-node-exporter"  # Debian's prometheus-node-exporter
LISTEN = "127.0.0.1:9100"


@pytest.fixture
def textfile_dir() -> Iterator[Path]:
    """A directory another user (node_exporter as nobody) can read, as the package's is."""
    d = Path(tempfile.mkdtemp(prefix="svh-textfile-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


class Exporter:
    """node_exporter in ``ns`` with only the textfile collector, scraped with curl."""

    def __init__(self, ns: Netns, directory: Path, log: Path) -> None:
        assert os.access(NODE_EXPORTER, os.X_OK), "Debian's prometheus-node-exporter is missing"
        self.ns = ns
        with open(log, "wb") as out:
            self.proc = ns.popen(
                ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", NODE_EXPORTER,
                 "--collector.disable-defaults", "--collector.textfile",
                 f"--collector.textfile.directory={directory}", f"--web.listen-address={LISTEN}"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        self.log = log
        wait_for(self._serving, 10.0, "node_exporter serving /metrics")

    def _serving(self) -> bool:
        assert self.proc.poll() is None, f"node_exporter exited: {self.log.read_text()[-2000:]}"
        return self.ns.run(["curl", "-sf", f"http://{LISTEN}/metrics"], check=False).returncode == 0

    def scrape(self) -> str:
        """One scrape of /metrics (text), checked by promtool."""
        text = self.ns.run(["curl", "-sf", "--max-time", "5", f"http://{LISTEN}/metrics"]).stdout
        lint = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                              text=True, timeout=30)
        assert lint.returncode == 0, f"promtool check metrics: {lint.stdout}{lint.stderr}"
        return text

    def values(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        """The scrape as {(sample name, labels): value}."""
        return {(s.name, frozenset(s.labels.items())): s.value
                for fam in text_string_to_metric_families(self.scrape()) for s in fam.samples}


def _v(vals: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
       **labels: str) -> float | None:
    return vals.get((name, frozenset(labels.items())))


def test_metrics_reach_node_exporter_and_follow_a_real_failover(
        netns: Netns, tmp_path: Path, textfile_dir: Path) -> None:
    """Up and open, then blocked with a down transition and a latency, open again, up 0 at stop."""
    svc = Service(netns, tmp_path / "svc").start()
    prom = textfile_dir / "sslvpn-heartbeat.prom"
    cfg = agent_config(tmp_path / "agent.toml", svc.d, tmp_path / "state",
                       probe={"interval_s": 1.0}, metrics={"textfile": str(prom)})
    agent = Agent(netns, cfg, tmp_path)
    exporter = Exporter(netns, textfile_dir, tmp_path / "node_exporter.log")
    agent.start().wait_ready()

    def now_says(**want: float) -> dict[tuple[str, frozenset[tuple[str, str]]], float] | None:
        vals = exporter.values()
        for key, value in want.items():
            name, _, label = key.partition("__")
            labels = dict([label.split("_is_")]) if label else {}
            if _v(vals, f"sslvpn_heartbeat_{name}", **labels) != value:
                return None
        return vals

    vals = wait_for(lambda: now_says(up=1, service_healthy=1, chain_mode__mode_is_open=1,
                                     chain_mode__mode_is_block=0, admin_block=0), 10.0,
                    "metrics: up, healthy, open")
    assert _v(vals, "node_textfile_scrape_error") == 0
    assert _v(vals, "sslvpn_heartbeat_transitions_total", to="down") == 0
    assert _v(vals, "sslvpn_heartbeat_build_info", version=__import__("watcher").__version__) == 1
    assert stat_mode(prom) == 0o644

    # The safety-net tick rewrites the file: its mtime, as node_exporter reports it, advances.
    mtime = _v(vals, "node_textfile_mtime_seconds", file=str(prom))
    assert mtime is not None
    wait_for(lambda: (_v(exporter.values(), "node_textfile_mtime_seconds", file=str(prom)) or 0)
             > mtime, 10.0, "the file rewritten by the tick")

    t_kill = time.time()
    mark = agent.mark()
    svc.ctl("kill-core")
    block = agent.wait_event("firewall-block", 5.0, after=mark)
    assert chain_view(netns).blocked
    vals = wait_for(lambda: now_says(service_healthy=0, chain_mode__mode_is_block=1,
                                     chain_mode__mode_is_open=0, transitions_total__to_is_down=1),
                    10.0, "metrics: down, blocked, one down transition")
    last = _v(vals, "sslvpn_heartbeat_last_transition_timestamp_seconds")
    assert last is not None and t_kill - 1 <= last <= time.time()
    count = _v(vals, "sslvpn_heartbeat_failover_latency_seconds_count")
    total = _v(vals, "sslvpn_heartbeat_failover_latency_seconds_sum")
    assert count == 1 and total is not None
    assert total == pytest.approx(block["event.duration"] / 1e9, rel=1e-6, abs=1e-6)
    fails = {dict(labels)["check"]: v for (n, labels), v in vals.items()
             if n == "sslvpn_heartbeat_probe_failures_total"}
    assert fails and sum(fails.values()) >= 1, vals

    mark = agent.mark()
    svc.ctl("start")
    agent.wait_event("firewall-unblock", 10.0, after=mark)
    vals = wait_for(lambda: now_says(service_healthy=1, chain_mode__mode_is_open=1,
                                     transitions_total__to_is_up=1,
                                     transitions_total__to_is_down=1), 10.0,
                    "metrics: healthy and open again, one up transition")
    assert _v(vals, "sslvpn_heartbeat_failover_latency_seconds_count") == 2

    assert agent.stop() == 0
    vals = wait_for(lambda: now_says(up=0), 5.0, "metrics: up 0 after the agent stopped")
    assert _v(vals, "node_textfile_scrape_error") == 0
    assert [p.name for p in textfile_dir.iterdir()] == ["sslvpn-heartbeat.prom"]  # no temp left
    agent.check_clean()


def test_a_missing_directory_is_one_warning_and_the_agent_still_fails_over(
        netns: Netns, tmp_path: Path) -> None:
    """Without node_exporter's directory the agent logs metrics-write-failed once and blocks."""
    svc = Service(netns, tmp_path / "svc").start()
    cfg = agent_config(tmp_path / "agent.toml", svc.d, tmp_path / "state",
                       probe={"interval_s": 0.2},
                       metrics={"textfile": str(tmp_path / "absent" / "sslvpn-heartbeat.prom")})
    agent = Agent(netns, cfg, tmp_path)
    agent.start().wait_ready()
    agent.wait_event("metrics-write-failed", 5.0)
    mark = agent.mark()
    svc.ctl("kill-core")
    agent.wait_event("firewall-block", 5.0, after=mark)
    # Two more transitions, each a metrics write that fails, and safety-net ticks between...
    for action, event in (("start", "firewall-unblock"), ("kill-core", "firewall-block")):
        mark = agent.mark()
        svc.ctl(action)
        agent.wait_event(event, 5.0, after=mark)
    # ... still exactly one warning: the writer kept failing without flooding the log.
    assert len(agent.find("metrics-write-failed")) == 1
    assert agent.stop() == 0
    agent.check_clean()


def stat_mode(p: Path) -> int:
    """The permission bits of ``p``."""
    return p.stat().st_mode & 0o777
