"""The fleet's keys in etcd, through etcd3gw (etcd's v3 JSON gateway), one request at a time.

Keys, under ``/sslvpn-heartbeat/<group>/``::

    members/<member>   {"mode": "open"|"block"|"drain", "cause": "health"|"admin", "since": UNIX}
    slots/<n>          {"member": NAME, "since": UNIX, "reason": TEXT}   n in 0..maintenance_slots-1

Both belong to the agent's lease: a dead or cut-off server's keys vanish within ``lease_s``.

:class:`Etcd` wraps one ``etcd3gw.Etcd3Client`` per endpoint (the library takes one host) and
rotates to the next endpoint when one fails. Every request has a timeout (etcd3gw 2.0 ignores
its own ``timeout`` argument, so the session carries it). The permit and the slots are
compare-and-swap transactions: the permit compares the mod revisions of ``min_open`` open
members' keys as read (``watcher.core.fleet.witnesses``): it commits only while they are all
still open, so two agents racing for the last permit cannot both win; a slot is taken only if its key does
not exist. The decision itself (``watcher.core.fleet.grant``) belongs to the core.
"""

from __future__ import annotations

import base64
import contextlib
import json
import random
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import requests

from watcher.config import FleetConfig
from watcher.core.fleet import FleetView, Member, Verdict, grant, min_open_count, witnesses
from watcher.errors import FacilityMissing

__all__ = ["PREFIX", "Etcd", "EtcdError", "EtcdRefused", "Kv", "SlotTaken", "Snapshot"]

PREFIX = "/sslvpn-heartbeat/"
API_PATH = "/v3/"  # etcd 3.4's gateway; python3-etcd3gw 2.0 defaults to the gone /v3alpha/
T = TypeVar("T")


class EtcdError(Exception):
    """No endpoint answered the request (or etcd refused it); the message says why."""


class EtcdRefused(EtcdError):
    """etcd answered and refused the request (a 4xx: a lease it no longer knows, a bad
    request): the endpoint works, so no other is tried."""


class SlotTaken(Exception):
    """Every maintenance slot is held; ``holders`` names the members holding them."""

    def __init__(self, holders: tuple[str, ...]) -> None:
        super().__init__(", ".join(holders) or "none")
        self.holders = holders


@dataclass(frozen=True)
class Kv:
    """One key as read: its value (parsed JSON), mod revision and lease."""

    key: str
    value: dict[str, Any]
    mod_revision: int
    lease: int


@dataclass(frozen=True)
class Snapshot:
    """The group's keys at one revision."""

    revision: int
    members: dict[str, Kv]  # by member name
    slots: dict[int, Kv]  # by slot number

    def view(self) -> FleetView:
        """The pure view the core keeps."""
        ms = tuple(Member(name, str(kv.value.get("mode", "")), str(kv.value.get("cause", "")),
                          float(kv.value.get("since", 0.0))) for name, kv in sorted(self.members.items()))
        return FleetView(ms, tuple(str(kv.value.get("member", "")) for _, kv in sorted(self.slots.items())))


def _kvs(out: dict[str, Any]) -> list[Kv]:
    """The keys of a range answer, values parsed as JSON objects ({} when they are not)."""
    kvs = []
    for item in out.get("kvs", []):
        try:
            value = json.loads(_unb64(item.get("value", "")) or "{}")
        except ValueError:
            value = {}
        kvs.append(Kv(_unb64(item["key"]), value if isinstance(value, dict) else {},
                      int(item.get("mod_revision", 0)), int(item.get("lease", 0))))
    return kvs


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _unb64(text: str) -> str:
    return base64.b64decode(text).decode("utf-8", "replace")


def _prefix_end(prefix: str) -> str:
    """The range end that covers every key starting with ``prefix`` (its last byte + 1)."""
    raw = prefix.encode()
    return (raw[:-1] + bytes([raw[-1] + 1])).decode()


class _TimeoutSession(requests.Session):
    """A session whose requests time out unless they say otherwise, and that ignores the
    environment: no proxy for etcd, and the configured CA (requests lets REQUESTS_CA_BUNDLE
    override a session's ``verify``; the CA of ``fleet.ca_file`` must win)."""

    def __init__(self, timeout: float) -> None:
        super().__init__()
        self.default_timeout = timeout
        self.trust_env = False

    def request(self, *args: Any, **kwargs: Any) -> Any:
        """Like Session.request, with the default timeout and this session's CA."""
        if kwargs.get("timeout") is None:  # newer etcd3gw releases pass timeout=None
            kwargs["timeout"] = self.default_timeout
        if kwargs.get("verify") is None:
            kwargs["verify"] = self.verify
        return super().request(*args, **kwargs)


class Etcd:
    """The group's keys on the configured endpoints (thread-confined: one user thread)."""

    def __init__(self, cfg: FleetConfig, *, timeout: float | None = None,
                 wall: Callable[[], float] = time.time) -> None:
        """Clients for every endpoint of ``cfg``; no request is made yet."""
        try:  # only with [fleet]: the agent without it never imports the library
            import etcd3gw
            from etcd3gw import exceptions as etcd_exceptions
        except ImportError as exc:
            raise FacilityMissing(f"[fleet] needs the etcd client etcd3gw (Debian: apt install "
                                  f"python3-etcd3gw): {exc}") from None

        self.cfg = cfg
        self.group = f"{PREFIX}{cfg.group}/"
        self.members_prefix = self.group + "members/"
        self.slots_prefix = self.group + "slots/"
        self.member_key = self.members_prefix + cfg.member
        self.min_open = min_open_count(cfg.min_open, cfg.size)
        self.timeout = timeout if timeout is not None else max(0.5, min(2.0, cfg.lease_s / 4))
        self._wall = wall
        self._errors: tuple[type[BaseException], ...] = (
            etcd_exceptions.Etcd3Exception, requests.RequestException, ValueError, KeyError)
        # Everything but these means etcd answered (etcd3gw raises the base class for a 4xx).
        self._transport: tuple[type[BaseException], ...] = (
            etcd_exceptions.ConnectionFailedError, etcd_exceptions.ConnectionTimeoutError,
            etcd_exceptions.InternalServerError, requests.RequestException, ValueError, KeyError)
        self._base_error: type[BaseException] = etcd_exceptions.Etcd3Exception
        self.clients: list[Any] = []
        for url in cfg.etcd:
            u = urllib.parse.urlsplit(url)  # validated by the config: scheme, host and port
            c = etcd3gw.Etcd3Client(host=u.hostname or "", port=u.port or 2379, protocol=u.scheme,
                                    api_path=API_PATH)
            s = _TimeoutSession(self.timeout)
            if cfg.ca_file:
                s.verify = cfg.ca_file
            if cfg.cert_file:
                s.cert = (cfg.cert_file, cfg.key_file)
            c.session = s
            self.clients.append(c)
        self.current = 0
        self.requests = 0  # requests sent, for the benchmark's idle rate

    # ------------------------------------------------------------------ transport

    def endpoint(self) -> str:
        """The endpoint in use."""
        return self.cfg.etcd[self.current]

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body`` to the gateway, trying each endpoint once from the current one."""
        errors = []
        for _ in range(len(self.clients)):
            c = self.clients[self.current]
            try:
                self.requests += 1
                out: dict[str, Any] = c.post(c.get_url(path), json=body)
                return out
            except self._transport as exc:
                errors.append(f"{self.endpoint()}: {type(exc).__name__}: {str(exc)[:200]}")
                self.current = (self.current + 1) % len(self.clients)
            except self._base_error as exc:
                raise EtcdRefused(f"{self.endpoint()}: {path}: {str(exc)[:200]}") from None
        raise EtcdError("; ".join(errors))

    def _range(self, prefix: str) -> tuple[int, list[Kv]]:
        out = self._post("/kv/range", {"key": _b64(prefix), "range_end": _b64(_prefix_end(prefix))})
        return int(out.get("header", {}).get("revision", 0)), _kvs(out)

    def _txn_or_read(self, compare: list[dict[str, Any]],
                     success: list[dict[str, Any]]) -> Snapshot | None:
        """A transaction that, when its compare fails, reads the group instead (one request):
        None when it committed, else the group as of that revision."""
        read = {"request_range": {"key": _b64(self.group), "range_end": _b64(_prefix_end(self.group))}}
        out = self._post("/kv/txn", {"compare": compare, "success": success, "failure": [read]})
        if out.get("succeeded", False):
            return None
        got = (out.get("responses") or [{}])[0].get("response_range", {})
        return self._snapshot(int(out.get("header", {}).get("revision", 0)), _kvs(got))

    def _txn(self, compare: list[dict[str, Any]], success: list[dict[str, Any]]) -> bool:
        out = self._post("/kv/txn", {"compare": compare, "success": success, "failure": []})
        return bool(out.get("succeeded", False))

    # ------------------------------------------------------------------ lease

    def grant_lease(self) -> int:
        """A new lease of ``lease_s``; its ID."""
        out = self._post("/lease/grant", {"TTL": self.cfg.lease_s, "ID": 0})
        return int(out["ID"])

    def keep_alive(self, lease: int) -> bool:
        """Refresh ``lease``; False when etcd no longer knows it (it expired)."""
        out = self._post("/lease/keepalive", {"ID": lease})
        return int(out.get("result", {}).get("TTL", 0)) > 0

    def revoke(self, lease: int) -> None:
        """Revoke ``lease``: the member key and any slot it holds vanish now."""
        with contextlib.suppress(EtcdRefused):  # already expired: nothing left to revoke
            self._post("/lease/revoke", {"ID": lease})

    def lease_of(self, member: str) -> int:
        """The lease the running agent of ``member`` holds its member key with (0: none)."""
        _, kvs = self._range(self.members_prefix + member)
        return next((kv.lease for kv in kvs if kv.key == self.members_prefix + member), 0)

    # ------------------------------------------------------------------ the group

    def snapshot(self) -> Snapshot:
        """Every member and slot key of the group, as of one revision."""
        return self._snapshot(*self._range(self.group))

    def _snapshot(self, rev: int, kvs: list[Kv]) -> Snapshot:
        members = {kv.key.removeprefix(self.members_prefix): kv for kv in kvs
                   if kv.key.startswith(self.members_prefix)}
        slots = {}
        for kv in kvs:
            n = kv.key.removeprefix(self.slots_prefix)
            if kv.key.startswith(self.slots_prefix) and n.isdigit():
                slots[int(n)] = kv
        return Snapshot(rev, members, slots)

    def _member_value(self, mode: str, cause: str, since: float) -> str:
        return json.dumps({"mode": mode, "cause": cause, "since": round(since, 3)})

    def register(self, lease: int, mode: str, cause: str, since: float, *, slot: bool) -> None:
        """Write the member key; without ``slot``, release any slot this member holds."""
        puts = [{"request_put": {"key": _b64(self.member_key), "lease": lease,
                                 "value": _b64(self._member_value(mode, cause, since))}}]
        if not slot:
            for n, kv in self.snapshot().slots.items():
                if kv.value.get("member") == self.cfg.member:
                    puts.append({"request_delete_range": {"key": _b64(self.slots_prefix + str(n))}})
        self._txn([], puts)

    def ask_permit(self, lease: int, since: float, attempts: int = 50,
                   known: Snapshot | None = None) -> Verdict:
        """One compare-and-swap permit: the member key says block only if ``grant`` allows it
        and the witnesses' keys are unchanged since they were read (retried while others race).
        ``known``: the group as the watch has it, tried first (a grant then costs one request;
        a refusal is always confirmed on a fresh read)."""
        v = Verdict(False, ("no answer",), 0)
        snap: Snapshot | None = known
        for attempt in range(attempts):
            if snap is None:
                snap = self.snapshot()
            v = grant(snap.view().members, self.cfg.member, self.cfg.size, self.min_open)
            if not v.granted and snap.revision == 0:  # from the watch: confirm on a fresh read
                snap = None
                continue
            if not v.granted:
                return v
            compare = [{"key": _b64(self.members_prefix + name), "target": "MOD",
                        "result": "EQUAL", "mod_revision": snap.members[name].mod_revision}
                       for name in witnesses(snap.view().members, self.cfg.member, self.min_open)]
            put = {"request_put": {"key": _b64(self.member_key), "lease": lease,
                                   "value": _b64(self._member_value("block", "health", since))}}
            snap = self._txn_or_read(compare, [put])
            if snap is None:
                return v
            # Lost a race (the failed transaction brought the group back). An asker that is
            # itself a witness of the others invalidates all of them when it commits: it waits
            # a little so the others commit first; the others retry at once. A lone asker never
            # gets here, so this costs nothing outside a burst.
            view = snap.view().members
            if self.cfg.member in witnesses(view, "", self.min_open + 1):
                time.sleep(random.uniform(0.1, 0.3) * min(attempt + 1, 5))
            else:
                time.sleep(random.uniform(0, 0.002))
        raise EtcdError(f"permit: the group kept changing through {attempts} attempts")

    def take_slot(self, lease: int, reason: str) -> tuple[str, ...]:
        """Take a free maintenance slot with ``lease`` (kept if this member holds one already);
        the holders afterwards. Raises SlotTaken naming the holders when none is free."""
        n_slots = self.cfg.maintenance_slots
        for _ in range(4 * n_slots + 4):
            snap = self.snapshot()
            holders = tuple(str(kv.value.get("member", "?")) for _, kv in sorted(snap.slots.items()))
            if self.cfg.member in holders:
                return holders
            free = [n for n in range(n_slots) if n not in snap.slots]
            if not free:
                raise SlotTaken(holders)
            key = self.slots_prefix + str(free[0])
            value = json.dumps({"member": self.cfg.member, "since": round(self._wall(), 3),
                                "reason": reason})
            if self._txn([{"key": _b64(key), "target": "CREATE", "result": "EQUAL",
                           "create_revision": 0}],
                         [{"request_put": {"key": _b64(key), "value": _b64(value), "lease": lease}}]):
                return (*holders, self.cfg.member)
        raise EtcdError("slots: the group kept changing")

    def release_slot(self) -> bool:
        """Delete the slot this member holds; True if it held one."""
        held = [n for n, kv in self.snapshot().slots.items() if kv.value.get("member") == self.cfg.member]
        for n in held:
            self._post("/kv/deleterange", {"key": _b64(self.slots_prefix + str(n))})
        return bool(held)

    # ------------------------------------------------------------------ the watch

    def watch(self, start_revision: int, stop: Callable[[], bool],
              on_response: Callable[[requests.Response], None]) -> Iterator[tuple[str, Kv | None]]:
        """Stream the group's changes from ``start_revision`` on the current endpoint, as
        (key, kv or None for a deletion); ends when the stream does. ``on_response`` gets the
        streaming response (to close it from another thread)."""
        c = self.clients[self.current]
        body = {"create_request": {"key": _b64(self.group), "range_end": _b64(_prefix_end(self.group)),
                                   "start_revision": start_revision}}
        self.requests += 1
        resp = c.session.post(c.get_url("/watch"), json=body, stream=True,
                              timeout=(self.timeout, None))
        on_response(resp)
        try:
            if resp.status_code != 200:
                raise EtcdError(f"watch: HTTP {resp.status_code}")
            for line in resp.iter_lines():
                if stop():
                    return
                if not line:
                    continue
                result = json.loads(line).get("result", {})
                for ev in result.get("events", []):
                    kv = ev.get("kv", {})
                    key = _unb64(kv.get("key", ""))
                    if ev.get("type") == "DELETE":
                        yield key, None
                        continue
                    try:
                        value = json.loads(_unb64(kv.get("value", "")) or "{}")
                    except ValueError:
                        value = {}
                    yield key, Kv(key, value if isinstance(value, dict) else {},
                                  int(kv.get("mod_revision", 0)), int(kv.get("lease", 0)))
        finally:
            resp.close()

    def wait_change(self, revision: int, timeout: float | None) -> bool:
        """Block until the group changes after ``revision`` (a watch, no polling); False when
        ``timeout`` seconds passed first."""
        c = self.clients[self.current]
        body = {"create_request": {"key": _b64(self.group), "range_end": _b64(_prefix_end(self.group)),
                                   "start_revision": revision + 1}}
        self.requests += 1
        try:
            with c.session.post(c.get_url("/watch"), json=body, stream=True,
                                timeout=(self.timeout, timeout)) as resp:
                for line in resp.iter_lines():
                    if line and json.loads(line).get("result", {}).get("events"):
                        return True
        except requests.exceptions.ConnectionError as exc:
            if "timed out" in str(exc).lower() or isinstance(exc, requests.exceptions.ReadTimeout):
                return False
            raise EtcdError(f"watch: {exc}") from None
        except requests.exceptions.Timeout:
            return False
        raise EtcdError("watch: the stream ended")

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn``, turning a library error that escaped into EtcdError."""
        try:
            return fn()
        except self._errors as exc:
            raise EtcdError(f"{type(exc).__name__}: {exc}") from None
