"""A bounded client load: requests at a fixed rate for a bounded time, one JSON line per request.

    python -m tests.testbed.load --url http://10.200.0.1:80/ --rate 200 --duration 5 --out f.jsonl

Request ``i`` is due at ``i / rate`` seconds after the start and is sent then, on a new connection,
however many earlier ones are still waiting (a slow answer never delays the schedule, and a stale
keep-alive connection can never pass for a bad answer).
The run always ends by itself: at most ``min(rate * duration, --max-requests)`` requests, each
with a timeout, and a hard deadline after which unfinished requests are recorded as errors.
SIGTERM stops the schedule early; the requests already sent are still waited for and recorded.
Lines are written (and flushed) as answers arrive, so a test can wait for the first ones.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import signal
import sys
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

__all__ = ["Record", "Summary", "parse_answer", "read_records", "run_load", "schedule",
           "summarize"]

MAX_ANSWER = 65536


@dataclass(frozen=True)
class Record:
    """One request: when it was due and sent (seconds from the start), what came back."""

    i: int
    due: float
    t: float  # when it was sent
    latency_ms: float
    status: int  # 0: no HTTP answer
    server: str  # first word of the body ("" without an answer)
    error: str  # "" for an HTTP answer

    @property
    def bad(self) -> bool:
        """True for anything but a 2xx answer (5xx, timeout, refused, reset)."""
        return not 200 <= self.status < 300


@dataclass(frozen=True)
class Summary:
    """Counts over a run: total, good, bad, and answers per server and per status."""

    total: int
    ok: int
    bad: int
    by_server: dict[str, int]
    by_status: dict[int, int]


def schedule(rate: float, duration: float, max_requests: int | None = None) -> list[float]:
    """Due times (s from start) of a fixed-rate run: ``i / rate`` below ``duration``, capped."""
    if rate <= 0 or duration <= 0:
        raise ValueError("rate and duration must be positive")
    n = math.ceil(rate * duration - 1e-9)
    if max_requests is not None:
        n = min(n, max_requests)
    return [i / rate for i in range(n)]


def summarize(records: Iterable[Record]) -> Summary:
    """Totals of ``records``; ``by_server`` counts good answers only."""
    recs = list(records)
    ok = [r for r in recs if not r.bad]
    return Summary(total=len(recs), ok=len(ok), bad=len(recs) - len(ok),
                   by_server=dict(Counter(r.server for r in ok)),
                   by_status=dict(Counter(r.status for r in recs)))


def read_records(path: Path) -> list[Record]:
    """The records in a JSON-lines file, in due order (a torn last line is skipped)."""
    out = []
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    for line in text.splitlines():
        try:
            out.append(Record(**json.loads(line)))
        except (ValueError, TypeError):
            continue
    return sorted(out, key=lambda r: r.i)


async def _one(host: str, port: int, path: str, timeout: float) -> tuple[int, str, str]:
    """One GET on a new connection: (status, server, error); never raises for network errors."""
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
                         .encode())
            await writer.drain()
            data = await reader.read(MAX_ANSWER)
            while chunk := await reader.read(MAX_ANSWER):
                data = (data + chunk)[:MAX_ANSWER]
    except (OSError, TimeoutError) as e:
        return 0, "", f"{type(e).__name__}: {e}"[:200]
    finally:
        if writer is not None:
            writer.close()
    return parse_answer(data)


def parse_answer(data: bytes) -> tuple[int, str, str]:
    """(status, first word of the body, error) of a raw HTTP/1.x answer."""
    head, _, body = data.partition(b"\r\n\r\n")
    parts = head.split(b"\r\n", 1)[0].split()
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        return 0, "", f"no HTTP answer ({len(data)} bytes)"
    words = body.split()
    return int(parts[1]), (words[0].decode(errors="replace") if words else ""), ""


async def _run(url: str, due: Sequence[float], timeout: float, emit: Callable[[Record], None],
               t0: float, sent_at: dict[int, float]) -> None:
    target = urllib.parse.urlsplit(url)
    host, port, path = target.hostname or "127.0.0.1", target.port or 80, target.path or "/"
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # SIGTERM ends the schedule, not the requests already sent: each is still answered or
    # times out and is recorded, so a window that ends at the stop loses none of its requests.
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    async def request(i: int) -> None:
        sent = time.monotonic()
        sent_at[i] = sent - t0
        status, server, error = await _one(host, port, path, timeout)
        end = time.monotonic()
        emit(Record(i, round(due[i], 6), round(sent - t0, 6), round((end - sent) * 1e3, 3),
                    status, server, error))

    tasks = []
    for i, d in enumerate(due):
        delay = t0 + d - time.monotonic()
        if delay > 0:
            # pacing the schedule, not synchronising with anything; a stop cuts it short
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
        if stop.is_set():
            break
        tasks.append(asyncio.create_task(request(i)))
    # Every request carries its own timeout; this bound only guards against the unforeseen.
    if tasks:
        await asyncio.wait(tasks, timeout=timeout + 1.0)
    for t in tasks:
        t.cancel()
    loop.remove_signal_handler(signal.SIGTERM)


def run_load(url: str, rate: float, duration: float, out: IO[str], *, timeout: float = 2.0,
             max_requests: int | None = None) -> Summary:
    """Send the scheduled requests, write one JSON line each to ``out``; returns within bounds.

    On SIGTERM no further request is sent; those in flight are still waited for and recorded.
    """
    due = schedule(rate, duration, max_requests)
    done: dict[int, Record] = {}
    sent_at: dict[int, float] = {}

    def emit(rec: Record) -> None:
        if rec.i in done:
            return
        done[rec.i] = rec
        out.write(json.dumps(asdict(rec)) + "\n")
        out.flush()

    t0 = time.monotonic()
    asyncio.run(_run(url, due, timeout, emit, t0, sent_at))
    # A request sent but never answered within the bound counts as an error, at the time it
    # was sent (so it stays in its window); requests a stop kept from being sent are not records.
    for i, t in sent_at.items():
        emit(Record(i, round(due[i], 6), round(t, 6), 0.0, 0, "", "unfinished at the deadline"))
    return summarize(done.values())


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry; prints a one-line JSON summary to stdout and exits 0."""
    ap = argparse.ArgumentParser(prog="python -m tests.testbed.load")
    ap.add_argument("--url", required=True)
    ap.add_argument("--rate", type=float, default=200.0, help="requests per second")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds")
    ap.add_argument("--max-requests", type=int, default=None)
    ap.add_argument("--timeout", type=float, default=2.0, help="per request, seconds")
    ap.add_argument("--out", type=Path, required=True, help="JSON lines, one per request")
    a = ap.parse_args(argv)
    with open(a.out, "w") as out:
        s = run_load(a.url, a.rate, a.duration, out, timeout=a.timeout,
                     max_requests=a.max_requests)
    print(json.dumps(asdict(s)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
