"""sd_notify(3) for systemd Type=notify-reload services, with the standard library only.

The notification socket is named by ``NOTIFY_SOCKET``: an absolute path or, with a leading
``@``, an abstract socket. When it is unset every call is a no-op returning False, so the
daemon calls these unconditionally. Sending never raises: a lost notification is reported by
the return value, and the caller decides whether to log it.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping

__all__ = ["Notifier"]

SEND_TIMEOUT_S = 1.0


class Notifier:
    """Sends state changes to the service manager over its notification datagram socket."""

    def __init__(
        self,
        address: str | bytes | None,
        *,
        watchdog_usec: int | None = None,
        monotonic_ns: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self._address = address
        self._watchdog_usec = watchdog_usec
        self._monotonic_ns = monotonic_ns
        self._sock: socket.socket | None = None

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        pid: int | None = None,
        monotonic_ns: Callable[[], int] = time.monotonic_ns,
    ) -> Notifier:
        """A notifier for NOTIFY_SOCKET and WATCHDOG_USEC/WATCHDOG_PID; disabled when unset or bad."""
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        address: str | bytes | None = None
        if raw.startswith("/"):
            address = raw
        elif raw.startswith("@") and len(raw) > 1:
            address = b"\0" + raw[1:].encode()
        return cls(address, watchdog_usec=_watchdog_usec(env, os.getpid() if pid is None else pid),
                   monotonic_ns=monotonic_ns)

    @property
    def enabled(self) -> bool:
        """True when a notification socket is configured."""
        return self._address is not None

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=value`` lines in one datagram; True when the datagram was sent."""
        if self._address is None or not assignments:
            return False
        payload = "\n".join(a.replace("\n", " ") for a in assignments).encode("utf-8", "replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.settimeout(SEND_TIMEOUT_S)
            self._sock.sendto(payload, self._address)
        except OSError:
            self.close()
            return False
        return True

    def ready(self) -> bool:
        """READY=1: start-up is finished and the agent is serving."""
        return self.send("READY=1")

    def reloading(self) -> bool:
        """RELOADING=1 with MONOTONIC_USEC=<now>, as Type=notify-reload requires; READY=1 ends it."""
        return self.send("RELOADING=1", f"MONOTONIC_USEC={self._monotonic_ns() // 1000}")

    def stopping(self) -> bool:
        """STOPPING=1: the agent began to shut down."""
        return self.send("STOPPING=1")

    def watchdog(self) -> bool:
        """WATCHDOG=1: the keep-alive ping for WatchdogSec=."""
        return self.send("WATCHDOG=1")

    def status(self, text: str) -> bool:
        """STATUS=<text> on one line, shown by systemctl status."""
        return self.send(f"STATUS={text}")

    def watchdog_interval_s(self) -> float | None:
        """How often to call watchdog(): half of WATCHDOG_USEC, or None when no watchdog is asked."""
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def close(self) -> None:
        """Close the socket; a later send opens a new one."""
        if self._sock is not None:
            sock, self._sock = self._sock, None
            sock.close()


def _watchdog_usec(env: Mapping[str, str], pid: int) -> int | None:
    """WATCHDOG_USEC when it is a positive integer meant for ``pid`` (WATCHDOG_PID), else None."""
    owner = env.get("WATCHDOG_PID")
    if owner is not None:
        try:
            if int(owner) != pid:
                return None
        except ValueError:
            return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec if usec > 0 else None
