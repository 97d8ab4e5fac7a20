"""The connection resetter: one thread that carries out the control core's ResetConnections
(sock_diag dump and SOCK_DESTROY, ``watcher.sources.sock_destroy``), so a netlink round never
stalls the event loop; each outcome goes back to the core as ConnectionsReset."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections.abc import Callable
from functools import partial

from watcher.core import control
from watcher.core.sessions import TcpView, idle
from watcher.sources.sock_destroy import Conn, ResetOutcome, reset_connections

__all__ = ["ConnectionResetter"]


def _busy(quiet_ms: int, c: Conn) -> bool:
    """True for a connection a drain keeps: one that is not idle."""
    return not idle(TcpView(c.rqueue, c.wqueue, c.last_data_sent_ms, c.last_data_recv_ms,
                            c.notsent_bytes, c.retrans, c.min_rtt_us), quiet_ms)


def _keep_none(c: Conn) -> bool:
    return False


class ConnectionResetter:
    """Runs ``ResetConnections`` for ``port``; answers with ``feed`` on the event loop."""

    def __init__(self, port: int, feed: Callable[[control.Input], None],
                 reset: Callable[..., ResetOutcome] = reset_connections) -> None:
        self.port = port
        self._feed = feed
        self._reset = reset
        self._loop = asyncio.get_running_loop()
        self._exec = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="resetter")

    def carry_out(self, act: control.ResetConnections) -> None:
        """Start the round in the resetter thread; ConnectionsReset follows on the loop."""
        keep = partial(_busy, act.quiet_ms) if act.idle_only else _keep_none
        fut = self._exec.submit(self._reset, self.port, keep)
        fut.add_done_callback(partial(self._done, act))

    def _done(self, act: control.ResetConnections,
              fut: concurrent.futures.Future[ResetOutcome]) -> None:
        exc = fut.exception()
        if exc is None:
            o = fut.result()
            inp = control.ConnectionsReset(act.idle_only, dict(o.reset), o.kept, o.error,
                                           o.unsupported, o.duration_ns)
        else:  # a bug, not the kernel: the core still gets its answer
            inp = control.ConnectionsReset(act.idle_only, error=f"internal error: {exc!r}")
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
            self._loop.call_soon_threadsafe(self._feed, inp)

    def close(self) -> None:
        """Stop taking rounds; one under way finishes in its thread (bounded by its timeout)."""
        self._exec.shutdown(wait=False, cancel_futures=True)
