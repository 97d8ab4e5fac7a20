"""watcher.outputs.agentcheck: the answer as a pure function of the status, and the listener's bounds."""

from __future__ import annotations

import asyncio
import socket

from hypothesis import given
from hypothesis import strategies as st

from rules.model import Mode
from watcher.core.control import AdminBlock, Health
from watcher.core.control import Status as CoreStatus
from watcher.outputs.agentcheck import MAX_REASON, AgentCheck, answer, sanitize

_HAPROXY_WORDS = {"up", "down", "ready", "drain", "maint", "100%"}


def Status(health: str = "starting", admin: bool = False, drain: bool = False,
           admin_reason: str = "", failure: str = "", mode: Mode | None = None) -> CoreStatus:
    """The core's status with these facts (a test shorthand: flags instead of an AdminBlock)."""
    return CoreStatus(Health(health), mode, AdminBlock(drain, admin_reason) if admin else None,
                      failure)


statuses = st.builds(Status, health=st.sampled_from(["starting", "up", "down"]),
                     admin=st.booleans(), drain=st.booleans(), admin_reason=st.text(max_size=400),
                     failure=st.text(max_size=400), mode=st.none() | st.sampled_from(Mode))


def test_the_four_states_give_haproxy_the_documented_words() -> None:
    """Healthy: up ready 100%; drain: drain; full block: maint + reason; down: down + reason."""
    assert answer(Status(health="up")) == "up ready 100%\n"
    assert answer(Status(health="up", admin=True, drain=True)) == "up drain\n"
    assert answer(Status(health="up", admin=True, admin_reason="kernel update")) \
        == "maint #admin block: kernel update\n"
    assert answer(Status(health="down", failure="pid 42 gone")) == "down ready #pid 42 gone\n"
    assert answer(Status(health="down", admin=True, drain=True, failure="x")) == "down drain #x\n"
    assert answer(Status(health="starting")).startswith("down ready #")


@given(statuses)
def test_every_answer_is_one_bounded_printable_ascii_line(s: CoreStatus) -> None:
    """Whatever the reasons hold, the answer is one line of printable ASCII under 200 bytes."""
    line = answer(s)
    assert line.endswith("\n") and "\n" not in line[:-1]
    assert all(" " <= c <= "~" for c in line[:-1])
    assert len(line.encode("ascii")) < 200


@given(statuses)
def test_the_words_before_the_reason_match_the_state(s: CoreStatus) -> None:
    """The words HAProxy acts on (before "#") follow from health and admin block alone."""
    words = answer(s).split("#", 1)[0].split()
    assert set(words) <= _HAPROXY_WORDS
    if s.admin is not None and not s.admin.drain:
        assert words == ["maint"]
    elif s.admin is not None:
        assert words == ["up" if s.health == "up" else "down", "drain"]
    elif s.health == "up":
        assert words == ["up", "ready", "100%"]
    else:
        assert words == ["down", "ready"]


@given(st.text(max_size=1000))
def test_sanitize_keeps_printable_ascii_and_bounds_the_length(text: str) -> None:
    """sanitize gives printable ASCII, no newline, no double space, at most MAX_REASON chars."""
    out = sanitize(text)
    assert len(out) <= MAX_REASON
    assert all(" " <= c <= "~" for c in out)
    assert "  " not in out and out == out.strip()


def test_sanitize_keeps_a_plain_reason_as_it_is() -> None:
    """An ordinary reason passes unchanged; control characters become "?" or a space."""
    assert sanitize("connect 127.0.0.1:8080: refused") == "connect 127.0.0.1:8080: refused"
    assert sanitize("a\nb\tc\x00d\u00e9") == "a b c?d?"


async def _read_line(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        return await asyncio.wait_for(reader.read(), 2)
    finally:
        writer.close()


def test_listener_answers_the_current_line_and_closes() -> None:
    """A connection reads the current answer and then EOF; update changes the next answer."""
    async def main() -> tuple[bytes, bytes]:
        ac = AgentCheck("127.0.0.1", 0)
        await ac.start()
        try:
            port = ac.bound[1]
            ac.update(Status(health="up"))
            first = await _read_line(port)
            ac.update(Status(health="down", failure="listener gone"))
            second = await _read_line(port)
            return first, second
        finally:
            await ac.close()

    assert asyncio.run(main()) == (b"up ready 100%\n", b"down ready #listener gone\n")


def test_connections_beyond_the_bound_are_reset_at_once() -> None:
    """With max_conns reached, a new connection gets no answer and is counted as refused."""
    async def main() -> tuple[bytes, AgentCheck]:
        ac = AgentCheck("127.0.0.1", 0, max_conns=0)
        await ac.start()
        try:
            try:
                got = await _read_line(ac.bound[1])
            except ConnectionResetError:
                got = b""
            return got, ac
        finally:
            await ac.close()

    got, ac = asyncio.run(main())
    assert got == b"" and ac.refused == 1 and ac.served == 0


def test_a_client_that_never_reads_is_aborted_and_others_are_served_meanwhile() -> None:
    """A client that leaves the answer unread is dropped after timeout_s; the loop serves on."""
    async def main() -> tuple[AgentCheck, bytes, float]:
        ac = AgentCheck("127.0.0.1", 0, timeout_s=0.5)
        await ac.start()
        loop = asyncio.get_running_loop()
        port = ac.bound[1]
        ac.line = b"x" * (8 << 20)  # more than any socket buffer: the write cannot finish
        slow = socket.socket()
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.setblocking(False)
        try:
            await loop.sock_connect(slow, ("127.0.0.1", port))
            t0 = loop.time()
            while ac.served < 1 and loop.time() < t0 + 5:
                await asyncio.sleep(0.01)
            ac.update(Status(health="up"))
            ac.line = b"up ready 100%\n"
            other = await _read_line(port)  # served while the slow one is still held
            while ac.timeouts < 1 and loop.time() < t0 + 5:
                await asyncio.sleep(0.01)
            return ac, other, loop.time() - t0
        finally:
            slow.close()
            await ac.close()

    ac, other, took = asyncio.run(main())
    assert other == b"up ready 100%\n"
    assert ac.timeouts == 1 and ac.active == 0 and took < 5
