"""The firewall worker: one thread that carries out the control core's firewall changes, so a
lock wait never stalls the event loop; each outcome goes back to the core as an input."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import time
from collections.abc import Callable
from typing import Any

from rules.errors import RulesError
from rules.firewall import ApplyReport, Firewall
from watcher.core import control
from watcher.core.catalogue import Event
from watcher.errors import exit_code_of, is_transient

__all__ = ["FirewallWorker"]


class FirewallWorker:
    """Runs ``SetFirewall`` and ``RemoveChain`` on ``firewall``; answers with ``feed``."""

    def __init__(self, firewall: Firewall, feed: Callable[[control.Input], None], log: Any,
                 clock: Callable[[], int] = time.monotonic_ns) -> None:
        self.firewall = firewall
        self._feed = feed
        self.log = log
        self._clock = clock
        self._loop = asyncio.get_running_loop()
        self._exec = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="firewall")

    def carry_out(self, act: control.SetFirewall | control.RemoveChain) -> None:
        """Start the change in the worker thread; Applied or ApplyFailed follows on the loop."""
        started = self._clock()
        fut = self._exec.submit(self._call, act)
        fut.add_done_callback(lambda f: self._loop.call_soon_threadsafe(self._done, f, started))

    def _call(self, act: control.SetFirewall | control.RemoveChain) -> ApplyReport:
        if isinstance(act, control.SetFirewall):
            return self.firewall.ensure(act.mode, fresh=act.fresh, deadline_ns=act.deadline_ns)
        return self.firewall.remove(deadline_ns=act.deadline_ns)

    def _done(self, fut: concurrent.futures.Future[ApplyReport], started: int) -> None:
        exc = fut.exception()
        if exc is None:
            rep = fut.result()
            inp: control.Input = control.Applied(tuple(map(str, rep.changed)), rep.transactions,
                                                 rep.committed_ns, self._clock() - started)
        elif isinstance(exc, RulesError):
            inp = control.ApplyFailed(str(exc), None if is_transient(exc) else exit_code_of(exc))
        else:
            self.log.error(Event.INTERNAL_ERROR, reason=repr(exc))
            inp = control.ApplyFailed(repr(exc))
        self._feed(inp)

    def close(self, *, stuck: bool) -> None:
        """Release the thread and the backend; ``stuck``: a change outlived the stop bound, so
        neither is waited for (the process ends anyway)."""
        if stuck:
            self._exec.shutdown(wait=False)
            return
        # Closed on the thread that used it: pyroute2 0.9 keeps a synchronous socket's event loop
        # per thread and cannot run one here, on the thread of the daemon's running loop.
        closed = self._exec.submit(self.firewall.close)
        self._exec.shutdown(wait=True)
        with contextlib.suppress(RulesError):
            closed.result()
