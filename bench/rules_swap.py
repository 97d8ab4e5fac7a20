"""Time per open<->blocked swap of our chain, per backend, against a bare iptables-restore call.

Run as root from the repository: ``python -m bench.rules_swap [--rounds N]``. The program makes a
throwaway network namespace, re-executes itself inside it (``--inner``), prints the figures and
deletes the namespace. Nothing runs in the initial namespace's firewall. IPv4 only.

Variants (each alternates BLOCK and OPEN; one sample is one swap):

- ``bare restore``: ``iptables-restore --noflush`` fed the exact text the restore backend
  writes for that swap (the floor of its flavour);
- ``Firewall restore``: ``Firewall.ensure()`` with the restore backend: read, plan, apply,
  read back;
- ``Firewall restore, hot``: ``Firewall.ensure(fresh=False)``, the daemon's path on a
  transition: planned from the previous read-back, then apply and read back (nf_tables only:
  on legacy the restore backend always plans from a fresh read, since its transaction
  re-declares the built-in chains' policies and counters);
- ``Firewall restore, daemon``: the hot path as the daemon runs it, with an iptables-restore
  started ahead of each transaction (``RestoreBackend(prestart=True)``);
- ``Firewall iptc`` (and ``, hot``): the same with the iptc backend (legacy only);
- ``iptc apply only``: ``IptcBackend.commit()`` of a precomputed plan, no read, no read-back;
- ``(what-if) apply+iptc``: the restore backend writing, libiptc reading back (legacy);
- ``bare netlink batch``: the batch the nft backend sends for that swap, on a socket kept
  open, no read and no read-back: the kernel's own commit (nf_tables);
- ``Firewall nft`` (``, hot``): the same Firewall paths with the nft backend (the daemon's
  path is ``, hot``); ``, v4+v6`` rows swap both families as the daemon does with IPv6 on
  (restore: one iptables-restore per family, both started before either is fed; nft: both
  families in one netlink batch), then the read-backs;
- ``(ref) ...``: an iptables-save alone, starting ``true``, ``iptables-restore -V`` (starting
  the program and loading its libraries, no netlink), and the netlink batch on a fresh socket
  closed after it (the kernel waits for the commit's deferred release when a netfilter netlink
  socket closes: iptables-restore pays that on its way out), for scale.

Every variant runs in two regimes. ``back-to-back``: each swap starts as soon as the previous
one returned. ``settled``: before each (untimed) the kernel's deferred release of the previous
swap is waited for, by opening and closing a netfilter netlink socket, as after the seconds of
quiet that precede a real failover. The difference matters on nf_tables: a rule with an xt
target (REJECT) waits in the kernel for any pending release, which takes an RCU grace period.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rules.base import Backend
from rules.firewall import Firewall
from rules.iptc_backend import IptcBackend
from rules.model import ChainSpec, Family, Mode
from rules.nft_backend import NftBackend, acks, batch
from rules.plan import Plan, TableState, desired_state, parse_save, plan_apply
from rules.render import render_restore
from rules.restore import RestoreBackend

__all__ = ["Stats", "main", "stats"]

SPEC = ChainSpec()
WARMUP = 10
REGIMES = ("back-to-back", "settled")
NETLINK_NETFILTER = 12


class _Regime:
    """Whether the kernel's deferred release is waited for before each timed swap."""

    settled = False


def settle() -> None:
    """Wait until nf_tables has released what earlier commits dropped (a no-op otherwise).

    Closing a bound NETLINK_NETFILTER socket makes the kernel flush nf_tables' destroy work.
    """
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                       NETLINK_NETFILTER) as s:
        s.bind((0, 0))


@dataclass(frozen=True)
class Stats:
    """A distribution of swap times in nanoseconds, summarised."""

    n: int
    median: float
    p90: float
    p99: float
    min: float
    to_block: float  # median of the swaps open -> blocked
    to_open: float  # median of the swaps blocked -> open


def _rank(sorted_ns: Sequence[int], q: float) -> float:
    """The nearest-rank ``q`` quantile (0 < q <= 1) of an ascending sequence."""
    idx = max(0, min(len(sorted_ns) - 1, round(q * len(sorted_ns) + 0.5) - 1))
    return float(sorted_ns[idx])


def stats(samples: Sequence[int]) -> Stats:
    """Median, p90, p99 (nearest rank), minimum, and the median of each direction.

    ``samples`` alternate: even indices are swaps to BLOCK, odd ones swaps to OPEN.
    """
    s = sorted(samples)
    blk, opn = sorted(samples[0::2]), sorted(samples[1::2] or samples[0::2])
    return Stats(len(s), _rank(s, 0.5), _rank(s, 0.9), _rank(s, 0.99), float(s[0]),
                 _rank(blk, 0.5), _rank(opn, 0.5))


@dataclass
class TimedBackend:
    """A Backend wrapper that records how long each read() and commit() took, to split a swap."""

    inner: Backend
    reads: list[int] = field(default_factory=list)
    applies: list[int] = field(default_factory=list)
    applied_at: int = 0  # perf_counter_ns when the last commit() returned
    name: str = field(init=False)
    lock_wait_s: float = field(init=False)

    def __post_init__(self) -> None:
        self.name = self.inner.name
        self.lock_wait_s = self.inner.lock_wait_s

    def flavour(self, family: Family) -> str:
        """The wrapped backend's flavour."""
        return self.inner.flavour(family)

    def read(self, family: Family, chain: str) -> TableState:
        """The wrapped read, timed."""
        t = time.perf_counter_ns()
        try:
            return self.inner.read(family, chain)
        finally:
            self.reads.append(time.perf_counter_ns() - t)

    def commit(self, plans: Sequence[Plan], wait_s: float) -> None:
        """The wrapped commit, timed (one entry per commit)."""
        t = time.perf_counter_ns()
        try:
            self.inner.commit(plans, wait_s)
        finally:
            done = time.perf_counter_ns()
            self.applied_at = max(self.applied_at, done)
            self.applies.append(done - t)

    def close(self) -> None:
        """Close the wrapped backend."""
        self.inner.close()


@dataclass(frozen=True)
class Result:
    """One variant's samples and, for Firewall variants, where the time went."""

    label: str
    flavour: str
    stats: Stats
    split: str = ""
    regime: str = field(default_factory=lambda: REGIMES[_Regime.settled])


def _swaps(rounds: int, one: Callable[[Mode], object],
           after_warmup: Callable[[], None] = lambda: None) -> list[int]:
    """Time ``rounds`` alternating BLOCK/OPEN swaps after a short warm-up."""
    modes = (Mode.BLOCK, Mode.OPEN)
    for i in range(WARMUP):
        one(modes[i % 2])
    after_warmup()
    out = []
    for i in range(rounds):
        if _Regime.settled:
            settle()
        t = time.perf_counter_ns()
        one(modes[i % 2])
        out.append(time.perf_counter_ns() - t)
    return out


def _plans(backend: Backend, family: Family = Family.V4) -> dict[Mode, Plan]:
    """The plans the engine computes for each swap once the chain and its jump exist."""
    fw = Firewall(backend, SPEC, ipv6=family is Family.V6)
    fw.detect_families()
    fw.ensure(Mode.OPEN)
    plans = {}
    for mode, other in ((Mode.BLOCK, Mode.OPEN), (Mode.OPEN, Mode.BLOCK)):
        fw.ensure(other)
        plans[mode] = plan_apply(SPEC, family, mode, backend.read(family, SPEC.name))
        assert not plans[mode].is_noop and not plans[mode].insert_jump
    fw.ensure(Mode.OPEN)
    return plans


def bare_netlink(rounds: int, *, fresh_socket: bool = False) -> Result:
    """The nft backend's batch for each swap, sent and acknowledged, nothing else.

    ``fresh_socket``: a new socket per swap, closed after the answer, as iptables-restore's.
    """
    backend = NftBackend()
    plans = _plans(backend)
    backend.close()
    sock: socket.socket | None = None
    batches = {m: batch((p,))[0] for m, p in plans.items()}  # encoded once, as the backend does

    def one(mode: Mode) -> None:
        nonlocal sock
        if sock is None or fresh_socket:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                 NETLINK_NETFILTER)
            sock.bind((0, 0))
        sock.send(batches[mode])
        for _, code in acks(sock.recv(65536)):  # the one acknowledgement, or an error first
            if code:
                raise SystemExit(f"netlink batch refused: errno {code}")
        if fresh_socket:
            sock.close()

    label = "(ref) netlink + close" if fresh_socket else "bare netlink batch"
    res = Result(label, "nf_tables", stats(_swaps(rounds, one)))
    if sock is not None:
        sock.close()
    return res


def bare_restore(rounds: int) -> Result:
    """The floor: the restore backend's own argv and text, run with no read and no read-back."""
    backend = RestoreBackend()
    tools = backend.tools(Family.V4)
    legacy = tools.flavour == "legacy"
    policies = parse_save(subprocess.run([tools.save, "-t", "filter"], capture_output=True, text=True,
                                         check=True).stdout, SPEC.name).policies if legacy else ()
    texts = {m: render_restore(p, policies=policies) for m, p in _plans(backend).items()}
    argv = [tools.restore, "--noflush", "--wait", "5", *(["--counters"] if legacy else [])]
    env = {"PATH": os.environ["PATH"], "LC_ALL": "C"}
    if "XTABLES_LOCKFILE" in os.environ:
        env["XTABLES_LOCKFILE"] = os.environ["XTABLES_LOCKFILE"]

    def one(mode: Mode) -> None:
        p = subprocess.run(argv, input=texts[mode], capture_output=True, text=True, env=env, check=False)
        if p.returncode:
            raise SystemExit(f"{tools.restore} failed: {p.stderr.strip()}")

    return Result("bare iptables-restore", tools.flavour, stats(_swaps(rounds, one)))


def reference(label: str, argv: Sequence[str], flavour: str, rounds: int) -> Result:
    """A process that changes nothing, timed like a swap: how much of a call is spawning it."""
    env = {"PATH": os.environ["PATH"], "LC_ALL": "C"}

    def one(mode: Mode) -> None:
        subprocess.run(argv, capture_output=True, text=True, env=env, check=True)

    return Result(label, flavour, stats(_swaps(rounds, one)))


def firewall_swaps(backend: Backend, rounds: int, label: str = "", *, fresh: bool = True,
                   ipv6: bool = False) -> Result:
    """Firewall.ensure() alternating BLOCK/OPEN, with the time in read() and apply() split out.

    ``fresh=False`` is the daemon's hot path: planned from the previous read-back, so one read
    (the read-back) per swap instead of two. ``ipv6``: both families per swap; the rule is in
    effect when the last family's commit returned.
    """
    timed = TimedBackend(backend)
    fw = Firewall(timed, SPEC, ipv6=ipv6)  # no fallback: a fallback would end the run
    fw.detect_families()
    fw.ensure(Mode.OPEN)
    nfam = len(fw.families)

    effect: list[int] = []

    def one(mode: Mode) -> None:
        t = timed.applied_at = time.perf_counter_ns()
        fw.ensure(mode, fresh=fresh)
        effect.append(timed.applied_at - t)

    def reset() -> None:
        timed.reads.clear()
        timed.applies.clear()
        effect.clear()

    samples = _swaps(rounds, one, reset)
    fw.close()
    reads = (2 if fresh else 1) * nfam
    if len(timed.applies) != rounds or len(timed.reads) != reads * rounds:
        raise SystemExit(f"expected 1 commit and {reads} reads per swap, got "
                         f"{len(timed.applies)} and {len(timed.reads)} in {rounds} swaps")
    in_effect = f"rule in effect after ->block {_med(effect[0::2])} / ->open {_med(effect[1::2])}"
    if nfam > 1:  # reads and applies of the families interleave: only the totals are split
        return Result(label, backend.flavour(Family.V4), stats(samples),
                      f"{in_effect} (both families)")

    med = _med
    pre = f"pre-read {med(timed.reads[0::2])} + " if fresh else ""
    back = timed.reads[1::2] if fresh else timed.reads
    split = f"{pre}apply {med(timed.applies)} + read-back {med(back)}; {in_effect}"
    return Result(label or f"Firewall {backend.name}", backend.flavour(Family.V4), stats(samples), split)


def _med(xs: Sequence[int]) -> str:
    return f"{_rank(sorted(xs), 0.5) / 1e6:.3f}"


def apply_and_read_back(backend: Backend, reader: Backend, rounds: int, label: str) -> Result:
    """What a swap would cost if planned from the last read-back: apply, then read back once.

    ``reader`` does the read-back (the backend itself, or libiptc on legacy). Each read-back is
    checked against the desired state, as Firewall.ensure() checks it.
    """
    plans = _plans(backend)
    want = {m: desired_state(SPEC, Family.V4, m) for m in plans}

    def one(mode: Mode) -> None:
        backend.commit((plans[mode],), 5.0)
        got = reader.read(Family.V4, SPEC.name)
        if (got.rules, got.jumps) != (want[mode].rules, want[mode].jumps):
            raise SystemExit(f"{label}: read-back mismatch after {mode}: {got}")

    return Result(label, backend.flavour(Family.V4), stats(_swaps(rounds, one)))


def iptc_apply_only(rounds: int) -> Result:
    """IptcBackend.commit() of precomputed plans: one libiptc commit, no read, no read-back."""
    backend = IptcBackend()
    plans = _plans(backend)
    samples = _swaps(rounds, lambda m: backend.commit((plans[m],), 5.0))
    return Result("iptc apply only", "legacy", stats(samples))


def _nft_rows(rounds: int, true: str) -> list[Result]:
    """The nf_tables variants, in the current regime."""
    rows = [
        bare_restore(rounds),
        firewall_swaps(RestoreBackend(), rounds),
        firewall_swaps(RestoreBackend(), rounds, "Firewall restore, hot", fresh=False),
        firewall_swaps(RestoreBackend(prestart=True), rounds, "Firewall restore, daemon",
                       fresh=False),
        firewall_swaps(RestoreBackend(prestart=True), rounds, "restore, daemon, v4+v6",
                       fresh=False, ipv6=True),
        bare_netlink(rounds),
        firewall_swaps(NftBackend(), rounds),
        firewall_swaps(NftBackend(), rounds, "Firewall nft, hot", fresh=False),
        firewall_swaps(NftBackend(), rounds, "nft, hot, v4+v6", fresh=False, ipv6=True),
        reference("(ref) iptables-save", ["iptables-save", "-t", "filter"], "nf_tables", rounds),
        reference("(ref) spawn true", [true], "nf_tables", rounds),
        reference("(ref) iptables-restore -V", ["iptables-restore", "-V"], "nf_tables", rounds),
        bare_netlink(rounds, fresh_socket=True),
    ]
    return rows


def _legacy_rows(rounds: int) -> list[Result]:
    """The legacy variants, in the current regime (PATH already holds the -legacy programs)."""
    return [
        bare_restore(rounds),
        # (no hot row: on legacy the restore backend plans from a fresh read by design)
        firewall_swaps(RestoreBackend(), rounds),
        apply_and_read_back(RestoreBackend(), IptcBackend(), rounds, "(what-if) apply+iptc"),
        reference("(ref) iptables-save", ["iptables-save", "-t", "filter"], "legacy", rounds),
        firewall_swaps(IptcBackend(), rounds),
        firewall_swaps(IptcBackend(), rounds, "Firewall iptc, hot", fresh=False),
        iptc_apply_only(rounds),
    ]


def _print_table(rounds: int, regime: str, results: Sequence[Result]) -> None:
    floors = {r.flavour: r.stats for r in results if r.label.startswith("bare iptables")}
    print(f"\n== {regime}: {rounds} swaps per variant after {WARMUP} warm-up swaps; IPv4 unless "
          "v4+v6; times in ms; x floor = median / median of the bare iptables-restore call of "
          "the same flavour and regime")
    print("->block / ->open: median of the swaps in that direction, and its ratio to the floor's")
    print(f"{'variant':<27}{'flavour':<10}{'median':>8}{'p90':>8}{'p99':>8}{'min':>8}"
          f"{'x floor':>9}{'->block':>9}{'x':>7}{'->open':>8}{'x':>7}")
    for r in results:
        st, f = r.stats, floors[r.flavour]
        print(f"{r.label:<27}{r.flavour:<10}{st.median / 1e6:>8.3f}{st.p90 / 1e6:>8.3f}"
              f"{st.p99 / 1e6:>8.3f}{st.min / 1e6:>8.3f}{st.median / f.median:>8.2f}x"
              f"{st.to_block / 1e6:>9.3f}{st.to_block / f.to_block:>6.2f}x"
              f"{st.to_open / 1e6:>8.3f}{st.to_open / f.to_open:>6.2f}x")
    print("where the time of a Firewall swap goes (medians of each step, ms):")
    for r in results:
        if r.split:
            print(f"  {r.label} ({r.flavour}): {r.split}")
    by = {r.label: r.stats for r in results if r.flavour == "nf_tables"}
    if "bare netlink batch" in by and regime == "settled":  # back to back, commits wait too
        bare, start = by["bare iptables-restore"], by["(ref) iptables-restore -V"]
        commit, closed = by["bare netlink batch"], by["(ref) netlink + close"]
        b, s0, c, cl = (x.to_block / 1e6 for x in (bare, start, commit, closed))
        print("where a bare iptables-restore's time goes on nf_tables, towards blocked (medians, "
              "ms; towards open, closing a netlink socket waits for the kernel's release of the "
              "deleted rule, a grace period):")
        print(f"  {b:.3f} = start and load the program {s0:.3f} + the kernel's commit of the "
              f"batch {c:.3f} + closing the socket {max(cl - c, 0):.3f} + the rest (its cache "
              f"queries, parsing, exit) {b - s0 - max(cl, c):.3f}")
        print(f"  towards open: {bare.to_open / 1e6:.3f}, of which the same batch sent and its "
              f"socket closed alone take {closed.to_open / 1e6:.3f}")


def inner(rounds: int, legacy_path: str) -> None:
    """Run every variant in both regimes in the current namespace and print the tables."""
    true = shutil.which("true") or "/bin/true"
    tables: dict[str, list[Result]] = {r: [] for r in REGIMES}
    # nf_tables first: once legacy tables exist, iptables-nft-save also checks for them.
    for settled, regime in enumerate(REGIMES):
        _Regime.settled = bool(settled)
        tables[regime] += _nft_rows(rounds, true)
    os.environ["PATH"] = legacy_path
    for settled, regime in enumerate(REGIMES):
        _Regime.settled = bool(settled)
        tables[regime] += _legacy_rows(rounds)
    for regime in REGIMES:
        _print_table(rounds, regime, tables[regime])


def _versions() -> str:
    ipt = subprocess.run(["iptables", "-V"], capture_output=True, text=True, check=False).stdout.strip()
    try:
        from importlib.metadata import version
        pyiptc = version("python-iptables")
    except Exception:  # Debian's python3-iptables ships no dist-info metadata
        pyiptc = "unknown"
    try:
        import pyroute2
        pyr = getattr(pyroute2, "__version__", "unknown")
    except ImportError:
        pyr = "absent"
    load = "/".join(f"{x:.2f}" for x in os.getloadavg())
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), platform.machine())
    return (f"{model} ({platform.machine()}): kernel {platform.release()}, {ipt}, python "
            f"{platform.python_version()}, python-iptables {pyiptc}, pyroute2 {pyr}, "
            f"{os.cpu_count()} CPUs, load average {load}")


def main(argv: Sequence[str] | None = None) -> int:
    """Parse options; outside a namespace make one and re-run inside it; print the figures."""
    p = argparse.ArgumentParser(prog="python -m bench.rules_swap", description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=500, help="swaps per variant (default 500)")
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--legacy-path", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rounds < 2:
        p.error("--rounds must be at least 2")
    if args.inner:
        inner(args.rounds, args.legacy_path)
        return 0
    if os.geteuid() != 0 or shutil.which("ip") is None:
        print("bench.rules_swap: run as root with iproute2 installed", file=sys.stderr)
        return 69

    from bench.machine import machine_line
    from tests.netns import REPO, Netns, legacy_path_dir

    print(machine_line())
    print(_versions())
    with tempfile.TemporaryDirectory(prefix="rules-swap-") as tmp, Netns("svbench") as ns, \
            legacy_path_dir(Path(tmp)) as legacy_path:
        env = dict(os.environ, PYTHONPATH=str(REPO), XTABLES_LOCKFILE=f"{tmp}/xtables.lock")
        cmd = [sys.executable, "-m", "bench.rules_swap", "--inner", "--rounds", str(args.rounds),
               "--legacy-path", legacy_path]
        proc = ns.popen(cmd, env=env, cwd=str(REPO))
        return proc.wait()


if __name__ == "__main__":
    raise SystemExit(main())
