"""The TOML configuration: frozen dataclasses, validated on load; every error names its key."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import socket
import tomllib
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from rules.model import RuleError, validate_chain_name
from watcher.errors import ConfigError

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "AgentCheckConfig",
    "Config",
    "FirewallConfig",
    "FleetConfig",
    "LogConfig",
    "MetricsConfig",
    "ProbeConfig",
    "ServiceConfig",
    "StateConfig",
    "for_reload",
    "load_config",
    "parse_config",
    "parse_listen",
]

DEFAULT_CONFIG_PATH = Path("/etc/sslvpn-heartbeat/config.toml")
MAX_CONFIG_BYTES = 1 << 20


@dataclass(frozen=True)
class ServiceConfig:
    """What service is watched: its PID file, its port, optionally its process name."""

    name: str = "novell-sslvpn"
    pid_file: Path = Path("/run/novell-sslvpn.pid")
    port: int = 8080
    process_name: str = ""  # empty: any process the PID file names


@dataclass(frozen=True)
class ProbeConfig:
    """How the verification probe runs and how many results make a transition."""

    timeout_ms: int = 1000
    interval_s: float = 5.0
    rise: int = 2
    fall: int = 2
    rise_interval_ms: int = 250
    http_path: str = ""  # empty: TCP connect only
    tls: bool = False


@dataclass(frozen=True)
class FirewallConfig:
    """The chain the agent owns and how it is written."""

    chain: str = "sslvpn-heartbeat-chain"
    backend: str = "auto"  # auto | nft | restore | iptc
    ipv6: bool = True
    on_exit: str = "open"  # open | keep | remove
    reject_with: str = "icmp-port-unreachable"  # or tcp-reset
    lock_wait_s: float = 5.0


@dataclass(frozen=True)
class LogConfig:
    """Where the JSON events go."""

    format: str = "json"  # json | console
    level: str = "info"
    file: str = ""  # empty: no file sink
    syslog: bool = False
    syslog_address: str = "/dev/log"  # a unix datagram socket; remote: through rsyslog
    syslog_facility: str = "daemon"


@dataclass(frozen=True)
class StateConfig:
    """Where the admin block survives restarts."""

    dir: Path = Path("/var/lib/sslvpn-heartbeat")


@dataclass(frozen=True)
class MetricsConfig:
    """Prometheus metrics written for node_exporter's textfile collector."""

    textfile: str = ""  # empty: no metrics file


@dataclass(frozen=True)
class AgentCheckConfig:
    """HAProxy's agent check: the address the one-line answer is served on."""

    listen: str = ""  # empty: no listener; else "ADDR:PORT" ("[ADDR]:PORT" for IPv6)


def _host_name() -> str:
    """This host's name, the default ``fleet.member``."""
    return socket.gethostname().split(".", 1)[0] or "localhost"


@dataclass(frozen=True)
class FleetConfig:
    """The fleet guard (``[fleet]``, absent: off): the etcd cluster and the group's budget."""

    etcd: tuple[str, ...] = ()  # endpoint URLs, http:// or https://; required
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    group: str = "default"
    member: str = field(default_factory=_host_name)
    size: int = 0  # required: how many servers the group should have
    min_open: int | str = "50%"  # a count, or a percentage of size ("50%")
    maintenance_slots: int = 1
    lease_s: int = 10
    unreachable: str = "block"  # block | open


@dataclass(frozen=True)
class Config:
    """The whole configuration; defaults match the original product's manual page."""

    service: ServiceConfig = field(default_factory=ServiceConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    firewall: FirewallConfig = field(default_factory=FirewallConfig)
    log: LogConfig = field(default_factory=LogConfig)
    state: StateConfig = field(default_factory=StateConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    agent_check: AgentCheckConfig = field(default_factory=AgentCheckConfig)
    fleet: FleetConfig | None = None  # None: no [fleet] section, the guard is off


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


def _choice(*choices: str) -> Check:
    def check(key: str, v: Any) -> str:
        if v not in choices:
            raise ConfigError(key, f"must be one of {', '.join(choices)}, got {v!r}")
        return str(v)

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


SCHEMA: dict[str, tuple[type[Any], dict[str, Check]]] = {
    "service": (
        ServiceConfig,
        {
            "name": _str(64, _service_name_ok, "ASCII letters, digits and -_.@", min_len=1),
            "pid_file": _abs_path,
            "port": _int(1, 65535),
            "process_name": _str(255, lambda s: "/" not in s, "a name without '/'"),
        },
    ),
    "probe": (
        ProbeConfig,
        {
            "timeout_ms": _int(10, 60_000),
            "interval_s": _float(0.05, 3600.0),
            "rise": _int(1, 100),
            "fall": _int(1, 100),
            "rise_interval_ms": _int(0, 60_000),
            "http_path": _str(
                1024,
                lambda s: s.startswith("/") and s.isprintable() and " " not in s,
                "an absolute URL path",
            ),
            "tls": _bool,
        },
    ),
    "firewall": (
        FirewallConfig,
        {
            "chain": _chain,
            "backend": _choice("auto", "nft", "restore", "iptc"),
            "ipv6": _bool,
            "on_exit": _choice("open", "keep", "remove"),
            "reject_with": _choice("icmp-port-unreachable", "tcp-reset"),
            "lock_wait_s": _float(0.0, 300.0),
        },
    ),
    "log": (
        LogConfig,
        {
            "format": _choice("json", "console"),
            "level": _choice("debug", "info", "warning", "error"),
            "file": _str(4096, lambda s: s.startswith("/"), "an absolute path"),
            "syslog": _bool,
            "syslog_address": _syslog_address,
            "syslog_facility": _choice(*FACILITIES),
        },
    ),
    "state": (StateConfig, {"dir": _abs_path}),
    "metrics": (MetricsConfig, {"textfile": _textfile}),
    "agent_check": (AgentCheckConfig, {"listen": _listen}),
    "fleet": (
        FleetConfig,
        {
            "etcd": _etcd_endpoints,
            "ca_file": _optional_path,
            "cert_file": _optional_path,
            "key_file": _optional_path,
            "group": _fleet_name,
            "member": _fleet_name,
            "size": _int(1, 100_000),
            "min_open": _min_open,
            "maintenance_slots": _int(0, 100_000),
            "lease_s": _int(2, 3600),
            "unreachable": _choice("block", "open"),
        },
    ),
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
    """What a reload applies of ``new``: all of it but ``[firewall]``, ``service.port``,
    ``[metrics]``, ``[agent_check]`` and ``[fleet]``, which take effect on restart only; the note names
    those that differ ("" when none does)."""
    kept = []
    if (new.firewall, new.service.port) != (old.firewall, old.service.port):
        kept.append("[firewall] and service.port")
        new = dataclasses.replace(new, firewall=old.firewall,
                                  service=dataclasses.replace(new.service, port=old.service.port))
    if (new.metrics, new.agent_check) != (old.metrics, old.agent_check):
        kept.append("[metrics] and [agent_check]")
        new = dataclasses.replace(new, metrics=old.metrics, agent_check=old.agent_check)
    if new.fleet != old.fleet:  # the lease, the member key and the watch belong to one run
        kept.append("[fleet]")
        new = dataclasses.replace(new, fleet=old.fleet)
    if not kept:
        return new, ""
    return new, f"these change on restart only; kept the running ones for {', '.join(kept)}"
