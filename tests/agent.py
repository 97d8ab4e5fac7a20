"""The agent (``python -m watcher run``) and the fake service in a test namespace, and their traces.

``Agent`` starts the daemon inside a ``tests.netns.Netns`` with its stdout (one JSON object per
line) in a file, so a test can wait for a log event with a deadline and check that every line
parses. ``Service`` drives the fake SSL VPN service of ``tests.testbed.fakesvc``. ``chain_view``
reads our chain back from the kernel with the system's iptables-save inside the namespace.
Processes are started through ``Netns.popen`` so that ``Netns.close`` kills them even when a test
fails.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.cfg import write_config
from tests.ecs import check_event
from tests.netns import REPO, Netns, wait_for
from tests.testbed.cluster import Reply, http_get
from tests.testbed.fakesvc import LISTENER_PID, PID_FILE, pid_alive, read_pid
from watcher.outputs.logpipeline import field_name

__all__ = [
    "CHAIN",
    "PORT",
    "AdminBed",
    "Agent",
    "ChainView",
    "Sampler",
    "Service",
    "agent_config",
    "chain_view",
    "child_env",
    "hold_lock",
]

CHAIN = "sslvpn-heartbeat-chain"
PORT = 8080


def child_env(**extra: str) -> dict[str, str]:
    """The environment for children that import this repository's packages."""
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC",
                                                             "WATCHDOG_PID")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


# --- the firewall as the kernel holds it ----------------------------------------------------

@dataclass(frozen=True)
class ChainView:
    """Our chain in one family as iptables-save printed it."""

    present: bool
    jumps: int  # rules in INPUT that jump to our chain
    jump_first: bool  # the first rule of INPUT is our jump
    rules: tuple[str, ...]  # the chain's rules, as "-A CHAIN ..." lines

    @property
    def open(self) -> bool:
        """Chain present, empty, exactly one jump at the top of INPUT."""
        return self.present and not self.rules and self.jumps == 1 and self.jump_first

    @property
    def blocked(self) -> bool:
        """Exactly one REJECT rule for the port (every packet, not only SYN) and one jump first."""
        return (self.jumps == 1 and self.jump_first and len(self.rules) == 1
                and "-j REJECT" in self.rules[0] and f"--dport {PORT}" in self.rules[0]
                and "--tcp-flags" not in self.rules[0] and "! -i lo" in self.rules[0])

    @property
    def drained(self) -> bool:
        """Exactly one REJECT rule that matches only new connections (SYN), one jump first."""
        return (self.jumps == 1 and self.jump_first and len(self.rules) == 1
                and "-j REJECT" in self.rules[0] and "--tcp-flags" in self.rules[0]
                and "SYN" in self.rules[0].split("--tcp-flags", 1)[1])

    @property
    def absent(self) -> bool:
        """No chain and no jump."""
        return not self.present and self.jumps == 0


def parse_chain(save: str, chain: str = CHAIN) -> ChainView:
    """The ChainView of ``chain`` in iptables-save output (filter table)."""
    lines = save.splitlines()
    present = any(ln.startswith(f":{chain} ") for ln in lines)
    inputs = [ln for ln in lines if ln.startswith("-A INPUT ")]
    jump = f"-A INPUT -j {chain}"
    jumps = sum(1 for ln in inputs if ln.strip() == jump)
    rules = tuple(ln for ln in lines if ln.startswith(f"-A {chain} "))
    return ChainView(present, jumps, bool(inputs) and inputs[0].strip() == jump, rules)


def iptables_save(ns: Netns, family: int = 4) -> str:
    """The namespace's filter table from the system's ``iptables-save`` (the agent's flavour)."""
    tool = "ip6tables-save" if family == 6 else "iptables-save"
    return ns.run([tool, "-t", "filter"]).stdout


def chain_view(ns: Netns, family: int = 4) -> ChainView:
    """Our chain in ``ns`` as the kernel holds it now."""
    return parse_chain(iptables_save(ns, family))


# --- configuration --------------------------------------------------------------------------

def agent_config(path: Path, svc_dir: Path, state_dir: Path,
                 **sections: dict[str, Any]) -> Path:
    """Write an agent config for the fake service in ``svc_dir``; ``sections`` override keys."""
    body: dict[str, dict[str, Any]] = {
        "service": {"name": "fakevpn", "pid_file": str(svc_dir / PID_FILE), "port": PORT},
        "probe": {"interval_s": 5.0, "timeout_ms": 500},
        "firewall": {},
        "log": {"format": "json"},
        "state": {"dir": str(state_dir)},
    }
    for name, values in sections.items():
        body.setdefault(name, {}).update(values)
    return write_config(path, {k: v for k, v in body.items() if v or k in ("service", "state")})


# --- the fake service -----------------------------------------------------------------------

class Service:
    """The fake SSL VPN service (listener + core) with its state in ``d``, inside ``ns``."""

    def __init__(self, ns: Netns, d: Path, name: str = "server1", bind: str = "0.0.0.0") -> None:
        self.ns, self.d, self.name, self.bind = ns, d, name, bind
        d.mkdir(parents=True, exist_ok=True)

    @property
    def pid_file(self) -> Path:
        """The core's PID file (the one the agent watches)."""
        return self.d / PID_FILE

    @property
    def core_pid(self) -> int | None:
        """The PID the PID file names (alive or not), or None."""
        return read_pid(self.pid_file)

    @property
    def listener_pid(self) -> int | None:
        """The listener's PID while it lives, or None."""
        pid = read_pid(self.d / LISTENER_PID)
        return pid if pid is not None and pid_alive(pid) else None

    def start(self, timeout: float = 10.0) -> Service:
        """Start listener and core; return once the service answers 200 on loopback."""
        self.ns.popen([sys.executable, "-m", "tests.testbed.fakesvc", "serve", "--state-dir",
                       str(self.d), "--name", self.name, "--port", str(PORT), "--bind", self.bind],
                      cwd=str(REPO), env=child_env(), stdin=subprocess.DEVNULL,
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: self.get().ok, timeout, "the fake service answering 200")
        return self

    def ctl(self, action: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run the init-script stand-in (``fakesvc ctl ACTION``) inside the namespace."""
        return self.ns.run([sys.executable, "-m", "tests.testbed.fakesvc", "ctl", "--state-dir",
                            str(self.d), "--name", self.name, "--port", str(PORT), "--bind",
                            self.bind, action],
                           check=check, env=child_env())

    def get(self, host: str = "127.0.0.1", ns: Netns | None = None, timeout: float = 1.0) -> Reply:
        """One HTTP GET of the service from ``ns`` (default: the service's own namespace)."""
        return http_get((ns or self.ns).name, host, PORT, timeout=timeout)


# --- the agent ------------------------------------------------------------------------------

class Agent:
    """``python -m watcher run`` inside ``ns``; each ``start`` logs to a new file in ``log_dir``."""

    def __init__(self, ns: Netns, config: Path, log_dir: Path, **env: str) -> None:
        self.ns, self.config, self.log_dir = ns, config, log_dir
        self.env = child_env(**env)
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0
        self.stdout_path = log_dir / "agent-0.log"
        self.stderr_path = log_dir / "agent-0.err"

    def start(self) -> Agent:
        """Start a new run of the daemon (the previous one must have ended)."""
        assert self.proc is None or self.proc.poll() is not None, "the agent is still running"
        self.runs += 1
        self.stdout_path = self.log_dir / f"agent-{self.runs}.log"
        self.stderr_path = self.log_dir / f"agent-{self.runs}.err"
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = self.ns.popen(
                [sys.executable, "-m", "watcher", "run", "--config", str(self.config)],
                cwd=str(REPO), env=self.env, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        return self

    @property
    def pid(self) -> int:
        """The daemon's PID (``ip netns exec`` execs it, so the child's PID is the daemon's)."""
        assert self.proc is not None
        return self.proc.pid

    def stderr(self) -> str:
        """What the current run wrote to stderr."""
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def lines(self) -> list[str]:
        """The complete stdout lines of the current run so far."""
        try:
            raw = self.stdout_path.read_text(errors="replace")
        except FileNotFoundError:
            return []
        done = raw if raw.endswith("\n") else raw[: raw.rfind("\n") + 1]
        return done.splitlines()

    def events(self) -> list[dict[str, Any]]:
        """Every log line of the current run parsed as a JSON object (AssertionError otherwise)."""
        out = []
        for n, line in enumerate(self.lines(), 1):
            try:
                obj = json.loads(line)
            except ValueError:
                raise AssertionError(f"log line {n} is not JSON: {line!r}") from None
            assert isinstance(obj, dict), f"log line {n} is not a JSON object: {line!r}"
            out.append(obj)
        return out

    def mark(self) -> int:
        """The number of log lines so far: pass it as ``after`` to see only later events."""
        return len(self.lines())

    def find(self, action: str, after: int = 0, **fields: Any) -> list[dict[str, Any]]:
        """Events of ``action`` (``event.action``) from line ``after`` on, matching ``fields``
        (named as at a log call: ``trigger="pidfd"`` matches ``sslvpn_heartbeat.trigger``)."""
        return [e for e in self.events()[after:]
                if e.get("event.action") == action
                and all(e.get(field_name(k)) == v for k, v in fields.items())]

    def wait_event(self, action: str, timeout: float = 5.0, after: int = 0,
                   **fields: Any) -> dict[str, Any]:
        """The first event of ``action`` matching ``fields``, waited for (the run must live)."""
        def found() -> dict[str, Any] | None:
            hits = self.find(action, after, **fields)
            if hits:
                return hits[0]
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"agent exited ({self.proc.returncode}) before {action}: "
                                     f"{self.stderr()[-2000:]}\n{self.dump()}")
            return None

        try:
            hit: dict[str, Any] = wait_for(found, timeout, f"log event {action} {fields}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.dump()}") from None
        return hit

    def wait_ready(self, timeout: float = 10.0) -> dict[str, Any]:
        """The agent-ready event of the current run, waited for."""
        return self.wait_event("agent-ready", timeout)

    def dump(self, last: int = 30) -> str:
        """The last log lines, for assertion messages."""
        return "agent log tail:\n" + "\n".join(self.lines()[-last:])

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the daemon."""
        os.kill(self.pid, sig)

    def wait(self, timeout: float = 10.0) -> int:
        """The daemon's exit status once it has exited (AssertionError after ``timeout``)."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"agent still running after {timeout}s\n{self.dump()}") from None

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM the daemon (once) and return its exit status once it has exited."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def check_clean(self) -> None:
        """Every line of the run is a JSON object whose keys pass the ECS check (tests.ecs),
        and stderr holds no traceback."""
        for ev in self.events():
            check_event(ev)
        assert "Traceback" not in self.stderr(), self.stderr()


_SAMPLE_CAP = 2000  # a sampler never runs unbounded


class Sampler:
    """Reads our IPv4 chain from the kernel in a loop (bounded) on a thread, while a fault runs."""

    def __init__(self, ns: Netns) -> None:
        self.ns = ns
        self.samples: list[ChainView] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set() and len(self.samples) < _SAMPLE_CAP:
            self.samples.append(chain_view(self.ns))

    def __enter__(self) -> Sampler:
        self._thread.start()
        wait_for(lambda: self.samples, 5.0, "a first firewall sample")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)

    def wait_more(self, n: int = 3, timeout: float = 5.0) -> None:
        """Wait until ``n`` more samples were taken (so the current state is in the record)."""
        have = len(self.samples)
        wait_for(lambda: len(self.samples) >= have + n or len(self.samples) >= _SAMPLE_CAP,
                 timeout, f"{n} more firewall samples")
        # A sampler that stopped at its cap has not watched until now: say so, rather than
        # pass on a record that ends before the fault did.
        assert len(self.samples) < _SAMPLE_CAP, "the sampler reached its cap before the end"

    def lapses(self) -> list[ChainView]:
        """Samples in which port 8080 was not rejected (no REJECT rule reached from INPUT)."""
        return [s for s in self.samples
                if not (s.jumps >= 1 and s.jump_first and len(s.rules) == 1
                        and "-j REJECT" in s.rules[0])]


@contextlib.contextmanager
def hold_lock(path: Path) -> Iterator[None]:
    """Hold the xtables lock at ``path`` (an flock, as iptables-legacy takes it) in this process."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


class AdminBed:
    """A healthy fake service, the agent's config with no safety-net tick within a test, the
    agent (not started) and the CLI on the same config: the operator's side of admin blocks."""

    EVENT_ONLY_INTERVAL_S = 30.0

    def __init__(self, ns: Netns, tmp_path: Path) -> None:
        self.ns = ns
        self.svc = Service(ns, tmp_path / "svc").start()
        self.state = tmp_path / "state"
        self.cfg = agent_config(tmp_path / "agent.toml", self.svc.d, self.state,
                                probe={"interval_s": self.EVENT_ONLY_INTERVAL_S})
        self.agent = Agent(ns, self.cfg, tmp_path)

    def cli(self, *args: str, code: int = 0) -> tuple[str, str]:
        """Run ``python -m watcher ARGS --config C`` in the namespace; assert its exit code;
        return its stdout and stderr."""
        r = self.ns.run([sys.executable, "-m", "watcher", *args, "--config", str(self.cfg)],
                        check=False, env=child_env())
        assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
        return r.stdout, r.stderr

    def status(self) -> dict[str, Any]:
        """``status --json`` parsed."""
        out: dict[str, Any] = json.loads(self.cli("status", "--json")[0])
        return out
