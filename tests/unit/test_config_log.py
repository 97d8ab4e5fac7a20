"""The [log] section: syslog_address and syslog_facility are validated and reach the sinks."""

from __future__ import annotations

import io
from typing import Any

import pytest

from watcher.config import LogConfig, parse_config
from watcher.errors import ConfigError
from watcher.logsetup import configure


def test_defaults_are_dev_log_and_daemon() -> None:
    """Without the keys, syslog goes to /dev/log with facility daemon."""
    log = parse_config({}).log
    assert (log.syslog_address, log.syslog_facility) == ("/dev/log", "daemon")


@pytest.mark.parametrize("value", ["/run/systemd/journal/dev-log", "udp://192.0.2.7:514",
                                   "tcp://collector.example.org:6514", "tcp://[2001:db8::7]:601"])
def test_syslog_address_accepts(value: str) -> None:
    """Socket paths and udp:// or tcp:// collectors are accepted as written."""
    assert parse_config({"log": {"syslog_address": value}}).log.syslog_address == value


@pytest.mark.parametrize(("value", "words"), [
    ("log", "absolute socket path"), ("tcp://host", "HOST:PORT"), ("udp://h:99999", "port"),
    ("syslog://h:514", "udp://"), (514, "string"), ("tcp://[h]:514", "IPv6"),
])
def test_syslog_address_refuses_naming_the_key(value: Any, words: str) -> None:
    """A bad address is a ConfigError naming log.syslog_address and saying what is wrong."""
    with pytest.raises(ConfigError) as err:
        parse_config({"log": {"syslog_address": value}})
    assert err.value.key == "log.syslog_address"
    assert words in str(err.value)


@pytest.mark.parametrize("value", ["daemon", "user", "auth", "local0", "local7"])
def test_syslog_facility_accepts(value: str) -> None:
    """RFC 5424 facility names are accepted."""
    assert parse_config({"log": {"syslog_facility": value}}).log.syslog_facility == value


@pytest.mark.parametrize("value", ["local8", "Daemon", "", 3])
def test_syslog_facility_refuses_naming_the_key(value: Any) -> None:
    """Anything else is a ConfigError naming log.syslog_facility."""
    with pytest.raises(ConfigError) as err:
        parse_config({"log": {"syslog_facility": value}})
    assert err.value.key == "log.syslog_facility"


@pytest.mark.parametrize(("address", "target"), [
    ("tcp://127.0.0.1:9", "tcp://127.0.0.1:9"), ("udp://[::1]:9", "udp://[::1]:9"),
    ("/nonexistent/log", "/nonexistent/log"),
])
def test_configure_builds_the_syslog_sink_the_config_names(address: str, target: str) -> None:
    """configure() sends syslog where cfg.log.syslog_address says (nothing is sent here)."""
    cfg = LogConfig(syslog=True, syslog_address=address, syslog_facility="local1")
    with configure(cfg, service_name="x", stream=io.StringIO()) as lg:
        assert lg.stats()["syslog"].target == target


def test_configure_keyword_overrides_the_config_address() -> None:
    """The older syslog_address= keyword of configure() still wins over the config."""
    cfg = LogConfig(syslog=True, syslog_address="tcp://127.0.0.1:9")
    with configure(cfg, service_name="x", stream=io.StringIO(),
                   syslog_address="/nonexistent/sock") as lg:
        assert lg.stats()["syslog"].target == "/nonexistent/sock"
