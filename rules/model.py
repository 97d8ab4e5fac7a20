"""Pure model of the one chain the agent owns: names, families, modes and its rules.

Rules are kept in the canonical form ``iptables-save`` prints, so that what is written can be
compared with what is read back, string for string.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from rules.errors import RuleError

__all__ = [
    "BACKENDS",
    "MAX_CHAIN_NAME",
    "ChainSpec",
    "Family",
    "Mode",
    "RejectRule",
    "RuleError",
    "chain_rules",
    "validate_chain_name",
]

# XT_EXTENSION_MAXNAMELEN is 29 bytes including the terminating NUL.
MAX_CHAIN_NAME = 28
_CHAIN_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_BUILTIN = frozenset({"INPUT", "OUTPUT", "FORWARD", "PREROUTING", "POSTROUTING"})
_TARGETS = frozenset({"ACCEPT", "DROP", "REJECT", "RETURN", "QUEUE", "LOG", "MARK", "NFQUEUE"})
REJECT_CHOICES = ("icmp-port-unreachable", "tcp-reset")
# How a chain may be written (rules.firewall.open_backend): the one list, the config checks it.
BACKENDS = ("auto", "nft", "restore", "iptc")


class Family(enum.StrEnum):
    """An address family: each has its own iptables program and its own table."""

    V4 = "ipv4"
    V6 = "ipv6"

    @property
    def program(self) -> str:
        """The iptables program name of the family (``iptables`` or ``ip6tables``)."""
        return "iptables" if self is Family.V4 else "ip6tables"


class Mode(enum.StrEnum):
    """What the chain holds: nothing (OPEN), a REJECT of the port (BLOCK), a REJECT of new
    connections only (DRAIN: established sessions may finish)."""

    OPEN = "open"
    BLOCK = "block"
    DRAIN = "drain"


def validate_chain_name(name: str) -> str:
    """Return ``name`` if iptables accepts it as a user chain we may own; else raise RuleError."""
    if not name:
        raise RuleError("chain name is empty")
    if len(name.encode()) > MAX_CHAIN_NAME:
        raise RuleError(f"chain name {name!r} is longer than {MAX_CHAIN_NAME} characters")
    if not _CHAIN_RE.fullmatch(name):
        raise RuleError(
            f"chain name {name!r} may hold only letters, digits, '-', '_' and '.', "
            "and must start with a letter or digit"
        )
    if name.upper() in _BUILTIN or name in _TARGETS:
        raise RuleError(f"chain name {name!r} is a built-in chain or target")
    return name


def _validate_port(port: int) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise RuleError(f"port must be an integer from 1 to 65535, got {port!r}")
    return port


@dataclass(frozen=True)
class RejectRule:
    """A REJECT of TCP to ``port`` from any interface but loopback (so local probes pass)."""

    port: int
    reject_with: str
    syn_only: bool = False

    def save_form(self, family: Family, chain: str) -> str:
        """The rule exactly as ``iptables-save`` prints it (without the leading ``-A CHAIN``)."""
        syn = " --tcp-flags FIN,SYN,RST,ACK SYN" if self.syn_only else ""
        return (
            f"! -i lo -p tcp -m tcp --dport {self.port}{syn} "
            f"-j REJECT --reject-with {reject_for(self.reject_with, family)}"
        )


def reject_for(reject_with: str, family: Family) -> str:
    """The family's spelling of a reject type (ICMPv6 has its own names)."""
    if reject_with not in REJECT_CHOICES:
        choices = ", ".join(REJECT_CHOICES)
        raise RuleError(f"reject_with must be one of {choices}, got {reject_with!r}")
    if reject_with == "icmp-port-unreachable" and family is Family.V6:
        return "icmp6-port-unreachable"
    return reject_with


@dataclass(frozen=True)
class ChainSpec:
    """The chain the agent owns, validated at construction."""

    name: str = "sslvpn-heartbeat-chain"
    port: int = 8080
    reject_with: str = "icmp-port-unreachable"

    def __post_init__(self) -> None:
        validate_chain_name(self.name)
        _validate_port(self.port)
        reject_for(self.reject_with, Family.V4)


def chain_rules(spec: ChainSpec, mode: Mode) -> tuple[RejectRule, ...]:
    """The chain's content for a mode: empty when OPEN, one REJECT rule otherwise."""
    if mode is Mode.OPEN:
        return ()
    # A drain lets established sessions finish: only SYN (new connections) is rejected.
    if mode is Mode.DRAIN:
        return (RejectRule(spec.port, spec.reject_with, syn_only=True),)
    return (RejectRule(spec.port, spec.reject_with),)
