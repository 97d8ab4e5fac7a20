"""The .deb: built with Debian's python3, lintian-clean, installed with apt, driven, purged."""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netns import Netns, wait_for
from tests.packaging.debpkg import (
    CLEAN_ENV,
    PACKAGE,
    BuiltPackage,
    Installed,
    dpkg_status,
    unit_settings,
)

# once: built with Debian's python3, whatever the venv
pytestmark = [pytest.mark.slow, pytest.mark.once]

PRIVATE = Path("/usr/share/sslvpn-heartbeat")
COMMAND = Path("/usr/sbin/sslvpn-heartbeat")
UNIT = Path("/lib/systemd/system/sslvpn-heartbeat.service")
INIT = Path("/etc/init.d/sslvpn-heartbeat")
DEFAULTS = Path("/etc/default/sslvpn-heartbeat")
CHAIN = "sslvpn-heartbeat-chain"
AGENT = "sslvpn-heartbeat"
CONFIG = Path("/etc/sslvpn-heartbeat/config.toml")
STATE = Path("/var/lib/sslvpn-heartbeat")
LOGS = Path("/var/log/sslvpn-heartbeat")
XTABLES_LOCK = Path("/run/xtables.lock")
# 1.9 as root; 1.7 as its own user with CAP_NET_ADMIN and CAP_NET_RAW (1.6 without NET_RAW).
MAX_EXPOSURE = 1.7
# CAP_NET_ADMIN (12) and CAP_NET_RAW (13), as /proc/PID/status prints capability sets.
AGENT_CAPS = f"{(1 << 12) | (1 << 13):016x}"


def run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    """Run a command with Debian's PATH, output captured, never raising on its exit status."""
    return subprocess.run(argv, capture_output=True, text=True, env=CLEAN_ENV,  # type: ignore[call-overload]
                          check=False, **kw)


def debian_python_version() -> str:
    """The version of Debian's /usr/bin/python3."""
    return run(["/usr/bin/python3", "-c", "import platform; print(platform.python_version())"]
               ).stdout.strip()


# --- the build ---------------------------------------------------------------------------------


def test_build_uses_debian_python_and_runs_unit_tests(built: BuiltPackage) -> None:
    """dh_auto_test ran tests/unit with Debian's python3 (not a pyenv/venv one) and they passed."""
    version = debian_python_version()
    assert f"platform linux -- Python {version}," in built.log, "unit tests did not run on " \
        f"Debian's python3 {version}"
    assert re.search(r"=+ \d+ passed", built.log), "no passing pytest summary in the build log"
    assert "tests/unit" in built.log


def test_build_leaves_work_tree_clean(built: BuiltPackage) -> None:
    """The build ran in a temporary copy: no build products appear in the work tree."""
    from tests.netns import REPO

    for leftover in (".pybuild", "debian/.debhelper", "debian/sslvpn-heartbeat", "debian/files"):
        assert not (REPO / leftover).exists(), f"{leftover} in the work tree"
    assert built.tree != REPO


def test_depends_come_from_dh_python3_plus_iptables(built: BuiltPackage) -> None:
    """Depends lists adduser, iptables and the Debian package of each runtime Python dependency."""
    depends = run(["dpkg-deb", "-f", str(built.deb), "Depends"]).stdout
    names = {d.strip().split()[0] for d in depends.split(",") if d.strip()}
    assert {"adduser", "iptables", "python3-pyroute2", "python3-pyinotify", "python3-iptables",
            "python3-structlog"} <= names, depends
    assert any(n.startswith("python3") and "pyroute2" not in n for n in names)


def test_package_layout_is_an_application(built: BuiltPackage) -> None:
    """Modules in the private dir, command in /usr/sbin, nothing on the global python3 path."""
    listing = run(["dpkg-deb", "-c", str(built.deb)]).stdout
    paths = {line.split()[-1].lstrip(".") for line in listing.splitlines()}
    for need in ("/usr/sbin/sslvpn-heartbeat", f"{PRIVATE}/watcher/cli/commands.py",
                 f"{PRIVATE}/watcher/sources/__init__.py", f"{PRIVATE}/rules/model.py",
                 str(UNIT), str(INIT), str(DEFAULTS), "/etc/sslvpn-heartbeat/config.toml",
                 "/usr/share/man/man8/sslvpn-heartbeat.8.gz", "/etc/logrotate.d/sslvpn-heartbeat",
                 "/usr/lib/tmpfiles.d/sslvpn-heartbeat.conf",
                 "/usr/share/doc/sslvpn-heartbeat/examples/rsyslog/sslvpn-heartbeat.conf",
                 "/usr/share/doc/sslvpn-heartbeat/examples/rsyslog/collector.conf"):
        assert need in paths, f"{need} missing from the package"
    assert not [p for p in paths if "dist-packages" in p or p.startswith("/usr/bin/")]
    assert not [p for p in paths if "/tests/" in p or ".hypothesis" in p or "__pycache__" in p]


def test_lintian_is_clean(built: BuiltPackage) -> None:
    """lintian --pedantic -I -E reports nothing: no error, warning, info, pedantic or experimental."""
    proc = run(["lintian", "--pedantic", "-I", "-E", "--no-tag-display-limit", str(built.changes)],
               timeout=600)
    tags = [ln for ln in proc.stdout.splitlines() if re.match(r"^[EWIPX]: ", ln)]
    assert not tags, "lintian:\n" + "\n".join(tags)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- installed ---------------------------------------------------------------------------------


def owner(path: Path) -> tuple[str, str, int]:
    """(user, group, permission bits) of ``path``, not following a symlink."""
    st = path.lstat()
    return (pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name,
            stat.S_IMODE(st.st_mode))


def test_installed_files_and_modes(installed: Installed) -> None:
    """apt installed the files; state and log dirs are the agent's; lock, config and rc links."""
    assert dpkg_status() == "installed"
    assert os.access(COMMAND, os.X_OK) and os.access(INIT, os.X_OK)
    assert STATE.is_dir() and owner(STATE) == (AGENT, AGENT, 0o700)
    assert LOGS.is_dir() and owner(LOGS) == (AGENT, AGENT, 0o750)
    assert owner(CONFIG) == ("root", AGENT, 0o640)
    assert XTABLES_LOCK.is_file(), "tmpfiles.d did not create the xtables lock"
    assert owner(XTABLES_LOCK) == ("root", AGENT, 0o660)
    assert list(Path("/etc").glob("rc2.d/S*sslvpn-heartbeat")), "init script not enabled"
    assert list(Path("/etc").glob("rc0.d/K*sslvpn-heartbeat"))
    conffiles = run(["dpkg-query", "-W", "-f=${Conffiles}", PACKAGE]).stdout
    assert "/etc/sslvpn-heartbeat/config.toml" in conffiles
    assert str(DEFAULTS) in conffiles


def test_installed_logrotate_rotates_as_the_agent(installed: Installed, tmp_path: Path) -> None:
    """The installed logrotate entry rotates the agent's *.log as its user: the new file is the
    agent's (0640), so it can reopen it, and the old one keeps every line."""
    events = LOGS / "events-logrotate-test.log"
    line = '{"event.action": "probe-failed"}\n'
    try:
        events.write_text(line)
        os.chown(events, pwd.getpwnam(AGENT).pw_uid, grp.getgrnam(AGENT).gr_gid)
        os.chmod(events, 0o640)
        proc = run(["logrotate", "-v", "-f", "-s", str(tmp_path / "state"),
                    "/etc/logrotate.d/sslvpn-heartbeat"])
        assert proc.returncode == 0, proc.stderr
        pw = pwd.getpwnam(AGENT)
        assert f"switching euid from 0 to {pw.pw_uid}" in proc.stderr + proc.stdout
        assert owner(events) == (AGENT, AGENT, 0o640)
        rotated = LOGS / (events.name + ".1")
        assert rotated.read_text() == line  # delaycompress: the first rotation stays plain
        assert owner(rotated)[0] == AGENT
    finally:
        for f in LOGS.glob(events.name + "*"):
            f.unlink()


def test_agent_user_is_a_system_account(installed: Installed) -> None:
    """postinst made a system user with its own group, no login shell, home the state dir."""
    user = pwd.getpwnam(AGENT)
    group = grp.getgrnam(AGENT)
    assert user.pw_gid == group.gr_gid
    assert 0 < user.pw_uid < 1000, user
    assert user.pw_dir == str(STATE)
    assert user.pw_shell.endswith(("/nologin", "/false")), user.pw_shell
    override = run(["dpkg-statoverride", "--list", str(CONFIG)]).stdout.split()
    assert override == ["root", AGENT, "640", str(CONFIG)]


def test_installed_unit_runs_as_the_agent(installed: Installed) -> None:
    """The installed unit runs as the user with CAP_NET_ADMIN and CAP_NET_RAW, nothing else."""
    u = unit_settings(UNIT)
    assert u["User"] == [AGENT] and u["Group"] == [AGENT]
    caps = {"CAP_NET_ADMIN", "CAP_NET_RAW"}
    assert set(u["AmbientCapabilities"][0].split()) == caps
    assert set(u["CapabilityBoundingSet"][0].split()) == caps


def test_cli_runs_from_private_dir(installed: Installed) -> None:
    """The command works from /usr/sbin, while `import watcher` fails on the global python3 path."""
    proc = run([str(COMMAND), "--help"], cwd="/")
    assert proc.returncode == 0, proc.stderr
    assert "usage" in proc.stdout.lower()
    for sub in ("run", "check", "status", "block", "unblock", "cleanup", "config-check"):
        assert sub in proc.stdout, f"subcommand {sub} missing from --help"
    glob = run(["/usr/bin/python3", "-c", "import watcher"], cwd="/")
    assert glob.returncode != 0 and "ModuleNotFoundError" in glob.stderr


def test_config_check_accepts_shipped_config(installed: Installed) -> None:
    """`config-check` accepts the shipped /etc/sslvpn-heartbeat/config.toml (in a namespace: as
    root it also reads the firewall, for a chain of someone else's)."""
    proc = installed.ns.run([str(COMMAND), "config-check", "--config", str(CONFIG)],
                            env=CLEAN_ENV, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_config_check_rejects_bad_config_with_78(installed: Installed, tmp_path: Path) -> None:
    """A bad key makes config-check exit 78 and name the key (the init script relies on it)."""
    bad = tmp_path / "bad.toml"
    bad.write_text("[service]\nport = 0\n")
    proc = installed.ns.run([str(COMMAND), "config-check", "--config", str(bad)], env=CLEAN_ENV,
                            check=False)
    assert proc.returncode == 78
    assert "service.port" in proc.stdout + proc.stderr


def test_systemd_analyze_verify(installed: Installed) -> None:
    """systemd-analyze verify accepts the installed unit without a word about it."""
    proc = run(["systemd-analyze", "verify", str(UNIT)])
    assert proc.returncode == 0, proc.stderr
    assert "sslvpn-heartbeat" not in proc.stderr, proc.stderr


def test_systemd_security_exposure(installed: Installed) -> None:
    """systemd-analyze security --offline rates the unit's exposure at most 1.7."""
    proc = run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(UNIT)])
    assert proc.returncode == 0, proc.stderr
    m = re.search(r"Overall exposure level for sslvpn-heartbeat\.service: (\d+\.\d+)", proc.stdout)
    assert m, proc.stdout[-2000:]
    assert float(m.group(1)) <= MAX_EXPOSURE, proc.stdout


def test_init_script_usage_and_syntax(installed: Installed) -> None:
    """The init script parses with sh -n and answers an unknown action with usage and exit 3."""
    assert run(["sh", "-n", str(INIT)]).returncode == 0
    proc = run([str(INIT), "no-such-action"])
    assert proc.returncode == 3 and "Usage" in proc.stderr


# --- the init script driving the real daemon in a namespace ------------------------------------

FAKE_SERVICE = """
import http.server, os, sys
pid_file, port = sys.argv[1], int(sys.argv[2])
srv = http.server.HTTPServer(("0.0.0.0", port), http.server.BaseHTTPRequestHandler)
tmp = pid_file + ".tmp"
with open(tmp, "w") as f:
    f.write(f"{os.getpid()}\\n")
os.rename(tmp, pid_file)
srv.serve_forever()
"""


class Scene:
    """A namespace with a fake service, a test config, and the defaults file pointing at it.

    Its files live in a directory that the agent's user can traverse (pytest's own temporary
    directories are root's alone), and its state directory belongs to that user.
    """

    def __init__(self, ns: Netns, top: Path, flavour: str = "nft") -> None:
        self.ns, self.tmp, self.flavour = ns, top, flavour
        self.pid_file = top / "svc.pid"
        self.log = top / "daemon.log"
        self.config = top / "config.toml"
        self.state = top / "state"
        self.state.mkdir(mode=0o700)
        shutil.chown(self.state, AGENT, AGENT)
        self.config.write_text(
            "[service]\n"
            f'pid_file = "{self.pid_file}"\nport = 8080\n'
            "[probe]\ninterval_s = 0.5\ntimeout_ms = 500\nrise_interval_ms = 50\n"
            f'[state]\ndir = "{self.state}"\n'
        )
        self.service: subprocess.Popen[bytes] | None = None

    def start_service(self) -> None:
        """Start the fake service and wait for its PID file."""
        self.pid_file.unlink(missing_ok=True)
        self.service = self.ns.popen(["/usr/bin/python3", "-c", FAKE_SERVICE,
                                      str(self.pid_file), "8080"])
        wait_for(self.pid_file.exists, 10, "the fake service's PID file")

    def kill_service(self) -> None:
        """SIGKILL the fake service."""
        assert self.service is not None
        os.kill(self.service.pid, signal.SIGKILL)
        self.service.wait(5)

    def init(self, action: str) -> subprocess.CompletedProcess[str]:
        """Run the installed init script's ``action`` inside the namespace."""
        return self.ns.run([str(INIT), action], env=CLEAN_ENV, check=False, timeout=120)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run the installed command as root inside the namespace, with the scene's config."""
        return self.ns.run([str(COMMAND), *args, "--config", str(self.config)], env=CLEAN_ENV,
                           check=False, timeout=60)

    def chain(self) -> str:
        """The agent's chain in the namespace, as iptables-save prints it (IPv4)."""
        save = "iptables-save" if self.flavour == "nft" else "iptables-legacy-save"
        out = self.ns.run([save, "-t", "filter"]).stdout
        return "\n".join(ln for ln in out.splitlines() if CHAIN in ln)

    def blocked(self) -> bool:
        """True if the chain holds the REJECT rule for port 8080 (full block or drain)."""
        return "--dport 8080" in self.chain() and "REJECT" in self.chain()

    def drained(self) -> bool:
        """True if the chain holds the drain rule: REJECT of new connections (SYN) only."""
        return self.blocked() and "--tcp-flags FIN,SYN,RST,ACK SYN" in self.chain()

    def daemon_pid(self) -> int:
        """The PID that the init script's PID file names."""
        return int(Path("/run/sslvpn-heartbeat.pid").read_text().strip())

    def log_events(self, action: str) -> list[dict[str, object]]:
        """The daemon's JSON log lines (captured by the init script) with this event.action."""
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if isinstance(ev, dict) and ev.get("event.action") == action:
                out.append(ev)
        return out


def proc_status(pid: int) -> dict[str, str]:
    """The fields of /proc/PID/status."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def make_scene(installed: Installed, flavour: str, defaults_extra: str = "") -> Iterator[Scene]:
    """A scene in a fresh namespace; the defaults file restored and the daemon stopped after."""
    top = Path(tempfile.mkdtemp(prefix="sslvpn-pkg-"))
    top.chmod(0o755)
    ns = Netns("pki")
    s = Scene(ns, top, flavour)
    saved = DEFAULTS.read_bytes()
    DEFAULTS.write_text(f"CONFIG={s.config}\nLOGFILE={s.log}\nSTART_TIMEOUT=20\nSTOP_TIMEOUT=5\n"
                        + defaults_extra)
    try:
        yield s
    finally:
        try:
            s.init("stop")
        finally:
            DEFAULTS.write_bytes(saved)
            ns.close()
            Path("/run/sslvpn-heartbeat.pid").unlink(missing_ok=True)
            shutil.rmtree(top, ignore_errors=True)


@pytest.fixture
def scene(installed: Installed) -> Iterator[Scene]:
    """A fresh namespace and test config on the host's iptables (nf_tables on Debian 12)."""
    yield from make_scene(installed, "nft")


@pytest.fixture
def legacy_scene(installed: Installed) -> Iterator[Scene]:
    """A scene whose iptables commands are the legacy ones (PATH set in the defaults file)."""
    for tool in ("iptables-legacy", "iptables-legacy-save", "iptables-legacy-restore"):
        # part of Debian's iptables package, which the package depends on: missing is a failure
        assert shutil.which(tool, path=CLEAN_ENV["PATH"]), f"{tool} not installed"
    top_bin = Path(tempfile.mkdtemp(prefix="sslvpn-legacy-bin-"))
    top_bin.chmod(0o755)
    try:
        for fam in ("iptables", "ip6tables"):
            for suffix in ("", "-save", "-restore"):
                target = shutil.which(f"{fam}-legacy{suffix}", path=CLEAN_ENV["PATH"])
                assert target
                (top_bin / f"{fam}{suffix}").symlink_to(target)
        yield from make_scene(installed, "legacy", f"PATH={top_bin}:{CLEAN_ENV['PATH']}\n")
    finally:
        shutil.rmtree(top_bin, ignore_errors=True)


@pytest.mark.netns
def test_init_script_start_status_stop(scene: Scene) -> None:
    """start waits for readiness, status reports it, the chain follows health, stop opens it."""
    scene.start_service()
    proc = scene.init("start")
    assert proc.returncode == 0, proc.stdout + proc.stderr + scene.log.read_text(errors="replace")
    # READY=1 comes after the first probe and swap: the chain exists, open, when start returns.
    assert f":{CHAIN}" in scene.chain() and not scene.blocked(), scene.chain()
    assert scene.init("status").returncode == 0
    scene.kill_service()
    wait_for(scene.blocked, 10, "the REJECT rule after the service died")
    proc = scene.init("stop")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert scene.init("status").returncode == 3
    assert not scene.blocked(), "stop (on_exit = open) left the REJECT rule"
    assert not Path("/run/sslvpn-heartbeat.pid").exists()


@pytest.mark.netns
def test_init_script_start_refuses_bad_config(scene: Scene) -> None:
    """start fails at once on an invalid config, starts nothing and changes no rule."""
    scene.config.write_text("[firewall]\non_exit = \"sometimes\"\n")
    proc = scene.init("start")
    assert proc.returncode != 0
    assert scene.init("status").returncode == 3
    assert scene.chain() == ""


@pytest.mark.netns
def test_try_restart_keep_never_opens_a_blocked_chain(scene: Scene) -> None:
    """The upgrade restart replaces the daemon while the REJECT rule stays in place throughout."""
    scene.start_service()
    assert scene.init("start").returncode == 0
    scene.kill_service()
    wait_for(scene.blocked, 10, "the REJECT rule after the service died")
    old_pid = Path("/run/sslvpn-heartbeat.pid").read_text().strip()
    gaps: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            if not scene.blocked():
                gaps.append(scene.chain())

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        proc = scene.init("try-restart-keep")
    finally:
        stop.set()
        watcher.join(10)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    new_pid = Path("/run/sslvpn-heartbeat.pid").read_text().strip()
    assert new_pid != old_pid, "the daemon was not replaced"
    assert not gaps, f"the chain was open during the restart: {gaps[0]!r}"
    assert scene.blocked()


@pytest.mark.netns
def test_init_script_runs_the_agent_as_its_user_with_two_capabilities(scene: Scene) -> None:
    """The daemon runs as sslvpn-heartbeat with CAP_NET_ADMIN+CAP_NET_RAW only, no new privs."""
    scene.start_service()
    proc = scene.init("start")
    assert proc.returncode == 0, proc.stdout + proc.stderr + scene.log.read_text(errors="replace")
    status = proc_status(scene.daemon_pid())
    agent = pwd.getpwnam(AGENT)
    assert status["Uid"].split() == [str(agent.pw_uid)] * 4
    assert status["Gid"].split() == [str(agent.pw_gid)] * 4
    for field in ("CapPrm", "CapEff", "CapAmb", "CapBnd", "CapInh"):
        assert status[field] == AGENT_CAPS, f"{field} {status[field]}"
    assert status["NoNewPrivs"] == "1"
    # The readiness socket's directory is gone: start-stop-daemon cleaned it up after READY=1.
    assert not list(Path("/run").glob(".s-s-d-notify.*"))
    # daemon.json, written by the agent as its user, in its own state directory.
    wait_for(lambda: (scene.state / "daemon.json").exists(), 10, "daemon.json")
    assert (scene.state / "daemon.json").stat().st_uid == agent.pw_uid


@pytest.mark.netns
def test_root_cli_drain_stays_a_drain_under_the_agent_user(scene: Scene) -> None:
    """block --drain by root is read by the user's daemon as a drain; unblock opens the chain."""
    scene.start_service()
    proc = scene.init("start")
    assert proc.returncode == 0, proc.stdout + proc.stderr + scene.log.read_text(errors="replace")
    assert not scene.blocked()
    reason = "packaging drain test"
    proc = scene.cli("block", "--drain", "--reason", reason)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    admin = scene.state / "admin-block.json"
    assert owner(admin) == (AGENT, AGENT, 0o600)
    # The daemon saw the file and logged the block with the operator's reason: it could read it
    # (an unreadable file would be logged as a full block with another reason).
    wait_for(lambda: [e for e in scene.log_events("admin-block") if e.get("event.reason") == reason],
             10, "the daemon's admin-block event with the operator's reason")
    report = json.loads(scene.cli("status", "--json").stdout)
    assert report["daemon"]["admin"] is True and report["daemon"]["mode"] == "drain", report
    assert scene.drained(), scene.chain()
    # The service dies during the drain: the admin block still decides, and it is a drain.
    scene.kill_service()
    wait_for(lambda: json.loads(scene.cli("status", "--json").stdout)["daemon"]["health"] == "down",
             10, "the daemon to see the service down")
    assert scene.drained(), scene.chain()
    scene.start_service()
    proc = scene.cli("unblock")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wait_for(lambda: not scene.blocked(), 10, "the chain to open after unblock")
    assert not admin.exists()


@pytest.mark.netns
def test_legacy_iptables_works_under_the_agent_user(legacy_scene: Scene) -> None:
    """On legacy iptables the user's daemon blocks and opens (CAP_NET_RAW, group-writable lock)."""
    scene = legacy_scene
    scene.start_service()
    proc = scene.init("start")
    assert proc.returncode == 0, proc.stdout + proc.stderr + scene.log.read_text(errors="replace")
    assert owner(XTABLES_LOCK) == ("root", AGENT, 0o660)
    assert f":{CHAIN}" in scene.chain() and not scene.blocked(), scene.chain()
    assert proc_status(scene.daemon_pid())["Uid"].split()[0] == str(pwd.getpwnam(AGENT).pw_uid)
    scene.kill_service()
    wait_for(scene.blocked, 10, "the REJECT rule (legacy) after the service died")
    scene.start_service()
    wait_for(lambda: not scene.blocked(), 15, "the chain (legacy) to open again")
    assert not scene.log_events("apply-failed"), scene.log.read_text(errors="replace")[-3000:]


# --- removal -----------------------------------------------------------------------------------


def test_purge_leaves_nothing(installed: Installed) -> None:
    """Removal deletes the chain and jump; purge leaves no file and no privilege, only the user."""
    installed.ensure()
    files = [Path(p) for p in run(["dpkg-query", "-L", PACKAGE]).stdout.splitlines() if p]
    ns = installed.ns
    # The agent's chain, blocked, as the daemon or an admin block leaves it.
    block = ns.run([str(COMMAND), "block", "--reason", "packaging test", "--config",
                    "/etc/sslvpn-heartbeat/config.toml"], env=CLEAN_ENV, check=False)
    assert block.returncode == 0, block.stdout + block.stderr
    assert CHAIN in ns.run(["iptables-save", "-t", "filter"]).stdout
    installed.purge()
    assert dpkg_status() == "not-installed"
    assert CHAIN not in ns.run(["iptables-save", "-t", "filter"]).stdout, "a rule outlived it"
    if ns.run(["sh", "-c", "command -v ip6tables-save"], check=False).returncode == 0:
        assert CHAIN not in ns.run(["ip6tables-save", "-t", "filter"]).stdout
    shared = {Path(p) for p in ("/etc", "/etc/default", "/etc/init.d", "/etc/logrotate.d", "/lib",
                                "/lib/systemd", "/lib/systemd/system", "/usr", "/usr/lib",
                                "/usr/lib/tmpfiles.d", "/usr/sbin", "/usr/share",
                                "/usr/share/doc", "/usr/share/man", "/usr/share/man/man8",
                                "/usr/share/python3", "/usr/share/python3/runtime.d", "/.",
                                # node_exporter's textfile directory, where the metrics link is
                                "/var", "/var/lib", "/var/lib/prometheus",
                                "/var/lib/prometheus/node-exporter")}
    left = [p for p in files if p not in shared and (p.exists() or p.is_symlink())]
    assert not left, f"left behind: {left}"
    for path in (PRIVATE, Path("/etc/sslvpn-heartbeat"), Path("/var/lib/sslvpn-heartbeat"),
                 Path("/var/log/sslvpn-heartbeat"), Path("/run/sslvpn-heartbeat.pid")):
        assert not path.exists(), f"{path} left behind"
    assert not list(Path("/etc").glob("rc?.d/*sslvpn-heartbeat"))
    assert not Path("/etc/systemd/system/multi-user.target.wants/sslvpn-heartbeat.service"
                    ).is_symlink()
    # The system user and group stay (Debian's habit: their ids may still own files elsewhere);
    # what they were granted goes: the config's statoverride and the lock's group.
    assert pwd.getpwnam(AGENT) and grp.getgrnam(AGENT)
    assert run(["dpkg-statoverride", "--list", str(CONFIG)]).stdout == ""
    if XTABLES_LOCK.exists():
        assert owner(XTABLES_LOCK) == ("root", "root", 0o600)

