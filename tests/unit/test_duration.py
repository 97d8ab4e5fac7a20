"""The duration parser of ``block --for``: accepted forms, refusals, and its inverse."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from watcher.cli.duration import MAX_SECONDS, DurationError, format_duration, parse_duration


@pytest.mark.parametrize(("text", "seconds"), [
    ("90s", 90), ("30m", 1800), ("2h", 7200), ("1h30m", 5400), ("1d", 86400),
    ("1d2h3m4s", 93784), ("  45S ", 45), ("0h5m", 300),
])
def test_accepted_forms(text: str, seconds: int) -> None:
    """Each documented form parses to its number of seconds."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", [
    "", "   ", "90", "s", "1.5h", "-5m", "+5m", "5 m", "30m1h", "1h1h", "5w", "0s", "0h0m",
    "1h 30m", "1e3s", "367d", "\u0661\u0662s", "9999999999s",
])
def test_refused_forms_name_the_accepted_ones(text: str) -> None:
    """Anything else raises DurationError whose message names the problem or the accepted forms."""
    with pytest.raises(DurationError) as exc:
        parse_duration(text)
    msg = str(exc.value)
    assert "90s" in msg or "longer than 0s" in msg or "at most" in msg


parts = st.fixed_dictionaries({}, optional={u: st.integers(0, 99) for u in "dhms"})


@given(parts)
def test_parts_sum_to_seconds(p: dict[str, int]) -> None:
    """Any largest-first combination of parts parses to their weighted sum, or is refused only
    for being empty, zero or too long."""
    text = "".join(f"{p[u]}{u}" for u in "dhms" if u in p)
    want = p.get("d", 0) * 86400 + p.get("h", 0) * 3600 + p.get("m", 0) * 60 + p.get("s", 0)
    if text and 0 < want <= MAX_SECONDS:
        assert parse_duration(text) == want
    else:
        with pytest.raises(DurationError):
            parse_duration(text)


@given(st.integers(1, MAX_SECONDS))
def test_format_is_the_inverse_of_parse(n: int) -> None:
    """format_duration writes a form that parse_duration reads back to the same seconds."""
    assert parse_duration(format_duration(n)) == n


@given(st.text(max_size=20))
def test_never_raises_anything_but_duration_error(text: str) -> None:
    """Arbitrary text either parses to a positive bounded int or raises DurationError."""
    try:
        n = parse_duration(text)
    except DurationError:
        return
    assert 0 < n <= MAX_SECONDS


def test_format_rounds_up_partial_seconds() -> None:
    """A remaining 0.2 s shows as 1s (never 0s while time is left); nothing left is 0s."""
    assert format_duration(0.2) == "1s"
    assert format_duration(0) == "0s"
    assert format_duration(-3) == "0s"
    assert format_duration(5400) == "1h30m"
