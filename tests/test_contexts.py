"""The memory context store: single use, expiry, reasons, on an injected clock."""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from rapida_tap.contexts import (
    CallContext,
    ContextExpired,
    ContextReused,
    ContextUnknown,
    MemoryContextStore,
    is_context_id,
    new_context_id,
)


def ctx(cid: str | None = None) -> CallContext:
    return CallContext(context_id=cid or new_context_id(), assistant_id="a", caller="+49")


class MemoryStoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.store = MemoryContextStore(self.clock, tombstone_ttl=60)

    def test_mint_then_claim_once(self) -> None:
        c = ctx()
        self.assertEqual(self.successResultOf(self.store.mint(c, 30)), c.context_id)
        self.assertEqual(self.successResultOf(self.store.claim(c.context_id)), c)
        self.failureResultOf(self.store.claim(c.context_id), ContextReused)
        self.assertEqual(len(self.store), 0)

    def test_unknown(self) -> None:
        self.failureResultOf(self.store.claim(new_context_id()), ContextUnknown)

    def test_expires_unclaimed(self) -> None:
        c = ctx()
        self.store.mint(c, 30)
        self.clock.advance(29.9)
        self.assertEqual(self.successResultOf(self.store.get(c.context_id)), c)
        self.clock.advance(0.2)
        self.assertIsNone(self.successResultOf(self.store.get(c.context_id)))
        self.failureResultOf(self.store.claim(c.context_id), ContextExpired)
        self.assertEqual(len(self.store), 0)

    def test_tombstones_are_forgotten(self) -> None:
        c = ctx()
        self.store.mint(c, 1)
        self.clock.advance(1)
        self.clock.advance(60)
        self.failureResultOf(self.store.claim(c.context_id), ContextUnknown)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_claim_cancels_expiry(self) -> None:
        c = ctx()
        self.store.mint(c, 30)
        self.successResultOf(self.store.claim(c.context_id))
        self.clock.advance(31)
        self.failureResultOf(self.store.claim(c.context_id), ContextReused)

    def test_a_claimed_ids_record_says_reused_in_place_of_its_tombstone(self) -> None:
        c = ctx()
        self.store.mint(c, 30)
        self.successResultOf(self.store.claim(c.context_id))
        self.store.update_call(c.context_id, {"started": "1.0"}, 300)
        self.assertNotIn(c.context_id, self.store._tombstones)  # one entry per call, not two
        self.failureResultOf(self.store.claim(c.context_id), ContextReused)
        self.failureResultOf(self.store.mint(c, 30), ValueError)
        self.clock.advance(300)  # the record is gone: the id is as good as never seen
        self.failureResultOf(self.store.claim(c.context_id), ContextUnknown)

    def test_a_record_keeps_an_expired_ids_reason(self) -> None:
        c = ctx()
        self.store.mint(c, 30)
        self.store.update_call(c.context_id, {"outbound": "{}"}, 300)
        self.clock.advance(30)
        self.failureResultOf(self.store.claim(c.context_id), ContextExpired)

    def test_discard(self) -> None:
        c = ctx()
        self.store.mint(c, 30)
        self.successResultOf(self.store.discard(c.context_id))
        self.failureResultOf(self.store.claim(c.context_id), ContextExpired)
        self.successResultOf(self.store.discard(new_context_id()))

    def test_mint_refuses_a_used_id(self) -> None:
        c = ctx()
        self.store.mint(c, 30)
        self.failureResultOf(self.store.mint(c, 30), ValueError)

    def test_close_cancels_timers(self) -> None:
        for _ in range(3):
            self.store.mint(ctx(), 30)
        self.store.close()
        self.assertEqual(self.clock.getDelayedCalls(), [])


def test_context_ids_are_canonical_uuid4() -> None:
    ids = {new_context_id() for _ in range(1000)}
    assert len(ids) == 1000
    for cid in ids:
        assert is_context_id(cid)
        assert cid[14] == "4"


def test_is_context_id_rejects_other_forms() -> None:
    good = new_context_id()
    for bad in ["", good.upper(), good.replace("-", ""), "{" + good + "}", good + " ", good[:-1]]:
        assert not is_context_id(bad)


def test_json_round_trip() -> None:
    c = CallContext(new_context_id(), "bot", "+4930", "outbound", 12.5, {"a": "b"})
    assert CallContext.from_json(c.to_json()) == c
