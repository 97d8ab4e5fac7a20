"""The cluster testbed: a real HAProxy gateway, fake SSL VPN servers with optional agents, a client.

Topology (every address lives only inside the namespaces made here)::

    client 10.200.0.2 ──veth── 10.200.0.1 gateway (HAProxy :80) 10.200.i.1 ──veth── 10.200.i.2 server i

HAProxy balances round robin with no health checks of its own, like the Access Gateway. It
closes each server connection after the answer (``option http-server-close``) while keeping the
client's connection alive. The agent's REJECT rule then meets a fresh SYN on every request:
the refused connect fails at once and ``retries`` with ``option redispatch 1`` sends the request
to the next server. A reused idle server connection would instead meet the ICMP error on an
established socket, which Linux TCP treats as a soft error: the request would hang until
``timeout server``. Server-side reuse is available with ``http_mode="keep-alive"`` to measure
exactly that.

Servers are numbered from 1, as in "stop the service on server 1": ``cluster.server(1)``.

With ``backend=True`` the servers also share a back end (an LDAP/RADIUS stand-in, fakesvc's
``backend``) in its own namespace on a second segment::

    server i back0 10.201.0.(10+i) ── bridge (switch namespace) ── 10.201.0.1:389 back end

and each fake service checks it on the paths ``backend_paths`` (default: every path).
With ``etcd=`` (a started tests.etcdcluster.EtcdCluster) every server namespace is also attached
to the etcd members' segment (``server.etcd_addr``) before any agent starts.
``backend_down()`` kills it (every server then fails those paths with 503 while its core
lives and its port accepts connections), ``backend_hang()`` stops it (connections are accepted
but never greeted), ``backend_up()`` / ``backend_resume()`` undo that.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, NamedTuple

from tests.netns import REPO, Lan, Netns, enter_netns, wait_for
from tests.testbed import fakesvc

if TYPE_CHECKING:  # tests.etcdcluster imports this module
    from tests.etcdcluster import EtcdCluster

__all__ = [
    "CHAIN",
    "GATEWAY_KINDS",
    "Cluster",
    "Reply",
    "Server",
    "default_agent_argv",
    "default_agent_config",
    "http_get",
    "install_signal_handlers",
    "render_haproxy_cfg",
    "render_nginx_conf",
    "socket_in",
]

CHAIN = "sslvpn-heartbeat-chain"
GATEWAY_PORT = 80
BACKEND_SUBNET = "10.201.0"
BACKEND_ADDR, BACKEND_PORT = f"{BACKEND_SUBNET}.1", 389
CLIENT_ADDR, GATEWAY_CLIENT_ADDR = "10.200.0.2", "10.200.0.1"
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


class Reply(NamedTuple):
    """One HTTP answer as the client saw it: ``status`` 0 means no answer, ``body`` the error."""

    status: int
    body: str

    @property
    def ok(self) -> bool:
        """True for a 2xx answer."""
        return 200 <= self.status < 300

    @property
    def server(self) -> str:
        """The server named by the body (fake service bodies start with it), or ""."""
        return self.body.split()[0] if self.status and self.body.split() else ""


def socket_in(ns_name: str, family: int = socket.AF_INET,
              type: int = socket.SOCK_STREAM) -> socket.socket:
    """A socket created inside network namespace ``ns_name`` (by a short-lived thread)."""
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            fd = os.open(f"/run/netns/{ns_name}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({ns_name}): {os.strerror(err)}")
            finally:
                os.close(fd)
            box["sock"] = socket.socket(family, type)
        except BaseException as e:  # handed to the caller's thread below
            box["err"] = e

    t = threading.Thread(target=work, name=f"setns-{ns_name}")
    t.start()
    t.join()
    if "err" in box:
        raise box["err"]
    sock: socket.socket = box["sock"]
    return sock


def http_get(ns_name: str, host: str, port: int, path: str = "/", timeout: float = 2.0) -> Reply:
    """One HTTP GET from namespace ``ns_name``; never raises for network errors."""

    class _Conn(http.client.HTTPConnection):
        def connect(self) -> None:
            s = socket_in(ns_name, socket.AF_INET6 if ":" in self.host else socket.AF_INET)
            s.settimeout(timeout)
            try:
                s.connect((self.host, self.port))
            except BaseException:
                s.close()
                raise
            self.sock = s

    conn = _Conn(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        resp = conn.getresponse()
        return Reply(resp.status, resp.read().decode(errors="replace"))
    except (OSError, http.client.HTTPException) as e:
        return Reply(0, f"error: {type(e).__name__}: {e}")
    finally:
        conn.close()


def render_haproxy_cfg(servers: Sequence[tuple[str, str, int]], bind: str, stats_socket: Path,
                       http_mode: str = "server-close",
                       agent_check: tuple[int, str] | None = None,
                       connect_timeout: str = "100ms", server_timeout: str = "2s") -> str:
    """HAProxy configuration: round robin over ``(name, addr, port)``, retries + redispatch, no checks.

    ``agent_check=(PORT, INTER)`` adds HAProxy's agent check to every server (the agent's
    ``[agent_check] listen`` on that port of the server's address, asked every INTER).
    """
    if http_mode not in ("server-close", "keep-alive"):
        raise ValueError(f"http_mode must be server-close or keep-alive, got {http_mode!r}")
    mode_lines = (["option http-server-close"] if http_mode == "server-close"
                  else ["option http-keep-alive", "http-reuse always"])
    lines = [
        "global",
        "    maxconn 4096",
        "    log stdout format raw local0 info",
        f"    stats socket {stats_socket} mode 600 level admin",
        "",
        "defaults",
        "    mode http",
        "    log global",
        "    option httplog",
        *(f"    {m}" for m in mode_lines),
        # HAProxy 2.6 pauses min(timeout connect, 1s) before each retry after a refused connect,
        # redispatch or not (measured here). Links inside the testbed answer in microseconds, so
        # 100ms costs nothing in connect time and keeps a redispatched request's delay at 0.1s.
        f"    timeout connect {connect_timeout}",
        "    timeout client 10s",
        f"    timeout server {server_timeout}",
        "    timeout http-request 5s",
        "    timeout http-keep-alive 10s",
        # A refused connect is retried on the next server: redispatch on every retry.
        "    retries 3",
        "    option redispatch 1",
        # Not 503: a server answering 503 is exactly what the agent exists to hide.
        "    retry-on conn-failure empty-response response-timeout",
        "",
        "frontend sslvpn_in",
        f"    bind {bind}:{GATEWAY_PORT}",
        "    default_backend sslvpn",
        "",
        "backend sslvpn",
        "    balance roundrobin",
        *(f"    server {name} {addr}:{port}{_agent_check_opts(agent_check)}"
          for name, addr, port in servers),
        "",
    ]
    return "\n".join(lines)


def _agent_check_opts(agent_check: tuple[int, str] | None) -> str:
    if agent_check is None:
        return ""
    port, inter = agent_check
    return f" agent-check agent-port {port} agent-inter {inter}"


GATEWAY_KINDS = ("haproxy", "nginx")
# nginx's passive health: one refused connect marks a server unavailable for NGINX_FAIL_TIMEOUT;
# then one request tries it again. Short, so a recovered server is back well within the
# scenario's back_timeout_s (the agent, not nginx, keeps clients off a down server).
NGINX_FAIL_TIMEOUT = "1s"
NGINX_BACKLOG = 4096  # the client load (150-200 requests/s) never fills it


def render_nginx_conf(servers: Sequence[tuple[str, str, int]], bind: str, workdir: Path,
                      keepalive: int = 0, connect_timeout: str = "100ms",
                      server_timeout: str = "2s", max_fails: int = 1) -> str:
    """nginx configuration: round robin over ``(name, addr, port)``, the next server on a
    connect error or timeout (never on a 503), a short connect timeout, every file in
    ``workdir``, listening on ``bind`` only, in the foreground; ``keepalive`` > 0 keeps that
    many idle connections to the servers per worker and reuses them (HTTP/1.1 upstream);
    ``max_fails=0`` turns nginx's passive health off (no server is skipped after an error,
    like a gateway with no health checks of its own)."""
    pool = [f"        keepalive {keepalive};"] if keepalive else []
    reuse = (["            proxy_http_version 1.1;", '            proxy_set_header Connection "";']
             if keepalive else [])
    tmp = workdir / "nginx-tmp"
    lines = [
        "daemon off;",
        "master_process on;",
        "worker_processes 1;",
        f"pid {workdir / 'nginx.pid'};",
        f"error_log {workdir / 'nginx-error.log'} info;",
        "events { worker_connections 4096; }",
        "http {",
        f"    access_log {workdir / 'nginx-access.log'};",
        *(f"    {kind}_temp_path {tmp / kind};"
          for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")),
        "    upstream sslvpn {",
        *(f"        server {addr}:{port} max_fails={max_fails} fail_timeout={NGINX_FAIL_TIMEOUT};"
          f"  # {name}"
          for name, addr, port in servers),
        *pool,
        "    }",
        "    server {",
        f"        listen {bind}:{GATEWAY_PORT} backlog={NGINX_BACKLOG};",
        "        location / {",
        "            proxy_pass http://sslvpn;",
        *reuse,
        # Not http_503: a server answering 503 is exactly what the agent exists to hide.
        "            proxy_next_upstream error timeout;",
        "            proxy_next_upstream_tries 3;",
        f"            proxy_connect_timeout {connect_timeout};",
        f"            proxy_read_timeout {server_timeout};",
        f"            proxy_send_timeout {server_timeout};",
        "            proxy_max_temp_file_size 0;",
        "        }",
        "    }",
        "}",
        "",
    ]
    return "\n".join(lines)


def default_agent_config(server: Server, *, reject_with: str | None = "icmp-port-unreachable",
                         established: str | None = None, http_path: str = "/") -> str:
    """The agent's TOML configuration for ``server`` (fast probe settings for tests; the probe
    GETs ``http_path``); a ``reject_with`` or ``established`` of None leaves that key to the
    agent's default."""
    return "\n".join([
        "[service]",
        'name = "novell-sslvpn"',
        f'pid_file = "{server.pid_file}"',
        f"port = {server.port}",
        "",
        "[probe]",
        "timeout_ms = 500",
        "interval_s = 1.0",
        f'http_path = "{http_path}"',
        "",
        "[firewall]",
        f'chain = "{CHAIN}"',
        *([f'reject_with = "{reject_with}"'] if reject_with is not None else []),
        *([f'established = "{established}"'] if established is not None else []),
        "",
        "[log]",
        'format = "json"',
        "",
        "[state]",
        f'dir = "{server.state_dir / "agent-state"}"',
        "",
    ])


def default_agent_argv(server: Server) -> list[str]:
    """argv of the agent daemon for ``server``: ``python -m watcher run --config CFG``."""
    return [sys.executable, "-m", "watcher", "run", "--config", str(server.config_path)]


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _answers_ok(server: Server) -> bool:
    return server.get(timeout=0.5).ok


def _veth(a: Netns, a_if: str, a_addr: str, b: Netns, b_if: str, b_addr: str) -> None:
    """A veth pair made directly in two namespaces, each end addressed (/24) and up."""
    subprocess.run(["ip", "link", "add", a_if, "netns", a.name, "type", "veth",
                    "peer", "name", b_if, "netns", b.name], check=True, capture_output=True)
    for ns, ifname, addr in ((a, a_if, a_addr), (b, b_if, b_addr)):
        ns.run(["ip", "addr", "add", f"{addr}/24", "dev", ifname])
        ns.run(["ip", "link", "set", ifname, "up"])


class Server:
    """One server namespace: the fake service, its init-script stand-in and optionally an agent."""

    def __init__(self, index: int, ns: Netns, state_dir: Path, port: int, bind: str,
                 gateway_ns: str, backend_args: Sequence[str] = ()) -> None:
        self.index = index
        self.name = f"server{index}"
        self.ns = ns
        self.addr = f"10.200.{index}.2"
        self.gateway_addr = f"10.200.{index}.1"
        self.port = port
        self.bind = bind
        self.state_dir = state_dir
        self.pid_file = state_dir / fakesvc.PID_FILE
        self.config_path = state_dir / "agent.toml"
        self.agent_log = state_dir / "agent.log"
        self.agent: subprocess.Popen[bytes] | None = None
        self._gateway_ns = gateway_ns
        self.backend_args = list(backend_args)  # fakesvc's --backend options, or []
        self.etcd_addr: str | None = None  # its address on the etcd segment (Cluster(etcd=...))

    def __repr__(self) -> str:
        return f"<Server {self.name} {self.addr} ns={self.ns.name}>"

    def ctl(self, action: str, *, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``fakesvc ctl ACTION`` in this server's namespace (like /etc/init.d/novell-sslvpn)."""
        argv = [sys.executable, "-m", "tests.testbed.fakesvc", "ctl", "--state-dir",
                str(self.state_dir), "--name", self.name, "--port", str(self.port),
                "--bind", self.bind, *self.backend_args, action]
        return self.ns.run(argv, check=check, env=_child_env(), timeout=30)

    def stop(self) -> None:
        """Stop the service's core (SIGTERM, PID file removed); the listener then answers 503."""
        self.ctl("stop")

    def start(self) -> None:
        """Start a new core; returns once the PID file names it."""
        self.ctl("start")

    def kill_core(self) -> None:
        """SIGKILL the core and leave its PID file behind, as a crash does."""
        self.ctl("kill-core")

    def stop_listener(self) -> None:
        """Stop the HTTP listener on the service port (the core keeps running)."""
        self.ctl("stop-listener")

    def start_listener(self) -> None:
        """Start the HTTP listener again; returns once it accepts connections."""
        self.ctl("start-listener")

    def hang(self) -> None:
        """Make the service hang: alive, listening, reading requests, answering none."""
        self.ctl("hang")

    def unhang(self) -> None:
        """Make the hung service answer again (held requests are answered)."""
        self.ctl("unhang")

    def core_pid(self) -> int | None:
        """The core's PID if the PID file names a live process, else None."""
        return fakesvc.core_alive(self.state_dir)

    def get(self, path: str = "/", timeout: float = 2.0) -> Reply:
        """One GET straight to this server from the gateway side (through its firewall)."""
        return http_get(self._gateway_ns, self.addr, self.port, path, timeout)

    def iptables_L(self, chain: str | None = None, numeric: bool = False) -> str:
        """``iptables -L [CHAIN]`` in this server's namespace, as the manual page shows it."""
        argv = ["iptables", "-L", *([chain] if chain else []), *(["-n"] if numeric else [])]
        return self.ns.run(argv).stdout

    def iptables_save(self) -> str:
        """The filter table as ``iptables-save`` prints it (comments dropped)."""
        out = self.ns.run(["iptables-save", "-t", "filter"]).stdout
        return "\n".join(ln for ln in out.splitlines() if not ln.startswith("#"))

    def chain_rules(self, chain: str = CHAIN) -> list[str] | None:
        """The ``-A`` lines of ``chain`` (iptables-save form), or None when the chain is absent."""
        save = self.iptables_save().splitlines()
        if not any(ln.startswith(f":{chain} ") for ln in save):
            return None
        return [ln for ln in save if ln.startswith(f"-A {chain} ")]

    def is_blocked(self, chain: str = CHAIN) -> bool:
        """True when the agent's chain holds a REJECT rule."""
        return any("-j REJECT" in r for r in self.chain_rules(chain) or [])

    def start_agent(self, argv: Sequence[str], config_text: str | None) -> subprocess.Popen[bytes]:
        """Write the agent's config (if given) and start ``argv`` in this namespace, logging to a file."""
        if config_text is not None:
            self.config_path.write_text(config_text)
        with open(self.agent_log, "ab") as log:
            self.agent = self.ns.popen(list(argv), stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=subprocess.STDOUT, cwd=str(REPO), env=_child_env())
        return self.agent

    def stop_agent(self, sig: int = signal.SIGTERM, timeout: float = 5.0) -> int | None:
        """Signal the agent and wait for it; returns its exit status (None if none ran)."""
        if self.agent is None:
            return None
        if self.agent.poll() is None:
            self.agent.send_signal(sig)
            try:
                self.agent.wait(timeout)
            except subprocess.TimeoutExpired:
                self.agent.kill()
                self.agent.wait(5)
        return self.agent.returncode

    def agent_events(self) -> list[dict[str, Any]]:
        """The JSON objects the agent logged so far (lines that are not JSON are skipped)."""
        events = []
        with contextlib.suppress(FileNotFoundError), open(self.agent_log, errors="replace") as f:
            for line in f:
                with contextlib.suppress(ValueError):
                    obj = json.loads(line)
                    if isinstance(obj, dict):
                        events.append(obj)
        return events


class Cluster:
    """Gateway + servers + client namespaces with HAProxy, fake services and optional agents.

    Use as a context manager; ``close()`` (also run at exit) kills every process and deletes
    every namespace, even after a failed start.
    """

    def __init__(self, n_servers: int = 2, *, agents: bool = False,
                 agent_argv_factory: Callable[[Server], list[str] | None] = default_agent_argv,
                 agent_config: Callable[[Server], str] | None = default_agent_config,
                 workdir: Path | None = None, port: int = 8080, bind: str = "0.0.0.0",
                 http_mode: str = "server-close", ready_timeout: float = 10.0,
                 agent_ready: Callable[[Server], bool] | None = None,
                 agent_check: tuple[int, str] | None = None,
                 gateway: str = "haproxy", connect_timeout: str = "100ms",
                 nginx_keepalive: int = 16, server_timeout: str = "2s",
                 nginx_max_fails: int = 1, backend: bool = False,
                 backend_paths: Sequence[str] = ("/",),
                 backend_timeout: float = fakesvc.DEFAULT_BACKEND_TIMEOUT,
                 etcd: EtcdCluster | None = None) -> None:
        if not 1 <= n_servers <= 9:
            raise ValueError("n_servers must be between 1 and 9")
        if gateway not in GATEWAY_KINDS:
            raise ValueError(f"gateway must be one of {GATEWAY_KINDS}, got {gateway!r}")
        if http_mode not in ("server-close", "keep-alive"):
            raise ValueError(f"http_mode must be server-close or keep-alive, got {http_mode!r}")
        # nginx with http_mode "keep-alive": an upstream keepalive pool of nginx_keepalive
        self.connect_timeout = connect_timeout
        self.server_timeout = server_timeout
        self.nginx_max_fails = nginx_max_fails
        self.nginx_keepalive = nginx_keepalive if http_mode == "keep-alive" else 0
        self.gateway_kind = gateway
        self.nginx: subprocess.Popen[bytes] | None = None
        self.n_servers = n_servers
        self.agents = agents
        self.agent_argv_factory = agent_argv_factory
        self.agent_config = agent_config
        self.port = port
        self.bind = bind
        self.http_mode = http_mode
        self.agent_check = agent_check  # (port, inter) of HAProxy's agent check, or None
        self.ready_timeout = ready_timeout
        self.agent_ready = agent_ready or (lambda s: s.chain_rules() == [])
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="svh-testbed-"))
        self.url = f"http://{GATEWAY_CLIENT_ADDR}:{GATEWAY_PORT}/"
        self.haproxy_cfg = self.workdir / "haproxy.cfg"
        self.haproxy_log = self.workdir / "haproxy.log"
        self.haproxy_sock = self.workdir / "haproxy.sock"
        self.servers: list[Server] = []
        self._namespaces: list[Netns] = []
        self.gateway: Netns | None = None
        self.client: Netns | None = None
        self.haproxy: subprocess.Popen[bytes] | None = None
        self.backend = backend
        self.backend_paths = tuple(fakesvc.parse_backend_paths(",".join(backend_paths)))
        self.backend_timeout = backend_timeout
        self.backend_lan: Lan | None = None
        self.backend_ns: Netns | None = None
        self.backend_proc: subprocess.Popen[bytes] | None = None
        self.etcd = etcd  # a started EtcdCluster each server is attached to (before agents start)
        self._closed = False

    # --- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> Cluster:
        atexit.register(self.close)
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _netns(self, prefix: str) -> Netns:
        ns = Netns(prefix)
        self._namespaces.append(ns)
        return ns

    def start(self) -> None:
        """Build namespaces and links, start services, HAProxy and agents; wait until all serve."""
        self.gateway = gw = self._netns("svtg")
        self.client = cl = self._netns("svtc")
        _veth(cl, "eth0", CLIENT_ADDR, gw, "toclient", GATEWAY_CLIENT_ADDR)
        env = _child_env()
        backend_args: list[str] = []
        if self.backend:
            self._start_backend_segment()
            backend_args = fakesvc.backend_argv(f"{BACKEND_ADDR}:{BACKEND_PORT}",
                                                self.backend_paths, self.backend_timeout)
        for i in range(1, self.n_servers + 1):
            ns = self._netns(f"svt{i}")
            d = self.workdir / f"server{i}"
            d.mkdir(parents=True, exist_ok=True)
            srv = Server(i, ns, d, self.port, self.bind, gw.name, backend_args)
            _veth(ns, "eth0", srv.addr, gw, f"toserver{i}", srv.gateway_addr)
            if self.backend_lan is not None:
                self.backend_lan.attach(ns, 10 + i, "back0")
            if self.etcd is not None:
                srv.etcd_addr = self.etcd.attach(ns)
            with open(d / "listener.log", "ab") as log:
                ns.popen([sys.executable, "-m", "tests.testbed.fakesvc", "serve", "--state-dir",
                          str(d), "--name", srv.name, "--port", str(self.port),
                          "--bind", self.bind, *backend_args], stdin=subprocess.DEVNULL,
                         stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO), env=env)
            self.servers.append(srv)
        if self.gateway_kind == "nginx":
            self._start_nginx(gw)
        else:
            self.haproxy_cfg.write_text(render_haproxy_cfg(
                [(s.name, s.addr, s.port) for s in self.servers], GATEWAY_CLIENT_ADDR,
                self.haproxy_sock, self.http_mode, self.agent_check, self.connect_timeout,
                self.server_timeout))
            with open(self.haproxy_log, "ab") as log:
                self.haproxy = gw.popen(["haproxy", "-f", str(self.haproxy_cfg), "-db"],
                                        stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT)
        for srv in self.servers:
            wait_for(functools.partial(_answers_ok, srv), self.ready_timeout,
                     f"{srv.name} answering 200")
        wait_for(self._haproxy_serves, self.ready_timeout, "HAProxy answering through the gateway")
        if self.agents:
            self.start_agents()

    def _start_backend_segment(self) -> None:
        """The back end's segment (a bridge in its own namespace) and the back end on it."""
        lan = Lan(BACKEND_SUBNET, prefix="svtb")
        self._namespaces.append(lan.switch)
        self.backend_lan = lan
        self.backend_ns = self._netns("svtk")
        lan.attach(self.backend_ns, 1, "eth0")
        self.backend_up()

    def backend_reachable(self, timeout: float = 0.5) -> bool:
        """True when the back end greets a connection made inside its own namespace."""
        assert self.backend_ns is not None, "the cluster has no back end"
        ns_name = self.backend_ns.name
        box: list[bool] = []

        def check() -> None:  # on its own thread: enter_netns moves only the calling thread
            enter_netns(ns_name)
            box.append(fakesvc.backend_ok((BACKEND_ADDR, BACKEND_PORT), timeout))

        t = threading.Thread(target=check, name="backend-check")
        t.start()
        t.join()
        return bool(box and box[0])

    def backend_up(self, timeout: float = 10.0) -> None:
        """Start the back end (if it is not running) and return once it greets connections."""
        assert self.backend_ns is not None, "the cluster has no back end"
        if self.backend_proc is None or self.backend_proc.poll() is not None:
            with open(self.workdir / "backend.log", "ab") as log:
                self.backend_proc = self.backend_ns.popen(
                    [sys.executable, "-m", "tests.testbed.fakesvc", "backend",
                     "--bind", BACKEND_ADDR, "--port", str(BACKEND_PORT)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    cwd=str(REPO), env=_child_env())
        wait_for(self.backend_reachable, timeout, "the shared back end greeting", interval=0.02)

    def backend_down(self) -> None:
        """Kill the back end (SIGKILL by its PID) and wait for its exit: connections are refused."""
        proc = self.backend_proc
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGCONT)  # a hung (stopped) back end dies as well
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def backend_hang(self) -> None:
        """Stop the back end (SIGSTOP): the kernel still accepts connections, nobody greets."""
        assert self.backend_proc is not None and self.backend_proc.poll() is None
        os.kill(self.backend_proc.pid, signal.SIGSTOP)

    def backend_resume(self) -> None:
        """Continue a back end stopped by ``backend_hang`` (SIGCONT)."""
        assert self.backend_proc is not None and self.backend_proc.poll() is None
        os.kill(self.backend_proc.pid, signal.SIGCONT)

    def _start_nginx(self, gw: Netns) -> None:
        """Write the nginx configuration and start Debian's nginx in the gateway namespace."""
        conf = self.workdir / "nginx.conf"
        conf.write_text(render_nginx_conf([(s.name, s.addr, s.port) for s in self.servers],
                                          GATEWAY_CLIENT_ADDR, self.workdir,
                                          self.nginx_keepalive, self.connect_timeout,
                                          self.server_timeout, self.nginx_max_fails))
        (self.workdir / "nginx-tmp").mkdir(exist_ok=True)
        # -e: the error log before the configuration is read (never the system's /var/log/nginx)
        argv = ["nginx", "-p", str(self.workdir), "-c", str(conf),
                "-e", str(self.workdir / "nginx-error.log")]
        with open(self.workdir / "nginx.log", "ab") as log:
            self.nginx = gw.popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                  stderr=subprocess.STDOUT)

        def started() -> bool:  # nginx writes its PID file once it listens
            if self.nginx is not None and self.nginx.poll() is not None:
                raise RuntimeError(f"nginx exited {self.nginx.returncode}: "
                                   + (self.workdir / "nginx-error.log").read_text()[-2000:])
            return (self.workdir / "nginx.pid").exists()
        # Serving is waited for with HAProxy's check below, once the servers answer: a request
        # sent earlier would mark them failed for fail_timeout.
        wait_for(started, self.ready_timeout, "nginx listening in the gateway namespace")

    def _haproxy_serves(self) -> bool:
        if self.haproxy is not None and self.haproxy.poll() is not None:
            raise RuntimeError(f"haproxy exited {self.haproxy.returncode}: "
                               f"{self.haproxy_log.read_text()[-2000:]}")
        return self.client_get(timeout=0.5).ok

    def start_agents(self) -> None:
        """Start each server's agent (factory returning None skips one) and wait until ready."""
        started = []
        for srv in self.servers:
            argv = self.agent_argv_factory(srv)
            if argv is None:
                continue
            text = self.agent_config(srv) if self.agent_config else None
            srv.start_agent(argv, text)
            started.append(srv)
        for srv in started:
            def ready(s: Server = srv) -> bool:
                if s.agent is not None and s.agent.poll() is not None:
                    raise RuntimeError(f"{s.name}'s agent exited {s.agent.returncode}: "
                                       f"{s.agent_log.read_text(errors='replace')[-2000:]}")
                return self.agent_ready(s)
            wait_for(ready, self.ready_timeout, f"{srv.name}'s agent ready (chain open)",
                     interval=0.05)

    def close(self) -> None:
        """Kill every process and delete every namespace made here; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM}) \
            if threading.current_thread() is threading.main_thread() else None
        try:
            for srv in self.servers:
                with contextlib.suppress(Exception):
                    srv.stop_agent(timeout=2.0)
            for ns in reversed(self._namespaces):
                with contextlib.suppress(Exception):
                    ns.close()
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
        finally:
            if old is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)
            with contextlib.suppress(Exception):
                atexit.unregister(self.close)

    # --- use ------------------------------------------------------------------------------

    def server(self, i: int) -> Server:
        """Server ``i``, counted from 1 (``server(1)`` is "server1")."""
        if not 1 <= i <= len(self.servers):
            raise IndexError(f"no server {i} (have 1..{len(self.servers)})")
        return self.servers[i - 1]

    def client_get(self, path: str = "/", timeout: float = 2.0) -> Reply:
        """One HTTP GET from the client namespace through the gateway; (status, body), 0 on error."""
        assert self.client is not None, "cluster not started"
        return http_get(self.client.name, GATEWAY_CLIENT_ADDR, GATEWAY_PORT, path, timeout)

    def start_load(self, out: Path, *, rate: float = 200.0, duration: float = 5.0,
                   max_requests: int | None = None,
                   timeout: float = 2.0, path: str = "/") -> subprocess.Popen[bytes]:
        """Start ``tests.testbed.load`` in the client namespace, writing JSON lines to ``out``
        (each request a GET of ``path`` through the gateway)."""
        assert self.client is not None, "cluster not started"
        url = self.url.rstrip("/") + path
        argv = [sys.executable, "-m", "tests.testbed.load", "--url", url, "--rate", str(rate),
                "--duration", str(duration), "--timeout", str(timeout),
                "--out", str(out)]
        if max_requests is not None:
            argv += ["--max-requests", str(max_requests)]
        with open(out.with_suffix(".log"), "ab") as log:
            return self.client.popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT, cwd=str(REPO), env=_child_env())

    def haproxy_cmd(self, command: str) -> str:
        """Send one command to HAProxy's admin socket (e.g. "show stat") and return its answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(2.0)
            s.connect(str(self.haproxy_sock))
            s.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")


def install_signal_handlers() -> None:
    """Make SIGINT, SIGTERM and SIGHUP unwind as KeyboardInterrupt, so ``with Cluster()`` tears down."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)

