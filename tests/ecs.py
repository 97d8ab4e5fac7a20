"""Checks an event against ECS 8.11: official field names and types, or documented own fields.

The official list is tests/unit/data/ecs/fields-8.11.0.csv. The agent's own fields live under
``sslvpn_heartbeat.`` and each has a row in docs/events.md whose type column is an ECS type.
"""

from __future__ import annotations

import csv
import functools
import re
from pathlib import Path
from typing import Any

from watcher.core.catalogue import Event
from watcher.outputs.logpipeline import NAMESPACE

__all__ = ["ECS_CSV", "EVENTS_DOC", "check_event", "custom_fields", "ecs_fields"]

REPO = Path(__file__).resolve().parents[1]
ECS_CSV = REPO / "tests" / "unit" / "data" / "ecs" / "fields-8.11.0.csv"
EVENTS_DOC = REPO / "docs" / "events.md"

_TEXT = {"keyword", "constant_keyword", "wildcard", "match_only_text", "text", "date", "ip"}
_INTEGER = {"long", "integer", "short", "byte", "unsigned_long"}
_NUMBER = _INTEGER | {"float", "double", "half_float", "scaled_float"}


@functools.cache
def ecs_fields() -> dict[str, str]:
    """Every ECS 8.11.0 field name and its type, from the official CSV."""
    with open(ECS_CSV, newline="") as f:
        return {row["Field"]: row["Type"] for row in csv.DictReader(f)}


@functools.cache
def custom_fields() -> dict[str, str]:
    """The agent's own fields as docs/events.md lists them: ``| `sslvpn_heartbeat.x` | type |``."""
    rows = re.findall(r"^\| `(" + re.escape(NAMESPACE) + r"[a-z0-9_.]+)` \| (\w+) \|",
                      EVENTS_DOC.read_text(), re.M)
    return dict(rows)


def _fits(value: Any, kind: str) -> bool:
    if value is None:  # no value: Elasticsearch indexes nothing
        return True
    if isinstance(value, list):
        return all(_fits(v, kind) for v in value)
    if kind in _TEXT:
        return isinstance(value, str)
    if kind in _INTEGER:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind in _NUMBER:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "boolean":
        return isinstance(value, bool)
    return kind in ("object", "flattened") and isinstance(value, dict)


def check_event(ev: dict[str, Any]) -> None:
    """AssertionError unless every key is an ECS field of its type or a documented own field of
    its type, no key is also the prefix of another, and ``event.action`` is in the catalogue."""
    ecs, own = ecs_fields(), custom_fields()
    for key, value in ev.items():
        if key.startswith(NAMESPACE):
            assert key in own, f"{key} is not documented in docs/events.md: {ev}"
            kind = own[key]
        else:
            assert key in ecs, f"{key} is neither an ECS 8.11 field nor under {NAMESPACE}: {ev}"
            kind = ecs[key]
        assert _fits(value, kind), f"{key}={value!r} is not of type {kind}: {ev}"
        assert not any(k.startswith(key + ".") for k in ev), f"{key} is a value and a prefix: {ev}"
    if "event.action" in ev:
        assert ev["event.action"] in set(Event), f"{ev['event.action']} is not in the catalogue"
