"""A fake SSL VPN service shaped like the real one, for the testbed.

Two processes per server, as on a real SSL VPN host:

* the *core*: the process the PID file names. It writes the PID file atomically (temp file +
  rename, like real daemons), removes it when it ends on SIGTERM, and otherwise just lives;
* the *listener*: an HTTP server on port 8080 answering ``200 <name>`` while the core lives and
  ``503 <name> down`` while it does not. It outlives the core, as a real front process does.

The listener is also the service's master: it starts cores when asked (SIGUSR1) and reaps them.
That keeps a stopped core from lingering as a zombie where PID 1 does not reap orphans (a
zombie still has a /proc entry and would look alive to a careless checker).

Optionally (``--backend HOST:PORT``) the listener depends on a shared back end, as a real SSL
VPN's login depends on its LDAP/RADIUS servers: a request whose path starts with one of
``--backend-paths`` (default ``/``: every path) first checks the back end (TCP connect and its
one-line greeting within ``--backend-timeout``); when that fails it answers
``503 <name> backend down`` although the core lives and the port accepts connections (for the
agent a *suspect* DOWN, never a proven one). ``backend`` runs the back-end stand-in: it greets
each connection with ``OK`` and closes it. Without ``--backend`` nothing changes.

``ctl`` is the init-script stand-in, used like ``/etc/init.d/novell-sslvpn stop``::

    python -m tests.testbed.fakesvc serve --state-dir D --name server1 [--port 8080] [--bind ::]
    python -m tests.testbed.fakesvc ctl --state-dir D start|stop|status|restart|kill-core
    python -m tests.testbed.fakesvc ctl --state-dir D stop-listener|start-listener [--name N ...]
    python -m tests.testbed.fakesvc ctl --state-dir D hang|unhang

``hang`` makes the listener alive, listening and silent: it accepts and reads requests but
answers none until ``unhang`` (a flag file in the state directory), as a hung service does.
A request for ``/slow/MS`` is answered after MS milliseconds (a long request in flight).
    python -m tests.testbed.fakesvc serve ... --backend 10.201.0.1:389 --backend-paths /health,/login
    python -m tests.testbed.fakesvc backend [--bind 0.0.0.0] [--port 389] [--pid-file P]

``status`` exits as LSB init scripts do: 0 running, 1 dead but PID file present, 3 stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import select
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

__all__ = [
    "BACKEND_GREETING",
    "CORE_COMM",
    "LISTENER_PID",
    "PID_FILE",
    "Backend",
    "backend_argv",
    "backend_ok",
    "core_alive",
    "depends_on_backend",
    "parse_backend_paths",
    "parse_hostport",
    "pid_alive",
    "read_pid",
    "write_pid_atomic",
]

PID_FILE = "novell-sslvpn.pid"  # the core's PID file, inside the state directory
LISTENER_PID = "listener.pid"
SLOW_PREFIX = "slow-in-flight-"  # one file per /slow/MS request being served
HANG_FLAG = "hang"  # while this file exists in the state directory, no request is answered
HANG_BOUND_S = 60.0  # a hung request is answered after this anyway, so no thread lives forever
CORE_COMM = "sslvpn-core"  # the core's process name (comm), as a process_name check sees it
EXIT_RUNNING, EXIT_DEAD_PIDFILE, EXIT_STOPPED = 0, 1, 3
BACKEND_GREETING = b"OK\n"  # what the back-end stand-in says to each connection
DEFAULT_BACKEND_TIMEOUT = 0.5
_REPO = Path(__file__).resolve().parent.parent.parent


def read_pid(path: Path) -> int | None:
    """The positive PID written in ``path``, or None when it is absent, empty or not a PID."""
    try:
        with open(path, "rb") as f:
            text = f.read(64)
    except OSError:
        return None
    try:
        pid = int(text.strip())
    except ValueError:
        return None
    return pid if pid > 0 else None


def write_pid_atomic(path: Path, pid: int) -> None:
    """Replace ``path`` with a file holding ``pid`` by writing a temp file and renaming it."""
    tmp = path.with_name(f".{path.name}.{pid}.tmp")
    with open(tmp, "w") as f:
        f.write(f"{pid}\n")
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and has not exited (a zombie counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read(512)
    except OSError:
        return False
    # The state letter follows the command name, which is in parentheses and may hold spaces.
    state = stat[stat.rfind(b")") + 2:][:1]
    return state not in (b"Z", b"X", b"")


def core_alive(state_dir: Path) -> int | None:
    """The core's PID when the PID file names a live process, else None."""
    pid = read_pid(state_dir / PID_FILE)
    return pid if pid is not None and pid_alive(pid) else None


def _wait_exit(pid: int, timeout: float) -> bool:
    """Wait until ``pid`` has exited (pidfd where possible); True if it did within ``timeout``."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except OSError:
        fd = -1
    deadline = time.monotonic() + timeout
    try:
        while pid_alive(pid):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if fd >= 0:
                select.select([fd], [], [], min(left, 0.05))
            else:
                time.sleep(min(left, 0.005))
        return True
    finally:
        if fd >= 0:
            os.close(fd)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_REPO), env.get("PYTHONPATH", "")) if p)
    return env


def _spawn_core(state_dir: Path) -> subprocess.Popen[bytes]:
    log = open(state_dir / "core.log", "ab")  # noqa: SIM115 - handed to the child and closed below
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.testbed.fakesvc", "core", "--state-dir", str(state_dir)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=str(_REPO), env=_child_env(),
            start_new_session=True)
    finally:
        log.close()


# --- the shared back end ------------------------------------------------------------------------

def parse_hostport(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 as ``[ADDR]:PORT``) as (host, port); ValueError naming the problem."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"back end must be HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"back end port must be 1..65535, got {port!r}")
    return host, int(port)


def parse_backend_paths(text: str) -> tuple[str, ...]:
    """A comma-separated list of path prefixes, each starting with ``/``; ValueError otherwise."""
    paths = tuple(p.strip() for p in text.split(",") if p.strip())
    if not paths or any(not p.startswith("/") for p in paths):
        raise ValueError(f"back-end paths must be /-prefixed, comma-separated, got {text!r}")
    return paths


def depends_on_backend(path: str, prefixes: Sequence[str]) -> bool:
    """True when request path ``path`` (query ignored) falls under one of ``prefixes``:
    ``/`` covers every path, ``/login`` covers ``/login`` and ``/login/...`` but not ``/loginx``."""
    path = path.split("?", 1)[0].split("#", 1)[0] or "/"
    for p in prefixes:
        base = p.rstrip("/")
        if not base or path == base or path.startswith(base + "/"):
            return True
    return False


def backend_ok(addr: tuple[str, int], timeout: float) -> bool:
    """True when the back end at ``addr`` accepts a connection and greets within ``timeout``."""
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection(addr, timeout=timeout) as s:
            got = b""
            while not got.endswith(b"\n") and len(got) < 64:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                s.settimeout(left)
                chunk = s.recv(64)
                if not chunk:
                    break
                got += chunk
            return got == BACKEND_GREETING
    except OSError:
        return False


class Backend(socketserver.ThreadingTCPServer):
    """The back-end stand-in (an LDAP/RADIUS server for the fake service): greets and closes."""

    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 256

    def __init__(self, bind: str, port: int) -> None:
        self.address_family = socket.AF_INET6 if ":" in bind else socket.AF_INET

        class _Greet(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                with contextlib.suppress(OSError):
                    self.request.sendall(BACKEND_GREETING)

        super().__init__((bind, port), _Greet)


def run_backend(bind: str, port: int, pid_file: Path | None) -> int:
    """Serve the back-end stand-in until SIGTERM (SIGSTOP makes it hang, SIGCONT resumes)."""
    server = Backend(bind, port)

    def on_term(signum: int, frame: Any) -> None:
        server.socket.close()
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    if pid_file is not None:
        write_pid_atomic(pid_file, os.getpid())
    server.serve_forever(poll_interval=0.5)
    return 0


# --- the core ---------------------------------------------------------------------------------

def run_core(state_dir: Path) -> int:
    """Write the PID file atomically, then live until SIGTERM (which removes the PID file)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, CORE_COMM.encode(), 0, 0, 0)  # PR_SET_NAME
    pid_file = state_dir / PID_FILE

    def on_term(signum: int, frame: Any) -> None:
        if read_pid(pid_file) == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                pid_file.unlink()
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    write_pid_atomic(pid_file, os.getpid())
    while True:
        signal.pause()


# --- the listener -----------------------------------------------------------------------------

class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # lets a gateway keep server connections open if it wants
    # One write per answer (headers and body together, flushed at the end of each request), as
    # real servers do: two small writes would meet Nagle and the peer's delayed ACK, and every
    # answer on a reused connection would take some 40 ms.
    wbufsize = -1
    server: _Listener

    def _answer(self, with_body: bool) -> None:
        srv = self.server
        if core_alive(srv.state_dir) is None:
            code, body = 503, f"{srv.name} down\n"
        elif (srv.backend is not None and depends_on_backend(self.path, srv.backend_paths)
              and not backend_ok(srv.backend, srv.backend_timeout)):
            code, body = 503, f"{srv.name} backend down\n"
        else:
            code, body = 200, f"{srv.name}\n"
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Server", srv.name)
        self.end_headers()
        if with_body:
            self.wfile.write(data)

    def _stall(self) -> None:
        """Hold the request while the service hangs; sleep for a ``/slow/MS`` request."""
        flag = self.server.state_dir / HANG_FLAG
        deadline = time.monotonic() + HANG_BOUND_S
        while flag.exists() and time.monotonic() < deadline:
            time.sleep(0.02)  # polling a flag file: the hang is the point, not a race
        if self.path.startswith("/slow/") and self.path[6:].isdigit():
            # a file per long request in flight, so a test can wait until one is on this server
            mark = self.server.state_dir / f"{SLOW_PREFIX}{threading.get_ident()}"
            mark.touch()
            try:
                time.sleep(min(int(self.path[6:]), 30_000) / 1000)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    mark.unlink()

    def do_GET(self) -> None:
        self._stall()
        self._answer(True)

    def do_HEAD(self) -> None:
        self._answer(False)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per request would drown the logs at a few hundred requests a second


class _Listener(ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 256

    def __init__(self, bind: str, port: int, name: str, state_dir: Path,
                 backend: tuple[str, int] | None = None, backend_paths: Sequence[str] = ("/",),
                 backend_timeout: float = DEFAULT_BACKEND_TIMEOUT) -> None:
        self.name = name
        self.state_dir = state_dir
        self.backend = backend
        self.backend_paths = tuple(backend_paths)
        self.backend_timeout = backend_timeout
        self.address_family = socket.AF_INET6 if ":" in bind else socket.AF_INET
        super().__init__((bind, port), _Handler)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # dual stack
        super().server_bind()


def run_listener(state_dir: Path, name: str, port: int, bind: str, start_core: bool,
                 backend_args: Sequence[str] = ()) -> int:
    """Serve HTTP until SIGTERM; start a core on SIGUSR1 (and at start if asked) and reap cores."""
    httpd = _Listener(bind, port, name, state_dir, **_backend_kw(backend_args))
    lock = threading.Lock()

    def start() -> None:
        with lock:
            if core_alive(state_dir) is None:
                proc = _spawn_core(state_dir)
                threading.Thread(target=proc.wait, daemon=True).start()  # the reaper

    def on_usr1(signum: int, frame: Any) -> None:
        threading.Thread(target=start, daemon=True).start()

    def on_term(signum: int, frame: Any) -> None:
        httpd.socket.close()
        os._exit(0)

    signal.signal(signal.SIGUSR1, on_usr1)
    signal.signal(signal.SIGTERM, on_term)
    write_pid_atomic(state_dir / LISTENER_PID, os.getpid())
    if start_core:
        start()
    httpd.serve_forever(poll_interval=0.5)
    return 0


# --- the init-script stand-in -----------------------------------------------------------------

def _wait(cond: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


def ctl_start(state_dir: Path, timeout: float) -> int:
    """Start a core (through the listener when it runs) and return once its PID file names it."""
    if (pid := core_alive(state_dir)) is not None:
        print(f"already running (pid {pid})")
        return 0
    listener = read_pid(state_dir / LISTENER_PID)
    if listener is not None and pid_alive(listener):
        os.kill(listener, signal.SIGUSR1)
    else:  # no master to reap it: the core becomes an orphan, as with a plain init script
        _spawn_core(state_dir)
    if not _wait(lambda: core_alive(state_dir) is not None, timeout):
        print("start: core did not write its PID file in time", file=sys.stderr)
        return 1
    print(f"started (pid {core_alive(state_dir)})")
    return 0


def ctl_stop(state_dir: Path, timeout: float, sig: int = signal.SIGTERM) -> int:
    """Signal the core named by the PID file, wait for its exit; SIGTERM also removes the file."""
    pid_file = state_dir / PID_FILE
    pid = read_pid(pid_file)
    if pid is None or not pid_alive(pid):
        if sig == signal.SIGTERM:
            with contextlib.suppress(FileNotFoundError):
                pid_file.unlink()
        print("not running")
        return 0
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    if not _wait_exit(pid, timeout):
        print(f"stop: pid {pid} still alive after {timeout}s", file=sys.stderr)
        return 1
    if sig == signal.SIGTERM and read_pid(pid_file) == pid:
        with contextlib.suppress(FileNotFoundError):
            pid_file.unlink()
    print(f"stopped (pid {pid})" if sig == signal.SIGTERM else f"killed (pid {pid})")
    return 0


def ctl_hang(state_dir: Path, hang: bool) -> int:
    """Make the listener hang (accept, read, answer nothing) or answer again."""
    flag = state_dir / HANG_FLAG
    if hang:
        flag.touch()
    else:
        with contextlib.suppress(FileNotFoundError):
            flag.unlink()
    print("hanging" if hang else "answering")
    return 0


def ctl_status(state_dir: Path) -> int:
    """Print the core's state; exit 0 running, 1 dead with a PID file left, 3 stopped."""
    pid = read_pid(state_dir / PID_FILE)
    if pid is not None and pid_alive(pid):
        print(f"running (pid {pid})")
        return EXIT_RUNNING
    if (state_dir / PID_FILE).exists():
        print("dead, but the PID file exists")
        return EXIT_DEAD_PIDFILE
    print("stopped")
    return EXIT_STOPPED


def ctl_stop_listener(state_dir: Path, timeout: float) -> int:
    """Stop the HTTP listener (the core, if any, keeps running)."""
    pid = read_pid(state_dir / LISTENER_PID)
    if pid is None or not pid_alive(pid):
        print("listener not running")
        return 0
    os.kill(pid, signal.SIGTERM)
    if not _wait_exit(pid, timeout):
        return 1
    print(f"listener stopped (pid {pid})")
    return 0


def ctl_start_listener(state_dir: Path, name: str, port: int, bind: str, timeout: float,
                       backend_args: Sequence[str] = ()) -> int:
    """Start a detached listener (with the same back-end options) and return once it accepts
    connections on loopback."""
    log = open(state_dir / "listener.log", "ab")  # noqa: SIM115 - handed to the child
    with log:
        subprocess.Popen(
            [sys.executable, "-m", "tests.testbed.fakesvc", "serve", "--no-core",
             "--state-dir", str(state_dir), "--name", name, "--port", str(port), "--bind", bind,
             *backend_args],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=str(_REPO), env=_child_env(),
            start_new_session=True)
    host = "::1" if ":" in bind else "127.0.0.1"

    def accepts() -> bool:
        try:
            socket.create_connection((host, port), timeout=0.2).close()
        except OSError:
            return False
        return True

    if not _wait(accepts, timeout):
        print("start-listener: not listening in time", file=sys.stderr)
        return 1
    print("listener started")
    return 0


def backend_argv(backend: str | None, paths: Sequence[str] = ("/",),
                 timeout: float = DEFAULT_BACKEND_TIMEOUT) -> list[str]:
    """The ``serve``/``ctl`` options making the listener depend on ``backend`` (none: [])."""
    if backend is None:
        return []
    return ["--backend", backend, "--backend-paths", ",".join(paths),
            "--backend-timeout", str(timeout)]


def _backend_kw(backend_args: Sequence[str]) -> dict[str, Any]:
    """Parse ``backend_argv()`` output back into the listener's keyword arguments."""
    if not backend_args:
        return {}
    opts = dict(zip(backend_args[::2], backend_args[1::2], strict=True))
    return {"backend": parse_hostport(opts["--backend"]),
            "backend_paths": parse_backend_paths(opts.get("--backend-paths", "/")),
            "backend_timeout": float(opts.get("--backend-timeout", DEFAULT_BACKEND_TIMEOUT))}


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry: ``serve``, ``core``, ``backend`` or ``ctl ACTION``; the exit status."""
    ap = argparse.ArgumentParser(prog="python -m tests.testbed.fakesvc")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("backend", help="the shared back end's stand-in (greets, closes)")
    b.add_argument("--bind", default="0.0.0.0")
    b.add_argument("--port", type=int, default=389)
    b.add_argument("--pid-file", type=Path)
    for cmd in ("serve", "core", "ctl"):
        p = sub.add_parser(cmd)
        p.add_argument("--state-dir", type=Path, required=True)
        if cmd == "ctl":
            p.add_argument("action", choices=["start", "stop", "restart", "status", "kill-core",
                                              "stop-listener", "start-listener", "hang",
                                              "unhang"])
            p.add_argument("--timeout", type=float, default=5.0)
        if cmd in ("serve", "ctl"):
            p.add_argument("--name", default=socket.gethostname())
            p.add_argument("--port", type=int, default=8080)
            p.add_argument("--bind", default="0.0.0.0")
            p.add_argument("--backend", metavar="HOST:PORT",
                           help="answer 503 on --backend-paths while this back end fails")
            p.add_argument("--backend-paths", default="/", metavar="P1,P2",
                           help="path prefixes that depend on the back end (default: every path)")
            p.add_argument("--backend-timeout", type=float, default=DEFAULT_BACKEND_TIMEOUT,
                           metavar="SECONDS")
        if cmd == "serve":
            p.add_argument("--no-core", dest="start_core", action="store_false",
                           help="serve only; start no core (ctl start does that)")
    a = ap.parse_args(argv)
    if a.cmd == "backend":
        return run_backend(a.bind, a.port, a.pid_file)
    backend_args: list[str] = []
    if a.cmd in ("serve", "ctl") and a.backend is not None:
        try:
            parse_hostport(a.backend)
            paths = parse_backend_paths(a.backend_paths)
        except ValueError as e:
            ap.error(str(e))
        if a.backend_timeout <= 0:
            ap.error("--backend-timeout must be positive")
        backend_args = backend_argv(a.backend, paths, a.backend_timeout)
    d: Path = a.state_dir.resolve()
    d.mkdir(parents=True, exist_ok=True)
    if a.cmd == "core":
        return run_core(d)
    if a.cmd == "serve":
        return run_listener(d, a.name, a.port, a.bind, a.start_core, backend_args)
    act: str = a.action
    if act == "start":
        return ctl_start(d, a.timeout)
    if act == "stop":
        return ctl_stop(d, a.timeout)
    if act == "restart":
        return ctl_stop(d, a.timeout) or ctl_start(d, a.timeout)
    if act == "kill-core":
        return ctl_stop(d, a.timeout, signal.SIGKILL)
    if act == "stop-listener":
        return ctl_stop_listener(d, a.timeout)
    if act == "start-listener":
        return ctl_start_listener(d, a.name, a.port, a.bind, a.timeout, backend_args)
    if act in ("hang", "unhang"):
        return ctl_hang(d, act == "hang")
    return ctl_status(d)


if __name__ == "__main__":
    sys.exit(main())
