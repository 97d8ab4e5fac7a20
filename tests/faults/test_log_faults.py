"""Logging that can never stop a failover: stalled stdout, full disk, syslog socket gone.

Cases: the agent's stdout and stderr on a pipe that nobody reads (a stalled journald) for 60
failovers, then a stop while it still stalls; ``log.file`` on /dev/full, in a missing directory
and on a small tmpfs that fills up; the syslog socket absent, then back; stdout full or broken
while ``log.file`` works. What is asserted first is the firewall read back from the kernel;
then that what does get written is one JSON object per line, with the losses counted.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.agent import child_env
from tests.ecs import check_event
from tests.faults.bed import Bed
from tests.netns import REPO, Netns, wait_for

pytestmark = pytest.mark.netns

NS = "sslvpn_heartbeat."
FAILOVERS = 60
PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}


def _start(bed: Bed, stdout: int, stderr: int, **env: str) -> subprocess.Popen[bytes]:
    """The agent on the bed's config with the given descriptors as stdout and stderr."""
    return bed.ns.popen([sys.executable, "-m", "watcher", "run", "--config", str(bed.cfg)],
                        cwd=str(REPO), env=child_env(**env), stdin=subprocess.DEVNULL,
                        stdout=stdout, stderr=stderr)


def _failover(bed: Bed, proc: subprocess.Popen[bytes]) -> None:
    """Kill the core: blocked within 3 s; restart it: open again within 5 s (kernel view)."""
    bed.svc.ctl("kill-core")
    bed.wait_both("blocked", 3.0)
    bed.svc.ctl("start")
    bed.wait_both("open", 5.0)
    assert proc.poll() is None, f"the agent exited with {proc.returncode}"


def _stalled_pipe() -> tuple[int, int]:
    """A pipe of one page (the kernel's minimum) that nobody reads until the test says so."""
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)
    return r, w


def _journal_lines(raw: bytes) -> list[dict[str, Any]]:
    """Lines as journald's stdout stream reads them: ``<N>`` then one JSON object; N must be
    the priority of the line's log.level."""
    out = []
    for line in raw.decode().splitlines():
        assert line.startswith("<") and ">" in line[:3], line
        prio, obj = int(line[1]), json.loads(line[3:])
        assert prio == PRIORITY[obj["log.level"]], line
        check_event(obj)
        out.append(obj)
    return out


def test_stdout_and_stderr_on_a_pipe_nobody_reads_never_stop_a_failover(
        netns: Netns, tmp_path: Path) -> None:
    """With stdout and stderr on one full pipe that nobody reads (journald's stream, named by
    JOURNAL_STREAM), 60 failovers still block within 3 s and open within 5 s; once the pipe is
    read, every event comes out with its journald priority, none lost silently."""
    bed = Bed(netns, tmp_path, probe={"rise_interval_ms": 50})
    r, w = _stalled_pipe()
    st = os.fstat(w)
    try:
        proc = _start(bed, w, w, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
    finally:
        os.close(w)
    try:
        bed.wait_both("open", 10.0)
        for _ in range(FAILOVERS):
            _failover(bed, proc)
        chunks: list[bytes] = []
        reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: os.read(r, 65536), b"")))
        reader.start()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        reader.join(10)
    finally:
        os.close(r)
    events = _journal_lines(b"".join(chunks))
    actions = [e["event.action"] for e in events if "event.action" in e]
    dropped = sum(e[NS + "dropped"] for e in events if e.get("event.action") == "log-dropped")
    blocks = actions.count("firewall-block")
    print(f"\n{FAILOVERS} failovers with stdout stalled: {len(events)} lines read afterwards, "
          f"{blocks} firewall-block, {dropped} lines dropped")
    assert blocks + dropped >= FAILOVERS and actions.count("firewall-unblock") + dropped > FAILOVERS
    assert actions[-1] == "agent-stop"


def test_a_stop_while_stdout_stalls_ends_within_the_bound(netns: Netns, tmp_path: Path) -> None:
    """SIGTERM while the pipe is full and unread: the agent still applies on_exit (open) and
    exits 0 within 10 s; what reached the pipe is whole journald lines."""
    bed = Bed(netns, tmp_path, probe={"rise_interval_ms": 50})
    r, w = _stalled_pipe()
    st = os.fstat(w)
    try:
        proc = _start(bed, w, w, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
    finally:
        os.close(w)
    try:
        bed.wait_both("open", 10.0)
        for _ in range(5):  # more than a page of lines: the pipe is full from here on
            _failover(bed, proc)
        bed.svc.ctl("kill-core")
        bed.wait_both("blocked", 3.0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        bed.wait_both("open", 1.0)
        os.set_blocking(r, False)
        raw = b""
        with contextlib.suppress(BlockingIOError):
            raw = os.read(r, 1 << 16)
    finally:
        os.close(r)
    assert len(raw) > 3000
    _journal_lines(raw[: raw.rfind(b"\n") + 1])


@pytest.mark.parametrize("where", ["dev-full", "missing-dir"])
def test_log_file_unwritable_is_reported_on_stdout_and_the_agent_still_blocks(
        netns: Netns, tmp_path: Path, where: str) -> None:
    """log.file unwritable: stdout stays JSON (sink-failed), kill-core still blocks at once."""
    path = "/dev/full" if where == "dev-full" else str(tmp_path / "no" / "such" / "agent.log")
    bed = Bed(netns, tmp_path, log={"file": path})
    agent = bed.start_agent()
    mark = agent.mark()
    bed.svc.ctl("kill-core")
    ev = agent.wait_event("firewall-block", 3.0, after=mark)
    assert ev[NS + "trigger"] == "pidfd", ev
    bed.wait_both("blocked")
    failed = agent.find("sink-failed")
    assert len(failed) == 1 and failed[0][NS + "sink_target"] == path, agent.dump()
    assert bed.alive()
    agent.check_clean()


@contextlib.contextmanager
def small_tmpfs(where: Path, size_kib: int = 64) -> Iterator[Path]:
    """A tmpfs of ``size_kib`` mounted at ``where`` for the test, unmounted afterwards."""
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k,mode=0755", "tmpfs",
                    str(where)], check=True, timeout=10)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True, timeout=10)


def _fill(path: Path, keep: int) -> None:
    """Fill the file system of ``path`` with a file at ``path`` but for about ``keep`` bytes."""
    st = os.statvfs(path.parent)
    with open(path, "wb") as f:
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - keep))


def test_a_full_disk_under_log_file_costs_lines_never_a_failover(netns: Netns, tmp_path: Path) -> None:
    """log.file on a small tmpfs that fills up: failovers still block and open in time, stdout
    reports sink-failed (ENOSPC) once; once space is freed the file works again, log-dropped
    counts what it lost, and the file holds whole JSON lines (a line cut by the full disk is
    ended, never continued)."""
    with small_tmpfs(tmp_path / "logs") as d:
        log_file = d / "agent.log"
        _fill(d / "filler", keep=4096)
        bed = Bed(netns, tmp_path, log={"file": str(log_file)}, probe={"rise_interval_ms": 50})
        agent = bed.start_agent()
        for _ in range(5):
            mark = agent.mark()
            bed.svc.ctl("kill-core")
            bed.wait_both("blocked", 3.0)
            bed.svc.ctl("start")
            bed.wait_both("open", 5.0)
            agent.wait_event("firewall-unblock", 5.0, after=mark)
        [failed] = agent.find("sink-failed")
        assert (failed[NS + "sink"], failed["error.code"]) == ("file", "ENOSPC"), failed
        (d / "filler").unlink()
        mark = agent.mark()
        bed.svc.ctl("kill-core")
        bed.wait_both("blocked", 3.0)
        dropped = agent.wait_event("log-dropped", 5.0, after=mark)
        assert dropped[NS + "sink"] == "file" and dropped[NS + "dropped"] > 0, dropped
        bed.svc.ctl("start")
        bed.wait_both("open", 5.0)
        assert agent.stop() == 0
        lines = log_file.read_text().splitlines()
    bad = []
    for line in lines:
        try:
            json.loads(line)
        except ValueError:
            bad.append(line)
    # At most the one line the full disk cut short (anywhere, even in its first key).
    assert len(bad) <= 1 and all('{"@timestamp":"'.startswith(b[:15]) for b in bad), bad
    assert json.loads(lines[-1])["event.action"] == "agent-stop"
    agent.check_clean()


def test_syslog_socket_gone_then_back(netns: Netns, tmp_path: Path) -> None:
    """log.syslog to a socket that does not exist: failovers block, stdout says sink-failed once;
    when the socket appears, events reach it and log-dropped counts what syslog lost."""
    sock_path = tmp_path / "dev-log"
    bed = Bed(netns, tmp_path, log={"syslog": True, "syslog_address": str(sock_path)},
              probe={"rise_interval_ms": 50})
    agent = bed.start_agent()
    mark = agent.mark()
    bed.svc.ctl("kill-core")
    bed.wait_both("blocked", 3.0)
    bed.svc.ctl("start")
    bed.wait_both("open", 5.0)
    agent.wait_event("firewall-unblock", 5.0, after=mark)
    [failed] = agent.find("sink-failed")
    assert (failed[NS + "sink"], failed[NS + "sink_target"]) == ("syslog", str(sock_path))
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind(str(sock_path))
        rx.settimeout(5)
        mark = agent.mark()
        bed.svc.ctl("kill-core")
        bed.wait_both("blocked", 3.0)
        dropped = agent.wait_event("log-dropped", 5.0, after=mark)
        assert dropped[NS + "sink"] == "syslog" and dropped[NS + "dropped"] >= 4, dropped
        got = [rx.recv(65536).decode() for _ in range(3)]
    assert all(g.startswith("<30>1 ") or g.startswith("<28>1 ") for g in got), got
    assert bed.alive()
    agent.check_clean()


def _json_lines(path: Path) -> list[dict[str, object]]:
    raw = path.read_text(errors="replace")
    done = raw[: raw.rfind("\n") + 1]
    out = [json.loads(line) for line in done.splitlines()]
    assert all(isinstance(o, dict) for o in out)
    return out


@pytest.mark.parametrize("stdout", ["dev-full", "broken-pipe"])
def test_stdout_full_or_broken_while_the_file_works(
        netns: Netns, tmp_path: Path, stdout: str) -> None:
    """stdout ENOSPC or EPIPE: the daemon lives, blocks on kill-core, log.file stays JSON lines."""
    log_file = tmp_path / "agent.log"
    bed = Bed(netns, tmp_path, log={"file": str(log_file)})
    err = open(tmp_path / "agent.err", "wb")  # noqa: SIM115 - closed below
    if stdout == "dev-full":
        out = os.open("/dev/full", os.O_WRONLY)
    else:
        r, out = os.pipe()
        os.close(r)  # every write now fails with EPIPE (SIGPIPE is ignored by Python)
    try:
        proc = _start(bed, out, err.fileno())
    finally:
        os.close(out)
        err.close()

    def seen(action: str, after: int = 0) -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"agent exited {proc.returncode}: "
                                 f"{(tmp_path / 'agent.err').read_text()[-2000:]}")
        return log_file.exists() and any(e.get("event.action") == action
                                         for e in _json_lines(log_file)[after:])

    wait_for(lambda: seen("agent-ready"), 10.0, "agent-ready in log.file")
    bed.wait_both("open")
    mark = len(_json_lines(log_file))
    bed.svc.ctl("kill-core")
    bed.wait_both("blocked", 3.0)
    wait_for(lambda: seen("firewall-block", mark), 3.0, "firewall-block in log.file")
    assert [e[NS + "sink"] for e in _json_lines(log_file) if e.get("event.action") == "sink-failed"] \
        == ["stream"]
    assert proc.poll() is None
    assert "Traceback" not in (tmp_path / "agent.err").read_text()
