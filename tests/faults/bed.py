"""Shared pieces of the fault suite: a service + agent bed, a firewall sampler, a lock holder.

Everything runs inside a ``tests.netns.Netns``; the firewall is read back from the kernel with
the namespace's own iptables-save (``tests.agent.chain_view``). Iptables commands that play
"someone else" run through ``ip netns exec`` only.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from tests.agent import (
    CHAIN,
    Agent,
    ChainView,
    Sampler,
    Service,
    agent_config,
    chain_view,
    hold_lock,
    parse_chain,
)
from tests.netns import Netns, wait_for

__all__ = [
    "CHAIN",
    "EVENT_ONLY_INTERVAL_S",
    "Bed",
    "Sampler",
    "fd_count",
    "hold_lock",
    "ipt",
    "rss_kib",
    "valid",
]

EVENT_ONLY_INTERVAL_S = 30.0  # no safety-net tick can happen within a test


def ipt(ns: Netns, *args: str, family: int = 4, env: dict[str, str] | None = None) -> None:
    """Run ``iptables ARGS`` (or ip6tables) inside ``ns``: someone else touching the firewall."""
    ns.run(["ip6tables" if family == 6 else "iptables", *args], env=env)


def valid(view: ChainView) -> bool:
    """A state the agent may legitimately leave: open or blocked, one jump at the top."""
    return view.open or view.blocked


def fd_count(pid: int) -> int:
    """The number of open file descriptors of ``pid``."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    """The resident set size of ``pid`` in KiB (VmRSS)."""
    m = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    return int(m.group(1)) if m else 0


class Bed:
    """The fake service (started) and an agent config in ``tmp``; the agent is not started."""

    def __init__(self, ns: Netns, tmp: Path, *, env: dict[str, str] | None = None,
                 flavour: str = "", **sections: dict[str, Any]) -> None:
        self.ns, self.tmp, self.flavour = ns, tmp, flavour
        self.svc = Service(ns, tmp / "svc").start()
        self.state = tmp / "state"
        self.sections = sections
        sections.setdefault("probe", {}).setdefault("interval_s", EVENT_ONLY_INTERVAL_S)
        self.cfg = self.write()
        self.agent = Agent(ns, self.cfg, tmp, **(env or {}))

    def write(self, **override: dict[str, Any]) -> Path:
        """(Re)write the agent's config: the bed's sections with ``override`` merged in."""
        merged = {k: dict(v) for k, v in self.sections.items()}
        for k, v in override.items():
            merged.setdefault(k, {}).update(v)
        return agent_config(self.tmp / "agent.toml", self.svc.d, self.state, **merged)

    def view(self, family: int = 4) -> ChainView:
        """Our chain in ``family`` as the kernel holds it now (the bed's iptables flavour)."""
        if self.flavour:
            return parse_chain(self.ns.save(family, self.flavour))
        return chain_view(self.ns, family)

    def both(self, what: str) -> bool:
        """True when both families are ``open``/``blocked``/``drained``/``absent``."""
        return bool(getattr(self.view(4), what) and getattr(self.view(6), what))

    def wait_both(self, what: str, timeout: float = 5.0) -> None:
        """Wait until both families are ``what`` (see ``both``)."""
        try:
            wait_for(lambda: self.both(what), timeout, f"both families {what}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: v4={self.view(4)} v6={self.view(6)}\n"
                                 f"{self.agent.dump()}") from None

    def start_agent(self) -> Agent:
        """Start the agent and wait for agent-ready."""
        self.agent.start().wait_ready()
        return self.agent

    def alive(self) -> bool:
        """True while the current run of the agent lives."""
        return self.agent.proc is not None and self.agent.proc.poll() is None


