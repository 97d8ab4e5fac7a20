"""A chain of the configured name that belongs to another tool survives every command, byte for byte.

Each test loads another tool's rules into its own network namespace (IPv4, IPv6 or both; with
and without a jump from INPUT), runs one of the agent's commands with ``firewall.chain`` naming
that chain, and compares every table of both iptables flavours and both families, with
counters, before and after: exit 78, a message naming the chain and what is in it, no change.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cfg import write_config
from tests.netns import REPO, Netns, legacy_path_dir

pytestmark = pytest.mark.netns

SAVERS = ["iptables-nft-save", "ip6tables-nft-save", "iptables-legacy-save", "ip6tables-legacy-save"]

# Another tool's chains, as iptables-restore input: a DOCKER-like chain with its own rules and
# no jump from INPUT, a fail2ban-like chain jumped to from INPUT with a condition, a chain
# holding only a REJECT of the agent's shape but referenced from FORWARD, and a plain jump from
# INPUT to a chain whose rules are not the agent's.
SCENES = {
    "docker-no-jump": ("DOCKER", """\
*filter
:DOCKER - [0:0]
-A DOCKER -d 172.17.0.2/32 ! -i docker0 -p tcp -m tcp --dport 80 -j ACCEPT
-A DOCKER -j RETURN
COMMIT
""", "-A DOCKER -d 172.17.0.2/32"),
    "f2b-jump-with-condition": ("f2b-sshd", """\
*filter
:f2b-sshd - [0:0]
-A INPUT -p tcp -m multiport --dports 22 -j f2b-sshd
-A f2b-sshd -s 192.0.2.7/32 -j REJECT --reject-with icmp-port-unreachable
-A f2b-sshd -j RETURN
COMMIT
""", "-A INPUT -p tcp -m multiport --dports 22 -j f2b-sshd"),
    "own-shape-but-referenced": ("guard", """\
*filter
:guard - [0:0]
-A FORWARD -j guard
-A guard ! -i lo -p tcp -m tcp --dport 8080 -j REJECT --reject-with icmp-port-unreachable
COMMIT
""", "-A FORWARD -j guard"),
    "plain-jump-foreign-rules": ("sslvpn-heartbeat-chain", """\
*filter
:sslvpn-heartbeat-chain - [0:0]
-A INPUT -j sslvpn-heartbeat-chain
-A sslvpn-heartbeat-chain -s 198.51.100.0/24 -j ACCEPT
COMMIT
""", "-A sslvpn-heartbeat-chain -s 198.51.100.0/24 -j ACCEPT"),
}
FAMILIES = ["ipv4", "ipv6", "both"]
COMMANDS = [["block"], ["block", "--drain"], ["unblock"], ["cleanup"], ["run"], ["config-check"]]


def snapshot(ns: Netns, *table: str) -> dict[str, str]:
    """Every table (or the one named) of both flavours and both families, with counters,
    comment lines dropped."""
    out = {}
    for tool in SAVERS:
        text = ns.run([tool, "-c", *(["-t", *table] if table else [])]).stdout
        out[tool] = "\n".join(ln for ln in text.splitlines() if not ln.startswith("#"))
    return out


def load(ns: Netns, text: str, family: str, flavour: str) -> None:
    """Load another tool's rules into the namespace in ``family`` (ipv4, ipv6 or both)."""
    progs = {"ipv4": ["iptables"], "ipv6": ["ip6tables"], "both": ["iptables", "ip6tables"]}
    for prog in progs[family]:
        body = text.replace("192.0.2.7/32", "2001:db8::7/128").replace(
            "172.17.0.2/32", "fd00::2/128").replace("198.51.100.0/24", "2001:db8:1::/48").replace(
            "icmp-port-unreachable", "icmp6-port-unreachable") if prog == "ip6tables" else text
        ns.run([f"{prog}-{flavour}-restore", "--noflush"], input=body)


def agent(ns: Netns, tmp_path: Path, chain: str, args: list[str], backend: str = "auto",
          path: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m watcher ARGS`` in ``ns`` with ``firewall.chain = chain``."""
    cfg = write_config(tmp_path / "config.toml", {
        "service": {"pid_file": str(tmp_path / "svc.pid")},
        "state": {"dir": str(tmp_path / "state")},
        "firewall": {"chain": chain, "backend": backend, "lock_wait_s": 1},
    })
    env = dict(os.environ, PYTHONPATH=str(REPO), XTABLES_LOCKFILE=str(tmp_path / "xtables.lock"))
    if path is not None:
        env["PATH"] = path
    return ns.run([sys.executable, "-m", "watcher", *args, "--config", str(cfg)], check=False,
                  env=env, timeout=30)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scene", list(SCENES))
@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_foreign_chain_survives_every_command(netns: Netns, tmp_path: Path, scene: str,
                                              family: str, command: list[str]) -> None:
    """block, block --drain, unblock, cleanup, run and config-check exit 78 naming the chain and
    its foreign content, and leave every table of both families exactly as it was."""
    chain, rules, quoted = SCENES[scene]
    load(netns, rules, family, "nft")
    before = snapshot(netns)
    proc = agent(netns, tmp_path, chain, command)
    assert proc.returncode == 78, proc.stdout + proc.stderr
    assert f"chain {chain} belongs to someone else" in proc.stderr, proc.stderr
    if family != "ipv6":
        assert quoted in proc.stderr, proc.stderr
    for fam in (["ipv4", "ipv6"] if family == "both" else [family]):
        assert f"{fam}: " in proc.stderr, proc.stderr
    assert snapshot(netns) == before
    assert not (tmp_path / "state" / "admin.json").exists()


@pytest.mark.parametrize("backend", ["restore", "iptc"])
@pytest.mark.parametrize("command", [["block"], ["cleanup"], ["run"]], ids=" ".join)
def test_foreign_chain_survives_on_legacy(netns: Netns, tmp_path: Path, backend: str,
                                          command: list[str]) -> None:
    """On legacy x_tables, with either backend, a foreign chain jumped to from INPUT survives.

    Only the filter table is compared: opening libiptc (iptc) makes the kernel instantiate the
    namespace's other legacy tables, empty, which is no rule of anyone's changed."""
    chain, rules, quoted = SCENES["f2b-jump-with-condition"]
    load(netns, rules, "both", "legacy")
    before = snapshot(netns, "filter")
    with legacy_path_dir(tmp_path) as path:
        proc = agent(netns, tmp_path, chain, command, backend=backend, path=path)
    assert proc.returncode == 78, proc.stdout + proc.stderr
    assert f"chain {chain} belongs to someone else" in proc.stderr and "ipv6: " in proc.stderr
    assert (quoted if backend == "restore" else f"-A INPUT (a rule with conditions) -j {chain}") \
        in proc.stderr, proc.stderr
    assert snapshot(netns, "filter") == before


def test_own_chain_left_behind_is_adopted(netns: Netns, tmp_path: Path) -> None:
    """A chain holding only the agent's rules (a drain with tcp-reset for another port, left by
    an earlier run) and duplicate plain jumps is adopted: block rewrites it, cleanup removes it."""
    chain = "sslvpn-heartbeat-chain"
    left = (f"*filter\n:{chain} - [0:0]\n-A INPUT -j {chain}\n-A INPUT -j {chain}\n"
            f"-A {chain} ! -i lo -p tcp -m tcp --dport 9443 --tcp-flags FIN,SYN,RST,ACK SYN "
            "-j REJECT --reject-with tcp-reset\nCOMMIT\n")
    load(netns, left, "ipv4", "nft")
    proc = agent(netns, tmp_path, chain, ["block"])
    assert proc.returncode == 0, proc.stderr
    saved = netns.save(4)
    assert saved.count(f"-A INPUT -j {chain}") == 1
    assert ("--dport 8080 -j REJECT --reject-with tcp-reset" in saved
            and "9443" not in saved), saved
    proc = agent(netns, tmp_path, chain, ["cleanup"])
    assert proc.returncode == 0, proc.stderr
    assert chain not in netns.save(4) and chain not in netns.save(6)


def test_status_names_a_foreign_chain(netns: Netns, tmp_path: Path) -> None:
    """status (which changes nothing) says the chain is someone else's and quotes its rules."""
    chain, rules, quoted = SCENES["docker-no-jump"]
    load(netns, rules, "ipv4", "nft")
    proc = agent(netns, tmp_path, chain, ["status"])
    assert proc.returncode == 0, proc.stderr
    assert "someone else's chain" in proc.stdout and quoted in proc.stdout, proc.stdout
