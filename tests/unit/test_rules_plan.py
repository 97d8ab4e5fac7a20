"""Unit tests of rules.plan's engine-facing judgements: a plan reaches the desired state from
any state the agent may meet, and a read-back that differs is told apart (writer's fault or
someone else's change). Pure values, no kernel."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from rules.model import ChainSpec, Family, Mode, RejectRule
from rules.plan import Plan, TableState, backend_fault, desired_state, holds, plan_apply
from rules.render import render_restore

SPEC = ChainSpec()
OTHER = "-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT"
modes = st.sampled_from(list(Mode))
families = st.sampled_from(list(Family))


@st.composite
def inputs(draw: st.DrawFn) -> list[str]:
    """INPUT as a list of rules: foreign ones and any number of our plain jumps, anywhere."""
    return draw(st.lists(st.sampled_from([OTHER, f"-A INPUT -j {SPEC.name}"]), max_size=6))


def _own_rules(family: Family) -> st.SearchStrategy[tuple[str, ...]]:
    rule = st.builds(RejectRule, st.integers(1, 65535),
                     st.sampled_from(["icmp-port-unreachable", "tcp-reset"]), st.booleans())
    return st.lists(rule, max_size=2).map(
        lambda rs: tuple(r.save_form(family, SPEC.name) for r in rs))


def _state(present: bool, rules: tuple[str, ...], input_chain: list[str]) -> TableState:
    jumps = tuple(i + 1 for i, r in enumerate(input_chain) if r == f"-A INPUT -j {SPEC.name}")
    return TableState(present, rules if present else (), jumps)


def _commit(plan: Plan, input_chain: list[str], rules: tuple[str, ...]) -> tuple[list[str], tuple[str, ...]]:
    """What iptables-restore does with the plan's text, on a model of INPUT and our chain."""
    out = list(input_chain)
    new_rules = rules
    for line in render_restore(plan).splitlines():
        if line.startswith(f":{plan.chain} "):
            new_rules = ()
        elif line.startswith(f"-A {plan.chain} "):
            new_rules += (line.removeprefix(f"-A {plan.chain} "),)
        elif line == f"-D INPUT -j {plan.chain}":
            out.remove(f"-A INPUT -j {plan.chain}")
        elif line == f"-I INPUT 1 -j {plan.chain}":
            out.insert(0, f"-A INPUT -j {plan.chain}")
    return out, new_rules


@given(modes, families, st.booleans(), st.data(), inputs())
def test_the_plan_reaches_the_desired_state_from_any_state_of_ours(
        mode: Mode, family: Family, present: bool, data: st.DataObject, input_chain: list[str]) -> None:
    """Chain absent or holding any of our rules, jumps missing, duplicated or misplaced: one
    transaction brings it to exactly the mode's rules and one jump, first; a noop only when
    it already is there."""
    rules = data.draw(_own_rules(family))
    observed = _state(present, rules, input_chain)
    plan = plan_apply(SPEC, family, mode, observed)
    want = desired_state(SPEC, family, mode)
    if plan.is_noop:
        assert holds(observed, want)
        return
    after_input, after_rules = _commit(plan, input_chain, rules)
    assert holds(_state(True, after_rules, after_input), want)
    assert [r for r in after_input if r == OTHER] == [r for r in input_chain if r == OTHER]


@given(modes, families)
def test_a_read_back_that_holds_is_never_a_fault(mode: Mode, family: Family) -> None:
    """The desired state read back is held, and no writer is blamed for it."""
    want = desired_state(SPEC, family, mode)
    assert holds(want, want) and not backend_fault(want, want)


def test_same_count_printed_otherwise_is_the_writers_fault() -> None:
    """As many rules as written but not the ones written: the writer wrote something else."""
    want = desired_state(SPEC, Family.V4, Mode.BLOCK)
    assert backend_fault(TableState(True, ("-p udp -j ACCEPT",), (1,)), want)


def test_someone_elses_change_is_not_a_fault() -> None:
    """Chain gone, flushed or grown: someone else changed it, for the engine to mend."""
    want = desired_state(SPEC, Family.V4, Mode.BLOCK)
    rule = want.rules[0]
    for after in (TableState(False), TableState(True, (), (1,)),
                  TableState(True, (rule, "-p udp -j ACCEPT"), (1,))):
        assert not holds(after, want) and not backend_fault(after, want)


def test_a_wrong_jump_alone_is_not_held_and_not_a_fault() -> None:
    """The right rules but the jump missing or second: not held, and not the writer's content."""
    want = desired_state(SPEC, Family.V6, Mode.DRAIN)
    for jumps in ((), (2,), (1, 3)):
        after = TableState(True, want.rules, jumps)
        assert not holds(after, want) and not backend_fault(after, want)


def test_legacy_policies_are_written_before_the_chain() -> None:
    """On legacy, the built-in chains' headers as just read lead the block (counters kept)."""
    plan = plan_apply(SPEC, Family.V4, Mode.BLOCK, TableState(False))
    lines = render_restore(plan, policies=(":INPUT ACCEPT [5:300]", ":OUTPUT DROP [1:2]")).splitlines()
    assert lines[:4] == ["*filter", ":INPUT ACCEPT [5:300]", ":OUTPUT DROP [1:2]",
                         f":{SPEC.name} - [0:0]"]
