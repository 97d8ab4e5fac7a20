"""check --nagios's verdict: status word, exit code and a line that follows the plugin grammar."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.plugin_output import parse
from watcher.cli.nagios import CRITICAL, OK, UNKNOWN, WARNING, Facts, unknown, verdict
from watcher.statedir import AdminRecord

_HEAD = re.compile(r"^SSLVPN-HEARTBEAT (OK|WARNING|CRITICAL|UNKNOWN) - \S")
_CODE = {"OK": OK, "WARNING": WARNING, "CRITICAL": CRITICAL, "UNKNOWN": UNKNOWN}


def _facts(**kw: object) -> Facts:
    base: dict[str, object] = dict(service="novell-sslvpn", port=8080, healthy=True, reason="",
                                   probe_s=0.0012, established=3, admin=None,
                                   daemon_running=True, now=1000.0)
    base.update(kw)
    return Facts(**base)  # type: ignore[arg-type]


def _check(code: int, line: str) -> None:
    m = _HEAD.match(line)
    assert m is not None, line
    assert _CODE[m.group(1)] == code
    assert "\n" not in line
    parse(line)


def test_healthy_with_agent_is_ok_with_time_and_established_perfdata() -> None:
    """Healthy service, agent running, no block: OK, exit 0, perfdata time in s and established."""
    code, line = verdict(_facts())
    _check(code, line)
    assert code == OK
    perf = {p.label: p for p in parse(line).perf}
    assert perf["time"].uom == "s" and perf["time"].value == pytest.approx(0.0012)
    assert perf["established"].value == 3 and perf["established"].uom == ""


@pytest.mark.parametrize("drain", [False, True])
def test_admin_block_or_drain_is_warning_with_reason_and_time_left(drain: bool) -> None:
    """An admin block or drain in force is WARNING; the text names it, its reason, time left."""
    rec = AdminRecord(drain, "kernel upgrade", 0.0, 1000.0 + 1800)
    code, line = verdict(_facts(admin=rec))
    _check(code, line)
    assert code == WARNING
    assert ("drain" in line) == drain and "kernel upgrade" in line and "30m" in line


def test_no_agent_running_is_warning() -> None:
    """A healthy service with no agent to guard it is WARNING, not OK."""
    code, line = verdict(_facts(daemon_running=False))
    _check(code, line)
    assert code == WARNING and "agent not running" in line


def test_service_down_is_critical_even_under_a_block() -> None:
    """A down service is CRITICAL, naming the failing reason, also while an admin block holds."""
    code, line = verdict(_facts(healthy=False, reason="connect: Connection refused",
                                admin=AdminRecord(False, "", 0.0)))
    _check(code, line)
    assert code == CRITICAL and "Connection refused" in line and "admin block" in line


def test_unknown_is_exit_3_with_the_reason() -> None:
    """A check that could not run is UNKNOWN (3) and says why."""
    code, line = unknown("configuration error: probe.rise: must be >= 1")
    _check(code, line)
    assert code == UNKNOWN and "probe.rise" in line and "|" not in line


@given(st.text(max_size=600), st.text(max_size=60), st.booleans(), st.booleans(),
       st.integers(0, 10**6), st.floats(0, 100, allow_nan=False))
def test_any_text_keeps_one_parseable_line(reason: str, service: str, healthy: bool,
                                           daemon: bool, est: int, probe_s: float) -> None:
    """Whatever the reasons and names hold (pipes, newlines, control bytes), the output is one
    line, the status word matches the exit code and the perfdata parses."""
    admin = AdminRecord(True, reason, 0.0, 2000.0) if daemon else None
    code, line = verdict(_facts(healthy=healthy, reason=reason, service=service or "x",
                                daemon_running=daemon, established=est, probe_s=probe_s,
                                admin=admin))
    _check(code, line)
    assert line.count("|") == 1
    assert len(line.encode()) < 4096
    assert {p.label for p in parse(line).perf} == {"time", "established"}
    code, line = unknown(reason)
    _check(code, line)


@pytest.mark.parametrize("bad", [
    "", "X OK - a | b", "X OK - a | 'time=1s", "X OK - a | time=1x", "X OK - a | time=abc",
    "X OK - a | time=1s;;;zero", "X OK - a | time=1s;1;2;3;4;5", "X OK - a | =1",
    "X OK - a | t=1 | u=2", "X OK - a | time=1s;a:b",
])
def test_grammar_parser_refuses_what_the_guidelines_do_not_allow(bad: str) -> None:
    """The test's own parser is strict: each malformed first line raises ValueError."""
    with pytest.raises(ValueError):
        parse(bad)


def test_grammar_parser_reads_quoted_labels_and_ranges() -> None:
    """Quoted labels (with '' for a quote) and warn/crit ranges parse as the guidelines say."""
    out = parse("DISK OK - free | '/ it''s'=382MB;@10:20;~:30;0;1000 load=0.5")
    assert out.text == "DISK OK - free"
    assert [(p.label, p.value, p.uom, p.warn, p.crit, p.min, p.max) for p in out.perf] == [
        ("/ it's", 382.0, "MB", "@10:20", "~:30", "0", "1000"),
        ("load", 0.5, "", "", "", "", ""),
    ]
