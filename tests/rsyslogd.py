"""Debian's rsyslogd as tests run it: a private configuration, work directory and PID file each,
inside a namespace the test made; the packaged samples with their site values replaced.

Never the host's rsyslog: every instance is ``rsyslogd -n -f CONF -i PIDFILE`` started here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

from tests.netns import REPO, Netns, wait_for

__all__ = ["COLLECTOR_PORT", "RSYSLOGD", "SAMPLES", "Rsyslog", "gap_query", "received", "sample",
           "start_collector", "start_relay"]

RSYSLOGD = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"
SAMPLES = REPO / "packaging" / "rsyslog"
COLLECTOR_PORT = 2514  # the collector's RELP port, as in the sample (the namespace is private)


class Rsyslog:
    """rsyslogd -n on its own configuration, work directory and PID file, inside ``ns``."""

    def __init__(self, ns: Netns, d: Path, conf: str, work: Path | None = None) -> None:
        self.ns, self.d = ns, d
        self.work = work or d / "work"
        self.work.mkdir(parents=True, exist_ok=True)
        self.conf = d / "rsyslog.conf"
        self.conf.write_text(f'global(workDirectory="{self.work}" maxMessageSize="64k")\n' + conf)
        self.pid_file = d / "rsyslogd.pid"
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready = ""
        self.starts = 0

    def start(self, ready: str | None = None) -> Rsyslog:
        """Check the configuration (-N1), start the daemon, wait until ``ready`` (a path or
        "tcp:PORT"/"udp:PORT"; by default the one of the first start) is served."""
        self.ready = ready or self.ready
        check = self.ns.run([RSYSLOGD, "-N1", "-f", str(self.conf)], check=False)
        assert check.returncode == 0, f"rsyslog rejects {self.conf}:\n{check.stderr}{check.stdout}"
        self.starts += 1
        with open(self.d / f"rsyslogd-{self.starts}.err", "wb") as err:
            self.proc = self.ns.popen([RSYSLOGD, "-n", "-f", str(self.conf), "-i",
                                       str(self.pid_file)], stdout=err, stderr=err,
                                      stdin=subprocess.DEVNULL)
        wait_for(lambda: self._serving(self.ready), 10, f"rsyslogd serving {self.ready}")
        return self

    def errors(self) -> str:
        """What every start of this daemon printed."""
        return "".join(p.read_text(errors="replace") for p in sorted(self.d.glob("rsyslogd-*.err")))

    def _serving(self, ready: str) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"rsyslogd exited: {self.errors()}")
        if ready.startswith("/"):
            return os.path.exists(ready)
        proto, port = ready.split(":")
        flag = "-Hltn" if proto == "tcp" else "-Hlun"
        return bool(self.ns.run(["ss", flag, f"sport = :{port}"]).stdout.strip())

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM rsyslogd (it flushes its files and saves its queues) and wait for it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout)


def sample(name: str, **replace: str) -> str:
    """A packaged rsyslog sample with its site-specific values replaced for this test."""
    text = (SAMPLES / name).read_text()
    for old, new in replace.items():
        assert old in text, f"{old!r} not in {name}"
        text = text.replace(old, new)
    return text


def start_collector(ns: Netns, d: Path) -> tuple[Rsyslog, Path]:
    """The SIEM-side rsyslog from collector.conf; returns it and the file its JSON lines go to."""
    d.mkdir(parents=True, exist_ok=True)
    conf = sample("collector.conf", **{"/var/log/siem/": f"{d}/"})
    return Rsyslog(ns, d, conf).start(f"tcp:{COLLECTOR_PORT}"), d / "sslvpn-heartbeat.json"


def start_relay(ns: Netns, d: Path, collector: str = "127.0.0.1",
                work: Path | None = None) -> tuple[Rsyslog, str]:
    """The agent-side rsyslog from sslvpn-heartbeat.conf, reading its own unix socket (what
    /dev/log is on a host without systemd) and forwarding to ``collector``; returns it and the
    agent's ``syslog_address``."""
    d.mkdir(parents=True, exist_ok=True)
    sock = str(d / "log.sock")
    inputs = ('module(load="imuxsock" SysSock.Use="off")\n'
              f'input(type="imuxsock" Socket="{sock}" UseSpecialParser="off" ParseHostname="on")\n')
    (d / "sslvpn-heartbeat.conf").write_text(sample(
        "sslvpn-heartbeat.conf", **{'"siem.example.org"': f'"{collector}"',
                                    "/var/log/sslvpn-heartbeat-unparsed.log": str(d / "unparsed.log")}))
    conf = inputs + f'include(file="{d / "sslvpn-heartbeat.conf"}")\n'
    return Rsyslog(ns, d, conf, work).start(sock), sock


def received(path: Path) -> list[dict[str, Any]]:
    """Every line the collector wrote, each parsed as one JSON object."""
    if not path.exists():
        return []
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        obj = json.loads(line)  # a line that is not JSON fails the test here
        assert isinstance(obj, dict), f"line {n} is not an object: {line!r}"
        out.append(obj)
    return out


def gap_query(path: Path) -> list[dict[str, Any]]:
    """Run docs/events.md's jq query for gaps on a collector's file: one object per run that
    lacks numbers (run, host, last, stopped, missing)."""
    doc = (REPO / "docs" / "events.md").read_text()
    m = re.search(r"```sh\n(jq .*?) /var/log/siem/sslvpn-heartbeat.json\n```", doc, re.S)
    assert m, "the jq query for gaps is not in docs/events.md"
    argv = ["jq", "-s", "-c", m.group(1).split("'", 1)[1].rsplit("'", 1)[0], str(path)]
    proc = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60)
    return [json.loads(x) for x in proc.stdout.splitlines()]
