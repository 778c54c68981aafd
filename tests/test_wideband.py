"""Wideband end to end: every call runs at its own rate, resampled once at most.

A 6 kHz tone is the witness: it exists only above 8 kHz sampling, so an 8 kHz step anywhere
on the path filters it out, and a path that keeps it carries the caller's wideband audio.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from twisted.internet import defer, protocol, reactor
from twisted.trial.unittest import TestCase

from rapida_tap.assistants.registry import AssistantRegistry
from rapida_tap.audiosocket.wire import AUDIO_SAMPLE_RATES, Kind, encode_frame
from rapida_tap.media.audio import frame_bytes
from rapida_tap.media.codec import alaw_to_pcm, pcm_to_alaw, pcm_to_ulaw, ulaw_to_pcm
from tests import fake_chan_websocket as fc
from tests.fake_bot import FakeBot
from tests.support import (
    FakeAsterisk,
    RecordingAssistant,
    capture_logs,
    connect_audiosocket,
    register,
    start_daemon,
    tone,
    wait_until,
)


def share_at(pcm: bytes, rate: int, hz: float) -> float:
    """The share of ``pcm``'s energy within 200 Hz of ``hz`` (0 for silence)."""
    x = np.frombuffer(pcm, dtype="<i2").astype(float)
    power = np.abs(np.fft.rfft(x)) ** 2
    freqs = np.fft.rfftfreq(len(x), 1 / rate)
    total = power.sum()
    return float(power[np.abs(freqs - hz) < 200].sum() / total) if total else 0.0


class AudioSocketWidebandTests(TestCase):
    timeout = 20

    def setUp(self) -> None:
        self.daemon = start_daemon(self)
        self.logs = capture_logs(self)

    @defer.inlineCallbacks
    def call(self, frames: list[bytes], kind: int) -> Any:
        ctx = yield register(self.daemon.http_port)
        client = FakeAsterisk(ctx, frames, kind=kind)
        yield connect_audiosocket(self.daemon.as_port, client)
        self.addCleanup(lambda: client.closed)
        self.addCleanup(client.transport.loseConnection)
        return ctx, client

    @defer.inlineCallbacks
    def test_a_6khz_tone_from_a_16khz_caller_comes_back(self) -> Any:
        sent = tone(50, hz=6000, rate=16000)
        ctx, client = yield self.call(sent, Kind.SLIN_16K)
        call = yield wait_until(lambda: ctx in self.daemon.bridge.calls).addCallback(
            lambda _: self.daemon.bridge.calls[ctx]
        )
        yield client.sent_all
        yield wait_until(lambda: sum(any(r.payload) for r in client.audio()) >= 50)
        heard = [r for r in client.audio() if any(r.payload)]
        self.assertEqual({r.kind for r in heard}, {Kind.SLIN_16K})
        self.assertEqual([r.payload for r in heard], sent)  # nothing resampled: bit-exact
        self.assertGreater(share_at(b"".join(r.payload for r in heard), 16000, 6000), 0.95)
        self.assertEqual((call.caller_rate, call.rate, call.assistant_rate), (16000,) * 3)
        client.transport.loseConnection()
        yield call.when_ended()
        self.assertIn("caller_rate=16000 rate=16000 assistant_rate=16000", self.logs.text())

    @defer.inlineCallbacks
    def test_every_audio_kind_asterisk_defines_is_carried_at_its_rate(self) -> Any:
        calls = []
        for kind, rate in AUDIO_SAMPLE_RATES.items():
            sent = tone(10, hz=1000, rate=rate)
            ctx, client = yield self.call(sent, kind)
            calls.append((kind, rate, sent, ctx, client))
        for kind, rate, sent, _ctx, client in calls:
            yield wait_until(lambda c=client: sum(any(r.payload) for r in c.audio()) >= 10)
            heard = [r for r in client.audio() if any(r.payload)]
            self.assertEqual({r.kind for r in heard}, {kind}, hex(kind))
            self.assertEqual([r.payload for r in heard], sent, hex(kind))
            self.assertEqual(len(heard[0].payload), frame_bytes(rate))


class ChanWebSocketWidebandTests(TestCase):
    timeout = 20

    def setUp(self) -> None:
        self.daemon = start_daemon(self)
        self.logs = capture_logs(self)

    @defer.inlineCallbacks
    def call(self, fmt: str, frame_size: int) -> Any:
        ctx = yield register(self.daemon.http_port)
        client = fc.FakeChanWebSocket(fc.upgrade_request(f"/v1/talk/asterisk/ctx?ctx={ctx}"))
        yield protocol.ClientCreator(reactor, lambda: client).connectTCP(
            "127.0.0.1", self.daemon.http_port
        )
        head = yield client.handshake
        self.assertTrue(fc.head_is_101(head), head)
        client.send_text(fc.media_start_json(ctx, fmt=fmt, frame_size=frame_size))
        self.addCleanup(lambda: client.closed)
        self.addCleanup(client.close_like_asterisk)
        yield wait_until(lambda: ctx in self.daemon.bridge.calls)
        return self.daemon.bridge.calls[ctx], client

    @defer.inlineCallbacks
    def test_a_slin16_call_carries_a_6khz_tone_both_ways(self) -> Any:
        call, client = yield self.call("slin16", 640)
        self.assertEqual((call.caller_rate, call.rate), (16000, 16000))
        sent = tone(25, hz=6000, rate=16000)
        for frame in sent:
            client.send_audio(frame)
        yield wait_until(lambda: len(b"".join(client.audio())) >= 25 * 640)
        heard = b"".join(client.audio())
        self.assertEqual(heard, b"".join(sent))  # whole 640-byte frames, nothing resampled
        self.assertEqual({len(m) % 640 for m in client.audio()}, {0})
        self.assertIn("format=slin16", self.logs.text())

    @defer.inlineCallbacks
    def test_an_alaw_call_echoes(self) -> Any:
        call, client = yield self.call("alaw", 160)
        self.assertEqual((call.caller_rate, call.rate), (8000, 8000))
        sent = pcm_to_alaw(b"".join(tone(10)))
        client.send_audio(sent)
        yield wait_until(lambda: len(b"".join(client.audio())) >= len(sent))
        self.assertEqual(b"".join(client.audio()), sent)
        self.assertGreater(share_at(alaw_to_pcm(sent), 8000, 440), 0.9)

    @defer.inlineCallbacks
    def test_an_odd_length_slin_message_ends_the_call_as_a_protocol_error(self) -> Any:
        call, client = yield self.call("slin16", 640)
        client.send_audio(bytes(641))
        reason = yield call.when_ended()
        self.assertEqual(reason, "protocol-error")
        self.assertEqual(call.end_detail, "641-byte message of 16-bit slin")
        yield client.closed
        self.assertEqual(client.close_frame()[0], 1002)


class RatesThatDifferTests(TestCase):
    """A wideband caller to a μ-law 8 kHz bot: one soxr step, which filters what 8 kHz cannot
    carry (the 6 kHz tone) and keeps what it can (1 kHz)."""

    timeout = 20

    @defer.inlineCallbacks
    def test_a_16khz_caller_reaches_an_8khz_bot_through_one_resampler(self) -> Any:
        bot = FakeBot()
        self.addCleanup(bot.stop)
        daemon = start_daemon(self, assistants={"bot": {"url": bot.url}})
        ctx = yield register(daemon.http_port, assistant="bot")
        mixed = [
            (np.frombuffer(one, dtype="<i2") // 2 + np.frombuffer(six, dtype="<i2") // 2)
            .astype("<i2")
            .tobytes()
            for one, six in zip(tone(50, 1000, 16000), tone(50, 6000, 16000), strict=True)
        ]
        client = FakeAsterisk(ctx, mixed, kind=Kind.SLIN_16K)
        yield connect_audiosocket(daemon.as_port, client)
        self.addCleanup(lambda: client.closed)
        self.addCleanup(client.transport.loseConnection)
        yield wait_until(lambda: bot.streams and len(bot.streams[0].caller_audio()) >= 40 * 160)
        call = daemon.bridge.calls[ctx]
        self.assertEqual((call.caller_rate, call.rate, call.assistant_rate), (16000, 8000, 8000))
        at_bot = ulaw_to_pcm(bot.streams[0].caller_audio()[20 * 160 :])
        self.assertGreater(share_at(at_bot, 8000, 1000), 0.9)
        self.assertLess(share_at(at_bot, 8000, 2000), 0.01)  # 6 kHz would alias to 2 kHz


class LegConversionTests(TestCase):
    """A 16 kHz assistant behind 8 kHz legs: each leg converts, once each way."""

    timeout = 20

    def setUp(self) -> None:
        self.daemon = start_daemon(self)
        self.recorder = RecordingAssistant(sample_rate=16000)
        self.daemon.bridge.assistants = AssistantRegistry(default=self.recorder)

    @defer.inlineCallbacks
    def test_audiosocket_8khz_caller_and_a_16khz_assistant_that_speaks_first(self) -> Any:
        ctx = yield register(self.daemon.http_port)
        client = FakeAsterisk(ctx)
        yield connect_audiosocket(self.daemon.as_port, client)
        self.addCleanup(lambda: client.closed)
        self.addCleanup(client.transport.loseConnection)
        yield wait_until(lambda: self.recorder.sessions)
        session = self.recorder.sessions[0]
        call = session.call
        self.assertEqual((call.caller_rate, call.rate, call.frame_bytes), (None, 16000, 640))
        call.play(b"".join(tone(25, hz=1000, rate=16000)))  # a greeting before any caller audio
        yield wait_until(lambda: sum(any(r.payload) for r in client.audio()) >= 20)
        greeting = [r for r in client.audio() if any(r.payload)]
        self.assertEqual({(r.kind, len(r.payload)) for r in greeting}, {(Kind.SLIN_8K, 320)})
        self.assertGreater(share_at(b"".join(r.payload for r in greeting[2:]), 8000, 1000), 0.9)
        for frame in tone(10, hz=1000):
            client.send(encode_frame(Kind.SLIN_8K, frame))
        yield wait_until(lambda: len(session.audio) >= 10)
        self.assertEqual({len(pcm) for pcm in session.audio[1:]}, {640})
        self.assertEqual((call.caller_rate, call.rate, call.assistant_rate), (8000, 16000, 16000))
        self.assertGreater(share_at(b"".join(session.audio[2:]), 16000, 1000), 0.9)

    @defer.inlineCallbacks
    def test_chan_websocket_ulaw_caller_and_a_16khz_assistant(self) -> Any:
        ctx = yield register(self.daemon.http_port)
        client = fc.FakeChanWebSocket(fc.upgrade_request(f"/v1/talk/asterisk/ctx?ctx={ctx}"))
        yield protocol.ClientCreator(reactor, lambda: client).connectTCP(
            "127.0.0.1", self.daemon.http_port
        )
        yield client.handshake
        client.send_text(fc.media_start_json(ctx))
        self.addCleanup(lambda: client.closed)
        self.addCleanup(client.close_like_asterisk)
        yield wait_until(lambda: self.recorder.sessions)
        session = self.recorder.sessions[0]
        call = session.call
        self.assertEqual((call.caller_rate, call.rate), (8000, 16000))
        for frame in tone(10, hz=1000):
            client.send_audio(pcm_to_ulaw(frame))
        yield wait_until(lambda: len(session.audio) >= 10)
        self.assertEqual({len(pcm) for pcm in session.audio[1:]}, {640})
        call.play(b"".join(tone(10, hz=1000, rate=16000)))
        yield wait_until(lambda: len(b"".join(client.audio())) >= 8 * 160)
        self.assertEqual({len(m) % 160 for m in client.audio()}, {0})
        heard = ulaw_to_pcm(b"".join(client.audio()))
        self.assertGreater(share_at(heard[640:], 8000, 1000), 0.9)


class GreetingFirstTests(TestCase):
    timeout = 20

    @defer.inlineCallbacks
    def test_the_callers_rate_is_known_even_when_the_assistant_spoke_first(self) -> Any:
        daemon = start_daemon(self)
        recorder = RecordingAssistant(sample_rate=8000)
        daemon.bridge.assistants = AssistantRegistry(default=recorder)
        ctx = yield register(daemon.http_port)
        client = FakeAsterisk(ctx)
        yield connect_audiosocket(daemon.as_port, client)
        self.addCleanup(lambda: client.closed)
        self.addCleanup(client.transport.loseConnection)
        yield wait_until(lambda: recorder.sessions)
        call = recorder.sessions[0].call
        call.play(b"".join(tone(3)))
        yield wait_until(lambda: sum(any(r.payload) for r in client.audio()) >= 3)
        self.assertIsNone(call.caller_rate)
        client.send(encode_frame(Kind.SLIN_8K, tone(1)[0]))
        yield wait_until(lambda: recorder.sessions[0].audio)
        self.assertEqual((call.caller_rate, call.rate), (8000, 8000))
