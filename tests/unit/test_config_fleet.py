"""watcher.config's [fleet] section: off by default, every key validated, errors name the key."""

from __future__ import annotations

from typing import Any

import pytest

from watcher.config import Config, FleetConfig, for_reload, parse_config
from watcher.errors import EX_CONFIG, ConfigError

BASE: dict[str, Any] = {"etcd": ["http://10.0.0.1:2379"], "size": 4}


def _fleet(**over: Any) -> Config:
    return parse_config({"fleet": {**BASE, **over}})


def test_off_by_default() -> None:
    """Without [fleet] the guard is off: Config.fleet is None."""
    assert parse_config({}).fleet is None
    assert Config().fleet is None


def test_defaults() -> None:
    """The defaults issue 18 names: group default, 50 %, one slot, 10 s lease, block when unreachable."""
    f = _fleet().fleet
    assert f is not None
    assert (f.group, f.min_open, f.maintenance_slots, f.lease_s, f.unreachable) == (
        "default", "50%", 1, 10, "block")
    assert f.member and f.etcd == ("http://10.0.0.1:2379",)


@pytest.mark.parametrize(("key", "value"), [
    ("etcd", ["https://a.example:2379", "https://10.0.0.2:2379/"]),
    ("group", "vpn-eu.1"), ("member", "srv-01.example"), ("size", 1), ("min_open", 0),
    ("min_open", 4), ("min_open", "0%"), ("min_open", "100%"), ("maintenance_slots", 0),
    ("lease_s", 2), ("lease_s", 3600), ("unreachable", "open"),
])
def test_good_values(key: str, value: Any) -> None:
    """Valid values of each key are accepted."""
    over = {key: value}
    if key == "etcd":
        over["ca_file"] = "/etc/ssl/etcd-ca.pem"
    assert _fleet(**over).fleet is not None


@pytest.mark.parametrize(("key", "value"), [
    ("etcd", []), ("etcd", "http://a:2379"), ("etcd", ["ftp://a:2379"]), ("etcd", ["http://a"]),
    ("etcd", ["http://a:2379/v3"]), ("etcd", ["http://u:p@a:2379"]), ("etcd", [5]),
    ("etcd", ["http://a:2379", "https://b:2379"]), ("etcd", ["http://a:99999"]),
    ("group", ""), ("group", "a/b"), ("group", "a b"), ("group", 3), ("member", "x_y"),
    ("member", "a" * 254), ("size", 0), ("size", "4"), ("size", True), ("min_open", 5),
    ("min_open", -1), ("min_open", "101%"), ("min_open", "50"), ("min_open", 1.5),
    ("min_open", True), ("maintenance_slots", -1), ("lease_s", 1), ("lease_s", 3601),
    ("unreachable", "closed"), ("ca_file", "relative.pem"), ("cert_file", "/c.pem"),
    ("key_file", "/k.pem"), ("bogus", 1),
])
def test_bad_values(key: str, value: Any) -> None:
    """A bad value raises ConfigError naming the key (exit 78)."""
    with pytest.raises(ConfigError) as exc:
        _fleet(**{key: value})
    assert exc.value.exit_code == EX_CONFIG
    assert exc.value.key.startswith("fleet.")
    assert key in exc.value.key or key in ("cert_file", "key_file")


@pytest.mark.parametrize("missing", ["etcd", "size"])
def test_required(missing: str) -> None:
    """etcd and size are required once [fleet] is present."""
    body = {k: v for k, v in BASE.items() if k != missing}
    with pytest.raises(ConfigError) as exc:
        parse_config({"fleet": body})
    assert exc.value.key == f"fleet.{missing}"


def test_tls_needs_https() -> None:
    """TLS files with http:// endpoints are refused, naming fleet.etcd."""
    with pytest.raises(ConfigError) as exc:
        _fleet(ca_file="/ca.pem")
    assert exc.value.key == "fleet.etcd"
    f = _fleet(etcd=["https://a:2379"], ca_file="/ca.pem", cert_file="/c.pem",
               key_file="/k.pem").fleet
    assert f is not None and f.cert_file == "/c.pem"


def test_reload_keeps_fleet() -> None:
    """A reload never swaps the fleet settings of a running agent; the note says so."""
    old = _fleet()
    new = _fleet(group="other")
    got, note = for_reload(old, new)
    assert got.fleet == old.fleet and "[fleet]" in note
    assert isinstance(got.fleet, FleetConfig)
