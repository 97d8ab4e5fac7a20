"""Errors of the rules package. Each carries the command's stderr where there was one."""

from __future__ import annotations

__all__ = [
    "BackendUnavailable",
    "BatchRefused",
    "ForeignChain",
    "LockContention",
    "ReadBackMismatch",
    "RuleError",
    "RulesError",
    "TransactionFailed",
]


class RulesError(Exception):
    """Base class of every error raised by this package."""


class RuleError(RulesError, ValueError):
    """A value cannot be turned into a rule: bad chain name, port or reject type."""


class BackendUnavailable(RulesError):
    """The chosen backend cannot work here (no iptables binary, iptc on nf_tables, no privilege)."""


class TransactionFailed(RulesError):
    """The kernel (through iptables-restore or libiptc) refused the transaction; nothing changed."""

    def __init__(self, message: str, *, stderr: str = "", returncode: int | None = None) -> None:
        self.stderr = stderr
        self.returncode = returncode
        super().__init__(f"{message}: {stderr.strip()}" if stderr.strip() else message)


class BatchRefused(TransactionFailed):
    """The kernel refused an nf_tables netlink batch as a whole; nothing changed."""


class ForeignChain(RulesError):
    """The configured chain exists and holds, or is referenced by, rules the agent never writes:
    it belongs to someone else, and nothing was changed in either address family."""

    def __init__(self, chain: str, conflicts: tuple[str, ...]) -> None:
        self.chain = chain
        self.conflicts = conflicts
        super().__init__(
            f"chain {chain} belongs to someone else, nothing was changed ("
            + "; ".join(conflicts)
            + "): set firewall.chain to a name no other tool uses"
        )


class LockContention(TransactionFailed):
    """The xtables lock was held by another program past the wait bound (iptables exit code 4)."""


class ReadBackMismatch(RulesError):
    """The transaction was accepted but what the kernel holds afterwards is not what was asked."""
