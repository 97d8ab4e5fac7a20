"""``./scripts/demo --fleet-guard``: four SSL VPN servers lose the back end they all depend on.

Two acts on the same testbed, same load, same outage: four servers behind HAProxy whose health
page (the agents' probe, ``/health``) and login page need one shared LDAP/RADIUS back end; the
portal of users already logged in (``/``) does not. The back end dies for ``down_s`` seconds.

* Act 1, agents without a fleet guard: every probe fails, every agent blocks port 8080, and
  every user request fails, the logged-in users' portal included.
* Act 2, the same agents with ``[fleet]`` (size 4, min_open 50 %) on a three-member etcd
  cluster: two agents get a permit and block, two are refused and keep their port open, so the
  portal stays served by two servers. Logins still fail everywhere: nobody can log in while the
  back end is down, with or without the guard, and the demo says so.

Everything runs in throwaway network namespaces; the host's firewall is never touched.
"""

from __future__ import annotations

import functools
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from tests.etcdcluster import EtcdCluster
from tests.testbed.cluster import CHAIN, Cluster, Server, _child_env, default_agent_config, http_get
from tests.testbed.load import Record, summarize
from tests.testbed.scenario import BackendOutage, BackendOutageOutcome, run_backend_outage

__all__ = ["SIZE", "fleet_guard_config", "fleet_guard_demo"]

SIZE = 4
MIN_OPEN = "50%"
HEALTH, LOGIN, PORTAL = "/health", "/login", "/"
GROUP = "sslvpn"
HAPROXY_RETRIES = 3  # the testbed's "retries 3" with "option redispatch 1"


def fleet_guard_config(etcd: EtcdCluster, server: Server, *, lease_s: int = 5) -> str:
    """The demo agent's configuration: probe /health, and ``[fleet]`` on ``etcd``'s members."""
    endpoints = ", ".join(f'"{e}"' for e in etcd.endpoints())
    return default_agent_config(server, http_path=HEALTH) + "\n".join([
        "[fleet]",
        f"etcd = [{endpoints}]",
        f'group = "{GROUP}"',
        f'member = "{server.name}"',
        f"size = {SIZE}",
        f'min_open = "{MIN_OPEN}"',
        f"lease_s = {lease_s}",
        "",
    ])


def _say(line: str = "") -> None:
    print(f"   {line}" if line else "", flush=True)


def _step(title: str, *what: str) -> None:
    print(f"\n== {title}", flush=True)
    for line in what:
        _say(line)


def _show(text: str) -> None:
    for line in text.rstrip().splitlines():
        print(f"   | {line.rstrip()}")


def _pct(bad: int, total: int) -> str:
    return f"{100.0 * bad / total:5.1f} % ({bad}/{total})" if total else "  n/a"


def _failure_kind(r: Record, servers: Sequence[Server]) -> str:
    """Who failed a request: a server's own answer, HAProxy's, or no answer at all."""
    if r.status == 0:
        return "no answer"
    if r.server in {s.name for s in servers}:
        return f"{r.status} from a server"
    return f"{r.status} from HAProxy"


def _users(recs: Sequence[Record], servers: Sequence[Server], what: str) -> None:
    s = summarize(recs)
    kinds = Counter(_failure_kind(r, servers) for r in recs if r.bad)
    failed = f"{s.bad} failed" + (f" ({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))})"
                                  if kinds else "")
    _say(f"{what}: {s.total} requests, {failed}; answered 2xx by:")
    for srv in servers:
        n = s.by_server.get(srv.name, 0)
        _say(f"   {srv.name:>8} {n:5d} {'#' * round(40 * n / max(1, s.total))}")


def _last_event(srv: Server, action: str) -> dict[str, Any] | None:
    found = [e for e in srv.agent_events() if e.get("event.action") == action]
    return found[-1] if found else None


def _narrate_outage(cluster: Cluster, guard: bool) -> None:
    """What every server's agent did by the end of the outage, and (with the guard) the group."""
    s1 = cluster.server(1)
    health = http_get(s1.ns.name, "127.0.0.1", s1.port, HEALTH)
    _say(f"{s1.name}# curl http://127.0.0.1:{s1.port}{HEALTH}   -> HTTP {health.status} "
         f"{health.body.strip()!r}")
    _say(f"its core lives (pid {s1.core_pid()}) and port {s1.port} accepts connections: for the "
         "agent a suspect DOWN, not a proven one.")
    for srv in cluster.servers:
        state = "BLOCKED (REJECT in its chain)" if srv.is_blocked() else "open"
        line = f"{srv.name}: port {srv.port} {state}"
        refused = _last_event(srv, "fleet-guard-refused") if guard else None
        if refused is not None and state == "open":
            not_open = ", ".join(refused.get("sslvpn_heartbeat.not_open", [])) or "none"
            line += (f"; its agent logged fleet-guard-refused (not open: {not_open}; "
                     f"min_open {refused.get('sslvpn_heartbeat.min_open', '?')})")
        _say(line)
    if guard:
        _say()
        _say(f"{s1.name}# sslvpn-heartbeat fleet")
        out = s1.ns.run([sys.executable, "-m", "watcher", "fleet", "--config",
                         str(s1.config_path)], check=False, env=_child_env(), timeout=30)
        _show(out.stdout or out.stderr)
    _say()
    _say(f"{s1.name}# iptables -L {CHAIN}")
    _show(s1.iptables_L(CHAIN))


def _act(title: str, cluster: Cluster, outage: BackendOutage, guard: bool) -> BackendOutageOutcome:
    _say(f"users: logged-in users load the portal ({PORTAL}) {outage.rate:.0f} times/s, new "
         f"users log in ({LOGIN}) {outage.extra_loads[0][1]:.0f} times/s.")
    _say(f"the shared back end dies for {outage.down_s:.0f} s ...")
    outcome = run_backend_outage(cluster, cluster.workdir / "portal.jsonl", outage,
                                 before_up=functools.partial(_narrate_outage, cluster, guard))
    _say(f"the back end is back; every agent had opened its port again "
         f"{outcome.recovered_s:.1f} s later.")
    _say()
    _say(f"what users got in the last half of the outage (every agent had decided by then), "
         f"{title}:")
    _users(outcome.during_tail(0.5), cluster.servers, f"portal {PORTAL}")
    _users(outcome.during_tail(0.5, LOGIN), cluster.servers, f"logins {LOGIN}")
    if guard:
        _say(f"(HAProxy's 503s: with two of four servers blocked, its {HAPROXY_RETRIES} retries "
             "sometimes all meet a blocked server.)")
    return outcome


def _row(label: str, a: str, b: str) -> None:
    _say(f"{label:<44}{a:>22}{b:>22}")


def fleet_guard_demo(rate: float = 40.0, down_s: float = 8.0,
                     cluster_factory: Callable[..., Cluster] = Cluster) -> int:
    """Run both acts and print the comparison; 0 once both ran and everything is torn down."""
    started = time.monotonic()
    outage = BackendOutage(rate=rate, path=PORTAL, down_s=down_s, extra_loads=((LOGIN, rate / 4),))
    common: dict[str, Any] = {"agents": True, "backend": True, "backend_paths": (HEALTH, LOGIN),
                              "ready_timeout": 30.0}
    print(f"sslvpn-heartbeat demo --fleet-guard: {SIZE} SSL VPN servers behind HAProxy share one "
          "LDAP/RADIUS back end, and it dies.")
    print("All inside throwaway network namespaces; the host's firewall is not touched.")

    _step("Act 1: the agents alone (no [fleet])",
          f"{SIZE} servers, each with a fake SSL VPN service whose {HEALTH} and {LOGIN} need "
          "the back end, and the agent probing " + HEALTH + ".")
    with cluster_factory(SIZE, agent_config=functools.partial(default_agent_config,
                                                              http_path=HEALTH),
                         **common) as c1:
        alone = _act("without the guard", c1, outage, guard=False)

    _step("Act 2: the same agents with the fleet guard",
          f"a three-member etcd cluster (Debian's etcd, each member in its own namespace); every "
          f"agent has [fleet] size = {SIZE}, min_open = \"{MIN_OPEN}\": at most "
          f"{SIZE - 2} suspect blocks at once.")
    with EtcdCluster() as etcd:
        _say(f"etcd endpoints: {', '.join(etcd.endpoints())} (leader: etcd{etcd.leader()})")
        with cluster_factory(SIZE, agent_config=functools.partial(fleet_guard_config, etcd),
                             etcd=etcd, **common) as c2:
            guarded = _act("with the guard", c2, outage, guard=True)

    _step("What users got while the back end was down (last half of the outage)")
    _row("", "without the guard", "with the guard")
    _row("servers blocked at the worst moment", f"{alone.max_blocked_during} of {SIZE}",
         f"{guarded.max_blocked_during} of {SIZE}")
    for label, path in ((f"portal {PORTAL} (logged-in users) failed", None),
                        (f"logins {LOGIN} failed", LOGIN)):
        a, g = alone.during_tail(0.5, path), guarded.during_tail(0.5, path)
        _row(label, _pct(sum(r.bad for r in a), len(a)), _pct(sum(r.bad for r in g), len(g)))
    _say()
    _say("Logins fail either way: no server can check a password while its back end is down. "
         "The guard")
    _say("keeps the servers that can still serve (the portal of users already logged in) in "
         "rotation instead")
    _say("of letting every agent take its server out because of a cause they all share.")
    print(f"\nDone in {time.monotonic() - started:.0f} s; every process stopped and every "
          "namespace deleted.")
    return 0

