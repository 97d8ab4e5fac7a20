"""The fleet guard on the command line: ``fleet [--json]`` and the maintenance slot that
``block`` takes (``--wait-slot``, ``--force``) and ``unblock`` gives back.

A slot key belongs to the running agent's lease (the CLI only borrows it), so a server that
dies frees its slot within ``lease_s``. Without a free slot ``block`` exits 75 naming the
holders before it changes or records anything.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from watcher.config import Config, FleetConfig
from watcher.core.catalogue import Event
from watcher.core.fleet import min_open_count, view_summary
from watcher.errors import EX_TEMPFAIL, AgentError, ConfigError

__all__ = ["EtcdUnreachable", "NoSlot", "before_block", "cmd_fleet", "release_slot"]


class NoSlot(AgentError):
    """No maintenance slot could be taken (all held, or etcd unreachable): exit 75."""

    exit_code = EX_TEMPFAIL


class EtcdUnreachable(AgentError):
    """No etcd endpoint answered: exit 75, naming each endpoint's error."""

    exit_code = EX_TEMPFAIL


def _fleet_cfg(cfg: Config) -> FleetConfig:
    if cfg.fleet is None:
        raise ConfigError("fleet", "no [fleet] section: this server is not part of a fleet group")
    return cfg.fleet


def _etcd(f: FleetConfig) -> Any:
    from watcher.fleet.etcd import Etcd  # imports etcd3gw: only with [fleet]

    return Etcd(f)


def cmd_fleet(cfg: Config, as_json: bool) -> int:
    """Print the group: members with mode, cause, since; slot holders; the budget."""
    from watcher.fleet.etcd import EtcdError

    f = _fleet_cfg(cfg)
    etcd = _etcd(f)
    try:
        snap = etcd.snapshot()
    except EtcdError as exc:
        raise EtcdUnreachable(f"etcd unreachable: {exc}") from None
    report = {"group": f.group, "member": f.member, "maintenance_slots": f.maintenance_slots,
              **view_summary(snap.view(), f.size, min_open_count(f.min_open, f.size))}
    if as_json:
        print(json.dumps(report, indent=2, sort_keys=True))
        return 0
    print(f"group {f.group}: {report['open']} of {f.size} open, min_open {report['min_open']}, "
          f"{report['budget_left']} more suspect block(s) allowed")
    for m in report["members"]:
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(m["since"]))
        me = "  (this server)" if m["member"] == f.member else ""
        print(f"  {m['member']:<24} {m['mode']:<6} {m['cause']:<7} since {since}{me}")
    missing = f.size - len(report["members"])
    if missing > 0:
        print(f"  ({missing} member(s) of {f.size} not registered: counted not open)")
    holders = ", ".join(report["slot_holders"]) or "none"
    print(f"maintenance slots: {len(report['slot_holders'])} of {f.maintenance_slots} held ({holders})")
    return 0


def before_block(cfg: Config, args: argparse.Namespace, log: Any) -> bool:
    """With [fleet], take a maintenance slot for this member before a block (or wait for one
    with ``--wait-slot``); True if one was taken. ``--force`` takes none and logs the audit
    event. Raises NoSlot (exit 75) naming the holders, having changed nothing."""
    f = cfg.fleet
    if f is None:
        return False
    from watcher.fleet.etcd import EtcdError, SlotTaken

    etcd = _etcd(f)
    if args.force:
        try:
            holders = list(view_summary(etcd.snapshot().view(), f.size, 0)["slot_holders"])
        except EtcdError as exc:
            holders = [f"unknown: etcd unreachable: {exc}"]
        log.warning(Event.FLEET_SLOT_FORCED, member=f.member, slot_holders=holders,
                    reason=f"block --force without a maintenance slot: {args.reason}")
        return False
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    shown: tuple[str, ...] | None = None
    while True:
        try:
            lease = etcd.lease_of(f.member)
            if not lease:
                raise NoSlot(f"no running agent of member {f.member!r} is registered in fleet "
                             f"group {f.group!r} (a slot belongs to the agent's lease): start "
                             "the agent, or use --force")
            holders = etcd.take_slot(lease, args.reason)
            log.info(Event.FLEET_SLOT_TAKEN, member=f.member, slot_holders=list(holders))
            return True
        except SlotTaken as busy:
            if not args.wait_slot:
                raise NoSlot(f"no free maintenance slot in fleet group {f.group!r} "
                             f"({f.maintenance_slots} held by: {', '.join(busy.holders)}); "
                             "nothing changed. Wait with --wait-slot, or --force") from None
            if busy.holders != shown:
                shown = busy.holders
                print(f"waiting for a maintenance slot: held by {', '.join(busy.holders)}",
                      file=sys.stderr, flush=True)
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise NoSlot(f"timed out waiting for a maintenance slot (held by "
                             f"{', '.join(busy.holders)}); nothing changed") from None
            try:
                etcd.wait_change(etcd.snapshot().revision, left)
            except EtcdError as exc:
                raise NoSlot(f"etcd unreachable while waiting for a slot: {exc}") from None
        except EtcdError as exc:
            raise NoSlot(f"etcd unreachable, no maintenance slot taken: {exc}; nothing changed "
                         "(use --force to block without a slot)") from None


def release_slot(cfg: Config, log: Any) -> None:
    """With [fleet], give this member's maintenance slot back (best effort: the agent's own
    registration releases it too, and a dead agent's lease takes it along)."""
    if cfg.fleet is None:
        return
    from watcher.fleet.etcd import EtcdError

    try:
        _etcd(cfg.fleet).release_slot()
    except EtcdError as exc:
        log.warning(Event.FLEET_ERROR, reason=f"releasing the maintenance slot: {exc}",
                    member=cfg.fleet.member)
