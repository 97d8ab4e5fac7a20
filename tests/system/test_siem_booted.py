"""Exactly once to the SIEM on a Debian 12 that boots systemd, with the shipped configuration.

The package's path to a SIEM: the agent writes to the journal; journald forwards each line to
Debian's rsyslog (imuxsock on the system socket, Debian's default); the shipped
/etc/rsyslog.d snippet (the package's example, packaging/rsyslog/sslvpn-heartbeat.conf) sends
them over RELP to a collector: a second rsyslogd in the container on the shipped
collector.conf (imrelp), run as a transient unit. The other path, the agent's own syslog
datagrams to /dev/log, is journald's socket under systemd: the agent skips it (sink-skipped),
so turning it on changes nothing. Every event is counted by its event.id.
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from tests.netns import wait_for
from tests.system.conftest import DEB_DIR, Machine
from tests.system.container import Container

pytestmark = [pytest.mark.system, pytest.mark.slow]

UNIT = "sslvpn-heartbeat.service"
AGENT = "sslvpn-heartbeat"
CHAIN = "sslvpn-heartbeat-chain"
CONFIG = "/etc/sslvpn-heartbeat/config.toml"
EXAMPLES = "/usr/share/doc/sslvpn-heartbeat/examples/rsyslog"
COLLECTED = "/var/log/siem/sslvpn-heartbeat.json"
SNIPPET = "/etc/rsyslog.d/30-sslvpn-heartbeat.conf"


def show(c: Container, prop: str, unit: str = UNIT) -> str:
    """One property of a unit, as systemctl show prints it."""
    return c.run(["systemctl", "show", "-p", prop, "--value", unit]).stdout.strip()


def rules(c: Container) -> list[str] | None:
    """The agent's chain's rules (None while the chain is absent)."""
    out = c.run(["iptables-save", "-t", "filter"]).stdout
    if f":{CHAIN} " not in out:
        return None
    return [ln for ln in out.splitlines() if ln.startswith(f"-A {CHAIN} ")]


def cursor(c: Container) -> str:
    """The journal's current end."""
    out = c.run(["journalctl", "--no-pager", "-n", "0", "--show-cursor"]).stdout
    return out.strip().split("-- cursor: ", 1)[1]


def journal_events(c: Container, after: str) -> list[dict[str, Any]]:
    """Every JSON event in the journal after ``after``, from any unit or socket, that is the
    agent's (it has an event.id of the agent's form)."""
    out = c.run(["journalctl", "--no-pager", "-o", "json", f"--after-cursor={after}"]).stdout
    found = []
    for line in out.splitlines():
        msg = json.loads(line).get("MESSAGE")
        if not isinstance(msg, str) or "{" not in msg:
            continue
        with contextlib.suppress(ValueError):
            ev = json.loads(msg[msg.index("{"):])
            if isinstance(ev, dict) and "event.sequence" in ev and "ecs.version" in ev:
                found.append(ev)
    return found


def collected(c: Container) -> list[dict[str, Any]]:
    """Every line of the collector's file, each one JSON object."""
    proc = c.run(["cat", COLLECTED], check=False)
    return [json.loads(x) for x in proc.stdout.splitlines()] if proc.returncode == 0 else []


def one_run(c: Container, how: str) -> str:
    """Restart the agent, fail the service over twice and stop the agent; the run's entity id."""
    cur = cursor(c)
    c.run(["systemctl", "restart", AGENT])
    wait_for(lambda: show(c, "ActiveState") == "active" and rules(c) == [], 30, "agent up, open")
    for _ in range(2):
        c.run(["systemctl", "stop", "novell-sslvpn"])
        wait_for(lambda: bool(rules(c)), 10, "the REJECT rule")
        c.run(["systemctl", "start", "novell-sslvpn"])
        wait_for(lambda: rules(c) == [], 10, "the chain open again")
    c.run(["systemctl", "stop", AGENT])
    starts = [e for e in journal_events(c, cur) if e.get("event.action") == "agent-start"]
    assert len(starts) == 1, (how, starts)
    return str(starts[0]["process.entity_id"])


def assert_exactly_once(c: Container, run: str, since: str) -> list[dict[str, Any]]:
    """Every event of ``run`` in the journal reaches the collector, each exactly once, with no
    gap in event.sequence from 1 to agent-stop; the journal holds each once too."""
    in_journal = [e for e in journal_events(c, since) if e["process.entity_id"] == run]
    ids = {e["event.id"] for e in in_journal}
    wait_for(lambda: ids <= {e["event.id"] for e in collected(c)}, 60,
             "every event of the run at the collector")
    got = [e for e in collected(c) if e.get("process.entity_id") == run]
    twice = {k: n for k, n in Counter(e["event.id"] for e in got).items() if n > 1}
    assert not twice, f"delivered more than once: {twice}"
    twice = {k: n for k, n in Counter(e["event.id"] for e in in_journal).items() if n > 1}
    assert not twice, f"in the journal more than once: {twice}"
    assert {e["event.id"] for e in got} == ids
    seqs = sorted(e["event.sequence"] for e in got)
    assert seqs == list(range(1, len(seqs) + 1)), seqs
    by_seq = {e["event.sequence"]: e for e in got}
    assert by_seq[len(seqs)]["event.action"] == "agent-stop", by_seq[len(seqs)]
    assert sum(e["event.action"] == "firewall-block" for e in got) == 2
    sent = {e["event.id"]: e for e in in_journal}
    assert all(sent[e["event.id"]] == e for e in got), "an event changed on the way"
    return got


@pytest.fixture(scope="module")
def siem(machine: Machine) -> Iterator[Container]:
    """The package installed, a RELP collector running in the container, and Debian's rsyslog
    with the package's example snippet pointed at it."""
    c = machine.container
    deb = DEB_DIR / machine.debs.first.deb.name
    c.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", str(deb)], timeout=300)
    wait_for(lambda: show(c, "ActiveState") == "active", 30, "the agent active")
    c.sh("mkdir -p /etc/siem-collector /var/lib/siem-collector /var/log/siem && "
         "{ echo 'global(workDirectory=\"/var/lib/siem-collector\")'; "
         f"cat {EXAMPLES}/collector.conf; }} > /etc/siem-collector/rsyslog.conf")
    c.run(["rsyslogd", "-N1", "-f", "/etc/siem-collector/rsyslog.conf"])
    c.run(["systemd-run", "--unit=siem-collector", "--property=Type=simple", "rsyslogd", "-n",
           "-f", "/etc/siem-collector/rsyslog.conf", "-i", "/run/siem-collector.pid"])
    wait_for(lambda: c.run(["ss", "-Hltn", "sport = :2514"]).stdout.strip(), 20,
             "the collector listening on 2514")
    c.sh(f"sed 's/siem.example.org/127.0.0.1/' {EXAMPLES}/sslvpn-heartbeat.conf > {SNIPPET}")
    c.run(["rsyslogd", "-N1"])  # Debian's whole configuration, with the snippet, validates
    c.run(["systemctl", "restart", "rsyslog"])
    wait_for(lambda: show(c, "ActiveState", "rsyslog.service") == "active", 20, "rsyslog")
    yield c
    c.run(["systemctl", "stop", "siem-collector"], check=False)


def test_journal_to_rsyslog_to_the_collector_exactly_once(siem: Container) -> None:
    """A whole run (start, two failovers, stop): journald forwards each line to Debian's
    rsyslog, which sends it over RELP; the collector has every event of the run once, numbered
    1..N without a gap, the same objects as in the journal."""
    c = siem
    assert show(c, "ActiveState", "syslog.socket") == "active"  # journald -> rsyslog, Debian's way
    since = cursor(c)
    run = one_run(c, "journal")
    got = assert_exactly_once(c, run, since)
    print(f"\n{len(got)} events of one run at the collector, each once")
    assert c.run(["test", "-e", "/var/log/sslvpn-heartbeat-unparsed.log"], check=False).returncode


def test_the_agents_own_syslog_cannot_deliver_twice_under_systemd(siem: Container) -> None:
    """[log] syslog = true under systemd: the agent skips the sink (sink-skipped) instead of
    sending every event a second time through /dev/log (journald's socket): still once each."""
    c = siem
    c.run(["cp", CONFIG, "/root/config.toml.before-syslog"])
    try:
        c.sh(f"sed -i 's/^syslog = false/syslog = true/' {CONFIG} && grep -q '^syslog = true' {CONFIG}")
        since = cursor(c)
        run = one_run(c, "syslog = true")
        got = assert_exactly_once(c, run, since)
        skipped = [e for e in got if e["event.action"] == "sink-skipped"]
        assert len(skipped) == 1 and skipped[0]["sslvpn_heartbeat.sink_target"] == "/dev/log"
    finally:
        c.run(["cp", "/root/config.toml.before-syslog", CONFIG], check=False)
