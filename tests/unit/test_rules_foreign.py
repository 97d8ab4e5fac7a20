"""The pure foreign-chain detection: which chain contents and references are the agent's own."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rules.errors import ForeignChain, RulesError
from rules.model import REJECT_CHOICES, ChainSpec, Family, Mode
from rules.plan import desired_state, foreign_conflict, is_own_rule, parse_save

CHAIN = "sslvpn-heartbeat-chain"


def save(*lines: str) -> str:
    """An iptables-save filter table with these lines after the built-in chains."""
    return "\n".join(["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]",
                      ":OUTPUT ACCEPT [0:0]", *lines, "COMMIT", ""])


@given(port=st.integers(1, 65535), mode=st.sampled_from([Mode.BLOCK, Mode.DRAIN]),
       reject_with=st.sampled_from(REJECT_CHOICES), family=st.sampled_from(list(Family)))
def test_every_rule_the_agent_writes_is_its_own(port: int, mode: Mode, reject_with: str,
                                                family: Family) -> None:
    """Each rule desired_state renders, for any port, mode, reject type and family, is own."""
    spec = ChainSpec(CHAIN, port, reject_with)
    rules = desired_state(spec, family, mode).rules
    assert rules and all(is_own_rule(r, family) for r in rules)
    state = parse_save(save(f":{CHAIN} - [0:0]", f"-A INPUT -j {CHAIN}",
                            *(f"-A {CHAIN} {r}" for r in rules)), CHAIN)
    assert foreign_conflict(state, CHAIN, family) is None


@pytest.mark.parametrize("rule", [
    "-p tcp -m tcp --dport 8080 -j ACCEPT",
    "-s 10.0.0.0/8 ! -i lo -p tcp -m tcp --dport 8080 -j REJECT --reject-with icmp-port-unreachable",
    "! -i lo -p tcp -m tcp --dport 8080 -j REJECT --reject-with icmp-host-prohibited",
    "! -i lo -p tcp -m tcp --dport 8080 -j DROP",
    "-i lo -p tcp -m tcp --dport 8080 -j REJECT --reject-with icmp-port-unreachable",
    "! -i lo -p tcp -m tcp --dport 8080 -m comment --comment x -j REJECT --reject-with tcp-reset",
    "! -i lo -p tcp -m tcp --dport 8080 -j REJECT --reject-with tcp-reset -m comment --comment x",
    "-j RETURN",
])
def test_other_shapes_are_foreign(rule: str) -> None:
    """A rule of any other shape (other target, match, interface, reject type) is foreign."""
    assert not is_own_rule(rule, Family.V4)
    state = parse_save(save(f":{CHAIN} - [0:0]", f"-A {CHAIN} {rule}"), CHAIN)
    conflict = foreign_conflict(state, CHAIN, Family.V4)
    assert conflict is not None and rule in conflict and "ipv4" in conflict


def test_reject_type_of_the_other_family_is_foreign() -> None:
    """ICMP's port-unreachable is the agent's in IPv4 only, ICMPv6's in IPv6 only."""
    v4 = "! -i lo -p tcp -m tcp --dport 8080 -j REJECT --reject-with icmp-port-unreachable"
    v6 = "! -i lo -p tcp -m tcp --dport 8080 -j REJECT --reject-with icmp6-port-unreachable"
    assert is_own_rule(v4, Family.V4) and not is_own_rule(v4, Family.V6)
    assert is_own_rule(v6, Family.V6) and not is_own_rule(v6, Family.V4)


@pytest.mark.parametrize("ref", [
    f"-A FORWARD -j {CHAIN}",
    f"-A INPUT -p tcp -m multiport --dports 22 -j {CHAIN}",
    f"-A INPUT -g {CHAIN}",
    f"-A other -j {CHAIN}",
])
def test_any_reference_but_the_plain_input_jump_is_foreign(ref: str) -> None:
    """An empty chain referenced by a jump with conditions, from another chain, or by a goto,
    is someone else's; the description quotes the referencing rule."""
    state = parse_save(save(f":{CHAIN} - [0:0]", ":other - [0:0]", f"-A INPUT -j {CHAIN}", ref),
                       CHAIN)
    conflict = foreign_conflict(state, CHAIN, Family.V4)
    assert conflict is not None and ref in conflict and "referenced from" in conflict


def test_own_chain_with_duplicate_jumps_is_adopted() -> None:
    """Plain jumps from INPUT, duplicated or misplaced, are the agent's to mend: no conflict."""
    state = parse_save(save(f":{CHAIN} - [0:0]", "-A INPUT -p tcp -j ACCEPT",
                            f"-A INPUT -j {CHAIN}", f"-A INPUT -j {CHAIN}"), CHAIN)
    assert foreign_conflict(state, CHAIN, Family.V4) is None


def test_absent_chain_is_no_conflict() -> None:
    """No chain of that name: nothing to refuse (a longer name that only starts the same is
    another chain)."""
    state = parse_save(save(f":{CHAIN}-x - [0:0]", f"-A INPUT -j {CHAIN}-x",
                            f"-A {CHAIN}-x -j DROP"), CHAIN)
    assert foreign_conflict(state, CHAIN, Family.V4) is None


def test_description_counts_beyond_three() -> None:
    """Many foreign rules: three are quoted, the rest counted."""
    rules = [f"-A {CHAIN} -s 10.0.0.{i}/32 -j DROP" for i in range(5)]
    conflict = foreign_conflict(parse_save(save(f":{CHAIN} - [0:0]", *rules), CHAIN), CHAIN,
                                Family.V4)
    assert conflict is not None and "5 rule(s)" in conflict and "and 2 more" in conflict
    assert rules[2] in conflict and rules[3] not in conflict


def test_foreign_chain_error_names_chain_and_conflicts() -> None:
    """ForeignChain is a RulesError whose message names the chain and every family's conflict."""
    exc = ForeignChain("DOCKER", ("ipv4: 2 rule(s) x", "ipv6: referenced from y"))
    assert isinstance(exc, RulesError)
    assert "chain DOCKER" in str(exc) and "ipv4: 2 rule(s) x" in str(exc)
    assert "ipv6: referenced from y" in str(exc) and "nothing was changed" in str(exc)
