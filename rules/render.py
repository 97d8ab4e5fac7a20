"""Rendering: a plan -> the text ``iptables-restore --noflush`` commits in one go (pure)."""

from __future__ import annotations

from rules.plan import Plan

__all__ = ["render_restore"]


def render_restore(plan: Plan, *, policies: tuple[str, ...] = ()) -> str:
    """The iptables-restore --noflush text of a plan: one ``*filter`` ... ``COMMIT`` block.

    Declaring ``:CHAIN - [0:0]`` creates the chain or empties an existing one within the same
    commit that refills it, so no reader ever sees it half-written. ``policies`` (legacy x_tables,
    restored with ``--counters``: the built-in chains' headers as just read) re-declares the
    built-in chains as they were, since a legacy table replacement would otherwise zero their
    counters.
    """
    lines = ["*filter"]
    lines += list(policies)
    lines.append(f":{plan.chain} - [0:0]")
    if plan.rules is not None:
        lines += [f"-A {plan.chain} {r.save_form(plan.family, plan.chain)}" for r in plan.rules]
    lines += [f"-D INPUT -j {plan.chain}"] * plan.delete_jumps
    if plan.insert_jump:
        lines.append(f"-I INPUT 1 -j {plan.chain}")
    if plan.rules is None:
        lines.append(f"-X {plan.chain}")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"
