"""The media bridge of one call, on a Clock: framing, pacing, marks, barge-in, ending once."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from rapida_tap.assistants.echo import EchoAssistant
from rapida_tap.assistants.registry import AssistantRegistry
from rapida_tap.contexts import CallContext, ContextReused, MemoryContextStore, new_context_id
from rapida_tap.interfaces import IAssistantSession, ICallLeg
from rapida_tap.media.audio import FRAME_BYTES, SILENCE
from rapida_tap.media.bridge import MediaBridge
from rapida_tap.media.call import Call
from rapida_tap.media.pacer import Pacer
from rapida_tap.reasons import EndReason as reasons
from rapida_tap.reasons import NotAccepting, UnknownAssistant
from tests.support import RecordingSession


@implementer(ICallLeg)
class FakeLeg:
    transport_name = "fake"

    def __init__(self, lead_frames: int = 0, frame_bytes: int = FRAME_BYTES) -> None:
        self.lead_frames = lead_frames
        self.frame_bytes = frame_bytes
        self.out: list[bytes] = []
        self.events: list[tuple[str, str]] = []
        self.call: Call | None = None

    def send_audio(self, frame: bytes) -> bool:
        assert len(frame) == self.frame_bytes
        self.out.append(frame)
        return True

    def send_silence(self) -> None:
        self.out.append(SILENCE)

    def send_clear(self) -> None:
        self.events.append(("clear", ""))

    def send_mark(self, name: str) -> None:
        self.events.append(("mark", name))
        if self.call is not None:
            self.call.mark_played(name)

    def hangup(self, reason: str) -> None:
        self.events.append(("hangup", reason))


def frame(n: int) -> bytes:
    return bytes([n % 256]) * FRAME_BYTES


class CallTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.pacer = Pacer(self.clock)
        self.leg = FakeLeg()
        self.call = self.make_call(self.leg)
        self.session = RecordingSession()
        self.call.attach(self.session, "recording")

    def make_call(self, leg: FakeLeg, **kw: object) -> Call:
        context = CallContext(new_context_id(), "a", "+49")
        call = Call(context, leg, clock=self.clock, pacer=self.pacer, **kw)  # type: ignore[arg-type]
        leg.call = call
        return call

    def tick(self, n: int = 1) -> None:
        self.clock.pump([0.02] * n)

    def test_interfaces(self) -> None:
        verifyObject(ICallLeg, self.leg)
        verifyObject(IAssistantSession, self.session)

    def test_silence_until_audio_then_one_frame_per_tick(self) -> None:
        self.tick(2)
        self.assertEqual(self.leg.out, [SILENCE, SILENCE])
        self.call.play(frame(1) + frame(2) + frame(3))
        self.tick(1)
        self.assertEqual(self.leg.out[-1], frame(1))
        self.tick(3)
        self.assertEqual(self.leg.out[2:], [frame(1), frame(2), frame(3), SILENCE])
        self.assertEqual(self.call.frames_out, 3)
        self.assertEqual(self.call.silence_out, 3)

    def test_a_burst_is_played_at_real_time(self) -> None:
        self.call.play(b"".join(frame(i) for i in range(250)))  # 5 s at once
        self.tick(100)
        self.assertEqual(self.call.frames_out, 100)
        self.assertEqual(self.call.queued_frames, 150)
        self.tick(150)
        self.assertEqual(self.leg.out, [frame(i) for i in range(250)])

    def test_partial_frames_join_and_the_tail_is_padded_when_the_queue_runs_dry(self) -> None:
        data = frame(7) + frame(8)
        self.call.play(data[:100])
        self.call.play(data[100:500])
        self.tick(1)
        self.assertEqual(self.leg.out, [frame(7)])
        self.tick(1)  # only 180 bytes of frame 8 are left: padded with silence
        self.assertEqual(self.leg.out[1], data[320:500] + bytes(140))

    def test_caller_audio_and_dtmf_reach_the_session(self) -> None:
        self.call.audio_received(frame(1))
        self.call.dtmf_received("5")
        self.assertEqual(self.session.audio, [frame(1)])
        self.assertEqual(self.session.digits, ["5"])

    def test_audio_before_the_session_is_attached_is_dropped(self) -> None:
        call = self.make_call(FakeLeg())
        call.audio_received(frame(1))
        session = RecordingSession()
        call.attach(session, "late")
        call.audio_received(frame(2))
        self.assertEqual(session.audio, [frame(2)])

    def test_mark_is_played_after_the_audio_before_it(self) -> None:
        self.call.play(frame(1) + frame(2))
        self.call.mark("m1")
        self.call.play(frame(3))
        self.tick(1)
        self.assertEqual(self.session.marks, [])
        self.tick(1)
        self.assertEqual(self.session.marks, ["m1"])
        self.assertEqual(self.leg.events, [("mark", "m1")])

    def test_mark_with_nothing_queued_is_played_at_once(self) -> None:
        self.call.mark("now")
        self.assertEqual(self.session.marks, ["now"])

    def test_mark_after_a_partial_frame_waits_for_it(self) -> None:
        self.call.play(b"\x01" * 100)
        self.call.mark("tail")
        self.assertEqual(self.session.marks, [])
        self.tick(1)
        self.assertEqual(self.session.marks, ["tail"])

    def test_clear_empties_the_queue_at_once_and_settles_marks(self) -> None:
        self.call.play(b"".join(frame(i) for i in range(50)))
        self.call.mark("a")
        self.call.play(frame(99))
        self.call.mark("b")
        self.tick(2)
        self.call.clear()
        self.assertEqual(self.call.queued_frames, 0)
        self.assertEqual(self.session.marks, ["a", "b"])
        self.assertIn(("clear", ""), self.leg.events)
        self.tick(1)
        self.assertEqual(self.leg.out[-1], SILENCE)
        self.call.play(frame(5))  # audio after a clear plays normally
        self.tick(1)
        self.assertEqual(self.leg.out[-1], frame(5))

    def test_underrun_is_a_one_tick_gap_inside_audio(self) -> None:
        self.call.play(frame(1))
        self.tick(2)  # frame, then silence: the queue ran dry
        self.call.play(frame(2))  # audio came right after: that silence was an underrun
        self.tick(1)
        self.assertEqual(self.call.underruns, 1)
        self.tick(5)
        self.call.play(frame(3))  # a long pause is not an underrun
        self.assertEqual(self.call.underruns, 1)

    def test_pacer_debt_is_worked_off_one_extra_frame_per_tick(self) -> None:
        self.call.play(b"".join(frame(i) for i in range(10)))
        self.tick(1)
        self.clock.advance(0.06)  # two ticks missed
        self.assertEqual(self.call.frames_out, 3)
        self.tick(1)
        self.assertEqual(self.call.frames_out, 5)
        self.tick(1)
        self.assertEqual(self.call.frames_out, 6)
        self.assertEqual(self.leg.out, [frame(i) for i in range(6)])

    def test_lead_frames_go_out_when_audio_starts(self) -> None:
        leg = FakeLeg(lead_frames=3)
        call = self.make_call(leg)
        call.play(b"".join(frame(i) for i in range(10)))
        self.pacer.remove(self.call)
        self.tick(1)
        self.assertEqual(leg.out, [frame(i) for i in range(4)])
        self.tick(1)
        self.assertEqual(len(leg.out), 5)

    def test_queue_is_bounded(self) -> None:
        call = self.make_call(FakeLeg(), max_queue_frames=10)
        call.play(frame(0) * 8)
        call.play(frame(1) * 5)  # would exceed: dropped and counted
        self.assertEqual(call.queued_frames, 8)
        self.assertEqual(call.overflow_frames, 5)

    def test_frames_of_a_stream_already_playing_keep_every_rule(self) -> None:
        leg = FakeLeg()
        call = self.make_call(leg, max_queue_frames=4)
        call.play(frame(0))
        self.tick(1)  # playing now: whole frames take the shortest way into the queue
        for i in range(1, 7):
            call.play(frame(i))
        self.assertEqual((call.queued_frames, call.overflow_frames), (4, 2))  # still bounded
        call.play(frame(7)[:100])  # a partial frame waits and joins the next audio
        self.tick(4)
        call.play(frame(7)[100:] + frame(8)[:100])
        call.play(frame(8)[100:])
        self.tick(2)
        self.assertEqual(leg.out, [frame(i) for i in (0, 1, 2, 3, 4, 7, 8)])
        call.end(reasons.CALLER_HANGUP)
        call.play(frame(9))  # nothing is queued after the end
        self.assertEqual(call.queued_frames, 0)

    def test_end_fires_once_and_frees_everything(self) -> None:
        self.call.play(frame(1) * 20)
        self.call.mark("x")
        results: list[str] = []
        self.call.when_ended().addCallback(results.append)
        self.call.end(reasons.CALLER_HANGUP)
        self.call.end(reasons.ASSISTANT_HANGUP)
        self.call.hangup()
        self.assertEqual(results, [reasons.CALLER_HANGUP])
        self.assertEqual(self.session.closed, [reasons.CALLER_HANGUP])
        self.assertEqual(self.leg.events, [("hangup", reasons.CALLER_HANGUP)])
        self.assertNotIn(self.call, self.pacer)
        self.assertEqual(self.call.queued_frames, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.call.play(frame(1))  # after the end: ignored
        self.call.mark("late")
        self.call.clear()
        self.assertEqual(self.call.queued_frames, 0)

    def test_session_attached_after_the_end_is_closed(self) -> None:
        call = self.make_call(FakeLeg())
        call.end(reasons.CALLER_HANGUP)
        late = RecordingSession()
        call.attach(late, "late")
        self.assertEqual(late.closed, [reasons.CALLER_HANGUP])

    def test_idle_timeout_when_neither_side_produces_anything(self) -> None:
        call = self.make_call(FakeLeg(), idle_timeout=8)
        self.clock.pump([1] * 6)
        call.audio_received(frame(1))
        self.clock.pump([1] * 6)
        self.assertFalse(call.is_ended)
        self.clock.pump([1] * 4)  # seen at the 8 s check, so idle from 8 s to 16 s
        self.assertEqual(call.end_reason, reasons.IDLE_TIMEOUT)
        self.assertIn("8s", call.end_detail)

    def test_assistant_audio_alone_keeps_the_call_alive(self) -> None:
        call = self.make_call(FakeLeg(), idle_timeout=8)
        for _ in range(10):
            call.play(frame(1))
            self.clock.advance(2)
        self.assertFalse(call.is_ended)

    def test_failing_session_close_does_not_stop_the_end(self) -> None:
        class Bad(RecordingSession):
            def close(self, reason: str) -> None:
                raise RuntimeError("bad session")

        call = self.make_call(FakeLeg())
        call.attach(Bad(), "bad")
        call.end(reasons.CALLER_HANGUP)
        self.assertTrue(call.is_ended)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class CallRateTests(SynchronousTestCase):
    """A call's rate: its assistant's, else settled by the caller's first word."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.pacer = Pacer(self.clock)

    def make_call(self, rate: int | None = None) -> tuple[Call, FakeLeg]:
        leg = FakeLeg(frame_bytes=(rate or 8000) // 25)
        context = CallContext(new_context_id(), "a", "+49")
        call = Call(context, leg, clock=self.clock, pacer=self.pacer, rate=rate)  # type: ignore[arg-type]
        return call, leg

    def test_a_16khz_call_plays_640_byte_frames(self) -> None:
        call, leg = self.make_call(16000)
        call.play(bytes(range(256)) * 5)  # 1280 bytes: two frames at 16 kHz
        self.clock.advance(0.02)
        self.clock.advance(0.02)
        self.assertEqual(b"".join(leg.out), bytes(range(256)) * 5)
        self.assertEqual([len(f) for f in leg.out], [640, 640])
        self.assertEqual((call.rate, call.frame_bytes, call.assistant_rate), (16000, 640, 16000))

    def test_the_first_word_settles_a_call_without_an_assistant_rate(self) -> None:
        call, _leg = self.make_call()
        self.assertEqual(call.caller_rate_is(16000), 16000)
        self.assertEqual((call.rate, call.frame_bytes, call.assistant_rate), (16000, 640, 16000))
        self.assertEqual(call.caller_rate_is(8000), 16000)  # settled: the leg converts
        self.assertEqual(call.caller_rate, 8000)

    def test_the_assistant_rate_wins_over_the_callers(self) -> None:
        call, _leg = self.make_call(8000)
        self.assertEqual(call.caller_rate_is(48000), 8000)
        self.assertEqual((call.caller_rate, call.rate), (48000, 8000))

    def test_audio_played_first_settles_the_rate(self) -> None:
        call, _leg = self.make_call()
        call.play(bytes(320))
        self.assertEqual(call.caller_rate_is(16000), 8000)


class BridgeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.store = MemoryContextStore(self.clock)
        self.bridge = MediaBridge(
            clock=self.clock,
            contexts=self.store,
            assistants=AssistantRegistry(default=EchoAssistant()),
        )

    def mint(self, assistant: str = "a") -> str:
        context = CallContext(new_context_id(), assistant, "+49")
        return self.successResultOf(self.store.mint(context, 30))

    def test_open_call_claims_and_echoes(self) -> None:
        leg = FakeLeg()
        call = self.successResultOf(self.bridge.open_call(self.mint(), leg))
        self.assertIn(call.context_id, self.bridge.calls)
        call.audio_received(frame(3))
        self.clock.advance(0.02)
        self.assertEqual(leg.out, [frame(3)])

    def test_context_is_single_use(self) -> None:
        cid = self.mint()
        self.successResultOf(self.bridge.open_call(cid, FakeLeg()))
        self.failureResultOf(self.bridge.open_call(cid, FakeLeg()), ContextReused)
        self.assertEqual(len(self.bridge.calls), 1)

    def test_not_accepting(self) -> None:
        cid = self.mint()
        self.bridge.accepting = False
        self.failureResultOf(self.bridge.open_call(cid, FakeLeg()), NotAccepting)

    def test_unknown_assistant(self) -> None:
        self.bridge.assistants = AssistantRegistry({"known": EchoAssistant()})
        self.failureResultOf(self.bridge.open_call(self.mint("other"), FakeLeg()), UnknownAssistant)
        self.assertEqual(self.bridge.calls, {})

    def test_assistant_that_fails_to_connect_ends_the_call(self) -> None:
        class Unreachable:
            name = "unreachable"

            def connect(self, call: Call) -> object:
                raise ConnectionRefusedError("bot down")

        self.bridge.assistants = AssistantRegistry(default=Unreachable())  # type: ignore[arg-type]
        leg = FakeLeg()
        call = self.successResultOf(self.bridge.open_call(self.mint(), leg))
        self.assertEqual(call.end_reason, reasons.ASSISTANT_FAILED)
        self.assertIn("bot down", call.end_detail)
        self.assertEqual(leg.events, [("hangup", reasons.ASSISTANT_FAILED)])
        self.assertEqual(self.bridge.calls, {})
        self.assertEqual(len(self.bridge.pacer), 0)

    def test_end_all_and_hooks(self) -> None:
        started: list[Call] = []
        ended: list[Call] = []
        self.bridge.call_started.append(started.append)
        self.bridge.call_ended.append(ended.append)
        calls = [
            self.successResultOf(self.bridge.open_call(self.mint(), FakeLeg())) for _ in range(3)
        ]
        self.bridge.end_all()
        self.assertEqual(started, calls)
        self.assertEqual(ended, calls)
        self.assertEqual(self.bridge.ended_by_reason, {reasons.SHUTDOWN: 3})
        self.assertEqual(self.bridge.calls, {})
        self.assertEqual(len(self.bridge.pacer), 0)
        self.store.close()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class BacklogTrimTests(SynchronousTestCase):
    """Real-time sources (echo): a standing backlog is worked off, bursts are left alone."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.pacer = Pacer(self.clock)
        self.leg = FakeLeg()
        self.call = Call(
            CallContext(new_context_id(), "a"), self.leg, clock=self.clock, pacer=self.pacer
        )
        self.call.trim_backlog = True
        self.n = 1  # frame(0) would be silence

    def feed(self, frames: int) -> None:
        for _ in range(frames):
            self.call.play(frame(self.n))
            self.n += 1

    def test_latency_added_by_a_stall_comes_back(self) -> None:
        self.feed(1)
        self.clock.advance(0.02)
        self.feed(3)  # a stall upstream: three frames at once, then paced again
        for _ in range(200):
            self.clock.advance(0.02)
            self.feed(1)
        self.assertLessEqual(self.call.queued_frames, 1)
        self.assertEqual(self.call.trimmed_frames, 2)
        audio = [f for f in self.leg.out if f != SILENCE]
        self.assertEqual(audio, [frame(i) for i in range(1, 1 + len(audio))])  # none dropped
        self.assertEqual(len(audio) + self.call.queued_frames, self.n - 1)

    def test_bursty_input_is_not_trimmed(self) -> None:
        for _ in range(40):  # 5 frames every 100 ms for 4 s
            self.feed(5)
            self.clock.pump([0.02] * 5)
        self.assertEqual(self.call.trimmed_frames, 0)
        self.assertEqual(self.call.frames_out, 200)

    def test_assistants_that_send_ahead_are_not_trimmed(self) -> None:
        self.call.trim_backlog = False
        self.feed(250)
        self.clock.pump([0.02] * 200)
        self.assertEqual(self.call.frames_out, 200)
        self.assertEqual(self.call.trimmed_frames, 0)


class RealTimeSource(SynchronousTestCase):
    """A call fed by a real-time source on a Clock (no tests of its own)."""

    phases = 1

    def setUp(self) -> None:
        self.clock = Clock()
        self.pacer = Pacer(self.clock, phases=self.phases)
        self.leg = FakeLeg()
        self.call = Call(
            CallContext(new_context_id(), "a"), self.leg, clock=self.clock, pacer=self.pacer
        )
        self.call.trim_backlog = True
        self.n = 1

    def advance_to(self, at: float) -> None:
        """Move the clock to ``at``, firing each timer at its own time (not all at the end)."""
        while True:
            due = [c.getTime() for c in self.clock.getDelayedCalls()]
            step = min(due, default=at)
            if step > at:
                break
            self.clock.advance(max(0.0, step - self.clock.seconds()))
        self.clock.advance(max(0.0, at - self.clock.seconds()))

    def run_source(self, phase: float, jitter: list[float], frames: int, stop: bool = True) -> None:
        """One frame every 20 ms from ``phase`` s after the source's grid point, plus each
        frame's own jitter; ``stop`` lets the queue run dry afterwards."""
        start = getattr(self, "_grid", self.clock.seconds())
        for i in range(frames):
            self.advance_to(start + i * 0.02 + phase + jitter[i % len(jitter)])
            self.call.play(self.source_frame(self.n))
            self.n += 1
        self._grid = start + frames * 0.02
        if stop:
            self.advance_to(self.clock.seconds() + 0.1)

    @staticmethod
    def source_frame(n: int) -> bytes:
        return frame(1 + n % 255)  # never all zeros, which would read as silence

    def gaps(self) -> int:
        """Silent frames between the first and the last audio frame."""
        out = self.leg.out
        audio = [i for i, f in enumerate(out) if f != SILENCE]
        return sum(1 for f in out[audio[0] : audio[-1]] if f == SILENCE)


class CushionTests(RealTimeSource):
    """A real-time source whose frames land near our tick keeps one frame in hand: no gaps."""

    def test_frames_landing_just_before_the_tick_never_miss_it(self) -> None:
        self.clock.advance(0.0195 - 0.001)  # 1 ms before the first tick (which fires 0.5 ms early)
        self.run_source(0.0, [0.0, 0.0015, -0.001, 0.0025, 0.0], 500)  # jitter across the tick
        self.assertEqual(self.gaps(), 0)
        self.assertEqual(self.call.underruns, 0)
        audio = [f for f in self.leg.out if f != SILENCE]
        self.assertEqual(audio, [self.source_frame(i) for i in range(1, self.n)])  # none lost
        self.assertEqual(self.call.trimmed_frames, 0)  # the one frame in hand is kept

    def test_frames_landing_mid_interval_keep_no_cushion(self) -> None:
        self.clock.advance(0.009)
        self.run_source(0.0, [0.0, 0.001, -0.001], 200)
        self.assertEqual(self.gaps(), 0)
        first_audio = next(i for i, f in enumerate(self.leg.out) if f != SILENCE)
        self.assertEqual(first_audio, 0)  # played at the very next tick: no extra latency

    def test_a_gap_gives_the_call_its_cushion(self) -> None:
        self.clock.advance(0.009)
        # Mid-interval, then the source slips close to the tick and jitters across it.
        self.run_source(0.0, [0.0], 20, stop=False)
        self.run_source(0.0095, [0.0, 0.0015, 0.0], 300)
        self.assertLessEqual(self.call.underruns, 1)  # the first miss, then never again
        self.assertLessEqual(self.gaps(), 1)

    def test_a_backlog_beyond_the_cushion_is_still_trimmed(self) -> None:
        self.clock.advance(0.0185)
        self.run_source(0.0, [0.0], 10, stop=False)
        for _ in range(3):  # a stall upstream: three frames at once
            self.call.play(self.source_frame(self.n))
            self.n += 1
        self.run_source(0.0, [0.0], 300)
        self.assertGreaterEqual(self.call.trimmed_frames, 3)
        self.assertLessEqual(self.call.queued_frames, 2)


class AlignedTests(RealTimeSource):
    """On a phased pacer, a real-time source is moved to the tick just after its frames land."""

    phases = 4

    def setUp(self) -> None:
        super().setUp()
        self.sent_at: dict[bytes, float] = {}
        send = self.leg.send_audio

        def timed(frame: bytes) -> bool:
            self.sent_at.setdefault(frame, self.clock.seconds())
            return send(frame)

        self.leg.send_audio = timed  # type: ignore[method-assign]

    def test_frames_landing_anywhere_wait_five_to_ten_ms_and_never_miss(self) -> None:
        for start in (0.0185, 0.0195, 0.0201, 0.0230, 0.0290):
            self.setUp()
            self.clock.advance(start)
            played_at = []
            grid = self.clock.seconds()
            for i, jitter in zip(range(300), [0.0, 0.0015, -0.001, 0.0025, 0.0] * 60, strict=True):
                self.advance_to(grid + i * 0.02 + jitter)
                played_at.append((self.source_frame(self.n), self.clock.seconds()))
                self.call.play(self.source_frame(self.n))
                self.n += 1
            self.advance_to(self.clock.seconds() + 0.1)
            self.assertEqual(self.gaps(), 0, start)
            self.assertEqual(self.call.underruns, 0)
            first_frame, first_in = played_at[0]
            self.assertGreaterEqual(self.sent_at[first_frame] - first_in, 0.005 - 0.0005)
            self.assertLessEqual(self.sent_at[first_frame] - first_in, 0.010)
            audio = [f for f in self.leg.out if f != SILENCE]
            self.assertEqual(audio, [self.source_frame(i) for i in range(1, self.n)])


class RealTimeBacklogTests(SynchronousTestCase):
    def test_a_real_time_source_queues_at_most_a_second(self) -> None:
        from rapida_tap.media.call import REALTIME_BACKLOG

        clock = Clock()
        leg = FakeLeg()
        call = Call(CallContext(new_context_id(), "a"), leg, clock=clock, pacer=Pacer(clock))
        call.trim_backlog = True  # the echo: audio played as it comes
        for n in range(500):  # the node lagged ten seconds: all of it arrives at once
            call.play(frame(1 + n % 255))
        self.assertEqual(call.queued_frames, REALTIME_BACKLOG)
        self.assertEqual(call.trimmed_frames, 500 - REALTIME_BACKLOG)
        clock.advance(0.02)
        self.assertEqual(leg.out, [frame(1 + (500 - REALTIME_BACKLOG) % 255)])  # the newest kept

    def test_a_bot_may_send_far_ahead(self) -> None:
        clock = Clock()
        call = Call(CallContext(new_context_id(), "a"), FakeLeg(), clock=clock, pacer=Pacer(clock))
        call.play(frame(1) * 500)
        self.assertEqual(call.queued_frames, 500)
        self.assertEqual(call.trimmed_frames, 0)
