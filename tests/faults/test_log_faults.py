"""The log destination unwritable or full: the agent still reacts to the service's death.

Cases: ``log.file`` on /dev/full (ENOSPC on every write), ``log.file`` in a directory that
does not exist, and the agent's stdout (journald's stream) full or a broken pipe while
``log.file`` works. What is asserted first is the firewall read back from the kernel; then that
whatever log does get written is still one JSON object per line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.agent import child_env
from tests.faults.bed import Bed
from tests.netns import REPO, Netns, wait_for

pytestmark = pytest.mark.netns


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
    assert ev["trigger"] == "pidfd", ev
    bed.wait_both("blocked")
    failed = agent.find("sink-failed")
    assert failed and failed[0].get("sink.target") == path, agent.dump()
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
        proc = netns.popen([sys.executable, "-m", "watcher", "run", "--config", str(bed.cfg)],
                           cwd=str(REPO), env=child_env(), stdin=subprocess.DEVNULL,
                           stdout=out, stderr=err)
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
    assert proc.poll() is None
    assert "Traceback" not in (tmp_path / "agent.err").read_text()
