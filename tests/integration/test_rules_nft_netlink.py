"""The nft backend against the real kernel and the real iptables-nft, in throwaway namespaces.

Its netlink batch must leave the kernel exactly as ``iptables-restore`` leaves it: the bytes it
sends are the bytes iptables-nft-restore sends (captured with strace), the kernel's dump of the
rule is the same after either, and ``iptables-save`` / ``iptables -L`` print the same text. A
swap is one transaction (one sendmsg, seen with strace), nothing outside our chain moves, and a
batch the kernel refuses or a read-back that differs sends the engine to iptables-restore for
good, said once.
"""

from __future__ import annotations

import json
import os
import re
import struct
import sys
from pathlib import Path

import pytest

from rules.model import Family, RejectRule
from rules.nft_backend import rule_message
from tests.integration.test_rules_atomic import _race
from tests.netns import Netns, legacy_path_dir

pytestmark = pytest.mark.netns

REPO = str(Path(__file__).resolve().parents[2])
CHAIN = "sslvpn-heartbeat-chain"
FOREIGN = """\
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:keepme - [0:0]
-A INPUT -i lo -j ACCEPT
-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT
-A FORWARD -j keepme
-A keepme -p udp -m udp --dport 53 -j ACCEPT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A OUTPUT -p tcp -m tcp --dport 9999 -j REDIRECT --to-ports 8888
COMMIT
"""
MODES = ["block", "drain", "block", "open", "drain", "open", "block", "open"]

# Runs inside the namespace: the same walk through MODES with each backend, the restore one
# first and back, then the nft one; prints what iptables-save and iptables -L showed after each.
_WALK = """
import json, subprocess, sys
from rules.firewall import Firewall
from rules.model import ChainSpec, Mode
from rules.nft_backend import NftBackend
from rules.restore import RestoreBackend
fam, reject_with, modes = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
v6 = fam == "6"
prog = "ip6tables-nft" if v6 else "iptables-nft"
spec = ChainSpec(reject_with=reject_with)
def save():
    out = subprocess.run([prog + "-save", "-c"], capture_output=True, text=True, check=True).stdout
    return "\\n".join(l for l in out.splitlines() if not l.startswith("#"))
def listing():
    return subprocess.run([prog, "-L", spec.name], capture_output=True, text=True,
                          check=True).stdout
restore = Firewall(RestoreBackend(), spec, ipv6=v6)  # IPv6 walks do both families
restore.detect_families()
nft = Firewall(NftBackend(), spec, ipv6=v6, fallback=RestoreBackend)
nft.detect_families()
mark("created")
nft.ensure(Mode.OPEN)  # chain and jump: created by iptables-restore
out = {"steps": []}
prev = "open"
for i, m in enumerate(modes):
    restore.ensure(Mode(m))
    by_restore, listed_restore = save(), listing()
    restore.ensure(Mode(prev))
    mark(f"swap {i} {m}")
    nft.ensure(Mode(m), fresh=False)
    mark("done")
    out["steps"].append({"mode": m, "restore": by_restore, "nft": save(),
                         "listed_restore": listed_restore, "listed_nft": listing()})
    prev = m
out["backend"] = nft.backend.name
print(json.dumps(out))
"""

# Marks in an strace of the walk: a write of "mark ..." to fd 99 (/dev/null) separates its steps.
_MARK = """
import os
_null = os.open(os.devnull, os.O_WRONLY)
os.dup2(_null, 99)
def mark(what):
    os.write(99, ("mark " + what).encode())
"""


def _netlink_batches(trace: str) -> dict[str, int]:
    """Per marked step of an strace (-f -o FILE: "PID call(...)" lines), the nf_tables batches
    the agent's own process sent (NFNL_MSG_BATCH_BEGIN in a sendmsg/sendto of the Python pid)."""
    out: dict[str, int] = {}
    step = "start"
    py_pid = None
    for line in trace.splitlines():
        m = re.match(r"(\d+)\s+(\w+)\((\d+), (.*)", line)
        if not m:
            continue
        pid, call, fd, rest = m.groups()
        if call == "write" and fd == "99" and '"mark ' in rest:
            py_pid = pid
            step = rest.split('"mark ', 1)[1].split('"', 1)[0]
            out.setdefault(step, 0)
            continue
        if call in ("sendmsg", "sendto") and pid == py_pid and "NFNL_MSG_BATCH_BEGIN" in rest:
            out[step] = out.get(step, 0) + 1
    return out


def _env(**extra: str) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=REPO, **extra)


def _load_foreign(ns: Netns) -> None:
    for prog in ("iptables-nft-restore", "ip6tables-nft-restore"):
        ns.run([prog], input=FOREIGN)


def _others(saved: str) -> list[str]:
    """Every line of a save that is not about our chain (its rules, its header, its jump)."""
    return [ln for ln in saved.splitlines() if CHAIN not in ln]


@pytest.mark.parametrize("reject_with", ["icmp-port-unreachable", "tcp-reset"])
@pytest.mark.parametrize("fam", ["4", "6"])
def test_every_swap_saves_and_lists_as_the_restore_backend(netns: Netns, fam: str,
                                                          reject_with: str, tmp_path: Path) -> None:
    """After every open/block/drain swap, iptables-save -c and iptables -L print byte for byte
    what they print after the restore backend's swap; each swap went over netlink (one batch
    sent by the agent's process, for both families when IPv6 is on: strace), the chain's
    creation through iptables-restore, and nothing outside our chain moved."""
    _load_foreign(netns)
    tool = f"ip{'6' if fam == '6' else ''}tables-nft-save"
    before = _others(netns.run([tool, "-c"]).stdout)
    trace = tmp_path / "strace"
    res = netns.run(["strace", "-f", "-qq", "-e", "trace=write,sendmsg,sendto", "-o", str(trace),
                     sys.executable, "-c", _MARK + _WALK, fam, reject_with, ",".join(MODES)],
                    env=_env(), timeout=180)
    out = json.loads(res.stdout)
    batches = _netlink_batches(trace.read_text())
    assert batches["created"] == 0  # chain and jump: iptables-restore's (another process)
    assert out["backend"] == "nft"  # never fell back
    rw = reject_with if fam == "4" or reject_with == "tcp-reset" else "icmp6-port-unreachable"
    for i, step in enumerate(out["steps"]):
        assert step["nft"] == step["restore"], step["mode"]
        assert step["listed_nft"] == step["listed_restore"], step["mode"]
        assert batches[f"swap {i} {step['mode']}"] == 1, (step["mode"], batches)
        rows = [ln.split() for ln in step["listed_nft"].splitlines()[2:]]
        if step["mode"] == "open":
            assert rows == []
        else:
            flags = ["flags:FIN,SYN,RST,ACK/SYN"] if step["mode"] == "drain" else []
            assert rows == [["REJECT", "tcp", "--", "anywhere", "anywhere", "tcp", "dpt:http-alt",
                             *flags, "reject-with", rw]]
    after = _others(netns.run([tool, "-c"]).stdout)
    assert [ln for ln in after if not ln.startswith("#")] == [
        ln for ln in before if not ln.startswith("#")]


def _strace_newrule(ns: Netns, fam: str, rule_line: str) -> tuple[bytes, bytes]:
    """The expressions and compat attributes iptables-nft-restore sends for ``rule_line``."""
    prog = f"ip{'6' if fam == '6' else ''}tables-nft-restore"
    text = f"*filter\n:{CHAIN} - [0:0]\n-A {CHAIN} {rule_line}\nCOMMIT\n"
    res = ns.run(["strace", "-e", "trace=sendmsg", "-xx", "-s", "65536", prog, "--noflush"],
                 input=text)
    call = res.stderr[res.stderr.index("NFT_MSG_NEWRULE"):]

    def attr(kind: str) -> bytes:
        m = re.search(r'nla_type=NLA_F_NESTED\|' + kind + r'\}, "((?:\\x[0-9a-f]{2})*)"', call)
        assert m, f"no attribute {kind} in {call[:300]}"
        return bytes.fromhex(m.group(1).replace("\\x", ""))

    return attr("0x4"), attr("0x5")


# Runs inside the namespace: the kernel's dump (NFT_MSG_GETRULE) of our chain's rules, as hex of
# each rule's NFTA_RULE_EXPRESSIONS attribute.
_DUMP = """
import socket, struct, sys
fam = 10 if sys.argv[1] == "6" else 2
def attr(kind, payload):
    return struct.pack("=HH", 4 + len(payload), kind) + payload + b"\\0" * (-len(payload) % 4)
body = attr(1, b"filter\\0") + attr(2, sys.argv[2].encode() + b"\\0")
msg = struct.pack("=IHHII", 20 + len(body), (10 << 8) | 7, 0x1 | 0x300, 1, 0)
msg += struct.pack("!BBH", fam, 0, 0) + body
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)
s.bind((0, 0)); s.send(msg)
done = False
while not done:
    buf = s.recv(1 << 16); off = 0
    while off < len(buf):
        ln, kind = struct.unpack_from("=IH", buf, off)
        if kind in (2, 3):
            done = True; break
        a = off + 20
        while a < off + ln:
            alen, akind = struct.unpack_from("=HH", buf, a)
            if akind & 0x3fff == 4:
                print(buf[a + 4:a + alen].hex())
            a += alen + (-alen % 4)
        off += ln + (-ln % 4)
"""


def _attrs(msg: bytes) -> dict[int, bytes]:
    """A NEWRULE's attributes by type (flags cleared), each without its 4-byte header."""
    out, off = {}, 20
    while off < len(msg):
        length, kind = struct.unpack_from("=HH", msg, off)
        out[kind & 0x3FFF] = msg[off + 4:off + length]
        off += length + (-length % 4)
    return out


@pytest.mark.parametrize("syn_only", [False, True], ids=["block", "drain"])
@pytest.mark.parametrize("reject_with", ["icmp-port-unreachable", "tcp-reset"])
@pytest.mark.parametrize("fam", ["4", "6"])
def test_the_batch_carries_the_expressions_iptables_nft_writes(netns: Netns, fam: str,
                                                               reject_with: str,
                                                               syn_only: bool) -> None:
    """The rule's expressions and compat attribute are the bytes iptables-nft-restore sends, and
    the kernel's dump of the rule is the same whichever of the two wrote it."""
    family = Family.V6 if fam == "6" else Family.V4
    rule = RejectRule(8080, reject_with, syn_only=syn_only)
    exprs, compat = _strace_newrule(netns, fam, rule.save_form(family, CHAIN))
    ours = _attrs(rule_message(rule, family, CHAIN))
    assert ours[4] == exprs
    assert ours[5] == compat
    dumped_restore = netns.run([sys.executable, "-c", _DUMP, fam, CHAIN]).stdout.split()
    netns.run([f"ip{'6' if fam == '6' else ''}tables-nft", "-F", CHAIN])
    code = (
        "import sys\n"
        "from rules.model import Family, RejectRule\n"
        "from rules.nft_backend import NftBackend\n"
        "from rules.plan import Plan\n"
        "b = NftBackend()\n"
        "f = Family.V6 if sys.argv[1] == '6' else Family.V4\n"
        "rule = RejectRule(8080, sys.argv[2], syn_only=sys.argv[3] == '1')\n"
        f"b.commit((Plan(f, {CHAIN!r}, (rule,), 0, False),), 5.0)\n"
    )
    netns.run([sys.executable, "-c", code, fam, reject_with, "1" if syn_only else "0"],
              env=_env())
    dumped_nft = netns.run([sys.executable, "-c", _DUMP, fam, CHAIN]).stdout.split()
    assert len(dumped_restore) == 1
    assert dumped_nft == dumped_restore


_SWAPPER = """
import sys
from rules.firewall import Firewall
from rules.model import ChainSpec, Mode
fw = Firewall.open("auto", ChainSpec(), ipv6=False)
fw.detect_families()
assert fw.backend.name == "nft", fw.backend.name
fw.ensure(Mode.BLOCK)
print("ready", flush=True)
sys.stdin.readline()
for i in range(int(sys.argv[1])):
    fw.ensure(Mode.DRAIN if i % 2 == 0 else Mode.BLOCK, fresh=False)
assert fw.backend.name == "nft", fw.backend.name  # never fell back
"""


def test_a_reader_never_sees_the_chain_half_swapped(netns: Netns) -> None:
    """Hundreds of iptables-save reads during 300 BLOCK<->DRAIN netlink swaps: always one rule
    and one jump (tests/integration/test_rules_atomic.py's reader and its control)."""
    seen, bad = _race(netns, [sys.executable, "-c", _SWAPPER, "300"], "iptables-nft-save",
                      _env())
    print(f"nft/netlink: {seen} reads, {bad} half-written")
    assert seen >= 50, f"the reader only read {seen} times: no evidence either way"
    assert bad == 0, f"{bad} of {seen} reads saw the chain half-written"


# A Backend that changes the kernel right after the nft backend's commit, as a second writer
# could: the engine's read-back then sees what the kernel holds, not what was sent.
_AFTER_COMMIT = """
import json, subprocess, sys
from rules.firewall import Firewall
from rules.model import ChainSpec, Family, Mode
from rules.nft_backend import NftBackend
from rules.restore import RestoreBackend
class Log:
    def __init__(self): self.events = []
    def info(self, event, **kw): pass
    def warning(self, event, **kw): self.events.append([event, kw])
class AfterCommit:
    name = "nft"
    def __init__(self):
        self.inner, self.then, self.commits = NftBackend(), [], 0
        self.lock_wait_s = self.inner.lock_wait_s
    def flavour(self, family): return self.inner.flavour(family)
    def read(self, family, chain): return self.inner.read(family, chain)
    def commit(self, plans, wait_s):
        self.inner.commit(plans, wait_s)
        self.commits += 1
        if self.then:
            subprocess.run(["iptables-nft", *self.then.pop(0)], check=True)
    def close(self): self.inner.close()
log, b = Log(), AfterCommit()
spec = ChainSpec()
fw = Firewall(b, spec, ipv6=False, log=log, fallback=RestoreBackend)
fw.detect_families()
fw.ensure(Mode.OPEN)
"""

_FALLBACK = _AFTER_COMMIT + """
fw.ensure(Mode.BLOCK, fresh=False)
before = b.commits
# between the commit and its read-back, the kernel comes to hold another rule than the one sent
b.then = [["-R", spec.name, "1", "-p", "udp", "-j", "ACCEPT"]]
report = fw.ensure(Mode.DRAIN, fresh=False)
out = {"rules": list(fw.read()[Family.V4].rules), "backend": fw.backend.name,
       "tx": report.transactions, "commits": b.commits - before}
for m in (Mode.BLOCK, Mode.OPEN, Mode.DRAIN, Mode.BLOCK):
    fw.ensure(m, fresh=False)
out["commits_after"] = b.commits - before
out["backend_after"] = fw.backend.name
out["events"] = log.events
out["save"] = subprocess.run(["iptables-nft-save", "-t", "filter"], capture_output=True,
                             text=True, check=True).stdout
print(json.dumps(out))
"""


def test_a_read_back_that_differs_falls_back_to_iptables_restore_for_good(netns: Netns) -> None:
    """When iptables-save shows another rule than the netlink commit wrote (as many rules,
    printed otherwise), the engine re-applies through iptables-restore in the same call, logs
    one warning, and never commits through netlink again."""
    out = json.loads(netns.run([sys.executable, "-c", _FALLBACK], env=_env()).stdout)
    drain = RejectRule(8080, "icmp-port-unreachable", syn_only=True).save_form(Family.V4, CHAIN)
    assert out["rules"] == [drain]  # repaired by iptables-restore
    assert "-p udp -j ACCEPT" in out["events"][0][1]["reason"]
    assert out["backend"] == out["backend_after"] == "restore"
    assert out["tx"] == 2 and out["commits"] == 1 and out["commits_after"] == 1
    assert [e[0] for e in out["events"]] == ["firewall-backend-fallback"]
    assert out["events"][0][1]["family"] == "ipv4"
    block = RejectRule(8080, "icmp-port-unreachable").save_form(Family.V4, CHAIN)
    assert f"-A {CHAIN} {block}" in out["save"]
    assert out["save"].count(f"-A {CHAIN} ") == 1


_TAMPERED = _AFTER_COMMIT + """
seen = []
for tamper in (["-F", spec.name], ["-A", spec.name, "-p", "udp", "-j", "ACCEPT"]):
    before = b.commits
    b.then = [tamper]
    report = fw.ensure(Mode.BLOCK, fresh=False)
    seen.append([list(fw.read()[Family.V4].rules), b.commits - before, report.transactions])
    fw.ensure(Mode.OPEN, fresh=False)
print(json.dumps({"seen": seen, "backend": fw.backend.name,
                  "events": log.events}))
"""


def test_someone_elses_change_before_the_read_back_is_not_taken_for_a_fault(netns: Netns) -> None:
    """Our chain flushed, or given a rule more, between the commit and its read-back: the engine
    plans again from what it read and commits once more (still over netlink), no fallback."""
    out = json.loads(netns.run([sys.executable, "-c", _TAMPERED], env=_env()).stdout)
    block = RejectRule(8080, "icmp-port-unreachable").save_form(Family.V4, CHAIN)
    assert out["seen"] == [[[block], 2, 2], [[block], 2, 2]]
    assert out["backend"] == "nft"
    assert out["events"] == []


_REFUSED = """
import json, subprocess
from rules.firewall import Firewall
from rules.model import ChainSpec, Family, Mode
from rules.nft_backend import NftBackend
from rules.restore import RestoreBackend
from rules.plan import Plan
class Log:
    def __init__(self): self.events = []
    def info(self, event, **kw): pass
    def warning(self, event, **kw): self.events.append([event, kw])
class Misaddressed(NftBackend):
    # Its batches name a chain the table does not have: the kernel refuses them (ENOENT).
    def __init__(self):
        super().__init__()
        self.refused = 0
    def commit(self, plans, wait_s):
        try:
            super().commit([Plan(p.family, "no-such-chain", p.rules, p.delete_jumps, p.insert_jump)
                            if p.rules is not None and not p.insert_jump and not p.delete_jumps
                            else p for p in plans], wait_s)
        except Exception:
            self.refused += 1
            raise
log, b = Log(), Misaddressed()
spec = ChainSpec()
fw = Firewall(b, spec, ipv6=True, log=log, fallback=RestoreBackend)
fw.detect_families()
fw.ensure(Mode.OPEN)  # chain and jumps: iptables-restore's path
out = {"before": fw.backend.name, "changed": []}
for m in (Mode.BLOCK, Mode.DRAIN, Mode.OPEN, Mode.BLOCK):
    out["changed"].append([str(f) for f in fw.ensure(m).changed])
out.update(after=fw.backend.name, refused=b.refused, events=log.events,
           rules={str(f): list(st.rules) for f, st in fw.read().items()})
print(json.dumps(out))
"""


def test_a_refused_batch_falls_back_to_iptables_restore_once_and_for_good(netns: Netns) -> None:
    """The kernel refuses the nft backend's batch for a plan made from a fresh read: the engine
    commits that step through iptables-restore in the same call, logs one warning, and every
    later step goes through iptables-restore (the refusing backend is never asked again)."""
    out = json.loads(netns.run([sys.executable, "-c", _REFUSED], env=_env()).stdout)
    assert out["before"] == "nft" and out["after"] == "restore"
    assert out["refused"] == 1
    assert out["changed"] == [["ipv4", "ipv6"]] * 4
    assert [e[0] for e in out["events"]] == ["firewall-backend-fallback"]
    assert "ENOENT" in out["events"][0][1]["reason"]
    assert out["rules"] == {f"ipv{n}": [RejectRule(8080, "icmp-port-unreachable").save_form(f, CHAIN)]
                            for n, f in (("4", Family.V4), ("6", Family.V6))}
    assert "no-such-chain" not in netns.save(4) + netns.save(6)


_GONE = """
import subprocess
from rules.errors import BatchRefused
from rules.firewall import Firewall
from rules.model import ChainSpec, Family, Mode
from rules.nft_backend import NftBackend
from rules.plan import plan_apply
from rules.restore import RestoreBackend
b = NftBackend()
spec = ChainSpec()
fw = Firewall(b, spec, ipv6=False, fallback=RestoreBackend)
fw.detect_families()
fw.ensure(Mode.OPEN)
plan = plan_apply(spec, Family.V4, Mode.BLOCK, b.read(Family.V4, spec.name))
subprocess.run(["iptables-nft", "-D", "INPUT", "-j", spec.name], check=True)
subprocess.run(["iptables-nft", "-X", spec.name], check=True)
try:
    b.commit((plan,), 5.0)
except BatchRefused as exc:
    print("refused:", exc)
else:
    raise SystemExit("a batch for a missing chain was accepted")
print("saved-absent:", spec.name not in subprocess.run(
    ["iptables-nft-save"], capture_output=True, text=True).stdout)
report = fw.ensure(Mode.BLOCK, fresh=False)  # the engine recovers through iptables-restore
print("recovered:", report.changed, fw.backend.name)
"""


def test_a_batch_for_a_vanished_chain_changes_nothing_and_the_engine_recovers(
        netns: Netns) -> None:
    """A chain deleted behind the agent's back: the netlink batch fails as a whole (ENOENT), the
    table is unchanged, and the next ensure() (planned from the stale read-back: a cache miss,
    not a fault) recreates chain and jump via iptables-restore, keeping the nft backend."""
    out = netns.run([sys.executable, "-c", _GONE], env=_env()).stdout
    assert "refused: nf_tables refused the batch" in out and "ENOENT" in out, out
    assert "saved-absent: True" in out, out
    assert "recovered: (<Family.V4: 'ipv4'>,) nft" in out, out
    saved = netns.save()
    assert f"-A INPUT -j {CHAIN}" in saved
    assert saved.count(f"-A {CHAIN} ! -i lo -p tcp -m tcp --dport 8080 -j REJECT") == 1


def test_auto_is_nft_on_nf_tables_and_iptc_on_legacy(netns: Netns, tmp_path: Path) -> None:
    """make_backend("auto") picks the netlink backend where iptables is iptables-nft, and keeps
    libiptc where it is iptables-legacy."""
    code = "from rules.firewall import make_backend; print(make_backend('auto').name)"
    assert netns.run([sys.executable, "-c", code], env=_env()).stdout.strip() == "nft"
    with legacy_path_dir(tmp_path) as path:
        env = _env(PATH=path, XTABLES_LOCKFILE=str(tmp_path / "xtables.lock"))
        assert netns.run([sys.executable, "-c", code], env=env).stdout.strip() == "iptc"
        bad = netns.run([sys.executable, "-c", "from rules.firewall import make_backend; "
                         "make_backend('nft')"], env=env, check=False)
    assert bad.returncode != 0 and "drives nf_tables only" in bad.stderr


_BOTH = """
from rules.firewall import Firewall
from rules.model import ChainSpec, Mode
fw = Firewall.open("nft", ChainSpec(), ipv6=True)
fw.detect_families()
fw.ensure(Mode.OPEN)
for m in (Mode.BLOCK, Mode.OPEN, Mode.DRAIN):
    mark("swap " + m)
    fw.ensure(m, fresh=False)
mark("done")
print(fw.backend.name, len(fw.families))
fw.close()
"""


def test_the_engine_commits_both_families_in_one_batch(netns: Netns, tmp_path: Path) -> None:
    """With IPv6 on, each hot-path ensure() sends both families' swaps in one netlink batch (one
    sendmsg of the agent's process, seen by strace), and both families' saves show the rule."""
    trace = tmp_path / "strace"
    res = netns.run(["strace", "-f", "-qq", "-e", "trace=write,sendmsg,sendto", "-o", str(trace),
                     sys.executable, "-c", _MARK + _BOTH], env=_env(), timeout=60)
    assert res.stdout.split() == ["nft", "2"]
    assert _netlink_batches(trace.read_text()) == {"swap block": 1, "swap open": 1, "swap drain": 1,
                                             "done": 0}
    assert "--tcp-flags FIN,SYN,RST,ACK SYN -j REJECT --reject-with icmp-port-unreachable" in (
        netns.save(4))
    assert "--tcp-flags FIN,SYN,RST,ACK SYN -j REJECT --reject-with icmp6-port-unreachable" in (
        netns.save(6))


_ONE_BATCH = """
from rules.firewall import Firewall
from rules.model import ChainSpec, Family, Mode
from rules.nft_backend import NftBackend
from rules.plan import plan_apply
b = NftBackend()
spec = ChainSpec(reject_with="tcp-reset")
fw = Firewall(b, spec, ipv6=True)
fw.detect_families()
fw.ensure(Mode.OPEN)
for mode in (Mode.DRAIN, Mode.BLOCK):
    plans = [plan_apply(spec, f, mode, b.read(f, spec.name)) for f in fw.families]
    b.commit(plans, 5.0)
    print([list(b.read(f, spec.name).rules) for f in fw.families])
"""


def test_both_families_in_one_batch(netns: Netns) -> None:
    """commit() of both families' swaps: each family's read-back shows the rule iptables-restore
    would have written."""
    lines = netns.run([sys.executable, "-c", _ONE_BATCH], env=_env()).stdout.splitlines()
    for line, syn in zip(lines, (True, False), strict=True):
        want = [[RejectRule(8080, "tcp-reset", syn_only=syn).save_form(f, CHAIN)]
                for f in (Family.V4, Family.V6)]
        assert line == f"{want}"


_ONE_FAILS = """
import subprocess
from rules.errors import BatchRefused
from rules.firewall import Firewall
from rules.model import ChainSpec, Family, Mode
from rules.nft_backend import NftBackend
from rules.plan import plan_apply
from rules.restore import RestoreBackend
b = NftBackend()
spec = ChainSpec()
fw = Firewall(b, spec, ipv6=True, fallback=RestoreBackend)
fw.detect_families()
fw.ensure(Mode.OPEN)
plans = [plan_apply(spec, f, Mode.BLOCK, b.read(f, spec.name)) for f in fw.families]
subprocess.run(["ip6tables-nft", "-D", "INPUT", "-j", spec.name], check=True)
subprocess.run(["ip6tables-nft", "-X", spec.name], check=True)
try:
    b.commit(plans, 5.0)
except BatchRefused as exc:
    print("refused:", "ENOENT" in str(exc))
print("v4 still open:", b.read(Family.V4, spec.name).rules == ())
fw.ensure(Mode.BLOCK, fresh=False)  # hot path: the batch fails, then planned from a fresh read
print("both blocked:", all(len(b.read(f, spec.name).rules) == 1 for f in fw.families),
      b.read(Family.V6, spec.name).jumps, fw.backend.name)
"""


def test_a_two_family_batch_fails_as_a_whole_and_the_engine_replans_from_a_fresh_read(
        netns: Netns) -> None:
    """The IPv6 chain gone: the batch for both families is refused whole (IPv4 untouched), and
    ensure() then plans both from a fresh read, rebuilding IPv6's chain and jump, no fallback."""
    out = netns.run([sys.executable, "-c", _ONE_FAILS], env=_env()).stdout.splitlines()
    assert out == ["refused: True", "v4 still open: True", "both blocked: True (1,) nft"]
