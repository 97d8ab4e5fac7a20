"""The package on a Debian 12 that boots systemd, driven as an operator would.

One container for the module (see conftest.py): the tests are the steps of one session at the
console, in this order: install, reboot, the manual's failover check through systemctl and
through the service's init script, reloads, the watchdog, restart and stop, the journal, the
sandbox, status, an admin drain, legacy iptables, an upgrade, removal and purge. Each step
leaves the machine as it found it (service up, agent active, chain open) unless it is the
install, the upgrade or the removal. Everything runs in the container's own network namespace;
the last test checks that the host's rule sets hold nothing of the agent.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.netns import REPO, wait_for
from tests.system.conftest import DEB_DIR, Machine, host_rulesets
from tests.system.container import Container

pytestmark = [pytest.mark.system, pytest.mark.slow]

UNIT = "sslvpn-heartbeat.service"
CHAIN = "sslvpn-heartbeat-chain"
AGENT = "sslvpn-heartbeat"
CONFIG = "/etc/sslvpn-heartbeat/config.toml"
# CAP_NET_ADMIN (12) and CAP_NET_RAW (13), as /proc/PID/status prints capability sets.
AGENT_CAPS = f"{(1 << 12) | (1 << 13):016x}"
MAX_EXPOSURE = 1.7


# --- helpers -----------------------------------------------------------------------------------


def readme_iptables_lines() -> list[str]:
    """The lines README shows for ``iptables -L`` after the service stopped (the manual's)."""
    text = (REPO / "README.md").read_text()
    block = text.split("# iptables -L\n", 1)[1].split("\n\n", 1)[0]
    lines = [ln.strip() for ln in block.splitlines()]
    assert lines[0].startswith("Chain sslvpn-heartbeat-chain"), lines
    return lines


def show(c: Container, prop: str, unit: str = UNIT) -> str:
    """One property of a unit, as systemctl show prints its value."""
    return c.run(["systemctl", "show", "-p", prop, "--value", unit]).stdout.strip()


def main_pid(c: Container) -> int:
    """The agent's main PID as systemd knows it (0 when not running)."""
    return int(show(c, "MainPID"))


def chain(c: Container, save: str = "iptables-save") -> list[str]:
    """The lines of iptables-save (of this flavour/family) that name the agent's chain."""
    out = c.run([save, "-t", "filter"]).stdout
    return [ln for ln in out.splitlines() if CHAIN in ln]


def rules(c: Container, save: str = "iptables-save") -> list[str]:
    """The agent's chain's rules."""
    return [ln for ln in chain(c, save) if ln.startswith(f"-A {CHAIN} ")]


def blocked(c: Container, save: str = "iptables-save") -> bool:
    """True when the chain holds the full REJECT of port 8080."""
    r = rules(c, save)
    return len(r) == 1 and "--dport 8080 -j REJECT" in r[0] and "--tcp-flags" not in r[0]


def is_open(c: Container, save: str = "iptables-save") -> bool:
    """True when the chain exists, jumped to from INPUT, and holds nothing."""
    lines = chain(c, save)
    return (any(ln.startswith(f":{CHAIN} ") for ln in lines)
            and f"-A INPUT -j {CHAIN}" in lines
            and not [ln for ln in lines if ln.startswith(f"-A {CHAIN} ")])


def journal(c: Container, *args: str) -> list[dict[str, Any]]:
    """The journal's entries of the agent's unit in this boot, as JSON objects; an agent line
    also carries its own JSON under "event"."""
    out = c.run(["journalctl", "--no-pager", "-o", "json", "-b", "-u", UNIT, *args]).stdout
    entries = []
    for line in out.splitlines():
        e = json.loads(line)
        msg = e.get("MESSAGE")
        if isinstance(msg, str) and msg.startswith("{"):
            with contextlib.suppress(ValueError):
                e["event"] = json.loads(msg)
        entries.append(e)
    return entries


def events(c: Container, action: str, *args: str) -> list[dict[str, Any]]:
    """The agent's log lines with this event.action, in this boot."""
    return [e["event"] for e in journal(c, *args)
            if e.get("event", {}).get("event.action") == action]


def cursor(c: Container) -> str:
    """The journal's current end, to read only what follows."""
    out = c.run(["journalctl", "--no-pager", "-n", "0", "--show-cursor"]).stdout
    return out.strip().split("-- cursor: ", 1)[1]


def since(c: Container, cur: str, action: str) -> list[dict[str, Any]]:
    """The agent's lines with this event.action logged after ``cur``."""
    return events(c, action, f"--after-cursor={cur}")


def active(c: Container) -> bool:
    """True when the unit is active (for Type=notify: it sent READY=1)."""
    return show(c, "ActiveState") == "active"


def service(c: Container, how: str, action: str) -> None:
    """Start or stop the fake SSL VPN service through systemctl or its init script."""
    argv = ["systemctl", action, "novell-sslvpn"] if how == "systemctl" else \
        ["/etc/init.d/novell-sslvpn", action]
    c.run(argv)


@pytest.fixture
def c(machine: Machine) -> Container:
    """The booted container."""
    return machine.container


@pytest.fixture
def baseline(c: Container) -> Iterator[Container]:
    """The container with the service up and the agent active with an open chain; restored so
    after the test."""
    wait_for(lambda: active(c) and is_open(c), 30, "agent active, chain open")
    try:
        yield c
    finally:
        c.run(["cp", "/root/config.toml.shipped", CONFIG], check=False)
        c.run(["systemctl", "start", "novell-sslvpn"], check=False)
        c.run(["systemctl", "start", AGENT], check=False)


# --- install and boot ---------------------------------------------------------------------------


def test_install_with_apt_enables_and_starts(machine: Machine, c: Container) -> None:
    """apt installs the .deb in the booted system; its postinst enables and starts the unit,
    which reaches READY with the chain open (the service is up)."""
    assert show(c, "ActiveState", "novell-sslvpn.service") == "active"
    deb = DEB_DIR / machine.debs.first.deb.name
    c.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", str(deb)], timeout=300)
    c.run(["cp", CONFIG, "/root/config.toml.shipped"])
    assert c.run(["systemctl", "is-enabled", AGENT]).stdout.strip() == "enabled"
    wait_for(lambda: active(c), 30, "the unit active")
    wait_for(lambda: is_open(c) and is_open(c, "ip6tables-save"), 10, "chain open, both families")


def test_enabled_and_active_at_boot_after_the_service(machine: Machine, c: Container) -> None:
    """After a reboot the unit is active (READY=1 came), ordered after novell-sslvpn.service,
    and its first probe found the service already up: the chain never blocked at boot."""
    c.shutdown()
    c.boot()
    assert active(c), show(c, "ActiveState")
    assert "novell-sslvpn.service" in show(c, "After").split()
    assert "novell-sslvpn.service" not in show(c, "Requires").split()
    assert show(c, "NotifyAccess") == "main" and show(c, "Type") == "notify"
    wait_for(lambda: events(c, "agent-ready"), 10, "agent-ready in the journal")
    assert events(c, "service-initial-up"), journal(c)[-10:]
    assert not events(c, "firewall-block") and not events(c, "service-initial-down")
    assert is_open(c)


def test_main_pid_runs_as_the_agent_with_two_capabilities(baseline: Container) -> None:
    """The main process runs as sslvpn-heartbeat with exactly CAP_NET_ADMIN and CAP_NET_RAW."""
    c = baseline
    pid = main_pid(c)
    status = dict(ln.split(":\t", 1) for ln in c.run(["cat", f"/proc/{pid}/status"]).stdout
                  .splitlines() if ":\t" in ln)
    uid = c.run(["id", "-u", AGENT]).stdout.strip()
    assert status["Uid"].split() == [uid] * 4
    for cap in ("CapEff", "CapPrm", "CapBnd", "CapAmb"):
        assert status[cap].strip() == AGENT_CAPS, (cap, status[cap])
    assert status["NoNewPrivs"].strip() == "1"


# --- the manual's failover check ----------------------------------------------------------------


@pytest.mark.parametrize("how", ["systemctl", "init-script"])
def test_manual_stop_iptables_start(baseline: Container, how: str) -> None:
    """The manual page's check: stop the service, `iptables -L` shows README's lines (the REJECT
    of tcp dpt:http-alt), start it, the chain is empty again."""
    c = baseline
    service(c, how, "stop")
    wait_for(lambda: blocked(c) and blocked(c, "ip6tables-save"), 10, "the REJECT rule")
    listing = [ln.strip() for ln in c.run(["iptables", "-L"]).stdout.splitlines()]
    want = readme_iptables_lines()
    at = listing.index(want[0])
    assert listing[at:at + len(want)] == want, listing
    service(c, how, "start")
    wait_for(lambda: is_open(c) and is_open(c, "ip6tables-save"), 10, "the chain empty again")
    listing = [ln.strip() for ln in c.run(["iptables", "-L", CHAIN]).stdout.splitlines()]
    assert listing == want[:2], listing


# --- reloads ------------------------------------------------------------------------------------


def test_good_reload_applies_and_bad_reload_fails(baseline: Container) -> None:
    """A valid edit reloads (exit 0, config-reload, same process); an invalid one fails the job
    ("Job for ... failed", non-zero), and the agent keeps running on the configuration it had;
    SIGHUP by hand with that file: the refusal logged at error level, the agent still serving."""
    c = baseline
    pid = main_pid(c)
    cur = cursor(c)
    c.sh(f"sed -i 's|^http_path = \"\"|http_path = \"/\"|' {CONFIG}")
    proc = c.run(["systemctl", "reload", AGENT], check=False)
    assert proc.returncode == 0, proc.stderr
    wait_for(lambda: since(c, cur, "config-reload"), 10, "config-reload")
    assert main_pid(c) == pid and active(c)

    c.sh(f"printf '[service]\\nport = 0\\n' > {CONFIG}")
    cur = cursor(c)
    proc = c.run(["systemctl", "reload", AGENT], check=False)
    assert proc.returncode != 0
    assert f"Job for {UNIT} failed" in proc.stderr, proc.stderr
    assert main_pid(c) == pid and active(c)
    assert not since(c, cur, "config-reload")
    # what systemctl status shows: config-check's message naming the key
    told = c.run(["journalctl", "--no-pager", "-b", "-u", UNIT, f"--after-cursor={cur}"]).stdout
    assert "service.port" in told, told
    # still the running configuration: port 8080 is blocked when the service stops
    c.run(["systemctl", "stop", "novell-sslvpn"])
    wait_for(lambda: blocked(c), 10, "the REJECT rule of the running configuration")
    c.run(["systemctl", "start", "novell-sslvpn"])
    wait_for(lambda: is_open(c), 10, "the chain open")

    cur = cursor(c)
    c.run(["kill", "-HUP", str(pid)])
    bad = wait_for(lambda: since(c, cur, "config-invalid"), 10, "config-invalid after SIGHUP")
    assert bad[0]["log.level"] == "error" and "service.port" in bad[0]["event.reason"]
    assert main_pid(c) == pid and active(c)


# --- watchdog, restart, stop --------------------------------------------------------------------


def test_watchdog_restarts_a_hung_agent(baseline: Container) -> None:
    """A stopped (hung) agent misses its watchdog pings: systemd aborts and restarts it.
    (A drop-in shortens WatchdogSec for the test; the mechanism is the unit's.)"""
    c = baseline
    dropin = Path("/etc/systemd/system/sslvpn-heartbeat.service.d/watchdog-test.conf")
    c.sh(f"mkdir -p {dropin.parent} && printf '[Service]\\nWatchdogSec=3\\nTimeoutAbortSec=2\\n'"
         f" > {dropin} && systemctl daemon-reload && systemctl restart {AGENT}")
    try:
        wait_for(lambda: active(c), 30, "the agent active again")
        pid = main_pid(c)
        restarts = int(show(c, "NRestarts"))
        c.run(["kill", "-STOP", str(pid)])
        wait_for(lambda: main_pid(c) not in (0, pid) and active(c), 40, "a new agent")
        assert int(show(c, "NRestarts")) == restarts + 1
        log = c.run(["journalctl", "--no-pager", "-b", "-u", UNIT]).stdout
        assert "Watchdog timeout" in log, log[-2000:]
    finally:
        c.sh(f"rm -f {dropin} && systemctl daemon-reload && systemctl restart {AGENT}")


def test_restart_and_stop(baseline: Container) -> None:
    """restart replaces the process (READY again); stop applies on_exit=open: a chain blocked
    for a dead service is emptied when the agent stops."""
    c = baseline
    pid = main_pid(c)
    c.run(["systemctl", "restart", AGENT])
    assert active(c) and main_pid(c) not in (0, pid)
    c.run(["systemctl", "stop", "novell-sslvpn"])
    wait_for(lambda: blocked(c), 10, "the REJECT rule")
    c.run(["systemctl", "stop", AGENT])
    assert show(c, "ActiveState") == "inactive"
    assert is_open(c) and is_open(c, "ip6tables-save")


# --- what an operator reads -----------------------------------------------------------------------


def test_journal_priorities_show_warnings_and_errors_only(baseline: Container) -> None:
    """`journalctl -p warning -u sslvpn-heartbeat` shows the agent's warnings and errors (the
    refused SIGHUP above, proc-connector-unavailable at each start) and none of its info lines:
    each line reaches journald with its own priority."""
    c = baseline
    every = [e for e in journal(c) if "event" in e]
    logged = {(e["event"]["event.action"], e["event"]["log.level"], e.get("PRIORITY"))
              for e in every if e["event"]["log.level"] in ("warning", "error")}
    assert {a for a, _, _ in logged} >= {"config-invalid", "proc-connector-unavailable"}, logged
    # journald's priorities: 3 err, 4 warning (6 info is what a plain stdout line gets)
    want = {"warning": "4", "error": "3"}
    wrong = {(a, lvl, prio) for a, lvl, prio in logged if prio != want[lvl]}
    assert not wrong, f"the agent's lines reached journald without their priority: {wrong}"
    shown = [e for e in journal(c, "-p", "warning") if "event" in e]
    actions = {e["event"]["event.action"] for e in shown}
    assert {"config-invalid", "proc-connector-unavailable"} <= actions, actions
    assert {e["event"]["log.level"] for e in shown} <= {"warning", "error", "critical"}


def test_systemd_analyze_security(baseline: Container) -> None:
    """systemd-analyze security rates the running unit's exposure at most 1.7."""
    out = baseline.run(["systemd-analyze", "security", "--no-pager", UNIT]).stdout
    m = re.search(r"Overall exposure level for sslvpn-heartbeat\.service: (\d+\.\d+)", out)
    assert m and float(m.group(1)) <= MAX_EXPOSURE, out[-1500:]


def test_ip_address_deny_applies_here(baseline: Container) -> None:
    """The unit's IPAddressDeny=any / IPAddressAllow=localhost really filter in this container
    (nspawn lets its systemd use bpf()): a connect to a non-local address is dropped, one to
    loopback is not (refused by the closed port)."""
    c = baseline
    assert show(c, "IPAddressDeny") and show(c, "IPAddressAllow")
    c.sh("ip addr add 192.0.2.1/32 dev lo 2>/dev/null || true")
    script = ("import socket\n"
              "for a in ('127.0.0.1', '192.0.2.1'):\n"
              "    s = socket.socket(); s.settimeout(1.5)\n"
              "    try: s.connect((a, 9)); print(a, 'connected')\n"
              "    except OSError as e: print(a, type(e).__name__)\n")
    out = c.run(["systemd-run", "--quiet", "--wait", "--pipe", "-p", "IPAddressDeny=any",
                 "-p", "IPAddressAllow=localhost", "python3", "-c", script]).stdout
    assert out.split("\n")[:2] == ["127.0.0.1 ConnectionRefusedError", "192.0.2.1 TimeoutError"], out
    c.sh("ip addr del 192.0.2.1/32 dev lo")


def test_status_json(baseline: Container) -> None:
    """status --json as root: both families open, the daemon running with the unit's PID."""
    c = baseline
    st = json.loads(c.run([AGENT, "status", "--json"]).stdout)
    assert st["chain"] == CHAIN and st["port"] == 8080
    assert set(st["families"]) == {"ipv4", "ipv6"}
    assert all(f["state"] == "open" and f["jumps"] == 1 for f in st["families"].values()), st
    assert st["daemon"]["pid"] == main_pid(c) and st["admin_block"] is None


def test_block_drain_and_unblock(baseline: Container) -> None:
    """block --drain (typed as root) rejects only new connections in both families and the
    running agent keeps it while the service is up; unblock hands the chain back: empty."""
    c = baseline
    c.run([AGENT, "block", "--drain", "--reason", "maintenance"])
    for save in ("iptables-save", "ip6tables-save"):
        r = rules(c, save)
        assert len(r) == 1 and "--tcp-flags FIN,SYN,RST,ACK SYN -j REJECT" in r[0], r
    st = json.loads(c.run([AGENT, "status", "--json"]).stdout)
    assert st["admin_block"]["drain"] is True and st["admin_block"]["reason"] == "maintenance"
    c.run(["systemctl", "restart", AGENT])  # the block outlives the daemon
    assert "--tcp-flags" in rules(c)[0]
    c.run([AGENT, "unblock"])
    wait_for(lambda: is_open(c) and is_open(c, "ip6tables-save"), 10, "the chain open")


def test_legacy_iptables(baseline: Container) -> None:
    """With iptables switched to the legacy flavour (update-alternatives), the restarted agent
    (CAP_NET_RAW) blocks and opens the legacy chain; switched back, it runs on nf_tables."""
    c = baseline
    alt = "update-alternatives --quiet --set"
    c.sh(f"{alt} iptables /usr/sbin/iptables-legacy && {alt} ip6tables /usr/sbin/ip6tables-legacy"
         f" && systemctl restart {AGENT}")
    try:
        wait_for(lambda: is_open(c, "iptables-legacy-save"), 10, "the legacy chain")
        c.run(["systemctl", "stop", "novell-sslvpn"])
        wait_for(lambda: blocked(c, "iptables-legacy-save") and blocked(c, "ip6tables-legacy-save"),
                 10, "the legacy REJECT rule")
        c.run(["systemctl", "start", "novell-sslvpn"])
        wait_for(lambda: is_open(c, "iptables-legacy-save"), 10, "the legacy chain open")
        c.run(["systemctl", "stop", AGENT])
        c.run([AGENT, "cleanup"])
        assert not chain(c, "iptables-legacy-save") and not chain(c, "ip6tables-legacy-save")
    finally:
        c.sh(f"{alt} iptables /usr/sbin/iptables-nft && {alt} ip6tables /usr/sbin/ip6tables-nft"
             f" && systemctl start {AGENT}")


def saved_rules(c: Container) -> list[str]:
    """Every table of both families as iptables-save prints them, with counters, comments
    (the time stamps) dropped."""
    return ["\n".join(ln for ln in c.run([save, "-c"]).stdout.splitlines() if not ln.startswith("#"))
            for save in ("iptables-save", "ip6tables-save")]


def test_foreign_chain_is_refused_under_systemd(baseline: Container) -> None:
    """Another tool's chain of the configured name: the unit fails to start with exit 78 and is
    not restarted, block refuses it too, the journal names the chain, and both families' rules
    stay byte for byte."""
    c = baseline
    c.run(["systemctl", "stop", AGENT])
    c.run([AGENT, "cleanup"])
    foreign = (f"*filter\n:{CHAIN} - [0:0]\n-A INPUT -j {CHAIN}\n"
               f"-A {CHAIN} -s 198.51.100.0/24 -j ACCEPT\nCOMMIT\n")
    c.run(["iptables-restore", "--noflush"], input=foreign)
    c.run(["ip6tables-restore", "--noflush"], input=foreign.replace("198.51.100.0/24",
                                                                    "2001:db8::/32"))
    before = saved_rules(c)
    cur = cursor(c)
    try:
        proc = c.run(["systemctl", "start", AGENT], check=False)
        assert proc.returncode != 0
        assert show(c, "ExecMainStatus") == "78" and show(c, "SubState") == "failed", \
            show(c, "SubState")
        refused = since(c, cur, "config-invalid")
        assert refused and f"chain {CHAIN} belongs to someone else" in refused[0]["event.reason"]
        block = c.run([AGENT, "block"], check=False)
        assert block.returncode == 78 and "198.51.100.0/24" in block.stderr, block.stderr
        assert saved_rules(c) == before
    finally:
        for prog in ("iptables", "ip6tables"):
            c.sh(f"{prog} -D INPUT -j {CHAIN}; {prog} -F {CHAIN}; {prog} -X {CHAIN}", check=False)
        c.run(["systemctl", "reset-failed", AGENT])


def test_start_limit_an_operator_meets(baseline: Container) -> None:
    """Ten starts by hand within a minute are all honoured; the eleventh meets the start limit
    (start-limit-hit) until `systemctl reset-failed`, as README says."""
    c = baseline
    c.run(["systemctl", "reset-failed", AGENT])  # this session's earlier starts count too
    for i in range(10):
        proc = c.run(["systemctl", "restart", AGENT], check=False)
        assert proc.returncode == 0, f"restart {i + 1}: {proc.stderr}"
    proc = c.run(["systemctl", "restart", AGENT], check=False)
    assert proc.returncode != 0 and show(c, "Result") == "start-limit-hit", proc.stderr
    c.run(["systemctl", "reset-failed", AGENT])
    c.run(["systemctl", "start", AGENT])
    assert active(c)
    c.run(["systemctl", "reset-failed", AGENT])  # the steps below start it again


# --- upgrade, removal ---------------------------------------------------------------------------


def test_upgrade_never_opens_a_blocked_chain(machine: Machine, c: Container) -> None:
    """apt installs the rebuilt higher version while the service is down: the new daemon
    replaces the old one and the chain stays blocked at every sample taken meanwhile."""
    wait_for(lambda: active(c), 30, "the agent active")
    c.run(["systemctl", "stop", "novell-sslvpn"])
    wait_for(lambda: blocked(c), 10, "the REJECT rule")
    old = main_pid(c)
    samples: list[bool] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(blocked(c))

    t = threading.Thread(target=sample)
    t.start()
    try:
        deb = DEB_DIR / machine.debs.upgrade.deb.name
        c.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", str(deb)], timeout=300)
        wait_for(lambda: main_pid(c) not in (0, old) and active(c), 30, "the new daemon")
    finally:
        done.set()
        t.join()
    assert samples and all(samples), f"{samples.count(False)} of {len(samples)} samples open"
    version = c.run(["dpkg-query", "-W", "-f=${Version}", AGENT]).stdout
    assert version == machine.debs.upgrade_version
    c.run(["systemctl", "start", "novell-sslvpn"])
    wait_for(lambda: is_open(c), 10, "the chain open")


def test_remove_and_purge(c: Container) -> None:
    """remove stops the agent and deletes chain and jump in both families; purge removes the
    configuration, state and logs; the system user stays."""
    c.run(["apt-get", "remove", "-y", "-q", AGENT], timeout=300)
    assert show(c, "ActiveState") in ("inactive", "")
    for save in ("iptables-save", "ip6tables-save", "iptables-legacy-save", "ip6tables-legacy-save"):
        assert not chain(c, save), (save, chain(c, save))
    assert c.run(["test", "-e", CONFIG], check=False).returncode == 0
    c.run(["apt-get", "purge", "-y", "-q", AGENT], timeout=300)
    for path in ("/etc/sslvpn-heartbeat", "/var/lib/sslvpn-heartbeat", "/var/log/sslvpn-heartbeat",
                 "/usr/sbin/sslvpn-heartbeat", "/lib/systemd/system/sslvpn-heartbeat.service"):
        assert c.run(["test", "-e", path], check=False).returncode != 0, path
    assert c.run(["getent", "passwd", AGENT], check=False).returncode == 0


def test_host_rule_sets_hold_nothing_of_the_agent(machine: Machine) -> None:
    """After the whole session, the host's rule sets (iptables and ip6tables of both flavours,
    nft) hold nothing of the agent, as before it."""
    machine.container.shutdown()
    after = host_rulesets()
    for name, text in after.items():
        assert AGENT not in text, f"{name} on the host names the agent:\n{text}"
        assert AGENT not in machine.host_before[name]
