"""Hostile or broken PID files: the probe refuses each one by name, the port is blocked, and the
daemon lives on; a good PID file written back serves again.

One agent serves every case (it would take a second per case to start one each); each case
begins from an open chain with a live, watched agent and ends by restoring the core's PID file.
Bad files are put in place by rename, as a service writes its PID file, so inotify reports them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.faults.bed import Bed
from tests.netns import Netns
from tests.testbed.fakesvc import CORE_COMM

pytestmark = pytest.mark.netns


def _put(path: Path, data: bytes, mtime_ago_s: float = 0.0) -> None:
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    if mtime_ago_s:
        t = time.time() - mtime_ago_s
        os.utime(tmp, (t, t))
    os.replace(tmp, path)


class PidBed:
    """A bed whose PID file lives in its own directory, the core's PID copied there by the test."""

    def __init__(self, ns: Netns, tmp: Path) -> None:
        self.piddir = tmp / "run"
        self.piddir.mkdir()
        self.pid_file = self.piddir / "core.pid"
        self.bed = Bed(ns, tmp, service={"pid_file": str(self.pid_file),
                                         "process_name": CORE_COMM},
                       probe={"fall": 1, "rise": 1})
        self.restore()
        self.bed.start_agent()
        self.bed.wait_both("open")
        self.strangers: list[subprocess.Popen[bytes]] = []

    def restore(self) -> None:
        """Write the live core's PID into the watched PID file."""
        self.piddir.mkdir(exist_ok=True)
        core = self.bed.svc.core_pid
        assert core is not None
        _put(self.pid_file, f"{core}\n".encode())

    def stranger(self) -> int:
        """The PID of a live process that is not the service (killed at the end)."""
        p = subprocess.Popen(["sleep", "60"])
        self.strangers.append(p)
        return p.pid

    def close(self) -> None:
        """End the strangers this bed started."""
        for p in self.strangers:
            p.kill()
            p.wait()


@pytest.fixture(scope="module")
def pidbed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PidBed]:
    """One namespace, service and agent for every PID file case of this module."""
    ns = Netns()
    pb: PidBed | None = None
    try:
        pb = PidBed(ns, tmp_path_factory.mktemp("pidfile"))
        yield pb
    finally:
        if pb is not None:
            pb.close()
        ns.close()


def _swap_in(path: Path, make: Callable[[Path], object]) -> None:
    """Make a special file beside ``path`` with ``make`` and rename it over ``path`` (one event)."""
    tmp = path.with_name(path.name + ".new")
    make(tmp)
    os.replace(tmp, path)


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


# case -> (make the fault, words the probe-failed reason must contain)
Fault = Callable[[PidBed], None]
CASES: dict[str, tuple[Fault, str]] = {
    "missing": (lambda b: b.pid_file.unlink(), "no such file"),
    "empty": (lambda b: _put(b.pid_file, b""), "empty"),
    "garbage": (lambda b: _put(b.pid_file, b"pid=\x00\xff; rm -rf /\n"), "not a number"),
    "huge": (lambda b: _put(b.pid_file, b"1" * (1 << 20)), "larger than 64 bytes"),
    "negative": (lambda b: _put(b.pid_file, b"-1\n"), "negative PID"),
    "symlink": (lambda b: _swap_in(b.pid_file, lambda p: p.symlink_to(b.bed.svc.pid_file)),
                "symlink (refused)"),
    "fifo": (lambda b: _swap_in(b.pid_file, os.mkfifo), "FIFO"),
    "dead-pid": (lambda b: _put(b.pid_file, f"{_dead_pid()}\n".encode()), "is not running"),
    "reused-pid": (lambda b: _put(b.pid_file, f"{b.stranger()}\n".encode(), mtime_ago_s=30),
                   "a stale PID reused by another process"),
    "another-process": (lambda b: _put(b.pid_file, f"{b.stranger()}\n".encode()),
                        f"not '{CORE_COMM}'"),
    "pid-1": (lambda b: _put(b.pid_file, b"1\n"), "PID 1 is init"),
    "the-agent": (lambda b: _put(b.pid_file, f"{b.bed.agent.pid}\n".encode()),
                  "names the agent's own PID"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_pid_file_blocks_names_the_problem_and_the_daemon_survives(
        pidbed: PidBed, case: str) -> None:
    """Each bad PID file: probe-failed names it, both families blocked, daemon alive, then healed."""
    bed = pidbed.bed
    assert bed.alive(), bed.agent.dump()
    bed.wait_both("open")
    fault, words = CASES[case]
    mark = bed.agent.mark()
    fault(pidbed)
    failed = bed.agent.wait_event("probe-failed", 3.0, after=mark)
    assert words in failed["event.reason"], failed
    assert (str(pidbed.pid_file) in failed["event.reason"]
            or failed["sslvpn_heartbeat.check"] != "pid_file"), failed
    bed.agent.wait_event("firewall-block", 3.0, after=mark)
    bed.wait_both("blocked")
    assert bed.alive()
    mark = bed.agent.mark()
    pidbed.restore()  # a rename replaces a symlink or FIFO as well
    bed.agent.wait_event("firewall-unblock", 3.0, after=mark)
    bed.wait_both("open")
    bed.agent.check_clean()


def test_pid_file_directory_deleted_and_recreated_is_followed(pidbed: PidBed) -> None:
    """rm -r of the PID file's directory blocks; recreating it and the file unblocks (inotify)."""
    bed = pidbed.bed
    bed.wait_both("open")
    mark = bed.agent.mark()
    shutil.rmtree(pidbed.piddir)
    ev = bed.agent.wait_event("firewall-block", 3.0, after=mark)
    assert ev["sslvpn_heartbeat.trigger"] == "inotify", ev
    bed.agent.wait_event("pidfile-directory-missing", 3.0, after=mark)
    mark = bed.agent.mark()
    pidbed.restore()  # mkdir, then the file by rename: either event re-arms and probes
    ev = bed.agent.wait_event("firewall-unblock", 3.0, after=mark)
    assert ev["sslvpn_heartbeat.trigger"] == "inotify", ev  # the safety net cannot fire within this test
    bed.wait_both("open")
    # Twice over: the watch re-armed on the new directory keeps following.
    mark = bed.agent.mark()
    shutil.rmtree(pidbed.piddir)
    bed.agent.wait_event("firewall-block", 3.0, after=mark)
    mark = bed.agent.mark()
    pidbed.restore()
    bed.agent.wait_event("firewall-unblock", 3.0, after=mark)
    assert bed.alive()
    bed.agent.check_clean()
