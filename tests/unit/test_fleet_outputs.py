"""The fleet guard's outputs without etcd: nagios verdicts, metrics, the status summary, and
that an agent without [fleet] never imports the etcd client."""

from __future__ import annotations

import subprocess
import sys

from rules.model import Mode
from tests.netns import REPO
from tests.plugin_output import parse
from watcher.cli.nagios import CRITICAL, OK, WARNING, Facts, verdict
from watcher.core.control import Health, Status
from watcher.core.fleet import FleetView, Guard, Member, summary
from watcher.outputs.agentcheck import answer
from watcher.outputs.metrics import Snapshot, fleet_metrics, render


def _facts(healthy: bool, fleet: dict[str, object] | None) -> Facts:
    return Facts(service="sslvpn", port=8080, healthy=healthy, reason="" if healthy else
                 "http: GET /health: status 503", probe_s=0.01, established=3, admin=None,
                 daemon_running=True, now=0.0, fleet=fleet)


def _guard(**kw: object) -> Guard:
    g = Guard.new(4, "50%", "block", "srv1")
    view = FleetView((Member("srv1", "open", "health", 1.0), Member("srv2", "block", "health", 2.0),
                      Member("srv3", "drain", "admin", 3.0), Member("srv4", "open", "health", 4.0)),
                     ("srv3",))
    return Guard(**{**g.__dict__, "view": view, **kw})  # type: ignore[arg-type]


def test_refused_suspect_block_is_critical_naming_the_members_not_open() -> None:
    """Unhealthy and refused: CRITICAL, saying the guard keeps it open and who is not open."""
    code, line = verdict(_facts(False, summary(_guard(reachable=True, refused=("srv2", "srv3")))))
    assert code == CRITICAL and "fleet guard keeps it open" in line and "srv2, srv3" in line
    parse(line)


def test_etcd_unreachable_is_a_warning_and_reachable_is_ok() -> None:
    """Healthy with etcd away: WARNING; with etcd answering: OK."""
    code, line = verdict(_facts(True, summary(_guard(reachable=False))))
    assert code == WARNING and "etcd unreachable" in line
    assert verdict(_facts(True, summary(_guard(reachable=True))))[0] == OK
    assert verdict(_facts(True, None))[0] == OK


def test_summary_counts_the_budget() -> None:
    """Two open of four with min_open 2: no suspect block left; slot holder and modes shown."""
    s = summary(_guard(reachable=True))
    assert (s["open"], s["min_open"], s["budget_left"], s["size"]) == (2, 2, 0, 4)
    assert s["slot_holders"] == ["srv3"] and s["slot_held"] is False
    assert [m["mode"] for m in s["members"]] == ["open", "block", "drain", "open"]


def test_metrics_members_by_mode_refused_reachable_slot() -> None:
    """The textfile carries members by mode and the refused, reachable, slot-held gauges."""
    g = _guard(reachable=True, refused=("srv2",), member="srv3")
    text = render(Snapshot(version="1", fleet=fleet_metrics(g))).decode()
    for line in ('sslvpn_heartbeat_fleet_members{mode="open"} 2.0',
                 'sslvpn_heartbeat_fleet_members{mode="drain"} 1.0',
                 "sslvpn_heartbeat_fleet_guard_refused 1.0", "sslvpn_heartbeat_fleet_reachable 1.0",
                 "sslvpn_heartbeat_fleet_slot_held 1.0"):
        assert line in text
    assert "fleet" not in render(Snapshot(version="1")).decode()


def test_without_fleet_no_etcd_client_is_imported() -> None:
    """The daemon, the CLI and a configuration without [fleet] never import etcd3gw."""
    code = ("import sys; import watcher.daemon, watcher.app, watcher.cli.commands, watcher.config;"
            "watcher.config.parse_config({});"
            "assert 'etcd3gw' not in sys.modules and 'watcher.fleet.etcd' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_agent_check_keeps_a_refused_server_in_rotation() -> None:
    """While the guard refuses a suspect block (chain open), HAProxy's agent check hears "up";
    with a permit (chain blocked) or without the guard it hears the service's health."""
    refused = _guard(reachable=True, refused=("srv2",))
    assert answer(Status(Health.DOWN, Mode.OPEN, None, "http: 503", fleet=refused)) == "up ready 100%\n"
    assert answer(Status(Health.DOWN, Mode.BLOCK, None, "http: 503", fleet=_guard())).startswith("down")
    assert answer(Status(Health.DOWN, Mode.BLOCK, None, "http: 503")).startswith("down")
