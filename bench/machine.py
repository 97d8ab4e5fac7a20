"""The line every benchmark prints first: the machine, the kernel, iptables' flavour, the load.

A figure means little without the machine it came from and what else was running: every
program in ``bench/`` prints ``machine_line()`` before its tables, and says whether it switched
the kernel's ICMP rate limits off in the namespaces it made.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path

__all__ = ["ICMP_LIMITS_KEPT", "ICMP_LIMITS_OFF", "iptables_flavour", "machine_line"]

ICMP_LIMITS_OFF = ("ICMP rate limits off in the server namespaces (icmp_ratelimit=0): with "
                   "them on, one client address gets a burst of 6 ICMP errors then 1 a second")
ICMP_LIMITS_KEPT = ("ICMP rate limits kept (the kernel's defaults: one peer address gets a burst of "
                    "6 ICMP errors then 1 a second)")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.machine()


def _mem_total_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / (1 << 20)
    except (OSError, ValueError, IndexError):
        pass
    return float("nan")


def iptables_flavour() -> str:
    """What ``iptables -V`` says (version and nf_tables or legacy); reads no firewall state."""
    tool = shutil.which("iptables")
    if tool is None:
        return "iptables not found"
    proc = subprocess.run([tool, "-V"], capture_output=True, text=True, check=False)
    return proc.stdout.strip() or proc.stderr.strip() or f"iptables -V exit {proc.returncode}"


def machine_line(icmp_limits: str | None = None) -> str:
    """One line: CPU model and count, memory, kernel, iptables flavour, Python, load average,
    and ``icmp_limits`` (what the benchmark did to the ICMP rate limits) when given."""
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    parts = [f"machine: {_cpu_model()}, {os.cpu_count()} CPUs, {_mem_total_gb():.1f} GiB",
             f"kernel {platform.release()}", iptables_flavour(),
             f"python {platform.python_version()}", f"load average {load}"]
    if icmp_limits:
        parts.append(icmp_limits)
    return "# " + "; ".join(parts)
