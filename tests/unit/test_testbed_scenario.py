"""The shared back-end outage's bookkeeping: windows of requests and samples of blocked servers."""

from __future__ import annotations

import pytest

from tests.testbed.load import Record
from tests.testbed.scenario import BackendOutage, BackendOutageOutcome


def _rec(i: int, t: float, status: int) -> Record:
    return Record(i, t, t, 1.0, status, "server1" if status == 200 else "", "")


def test_backend_outage_refuses_an_unknown_way_to_fail() -> None:
    """how is "kill" or "hang"; anything else is a ValueError naming it."""
    with pytest.raises(ValueError, match="teleport"):
        BackendOutage(how="teleport")
    assert BackendOutage().load_bound_s > BackendOutage().down_s + BackendOutage().settle_timeout_s


def test_outcome_windows_split_requests_and_samples_at_the_marks() -> None:
    """before/during/after split at down_at and up_at; the tail is the outage's last part;
    max_blocked_during and blocked_at_up read only the samples taken while it was down."""
    recs = tuple(_rec(i, t, s) for i, (t, s) in enumerate(
        [(0.5, 200), (1.0, 200), (1.5, 503), (2.5, 0), (3.5, 0), (4.0, 200), (5.0, 200)]))
    samples = ((0.9, frozenset()), (1.6, frozenset({"a"})), (2.6, frozenset({"a", "b", "c"})),
               (3.6, frozenset({"a", "b"})), (4.1, frozenset({"a", "b", "c", "d"})))
    o = BackendOutageOutcome(recs, 1.0, 4.0, 5.5, samples, 0.7)
    assert [r.t for r in o.before] == [0.5]
    assert [r.t for r in o.during] == [1.0, 1.5, 2.5, 3.5]
    assert [r.t for r in o.after] == [4.0, 5.0]
    assert [r.t for r in o.during_tail(0.5)] == [2.5, 3.5]
    assert o.max_blocked_during == 3  # the 4 at 4.1 is after the back end returned
    assert o.blocked_at_up == {"a", "b"}


def test_outcome_windows_of_an_extra_load_use_its_own_records() -> None:
    """window() and during_tail() with a path read that extra load's records, not the main one."""
    main = (_rec(0, 2.0, 200),)
    login = tuple(_rec(i, t, 503) for i, t in enumerate([0.5, 2.0, 3.0, 4.5]))
    o = BackendOutageOutcome(main, 1.0, 4.0, 5.0, (), 0.5, {"/login": login})
    assert [r.t for r in o.window(1.0, 4.0, "/login")] == [2.0, 3.0]
    assert [r.t for r in o.during_tail(0.5, "/login")] == [3.0]
    assert [r.t for r in o.during] == [2.0]
    with pytest.raises(KeyError):
        o.window(0.0, 1.0, "/portal")


def test_the_tail_leaves_out_a_request_answered_after_the_back_end_came_back() -> None:
    """A request sent in the tail but answered after up_at (the returned back end answered it)
    is not counted as what users got during the outage; one answered just before is."""
    late = Record(0, 3.8, 3.8, 300.0, 200, "server4", "")  # answered at 4.1
    early = Record(1, 3.8, 3.8, 150.0, 503, "", "")  # answered at 3.95
    o = BackendOutageOutcome((late, early), 1.0, 4.0, 5.0, (), 0.5)
    assert [r.i for r in o.during_tail(0.5)] == [1]
    assert [r.i for r in o.during] == [0, 1]
