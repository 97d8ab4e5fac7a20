"""The composition root: configuration -> logging -> instance lock -> firewall -> daemon.

The one place that builds concrete parts and hands them in; nothing imports it but the CLI.
"""

from __future__ import annotations

import asyncio
import logging as stdlib_logging
import signal
import sys
from pathlib import Path
from typing import Any

from rules.errors import ForeignChain, RulesError
from rules.firewall import Firewall
from rules.model import ChainSpec
from watcher.config import Config, load_config
from watcher.core.catalogue import Event
from watcher.outputs.logpipeline import configure
from watcher.outputs.notify import Notifier
from watcher.statedir import StateDir

__all__ = ["build_firewall", "chain_spec", "run"]


def chain_spec(cfg: Config) -> ChainSpec:
    """The chain the configuration describes."""
    return ChainSpec(cfg.firewall.chain, cfg.service.port, cfg.firewall.reject_with)


def build_firewall(cfg: Config, log: Any = None, *, prestart: bool = False) -> Firewall:
    """The Firewall for ``cfg``, its backend chosen and checked (BackendUnavailable if not).

    ``prestart``: the daemon's choice, an iptables-restore kept started ahead of each change.
    Its families are not detected yet: call ``detect_families()``.
    """
    return Firewall.open(cfg.firewall.backend, chain_spec(cfg), ipv6=cfg.firewall.ipv6, log=log,
                         lock_wait_s=cfg.firewall.lock_wait_s, prestart=prestart)


def run(cfg: Config, *, config_path: Path, config_given: bool, log_format: str | None) -> int:
    """Build the daemon from ``cfg`` and run it until SIGTERM (the CLI's ``run``)."""
    from watcher.daemon import HANDLED_SIGNALS, Daemon

    # Signals wait until the daemon handles them (Daemon.run unblocks them).
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
    fmt = log_format or ("console" if sys.stdout.isatty() else None)
    logging_ = configure(cfg.log, service_name=cfg.service.name, force_format=fmt)
    logging_.install()
    # pyinotify logs through a stderr handler of its own; send its records to the JSON sinks.
    pyinotify_log = stdlib_logging.getLogger("pyinotify")
    pyinotify_log.handlers.clear()
    pyinotify_log.propagate = True
    path = config_path if config_given or config_path.exists() else None
    try:
        with StateDir(cfg.state.dir).lock():
            log = logging_.logger(**{"service.name": cfg.service.name})
            fw = build_firewall(cfg, log, prestart=True)
            fw.detect_families()
            try:
                fw.check_ownership()  # another tool's chain of our name: exit 78, nothing changed
            except ForeignChain as exc:
                log.error(Event.CONFIG_INVALID, reason=str(exc), path=str(path or ""))
                fw.close()
                raise
            except RulesError:
                pass  # a read that failed now: the first change checks again, and is retried

            async def main() -> int:
                daemon = Daemon(cfg, firewall=fw, logging_=logging_, notifier=Notifier.from_env(),
                                load=(lambda: load_config(path)) if path else (lambda: daemon.cfg),
                                config_path=str(path or ""))
                return await daemon.run()

            return asyncio.run(main())
    finally:
        logging_.close()
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
