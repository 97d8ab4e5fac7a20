"""The drain's idle decision: which established connections carry no request."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from watcher.core.sessions import DEFAULT_QUIET_MS, idle

Q = DEFAULT_QUIET_MS


def test_answered_quiet_connection_is_idle() -> None:
    """Nothing queued, the service wrote after it last read, quiet for the bound: idle."""
    assert idle(0, 0, Q, Q + 40, Q)


def test_request_read_and_being_worked_on_is_never_idle() -> None:
    """The service read a request (received after it last sent): busy however long it takes."""
    assert not idle(0, 0, 60_000, 59_000, Q)


def test_unread_request_or_unacknowledged_answer_is_busy() -> None:
    """Bytes waiting in either direction: busy."""
    assert not idle(17, 0, 1000, 2000, Q)
    assert not idle(0, 4096, 1000, 2000, Q)


def test_answer_written_within_the_bound_is_busy() -> None:
    """An answer still being written in parts (last write within the bound): busy."""
    assert not idle(0, 0, Q - 1, 5000, Q)


def test_answer_in_the_same_tick_counts_as_answered() -> None:
    """Request and answer in the same kernel tick (a fast service): idle once quiet."""
    assert idle(0, 0, Q, Q, Q)
    assert not idle(0, 0, Q - 1, Q - 1, Q)


def test_missing_times_are_busy() -> None:
    """No tcp_info from the kernel: busy (nothing says the request was answered)."""
    assert not idle(0, 0, None, 500, Q)
    assert not idle(0, 0, 500, None, Q)


@given(st.integers(0, 1 << 20), st.integers(0, 1 << 20), st.integers(0, 10**6),
       st.integers(0, 10**6), st.integers(0, 60_000))
def test_idle_implies_every_signal(rq: int, wq: int, sent: int, recv: int, quiet: int) -> None:
    """Whatever the numbers, idle means: both queues empty, answered last, quiet for the bound."""
    if idle(rq, wq, sent, recv, quiet):
        assert rq == 0 and wq == 0 and sent <= recv and sent >= quiet
