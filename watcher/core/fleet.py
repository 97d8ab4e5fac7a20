"""The fleet guard's rules, pure: the budget arithmetic, the permit decision, the guard's state.

A group of ``size`` agents shares one budget: at least ``min_open`` members must stay open.

* A DOWN is **proven** when the service cannot serve at all (the process is gone, the PID file
  names no live process, no listener on the port): the agent blocks at once, as without the
  guard, and never asks. Any other failing check (connect, TLS, HTTP, a timeout of those) of a
  live, listening process is **suspect**: the agent blocks only with a **permit**, granted when
  at least ``min_open`` *other* members are open, so exactly ``size - min_open`` suspect blocks
  fit when every member fails at once.
* A member that is not registered (its lease expired: a dead or cut-off server) counts as not
  open.
* With etcd unreachable the guard is never worse than no guard: a permit already held keeps
  its block, a suspect DOWN follows ``unreachable`` (``block``: as a lone agent; ``open``: stay
  open), and nothing changes a rule merely because etcd went away (a suspect DOWN refused
  before the outage stays open through it; it asks again once etcd is back).

The etcd client (``watcher.fleet``) evaluates :func:`grant` and :func:`witnesses` inside its
compare-and-swap loop and carries out the actions the control core derives from
:class:`Guard`; it decides nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from rules.model import Mode
from watcher.core.triggers import Trigger

__all__ = [
    "PROVEN_CHECKS",
    "FleetView",
    "Guard",
    "Member",
    "Verdict",
    "allows_suspect_block",
    "budget_left",
    "grant",
    "is_proven",
    "min_open_count",
    "open_members",
    "summary",
    "view_summary",
    "witnesses",
]

# Probe checks whose failure proves the service cannot serve (watcher.probe.CHECKS order).
PROVEN_CHECKS = frozenset({"pid_file", "process", "process_name", "listen"})


def is_proven(check: str, proves_death: bool) -> bool:
    """True when a failed probe proves the service cannot serve (never asks the fleet)."""
    return proves_death or check in PROVEN_CHECKS


def min_open_count(min_open: int | str, size: int) -> int:
    """``min_open`` as a member count: a count as is (at most ``size``), ``"N%"`` of ``size``
    rounded up (a PodDisruptionBudget's minAvailable rounds up too)."""
    if isinstance(min_open, str):
        pct = int(min_open.rstrip("%"))
        return min(size, math.ceil(size * pct / 100))
    return min(size, max(0, min_open))


@dataclass(frozen=True)
class Member:
    """One registered member: the mode its kernel holds, why (health or admin), since (UNIX)."""

    name: str
    mode: str  # open | block | drain
    cause: str  # health | admin
    since: float


@dataclass(frozen=True)
class FleetView:
    """The group as the watch last saw it: registered members and the maintenance slot holders."""

    members: tuple[Member, ...] = ()
    slots: tuple[str, ...] = ()  # the members holding a maintenance slot


def open_members(members: Iterable[Member], *, excluding: str = "") -> int:
    """How many of ``members`` (other than ``excluding``) are open."""
    return sum(1 for m in members if m.mode == str(Mode.OPEN) and m.name != excluding)


@dataclass(frozen=True)
class Verdict:
    """A permit decision: granted or not, the members counted not open, the open count."""

    granted: bool
    not_open: tuple[str, ...]  # named members not open, then "N unregistered" if any
    open_count: int  # open members other than the asker


def grant(members: Iterable[Member], me: str, size: int, min_open: int) -> Verdict:
    """May ``me`` take a suspect block? Only if at least ``min_open`` other members stay open;
    members of ``size`` with no key (expired lease, never started) count as not open."""
    ms = list(members)
    others = [m for m in ms if m.name != me]
    opened = open_members(others)
    not_open = [m.name for m in sorted(others, key=lambda m: m.name) if m.mode != str(Mode.OPEN)]
    missing = size - 1 - len(others)
    if missing > 0:
        not_open.append(f"{missing} unregistered")
    return Verdict(opened >= min_open, tuple(not_open), opened)


def witnesses(members: Iterable[Member], me: str, min_open: int) -> tuple[str, ...]:
    """The ``min_open`` open members (other than ``me``, first by name) whose keys a permit
    transaction compares: if none of them changed since they were read, at least ``min_open``
    others are open when it commits. Every asker picking the same first ones keeps racing
    transactions from invalidating each other: the askers outside that set all fit at once."""
    opened = sorted(m.name for m in members if m.name != me and m.mode == str(Mode.OPEN))
    return tuple(opened[:min_open])


def budget_left(members: Iterable[Member], size: int, min_open: int) -> int:
    """How many more suspect blocks the group's budget allows now (never below 0)."""
    del size  # unregistered members are already not open: only the open ones give budget
    return max(0, open_members(members) - min_open)


@dataclass(frozen=True)
class Guard:
    """The guard's part of the core's state. Build it with :meth:`new`."""

    size: int
    min_open: int  # as a count
    unreachable: str = "block"  # block | open: what a suspect DOWN does while etcd is away
    member: str = ""
    reachable: bool | None = None  # None: no answer from etcd yet
    suspect: bool = False  # the last failing probe's DOWN was suspect (not proven)
    permit: bool = False  # a permit granted for the current suspect DOWN is held
    asking: bool = False  # an AskPermit is in flight
    again: bool = False  # the fleet changed while asking: ask once more when answered
    refused: tuple[str, ...] | None = None  # members not open at the last refusal
    registered: tuple[str, str] | None = None  # (mode, cause) last asked to register
    view: FleetView = FleetView()
    down_cause: Trigger | None = None  # the event behind the suspect DOWN (a permit's latency)

    @classmethod
    def new(cls, size: int, min_open: int | str, unreachable: str, member: str) -> Guard:
        """A guard for a group of ``size`` with ``min_open`` as configured (count or "N%")."""
        if size < 1 or unreachable not in ("block", "open"):
            raise ValueError(f"invalid fleet guard: size={size} unreachable={unreachable!r}")
        return cls(size=size, min_open=min_open_count(min_open, size), unreachable=unreachable,
                   member=member)

    def budget(self) -> int:
        """More suspect blocks the group allows, as far as the last view shows."""
        return budget_left(self.view.members, self.size, self.min_open)

    def lost(self) -> Guard:
        """Forget what needs etcd's answer (a connection lost or found again)."""
        return replace(self, asking=False, again=False, registered=None)


def allows_suspect_block(g: Guard, applied: Mode | None) -> bool:
    """Whether a suspect DOWN may hold the port blocked now: with a permit; without etcd, as
    ``unreachable`` says; while a permit is being asked, the kernel keeps what it holds."""
    if g.permit:
        return True
    if g.reachable is not True:  # a refusal from before the outage stands: the outage alone
        return g.unreachable == "block" and g.refused is None  # never changes a rule
    return g.asking and applied is Mode.BLOCK


def view_summary(view: FleetView, size: int, min_open: int) -> dict[str, Any]:
    """The group as JSON: members (mode, cause, since), slot holders, size, min_open, how many
    are open and how many more suspect blocks the budget allows."""
    return {
        "members": [{"member": m.name, "mode": m.mode, "cause": m.cause, "since": m.since}
                    for m in view.members],
        "slot_holders": list(view.slots),
        "size": size,
        "min_open": min_open,
        "open": open_members(view.members),
        "budget_left": budget_left(view.members, size, min_open),
    }


def summary(g: Guard) -> dict[str, Any]:
    """The guard as the status file, ``status --json`` and metrics show it."""
    return {
        "member": g.member,
        "reachable": g.reachable,
        "unreachable_policy": g.unreachable,
        "refused": g.refused is not None,
        "not_open": list(g.refused or ()),
        "permit": g.permit,
        "slot_held": g.member in g.view.slots,
        **view_summary(g.view, g.size, g.min_open),
    }
