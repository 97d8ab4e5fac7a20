"""watcher.config: defaults, per-key validation, file handling, and properties of the parser."""

from __future__ import annotations

import dataclasses
import datetime
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rules.model import BACKENDS
from watcher.config import (
    MAX_CONFIG_BYTES,
    SCHEMA,
    AgentCheckConfig,
    Config,
    FirewallConfig,
    FleetConfig,
    LogConfig,
    LogFormat,
    LogLevel,
    MetricsConfig,
    OnExit,
    ProbeConfig,
    ServiceConfig,
    StateConfig,
    for_reload,
    load_config,
    parse_config,
)
from watcher.errors import EX_CONFIG, ConfigError

SECTIONS: dict[str, type[Any]] = {
    "service": ServiceConfig,
    "probe": ProbeConfig,
    "firewall": FirewallConfig,
    "log": LogConfig,
    "state": StateConfig,
    "metrics": MetricsConfig,
    "agent_check": AgentCheckConfig,
}

# key -> values the parser must accept. Paths are given as TOML gives them: strings.
GOOD: dict[str, list[Any]] = {
    "service.name": ["novell-sslvpn", "vpn_2.x@site", "a" * 64],
    "service.pid_file": ["/run/novell-sslvpn.pid", "/var/run/x/y.pid"],
    "service.port": [1, 8080, 65535],
    "service.process_name": ["", "sslvpn", "java", "n" * 255],
    "probe.timeout_ms": [10, 1000, 60_000],
    "probe.interval_s": [0.05, 5, 2.5, 3600],
    "probe.rise": [1, 2, 100],
    "probe.fall": [1, 3, 100],
    "probe.rise_interval_ms": [0, 250, 50_000],
    "probe.http_path": ["", "/", "/health?x=1", "/a/b%20c"],
    "probe.tls": [True, False],
    "firewall.chain": ["sslvpn-heartbeat-chain", "a", "x" * 28, "A_b.c-9"],
    "firewall.backend": ["auto", "nft", "restore", "iptc"],
    "firewall.ipv6": [True, False],
    "firewall.on_exit": ["open", "keep", "remove"],
    "firewall.reject_with": ["icmp-port-unreachable", "tcp-reset"],
    "firewall.lock_wait_s": [0, 0.5, 5, 300],
    "firewall.established": ["reset", "keep"],
    "firewall.drain_idle_ms": [0, 50, 60_000],
    "log.format": ["json", "console"],
    "log.level": ["debug", "info", "warning", "error"],
    "log.file": ["", "/var/log/sslvpn-heartbeat.json"],
    "log.syslog": [True, False],
    "log.syslog_address": ["/dev/log", "/run/systemd/journal/dev-log"],
    "log.syslog_facility": ["daemon", "local0", "local7", "user"],
    "state.dir": ["/var/lib/sslvpn-heartbeat", "/tmp/x"],
    "metrics.textfile": ["", "/var/lib/prometheus/node-exporter/sslvpn-heartbeat.prom", "/m/a.prom"],
    "agent_check.listen": ["", "127.0.0.1:5555", "10.0.0.7:1", "[::1]:65535", "[fd00::2]:80",
                           "0.0.0.0:9999"],
}

# key -> values the parser must refuse, naming the key.
BAD: dict[str, list[Any]] = {
    "service.name": ["a b", "x/y", "a" * 65, "new\nline", 5, True],
    "service.pid_file": ["", "relative.pid", "/", "/x/..", "/a\x00b", 7, False],
    "service.port": [0, 65536, -1, "8080", 8080.0, True, False],
    "service.process_name": ["/usr/bin/java", "p" * 256, "a\nb", "a\x00b", 1],
    "probe.timeout_ms": [9, 60_001, 100.0, "1000", True],
    "probe.interval_s": [0.04, 3601, -1, math.nan, math.inf, "5", True],
    "probe.rise": [0, 101, 1.5, "2", True],
    "probe.fall": [0, 101, 2.0, None, False],
    "probe.rise_interval_ms": [-1, 60_001, 0.5, True],
    "probe.http_path": ["health", "/a b", "/a\tb", "/" + "p" * 1024, 1],
    "probe.tls": [1, 0, "true", "yes"],
    "firewall.chain": ["", "x" * 29, "-x", "a b", "INPUT", "input", "REJECT", "ACCEPT", 3],
    "firewall.backend": ["nftables", "", "AUTO", 1, True],
    "firewall.ipv6": [1, "false"],
    "firewall.on_exit": ["close", "", None],
    "firewall.reject_with": ["icmp6-port-unreachable", "drop", "icmp-host-unreachable", 0],
    "firewall.lock_wait_s": [-0.1, 301, math.nan, "5", False],
    "firewall.established": ["close", "", "RESET", True, 0],
    "firewall.drain_idle_ms": [-1, 60_001, 0.5, "50", True],
    "log.format": ["text", "JSON", 0],
    "log.level": ["warn", "critical", "INFO", 10],
    "log.file": ["relative.log", "/a\nb", 1],
    "log.syslog": ["true", 1],
    "log.syslog_address": ["dev/log", "tcp://host:514", "udp://10.1.2.3:514", "http://h:80", 514],
    "log.syslog_facility": ["local8", "DAEMON", 3],
    "state.dir": ["", "var/lib/x", "/", "/a/..", 0],
    "metrics.textfile": ["a.prom", "/x/m.txt", "/x/m.prom\n", "/", 1, True],
    "agent_check.listen": ["127.0.0.1", ":5555", "localhost:5555", "::1:5555", "[10.0.0.1]:5",
                           "127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1:+5", "127.0.0.1:\u0665",
                           "[::1]:", 5555, None],
}

ALL_KEYS = sorted(f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls))


def _nested(key: str, value: Any) -> dict[str, dict[str, Any]]:
    section, name = key.split(".")
    return {section: {name: value}}


def _cases(table: dict[str, list[Any]]) -> list[Any]:
    return [pytest.param(k, v, id=f"{k}={v!r}"[:60]) for k, vs in table.items() for v in vs]


# ---- writing TOML (tests only): enough for every value tomllib can return ----

def toml_str(s: str) -> str:
    """A TOML basic string holding exactly ``s`` (control characters escaped)."""
    out = []
    for c in s:
        if c in '"\\':
            out.append("\\" + c)
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def toml_value(v: Any) -> str:
    """A TOML literal of any value tomllib can produce."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return toml_str(v)
    if isinstance(v, Path):
        return toml_str(str(v))
    if isinstance(v, datetime.datetime | datetime.date | datetime.time):
        return v.isoformat()
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{toml_str(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def toml_doc(data: dict[str, Any]) -> str:
    """A TOML document whose top-level keys are ``data``'s (each a dotted-free quoted key)."""
    return "".join(f"{toml_str(k)} = {toml_value(v)}\n" for k, v in data.items())


# ---- defaults ----

def test_defaults_match_the_manual_page() -> None:
    """The defaults are the original product's (port 8080, its chain name, service novell-sslvpn)
    but for the REJECT answer: a TCP reset, which a pooling gateway meets without waiting."""
    cfg = Config()
    assert cfg.service.port == 8080
    assert cfg.firewall.chain == "sslvpn-heartbeat-chain"
    assert cfg.service.name == "novell-sslvpn"
    assert cfg.firewall.reject_with == "tcp-reset"
    assert cfg.state.dir == Path("/var/lib/sslvpn-heartbeat")


def test_empty_mapping_and_empty_sections_give_defaults() -> None:
    """An empty config, or empty sections, yields exactly the defaults."""
    assert parse_config({}) == Config()
    assert parse_config({s: {} for s in SECTIONS}) == Config()


def test_good_and_bad_tables_cover_every_key() -> None:
    """Every configuration key has accepted and refused values in this file's tables."""
    assert sorted(GOOD) == ALL_KEYS
    assert sorted(BAD) == ALL_KEYS


# ---- per key ----

@pytest.mark.parametrize(("key", "value"), _cases(GOOD))
def test_every_key_accepts_a_good_value(key: str, value: Any) -> None:
    """A good value for a key is accepted and lands, as its typed form, in that field."""
    cfg = parse_config(_nested(key, value))
    section, name = key.split(".")
    got = getattr(getattr(cfg, section), name)
    if isinstance(getattr(getattr(Config(), section), name), Path):
        assert got == Path(value)
    else:
        assert got == value
        assert type(got) is type(getattr(getattr(Config(), section), name))


@pytest.mark.parametrize(("key", "value"), _cases(BAD))
def test_every_key_refuses_a_bad_value_naming_the_key(key: str, value: Any) -> None:
    """A bad value raises ConfigError whose key is the dotted name and whose message names it."""
    with pytest.raises(ConfigError) as info:
        parse_config(_nested(key, value))
    assert info.value.key == key
    assert key in str(info.value)
    assert info.value.exit_code == EX_CONFIG


@pytest.mark.parametrize("key", ["service.port", "probe.timeout_ms", "probe.rise", "probe.fall",
                                 "probe.rise_interval_ms", "probe.interval_s",
                                 "firewall.lock_wait_s"])
@pytest.mark.parametrize("value", [True, False])
def test_booleans_are_not_numbers(key: str, value: bool) -> None:
    """true/false are refused where a number is expected, though bool is an int in Python."""
    with pytest.raises(ConfigError, match="must be"):
        parse_config(_nested(key, value))


def test_rise_interval_may_not_exceed_ten_intervals() -> None:
    """rise_interval_ms above ten safety-net intervals is refused, naming probe.rise_interval_ms."""
    ok = parse_config({"probe": {"interval_s": 0.1, "rise_interval_ms": 1000}})
    assert ok.probe.rise_interval_ms == 1000
    with pytest.raises(ConfigError) as info:
        parse_config({"probe": {"interval_s": 0.1, "rise_interval_ms": 1001}})
    assert info.value.key == "probe.rise_interval_ms"


def test_unknown_section_is_named() -> None:
    """An unknown section raises ConfigError naming it."""
    with pytest.raises(ConfigError, match="unknown section") as info:
        parse_config({"servcie": {"port": 8080}})
    assert info.value.key == "servcie"
    assert "servcie" in str(info.value)


def test_unknown_key_is_named_with_its_section() -> None:
    """An unknown key raises ConfigError naming section.key and listing the known keys."""
    with pytest.raises(ConfigError, match="unknown key") as info:
        parse_config({"probe": {"rize": 2}})
    assert info.value.key == "probe.rize"
    assert "probe.rize" in str(info.value)
    assert "rise" in info.value.problem


@pytest.mark.parametrize("body", [1, "x", [1, 2], [{"port": 1}], True])
def test_section_that_is_not_a_table_is_named(body: Any) -> None:
    """A section given as a value instead of a table raises ConfigError naming the section."""
    with pytest.raises(ConfigError, match="must be a table") as info:
        parse_config({"service": body})
    assert info.value.key == "service"


# ---- files ----

def test_load_valid_file(tmp_path: Path) -> None:
    """A valid file loads with its values; keys left out keep their defaults."""
    p = tmp_path / "c.toml"
    p.write_text('[service]\nport = 8443\n\n[firewall]\nbackend = "restore"\n'
                 '[state]\ndir = "/srv/state"\n')
    cfg = load_config(p)
    assert cfg.service.port == 8443
    assert cfg.firewall.backend == "restore"
    assert cfg.state.dir == Path("/srv/state")
    assert cfg.probe == ProbeConfig()


def test_load_error_names_key_and_file(tmp_path: Path) -> None:
    """A bad value in a file raises ConfigError with the dotted key and the file's path."""
    p = tmp_path / "c.toml"
    p.write_text("[probe]\nrise = 0\n")
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert info.value.key == "probe.rise"
    assert "probe.rise" in str(info.value) and str(p) in str(info.value)


@pytest.mark.parametrize("text", [
    "[service\nport = 1\n",
    "[service]\nport = \n",
    "[service]\nport = 1\nport = 2\n",
    "port 8080\n",
    '[service]\nname = "unterminated\n',
])
def test_toml_syntax_error(tmp_path: Path, text: str) -> None:
    """A TOML syntax error is a ConfigError naming the file, not a parser exception."""
    p = tmp_path / "c.toml"
    p.write_text(text)
    with pytest.raises(ConfigError, match="TOML syntax error") as info:
        load_config(p)
    assert str(p) in str(info.value)


@pytest.mark.parametrize("text", [
    "[probe]\ninterval_s = 1" + "0" * 400 + "\n",      # overflows float()
    "[probe]\nrise = 1" + "0" * 5000 + "\n",            # over Python's int digit limit
    "a = " + "[" * 5000 + "]" * 5000 + "\n",            # nesting deeper than the recursion limit
])
def test_pathological_numbers_and_nesting_are_config_errors(tmp_path: Path, text: str) -> None:
    """Huge integers and deep nesting give ConfigError, never OverflowError/ValueError/RecursionError."""
    p = tmp_path / "c.toml"
    p.write_text(text)
    with pytest.raises(ConfigError):
        load_config(p)


def test_non_utf8_file(tmp_path: Path) -> None:
    """A file that is not UTF-8 is a ConfigError saying so."""
    p = tmp_path / "c.toml"
    p.write_bytes(b'[service]\nname = "caf\xe9"\n')
    with pytest.raises(ConfigError, match="not UTF-8") as info:
        load_config(p)
    assert str(p) in str(info.value)


def test_file_over_one_mib_is_refused_and_one_mib_is_read(tmp_path: Path) -> None:
    """A file of exactly MAX_CONFIG_BYTES loads; one byte more is refused as too large."""
    assert MAX_CONFIG_BYTES == 1 << 20
    head = "[service]\nport = 8081\n"
    exact = head + "#" * (MAX_CONFIG_BYTES - len(head) - 1) + "\n"
    p = tmp_path / "c.toml"
    p.write_text(exact)
    assert p.stat().st_size == MAX_CONFIG_BYTES
    assert load_config(p).service.port == 8081
    p.write_text(exact + "\n")
    with pytest.raises(ConfigError, match="larger than"):
        load_config(p)


def test_missing_file_is_an_error_unless_missing_ok(tmp_path: Path) -> None:
    """An absent file raises ConfigError naming it; with missing_ok it yields the defaults."""
    p = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="no such configuration file") as info:
        load_config(p)
    assert str(p) in str(info.value)
    assert load_config(p, missing_ok=True) == Config()


def test_missing_ok_does_not_hide_a_bad_file(tmp_path: Path) -> None:
    """missing_ok only covers absence: a present but invalid file still raises."""
    p = tmp_path / "c.toml"
    p.write_text("[service]\nport = 0\n")
    with pytest.raises(ConfigError):
        load_config(p, missing_ok=True)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    """A directory given as the config path is a ConfigError, not an IsADirectoryError."""
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path)


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    """An empty file is a valid config holding only defaults."""
    p = tmp_path / "c.toml"
    p.write_text("")
    assert load_config(p) == Config()


# ---- properties ----

_scalars = st.one_of(
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=40),
    st.sampled_from(["auto", "restore", "iptc", "json", "open", "tcp-reset", "/x", "/run/a.pid"]),
    st.datetimes(),
    st.dates(),
    st.times(),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
_known_keys = st.sampled_from([k.split(".")[1] for k in ALL_KEYS])
_sections = st.dictionaries(
    st.sampled_from(list(SECTIONS)) | st.text(max_size=8),
    st.dictionaries(_known_keys | st.text(max_size=8), _values, max_size=6) | _values,
    max_size=6,
)


@given(_sections)
@settings(max_examples=400)
def test_any_toml_data_parses_or_raises_config_error(data: dict[str, Any]) -> None:
    """parse_config of any TOML-shaped data returns a Config or raises ConfigError, nothing else."""
    try:
        cfg = parse_config(data)
    except ConfigError as exc:
        assert exc.key in str(exc)
    else:
        assert isinstance(cfg, Config)


@given(_sections)
@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_toml_file_loads_or_raises_config_error(tmp_path: Path, data: dict[str, Any]) -> None:
    """load_config of a file of any TOML values agrees with parse_config: same Config or same key."""
    p = tmp_path / "c.toml"
    p.write_text(toml_doc(data))
    try:
        want: Config | str = parse_config(data)
    except ConfigError as exc:
        want = exc.key
    try:
        got: Config | str = load_config(p)
    except ConfigError as exc:
        got = exc.key
    assert got == want


@given(st.binary(max_size=200) | st.text(max_size=200))
@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_bytes_load_or_raise_config_error(tmp_path: Path, raw: bytes | str) -> None:
    """load_config of arbitrary bytes returns a Config or raises ConfigError, nothing else."""
    p = tmp_path / "c.toml"
    p.write_bytes(raw if isinstance(raw, bytes) else raw.encode())
    try:
        cfg = load_config(p)
    except ConfigError:
        return
    assert isinstance(cfg, Config)


# Strategies of valid values per key, for the round trip.
_safe = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_abs_paths = st.lists(st.text(_safe + "-_.", min_size=1, max_size=12).filter(lambda s: s not in {".", ".."}),
                      min_size=1, max_size=4).map(lambda parts: Path("/" + "/".join(parts)))
_chain_names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,27}", fullmatch=True).filter(
    lambda s: s.upper() not in {"INPUT", "OUTPUT", "FORWARD", "PREROUTING", "POSTROUTING"}
    and s not in {"ACCEPT", "DROP", "REJECT", "RETURN", "QUEUE", "LOG", "MARK", "NFQUEUE"})
_any_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\n"),
                    max_size=30)

_valid_configs = st.builds(
    Config,
    service=st.builds(
        ServiceConfig,
        name=st.text(_safe + "-_.@", min_size=1, max_size=64),
        pid_file=_abs_paths,
        port=st.integers(1, 65535),
        process_name=_any_text.filter(lambda s: "/" not in s),
    ),
    probe=st.builds(
        ProbeConfig,
        timeout_ms=st.integers(10, 60_000),
        interval_s=st.floats(1.0, 3600.0),
        rise=st.integers(1, 100),
        fall=st.integers(1, 100),
        rise_interval_ms=st.integers(0, 10_000),
        http_path=st.just("") | st.text(_safe + "/?&=%~-._", max_size=30).map(lambda s: "/" + s),
        tls=st.booleans(),
    ),
    firewall=st.builds(
        FirewallConfig,
        chain=_chain_names,
        backend=st.sampled_from(["auto", "nft", "restore", "iptc"]),
        ipv6=st.booleans(),
        on_exit=st.sampled_from(["open", "keep", "remove"]),
        reject_with=st.sampled_from(["icmp-port-unreachable", "tcp-reset"]),
        lock_wait_s=st.floats(0.0, 300.0),
    ),
    log=st.builds(
        LogConfig,
        format=st.sampled_from(["json", "console"]),
        level=st.sampled_from(["debug", "info", "warning", "error"]),
        file=st.just("") | _abs_paths.map(str),
        syslog=st.booleans(),
    ),
    state=st.builds(StateConfig, dir=_abs_paths),
)


def write_full_config(path: Path, cfg: Config) -> None:
    """Write every value of ``cfg`` to ``path`` as TOML."""
    lines = []
    for section in SECTIONS:
        lines.append(f"[{section}]")
        for f in dataclasses.fields(getattr(cfg, section)):
            lines.append(f"{f.name} = {toml_value(getattr(getattr(cfg, section), f.name))}")
    path.write_text("\n".join(lines) + "\n")


@given(_valid_configs)
@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_valid_config_round_trips_through_a_file(tmp_path: Path, cfg: Config) -> None:
    """A valid Config written out as TOML loads back equal, value for value."""
    p = tmp_path / "c.toml"
    write_full_config(p, cfg)
    assert load_config(p) == cfg


@pytest.mark.parametrize("name", ["", "dienst\u00e9", "a b"])
def test_service_name_must_be_nonempty_ascii(name: str) -> None:
    """service.name is a non-empty ASCII word: it ends up in log fields and unit names."""
    with pytest.raises(ConfigError) as err:
        parse_config({"service": {"name": name}})
    assert err.value.key == "service.name"


# ---- each key declared once; what a reload keeps ----

RESTART_ONLY = {"firewall.chain", "firewall.backend", "firewall.ipv6", "firewall.on_exit",
                "firewall.reject_with", "firewall.lock_wait_s", "firewall.established",
                "firewall.drain_idle_ms", "service.port", "state.dir",
                "metrics.textfile", "agent_check.listen"}


def _changed(key: str) -> Config:
    """Config() with ``key`` set to a good value other than its default."""
    section, name = key.split(".")
    default = getattr(getattr(Config(), section), name)
    value = next(v for v in GOOD[key] if (Path(v) if isinstance(default, Path) else v) != default)
    return parse_config(_nested(key, value))


def test_schema_is_read_from_the_dataclasses() -> None:
    """SCHEMA lists exactly the dataclasses' sections and fields, each with its own check."""
    assert list(SCHEMA) == [*SECTIONS, "fleet"]
    for section, (cls, checks) in SCHEMA.items():
        assert cls is {**SECTIONS, "fleet": FleetConfig}[section]
        assert list(checks) == [f.name for f in dataclasses.fields(cls)]
        assert all(callable(c) for c in checks.values())


def test_every_default_passes_its_own_check() -> None:
    """Each key's declared default is a value its declared check accepts unchanged (but the
    keys [fleet] requires, which have no default worth the name)."""
    for section, (cls, checks) in SCHEMA.items():
        for name, check in checks.items():
            if (section, name) in (("fleet", "etcd"), ("fleet", "size")):
                continue
            default = getattr(cls(), name)
            raw = str(default) if isinstance(default, Path) else default
            assert check(f"{section}.{name}", raw) == default


def test_choices_are_the_enums_values() -> None:
    """backend, on_exit, log.format and log.level accept exactly their enum's values."""
    for key, enum_cls in (("firewall.on_exit", OnExit), ("log.format", LogFormat),
                          ("log.level", LogLevel)):
        assert sorted(GOOD[key]) == sorted(m.value for m in enum_cls)
        for member in enum_cls:
            section, name = key.split(".")
            assert getattr(getattr(parse_config(_nested(key, member.value)), section), name) is member


def test_backend_choices_are_the_engines() -> None:
    """firewall.backend accepts exactly the names rules.firewall.open_backend knows."""
    assert sorted(GOOD["firewall.backend"]) == sorted(BACKENDS)
    for name in BACKENDS:
        assert parse_config(_nested("firewall.backend", name)).firewall.backend == name


def test_for_reload_of_the_same_config_changes_nothing() -> None:
    """A reload to an equal configuration applies it and notes nothing."""
    assert for_reload(Config(), Config()) == (Config(), "")


@pytest.mark.parametrize("key", ALL_KEYS)
def test_for_reload_keeps_restart_only_keys_and_applies_the_rest(key: str) -> None:
    """A changed restart-only key (or one of a restart-only section) keeps its running value and
    the note names it; any other changed key is applied without a note."""
    new = _changed(key)
    got, note = for_reload(Config(), new)
    if key in RESTART_ONLY:
        assert got == Config()
        section = key.split(".")[0]
        assert (f"[{section}]" in note) or (key in note), note
        assert note.startswith("these change on restart only")
    else:
        assert got == new
        assert note == ""


def test_for_reload_keeps_the_state_directory() -> None:
    """[state] dir never moves on a reload: the instance lock stays where the agent took it."""
    old = Config()
    new = parse_config({"state": {"dir": "/elsewhere/state"}, "probe": {"rise": 5}})
    got, note = for_reload(old, new)
    assert got.state == old.state
    assert got.probe.rise == 5
    assert "[state]" in note


@given(_valid_configs, _valid_configs)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_for_reload_property(old: Config, new: Config) -> None:
    """For any two valid configs: restart-only keys come from the old one, every other key from
    the new one, and the note is empty exactly when no restart-only key differs."""
    got, note = for_reload(old, new)
    differs = False
    for key in ALL_KEYS:
        section, name = key.split(".")
        g, o, n = (getattr(getattr(c, section), name) for c in (got, old, new))
        if key in RESTART_ONLY:
            assert g == o
            differs |= o != n
        else:
            assert g == n
    assert (note != "") == differs


def test_key_factory_and_optional_section_carry_their_declarations() -> None:
    """key_factory computes its default per instance and keeps its check; optional_section is
    None by default and names its dataclass (what SCHEMA and parse_config read)."""
    from dataclasses import dataclass

    from watcher.config import key_factory, optional_section

    calls: list[int] = []

    def make() -> str:
        calls.append(1)
        return f"host{len(calls)}"

    @dataclass(frozen=True)
    class Extra:
        member: str = key_factory(make, lambda k, v: v, restart=True)

    @dataclass(frozen=True)
    class Holder:
        extra: Extra | None = optional_section(Extra)

    assert (Extra().member, Extra().member) == ("host1", "host2")
    (member,) = dataclasses.fields(Extra)
    assert member.metadata["restart"] and member.metadata["check"]("k", "v") == "v"
    (extra,) = dataclasses.fields(Holder)
    assert Holder().extra is None and extra.metadata["cls"] is Extra
