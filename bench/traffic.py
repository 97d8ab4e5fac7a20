"""What the service's own traffic costs the agent: CPU, wakeups and RSS, and failover under it.

    python -m bench.traffic [--rates 0,500,1000,2000,max] [--seconds 30] [--rounds 10] [--json FILE]

Root only. Two server/client namespace pairs (bench.failover.ServerBed), each with the fake
SSL VPN service and an agent: ``filtered`` (the product: the classic BPF filter on the
sock_diag destroy socket) and ``unfiltered`` (the same agent started through this module's
``_unfiltered-agent`` wrapper, which builds its ListenerWatch without the filter: the cost
before it; the shipped agent has no switch for it).
Both run side by side through the same seconds. For each rate N (connections a second; ``max``:
one client as fast as it goes):

1. a client process in each client namespace opens and closes N short TCP connections a
   second to the service port (paced, bounded in count and time) for ``--seconds``;
2. meanwhile the agents are read from /proc every 5 s: CPU (utime + stime from
   /proc/PID/stat, and the threads' run time from /proc/PID/task/*/schedstat, in ns), context
   switches (voluntary and involuntary, all threads, from /proc/PID/task/*/status) and RSS;
3. with the same traffic still running (new clients), ``--rounds`` failovers of each bed in
   turn, as bench.failover measures them (core SIGKILL -> first refused connect from the client namespace).

N = 0 is the idle row the others are compared with, over windows of the same length. Prints
distributions (per 5 s window) and ratios; never passes or fails.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.failover import (
    PORT,
    SERVER_ADDR,
    AgentSettings,
    Limits,
    ServerBed,
    child_env,
    percentile,
    run_rounds,
    stats,
)
from bench.machine import ICMP_LIMITS_OFF, machine_line
from tests.netns import REPO

__all__ = ["Reading", "main", "read_agent", "run_client"]

CLK_TCK = os.sysconf("SC_CLK_TCK")
VARIANTS = ("filtered", "unfiltered")
STEP_S = 5.0  # one sample window: one safety-net tick of the agent


# --- the client --------------------------------------------------------------------------------

# --- reading the agent -------------------------------------------------------------------------

@dataclass(frozen=True)
class Reading:
    """One reading of the agent process from /proc."""

    t: float
    utime_stime: int  # clock ticks, the process itself (all its threads, dead ones too)
    children: int  # clock ticks of the children it reaped (iptables-save, ...)
    run_ns: int  # sum of its live threads' run time (schedstat), ns
    voluntary: int
    involuntary: int
    rss_kb: int


def read_agent(pid: int) -> Reading:
    """Read /proc/PID now (raises OSError when the process is gone)."""
    stat = Path(f"/proc/{pid}/stat").read_bytes()
    fields = stat[stat.rfind(b")") + 2:].split()
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    run_ns = vol = invol = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            run_ns += int((task / "schedstat").read_text().split()[0])
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    vol += int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches:"):
                    invol += int(line.split()[1])
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return Reading(time.monotonic(), utime + stime, cutime + cstime, run_ns, vol, invol, rss)


def _windows(readings: Sequence[Reading]) -> dict[str, list[float]]:
    """Per sample window: CPU ms a second (ticks and schedstat), wakeups a second."""
    out: dict[str, list[float]] = {"cpu_ms_per_s": [], "run_ms_per_s": [],
                                   "voluntary_per_s": [], "switches_per_s": []}
    for a, b in itertools.pairwise(readings):
        dt = b.t - a.t
        out["cpu_ms_per_s"].append((b.utime_stime - a.utime_stime) * 1000 / CLK_TCK / dt)
        out["run_ms_per_s"].append((b.run_ns - a.run_ns) / 1e6 / dt)
        out["voluntary_per_s"].append((b.voluntary - a.voluntary) / dt)
        out["switches_per_s"].append((b.voluntary + b.involuntary
                                      - a.voluntary - a.involuntary) / dt)
    return out


def _total(readings: Sequence[Reading]) -> dict[str, float]:
    a, b = readings[0], readings[-1]
    dt = b.t - a.t
    return {"seconds": round(dt, 2),
            "cpu_ms": (b.utime_stime - a.utime_stime) * 1000 / CLK_TCK,
            "children_cpu_ms": (b.children - a.children) * 1000 / CLK_TCK,
            "run_ms": (b.run_ns - a.run_ns) / 1e6,
            "voluntary": b.voluntary - a.voluntary,
            "involuntary": b.involuntary - a.involuntary,
            "rss_mb": round(b.rss_kb / 1024, 1)}


# --- the run -----------------------------------------------------------------------------------

def _unfiltered_agent(argv: Sequence[str]) -> int:
    """Run the agent's CLI with the sock_diag destroy socket left unfiltered (the benchmark's
    baseline), by building the daemon's ListenerWatch with ``kernel_filter=False``."""
    import functools

    from watcher import daemon
    from watcher.cli import commands as cli

    daemon.ListenerWatch = functools.partial(  # type: ignore[misc]  # the benchmark's variant
        daemon.ListenerWatch, kernel_filter=False)
    return cli.main(list(argv))


def _start_clients(beds: dict[str, ServerBed], rate: float,
                   seconds: float) -> dict[str, subprocess.Popen[str]]:
    procs = {}
    for name, bed in beds.items():
        assert bed.client is not None
        procs[name] = bed.client.popen(
            [sys.executable, "-m", "bench.traffic", "_client", SERVER_ADDR, str(PORT), str(rate),
             str(seconds)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, cwd=str(REPO), env=child_env())
    return procs


def _stop(procs: dict[str, subprocess.Popen[str]], timeout: float = 15.0) -> dict[str, Any]:
    """SIGINT the clients (each stops and prints its counts) and collect what they printed."""
    for client in procs.values():
        with contextlib.suppress(ProcessLookupError):
            client.send_signal(signal.SIGINT)
    out = {}
    for name, p in procs.items():
        try:
            stdout, stderr = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            stdout, stderr = p.communicate(timeout=5)
        try:
            out[name] = json.loads(stdout)
        except ValueError:
            out[name] = {"error": stderr[-500:]}
    return out


def measure_rate(beds: dict[str, ServerBed], pids: dict[str, int], rate: float | None,
                 seconds: float, rounds: int, lim: Limits, *,
                 first_odd: bool = False) -> dict[str, Any]:
    """One rate (connections a second; 0: no client; None: as fast as one client goes): the
    CPU window, then failovers of one bed after the other, all under the same traffic."""
    client_rate = 0.0 if rate is None else rate
    # The window's own clients (their counts are the window's), stopped right after it.
    procs = _start_clients(beds, client_rate, seconds + 30) if rate != 0 else {}
    time.sleep(1.0)  # the traffic settles before the window (not a synchronisation)
    readings: dict[str, list[Reading]] = {n: [read_agent(p)] for n, p in pids.items()}
    steps = max(1, round(seconds / STEP_S))
    t0 = time.monotonic()
    for i in range(1, steps + 1):
        time.sleep(max(0.0, t0 + i * STEP_S - time.monotonic()))  # the sampling period
        for n, p in pids.items():
            readings[n].append(read_agent(p))
    clients = _stop(procs)
    failovers: dict[str, list[float]] = {}
    missed: dict[str, int] = {}
    if rounds:
        # New clients keep the same traffic on both beds through the failovers.
        procs = _start_clients(beds, client_rate, rounds * 10.0 + 30) if rate != 0 else {}
        # The beds take turns, in an order that alternates from one rate to the next.
        order = list(beds.items())
        if first_odd:
            order.reverse()
        try:
            for n, bed in order:
                rs = run_rounds(bed, rounds, lim, dephase_s=0.3)
                failovers[n] = [r.failover_ms for r in rs if r.failover_ms is not None]
                missed[n] = sum(r.failover_ms is None for r in rs)
        finally:
            during = _stop(procs)
        for n in clients:
            clients[n] = {"window": clients[n], "failovers": during.get(n, {})}
    return {n: {"windows": _windows(readings[n]), "total": _total(readings[n]),
                "failover_ms": failovers.get(n, []), "missed": missed.get(n, 0),
                "client": clients.get(n, {})} for n in pids}


def run_client(addr: str, port: int, rate: float, seconds: float) -> dict[str, Any]:
    """Open and close TCP connections to ``addr:port``, ``rate`` a second (0: as fast as it
    goes), for at most ``seconds`` or until SIGINT: counts of answers, and the rate reached."""
    stop = {"now": False}

    def on_int(signum: int, frame: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGINT, on_int)
    limit = int(rate * seconds) if rate > 0 else 10_000_000
    counts = {"ok": 0, "refused": 0, "timeout": 0, "other": 0}
    t0 = time.monotonic()
    end = t0 + seconds
    n = 0
    while n < limit and not stop["now"]:
        now = time.monotonic()
        if now >= end:
            break
        if rate > 0:
            due = t0 + n / rate
            if due > now:
                time.sleep(due - now)  # pacing, not a synchronisation
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # A SYN the service's full backlog dropped would wait a second for its retransmit:
        # give up sooner, so the rate reached is what the service accepts, not the stalls.
        s.settimeout(0.2)
        try:
            r = s.connect_ex((addr, port))
        except TimeoutError:
            r = errno.ETIMEDOUT
        finally:
            s.close()
        key = {0: "ok", errno.ECONNREFUSED: "refused", errno.ETIMEDOUT: "timeout",
               errno.EAGAIN: "timeout", errno.EINPROGRESS: "timeout"}.get(r, "other")
        counts[key] += 1
        n += 1
    elapsed = time.monotonic() - t0
    return {"connections": n, "seconds": round(elapsed, 3), "rate": round(n / elapsed, 1),
            **counts}


# --- report ------------------------------------------------------------------------------------

def _f(v: float) -> str:
    return "-" if v != v else (f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 100 else f"{v:.0f}")


def _dist(values: Sequence[float]) -> str:
    if not values:
        return "-"
    return f"{_f(percentile(values, 50))} ({_f(min(values))}-{_f(max(values))})"


def report(results: dict[str, dict[str, Any]], seconds: float) -> list[str]:
    """The tables (markdown lines) of a run."""
    lines = ["", f"## Agent cost under traffic ({seconds:g} s per rate; per {STEP_S:g} s window: "
                 "median (min-max))", "",
             "| rate asked | variant | reached /s | CPU ms/s (stat) | run ms/s (schedstat) | "
             "x idle (stat) | x idle (schedstat) | voluntary switches/s | all switches/s | "
             "RSS MB |", "|---|---|---|---|---|---|---|---|---|---|"]
    idle = results.get("0", {})
    for rate, res in results.items():
        for v in VARIANTS:
            r = res[v]
            t = r["total"]
            base = idle.get(v, {}).get("total")
            x_stat = t["cpu_ms"] / base["cpu_ms"] if base and base["cpu_ms"] else float("nan")
            x_run = t["run_ms"] / base["run_ms"] if base and base["run_ms"] else float("nan")
            w = r["windows"]
            window = r["client"].get("window", r["client"])
            reached = window.get("rate", 0.0) if rate != "0" else 0.0
            answered = (f" ({100 * window.get('ok', 0) / max(window.get('connections', 1), 1):.0f}"
                        f" % accepted)" if rate != "0" else "")
            lines.append(
                f"| {rate} | {v} | {_f(reached)}{answered} | {_dist(w['cpu_ms_per_s'])} | "
                f"{_dist(w['run_ms_per_s'])} | {_f(x_stat)} | {_f(x_run)} | "
                f"{_dist(w['voluntary_per_s'])} | {_dist(w['switches_per_s'])} | {t['rss_mb']} |")
    lines += ["", "(x idle: CPU over the whole window at this rate / over the idle window of the "
                  "same length; stat: utime+stime in clock ticks of "
                  f"{1000 / CLK_TCK:g} ms; schedstat: the live threads' run time in ns)"]
    lines += ["", "## Failover under traffic: core SIGKILL -> first refused connect (ms)", "",
              "| rate asked | variant | n | p50 | p90 | p99 | max | p50 / idle p50 |",
              "|---|---|---|---|---|---|---|---|"]
    for rate, res in results.items():
        for v in VARIANTS:
            s = stats(res[v]["failover_ms"])
            base = stats(idle.get(v, {}).get("failover_ms", []))["p50"]
            miss = f" missed {res[v]['missed']}" if res[v]["missed"] else ""
            lines.append(f"| {rate} | {v} | {int(s['n'])} | {_f(s['p50'])} | {_f(s['p90'])} | "
                         f"{_f(s['p99'])} | {_f(s['max'])} | {_f(s['p50'] / base)}{miss} |")
    lines += ["", "## Clients (each bed's own client: in the CPU window, then during the "
                  "failovers of both beds; connects time out after 0.2 s)", ""]
    for rate, res in results.items():
        if rate == "0":
            continue
        lines.append(f"- {rate}: " + "; ".join(
            f"{v} {json.dumps(res[v]['client'], sort_keys=True)}" for v in VARIANTS))
    if "0" in results and "1000" in results:
        f0, f1 = results["0"]["filtered"], results["1000"]["filtered"]
        u0, u1 = results["0"]["unfiltered"], results["1000"]["unfiltered"]
        lines += ["", "## Targets (filtered agent)", ""]
        lines.append(f"- CPU at 1000/s vs idle over the same seconds: "
                     f"{_f(f1['total']['cpu_ms'] / max(f0['total']['cpu_ms'], 1e-9))}x by "
                     f"/proc/PID/stat ({_f(f1['total']['cpu_ms'])} vs "
                     f"{_f(f0['total']['cpu_ms'])} ms), "
                     f"{_f(f1['total']['run_ms'] / max(f0['total']['run_ms'], 1e-9))}x by "
                     f"schedstat ({_f(f1['total']['run_ms'])} vs {_f(f0['total']['run_ms'])} ms) "
                     f"(target <= 1.2x; the unfiltered agent: "
                     f"{_f(u1['total']['cpu_ms'] / max(u0['total']['cpu_ms'], 1e-9))}x)")
        p0, p1 = stats(f0["failover_ms"])["p50"], stats(f1["failover_ms"])["p50"]
        lines.append(f"- failover p50 at 1000/s vs idle: {_f(p1)} vs {_f(p0)} ms, "
                     f"{_f(p1 / p0)}x (target within 20 %)")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry: both agents, every rate, the tables (markdown) on stdout."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["_unfiltered-agent"]:
        return _unfiltered_agent(args[1:])
    if args[:1] == ["_client"]:
        addr, port, rate, seconds = args[1], int(args[2]), float(args[3]), float(args[4])
        print(json.dumps(run_client(addr, port, rate, seconds)))
        return 0
    ap = argparse.ArgumentParser(prog="python -m bench.traffic", description=__doc__.split("\n")[0])
    ap.add_argument("--rates", default="0,500,1000,2000,max",
                    help="connections a second, comma-separated; 'max': as fast as one client goes")
    ap.add_argument("--seconds", type=float, default=30.0, help="CPU window per rate")
    ap.add_argument("--rounds", type=int, default=20, help="failovers per rate and variant")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(args)
    if os.geteuid() != 0:
        print("bench.traffic: run as root (it makes network namespaces)", file=sys.stderr)
        return 2
    rates: list[tuple[str, float | None]] = []
    for item in (x.strip() for x in a.rates.split(",")):
        if item == "max":
            rates.append((item, None))
        elif item:
            try:
                value = float(item)
            except ValueError:
                ap.error(f"--rates: {item!r} is neither a number nor 'max'")
            if value < 0:
                ap.error(f"--rates: {item} is negative")
            rates.append((item, value))
    header = machine_line(ICMP_LIMITS_OFF)
    agent = AgentSettings()
    lim = Limits()
    beds: dict[str, ServerBed] = {}
    results: dict[str, dict[str, Any]] = {}
    try:
        for i, v in enumerate(VARIANTS):
            beds[v] = bed = ServerBed(prefix=f"svt{i}")
            bed.start_protector("agent", agent=agent, launcher=(
                ("bench.traffic", "_unfiltered-agent") if v == "unfiltered" else ()))
        for bed in beds.values():
            bed.wait_protected_open()
        pids = {}
        for v, bed in beds.items():
            assert bed.protector is not None
            pids[v] = bed.protector.pid
        for i, (label, asked) in enumerate(rates):
            print(f"bench.traffic: rate {label}", file=sys.stderr)
            results[label] = measure_rate(beds, pids, asked, a.seconds, a.rounds, lim,
                                          first_odd=i % 2 == 1)
    finally:
        for bed in beds.values():
            bed.close()
    print(header)
    print(f"# bench.traffic: agents filtered and unfiltered (no kernel filter) side by side, "
          f"{a.seconds:g} s per rate, {a.rounds} failovers per rate and variant; agent "
          f"interval_s={agent.interval_s}; client: one process per bed, connect + close")
    print("\n".join(report(results, a.seconds)))
    if a.json:
        a.json.write_text(json.dumps({"header": header, "settings": asdict(agent),
                                      "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
