"""outbound.status webhooks and the outbound call's ring time, on a Clock with a fake ARI."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from rapida_tap import outbound as ob
from rapida_tap.ari import AriProvider, AriServerError
from rapida_tap.assistants.echo import EchoAssistant
from rapida_tap.assistants.registry import AssistantRegistry
from rapida_tap.contexts import MemoryContextStore
from rapida_tap.events.config import EventsSpec
from rapida_tap.events.publisher import CallEvents
from rapida_tap.media.bridge import MediaBridge
from rapida_tap.reasons import EndReason
from tests.test_call import FakeLeg
from tests.test_outbound import PROVIDER, FakeAriClient, request
from tests.test_quality import SentEvents


class OutboundStatusTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.store = MemoryContextStore(self.clock)
        self.addCleanup(self.store.close)
        self.bridge = MediaBridge(
            clock=self.clock,
            contexts=self.store,
            assistants=AssistantRegistry(default=EchoAssistant()),
            idle_timeout=0,
        )
        self.addCleanup(self.bridge.pacer.stop)
        self.clients: dict[str, FakeAriClient] = {}

        def factory(provider: AriProvider) -> FakeAriClient:
            self.clients[provider.name] = FakeAriClient(provider)
            return self.clients[provider.name]

        self.service = ob.OutboundCalls(
            self.bridge, {"pbx1": PROVIDER}, clock=self.clock, client_factory=factory
        )
        self.sent = SentEvents()
        CallEvents(
            self.bridge,
            EventsSpec(),
            clock=self.clock,
            sender=self.sent,  # type: ignore[arg-type]
            outbound=self.service,
        )

    def statuses(self) -> list[str]:
        return [d["status"] for t, d in self.sent.sent if t == "outbound.status"]

    def place(self) -> Any:
        return self.successResultOf(self.service.place(request()))

    def test_ringing_answered_then_the_call_ends_as_a_call(self) -> None:
        record = self.place()
        self.clock.advance(4)
        call = self.successResultOf(self.bridge.open_call(record.context_id, FakeLeg()))
        call.end(EndReason.CALLER_HANGUP)
        self.assertEqual(self.statuses(), ["ringing", "answered"])
        ringing = self.sent.sent[0][1]
        self.assertEqual((ringing["context_id"], ringing["to"]), (record.context_id, "+4930123456"))
        (ended,) = [d for t, d in self.sent.sent if t == "call.ended"]
        self.assertEqual(ended["quality"]["direction"], "outbound")
        self.assertEqual(ended["quality"]["ring_s"], 4.0)
        self.assertEqual(ended["quality"]["setup_s"], 0.0)

    def test_no_answer(self) -> None:
        self.place()
        self.clock.pump([1.0] * 121)
        self.assertEqual(self.statuses(), ["ringing", "no-answer"])

    def test_a_channel_gone_before_it_was_answered_is_busy(self) -> None:
        self.place()
        self.clients["pbx1"].channel = None
        self.clock.advance(5)
        self.assertEqual(self.statuses(), ["ringing", "busy"])
        busy = self.sent.sent[-1][1]
        self.assertEqual(busy["reason"], "not-answered")

    def test_an_originate_that_fails_is_failed(self) -> None:
        client = self.clients["pbx1"]
        client.originate_result = AriServerError("500 from ARI")
        self.failureResultOf(self.service.place(request()))
        self.assertEqual(self.statuses(), ["failed"])
        self.assertEqual(self.sent.sent[-1][1]["reason"], "originate-failed")

    def test_hung_up_through_the_api_while_ringing_is_failed_with_its_reason(self) -> None:
        record = self.place()
        self.successResultOf(self.service.hangup(record.context_id))
        self.assertEqual(self.statuses(), ["ringing", "failed"])
        self.assertEqual(self.sent.sent[-1][1]["reason"], "cancelled")
