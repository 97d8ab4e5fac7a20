"""The probe's pure parts, and the Prober's early checks against a fake /proc and a fake clock."""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from watcher.config import ProbeConfig, ServiceConfig
from watcher.probe import (
    Prober,
    ProbeResult,
    ProcStat,
    name_matches,
    parse_proc_stat,
    parse_status_line,
    request_target,
    start_realtime_ns,
)

S = 1_000_000_000
ME = os.getpid()


def stat_line(pid: int, comm: str, state: str, start_ticks: int) -> bytes:
    """A /proc/PID/stat line with the given comm, state and start time (other fields zero)."""
    fields = [state] + ["0"] * 18 + [str(start_ticks)] + ["0"] * 30
    return f"{pid} ({comm}) {' '.join(fields)}\n".encode()


def test_parse_proc_stat_of_this_process() -> None:
    """The real /proc/self/stat parses: this process is running with a positive start time."""
    st = parse_proc_stat(Path("/proc/self/stat").read_bytes())
    assert st.state in "RS"
    assert st.start_ticks > 0


def test_parse_proc_stat_comm_with_parens_and_spaces() -> None:
    """A comm containing ') Z 1' cannot fool the parser: fields are split after the last ')'."""
    line = stat_line(42, "evil) Z 1 (x", "S", 12345)
    assert parse_proc_stat(line) == ProcStat(state="S", start_ticks=12345)


@pytest.mark.parametrize("data", [b"", b"42 (x S 1 2", b"42 (x) S 1 2 3\n", b"42 (x) SS" + b" 0" * 30])
def test_parse_proc_stat_rejects_malformed(data: bytes) -> None:
    """Truncated or malformed stat lines raise ValueError."""
    with pytest.raises(ValueError):
        parse_proc_stat(data)


def test_start_realtime_ns() -> None:
    """Start ticks since boot become realtime through the realtime-boottime offset."""
    # booted at realtime 1000 s; now is 1500 s realtime = 500 s boottime; started at 250 s.
    assert start_realtime_ns(25_000, 100, 1500 * S, 500 * S) == 1250 * S
    assert start_realtime_ns(1, 100, 10 * S, 0) == 10 * S + 10_000_000


@pytest.mark.parametrize(
    ("want", "comm", "exe", "ok"),
    [
        ("sslvpnd", "sslvpnd", "/usr/sbin/sslvpnd", True),
        ("sslvpnd", "sslvpnd", None, True),
        ("novell-sslvpn-daemon", "novell-sslvpn-d", None, True),  # comm truncated to 15
        ("novell-sslvpn-d", "novell-sslvpn-d", None, True),
        ("novell-sslvpn-daemon", "novell-sslvpn-x", None, False),
        ("java", "VM Thread", "/usr/lib/jvm/bin/java", True),
        ("java", "VM Thread", "/usr/lib/jvm/bin/java (deleted)", True),
        ("sslvpnd", "python3", "/usr/bin/python3.11", False),
        ("sslvpnd", "python3", None, False),
        ("sbin", "x", "/usr/sbin/sslvpnd", False),  # a directory name is not the exe
    ],
)
def test_name_matches(want: str, comm: str, exe: str | None, ok: bool) -> None:
    """process_name matches comm (also truncated to 15 chars) or the basename of exe."""
    assert name_matches(want, comm, exe) is ok


@pytest.mark.parametrize(
    ("line", "want"),
    [
        (b"HTTP/1.1 200 OK\r\n", (200, "OK")),
        (b"HTTP/1.0 302 Found\n", (302, "Found")),
        (b"HTTP/1.1 204\r\n", (204, "")),
        (b"HTTP/1.1 503 Service Unavailable\r\n", (503, "Service Unavailable")),
        (b"HTTP/1.1 200 \x1b[31mred\r\n", (200, "[31mred")),
    ],
)
def test_parse_status_line(line: bytes, want: tuple[int, str]) -> None:
    """HTTP/1.x status lines give the code and a printable reason phrase."""
    assert parse_status_line(line) == want


@pytest.mark.parametrize("line", [b"", b"SSH-2.0-OpenSSH\r\n", b"HTTP/2 200\r\n",
                                  b"HTTP/1.1 20 OK\r\n", b"HTTP/1.1 200 OK"])
def test_parse_status_line_rejects(line: bytes) -> None:
    """Anything but an HTTP/1.x status line ending in a newline raises ValueError."""
    with pytest.raises(ValueError):
        parse_status_line(line)


@pytest.mark.parametrize(
    ("path", "target"),
    [("/health", "/health"), ("/a?b=c&d=%20", "/a?b=c&d=%20"), ("/caf\u00e9", "/caf%C3%A9"),
     ("/a\tb", "/a%09b")],
)
def test_request_target_is_ascii(path: str, target: str) -> None:
    """The configured path is sent as ASCII: non-ASCII and control bytes are percent-encoded."""
    assert request_target(path) == target


# --- the Prober's first checks, against a fake /proc (the PID is this live test process) -----


class FakeProc:
    """A fake /proc with one PID directory whose stat, comm and exe the test chooses."""

    def __init__(self, root: Path, pid: int) -> None:
        self.root = root
        self.dir = root / str(pid)
        self.dir.mkdir(parents=True)
        self.pid = pid

    def set(self, *, state: str = "S", start_ticks: int = 0, comm: str = "sslvpnd",
            exe: str | None = "/usr/sbin/sslvpnd") -> None:
        (self.dir / "stat").write_bytes(stat_line(self.pid, comm, state, start_ticks))
        (self.dir / "comm").write_text(comm + "\n")
        if (self.dir / "exe").is_symlink():
            (self.dir / "exe").unlink()
        if exe is not None:
            (self.dir / "exe").symlink_to(exe)


def listening_const(value: bool) -> Callable[[int], Awaitable[bool]]:
    """A listening() that answers ``value`` at once."""

    async def listening(port: int) -> bool:
        return value

    return listening


def make_prober(tmp_path: Path, *, pid: int | None = ME, mtime_s: int = 1000,
                listening: Callable[[int], Awaitable[bool]] | None = None,
                process_name: str = "", timeout_ms: int = 1000,
                own_pid: int = -1) -> tuple[Prober, FakeProc]:
    """A Prober whose PID file names ``pid`` (written at realtime ``mtime_s``), booted at 0."""
    pid_file = tmp_path / "svc.pid"
    if pid is not None:
        pid_file.write_text(f"{pid}\n")
        os.utime(pid_file, ns=(mtime_s * S, mtime_s * S))
    proc = FakeProc(tmp_path / "proc", ME)
    proc.set(start_ticks=500 * os.sysconf("SC_CLK_TCK"))  # started at 500 s
    ticks = itertools.count(0, 1_000_000)
    prober = Prober(
        ServiceConfig(pid_file=pid_file, port=8080, process_name=process_name),
        ProbeConfig(timeout_ms=timeout_ms),
        own_pid=own_pid,
        listening=listening or listening_const(False),
        clock=lambda: next(ticks),
        realtime=lambda: 2000 * S,
        boottime=lambda: 2000 * S,  # booted at realtime 0: boottime == realtime
        proc=proc.root,
    )
    return prober, proc


def probe(prober: Prober) -> ProbeResult:
    return asyncio.run(prober.probe())


def test_missing_pid_file_fails_pid_file(tmp_path: Path) -> None:
    """No PID file: the pid_file check fails, nothing passed, no PID, duration from the clock."""
    prober, _ = make_prober(tmp_path, pid=None)
    r = probe(prober)
    assert (r.ok, r.check, r.checks, r.pid) == (False, "pid_file", (), None)
    assert r.reason.startswith("pid_file: ") and "no such file" in r.reason
    assert r.duration_ns == 1_000_000


def test_own_pid_is_refused(tmp_path: Path) -> None:
    """A PID file naming the agent fails pid_file."""
    prober, _ = make_prober(tmp_path, own_pid=ME)
    r = probe(prober)
    assert (r.ok, r.check) == (False, "pid_file")
    assert "own PID" in r.reason


def test_live_process_then_no_listener(tmp_path: Path) -> None:
    """A live process started before the PID file passes; no listener fails 'listen'."""
    prober, _ = make_prober(tmp_path)
    r = probe(prober)
    assert (r.ok, r.check, r.checks, r.pid) == (False, "listen", ("pid_file", "process"), ME)
    assert r.reason == "listen: no TCP listener on port 8080"


def test_zombie_fails_process(tmp_path: Path) -> None:
    """A process in state Z is reported as a zombie by the process check."""
    prober, proc = make_prober(tmp_path)
    proc.set(state="Z", start_ticks=0)
    r = probe(prober)
    assert (r.ok, r.check, r.checks) == (False, "process", ("pid_file",))
    assert "zombie" in r.reason


def test_stranger_started_after_pid_file_fails_process(tmp_path: Path) -> None:
    """A process started 1.5 s after the PID file's mtime is a stranger reusing a stale PID."""
    prober, proc = make_prober(tmp_path, mtime_s=1000)
    proc.set(start_ticks=int(1001.5 * os.sysconf("SC_CLK_TCK")))
    r = probe(prober)
    assert (r.ok, r.check) == (False, "process")
    assert "started 1.5 s after the PID file was written" in r.reason


def test_start_within_tolerance_is_the_service(tmp_path: Path) -> None:
    """A start up to 1 s after the mtime (clock granularity) still counts as the service."""
    prober, proc = make_prober(tmp_path, mtime_s=1000)
    proc.set(start_ticks=1001 * os.sysconf("SC_CLK_TCK"))
    r = probe(prober)
    assert r.checks == ("pid_file", "process")


def test_process_name_mismatch(tmp_path: Path) -> None:
    """A configured process_name that neither comm nor exe matches fails process_name."""
    prober, proc = make_prober(tmp_path, process_name="sslvpnd")
    proc.set(comm="nginx", exe="/usr/sbin/nginx")
    r = probe(prober)
    assert (r.ok, r.check, r.checks) == (False, "process_name", ("pid_file", "process"))
    assert r.reason == f"process_name: PID {ME} is 'nginx' (exe /usr/sbin/nginx), not 'sslvpnd'"


def test_process_name_match_then_listen(tmp_path: Path) -> None:
    """A matching process_name passes and the probe goes on to listen."""
    prober, _ = make_prober(tmp_path, process_name="sslvpnd")
    r = probe(prober)
    assert r.checks == ("pid_file", "process", "process_name")
    assert r.check == "listen"


def test_listening_error_is_a_failed_check(tmp_path: Path) -> None:
    """An exception from the injected listening() is a failed 'listen' check, not a crash."""

    class NetlinkError(Exception):
        pass

    async def broken(port: int) -> bool:
        raise NetlinkError("boom")

    prober, _ = make_prober(tmp_path, listening=broken)
    r = probe(prober)
    assert (r.ok, r.check) == (False, "listen")
    assert "cannot list sockets" in r.reason and "boom" in r.reason


def test_timeout_names_running_check(tmp_path: Path) -> None:
    """A check that never finishes fails within timeout_ms, naming that check."""

    async def hung(port: int) -> bool:
        await asyncio.Event().wait()
        return True

    prober, _ = make_prober(tmp_path, listening=hung, timeout_ms=50)
    r = probe(prober)
    assert (r.ok, r.check, r.checks) == (False, "listen", ("pid_file", "process"))
    assert r.reason == "listen: timed out after 50 ms"


def test_dead_pid_fails_process(tmp_path: Path) -> None:
    """A PID with no process (beyond this system's pid_max) fails the process check."""
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    if pid_max >= 4_194_304:
        pytest.skip("pid_max is the kernel's limit: no PID is certain to be free")
    prober, _ = make_prober(tmp_path, pid=pid_max + 1)
    r = probe(prober)
    assert (r.ok, r.check) == (False, "process")
    assert r.reason == f"process: PID {pid_max + 1} is not running"
