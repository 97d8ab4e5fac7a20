"""The demo (``python -m tests.testbed demo``) shows the manual's lines and cleans up on Ctrl-C."""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import signal
import subprocess
import sys
import time

import pytest

from tests.netns import REPO
from tests.testbed.fakesvc import pid_alive

# once: the demo runs on Debian's venv (scripts/demo)
pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.once]

# The manual's line with the agent's default answer (reject_with = "tcp-reset").
MANUAL_REJECT = re.compile(r"^REJECT +tcp +-- +anywhere +anywhere +tcp dpt:http-alt "
                           r"reject-with tcp-reset$")


def _read_until(proc: subprocess.Popen[str], marker: str, timeout: float) -> list[str]:
    """Lines of ``proc``'s stdout up to and including the first one holding ``marker``."""
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not sel.select(max(0.0, deadline - time.monotonic())):
                continue
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip("\n"))
            if marker in line:
                return lines
    raise AssertionError(f"no {marker!r} in the demo's output:\n" + "\n".join(lines))


def _namespaces_of(pid: int) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [ln.split()[0] for ln in out.splitlines() if ln and f"{pid}x" in ln.split()[0]]


def test_demo_shows_block_then_ctrl_c_leaves_no_namespace_or_process() -> None:
    """Up to step 4 the demo prints the manual's REJECT line (with the default tcp-reset) and the
    JSON event; SIGINT tears down."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tests.testbed", "demo"], cwd=str(REPO),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = _read_until(proc, "what the client saw", timeout=30)
        shown = [ln.strip().lstrip(">|").strip() for ln in lines]
        assert any(MANUAL_REJECT.match(ln) for ln in shown), "\n".join(lines)
        assert any(ln.startswith("Chain sslvpn-heartbeat-chain (1 references)") for ln in shown)
        assert any(ln.startswith('"sslvpn_heartbeat.latency_ms": ') for ln in shown), "\n".join(lines)
        agents = [int(p) for ln in lines for p in re.findall(r"agent pid (\d+)", ln)]
        cores = [int(p) for ln in lines for p in re.findall(r"core pid (\d+)", ln)]
        assert len(agents) == len(cores) == 2, lines
        pids = [*agents, cores[1]]  # server 1's core was stopped in step 3
        assert all(pid_alive(p) for p in pids), pids
        assert _namespaces_of(proc.pid)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err
        assert "interrupted" in err
        assert _namespaces_of(proc.pid) == []
        assert not any(pid_alive(p) for p in pids)
    finally:
        if proc.poll() is None:
            proc.terminate()  # the demo tears down on SIGTERM too
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
        for ns in _namespaces_of(proc.pid):  # only if the demo failed to clean up after itself
            subprocess.run(["ip", "netns", "del", ns], check=False)


def test_demo_fleet_shows_the_agent_check_and_the_metrics_follow_the_failover() -> None:
    """``demo --fleet`` runs to the end: HAProxy hears "down" from server 1's agent check and
    its metrics say block, then "up" and open; exit 0, no namespace left."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tests.testbed", "demo", "--fleet"],
                            cwd=str(REPO), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, out + err
        seen = [ln.strip().lstrip(">|").strip() for ln in out.splitlines()]
        down = next(i for i, ln in enumerate(seen) if "agent check 'via agent : down" in ln)
        up = next(i for i, ln in enumerate(seen) if "agent check 'via agent : up" in ln)
        assert down < up, out
        assert 'sslvpn_heartbeat_chain_mode{mode="block"} 1.0' in seen[down:up], out
        assert 'sslvpn_heartbeat_chain_mode{mode="open"} 1.0' in seen[up:], out
        assert _namespaces_of(proc.pid) == []
    finally:
        if proc.poll() is None:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
        for ns in _namespaces_of(proc.pid):  # only if the demo failed to clean up after itself
            subprocess.run(["ip", "netns", "del", ns], check=False)
