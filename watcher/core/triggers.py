"""Frozen values that flow from the event sources to the daemon's decision step."""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["Evidence", "Source", "Trigger"]


class Source(enum.StrEnum):
    """Which kernel facility (or other origin) produced a trigger; logged as ``trigger``."""

    INOTIFY = "inotify"
    PIDFD = "pidfd"
    PROC_CONNECTOR = "proc_connector"
    SOCK_DIAG = "sock_diag"
    TIMER = "timer"
    ADMIN = "admin"
    STARTUP = "startup"
    SIGNAL = "signal"


class Evidence(enum.StrEnum):
    """What a trigger proves by itself, before any probe.

    ``DEATH`` is kernel proof that the service is gone (the tracked process exited, the
    listener was destroyed): the health machine confirms DOWN at once instead of waiting
    for ``probe.fall`` failures. ``HINT`` only asks for a probe.
    """

    HINT = "hint"
    DEATH = "death"


@dataclass(frozen=True)
class Trigger:
    """One kernel event (or timer tick) asking for a verification probe.

    ``monotonic_ns`` is ``time.monotonic_ns()`` taken as soon as the event was read from the
    kernel: the start of the latency the agent reports for the transition it causes.
    """

    source: Source
    detail: str
    monotonic_ns: int
    evidence: Evidence = Evidence.HINT
