"""The command line: argparse, subcommands, and the one place that maps errors to exit codes.

This module wires concrete parts (config, backend, firewall, logging); decisions live elsewhere.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rules.errors import BackendUnavailable, ForeignChain, LockContention, RulesError
from rules.firewall import Firewall
from rules.model import Mode
from rules.plan import foreign_conflict
from watcher import __version__
from watcher.app import build_firewall
from watcher.cli.duration import DurationError, format_duration, parse_duration
from watcher.config import DEFAULT_CONFIG_PATH, Config, LogFormat, load_config
from watcher.core.catalogue import Event
from watcher.errors import (
    EX_CONFIG,
    EX_OK,
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
    EX_UNHEALTHY,
    EX_USAGE,
    AgentError,
    FacilityMissing,
    exit_code_of,
)
from watcher.statedir import AdminRecord, StateDir

__all__ = ["main"]

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


def _load(args: argparse.Namespace) -> Config:
    path: Path = args.config
    return load_config(path, missing_ok=not args.config_given)


def _cli_logger(cfg: Config) -> Any:
    """A logger for one-shot commands: the configured sinks, stream on stderr."""
    from watcher.outputs import logpipeline as logsetup

    return logsetup.configure(cfg.log, service_name=cfg.service.name, stream=sys.stderr).logger()


def _firewall_command(args: argparse.Namespace) -> tuple[Config, Any, Firewall]:
    """What every firewall-changing command starts with: a valid config, the privilege, a
    logger on the configured sinks, and a checked backend. Raises before anything changes."""
    cfg = _load(args)
    require_net_admin()
    log = _cli_logger(cfg)
    fw = build_firewall(cfg, log)
    fw.detect_families()
    return cfg, log, fw


def _mode_of(state: Any) -> str:
    return str(state.mode_guess)


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _expire_admin(sd: StateDir, log: Any) -> AdminRecord | None:
    """Remove a timed admin record past its ``until`` (logged as admin-unblock, reason
    expired); return the removed record."""
    gone = sd.expire_admin()
    if gone is not None:
        log.info(Event.ADMIN_UNBLOCK, reason="expired", trigger="admin", until=gone.until,
                 drain=gone.drain)
    return gone


def _established(port: int) -> int:
    from watcher.sources.sock_diag import established

    return established(port)


def cmd_status(args: argparse.Namespace) -> int:
    """Print the chain's state in each family, the admin block, the established connections
    to the port and the daemon's state."""
    cfg = _load(args)
    require_net_admin()
    log = _cli_logger(cfg)
    fw = build_firewall(cfg, log)
    fw.detect_families()  # a skipped IPv6 is said, not silently left out
    states = fw.read()
    sd = StateDir(cfg.state.dir)
    expired = _expire_admin(sd, log)
    now = time.time()
    admin = sd.admin(now)
    agent = sd.agent()
    daemon = None if agent is None else {**sd.daemon(agent), "pid": agent.pid}
    established = _established(cfg.service.port)
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
                "foreign": foreign_conflict(s, cfg.firewall.chain, f),
            }
            for f, s in states.items()
        },
        "admin_block": None if admin is None else
        {"drain": admin.drain, "reason": admin.reason, "since": admin.since,
         "until": admin.until, "remaining_s": admin.remaining(now)},
        "established": established,
        "daemon": daemon,
        "fleet": None if daemon is None else daemon.get("fleet"),  # with [fleet], from the agent
    }
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
        return EX_OK
    print(f"chain {cfg.firewall.chain} (port {cfg.service.port}, backend {fw.backend.name})")
    for fam, info in report["families"].items():
        where = ",".join(map(str, info["jump_positions"])) or "-"
        print(f"  {fam}: {info['state']:<8} jumps from INPUT: {info['jumps']} "
              f"(position {where})  [{info['flavour']}]")
        if info["foreign"]:
            print(f"    someone else's chain, the agent will not touch it: {info['foreign']}")
    if admin is None:
        print("admin block: none" + ("" if expired is None else
                                     f" (a timed block expired at {_iso(expired.until or 0)})"))
    else:
        kind = "drain (new connections only)" if admin.drain else "block"
        left = admin.remaining(now)
        print(f"admin block: {kind}" + (f", reason: {admin.reason}" if admin.reason else "")
              + ("" if left is None or admin.until is None else
                 f", lifts itself at {_iso(admin.until)} (in {format_duration(left)})"))
    print(f"established connections to port {cfg.service.port}: {established}")
    if daemon is None:
        print("daemon: not running")
    else:
        print(f"daemon: running, pid {daemon.get('pid')}, service {daemon.get('health', '?')}, "
              f"firewall {daemon.get('mode', '?')}")
        fl = daemon.get("fleet")
        if isinstance(fl, dict):
            state = ("etcd unreachable" if fl.get("reachable") is False else
                     "refused: the guard keeps it open (not open: "
                     f"{', '.join(map(str, fl.get('not_open', ()))) or '-'})" if fl.get("refused")
                     else "permit held" if fl.get("permit") else "etcd reachable")
            print(f"fleet: member {fl.get('member')}, {fl.get('open')} of {fl.get('size')} open "
                  f"(min_open {fl.get('min_open')}, {fl.get('budget_left')} more suspect "
                  f"block(s) allowed), {state}")
    return EX_OK


def _usage(message: str) -> int:
    print(f"sslvpn-heartbeat: usage error: {message}", file=sys.stderr)
    return EX_USAGE


def cmd_block(args: argparse.Namespace) -> int:
    """Record an admin block (it survives restarts) and apply it now; ``--for`` makes it lift
    itself at that time, ``--wait`` waits for the drained connections to end."""
    if args.wait and not args.drain:
        return _usage("--wait needs --drain (a full block rejects the established sessions' "
                      "packets too, so there is nothing to wait for; a drain lets them finish)")
    if args.timeout is not None and not (args.wait or args.wait_slot):
        return _usage("--timeout needs --wait or --wait-slot")
    if args.force and args.wait_slot:
        return _usage("--force and --wait-slot exclude each other")
    if getattr(args, "then_reset", False) and args.timeout is None:
        return _usage("--then-reset needs --wait --timeout SECONDS (what is left then is reset)")
    seconds = None
    if args.for_ is not None:
        try:
            seconds = parse_duration(args.for_)
        except DurationError as exc:
            return _usage(f"--for: {exc}")
    cfg, log, fw = _firewall_command(args)
    sd = StateDir(cfg.state.dir)
    _expire_admin(sd, log)
    mode = Mode.DRAIN if args.drain else Mode.BLOCK
    from watcher.cli import fleet as fleet_cli

    slot = fleet_cli.before_block(cfg, args, log)  # [fleet]: a maintenance slot first, or exit 75
    # The kernel first, the record after: a block that iptables refused (exit 75) leaves no
    # record behind, so the state directory never claims what the firewall does not hold.
    try:
        report = fw.ensure(mode)
    except BaseException:
        if slot:
            fleet_cli.release_slot(cfg, log)
        raise
    until = None if seconds is None else time.time() + seconds
    rec = sd.set_admin(args.drain, args.reason, until=until)
    log.info(Event.ADMIN_BLOCK, reason=rec.reason, drain=rec.drain, trigger="admin",
             families=[str(f) for f in fw.families], transactions=report.transactions,
             until=rec.until)
    what = "new connections to" if args.drain else "connections to"
    timed = "" if rec.until is None or seconds is None else \
        f"; lifts itself at {_iso(rec.until)} (in {format_duration(seconds)})"
    if timed and sd.agent() is None:
        timed += "; no daemon runs now: after that the chain opens at its start or with unblock"
    # With --wait, stdout carries the progress only (JSON lines when it is not a terminal).
    print(f"blocked: {what} port {cfg.service.port} are rejected "
          f"(chain {cfg.firewall.chain}, {'+'.join(str(f) for f in fw.families)}){timed}",
          file=sys.stderr if args.wait else sys.stdout)
    if args.wait:
        code = _wait_drained(cfg, log, args.timeout)
        if code == EX_TEMPFAIL and getattr(args, "then_reset", False):
            return _reset_left(cfg, log)
        return code
    return EX_OK


EX_RESET = 1  # block --drain --wait --then-reset: the timeout passed, what was left was reset


def _reset_left(cfg: Config, log: Any) -> int:
    """End the established connections to the port from other hosts that the drain's timeout
    left: exit 1 once none remains, 75 when the kernel refused or some remain."""
    from watcher.sources.sock_destroy import reset_connections

    port = cfg.service.port
    out = reset_connections(port, lambda c: False)
    n = sum(out.reset.values())
    log.info(Event.CONNECTIONS_RESET, reset_ipv4=out.reset["ipv4"], reset_ipv6=out.reset["ipv6"],
             kept=0, drain=True, trigger="admin", **{"event.duration": out.duration_ns})
    if out.error:
        log.warning(Event.CONNECTIONS_RESET_FAILED, reason=out.error, drain=True, trigger="admin")
        print(f"sslvpn-heartbeat: --then-reset: {out.error}; {n} reset, the drain stays in "
              "force", file=sys.stderr)
        return EX_TEMPFAIL
    left = _established(port)
    print(f"reset: {n} established connection{'' if n == 1 else 's'} to port {port} "
          f"ended after the timeout; {left} remain{'s' if left == 1 else ''} (loopback ones "
          "are never reset)", file=sys.stderr)
    return EX_RESET if left == 0 else EX_TEMPFAIL


def _wait_drained(cfg: Config, log: Any, timeout: float | None) -> int:
    """Wait until no established connection to the port remains: 0, or 75 on timeout (the
    drain stays recorded and in force either way)."""
    from watcher.cli.drain import JsonProgress, LiveLine, wait_drained

    port = cfg.service.port
    show: LiveLine | JsonProgress = (LiveLine(sys.stdout, port, timeout) if sys.stdout.isatty()
                                     else JsonProgress(sys.stdout, port))
    started = time.monotonic()
    try:
        drained, left = wait_drained(lambda: _established(port), show, timeout=timeout)
    except KeyboardInterrupt:
        show.end()
        print("sslvpn-heartbeat: interrupted: the drain stays in force", file=sys.stderr)
        raise
    except BaseException:
        show.end()
        raise
    elapsed = round(time.monotonic() - started, 3)
    if drained:
        log.info(Event.DRAIN_COMPLETE, port=port, elapsed_s=elapsed)
        print(f"drained: no established connection to port {port} remains", file=sys.stderr)
        return EX_OK
    show.end()
    log.warning(Event.DRAIN_TIMEOUT, port=port, elapsed_s=elapsed, established=left)
    print(f"sslvpn-heartbeat: timed out after {timeout:g}s: {left} established "
          f"connection{'' if left == 1 else 's'} to port {port} remain; the drain stays in force",
          file=sys.stderr)
    return EX_TEMPFAIL


def cmd_unblock(args: argparse.Namespace) -> int:
    """Lift the admin block; with no daemon running, open the chain too."""
    cfg, log, fw = _firewall_command(args)
    fw.check_ownership()  # a foreign chain: exit 78, the record kept, even with a daemon running
    sd = StateDir(cfg.state.dir)
    _expire_admin(sd, log)
    agent = sd.agent()  # the instance lock says whether a daemon runs, never a command line
    if agent is None:
        # No daemon to hand the chain to: open it, and only then drop the record (an open
        # that iptables refused keeps the block recorded, as the kernel still holds it).
        fw.ensure(Mode.OPEN)
    had = sd.clear_admin()
    from watcher.cli import fleet as fleet_cli

    fleet_cli.release_slot(cfg, log)
    log.info(Event.ADMIN_UNBLOCK, trigger="admin", had_block=had, daemon_running=agent is not None)
    if agent is not None:
        print(f"admin block lifted; the daemon (pid {agent.pid or 'unknown'}) now sets the chain "
              "from the service's health")
        return EX_OK
    print(f"unblocked: port {cfg.service.port} accepts connections (chain {cfg.firewall.chain} empty)")
    return EX_OK


def cmd_fleet(args: argparse.Namespace) -> int:
    """Print the fleet group: its members, slot holders and budget ([fleet] only)."""
    from watcher.cli import fleet as fleet_cli

    return fleet_cli.cmd_fleet(_load(args), args.json)


def cmd_cleanup(args: argparse.Namespace) -> int:
    """Remove our chain and its jump in both families, unless an agent runs on the state
    directory: it owns the chain and would put it back at once, so exit 75 naming it."""
    cfg, log, fw = _firewall_command(args)
    agent = StateDir(cfg.state.dir).agent()  # asked of the instance lock, as unblock does
    if agent is not None:
        print(f"sslvpn-heartbeat: an agent (pid {agent.pid or 'unknown'}) is running with state "
              f"directory {cfg.state.dir} and owns chain {cfg.firewall.chain}; stop it first "
              "(systemctl stop sslvpn-heartbeat), then run cleanup; nothing removed", file=sys.stderr)
        return EX_TEMPFAIL
    report = fw.remove()
    log.info(Event.FIREWALL_REMOVE, trigger="admin", families=[str(f) for f in report.changed])
    print(f"removed chain {cfg.firewall.chain} and its jump"
          + ("" if report.changed else " (there was nothing to remove)"))
    return EX_OK


def cmd_config_check(args: argparse.Namespace) -> int:
    """Validate the configuration file and say so; on a live system (CAP_NET_ADMIN, iptables
    there) also refuse a chain that belongs to someone else (ForeignChain, exit 78)."""
    cfg = load_config(args.config)
    if _has_cap_net_admin():
        try:
            fw = build_firewall(cfg)
        except BackendUnavailable as exc:
            print(f"firewall not checked: {exc}", file=sys.stderr)
        else:
            try:
                fw.detect_families()
                fw.check_ownership()
            except ForeignChain:
                raise
            except RulesError as exc:
                print(f"firewall not checked: {exc}", file=sys.stderr)
            finally:
                fw.close()
    print(f"{args.config}: ok")
    return EX_OK


def cmd_check(args: argparse.Namespace) -> int:
    """Run one verification probe now; print it as JSON; exit 0 healthy, 1 unhealthy. With
    ``--nagios``: one monitoring-plugin line, exit 0/1/2/3 (see watcher.cli.nagios)."""
    if args.nagios:
        return _check_nagios(args)
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


def _check_nagios(args: argparse.Namespace) -> int:
    """``check --nagios``: never an exit code outside 0-3; a check that cannot run is UNKNOWN."""
    from watcher.cli import nagios

    try:
        code, line = _nagios_verdict(args)
    except AgentError as exc:
        kind = "configuration error" if exc.exit_code == EX_CONFIG else "cannot check"
        code, line = nagios.unknown(f"{kind}: {exc}")
    except Exception as exc:  # the plugin API wants UNKNOWN, not a traceback and exit 1
        code, line = nagios.unknown(f"cannot check: {type(exc).__name__}: {exc}")
    print(line)
    return code


def _nagios_verdict(args: argparse.Namespace) -> tuple[int, str]:
    import asyncio

    from watcher.cli import nagios
    from watcher.probe import Prober
    from watcher.sources.sock_diag import listening
    from watcher.statedir import ADMIN_FILE

    cfg = _load(args)
    sd = StateDir(cfg.state.dir)
    try:
        os.lstat(sd.path / ADMIN_FILE)
    except FileNotFoundError:
        pass  # no admin block (or no state directory yet)
    except OSError as exc:
        return nagios.unknown(f"cannot read the state directory {sd.path}: {exc.strerror}; "
                              "run the check as root or as the agent's user")
    try:
        agent = sd.agent()
    except OSError as exc:
        return nagios.unknown(f"cannot read the instance lock in {sd.path}: {exc.strerror}; "
                              "run the check as root or as the agent's user")
    prober = Prober(cfg.service, cfg.probe, own_pid=os.getpid(), listening=listening)
    result = asyncio.run(prober.probe())
    now = time.time()
    facts = nagios.Facts(
        service=cfg.service.name, port=cfg.service.port, healthy=result.ok,
        reason=result.reason, probe_s=result.duration_ns / 1e9,
        established=_established(cfg.service.port), admin=sd.admin(now),
        daemon_running=agent is not None, now=now,
        fleet=None if agent is None else sd.daemon(agent).get("fleet"))
    return nagios.verdict(facts)


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a positive number of seconds")
    return value


def cmd_run(args: argparse.Namespace) -> int:
    """Run the daemon in the foreground until SIGTERM."""
    from watcher import app

    cfg = _load(args)
    require_net_admin()
    return app.run(cfg, config_path=args.config, config_given=args.config_given,
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
    r.add_argument("--log-format", choices=tuple(LogFormat), default=None,
                   help="log format (default: the config's; console when stdout is a terminal)")
    r.set_defaults(func=cmd_run)
    c = sub.add_parser("check", parents=[common], help="probe the service once; exit 0 healthy, 1 not")
    c.add_argument("--nagios", action="store_true",
                   help="one monitoring-plugin line; exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN")
    c.set_defaults(func=cmd_check)
    s = sub.add_parser("status", parents=[common], help="show the chain, admin block and daemon state")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=cmd_status)
    b = sub.add_parser("block", parents=[common], help="admin block (survives daemon restarts)")
    b.add_argument("--drain", action="store_true",
                   help="reject only new connections so established sessions can finish")
    b.add_argument("--reason", default="", metavar="TEXT", help="why (logged and shown in status)")
    b.add_argument("--for", dest="for_", default=None, metavar="DURATION",
                   help="lift the block by itself after DURATION (90s, 30m, 2h, 1h30m, 1d)")
    b.add_argument("--wait", action="store_true",
                   help="with --drain: wait until no established connection to the port remains")
    b.add_argument("--timeout", type=_positive_seconds, default=None, metavar="SECONDS",
                   help="with --wait: give up after SECONDS (exit 75, the drain kept)")
    b.add_argument("--then-reset", dest="then_reset", action="store_true",
                   help="with --wait --timeout: on timeout, end (TCP reset) the connections from "
                        "other hosts that are left; exit 1 when none remains then")
    b.add_argument("--wait-slot", action="store_true",
                   help="[fleet]: wait for a free maintenance slot (with --timeout: at most SECONDS)")
    b.add_argument("--force", action="store_true",
                   help="[fleet]: block without a maintenance slot (logged as an audit event)")
    b.set_defaults(func=cmd_block)
    u = sub.add_parser("unblock", parents=[common], help="lift the admin block")
    u.set_defaults(func=cmd_unblock)
    x = sub.add_parser("cleanup", parents=[common], help="remove the chain and its jump (IPv4 and IPv6)")
    x.set_defaults(func=cmd_cleanup)
    fl = sub.add_parser("fleet", parents=[common], help="show the fleet group ([fleet]) and its budget")
    fl.add_argument("--json", action="store_true", help="print JSON")
    fl.set_defaults(func=cmd_fleet)
    k = sub.add_parser("config-check", parents=[common], help="validate the configuration file")
    k.set_defaults(func=cmd_config_check)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run the subcommand, and map every error to its exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        code = int(exc.code or 0)
        words = sys.argv[1:] if argv is None else list(argv)
        if code and "check" in words and "--nagios" in words:
            # the plugin API: invalid arguments are UNKNOWN (3), with a line saying so
            print("SSLVPN-HEARTBEAT UNKNOWN - invalid arguments (see the message above)")
            return 3
        return code
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
    except (AgentError, RulesError) as exc:
        code = exit_code_of(exc)
        print(f"sslvpn-heartbeat: {_what(exc, code)}{exc}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        return 130


def _what(exc: BaseException, code: int) -> str:
    """The words before an error's message: what kind of failure the operator is told of."""
    if isinstance(exc, AgentError | ForeignChain):
        return "configuration error: " if code == EX_CONFIG else "error: "
    if isinstance(exc, LockContention):
        return "firewall busy: "
    if code == EX_UNAVAILABLE:  # the message names what is missing
        return ""
    return "firewall change failed: "
