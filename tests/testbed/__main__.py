"""``python -m tests.testbed demo``: the manual page's "Testing the Scripts", on one machine.

Builds the cluster (HAProxy gateway, fake SSL VPN servers, a client), shows traffic spread over
the servers, stops the service on server 1 under load, shows its ``iptables -L`` and what the
client saw, starts it again, and tears everything down (also on Ctrl-C). Needs root.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence

from tests.netns import wait_for
from tests.testbed.cluster import CHAIN, Cluster, install_signal_handlers
from tests.testbed.load import Record, read_records, summarize

__all__ = ["main"]

_BOLD, _DIM, _RESET = ("\033[1m", "\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "", "")


def _step(n: int, title: str, what: str) -> None:
    print(f"\n{_BOLD}== Step {n}: {title}{_RESET}")
    print(f"   {what}")


def _show(text: str) -> None:
    for line in text.rstrip().splitlines():
        print(f"   {_DIM}|{_RESET} {line}")


def _traffic(c: Cluster, name: str, rate: float, duration: float) -> None:
    """Run a short load from the client and print what it saw, per server."""
    out = c.workdir / f"load-{name}.jsonl"
    c.start_load(out, rate=rate, duration=duration).wait(timeout=duration + 10)
    _report(read_records(out))


def _report(recs: Sequence[Record]) -> None:
    s = summarize(recs)
    print(f"   {s.total} requests: {s.ok} good, {s.bad} bad"
          + (f" (status {dict(sorted(s.by_status.items()))})" if s.bad else ""))
    for server, n in sorted(s.by_server.items()):
        bar = "#" * round(40 * n / max(1, s.total))
        print(f"   {server:>8} {n:5d} {bar}")


def demo(n_servers: int, agents: bool, rate: float) -> int:
    """Run the narrated demo; returns 0 once every step has run and the cluster is gone."""
    install_signal_handlers()
    print(f"{_BOLD}sslvpn-heartbeat testbed demo{_RESET} ({n_servers} servers, "
          f"agents {'on' if agents else 'OFF: showing what happens without them'})")
    started = time.monotonic()
    _step(1, "build the cluster",
          "network namespaces: a client, a gateway running HAProxy (round robin, retries, "
          "redispatch,\n   no health checks), and servers each running a fake SSL VPN service"
          + (" and the agent." if agents else "."))
    with Cluster(n_servers, agents=agents) as c:
        print(f"   up in {time.monotonic() - started:.1f}s; client -> {c.url}")
        for s in c.servers:
            print(f"   {s.name}: {s.addr}:{s.port}, core pid {s.core_pid()}")
        s1 = c.server(1)

        _step(2, "traffic is spread over the servers",
              f"the client sends {rate:.0f} requests/s for 2 s through the gateway.")
        _traffic(c, "spread", rate, 2.0)

        _step(3, "stop the SSL VPN service on server 1, under load",
              "as the manual page does with: /etc/init.d/novell-sslvpn stop")
        out = c.workdir / "load-failover.jsonl"
        load = c.start_load(out, rate=rate, duration=4.0)
        wait_for(lambda: len(read_records(out)) >= rate * 0.5, 5, "the load to start")
        t0 = time.monotonic()
        s1.stop()
        if agents:
            wait_for(s1.is_blocked, 5, "server 1's agent to block port 8080")
            print(f"   blocked {1e3 * (time.monotonic() - t0):.0f} ms after the stop returned")
        print("   server 1 answers directly:", s1.get())

        _step(4, "server 1's firewall", "iptables -L, as the manual page shows it:")
        _show(s1.iptables_L())
        if agents:
            events = [e for e in s1.agent_events()
                      if str(e.get("event.action", "")).startswith(("service-", "firewall-"))]
            print("   the agent's log (one JSON object per line; the block in full):")
            for e in events[-4:]:
                print(f"   - {e.get('event.action', ''):<18} trigger={e.get('trigger', '')}"
                      + (f" latency_ms={e['latency_ms']}" if "latency_ms" in e else ""))
            block = [e for e in events if e.get("event.action") == "firewall-block"]
            if block:
                _show(json.dumps(block[-1]))
        load.wait(timeout=15)
        print("   what the client saw during the failover:")
        _report(read_records(out))

        _step(5, "start the service on server 1 again", "/etc/init.d/novell-sslvpn start")
        s1.start()
        if agents:
            wait_for(lambda: not s1.is_blocked(), 10, "server 1's agent to open port 8080")
        _show(s1.iptables_L(CHAIN) if s1.chain_rules() is not None else "(no agent chain)")

        _step(6, "traffic is back on every server",
              "the same load again: server 1 takes its share once more.")
        _traffic(c, "back", rate, 2.0)
        print("\n   tearing down: stopping every process, deleting every namespace")
    print(f"{_BOLD}done in {time.monotonic() - started:.1f}s; every namespace and process "
          f"is gone.{_RESET}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry: ``demo``; exit 2 on usage errors, 69 when not root."""
    ap = argparse.ArgumentParser(prog="python -m tests.testbed")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="narrated failover demo on the namespace testbed")
    d.add_argument("--servers", type=int, default=2, choices=[2, 3])
    d.add_argument("--agents", action=argparse.BooleanOptionalAction, default=True,
                   help="run the agent on each server (--no-agents: see the 503s without it)")
    d.add_argument("--rate", type=float, default=100.0, help="client requests per second")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("the demo makes network namespaces: run it as root", file=sys.stderr)
        return 69
    try:
        return demo(a.servers, a.agents, a.rate)
    except KeyboardInterrupt:
        print("\ninterrupted: everything was torn down.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

