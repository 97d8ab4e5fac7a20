"""The package and node_exporter: the metrics reach Debian's node_exporter with no step by hand.

The fast checks read the packaging files and ask Debian's node_exporter binary for the directory
it reads by default. The installed check runs the packaged agent through its init script as its
own user, with the shipped [metrics] setting, and Debian's node_exporter as the prometheus user
with its default textfile directory, and follows a failover in the scrape.
"""

from __future__ import annotations

import pwd
import re
import shutil
import stat
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.netns import REPO, wait_for
from tests.packaging.debpkg import CLEAN_ENV, Installed, unit_settings
from tests.packaging.test_deb import AGENT, Scene, make_scene

PKG = REPO / "packaging"
NODE_EXPORTER = "/usr/bin/prometheus-node-exporter"
TEXTFILE_DIR = Path("/var/lib/prometheus/node-exporter")  # Debian's node_exporter reads it
METRICS_DIR = Path("/var/lib/sslvpn-heartbeat-metrics")  # the agent writes here
METRICS_FILE = METRICS_DIR / "sslvpn-heartbeat.prom"
LINK = TEXTFILE_DIR / "sslvpn-heartbeat.prom"
LISTEN = "127.0.0.1:9100"


def node_exporter_default_dir() -> str:
    """The textfile directory Debian's node_exporter reads when not told otherwise."""
    assert shutil.which(NODE_EXPORTER), "Debian's prometheus-node-exporter is missing"
    out = subprocess.run([NODE_EXPORTER, "--help"], capture_output=True, text=True, timeout=30)
    m = re.search(r'--collector\.textfile\.directory="([^"]+)"', out.stdout + out.stderr)
    assert m, out.stdout + out.stderr
    return m.group(1)


def test_shipped_metrics_file_is_linked_into_node_exporters_default_directory() -> None:
    """The packaged config's file is the target of the package's link in node_exporter's dir."""
    cfg = tomllib.loads((PKG / "config.toml").read_text())
    assert Path(cfg["metrics"]["textfile"]) == METRICS_FILE
    assert str(TEXTFILE_DIR) == node_exporter_default_dir()
    links = [ln.split() for ln in (REPO / "debian" / "sslvpn-heartbeat.links").read_text()
             .splitlines() if ln and not ln.startswith("#")]
    assert [str(METRICS_FILE).lstrip("/"), str(LINK).lstrip("/")] in links


def test_unit_makes_the_metrics_directory_writable() -> None:
    """ReadWritePaths= lists the metrics directory; the postinst makes it, 0755, the agent's."""
    u = unit_settings(PKG / "sslvpn-heartbeat.service")
    paths = [p for line in u["ReadWritePaths"] for p in line.split()]
    assert f"-{METRICS_DIR}" in paths
    postinst = (REPO / "debian" / "sslvpn-heartbeat.postinst").read_text()
    assert f'install -d -o "$AGENT" -g "$AGENT" -m 0755 {METRICS_DIR}' in postinst
    assert subprocess.run(["sh", "-n", str(REPO / "debian" / "sslvpn-heartbeat.postinst")]
                          ).returncode == 0


@pytest.fixture
def metrics_scene(installed: Installed) -> Iterator[Scene]:
    """A scene of the installed package whose config adds the shipped [metrics] section."""
    assert shutil.which(NODE_EXPORTER), "prometheus-node-exporter missing (scripts/bootstrap)"
    for s in make_scene(installed, "nft"):
        s.config.write_text(s.config.read_text()
                            + f'[metrics]\ntextfile = "{METRICS_FILE}"\n')
        yield s


def _scrape(scene: Scene) -> str:
    return scene.ns.run(["curl", "-sf", "--max-time", "5", f"http://{LISTEN}/metrics"],
                        check=False).stdout


def _value(scene: Scene, name: str, **labels: str) -> float | None:
    """One sample of node_exporter's /metrics (it re-renders values: 1, not 1.0)."""
    for fam in text_string_to_metric_families(_scrape(scene)):
        for s in fam.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    return None


@pytest.mark.slow
@pytest.mark.netns
@pytest.mark.once  # the installed .deb runs Debian's python3, whatever the venv
def test_installed_agent_metrics_reach_node_exporter_as_prometheus(
        metrics_scene: Scene) -> None:
    """Package + node_exporter: the agent (its own user) writes, node_exporter (prometheus) serves."""
    scene = metrics_scene
    # Installed, before any run: the link resolves to a first file saying up 0.
    assert LINK.is_symlink() and LINK.resolve() == METRICS_FILE
    assert "sslvpn_heartbeat_up 0.0" in METRICS_FILE.read_text()
    st = METRICS_DIR.stat()
    assert st.st_uid == pwd.getpwnam(AGENT).pw_uid and stat.S_IMODE(st.st_mode) == 0o755
    scene.start_service()
    proc = scene.init("start")
    assert proc.returncode == 0, proc.stdout + proc.stderr + scene.log.read_text(errors="replace")
    wait_for(lambda: "sslvpn_heartbeat_up 1.0" in METRICS_FILE.read_text(), 10,
             "the agent's first metrics file")
    st = METRICS_FILE.stat()
    assert st.st_uid == pwd.getpwnam(AGENT).pw_uid and stat.S_IMODE(st.st_mode) == 0o644
    with open(scene.tmp / "node_exporter.log", "wb") as log:
        exporter = scene.ns.popen(
            ["setpriv", "--reuid=prometheus", "--regid=prometheus", "--init-groups",
             NODE_EXPORTER, "--collector.disable-defaults", "--collector.textfile",
             f"--web.listen-address={LISTEN}"],  # the default textfile directory
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=CLEAN_ENV)
    wait_for(lambda: exporter.poll() is None
             and _value(scene, "sslvpn_heartbeat_service_healthy") == 1, 10,
             "node_exporter serving the agent's metrics (healthy)")
    assert _value(scene, "node_textfile_scrape_error") == 0
    assert _value(scene, "sslvpn_heartbeat_chain_mode", mode="open") == 1
    assert (_value(scene, "node_textfile_mtime_seconds", file=str(LINK)) or 0) > 0
    scene.kill_service()
    wait_for(lambda: _value(scene, "sslvpn_heartbeat_chain_mode", mode="block") == 1, 10,
             "the scrape showing the chain blocked")
    assert _value(scene, "sslvpn_heartbeat_service_healthy") == 0
    assert _value(scene, "sslvpn_heartbeat_transitions_total", to="down") == 1
    assert scene.init("stop").returncode == 0
    wait_for(lambda: _value(scene, "sslvpn_heartbeat_up") == 0, 10, "up 0 after stop")
    assert _value(scene, "node_textfile_scrape_error") == 0
    assert scene.log_events("metrics-write-failed") == []


@pytest.mark.slow
@pytest.mark.once  # the installed .deb, as above
def test_purge_removes_the_metrics_and_the_link(installed: Installed) -> None:
    """After purge, node_exporter no longer serves the agent's last values."""
    installed.ensure()
    assert LINK.is_symlink() and METRICS_FILE.exists()
    installed.purge()
    assert not LINK.is_symlink() and not METRICS_DIR.exists()
