"""The CLI's refusals on a real kernel: bad config (78) and missing CAP_NET_ADMIN (69) change nothing.

Each test runs ``python -m watcher`` inside its own network namespace, with a configuration whose
state directory is under the test's tmp_path, and compares the namespace's whole ruleset (both
iptables flavours, both families, with counters) before and after.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cfg import write_config
from tests.netns import REPO, Netns, legacy_path_dir

pytestmark = pytest.mark.netns

SAVERS = ["iptables-nft-save", "ip6tables-nft-save", "iptables-legacy-save", "ip6tables-legacy-save"]
FOREIGN_V4 = """\
*filter
:INPUT ACCEPT [0:0]
:keepme - [0:0]
-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT
-A keepme -p udp -m udp --dport 53 -j ACCEPT
COMMIT
"""
# Drops CAP_NET_ADMIN for good: out of the bounding set (so exec cannot grant it back to root)
# and no inheritable capabilities. util-linux's setpriv is in every Debian 12 install.
NO_NET_ADMIN = ["setpriv", "--inh-caps=-all", "--bounding-set=-net_admin"]


def snapshot(ns: Netns) -> dict[str, str]:
    """Every table of both flavours and both families, with counters, comment lines dropped."""
    out = {}
    for tool in SAVERS:
        text = ns.run([tool, "-c"]).stdout
        out[tool] = "\n".join(ln for ln in text.splitlines() if not ln.startswith("#"))
    return out


def env_for(tmp_path: Path) -> dict[str, str]:
    """The environment of the CLI under test: this checkout importable, a private xtables lock."""
    return dict(os.environ, PYTHONPATH=str(REPO), XTABLES_LOCKFILE=str(tmp_path / "xtables.lock"))


def cli(ns: Netns, tmp_path: Path, *args: str, prefix: tuple[str, ...] = (),
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``[prefix] python -m watcher ARGS`` inside ``ns`` (not checked; the test reads the code)."""
    return ns.run([*prefix, sys.executable, "-m", "watcher", *args], check=False,
                  env=env or env_for(tmp_path), timeout=30)


def good_config(tmp_path: Path) -> Path:
    """A valid configuration whose state directory is under tmp_path."""
    return write_config(tmp_path / "config.toml", {
        "state": {"dir": str(tmp_path / "state")},
        "firewall": {"lock_wait_s": 1},
    })


BAD_CONFIGS = {
    "bad-port": ("[service]\nport = 0\n", "service.port"),
    "bad-backend": ('[firewall]\nbackend = "nftables"\n', "firewall.backend"),
    "unknown-key": ("[firewall]\nchian = \"x\"\n", "firewall.chian"),
    "bad-chain": ('[firewall]\nchain = "a chain with spaces"\n', "firewall.chain"),
    "syntax": ("[firewall\n", "TOML syntax error"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
@pytest.mark.parametrize("sub", [["block"], ["block", "--drain"], ["unblock"], ["cleanup"]],
                         ids=" ".join)
def test_bad_config_exits_78_and_changes_nothing(netns: Netns, tmp_path: Path, case: str,
                                                 sub: list[str]) -> None:
    """A changing subcommand with a bad config exits 78 naming the key; firewall and state untouched."""
    text, named = BAD_CONFIGS[case]
    netns.run(["iptables-nft-restore"], input=FOREIGN_V4)
    cfg = tmp_path / "config.toml"
    # The state directory comes first, so a partial parse could have used it.
    cfg.write_text(f'[state]\ndir = "{tmp_path / "state"}"\n\n{text}')
    before = snapshot(netns)
    res = cli(netns, tmp_path, *sub, "--config", str(cfg))
    assert res.returncode == 78, res.stderr
    assert named in res.stderr
    assert "Traceback" not in res.stderr
    assert snapshot(netns) == before
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize("sub", [["block"], ["block", "--drain", "--reason", "x"], ["unblock"],
                                 ["cleanup"], ["status"], ["status", "--json"], ["run"]],
                         ids=" ".join)
def test_without_cap_net_admin_exits_69_and_changes_nothing(netns: Netns, tmp_path: Path,
                                                            sub: list[str]) -> None:
    """Without CAP_NET_ADMIN every firewall subcommand exits 69 saying so, changing nothing."""
    assert shutil.which("setpriv"), "util-linux setpriv is needed"
    netns.run(["iptables-nft-restore"], input=FOREIGN_V4)
    cfg = good_config(tmp_path)
    before = snapshot(netns)
    res = cli(netns, tmp_path, *sub, "--config", str(cfg), prefix=tuple(NO_NET_ADMIN))
    assert res.returncode == 69, (res.stdout, res.stderr)
    assert "CAP_NET_ADMIN" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert res.stdout == ""
    assert snapshot(netns) == before
    assert not (tmp_path / "state").exists()


def test_the_cap_check_is_what_refuses(netns: Netns, tmp_path: Path) -> None:
    """With CAP_NET_ADMIN the same `block` succeeds, so the 69 above comes from the missing cap."""
    cfg = good_config(tmp_path)
    res = cli(netns, tmp_path, "block", "--config", str(cfg))
    assert res.returncode == 0, res.stderr
    assert "-A sslvpn-heartbeat-chain" in netns.run(["iptables-nft-save"]).stdout
    assert (tmp_path / "state" / "admin-block.json").exists()


@pytest.mark.parametrize("flavour", ["nft", "legacy"])
def test_status_on_empty_namespace_says_absent_for_both_families(netns: Netns, tmp_path: Path,
                                                                 flavour: str) -> None:
    """`status` in a namespace without our chain reports absent for IPv4 and IPv6 and changes nothing."""
    cfg = good_config(tmp_path)
    env = env_for(tmp_path)
    with legacy_path_dir(tmp_path) as legacy_path:
        if flavour == "legacy":
            env["PATH"] = legacy_path
            # Any read of a legacy table (libiptc or iptables-legacy-save -t filter) makes the
            # kernel instantiate that empty table in the namespace; do that read first, so the
            # comparison below shows what status itself writes.
            for tool in ("iptables-legacy-save", "ip6tables-legacy-save"):
                netns.run([tool, "-t", "filter"])
        before = snapshot(netns)
        res = cli(netns, tmp_path, "status", "--json", "--config", str(cfg), env=env)
        assert res.returncode == 0, res.stderr
        report = json.loads(res.stdout)
        assert sorted(report["families"]) == ["ipv4", "ipv6"]
        for fam in ("ipv4", "ipv6"):
            info = report["families"][fam]
            assert info["state"] == "absent"
            assert info["chain_present"] is False
            assert info["jumps"] == 0
            assert info["flavour"] == ("nf_tables" if flavour == "nft" else "legacy")
        assert report["admin_block"] is None
        assert report["daemon"] is None

        text = cli(netns, tmp_path, "status", "--config", str(cfg), env=env)
        assert text.returncode == 0, text.stderr
        lines = [ln.split() for ln in text.stdout.splitlines()]
        assert ["ipv4:", "absent"] in [ln[:2] for ln in lines]
        assert ["ipv6:", "absent"] in [ln[:2] for ln in lines]
        assert "admin block: none" in text.stdout
        assert snapshot(netns) == before
