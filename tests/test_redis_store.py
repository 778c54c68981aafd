"""RedisContextStore against a real redis-server (tests/redis_server.py), plus its URL parser."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer, protocol, reactor
from twisted.internet.task import deferLater
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.trial import unittest

from rapida_tap.contexts import (
    CallContext,
    ContextExpired,
    ContextReused,
    ContextStoreUnavailable,
    ContextUnknown,
    new_context_id,
)
from rapida_tap.redis_store import ContextCorrupt, RedisContextStore
from rapida_tap.redis_url import RedisAddress, RedisURLError, parse_redis_url
from tests.redis_server import RedisServer, RedisServerError

# --- URL parsing (sans-IO) ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://localhost", RedisAddress("localhost", 6379, 0)),
        ("redis://10.0.0.5:6380/2", RedisAddress("10.0.0.5", 6380, 2)),
        ("redis://h:1/", RedisAddress("h", 1, 0)),
        ("redis://:s3cret@h:6379/0", RedisAddress("h", 6379, 0, None, "s3cret")),
        ("redis://app:p%40ss@h/1", RedisAddress("h", 6379, 1, "app", "p@ss")),
        ("redis://[::1]:7000/3", RedisAddress("::1", 7000, 3)),
    ],
)
def test_parse_redis_url(url: str, expected: RedisAddress) -> None:
    assert parse_redis_url(url) == expected
    assert parse_redis_url(url).password == expected.password


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("memory", "redis://"),
        ("rediss://:pw@h:6379/0", "redis://"),
        ("http://h:6379", "redis://"),
        ("redis://", "no host"),
        ("redis://:pw@/0", "no host"),
        ("redis://h:notaport/0", "not a valid"),
        ("redis://:pw@h:99999/0", "not a valid"),
        ("redis://h:6379/zero", "database must be a number"),
        ("redis://:pw@h:6379/0/1", "database must be a number"),
        ("redis://h:6379/0?timeout=1", "no query"),
    ],
)
def test_bad_redis_url(url: str, message: str) -> None:
    with pytest.raises(RedisURLError, match=message) as caught:
        parse_redis_url(url)
    assert "pw" not in str(caught.value)


def test_address_str_masks_password() -> None:
    assert str(parse_redis_url("redis://:s3cret@h:1/2")) == "redis://:***@h:1/2"
    assert str(parse_redis_url("redis://app:s3cret@h:1/2")) == "redis://app:***@h:1/2"
    assert str(parse_redis_url("redis://app@[::1]")) == "redis://app@[::1]:6379/0"
    assert "s3cret" not in repr(parse_redis_url("redis://:s3cret@h:1/2"))


@given(st.text(alphabet=st.characters(codec="ascii", exclude_characters="/?#@"), min_size=2))
def test_password_never_in_text(text: str) -> None:
    password = "zq" + text  # "zq" occurs nowhere else in the URL or the address
    url = f"redis://:{password}@h:6379/0"
    try:
        address = parse_redis_url(url)
    except RedisURLError as e:
        assert password not in str(e)
    else:
        assert password not in str(address) and password not in repr(address)


# --- the store against a real redis-server --------------------------------------------------

TIMEOUT = 0.3  # command_timeout (seconds) where a timeout is the point of the test


def context(cid: str | None = None, **kw: Any) -> CallContext:
    return CallContext(context_id=cid or new_context_id(), assistant_id="echo", **kw)


@defer.inlineCallbacks
def eventually(check: Any, timeout: float = 5.0, what: str = "condition") -> Any:
    """Re-run ``check`` (may return a Deferred) every 20 ms until truthy; bounded by ``timeout``.

    Only for what Redis does on its own clock (key expiry), which no ``task.Clock`` can drive.
    """
    deadline = reactor.seconds() + timeout
    while True:
        result = yield defer.maybeDeferred(check)
        if result:
            return result
        if reactor.seconds() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        yield deferLater(reactor, 0.02, lambda: None)


class RedisStoreTestCase(unittest.TestCase):
    password: str | None = None
    command_timeout = 5.0  # a loaded CI machine is not an outage

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        self.server = RedisServer(reactor, password=self.password)
        yield self.server.start()
        self.addCleanup(self.server.stop)
        self.store = self.make_store()

    def make_store(self, url: str | None = None, **kw: Any) -> RedisContextStore:
        kw.setdefault("command_timeout", self.command_timeout)
        kw.setdefault("health_interval", 0.1)
        store = RedisContextStore(reactor, url or self.server.url, **kw)
        store.start()
        self.addCleanup(store.stop)
        return store


class ContextSemanticsTests(RedisStoreTestCase):
    @defer.inlineCallbacks
    def test_mint_get_claim_then_reused(self) -> Any:
        ctx = context(caller="+4930123", variables={"lang": "de"})
        self.assertEqual((yield self.store.mint(ctx, 30)), ctx.context_id)
        self.assertEqual((yield self.store.get(ctx.context_id)), ctx)
        self.assertEqual((yield self.store.claim(ctx.context_id)), ctx)
        self.assertIsNone((yield self.store.get(ctx.context_id)))
        yield self.assertFailure(self.store.claim(ctx.context_id), ContextReused)
        yield self.assertFailure(self.store.claim(ctx.context_id), ContextReused)

    @defer.inlineCallbacks
    def test_unknown(self) -> Any:
        cid = new_context_id()
        yield self.assertFailure(self.store.claim(cid), ContextUnknown)
        self.assertIsNone((yield self.store.get(cid)))
        yield self.store.discard(cid)
        yield self.assertFailure(self.store.claim(cid), ContextUnknown)

    @defer.inlineCallbacks
    def test_an_id_is_minted_once(self) -> Any:
        ctx = context()
        yield self.store.mint(ctx, 30)
        yield self.assertFailure(self.store.mint(ctx, 30), ValueError)
        yield self.store.claim(ctx.context_id)
        yield self.assertFailure(self.store.mint(ctx, 30), ValueError)
        self.assertIsNone((yield self.store.get(ctx.context_id)))

    @defer.inlineCallbacks
    def test_bad_ttl(self) -> Any:
        for ttl in (0, -1.0):
            yield self.assertFailure(self.store.mint(context(), ttl), ValueError)

    @defer.inlineCallbacks
    def test_ttl_expiry_in_redis(self) -> Any:
        ctx = context()
        yield self.store.mint(ctx, 0.2)
        self.assertEqual((yield self.store.get(ctx.context_id)), ctx)
        yield eventually(
            lambda: self.store.get(ctx.context_id).addCallback(lambda c: c is None),
            what="context expiry",
        )
        yield self.assertFailure(self.store.claim(ctx.context_id), ContextExpired)

    @defer.inlineCallbacks
    def test_tombstones_expire(self) -> Any:
        store = self.make_store(tombstone_ttl=0.1)
        ctx = context()
        yield store.mint(ctx, 0.1)
        yield store.claim(ctx.context_id)
        yield self.assertFailure(store.claim(ctx.context_id), ContextReused)

        def forgotten() -> Any:
            d = store.claim(ctx.context_id)
            # ContextReused until the tombstone expires; anything else fails the test
            return d.addErrback(lambda f: f.trap(ContextReused, ContextUnknown) is ContextUnknown)

        yield eventually(forgotten, what="tombstone expiry")

    @defer.inlineCallbacks
    def test_discard(self) -> Any:
        ctx = context()
        yield self.store.mint(ctx, 30)
        self.assertIsNone((yield self.store.discard(ctx.context_id)))
        self.assertIsNone((yield self.store.get(ctx.context_id)))
        yield self.assertFailure(self.store.claim(ctx.context_id), ContextExpired)
        yield self.store.discard(ctx.context_id)

    @defer.inlineCallbacks
    def test_key_prefix_separates_deployments(self) -> Any:
        other = self.make_store(key_prefix="other:")
        ctx = context()
        yield self.store.mint(ctx, 30)
        self.assertIsNone((yield other.get(ctx.context_id)))
        yield self.assertFailure(other.claim(ctx.context_id), ContextUnknown)
        self.assertEqual(
            (yield self.server.command("EXISTS", f"rapida:ctx:{{{ctx.context_id}}}")), b":1"
        )

    @defer.inlineCallbacks
    def test_stats_count_commands(self) -> Any:
        store = self.make_store(health_interval=3600)
        yield store.mint(context(), 30)
        yield self.assertFailure(store.claim(new_context_id()), ContextUnknown)
        self.assertEqual(store.stats["commands"], 2)
        self.assertEqual(store.stats["errors"], 0)
        self.assertGreater(store.stats["last_latency_ms"], 0.0)
        self.assertTrue(store.healthy)
        self.assertEqual(store.last_error, "")


class TwoNodeTests(RedisStoreTestCase):
    @defer.inlineCallbacks
    def test_register_on_a_claim_on_b(self) -> Any:
        node_b = self.make_store()
        ctx = context()
        yield self.store.mint(ctx, 30)
        self.assertEqual((yield node_b.claim(ctx.context_id)), ctx)
        yield self.assertFailure(self.store.claim(ctx.context_id), ContextReused)

    @defer.inlineCallbacks
    def test_claim_race_has_one_winner(self) -> Any:
        node_a, node_b = self.store, self.make_store()
        ids = [new_context_id() for _ in range(50)]
        yield defer.gatherResults([node_a.mint(context(cid), 30) for cid in ids])

        def outcome(d: defer.Deferred[CallContext]) -> defer.Deferred[str]:
            return d.addCallbacks(lambda _: "won", lambda f: f.trap(ContextReused) and "reused")

        # All 100 claims are on the wire before any reply is read; which node's reaches Redis
        # first is up to the sockets, so take turns at sending first.
        claims = []
        for i, cid in enumerate(ids):
            first, second = (node_a, node_b) if i % 2 else (node_b, node_a)
            claims += [outcome(first.claim(cid)), outcome(second.claim(cid))]
        results = yield defer.gatherResults(claims)
        pairs = [sorted(results[i : i + 2]) for i in range(0, len(results), 2)]
        self.assertEqual(pairs, [["reused", "won"]] * 50)


class CorruptValueTests(RedisStoreTestCase):
    @defer.inlineCallbacks
    def plant(self, cid: str, value: bytes) -> Any:
        key = f"rapida:ctx:{{{cid}}}"
        self.assertEqual((yield self.server.command("SET", key, value, "PX", "30000")), b"+OK")

    @defer.inlineCallbacks
    def test_malformed_values_are_refused_clearly(self) -> Any:
        good = context()
        yield self.store.mint(good, 30)
        other = new_context_id()
        for value in (
            b"not json",
            b"\xff\xfe",
            b"[]",
            b'{"assistant_id": "echo"}',
            b'{"context_id": "%s"}' % good.context_id.encode(),
            b'{"context_id": "%s", "assistant_id": "echo"}' % other.encode(),
        ):
            cid = new_context_id()
            yield self.plant(cid, value)
            failure = yield self.assertFailure(self.store.get(cid), ContextCorrupt)
            self.assertEqual(failure.reason, "context-corrupt")
            yield self.assertFailure(self.store.claim(cid), ContextCorrupt)
            yield self.assertFailure(self.store.claim(cid), ContextReused)
        self.assertEqual((yield self.store.claim(good.context_id)), good)
        self.assertTrue(self.store.healthy)

    @defer.inlineCallbacks
    def test_wrong_type_under_the_key(self) -> Any:
        cid = new_context_id()
        self.assertEqual((yield self.server.command("LPUSH", f"rapida:ctx:{{{cid}}}", "x")), b":1")
        yield self.assertFailure(self.store.get(cid), ContextCorrupt)
        yield self.assertFailure(self.store.claim(cid), ContextCorrupt)
        ctx = context()
        yield self.store.mint(ctx, 30)
        self.assertEqual((yield self.store.claim(ctx.context_id)), ctx)


class OutageTests(RedisStoreTestCase):
    """Every bound below is the trial ``timeout``: a hanging call fails the test."""

    command_timeout = TIMEOUT

    @defer.inlineCallbacks
    def assert_all_unavailable(self, store: RedisContextStore) -> Any:
        cid = new_context_id()
        for d in (store.mint(context(), 30), store.claim(cid), store.get(cid), store.discard(cid)):
            yield self.assertFailure(d, ContextStoreUnavailable)

    @defer.inlineCallbacks
    def test_killed_then_restarted(self) -> Any:
        ctx = context()
        yield self.store.mint(ctx, 30)
        self.assertTrue(self.store.healthy)
        yield self.server.kill()
        yield self.assert_all_unavailable(self.store)
        self.assertFalse(self.store.healthy)
        self.assertTrue(self.store.last_error)
        self.assertGreaterEqual(self.store.stats["errors"], 4)

        yield self.server.start()  # same port, empty: the restart lost every context
        yield eventually(lambda: self.store.healthy, what="reconnect")
        yield self.assertFailure(self.store.claim(ctx.context_id), ContextUnknown)
        ctx = context()
        yield self.store.mint(ctx, 30)
        self.assertEqual((yield self.store.claim(ctx.context_id)), ctx)
        self.assertEqual(self.store.last_error, "")

    test_killed_then_restarted.timeout = 15  # type: ignore[attr-defined]

    @defer.inlineCallbacks
    def test_down_at_start(self) -> Any:
        yield self.server.stop()
        store = self.make_store()
        yield self.assert_all_unavailable(store)
        self.assertFalse(store.healthy)
        yield self.server.start()
        yield eventually(lambda: store.healthy, what="first connection")
        yield eventually(lambda: self.store.healthy, what="reconnect of the other node")
        ctx = context()
        yield store.mint(ctx, 30)
        self.assertEqual((yield self.store.claim(ctx.context_id)), ctx)

    test_down_at_start.timeout = 15  # type: ignore[attr-defined]

    @defer.inlineCallbacks
    def test_down_at_start_is_logged_once_naming_the_setting(self) -> Any:
        yield self.server.stop()
        events: list[dict[str, Any]] = []
        store = RedisContextStore(
            reactor, self.server.url, command_timeout=TIMEOUT, health_interval=0.1
        )
        store.log = Logger(observer=events.append)
        store.start()
        self.addCleanup(store.stop)
        yield self.assert_all_unavailable(store)  # several reconnects and failed PINGs later...
        errors = [formatEvent(e) for e in events if e["log_level"] is LogLevel.error]
        self.assertEqual(len(errors), 1, errors)  # ...still one line
        # The reason is whichever failed first: the connection attempt or a command.
        self.assertTrue(
            errors[0].startswith(f"contexts: Redis at {store.address} is unreachable at start-up"),
            errors[0],
        )
        yield self.server.start()
        yield eventually(lambda: store.healthy, what="first connection")
        self.assertIn(f"context store {store.address} is up", formatEvent(events[-1]))

    test_down_at_start_is_logged_once_naming_the_setting.timeout = 15  # type: ignore[attr-defined]

    @defer.inlineCallbacks
    def test_wedged_redis_times_out(self) -> Any:
        yield self.store.mint(context(), 30)
        self.server.pause()
        try:
            yield self.assert_all_unavailable(self.store)
            self.assertFalse(self.store.healthy)
            self.assertIn("no reply within", self.store.last_error)
        finally:
            self.server.resume()
        yield eventually(lambda: self.store.healthy, what="recovery")
        ctx = context()
        yield self.store.mint(ctx, 30)
        self.assertEqual((yield self.store.claim(ctx.context_id)), ctx)

    test_wedged_redis_times_out.timeout = 15  # type: ignore[attr-defined]

    @defer.inlineCallbacks
    def test_nothing_listening(self) -> Any:
        store = self.make_store("redis://127.0.0.1:1/0")
        yield self.assert_all_unavailable(store)
        self.assertFalse(store.healthy)
        yield eventually(lambda: "refused" in store.last_error, what="the reason in last_error")
        self.assertIn("not connected (Connection was refused", store.last_error)

    test_nothing_listening.timeout = 5  # type: ignore[attr-defined]


class LifecycleTests(RedisStoreTestCase):
    @defer.inlineCallbacks
    def test_not_started_and_stopped(self) -> Any:
        store = RedisContextStore(reactor, self.server.url)
        failure = yield self.assertFailure(store.claim(new_context_id()), ContextStoreUnavailable)
        self.assertIn("not started", str(failure))
        self.assertFalse(store.healthy)
        store.start()
        store.start()  # idempotent
        yield store.mint(context(), 30)
        in_flight = store.get(new_context_id())
        yield store.stop()
        yield store.stop()
        yield self.assertFailure(in_flight, ContextStoreUnavailable)
        failure = yield self.assertFailure(store.claim(new_context_id()), ContextStoreUnavailable)
        self.assertIn("stopped", str(failure))
        self.assertFalse(store.healthy)
        self.assertEqual(store.last_error, "stopped")


class PasswordTests(RedisStoreTestCase):
    password = "s3cret-pw"

    @defer.inlineCallbacks
    def test_right_password(self) -> Any:
        self.assertIn(":s3cret-pw@", self.server.url)
        ctx = context()
        yield self.store.mint(ctx, 30)
        self.assertEqual((yield self.store.claim(ctx.context_id)), ctx)

    @defer.inlineCallbacks
    def test_wrong_or_missing_password(self) -> Any:
        events: list[dict[str, Any]] = []
        for url in (
            f"redis://:wrong-pw@127.0.0.1:{self.server.port}/0",
            f"redis://127.0.0.1:{self.server.port}/0",
        ):
            store = RedisContextStore(reactor, url, command_timeout=TIMEOUT, health_interval=0.1)
            store.log = Logger(observer=events.append)
            store.start()
            self.addCleanup(store.stop)
            failure = yield self.assertFailure(
                store.claim(new_context_id()), ContextStoreUnavailable
            )
            self.assertFalse(store.healthy)
            yield eventually(lambda s=store: "auth" in s.last_error.lower(), what="auth error")
            for text in (str(failure), store.last_error, repr(events)):
                self.assertNotIn("wrong-pw", text)
                self.assertNotIn("s3cret", text)
        self.assertTrue(events)


class _Squatter(protocol.Protocol):
    """Holds a port and never answers, like some other service would."""

    def connectionMade(self) -> None:
        self.factory.open += 1

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.open -= 1


class RedisServerHelperTests(unittest.TestCase):
    def squat(self) -> int:
        factory = protocol.Factory.forProtocol(_Squatter)
        factory.open = 0
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(lambda: eventually(lambda: factory.open == 0, what="squatter closed"))
        self.addCleanup(port.stopListening)
        number: int = port.getHost().port
        return number

    @defer.inlineCallbacks
    def test_a_port_taken_meanwhile_is_replaced(self) -> Any:
        server = RedisServer(reactor)
        server.port = taken = self.squat()  # as if another process took it
        yield server.start()
        self.addCleanup(server.stop)
        self.assertNotEqual(server.port, taken)
        self.assertEqual((yield server.command("PING")), b"+PONG")

    @defer.inlineCallbacks
    def test_a_given_port_taken_is_an_error(self) -> Any:
        server = RedisServer(reactor, port=self.squat())
        failure = yield self.assertFailure(server.start(), RedisServerError)
        self.assertIn("Address already in use", str(failure))
