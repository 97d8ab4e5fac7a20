"""Behind gateways that keep persistent connections (HAProxy ``http-reuse always``, nginx
upstream ``keepalive``), ICMP rate limits on, a 1 s connect timeout: with the agent's default
configuration no request waits after a hung server is blocked, and a drain moves new requests
off the drained server without failing one or cutting a long request in flight.

The old default (``reject_with = "icmp-port-unreachable"``, ``established = "keep"``) runs the
same hang as the contrast, so the wait the defaults remove is shown to exist here.
``tests.testbed.sessions`` runs the scenarios; ``bench/sessions.py`` prints them per setting.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.netns import wait_for
from tests.testbed.sessions import WAIT_S, cli_in, pooled_cluster, run_drain, run_hang

pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.once]

MAX_DRAINED_SHARE = 0.05  # of new requests, from one second after the drain on
MIN_REQUESTS = 100  # the windows hold enough requests for the counts to mean something


@pytest.mark.parametrize("gateway", ["haproxy", "nginx"])
def test_default_config_no_request_waits_after_a_hang_and_a_drain_drains(
        gateway: str, tmp_path: Path) -> None:
    """Defaults: after the hung server 1 is blocked no request waits or fails; then, back in
    rotation and drained, it serves at most 5 % of new requests after the first second, no
    request fails and every long request in flight at the drain is answered."""
    with pooled_cluster(gateway, tmp_path) as c:
        hang = run_hang(c, tmp_path / "hang.jsonl")
        print(f"\n{gateway} defaults, hang: {hang}")
        assert hang.after >= MIN_REQUESTS, hang
        assert hang.waited == 0 and hang.failed == 0, hang
        s1 = c.server(1)
        wait_for(lambda: s1.chain_rules() == [] and s1.get(timeout=0.5).ok, 15,
                 "server 1 back in rotation after the hang")
        drain = run_drain(c, tmp_path / "drain.jsonl", cli_in)
        print(f"{gateway} defaults, drain: share {drain.share:.3f} ({drain.on_drained} of "
              f"{drain.after}), failed {drain.failed}, long {drain.long_replies}")
        assert drain.after >= MIN_REQUESTS, drain
        assert drain.share <= MAX_DRAINED_SHARE, drain
        assert drain.failed == 0, drain
        assert drain.long_replies and all(r.ok for r in drain.long_replies), drain
        assert any(r.server == "server1" for r in drain.long_replies), \
            "no long request was on the drained server"
        resets = [e for e in s1.agent_events() if e.get("event.action") == "connections-reset"]
        assert any(e["sslvpn_heartbeat.drain"] is False for e in resets), "no reset at the block"
        assert any(e["sslvpn_heartbeat.drain"] is True for e in resets), "no reset in the drain"


@pytest.mark.parametrize("gateway", ["haproxy", "nginx"])
def test_old_default_icmp_and_keep_shows_the_wait(gateway: str, tmp_path: Path) -> None:
    """The contrast: icmp-port-unreachable with established connections kept; requests sent
    after the block still wait (the reused connections into the hung server)."""
    with pooled_cluster(gateway, tmp_path, reject_with="icmp-port-unreachable",
                        established="keep") as c:
        hang = run_hang(c, tmp_path / "hang.jsonl")
    print(f"\n{gateway} icmp-port-unreachable + keep, hang: {hang}")
    assert hang.after >= MIN_REQUESTS, hang
    assert hang.waited > 0, f"no request waited {WAIT_S} s: the contrast shows nothing: {hang}"
