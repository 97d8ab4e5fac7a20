"""packaging/prometheus: the alert rules load, their promtool unit tests pass and can fail."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from tests.netns import REPO
from watcher.outputs.metrics import Snapshot, render

RULES_DIR = REPO / "packaging" / "prometheus"
RULES = RULES_DIR / "sslvpn-heartbeat-rules.yml"
TESTS = RULES_DIR / "sslvpn-heartbeat-rules.test.yml"
ALERTS = {"SslvpnHeartbeatAgentDown", "SslvpnHeartbeatServiceDown",
          "SslvpnHeartbeatBlockedTooLong", "SslvpnHeartbeatFailoverSlow",
          "SslvpnHeartbeatManyBlocked"}


def promtool(*args: str, cwd: Path = RULES_DIR) -> subprocess.CompletedProcess[str]:
    """Run Debian's promtool (package prometheus); a missing promtool fails the test."""
    tool = shutil.which("promtool")
    assert tool, "promtool missing: install Debian's prometheus package (scripts/bootstrap)"
    return subprocess.run([tool, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_rules_load() -> None:
    """promtool check rules accepts the file: five rules."""
    r = promtool("check", "rules", RULES.name)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 5 rules found" in r.stdout


def test_rule_unit_tests_pass() -> None:
    """promtool test rules runs the shipped unit tests without a failure."""
    r = promtool("test", "rules", TESTS.name)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_every_alert_is_shipped_and_tested_firing() -> None:
    """The five alerts exist and each has a test case where it is expected to fire."""
    assert set(re.findall(r"^\s*- alert: (\w+)$", RULES.read_text(), re.M)) == ALERTS
    tests = TESTS.read_text()
    for alert in ALERTS:
        fired = re.findall(rf"alertname: {alert}\n\s*exp_alerts:\n\s*- exp_labels", tests)
        quiet = re.findall(rf"alertname: {alert}\n\s*exp_alerts: \[\]", tests)
        assert fired and quiet, f"{alert}: a firing and a quiet case are both needed"


def test_rules_use_only_metrics_the_agent_writes() -> None:
    """Every sslvpn_heartbeat_* name in the rules is one the agent's file holds."""
    written = set(re.findall(r"^(sslvpn_heartbeat_\w+)", render(Snapshot(version="v")).decode(),
                             re.M))
    used = set(re.findall(r"sslvpn_heartbeat_\w+", RULES.read_text()))
    assert used and used <= written, used - written


def test_the_unit_tests_catch_a_broken_rule(tmp_path: Path) -> None:
    """With the stale-file threshold raised out of reach, the shipped unit tests fail."""
    text = RULES.read_text()
    assert text.count("> 120") == 1
    (tmp_path / RULES.name).write_text(text.replace("> 120", "> 100000"))
    shutil.copy(TESTS, tmp_path / TESTS.name)
    r = promtool("test", "rules", TESTS.name, cwd=tmp_path)
    assert r.returncode != 0 and "SslvpnHeartbeatAgentDown" in r.stdout + r.stderr
