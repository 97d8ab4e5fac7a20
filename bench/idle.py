"""Idle cost of each protector guarding a healthy service: CPU, memory and wakeups.

    python -m bench.idle [--seconds 60] [--protectors agent,polling,monit] [--strace-seconds 20]

Root only. Each protector gets its own server namespace (bench.failover.ServerBed) with a healthy
fake service; all run side by side through one window. Measured from /proc:

* CPU: utime + stime of the process and of the children it reaped (cutime + cstime: the polling
  loop's ``cat``/``sleep``, monit's checks, the agent's iptables-save on each safety-net tick),
  over the window, as ms of CPU per minute and as a percentage of one CPU;
* memory: VmRSS (and VmHWM, the peak) of the protector process at the end, and apart the RSS
  of its live descendants then (the agent's two iptables-restore started ahead of need, the
  polling loop's ``sleep``): RSS counts shared pages in each process, so the sum overstates;
* wakeups: voluntary + involuntary context switches summed over the process's threads;
* then, if strace is installed, a second window under ``strace -f -c``: syscall counts, to show
  what wakes each one (the agent's epoll_wait returns should match one per safety-net tick).

Prints a table only; never passes or fails.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.failover import PROTECTORS, AgentSettings, ServerBed
from bench.machine import ICMP_LIMITS_OFF, machine_line

__all__ = ["Sample", "main", "parse_strace_summary", "sample"]

CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Sample:
    """One reading of a process: CPU ticks (own + reaped children), memory, context switches."""

    t: float
    ticks: int
    rss_kb: int
    hwm_kb: int
    ctxt: int
    threads: int
    children_rss_kb: int  # live descendants (the agent's pre-started iptables-restore, sleep)


def _status_fields(path: Path) -> dict[str, str]:
    out = {}
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return out


def sample(pid: int) -> Sample:
    """Read /proc/PID now (raises OSError when the process is gone)."""
    stat = Path(f"/proc/{pid}/stat").read_bytes()
    fields = stat[stat.rfind(b")") + 2:].split()
    # fields[0] is the state (field 3); utime..cstime are fields 14..17.
    ticks = sum(int(x) for x in fields[11:15])
    st = _status_fields(Path(f"/proc/{pid}/status"))
    tasks = list(Path(f"/proc/{pid}/task").iterdir())
    ctxt = _ctxt(pid)
    def kb(key: str) -> int:
        return int(st.get(key, "0 kB").split()[0])

    return Sample(time.monotonic(), ticks, kb("VmRSS"), kb("VmHWM"), ctxt, len(tasks),
                  sum(_rss_kb(c) for c in _descendants(pid)))


def _descendants(pid: int) -> list[int]:
    """The live descendants of ``pid`` (from /proc/PID/task/*/children)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{p}/task").iterdir():
                kids = [int(c) for c in (task / "children").read_text().split()]
                found += kids
                todo += kids
    return found


def _rss_kb(pid: int) -> int:
    return int(_status_fields(Path(f"/proc/{pid}/status")).get("VmRSS", "0 kB").split()[0])


def parse_strace_summary(text: str) -> dict[str, int]:
    """Syscall name -> calls, from the table ``strace -c`` prints."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        # % time, seconds, usecs/call, calls, [errors], syscall
        if len(parts) >= 5 and parts[0].replace(".", "", 1).isdigit() and parts[-1] != "total":
            with contextlib.suppress(ValueError):
                out[parts[-1]] = int(parts[3])
    return out


def _strace(pids: dict[str, int], seconds: float, workdir: Path) -> dict[str, dict[str, int]]:
    strace = shutil.which("strace")
    if strace is None or seconds <= 0:
        return {}
    procs = {}
    for name, pid in pids.items():
        out = workdir / f"strace-{name}.txt"
        procs[name] = (subprocess.Popen([strace, "-f", "-c", "-p", str(pid), "-o", str(out)],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL), out)
    time.sleep(seconds)  # the measurement window itself
    result = {}
    for name, (p, out) in procs.items():
        p.send_signal(signal.SIGINT)  # strace detaches and writes its summary
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
        result[name] = parse_strace_summary(out.read_text(errors="replace")) if out.exists() else {}
    return result


def _ctxt(pid: int) -> int:
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        ts = _status_fields(task / "status")
        total += int(ts.get("voluntary_ctxt_switches", "0"))
        total += int(ts.get("nonvoluntary_ctxt_switches", "0"))
    return total


def _median_gap(starts: Sequence[float]) -> float | None:
    gaps = sorted(b - a for a, b in itertools.pairwise(starts))
    return round(gaps[len(gaps) // 2], 3) if gaps else None


def _watch_wakeups(pids: dict[str, int], seconds: float,
                   step: float) -> dict[str, list[float]]:
    """Start times (s into the window) of each wake episode: a run of sampling steps in which
    a process's context switch count moved. Reading /proc does not wake the process read."""
    t0 = time.monotonic()
    last = {n: _ctxt(p) for n, p in pids.items()}
    busy = dict.fromkeys(pids, False)
    starts: dict[str, list[float]] = {n: [] for n in pids}
    while (now := time.monotonic()) - t0 < seconds:
        time.sleep(step)  # the sampling period, not a synchronisation
        for n, p in pids.items():
            with contextlib.suppress(OSError, ValueError):
                c = _ctxt(p)
                moved, last[n] = c != last[n], c
                if moved and not busy[n]:
                    starts[n].append(round(now - t0, 3))
                busy[n] = moved
    return starts


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry: run the window, print the table (markdown)."""
    ap = argparse.ArgumentParser(prog="python -m bench.idle", description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--strace-seconds", type=float, default=20.0,
                    help="second window under strace -f -c (0 skips it)")
    ap.add_argument("--protectors", default=",".join(PROTECTORS))
    ap.add_argument("--resolution-ms", type=float, default=20.0,
                    help="sampling step of the wakeup episodes")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.idle: run as root (it makes network namespaces)", file=sys.stderr)
        return 2
    names = [n.strip() for n in a.protectors.split(",") if n.strip()]
    if "monit" in names and shutil.which("monit") is None:
        print("bench.idle: monit is not installed; skipping it", file=sys.stderr)
        names.remove("monit")
    agent = AgentSettings()
    beds: dict[str, ServerBed] = {}
    try:
        for i, name in enumerate(names):
            beds[name] = bed = ServerBed(prefix=f"svi{i}")
            bed.start_protector(name, agent=agent)
        for bed in beds.values():
            bed.wait_protected_open()
        pids = {}
        for name, bed in beds.items():
            assert bed.protector is not None
            pids[name] = bed.protector.pid
        print(f"bench.idle: {', '.join(names)} settled; measuring {a.seconds:g} s",
              file=sys.stderr)
        before = {n: sample(p) for n, p in pids.items()}
        episodes = _watch_wakeups(pids, a.seconds, a.resolution_ms / 1000)
        after = {n: sample(p) for n, p in pids.items()}
        for name, bed in beds.items():
            if bed.chain_rules() != []:
                print(f"bench.idle: {name}'s chain is not open at the end!", file=sys.stderr)
        calls: dict[str, dict[str, int]] = {}
        if a.strace_seconds > 0 and shutil.which("strace"):
            print(f"bench.idle: strace -f -c window, {a.strace_seconds:g} s", file=sys.stderr)
            with tempfile.TemporaryDirectory(prefix="svh-idle-") as tmp:
                calls = _strace(pids, a.strace_seconds, Path(tmp))
    finally:
        for bed in beds.values():
            bed.close()
    rows: dict[str, dict[str, Any]] = {}
    for name in names:
        b, e = before[name], after[name]
        secs = e.t - b.t
        cpu_s = (e.ticks - b.ticks) / CLK_TCK
        rows[name] = {
            "seconds": round(secs, 1),
            "cpu_ms_per_min": round(cpu_s * 1000 * 60 / secs, 1),
            "cpu_percent": round(100 * cpu_s / secs, 3),
            "rss_mb": round(e.rss_kb / 1024, 1), "hwm_mb": round(e.hwm_kb / 1024, 1),
            "children_rss_mb": round(e.children_rss_kb / 1024, 1),
            "threads": e.threads,
            "wakeups_per_min": round((e.ctxt - b.ctxt) * 60 / secs, 1),
            "wake_episodes_per_min": round(len(episodes[name]) * 60 / secs, 1),
            "median_gap_s": _median_gap(episodes[name]),
            "wake_episodes": episodes[name],
            "syscalls": calls.get(name, {}),
        }
    print(machine_line(ICMP_LIMITS_OFF))
    print(f"# bench.idle: {a.seconds:g} s window, kernel {os.uname().release}, "
          f"{os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f}), CLK_TCK {CLK_TCK}; "
          f"agent interval_s={agent.interval_s}")
    print("\n| protector | CPU ms/min | CPU % | RSS MB (peak) | + live children MB | threads | "
          "context switches/min | wake episodes/min (median gap s) |"
          "\n|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['cpu_ms_per_min']} | {r['cpu_percent']} | {r['rss_mb']} "
              f"({r['hwm_mb']}) | {r['children_rss_mb']} | {r['threads']} | {r['wakeups_per_min']} | "
              f"{r['wake_episodes_per_min']} ({r['median_gap_s']}) |")
    print(f"\n(a wake episode: consecutive {a.resolution_ms:g} ms samples in which the "
          f"process's context switch count moved)")
    if calls:
        print(f"\nSyscalls in the {a.strace_seconds:g} s strace window (top 8, all threads and "
              f"children):\n")
        for name, r in rows.items():
            top = sorted(r["syscalls"].items(), key=lambda kv: -kv[1])[:8]
            print(f"- {name}: " + ", ".join(f"{k} {v}" for k, v in top))
        if "agent" in rows:
            ticks = a.strace_seconds / agent.interval_s
            print(f"\nagent: epoll_wait {rows['agent']['syscalls'].get('epoll_wait', 0)} calls "
                  f"for ~{ticks:.0f} safety-net ticks of {agent.interval_s:g} s")
    if a.json:
        a.json.write_text(json.dumps({"seconds": a.seconds, "agent": asdict(agent),
                                      "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
