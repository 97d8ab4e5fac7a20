"""The catalogue: every ``event.action`` the agent logs, with its ECS categorization.

A member is its string, so ``log.warning(Event.INOTIFY_OVERFLOW)`` and ``log.warning("inotify-overflow")``
name the same event. docs/events.md describes each one.
"""

from __future__ import annotations

import enum

__all__ = ["Event"]


class Event(enum.StrEnum):
    """An event name with its ECS ``event.category`` and ``event.type`` lists and ``event.outcome``."""

    category: tuple[str, ...]
    type: tuple[str, ...]
    outcome: str

    def __new__(cls, value: str, category: str = "", type_: str = "", outcome: str = "") -> Event:
        """A member named ``value``; category and type are space-separated lists."""
        member = str.__new__(cls, value)
        member._value_, member.category, member.type = value, tuple(category.split()), tuple(type_.split())
        member.outcome = outcome
        return member

    AGENT_START = "agent-start", "process", "start", "success"
    AGENT_READY = "agent-ready", "process", "info", "success"
    AGENT_STOP = "agent-stop", "process", "end", "success"
    CONFIG_RELOAD = "config-reload", "configuration", "change", "success"
    CONFIG_INVALID = "config-invalid", "configuration", "info", "failure"
    SERVICE_INITIAL_UP = "service-initial-up", "network", "start", "success"
    SERVICE_INITIAL_DOWN = "service-initial-down", "network", "end", "failure"
    SERVICE_UP = "service-up", "network", "start", "success"
    SERVICE_DOWN = "service-down", "network", "end", "failure"
    PROBE_FAILED = "probe-failed", "network", "info", "failure"
    FIREWALL_BLOCK = "firewall-block", "configuration network", "change denied", "success"
    FIREWALL_DRAIN = "firewall-drain", "configuration network", "change denied", "success"
    FIREWALL_UNBLOCK = "firewall-unblock", "configuration network", "change allowed", "success"
    FIREWALL_REPAIR = "firewall-repair", "configuration", "change", "success"
    FIREWALL_BACKEND_FALLBACK = "firewall-backend-fallback", "configuration", "info", "failure"
    FIREWALL_KEEP = "firewall-keep", "configuration", "info", "success"
    FIREWALL_REMOVE = "firewall-remove", "configuration", "deletion", "success"
    ADMIN_BLOCK = "admin-block", "configuration", "change", "success"
    ADMIN_UNBLOCK = "admin-unblock", "configuration", "change", "success"
    CONNECTIONS_RESET = "connections-reset", "network", "connection end", "success"
    CONNECTIONS_RESET_FAILED = "connections-reset-failed", "network", "connection info", "failure"
    DRAIN_COMPLETE = "drain-complete", "network", "info", "success"
    DRAIN_TIMEOUT = "drain-timeout", "network", "info", "failure"
    APPLY_FAILED = "apply-failed", "configuration", "change", "failure"
    STATE_WRITE_FAILED = "state-write-failed", "file", "change", "failure"
    IPV6_UNAVAILABLE = "ipv6-unavailable", "network", "info", "failure"
    IPV6_READ_FAILED = "ipv6-read-failed", "network", "info", "failure"
    PROC_CONNECTOR_UNAVAILABLE = "proc-connector-unavailable", "host", "info", "failure"
    PROC_CONNECTOR_OVERRUN = "proc-connector-overrun", "host", "info", "failure"
    PROC_CONNECTOR_ERROR = "proc-connector-error", "host", "info", "failure"
    PROC_CONNECTOR_BAD_MESSAGE = "proc-connector-bad-message", "host", "info", "failure"
    SOCK_DIAG_DESTROY_UNAVAILABLE = "sock-diag-destroy-unavailable", "network", "info", "failure"
    SOCK_DIAG_OVERRUN = "sock-diag-overrun", "network", "info", "failure"
    SOCK_DIAG_ERROR = "sock-diag-error", "network", "info", "failure"
    SOCK_DIAG_BAD_MESSAGE = "sock-diag-bad-message", "network", "info", "failure"
    PIDFILE_WATCH_FAILED = "pidfile-watch-failed", "file", "info", "failure"
    PIDFILE_DIRECTORY_MISSING = "pidfile-directory-missing", "file", "info", "failure"
    INOTIFY_READ_FAILED = "inotify-read-failed", "host", "info", "failure"
    INOTIFY_OVERFLOW = "inotify-overflow", "host", "info", "failure"
    PIDFD_OPEN_FAILED = "pidfd-open-failed", "process", "info", "failure"
    INTERNAL_ERROR = "internal-error", "process", "info", "failure"
    SINK_FAILED = "sink-failed", "host", "info", "failure"
    LOG_DROPPED = "log-dropped", "host", "info", "failure"
    SINK_SKIPPED = "sink-skipped", "configuration", "info", "success"
    METRICS_WRITE_FAILED = "metrics-write-failed", "file", "change", "failure"
    METRICS_WRITE_RECOVERED = "metrics-write-recovered", "file", "change", "success"
    AGENT_CHECK_LISTEN = "agent-check-listen", "network", "start", "success"
    AGENT_CHECK_FAILED = "agent-check-failed", "network", "start", "failure"
    FLEET_GUARD_GRANTED = "fleet-guard-granted", "configuration network", "info allowed", "success"
    FLEET_GUARD_REFUSED = "fleet-guard-refused", "configuration network", "info denied", "failure"
    FLEET_UNREACHABLE = "fleet-unreachable", "network", "connection", "failure"
    FLEET_REACHABLE = "fleet-reachable", "network", "connection", "success"
    FLEET_ERROR = "fleet-error", "network", "connection", "failure"
    FLEET_SLOT_TAKEN = "fleet-slot-taken", "configuration", "change", "success"
    FLEET_SLOT_FORCED = "fleet-slot-forced", "configuration", "change", "success"
