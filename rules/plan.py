"""Pure planning: what the kernel holds, whose it is, and the transaction that changes it.

Nothing here runs a command. ``parse_save`` reads ``iptables-save -t filter`` output into a
``TableState``; ``foreign_conflict`` judges whether the chain is ours to touch; ``plan_*`` decide
the smallest transaction per family that brings the kernel to the desired state, and
``holds`` / ``backend_fault`` compare what was read back with what was asked.
(``rules.render`` writes a plan as iptables-restore text.)
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field

from rules.errors import RulesError
from rules.model import ChainSpec, Family, Mode, RejectRule, chain_rules

__all__ = [
    "NoOp",
    "Plan",
    "SaveParseError",
    "TableState",
    "backend_fault",
    "desired_state",
    "foreign_conflict",
    "holds",
    "is_own_rule",
    "parse_save",
    "plan_apply",
    "plan_remove",
]


@dataclass(frozen=True)
class TableState:
    """What the filter table holds that concerns our chain.

    ``rules`` are the chain's rules in save form (without ``-A CHAIN``); ``jumps`` the 1-based
    positions in INPUT of the plain jump ``-A INPUT -j CHAIN``; ``references`` counts every other
    rule of any chain that jumps to our chain (those are not ours to remove), and
    ``reference_rules`` those rules as saved (``-A OTHER ... -j CHAIN``).
    """

    chain_present: bool
    rules: tuple[str, ...] = ()
    jumps: tuple[int, ...] = ()
    references: int = 0
    # Built-in chains' headers as saved, e.g. ":INPUT ACCEPT [11:2222]"; legacy x_tables resets
    # their counters on every table replacement, so a legacy plan writes them back.
    policies: tuple[str, ...] = field(default=(), compare=False)
    reference_rules: tuple[str, ...] = field(default=(), compare=False)

    @property
    def mode_guess(self) -> str:
        """A short word for status output: absent, open, blocked or foreign content."""
        if not self.chain_present:
            return "absent"
        if not self.rules:
            return "open"
        if len(self.rules) == 1 and "--tcp-flags FIN,SYN,RST,ACK SYN" in self.rules[0]:
            return "drain"
        if len(self.rules) == 1 and "-j REJECT" in self.rules[0]:
            return "blocked"
        return "unknown"


class SaveParseError(RulesError):
    """iptables-save printed something this parser does not understand."""


def _targets(rule: str, chain: str) -> bool:
    """True when the rule jumps (-j) or goes (-g) to ``chain`` itself, not to a longer name."""
    words = rule.split()
    return any(a in ("-j", "-g") and b == chain for a, b in itertools.pairwise(words))


def parse_save(text: str, chain: str) -> TableState:
    """Extract our chain's state from ``iptables-save -t filter`` output.

    Comment lines (``# Warning: iptables-legacy tables present ...`` among them) are ignored.
    Raises SaveParseError when there is no filter table in the text.
    """
    in_filter = False
    seen_filter = False
    present = False
    rules: list[str] = []
    jumps: list[int] = []
    refs = 0
    ref_rules: list[str] = []
    policies: list[str] = []
    input_pos = 0
    our_jump = f"-j {chain}"
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            in_filter = line == "*filter"
            seen_filter = seen_filter or in_filter
            continue
        if not in_filter:
            continue
        if line == "COMMIT":
            in_filter = False
            continue
        if line.startswith(":"):
            name, policy = ([*line[1:].split(" "), "", ""])[:2]
            if name == chain:
                present = True
            elif policy != "-":
                policies.append(line)
            continue
        if not line.startswith("-A "):
            raise SaveParseError(f"unexpected line in iptables-save output: {line!r}")
        parts = line.split(" ", 2)
        owner, rest = parts[1], (parts[2] if len(parts) > 2 else "")
        if owner == "INPUT":
            input_pos += 1
            if rest == our_jump:
                jumps.append(input_pos)
                continue
        if owner == chain:
            rules.append(rest)
        elif _targets(rest, chain):
            refs += 1
            ref_rules.append(line)
    if not seen_filter:
        raise SaveParseError("no *filter table in iptables-save output")
    return TableState(present, tuple(rules), tuple(jumps), refs, tuple(policies), tuple(ref_rules))


# Every rule the agent ever writes, in save form: a REJECT of TCP to one port from anywhere but
# loopback, for all packets (block) or SYN only (drain), with either reject type. Any port: a
# chain left by a run with another service.port is still the agent's.
_OWN_RULE = {
    Family.V4: re.compile(r"! -i lo -p tcp -m tcp --dport \d{1,5}( --tcp-flags FIN,SYN,RST,ACK SYN)? "
                          r"-j REJECT --reject-with (icmp-port-unreachable|tcp-reset)"),
    Family.V6: re.compile(r"! -i lo -p tcp -m tcp --dport \d{1,5}( --tcp-flags FIN,SYN,RST,ACK SYN)? "
                          r"-j REJECT --reject-with (icmp6-port-unreachable|tcp-reset)"),
}


def is_own_rule(rule: str, family: Family) -> bool:
    """True when ``rule`` (save form, without ``-A CHAIN``) has a shape the agent writes."""
    return _OWN_RULE[family].fullmatch(rule) is not None


def foreign_conflict(state: TableState, chain: str, family: Family) -> str | None:
    """What makes the chain someone else's in this family, in words; None when it is ours.

    Ours: absent, or holding only rules of the agent's shapes and referenced only by plain
    jumps from INPUT. Anything else (a rule of another shape, a jump from another chain or
    with conditions, a goto) belongs to another tool, and the agent must not touch it.
    """
    if not state.chain_present:
        return None
    parts = []
    foreign = [r for r in state.rules if not is_own_rule(r, family)]
    if foreign:
        shown = ", ".join(repr(f"-A {chain} {r}") for r in foreign[:3])
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        parts.append(f"{len(foreign)} rule(s) the agent never writes: {shown}{more}")
    if state.references:
        refs = state.reference_rules or (f"{state.references} rule(s)",)
        shown = ", ".join(repr(r) for r in refs[:3])
        more = f" and {len(refs) - 3} more" if len(refs) > 3 else ""
        parts.append(f"referenced from {shown}{more}")
    if not parts:
        return None
    return f"{family}: " + "; ".join(parts)


def desired_state(spec: ChainSpec, family: Family, mode: Mode) -> TableState:
    """The state the table must be in after applying ``mode``: chain, content, one jump first."""
    rules = tuple(r.save_form(family, spec.name) for r in chain_rules(spec, mode))
    return TableState(True, rules, (1,), 0)


@dataclass(frozen=True)
class Plan:
    """One transaction for one family.

    ``rules`` None means: delete the chain. Otherwise the chain is declared (which creates it or
    empties it in the same commit) and refilled with ``rules``. ``delete_jumps`` plain jumps are
    deleted from INPUT and, if ``insert_jump``, one is inserted at position 1.
    """

    family: Family
    chain: str
    rules: tuple[RejectRule, ...] | None
    delete_jumps: int
    insert_jump: bool

    @property
    def is_noop(self) -> bool:
        """True when the plan was computed as unnecessary (see plan_apply)."""
        return False


@dataclass(frozen=True)
class NoOp(Plan):
    """The kernel already holds the desired state."""

    @property
    def is_noop(self) -> bool:
        """Always True."""
        return True


def plan_apply(
    spec: ChainSpec, family: Family, mode: Mode, observed: TableState, *, force: bool = False
) -> Plan:
    """The transaction that makes the chain hold ``mode`` with exactly one jump, first in INPUT.

    Returns a NoOp when ``observed`` already is the desired state (unless ``force``).
    Duplicate or misplaced jumps are deleted and one jump is inserted at the top.
    """
    want = desired_state(spec, family, mode)
    jumps_ok = observed.jumps == (1,)
    if not force and observed.chain_present and observed.rules == want.rules and jumps_ok:
        return NoOp(family, spec.name, chain_rules(spec, mode), 0, False)
    return Plan(
        family,
        spec.name,
        chain_rules(spec, mode),
        delete_jumps=0 if jumps_ok else len(observed.jumps),
        insert_jump=not jumps_ok,
    )


def plan_remove(spec: ChainSpec, family: Family, observed: TableState) -> Plan:
    """The transaction that deletes our jumps and our chain; a NoOp when neither exists."""
    if not observed.chain_present and not observed.jumps:
        return NoOp(family, spec.name, None, 0, False)
    if observed.references:
        raise RulesError(
            f"chain {spec.name} is referenced by {observed.references} rule(s) the agent did not "
            "write; remove those first"
        )
    return Plan(family, spec.name, None, len(observed.jumps), False)


def holds(after: TableState, want: TableState) -> bool:
    """True when the state read back is the desired one: chain, content and jumps."""
    return (after.chain_present, after.rules, after.jumps) == (want.chain_present, want.rules,
                                                               want.jumps)


def backend_fault(after: TableState, want: TableState) -> bool:
    """True when a read-back that differs looks like the writer's fault, not someone else's.

    The chain is there with as many rules as were written, but they print differently: the
    transaction wrote other rules than iptables-restore would have. A chain gone, flushed or
    grown is someone else's change (an administrator, a firewall reload), for the engine to mend.
    """
    return (after.chain_present and len(after.rules) == len(want.rules)
            and after.rules != want.rules)
