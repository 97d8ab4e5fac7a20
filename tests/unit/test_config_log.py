"""The [log] section: syslog_address is a local socket path, syslog_facility an RFC 5424 name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from watcher.cli.commands import main
from watcher.config import LogConfig, load_config, parse_config
from watcher.errors import EX_CONFIG, ConfigError


def test_defaults_are_dev_log_and_daemon() -> None:
    """Without the keys, syslog goes to /dev/log with facility daemon, and is off."""
    log = parse_config({}).log
    assert (log.syslog, log.syslog_address, log.syslog_facility) == (False, "/dev/log", "daemon")
    assert log == LogConfig()


@pytest.mark.parametrize("value", ["/dev/log", "/run/systemd/journal/dev-log", "/" + "x" * 106])
def test_syslog_address_accepts_socket_paths(value: str) -> None:
    """Absolute socket paths (at most 107 bytes, what sun_path holds) are accepted as written."""
    assert parse_config({"log": {"syslog_address": value}}).log.syslog_address == value


@pytest.mark.parametrize("value", ["udp://192.0.2.7:514", "tcp://collector.example.org:6514",
                                   "tcp://[2001:db8::7]:601"])
def test_a_remote_collector_is_refused_pointing_at_rsyslog(value: str) -> None:
    """udp:// and tcp:// are refused by name: the packaged rsyslog configuration forwards."""
    with pytest.raises(ConfigError) as err:
        parse_config({"log": {"syslog_address": value}})
    assert err.value.key == "log.syslog_address"
    assert "rsyslog" in str(err.value) and "packaging/rsyslog/sslvpn-heartbeat.conf" in str(err.value)


@pytest.mark.parametrize(("value", "words"), [
    ("log", "absolute unix socket path"), ("/" + "x" * 107, "107 bytes"), ("/dev/\nlog", "absolute"),
    (514, "string"), ("syslog://h:514", "absolute"),
])
def test_syslog_address_refuses_naming_the_key(value: Any, words: str) -> None:
    """A bad address is a ConfigError naming log.syslog_address and saying what is wrong."""
    with pytest.raises(ConfigError) as err:
        parse_config({"log": {"syslog_address": value}})
    assert err.value.key == "log.syslog_address"
    assert words in str(err.value)


def test_a_remote_collector_in_a_file_exits_78_naming_the_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """From a TOML file: the error names the key and the file, and config-check exits 78."""
    path = tmp_path / "c.toml"
    path.write_text('[log]\nsyslog = true\nsyslog_address = "tcp://192.0.2.7:6514"\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.key == "log.syslog_address" and str(path) in str(err.value)
    assert main(["config-check", "--config", str(path)]) == EX_CONFIG
    stderr = capsys.readouterr().err
    assert "log.syslog_address" in stderr and "rsyslog" in stderr


@pytest.mark.parametrize("value", ["daemon", "user", "auth", "authpriv", "local0", "local7"])
def test_syslog_facility_accepts(value: str) -> None:
    """RFC 5424 facility names are accepted."""
    assert parse_config({"log": {"syslog_facility": value}}).log.syslog_facility == value


@pytest.mark.parametrize("value", ["local8", "Daemon", "", 3])
def test_syslog_facility_refuses_naming_the_key(value: Any) -> None:
    """Anything else is a ConfigError naming log.syslog_facility."""
    with pytest.raises(ConfigError) as err:
        parse_config({"log": {"syslog_facility": value}})
    assert err.value.key == "log.syslog_facility"
