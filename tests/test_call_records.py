"""Call records and node-to-node messages in both context stores (IContextStore)."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from rapida_tap.contexts import (
    ENDED_RECORD_TTL,
    ContextStoreUnavailable,
    MemoryContextStore,
    new_context_id,
)
from rapida_tap.redis_store import RedisContextStore
from tests.redis_server import RedisServer
from tests.support import wait_until


class MemoryRecordTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.store = MemoryContextStore(self.clock)
        self.addCleanup(self.store.close)

    def test_fields_merge_and_expire_after_the_last_write(self) -> None:
        cid = new_context_id()
        self.assertEqual(self.successResultOf(self.store.load_call(cid)), {})
        self.store.update_call(cid, {"node": "a", "status": "x"}, 10)
        self.clock.advance(9)
        self.store.update_call(cid, {"status": "y"}, 10)
        self.clock.advance(9)
        self.assertEqual(
            self.successResultOf(self.store.load_call(cid)), {"node": "a", "status": "y"}
        )
        self.clock.advance(1.1)
        self.assertEqual(self.successResultOf(self.store.load_call(cid)), {})

    def test_records_are_bounded_in_number_the_least_recently_written_go_first(self) -> None:
        store = MemoryContextStore(self.clock, max_records=3)
        self.addCleanup(store.close)
        ids = [new_context_id() for _ in range(4)]
        for cid in ids[:3]:
            store.update_call(cid, {"n": cid}, 60)
        store.update_call(ids[0], {"again": "1"}, 60)  # now the most recent
        store.update_call(ids[3], {"n": ids[3]}, 60)
        kept = [cid for cid in ids if self.successResultOf(store.load_call(cid))]
        self.assertEqual(kept, [ids[0], ids[2], ids[3]])
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)  # one timer for them all

    def test_an_ended_call_without_a_transfer_is_kept_five_minutes(self) -> None:
        self.assertEqual(ENDED_RECORD_TTL, 300)
        plain, transferred, live = (new_context_id() for _ in range(3))
        for cid in (plain, transferred, live):
            self.store.update_call(cid, {"node": "a", "started": "1.0"}, 3600)
        self.store.update_call(transferred, {"transfer": "SIP/2001"}, 3600)
        for cid in (plain, transferred):
            self.store.update_call(cid, {"ended": "2.0", "reason": "hangup"}, 3600)
        self.clock.advance(ENDED_RECORD_TTL - 1)
        self.assertEqual(self.successResultOf(self.store.load_call(plain))["reason"], "hangup")
        self.clock.advance(1)
        self.assertEqual(self.successResultOf(self.store.load_call(plain)), {})
        self.clock.advance(3600 - ENDED_RECORD_TTL - 1)
        for cid in (transferred, live):
            self.assertEqual(self.successResultOf(self.store.load_call(cid))["node"], "a")
        self.clock.advance(1)
        self.assertEqual(self.successResultOf(self.store.load_call(live)), {})

    def test_a_claimed_field_keeps_the_records_deadline(self) -> None:
        cid = new_context_id()
        self.store.update_call(cid, {"node": "a"}, 10)
        self.clock.advance(6)
        self.assertTrue(self.successResultOf(self.store.claim_call_field(cid, "f", "1")))
        self.clock.advance(4)
        self.assertEqual(self.successResultOf(self.store.load_call(cid)), {})

    def test_a_field_is_claimed_once_and_only_on_a_record(self) -> None:
        cid = new_context_id()
        self.assertFalse(self.successResultOf(self.store.claim_call_field(cid, "f", "1")))
        self.store.update_call(cid, {"node": "a"}, 10)
        self.assertTrue(self.successResultOf(self.store.claim_call_field(cid, "f", "1")))
        self.assertFalse(self.successResultOf(self.store.claim_call_field(cid, "f", "2")))
        self.assertEqual(self.successResultOf(self.store.load_call(cid))["f"], "1")

    def test_publish_reaches_the_listener_of_its_channel_only(self) -> None:
        got: list[str] = []
        self.store.listen("c1", got.append)
        self.assertEqual(self.successResultOf(self.store.publish("c1", "hello")), 1)
        self.assertEqual(self.successResultOf(self.store.publish("c2", "lost")), 0)
        self.assertEqual(got, ["hello"])


class RedisRecordTests(TestCase):
    timeout = 20
    password: str | None = "rec-pw-123"

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        self.server = RedisServer(reactor, password=self.password)
        yield self.server.start()
        self.addCleanup(self.server.stop)
        self.a = self.store()
        self.b = self.store()

    def store(self) -> RedisContextStore:
        store = RedisContextStore(reactor, self.server.url, command_timeout=5.0)
        store.start()
        self.addCleanup(store.stop)
        return store

    @defer.inlineCallbacks
    def test_one_node_writes_another_reads_with_a_ttl(self) -> Any:
        cid = new_context_id()
        yield self.a.update_call(cid, {"node": "a", "transfer": "PJSIP/1@t,30"}, 60)
        yield self.b.update_call(cid, {"transfer_status": "dialing"}, 60)
        record = yield self.b.load_call(cid)
        self.assertEqual(
            record, {"node": "a", "transfer": "PJSIP/1@t,30", "transfer_status": "dialing"}
        )
        ttl = yield self.server.command("PTTL", f"rapida:ctx:{{{cid}}}:call")
        self.assertTrue(55_000 < int(ttl[1:]) <= 60_000, ttl)
        self.assertEqual((yield self.a.load_call(new_context_id())), {})

    @defer.inlineCallbacks
    def test_two_nodes_racing_for_a_field_one_wins(self) -> Any:
        cid = new_context_id()
        self.assertFalse((yield self.a.claim_call_field(cid, "fallback", "x")))  # no record
        yield self.a.update_call(cid, {"node": "a"}, 60)
        won = yield defer.gatherResults(
            [s.claim_call_field(cid, "fallback", n) for s, n in ((self.a, "a"), (self.b, "b"))]
        )
        self.assertEqual(sorted(won), [False, True])

    @defer.inlineCallbacks
    def subscribed(self, channel: str, timeout: float = 10.0) -> Any:
        """Wait until someone listens on ``channel`` (probing with "probe" messages)."""
        deadline = reactor.seconds() + timeout
        while (yield self.server.command("PUBLISH", channel, "probe")) != b":1":
            self.assertLess(reactor.seconds(), deadline, f"nobody subscribed to {channel}")
            yield deferLater(reactor, 0.02, lambda: None)

    @defer.inlineCallbacks
    def test_messages_cross_nodes_and_survive_a_redis_restart(self) -> Any:
        got: list[str] = []
        self.b.listen("rapida:node:b", got.append)
        yield self.subscribed("rapida:node:b")  # its own connection, made asynchronously
        self.assertEqual((yield self.a.publish("rapida:node:b", "one")), 1)
        yield wait_until(lambda: "one" in got)
        self.assertEqual((yield self.a.publish("rapida:node:nobody", "x")), 0)

        yield self.server.kill()
        yield self.assertFailure(self.a.publish("rapida:node:b", "lost"), ContextStoreUnavailable)
        yield self.server.start()  # same port, empty: the subscriber reconnects and subscribes
        yield self.subscribed("rapida:node:b")
        yield wait_until(lambda: self.a.healthy, timeout=10)
        self.assertEqual((yield self.a.publish("rapida:node:b", "two")), 1)
        yield wait_until(lambda: "two" in got)
        self.assertEqual([m for m in got if m != "probe"], ["one", "two"])
