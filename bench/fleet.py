"""What the fleet integrations cost a failover: the agent's latency with and without them.

    sudo .venv-pypi/bin/python -m bench.fleet [--rounds N]      # from the repository root

Three variants, each in its own namespace, alternate round by round so that load on the machine
falls on all alike: ``plain`` (no metrics, no agent check); ``fleet`` (metrics written to a
textfile, the agent-check listener asked every 100 ms, as HAProxy with ``agent-inter 100ms``);
``flood`` (the same, the listener asked by a client as fast as it answers, bounded in count).
Each round SIGKILLs the fake service's core (the agent blocks)
and starts a new one (the agent opens); one sample is the agent's own ``latency_ms`` of that
``firewall-block`` or ``firewall-unblock`` event (kernel event to rule committed). Prints the
distributions and the ratio of the medians; passes or fails on nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

from tests.agent import Agent, Service, agent_config
from tests.netns import Netns
from tests.testbed.cluster import socket_in

AGENT_PORT = 5555
MAX_ASKS = 200_000  # the asking client's bound, whatever the round count


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


class Asker:
    """Asks the agent-check listener in a loop (bounded) from inside the namespace."""

    def __init__(self, ns: Netns, interval: float) -> None:
        self.ns, self.interval, self.asked, self.answered = ns, interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set() and self.asked < MAX_ASKS:
            self.asked += 1
            s = socket_in(self.ns.name)
            s.settimeout(2.0)
            try:
                s.connect(("127.0.0.1", AGENT_PORT))
                if s.recv(256):
                    self.answered += 1
            except OSError:
                pass
            finally:
                s.close()
            if self.interval:
                self._stop.wait(self.interval)

    def __enter__(self) -> Asker:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


class Bed:
    """One namespace, a fake service and an agent, configured as the variant says."""

    def __init__(self, top: Path, name: str, fleet: bool) -> None:
        self.ns = Netns("svbf")
        self.fleet = fleet
        d = top / name
        d.mkdir()
        self.svc = Service(self.ns, d / "svc").start()
        extra = {"metrics": {"textfile": str(d / "sslvpn-heartbeat.prom")},
                 "agent_check": {"listen": f"127.0.0.1:{AGENT_PORT}"}} if fleet else {}
        cfg = agent_config(d / "agent.toml", self.svc.d, d / "state",
                           probe={"interval_s": 1.0}, **extra)
        self.agent = Agent(self.ns, cfg, d)
        self.agent.start().wait_ready()

    def round(self) -> tuple[float, float]:
        """One failover and one recovery: the agent's latency_ms of each."""
        mark = self.agent.mark()
        self.svc.ctl("kill-core")
        block = self.agent.wait_event("firewall-block", 10.0, after=mark)
        mark = self.agent.mark()
        self.svc.ctl("start")
        unblock = self.agent.wait_event("firewall-unblock", 10.0, after=mark)
        return float(block["latency_ms"]), float(unblock["latency_ms"])

    def close(self) -> None:
        """Stop the agent and remove the namespace."""
        try:
            self.agent.stop()
        finally:
            self.ns.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the rounds and print the table."""
    ap = argparse.ArgumentParser(prog="bench.fleet", description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args(argv)
    names = ("plain", "fleet", "flood")
    samples: dict[str, dict[str, list[float]]] = {v: {"block": [], "unblock": []} for v in names}
    with tempfile.TemporaryDirectory(prefix="svh-bench-fleet-") as tmp:
        top = Path(tmp)
        beds: dict[str, Bed] = {}
        try:
            for name in names:
                beds[name] = Bed(top, name, fleet=name != "plain")
            with Asker(beds["fleet"].ns, 0.1) as paced, Asker(beds["flood"].ns, 0.0) as flood:
                for _ in range(args.rounds):
                    for name in names:
                        b, u = beds[name].round()
                        samples[name]["block"].append(b)
                        samples[name]["unblock"].append(u)
        finally:
            for bed in beds.values():
                bed.close()
    print(f"bench.fleet: {args.rounds} rounds per variant; agent latency_ms (kernel event -> "
          "rule committed)")
    for name, asker in (("fleet", paced), ("flood", flood)):
        print(f"{name}: metrics textfile + agent-check listener asked {asker.asked} times "
              f"({asker.answered} answers) during the rounds")
    print()
    print("| variant | event | median | p90 | max |")
    print("|---|---|---|---|---|")
    for name in names:
        for ev in ("block", "unblock"):
            v = samples[name][ev]
            print(f"| {name} | {ev} | {statistics.median(v):.2f} | {_pct(v, 0.9):.2f} "
                  f"| {max(v):.2f} |")
    print()
    for name in ("fleet", "flood"):
        for ev in ("block", "unblock"):
            ratio = statistics.median(samples[name][ev]) / statistics.median(samples["plain"][ev])
            print(f"median {ev}: {name} / plain = {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
