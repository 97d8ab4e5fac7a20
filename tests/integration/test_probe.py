"""The verification probe against real processes, PID files and sockets.

Each network test runs a small fake service and the probe inside a throwaway network namespace
(the probe in its own `ip netns exec` subprocess, so its listen check and connects see only that
namespace). Process-only cases run in the test process itself: they touch no network.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.netns import REPO, Netns, wait_for
from watcher.config import ProbeConfig, ServiceConfig
from watcher.probe import Prober

PORT = 8080
COMM = "fake-sslvpn"

# The fake service: argv = pid_file port mode bind [certfile keyfile].
# mode: "200" / "503" answer every request with that status; "silent" accepts and never answers;
# "backlog" listens with backlog 0, fills the accept queue, then stops itself (SIGSTOP);
# "nolisten" only lives. The PID file is written (temp + rename) once the socket is ready.
FAKE_SERVICE = r"""
import ctypes, os, signal, socket, ssl, sys
pid_file, port, mode, bind = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
ctypes.CDLL(None).prctl(15, b"fake-sslvpn", 0, 0, 0)  # PR_SET_NAME sets comm

def ready():
    tmp = pid_file + ".tmp"
    with open(tmp, "w") as f:
        f.write("%d\n" % os.getpid())
    os.rename(tmp, pid_file)

if mode == "nolisten":
    ready()
    while True:
        signal.pause()
family = socket.AF_INET6 if ":" in bind else socket.AF_INET
srv = socket.socket(family, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
if family == socket.AF_INET6:
    srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
srv.bind((bind, port))
if mode == "backlog":
    srv.listen(0)
    fillers = []
    for _ in range(4):
        c = socket.socket(family, socket.SOCK_STREAM)
        c.setblocking(False)
        c.connect_ex((bind, port))
        fillers.append(c)
    ready()
    os.kill(os.getpid(), signal.SIGSTOP)
srv.listen(16)
ctx = None
if len(sys.argv) > 6:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(sys.argv[5], sys.argv[6])
ready()
held = []
status = {"200": "200 OK", "503": "503 Service Unavailable"}.get(mode, "")
while True:
    conn, _ = srv.accept()
    if mode == "silent":
        held.append(conn)
        continue
    try:
        if ctx is not None:
            conn = ctx.wrap_socket(conn, server_side=True)
        data = b""
        # Answer after a full request, or at once to a TLS ClientHello sent to a plain server.
        while b"\r\n\r\n" not in data and not data.startswith(b"\x16"):
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
        if data:
            body = b"fake\n"
            conn.sendall(b"HTTP/1.1 " + status.encode() + b"\r\nContent-Length: 5\r\n"
                         b"Connection: close\r\n\r\n" + body)
    except OSError:
        pass
    finally:
        conn.close()
"""

# The probe, run inside the namespace: argv[1] is JSON of the options; prints the result as JSON.
PROBE_RUNNER = r"""
import asyncio, dataclasses, json, os, sys
from pathlib import Path
from watcher.config import ProbeConfig, ServiceConfig
from watcher.probe import Prober

opts = json.loads(sys.argv[1])

async def proc_net_listening(port):
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(name) as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    return True
    return False

listening = proc_net_listening
if opts.pop("listening") == "sock_diag":
    from watcher.sources.sock_diag import listening
service = ServiceConfig(pid_file=Path(opts.pop("pid_file")), port=opts.pop("port"),
                        process_name=opts.pop("process_name"))
prober = Prober(service, ProbeConfig(**opts), own_pid=os.getpid(), listening=listening)
print(json.dumps(dataclasses.asdict(asyncio.run(prober.probe()))))
"""


class Service:
    """The fake service running in a namespace, and the probe run next to it."""

    def __init__(self, ns: Netns, tmp: Path) -> None:
        self.ns = ns
        self.tmp = tmp
        self.pid_file = tmp / "sslvpn.pid"
        self.proc: subprocess.Popen[Any] | None = None

    def start(self, mode: str, bind: str = "127.0.0.1", tls: bool = False) -> int:
        """Start the fake service and return its PID once its PID file names it."""
        argv = [sys.executable, "-c", FAKE_SERVICE, str(self.pid_file), str(PORT), mode, bind]
        if tls:
            argv += make_cert(self.tmp)
        self.proc = self.ns.popen(argv)
        pid = self.proc.pid  # `ip netns exec` execs the command: same PID
        wait_for(lambda: self.pid_file.exists() and self.pid_file.read_text() == f"{pid}\n",
                 what="the fake service's PID file")
        return pid

    def probe(self, *, listening: str = "proc", process_name: str = "", timeout_ms: int = 1000,
              http_path: str = "", tls: bool = False) -> dict[str, Any]:
        """Run the probe in the namespace and return its ProbeResult as a dict."""
        opts = {"pid_file": str(self.pid_file), "port": PORT, "process_name": process_name,
                "listening": listening, "timeout_ms": timeout_ms, "http_path": http_path,
                "tls": tls}
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        out = self.ns.run([sys.executable, "-c", PROBE_RUNNER, json.dumps(opts)], env=env)
        result: dict[str, Any] = json.loads(out.stdout)
        return result


def make_cert(tmp: Path) -> list[str]:
    """A throwaway self-signed certificate for CN=localhost: [certfile, keyfile]."""
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    if not cert.exists():
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
                        "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
                       check=True, capture_output=True)
    return [str(cert), str(key)]


def proc_state(pid: int) -> str:
    """The state letter of ``pid`` from /proc/PID/stat ('' if gone)."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return ""
    return data[data.rfind(b")") + 2 :].split()[0].decode()


@pytest.fixture
def svc(netns: Netns, tmp_path: Path) -> Iterator[Service]:
    """A fake-service handle in a fresh namespace (the namespace fixture kills what it started)."""
    yield Service(netns, tmp_path)


LISTENING = ["proc", "sock_diag"]  # sock_diag failing to import is a failure, not a skip


@pytest.mark.netns
@pytest.mark.parametrize("listening", LISTENING)
def test_healthy_http_service_passes_every_check(svc: Service, listening: str) -> None:
    """A live, named, listening service answering 200 passes all checks, the last being http."""
    pid = svc.start("200")
    r = svc.probe(listening=listening, process_name=COMM, http_path="/health")
    assert r["ok"], r
    assert r["check"] == "http" and r["pid"] == pid
    assert r["checks"] == ["pid_file", "process", "process_name", "listen", "connect", "http"]
    assert r["reason"] == "http: GET /health: status 200 OK"


@pytest.mark.netns
def test_connect_only_probe_passes(svc: Service) -> None:
    """Without http_path the probe ends with a passed TCP connect to 127.0.0.1."""
    svc.start("200")
    r = svc.probe()
    assert (r["ok"], r["check"]) == (True, "connect"), r
    assert r["reason"] == f"connect: connected to 127.0.0.1:{PORT}"


@pytest.mark.netns
def test_ipv6_only_listener_is_reached_on_loopback_v6(svc: Service) -> None:
    """A listener on ::1 only: the IPv4 connect is refused and ::1 is tried and answers."""
    svc.start("200", bind="::1")
    r = svc.probe(http_path="/")
    assert r["ok"], r
    assert r["checks"][-2:] == ["connect", "http"]


@pytest.mark.netns
def test_exe_basename_matches_process_name(svc: Service) -> None:
    """process_name may name the executable (basename of /proc/PID/exe) instead of comm."""
    svc.start("200")
    exe = os.path.basename(os.path.realpath(sys.executable))
    r = svc.probe(process_name=exe)
    assert r["ok"], r


@pytest.mark.netns
def test_missing_pid_file(svc: Service) -> None:
    """No PID file: fails 'pid_file' with 'no such file' before touching anything else."""
    r = svc.probe(http_path="/")
    assert (r["ok"], r["check"], r["checks"], r["pid"]) == (False, "pid_file", [], None)
    assert "no such file" in r["reason"]


@pytest.mark.netns
def test_dead_pid(svc: Service) -> None:
    """A PID file naming an exited, reaped process fails 'process': not running."""
    child = subprocess.Popen(["true"])
    child.wait()
    svc.pid_file.write_text(f"{child.pid}\n")
    r = svc.probe()
    assert (r["ok"], r["check"], r["checks"]) == (False, "process", ["pid_file"]), r
    assert r["reason"] == f"process: PID {child.pid} is not running"


@pytest.mark.netns
@pytest.mark.parametrize("listening", LISTENING)
def test_listener_missing(svc: Service, listening: str) -> None:
    """A live service with no listening socket fails 'listen'."""
    svc.start("nolisten")
    r = svc.probe(listening=listening, http_path="/")
    assert (r["ok"], r["check"]) == (False, "listen"), r
    assert r["reason"] == f"listen: no TCP listener on port {PORT}"


@pytest.mark.netns
def test_stopped_service_with_full_backlog_times_out_in_connect(svc: Service) -> None:
    """A SIGSTOP'd listener with a full accept queue: connect times out, the reason says so."""
    pid = svc.start("backlog")
    wait_for(lambda: proc_state(pid) == "T", what="the fake service to stop itself")
    r = svc.probe(timeout_ms=300, http_path="/")
    assert (r["ok"], r["check"]) == (False, "connect"), r
    assert r["checks"] == ["pid_file", "process", "listen"]
    assert r["reason"] == "connect: timed out after 300 ms"
    assert 300e6 <= r["duration_ns"] < 300e6 + 1e9


@pytest.mark.netns
def test_silent_listener_times_out_in_http(svc: Service) -> None:
    """A listener that accepts but never answers passes connect and times out in 'http'."""
    svc.start("silent")
    assert svc.probe()["ok"]  # the kernel completes the handshake: connect alone is fooled
    r = svc.probe(timeout_ms=300, http_path="/")
    assert (r["ok"], r["check"]) == (False, "http"), r
    assert r["reason"] == "http: timed out after 300 ms"


@pytest.mark.netns
def test_http_503_fails_http(svc: Service) -> None:
    """A 503 answer fails 'http' and the reason carries the status."""
    svc.start("503")
    r = svc.probe(http_path="/status")
    assert (r["ok"], r["check"]) == (False, "http"), r
    assert r["reason"] == "http: GET /status: status 503 Service Unavailable"
    assert r["checks"] == ["pid_file", "process", "listen", "connect"]


@pytest.mark.netns
def test_process_name_mismatch(svc: Service) -> None:
    """A process whose comm and exe differ from process_name fails 'process_name'."""
    pid = svc.start("200")
    r = svc.probe(process_name="novell-sslvpn")
    assert (r["ok"], r["check"], r["checks"]) == (False, "process_name",
                                                  ["pid_file", "process"]), r
    assert r["reason"].startswith(f"process_name: PID {pid} is '{COMM}'")


@pytest.mark.netns
def test_pid_reuse_by_a_later_process(svc: Service) -> None:
    """A PID file last written an hour before its process started names a stranger: 'process'."""
    pid = svc.start("200")
    assert svc.probe()["ok"]
    hour_ago = time.time_ns() - 3600 * 1_000_000_000
    os.utime(svc.pid_file, ns=(hour_ago, hour_ago))
    r = svc.probe()
    assert (r["ok"], r["check"]) == (False, "process"), r
    m = re.fullmatch(rf"process: PID {pid} \({COMM}\) started ([0-9.]+) s after the PID file "
                     "was written: a stale PID reused by another process", r["reason"])
    assert m is not None, r["reason"]
    assert 3590 < float(m.group(1)) <= 3600  # the service started a moment before the utime


@pytest.mark.netns
def test_tls_service_passes_tls_and_http(svc: Service) -> None:
    """A TLS service with a self-signed certificate passes the tls and http checks."""
    svc.start("200", tls=True)
    r = svc.probe(tls=True, http_path="/")
    assert r["ok"], r
    assert r["checks"][-3:] == ["connect", "tls", "http"]


@pytest.mark.netns
def test_tls_against_plain_service_fails_tls(svc: Service) -> None:
    """TLS configured but the service speaks plain HTTP: the tls check fails."""
    svc.start("200")
    r = svc.probe(tls=True, http_path="/")
    assert (r["ok"], r["check"]) == (False, "tls"), r
    assert r["reason"].startswith("tls: handshake failed")


@pytest.mark.initns
def test_zombie_fails_process(tmp_path: Path) -> None:
    """An exited child not yet reaped (a zombie) is not the service: 'process' says zombie."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        # Wait for the exit without reaping, so the child stays a zombie.
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
        assert proc_state(child.pid) == "Z"
        pid_file = tmp_path / "svc.pid"
        pid_file.write_text(f"{child.pid}\n")

        async def never(port: int) -> bool:
            raise AssertionError("the probe must stop at the process check")

        prober = Prober(ServiceConfig(pid_file=pid_file), ProbeConfig(), own_pid=os.getpid(),
                        listening=never)
        r = asyncio.run(prober.probe())
        assert (r.ok, r.check, r.pid) == (False, "process", child.pid)
        assert "zombie" in r.reason
    finally:
        child.wait()


@pytest.mark.initns
def test_live_child_then_killed(tmp_path: Path) -> None:
    """The process check follows a real process: alive passes, SIGKILLed and reaped fails."""
    child = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"])
    try:
        pid_file = tmp_path / "svc.pid"
        pid_file.write_text(f"{child.pid}\n")

        async def no(port: int) -> bool:
            return False

        prober = Prober(ServiceConfig(pid_file=pid_file), ProbeConfig(), own_pid=os.getpid(),
                        listening=no)
        r = asyncio.run(prober.probe())
        assert (r.check, r.checks) == ("listen", ("pid_file", "process"))
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        r = asyncio.run(prober.probe())
        assert (r.ok, r.check) == (False, "process")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
