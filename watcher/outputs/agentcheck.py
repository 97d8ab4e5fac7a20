"""HAProxy's agent check: each connection gets one line saying how HAProxy should treat us.

HAProxy (``server ... agent-check agent-port PORT agent-inter 2s``) connects, reads until the
connection closes and acts on the words of the line: ``up``/``down`` set the server's operational
state, ``ready``/``drain``/``maint`` its administrative state, ``N%`` its weight, and the text
after ``#`` is shown as the reason. The answer is a pure function of the core's status
(``answer`` of a ``watcher.core.control.Status``), computed when the core publishes a change,
so serving a connection is one non-blocking write of a prepared line.

The server runs on the daemon's event loop and reads nothing: reading is paused as soon as a
connection is accepted (HAProxy's ``agent-send`` is not used). Connections beyond ``max_conns``
are reset at once, and one that has not taken its line within ``timeout_s`` is aborted, so a slow
or hostile client holds at most a socket for a bounded time and never delays the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

from rules.model import Mode
from watcher.core.control import Health, Status

__all__ = [
    "MAX_REASON",
    "STARTING",
    "AgentCheck",
    "answer",
    "sanitize",
]

STARTING = Status(Health.STARTING, None, None, "")  # what is known before the first decision

MAX_REASON = 160  # characters of the reason after "#"; the whole line stays under 200 bytes
MAX_CONNS = 32
TIMEOUT_S = 1.0
BACKLOG = 128  # HAProxy checks each server from each process every agent-inter: a few at most


def sanitize(text: str, limit: int = MAX_REASON) -> str:
    """``text`` as one line of printable ASCII, runs of whitespace as one space, at most ``limit``."""
    out: list[str] = []
    for ch in text:
        if ch.isspace():
            if out and out[-1] != " ":
                out.append(" ")
        elif " " < ch <= "~":
            out.append(ch)
        else:
            out.append("?")
    clean = "".join(out).strip()
    if len(clean) > limit:
        clean = clean[: limit - 3].rstrip() + "..."
    return clean


def answer(s: Status) -> str:
    """The agent-check line (with its newline) for ``s``.

    * full admin block: ``maint #admin block: REASON`` (HAProxy sends nothing to the server);
    * drain: ``up drain`` (``down drain #REASON`` if the service is down as well): sessions
      that persist may finish, no new ones;
    * service healthy: ``up ready 100%`` (``ready`` lifts a drain or maint set earlier);
    * otherwise: ``down ready #REASON``.
    """
    if s.admin is not None and not s.admin.drain:
        reason = sanitize(s.admin.reason) or "no reason given"
        return sanitize(f"maint #admin block: {reason}") + "\n"
    if s.health is Health.UP:
        return "up drain\n" if s.admin else "up ready 100%\n"
    if (s.fleet is not None and s.fleet.refused is not None and s.mode is Mode.OPEN
            and s.admin is None):
        # the fleet guard keeps this failing server open: taking it out of rotation here
        # would undo the guard
        return "up ready 100%\n"
    if s.health is Health.STARTING:
        why = "agent starting, first probe not done"
    else:
        why = sanitize(s.reason) or "service down"
    return ("down drain #" if s.admin else "down ready #") + sanitize(why) + "\n"


class _Conn(asyncio.Protocol):
    def __init__(self, server: AgentCheck) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        srv = self._server
        if srv.active >= srv.max_conns:
            srv.refused += 1
            transport.abort()
            return
        srv.active += 1
        srv.served += 1
        transport.pause_reading()  # nothing HAProxy could send changes the answer
        self._timer = asyncio.get_running_loop().call_later(srv.timeout_s, self._expire)
        transport.write(srv.line)  # buffered, never blocks: asyncio sends what the socket takes
        transport.close()  # after the buffer drained: FIN, HAProxy reads the line up to it

    def _expire(self) -> None:
        if self._transport is not None:
            self._server.timeouts += 1
            self._transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._server.active -= 1
        self._transport = None


class AgentCheck:
    """The agent-check listener on ``host``:``port``; ``update`` sets the answer."""

    def __init__(self, host: str, port: int, *, max_conns: int = MAX_CONNS,
                 timeout_s: float = TIMEOUT_S) -> None:
        self.host, self.port = host, port
        self.max_conns, self.timeout_s = max_conns, timeout_s
        self.status = STARTING
        self.line = answer(self.status).encode("ascii")
        self.active = self.served = self.refused = self.timeouts = 0
        self._server: asyncio.Server | None = None

    def update(self, status: Status) -> None:
        """Answer according to ``status`` from now on (pure computation, no I/O)."""
        if status != self.status:
            self.status = status
            self.line = answer(status).encode("ascii")

    @property
    def listening(self) -> bool:
        """True while the listener is open."""
        return self._server is not None

    async def start(self) -> None:
        """Open the listener (OSError, e.g. the address in use, is the caller's to report)."""
        if self._server is not None:
            return
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Conn(self), self.host, self.port, family=family, backlog=BACKLOG,
            reuse_address=True, start_serving=True)

    @property
    def bound(self) -> tuple[Any, ...]:
        """The address the listener is bound to (the port chosen when 0 was asked)."""
        assert self._server is not None, "not listening"
        addr: tuple[Any, ...] = self._server.sockets[0].getsockname()
        return addr

    async def close(self) -> None:
        """Close the listener; connections in progress end by themselves (bounded by timeout_s)."""
        srv, self._server = self._server, None
        if srv is not None:
            srv.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(srv.wait_closed(), self.timeout_s)
