"""What the event-source tests share: a recorder shaped like a structlog logger, and an
asyncio wait on a condition with a deadline."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

__all__ = ["Log", "until"]


class Log:
    """Records every call ``log.LEVEL(event, **fields)`` as ``(level, event, fields)``."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        return lambda event, **kw: self.lines.append((level, event, kw))

    def events(self, level: str | None = None) -> list[str]:
        """The events recorded (at ``level`` only, when given)."""
        return [e for lv, e, _ in self.lines if level is None or lv == level]


async def until(cond: Callable[[], Any], what: str, timeout: float = 5.0) -> Any:
    """cond()'s first truthy value, polled on the loop; AssertionError naming ``what`` after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        await asyncio.sleep(0.001)
    return value
