"""``block --drain --wait``: wait until no established connection to the port remains.

:func:`wait_drained` is the loop, with the counter, the clock and the sleep passed in: one
count every ``interval`` seconds (a sock_diag dump, never a busy loop), the progress shown on
each change, a deadline. The two displays are a live line for a terminal and one JSON object
per line for everything else.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import TextIO

__all__ = ["DEFAULT_INTERVAL_S", "JsonProgress", "LiveLine", "wait_drained"]

DEFAULT_INTERVAL_S = 0.2


def wait_drained(count: Callable[[], int], show: Callable[[int, float], None], *,
                 timeout: float | None, interval: float = DEFAULT_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> tuple[bool, int]:
    """Count until the count is 0 (True) or ``timeout`` seconds passed (False, None: never);
    ``show(count, elapsed_s)`` gets the first count and every change. Returns (drained, last count)."""
    if interval <= 0:
        raise ValueError("interval must be positive")
    start = clock()
    last: int | None = None
    while True:
        n = count()
        elapsed = clock() - start
        if n != last:
            show(n, elapsed)
            last = n
        if n == 0:
            return True, 0
        if timeout is not None and elapsed >= timeout:
            return False, n
        pause = interval if timeout is None else min(interval, max(0.0, timeout - elapsed))
        sleep(pause)


class LiveLine:
    """The progress as one line rewritten in place (a terminal)."""

    def __init__(self, out: TextIO, port: int, timeout: float | None) -> None:
        self._out = out
        self._port = port
        self._timeout = timeout

    def __call__(self, n: int, elapsed: float) -> None:
        """Rewrite the line with the count ``n`` after ``elapsed`` seconds."""
        bound = f" of {self._timeout:g}s" if self._timeout is not None else ""
        self._out.write(f"\r\x1b[Kdraining port {self._port}: {n} established "
                        f"connection{'' if n == 1 else 's'} ({elapsed:.1f}s{bound})")
        if n == 0:
            self._out.write("\n")
        self._out.flush()

    def end(self) -> None:
        """End the line (after a timeout or an interruption), so the shell prompt starts clean."""
        self._out.write("\n")
        self._out.flush()


class JsonProgress:
    """The progress as one JSON object per change: port, established count, elapsed seconds."""

    def __init__(self, out: TextIO, port: int) -> None:
        self._out = out
        self._port = port

    def __call__(self, n: int, elapsed: float) -> None:
        """Write one line for the count ``n`` after ``elapsed`` seconds."""
        self._out.write(json.dumps({"port": self._port, "established": n,
                                    "elapsed_s": round(elapsed, 3)}, sort_keys=True) + "\n")
        self._out.flush()

    def end(self) -> None:
        """Nothing to close: every line is complete."""
