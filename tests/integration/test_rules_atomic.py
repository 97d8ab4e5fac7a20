"""A swap is one kernel transaction: a concurrent reader never sees the chain half-written.

Swapping BLOCK <-> DRAIN replaces one REJECT rule by another. Done as two transactions (flush,
then add) a reader polling iptables-save would, sooner or later, catch the chain empty; done as
one (declare and refill in the same COMMIT, one nf_tables batch or one libiptc table
replacement) it never can. The control case proves the reader is fast enough to catch a gap.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.netns import Netns, legacy_path_dir

pytestmark = pytest.mark.netns

SWAPS = 150
REPO = str(Path(__file__).resolve().parents[2])

SWAPPER = """
import sys
from rules.firewall import Firewall
from rules.model import ChainSpec, Mode
from rules.firewall import make_backend
fw = Firewall(make_backend(sys.argv[1]), ChainSpec(), ipv6=False)
fw.detect_families()
fw.ensure(Mode.BLOCK)
print("ready", flush=True)
sys.stdin.readline()
for i in range(int(sys.argv[2])):
    fw.ensure(Mode.DRAIN if i % 2 == 0 else Mode.BLOCK, fresh=False)
"""

# The control: the same content change done the wrong way, as two transactions.
TWO_STEP = """
import subprocess, sys
save = sys.argv[1]
rule = "! -i lo -p tcp -m tcp --dport 8080 -j REJECT --reject-with icmp-port-unreachable"
print("ready", flush=True)
sys.stdin.readline()
for i in range(int(sys.argv[2])):
    subprocess.run([sys.argv[3], "-F", "sslvpn-heartbeat-chain"], check=True)
    subprocess.run([sys.argv[3], "-A", "sslvpn-heartbeat-chain", *rule.split()], check=True)
"""


def _reader(ns: Netns, save: str, env: dict[str, str]) -> subprocess.Popen[str]:
    code = (
        "import subprocess, sys, select\n"
        "empty = seen = 0\n"
        "while not select.select([sys.stdin], [], [], 0)[0] and seen < 20000:\n"
        f"    out = subprocess.run([{save!r}, '-t', 'filter'], capture_output=True, text=True).stdout\n"
        "    rules = [l for l in out.splitlines() if l.startswith('-A sslvpn-heartbeat-chain ')]\n"
        "    jumps = out.count('-A INPUT -j sslvpn-heartbeat-chain')\n"
        "    seen += 1\n"
        "    if len(rules) != 1 or jumps != 1:\n"
        "        empty += 1\n"
        "print(seen, empty, flush=True)\n"
    )
    return ns.popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    text=True, env=env)


def _race(ns: Netns, writer_argv: list[str], save: str, env: dict[str, str]) -> tuple[int, int]:
    writer = ns.popen(writer_argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    assert writer.stdout is not None and writer.stdin is not None
    assert writer.stdout.readline().strip() == "ready"
    reader = _reader(ns, save, env)
    writer.stdin.write("go\n")
    writer.stdin.flush()
    assert writer.wait(timeout=120) == 0
    out, _ = reader.communicate("stop\n", timeout=60)
    seen, bad = map(int, out.split())
    return seen, bad


def _env(path: str | None = None) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=REPO)
    if path:
        env["PATH"] = path
    return env


@pytest.mark.parametrize("flavour,backend", [("nft", "restore"), ("legacy", "restore"),
                                             ("legacy", "iptc")])
def test_reader_never_sees_the_chain_half_swapped(netns: Netns, tmp_path: Path, flavour: str,
                                                   backend: str) -> None:
    """Hundreds of reads during 150 BLOCK<->DRAIN swaps: always one rule and one jump."""
    env = _env()
    if flavour == "legacy":
        with legacy_path_dir(tmp_path) as path:
            env = _env(path)
    seen, bad = _race(netns, [sys.executable, "-c", SWAPPER, backend, str(SWAPS)],
                      f"iptables-{flavour}-save", env)
    print(f"{flavour}/{backend}: {seen} reads, {bad} half-written")
    assert seen >= 50, f"the reader only read {seen} times: no evidence either way"
    assert bad == 0, f"{bad} of {seen} reads saw the chain half-written"


def test_control_two_transactions_are_caught(netns: Netns) -> None:
    """The same reader does catch the gap of a flush-then-add done as two commands."""
    env = _env()
    netns.run(["iptables-nft", "-N", "sslvpn-heartbeat-chain"])
    netns.run(["iptables-nft", "-I", "INPUT", "1", "-j", "sslvpn-heartbeat-chain"])
    seen, bad = _race(netns, [sys.executable, "-c", TWO_STEP, "iptables-nft-save", str(SWAPS),
                              "iptables-nft"], "iptables-nft-save", env)
    print(f"two-step control: {seen} reads, {bad} caught the gap")
    assert bad > 0, f"0 of {seen} reads caught the gap: this reader cannot tell atomic from not"
