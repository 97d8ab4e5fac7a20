"""A real etcd cluster (Debian's etcd-server 3.4) for tests: each member in its own network namespace.

Topology (every address exists only inside namespaces made here)::

    etcd1 10.210.0.11 ─┐
    etcd2 10.210.0.12 ─┼─ bridge (switch namespace) ─┬─ clients 10.210.0.100 (``call``)
    etcd3 10.210.0.13 ─┘                              └─ attached namespaces 10.210.0.101...

API (stable: the fleet tests build on it; members are numbered from 1, like the testbed's servers)::

    with EtcdCluster(size=3, tls=False) as etcd:   # started and healthy, or raises; always torn down
        etcd.endpoints() -> list[str]      # client URLs, "http://10.210.0.11:2379", ...
        etcd.endpoint(i) -> str            # member i's client URL
        etcd.call(fn, *args, **kw)         # run fn on a thread inside the client namespace
        etcd.submit(fn, *args, **kw)       # the same, returning a Future (for races)
        etcd.client_ns                     # that namespace (tests.netns.Netns), 10.210.0.100
        etcd.attach(ns) -> str             # connect another namespace (e.g. a testbed server) to
                                           # the etcd segment; returns its new address
        etcd.leader(timeout=30) -> int     # the leader every reachable running member agrees on
        etcd.kill(i, sig=SIGKILL)          # signal member i's etcd and wait for its exit
        etcd.start_member(i, wait=True)    # start a stopped member again on its data directory
        etcd.restart(i)                    # stop (SIGTERM) if running, start, wait until healthy
        etcd.partition(i) / etcd.heal(i)   # DROP every packet in or out of member i, inside its
                                           # own namespace (never the initial one) / undo it
        etcd.stop_all() / etcd.start_all() # every member down (SIGTERM) / up again and healthy
        etcd.wait_healthy(timeout=60) -> int   # every running, reachable member agrees on a
                                           # leader and answers a linearizable read; the leader
        etcd.restore()                     # heal all, start all stopped members, wait healthy
        etcd.status(i) -> dict | None      # member i's /v3/maintenance/status, asked inside
                                           # its own namespace (works while it is partitioned)
        etcd.running(i) -> bool, etcd.partitioned(i) -> bool
        etcd.member(i) -> Member           # name, ns, addr, data_dir, log, proc
        etcd.tls                           # TLS mode: ca_file, cert_file, key_file for clients
        etcd.ca_file, etcd.cert_file, etcd.key_file   # the same (None without TLS)
        etcd.issue_client_cert(cn) -> (cert, key)     # another client certificate from the CA

Fixtures (tests/conftest.py): ``etcd`` and ``etcd_tls`` hand a test the session's shared cluster,
healthy, and put it back healthy afterwards (``restore()``), whatever the test killed or cut;
``etcd_prefix`` is a key prefix of the test's own. A testbed cluster whose agents use etcd:
``Cluster(4, etcd=etcd, ...)`` attaches every server namespace before its agent starts.

In TLS mode the test makes a CA with openssl; members serve clients and peers over https and
demand a client certificate from that CA (``--client-cert-auth``, ``--trusted-ca-file``).

Start-up is made for a busy 2-core machine: data directories on tmpfs when there is one,
heartbeat 200 ms and election timeout 2 s (etcd's defaults are 100 ms / 1 s), deadlines of
tens of seconds. etcd raises every lease's TTL to at least 1.5 election timeouts (3 s with these
settings, 2 s with etcd's defaults) and says so only in the grant's answer: a test that wants
short leases asks for 3 s or more, or reads the granted TTL. Everything is torn down by
``close()`` (also at exit), even after a failed start: each member is killed by its PID, then
every namespace is deleted.
"""

from __future__ import annotations

import atexit
import base64
import concurrent.futures
import contextlib
import http.client
import json
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.netns import Lan, Netns, NetnsExecutor, wait_for
from tests.testbed.cluster import socket_in

__all__ = [
    "CLIENT_HOST",
    "ETCD",
    "EtcdCluster",
    "Member",
    "TlsFiles",
    "issue_cert",
    "make_ca",
]

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
SUBNET = "10.210.0"
MEMBER_HOST0 = 10  # member i has host number 10 + i
CLIENT_HOST = 100  # the client namespace
ATTACH_FIRST = 101  # namespaces attached with attach()
CLIENT_PORT, PEER_PORT = 2379, 2380
API = "/v3/"  # etcd 3.4's JSON gateway (v3alpha is gone, v3beta deprecated)


@dataclass(frozen=True)
class TlsFiles:
    """PEM files a client needs: the CA to trust and its own certificate and key."""

    ca_file: str
    cert_file: str
    key_file: str


def _openssl(argv: Sequence[str], cwd: Path) -> None:
    proc = subprocess.run(["openssl", *argv], cwd=cwd, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(argv[:2])} failed: {proc.stderr.strip()}")


def make_ca(directory: Path, name: str = "ca", cn: str = "sslvpn-heartbeat test CA") -> tuple[Path, Path]:
    """A fresh self-signed CA (P-256, valid two days) in ``directory``; returns (cert, key)."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    _openssl(["req", "-x509", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
              "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={cn}",
              "-addext", "basicConstraints=critical,CA:TRUE",
              "-addext", "keyUsage=critical,keyCertSign,cRLSign"], directory)
    return cert, key


def issue_cert(directory: Path, ca: tuple[Path, Path], name: str, cn: str, *,
               ips: Sequence[str] = (), server: bool = False) -> tuple[Path, Path]:
    """A certificate signed by ``ca`` for ``cn`` (client auth; also server auth with IP SANs
    ``ips`` when ``server``); returns (cert, key)."""
    cert, key, csr = (directory / f"{name}.crt", directory / f"{name}.key",
                      directory / f"{name}.csr")
    ext = directory / f"{name}.ext"
    lines = ["[v3]", "basicConstraints=critical,CA:FALSE",
             "keyUsage=critical,digitalSignature,keyEncipherment",
             f"extendedKeyUsage={'serverAuth,clientAuth' if server else 'clientAuth'}"]
    if ips:
        lines.append("subjectAltName=" + ",".join(f"IP:{ip}" for ip in ips))
    ext.write_text("\n".join(lines) + "\n")
    _openssl(["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
              "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={cn}"], directory)
    _openssl(["x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
              "-set_serial", str(secrets.randbits(63)), "-days", "2", "-out", str(cert),
              "-extfile", str(ext), "-extensions", "v3"], directory)
    return cert, key


@dataclass
class Member:
    """One etcd member: its namespace, address, data directory, log file and process."""

    index: int
    name: str
    ns: Netns
    addr: str
    data_dir: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    partitioned: bool = False
    member_id: str | None = None  # etcd's member ID (decimal string, as the JSON gateway gives it)
    starts: int = field(default=0)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


class EtcdCluster:
    """``size`` etcd members in their own namespaces on one bridge, plus a client namespace.

    Use as a context manager (or call ``start()`` and ``close()``); ``close()`` runs at exit too.
    """

    def __init__(self, size: int = 3, *, tls: bool = False, workdir: Path | None = None,
                 heartbeat_ms: int = 200, election_ms: int = 2000,
                 start_timeout: float = 60.0, extra_args: Sequence[str] = ()) -> None:
        if not 1 <= size <= 9:
            raise ValueError("size must be between 1 and 9")
        self.size = size
        self.tls_mode = tls
        self.heartbeat_ms = heartbeat_ms
        self.election_ms = election_ms
        self.start_timeout = start_timeout
        self.extra_args = list(extra_args)
        self.scheme = "https" if tls else "http"
        self._own_workdir = workdir is None
        # tmpfs when there is one: etcd fsyncs its WAL on every write, which a busy disk delays
        # past the election timeout.
        shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="svh-etcd-", dir=shm))
        self.token = f"svh-{secrets.token_hex(4)}"
        self.members: list[Member] = []
        self.lan: Lan | None = None
        self.client_ns: Netns | None = None
        self._executor: NetnsExecutor | None = None
        self.tls: TlsFiles | None = None
        self._ca: tuple[Path, Path] | None = None
        self._harness_ctx: ssl.SSLContext | None = None
        self._closed = False

    # --- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> EtcdCluster:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Make the segment, the members' namespaces (and certificates), start every member and
        wait until the cluster has a leader and serves linearizable reads."""
        atexit.register(self.close)
        self.lan = Lan(SUBNET, prefix="sve")
        for i in range(1, self.size + 1):
            ns = Netns(f"sve{i}")
            try:
                addr = self.lan.attach(ns, MEMBER_HOST0 + i)
            except BaseException:
                ns.close()
                raise
            d = self.workdir / f"etcd{i}"
            d.mkdir(parents=True, exist_ok=True)
            self.members.append(Member(i, f"etcd{i}", ns, addr, d / "data", d / "etcd.log"))
        self.client_ns = Netns("svec")
        self.lan.attach(self.client_ns, CLIENT_HOST)
        self._executor = NetnsExecutor(self.client_ns.name)
        if self.tls_mode:
            self._make_pki()
        for m in self.members:
            self.start_member(m.index, wait=False)
        self.wait_healthy(self.start_timeout)

    def _make_pki(self) -> None:
        pki = self.workdir / "pki"
        self._ca = make_ca(pki)
        ips = ["127.0.0.1", *(m.addr for m in self.members)]
        issue_cert(pki, self._ca, "member", "etcd-member", ips=ips, server=True)
        cert, key = issue_cert(pki, self._ca, "client", "fleet-agent")
        self.tls = TlsFiles(str(self._ca[0]), str(cert), str(key))
        hcert, hkey = issue_cert(pki, self._ca, "harness", "etcd-harness")
        ctx = ssl.create_default_context(cafile=str(self._ca[0]))
        ctx.load_cert_chain(str(hcert), str(hkey))
        self._harness_ctx = ctx

    def close(self) -> None:
        """Kill every member by its PID, delete every namespace made here; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._executor is not None:
                with contextlib.suppress(Exception):
                    self._executor.close()
            for m in self.members:
                if m.proc is not None and m.proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(m.proc.pid, signal.SIGKILL)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        m.proc.wait(10)
            for ns in [m.ns for m in self.members] + ([self.client_ns] if self.client_ns else []):
                with contextlib.suppress(Exception):
                    ns.close()
            if self.lan is not None:
                with contextlib.suppress(Exception):
                    self.lan.close()
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
        finally:
            with contextlib.suppress(Exception):
                atexit.unregister(self.close)

    # --- addresses and clients ------------------------------------------------------------

    @property
    def ca_file(self) -> str | None:
        """The CA clients trust (TLS mode), else None."""
        return self.tls.ca_file if self.tls else None

    @property
    def cert_file(self) -> str | None:
        """The client certificate (TLS mode), else None."""
        return self.tls.cert_file if self.tls else None

    @property
    def key_file(self) -> str | None:
        """The client certificate's key (TLS mode), else None."""
        return self.tls.key_file if self.tls else None

    def issue_client_cert(self, cn: str) -> tuple[str, str]:
        """Another client certificate signed by the cluster's CA (TLS mode); returns (cert, key)."""
        if self._ca is None:
            raise RuntimeError("the cluster was started without tls=True")
        cert, key = issue_cert(self.workdir / "pki", self._ca, f"client-{cn}", cn)
        return str(cert), str(key)

    def member(self, i: int) -> Member:
        """Member ``i``, counted from 1."""
        if not 1 <= i <= len(self.members):
            raise IndexError(f"no etcd member {i} (have 1..{len(self.members)})")
        return self.members[i - 1]

    def endpoint(self, i: int) -> str:
        """Member ``i``'s client URL."""
        return f"{self.scheme}://{self.member(i).addr}:{CLIENT_PORT}"

    def endpoints(self) -> list[str]:
        """Every member's client URL, in member order."""
        return [self.endpoint(m.index) for m in self.members]

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float = 120.0, **kw: Any) -> Any:
        """Run ``fn(*args, **kw)`` on a thread inside the client namespace; return its result."""
        assert self._executor is not None, "cluster not started"
        return self._executor.call(fn, *args, timeout=timeout, **kw)

    def submit(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> concurrent.futures.Future[Any]:
        """Start ``fn(*args, **kw)`` on a thread inside the client namespace; returns its future."""
        assert self._executor is not None, "cluster not started"
        return self._executor.submit(fn, *args, **kw)

    def attach(self, ns: Netns, ifname: str = "etcd0") -> str:
        """Connect namespace ``ns`` to the members' segment; returns the address it got there."""
        assert self.lan is not None, "cluster not started"
        return self.lan.attach(ns, self.lan.free_host(ATTACH_FIRST), ifname)

    # --- members --------------------------------------------------------------------------

    def _argv(self, m: Member) -> list[str]:
        s = self.scheme
        cluster = ",".join(f"{o.name}={s}://{o.addr}:{PEER_PORT}" for o in self.members)
        argv = [ETCD, "--name", m.name, "--data-dir", str(m.data_dir),
                "--listen-peer-urls", f"{s}://{m.addr}:{PEER_PORT}",
                "--initial-advertise-peer-urls", f"{s}://{m.addr}:{PEER_PORT}",
                # 127.0.0.1 too: the harness asks each member inside its own namespace, which
                # keeps working while the member is partitioned.
                "--listen-client-urls", f"{s}://{m.addr}:{CLIENT_PORT},{s}://127.0.0.1:{CLIENT_PORT}",
                "--advertise-client-urls", f"{s}://{m.addr}:{CLIENT_PORT}",
                "--initial-cluster", cluster,
                "--initial-cluster-token", self.token,
                "--initial-cluster-state", "new",
                "--heartbeat-interval", str(self.heartbeat_ms),
                "--election-timeout", str(self.election_ms),
                "--logger", "zap", "--log-outputs", "stderr"]
        if self.tls_mode:
            pki = self.workdir / "pki"
            assert self._ca is not None
            for prefix in ("", "peer-"):
                argv += [f"--{prefix}cert-file", str(pki / "member.crt"),
                         f"--{prefix}key-file", str(pki / "member.key"),
                         f"--{prefix}client-cert-auth",
                         f"--{prefix}trusted-ca-file", str(self._ca[0])]
        return argv + self.extra_args

    def start_member(self, i: int, wait: bool = True, timeout: float | None = None) -> None:
        """Start member ``i``'s etcd on its data directory (a no-op if it runs); with ``wait``,
        return once the cluster is healthy again."""
        m = self.member(i)
        if self.running(i):
            return
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        with open(m.log, "ab") as log:
            log.write(f"--- start {m.starts + 1} at {time.time():.3f}\n".encode())
            log.flush()
            m.proc = m.ns.popen(self._argv(m), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env=env, cwd=str(m.data_dir.parent))
        m.starts += 1
        if wait:
            self.wait_healthy(timeout or self.start_timeout)

    def running(self, i: int) -> bool:
        """True while member ``i``'s etcd process lives."""
        proc = self.member(i).proc
        return proc is not None and proc.poll() is None

    def partitioned(self, i: int) -> bool:
        """True while member ``i`` is cut off by ``partition(i)``."""
        return self.member(i).partitioned

    def kill(self, i: int, sig: int = signal.SIGKILL, timeout: float = 30.0) -> None:
        """Send ``sig`` to member ``i``'s etcd (by its PID) and wait until it has exited."""
        m = self.member(i)
        if m.proc is None or m.proc.poll() is not None:
            raise RuntimeError(f"{m.name} is not running")
        os.kill(m.proc.pid, sig)
        m.proc.wait(timeout)

    def restart(self, i: int, timeout: float | None = None) -> None:
        """Stop member ``i`` (SIGTERM) if it runs, start it again and wait until all are healthy."""
        if self.running(i):
            self.kill(i, signal.SIGTERM)
        self.start_member(i, wait=True, timeout=timeout)

    def stop_all(self, sig: int = signal.SIGTERM) -> None:
        """Stop every running member with ``sig`` and wait for each to exit."""
        for m in self.members:
            if self.running(m.index):
                assert m.proc is not None
                os.kill(m.proc.pid, sig)
        for m in self.members:
            if m.proc is not None:
                m.proc.wait(30)

    def start_all(self, timeout: float | None = None) -> None:
        """Start every stopped member and wait until the cluster is healthy."""
        for m in self.members:
            self.start_member(m.index, wait=False)
        self.wait_healthy(timeout or self.start_timeout)

    _DROP = (["INPUT", "!", "-i", "lo", "-j", "DROP"], ["OUTPUT", "!", "-o", "lo", "-j", "DROP"])

    def partition(self, i: int) -> None:
        """Cut member ``i`` off: its own namespace drops every packet not on loopback.

        Packets vanish (no refusal), as behind a failed switch: clients and peers time out.
        """
        m = self.member(i)
        if m.partitioned:
            return
        for rule in self._DROP:
            m.ns.run(["iptables", "-w", "-I", rule[0], "1", *rule[1:]])
        m.partitioned = True

    def heal(self, i: int) -> None:
        """Undo ``partition(i)`` (removes exactly the rules it added)."""
        m = self.member(i)
        if not m.partitioned:
            return
        for rule in self._DROP:
            m.ns.run(["iptables", "-w", "-D", *rule])
        m.partitioned = False

    def restore(self, timeout: float | None = None) -> int:
        """Put the cluster back: heal every partition, start every stopped member, wait until
        healthy; returns the leader."""
        for m in self.members:
            self.heal(m.index)
            self.start_member(m.index, wait=False)
        return self.wait_healthy(timeout or self.start_timeout)

    # --- asking the members ---------------------------------------------------------------

    def gateway(self, i: int, path: str, body: dict[str, Any], timeout: float = 3.0) -> dict[str, Any] | None:
        """POST ``body`` to member ``i``'s JSON gateway (``/v3/PATH``) from inside its own
        namespace; the decoded answer, or None when it does not answer 200 in time."""
        m = self.member(i)
        ns_name = m.ns.name
        ctx = self._harness_ctx

        class _Conn(http.client.HTTPConnection):
            def connect(self) -> None:
                s = socket_in(ns_name)
                s.settimeout(timeout)
                try:
                    s.connect((self.host, self.port))
                    if ctx is not None:
                        s = ctx.wrap_socket(s, server_hostname=self.host)
                except BaseException:
                    s.close()
                    raise
                self.sock = s

        conn = _Conn("127.0.0.1", CLIENT_PORT, timeout=timeout)
        try:
            conn.request("POST", API + path.lstrip("/"), body=json.dumps(body),
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
            if resp.status != 200:
                return None
            answer: dict[str, Any] = json.loads(data)
            return answer
        except (OSError, http.client.HTTPException, ValueError):
            return None
        finally:
            conn.close()

    def status(self, i: int, timeout: float = 3.0) -> dict[str, Any] | None:
        """Member ``i``'s ``maintenance/status`` answer, or None (not running, not answering)."""
        if not self.running(i):
            return None
        return self.gateway(i, "maintenance/status", {}, timeout)

    def _reachable(self) -> list[Member]:
        return [m for m in self.members if self.running(m.index) and not m.partitioned]

    def _agreed_leader(self, read: bool) -> int | None:
        """The leader every running, reachable member names (and, with ``read``, each of them
        answered a linearizable read), or None."""
        live = self._reachable()
        if not live:
            return None
        leaders = set()
        for m in live:
            st = self.status(m.index)
            if st is None:
                return None
            m.member_id = str(st["header"]["member_id"])
            leaders.add(str(st.get("leader", "0")))
        if len(leaders) != 1:
            return None
        (leader_id,) = leaders
        idx = next((m.index for m in live if m.member_id == leader_id), None)
        if idx is None:
            return None
        if read:
            for m in live:
                if self.gateway(m.index, "kv/range", {"key": _b64("svh-health")}, 5.0) is None:
                    return None
        return idx

    def wait_healthy(self, timeout: float = 60.0) -> int:
        """Wait until every running, reachable member agrees on one leader among them and serves
        a linearizable read; returns the leader's index. Raises AssertionError naming the
        members' exits and last log lines after ``timeout``, or at once when none runs."""
        def healthy() -> int | None:
            if not any(self.running(m.index) for m in self.members):
                raise AssertionError("no etcd member is running")
            return self._agreed_leader(read=True)

        try:
            return int(wait_for(healthy, timeout, "the etcd cluster to be healthy", interval=0.1))
        except AssertionError as e:
            died = [f"{m.name} exited {m.proc.returncode}" for m in self.members
                    if m.proc is not None and m.proc.poll() is not None]
            raise AssertionError(f"{e} ({'; '.join(died) or 'all running'})\n{self.log_tail()}") from None

    def leader(self, timeout: float = 30.0) -> int:
        """The leader's index, once every running, reachable member names the same one."""
        return int(wait_for(lambda: self._agreed_leader(read=False), timeout,
                            "the etcd members to agree on a leader", interval=0.05))

    def log_tail(self, lines: int = 8) -> str:
        """Each member's log since its last start: the first few lines (where etcd names a bad
        flag before its usage text) and the last ``lines``, for failure messages."""
        out = []
        for m in self.members:
            with contextlib.suppress(OSError):
                text = m.log.read_text(errors="replace").splitlines()
                starts = [k for k, ln in enumerate(text) if ln.startswith("--- start ")]
                run = text[starts[-1] + 1:] if starts else text
                shown = run if len(run) <= lines + 4 else [*run[:4], "...", *run[-lines:]]
                out.append(f"== {m.name}\n" + "\n".join(shown))
        return "\n".join(out)
