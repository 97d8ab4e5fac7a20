"""The drain's idle decision: which established connections carry no request."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from watcher.core.sessions import DEFAULT_QUIET_MS, TcpView, idle

Q = DEFAULT_QUIET_MS


def view(rq: int = 0, wq: int = 0, sent: int | None = Q, recv: int | None = Q + 40,
         notsent: int | None = 0, retrans: int | None = 0, rtt_us: int | None = 100) -> TcpView:
    """A connection as sock_diag shows it; by default an answered, quiet, acknowledged one."""
    return TcpView(rq, wq, sent, recv, notsent, retrans, rtt_us)


def test_answered_quiet_connection_is_idle() -> None:
    """Nothing queued, the service wrote after it last read, quiet for the bound: idle."""
    assert idle(view(), Q)


def test_request_read_and_being_worked_on_is_never_idle() -> None:
    """The service read a request (received after it last sent): busy however long it takes."""
    assert not idle(view(sent=60_000, recv=59_000), Q)


def test_unread_request_is_busy() -> None:
    """Bytes the service has not read: busy."""
    assert not idle(view(rq=17, sent=1000, recv=2000), Q)


def test_unacknowledged_answer_counts_only_once_all_of_it_is_on_the_wire() -> None:
    """Unacknowledged bytes (the gateway's delayed ACK): idle only with nothing unsent, nothing
    retransmitting, and four round trips since it left; unknown counters: busy."""
    assert idle(view(wq=164, sent=Q, rtt_us=100), Q)
    assert not idle(view(wq=164, notsent=10), Q)
    assert not idle(view(wq=164, retrans=1), Q)
    assert not idle(view(wq=164, sent=Q, rtt_us=Q * 1000), Q)
    assert not idle(view(wq=164, notsent=None), Q)


def test_answer_written_within_the_bound_is_busy() -> None:
    """Data within the bound: busy."""
    assert not idle(view(sent=Q - 1, recv=5000), Q)


def test_answer_in_the_same_tick_counts_as_answered() -> None:
    """Request and answer in the same kernel tick (a fast service): idle once quiet."""
    assert idle(view(sent=Q, recv=Q), Q)
    assert not idle(view(sent=Q - 1, recv=Q - 1), Q)


def test_missing_times_are_busy() -> None:
    """No tcp_info from the kernel: busy (nothing says the request was answered)."""
    assert not idle(view(sent=None), Q)
    assert not idle(view(recv=None), Q)


@given(st.integers(0, 1 << 20), st.integers(0, 1 << 20), st.integers(0, 10**6),
       st.integers(0, 10**6), st.integers(0, 1 << 20), st.integers(0, 3),
       st.integers(0, 10**7), st.integers(0, 60_000))
def test_idle_implies_every_signal(rq: int, wq: int, sent: int, recv: int, notsent: int,
                                   retrans: int, rtt: int, quiet: int) -> None:
    """Whatever the numbers, idle means: nothing unread, answered last, quiet for the bound,
    and any unacknowledged data all sent, none retransmitting, four round trips old."""
    if idle(TcpView(rq, wq, sent, recv, notsent, retrans, rtt), quiet):
        assert rq == 0 and sent <= recv and sent >= quiet
        assert wq == 0 or (notsent == 0 and retrans == 0 and sent * 1000 >= 4 * rtt)
