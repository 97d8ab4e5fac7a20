"""``check --nagios`` run for real in a namespace: each state's exit code and a line that
follows the Monitoring Plugins grammar (tests/plugin_output.py), next to the plain ``check``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agent import Agent, Service, agent_config, child_env
from tests.netns import Netns
from tests.plugin_output import PluginOutput, parse

pytestmark = pytest.mark.netns

WORD = {0: "OK", 1: "WARNING", 2: "CRITICAL", 3: "UNKNOWN"}
# The Monitoring Plugins project's own perfdata parser (Debian's libmonitoring-plugin-perl), a
# second reader of every line besides ours.
_PERL = r"""
use Monitoring::Plugin::Performance;
my @p = Monitoring::Plugin::Performance->parse_perfstring($ARGV[0]) or die "unparsable\n";
for (@p) {
    print join("\t", $_->label, $_->value, $_->uom // "", $_->min // ""), "\n";
}
"""


def perl_perf(perf: str) -> list[tuple[str, float, str, str]]:
    """``perf`` as Monitoring::Plugin::Performance reads it: (label, value, uom, min)."""
    r = subprocess.run(["perl", "-e", _PERL, perf], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, (perf, r.stderr)
    rows = [ln.split("\t") for ln in r.stdout.splitlines()]
    return [(a, float(b), c, d) for a, b, c, d in rows]


class Bed:
    """A healthy fake service, its agent (not started) and the CLI with the agent's config."""

    def __init__(self, netns: Netns, tmp_path: Path) -> None:
        self.ns = netns
        self.svc = Service(netns, tmp_path / "svc").start()
        self.state = tmp_path / "state"
        self.cfg = agent_config(tmp_path / "agent.toml", self.svc.d, self.state)
        self.agent = Agent(netns, self.cfg, tmp_path)

    def run(self, *args: str, pre: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
        """The CLI in the namespace (optionally behind ``pre``, e.g. setpriv)."""
        return self.ns.run([*pre, sys.executable, "-m", "watcher", *args, "--config",
                            str(self.cfg)], check=False, env=child_env())

    def nagios(self, want: int, *, pre: tuple[str, ...] = ()) -> tuple[str, PluginOutput]:
        """Run check --nagios, assert exit ``want``, one line, the matching status word and
        the grammar; return the line and its parse."""
        r = self.run("check", "--nagios", pre=pre)
        assert r.returncode == want, (r.returncode, r.stdout, r.stderr)
        lines = r.stdout.splitlines()
        assert len(lines) == 1, r.stdout
        line = lines[0]
        assert line.startswith(f"SSLVPN-HEARTBEAT {WORD[want]} - "), line
        out = parse(line)
        if out.perf:
            assert perl_perf(line.split("|", 1)[1].strip()) == [
                (p.label, p.value, p.uom, p.min) for p in out.perf], line
        return line, out


@pytest.fixture
def bed(netns: Netns, tmp_path: Path) -> Iterator[Bed]:
    b = Bed(netns, tmp_path)
    try:
        yield b
    finally:
        if b.agent.proc is not None and b.agent.proc.poll() is None:
            b.agent.stop()


def test_ok_warning_critical_follow_the_agent_and_the_service(bed: Bed) -> None:
    """OK while healthy with the agent running; WARNING for a drain (naming its time left) and
    for no agent; CRITICAL once the service is down; perfdata time (s) and established."""
    bed.agent.start().wait_ready()
    line, out = bed.nagios(0)
    perf = {p.label: p for p in out.perf}
    assert set(perf) == {"time", "established"}, line
    assert perf["time"].uom == "s" and 0 < perf["time"].value < 1, line
    assert perf["established"].value >= 0 and perf["established"].min == "0", line
    assert bed.run("block", "--drain", "--for", "30m", "--reason", "rolling upgrade").returncode == 0
    line, _ = bed.nagios(1)
    assert "admin drain" in line and "rolling upgrade" in line and "lifts in 30m" in line, line
    assert bed.run("unblock").returncode == 0
    bed.nagios(0)
    bed.svc.ctl("stop")
    line, _ = bed.nagios(2)
    assert "fakevpn down on port 8080" in line, line
    plain = bed.run("check")
    assert plain.returncode == 1 and json.loads(plain.stdout)["healthy"] is False
    bed.svc.ctl("start")
    bed.nagios(0)
    assert bed.agent.stop() == 0
    line, _ = bed.nagios(1)
    assert "agent not running" in line, line
    plain = bed.run("check")
    assert plain.returncode == 0 and json.loads(plain.stdout)["healthy"] is True


def test_unknown_when_the_state_directory_cannot_be_read(netns: Netns, tmp_path: Path) -> None:
    """A caller that cannot enter the agent's state directory (0700, another owner; here root
    without its file-permission overrides, as a monitoring user would be): exit 3, UNKNOWN
    naming the directory, instead of a false OK."""
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is needed"
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "admin-block.json").write_text('{"drain": false, "reason": "", "since": 1}')
    os.chown(state, 65534, 65534)
    cfg = agent_config(tmp_path / "agent.toml", tmp_path / "svc", state)
    drop = "-dac_override,-dac_read_search"
    argv = [setpriv, f"--inh-caps={drop}", f"--bounding-set={drop}", sys.executable,
            "-m", "watcher", "check", "--nagios", "--config", str(cfg)]
    env = child_env()
    r = netns.run(argv, check=False, env=env)
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert r.stdout.startswith("SSLVPN-HEARTBEAT UNKNOWN - cannot read the state directory"), \
        r.stdout
    assert str(state) in r.stdout
    parse(r.stdout)
    # the same check with root's overrides reads the block (and a service that is not there)
    r = netns.run(argv[3:], check=False, env=env)
    assert r.returncode == 2 and "admin block" in r.stdout, r.stdout
