"""The verification probe: is the service really there and answering?

Checks run in order and stop at the first failure; the result names the failing check (or the
last one passed) and is a value, never an exception:

``pid_file``     the PID file reads and parses (watcher.pidfile)
``process``      the PID is alive (pidfd), not a zombie, and not a stranger that reused a
                 stale PID (it started after the PID file was last written)
``process_name`` if configured, /proc/PID/comm or the basename of /proc/PID/exe matches
``listen``       a TCP LISTEN socket exists on the port (the injected ``listening`` function)
``connect``      a TCP connect to 127.0.0.1 (or ::1 when IPv4 is refused) succeeds
``tls``          if configured, a TLS handshake completes
``http``         if configured, ``GET http_path`` answers with a 2xx or 3xx status

The whole probe runs within ``probe.timeout_ms``; a timeout fails naming the running check.

On PID reuse: a process's start time is in /proc/PID/stat (field 22, clock ticks since boot,
CLOCK_BOOTTIME) and the PID file's mtime is CLOCK_REALTIME. The start time is converted to
realtime with the offset between the two clocks sampled now. The genuine service was started
before it (or its parent) wrote its PID into the file, so a start later than the write means a
stranger got a stale PID. Allowed slack (``start_tolerance_ns``, 1 s by default) covers:
the tick truncation of the start time (<= 10 ms, and in the safe direction), the coarse clock
filesystems stamp mtimes with (may lag real time by one jiffy, <= 10 ms), and a small realtime
step (such as a leap second) between the write and now. NTP slewing moves both clocks alike and
does not matter; a realtime *step forward* larger than the slack after the file was written
(an RTC far off at boot, corrected later) would make the genuine service look like a stranger
until it rewrites the file, and a step backward only hides strangers. The daemon's pidfd and
proc connector sources catch a PID's death directly; this check is the defence for a stale
file found at start-up.
"""

from __future__ import annotations

import asyncio
import os
import re
import select
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from watcher.config import ProbeConfig, ServiceConfig
from watcher.pidfile import PidFileError, read_pid_file

__all__ = [
    "CHECKS",
    "ProbeResult",
    "Prober",
    "ProcStat",
    "name_matches",
    "parse_proc_stat",
    "parse_status_line",
    "request_target",
    "start_realtime_ns",
]

CHECKS = ("pid_file", "process", "process_name", "listen", "connect", "tls", "http")
TASK_COMM_LEN = 15  # the kernel keeps at most 15 characters of a process name in comm
MAX_STATUS_LINE = 1024
_CLOSE_WAIT_S = 0.05
_STATUS_RE = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?: ([^\r\n]*))?\r?\n")


@dataclass(frozen=True)
class ProbeResult:
    """One probe's verdict: ``check`` failed (or was the last passed); ``checks`` passed."""

    ok: bool
    check: str
    reason: str
    pid: int | None
    duration_ns: int
    checks: tuple[str, ...]
    proves_death: bool = False  # the process the PID file names is gone (or a zombie)


@dataclass(frozen=True)
class ProcStat:
    """The fields of /proc/PID/stat the probe uses: state letter and start time in ticks."""

    state: str
    start_ticks: int


def parse_proc_stat(data: bytes) -> ProcStat:
    """The state (field 3) and start time (field 22) of a /proc/PID/stat line; else ValueError."""
    # comm (field 2) is in parentheses and may itself contain spaces and ')': split after the last.
    close = data.rfind(b")")
    if close < 0:
        raise ValueError("no ')' after the process name")
    fields = data[close + 1 :].split()
    # fields[0] is field 3 (state), so field 22 (starttime) is fields[19].
    if len(fields) < 20:
        raise ValueError(f"only {len(fields) + 2} fields")
    state = fields[0].decode("ascii", "replace")
    if len(state) != 1:
        raise ValueError(f"bad state {state!r}")
    return ProcStat(state=state, start_ticks=int(fields[19]))


def start_realtime_ns(start_ticks: int, clk_tck: int, realtime_ns: int, boottime_ns: int) -> int:
    """A process start time on CLOCK_REALTIME, given both clocks read at (about) the same time."""
    return realtime_ns - boottime_ns + start_ticks * 1_000_000_000 // clk_tck


def name_matches(want: str, comm: str, exe: str | None) -> bool:
    """True if ``want`` is the process's comm (maybe truncated by the kernel) or exe basename."""
    if comm == want or (len(want) > TASK_COMM_LEN and comm == want[:TASK_COMM_LEN]):
        return True
    if exe is None:
        return False
    exe = exe.removesuffix(" (deleted)")
    return os.path.basename(exe) == want


def request_target(path: str) -> str:
    """``path`` as an ASCII request target: non-ASCII, control and space bytes percent-encoded."""
    return "".join(chr(b) if 0x20 < b < 0x7F else f"%{b:02X}" for b in path.encode("utf-8"))


def parse_status_line(line: bytes) -> tuple[int, str]:
    """The status code and reason phrase of an HTTP/1.x status line; else ValueError."""
    m = _STATUS_RE.fullmatch(line)
    if m is None:
        raise ValueError(f"not an HTTP status line: {line[:60]!r}")
    phrase = (m.group(2) or b"").decode("latin-1")
    return int(m.group(1)), "".join(c for c in phrase if c.isprintable())[:60]


class _Run:
    """Progress of one probe: the running check, the checks passed, the PID, the connection."""

    def __init__(self) -> None:
        self.current = "pid_file"
        self.passed: list[str] = []
        self.pid: int | None = None
        self.writer: asyncio.StreamWriter | None = None

    def enter(self, check: str) -> None:
        self.current = check

    def done(self) -> None:
        self.passed.append(self.current)


@dataclass(frozen=True)
class _Proc:
    """What the process check learned, for the process_name check."""

    comm: str
    exe: str | None


class _Fail(Exception):
    """Internal: ``check`` failed for ``detail``; turned into a ProbeResult in probe()."""

    def __init__(self, check: str, detail: str, *, death: bool = False) -> None:
        super().__init__(f"{check}: {detail}")
        self.check = check
        self.detail = detail
        self.death = death


def _boottime_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


class Prober:
    """Runs the verification probe of one service; ``probe()`` never raises for ill health."""

    def __init__(
        self,
        service: ServiceConfig,
        probe: ProbeConfig,
        own_pid: int,
        listening: Callable[[int], Awaitable[bool]],
        clock: Callable[[], int] = time.monotonic_ns,
        *,
        realtime: Callable[[], int] = time.time_ns,
        boottime: Callable[[], int] = _boottime_ns,
        proc: Path = Path("/proc"),
        start_tolerance_ns: int = 1_000_000_000,
    ) -> None:
        self.service = service
        self.config = probe
        self._own_pid = own_pid
        self._listening = listening
        self._clock = clock
        self._realtime = realtime
        self._boottime = boottime
        self._proc = proc
        self._tolerance_ns = start_tolerance_ns
        self._clk_tck = os.sysconf("SC_CLK_TCK")

    async def probe(self) -> ProbeResult:
        """Run the checks in order within probe.timeout_ms; the verdict names the deciding check."""
        start = self._clock()
        run = _Run()
        death = False
        try:
            async with asyncio.timeout(self.config.timeout_ms / 1000) as deadline:
                try:
                    ok, reason = True, await self._run(run)
                except _Fail as f:
                    ok, reason, death = False, str(f), f.death
        except TimeoutError:
            if not deadline.expired():
                raise
            ok, reason = False, f"{run.current}: timed out after {self.config.timeout_ms} ms"
        finally:
            if run.writer is not None:
                await _close(run.writer)
        return ProbeResult(
            ok=ok,
            check=run.current,
            reason=reason,
            pid=run.pid,
            duration_ns=self._clock() - start,
            checks=tuple(run.passed),
            proves_death=death,
        )

    async def _run(self, run: _Run) -> str:
        """All checks in order; returns the reason of the last pass, or raises _Fail."""
        try:
            info = read_pid_file(self.service.pid_file, own_pid=self._own_pid)
        except PidFileError as exc:
            raise _Fail("pid_file", exc.reason) from None
        run.pid = info.pid
        run.done()

        run.enter("process")
        proc = self._check_process(info.pid, info.mtime_ns)
        run.done()

        want = self.service.process_name
        if want:
            run.enter("process_name")
            if not name_matches(want, proc.comm, proc.exe):
                raise _Fail("process_name", f"PID {info.pid} is {proc.comm!r} "
                            f"(exe {proc.exe or 'unknown'}), not {want!r}")
            run.done()

        port = self.service.port
        run.enter("listen")
        try:
            present = await self._listening(port)
        except Exception as exc:  # an injected lookup failing (e.g. NetlinkError) fails the check
            raise _Fail("listen", f"cannot list sockets: {exc!r}") from None
        if not present:
            raise _Fail("listen", f"no TCP listener on port {port}")
        run.done()

        run.enter("connect")
        reader, run.writer, addr = await self._connect(port)
        run.done()
        last = f"connect: connected to {addr}"
        if self.config.tls:
            run.enter("tls")
            await self._tls(run.writer)
            run.done()
            last = "tls: handshake completed"
        if self.config.http_path:
            run.enter("http")
            last = await self._http(reader, run.writer)
            run.done()
        return last

    def _check_process(self, pid: int, mtime_ns: int) -> _Proc:
        """Alive, not a zombie, not a stranger; also reads comm and exe while the pidfd is held."""
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            raise _Fail("process", f"PID {pid} is not running", death=True) from None
        except OSError as exc:
            raise _Fail("process", f"PID {pid}: pidfd_open: {exc.strerror}") from None
        try:
            base = self._proc / str(pid)
            try:
                st = parse_proc_stat((base / "stat").read_bytes())
                comm = (base / "comm").read_bytes().decode("utf-8", "replace").rstrip("\n")
            except FileNotFoundError:
                raise _Fail("process", f"PID {pid} is not running", death=True) from None
            except (OSError, ValueError) as exc:
                raise _Fail("process", f"PID {pid}: cannot read /proc: {exc}") from None
            try:
                exe: str | None = os.readlink(base / "exe")
            except OSError:
                exe = None  # kernel thread, exited, or not allowed: comm still decides
            if st.state in ("Z", "X"):
                raise _Fail("process", f"PID {pid} is a zombie (exited, not yet reaped)",
                            death=True)
            started = start_realtime_ns(st.start_ticks, self._clk_tck, self._realtime(),
                                        self._boottime())
            late = started - mtime_ns
            if late > self._tolerance_ns:
                raise _Fail("process", f"PID {pid} ({comm}) started {late / 1e9:.1f} s after "
                            "the PID file was written: a stale PID reused by another process")
            # Readable pidfd: the process exited while we looked, so /proc may show another one.
            if select.select([pidfd], [], [], 0)[0]:
                raise _Fail("process", f"PID {pid} exited during the probe", death=True)
            return _Proc(comm=comm, exe=exe)
        finally:
            os.close(pidfd)

    async def _connect(
        self, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
        """A TCP connection to the loopback port: 127.0.0.1 first, ::1 if IPv4 is refused."""
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port, limit=MAX_STATUS_LINE)
            return r, w, f"127.0.0.1:{port}"
        except ConnectionRefusedError:
            pass
        except OSError as exc:
            raise _Fail("connect", f"127.0.0.1:{port}: {exc.strerror or exc}") from None
        try:
            r, w = await asyncio.open_connection("::1", port, limit=MAX_STATUS_LINE)
            return r, w, f"[::1]:{port}"
        except ConnectionRefusedError:
            raise _Fail("connect", f"refused on 127.0.0.1:{port} and [::1]:{port}") from None
        except OSError:
            # No ::1 (IPv6 disabled): the IPv4 refusal is the answer.
            raise _Fail("connect", f"refused on 127.0.0.1:{port}") from None

    async def _tls(self, writer: asyncio.StreamWriter) -> None:
        """A TLS handshake on the open connection."""
        # The peer is our own local service reached over loopback: what is checked is that it
        # completes a handshake, not who it is, so the certificate is not verified.
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        try:
            await writer.start_tls(ctx, server_hostname="localhost")
        except (OSError, EOFError) as exc:  # ssl.SSLError is an OSError
            raise _Fail("tls", f"handshake failed: {exc}") from None

    async def _http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str:
        """GET http_path; a 2xx or 3xx status passes. Returns the reason of a pass."""
        path = self.config.http_path
        request = (f"GET {request_target(path)} HTTP/1.1\r\nHost: localhost\r\n"
                   "Connection: close\r\nUser-Agent: sslvpn-heartbeat\r\n\r\n")
        try:
            writer.write(request.encode("ascii"))
            await writer.drain()
            line = await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError:
            raise _Fail("http", f"status line longer than {MAX_STATUS_LINE} bytes") from None
        except asyncio.IncompleteReadError:
            raise _Fail("http", "connection closed before a status line") from None
        except OSError as exc:
            raise _Fail("http", f"{exc.strerror or exc}") from None
        try:
            status, phrase = parse_status_line(line)
        except ValueError as exc:
            raise _Fail("http", str(exc)) from None
        text = f"GET {path}: status {status}" + (f" {phrase}" if phrase else "")
        if not 200 <= status < 400:
            raise _Fail("http", text)
        return f"http: {text}"


async def _close(writer: asyncio.StreamWriter) -> None:
    """Close a connection without letting a slow peer hold the probe."""
    writer.close()
    try:
        # Shielded from the probe's own deadline by a short bound of its own.
        async with asyncio.timeout(_CLOSE_WAIT_S):
            await writer.wait_closed()
    except (TimeoutError, OSError):
        writer.transport.abort()
    except asyncio.CancelledError:
        writer.transport.abort()
        raise
