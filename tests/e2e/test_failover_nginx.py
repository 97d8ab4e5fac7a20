"""End to end behind Debian's nginx: the same failover scenario as HAProxy's, the same bounds.

nginx retries the next server on a connect error or timeout (``proxy_next_upstream error
timeout``, never on a 503) and marks a refusing server unavailable for ``fail_timeout``
(passive health); the agent's REJECT turns a down service into exactly such a refusal.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netns import REPO
from tests.testbed.cluster import NGINX_BACKLOG, Cluster
from tests.testbed.scenario import FAILOVERS, ScenarioOutcome, run_scenario

# once: nginx in front: no library version changes the outcome
pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.once]

MAX_BAD_PER_FAILOVER = 2


@pytest.fixture(scope="module")
def nginx_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ScenarioOutcome, Path]]:
    """The shared scenario behind nginx with an agent on every server; the workdir is kept."""
    workdir = tmp_path_factory.mktemp("nginx")
    with Cluster(FAILOVERS.n_servers, agents=True, workdir=workdir, gateway="nginx") as c:
        ss = c.gateway.run(["ss", "-Hltn"]).stdout if c.gateway else ""
        (workdir / "gateway-listeners.txt").write_text(ss)
        outcome = run_scenario(c, workdir / "load.jsonl", FAILOVERS)
    yield outcome, workdir


def test_each_failover_costs_at_most_two_bad_answers_behind_nginx(
        nginx_run: tuple[ScenarioOutcome, Path]) -> None:
    """Behind nginx, no failover costs the client more than 2 bad answers (503 or error)."""
    out, _ = nginx_run
    assert out.bad_before == 0
    detail = [(f.failover, [(r.status, r.server, r.error) for r in f.bad]) for f in out.failovers]
    print("bad answers per failover behind nginx: " + ", ".join(
        f"server{f.failover.server} {f.failover.action} {len(f.bad)}/{f.requests}"
        for f in out.failovers))
    assert max(out.bad_per_failover) <= MAX_BAD_PER_FAILOVER, detail
    assert all(f.requests >= FAILOVERS.rate * FAILOVERS.down_s for f in out.failovers)


def test_server_returns_to_rotation_behind_nginx(nginx_run: tuple[ScenarioOutcome, Path]) -> None:
    """After each recovery the chain is empty and nginx sends clients to the server again
    within the scenario's bound; at the end both servers take requests."""
    out, _ = nginx_run
    for f in out.failovers:
        assert f.chain_after_start == [], f
        assert f.back_in_rotation_s < FAILOVERS.back_timeout_s, f
    print("back in rotation after (s): "
          + ", ".join(f"{f.back_in_rotation_s:.2f}" for f in out.failovers))
    good = [r for r in out.records if not r.bad]
    last_end = max(r.t for r in good)
    tail = {r.server for r in good if r.t > last_end - FAILOVERS.up_s / 2}
    assert tail == {f"server{i}" for i in range(1, FAILOVERS.n_servers + 1)}


def test_nginx_listens_on_the_namespace_address_only_with_its_backlog(
        nginx_run: tuple[ScenarioOutcome, Path]) -> None:
    """The gateway's only listener is nginx on 10.200.0.1:80 with the configured backlog, and
    its PID file and logs are in the test's directory (the access log saw the load)."""
    out, workdir = nginx_run
    rows = [ln.split() for ln in (workdir / "gateway-listeners.txt").read_text().splitlines()]
    assert [(r[3], int(r[2])) for r in rows] == [("10.200.0.1:80", NGINX_BACKLOG)], rows
    access = (workdir / "nginx-access.log").read_text().splitlines()
    assert len(access) >= len(out.records) * 0.9
    assert (workdir / "nginx-error.log").exists()


def test_the_demo_runs_behind_nginx() -> None:
    """``demo --gateway nginx`` builds the cluster with nginx, runs every step and exits 0,
    the stop costing at most the 2 bad answers the scenario allows."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    r = subprocess.run([sys.executable, "-m", "tests.testbed", "demo", "--gateway", "nginx"],
                       cwd=str(REPO), env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "a gateway running nginx" in r.stdout
    m = re.search(r"Stopping server 1 cost the users (\d+) failed request", r.stdout)
    assert m is not None, r.stdout[-2000:]
    assert int(m.group(1)) <= MAX_BAD_PER_FAILOVER, r.stdout[-2000:]
