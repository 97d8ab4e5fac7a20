"""What the fleet guard relies on in etcd3gw (Debian's 2.0 and PyPI's newest) against a real etcd 3.4.

Runs on both venvs; where the two releases differ the test says which behaviour it expects of
which release, detected from the installed package, never from a hard-coded answer. Facts the
agent's etcd client must respect, each pinned below:

* 2.0's default ``api_path`` is ``/v3alpha/``, which etcd 3.4 answers 404: pass ``/v3/``
  (newer releases discover it from ``/version``).
* One client talks to one host: the agent rotates over its endpoints itself.
* 2.0 stores ``timeout`` where requests never reads it: without a session that applies a
  timeout, a request to a partitioned member hangs. A ``requests.Session`` assigned to
  ``client.session`` (2.0 has no ``session=`` parameter) works on both releases, but newer
  releases pass ``timeout=None`` explicitly when built without one: the session's default must
  replace a None, not ``setdefault`` it.
* requests lets the environment's REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE (and proxy variables)
  override ``session.verify``: set ``session.trust_env = False``.
* A failed transaction's answer has no ``succeeded`` key (proto3 JSON omits false).
* ``lease(ttl)`` drops the granted TTL, which etcd raises to at least 1.5 election timeouts:
  read it back with ``Lease.ttl()``. ``refresh()`` answers -1 once the lease is gone.
* A watch iterator never ends or raises when its stream dies (member killed): the agent must
  read the stream itself (or notice silence) and re-create the watch from the next revision.

Differences between 2.0 and the newest release (2.7 when written), read from both packages:

* Constructor: 2.7 adds ``session=`` and defaults ``api_path`` to None (discovered with GET
  ``/version``, or ``ETCD3GW_API_PATH``); it passes ``timeout=self.timeout`` to every POST.
* ``get``/``delete``: 2.0 copies extra keyword arguments into the request as given, so a
  ``range_end`` must already be base64; 2.7 takes named arguments and encodes ``range_end``
  itself (a pre-encoded one is encoded twice), and warns on unknown ones. ``get_prefix`` and
  ``delete_prefix`` work alike on both.
* Transactions: the same on both: ``transaction(dict)`` is posted as given (keys and values
  base64 by the caller; 64-bit numbers as decimal strings; no ``succeeded`` when it failed).
* Leases: the same paths and answers on both (``/lease/grant``, ``/lease/keepalive`` as one
  request, ``/kv/lease/timetolive``, ``/kv/lease/revoke``, which etcd 3.4 still serves).
* Watches: 2.7 names its options (adds ``watch_id``, ``fragment``, which its ``watch_prefix``
  drops) and skips blank stream lines; on both the stream has no timeout and its death is
  silent. 2.7's ``watch_prefix_once`` encodes ``range_end`` twice (a wider range than asked).
* Endpoints: one host per client on both; no rotation, no retry.
"""

from __future__ import annotations

import base64
import inspect
import json
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
from etcd3gw import exceptions as gw_exc
from etcd3gw.client import Etcd3Client

from tests.etcdcluster import EtcdCluster, TlsFiles, issue_cert, make_ca
from tests.netns import wait_for

pytestmark = [pytest.mark.netns, pytest.mark.slow]

# What a request to a dead or cut-off member raises (and a 503 while no leader is elected).
UNREACHABLE = (gw_exc.ConnectionFailedError, gw_exc.ConnectionTimeoutError)


class TimeoutSession(requests.Session):
    """A requests session that gives every request a timeout unless the caller passed one."""

    def __init__(self, timeout: float) -> None:
        super().__init__()
        self.default_timeout = timeout

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kw: Any) -> Any:  # type: ignore[override]
        """Send the request with ``default_timeout`` when no (or a None) timeout is given."""
        if kw.get("timeout") is None:
            kw["timeout"] = self.default_timeout
        return super().request(method, url, *args, **kw)


def gw_client(url: str, *, timeout: float | None = 2.0, tls: TlsFiles | None = None,
              with_cert: bool = True, api_path: str = "/v3/") -> Etcd3Client:
    """An etcd3gw client for ``url`` that works alike on 2.0 and newer releases."""
    u = urlsplit(url)
    assert u.hostname and u.port
    client = Etcd3Client(host=u.hostname, port=u.port, protocol=u.scheme, api_path=api_path)
    if timeout is not None:
        session = TimeoutSession(timeout)
        # The environment's REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE (and proxies) would override the
        # session's verify= (see test_environment_ca_bundle_overrides_session_verify).
        session.trust_env = False
        if tls is not None:
            session.verify = tls.ca_file
            if with_cert:
                session.cert = (tls.cert_file, tls.key_file)
        client.session = session
    return client


def _b64(data: str) -> str:
    return base64.b64encode(data.encode()).decode()


def _succeeded(answer: dict[str, Any]) -> bool:
    return bool(answer.get("succeeded", False))


class Rotating:
    """The endpoint rotation the agent must do itself: one etcd3gw client per endpoint, and
    the next endpoint after an error that means "this member cannot serve now"."""

    def __init__(self, urls: list[str], first: int = 0, **kw: Any) -> None:
        self.clients = [gw_client(u, **kw) for u in urls]
        self.current = first
        self.errors: list[str] = []

    def do(self, fn: Callable[[Etcd3Client], Any], deadline_s: float) -> Any:
        """``fn(client)`` on the current endpoint, rotating on failure until ``deadline_s``."""
        deadline = time.monotonic() + deadline_s
        while True:
            try:
                return fn(self.clients[self.current])
            except (*UNREACHABLE, gw_exc.InternalServerError) as e:
                self.errors.append(f"{self.current}:{type(e).__name__}")
                if time.monotonic() > deadline:
                    raise
                self.current = (self.current + 1) % len(self.clients)


# --- API path, timeouts ----------------------------------------------------------------------

def test_api_path_v3_works_and_v3alpha_is_refused(etcd: EtcdCluster, etcd_prefix: str) -> None:
    """``api_path='/v3/'`` works; ``/v3alpha/`` (2.0's default) gets 404 from etcd 3.4; a client
    built with no api_path fails on 2.0 and discovers /v3/ on releases that discover it."""
    url = etcd.endpoint(1)
    key = etcd_prefix + "path"

    def body() -> tuple[list[bytes], str, str]:
        good = gw_client(url)
        good.put(key, "v")
        got = good.get(key)
        try:
            gw_client(url, api_path="/v3alpha/").get(key)
            alpha = "answered"
        except gw_exc.Etcd3Exception as e:
            alpha = f"{type(e).__name__}:{e}"
        u = urlsplit(url)
        default = Etcd3Client(host=u.hostname or "", port=u.port or 0)
        default.session = TimeoutSession(2.0)
        try:
            default_outcome = repr(default.get(key))
        except gw_exc.Etcd3Exception as e:
            default_outcome = type(e).__name__
        return got, alpha, default_outcome

    got, alpha, default_outcome = etcd.call(body)
    assert got == [b"v"]
    assert alpha == "Etcd3Exception:Not Found", alpha
    if inspect.signature(Etcd3Client).parameters["api_path"].default == "/v3alpha/":
        assert default_outcome == "Etcd3Exception"  # 2.0: the agent must pass /v3/
    else:
        assert default_outcome == repr([b"v"])  # discovered /v3/ from /version


def test_constructor_timeout_is_applied_only_by_newer_releases() -> None:
    """2.0 keeps ``timeout`` where requests never reads it (a silent server holds the request
    until it hangs up); newer releases time out. A TimeoutSession times out on both."""
    hung_up = threading.Event()
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)
        port = srv.getsockname()[1]
        held: list[socket.socket] = []
        stop = threading.Event()

        def accept_and_stay_silent() -> None:
            srv.settimeout(0.2)
            while not stop.is_set():
                try:
                    held.append(srv.accept()[0])
                except OSError:
                    continue

        t = threading.Thread(target=accept_and_stay_silent, daemon=True)
        t.start()

        def outcome(client: Etcd3Client) -> tuple[str, bool]:
            """How the request ended, and whether the server had hung up by then."""
            try:
                client.get("k")
                return "answered", hung_up.is_set()
            except gw_exc.Etcd3Exception as e:
                return type(e).__name__, hung_up.is_set()

        try:
            own = outcome(gw_client(f"http://127.0.0.1:{port}", timeout=0.5))
            plain = Etcd3Client(host="127.0.0.1", port=port, api_path="/v3/", timeout=0.5)
            box: queue.Queue[tuple[str, bool]] = queue.Queue()
            threading.Thread(target=lambda: box.put(outcome(plain)), daemon=True).start()
            try:
                ctor = box.get(timeout=6.0)  # twelve times the timeout asked for
            except queue.Empty:
                hung_up.set()
                for c in held:  # the silent server hangs up: only then does 2.0's request end
                    c.close()
                ctor = box.get(timeout=10.0)
        finally:
            stop.set()
            t.join()
            for c in held:
                c.close()
    assert own == ("ConnectionTimeoutError", False), own
    if "session" in inspect.signature(Etcd3Client).parameters:
        assert ctor == ("ConnectionTimeoutError", False), ctor  # the release passes timeout=
    else:
        assert ctor == ("ConnectionFailedError", True), ctor  # 2.0 ignored timeout=


def test_what_timeout_each_release_hands_the_session() -> None:
    """2.0 calls session.post without a timeout; newer releases pass timeout=None when the
    client was built without one (so a session default set with setdefault never applies)."""
    seen: list[object] = []

    class Recording(requests.Session):
        def request(self, method: str | bytes, url: str | bytes, *args: Any, **kw: Any) -> Any:  # type: ignore[override]
            seen.append(kw.get("timeout", "absent"))
            raise requests.ConnectionError("recorded, not sent")

    client = Etcd3Client(host="127.0.0.1", port=9, api_path="/v3/")
    client.session = Recording()
    with pytest.raises(gw_exc.ConnectionFailedError):
        client.get("k")
    if "session" in inspect.signature(Etcd3Client).parameters:
        assert seen == [None]
    else:
        assert seen == ["absent"]


# --- leases ----------------------------------------------------------------------------------

def test_lease_keepalive_holds_key_and_expiry_deletes_it(etcd: EtcdCluster, etcd_prefix: str) -> None:
    """A key under a lease lives while refresh() keeps the lease alive (past its TTL), and is
    deleted by etcd within about the TTL once refreshing stops; refresh() then answers -1.
    The TTL asked for (1 s) is raised by etcd to 1.5 election timeouts, visible only via ttl()."""
    url = etcd.endpoint(etcd.leader())
    key = etcd_prefix + "member"

    def body() -> dict[str, Any]:
        c = gw_client(url)
        lease = c.lease(1)
        granted = lease.ttl()
        c.put(key, "open", lease=lease)
        t0 = time.monotonic()
        refreshed = []
        while time.monotonic() - t0 < granted + 2.0:  # well past the TTL
            refreshed.append(lease.refresh())
            time.sleep(0.5)
        still = c.get(key)
        stopped = time.monotonic()
        wait_for(lambda: c.get(key) == [], granted + 10.0, "the key to expire with its lease",
                 interval=0.1)
        return {"granted": granted, "refreshed": refreshed, "still": still,
                "gone_after": time.monotonic() - stopped, "after": lease.refresh(),
                "ttl_after": lease.ttl(), "keys": lease.keys()}

    r = etcd.call(body)
    assert r["granted"] >= 2, r  # 1 s was asked; etcd's floor is 1.5 election timeouts
    assert all(ttl >= 2 for ttl in r["refreshed"]) and r["still"] == [b"open"], r
    assert r["gone_after"] >= 1.0, r  # the key outlived the last refresh by about the TTL
    assert r["after"] == -1 and r["ttl_after"] == -1 and r["keys"] == [], r


def test_lease_revoke_deletes_its_keys_at_once(etcd: EtcdCluster, etcd_prefix: str) -> None:
    """revoke() (2.0 posts to /v3/kv/lease/revoke) deletes the lease's keys immediately."""
    url = etcd.endpoint(1)
    key = etcd_prefix + "bye"

    def body() -> tuple[list[bytes], list[bytes]]:
        c = gw_client(url)
        lease = c.lease(30)
        c.put(key, "open", lease=lease)
        before = c.get(key)
        lease.revoke()
        return before, c.get(key)

    assert etcd.call(body) == ([b"open"], [])


# --- transactions ----------------------------------------------------------------------------

def _race(etcd: EtcdCluster, attempt: Callable[[Etcd3Client, int], bool], clients: list[Etcd3Client],
          rounds: int, prepare: Callable[[int], None]) -> list[list[bool]]:
    """Run ``attempt(client, round)`` on every client at the same instant, ``rounds`` times."""
    results = []
    for r in range(rounds):
        etcd.call(prepare, r)
        barrier = threading.Barrier(len(clients))

        def go(c: Etcd3Client, rr: int = r, b: threading.Barrier = barrier) -> bool:
            b.wait(10)
            return attempt(c, rr)

        futures = [etcd.submit(go, c) for c in clients]
        results.append([f.result(60) for f in futures])
    return results


def test_txn_compare_mod_revision_lets_one_of_two_racers_win(etcd: EtcdCluster, etcd_prefix: str) -> None:
    """Two clients on different members read the same mod_revision and race a transaction
    comparing it: in every round exactly one succeeds; the loser's answer has no 'succeeded'."""
    key = etcd_prefix + "permit"
    c1, c2 = gw_client(etcd.endpoint(1)), gw_client(etcd.endpoint(2))
    seen: dict[int, str] = {}

    def prepare(r: int) -> None:
        c1.put(key, f"round{r}")
        seen[r] = c1.get(key, metadata=True)[0][1]["mod_revision"]

    def attempt(c: Etcd3Client, r: int) -> bool:
        answer = c.transaction({
            "compare": [{"key": _b64(key), "result": "EQUAL", "target": "MOD",
                         "mod_revision": seen[r]}],
            "success": [{"request_put": {"key": _b64(key), "value": _b64(f"won{id(c)}")}}],
            "failure": []})
        return _succeeded(answer)

    results = _race(etcd, attempt, [c1, c2], 8, prepare)
    assert all(sorted(r) == [False, True] for r in results), results
    assert isinstance(seen[0], str)  # int64 fields come as decimal strings through the gateway


def test_txn_create_revision_zero_admits_one_holder(etcd: EtcdCluster, etcd_prefix: str) -> None:
    """A slot taken with "create_revision == 0" (the key is absent; etcd3gw's create()) goes
    to exactly one of three clients racing through the three members."""
    clients = [gw_client(u) for u in etcd.endpoints()]
    slot = etcd_prefix + "slot"

    def prepare(_: int) -> None:
        clients[0].delete(slot)

    def attempt(c: Etcd3Client, r: int) -> bool:
        return bool(c.create(slot, f"holder{clients.index(c)}-{r}"))

    results = _race(etcd, attempt, clients, 6, prepare)
    assert all(sorted(r) == [False, False, True] for r in results), results


def test_txn_compare_version_admits_one_writer(etcd: EtcdCluster, etcd_prefix: str) -> None:
    """Three clients that read the same version of a key race a "version == n" transaction:
    exactly one writes."""
    clients = [gw_client(u) for u in etcd.endpoints()]
    key = etcd_prefix + "counter"
    versions: dict[int, str] = {}

    def prepare(r: int) -> None:
        clients[0].put(key, str(r))
        versions[r] = clients[0].get(key, metadata=True)[0][1]["version"]

    def attempt(c: Etcd3Client, r: int) -> bool:
        return _succeeded(c.transaction({
            "compare": [{"key": _b64(key), "result": "EQUAL", "target": "VERSION",
                         "version": versions[r]}],
            "success": [{"request_put": {"key": _b64(key), "value": _b64(str(clients.index(c)))}}],
            "failure": []}))

    results = _race(etcd, attempt, clients, 6, prepare)
    assert all(sorted(r) == [False, False, True] for r in results), results


def _group_snapshot(c: Etcd3Client, prefix: str) -> tuple[dict[str, tuple[str, str]], int]:
    """Every key under ``prefix`` with (value, mod_revision), and the store revision read at."""
    answer = c.post(c.get_url("/kv/range"), json={
        "key": _b64(prefix), "range_end": _b64(prefix[:-1] + chr(ord(prefix[-1]) + 1))})
    members = {base64.b64decode(kv["key"]).decode(): (base64.b64decode(kv.get("value", "")).decode(),
                                                       kv["mod_revision"])
               for kv in answer.get("kvs", [])}
    return members, int(answer["header"]["revision"])


def _permit_txn(prefix: str, me: str, members: dict[str, tuple[str, str]], revision: int) -> dict[str, Any]:
    """The guard's permit shape: every member key unchanged (MOD equal) and no key under the
    prefix changed or created since the snapshot (range compare MOD < revision + 1)."""
    end = _b64(prefix[:-1] + chr(ord(prefix[-1]) + 1))
    compare = [{"key": _b64(k), "result": "EQUAL", "target": "MOD", "mod_revision": rev}
               for k, (_, rev) in members.items()]
    compare.append({"key": _b64(prefix), "range_end": end, "result": "LESS", "target": "MOD",
                    "mod_revision": str(revision + 1)})
    return {"compare": compare,
            "success": [{"request_put": {"key": _b64(me), "value": _b64("block")}}],
            "failure": []}


def test_permit_txn_over_the_group_admits_exactly_the_budget(etcd: EtcdCluster, etcd_prefix: str) -> None:
    """Four members, min_open 2, one already blocked: three agents that each saw three open
    race for a permit with the group-snapshot transaction; exactly one wins, and a retry on a
    fresh snapshot is refused by the count (two open left)."""
    prefix = etcd_prefix + "group/"
    clients = [gw_client(u) for u in etcd.endpoints()]
    names = [prefix + f"s{i}" for i in range(1, 5)]

    def prepare(_: int) -> None:
        clients[0].delete_prefix(prefix)
        for n in names:
            clients[0].put(n, "block" if n.endswith("s4") else "open")

    def attempt(c: Etcd3Client, _: int) -> bool:
        me = names[clients.index(c)]
        members, rev = _group_snapshot(c, prefix)
        still_open = sum(v == "open" for k, (v, _r) in members.items() if k != me)
        if still_open < 2:
            return False
        return _succeeded(c.transaction(_permit_txn(prefix, me, members, rev)))

    results = _race(etcd, attempt, clients, 6, prepare)
    assert all(sum(r) == 1 for r in results), results
    members, _ = etcd.call(_group_snapshot, clients[0], prefix)
    assert sorted(v for v, _r in members.values()) == ["block", "block", "open", "open"]


def test_range_compare_sees_a_key_created_after_the_snapshot(etcd: EtcdCluster, etcd_prefix: str) -> None:
    """The range compare (range_end) in a transaction fails when a key appeared under the
    prefix after the snapshot, even though every key read is unchanged."""
    prefix = etcd_prefix + "g/"
    c = gw_client(etcd.endpoint(1))

    def body() -> tuple[bool, bool]:
        c.put(prefix + "a", "open")
        members, rev = _group_snapshot(c, prefix)
        unchanged = _succeeded(c.transaction(_permit_txn(prefix, prefix + "z", members, rev)))
        members, rev = _group_snapshot(c, prefix)
        c.put(prefix + "b", "open")  # a new member registers in between
        return unchanged, _succeeded(c.transaction(_permit_txn(prefix, prefix + "z", members, rev)))

    assert etcd.call(body) == (True, False)


# --- watches ---------------------------------------------------------------------------------

def _pump(it: Iterator[Any], out: queue.Queue[Any]) -> None:
    try:
        for ev in it:
            out.put(ev)
        out.put("iterator ended")
    except Exception as e:  # handed to the test through the queue
        out.put(f"iterator raised {type(e).__name__}")


def test_watch_prefix_delivers_puts_and_lease_expiry_deletes(etcd: EtcdCluster, etcd_prefix: str) -> None:
    """A prefix watch on one member delivers a PUT made through another member and the DELETE
    etcd makes when a lease expires; keys outside the prefix are not delivered."""
    prefix = etcd_prefix + "w/"
    events: queue.Queue[Any] = queue.Queue()
    watcher = gw_client(etcd.endpoint(1), timeout=None)
    writer = gw_client(etcd.endpoint(2))

    def start() -> Callable[[], None]:
        it, cancel = watcher.watch_prefix(prefix)
        threading.Thread(target=_pump, args=(it, events), daemon=True).start()
        return cancel  # type: ignore[no-any-return]

    cancel = etcd.call(start)
    try:
        def produce() -> None:
            writer.put(etcd_prefix + "outside", "x")
            lease = writer.lease(1)
            writer.put(prefix + "m1", "open", lease=lease)
        etcd.call(produce)
        first = events.get(timeout=10)
        assert isinstance(first, dict) and first["kv"]["key"] == (prefix + "m1").encode()
        assert first["kv"]["value"] == b"open" and "type" not in first  # PUT is proto3's default
        gone = events.get(timeout=20)  # the lease (raised to >= 3 s) expires without refresh
        assert isinstance(gone, dict) and gone.get("type") == "DELETE", gone
        assert gone["kv"]["key"] == (prefix + "m1").encode()
        assert events.empty()
    finally:
        etcd.call(cancel)


def test_watch_from_start_revision_replays_missed_changes(etcd: EtcdCluster, etcd_prefix: str) -> None:
    """A watch created with start_revision = last seen + 1 delivers the changes made while no
    watch ran: how the agent re-creates a dead watch without losing a change."""
    prefix = etcd_prefix + "r/"
    c = gw_client(etcd.endpoint(2), timeout=None)

    def body() -> list[Any]:
        c.put(prefix + "a", "1")
        seen = int(c.get(prefix + "a", metadata=True)[0][1]["mod_revision"])
        c.put(prefix + "b", "2")
        c.delete(prefix + "a")
        got: queue.Queue[Any] = queue.Queue()
        it, cancel = c.watch_prefix(prefix, start_revision=seen + 1)
        threading.Thread(target=_pump, args=(it, got), daemon=True).start()
        try:
            return [got.get(timeout=10), got.get(timeout=10)]
        finally:
            cancel()

    b, a = etcd.call(body)
    assert (b["kv"]["key"], b.get("type")) == ((prefix + "b").encode(), None)
    assert (a["kv"]["key"], a.get("type")) == ((prefix + "a").encode(), "DELETE")


def test_watch_iterator_stays_silent_when_its_member_dies(etcd: EtcdCluster, etcd_prefix: str) -> None:
    """When the member serving a watch is SIGKILLed, etcd3gw's iterator neither ends nor raises
    (the stream thread dies unseen), while the raw /v3/watch stream read with requests ends at
    once: the agent must read the stream itself or re-create silent watches."""
    prefix = etcd_prefix + "k/"
    victim = next(i for i in (1, 2, 3) if i != etcd.leader())
    url = etcd.endpoint(victim)
    lib_events: queue.Queue[Any] = queue.Queue()
    raw_end: queue.Queue[str] = queue.Queue()

    def start() -> Callable[[], None]:
        it, cancel = gw_client(url, timeout=None).watch_prefix(prefix)
        threading.Thread(target=_pump, args=(it, lib_events), daemon=True).start()
        resp = requests.post(f"{url}/v3/watch", stream=True, timeout=(2, 60), json={
            "create_request": {"key": _b64(prefix), "range_end": _b64(prefix[:-1] + "0")}})

        def read_raw() -> None:
            try:
                for line in resp.iter_lines():
                    if line and "created" not in json.loads(line)["result"]:
                        raw_end.put("event")
                raw_end.put("stream ended")
            except requests.RequestException as e:
                raw_end.put(f"stream raised {type(e).__name__}")

        threading.Thread(target=read_raw, daemon=True).start()
        return cancel  # type: ignore[no-any-return]

    cancel = etcd.call(start)
    try:
        etcd.call(lambda: gw_client(url).put(prefix + "x", "1"))
        assert lib_events.get(timeout=10)["kv"]["key"] == (prefix + "x").encode()
        assert raw_end.get(timeout=10) == "event"
        etcd.kill(victim)
        assert raw_end.get(timeout=10) in ("stream ended", "stream raised ChunkedEncodingError",
                                           "stream raised ConnectionError")
        etcd.leader()
        other = etcd.endpoint(next(i for i in (1, 2, 3) if i != victim))
        etcd.call(lambda: gw_client(other).put(prefix + "y", "2"))
        with pytest.raises(queue.Empty):
            lib_events.get(timeout=3.0)  # no event, no end, no error: silence
    finally:
        etcd.call(cancel)


# --- several endpoints -----------------------------------------------------------------------

def _write_loop(rot: Rotating, key: str, n: int, deadline_s: float) -> None:
    """Write ``key`` = 0..n-1 through ``rot``, each within ``deadline_s`` (rotating as needed)."""
    for k in range(n):
        rot.do(lambda c, v=k: c.put(key, str(v)), deadline_s)


def test_rotating_client_survives_leader_sigkill(etcd: EtcdCluster, etcd_prefix: str) -> None:
    """A client holding all three endpoints and starting on the leader keeps writing when the
    leader is SIGKILLed: every write lands (after rotating), and reads agree with the last one."""
    key = etcd_prefix + "survive"
    leader = etcd.leader()
    rot = Rotating(etcd.endpoints(), first=leader - 1, timeout=2.0)
    etcd.call(_write_loop, rot, key, 3, 10.0)
    rot.current, before = leader - 1, len(rot.errors)
    etcd.kill(leader)
    etcd.call(_write_loop, rot, key, 5, 30.0)
    assert rot.errors[before:before + 1] == [f"{leader - 1}:ConnectionFailedError"], rot.errors
    assert rot.current != leader - 1
    assert etcd.call(lambda: rot.do(lambda c: c.get(key), 10.0)) == [b"4"]


def test_rotating_client_survives_a_partitioned_member(etcd: EtcdCluster, etcd_prefix: str) -> None:
    """A client on a member that gets partitioned (packets dropped) times out after its own
    timeout (never hangs), rotates, and keeps reading and writing through the others."""
    key = etcd_prefix + "cut"
    victim = 3 if etcd.leader() != 3 else 2
    rot = Rotating(etcd.endpoints(), first=victim - 1, timeout=1.5)
    etcd.call(_write_loop, rot, key, 2, 10.0)
    rot.current, before = victim - 1, len(rot.errors)
    etcd.partition(victim)
    etcd.call(_write_loop, rot, key, 3, 30.0)
    assert rot.errors[before:before + 1] == [f"{victim - 1}:ConnectionTimeoutError"], rot.errors
    assert rot.current != victim - 1
    assert etcd.call(lambda: rot.do(lambda c: c.get(key), 10.0)) == [b"2"]


# --- TLS -------------------------------------------------------------------------------------

def test_environment_ca_bundle_overrides_session_verify(etcd_tls: EtcdCluster, etcd_prefix: str,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    """requests lets REQUESTS_CA_BUNDLE from the environment replace ``session.verify`` (how
    etcd3gw applies ``ca_cert=``) unless ``trust_env`` is False: an agent started with that
    variable set would reject its own etcd CA."""
    url = etcd_tls.endpoint(2)
    tls = etcd_tls.tls
    assert tls is not None
    other_ca, _ = make_ca(tmp_path, cn="a CA that never signed the members")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(other_ca))
    u = urlsplit(url)

    def attempt(trust_env: bool) -> str:
        client = Etcd3Client(host=u.hostname or "", port=u.port or 0, protocol="https",
                             ca_cert=tls.ca_file, cert_cert=tls.cert_file, cert_key=tls.key_file,
                             api_path="/v3/")
        client.session.trust_env = trust_env
        try:
            client.put(etcd_prefix + "env", "v")
            return "ok"
        except gw_exc.Etcd3Exception as e:
            return type(e).__name__

    assert etcd_tls.call(attempt, False) == "ok"
    assert etcd_tls.call(attempt, True) == "ConnectionFailedError"


def test_tls_client_certificate_is_required(etcd_tls: EtcdCluster, etcd_prefix: str, tmp_path: Path) -> None:
    """With the CA and a client certificate the client reads and writes; without a certificate,
    with one from another CA, or without trusting the CA, etcd refuses the connection."""
    url = etcd_tls.endpoint(1)
    tls = etcd_tls.tls
    assert tls is not None
    key = etcd_prefix + "tls"
    foreign_ca = make_ca(tmp_path / "foreign", cn="someone else's CA")
    fcert, fkey = issue_cert(tmp_path / "foreign", foreign_ca, "intruder", "fleet-agent")

    def attempt(client: Etcd3Client) -> str:
        try:
            client.put(key, "v")
            return "ok"
        except gw_exc.Etcd3Exception as e:
            return type(e).__name__

    def body() -> dict[str, str]:
        good = gw_client(url, tls=tls)
        out = {"with cert": attempt(good)}
        out["read back"] = repr(good.get(key))
        out["no cert"] = attempt(gw_client(url, tls=tls, with_cert=False))
        other = gw_client(url, tls=tls)
        other.session.cert = (str(fcert), str(fkey))
        out["foreign cert"] = attempt(other)
        untrusting = gw_client(url, tls=tls)
        untrusting.session.verify = True  # the system's CAs, which never signed the members
        out["CA not trusted"] = attempt(untrusting)
        return out

    out = etcd_tls.call(body)
    assert out["with cert"] == "ok" and out["read back"] == repr([b"v"]), out
    assert out["no cert"] == "ConnectionFailedError", out
    assert out["foreign cert"] == "ConnectionFailedError", out
    assert out["CA not trusted"] == "ConnectionFailedError", out
