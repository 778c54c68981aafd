"""The upstream bot session on a task.Clock: exact JSON, pacing, mark timing, barge-in, endings."""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

from twisted.internet import defer, task
from twisted.internet.error import ConnectionRefusedError
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from rapida_tap.assistants.bot_client import UpstreamAssistant
from rapida_tap.assistants.config import BotSpec
from rapida_tap.assistants.dialects import AudioFormat
from rapida_tap.assistants.upstream import (
    BotTimeout,
    BotUnreachable,
    CallEndedWhileConnecting,
    UpstreamSession,
    custom_parameters,
    stream_sids,
)
from rapida_tap.contexts import CallContext
from rapida_tap.interfaces import ICallLeg
from rapida_tap.media.audio import FRAME_BYTES
from rapida_tap.media.call import Call
from rapida_tap.media.codec import pcm_to_ulaw, ulaw_to_pcm
from rapida_tap.media.pacer import Pacer
from rapida_tap.reasons import EndReason

CTX = "5f0c1e2d-3b4a-4c5d-8e6f-7a8b9c0d1e2f"
SID = "MZ5f0c1e2d3b4a4c5d8e6f7a8b9c0d1e2f"
CALL_SID = "CA5f0c1e2d3b4a4c5d8e6f7a8b9c0d1e2f"
TICK = 0.02


@implementer(ICallLeg)
class FakeLeg:
    """Plays on receipt, like AudioSocket: a mark is played as soon as it is written."""

    transport_name = "audiosocket"

    def __init__(self, acknowledges_marks: bool = True) -> None:
        self.call: Call | None = None
        self.audio: list[bytes] = []
        self.silence = 0
        self.clears = 0
        self.marks: list[str] = []
        self.hangups: list[str] = []
        self.acknowledges_marks = acknowledges_marks

    def send_audio(self, frame: bytes) -> bool:
        self.audio.append(frame)
        return True

    def send_silence(self) -> None:
        self.silence += 1

    def send_clear(self) -> None:
        self.clears += 1

    def send_mark(self, name: str) -> None:
        self.marks.append(name)
        if self.acknowledges_marks and self.call is not None:
            self.call.mark_played(name)

    def hangup(self, reason: str) -> None:
        self.hangups.append(reason)


def tone_ulaw(frames: int) -> bytes:
    """``frames`` 20 ms of a ramp, μ-law, every frame different."""
    pcm = b"".join(
        struct.pack("<160h", *[((f * 160 + i) * 37) % 16000 - 8000 for i in range(160)])
        for f in range(frames)
    )
    return pcm_to_ulaw(pcm)


def media(ulaw: bytes) -> str:
    payload = base64.b64encode(ulaw).decode()
    return json.dumps({"event": "media", "streamSid": SID, "media": {"payload": payload}})


def mark(name: str) -> str:
    return json.dumps({"event": "mark", "streamSid": SID, "mark": {"name": name}})


CLEAR = json.dumps({"event": "clear", "streamSid": SID})


class Harness:
    def __init__(self, on_failure: str = "hangup", leg: FakeLeg | None = None, **spec: Any):
        self.clock = task.Clock()
        self.pacer = Pacer(self.clock)
        self.leg = leg or FakeLeg()
        context = CallContext(
            context_id=CTX,
            assistant_id="123456789",
            caller="+4930123456",
            variables={"campaign": "spring"},
        )
        self.spec = BotSpec(url="wss://bot.example/stream", on_failure=on_failure, **spec)
        self.call = Call(
            context,
            self.leg,
            clock=self.clock,
            pacer=self.pacer,
            idle_timeout=0,
            rate=self.spec.audio.rate,
        )
        self.leg.call = self.call
        self.sent: list[dict[str, Any]] = []
        self.closes: list[tuple[int, str]] = []
        self.ended: list[str] = []
        self.call.when_ended().addCallback(self.ended.append)
        self.session = UpstreamSession(self.call, self.spec, self._send, self._close, self.clock)
        self.session.start()
        self.call.attach(self.session, self.spec.name)

    def _send(self, text: str) -> None:
        assert isinstance(text, str)
        self.sent.append(json.loads(text))

    def _close(self, code: int, reason: str) -> None:
        self.closes.append((code, reason))

    def bot(self, *messages: str | bytes) -> None:
        for m in messages:
            self.session.message_received(m)

    def ticks(self, n: int) -> None:
        for _ in range(n):
            self.clock.advance(TICK)

    def events(self) -> list[str]:
        return [m["event"] for m in self.sent]

    def echoes(self) -> list[str]:
        return [m["mark"]["name"] for m in self.sent if m["event"] == "mark"]


# --- daemon -> bot: the exact JSON -------------------------------------------------------


def test_stream_sids_follow_the_context_id() -> None:
    assert stream_sids(CTX) == (SID, CALL_SID)


def test_connected_and_start_exact() -> None:
    h = Harness(parameters={"language": "de"})
    assert h.sent == [
        {"event": "connected", "protocol": "Call", "version": "1.0.0"},
        {
            "event": "start",
            "sequenceNumber": "1",
            "start": {
                "accountSid": "rapida-asterisk",
                "streamSid": SID,
                "callSid": CALL_SID,
                "tracks": ["inbound"],
                "customParameters": {
                    "campaign": "spring",
                    "language": "de",
                    "context_id": CTX,
                    "assistant_id": "123456789",
                    "caller": "+4930123456",
                    "from_number": "+4930123456",
                    "direction": "inbound",
                    "transport": "audiosocket",
                },
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            },
            "streamSid": SID,
        },
    ]


def test_daemon_parameters_win_over_variables() -> None:
    h = Harness()
    h.call.context.variables["caller"] = "spoofed"
    assert custom_parameters(h.call, h.spec)["caller"] == "+4930123456"


def test_caller_audio_is_media_with_audio_time_stamps() -> None:
    h = Harness()
    frames = [bytes(range(256))[: FRAME_BYTES // 2] * 2, b"\x10\x00" * 108, b"\x20\x00" * 160]
    for pcm in frames:
        h.call.audio_received(pcm)
    media_sent = h.sent[2:]
    assert [m["media"]["timestamp"] for m in media_sent] == ["0", "20", "33"]
    assert [m["media"]["chunk"] for m in media_sent] == ["1", "2", "3"]
    assert [m["sequenceNumber"] for m in media_sent] == ["2", "3", "4"]
    assert media_sent[1] == {
        "event": "media",
        "sequenceNumber": "3",
        "media": {
            "track": "inbound",
            "chunk": "2",
            "timestamp": "20",
            "payload": base64.b64encode(pcm_to_ulaw(frames[1])).decode(),
        },
        "streamSid": SID,
    }


def test_dtmf_exact_and_bad_digits_dropped() -> None:
    h = Harness()
    h.call.dtmf_received("5")
    h.call.dtmf_received("x")
    h.call.dtmf_received("D")
    assert h.sent[2:] == [
        {
            "event": "dtmf",
            "sequenceNumber": "2",
            "streamSid": SID,
            "dtmf": {"track": "inbound_track", "digit": "5"},
        },
        {
            "event": "dtmf",
            "sequenceNumber": "3",
            "streamSid": SID,
            "dtmf": {"track": "inbound_track", "digit": "D"},
        },
    ]


# --- bot -> daemon: pacing, marks, barge-in ----------------------------------------------


def test_a_five_second_burst_plays_one_frame_per_tick() -> None:
    h = Harness()
    ulaw = tone_ulaw(250)
    h.bot(media(ulaw))
    assert h.leg.audio == []
    for n in range(1, 251):
        h.ticks(1)
        assert len(h.leg.audio) == n
    h.ticks(1)
    assert len(h.leg.audio) == 250 and h.leg.silence == 1
    assert b"".join(h.leg.audio) == ulaw_to_pcm(ulaw)


def test_odd_sized_bot_media_is_joined_into_frames() -> None:
    h = Harness()
    ulaw = tone_ulaw(3)
    for i in range(0, len(ulaw), 77):
        h.bot(media(ulaw[i : i + 77]))
    h.ticks(3)
    assert b"".join(h.leg.audio) == ulaw_to_pcm(ulaw)


def test_mark_is_echoed_when_its_audio_has_played_not_when_queued() -> None:
    h = Harness()
    h.bot(media(tone_ulaw(50)), mark("reply-1"), media(tone_ulaw(10)), mark("reply-2"))
    h.ticks(49)
    assert h.echoes() == []
    h.ticks(1)
    assert h.echoes() == ["reply-1"]
    h.ticks(9)
    assert h.echoes() == ["reply-1"]
    h.ticks(1)
    assert h.echoes() == ["reply-1", "reply-2"]
    assert h.sent[-1] == {
        "event": "mark",
        "sequenceNumber": "3",
        "streamSid": SID,
        "mark": {"name": "reply-2"},
    }


def test_mark_with_nothing_queued_is_echoed_at_once() -> None:
    h = Harness()
    h.bot(mark("idle"))
    assert h.echoes() == ["idle"]


def test_clear_drops_the_queue_at_once_and_echoes_pending_marks_in_order() -> None:
    h = Harness()
    h.bot(media(tone_ulaw(250)), mark("a"), media(tone_ulaw(50)), mark("b"))
    h.ticks(10)
    h.bot(CLEAR)
    assert h.leg.clears == 1
    assert h.echoes() == ["a", "b"]
    assert h.call.queued_frames == 0
    h.ticks(1)
    assert len(h.leg.audio) == 10 and h.leg.silence == 1
    h.ticks(300)
    assert h.echoes() == ["a", "b"]  # exactly once each


def test_same_mark_name_twice_is_echoed_twice() -> None:
    h = Harness()
    h.bot(media(tone_ulaw(1)), mark("chunk"), media(tone_ulaw(1)), mark("chunk"))
    h.ticks(2)
    assert h.echoes() == ["chunk", "chunk"]


def test_a_mark_reported_twice_by_a_leg_is_echoed_once() -> None:
    h = Harness()
    h.bot(mark("m"))
    h.session.mark_played("m")
    h.session.mark_played("never-sent")
    assert h.echoes() == ["m"]


def test_barge_in_then_new_audio_plays() -> None:
    h = Harness()
    h.bot(media(tone_ulaw(100)))
    h.ticks(5)
    h.bot(CLEAR, media(tone_ulaw(2)), mark("after"))
    h.ticks(2)
    assert len(h.leg.audio) == 7 and h.echoes() == ["after"]


def test_bad_bot_messages_are_dropped_and_the_call_goes_on() -> None:
    h = Harness()
    h.bot(
        "not json",
        b"\xff\xfe",
        json.dumps({"event": "media", "media": {"payload": "***"}}),
        json.dumps({"event": "mark", "mark": {}}),
        json.dumps({"event": "transcript", "text": "hi"}),
        media(tone_ulaw(1)).encode(),  # binary frame, still JSON
    )
    assert h.session.bad_messages == 4
    assert h.session.other_events == 1
    h.ticks(1)
    assert len(h.leg.audio) == 1
    assert h.ended == []


def test_empty_media_plays_nothing() -> None:
    h = Harness()
    h.bot(json.dumps({"event": "media", "media": {"payload": ""}}))
    h.ticks(1)
    assert h.leg.audio == [] and h.call.underruns == 0


# --- endings ------------------------------------------------------------------------------


def test_caller_hangup_sends_stop_then_closes_once() -> None:
    h = Harness()
    h.call.end(EndReason.CALLER_HANGUP)
    assert h.sent[-1] == {
        "event": "stop",
        "sequenceNumber": "2",
        "stop": {"accountSid": "rapida-asterisk", "callSid": CALL_SID},
        "streamSid": SID,
    }
    assert h.closes == [(1000, "call ended")]
    h.session.close(EndReason.CALLER_HANGUP)
    h.session.bot_closed(True, 1000, "bye")
    h.bot(media(tone_ulaw(1)))
    h.session.audio_received(b"\0\0")
    assert h.closes == [(1000, "call ended")] and h.events()[-1] == "stop"


def test_bot_hangup_plays_its_queued_goodbye_first() -> None:
    h = Harness()
    h.bot(media(tone_ulaw(25)), mark("bye"))
    h.session.bot_closed(True, 1000, "done")
    h.ticks(24)
    assert h.ended == []
    h.ticks(1)
    assert len(h.leg.audio) == 25
    assert h.ended == [EndReason.ASSISTANT_HANGUP]
    assert h.leg.hangups == [EndReason.ASSISTANT_HANGUP]
    assert "bot closed the stream (1000 'done')" in h.call.end_detail
    assert "stop" not in h.events() and h.closes == []  # the bot is gone already
    assert len(h.pacer) == 0 and h.clock.getDelayedCalls() == []


def test_bot_hangup_with_nothing_queued_ends_at_once() -> None:
    h = Harness()
    h.session.bot_closed(True, None, None)
    assert h.ended == [EndReason.ASSISTANT_HANGUP]
    assert h.clock.getDelayedCalls() == []


def test_bot_hangup_drain_is_capped_when_the_leg_never_reports_marks() -> None:
    h = Harness(leg=FakeLeg(acknowledges_marks=False))
    h.bot(media(tone_ulaw(10)))
    h.session.bot_closed(True, 1001, "going away")
    h.ticks(10)
    assert h.ended == []
    h.clock.advance(2.0 + 0.02)
    assert h.ended == [EndReason.ASSISTANT_HANGUP]
    assert h.clock.getDelayedCalls() == []


def test_caller_hangs_up_while_the_goodbye_drains() -> None:
    """The bot hung up first: that stays the reason, however the race goes."""
    h = Harness()
    h.bot(media(tone_ulaw(50)))
    h.session.bot_closed(True, 1000, "")
    h.ticks(5)
    h.call.end(EndReason.CALLER_HANGUP)
    assert h.ended == [EndReason.ASSISTANT_HANGUP]
    assert h.call.end_detail == "bot closed the stream (1000)"
    assert h.clock.getDelayedCalls() == []


def test_bot_dies_mid_call_ends_the_call_as_failed() -> None:
    h = Harness()
    h.bot(media(tone_ulaw(50)))
    h.session.bot_closed(False, 1006, "peer dropped the TCP connection")
    assert h.ended == [EndReason.ASSISTANT_FAILED]
    assert h.call.end_detail == (
        "bot wss://bot.example/stream connection lost: peer dropped the TCP connection"
    )
    assert h.leg.hangups == [EndReason.ASSISTANT_FAILED]


def test_bot_error_close_code_is_a_failure() -> None:
    h = Harness()
    h.session.bot_closed(True, 1011, "internal error")
    assert h.ended == [EndReason.ASSISTANT_FAILED]
    assert "closed with code 1011 'internal error'" in h.call.end_detail


def test_on_failure_continue_hands_the_call_back() -> None:
    h = Harness(on_failure="continue")
    h.session.bot_closed(False, 1006, None)
    assert h.ended == [EndReason.ASSISTANT_HANGUP]
    assert h.call.end_detail == (
        "bot wss://bot.example/stream connection lost: no close handshake; on_failure=continue"
    )


# --- connecting, on a Clock ---------------------------------------------------------------


class NeverConnects:
    def __init__(self) -> None:
        self.cancelled = False

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        def cancel(d: defer.Deferred[Any]) -> None:
            self.cancelled = True

        return defer.Deferred(cancel)


class Refuses:
    def connect(self, factory: Any) -> defer.Deferred[Any]:
        return defer.fail(ConnectionRefusedError("Connection refused"))


class ConnectHarness(SynchronousTestCase):
    def make(self, endpoint: Any, on_failure: str = "hangup") -> tuple[Call, defer.Deferred[Any]]:
        self.clock = task.Clock()
        self.leg = FakeLeg()
        call = Call(
            CallContext(context_id=CTX, assistant_id="a"),
            self.leg,
            clock=self.clock,
            pacer=Pacer(self.clock),
            idle_timeout=0,
        )
        spec = BotSpec(url="ws://127.0.0.1:9/stream", connect_timeout=3.0, on_failure=on_failure)
        assistant = UpstreamAssistant(spec, self.clock, endpoint_factory=lambda: endpoint)
        return call, assistant.connect(call)

    def test_connect_timeout(self) -> None:
        endpoint = NeverConnects()
        call, d = self.make(endpoint)
        self.clock.advance(2.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        failure = self.failureResultOf(d, BotTimeout)
        self.assertEqual(str(failure.value), "bot ws://127.0.0.1:9/stream: not connected within 3s")
        self.assertTrue(endpoint.cancelled)
        self.assertFalse(call.is_ended)  # the bridge ends it, as assistant-failed
        call.end(EndReason.CALLER_HANGUP)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_unreachable(self) -> None:
        call, d = self.make(Refuses())
        failure = self.failureResultOf(d, BotUnreachable)
        self.assertIn("bot ws://127.0.0.1:9/stream: Connection was refused", str(failure.value))
        call.end(EndReason.ASSISTANT_FAILED)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_unreachable_with_on_failure_continue_hands_back(self) -> None:
        call, d = self.make(Refuses(), on_failure="continue")
        self.failureResultOf(d, BotUnreachable)
        self.assertEqual(call.end_reason, EndReason.ASSISTANT_HANGUP)
        self.assertIn("on_failure=continue", call.end_detail)

    def test_caller_hangs_up_while_connecting(self) -> None:
        endpoint = NeverConnects()
        call, d = self.make(endpoint)
        call.end(EndReason.CALLER_HANGUP)
        self.failureResultOf(d, CallEndedWhileConnecting)
        self.assertTrue(endpoint.cancelled)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.leg.hangups, [EndReason.CALLER_HANGUP])


# --- other dialects through the same session ---------------------------------------------


def plivo_play(pcm_or_ulaw: bytes, content_type: str = "audio/x-mulaw", rate: int = 8000) -> str:
    payload = base64.b64encode(pcm_or_ulaw).decode()
    media = {"contentType": content_type, "sampleRate": rate, "payload": payload}
    return json.dumps({"event": "playAudio", "streamId": CTX, "media": media})


def checkpoint(name: str) -> str:
    return json.dumps({"event": "checkpoint", "streamId": CTX, "name": name})


def test_plivo_checkpoints_are_reported_when_played_and_dropped_ones_never() -> None:
    h = Harness(protocol="plivo")
    assert h.events() == ["start"]  # no `connected` in Plivo's protocol
    h.bot(plivo_play(tone_ulaw(2)), checkpoint("first"), plivo_play(tone_ulaw(50)))
    h.bot(checkpoint("second"))
    h.ticks(3)
    played = [m["name"] for m in h.sent if m["event"] == "playedStream"]
    assert played == ["first"]
    h.bot(json.dumps({"event": "clearAudio", "streamId": CTX}))
    assert h.events()[-1] == "clearedAudio"
    assert [m["name"] for m in h.sent if m["event"] == "playedStream"] == ["first"]
    assert h.call.queued_frames == 0
    h.call.end(EndReason.CALLER_HANGUP)
    assert h.events()[-1] == "clearedAudio"  # no stop message: the close says it
    assert h.closes == [(1000, "call ended")]


def test_plivo_l16_16k_runs_the_call_at_16k_with_nothing_resampled() -> None:
    h = Harness(protocol="plivo", audio=AudioFormat("l16", 16000))
    assert h.call.rate == 16000 and h.call.frame_bytes == 640
    start = h.sent[0]["start"]
    assert start["mediaFormat"] == {"encoding": "audio/x-l16", "sampleRate": 16000}
    pcm = struct.pack("<320h", *range(320))
    h.bot(plivo_play(pcm + pcm, "audio/x-l16", 16000))
    h.ticks(2)
    assert h.leg.audio == [pcm, pcm]
    h.session.audio_received(pcm)
    assert base64.b64decode(h.sent[-1]["media"]["payload"]) == pcm


def test_plivo_audio_in_another_format_is_dropped_and_the_call_goes_on() -> None:
    h = Harness(protocol="plivo")
    h.bot(plivo_play(bytes(640), "audio/x-l16", 16000))
    assert h.session.bad_messages == 1 and h.call.queued_frames == 0
    h.bot(plivo_play(tone_ulaw(1)))
    assert h.call.queued_frames == 1 and not h.ended


def test_telnyx_marks_and_stop() -> None:
    h = Harness(protocol="telnyx")
    assert h.events() == ["connected", "start"]
    payload = base64.b64encode(tone_ulaw(1)).decode()
    h.bot(json.dumps({"event": "media", "media": {"payload": payload}}))
    h.bot(json.dumps({"event": "mark", "mark": {"name": "m"}}))
    h.ticks(1)
    assert h.sent[-1] == {
        "event": "mark",
        "sequence_number": "2",
        "stream_id": CTX,
        "mark": {"name": "m"},
    }
    h.call.end(EndReason.CALLER_HANGUP)
    assert h.sent[-1]["event"] == "stop"
