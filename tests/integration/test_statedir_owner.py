"""A root CLI and a daemon running as its own user share the state directory.

Real file ownership and a real second user (``nobody``, through setpriv): the admin file that
root writes must be readable by the directory's owner, so that a drain stays a drain.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netns import REPO
from watcher.statedir import ADMIN_FILE, DAEMON_FILE, StateDir

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                reason="needs root and setpriv (util-linux)")

READ_ADMIN = """
import json, sys
from pathlib import Path
from watcher.statedir import StateDir
rec = StateDir(Path(sys.argv[1])).admin()
print(json.dumps(None if rec is None else {"drain": rec.drain, "reason": rec.reason}))
"""

WRITE_DAEMON = """
import sys
from pathlib import Path
from watcher.statedir import StateDir
StateDir(Path(sys.argv[1])).write_daemon({"pid": 4242})
"""


def as_nobody(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run Python ``code`` as nobody:nogroup with no capability, the tree's modules importable."""
    user = pwd.getpwnam("nobody")
    return subprocess.run(
        ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups",
         "--inh-caps=-all", "--bounding-set=-all", sys.executable, "-B", "-c", code, *args],
        capture_output=True, text=True, timeout=30, check=False,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "LC_ALL": "C.UTF-8"})


@pytest.fixture
def user_dir() -> Iterator[Path]:
    """A state directory owned by nobody:nogroup, mode 0700, in a directory nobody can traverse."""
    top = Path(tempfile.mkdtemp(prefix="sslvpn-statedir-"))
    try:
        top.chmod(0o711)
        probe = as_nobody("import watcher.statedir")
        if probe.returncode != 0:
            pytest.skip(f"nobody cannot import the tree's modules: {probe.stderr[-300:]}")
        user = pwd.getpwnam("nobody")
        state = top / "state"
        state.mkdir(mode=0o700)
        os.chown(state, user.pw_uid, user.pw_gid)
        yield state
    finally:
        shutil.rmtree(top)


def test_root_block_is_owned_by_the_directory_owner(user_dir: Path) -> None:
    """set_admin as root gives the file the directory's uid/gid (0600): its user reads the drain."""
    StateDir(user_dir).set_admin(True, "drain for maintenance")
    st = (user_dir / ADMIN_FILE).stat()
    dir_st = user_dir.stat()
    assert (st.st_uid, st.st_gid) == (dir_st.st_uid, dir_st.st_gid) != (0, 0)
    assert stat.S_IMODE(st.st_mode) == 0o600
    proc = as_nobody(READ_ADMIN, str(user_dir))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"drain": True, "reason": "drain for maintenance"}


def test_root_only_admin_file_reads_as_full_block_for_the_user(user_dir: Path) -> None:
    """Control: a root-owned 0600 admin file (the old behaviour) turns a drain into a full block."""
    StateDir(user_dir).set_admin(True, "drain for maintenance")
    os.chown(user_dir / ADMIN_FILE, 0, 0)
    proc = as_nobody(READ_ADMIN, str(user_dir))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["drain"] is False


def test_user_writes_its_own_status_file(user_dir: Path) -> None:
    """The daemon's user writes daemon.json in its directory (no chown needed, none attempted)."""
    proc = as_nobody(WRITE_DAEMON, str(user_dir))
    assert proc.returncode == 0, proc.stderr
    st = (user_dir / DAEMON_FILE).stat()
    assert st.st_uid == pwd.getpwnam("nobody").pw_uid and stat.S_IMODE(st.st_mode) == 0o600
    assert json.loads((user_dir / DAEMON_FILE).read_text()) == {"pid": 4242}


def test_unprivileged_writer_in_a_foreign_directory_keeps_its_ownership() -> None:
    """A writer that may not chown (EPERM) still writes its file, owned by itself."""
    top = Path(tempfile.mkdtemp(prefix="sslvpn-statedir-"))
    try:
        top.chmod(0o711)
        shared = top / "shared"
        shared.mkdir()
        shared.chmod(0o1777)  # root's directory, writable by nobody
        proc = as_nobody(WRITE_DAEMON, str(shared))
        assert proc.returncode == 0, proc.stderr
        assert (shared / DAEMON_FILE).stat().st_uid == pwd.getpwnam("nobody").pw_uid
    finally:
        shutil.rmtree(top)
