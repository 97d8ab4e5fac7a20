"""Errors of the agent, each carrying the process exit code the CLI maps it to."""

from __future__ import annotations

__all__ = [
    "EX_CONFIG",
    "EX_OK",
    "EX_UNAVAILABLE",
    "EX_UNHEALTHY",
    "EX_USAGE",
    "AgentError",
    "ConfigError",
    "FacilityMissing",
]

EX_OK = 0
EX_UNHEALTHY = 1
EX_USAGE = 2
EX_UNAVAILABLE = 69  # sysexits EX_UNAVAILABLE: a needed facility is missing
EX_CONFIG = 78  # sysexits EX_CONFIG: bad configuration


class AgentError(Exception):
    """Base class: an error the CLI reports in one line and maps to ``exit_code``."""

    exit_code = EX_UNAVAILABLE


class ConfigError(AgentError):
    """The configuration is unreadable or invalid; the message names the key."""

    exit_code = EX_CONFIG

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}" if key else problem)


class FacilityMissing(AgentError):
    """Something the agent needs is absent: iptables, CAP_NET_ADMIN, a kernel feature."""

    exit_code = EX_UNAVAILABLE
