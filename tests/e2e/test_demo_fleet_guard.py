"""``demo --fleet-guard`` runs to the end and reports what users got, without and with the guard."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys

import pytest

from tests.e2e.test_demo import _namespaces_of
from tests.netns import REPO

pytestmark = [pytest.mark.netns, pytest.mark.slow,
              pytest.mark.once]  # the demo itself runs on Debian's venv (scripts/demo)

ROW = re.compile(r"^(?P<label>.+?)\s{2,}(?P<a>\S.*?)\s{2,}(?P<b>\S.*)$")


def _row(out: str, label: str) -> tuple[str, str]:
    for line in out.splitlines():
        m = ROW.match(line.strip())
        if m and m["label"].startswith(label):
            return m["a"].strip(), m["b"].strip()
    raise AssertionError(f"no {label!r} row in the demo's summary:\n{out}")


def _failed_pct(cell: str) -> float:
    m = re.match(r"([\d.]+) % \((\d+)/(\d+)\)", cell)
    assert m and int(m[3]) > 0, cell
    return float(m[1])


def test_fleet_guard_demo_keeps_half_the_servers_for_users() -> None:
    """Without the guard all four servers block and every portal request fails; with it exactly
    two block and the portal is served; logins fail in both acts (the back end is down); the
    demo exits 0 and leaves no namespace behind."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tests.testbed", "demo", "--fleet-guard",
                             "--rate", "40"], cwd=str(REPO), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, out + err
        assert _row(out, "servers blocked at the worst moment") == ("4 of 4", "2 of 4"), out
        alone, guarded = _row(out, "portal / (logged-in users) failed")
        assert _failed_pct(alone) == 100.0, out
        assert _failed_pct(guarded) < 25.0, out  # HAProxy's retries may all meet blocked servers
        assert [_failed_pct(c) for c in _row(out, "logins /login failed")] == [100.0, 100.0], out
        assert "fleet-guard-refused" in out, out
        assert _namespaces_of(proc.pid) == []
    finally:
        if proc.poll() is None:
            proc.terminate()  # the demo tears down on SIGTERM too
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
        for ns in _namespaces_of(proc.pid):  # only if the demo failed to clean up after itself
            subprocess.run(["ip", "netns", "del", ns], check=False)
