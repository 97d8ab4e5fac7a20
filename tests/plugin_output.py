"""A parser of monitoring-plugin output, written from the Monitoring Plugins guidelines.

Only what the guidelines define: the first line is the service output, optionally followed by
``|`` and performance data, a space-separated list of ``'label'=value[UOM];[warn];[crit];[min];[max]``
where the label may be quoted with single quotes (two single quotes stand for one), must not
hold ``=`` (and, unquoted, no space or quote), value, min and max are numbers of the class
``[-0-9.]``, warn and crit are ranges (``[@][start:][end]``, ``~`` for minus infinity), the UOM
is none, ``s``/``ms``/``us``, ``%``, ``B``/``KB``/``MB``/``TB`` or ``c``, and trailing empty
fields may be left out. :func:`parse` raises ValueError naming the first thing that does not
follow them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Perf", "PluginOutput", "parse"]

_NUM = r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_NUMBER = re.compile(rf"^{_NUM}$")
_RANGE = re.compile(rf"^@?(?:(?:{_NUM}|~):)?(?:{_NUM})?$")
_UOMS = ("", "s", "ms", "us", "%", "B", "KB", "MB", "TB", "c")
_VALUE_UOM = re.compile(rf"^({_NUM})([a-zA-Z%]*)$")


@dataclass(frozen=True)
class Perf:
    """One performance datum."""

    label: str
    value: float
    uom: str
    warn: str
    crit: str
    min: str
    max: str


@dataclass(frozen=True)
class PluginOutput:
    """A plugin's first line split into its text and its performance data."""

    text: str
    perf: tuple[Perf, ...]


def _split_perf(data: str) -> list[tuple[str, str]]:
    """(label, rest) pairs; labels may be single-quoted with '' standing for '."""
    items, i, n = [], 0, len(data)
    while i < n:
        if data[i] == " ":
            i += 1
            continue
        if data[i] == "'":
            j, label = i + 1, []
            while True:
                if j >= n:
                    raise ValueError(f"unterminated quoted label at {i}: {data!r}")
                if data[j] == "'":
                    if j + 1 < n and data[j + 1] == "'":
                        label.append("'")
                        j += 2
                        continue
                    break
                label.append(data[j])
                j += 1
            name, j = "".join(label), j + 1
        else:
            j = i
            while j < n and data[j] not in "= '":
                j += 1
            name = data[i:j]
        if j >= n or data[j] != "=":
            raise ValueError(f"label {name!r} is not followed by '=': {data!r}")
        if not name or "=" in name:
            raise ValueError(f"bad label {name!r}")
        k = data.find(" ", j + 1)
        k = n if k < 0 else k
        items.append((name, data[j + 1:k]))
        i = k
    return items


def _perf(label: str, rest: str) -> Perf:
    fields = rest.split(";")
    if len(fields) > 5:
        raise ValueError(f"{label}: more than 5 fields in {rest!r}")
    fields += [""] * (5 - len(fields))
    m = _VALUE_UOM.match(fields[0])
    if m is None:
        raise ValueError(f"{label}: value {fields[0]!r} is not a number with an optional unit")
    if m.group(2) not in _UOMS:
        raise ValueError(f"{label}: unit {m.group(2)!r} is not one the guidelines define")
    for name, text in (("warn", fields[1]), ("crit", fields[2])):
        if text and not _RANGE.match(text):
            raise ValueError(f"{label}: {name} {text!r} is not a range")
    for name, text in (("min", fields[3]), ("max", fields[4])):
        if text and not _NUMBER.match(text):
            raise ValueError(f"{label}: {name} {text!r} is not a number")
    return Perf(label, float(m.group(1)), m.group(2), *fields[1:])


def parse(output: str) -> PluginOutput:
    """Parse a plugin's output (its first line; further lines are long text)."""
    first = output.split("\n", 1)[0]
    if not first.strip():
        raise ValueError("empty first line")
    text, sep, data = first.partition("|")
    if sep and "|" in data:
        raise ValueError(f"more than one '|' in the first line: {first!r}")
    perf = tuple(_perf(label, rest) for label, rest in _split_perf(data.strip())) if sep else ()
    return PluginOutput(text.strip(), perf)
