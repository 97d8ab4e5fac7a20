"""``python -m tests.testbed demo``: the manual page's "Testing the Scripts", on one machine.

Builds the cluster (HAProxy gateway, fake SSL VPN servers with their agents, a client), shows
traffic spread over the servers, stops the service on server 1 under load, shows its
``iptables -L`` and the agent's JSON event, what the client saw, starts it again and shows the
traffic come back. Tears everything down, also on Ctrl-C. Needs root; touches no firewall but
those of the namespaces it makes.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from tests.netns import wait_for
from tests.testbed.cluster import (
    CHAIN,
    GATEWAY_KINDS,
    Cluster,
    Reply,
    Server,
    default_agent_config,
    http_get,
    install_signal_handlers,
)
from tests.testbed.load import Record, read_records, summarize
from tests.testbed.scenario import RecordTail

__all__ = ["main"]

_TTY = sys.stdout.isatty()
_BOLD, _DIM, _GREEN, _RED, _RESET = (("\033[1m", "\033[2m", "\033[32m", "\033[31m", "\033[0m")
                                     if _TTY else ("", "", "", "", ""))
_BAR = 40
AGENT_CHECK_PORT = 5555  # --fleet: each agent answers HAProxy's agent check here
METRICS = "sslvpn-heartbeat.prom"  # --fleet: the metrics file in each server's directory


def _step(n: int, title: str, *what: str) -> None:
    print(f"\n{_BOLD}== {n}. {title}{_RESET}")
    for line in what:
        print(f"   {line}")


def _say(line: str = "") -> None:
    print(f"   {line}" if line else "")


def _show(text: str, marked: bool = False) -> None:
    """Print command output in a box; ``marked`` output gets a ``>`` margin (and bold on a tty)."""
    for line in text.rstrip().splitlines():
        if marked:
            print(f"   {_BOLD}> {line.rstrip()}{_RESET}")
        else:
            print(f"   {_DIM}|{_RESET} {line.rstrip()}")


def _good(n: int) -> str:
    return f"{_GREEN}{n}{_RESET}"


def _bad(n: int) -> str:
    return f"{_RED if n else _GREEN}{n}{_RESET}"


def _bars(recs: Sequence[Record], servers: Sequence[Server]) -> None:
    """Good answers per server, as bars (a server with none shows 0)."""
    summary = summarize(recs)
    total = max(1, len(recs))
    rows = [(s.name, summary.by_server.get(s.name, 0)) for s in servers]
    if summary.bad:
        rows.append(("failed", summary.bad))
    for name, n in rows:
        mark = "x" if name == "failed" else "#"
        print(f"   {name:>8} {n:5d} {mark * round(_BAR * n / total)}")


def _traffic(c: Cluster, name: str, rate: float, duration: float) -> list[Record]:
    """Run a short load from the client and print what it saw, per server."""
    out = c.workdir / f"load-{name}.jsonl"
    c.start_load(out, rate=rate, duration=duration).wait(timeout=duration + 10)
    recs = read_records(out)
    s = summarize(recs)
    _say(f"{s.total} requests: {_good(s.ok)} answered by a server, {_bad(s.bad)} failed")
    _bars(recs, c.servers)
    return recs


def _describe(r: Reply) -> str:
    if r.status:
        return f"HTTP {r.status} {r.body.strip()!r}"
    return r.body.removeprefix("error: ")


def _show_iptables_l(srv: Server) -> None:
    """``iptables -L`` with INPUT as is and the agent's chain marked; FORWARD/OUTPUT left out."""
    for block in srv.iptables_L().strip().split("\n\n"):
        if block.startswith("Chain INPUT "):
            _show(block)
            print(f"   {_DIM}|{_RESET}")
        elif block.startswith(f"Chain {CHAIN} "):
            _show(block, marked=True)


def _event_lines(e: dict[str, Any]) -> list[str]:
    """One JSON object, one key per line, values compact: readable and still valid JSON."""
    items = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in e.items()]
    return ["{", *(f"{ln}," for ln in items[:-1]), *items[-1:], "}"]


def _agent_event(srv: Server, action: str) -> dict[str, Any] | None:
    found = [e for e in srv.agent_events() if e.get("event.action") == action]
    return found[-1] if found else None


def _shipped_config(server: Server) -> str:
    """The agent's configuration with the shipped firewall defaults (reject_with, established)."""
    return default_agent_config(server, reject_with=None)


def _fleet_config(server: Server) -> str:
    """The agent's configuration with HAProxy's agent check and the metrics file on."""
    return default_agent_config(server, reject_with=None) + (
        f'\n[agent_check]\nlisten = "0.0.0.0:{AGENT_CHECK_PORT}"\n'
        f'\n[metrics]\ntextfile = "{server.state_dir / METRICS}"\n')


def _fleet_view(c: Cluster, srv: Server, agent_says: str, mode: str) -> None:
    """What HAProxy learnt from ``srv``'s agent check, and ``srv``'s metrics file, once they
    show ``agent_says`` and chain ``mode``."""
    def row() -> dict[str, str] | None:
        text = c.haproxy_cmd("show stat").lstrip("# ")
        for r in csv.DictReader(io.StringIO(text)):
            if r.get("pxname") == "sslvpn" and r.get("svname") == srv.name:
                return r if r["last_agt"].startswith(f"via agent : {agent_says}") else None
        return None

    r = wait_for(row, 10, f"HAProxy to hear '{agent_says}' from {srv.name}'s agent check")
    status = r["status"]
    if status == "no check":  # HAProxy 2.6's word for UP when only an agent check runs
        status = "UP (no health check of its own: only the agent's)"
    _say(f"HAProxy's stats socket (show stat) for {srv.name}: status {status!r}, "
         f"agent check {r['last_agt']!r}")
    prom = srv.state_dir / METRICS
    want = f'sslvpn_heartbeat_chain_mode{{mode="{mode}"}} 1.0'
    wait_for(lambda: prom.exists() and want in prom.read_text(), 10, f"{prom.name} to say {mode}")
    keep = ("sslvpn_heartbeat_chain_mode", "sslvpn_heartbeat_service_healthy",
            "sslvpn_heartbeat_transitions_total", "sslvpn_heartbeat_failover_latency_seconds_count")
    _say(f"and its metrics file for node_exporter's textfile collector ({prom.name}, excerpt):")
    _show("\n".join(ln for ln in prom.read_text().splitlines() if ln.startswith(keep)))


def demo(n_servers: int, agents: bool, rate: float, gateway: str = "haproxy",
         fleet: bool = False) -> int:
    """Run the narrated demo; returns 0 once every step has run and the cluster is gone.
    ``fleet``: the agents also answer HAProxy's agent check and write their metrics file."""
    install_signal_handlers()
    started = time.monotonic()
    print(f"{_BOLD}sslvpn-heartbeat demo{_RESET}: the manual page's \"Testing the Scripts\" on "
          f"{n_servers} SSL VPN servers behind a load balancer,")
    print("all inside throwaway network namespaces on this machine (the host's own firewall is "
          "not touched).")
    if not agents:
        print(f"{_RED}Agents are OFF{_RESET}: this run shows what users get without them.")
    print("Press Ctrl-C at any time: everything is torn down.")

    gw_text = ("HAProxy (round robin with retries and redispatch, no health checks" if
               gateway == "haproxy" else
               "nginx (round robin, next server on a connect error, passive health only")
    _step(1, "Build the cluster",
          f"a client, a gateway running {gw_text}",
          "of its own, like the Access Gateway) and servers, each running a fake SSL VPN "
          "service" + (" and the agent." if agents else "."))
    extra: dict[str, Any] = ({"agent_config": _fleet_config,
                              "agent_check": (AGENT_CHECK_PORT, "100ms")} if fleet else
                             {"agent_config": _shipped_config})
    with Cluster(n_servers, agents=agents, gateway=gateway, **extra) as c:
        _say(f"ready in {time.monotonic() - started:.1f} s; the client talks to {c.url}")
        for s in c.servers:
            _say(f"{s.name}: {s.addr}:{s.port}, SSL VPN core pid {s.core_pid()}"
                 + (f", agent pid {s.agent.pid}" if s.agent else ""))
        s1 = c.server(1)
        others = " and ".join(s.name for s in c.servers[1:])

        _step(2, "Traffic is spread over the servers",
              f"the client sends {rate:.0f} requests/s for 2 s through the gateway:")
        _traffic(c, "spread", rate, 2.0)

        _step(3, "Stop the SSL VPN service on server 1, under load",
              f"the client keeps sending {rate:.0f} requests/s; on server 1 we run what the "
              "manual page runs:",
              f"{_BOLD}server1# /etc/init.d/novell-sslvpn stop{_RESET}")
        out = c.workdir / "load-failover.jsonl"
        tail = RecordTail(out)
        load = c.start_load(out, rate=rate, duration=4.0)
        wait_for(lambda: tail.reached(0.5), 5, "the load to start")
        stop_mark = tail.mark()
        s1.stop()
        if agents:
            wait_for(s1.is_blocked, 5, "server 1's agent to block port 8080")
        blocked_mark = tail.mark()
        _say(f"stopped. Its front end still answers, but only to say it is down "
             f"(asked on loopback): {_describe(http_get(s1.ns.name, '127.0.0.1', s1.port))}")
        _say(f"from the gateway, port {s1.port} now gives: {_describe(s1.get())}")

        _step(4, "Server 1's firewall",
              f"{_BOLD}server1# iptables -L{_RESET}   "
              + ("(the manual's lines are marked >; the empty FORWARD and OUTPUT chains are "
                 "left out)" if agents else
                 "(no agent, so no chain: nothing tells the gateway server 1 is down)"))
        _show_iptables_l(s1)
        if agents:
            _say("(the agent's default is reject_with = \"tcp-reset\": with the kernel's ICMP "
                 "rate limits on, a pooling gateway's")
            _say(" requests waited after a block with icmp-port-unreachable (HAProxy 11-12, nginx "
                 "12 of them), none with")
            _say(" tcp-reset; reject_with = \"icmp-port-unreachable\" gives the manual's line "
                 "exactly)")
        block = _agent_event(s1, "firewall-block") if agents else None
        if block is not None:
            _say()
            _say(f"the agent's log (one JSON object per line, here one key per line): port "
                 f"{s1.port} was blocked {_BOLD}{block.get('sslvpn_heartbeat.latency_ms', 0):.1f} ms{_RESET}")
            trigger = block.get("sslvpn_heartbeat.trigger")
            _say(f"after the kernel told it (trigger: {trigger}) that the service "
                 "had died:")
            _show("\n".join(_event_lines(block)))
        if fleet:
            _say()
            _fleet_view(c, s1, "down", "block")
        load.wait(timeout=15)
        recs = read_records(out)
        before = [r for r in recs if r.t < stop_mark]
        after = [r for r in recs if r.t > blocked_mark]
        bad = summarize(recs).bad
        _say()
        _say(f"what the client saw during these 4 s: {len(recs)} requests, {_bad(bad)} failed"
             + (f" {dict(sorted(summarize(recs).by_status.items()))}" if bad else ""))
        _say(f"before the stop, {len(before)} requests:")
        _bars(before, c.servers)
        _say(f"after the {'block' if agents else 'stop'}, {len(after)} requests"
             + (f", all on {others}:" if agents else ":"))
        _bars(after, c.servers)

        _step(5, "Start the service on server 1 again",
              f"{_BOLD}server1# /etc/init.d/novell-sslvpn start{_RESET}")
        t0 = time.monotonic()
        s1.start()
        if agents:
            wait_for(lambda: s1.chain_rules() == [], 10, "server 1's agent to open port 8080")
            unblock = _agent_event(s1, "firewall-unblock")
            _say(f"started; within {1e3 * (time.monotonic() - t0):.0f} ms of the command the "
                 "agent had seen it pass its probes")
            _say(f"({(unblock or {}).get('event.reason', '?')}) and emptied its chain.")
            _say(f"{_BOLD}server1# iptables -L {CHAIN}{_RESET}   (empty: port {s1.port} is "
                 "open)")
            _show(s1.iptables_L(CHAIN), marked=True)
            if fleet:
                _fleet_view(c, s1, "up", "open")
        _say(f"from the gateway, port {s1.port} gives: {_describe(s1.get())}")

        _step(6, "Traffic is back on every server",
              "the same load as in step 2:")
        _traffic(c, "back", rate, 2.0)
        print(f"\n{_BOLD}Tearing down{_RESET}: stopping every process, deleting every namespace.")
    print(f"Done in {time.monotonic() - started:.0f} s.", end=" ")
    if agents:
        print(f"Stopping server 1 cost the users {bad} failed request{'s' * (bad != 1)} "
              f"out of {len(recs)}.\nTo see the same without agents: ./scripts/demo --no-agents")
    else:
        print(f"Without agents, stopping server 1 cost {bad} failed requests out of "
              f"{len(recs)}.\nWith the agents (the default): ./scripts/demo")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry: ``demo``; exit 2 on usage errors, 69 when not root, 130 on Ctrl-C."""
    ap = argparse.ArgumentParser(prog="python -m tests.testbed")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="narrated failover demo on the namespace testbed")
    d.add_argument("--servers", type=int, default=2, choices=[2, 3])
    d.add_argument("--agents", action=argparse.BooleanOptionalAction, default=True,
                   help="run the agent on each server (--no-agents: see the 503s without it)")
    d.add_argument("--rate", type=float, default=100.0, help="client requests per second")
    d.add_argument("--gateway", choices=GATEWAY_KINDS, default="haproxy",
                   help="the load balancer in front of the servers (default haproxy)")
    d.add_argument("--fleet", action="store_true",
                   help="also show HAProxy's agent check and each agent's Prometheus metrics")
    d.add_argument("--fleet-guard", action="store_true",
                   help="four servers lose their shared back end: the agents alone, then with "
                        "the fleet guard on a three-member etcd cluster")
    a = ap.parse_args(argv)
    if a.fleet and (a.gateway != "haproxy" or not a.agents):
        ap.error("--fleet needs the agents and the HAProxy gateway (its agent check)")
    if a.fleet_guard and (a.fleet or a.gateway != "haproxy" or not a.agents):
        ap.error("--fleet-guard runs its own four servers with agents behind HAProxy: "
                 "no --fleet, --gateway nginx or --no-agents")
    if os.geteuid() != 0:
        print("the demo makes network namespaces: run it as root", file=sys.stderr)
        return 69
    try:
        if a.fleet_guard:
            from tests.testbed.fleetdemo import fleet_guard_demo  # etcd only for this demo

            install_signal_handlers()
            return fleet_guard_demo(rate=a.rate)
        return demo(a.servers, a.agents, a.rate, a.gateway, a.fleet)
    except KeyboardInterrupt:
        print("\ninterrupted: every process stopped and every namespace deleted.",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
