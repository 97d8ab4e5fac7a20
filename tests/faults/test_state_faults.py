"""The state directory holding something the daemon cannot read as the admin-block file.

statedir.StateDir.admin() promises that an unreadable admin-block file counts as a full block
(fail safe). Only root can write the state directory (0700), so these are accidents or a
confused operator, not an attack; still, the daemon must not stop protecting or hang.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.faults.bed import Bed
from tests.netns import Netns

pytestmark = pytest.mark.netns

MAKERS: dict[str, Callable[[Path], object]] = {
    "directory": lambda p: p.mkdir(),
    "fifo": os.mkfifo,
}


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_unreadable_admin_file_counts_as_a_block(netns: Netns, tmp_path: Path, kind: str) -> None:
    """admin-block.json a directory or a FIFO at start-up: the daemon blocks (fail safe)."""
    bed = Bed(netns, tmp_path)
    bed.state.mkdir(mode=0o700)
    MAKERS[kind](bed.state / "admin-block.json")
    bed.agent.start()
    bed.wait_both("blocked", 3.0)
    assert bed.alive()
