"""The fake SSL VPN service in a network namespace: answers, init-script stop/start, PID file."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pyinotify
import pytest

from tests.netns import REPO, Netns, wait_for
from tests.testbed.cluster import Reply, http_get
from tests.testbed.fakesvc import LISTENER_PID, PID_FILE, pid_alive, read_pid

pytestmark = pytest.mark.netns


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


class Svc:
    """A fake service started in ``ns`` with its state under ``d``."""

    def __init__(self, ns: Netns, d: Path, bind: str = "0.0.0.0") -> None:
        self.ns, self.d = ns, d
        self.listener = ns.popen([sys.executable, "-m", "tests.testbed.fakesvc", "serve",
                                  "--state-dir", str(d), "--name", "server7", "--bind", bind],
                                 cwd=str(REPO), env=_env())
        wait_for(lambda: self.get().ok, 10, "the fake service answering 200")

    def ctl(self, action: str) -> subprocess.CompletedProcess[str]:
        return self.ns.run([sys.executable, "-m", "tests.testbed.fakesvc", "ctl", "--state-dir",
                            str(self.d), "--name", "server7", action],
                           check=False, env=_env())

    def get(self, host: str = "127.0.0.1") -> Reply:
        return http_get(self.ns.name, host, 8080, timeout=1.0)

    @property
    def pid(self) -> int | None:
        return read_pid(self.d / PID_FILE)


@pytest.fixture
def svc(netns: Netns, tmp_path: Path) -> Iterator[Svc]:
    yield Svc(netns, tmp_path)


def test_answers_200_naming_the_server_while_the_core_lives(svc: Svc) -> None:
    """With a live core the listener answers 200 and a body naming the server."""
    assert svc.get() == Reply(200, "server7\n")
    assert svc.pid is not None and pid_alive(svc.pid)
    assert svc.ctl("status").returncode == 0


def test_stop_gives_503_and_removes_the_pid_file_start_gives_a_new_pid(svc: Svc) -> None:
    """ctl stop: core gone, PID file gone, 503; ctl start: 200 again with a new core PID."""
    old = svc.pid
    assert old is not None
    r = svc.ctl("stop")
    assert r.returncode == 0, r.stderr
    assert not pid_alive(old)
    assert not (svc.d / PID_FILE).exists()
    assert svc.get() == Reply(503, "server7 down\n")
    assert svc.ctl("status").returncode == 3
    r = svc.ctl("start")
    assert r.returncode == 0, r.stderr
    new = svc.pid
    assert new is not None and new != old and pid_alive(new)
    assert svc.get() == Reply(200, "server7\n")


def test_start_writes_the_pid_file_by_rename(svc: Svc) -> None:
    """The core's PID file appears through a rename (IN_MOVED_TO), never by a write in place."""
    svc.ctl("stop")
    wm = pyinotify.WatchManager()
    seen: list[tuple[str, str]] = []

    class Handler(pyinotify.ProcessEvent):  # type: ignore[misc]
        def process_default(self, event: pyinotify.Event) -> None:
            seen.append((event.maskname, event.name))

    notifier = pyinotify.Notifier(wm, Handler(), timeout=50)
    wm.add_watch(str(svc.d), pyinotify.IN_CREATE | pyinotify.IN_MOVED_TO | pyinotify.IN_CLOSE_WRITE)
    try:
        assert svc.ctl("start").returncode == 0

        def renamed() -> bool:
            if notifier.check_events(timeout=50):
                notifier.read_events()
                notifier.process_events()
            return ("IN_MOVED_TO", PID_FILE) in seen

        wait_for(renamed, 5, "IN_MOVED_TO of the PID file")
    finally:
        notifier.stop()
    assert not any(name == PID_FILE and mask != "IN_MOVED_TO" for mask, name in seen), seen


def test_kill_core_leaves_the_pid_file_and_gives_503(svc: Svc) -> None:
    """ctl kill-core: SIGKILL, PID file left naming a dead PID, status 1, listener answers 503."""
    old = svc.pid
    assert svc.ctl("kill-core").returncode == 0
    assert svc.pid == old and old is not None and not pid_alive(old)
    assert svc.ctl("status").returncode == 1
    assert svc.get().status == 503
    assert svc.ctl("start").returncode == 0
    assert svc.get().status == 200


def test_listener_stops_and_starts_apart_from_the_core(svc: Svc) -> None:
    """stop-listener refuses connections while the core lives; start-listener serves 200 again."""
    core = svc.pid
    assert svc.ctl("stop-listener").returncode == 0
    reply = svc.get()
    assert reply.status == 0 and "Refused" in reply.body
    assert core is not None and pid_alive(core)
    assert svc.ctl("start-listener").returncode == 0
    assert svc.get() == Reply(200, "server7\n")
    assert read_pid(svc.d / LISTENER_PID) != svc.listener.pid


def test_dual_stack_listener_answers_on_ipv4_and_ipv6(netns: Netns, tmp_path: Path) -> None:
    """Bound to '::', one listener answers on 127.0.0.1 and on ::1."""
    svc = Svc(netns, tmp_path, bind="::")
    assert svc.get("127.0.0.1") == Reply(200, "server7\n")
    assert svc.get("::1") == Reply(200, "server7\n")
