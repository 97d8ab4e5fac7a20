"""The TOML configuration: frozen dataclasses, validated on load; every error names its key.

Each key is declared once, as a field of its section's dataclass: its default, its check (which
also fixes its allowed values; choices are StrEnums or a tuple owned by ``rules``) and whether a
SIGHUP reload may change it, all through ``key(...)`` (``key_factory(...)`` for a default
computed at build time). ``SCHEMA``, ``for_reload`` and the control core's ``Params`` read them
from there. To add a key: one ``key(...)`` line in its section; to add a section: a frozen
dataclass of such lines and one ``section(...)`` line in ``Config`` (``optional_section(...)``
for one whose absence turns a feature off).
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import re
import socket
import tomllib
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from rules.model import BACKENDS, REJECT_CHOICES, RuleError, validate_chain_name
from watcher.errors import ConfigError

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "FACILITIES",
    "SCHEMA",
    "AgentCheckConfig",
    "Config",
    "FirewallConfig",
    "FleetConfig",
    "LogConfig",
    "LogFormat",
    "LogLevel",
    "MetricsConfig",
    "OnExit",
    "ProbeConfig",
    "ServiceConfig",
    "StateConfig",
    "for_reload",
    "key",
    "key_factory",
    "load_config",
    "optional_section",
    "parse_config",
    "parse_listen",
    "section",
]

DEFAULT_CONFIG_PATH = Path("/etc/sslvpn-heartbeat/config.toml")
MAX_CONFIG_BYTES = 1 << 20


T = TypeVar("T")
Check = Callable[[str, Any], Any]


def _int(lo: int, hi: int) -> Check:
    def check(key: str, v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(key, f"must be an integer, got {type(v).__name__} {v!r}")
        if not lo <= v <= hi:
            raise ConfigError(key, f"must be between {lo} and {hi}, got {v}")
        return v

    return check


def _float(lo: float, hi: float) -> Check:
    def check(key: str, v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ConfigError(key, f"must be a number, got {type(v).__name__} {v!r}")
        if not lo <= v <= hi:  # no float(): a huge TOML integer would overflow
            raise ConfigError(key, f"must be between {lo:g} and {hi:g}, got {v}")
        return float(v)

    return check


def _bool(key: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(key, f"must be true or false, got {v!r}")
    return v


def _choice(choices: Iterable[str], convert: Callable[[str], Any] = str) -> Check:
    """One of ``choices`` (an enum's members or a tuple of names), turned into ``convert(v)``."""
    names = tuple(str(c) for c in choices)

    def check(key: str, v: Any) -> Any:
        if not isinstance(v, str) or v not in names:
            raise ConfigError(key, f"must be one of {', '.join(names)}, got {v!r}")
        return convert(v)

    return check


def _str(max_len: int, pattern_ok: Callable[[str], bool] | None = None, what: str = "",
         min_len: int = 0) -> Check:
    def check(key: str, v: Any) -> str:
        if not isinstance(v, str):
            raise ConfigError(key, f"must be a string, got {type(v).__name__} {v!r}")
        if len(v) < min_len:
            raise ConfigError(key, "must not be empty")
        if len(v) > max_len:
            raise ConfigError(key, f"must be at most {max_len} characters")
        if "\x00" in v or "\n" in v:
            raise ConfigError(key, "must not contain NUL or newline")
        if pattern_ok is not None and v and not pattern_ok(v):
            raise ConfigError(key, f"must be {what}, got {v!r}")
        return v

    return check


def _abs_path(key: str, v: Any) -> Path:
    if not isinstance(v, str) or not v:
        raise ConfigError(key, f"must be a non-empty path string, got {v!r}")
    if not v.startswith("/"):
        raise ConfigError(key, f"must be an absolute path, got {v!r}")
    if "\x00" in v or "\n" in v or len(v) > 4096:
        raise ConfigError(key, "is not a usable path")
    p = Path(v)
    if p.name in ("", ".", ".."):
        raise ConfigError(key, f"must name a file or directory, got {v!r}")
    return p


def _chain(key: str, v: Any) -> str:
    if not isinstance(v, str):
        raise ConfigError(key, f"must be a string, got {v!r}")
    try:
        validate_chain_name(v)
    except RuleError as exc:
        raise ConfigError(key, str(exc)) from None
    return v


# RFC 5424 facility names (the agent sends their codes).
FACILITIES = ("kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron",
              "authpriv", "ftp", *(f"local{i}" for i in range(8)))


def _syslog_address(key: str, v: Any) -> str:
    if not isinstance(v, str):
        raise ConfigError(key, f"must be a string, got {type(v).__name__} {v!r}")
    if v.startswith(("udp://", "tcp://")):
        raise ConfigError(key, f"must be a local unix socket path, got {v!r}: the agent no longer "
                          "sends to remote collectors itself; keep /dev/log and forward with the "
                          "packaged rsyslog configuration (packaging/rsyslog/sslvpn-heartbeat.conf)")
    if not v.startswith("/") or "\x00" in v or "\n" in v or len(v.encode()) > 107:
        raise ConfigError(key, f"must be an absolute unix socket path of at most 107 bytes, got {v!r}")
    return v


def parse_listen(v: str) -> tuple[str, int]:
    """``"ADDR:PORT"`` or ``"[ADDR6]:PORT"`` as (address, port); ValueError says what is wrong."""
    host, sep, port_s = v.rpartition(":")
    if not sep or not host:
        raise ValueError(f"must be ADDR:PORT (IPv6: [ADDR]:PORT), got {v!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ":" not in host:
            raise ValueError(f"brackets are for IPv6 addresses only, got {v!r}")
    elif ":" in host:
        raise ValueError(f"an IPv6 address needs brackets, [ADDR]:PORT, got {v!r}")
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address (no host names)") from None
    if not (port_s.isascii() and port_s.isdigit()) or not 1 <= int(port_s) <= 65535:
        raise ValueError(f"the port must be between 1 and 65535, got {port_s!r}")
    return str(addr), int(port_s)


def _listen(key: str, v: Any) -> str:
    if not isinstance(v, str):
        raise ConfigError(key, f"must be a string, got {type(v).__name__} {v!r}")
    if v:
        try:
            parse_listen(v)
        except ValueError as exc:
            raise ConfigError(key, str(exc)) from None
    return v


def _textfile(key: str, v: Any) -> str:
    if not isinstance(v, str):
        raise ConfigError(key, f"must be a string, got {type(v).__name__} {v!r}")
    if v:
        _abs_path(key, v)
        if not v.endswith(".prom"):
            raise ConfigError(key, f"must end in .prom (node_exporter reads only *.prom), got {v!r}")
    return v


_FLEET_NAME = re.compile(r"[a-zA-Z0-9.-]+")


def _fleet_name(key: str, v: Any) -> str:
    if not isinstance(v, str) or not _FLEET_NAME.fullmatch(v) or len(v) > 253:
        raise ConfigError(key, f"must match ^[a-zA-Z0-9.-]+$ (at most 253 characters), got {v!r}")
    return v


def _etcd_endpoints(key: str, v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not v:
        raise ConfigError(key, f"must be a non-empty list of endpoint URLs, got {v!r}")
    out = []
    for item in v:
        if not isinstance(item, str):
            raise ConfigError(key, f"every endpoint must be a string, got {item!r}")
        try:
            u = urllib.parse.urlsplit(item)
            port = u.port
        except ValueError as exc:
            raise ConfigError(key, f"{item!r} is not a URL: {exc}") from None
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ConfigError(key, f"must be http://HOST:PORT or https://HOST:PORT, got {item!r}")
        if u.path not in ("", "/") or u.query or u.fragment or u.username or u.password:
            raise ConfigError(key, f"must be scheme://host:port only (no path, user, query), "
                              f"got {item!r}")
        if port is None:
            raise ConfigError(key, f"must name the port (etcd's client port, usually 2379), "
                              f"got {item!r}")
        out.append(item.rstrip("/"))
    if len({urllib.parse.urlsplit(e).scheme for e in out}) > 1:
        raise ConfigError(key, "must not mix http:// and https:// endpoints")
    return tuple(out)


def _min_open(key: str, v: Any) -> int | str:
    if isinstance(v, int) and not isinstance(v, bool):
        if not 0 <= v <= 100_000:
            raise ConfigError(key, f"must be a count of at least 0, got {v}")
        return v
    if isinstance(v, str) and re.fullmatch(r"[0-9]{1,3}%", v) and int(v[:-1]) <= 100:
        return v
    raise ConfigError(key, f"must be a count (2) or a percentage of fleet.size (\"50%\"), got {v!r}")


def _optional_path(key: str, v: Any) -> str:
    if not isinstance(v, str):
        raise ConfigError(key, f"must be a string, got {type(v).__name__} {v!r}")
    if v:
        _abs_path(key, v)
    return v


def _service_name_ok(s: str) -> bool:
    return s.isascii() and all(c.isalnum() or c in "-_.@" for c in s)




# ------------------------------------------------------------------ allowed values, declared once

class OnExit(enum.StrEnum):
    """What SIGTERM does to the chain: empty it, leave it, or delete chain and jump."""

    OPEN = "open"
    KEEP = "keep"
    REMOVE = "remove"


class LogFormat(enum.StrEnum):
    """How log lines are written on the standard output (the file and syslog get JSON)."""

    JSON = "json"
    CONSOLE = "console"


class LogLevel(enum.StrEnum):
    """The severity of a log line; the configured one is the least that is written."""

    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


def key(default: T, check: Check, *, restart: bool = False) -> T:
    """A configuration key: its ``default``, the ``check`` that validates (and converts) a TOML
    value, and ``restart``: a reload keeps the running value (it takes effect on restart)."""
    return field(default=default, metadata={"check": check, "restart": restart})


def key_factory(factory: Callable[[], T], check: Check, *, restart: bool = False) -> T:
    """A configuration key whose default is computed when a section is built (e.g. the host's
    name); otherwise as ``key``."""
    return field(default_factory=factory, metadata={"check": check, "restart": restart})


def section(cls: type[T], *, restart: bool = False) -> T:
    """A configuration section, the dataclass ``cls``; ``restart``: a reload keeps all of it."""
    return field(default_factory=cls, metadata={"cls": cls, "restart": restart})


def optional_section(cls: type[T], *, restart: bool = False) -> T | None:
    """A section that is None unless the file has it (its absence turns a feature off)."""
    return field(default=None, metadata={"cls": cls, "restart": restart})


# ------------------------------------------------------------------ the sections

@dataclass(frozen=True)
class ServiceConfig:
    """What service is watched: its PID file, its port, optionally its process name."""

    name: str = key("novell-sslvpn",
                    _str(64, _service_name_ok, "ASCII letters, digits and -_.@", min_len=1))
    pid_file: Path = key(Path("/run/novell-sslvpn.pid"), _abs_path)
    port: int = key(8080, _int(1, 65535), restart=True)  # the chain's rule matches it
    process_name: str = key("", _str(255, lambda s: "/" not in s, "a name without '/'"))
    # process_name empty: any process the PID file names


@dataclass(frozen=True)
class ProbeConfig:
    """How the verification probe runs and how many results make a transition."""

    timeout_ms: int = key(1000, _int(10, 60_000))
    interval_s: float = key(5.0, _float(0.05, 3600.0))
    rise: int = key(2, _int(1, 100))
    fall: int = key(2, _int(1, 100))
    rise_interval_ms: int = key(250, _int(0, 60_000))
    http_path: str = key("", _str(  # empty: TCP connect only
        1024, lambda s: s.startswith("/") and s.isprintable() and " " not in s,
        "an absolute URL path"))
    tls: bool = key(False, _bool)


@dataclass(frozen=True)
class FirewallConfig:
    """The chain the agent owns and how it is written."""

    chain: str = key("sslvpn-heartbeat-chain", _chain)
    backend: str = key("auto", _choice(BACKENDS))
    ipv6: bool = key(True, _bool)
    on_exit: OnExit = key(OnExit.OPEN, _choice(OnExit, OnExit))
    # tcp-reset: no gateway waits on a blocked server; icmp-port-unreachable: the original
    # manual's listing (README "Behind a pooling gateway" has the cost of each)
    reject_with: str = key("tcp-reset", _choice(REJECT_CHOICES))
    lock_wait_s: float = key(5.0, _float(0.0, 300.0))
    # reset: a full block ends the established connections from other hosts; keep: it does not
    established: str = key("reset", _choice(("reset", "keep")))
    drain_idle_ms: int = key(10, _int(0, 60_000))  # a drain ends connections idle this long


@dataclass(frozen=True)
class LogConfig:
    """Where the JSON events go."""

    format: LogFormat = key(LogFormat.JSON, _choice(LogFormat, LogFormat))
    level: LogLevel = key(LogLevel.INFO, _choice(LogLevel, LogLevel))
    file: str = key("", _str(4096, lambda s: s.startswith("/"), "an absolute path"))  # "": none
    syslog: bool = key(False, _bool)
    # a unix datagram socket; remote collectors: through rsyslog
    syslog_address: str = key("/dev/log", _syslog_address)
    syslog_facility: str = key("daemon", _choice(FACILITIES))


@dataclass(frozen=True)
class StateConfig:
    """Where the admin block survives restarts, and the instance lock that names the chain's
    owner (a reload cannot move it: the lock stays where the agent took it)."""

    dir: Path = key(Path("/var/lib/sslvpn-heartbeat"), _abs_path)


@dataclass(frozen=True)
class MetricsConfig:
    """Prometheus metrics written for node_exporter's textfile collector."""

    textfile: str = key("", _textfile)  # empty: no metrics file


@dataclass(frozen=True)
class AgentCheckConfig:
    """HAProxy's agent check: the address the one-line answer is served on."""

    listen: str = key("", _listen)  # empty: no listener; else "ADDR:PORT" ("[ADDR]:PORT" for IPv6)


def _host_name() -> str:
    """This host's name, the default ``fleet.member``."""
    return socket.gethostname().split(".", 1)[0] or "localhost"


@dataclass(frozen=True)
class FleetConfig:
    """The fleet guard (``[fleet]``, absent: off): the etcd cluster and the group's budget."""

    etcd: tuple[str, ...] = key((), _etcd_endpoints)  # endpoint URLs, http:// or https://; required
    ca_file: str = key("", _optional_path)
    cert_file: str = key("", _optional_path)
    key_file: str = key("", _optional_path)
    group: str = key("default", _fleet_name)
    member: str = key_factory(_host_name, _fleet_name)
    size: int = key(0, _int(1, 100_000))  # required: how many servers the group should have
    min_open: int | str = key("50%", _min_open)  # a count, or a percentage of size ("50%")
    maintenance_slots: int = key(1, _int(0, 100_000))
    lease_s: int = key(10, _int(2, 3600))
    unreachable: str = key("block", _choice(("block", "open")))


@dataclass(frozen=True)
class Config:
    """The whole configuration; defaults match the original product's manual page."""

    service: ServiceConfig = section(ServiceConfig)
    probe: ProbeConfig = section(ProbeConfig)
    firewall: FirewallConfig = section(FirewallConfig, restart=True)
    log: LogConfig = section(LogConfig)
    state: StateConfig = section(StateConfig, restart=True)
    metrics: MetricsConfig = section(MetricsConfig, restart=True)
    agent_check: AgentCheckConfig = section(AgentCheckConfig, restart=True)
    # None: no [fleet] section, the guard is off; the lease, member key and watch are one run's
    fleet: FleetConfig | None = optional_section(FleetConfig, restart=True)


def _section_class(sec: dataclasses.Field[Any]) -> type[Any]:
    cls: type[Any] = sec.metadata["cls"]
    return cls


# section -> (its dataclass, key -> its check): read from the dataclasses above, never repeated.
SCHEMA: dict[str, tuple[type[Any], dict[str, Check]]] = {
    sec.name: (_section_class(sec),
               {f.name: f.metadata["check"] for f in dataclasses.fields(_section_class(sec))})
    for sec in dataclasses.fields(Config)
}


def _check_fleet(f: FleetConfig) -> None:
    """Cross-key rules of ``[fleet]``; each error names the key to fix."""
    if not f.etcd:
        raise ConfigError("fleet.etcd", "is required with [fleet] (the etcd endpoint URLs)")
    if f.size < 1:
        raise ConfigError("fleet.size", "is required with [fleet] (how many servers the group has)")
    if isinstance(f.min_open, int) and f.min_open > f.size:
        raise ConfigError("fleet.min_open", f"must not exceed fleet.size ({f.size}), got {f.min_open}")
    if bool(f.cert_file) != bool(f.key_file):
        raise ConfigError("fleet.cert_file" if f.key_file else "fleet.key_file",
                          "a client certificate needs both fleet.cert_file and fleet.key_file")
    https = f.etcd[0].startswith("https://")
    if not https and (f.ca_file or f.cert_file):
        raise ConfigError("fleet.etcd", "TLS files are set but the endpoints are http://; "
                          "use https:// endpoints")


def parse_config(data: Mapping[str, Any]) -> Config:
    """Build a Config from parsed TOML; unknown sections or keys and bad values raise ConfigError."""
    sections: dict[str, Any] = {}
    for section, body in data.items():
        if section not in SCHEMA:
            raise ConfigError(section, f"unknown section (known: {', '.join(SCHEMA)})")
        if not isinstance(body, Mapping):
            raise ConfigError(section, "must be a table, e.g. [" + section + "]")
        cls, checks = SCHEMA[section]
        values: dict[str, Any] = {}
        for key, value in body.items():
            full = f"{section}.{key}"
            if key not in checks:
                raise ConfigError(full, f"unknown key (known: {', '.join(checks)})")
            values[key] = checks[key](full, value)
        sections[section] = cls(**values)
    cfg = Config(**sections)
    if cfg.fleet is not None:
        _check_fleet(cfg.fleet)
    if cfg.probe.rise_interval_ms > cfg.probe.interval_s * 1000 * 10:
        raise ConfigError("probe.rise_interval_ms", "must not exceed ten safety-net intervals")
    return cfg


def load_config(path: Path, *, missing_ok: bool = False) -> Config:
    """Read and validate the TOML file at ``path``; ``missing_ok`` gives defaults for an absent file."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        if missing_ok:
            return Config()
        raise ConfigError("", f"{path}: no such configuration file") from None
    except OSError as exc:
        raise ConfigError("", f"{path}: cannot read: {exc.strerror}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError("", f"{path}: larger than {MAX_CONFIG_BYTES} bytes")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError("", f"{path}: not UTF-8 text") from None
    except (tomllib.TOMLDecodeError, ValueError, RecursionError) as exc:  # digits, nesting
        raise ConfigError("", f"{path}: TOML syntax error: {exc}") from None
    try:
        return parse_config(data)
    except ConfigError as exc:
        raise ConfigError(exc.key, f"{exc.problem} (in {path})") from None


def for_reload(old: Config, new: Config) -> tuple[Config, str]:
    """What a reload applies of ``new``: all of it but the sections and keys declared
    ``restart=True`` (``[firewall]``, ``service.port``, ``[state]``, ``[metrics]``,
    ``[agent_check]``), whose running values are kept; the note names those that differ
    ("" when none does)."""
    kept: list[str] = []
    sections: dict[str, Any] = {}
    for sec in dataclasses.fields(Config):
        was, now = getattr(old, sec.name), getattr(new, sec.name)
        if sec.metadata.get("restart"):
            if now != was:
                kept.append(f"[{sec.name}]")
            sections[sec.name] = was
            continue
        if was is None or now is None:  # an optional section added or removed: all or nothing
            sections[sec.name] = now
            continue
        keys = {f.name: getattr(was, f.name) for f in dataclasses.fields(now)
                if f.metadata.get("restart") and getattr(now, f.name) != getattr(was, f.name)}
        kept.extend(f"{sec.name}.{k}" for k in keys)
        sections[sec.name] = dataclasses.replace(now, **keys) if keys else now
    if not kept:
        return new, ""
    return (dataclasses.replace(new, **sections),
            f"these change on restart only; kept the running ones for {', '.join(kept)}")
