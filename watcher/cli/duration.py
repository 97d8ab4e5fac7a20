"""Durations as an operator types them: ``90s``, ``30m``, ``2h``, ``1h30m``, ``1d``.

A pure parser: a sequence of ``<digits><unit>`` parts, units ``d``, ``h``, ``m``, ``s`` each at
most once and in that order, the whole strictly positive and at most :data:`MAX_SECONDS`.
"""

from __future__ import annotations

import re

__all__ = ["ACCEPTED_FORMS", "MAX_SECONDS", "DurationError", "format_duration", "parse_duration"]

MAX_SECONDS = 366 * 86400  # a year and a day: a block meant for longer is not a timed block
ACCEPTED_FORMS = "a number with a unit s, m, h or d, or several from largest to smallest " \
                 "(90s, 30m, 2h, 1h30m, 1d)"
_UNITS = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))
_PART = re.compile(r"([0-9]{1,9})([dhms])")


class DurationError(ValueError):
    """Text that is not a duration; the message names the text and the accepted forms."""


def parse_duration(text: str) -> int:
    """The whole number of seconds ``text`` means; DurationError for anything else."""
    s = text.strip().lower()
    pos, total, last = 0, 0, -1
    order = [u for u, _ in _UNITS]
    while pos < len(s):
        m = _PART.match(s, pos)
        if m is None:
            raise DurationError(f"{text!r} is not a duration: use {ACCEPTED_FORMS}")
        idx = order.index(m.group(2))
        if idx <= last:
            raise DurationError(f"{text!r}: units must each appear once, largest first "
                                f"(use {ACCEPTED_FORMS})")
        last = idx
        total += int(m.group(1)) * _UNITS[idx][1]
        pos = m.end()
    if last < 0:
        raise DurationError(f"empty duration: use {ACCEPTED_FORMS}")
    if total <= 0:
        raise DurationError(f"{text!r}: a duration must be longer than 0s")
    if total > MAX_SECONDS:
        raise DurationError(f"{text!r}: at most {MAX_SECONDS // 86400}d")
    return total


def format_duration(seconds: float) -> str:
    """A short human form of ``seconds`` (rounded up to a whole second): ``1h30m``, ``45s``, ``0s``."""
    rest = max(0, int(-(-seconds // 1)))
    parts = []
    for unit, size in _UNITS:
        n, rest = divmod(rest, size)
        if n:
            parts.append(f"{n}{unit}")
    return "".join(parts) or "0s"
