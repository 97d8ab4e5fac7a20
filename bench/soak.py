"""Soak: thousands of failovers against one agent; does anything grow, is any transition missed?

    python -m bench.soak --seconds 120 [--max-failovers 5000] [--json FILE]

Root only; not a test (it prints figures and never passes or fails on a time). One throwaway
network namespace holds the fake SSL VPN service (tests/testbed/fakesvc.py) and one agent
(``python -m watcher run``, rise 1, safety net every 5 s). The core is a ``sleep`` this program
starts and reaps, its PID written to the service's PID file by rename (a Python core would
spend most of the run starting up). A failover: SIGKILL the core, wait until the kernel's chain
blocks port 8080 (read with iptables-save), start a new core, wait until the chain is open
again. Every wait has a deadline;
one that expires is a missed transition. The agent's RSS and open descriptors are sampled after
a warm-up and at the end; its log gives the firewall events and their ``transactions``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.machine import machine_line
from tests.agent import Agent, Service, agent_config, chain_view
from tests.netns import Netns, wait_for
from tests.testbed.fakesvc import write_pid_atomic

__all__ = ["Soak", "main", "run_soak"]

WARMUP = 20  # failovers before the first RSS/fd sample (imports, caches, first allocations)
DEADLINE_S = 5.0
SERIES_EVERY_S = 20.0  # RSS sampled this often, to tell warm-up from steady growth


@dataclass
class Soak:
    """What one soak run measured."""

    seconds: float = 0.0
    failovers: int = 0
    missed_block: int = 0
    missed_open: int = 0
    rss_kib: dict[str, int] = field(default_factory=dict)
    rss_series: list[tuple[int, int]] = field(default_factory=list)  # (failovers, KiB)
    fds: dict[str, int] = field(default_factory=dict)
    fd_kinds: dict[str, dict[str, int]] = field(default_factory=dict)
    events: dict[str, int] = field(default_factory=dict)
    transactions: int = 0
    latency_ms: dict[str, float] = field(default_factory=dict)
    final_open: bool = False
    agent_alive: bool = False
    log_lines: int = 0
    bad_lines: int = 0


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _wait(cond: Any, what: str) -> bool:
    try:
        wait_for(cond, DEADLINE_S, what, interval=0.002)
        return True
    except AssertionError:
        return False


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def _fd_kinds(pid: int) -> Counter[str]:
    """What the open descriptors are: socket, pipe, anon_inode:[eventpoll], a path..."""
    kinds: Counter[str] = Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        # files by kind only: a path names this run's work directory, nothing to compare
        kinds["file" if target.startswith("/") else re.sub(r":\[\d+\]$", "", target)] += 1
    return kinds


def _sample(soak: Soak, pid: int, label: str) -> None:
    soak.rss_kib[label] = _rss_kib(pid)
    soak.fds[label] = _fds(pid)
    soak.fd_kinds[label] = dict(_fd_kinds(pid))


class Core:
    """The service's core: a ``sleep`` whose PID is in the service's PID file."""

    def __init__(self, svc: Service) -> None:
        self.svc = svc
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start a new core and write its PID file (temp file + rename)."""
        self.proc = subprocess.Popen(["sleep", "3600"], stdin=subprocess.DEVNULL)
        write_pid_atomic(self.svc.pid_file, self.proc.pid)

    def kill(self) -> None:
        """SIGKILL the core and reap it."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.proc = None


def _failover(core: Core, ns: Netns, soak: Soak) -> None:
    core.kill()
    if not _wait(lambda: chain_view(ns).blocked, "blocked"):
        soak.missed_block += 1
    core.start()
    if not _wait(lambda: chain_view(ns).open, "open"):
        soak.missed_open += 1
    soak.failovers += 1


def _read_log(agent: Agent, soak: Soak) -> None:
    counts: dict[str, int] = {}
    latencies: list[float] = []
    with open(agent.stdout_path, errors="replace") as f:
        for line in f:
            soak.log_lines += 1
            try:
                ev = json.loads(line)
            except ValueError:
                soak.bad_lines += 1
                continue
            if not isinstance(ev, dict):
                soak.bad_lines += 1
                continue
            action = str(ev.get("event.action", ""))
            counts[action] = counts.get(action, 0) + 1
            if action in ("firewall-block", "firewall-unblock", "firewall-repair"):
                soak.transactions += int(ev.get("sslvpn_heartbeat.transactions") or 0)
            if action == "firewall-block" and isinstance(ev.get("sslvpn_heartbeat.latency_ms"), int | float):
                latencies.append(float(ev["sslvpn_heartbeat.latency_ms"]))
    soak.events = {k: counts[k] for k in sorted(counts)}
    soak.latency_ms = {"p50": _pct(latencies, 0.5), "p99": _pct(latencies, 0.99),
                       "max": max(latencies, default=float("nan"))}


def run_soak(seconds: float, max_failovers: int, workdir: Path) -> Soak:
    """Run failovers for ``seconds`` (at most ``max_failovers``) and return the figures."""
    soak = Soak()
    with Netns("soak") as ns:
        svc = Service(ns, workdir / "svc").start()
        svc.ctl("stop")  # the fake core goes; the listener stays and follows the PID file
        core = Core(svc)
        core.start()
        cfg = agent_config(workdir / "agent.toml", svc.d, workdir / "state",
                           probe={"interval_s": 5.0, "rise": 1, "timeout_ms": 500})
        agent = Agent(ns, cfg, workdir).start()
        try:
            agent.wait_ready()
            _run(agent, core, ns, soak, seconds, max_failovers)
        finally:
            core.kill()
        _read_log(agent, soak)
    return soak


def _run(agent: Agent, core: Core, ns: Netns, soak: Soak, seconds: float,
         max_failovers: int) -> None:
    ready_fds = _fds(agent.pid)
    t0 = time.monotonic()
    for _ in range(WARMUP):
        _failover(core, ns, soak)
    _wait(lambda: _fds(agent.pid) <= ready_fds, "descriptors settled")
    _sample(soak, agent.pid, "start")
    end = t0 + seconds
    next_sample = time.monotonic() + SERIES_EVERY_S
    while time.monotonic() < end and soak.failovers < max_failovers:
        _failover(core, ns, soak)
        if time.monotonic() >= next_sample:
            soak.rss_series.append((soak.failovers, _rss_kib(agent.pid)))
            next_sample += SERIES_EVERY_S
        if agent.proc is None or agent.proc.poll() is not None:
            break
    soak.seconds = round(time.monotonic() - t0, 1)
    soak.agent_alive = agent.proc is not None and agent.proc.poll() is None
    if soak.agent_alive:
        _wait(lambda: _fds(agent.pid) <= soak.fds["start"], "descriptors settled")
        _sample(soak, agent.pid, "end")
    soak.final_open = chain_view(ns).open and chain_view(ns, 6).open
    if soak.agent_alive:
        agent.stop()


def _fd_growth(start: dict[str, int], end: dict[str, int]) -> str:
    grown = {k: end.get(k, 0) - start.get(k, 0) for k in set(start) | set(end)}
    parts = [f"{k} {v:+d}" for k, v in sorted(grown.items()) if v]
    return f" ({', '.join(parts)})" if parts else ""


def report(s: Soak) -> str:
    """The figures as text."""
    blocks = s.events.get("firewall-block", 0)
    unblocks = s.events.get("firewall-unblock", 0)
    per = s.transactions / s.failovers if s.failovers else float("nan")
    lines = [
        f"{s.failovers} failovers in {s.seconds} s ({s.failovers / max(s.seconds, 1e-9):.1f}/s)",
        f"agent RSS KiB: start {s.rss_kib.get('start')} -> end {s.rss_kib.get('end')}; "
        f"open fds: start {s.fds.get('start')} -> end {s.fds.get('end')}"
        + _fd_growth(s.fd_kinds.get("start", {}), s.fd_kinds.get("end", {})),
        f"firewall-block {blocks}, firewall-unblock {unblocks}, "
        f"firewall-repair {s.events.get('firewall-repair', 0)}, "
        f"apply-failed {s.events.get('apply-failed', 0)}, internal-error "
        f"{s.events.get('internal-error', 0)}",
        f"rule transactions {s.transactions} = {per:.2f} per failover (both families)",
        f"missed: block {s.missed_block}, open {s.missed_open}; kills {s.failovers} vs blocks "
        f"{blocks} (+{WARMUP} warm-up included in both)",
        "RSS KiB every 20 s (failovers:KiB): "
        + " ".join(f"{n}:{k}" for n, k in s.rss_series),
        f"block latency ms (kernel event -> commit): p50 {s.latency_ms.get('p50', 0):.2f} "
        f"p99 {s.latency_ms.get('p99', 0):.2f} max {s.latency_ms.get('max', 0):.2f}",
        f"final chain open: {s.final_open}; agent alive at the end: {s.agent_alive}; "
        f"log lines {s.log_lines}, not JSON objects {s.bad_lines}",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run the soak, print the figures (and write JSON if asked)."""
    ap = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--max-failovers", type=int, default=20000)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (agent log)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.soak: needs root (network namespaces, iptables)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    try:
        soak = run_soak(args.seconds, args.max_failovers, work)
    finally:
        if not args.keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work directory: {work}")
    print(machine_line())
    print(report(soak))
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(soak), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
