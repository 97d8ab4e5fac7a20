"""The daemon's coalescing rule: which of two pending triggers a round is run (and logged) for."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from watcher.core.control import outranks as _outranks
from watcher.core.triggers import Evidence, Source, Trigger

triggers = st.builds(Trigger, st.sampled_from(list(Source)), st.text(max_size=5),
                     st.integers(0, 10**12), st.sampled_from(list(Evidence)))


def test_a_death_landing_on_a_pending_tick_takes_its_place() -> None:
    """A pidfd exit coalesced into a pending safety-net tick is what the round names, and the
    latency runs from the exit, not from the earlier tick."""
    tick = Trigger(Source.TIMER, "safety-net", 100)
    death = Trigger(Source.PIDFD, "exit pid 7", 200, Evidence.DEATH)
    assert _outranks(death, tick)
    assert not _outranks(tick, death)


def test_among_hints_the_earliest_stays() -> None:
    """Two hints: the earlier one is kept (its time starts the latency)."""
    first = Trigger(Source.INOTIFY, "modify", 100)
    later = Trigger(Source.TIMER, "safety-net", 200)
    assert not _outranks(later, first)
    assert _outranks(first, later)


@given(triggers, triggers)
def test_the_kept_trigger_is_the_strongest_then_the_earliest(a: Trigger, b: Trigger) -> None:
    """Whatever the order of arrival, the pending trigger ends as the DEATH one if any, and the
    earliest among the strongest."""
    def kept(first: Trigger, second: Trigger) -> Trigger:
        return second if _outranks(second, first) else first

    for winner in (kept(a, b), kept(b, a)):
        strongest = [t for t in (a, b) if t.evidence is Evidence.DEATH] or [a, b]
        assert winner.evidence is strongest[0].evidence
        assert winner.monotonic_ns == min(t.monotonic_ns for t in strongest)
