"""The cluster's pure parts: the HAProxy configuration, the agent's config, the Reply value."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from tests.testbed.cluster import Reply, Server, default_agent_config, render_haproxy_cfg
from watcher.config import parse_config


def _cfg(mode: str = "server-close") -> list[str]:
    text = render_haproxy_cfg([("server1", "10.200.1.2", 8080), ("server2", "10.200.2.2", 8080)],
                              "10.200.0.1", Path("/tmp/x.sock"), mode)
    return [ln.strip() for ln in text.splitlines()]


def test_haproxy_cfg_is_round_robin_with_retries_redispatch_and_no_checks() -> None:
    """Round robin, 3 retries redispatched every time, no 503 retry, servers without checks."""
    lines = _cfg()
    for want in ("balance roundrobin", "retries 3", "option redispatch 1",
                 "option http-server-close", "bind 10.200.0.1:80",
                 "server server1 10.200.1.2:8080", "server server2 10.200.2.2:8080"):
        assert want in lines
    retry_on = next(ln for ln in lines if ln.startswith("retry-on"))
    assert "conn-failure" in retry_on and "503" not in retry_on
    assert not any(ln.startswith("server") and " check" in ln for ln in lines)
    assert not any("httpchk" in ln for ln in lines)


def test_haproxy_cfg_keep_alive_mode_and_bad_mode() -> None:
    """keep-alive mode reuses server connections; an unknown mode is refused."""
    lines = _cfg("keep-alive")
    assert "option http-keep-alive" in lines and "option http-server-close" not in lines
    with pytest.raises(ValueError):
        _cfg("pipelined")


def test_default_agent_config_names_the_servers_pid_file_and_port(tmp_path: Path) -> None:
    """The default agent config is TOML naming the server's PID file, port and chain."""
    srv = Server(2, None, tmp_path / "server2", 8080, "0.0.0.0", "gw")  # type: ignore[arg-type]
    data = tomllib.loads(default_agent_config(srv))
    assert data["service"]["pid_file"] == str(tmp_path / "server2" / "novell-sslvpn.pid")
    assert data["service"]["port"] == 8080
    assert data["firewall"]["chain"] == "sslvpn-heartbeat-chain"


def test_default_agent_config_is_accepted_by_the_agent(tmp_path: Path) -> None:
    """watcher.config accepts the testbed's agent config (no unknown key, no bad value)."""
    srv = Server(1, None, tmp_path / "server1", 8080, "0.0.0.0", "gw")  # type: ignore[arg-type]
    cfg = parse_config(tomllib.loads(default_agent_config(srv)))
    assert str(cfg.service.pid_file).endswith("novell-sslvpn.pid")


def test_reply_ok_and_server() -> None:
    """Reply unpacks as (status, body); ok means 2xx; server is the body's first word."""
    status, body = Reply(200, "server2\n")
    assert (status, body) == (200, "server2\n")
    assert Reply(200, "server2\n").ok and Reply(200, "server2\n").server == "server2"
    assert not Reply(503, "server1 down\n").ok and Reply(503, "server1 down\n").server == "server1"
    assert Reply(0, "error: ConnectionRefusedError").server == ""


def test_nginx_conf_retries_on_errors_only_with_short_connect_and_local_files(tmp_path: Path) -> None:
    """nginx: next upstream on error/timeout (no 503), 100ms connect, every server with
    max_fails/fail_timeout, listening on the gateway address with a backlog, files in workdir."""
    from tests.testbed.cluster import NGINX_BACKLOG, render_nginx_conf

    text = render_nginx_conf([("server1", "10.200.1.2", 8080), ("server2", "10.200.2.2", 8080)],
                             "10.200.0.1", tmp_path)
    lines = [ln.strip() for ln in text.splitlines()]
    for want in ("daemon off;", "proxy_pass http://sslvpn;", "proxy_next_upstream error timeout;",
                 "proxy_connect_timeout 100ms;", f"listen 10.200.0.1:80 backlog={NGINX_BACKLOG};",
                 f"pid {tmp_path / 'nginx.pid'};"):
        assert want in lines, want
    servers = [ln for ln in lines if ln.startswith("server 10.200.")]
    assert [s.split()[1] for s in servers] == ["10.200.1.2:8080", "10.200.2.2:8080"]
    assert all("max_fails=1" in s and "fail_timeout=" in s for s in servers)
    assert "503" not in text
    paths = [w.rstrip(";") for ln in lines for w in ln.split() if w.startswith("/") and w != "/"]
    assert paths and all(p.startswith(str(tmp_path)) for p in paths), paths


def test_cluster_refuses_an_unknown_gateway_kind() -> None:
    """gateway= is haproxy or nginx; http_mode is server-close or keep-alive (either gateway)."""
    from tests.testbed.cluster import Cluster

    with pytest.raises(ValueError, match="gateway"):
        Cluster(2, gateway="envoy")
    with pytest.raises(ValueError, match="server-close"):
        Cluster(2, gateway="nginx", http_mode="pipelined")
    assert Cluster(2, gateway="nginx", http_mode="keep-alive").nginx_keepalive == 16


def test_nginx_conf_with_keepalive_pools_and_reuses_server_connections(tmp_path: Path) -> None:
    """keepalive=N: an upstream pool of N, HTTP/1.1 to the servers, no Connection: close."""
    from tests.testbed.cluster import render_nginx_conf

    text = render_nginx_conf([("server1", "10.200.1.2", 8080)], "10.200.0.1", tmp_path, 16, "1s")
    for line in ("keepalive 16;", "proxy_http_version 1.1;", 'proxy_set_header Connection "";',
                 "proxy_connect_timeout 1s;"):
        assert line in text
    assert "keepalive 1" not in render_nginx_conf([("s", "10.0.0.1", 80)], "10.0.0.2", tmp_path)
