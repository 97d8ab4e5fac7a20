"""Choosing a backend by name: ``restore``, ``iptc``, ``nft`` or ``auto``."""

from __future__ import annotations

from typing import Any

from rules.base import Backend, Runner, SubprocessRunner, detect_tools
from rules.errors import BackendUnavailable
from rules.iptc_backend import IptcBackend
from rules.model import Family
from rules.nft_backend import NftBackend
from rules.restore import RestoreBackend

__all__ = ["make_backend"]


def make_backend(name: str, *, runner: Runner | None = None, lock_wait_s: float = 5.0,
                 prestart: bool = False, log: Any = None) -> Backend:
    """The backend called ``name``; ``auto`` is iptc on legacy hosts where it loads, nft (netlink)
    on nf_tables hosts where a netlink socket opens, else restore.

    ``prestart`` (for the daemon) keeps an iptables-restore started ahead of each transaction
    (not for nft's netlink swaps). ``log`` (a structlog logger) hears nft's one fallback
    warning; without it, structlog's configured default logger does.

    Raises BackendUnavailable when iptables is missing or the named backend cannot work here.
    """
    run = runner or SubprocessRunner()
    if name == "restore":
        backend = RestoreBackend(run, lock_wait_s, prestart=prestart)
        backend.tools(Family.V4)  # fail now, clearly, if iptables is missing
        return backend
    if name == "iptc":
        return IptcBackend(run, lock_wait_s)
    if name == "nft":
        return NftBackend(run, lock_wait_s, prestart=prestart, log=log)
    if name == "auto":
        legacy = detect_tools(Family.V4, run).flavour == "legacy"
        try:
            if legacy:
                return IptcBackend(run, lock_wait_s)
            if runner is None:  # netlink writes the kernel itself: only with the real runner
                return NftBackend(run, lock_wait_s, prestart=prestart, log=log)
        except BackendUnavailable:
            pass
        return make_backend("restore", runner=run, lock_wait_s=lock_wait_s, prestart=prestart)
    raise BackendUnavailable(f"unknown backend {name!r} (restore, iptc, nft or auto)")
