"""Recordings: the grid alignment on a Clock, then real echo calls through the daemon, written
by the real writer thread: channels that correlate, a full disk, a slow disk, a failing leg."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import struct
import threading
import wave
from typing import Any

import numpy as np
from twisted.internet import defer
from twisted.internet.task import Clock, LoopingCall
from twisted.trial.unittest import SynchronousTestCase, TestCase

from rapida_tap.audiosocket.wire import Kind, encode_frame
from rapida_tap.config import ConfigError
from rapida_tap.contexts import CallContext, new_context_id
from rapida_tap.events.config import AssistantEvents, check_recording_name
from rapida_tap.events.recording import (
    CallRecorder,
    RecordingResult,
    interleave,
    wav_header,
)
from rapida_tap.media.audio import FRAME_BYTES, SILENCE
from rapida_tap.media.call import Call
from rapida_tap.media.pacer import Pacer
from rapida_tap.node import check_writable
from tests.support import (
    FakeAsterisk,
    capture_logs,
    connect_audiosocket,
    register,
    start_daemon,
    wait_until,
)
from tests.test_call import FakeLeg, frame
from tests.webhook_receiver import WebhookReceiver, listen, new_secret


def test_wav_header_and_interleave() -> None:
    header = wav_header(3200)
    assert len(header) == 44
    assert struct.unpack("<4sI4s", header[:12]) == (b"RIFF", 36 + 3200, b"WAVE")
    assert struct.unpack("<HHIIHH", header[20:36]) == (1, 2, 8000, 32000, 4, 16)
    assert struct.unpack("<4sI", header[36:44]) == (b"data", 3200)
    left = struct.pack("<3h", 1, -2, 300)
    right = struct.pack("<3h", -4, 5, -600)
    assert struct.unpack("<6h", interleave(left, right)) == (1, -4, -2, 5, 300, -600)


def test_recording_names_stay_inside_the_directory() -> None:
    check_recording_name("{date}/{assistant_id}-{context_id}.wav")
    for bad, says in [
        ("{context_id}.mp3", "must end with .wav"),
        ("{date}.wav", "must contain {context_id}"),
        ("../{context_id}.wav", "without '.', '..'"),
        ("/tmp/{context_id}.wav", "without '.', '..'"),
        ("{date}//{context_id}.wav", "empty parts"),
        ("{who}/{context_id}.wav", "unknown field {who}"),
        ("{context_id.__class__}.wav", "unknown field"),
        ("{context_id.wav", "recording_name:"),
    ]:
        try:
            check_recording_name(bad)
        except ConfigError as e:
            assert str(e).startswith("recording_name: "), e
            assert says in str(e), (bad, e)
        else:
            raise AssertionError(f"{bad!r} was accepted")


def test_a_recordings_directory_that_cannot_be_made_fails_at_start_up(tmp_path: Any) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    try:
        check_writable(str(blocker / "recordings"))
    except ConfigError as e:
        assert str(e).startswith("recordings_dir: cannot create "), e
    else:
        raise AssertionError("accepted")


class FakeWriter:
    """Keeps the blocks in memory; ``max_blocks`` 0 refuses them (a disk that is too slow)."""

    def __init__(self, max_blocks: int = 1000) -> None:
        self.max_blocks = max_blocks
        self.left = bytearray()
        self.right = bytearray()
        self.blocks = 0
        self.opened: list[str] = []
        self.closed: list[int] = []

    def submit_open(self, key: int, path: str, error: Any) -> None:
        self.opened.append(path)

    def submit_block(self, key: int, stereo: memoryview) -> bool:
        if self.blocks >= self.max_blocks:
            return False
        self.blocks += 1
        samples = np.frombuffer(stereo, dtype="<i2")
        self.left += samples[0::2].tobytes()
        self.right += samples[1::2].tobytes()
        return True

    def submit_close(self, key: int, done: Any) -> None:
        self.closed.append(key)
        done(RecordingResult("p.wav", len(self.left) / 16000, 44 + 2 * len(self.left), "00"))


class AlignmentTests(SynchronousTestCase):
    """Tick ``n`` of the call is frame ``n`` of both channels; gaps are silence."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.pacer = Pacer(self.clock)
        self.leg = FakeLeg()
        self.call = Call(
            CallContext(new_context_id(), "a"), self.leg, clock=self.clock, pacer=self.pacer
        )
        self.writer = FakeWriter()
        self.stopped: list[str] = []
        self.recorder = CallRecorder(
            1,
            "p.wav",
            self.writer,
            self.pacer,
            self.clock,
            self.stopped.append,  # type: ignore[arg-type]
        )
        self.call.recorder = self.recorder
        self.addCleanup(self.pacer.stop)

    def tick(self) -> None:
        self.clock.advance(0.02)

    def frames(self, data: bytes | bytearray) -> list[bytes]:
        return [bytes(data[i : i + FRAME_BYTES]) for i in range(0, len(data), FRAME_BYTES)]

    def test_gaps_are_silence_and_each_channel_keeps_its_place_on_the_grid(self) -> None:
        for tick in range(1, 41):
            self.tick()
            if tick <= 5 or 26 <= tick <= 30:
                self.call.audio_received(frame(tick))  # caller: 5 frames, a pause, 5 frames
            if tick == 12:
                self.call.audio_received(frame(12))  # a stray frame: no gap before it yet
            if tick == 2:
                self.call.play(frame(101) + frame(102) + frame(103))  # played at ticks 3-5
        self.successResultOf(self.recorder.finish())
        left, right = self.frames(self.writer.left), self.frames(self.writer.right)
        self.assertEqual(len(left), 40)
        self.assertEqual(len(right), 40)
        self.assertEqual(left[:6], [frame(t) for t in (1, 2, 3, 4, 5, 12)])
        # A pause longer than GAP (10 frames): silence up to SLACK (3 frames) behind the grid.
        self.assertEqual(left[6:23], [SILENCE] * 17)
        self.assertEqual(left[23:28], [frame(t) for t in range(26, 31)])
        self.assertEqual(left[28:], [SILENCE] * 12)
        self.assertEqual(right[:2], [SILENCE] * 2)
        self.assertEqual(right[2:5], [frame(101), frame(102), frame(103)])
        self.assertEqual(right[5:], [SILENCE] * 35)
        self.assertEqual(self.writer.closed, [1])

    def test_a_long_call_is_handed_over_once_a_second_without_losing_its_place(self) -> None:
        for tick in range(1, 161):
            self.call.play(frame(tick))
            self.tick()
            self.call.audio_received(frame(1000 + tick))
            if tick == 100:
                self.assertEqual(self.writer.blocks, 2)  # the rest waits in memory
        self.successResultOf(self.recorder.finish())
        self.assertEqual(self.frames(self.writer.right), [frame(t) for t in range(1, 161)])
        self.assertEqual(self.frames(self.writer.left), [frame(1000 + t) for t in range(1, 161)])

    def test_a_stall_made_up_by_a_burst_stays_contiguous(self) -> None:
        self.tick()
        self.call.audio_received(frame(1))
        self.clock.advance(0.1)  # 4 ticks missed: the pacer's position moves on by 5
        for n in range(2, 7):  # the caller's frames of the stall arrive at once
            self.call.audio_received(frame(n))
        self.call.play(frame(100))
        self.tick()
        self.successResultOf(self.recorder.finish())
        right = self.frames(self.writer.right)
        self.assertEqual(self.pacer.position, 7)
        self.assertEqual(right[:3], [SILENCE, SILENCE, frame(100)])  # what the ticks sent
        self.assertEqual(right[3:], [SILENCE] * 4)  # then the call's length on the grid
        self.assertEqual(self.frames(self.writer.left), [frame(n) for n in range(1, 7)] + [SILENCE])

    def test_a_disk_too_slow_stops_the_recording_once_and_the_call_goes_on(self) -> None:
        self.writer.max_blocks = 0
        for _ in range(120):
            self.call.play(frame(1))
            self.tick()
        self.assertEqual(len(self.stopped), 1)
        self.assertIn("the disk is too slow", self.stopped[0])
        self.assertIsNone(self.call.end_reason)
        result = self.successResultOf(self.recorder.finish())
        self.assertFalse(result.complete)
        self.assertIn("too slow", result.error)


# --- real calls, the real writer thread -------------------------------------------------------


def noise(frames: int, seed: int) -> list[bytes]:
    """Speech-like level random audio; unlike a tone, it matches itself at one lag only."""
    rng = random.Random(seed)
    return [
        struct.pack("<160h", *(rng.randint(-8000, 8000) for _ in range(160))) for _ in range(frames)
    ]


def correlation(channel: np.ndarray, reference: bytes) -> float:
    """Pearson correlation of ``reference`` with ``channel`` at their best alignment."""
    ref = np.frombuffer(reference, dtype="<i2").astype(np.float64)
    sig = channel.astype(np.float64)
    if len(sig) < len(ref):
        sig = np.concatenate([sig, np.zeros(len(ref) - len(sig))])
    lag = int(np.argmax(np.correlate(sig, ref, "valid")))
    return float(np.corrcoef(sig[lag : lag + len(ref)], ref)[0, 1])


class SteadyCaller(FakeAsterisk):
    """A caller on a drift-free 20 ms clock, as Asterisk is (frames missed by a stall are sent
    at once, as Asterisk's socket would deliver them)."""

    def _next(self, i: int) -> None:
        if i:
            return
        self._sent = 0
        self._loop = LoopingCall.withCount(self._send)
        self._loop.start(self.interval, now=False).addErrback(lambda _: None)

    def _send(self, count: int) -> None:
        if not self.connected_:
            return
        for _ in range(count):
            if self._sent >= len(self.frames):
                if self._loop.running:
                    self._loop.stop()
                if self.hangup_after:
                    self.transport.loseConnection()
                if not self.sent_all.called:
                    self.sent_all.callback(None)
                return
            self.transport.write(encode_frame(self.kind, self.frames[self._sent]))
            self._sent += 1

    def connectionLost(self, reason: Any = None) -> None:
        loop = getattr(self, "_loop", None)
        if loop is not None and loop.running:
            loop.stop()
        super().connectionLost(reason)


class RecordedCallTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.dir = self.mktemp()
        self.secret = new_secret()
        os.environ["RAPIDA_TEST_RECORDING_SECRET"] = self.secret
        self.addCleanup(os.environ.pop, "RAPIDA_TEST_RECORDING_SECRET", None)
        self.receiver = WebhookReceiver(self.secret)
        port = listen(self.receiver)
        self.addCleanup(port.stopListening)
        endpoint = {
            "url": f"http://127.0.0.1:{port.getHost().port}/",
            "secret_env": "RAPIDA_TEST_RECORDING_SECRET",
            "events": ["recording.completed", "call.ended"],
        }
        self.daemon = start_daemon(
            self,
            webhooks={"test": endpoint},
            assistants={"default": {"url": "echo", "record": True}},
            recordings_dir=self.dir,
        )
        self.logs = capture_logs(self)

    @defer.inlineCallbacks
    def call(self, frames: list[bytes], hangup: bool = True) -> Any:
        ctx = yield register(self.daemon.http_port)
        client = SteadyCaller(ctx, frames, hangup_after=hangup)
        yield connect_audiosocket(self.daemon.as_port, client)
        return ctx, client

    def recordings(self, outcome: str) -> float | None:
        registry = self.daemon.metrics.registry
        return registry.get_sample_value("rapida_recordings_total", {"outcome": outcome})

    def completed(self) -> list[Any]:
        return self.receiver.of_type("recording.completed")

    @defer.inlineCallbacks
    def test_an_echo_call_is_recorded_with_both_channels_in_place(self) -> Any:
        sent = noise(100, seed=1)
        ctx, client = yield self.call(sent)
        yield client.closed
        yield wait_until(lambda: len(self.completed()) == 1, timeout=10)
        (done,) = self.completed()
        data = done.data
        self.assertEqual(data["context_id"], ctx)
        self.assertTrue(data["complete"])
        self.assertEqual(data["error"], "")
        path = data["path"]
        self.assertTrue(path.startswith(self.dir + os.sep))
        self.assertTrue(path.endswith(f"{ctx}.wav"))
        with open(path, "rb") as f:
            raw = f.read()
        self.assertEqual(data["size"], len(raw))
        self.assertEqual(data["sha256"], hashlib.sha256(raw).hexdigest())
        with wave.open(path, "rb") as w:
            self.assertEqual((w.getnchannels(), w.getsampwidth(), w.getframerate()), (2, 2, 8000))
            samples = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").reshape(-1, 2)
        self.assertAlmostEqual(data["duration_s"], len(samples) / 8000, places=3)
        self.assertGreaterEqual(len(samples), 100 * 160)

        caller = correlation(samples[:, 0], b"".join(sent))
        played = b"".join(r.payload for r in client.received if r.kind == Kind.SLIN_8K)
        heard = correlation(samples[:, 1], played)
        self.assertGreaterEqual(caller, 0.95)
        self.assertGreaterEqual(heard, 0.95)
        self.assertEqual(self.recordings("completed"), 1)

    @defer.inlineCallbacks
    def test_a_full_disk_stops_the_recording_and_the_call_goes_on(self) -> Any:
        # /dev/full: the kernel answers every write with ENOSPC, as a full file system does.
        self.daemon.events.writer.opener = lambda path: open("/dev/full", "wb")
        ctx, client = yield self.call(noise(150, seed=2), hangup=False)
        yield wait_until(lambda: "recording stopped" in self.logs.text(), timeout=10)
        call = self.daemon.bridge.calls[ctx]
        self.assertIsNone(call.recorder)
        heard = len(client.received)
        yield wait_until(lambda: len(client.received) > heard + 10)  # still paced
        yield client.sent_all
        self.assertIn(ctx, self.daemon.bridge.calls)
        client.transport.loseConnection()
        yield client.closed
        yield wait_until(lambda: len(self.completed()) == 1, timeout=10)
        (done,) = self.completed()
        self.assertFalse(done.data["complete"])
        self.assertEqual(done.data["error"], "the disk is full")
        (ended,) = self.receiver.of_type("call.ended")
        self.assertEqual(ended.data["end_reason"], "caller-hangup")
        self.assertEqual(ended.data["quality"]["frames_in"], 150)
        lines = [e for e in self.logs.events if "recording stopped" in str(e.get("log_format"))]
        self.assertEqual(len(lines), 1)
        self.assertEqual(self.recordings("stopped"), 1)
        self.assertIsNone(self.recordings("completed"))

    @defer.inlineCallbacks
    def test_a_slow_disk_stops_the_recording_and_the_call_goes_on(self) -> Any:
        writer = self.daemon.events.writer
        release = threading.Event()
        self.addCleanup(release.set)

        def stuck(path: str) -> Any:
            release.wait(20)  # a disk that does not answer: the writer thread waits here
            return open(os.devnull, "wb")

        writer.opener = stuck
        writer.max_blocks = 1
        ctx, client = yield self.call(noise(150, seed=3), hangup=False)
        yield wait_until(lambda: "recording stopped" in self.logs.text(), timeout=10)
        self.assertIn("the disk is too slow", self.logs.text())
        self.assertIn(ctx, self.daemon.bridge.calls)
        yield client.sent_all
        release.set()
        client.transport.loseConnection()
        yield client.closed
        yield wait_until(lambda: len(self.completed()) == 1, timeout=10)
        self.assertIn("too slow", self.completed()[0].data["error"])

    @defer.inlineCallbacks
    def test_a_failing_leg_still_finalises_the_recording(self) -> Any:
        ctx, client = yield self.call(noise(25, seed=4), hangup=False)
        yield client.sent_all
        client.send(encode_frame(Kind.UUID, bytes(16)))  # a second UUID: a protocol error
        yield client.closed
        yield wait_until(lambda: len(self.completed()) == 1, timeout=10)
        (done,) = self.completed()
        self.assertTrue(done.data["complete"])
        with wave.open(done.data["path"], "rb") as w:
            self.assertGreaterEqual(w.getnframes(), 25 * 160)
        (ended,) = self.receiver.of_type("call.ended")
        self.assertEqual(ended.data["end_reason"], "protocol-error")

    @defer.inlineCallbacks
    def test_only_assistants_that_opt_in_are_recorded(self) -> Any:
        events = self.daemon.events
        events.spec = dataclasses.replace(events.spec, default=AssistantEvents())  # no record
        ctx, client = yield self.call(noise(5, seed=5))
        yield client.closed
        yield wait_until(lambda: len(self.receiver.of_type("call.ended")) == 1)
        self.assertEqual(self.completed(), [])
        self.assertEqual(os.listdir(self.dir), [])


def test_a_hostile_caller_id_cannot_leave_the_recordings_directory() -> None:
    from types import SimpleNamespace

    from rapida_tap.events.config import EventsSpec
    from rapida_tap.events.publisher import CallEvents
    from tests.test_quality import SentEvents

    clock = Clock()
    bridge = SimpleNamespace(call_started=[], call_ended=[], end_report=None, pacer=None)
    events = CallEvents(
        bridge,  # type: ignore[arg-type]
        EventsSpec(),
        clock=clock,
        sender=SentEvents(),  # type: ignore[arg-type]
        recordings_dir="/rec",
        recording_name="{date}/{caller}/{assistant_id}-{context_id}.wav",
    )
    for caller, expected in [
        ("../../etc/passwd", ".._.._etc_passwd"),  # one name, not a way up
        ("..", "__"),
        ("", "unknown"),
        ("+49 30 1234", "+49_30_1234"),
    ]:
        call = SimpleNamespace(
            context=CallContext("c1", "a/b", caller),
            started_at=0.0,
            leg=SimpleNamespace(transport_name="audiosocket"),
        )
        path = events.recording_path(call)  # type: ignore[arg-type]
        assert path == f"/rec/1970-01-01/{expected}/a_b-c1.wav", path
