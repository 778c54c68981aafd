"""Real calls over TCP on 127.0.0.1: register over HTTP, connect an AudioSocket, hear the echo."""

from __future__ import annotations

import json
import uuid

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from rapida_tap.audiosocket.wire import AudioSocketDecoder, Kind, encode_frame
from rapida_tap.reasons import EndReason as reasons
from tests.captures import FIXTURES
from tests.support import (
    FakeAsterisk,
    capture_logs,
    connect_audiosocket,
    register,
    start_daemon,
    tone,
    wait_until,
)

SILENCE_8K = bytes(320)


class AudioSocketCallTests(TestCase):
    timeout = 20

    def setUp(self) -> None:
        self.daemon = start_daemon(self)
        self.logs = capture_logs(self)

    @defer.inlineCallbacks
    def call(self, frames, **kw):
        ctx = yield register(self.daemon.http_port)
        client = FakeAsterisk(ctx, frames, **kw)
        yield connect_audiosocket(self.daemon.as_port, client)
        return ctx, client

    @defer.inlineCallbacks
    def test_two_seconds_of_tone_come_back_paced_then_caller_hangs_up(self):
        sent = tone(100)
        ctx, client = yield self.call(sent)
        yield client.sent_all
        yield wait_until(lambda: sum(r.payload != SILENCE_8K for r in client.received) >= 100)
        audio = [r for r in client.received if r.payload != SILENCE_8K]
        self.assertEqual([r.payload for r in audio], sent)  # every frame, in order, bit-exact
        self.assertTrue(all(r.kind == Kind.SLIN_8K for r in client.received))
        # paced: 100 frames of echo took about 2 s to arrive (not a burst)
        self.assertGreater(audio[-1].at - audio[0].at, 1.8)
        call = self.daemon.bridge.calls[ctx]
        client.transport.loseConnection()
        reason = yield call.when_ended()
        self.assertEqual(reason, reasons.CALLER_HANGUP)
        self.assertEqual(self.daemon.bridge.calls, {})
        self.assertEqual(len(self.daemon.bridge.pacer), 0)
        self.assertIn(f"call {ctx} ended: caller-hangup", self.logs.text())
        self.assertIn(f"call {ctx} started", self.logs.text())

    @defer.inlineCallbacks
    def test_the_daemon_keeps_sending_through_the_callers_silence(self):
        ctx, client = yield self.call(tone(5))
        yield wait_until(lambda: len(client.received) >= 40)  # 0.8 s, caller sent only 0.1 s
        self.assertEqual(sum(r.payload != SILENCE_8K for r in client.received), 5)
        client.transport.loseConnection()
        yield client.closed

    @defer.inlineCallbacks
    def test_assistant_hangup_sends_the_hangup_frame(self):
        ctx, client = yield self.call([])
        yield wait_until(lambda: ctx in self.daemon.bridge.calls)
        client.send(encode_frame(Kind.DTMF, b"#"))  # the echo assistant hangs up on '#'
        yield client.closed
        self.assertEqual(client.received[-1].kind, Kind.HANGUP)
        self.assertIn(f"call {ctx} ended: assistant-hangup", self.logs.text())
        self.assertEqual(self.daemon.bridge.calls, {})

    @defer.inlineCallbacks
    def test_shutdown_ends_calls_with_the_hangup_frame(self):
        ctx, client = yield self.call([])
        yield wait_until(lambda: ctx in self.daemon.bridge.calls)
        self.daemon.bridge.end_all(reasons.SHUTDOWN)
        yield client.closed
        self.assertEqual(client.received[-1].kind, Kind.HANGUP)
        self.assertIn(f"call {ctx} ended: shutdown", self.logs.text())

    @defer.inlineCallbacks
    def test_hangup_frame_from_asterisk_ends_the_call(self):
        ctx, client = yield self.call([])
        yield wait_until(lambda: ctx in self.daemon.bridge.calls)
        client.send(encode_frame(Kind.HANGUP))
        yield client.closed
        self.assertIn(f"call {ctx} ended: caller-hangup", self.logs.text())

    @defer.inlineCallbacks
    def test_slin16_call_is_resampled_both_ways(self):
        sent = tone(50, hz=440, rate=16000)
        ctx, client = yield self.call(sent, kind=Kind.SLIN_16K)
        yield client.sent_all
        yield wait_until(
            lambda: sum(r.kind == Kind.SLIN_16K and any(r.payload) for r in client.received) >= 48
        )
        loud = [r for r in client.received if r.kind == Kind.SLIN_16K and any(r.payload)]
        total = sum(len(r.payload) for r in loud)
        self.assertGreater(total, 48 * 600)  # about 640 bytes per 20 ms at 16 kHz
        client.transport.loseConnection()
        yield client.closed

    @defer.inlineCallbacks
    def test_fifty_concurrent_calls(self):
        calls = []
        for _ in range(50):
            calls.append((yield self.call(tone(25))))
        yield defer.gatherResults([c.sent_all for _, c in calls])
        yield wait_until(
            lambda: all(sum(r.payload != SILENCE_8K for r in c.received) >= 25 for _, c in calls)
        )
        for _, client in calls:
            audio = [r.payload for r in client.received if r.payload != SILENCE_8K]
            self.assertEqual(audio, tone(25))
        self.assertEqual(len(self.daemon.bridge.calls), 50)
        for _, client in calls:
            client.transport.loseConnection()
        yield defer.gatherResults([c.closed for _, c in calls])
        yield wait_until(lambda: not self.daemon.bridge.calls)
        self.assertEqual(len(self.daemon.bridge.pacer), 0)


class FixtureReplayTests(TestCase):
    """Replay Asterisk's recorded byte streams, with the test's own context id patched in."""

    timeout = 30

    def setUp(self) -> None:
        self.daemon = start_daemon(self)
        self.logs = capture_logs(self)

    def frames_of(self, name: str) -> list[tuple[int, bytes, float]]:
        data = (FIXTURES / f"{name}.bin").read_bytes()
        meta = json.loads((FIXTURES / f"{name}.json").read_text())
        frames = AudioSocketDecoder().feed(data)
        times = [f["t_ms"] / 1000 for f in meta["frame_list"]]
        return [(k, p, t) for (k, p), t in zip(frames, times, strict=True)]

    @defer.inlineCallbacks
    def replay(self, name: str, speed: float = 4.0):
        ctx = yield register(self.daemon.http_port)
        frames = self.frames_of(name)
        client = FakeAsterisk(None)
        yield connect_audiosocket(self.daemon.as_port, client)
        start = reactor.seconds()
        for kind, payload, t in frames:
            if kind == Kind.UUID:
                payload = uuid.UUID(ctx).bytes
            delay = start + t / speed - reactor.seconds()
            if delay > 0:
                yield _later(delay)
            if not client.connected_:
                break
            client.send(encode_frame(kind, payload))
        return ctx, client, frames

    @defer.inlineCallbacks
    def test_recorded_call_with_dtmf_then_eof(self):
        ctx, client, frames = yield self.replay("audiosocket-call")
        call = self.daemon.bridge.calls[ctx]
        yield wait_until(lambda: call.frames_out >= 124)
        self.assertEqual(call.session.digits, ["1", "2", "3"])
        echoed = [r.payload for r in client.received if any(r.payload)]
        sent = [p for k, p, _ in frames if k == Kind.SLIN_8K and any(p)]
        self.assertEqual(echoed[: len(sent) - 1], sent[:-1])  # the short last frame is padded
        client.transport.loseConnection()  # Asterisk's EOF: no 0x00 ever comes
        reason = yield call.when_ended()
        self.assertEqual(reason, reasons.CALLER_HANGUP)

    @defer.inlineCallbacks
    def test_recorded_call_where_the_daemon_hangs_up_on_hash(self):
        ctx, client, frames = yield self.replay("audiosocket-daemon-hangup")
        yield client.closed
        self.assertEqual(client.received[-1].kind, Kind.HANGUP)
        self.assertIn(f"call {ctx} ended: assistant-hangup", self.logs.text())

    @defer.inlineCallbacks
    def test_recorded_slin16_call(self):
        ctx, client, frames = yield self.replay("audiosocket-slin16")
        call = self.daemon.bridge.calls[ctx]
        yield wait_until(lambda: call.frames_out >= 50)
        self.assertTrue(any(r.kind == Kind.SLIN_16K for r in client.received))
        client.transport.loseConnection()
        yield call.when_ended()


def _later(seconds: float) -> defer.Deferred[None]:
    d: defer.Deferred[None] = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d
