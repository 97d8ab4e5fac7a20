"""The shipped rsyslog configurations: RELP with a disk-assisted queue, valid for Debian's rsyslogd.

Running them (failovers through a relay and a collector, an outage, a restart) is in
tests/integration/test_siem_rsyslog.py, tests/integration/test_siem_outage.py and the booted
system test; here each file is checked by rsyslogd itself (-N1) and the package's wiring.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.netns import REPO
from tests.rsyslogd import gap_query

SAMPLES = REPO / "packaging" / "rsyslog"
RSYSLOGD = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"
needs_rsyslog = pytest.mark.skipif(not os.path.exists(RSYSLOGD), reason="rsyslog is not installed")


def actions(text: str, kind: str) -> list[str]:
    """The text of every ``action(type="kind" ...)`` of a configuration."""
    return re.findall(r'action\(type="' + kind + r'"(.*?)\)\s*\n', text, re.S)


def setting(action: str, name: str) -> str | None:
    """One name="value" setting of an action's text (comments removed)."""
    body = "\n".join(line.split("#", 1)[0] for line in action.splitlines())
    m = re.search(r'\b' + re.escape(name) + r'="([^"]*)"', body, re.I)
    return m.group(1) if m else None


def test_relp_is_the_shipped_transport() -> None:
    """The server side forwards with omrelp only, through a disk-assisted queue that is saved
    on shutdown, retried for ever and never blocks rsyslog's main queue; the collector listens
    with imrelp."""
    text = (SAMPLES / "sslvpn-heartbeat.conf").read_text()
    assert 'module(load="omrelp")' in text and not actions(text, "omfwd")
    [relp] = actions(text, "omrelp")
    assert setting(relp, "queue.type") == "LinkedList"
    assert setting(relp, "queue.filename"), "no queue file: the queue would be memory only"
    assert setting(relp, "queue.saveOnShutdown") == "on"
    assert setting(relp, "action.resumeRetryCount") == "-1"
    assert setting(relp, "queue.timeoutEnqueue") == "0"
    assert setting(relp, "queue.maxDiskSpace")
    assert setting(relp, "template") == "SslvpnHeartbeatForward"
    collector = (SAMPLES / "collector.conf").read_text()
    assert re.search(r'input\(type="imrelp" port="2514"', collector)
    assert setting(relp, "port") == "2514"


def test_no_event_is_filtered_before_the_siem() -> None:
    """Nothing the agent numbered is dropped on the way (a filtered line would look like a loss
    at the SIEM): no level filter in any shipped rsyslog file."""
    for path in SAMPLES.glob("*.conf"):
        assert not re.search(r"^\s*if [^\n]*\$!log\.level", path.read_text(), re.M), path


def test_tls_variant_has_the_same_queue() -> None:
    """The TCP + TLS variant for collectors without RELP: gtls, verified peer, octet counting,
    and the same queue settings as the RELP file."""
    tls = (SAMPLES / "sslvpn-heartbeat-tls.conf").read_text()
    [relp] = actions((SAMPLES / "sslvpn-heartbeat.conf").read_text(), "omrelp")
    [fwd] = actions(tls, "omfwd")
    assert (setting(fwd, "StreamDriver"), setting(fwd, "StreamDriverMode")) == ("gtls", "1")
    assert setting(fwd, "StreamDriverAuthMode") == "x509/name"
    assert setting(fwd, "TCP_Framing") == "octet-counted"
    for name in ("queue.type", "queue.size", "queue.highWatermark", "queue.maxDiskSpace",
                 "queue.saveOnShutdown", "queue.timeoutEnqueue", "action.resumeRetryCount"):
        assert setting(fwd, name) == setting(relp, name), name


def _validate(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    conf = tmp_path / "rsyslog.conf"
    (tmp_path / "work").mkdir(exist_ok=True)
    conf.write_text(f'global(workDirectory="{tmp_path / "work"}")\n' + text)
    return subprocess.run([RSYSLOGD, "-N1", "-f", str(conf)], capture_output=True, text=True,
                          timeout=60, check=False)


@needs_rsyslog
@pytest.mark.parametrize("name", ["sslvpn-heartbeat.conf", "collector.conf"])
def test_rsyslogd_accepts_the_relp_files(tmp_path: Path, name: str) -> None:
    """rsyslogd -N1 (Debian's rsyslog with rsyslog-relp) validates the file without a word."""
    proc = _validate(tmp_path, (SAMPLES / name).read_text())
    assert proc.returncode == 0 and "error" not in proc.stderr.lower(), proc.stderr


@needs_rsyslog
def test_rsyslogd_accepts_the_tls_variant(tmp_path: Path) -> None:
    """rsyslogd -N1 validates the TLS variant with a CA file in place (rsyslog-gnutls)."""
    if not Path("/usr/lib/x86_64-linux-gnu/rsyslog/lmnsd_gtls.so").exists() and \
            not list(Path("/usr/lib").glob("*/rsyslog/lmnsd_gtls.so")):
        pytest.fail("rsyslog-gnutls is not installed (scripts/bootstrap installs it)")
    ca = tmp_path / "ca.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-keyout", str(tmp_path / "ca.key"), "-out", str(ca), "-days", "1",
                    "-subj", "/CN=test-ca"], capture_output=True, check=True, timeout=60)
    text = (SAMPLES / "sslvpn-heartbeat-tls.conf").read_text().replace("/etc/ssl/siem/ca.pem", str(ca))
    proc = _validate(tmp_path, text)
    assert proc.returncode == 0 and "error" not in proc.stderr.lower(), proc.stderr


def test_the_package_suggests_relp_and_ships_the_samples() -> None:
    """debian/control Suggests rsyslog-relp (the agent needs no syslog daemon, so nothing
    stronger: neither Depends nor Recommends names rsyslog), and the samples are installed as examples."""
    control = (REPO / "debian" / "control").read_text()
    fields = dict(re.findall(r"^(\S+): (.*(?:\n .*)*)", control.split("\nPackage:", 1)[1], re.M))
    assert "rsyslog-relp" in fields["Suggests"]
    for field in ("Depends", "Pre-Depends", "Recommends"):
        assert "rsyslog" not in fields.get(field, ""), (field, fields.get(field))
    examples = (REPO / "debian" / "sslvpn-heartbeat.examples").read_text().split()
    assert "packaging/rsyslog" in examples


def test_the_unit_tags_its_lines_as_the_rsyslog_rule_selects() -> None:
    """The unit pins the journal's tag (SyslogIdentifier) that the rsyslog rule selects."""
    unit = (REPO / "packaging" / "sslvpn-heartbeat.service").read_text()
    assert re.search(r"^SyslogIdentifier=sslvpn-heartbeat$", unit, re.M)
    for name in ("sslvpn-heartbeat.conf", "sslvpn-heartbeat-tls.conf"):
        assert 'if $programname == "sslvpn-heartbeat" then' in (SAMPLES / name).read_text()


def test_the_documented_gap_query_lists_exactly_the_missing_numbers(tmp_path: Path) -> None:
    """docs/events.md's jq query on a collector's file: per run, the numbers missing below its
    last one, a redelivered copy counted once, runs without a gap not listed."""
    lines = [("a", 1, "agent-start"), ("a", 2, "probe-failed"), ("a", 2, "probe-failed"),
             ("a", 5, "agent-stop"), ("b", 1, "agent-start"), ("b", 2, "agent-stop"),
             ("c", 2, "service-up"), ("c", 4, "service-down")]
    path = tmp_path / "sslvpn-heartbeat.json"
    path.write_text("".join(json.dumps({"process.entity_id": r, "host.hostname": "vpn1",
                                        "event.sequence": n, "event.action": a}) + "\n"
                            for r, n, a in lines))
    assert gap_query(path) == [
        {"run": "a", "host": "vpn1", "last": 5, "stopped": True, "missing": [3, 4]},
        {"run": "c", "host": "vpn1", "last": 4, "stopped": False, "missing": [1, 3]}]
