"""Log sinks: where rendered event lines go (stream, file, syslog over a unix socket, UDP or TCP).

A sink's ``write`` raises on failure; the fan-out in watcher.logsetup counts, reports and
retries. No sink ever blocks its caller: the file is a local append, the unix datagram socket
is non-blocking, and the network syslog sinks hand frames to one bounded background thread
(connect, DNS and a stalled collector wait there, never in the event loop).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import ipaddress
import os
import queue
import select
import socket
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

__all__ = [
    "APP_NAME",
    "DEFAULT_SYSLOG_ADDRESS",
    "FACILITIES",
    "Meta",
    "NetSyslogSink",
    "Sink",
    "SyslogAddress",
    "parse_syslog_address",
    "rfc5424",
]

APP_NAME = "sslvpn-heartbeat"
DEFAULT_SYSLOG_ADDRESS = "/dev/log"
ROTATE_CHECK_S = 1.0  # how often the file sink compares its path with its open file
BACKOFF_FIRST_S = 1.0
QUEUE_MAX = 1024  # frames waiting for a network collector; beyond that lines are dropped
CONNECT_TIMEOUT_S = 3.0
SEND_TIMEOUT_S = 3.0
FLUSH_AT_EXIT_S = 1.0  # how long process exit waits for queued frames to reach the collector

FACILITIES = {
    "kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6, "news": 7,
    "uucp": 8, "cron": 9, "authpriv": 10, "ftp": 11,
    **{f"local{i}": 16 + i for i in range(8)},
}


@dataclass(frozen=True)
class SyslogAddress:
    """Where syslog goes: ``transport`` "unix" with ``path``, or "udp"/"tcp" with host and port."""

    transport: str
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.transport == "unix":
            return self.path
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.transport}://{host}:{self.port}"


def _host_ok(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    return len(host) <= 253 and all(
        0 < len(lb) <= 63 and lb.isascii() and lb.replace("-", "").replace("_", "").isalnum()
        and not lb.startswith("-") for lb in labels)


def parse_syslog_address(text: str) -> SyslogAddress:
    """Parse "/dev/log", "udp://HOST:PORT" or "tcp://HOST:PORT" (IPv6 in brackets); ValueError if bad."""
    if text.startswith("/"):
        if "\x00" in text or "\n" in text or len(text.encode()) > 107:  # sun_path holds 108 bytes
            raise ValueError("a unix socket path must be at most 107 bytes, without NUL or newline")
        return SyslogAddress("unix", path=text)
    scheme, sep, rest = text.partition("://")
    if not sep or scheme not in ("udp", "tcp"):
        raise ValueError(f'must be an absolute socket path, "udp://HOST:PORT" or '
                         f'"tcp://HOST:PORT", got {text!r}')
    if rest.startswith("["):
        host, close, tail = rest[1:].partition("]")
        if not close or not tail.startswith(":"):
            raise ValueError(f"an IPv6 address must be [ADDR]:PORT, got {text!r}")
        port_s = tail[1:]
        try:
            if ipaddress.ip_address(host).version != 6:
                raise ValueError
        except ValueError:
            raise ValueError(f"{host!r} in brackets is not an IPv6 address") from None
    else:
        host, colon, port_s = rest.rpartition(":")
        if not colon or not host:
            raise ValueError(f"must name HOST:PORT, got {text!r}")
        if ":" in host:
            raise ValueError(f"an IPv6 address must be in brackets, [ADDR]:PORT, got {text!r}")
        if not _host_ok(host):
            raise ValueError(f"{host!r} is not a host name or IPv4 address")
    if not port_s.isdigit() or not 1 <= int(port_s) <= 65535:
        raise ValueError(f"port must be 1-65535, got {port_s!r}")
    return SyslogAddress(scheme, host=host, port=int(port_s))


@dataclass(frozen=True)
class Meta:
    """What the syslog header needs of one event: RFC 5424 severity, MSGID, timestamp."""

    severity: int
    msgid: str
    timestamp: str


def rfc5424(line: str, meta: Meta, facility: int, hostname: str, pid: int) -> bytes:
    """One RFC 5424 message: header, no structured data, the JSON line as MSG (no BOM)."""
    msgid = "".join(c for c in meta.msgid if 33 <= ord(c) <= 126)[:32] or "-"
    header = (f"<{facility * 8 + meta.severity}>1 {meta.timestamp or '-'} {hostname} {APP_NAME} "
              f"{pid} {msgid} - ")
    return header.encode("ascii", "replace") + line.encode("utf-8", "backslashreplace")


def _header_host(hostname: str) -> str:
    host = "".join(c for c in hostname if 33 <= ord(c) <= 126)[:255]
    return host or "-"


class Sink:
    """Base: a destination for rendered lines; ``write`` raises on failure, the fan-out counts."""

    name = "sink"
    fmt = "json"
    target = ""

    def __init__(self) -> None:
        self.healthy = True
        self.written = 0
        self.failures = 0
        self.dropped = 0
        self.dropped_in_outage = 0
        self.last_error = ""
        self.retry_at = 0.0
        self.backoff = BACKOFF_FIRST_S
        # Set by the fan-out: a sink whose failures happen off the caller's thread reports here.
        self.report_failure: Callable[[Sink, Exception], None] = lambda sink, exc: None

    def write(self, line: str, meta: Meta, now: float) -> None:
        """Deliver one line or raise; must not block."""
        raise NotImplementedError

    def reopen(self) -> None:
        """Drop any open handle so the next write opens the target afresh."""

    def close(self) -> None:
        """Release the handle."""

    def ready_again(self) -> bool:
        """True when a failed sink knows it works again, so its back-off can end early."""
        return False


class StreamSink(Sink):
    """A text stream (stdout under systemd, which journald captures)."""

    name = "stream"

    def __init__(self, stream: TextIO, fmt: str) -> None:
        super().__init__()
        self._stream = stream
        self.fmt = fmt
        self.target = str(getattr(stream, "name", "stream"))

    def write(self, line: str, meta: Meta, now: float) -> None:
        self._stream.write(line + "\n")
        self._stream.flush()


class FileSink(Sink):
    """Appends to a path; reopens when the path no longer names the open file (logrotate)."""

    name = "file"

    def __init__(self, path: str) -> None:
        super().__init__()
        self.target = path
        self._fd = -1
        self._ident = (0, 0)
        self._checked_at = -ROTATE_CHECK_S

    def _open(self) -> None:
        # O_NOFOLLOW: a symlink planted at the log path is refused, never written through.
        fd = os.open(self.target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
                     | os.O_NOCTTY | os.O_NOFOLLOW | os.O_NONBLOCK, 0o640)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) and not stat.S_ISCHR(st.st_mode):
            os.close(fd)
            raise OSError(errno.EINVAL, f"{self.target}: not a regular file")
        self._fd, self._ident = fd, (st.st_dev, st.st_ino)

    def _rotated(self) -> bool:
        try:
            st = os.stat(self.target)
        except FileNotFoundError:
            return True
        return (st.st_dev, st.st_ino) != self._ident

    def write(self, line: str, meta: Meta, now: float) -> None:
        if self._fd >= 0 and now - self._checked_at >= ROTATE_CHECK_S:
            self._checked_at = now
            if self._rotated():
                self.reopen()
        if self._fd < 0:
            self._open()
            self._checked_at = now
        data = (line + "\n").encode("utf-8", "backslashreplace")
        while data:
            data = data[os.write(self._fd, data):]

    def reopen(self) -> None:
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


class UnixSyslogSink(Sink):
    """RFC 5424 datagrams (the JSON line as MSG) to a unix socket such as /dev/log; never blocks."""

    name = "syslog"

    def __init__(self, path: str, hostname: str, facility: int) -> None:
        super().__init__()
        self.target = path
        self._host = _header_host(hostname)
        self._facility = facility
        self._sock: socket.socket | None = None

    def write(self, line: str, meta: Meta, now: float) -> None:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                                 | socket.SOCK_NONBLOCK)
            try:
                sock.connect(self.target)
            except OSError:
                sock.close()
                raise
            self._sock = sock
        try:
            self._sock.send(rfc5424(line, meta, self._facility, self._host, os.getpid()))
        except OSError:
            self.reopen()  # the collector may have restarted: connect afresh next time
            raise

    def reopen(self) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            sock, self._sock = self._sock, None
            sock.close()


def _open_socket(a: SyslogAddress, timeout: float) -> socket.socket:
    """A socket connected to the collector (resolving its name here, in the worker thread)."""
    if a.transport == "tcp":
        return socket.create_connection((a.host, a.port), timeout=timeout)
    family, kind, proto, _, addr = socket.getaddrinfo(a.host, a.port, type=socket.SOCK_DGRAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.connect(addr)
    except OSError:
        sock.close()
        raise
    return sock


class _Token:
    def __init__(self, name: str) -> None:
        self.name = name


_STOP, _RECONNECT = _Token("stop"), _Token("reconnect")
_Item = bytes | _Token


class NetSyslogSink(Sink):
    """RFC 5424 over UDP, or TCP with octet-counting framing (RFC 6587), from one worker thread.

    ``write`` only frames the line and puts it on a bounded queue: a full queue raises
    BlockingIOError (the line is dropped and counted). Connecting, resolving and sending happen
    in the worker; when it fails it drops what is queued, records the error and reports it
    through ``report_failure`` at once. While the error stands, ``write`` raises it (the
    fan-out backs off) after handing its frame to the worker as a reconnect attempt; once the
    worker gets through, ``ready_again`` ends the back-off.
    """

    name = "syslog"

    def __init__(self, address: SyslogAddress, hostname: str, facility: int, *,
                 queue_max: int = QUEUE_MAX, connect_timeout: float = CONNECT_TIMEOUT_S,
                 send_timeout: float = SEND_TIMEOUT_S,
                 connect: Callable[[SyslogAddress, float], socket.socket] | None = None) -> None:
        super().__init__()
        if address.transport not in ("udp", "tcp"):
            raise ValueError(f"not a network address: {address}")
        self.address = address
        self.target = str(address)
        self._host = _header_host(hostname)
        self._facility = facility
        self._connect_timeout = connect_timeout
        self._open = connect or _open_socket
        self._send_timeout = send_timeout
        self._queue: queue.Queue[_Item] = queue.Queue(queue_max)
        self._mu = threading.Lock()
        self._error: OSError | None = None  # set by the worker while the collector is unreachable
        self._lost = 0  # frames the worker dropped, not yet counted by write()
        self._sock: socket.socket | None = None  # the worker's only
        self._thread: threading.Thread | None = None
        self._closed = False
        self._recovered = False  # the worker reached the collector again after an error
        self.sent = 0  # frames the worker handed to the kernel

    # ---- the caller's side (the event loop, under the fan-out's lock)

    def write(self, line: str, meta: Meta, now: float) -> None:
        with self._mu:
            lost, self._lost = self._lost, 0
            err = self._error
            self._recovered = False
        self.dropped += lost
        self.dropped_in_outage += lost
        if self._thread is None:
            self._start()
        frame = rfc5424(line, meta, self._facility, self._host, os.getpid())
        if self.address.transport == "tcp":
            frame = f"{len(frame)} ".encode() + frame
        try:
            self._queue.put_nowait(frame)  # during an outage: the worker's reconnect attempt
        except queue.Full:
            raise BlockingIOError(errno.EAGAIN, f"{self._queue.maxsize} lines queued for "
                                  "the collector") from None
        if err is not None:
            raise OSError(err.errno, err.strerror or str(err))

    def reopen(self) -> None:
        if self._thread is not None:
            # A full queue: the worker is busy with a backlog; it reconnects on its next failure.
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait(_RECONNECT)

    def close(self) -> None:
        """Stop the worker after it sent what is queued, waiting at most FLUSH_AT_EXIT_S."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self._flush_at_exit)
        thread = self._thread
        if thread is not None:
            with contextlib.suppress(queue.Full):
                self._queue.put(_STOP, timeout=FLUSH_AT_EXIT_S)
            thread.join(FLUSH_AT_EXIT_S)

    def ready_again(self) -> bool:
        return self._recovered

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until the worker has handled every queued frame."""
        q = self._queue
        with q.all_tasks_done:
            return q.all_tasks_done.wait_for(lambda: q.unfinished_tasks == 0, timeout)

    def _flush_at_exit(self) -> None:
        self.close()  # a one-shot command's last event still reaches the collector

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="syslog-sender", daemon=True)
        self._thread.start()
        atexit.register(self._flush_at_exit)

    # ---- the worker thread

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    self._disconnect()
                    return
                if item is _RECONNECT:
                    self._disconnect()
                elif isinstance(item, bytes):
                    self._deliver(item)
            finally:
                self._queue.task_done()

    def _deliver(self, frame: bytes) -> None:
        try:
            try:
                self._send(frame)
            except OSError:
                if self._sock is None:  # the connect itself failed: the collector is down
                    raise
                self._disconnect()  # an old connection broke (collector restarted): once more
                self._send(frame)
        except OSError as exc:
            if exc.errno == errno.EMSGSIZE:  # this line is too big for a datagram: drop it only
                with self._mu:
                    self._lost += 1
                return
            self._disconnect()
            with self._mu:
                self._error = exc
                self._lost += 1 + self._drain()
            self.report_failure(self, exc)  # sink-failed now, while the agent may be quiet
            return
        self.sent += 1
        if self._error is not None:
            with self._mu:
                self._error = None
                self._recovered = True

    def _drain(self) -> int:
        """Drop the queued frames (the collector is down); keep a stop request. Returns the count."""
        n = 0
        stop = False
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                stop = True
            elif isinstance(item, bytes):
                n += 1
            self._queue.task_done()
        if stop:
            self._queue.put_nowait(_STOP)
        return n

    def _send(self, frame: bytes) -> None:
        sock = self._sock
        if sock is not None and self.address.transport == "tcp" and self._peer_closed(sock):
            self._disconnect()
            sock = None
        if sock is None:
            sock = self._connect()
        if self.address.transport == "udp":
            try:
                sock.send(frame)
            except ConnectionRefusedError:  # an ICMP error left by an earlier datagram
                sock.send(frame)
        else:
            sock.sendall(frame)

    def _connect(self) -> socket.socket:
        sock = self._open(self.address, self._connect_timeout)
        sock.settimeout(self._send_timeout)
        self._sock = sock
        return sock

    @staticmethod
    def _peer_closed(sock: socket.socket) -> bool:
        """True when the collector closed its end (it never sends, so readable means EOF/RST)."""
        try:
            if not select.select([sock], [], [], 0)[0]:
                return False
            return sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def _disconnect(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
