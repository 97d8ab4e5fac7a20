"""Failover and recovery latency: the agent against a 1 s polling loop and monit, in one run.

    python -m bench.failover --rounds 50 [--protectors agent,polling,monit] [--json FILE]

Root only. For each protector a fresh pair of namespaces: a *server* with the fake SSL VPN
service (tests/testbed/fakesvc.py) and the protector, and a *client* joined to it by veth. A round:

1. t0: SIGKILL the service's core (what ``fakesvc ctl kill-core`` does, without the start-up
   time of a ``ctl`` process in the measurement);
2. the client connects to the server's 10.x address in a bounded loop until the first
   ``connection refused`` (t1): failover = t1 - t0;
3. t2: start a core (SIGUSR1 to the listener, what ``ctl start`` does); t2r: the PID file names
   the new live core (the service is ready); the client connects until the first success (t3):
   recovery = t3 - t2r (and t3 - t2 from the start command).

The listener keeps accepting while the core is dead, so only the protector's REJECT rule makes a
connect fail. Every wait has a deadline and every connect loop a cap on attempts; a round that
hits one is counted as missed. Prints distributions only; never passes or fails.

Also the home of the protectors the other benchmarks share (bench/idle.py,
bench/cluster_failover.py): ``protector_argv`` starts any of them for a given PID file.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import ctypes
import errno
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from bench.machine import ICMP_LIMITS_KEPT, ICMP_LIMITS_OFF, machine_line
from tests.cfg import write_config
from tests.netns import REPO, Netns, veth_pair, wait_for
from tests.testbed import fakesvc

__all__ = [
    "CHAIN",
    "PROTECTORS",
    "AgentSettings",
    "Round",
    "ServerBed",
    "child_env",
    "connect_once",
    "in_netns",
    "main",
    "percentile",
    "protector_argv",
    "run_rounds",
    "stats",
]

CHAIN = "sslvpn-heartbeat-chain"
PORT = 8080
SERVER_ADDR, CLIENT_ADDR = "10.201.0.1", "10.201.0.2"
PROTECTORS = ("agent", "polling", "monit")
BENCH_DIR = Path(__file__).resolve().parent
POLLING_SCRIPT = BENCH_DIR / "polling_baseline.sh"
MONITRC_TEMPLATE = BENCH_DIR / "monit" / "monitrc.in"
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


# --- protectors --------------------------------------------------------------------------------

@dataclass(frozen=True)
class AgentSettings:
    """The agent's probe settings in the benchmarks (the product's defaults plus an HTTP GET)."""

    rise: int = 2
    rise_interval_ms: int = 250
    fall: int = 2
    interval_s: float = 5.0
    timeout_ms: int = 1000
    http_path: str = "/"
    reject_with: str = "icmp-port-unreachable"
    backend: str = "auto"  # [firewall] backend: auto is the nft netlink backend on nf_tables

    def recovery_target_ms(self) -> float:
        """The recovery p50 target of the brief: rise x rise_interval + 20 ms."""
        return self.rise * self.rise_interval_ms + 20.0


def child_env() -> dict[str, str]:
    """The environment for processes started by the benchmarks (the repository importable)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def protector_argv(name: str, pid_file: Path, workdir: Path, *, port: int = PORT,
                   agent: AgentSettings = AgentSettings(), timed: bool = False,
                   launcher: Sequence[str] = ()) -> list[str]:
    """argv (to run inside a server namespace) of protector ``name`` guarding ``pid_file``.

    Writes the protector's configuration under ``workdir``. ``timed`` runs the agent with the
    timing hooks of this module (probe and iptables durations on stderr); ``launcher``, the
    module and subcommand of another benchmark's wrapper (``python -m`` LAUNCHER ``run ...``).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    if name == "agent":
        cfg = write_config(workdir / "agent.toml", {
            "service": {"name": "novell-sslvpn", "pid_file": str(pid_file), "port": port},
            "probe": {"rise": agent.rise, "rise_interval_ms": agent.rise_interval_ms,
                      "fall": agent.fall, "interval_s": agent.interval_s,
                      "timeout_ms": agent.timeout_ms, "http_path": agent.http_path},
            "firewall": {"chain": CHAIN, "reject_with": agent.reject_with,
                         "backend": agent.backend},
            "log": {"format": "json"},
            "state": {"dir": str(workdir / "agent-state")},
        })
        if timed:
            launcher = ("bench.failover", "_timed-agent")
        return [sys.executable, "-m", *(launcher or ("watcher",)), "run", "--config", str(cfg)]
    if name == "polling":
        return ["/bin/sh", str(POLLING_SCRIPT), "loop", str(pid_file), str(port), CHAIN, "1"]
    if name == "monit":
        monit = shutil.which("monit")
        if monit is None:
            raise RuntimeError("monit is not installed (apt-get install monit)")
        text = MONITRC_TEMPLATE.read_text()
        for key, value in {"DIR": str(workdir), "PIDFILE": str(pid_file),
                           "SCRIPT": str(POLLING_SCRIPT), "PORT": str(port),
                           "CHAIN": CHAIN}.items():
            text = text.replace(f"@{key}@", value)
        rc = workdir / "monitrc"
        rc.write_text(text)
        rc.chmod(0o600)
        # The chain exists before monit's first cycle, as the agent and the loop make theirs.
        return ["/bin/sh", "-c", f'/bin/sh "$0" setup {port} {CHAIN} && exec "$1" -I -c "$2"',
                str(POLLING_SCRIPT), monit, str(rc)]
    raise ValueError(f"unknown protector {name!r} (one of {', '.join(PROTECTORS)})")


# --- the two-namespace bed ---------------------------------------------------------------------

def in_netns(name: str) -> concurrent.futures.ThreadPoolExecutor:
    """A one-thread executor whose thread lives in network namespace ``name``."""

    def enter() -> None:
        fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if _libc.setns(fd, _CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns({name}): {os.strerror(err)}")
        finally:
            os.close(fd)

    return concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"ns-{name}",
                                                 initializer=enter)


def connect_once(addr: str, port: int, timeout: float = 0.5) -> int:
    """One TCP connect: 0 when it succeeded, else the errno (ETIMEDOUT on a timeout)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        try:
            s.connect((addr, port))
        except TimeoutError:
            return errno.ETIMEDOUT
        except OSError as exc:
            return exc.errno or -1
        return 0
    finally:
        s.close()  # FIN, not RST: the listener sees a quiet EOF, not a reset to log


class ServerBed:
    """Server and client namespaces joined by veth, the fake service running in the server one."""

    def __init__(self, prefix: str = "svb", *, icmp_ratelimit: bool = False) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="svh-bench-"))
        self.state_dir = self.workdir / "svc"
        self.pid_file = self.state_dir / fakesvc.PID_FILE
        self.server = Netns(f"{prefix}s")
        self.client: Netns | None = None
        self.protector: subprocess.Popen[bytes] | None = None
        try:
            self.client = Netns(f"{prefix}c")
            veth_pair(self.server, self.client, SERVER_ADDR, CLIENT_ADDR)
            if not icmp_ratelimit:
                # The client connects thousands of times a second from one address; the kernel's
                # ICMP rate limits (1 per second per peer after a burst of 6, 1000/s overall)
                # would drop most REJECT answers and turn them into connect timeouts.
                self.server.run(["sysctl", "-q", "-w", "net.ipv4.icmp_ratelimit=0",
                                 "net.ipv4.icmp_msgs_per_sec=1000000",
                                 "net.ipv4.icmp_msgs_burst=1000000"])
            # Many short connections: reuse TIME_WAIT ports and widen the range (client only).
            self.client.run(["sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1",
                             "net.ipv4.ip_local_port_range=1024 65000"])
            self.state_dir.mkdir(parents=True)
            with open(self.state_dir / "listener.log", "ab") as log:
                self.server.popen([sys.executable, "-m", "tests.testbed.fakesvc", "serve",
                                   "--state-dir", str(self.state_dir), "--name", "server1",
                                   "--port", str(PORT)], stdin=subprocess.DEVNULL, stdout=log,
                                  stderr=subprocess.STDOUT, cwd=str(REPO), env=child_env())
            wait_for(lambda: fakesvc.core_alive(self.state_dir), 10, "the fake service's core")
            wait_for(self.listener_pid, 10, "the fake service's listener")
        except BaseException:
            self.close()
            raise

    def listener_pid(self) -> int | None:
        """The listener's PID (it starts cores on SIGUSR1), or None."""
        pid = fakesvc.read_pid(self.state_dir / fakesvc.LISTENER_PID)
        return pid if pid is not None and fakesvc.pid_alive(pid) else None

    def start_protector(self, name: str, *, agent: AgentSettings = AgentSettings(),
                        timed: bool = False,
                        launcher: Sequence[str] = ()) -> subprocess.Popen[bytes]:
        """Start protector ``name`` in the server namespace, output to files in the workdir."""
        argv = protector_argv(name, self.pid_file, self.workdir / name, agent=agent, timed=timed,
                              launcher=launcher)
        with open(self.workdir / f"{name}.out", "ab") as out, \
                open(self.workdir / f"{name}.err", "ab") as err:
            self.protector = self.server.popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                               stderr=err, cwd=str(REPO), env=child_env())
        return self.protector

    def chain_rules(self) -> list[str] | None:
        """``-A`` lines of the chain in the server namespace, None while it does not exist."""
        proc = self.server.run(["iptables", "-w", "-S", CHAIN], check=False)
        if proc.returncode != 0:
            return None
        return [ln for ln in proc.stdout.splitlines() if ln.startswith("-A ")]

    def wait_protected_open(self, timeout: float = 15.0) -> None:
        """Wait until the protector made its chain, left it open and the client connects."""
        def ready() -> bool:
            if self.protector is not None and self.protector.poll() is not None:
                raise RuntimeError(f"protector exited {self.protector.returncode}: "
                                   f"{self.protector_output()[-2000:]}")
            return self.chain_rules() == [] and connect_once(SERVER_ADDR, PORT) == 0
        assert self.client is not None
        with in_netns(self.client.name) as ex:
            wait_for(lambda: ex.submit(ready).result(), timeout, "protector ready, chain open",
                     interval=0.05)

    def protector_output(self) -> str:
        """What the protector wrote (stdout then stderr)."""
        parts = []
        for suffix in ("out", "err"):
            for f in self.workdir.glob(f"*.{suffix}"):
                parts.append(f.read_text(errors="replace"))
        return "\n".join(parts)

    def stop_protector(self) -> None:
        """SIGTERM the protector and wait for it (SIGKILL after 5 s)."""
        p, self.protector = self.protector, None
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)

    def close(self) -> None:
        """Stop everything started here and delete both namespaces and the workdir."""
        with contextlib.suppress(Exception):
            self.stop_protector()
        for ns in (self.client, self.server):
            if ns is not None:
                ns.close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> ServerBed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- rounds ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Limits:
    """Bounds of one phase of a round: a deadline, a cap on connect attempts, their pacing."""

    deadline_s: float = 5.0
    max_attempts: int = 50_000
    pace_s: float = 0.00025
    connect_timeout_s: float = 0.2


@dataclass(frozen=True)
class Round:
    """One failover and recovery as the client saw them (None: the phase hit its bound)."""

    t0_ns: int
    failover_ms: float | None
    recovery_ms: float | None  # from the service being ready (PID file names the new core)
    recovery_from_start_ms: float | None  # from the start command
    attempts_down: int
    attempts_up: int
    timeouts: int  # connects that got no answer (a dropped SYN or ICMP error) in both phases
    t1_ns: int | None


def _until_connect(want: Callable[[int], bool], lim: Limits,
                   each: Callable[[], None] = lambda: None) -> tuple[int | None, int, int]:
    """Connect until ``want(result)``: (monotonic ns of that answer or None, attempts, timeouts)."""
    deadline = time.monotonic_ns() + int(lim.deadline_s * 1e9)
    timeouts = 0
    for n in range(1, lim.max_attempts + 1):
        each()
        r = connect_once(SERVER_ADDR, PORT, timeout=lim.connect_timeout_s)
        now = time.monotonic_ns()
        if want(r):
            return now, n, timeouts
        timeouts += r == errno.ETIMEDOUT
        if now > deadline:
            return None, n, timeouts
        if lim.pace_s:
            time.sleep(lim.pace_s)
    return None, lim.max_attempts, timeouts


def one_round(bed: ServerBed, lim: Limits, start_gap_s: float = 0.0) -> Round:
    """Kill the core, time the first refused connect; ``start_gap_s`` later start it and time
    the first accepted connect."""
    core = fakesvc.core_alive(bed.state_dir)
    listener = bed.listener_pid()
    if core is None or listener is None:
        raise RuntimeError("the fake service is not running")
    t0 = time.monotonic_ns()
    os.kill(core, signal.SIGKILL)
    t1, n_down, to_down = _until_connect(lambda r: r == errno.ECONNREFUSED, lim)
    # A random gap de-phases the start from a poller's cycle (not a synchronisation).
    time.sleep(start_gap_s)
    t2 = time.monotonic_ns()
    os.kill(listener, signal.SIGUSR1)
    ready: list[int] = []

    def note_ready() -> None:
        if not ready and fakesvc.core_alive(bed.state_dir) not in (None, core):
            ready.append(time.monotonic_ns())

    t3, n_up, to_up = _until_connect(lambda r: r == 0, lim, note_ready)
    note_ready()
    ms = 1e6
    return Round(
        t0_ns=t0,
        failover_ms=None if t1 is None else (t1 - t0) / ms,
        recovery_ms=None if t3 is None or not ready else max(0.0, (t3 - ready[0]) / ms),
        recovery_from_start_ms=None if t3 is None else (t3 - t2) / ms,
        attempts_down=n_down, attempts_up=n_up, timeouts=to_down + to_up, t1_ns=t1)


def run_rounds(bed: ServerBed, rounds: int, lim: Limits, *, seed: int = 1, dephase_s: float = 1.0,
               progress: Callable[[int, Round], None] | None = None) -> list[Round]:
    """``rounds`` failover/recovery rounds, each started when the client connects again.

    The kill and the start each come after a random pause, uniform over ``dephase_s`` (one
    period of the 1 s pollers), so that neither lands at a fixed phase of their cycle: the
    first refused or accepted connect of a round follows one of their checks closely.
    """
    assert bed.client is not None
    rng = random.Random(seed)
    out: list[Round] = []
    with in_netns(bed.client.name) as ex:
        for i in range(rounds):
            wait_for(lambda: ex.submit(_healthy, bed).result(), 10, "service up and chain open",
                     interval=0.02)
            # A random gap de-phases the kill from the pollers' 1 s cycle (not a synchronisation).
            time.sleep(0.05 + rng.uniform(0.0, dephase_s))
            r = ex.submit(one_round, bed, lim, rng.uniform(0.0, dephase_s)).result()
            out.append(r)
            if progress:
                progress(i, r)
    return out


def _healthy(bed: ServerBed) -> bool:
    return (fakesvc.core_alive(bed.state_dir) is not None
            and connect_once(SERVER_ADDR, PORT) == 0)


# --- statistics --------------------------------------------------------------------------------

def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between closest ranks."""
    if not values:
        return float("nan")
    v = sorted(values)
    k = (len(v) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def stats(values: Sequence[float]) -> dict[str, float]:
    """n, p50, p90, p99 and max of ``values``."""
    return {"n": len(values), "p50": percentile(values, 50), "p90": percentile(values, 90),
            "p99": percentile(values, 99), "max": max(values) if values else float("nan")}


# --- the agent's own view: JSON log and timing hooks ------------------------------------------

def agent_log_latencies(text: str) -> dict[str, list[float]]:
    """latency_ms of the agent's firewall-block/-unblock events (start-up excluded)."""
    out: dict[str, list[float]] = {"firewall-block": [], "firewall-unblock": []}
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            ev = json.loads(line)
            action = ev.get("event.action") if isinstance(ev, dict) else None
            if (action in out and ev.get("sslvpn_heartbeat.trigger") != "startup"
                    and "sslvpn_heartbeat.latency_ms" in ev):
                out[action].append(float(ev["sslvpn_heartbeat.latency_ms"]))
    return out


@dataclass
class _Timing:
    source: str = ""
    trig_ns: int = 0
    step_ns: int = 0
    probe: tuple[int, int, bool, str] | None = None
    ensure: list[tuple[int, int, str]] = field(default_factory=list)
    commits: list[tuple[int, int, str]] = field(default_factory=list)  # backend.apply spans


def _timed_agent(argv: Sequence[str]) -> int:
    """Run the agent's CLI with hooks that print probe and iptables timings (JSON on stderr)."""
    from rules.firewall import Firewall
    from rules.iptc_backend import IptcBackend
    from rules.nft_backend import NftBackend
    from rules.restore import RestoreBackend
    from watcher import daemon
    from watcher.cli import commands as cli
    from watcher.probe import Prober

    cur = _Timing()
    orig_round = daemon.Daemon._round
    orig_probe = Prober.probe
    orig_ensure = Firewall.ensure

    async def round_(self: daemon.Daemon, trig: Any) -> None:
        nonlocal cur
        cur = _Timing(str(trig.source), trig.monotonic_ns, time.monotonic_ns())
        await orig_round(self, trig)

    async def probe(self: Prober) -> Any:
        t = time.monotonic_ns()
        r = await orig_probe(self)
        cur.probe = (t, time.monotonic_ns(), r.ok, r.check)
        return r

    def ensure(self: Firewall, mode: Any, **kw: Any) -> Any:
        t = time.monotonic_ns()
        rep = orig_ensure(self, mode, **kw)
        if not kw.get("fresh", True):  # the transition's hot path, not a repair
            cur.ensure.append((t, time.monotonic_ns(), str(mode)))
            if cur.probe is not None:  # the round that asked for it has printed nothing yet
                print(json.dumps({"bench.timing": asdict(cur)}), file=sys.stderr, flush=True)
        return rep

    def timed_commit(orig: Callable[..., None]) -> Callable[..., None]:
        def commit(self: Any, plans: Any, wait_s: float) -> None:
            t = time.monotonic_ns()
            orig(self, plans, wait_s)
            cur.commits.extend((t, time.monotonic_ns(), str(p.family)) for p in plans)
        return commit

    for backend in (RestoreBackend, IptcBackend, NftBackend):
        backend.commit = timed_commit(backend.commit)  # type: ignore[method-assign]  # bench hook
    daemon.Daemon._round = round_  # type: ignore[method-assign]  # bench hook
    Prober.probe = probe  # type: ignore[method-assign]  # bench hook
    Firewall.ensure = ensure  # type: ignore[method-assign]  # bench hook
    return cli.main(list(argv))


def read_timings(text: str) -> list[_Timing]:
    """The timing records a timed agent printed."""
    out = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError, TypeError, KeyError):
            d = json.loads(line)["bench.timing"]
            out.append(_Timing(d["source"], d["trig_ns"], d["step_ns"],
                               tuple(d["probe"]) if d["probe"] else None,
                               [tuple(e) for e in d["ensure"]],
                               [tuple(c) for c in d["commits"]]))
    return out


def breakdown(rounds: Sequence[Round], timings: Sequence[_Timing]) -> dict[str, list[float]]:
    """Where the agent's failover time goes, per round: each stage in ms."""
    parts: dict[str, list[float]] = {k: [] for k in (
        "kill -> event read", "event -> probe start", "probe", "probe end -> firewall start",
        "firewall start -> IPv4 commit returned", "commit returned -> client refused",
        "rest of ensure (IPv6, read back)", "total (client)")}
    for r in rounds:
        if r.t1_ns is None:
            continue
        t1 = r.t1_ns
        cand = [t for t in timings if r.t0_ns <= t.trig_ns <= t1 and t.probe is not None
                and any(e[2] == "block" for e in t.ensure)]
        if not cand:
            continue
        t = cand[0]
        assert t.probe is not None
        e = next(e for e in t.ensure if e[2] == "block")
        ms = 1e6
        parts["kill -> event read"].append((t.trig_ns - r.t0_ns) / ms)
        parts["event -> probe start"].append((t.probe[0] - t.trig_ns) / ms)
        parts["probe"].append((t.probe[1] - t.probe[0]) / ms)
        # The client speaks IPv4: its commit is the one that matters (IPv6 runs alongside).
        commit = max((c[1] for c in t.commits if e[0] <= c[1] <= e[1] and c[2] == "ipv4"),
                     default=e[1])
        parts["probe end -> firewall start"].append((e[0] - t.probe[1]) / ms)
        parts["firewall start -> IPv4 commit returned"].append((commit - e[0]) / ms)
        parts["commit returned -> client refused"].append((t1 - commit) / ms)
        parts["rest of ensure (IPv6, read back)"].append((e[1] - commit) / ms)
        parts["total (client)"].append((t1 - r.t0_ns) / ms)
    return parts


# --- the command -------------------------------------------------------------------------------

def _fmt(v: float) -> str:
    return "-" if v != v else (f"{v:.1f}" if v < 100 else f"{v:.0f}")


def _row(label: str, s: dict[str, float]) -> str:
    return (f"| {label} | {int(s['n'])} | {_fmt(s['p50'])} | {_fmt(s['p90'])} | "
            f"{_fmt(s['p99'])} | {_fmt(s['max'])} |")


def report(results: dict[str, dict[str, Any]], agent: AgentSettings, out: IO[str]) -> None:
    """Print the tables of a run (markdown) to ``out``."""
    def p(*a: object) -> None:
        print(*a, file=out)

    p("\n## Failover: core SIGKILL -> first refused connect from the client (ms)\n")
    p("| protector | n | p50 | p90 | p99 | max |\n|---|---|---|---|---|---|")
    for name, res in results.items():
        p(_row(name, stats(res["failover_ms"])) + (f" missed {res['missed_down']}"
                                                   if res["missed_down"] else ""))
    p("\n## Recovery: service ready (PID file names the new core) -> first accepted connect (ms)\n")
    p("| protector | n | p50 | p90 | p99 | max |\n|---|---|---|---|---|---|")
    for name, res in results.items():
        p(_row(name, stats(res["recovery_ms"])) + (f" missed {res['missed_up']}"
                                                   if res["missed_up"] else ""))
    p("\nconnects without an answer (SYN or ICMP error dropped): " + ", ".join(
        f"{n} {r['connect_timeouts']}" for n, r in results.items()))
    p("\n(from the start command, p50: " + ", ".join(
        f"{n} {_fmt(stats(r['recovery_from_start_ms'])['p50'])}" for n, r in results.items()) + ")")
    if "agent" in results and "polling" in results:
        a, b = results["agent"], results["polling"]
        p("\n## Ratio agent / polling (lower is better)\n")
        for key in ("failover_ms", "recovery_ms"):
            sa, sb = stats(a[key]), stats(b[key])
            p(f"- {key[:-3]}: p50 {sa['p50'] / sb['p50']:.4f}, p99 {sa['p99'] / sb['p99']:.4f}")
    if "agent" in results:
        a = results["agent"]
        fo, rc = stats(a["failover_ms"]), stats(a["recovery_ms"])
        p("\n## Targets (agent)\n")
        p(f"- failover p50 {_fmt(fo['p50'])} ms (target <= 5), p99 {_fmt(fo['p99'])} ms "
          f"(target <= 20)")
        p(f"- recovery p50 {_fmt(rc['p50'])} ms (target <= rise {agent.rise} x "
          f"{agent.rise_interval_ms} ms + 20 = {agent.recovery_target_ms():.0f})")
        p("\n## The agent's own log: latency_ms from kernel event (or rise timer) to rule applied\n")
        p("| event | n | p50 | p90 | p99 | max |\n|---|---|---|---|---|---|")
        for k, v in a["log_latency_ms"].items():
            p(_row(k, stats(v)))
    if results.get("agent", {}).get("breakdown"):
        p("\n## Where the agent's failover time goes (timed agent run, ms)\n")
        p("| stage | n | p50 | p90 | p99 | max |\n|---|---|---|---|---|---|")
        for k, v in results["agent"]["breakdown"].items():
            p(_row(k, stats(v)))


def _measure(name: str, n: int, lim: Limits, agent: AgentSettings, timed: bool,
             verbose: bool, icmp_ratelimit: bool = False) -> dict[str, Any]:
    with ServerBed(icmp_ratelimit=icmp_ratelimit) as bed:
        bed.start_protector(name, agent=agent, timed=timed)
        bed.wait_protected_open()

        def progress(i: int, r: Round) -> None:
            if verbose:
                print(f"  {name}{' (timed)' if timed else ''} round {i + 1}/{n}: failover "
                      f"{_fmt(r.failover_ms if r.failover_ms is not None else float('nan'))} ms, "
                      f"recovery {_fmt(r.recovery_ms if r.recovery_ms is not None else float('nan'))}"
                      f" ms", file=sys.stderr)

        rounds = run_rounds(bed, n, lim, progress=progress)
        if name == "agent":  # the last unblock's log line follows its read-back: let it land
            with contextlib.suppress(AssertionError):
                wait_for(lambda: len(agent_log_latencies((bed.workdir / "agent.out").read_text(
                    errors="replace"))["firewall-unblock"]) >= n, 2.0, "last log line")
        bed.stop_protector()
        out = (bed.workdir / f"{name}.out").read_text(errors="replace")
        err = (bed.workdir / f"{name}.err").read_text(errors="replace")
    res: dict[str, Any] = {
        "failover_ms": [r.failover_ms for r in rounds if r.failover_ms is not None],
        "recovery_ms": [r.recovery_ms for r in rounds if r.recovery_ms is not None],
        "recovery_from_start_ms": [r.recovery_from_start_ms for r in rounds
                                   if r.recovery_from_start_ms is not None],
        "missed_down": sum(r.failover_ms is None for r in rounds),
        "missed_up": sum(r.recovery_ms is None for r in rounds),
        "attempts": [[r.attempts_down, r.attempts_up] for r in rounds],
        "connect_timeouts": sum(r.timeouts for r in rounds),
    }
    if name == "agent":
        res["log_latency_ms"] = agent_log_latencies(out)
        if timed:
            res["breakdown"] = breakdown(rounds, read_timings(err))
    return res


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry: run the rounds for each protector and print the tables."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["_timed-agent"]:
        return _timed_agent(args[1:])
    ap = argparse.ArgumentParser(prog="python -m bench.failover", description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--protectors", default=",".join(PROTECTORS))
    ap.add_argument("--breakdown-rounds", type=int, default=20,
                    help="rounds with the timed agent (probe vs iptables); 0 skips them")
    ap.add_argument("--pace-us", type=float, default=250.0, help="pause between connect attempts")
    ap.add_argument("--deadline-s", type=float, default=5.0)
    ap.add_argument("--max-attempts", type=int, default=50_000)
    ap.add_argument("--rise", type=int, default=AgentSettings.rise)
    ap.add_argument("--rise-interval-ms", type=int, default=AgentSettings.rise_interval_ms)
    ap.add_argument("--backend", default=AgentSettings.backend,
                    choices=("auto", "restore", "iptc"), help="the agent's [firewall] backend")
    ap.add_argument("--icmp-ratelimit", action="store_true",
                    help="keep the kernel's ICMP rate limits in the server namespace")
    ap.add_argument("--json", type=Path, help="write the raw samples here (bench/plot.py reads it)")
    ap.add_argument("-v", "--verbose", action="store_true", help="one line per round on stderr")
    a = ap.parse_args(args)
    if os.geteuid() != 0:
        print("bench.failover: run as root (it makes network namespaces)", file=sys.stderr)
        return 2
    names = [n.strip() for n in a.protectors.split(",") if n.strip()]
    for n in names:
        if n not in PROTECTORS:
            ap.error(f"unknown protector {n!r}")
    if "monit" in names and shutil.which("monit") is None:
        print("bench.failover: monit is not installed; skipping it", file=sys.stderr)
        names.remove("monit")
    agent = AgentSettings(rise=a.rise, rise_interval_ms=a.rise_interval_ms, backend=a.backend)
    lim = Limits(a.deadline_s, a.max_attempts, a.pace_us / 1e6)
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        print(f"bench.failover: {name}, {a.rounds} rounds", file=sys.stderr)
        results[name] = _measure(name, a.rounds, lim, agent, False, a.verbose,
                                 a.icmp_ratelimit)
    if "agent" in names and a.breakdown_rounds > 0:
        print(f"bench.failover: timed agent, {a.breakdown_rounds} rounds", file=sys.stderr)
        timed = _measure("agent", a.breakdown_rounds, lim, agent, True, a.verbose,
                         a.icmp_ratelimit)
        results["agent"]["breakdown"] = timed["breakdown"]
    print(machine_line(ICMP_LIMITS_KEPT if a.icmp_ratelimit else ICMP_LIMITS_OFF))
    print(f"# bench.failover: {a.rounds} rounds, connect pace {a.pace_us:g} us, kernel "
          f"{os.uname().release}, {os.cpu_count()} CPUs (load average "
          f"{os.getloadavg()[0]:.1f}), ICMP rate limit "
          f"{'kept' if a.icmp_ratelimit else 'off'} in the server namespace; agent rise={agent.rise} "
          f"rise_interval_ms={agent.rise_interval_ms} interval_s={agent.interval_s} "
          f"http_path={agent.http_path} backend={agent.backend}")
    report(results, agent, sys.stdout)
    if a.json:
        a.json.write_text(json.dumps({"settings": {**asdict(agent), **asdict(lim),
                                                   "rounds": a.rounds},
                                      "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
