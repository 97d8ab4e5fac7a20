"""The drain-and-wait loop: shows each change, ends at 0 or at the deadline, never spins."""

from __future__ import annotations

import io
import itertools
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from watcher.cli.drain import JsonProgress, LiveLine, wait_drained


class _Clock:
    def __init__(self) -> None:
        self.t = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.t += s


def _run(counts: list[int], timeout: float | None, interval: float = 0.2
         ) -> tuple[tuple[bool, int], list[tuple[int, float]], _Clock]:
    clock = _Clock()
    it = iter(counts)
    seen: list[tuple[int, float]] = []
    res = wait_drained(lambda: next(it), lambda n, e: seen.append((n, e)), timeout=timeout,
                       interval=interval, clock=clock, sleep=clock.sleep)
    return res, seen, clock


def test_reports_each_change_once_and_ends_at_zero() -> None:
    """3,3,2,2,1,0: shown as 3,2,1,0 with their elapsed times; drained."""
    res, seen, clock = _run([3, 3, 2, 2, 1, 0], timeout=None)
    assert res == (True, 0)
    assert [n for n, _ in seen] == [3, 2, 1, 0]
    assert seen[-1][1] == pytest.approx(1.0)
    assert clock.sleeps == [0.2] * 5


def test_already_drained_returns_at_once() -> None:
    """No connection at the first count: drained, shown once, no sleep."""
    res, seen, clock = _run([0], timeout=5)
    assert res == (True, 0) and seen == [(0, 0.0)] and clock.sleeps == []


def test_timeout_returns_the_last_count() -> None:
    """Connections that never go: False with the count, after the timeout and not much later."""
    res, seen, clock = _run([2] * 1000, timeout=1.0)
    assert res == (False, 2)
    assert seen == [(2, 0.0)]
    assert clock.t - 100.0 == pytest.approx(1.0)


@given(st.lists(st.integers(0, 5), min_size=1, max_size=50),
       st.floats(0.05, 0.5), st.one_of(st.none(), st.floats(0, 20)))
def test_never_spins_and_respects_the_deadline(counts: list[int], interval: float,
                                               timeout: float | None) -> None:
    """Every pause is at most the interval and the only zero-length pause is the one at the
    deadline; it stops at the first 0 or once the deadline passed."""
    counts = [*counts, 0]
    res, seen, clock = _run(counts, timeout, interval)
    assert all(0 <= s <= interval + 1e-9 for s in clock.sleeps)
    drained, last = res
    if drained:
        assert last == 0 and seen[-1][0] == 0
        assert len(clock.sleeps) == counts.index(0)
    else:
        assert timeout is not None and clock.t - 100.0 >= timeout - 1e-9
    # each change shown, never twice in a row
    assert all(a[0] != b[0] for a, b in itertools.pairwise(seen))


def test_json_progress_is_one_object_per_line() -> None:
    """JsonProgress writes one JSON object with port, count and elapsed seconds per call."""
    out = io.StringIO()
    p = JsonProgress(out, 8080)
    p(3, 0.0)
    p(0, 1.23456)
    lines = out.getvalue().splitlines()
    assert [json.loads(ln) for ln in lines] == [
        {"port": 8080, "established": 3, "elapsed_s": 0.0},
        {"port": 8080, "established": 0, "elapsed_s": 1.235},
    ]


def test_live_line_rewrites_in_place_and_ends_with_a_newline() -> None:
    """LiveLine returns the cursor and clears the line each time; 0 ends the line."""
    out = io.StringIO()
    p = LiveLine(out, 8080, 30.0)
    p(2, 0.0)
    p(1, 0.4)
    assert "\n" not in out.getvalue()
    p(0, 0.8)
    text = out.getvalue()
    assert text.count("\r\x1b[K") == 3 and text.endswith("0 established connections (0.8s of 30s)\n")
