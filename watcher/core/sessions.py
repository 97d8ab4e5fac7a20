"""Which established connections a drain may end: the pure idle decision.

A pooling gateway (HAProxy ``http-reuse``, nginx upstream ``keepalive``, the Access Gateway's
persistent connections) keeps TCP connections to each server and sends new users' requests
over them, so a drain that only rejects SYNs moves nobody. The agent ends the *idle* ones; the
gateway then opens a new connection, meets the drain's SYN reject and goes to another server.

A connection is idle when the kernel's own bookkeeping says no request is on it:

* ``rqueue == 0``: the service has read every byte the peer sent (no request waiting);
* ``wqueue == 0``: the peer acknowledged every byte the service wrote (no answer on its way);
* ``last_data_sent <= last_data_recv`` (both in "milliseconds ago"): the service has not
  received data since it last wrote, so the last request was answered; a request read and
  still being worked on has it the other way round, however long it takes;
* ``last_data_sent >= quiet_ms``: nothing moved either way for ``quiet_ms``, so an answer that
  writes in parts is not cut between two parts that come closer together than that.

The kernel keeps these times in jiffies (4 ms at Debian's HZ=250), and a fast service answers
within one: request and answer then show the same time, and that tie must count as answered,
or a server behind a busy gateway would never drain. The one case it misjudges is a new
request that comes in the same tick as the answer before it and then takes longer than
``quiet_ms``: the gateway sees its connection reset before any answer, which HAProxy
(``retry-on`` with ``redispatch``) and nginx (``proxy_next_upstream error``, idempotent
requests) send again to another server.
"""

from __future__ import annotations

__all__ = ["DEFAULT_QUIET_MS", "idle"]

# Long against the gap between two writes of one HTTP answer on a LAN (the service writes its
# headers and body back to back; the peer's ACK comes within a round trip), short against the
# gap between two requests a busy pooling gateway sends over one connection (tens of ms at a
# few hundred requests a second), or a loaded server would never drain.
DEFAULT_QUIET_MS = 50


def idle(rqueue: int, wqueue: int, last_data_sent_ms: int | None,
         last_data_recv_ms: int | None, quiet_ms: int) -> bool:
    """True when a connection carries no request: nothing queued either way, the last request
    answered, and no data for ``quiet_ms``; False when the kernel gave no times."""
    if last_data_sent_ms is None or last_data_recv_ms is None:
        return False
    return (rqueue == 0 and wqueue == 0 and last_data_sent_ms <= last_data_recv_ms
            and last_data_sent_ms >= quiet_ms)
