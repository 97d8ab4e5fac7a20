"""Errors of the agent, each carrying the process exit code the CLI maps it to."""

from __future__ import annotations

from rules.errors import (
    BackendUnavailable,
    ForeignChain,
    LockContention,
    ReadBackMismatch,
    TransactionFailed,
)

__all__ = [
    "EX_CONFIG",
    "EX_OK",
    "EX_TEMPFAIL",
    "EX_UNAVAILABLE",
    "EX_UNHEALTHY",
    "EX_USAGE",
    "AgentError",
    "AlreadyRunning",
    "ConfigError",
    "FacilityMissing",
    "exit_code_of",
    "is_transient",
]

EX_OK = 0
EX_UNHEALTHY = 1
EX_USAGE = 2
EX_UNAVAILABLE = 69  # sysexits EX_UNAVAILABLE: a needed facility is missing
EX_TEMPFAIL = 75  # sysexits EX_TEMPFAIL: a transient failure (lock, refusal), or another agent
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


class AlreadyRunning(AgentError):
    """Another ``run`` holds the state directory (and so the chain): this one must not start."""

    exit_code = EX_TEMPFAIL


def exit_code_of(exc: BaseException) -> int:
    """The exit code for ``exc``: the one place errors become exit codes."""
    if isinstance(exc, AgentError):
        return exc.exit_code
    if isinstance(exc, BackendUnavailable):
        return EX_UNAVAILABLE
    if isinstance(exc, ForeignChain):
        return EX_CONFIG  # the configured chain name is someone else's
    return EX_TEMPFAIL


def is_transient(exc: BaseException) -> bool:
    """True when trying the same firewall change again later can succeed."""
    return isinstance(exc, LockContention | TransactionFailed | ReadBackMismatch
                      | BackendUnavailable)
