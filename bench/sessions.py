"""Behind a pooling gateway, per agent setting: requests that wait or fail after server 1 hangs
and is blocked, and server 1's share of new requests during a drain.

    python -m bench.sessions [--gateways haproxy,nginx] [--rounds 1] [--json FILE]

Root only. For each gateway (HAProxy 2.6 ``http-reuse always``, nginx 1.22 upstream
``keepalive 16``; a 1 s connect timeout) and each setting ``reject_with`` x ``established``,
one cluster (tests.testbed.sessions: two servers with agents, a client at 100 requests/s,
ICMP rate limits on) runs both scenarios: server 1's service hangs (alive, listening, silent)
until its agent blocks it, then answers again and is back in rotation; then ``block --drain``
on server 1 with six 1.5 s requests in flight. Prints a table; never passes or fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.machine import machine_line
from tests.netns import wait_for
from tests.testbed.cluster import GATEWAY_KINDS
from tests.testbed.sessions import WAIT_S, cli_in, pooled_cluster, run_drain, run_hang

__all__ = ["SETTINGS", "main", "run_setting"]

SETTINGS = (("tcp-reset", "reset"), ("tcp-reset", "keep"),
            ("icmp-port-unreachable", "reset"), ("icmp-port-unreachable", "keep"))


def run_setting(gateway: str, reject_with: str, established: str, workdir: Path) -> dict[str, Any]:
    """One cluster for ``gateway`` and the setting: the hang, then the drain; their figures."""
    with pooled_cluster(gateway, workdir, reject_with=reject_with, established=established) as c:
        hang = run_hang(c, workdir / "hang.jsonl")
        s1 = c.server(1)
        wait_for(lambda: s1.chain_rules() == [] and s1.get(timeout=0.5).ok, 15,
                 "server 1 back in rotation after the hang")
        drain = run_drain(c, workdir / "drain.jsonl", cli_in)
    return {"gateway": gateway, "reject_with": reject_with, "established": established,
            "hang_after": hang.after, "hang_waited": hang.waited, "hang_failed": hang.failed,
            "hang_block_s": hang.block_s, "hang_slowest_ms": hang.slowest_ms,
            "drain_after": drain.after, "drain_on_s1": drain.on_drained,
            "drain_share": round(drain.share, 4), "drain_failed": drain.failed,
            "long_ok": sum(r.ok for r in drain.long_replies),
            "long_total": len(drain.long_replies)}


def _table(rows: list[dict[str, Any]]) -> str:
    head = ("| gateway | reject_with | established | after the block: requests, waited "
            f">= {WAIT_S:g} s, failed | drain: server 1's share of new requests after 1 s "
            "| drain: failed | long requests answered |")
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['gateway']} | `{r['reject_with']}` | `{r['established']}` | "
            f"{r['hang_after']}, {r['hang_waited']}, {r['hang_failed']} | "
            f"{100 * r['drain_share']:.1f} % ({r['drain_on_s1']} of {r['drain_after']}) | "
            f"{r['drain_failed']} | {r['long_ok']} of {r['long_total']} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run every gateway x setting; print the table (and write JSON if asked)."""
    ap = argparse.ArgumentParser(prog="python -m bench.sessions")
    ap.add_argument("--gateways", default=",".join(GATEWAY_KINDS))
    ap.add_argument("--rounds", type=int, default=1, help="clusters per gateway and setting")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.sessions makes network namespaces: run it as root", file=sys.stderr)
        return 69
    gateways = [g for g in a.gateways.split(",") if g]
    print(f"bench.sessions: {machine_line()}; ICMP rate limits on (kernel defaults)")
    rows: list[dict[str, Any]] = []
    started = time.monotonic()
    for _ in range(a.rounds):
        for gw in gateways:
            for reject_with, established in SETTINGS:
                work = Path(tempfile.mkdtemp(prefix="svh-bench-sessions-"))
                try:
                    row = run_setting(gw, reject_with, established, work)
                finally:
                    shutil.rmtree(work, ignore_errors=True)
                print(f"  {gw} {reject_with} {established}: {row}", file=sys.stderr)
                rows.append(row)
    print()
    print(_table(rows))
    print(f"\n{len(rows)} clusters in {time.monotonic() - started:.0f} s. Each: 100 requests/s "
          "from the client, each on a new connection to the gateway; server 1 hangs 1 s into "
          "its load until its agent blocks it; later 'block --drain' on server 1 with six "
          "1.5 s requests in flight.")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
