"""The proc connector decoder, on bytes captured from the real kernel and on garbage."""

from __future__ import annotations

import contextlib
import json
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from watcher.sources._netlink import NLMSG_DONE, NetlinkDecodeError, iter_messages, pack_message
from watcher.sources.proc_connector import (
    CN_IDX_PROC,
    PROC_CN_MCAST_LISTEN,
    ProcEventKind,
    decode_proc_events,
    subscribe_message,
)

DATA = Path(__file__).parent / "data"
EXPECTED = json.loads((DATA / "expected.json").read_text())["cn"]


def _captured(name: str) -> bytes:
    return (DATA / f"cn_{name}.bin").read_bytes()


def test_fork_captured() -> None:
    """A captured fork event names the child and its parent."""
    (event,) = decode_proc_events(_captured("fork"))
    assert event.kind is ProcEventKind.FORK
    assert (event.pid, event.tgid) == (EXPECTED["child_pid"],) * 2
    assert event.parent_tgid == EXPECTED["parent_pid"]
    assert event.timestamp_ns > 0


def test_exec_captured() -> None:
    """A captured exec event names the process that exec'd."""
    (event,) = decode_proc_events(_captured("exec"))
    assert event.kind is ProcEventKind.EXEC
    assert (event.pid, event.tgid) == (EXPECTED["child_pid"],) * 2


def test_exit_captured() -> None:
    """A captured exit of `true` carries status 0, SIGCHLD and the parent."""
    (event,) = decode_proc_events(_captured("exit"))
    assert event.kind is ProcEventKind.EXIT
    assert (event.pid, event.tgid) == (EXPECTED["child_pid"],) * 2
    assert (event.exit_code, event.exit_signal) == (0, 17)
    assert event.parent_tgid == EXPECTED["parent_pid"]


def test_ack_captured() -> None:
    """The kernel's acknowledgement echoes our ack + 1 and carries errno 0."""
    (event,) = decode_proc_events(_captured("ack"))
    assert event.kind is ProcEventKind.NONE
    assert (event.cn_ack, event.err) == (42, 0)


def test_events_are_in_kernel_time_order() -> None:
    """fork, exec, exit of one process carry increasing kernel timestamps."""
    times = [decode_proc_events(_captured(n))[0].timestamp_ns for n in ("fork", "exec", "exit")]
    assert times == sorted(times)


def test_exit_before_linux_4_17_without_parent_fields() -> None:
    """An exit event without the parent fields (old kernels) still decodes, parents 0."""
    raw = _captured("exit")
    (msg,) = iter_messages(raw)
    short = msg.payload[:-8]
    short = short[:16] + struct.pack("=H", struct.unpack_from("=H", short, 16)[0] - 8) + short[18:]
    (event,) = decode_proc_events(pack_message(NLMSG_DONE, 0, 0, short))
    assert event.kind is ProcEventKind.EXIT and (event.parent_pid, event.parent_tgid) == (0, 0)


def test_other_connector_users_are_skipped() -> None:
    """A connector message for another index (not CN_IDX_PROC) yields nothing."""
    (msg,) = iter_messages(_captured("exec"))
    other = struct.pack("=I", 9) + msg.payload[4:]
    assert decode_proc_events(pack_message(NLMSG_DONE, 0, 0, other)) == []


def test_truncated_event_is_an_error() -> None:
    """An event cut short raises NetlinkDecodeError, not struct.error or IndexError."""
    (msg,) = iter_messages(_captured("exit"))
    with pytest.raises(NetlinkDecodeError):
        decode_proc_events(pack_message(NLMSG_DONE, 0, 0, msg.payload[:30]))


def test_subscribe_message_layout() -> None:
    """The subscription is one NLMSG_DONE carrying cn_msg{CN_IDX_PROC, len 4} and LISTEN."""
    (msg,) = iter_messages(subscribe_message(PROC_CN_MCAST_LISTEN, 5, 6))
    assert msg.type == NLMSG_DONE
    idx, val, seq, ack, length, _ = struct.unpack_from("=IIIIHH", msg.payload)
    assert (idx, val, seq, ack, length) == (CN_IDX_PROC, 1, 5, 6, 4)
    assert struct.unpack_from("=I", msg.payload, 20)[0] == PROC_CN_MCAST_LISTEN


@given(st.binary(max_size=200))
def test_garbage_never_crashes(data: bytes) -> None:
    """Arbitrary bytes decode to events or raise NetlinkDecodeError, never anything else."""
    with contextlib.suppress(NetlinkDecodeError):
        decode_proc_events(data)


@given(st.sampled_from(["ack", "fork", "exec", "exit"]), st.integers(0, 75),
       st.binary(min_size=1, max_size=8))
def test_mutated_capture_never_crashes(name: str, at: int, noise: bytes) -> None:
    """A captured datagram with bytes overwritten decodes or raises NetlinkDecodeError."""
    raw = bytearray(_captured(name))
    raw[at:at + len(noise)] = noise
    with contextlib.suppress(NetlinkDecodeError):
        decode_proc_events(bytes(raw))
