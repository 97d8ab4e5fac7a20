"""The command line: argparse, subcommands, and the one place that maps errors to exit codes.

This module wires concrete parts (config, backend, firewall, logging); decisions live elsewhere.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rules.errors import BackendUnavailable, LockContention, RulesError
from rules.firewall import Firewall
from rules.model import ChainSpec, Mode
from rules.select import make_backend
from watcher import __version__
from watcher.config import DEFAULT_CONFIG_PATH, Config, load_config
from watcher.errors import (
    EX_CONFIG,
    EX_OK,
    EX_UNAVAILABLE,
    EX_UNHEALTHY,
    EX_USAGE,
    AgentError,
    FacilityMissing,
)
from watcher.logevents import Event
from watcher.statedir import StateDir

__all__ = ["EX_TEMPFAIL", "build_firewall", "main"]

EX_TEMPFAIL = 75  # sysexits: the firewall change failed for a transient reason (lock, refusal)
CAP_NET_ADMIN = 12


def _has_cap_net_admin() -> bool:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    except (OSError, ValueError, IndexError):
        pass
    return os.geteuid() == 0


def require_net_admin() -> None:
    """Raise FacilityMissing (exit 69) unless this process has CAP_NET_ADMIN."""
    if not _has_cap_net_admin():
        raise FacilityMissing("CAP_NET_ADMIN is needed to change the firewall: run as root")


def chain_spec(cfg: Config) -> ChainSpec:
    """The chain the configuration describes."""
    return ChainSpec(cfg.firewall.chain, cfg.service.port, cfg.firewall.reject_with)


def build_firewall(cfg: Config, log: Any = None, *, prestart: bool = False) -> Firewall:
    """The Firewall for ``cfg``, its backend chosen and checked (BackendUnavailable if not).

    ``prestart``: the daemon's choice, an iptables-restore kept started ahead of each change.
    """
    backend = make_backend(cfg.firewall.backend, lock_wait_s=cfg.firewall.lock_wait_s,
                           prestart=prestart)
    return Firewall(backend, chain_spec(cfg), ipv6=cfg.firewall.ipv6, log=log)


def _load(args: argparse.Namespace) -> Config:
    path: Path = args.config
    return load_config(path, missing_ok=not args.config_given)


def _cli_logger(cfg: Config) -> Any:
    """A logger for one-shot commands: the configured sinks, stream on stderr."""
    from watcher import logsetup

    return logsetup.configure(cfg.log, service_name=cfg.service.name, stream=sys.stderr).logger()


def _firewall_command(args: argparse.Namespace) -> tuple[Config, Any, Firewall]:
    """What every firewall-changing command starts with: a valid config, the privilege, a
    logger on the configured sinks, and a checked backend. Raises before anything changes."""
    cfg = _load(args)
    require_net_admin()
    log = _cli_logger(cfg)
    return cfg, log, build_firewall(cfg, log)


def _mode_of(state: Any) -> str:
    return str(state.mode_guess)


def cmd_status(args: argparse.Namespace) -> int:
    """Print the chain's state in each family, the admin block and the daemon's state."""
    cfg = _load(args)
    require_net_admin()
    fw = build_firewall(cfg, _cli_logger(cfg))  # a skipped IPv6 is said, not silently left out
    states = fw.read()
    sd = StateDir(cfg.state.dir)
    admin = sd.admin()
    daemon = sd.daemon()
    report: dict[str, Any] = {
        "chain": cfg.firewall.chain,
        "port": cfg.service.port,
        "backend": fw.backend.name,
        "families": {
            str(f): {
                "flavour": fw.backend.flavour(f),
                "chain_present": s.chain_present,
                "state": _mode_of(s),
                "rules": list(s.rules),
                "jumps": len(s.jumps),
                "jump_positions": list(s.jumps),
            }
            for f, s in states.items()
        },
        "admin_block": None if admin is None else
        {"drain": admin.drain, "reason": admin.reason, "since": admin.since},
        "daemon": daemon,
    }
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
        return EX_OK
    print(f"chain {cfg.firewall.chain} (port {cfg.service.port}, backend {fw.backend.name})")
    for fam, info in report["families"].items():
        where = ",".join(map(str, info["jump_positions"])) or "-"
        print(f"  {fam}: {info['state']:<8} jumps from INPUT: {info['jumps']} "
              f"(position {where})  [{info['flavour']}]")
    if admin is None:
        print("admin block: none")
    else:
        kind = "drain (new connections only)" if admin.drain else "block"
        print(f"admin block: {kind}" + (f", reason: {admin.reason}" if admin.reason else ""))
    if daemon is None:
        print("daemon: not running")
    else:
        print(f"daemon: running, pid {daemon.get('pid')}, service {daemon.get('health', '?')}, "
              f"firewall {daemon.get('mode', '?')}")
    return EX_OK


def cmd_block(args: argparse.Namespace) -> int:
    """Record an admin block (it survives restarts) and apply it now."""
    cfg, log, fw = _firewall_command(args)
    mode = Mode.DRAIN if args.drain else Mode.BLOCK
    # The kernel first, the record after: a block that iptables refused (exit 75) leaves no
    # record behind, so the state directory never claims what the firewall does not hold.
    report = fw.ensure(mode)
    rec = StateDir(cfg.state.dir).set_admin(args.drain, args.reason)
    log.info(Event.ADMIN_BLOCK, reason=rec.reason, drain=rec.drain, trigger="admin",
             families=[str(f) for f in fw.families], transactions=report.transactions)
    what = "new connections to" if args.drain else "connections to"
    print(f"blocked: {what} port {cfg.service.port} are rejected "
          f"(chain {cfg.firewall.chain}, {'+'.join(str(f) for f in fw.families)})")
    return EX_OK


def cmd_unblock(args: argparse.Namespace) -> int:
    """Lift the admin block; with no daemon running, open the chain too."""
    cfg, log, fw = _firewall_command(args)
    sd = StateDir(cfg.state.dir)
    daemon = sd.daemon()
    if daemon is None:
        # No daemon to hand the chain to: open it, and only then drop the record (an open
        # that iptables refused keeps the block recorded, as the kernel still holds it).
        fw.ensure(Mode.OPEN)
    had = sd.clear_admin()
    log.info(Event.ADMIN_UNBLOCK, trigger="admin", had_block=had, daemon_running=daemon is not None)
    if daemon is not None:
        print(f"admin block lifted; the daemon (pid {daemon.get('pid')}) now sets the chain "
              "from the service's health")
        return EX_OK
    print(f"unblocked: port {cfg.service.port} accepts connections (chain {cfg.firewall.chain} empty)")
    return EX_OK


def cmd_cleanup(args: argparse.Namespace) -> int:
    """Remove our chain and its jump in both families."""
    cfg, log, fw = _firewall_command(args)
    report = fw.remove()
    log.info(Event.FIREWALL_REMOVE, trigger="admin", families=[str(f) for f in report.changed])
    print(f"removed chain {cfg.firewall.chain} and its jump"
          + ("" if report.changed else " (there was nothing to remove)"))
    return EX_OK


def cmd_config_check(args: argparse.Namespace) -> int:
    """Validate the configuration file and say so."""
    load_config(args.config)
    print(f"{args.config}: ok")
    return EX_OK


def cmd_check(args: argparse.Namespace) -> int:
    """Run one verification probe now; print it as JSON; exit 0 healthy, 1 unhealthy."""
    import asyncio

    from watcher.probe import Prober
    from watcher.sources.sock_diag import listening

    cfg = _load(args)
    prober = Prober(cfg.service, cfg.probe, own_pid=os.getpid(), listening=listening)
    result = asyncio.run(prober.probe())
    out = {
        "healthy": result.ok,
        "check": result.check,
        "reason": result.reason,
        "pid": result.pid,
        "checks_passed": list(result.checks),
        "duration_ms": round(result.duration_ns / 1e6, 3),
        "service": cfg.service.name,
        "port": cfg.service.port,
    }
    print(json.dumps(out, sort_keys=True))
    return EX_OK if result.ok else EX_UNHEALTHY


def cmd_run(args: argparse.Namespace) -> int:
    """Run the daemon in the foreground until SIGTERM."""
    from watcher.daemon import run_daemon

    cfg = _load(args)
    require_net_admin()
    return run_daemon(cfg, config_path=args.config, config_given=args.config_given,
                      log_format=args.log_format)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand and its options."""
    config_help = f"configuration file (default {DEFAULT_CONFIG_PATH})"
    # Subcommands SUPPRESS the default, so `--config X status` and `status --config X` both work.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, default=argparse.SUPPRESS, metavar="PATH",
                        help=config_help)
    p = argparse.ArgumentParser(
        prog="sslvpn-heartbeat",
        description="Block TCP port 8080 with iptables while the local SSL VPN service is unhealthy.",
    )
    p.add_argument("--config", type=Path, default=None, metavar="PATH", help=config_help)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    r = sub.add_parser("run", parents=[common], help="run the event-driven daemon in the foreground")
    r.add_argument("--log-format", choices=("json", "console"), default=None,
                   help="log format (default: the config's; console when stdout is a terminal)")
    r.set_defaults(func=cmd_run)
    c = sub.add_parser("check", parents=[common], help="probe the service once; exit 0 healthy, 1 not")
    c.set_defaults(func=cmd_check)
    s = sub.add_parser("status", parents=[common], help="show the chain, admin block and daemon state")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=cmd_status)
    b = sub.add_parser("block", parents=[common], help="admin block (survives daemon restarts)")
    b.add_argument("--drain", action="store_true",
                   help="reject only new connections so established sessions can finish")
    b.add_argument("--reason", default="", metavar="TEXT", help="why (logged and shown in status)")
    b.set_defaults(func=cmd_block)
    u = sub.add_parser("unblock", parents=[common], help="lift the admin block")
    u.set_defaults(func=cmd_unblock)
    x = sub.add_parser("cleanup", parents=[common], help="remove the chain and its jump (IPv4 and IPv6)")
    x.set_defaults(func=cmd_cleanup)
    k = sub.add_parser("config-check", parents=[common], help="validate the configuration file")
    k.set_defaults(func=cmd_config_check)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run the subcommand, and map every error to its exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return int(exc.code or 0)
    args.config_given = args.config is not None
    if args.config is None:
        args.config = DEFAULT_CONFIG_PATH
    if getattr(args, "reason", None) is not None and (len(args.reason) > 512
                                                       or not args.reason.isprintable()):
        print("sslvpn-heartbeat: --reason must be printable text of at most 512 characters",
              file=sys.stderr)
        return EX_USAGE
    try:
        return int(args.func(args))
    except AgentError as exc:
        kind = "configuration error" if exc.exit_code == EX_CONFIG else "error"
        print(f"sslvpn-heartbeat: {kind}: {exc}", file=sys.stderr)
        return exc.exit_code
    except BackendUnavailable as exc:
        print(f"sslvpn-heartbeat: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE
    except LockContention as exc:
        print(f"sslvpn-heartbeat: firewall busy: {exc}", file=sys.stderr)
        return EX_TEMPFAIL
    except RulesError as exc:
        print(f"sslvpn-heartbeat: firewall change failed: {exc}", file=sys.stderr)
        return EX_TEMPFAIL
    except KeyboardInterrupt:
        return 130
