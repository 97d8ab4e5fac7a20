"""The files under packaging/ agree with the program: fast checks, no build, no root."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from tests.netns import REPO
from tests.packaging.debpkg import unit_settings
from watcher.config import SCHEMA, Config, load_config

PKG = REPO / "packaging"


def test_shipped_config_equals_defaults() -> None:
    """The shipped config.toml says what the built-in defaults say, but for the metrics file.

    The package turns metrics on, in the directory it makes for them; without a configuration
    file there is no metrics file.
    """
    shipped = load_config(PKG / "config.toml")
    assert shipped.metrics.textfile == "/var/lib/sslvpn-heartbeat-metrics/sslvpn-heartbeat.prom"
    assert Config().metrics.textfile == ""
    assert dataclasses.replace(shipped, metrics=Config().metrics) == Config()


OPTIONAL_SECTIONS = {"fleet"}  # present turns a feature on: shipped commented out


def test_shipped_config_sets_and_documents_every_key() -> None:
    """Every key of every section is set in the shipped config, each after a comment line;
    an optional section's keys are there commented out, each after its comment."""
    text = (PKG / "config.toml").read_text()
    data = tomllib.loads(text)
    assert set(data) == set(SCHEMA) - OPTIONAL_SECTIONS
    lines = text.splitlines()
    for section in OPTIONAL_SECTIONS:
        start = lines.index(f"#[{section}]")
        for key in SCHEMA[section][1]:
            idx = next(i for i in range(start, len(lines)) if lines[i].startswith(f"#{key} = "))
            above = idx - 1
            while not lines[above].startswith("# "):  # other commented keys of one comment
                above -= 1
            assert above > start, f"{section}.{key} is not documented"
    for section, (_cls, checks) in SCHEMA.items():
        if section in OPTIONAL_SECTIONS:
            continue
        assert set(data[section]) == set(checks), f"[{section}] keys differ from the schema"
        start = lines.index(f"[{section}]")
        for key in checks:
            idx = next(i for i in range(start, len(lines)) if lines[i].startswith(f"{key} = "))
            above = lines[start + 1:idx]
            assert any(ln.startswith("#") for ln in above), f"{section}.{key} is not documented"


def test_shipped_config_matches_manual_page_defaults() -> None:
    """Port 8080, the chain sslvpn-heartbeat-chain and the novell-sslvpn service, as the manual."""
    cfg = load_config(PKG / "config.toml")
    assert cfg.service.port == 8080
    assert cfg.service.name == "novell-sslvpn"
    assert cfg.firewall.chain == "sslvpn-heartbeat-chain"


def test_man_page_names_every_key_and_subcommand() -> None:
    """sslvpn-heartbeat(8) mentions every config key, subcommand and exit code."""
    man = (PKG / "sslvpn-heartbeat.8").read_text().replace("\\-", "-")
    for section, (_cls, checks) in SCHEMA.items():
        assert f"[{section}]" in man
        for key in checks:
            assert re.search(rf"\b{re.escape(key)}\b", man), f"{section}.{key} not in the man page"
    for sub in ("run", "check", "status", "block", "unblock", "cleanup", "config-check",
                "--drain", "--reason", "--json", "--log-format", "--config"):
        assert sub in man, f"{sub} not in the man page"
    for code in ("0", "1", "2", "69", "75", "78"):
        assert re.search(rf"^\.B {code}$", man, re.M), f"exit code {code} not in the man page"


@pytest.mark.skipif(shutil.which("man") is None, reason="man-db not installed")
def test_man_page_renders_without_warnings() -> None:
    """groff renders the man page without a warning (lintian's groff-message check)."""
    proc = subprocess.run(["man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z",
                           str(PKG / "sslvpn-heartbeat.8")], capture_output=True, text=True,
                          env={"LC_ALL": "C.UTF-8", "MANROFFSEQ": "", "MANWIDTH": "80",
                               "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0
    assert proc.stderr == ""


def lsb_headers(path: Path) -> dict[str, str]:
    """The LSB header fields of an init script."""
    text = path.read_text()
    block = text.split("### BEGIN INIT INFO", 1)[1].split("### END INIT INFO", 1)[0]
    fields: dict[str, str] = {}
    for line in block.splitlines():
        m = re.match(r"# ([A-Za-z-]+):\s*(.*)", line)
        if m:
            fields[m.group(1)] = m.group(2).strip()
    return fields


def test_init_script_headers_as_the_manual_installs_it() -> None:
    """insserv headers: $network $remote_fs, should start after novell-sslvpn, runlevels 2-5."""
    h = lsb_headers(PKG / "sslvpn-heartbeat.init")
    assert h["Provides"] == "sslvpn-heartbeat"
    assert set(h["Required-Start"].split()) == {"$network", "$remote_fs"}
    assert h["Should-Start"].split() == ["novell-sslvpn"]
    assert h["Default-Start"].split() == ["2", "3", "4", "5"]
    assert h["Default-Stop"].split() == ["0", "1", "6"]


def test_init_script_actions() -> None:
    """The init script handles start, stop, restart, force-reload, reload and status; sh -n ok."""
    text = (PKG / "sslvpn-heartbeat.init").read_text()
    for action in ("start", "stop", "restart", "force-reload", "reload", "status",
                   "try-restart-keep"):
        assert re.search(rf"^\s*(\S+\|)*{re.escape(action)}(\|\S+)*\)", text, re.M), action
    assert subprocess.run(["sh", "-n", str(PKG / "sslvpn-heartbeat.init")]).returncode == 0


def test_unit_is_notify_with_watchdog_and_sandbox() -> None:
    """Type=notify, watchdog, restart on failure, two capabilities, writable state and lock."""
    u = unit_settings(PKG / "sslvpn-heartbeat.service")
    assert u["Type"] == ["notify"]
    assert u["WatchdogSec"] and u["Restart"] == ["on-failure"]
    assert set(u["CapabilityBoundingSet"][0].split()) == {"CAP_NET_ADMIN", "CAP_NET_RAW"}
    assert u["ProtectSystem"] == ["strict"]
    assert u["StateDirectory"] == ["sslvpn-heartbeat"]
    # "-": a missing lock file must not keep the unit from starting
    assert "-/run/xtables.lock" in u["ReadWritePaths"][0].split()
    assert "/usr/sbin/sslvpn-heartbeat run" in u["ExecStart"][0]
    for fw in ("netfilter-persistent.service", "firewalld.service", "ufw.service"):
        assert fw in u["After"][0].split() and fw in u["PartOf"][0].split()


def test_unit_reload_validates_first_and_orders_after_the_service() -> None:
    """ExecReload= runs config-check before the SIGHUP (a bad file fails the job); the unit is
    ordered after novell-sslvpn.service without pulling it in; crash loops are bounded."""
    u = unit_settings(PKG / "sslvpn-heartbeat.service")
    assert u["ExecReload"] == ["/usr/sbin/sslvpn-heartbeat config-check --config ${CONFIG}",
                               "/bin/kill -HUP $MAINPID"]
    after = " ".join(u["After"]).split()
    assert "novell-sslvpn.service" in after
    pulls = " ".join(u.get("Requires", []) + u.get("Wants", []) + u.get("BindsTo", [])
                     + u.get("Requisite", []) + u.get("PartOf", []))
    assert "novell-sslvpn" not in pulls
    assert u["StartLimitIntervalSec"] == ["60"] and u["StartLimitBurst"] == ["10"]


def test_unit_runs_as_the_agent_user_with_two_ambient_capabilities() -> None:
    """User=/Group= sslvpn-heartbeat; ambient caps equal the bounding set; private state dir."""
    u = unit_settings(PKG / "sslvpn-heartbeat.service")
    assert u["User"] == ["sslvpn-heartbeat"] and u["Group"] == ["sslvpn-heartbeat"]
    assert len(u["AmbientCapabilities"]) == 1 and len(u["CapabilityBoundingSet"]) == 1
    assert set(u["AmbientCapabilities"][0].split()) == set(u["CapabilityBoundingSet"][0].split())
    assert u["NoNewPrivileges"] == ["yes"]
    assert u["StateDirectoryMode"] == ["0700"]
    assert "DynamicUser" not in u  # the state directory and the lock's group need a fixed user


def test_init_script_grants_what_the_unit_grants() -> None:
    """The init script drops to the same user with the same capabilities as the systemd unit."""
    text = (PKG / "sslvpn-heartbeat.init").read_text()
    u = unit_settings(PKG / "sslvpn-heartbeat.service")
    m = re.search(r"^AGENT=(\S+)$", text, re.M)
    assert m and m.group(1) == u["User"][0]
    m = re.search(r"^AGENT_CAPS=(\S+)$", text, re.M)
    assert m
    init_caps = {c.lstrip("+").upper() for c in m.group(1).split(",")}
    assert {f"CAP_{c}" for c in init_caps} == set(u["CapabilityBoundingSet"][0].split())
    for opt in ("--ambient-caps", "--inh-caps", "--bounding-set", "--no-new-privs", "--reuid"):
        assert opt in text, f"setpriv {opt} missing from the init script"


def test_tmpfiles_makes_the_xtables_lock_writable_by_the_agent_group() -> None:
    """tmpfiles.d creates the lock (f) and fixes an existing one (z): 0660 root:sslvpn-heartbeat."""
    text = (PKG / "sslvpn-heartbeat.tmpfiles").read_text()
    for kind in ("f", "z"):
        assert re.search(rf"^{kind} /run/xtables\.lock 0660 root sslvpn-heartbeat", text, re.M), kind
