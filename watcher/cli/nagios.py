"""``check --nagios``: one line and an exit code as the Monitoring Plugins guidelines define them.

The verdict is a pure function of what the check found (:class:`Facts`)::

    SSLVPN-HEARTBEAT OK|WARNING|CRITICAL|UNKNOWN - text | 'time'=0.0012s;;;0 'established'=3;;;0

Exit codes are the plugin API's: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN. Precedence: the check
could not run (UNKNOWN) over the service down (CRITICAL) over an admin block or drain in force,
or no agent running to guard the failover (WARNING). The text never holds ``|`` or a line
break, so a consumer always finds the performance data after the one ``|``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from watcher.cli.duration import format_duration
from watcher.statedir import AdminRecord

__all__ = ["CRITICAL", "OK", "PREFIX", "UNKNOWN", "WARNING", "Facts", "unknown", "verdict"]

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
_WORD = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL", UNKNOWN: "UNKNOWN"}
PREFIX = "SSLVPN-HEARTBEAT"
_MAX_TEXT = 400  # the whole line stays far below the 4 KiB an NRPE answer may carry
_UNSAFE = re.compile(r"[|\x00-\x1f\x7f]+")


@dataclass(frozen=True)
class Facts:
    """What one run of the check found: the probe's answer, the admin block in force (None
    when none or expired), the established connections, and whether an agent runs."""

    service: str
    port: int
    healthy: bool
    reason: str  # the failing check's reason; "" when healthy
    probe_s: float
    established: int
    admin: AdminRecord | None
    daemon_running: bool
    now: float  # UNIX time, to show a timed block's time left
    fleet: Mapping[str, Any] | None = None  # the agent's fleet guard summary, with [fleet]


def _fleet_texts(f: Facts) -> tuple[str, str]:
    """(critical, warning) additions from the fleet guard: a refused suspect block, etcd away."""
    g = f.fleet or {}
    refused = ""
    if g.get("refused"):
        names = ", ".join(str(n) for n in g.get("not_open", ())) or "unknown"
        refused = f"fleet guard keeps it open (budget spent; not open: {names})"
    away = "etcd unreachable: the fleet guard decides alone" if g.get("reachable") is False else ""
    return refused, away


def _clean(text: str) -> str:
    out = _UNSAFE.sub(" ", text).strip()
    return out if len(out) <= _MAX_TEXT else out[:_MAX_TEXT - 3] + "..."


def _line(code: int, text: str, perf: str = "") -> str:
    line = f"{PREFIX} {_WORD[code]} - {_clean(text) or 'no detail'}"
    return f"{line} | {perf}" if perf else line


def _perfdata(f: Facts) -> str:
    # 'label'=value[UOM];[warn];[crit];[min];[max]: no thresholds, both are at least 0.
    return f"'time'={f.probe_s:.6f}s;;;0 'established'={f.established};;;0"


def _admin_text(rec: AdminRecord, now: float) -> str:
    kind = "admin drain (new connections refused)" if rec.drain else "admin block"
    extra = []
    if rec.reason:
        extra.append(f"reason: {rec.reason}")
    left = rec.remaining(now)
    if left is not None:
        extra.append(f"lifts in {format_duration(left)}")
    return kind + (f" ({', '.join(extra)})" if extra else "")


def verdict(f: Facts) -> tuple[int, str]:
    """The exit code and the one output line for ``f``."""
    conns = f"{f.established} established"
    refused, away = _fleet_texts(f)
    if not f.healthy:
        text = f"{f.service} down on port {f.port}: {f.reason}"
        text += "".join(f"; {t}" for t in (refused, away) if t)
        if f.admin is not None:
            text += f"; {_admin_text(f.admin, f.now)}"
        return CRITICAL, _line(CRITICAL, f"{text}; {conns}", _perfdata(f))
    warnings = []
    if f.admin is not None:
        warnings.append(_admin_text(f.admin, f.now))
    if not f.daemon_running:
        warnings.append("agent not running: no failover if the service fails")
    if away:
        warnings.append(away)
    if warnings:
        text = "; ".join(warnings) + f"; {f.service} healthy; {conns}"
        return WARNING, _line(WARNING, text, _perfdata(f))
    return OK, _line(OK, f"{f.service} healthy on port {f.port}, agent running; {conns}",
                     _perfdata(f))


def unknown(reason: str) -> tuple[int, str]:
    """The exit code (3) and line for a check that could not run, naming why."""
    return UNKNOWN, _line(UNKNOWN, reason)
