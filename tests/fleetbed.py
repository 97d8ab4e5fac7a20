"""A fleet group for tests: N servers, each in its own namespace attached to a real etcd cluster
(tests/etcdcluster.py), each running a small HTTP service that depends on one shared back end
and a real agent (``python -m watcher run``) with ``[fleet]``.

The service is one process: it binds port 8080, then writes its PID file, and answers
``GET /health`` with 200 while the shared back end's flag file exists and 503 while it does
not (the SSL VPN alive and listening, its LDAP/RADIUS back end down: a *suspect* DOWN for the
agent). Killing the process is a *proven* DOWN. ``python -m tests.fleetbed serve ...`` runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.agent import PORT, Agent, chain_view, child_env
from tests.cfg import toml_value
from tests.etcdcluster import EtcdCluster
from tests.netns import REPO, Netns, wait_for
from tests.testbed.cluster import http_get
from tests.testbed.fakesvc import read_pid, write_pid_atomic

__all__ = ["FleetBed", "FleetServer"]


class _Health(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Service

    def do_GET(self) -> None:
        ok = self.server.flag.exists()
        body = b"ok\n" if ok else b"back end down\n"
        self.send_response(200 if ok else 503)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Service(ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 256

    def __init__(self, port: int, flag: Path) -> None:
        self.flag = flag
        super().__init__(("0.0.0.0", port), _Health)


def serve(pid_file: Path, flag: Path, port: int) -> None:
    """Listen, then write the PID file, then answer until killed."""
    srv = _Service(port, flag)
    write_pid_atomic(pid_file, os.getpid())
    srv.serve_forever()


class FleetServer:
    """One server of the bed: namespace, service, config, agent."""

    def __init__(self, bed: FleetBed, i: int) -> None:
        self.bed, self.i = bed, i
        self.name = f"srv{i}"
        self.ns = Netns("svf")
        self.addr = bed.etcd.attach(self.ns)
        self.dir = bed.tmp / self.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.pid_file = self.dir / "svc.pid"
        self.config = self.dir / "config.toml"
        self.agent = Agent(self.ns, self.config, self.dir)
        self.service: subprocess.Popen[bytes] | None = None
        self.flag = bed.flag  # the back end this server's service depends on

    def write_config(self, **fleet: Any) -> None:
        """The agent's configuration, ``fleet`` overriding the bed's [fleet] keys."""
        body = {
            "service": {"name": "fakevpn", "pid_file": str(self.pid_file), "port": PORT},
            "probe": {"interval_s": 1.0, "timeout_ms": 800, "rise": 1, "fall": 1,
                      "http_path": "/health"},
            "log": {"format": "json"},
            "state": {"dir": str(self.dir / "state")},
            "metrics": {"textfile": str(self.dir / "metrics.prom")},
            "fleet": {**self.bed.fleet, "member": self.name, **fleet},
        }
        if not self.bed.guard:
            del body["fleet"]
        lines = []
        for section, keys in body.items():
            lines.append(f"[{section}]")
            for k, v in keys.items():
                if isinstance(v, list | tuple):
                    lines.append(f"{k} = [{', '.join(toml_value(x) for x in v)}]")
                else:
                    lines.append(f"{k} = {toml_value(v)}")
        self.config.write_text("\n".join(lines) + "\n")

    def start_service(self) -> None:
        """Start the service; return once it answers on loopback."""
        with contextlib.suppress(FileNotFoundError):
            self.pid_file.unlink()
        self.service = self.ns.popen(
            [sys.executable, "-m", "tests.fleetbed", "serve", "--pid-file", str(self.pid_file),
             "--flag", str(self.flag), "--port", str(PORT)],
            cwd=str(REPO), env=child_env(), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: read_pid(self.pid_file) is not None
                 and http_get(self.ns.name, "127.0.0.1", PORT, "/health", 1.0).status > 0,
                 20, f"{self.name}'s service answering")

    def kill_service(self) -> None:
        """SIGKILL the service (a proven DOWN: the process is gone)."""
        pid = read_pid(self.pid_file)
        assert pid is not None and self.service is not None
        os.kill(pid, signal.SIGKILL)
        self.service.wait(10)

    def blocked(self) -> bool:
        """The kernel holds our REJECT rule."""
        return chain_view(self.ns).blocked

    def opened(self) -> bool:
        """The kernel holds our chain empty."""
        return chain_view(self.ns).open

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``python -m watcher ARGS --config ...`` inside the namespace (not checked)."""
        return self.ns.run([sys.executable, "-m", "watcher", *args, "--config", str(self.config)],
                           check=False, env=child_env(), timeout=timeout)

    def cli_popen(self, *args: str) -> subprocess.Popen[str]:
        """The same, started in the background (stdout and stderr captured)."""
        return self.ns.popen([sys.executable, "-m", "watcher", *args, "--config", str(self.config)],
                             cwd=str(REPO), env=child_env(), stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def etcd_link(self, up: bool) -> None:
        """Cut this server off from etcd (its link to the etcd segment down) or reconnect it."""
        self.ns.run(["ip", "link", "set", "etcd0", "up" if up else "down"])

    def close(self) -> None:
        """Stop the agent and the service; delete the namespace."""
        if self.agent.proc is not None and self.agent.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.agent.stop(timeout=10)
        self.ns.close()


class FleetBed:
    """``n`` servers of one fleet group on ``etcd``; a shared back end (a flag file)."""

    def __init__(self, etcd: EtcdCluster, tmp: Path, group: str, n: int = 4, *, guard: bool = True,
                 **fleet: Any) -> None:
        """``guard=False``: the same servers and agents without [fleet] (a baseline)."""
        self.etcd, self.tmp, self.group, self.n, self.guard = etcd, tmp, group, n, guard
        tmp.mkdir(parents=True, exist_ok=True)
        self.flag = tmp / "backend-up"
        self.flag.touch()
        self.fleet: dict[str, Any] = {"etcd": etcd.endpoints(), "group": group, "size": n,
                                      "lease_s": 3, "min_open": "50%", "maintenance_slots": 1,
                                      "unreachable": "block", **fleet}
        if etcd.ca_file:
            self.fleet |= {"ca_file": etcd.ca_file, "cert_file": etcd.cert_file,
                           "key_file": etcd.key_file}
        self.servers: list[FleetServer] = []

    def __enter__(self) -> FleetBed:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Every server's service and agent; return once every member is registered open."""
        for i in range(1, self.n + 1):
            srv = FleetServer(self, i)
            self.servers.append(srv)
            srv.write_config()
            srv.start_service()
        for srv in self.servers:
            srv.agent.start()
        for srv in self.servers:
            srv.agent.wait_ready(60)
        if self.guard:
            self.wait_members({s.name: "open" for s in self.servers}, 60)

    def server(self, i: int) -> FleetServer:
        """Server ``i`` (from 1)."""
        return self.servers[i - 1]

    def backend(self, up: bool) -> None:
        """The shared back end comes back (flag file present) or dies (absent)."""
        if up:
            self.flag.touch()
        else:
            self.flag.unlink()

    def view(self) -> dict[str, Any]:
        """``fleet --json`` as server 1's CLI prints it."""
        out = self.server(1).cli("fleet", "--json")
        assert out.returncode == 0, out.stderr
        return dict(json.loads(out.stdout))

    def modes(self) -> dict[str, str]:
        """Each registered member's mode."""
        return {m["member"]: m["mode"] for m in self.view()["members"]}

    def wait_members(self, want: dict[str, str], timeout: float = 30) -> None:
        """Wait until the registered members and their modes are exactly ``want``."""
        last: dict[str, dict[str, str]] = {}

        def same() -> bool:
            try:
                last["m"] = self.modes()
            except AssertionError as exc:  # the CLI failed: say why if it never recovers
                last["m"] = {"error": str(exc)}
                return False
            return last["m"] == want

        try:
            wait_for(same, timeout, f"members {want}", interval=0.2)
        except AssertionError:
            raise AssertionError(f"members {last.get('m')} != {want}\n{self.dump()}") from None

    def dump(self) -> str:
        """The last log lines of every agent, for a failure message."""
        return "\n".join(f"--- {s.name}\n{s.agent.dump(15)}\n{s.agent.stderr()[-2000:]}"
                         for s in self.servers)

    def close(self) -> None:
        """Tear everything down, whatever state it is in."""
        for srv in self.servers:
            with contextlib.suppress(Exception):
                srv.close()


def main(argv: list[str] | None = None) -> None:
    """``serve``: the bed's service (see the module docstring)."""
    p = argparse.ArgumentParser(prog="tests.fleetbed")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--pid-file", type=Path, required=True)
    s.add_argument("--flag", type=Path, required=True)
    s.add_argument("--port", type=int, default=PORT)
    args = p.parse_args(argv)
    serve(args.pid_file, args.flag, args.port)


if __name__ == "__main__":
    main()
    sys.exit(0)
