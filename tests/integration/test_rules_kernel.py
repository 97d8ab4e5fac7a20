"""The chain engine and its CLI against real iptables in throwaway network namespaces.

Every case runs for each (flavour, backend) pair the system offers: iptables-nft with restore
and with nft (netlink swaps), iptables-legacy with restore and with iptc. The legacy flavour is
selected with a PATH whose iptables* are the -legacy programs, as on a host whose alternatives
point there.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.agent import hold_lock
from tests.cfg import write_config
from tests.netns import Netns, legacy_path_dir, veth_pair

pytestmark = pytest.mark.netns

MANUAL_BLOCKED = [
    ["Chain", "sslvpn-heartbeat-chain", "(1", "references)"],
    ["target", "prot", "opt", "source", "destination"],
    ["REJECT", "tcp", "--", "anywhere", "anywhere", "tcp", "dpt:http-alt", "reject-with",
     "icmp-port-unreachable"],
]
FOREIGN = """\
*filter
:INPUT ACCEPT [11:2222]
:FORWARD DROP [3:444]
:OUTPUT ACCEPT [5:666]
:keepme - [0:0]
[7:700] -A INPUT -i lo -j ACCEPT
[1:60] -A INPUT -p tcp -m tcp --dport 22 -j ACCEPT
[0:0] -A FORWARD -j keepme
[2:120] -A keepme -p udp -m udp --dport 53 -j ACCEPT
COMMIT
"""


@dataclass
class Host:
    """A namespace configured as a host of one iptables flavour with a given backend."""

    ns: Netns
    flavour: str  # "nft" or "legacy"
    backend: str
    env: dict[str, str]
    config: Path

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``sslvpn-heartbeat ARGS --config CONFIG`` inside the namespace."""
        return self.ns.run([sys.executable, "-m", "watcher", *args, "--config", str(self.config)],
                           env=self.env, check=check)

    def save(self, family: int = 4, counters: bool = False) -> str:
        """iptables-save of the filter table, comments dropped (counters on request)."""
        tool = f"ip{'6' if family == 6 else ''}tables-{self.flavour}-save"
        out = self.ns.run([tool, "-t", "filter", *(["-c"] if counters else [])]).stdout
        return "\n".join(ln for ln in out.splitlines() if not ln.startswith("#"))

    def listing(self, family: int = 4) -> list[list[str]]:
        """``iptables -L CHAIN`` of the flavour, split into words per line."""
        tool = f"ip{'6' if family == 6 else ''}tables-{self.flavour}"
        out = self.ns.run([tool, "-L", "sslvpn-heartbeat-chain"]).stdout
        return [ln.split() for ln in out.splitlines() if ln.strip()]


COMBOS = [("nft", "restore"), ("nft", "nft"), ("legacy", "restore"), ("legacy", "iptc")]


@pytest.fixture(params=COMBOS, ids=[f"{f}-{b}" for f, b in COMBOS])
def host(request: pytest.FixtureRequest, netns: Netns, tmp_path: Path) -> Iterator[Host]:
    """A namespace host for one (flavour, backend) pair, with its own state dir and lock file."""
    flavour, backend = request.param
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]),
               XTABLES_LOCKFILE=str(tmp_path / "xtables.lock"))
    cfg = write_config(tmp_path / "config.toml", {
        "firewall": {"backend": backend, "lock_wait_s": 1},
        "state": {"dir": str(tmp_path / "state")},
        "log": {"format": "json"},
    })
    if flavour == "legacy":
        with legacy_path_dir(tmp_path) as path:
            env["PATH"] = path
            yield Host(netns, flavour, backend, env, cfg)
    else:
        yield Host(netns, flavour, backend, env, cfg)


_HOT_SWAP = """
import subprocess, sys
from rules.firewall import Firewall
from rules.model import ChainSpec, Mode
from rules.firewall import make_backend
fw = Firewall(make_backend(sys.argv[1]), ChainSpec(), ipv6=False)
fw.detect_families()
fw.ensure(Mode.BLOCK)
subprocess.run([sys.argv[2], "-P", "FORWARD", "DROP"], check=True)  # someone else, meanwhile
fw.ensure(Mode.OPEN, fresh=False)  # the daemon's hot path: planned from the last read-back
fw.close()
"""


def test_hot_path_swap_keeps_a_policy_changed_since_the_last_read(host: Host) -> None:
    """A swap planned from the previous read-back (the daemon's hot path) leaves a built-in
    chain's policy set by someone else in the meantime as it is."""
    host.ns.run([sys.executable, "-c", _HOT_SWAP, host.backend, f"iptables-{host.flavour}"],
                env=host.env)
    saved = host.save()
    assert ":FORWARD DROP" in saved, saved
    assert "-A INPUT -j sslvpn-heartbeat-chain" in saved


_ECHO = """
import socket, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080)); s.listen(64); print("up", flush=True)
def serve(c):
    while (data := c.recv(64)):
        c.sendall(data)
while True:
    threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()
"""

_SESSION = """
import socket, sys
s = socket.create_connection(("10.77.0.1", 8080), timeout=3)
s.sendall(b"one"); print(s.recv(64).decode(), flush=True)
sys.stdin.readline()  # the drain is set meanwhile
s.sendall(b"two"); print(s.recv(64).decode(), flush=True)
try:
    socket.create_connection(("10.77.0.1", 8080), timeout=3)
    print("new: connected", flush=True)
except ConnectionRefusedError:
    print("new: refused", flush=True)
"""


def test_drain_keeps_established_sessions_and_refuses_new_ones(host: Host,
                                                               client_ns: Netns) -> None:
    """`block --drain`: a session opened before goes on exchanging data; a new one is refused."""
    veth_pair(host.ns, client_ns, "10.77.0.1", "10.77.0.2")
    server = host.ns.popen([sys.executable, "-c", _ECHO], stdout=subprocess.PIPE, text=True)
    session = None
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "up"
        session = client_ns.popen([sys.executable, "-c", _SESSION], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        assert session.stdout is not None and session.stdin is not None
        assert session.stdout.readline().strip() == "one"
        host.cli("block", "--drain")
        session.stdin.write("go\n")
        session.stdin.flush()
        out, _ = session.communicate(timeout=15)
        assert out.split("\n")[:2] == ["two", "new: refused"], out
    finally:
        for proc in (session, server):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def test_block_shows_the_manual_page_lines(host: Host) -> None:
    """With ``reject_with = "icmp-port-unreachable"``, `block` makes `iptables -L` print the chain
    exactly as the original manual page shows it."""
    cfg = host.config.read_text().replace("[firewall]\n",
                                          '[firewall]\nreject_with = "icmp-port-unreachable"\n')
    host.config.write_text(cfg)
    host.cli("block")
    assert host.listing(4) == MANUAL_BLOCKED
    v6 = host.listing(6)
    assert v6[2][-1] == "icmp6-port-unreachable"
    host.cli("unblock")
    assert host.listing(4) == MANUAL_BLOCKED[:2]


def test_default_block_lists_tcp_reset(host: Host) -> None:
    """The default configuration lists the manual's line with one difference, the reset:
    ``reject-with tcp-reset`` for both families."""
    host.cli("block")
    assert host.listing(4) == [*MANUAL_BLOCKED[:2], [*MANUAL_BLOCKED[2][:-1], "tcp-reset"]]
    assert host.listing(6)[2][-2:] == ["reject-with", "tcp-reset"]
    host.cli("unblock")
    assert host.listing(4) == MANUAL_BLOCKED[:2]


def test_client_refused_while_blocked_and_served_when_open(host: Host, client_ns: Netns) -> None:
    """A client in another namespace gets 'connection refused' while blocked and connects when open."""
    veth_pair(host.ns, client_ns, "10.77.0.1", "10.77.0.2")
    server = host.ns.popen([sys.executable, "-c", (
        "import socket,sys\n"
        "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        "s.bind(('0.0.0.0', 8080)); s.listen(64); print('up', flush=True)\n"
        "while True:\n c,_=s.accept(); c.sendall(b'hi'); c.close()\n")],
        stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None and server.stdout.readline().strip() == "up"
    probe = ("import socket\ntry:\n s=socket.create_connection(('10.77.0.1', 8080), timeout=2)\n"
             " print(s.recv(2).decode())\nexcept ConnectionRefusedError:\n print('refused')\n")

    def client() -> str:
        return client_ns.run([sys.executable, "-c", probe]).stdout.strip()

    assert client() == "hi"
    host.cli("block")
    assert client() == "refused"
    # loopback is exempt: local probes still reach the service while blocked
    local = host.ns.run([sys.executable, "-c", probe.replace("10.77.0.1", "127.0.0.1")])
    assert local.stdout.strip() == "hi"
    host.cli("unblock")
    assert client() == "hi"


def test_apply_is_idempotent(host: Host) -> None:
    """Blocking twice leaves the same ruleset as blocking once, with one jump at the top."""
    host.cli("block")
    once = host.save()
    host.cli("block")
    assert host.save() == once
    assert once.count("-A INPUT -j sslvpn-heartbeat-chain") == 1


def test_foreign_rules_policies_and_counters_survive(host: Host) -> None:
    """Other chains, rules, policies and their counters are untouched by every operation."""
    host.ns.run([f"iptables-{host.flavour}-restore", "-c"], input=FOREIGN)
    before = host.save(counters=True)

    def foreign(text: str) -> list[str]:
        return [ln for ln in text.splitlines() if "sslvpn-heartbeat-chain" not in ln]

    for op in (["block"], ["block", "--drain"], ["unblock"], ["block"], ["cleanup"]):
        host.cli(*op)
        assert foreign(host.save(counters=True)) == foreign(before), op
        if op != ["cleanup"]:
            lines = host.save().splitlines()
            first_input = next(ln for ln in lines if ln.startswith("-A INPUT"))
            assert first_input == "-A INPUT -j sslvpn-heartbeat-chain", op
    assert host.save(counters=True) == before


def test_cleanup_leaves_nothing_in_either_family(host: Host) -> None:
    """`cleanup` removes chain and jump for IPv4 and IPv6; the tables are as before."""
    before4, before6 = host.save(4), host.save(6)
    host.cli("block", "--drain")
    assert "sslvpn-heartbeat-chain" in host.save(6)
    host.cli("cleanup")
    assert (host.save(4), host.save(6)) == (before4, before6)
    assert "nothing to remove" in host.cli("cleanup").stdout


def test_duplicate_and_misplaced_jumps_are_reconciled(host: Host) -> None:
    """Three jumps, one not first, become exactly one jump at position 1."""
    tool = f"iptables-{host.flavour}"
    host.ns.run([tool, "-N", "sslvpn-heartbeat-chain"])
    host.ns.run([tool, "-A", "INPUT", "-p", "udp", "-j", "ACCEPT"])
    for _ in range(3):
        host.ns.run([tool, "-A", "INPUT", "-j", "sslvpn-heartbeat-chain"])
    host.cli("block")
    lines = [ln for ln in host.save().splitlines() if ln.startswith("-A INPUT")]
    assert lines == ["-A INPUT -j sslvpn-heartbeat-chain", "-A INPUT -p udp -j ACCEPT"]


def test_status_json_reports_each_family(host: Host) -> None:
    """`status --json` says blocked/open, jump count and flavour for both families."""
    import json

    host.cli("block", "--reason", "patching")
    st = json.loads(host.cli("status", "--json").stdout)
    assert st["backend"] == host.backend
    assert st["admin_block"]["reason"] == "patching"
    for fam in ("ipv4", "ipv6"):
        assert st["families"][fam]["state"] == "blocked"
        assert st["families"][fam]["jumps"] == 1
        assert st["families"][fam]["flavour"] == ("nf_tables" if host.flavour == "nft" else "legacy")
    host.cli("unblock")
    st = json.loads(host.cli("status", "--json").stdout)
    assert st["admin_block"] is None
    assert {st["families"][f]["state"] for f in ("ipv4", "ipv6")} == {"open"}


def test_lock_held_by_another_program_fails_cleanly(host: Host, tmp_path: Path) -> None:
    """With the xtables lock held past the bound, block exits 75 naming the lock; nothing changes."""
    if host.flavour != "legacy":
        pytest.skip("iptables-nft takes no xtables lock")
    before = host.save()
    with hold_lock(tmp_path / "xtables.lock"):
        res = host.cli("block", check=False)
    assert res.returncode == 75, res.stderr
    assert re.search(r"lock", res.stderr)
    assert host.save() == before
    assert not (tmp_path / "state" / "admin-block.json").exists()  # nothing recorded either
    host.cli("block")  # and once the lock is free it works
    assert "-A INPUT -j sslvpn-heartbeat-chain" in host.save()
    assert (tmp_path / "state" / "admin-block.json").exists()
    with hold_lock(tmp_path / "xtables.lock"):
        res = host.cli("unblock", check=False)
    assert res.returncode == 75, res.stderr
    assert (tmp_path / "state" / "admin-block.json").exists()  # still blocked, still recorded


def test_iptc_refuses_on_nf_tables(netns: Netns, tmp_path: Path) -> None:
    """backend=iptc on an nf_tables host exits 69 with a clear reason and writes no rule anywhere."""
    cfg = write_config(tmp_path / "c.toml", {"firewall": {"backend": "iptc"},
                                             "state": {"dir": str(tmp_path / "s")}})
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    res = netns.run([sys.executable, "-m", "watcher", "block", "--config", str(cfg)],
                    env=env, check=False)
    assert res.returncode == 69
    assert "legacy" in res.stderr and "nf_tables" in res.stderr
    for flavour in ("nft", "legacy"):
        assert "sslvpn" not in netns.save(4, flavour)
    assert not (tmp_path / "s" / "admin-block.json").exists()


def test_missing_iptables_exits_69(netns: Netns, tmp_path: Path) -> None:
    """With no iptables on PATH, block exits 69 saying so, and records no admin block."""
    cfg = write_config(tmp_path / "c.toml", {"state": {"dir": str(tmp_path / "s")}})
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]),
               PATH=str(Path(sys.executable).parent))
    res = netns.run([sys.executable, "-m", "watcher", "block", "--config", str(cfg)],
                    env=env, check=False)
    assert res.returncode == 69, res.stderr
    assert "iptables" in res.stderr
    assert not (tmp_path / "s" / "admin-block.json").exists()
