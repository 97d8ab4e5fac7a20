"""Bad answers per failover behind a real HAProxy, for each protector, with client load running.

    python -m bench.cluster_failover [--failovers 10] [--servers 2] [--rate 200]
                                     [--protectors none,agent,polling,monit] [--json FILE]
                                     [--http-mode server-close|keep-alive]

Root only. One cluster (tests.testbed.cluster: HAProxy round robin with retries and redispatch,
no health checks of its own) per protector; ``none`` runs no protector at all, as the contrast.
Each failover runs its own bounded load (tests.testbed.load, fixed rate, new connection per
request) and, while it runs: SIGKILL server 1's core (``ctl kill-core``), keep it down for
``--down-s``, start it (``ctl start``), keep it up for ``--up-s``. Every answer that is not a
2xx (a 503 from the dead server, a timeout, a reset) counts as bad. Prints a table; never passes
or fails.

``--http-mode keep-alive`` makes HAProxy reuse idle server connections (the gateway's
persistent connections); the protector ``agent-reset`` is the agent with
``firewall.reject_with = "tcp-reset"``, to compare how each reject reaches a reused connection.

The servers keep the kernel's default ICMP rate limits (unlike bench.failover, whose client
hammers one address on purpose): this is the realistic case for a gateway.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.failover import AgentSettings, percentile, protector_argv
from bench.machine import ICMP_LIMITS_KEPT, machine_line
from tests.netns import wait_for
from tests.testbed.cluster import Cluster, Server
from tests.testbed.load import read_records

__all__ = ["PEERS", "VARIANTS", "main", "run_protector"]

PEERS = ("none", "agent", "polling", "monit")
# Not in the default run: the agent answering with TCP resets (firewall.reject_with).
VARIANTS = ("agent-reset",)


def _back_in_rotation(c: Cluster, srv: Server, protected: bool) -> bool:
    return srv.core_pid() is not None and (not protected or srv.chain_rules() == []) \
        and srv.get(timeout=0.5).ok


def run_protector(name: str, failovers: int, *, servers: int, rate: float, down_s: float,
                  up_s: float, lead_s: float, workdir: Path, http_mode: str = "server-close",
                  progress: bool = False) -> dict[str, Any]:
    """Run ``failovers`` kill/start cycles of server 1 under load; per-failover answer counts.

    ``http_mode`` is HAProxy's server side: ``server-close`` (a new connection per request) or
    ``keep-alive`` (idle server connections reused, the gateway's persistent connections).
    """
    agent = AgentSettings(reject_with="tcp-reset") if name == "agent-reset" else AgentSettings()

    def argv(srv: Server) -> list[str] | None:
        if name == "none":
            return None
        kind = "agent" if name.startswith("agent") else name
        return protector_argv(kind, srv.pid_file, srv.state_dir / name, port=srv.port,
                              agent=agent)

    per: list[dict[str, Any]] = []
    with Cluster(servers, agents=name != "none", agent_argv_factory=argv, agent_config=None,
                 workdir=workdir, http_mode=http_mode) as c:
        s1 = c.server(1)
        for i in range(failovers):
            wait_for(lambda: _back_in_rotation(c, s1, name != "none"), 15,
                     "server 1 back in rotation", interval=0.05)
            out = workdir / f"load-{i}.jsonl"
            duration = lead_s + down_s + up_s
            load = c.start_load(out, rate=rate, duration=duration, timeout=2.0)
            def answering(o: Path = out) -> bool:
                return len(read_records(o)) >= 10

            wait_for(answering, 10, "the first answers")
            # The schedule of the failover under load: hold each phase for its time.
            time.sleep(lead_s)
            s1.kill_core()
            time.sleep(down_s)
            s1.start()
            time.sleep(up_s)
            load.wait(timeout=duration + 10)
            recs = read_records(out)
            bad = [r for r in recs if r.bad]
            lat = [r.latency_ms for r in recs if not r.bad]
            row = {"total": len(recs), "bad": len(bad),
                   "bad_by_kind": dict(Counter(str(r.status) if r.status else
                                               r.error.split(":")[0] for r in bad)),
                   "p99_ms": round(percentile(lat, 99), 1), "max_ms": round(max(lat, default=0), 1),
                   "by_server": dict(Counter(r.server for r in recs if not r.bad))}
            per.append(row)
            if progress:
                print(f"  {name} failover {i + 1}/{failovers}: {row}", file=sys.stderr)
    return {"failovers": per}


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry: every protector's failovers, then one table (markdown)."""
    ap = argparse.ArgumentParser(prog="python -m bench.cluster_failover",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--failovers", type=int, default=10)
    ap.add_argument("--servers", type=int, default=2)
    ap.add_argument("--rate", type=float, default=200.0, help="client requests per second")
    ap.add_argument("--down-s", type=float, default=2.0)
    ap.add_argument("--up-s", type=float, default=2.0)
    ap.add_argument("--lead-s", type=float, default=0.5, help="load before the kill")
    ap.add_argument("--protectors", default=",".join(PEERS),
                    help=f"from {', '.join(PEERS + VARIANTS)}")
    ap.add_argument("--http-mode", choices=("server-close", "keep-alive"), default="server-close",
                    help="HAProxy's server side: a connection per request, or reused ones")
    ap.add_argument("--json", type=Path)
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.cluster_failover: run as root (it makes network namespaces)", file=sys.stderr)
        return 2
    names = [n.strip() for n in a.protectors.split(",") if n.strip()]
    for n in names:
        if n not in PEERS + VARIANTS:
            ap.error(f"unknown protector {n!r}")
    if "monit" in names and shutil.which("monit") is None:
        print("bench.cluster_failover: monit is not installed; skipping it", file=sys.stderr)
        names.remove("monit")
    results: dict[str, Any] = {}
    for name in names:
        print(f"bench.cluster_failover: {name}, {a.failovers} failovers", file=sys.stderr)
        with tempfile.TemporaryDirectory(prefix=f"svh-cbench-{name}-") as tmp:
            results[name] = run_protector(name, a.failovers, servers=a.servers, rate=a.rate,
                                          down_s=a.down_s, up_s=a.up_s, lead_s=a.lead_s,
                                          workdir=Path(tmp), http_mode=a.http_mode,
                                          progress=a.verbose)
    print(machine_line(ICMP_LIMITS_KEPT))
    print(f"# bench.cluster_failover: {a.failovers} failovers of server 1 of {a.servers}, "
          f"{a.rate:g} req/s, down {a.down_s:g} s, up {a.up_s:g} s, HAProxy {a.http_mode}; "
          f"kernel {os.uname().release}, "
          f"{os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f})")
    print("\n| protector | requests | bad per failover: mean | max | total bad | kinds | "
          "worst p99 of good answers, ms |\n|---|---|---|---|---|---|---|")
    for name, res in results.items():
        per = res["failovers"]
        bads = [f["bad"] for f in per]
        kinds: Counter[str] = Counter()
        for f in per:
            kinds.update(f["bad_by_kind"])
        p99 = max((f["p99_ms"] for f in per), default=0.0)
        print(f"| {name} | {sum(f['total'] for f in per)} | {sum(bads) / max(len(bads), 1):.1f} | "
              f"{max(bads, default=0)} | {sum(bads)} | "
              f"{', '.join(f'{k} x{v}' for k, v in kinds.most_common()) or '-'} | {p99} |")
    if a.json:
        a.json.write_text(json.dumps({"settings": vars(a) | {"json": str(a.json)},
                                      "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
