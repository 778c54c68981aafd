"""The per-call quality report, on a Clock: every number checked against a scripted call."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from rapida_tap.assistants.registry import AssistantRegistry
from rapida_tap.contexts import CallContext, MemoryContextStore, new_context_id
from rapida_tap.events.config import EventsSpec
from rapida_tap.events.publisher import CallEvents
from rapida_tap.events.quality import ENDED_BY, percentile_ms
from rapida_tap.logs import event_as_json
from rapida_tap.media.bridge import MediaBridge
from rapida_tap.media.pacer import LATENESS_EDGES, Pacer
from rapida_tap.reasons import EndReason
from tests.support import RecordingAssistant, capture_logs
from tests.test_call import FakeLeg, frame


class SentEvents:
    """Stands in for the WebhookSender: keeps what would be sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []

    def send(self, endpoints: Any, event_type: str, data: dict[str, Any]) -> None:
        self.sent.append((event_type, data))


def test_every_end_reason_names_who_ended_the_call() -> None:
    assert set(ENDED_BY) == set(EndReason)


def test_percentiles_are_bucket_upper_edges() -> None:
    counts = [0] * (len(LATENESS_EDGES) + 1)
    assert percentile_ms(counts, 0.5) is None
    counts[0] = 98  # <= 0.25 ms
    counts[9] = 2  # (15, 20] ms
    assert percentile_ms(counts, 0.5) == 0.25
    assert percentile_ms(counts, 0.98) == 0.25
    assert percentile_ms(counts, 0.99) == 20.0
    counts[-1] = 100  # later than the last edge: reported as the last edge
    assert percentile_ms(counts, 0.99) == LATENESS_EDGES[-1] * 1000


class QualityReportTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000.0)
        self.store = MemoryContextStore(self.clock)
        self.assistant = RecordingAssistant()
        self.bridge = MediaBridge(
            clock=self.clock,
            contexts=self.store,
            assistants=AssistantRegistry(default=self.assistant),
            pacer=Pacer(self.clock),  # one phase: ``tick`` is the call's own 20 ms tick
            idle_timeout=0,
        )
        self.sent = SentEvents()
        CallEvents(self.bridge, EventsSpec(), clock=self.clock, sender=self.sent)  # type: ignore[arg-type]
        self.addCleanup(self.bridge.pacer.stop)
        self.addCleanup(self.store.close)

    def tick(self, n: int = 1) -> None:
        for _ in range(n):
            self.clock.advance(self.next_tick() - self.clock.seconds())

    def next_tick(self) -> float:
        return min(c.getTime() for c in self.clock.getDelayedCalls())

    def test_a_call_with_known_underruns_barge_in_marks_and_dtmf(self) -> None:
        logs = capture_logs(self)
        cid = new_context_id()
        self.store.mint(CallContext(cid, "a", "+4930123", created_at=self.clock.seconds()), 60)
        self.clock.advance(0.5)  # the dialplan took 0.5 s from registration to AudioSocket()
        leg = FakeLeg()
        call = self.successResultOf(self.bridge.open_call(cid, leg))
        leg.call = call
        self.tick(5)  # silence while the caller says nothing

        call.audio_received(frame(1))  # the first caller frame
        first_in = self.clock.seconds()
        self.tick(2)
        call.play(frame(1) + frame(2) + frame(3))  # queue depth 3 at the next tick
        self.tick(1)
        first_out = self.clock.seconds()
        self.tick(2)
        self.tick(1)  # ran dry mid-speech: one silent tick, then more audio: one underrun
        call.play(frame(4) + frame(5))
        self.tick(2)
        call.mark("m1")  # nothing queued: sent at once, the fake leg echoes it
        call.dtmf_received("1")
        call.dtmf_received("#")

        call.play(b"".join(frame(i) for i in range(10)))
        call.mark("m2")  # waits behind 10 frames
        self.tick(2)
        self.clock.advance(0.005)
        call.clear()  # barge-in: m2 is settled without being sent
        cleared_at = self.clock.seconds()
        silence_at = self.next_tick()
        self.tick(1)

        # One tick 12 ms late (a stalled reactor): more than 1 % of the call's ticks.
        late_deadline = self.next_tick() + 0.0005
        self.clock.advance(late_deadline + 0.012 - self.clock.seconds())
        self.tick(3)
        call.end(EndReason.CALLER_HANGUP, "hangup frame")

        (started,) = [d for t, d in self.sent.sent if t == "call.started"]
        (ended,) = [d for t, d in self.sent.sent if t == "call.ended"]
        self.assertEqual(started["context_id"], cid)
        self.assertEqual(started["caller"], "+4930123")
        q = ended["quality"]
        ticks = 5 + 2 + 1 + 2 + 1 + 2 + 2 + 1 + 1 + 3
        expected = {
            "transport": "fake",
            "codec": "slin",
            "sample_rate": 8000,
            "direction": "inbound",
            "setup_s": 0.5,
            "ring_s": None,
            "ended_by": "caller",
            "end_reason": "caller-hangup",
            "end_detail": "hangup frame",
            "frames_in": 3,  # one audio frame and two DTMF digits
            "frames_out": 3 + 2 + 2,
            "underruns": 1,
            "overflow_frames": 0,
            "trimmed_frames": 0,
            "dropped_frames": 0,
            "ticks": ticks,
            "pacing_error_p50_ms": 0.25,
            "pacing_error_p99_ms": 15.0,
            "queue_depth_max": 10,
            "xoff": 0,
            "pauses": 0,
            "barge_ins": 1,
            "marks_sent": 1,
            "marks_echoed": 1,
            "marks_settled": 2,
            "dtmf": 2,
        }
        self.maxDiff = None
        self.assertEqual({k: q[k] for k in expected}, expected)
        self.assertEqual(q["silence_frames"], ticks - q["frames_out"])
        self.assertAlmostEqual(q["first_audio_ms"], round((first_out - first_in) * 1000, 1))
        barge_in_ms = round((silence_at - cleared_at) * 1000, 1)
        self.assertEqual(q["barge_in_ms_max"], barge_in_ms)
        self.assertEqual(q["barge_in_ms_mean"], barge_in_ms)
        self.assertAlmostEqual(q["talk_s"], call.duration(), places=3)
        depths = 3 + 2 + 1 + 2 + 1 + 10 + 9  # the queue before each tick that had one
        self.assertEqual(q["queue_depth_mean"], round(depths / ticks, 2))
        self.assertEqual(ended["ended_by"], "caller")

        # The same report is in the call-end log line, and a JSON log keeps it whole.
        (line,) = [e for e in logs.events if "quality" in e]
        self.assertEqual(line["quality"], q)
        record = json.loads(event_as_json(line))
        self.assertEqual(record["quality"]["barge_ins"], 1)
        self.assertEqual(record["reason"], "caller-hangup")

    def test_a_call_that_never_played_reports_no_latencies(self) -> None:
        cid = new_context_id()
        self.store.mint(CallContext(cid, "a", created_at=self.clock.seconds()), 60)
        call = self.successResultOf(self.bridge.open_call(cid, FakeLeg()))
        call.end(EndReason.ASSISTANT_FAILED, "bot unreachable")
        (ended,) = [d for t, d in self.sent.sent if t == "call.ended"]
        q = ended["quality"]
        self.assertEqual(q["ended_by"], "assistant")
        self.assertIsNone(q["first_audio_ms"])
        self.assertIsNone(q["barge_in_ms_max"])
        self.assertIsNone(q["pacing_error_p50_ms"])
        self.assertEqual(q["ticks"], 0)
        self.assertEqual(q["queue_depth_mean"], 0.0)


class BrokenReportTests(SynchronousTestCase):
    def test_a_failing_report_still_leaves_the_end_line_and_the_other_hooks(self) -> None:
        from rapida_tap.events import publisher

        clock = Clock()
        store = MemoryContextStore(clock)
        self.addCleanup(store.close)
        bridge = MediaBridge(
            clock=clock,
            contexts=store,
            assistants=AssistantRegistry(default=RecordingAssistant()),
            idle_timeout=0,
        )
        self.addCleanup(bridge.pacer.stop)
        CallEvents(bridge, EventsSpec(), clock=clock, sender=SentEvents())  # type: ignore[arg-type]
        ended: list[Any] = []
        bridge.call_ended.append(ended.append)

        def broken(*args: Any) -> dict[str, Any]:
            raise ValueError("a bug")

        self.patch(publisher, "build_report", broken)
        logs = capture_logs(self)
        cid = new_context_id()
        store.mint(CallContext(cid, "a"), 60)
        call = self.successResultOf(bridge.open_call(cid, FakeLeg()))
        call.end(EndReason.CALLER_HANGUP)
        self.assertEqual(ended, [call])
        (line,) = [e for e in logs.events if "quality" in e]
        self.assertEqual(line["quality"], {"error": "the quality report failed"})
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 2)  # the end line, the hook
