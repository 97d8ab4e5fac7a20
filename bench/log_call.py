"""What one log call costs the caller: the agent's queued pipeline against a direct writer.

Run from the repository root: ``python -m bench.log_call [--calls N]``. No root needed. Each
variant makes N calls of a firewall-block event with the fields the daemon passes, and times
each call on the caller's side (what the event loop pays):

- ``agent, pipe read``: watcher.outputs.logpipeline's pipeline (ECS mapping, JSON, the bounded queue,
  the writer thread) to a pipe that a thread reads, as journald does;
- ``agent, pipe stalled``: the same to a one-page pipe that nobody reads (a stalled journald):
  lines beyond the queue are dropped and counted;
- ``structlog direct, pipe read`` (the peer): structlog's own synchronous setup
  (JSONRenderer, WriteLogger), which writes the line in the call; against a stalled pipe it
  would block the caller for good, so that case is not run.
"""

from __future__ import annotations

import argparse
import fcntl
import io
import os
import statistics
import threading
import time
from collections.abc import Callable

import structlog

from watcher.config import LogConfig
from watcher.core.catalogue import Event
from watcher.outputs.logpipeline import configure

FIELDS = {"reason": "confirmed by kernel event: process: PID 4242 is not running",
          "trigger": "pidfd", "detail": "exit pid 4242", "latency_ms": 3.48,
          "event.duration": 3_479_634, "transactions": 2, "families": ["ipv4", "ipv6"],
          "probe_ms": 0.204, "apply_ms": 9.528}


def _pipe(read: bool) -> tuple[io.TextIOWrapper, Callable[[], None]]:
    """The write end of a pipe as a text stream, and how to close both ends."""
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)
    reader = None
    if read:
        reader = threading.Thread(target=lambda: [None for _ in iter(lambda: os.read(r, 1 << 16), b"")],
                                  daemon=True)
        reader.start()
    stream = os.fdopen(w, "w")

    def close() -> None:
        stream.close()
        if reader is not None:
            reader.join(10)
        os.close(r)

    return stream, close


def _time(call: Callable[[], None], n: int) -> list[float]:
    """Microseconds per call, ``n`` calls."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        call()
        out.append((time.perf_counter_ns() - t0) / 1e3)
    return out


def agent(n: int, read: bool) -> tuple[list[float], int]:
    """The agent's pipeline: per-call times and lines dropped."""
    stream, close = _pipe(read)
    lg = configure(LogConfig(), service_name="novell-sslvpn", stream=stream)
    log = lg.logger()
    samples = _time(lambda: log.info(Event.FIREWALL_BLOCK, **FIELDS), n)
    if read:
        lg.flush(30)
    dropped = lg.dropped_total()
    if read:
        lg.close()
        close()
    else:
        lg.close()  # bounded: the writer still waits on the stalled pipe
    return samples, dropped


def direct(n: int) -> list[float]:
    """structlog's synchronous JSON setup writing to a pipe that is read."""
    stream, close = _pipe(True)
    log = structlog.wrap_logger(structlog.WriteLogger(stream), processors=[
        structlog.processors.add_log_level, structlog.processors.TimeStamper(fmt="iso"),
        structlog.processors.JSONRenderer()])

    def call() -> None:
        log.info("firewall-block", **FIELDS)
        stream.flush()

    samples = _time(call, n)
    close()
    return samples


def _row(name: str, s: list[float], extra: str = "") -> str:
    q = statistics.quantiles(s, n=100)
    return (f"| {name} | {len(s)} | {statistics.median(s):.1f} | {q[89]:.1f} | {q[98]:.1f} "
            f"| {max(s):.1f} | {extra} |")


def main() -> None:
    """Run the three variants and print one table, with the ratios of the medians."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=5000)
    args = ap.parse_args()
    read, _ = agent(args.calls, True)
    stalled, dropped = agent(args.calls, False)
    peer = direct(args.calls)
    print(f"# bench.log_call: {args.calls} calls per variant, {os.cpu_count()} CPUs "
          f"(load average {os.getloadavg()[0]:.1f})\n")
    print("| variant | n | p50 us | p90 | p99 | max | |")
    print("|---|---|---|---|---|---|---|")
    print(_row("agent, pipe read", read))
    print(_row("agent, pipe stalled", stalled, f"{dropped} lines dropped"))
    print(_row("structlog direct, pipe read", peer))
    base = statistics.median(peer)
    print(f"\nmedian per call over the direct writer: pipe read {statistics.median(read) / base:.2f}x, "
          f"pipe stalled {statistics.median(stalled) / base:.2f}x (the direct writer would block there)")


if __name__ == "__main__":
    main()
