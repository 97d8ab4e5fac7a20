"""Which established connections a drain may end: the pure idle decision.

A pooling gateway (HAProxy ``http-reuse``, nginx upstream ``keepalive``, the Access Gateway's
persistent connections) keeps TCP connections to each server and sends new users' requests
over them, so a drain that only rejects SYNs moves nobody. The agent ends the *idle* ones; the
gateway then opens a new connection, meets the drain's SYN reject and goes to another server.

A connection is idle when the kernel's own bookkeeping says no request is on it:

* ``rqueue == 0``: the service has read every byte the peer sent (no request waiting);
* nothing of an answer is still to go out: ``wqueue == 0`` (the peer acknowledged it all), or
  only acknowledgements are missing: nothing unsent (``tcpi_notsent_bytes``), nothing being
  retransmitted (``tcpi_retrans``) and the last data left at least four round trips
  (``tcpi_min_rtt``: the smoothed ``tcpi_rtt`` includes the peer's ACK delay) and
  ``quiet_ms`` ago. A pooling gateway delays its ACK (40 ms and more on
  Linux) and piggybacks it on its next request, so a busy pooled connection never shows an
  empty ``wqueue`` between two requests; waiting for one would never drain a loaded server;
* ``last_data_sent <= last_data_recv`` (both in "milliseconds ago"): the service has not
  received data since it last wrote, so the last request was answered; a request read and
  still being worked on has it the other way round, however long it takes;
* ``last_data_sent >= quiet_ms``: nothing moved either way for ``quiet_ms``.

The kernel keeps these times in jiffies (4 ms at Debian's HZ=250), and a fast service answers
within one: request and answer then show the same time, and that tie must count as answered,
or a server behind a busy gateway would never drain. What this cannot see: a new request that
comes in the same tick as the answer before it and then takes longer than ``quiet_ms``, and an
answer that pauses longer than that with all it wrote on the wire (a stream, a long poll); the
gateway sees that connection reset. HAProxy (``retry-on`` with ``redispatch``) and nginx
(``proxy_next_upstream error``, idempotent requests) send a request that got no answer at all
to another server; a stream cut halfway fails.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_QUIET_MS", "TcpView", "idle"]

# Longer than the pauses inside one answer: a service writes an answer's parts back to back
# (microseconds apart), and the kernel's clock ticks every 4 ms, so 10 ms is at least two
# ticks of silence. Shorter than the gap between two requests a busy pooling gateway sends
# over one connection (20 ms at 50 requests a second per server over one pooled connection),
# or a loaded server would never show an idle moment and never drain.
DEFAULT_QUIET_MS = 10
_RTTS = 4  # round trips an answer's last bytes have had to reach the peer


@dataclass(frozen=True)
class TcpView:
    """What sock_diag tells of one connection: its queues (bytes) and its tcp_info (times in
    milliseconds ago, ``rtt_us`` the path's round trip, tcpi_min_rtt); None where the kernel
    gave none."""

    rqueue: int
    wqueue: int
    last_data_sent_ms: int | None
    last_data_recv_ms: int | None
    notsent_bytes: int | None = None
    retrans: int | None = None
    rtt_us: int | None = None


def idle(c: TcpView, quiet_ms: int) -> bool:
    """True when a connection carries no request: nothing unread, nothing of an answer left to
    go out, the last request answered, and no data for ``quiet_ms``; False when the kernel gave
    no times."""
    sent, recv = c.last_data_sent_ms, c.last_data_recv_ms
    if sent is None or recv is None or c.rqueue != 0 or sent > recv or sent < quiet_ms:
        return False
    if c.wqueue == 0:
        return True
    # Sent but not yet acknowledged: idle only if all of it is on the wire, none of it lost
    # as far as the kernel knows, and it has had time to arrive.
    if c.notsent_bytes is None or c.retrans is None or c.rtt_us is None:
        return False
    return c.notsent_bytes == 0 and c.retrans == 0 and sent * 1000 >= _RTTS * c.rtt_us
