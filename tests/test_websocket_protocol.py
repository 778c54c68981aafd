"""The chan_websocket leg on a string transport and a Clock: timers, pacing, flow control."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger, LogLevel, globalLogPublisher

from rapida_tap.assistants.registry import AssistantRegistry
from rapida_tap.contexts import CallContext, ContextStoreUnavailable, MemoryContextStore
from rapida_tap.media.bridge import MediaBridge
from rapida_tap.media.call import Call
from rapida_tap.media.codec import ulaw_to_pcm
from rapida_tap.media.lifecycle import Phase
from rapida_tap.media.listener import LegListener
from rapida_tap.websocket.factory import MediaWebSocketFactory
from rapida_tap.websocket.framing import unmask
from rapida_tap.websocket.handshake import BadContextId, context_id_from
from rapida_tap.websocket.protocol import XON_BURST, MediaWebSocketProtocol
from tests import fake_chan_websocket as fc
from tests.support import LogCapture, RecordingAssistant, RecordingSession, tone

CTX = "e49ec698-467d-4b50-853c-e2fbe3a87c50"
OTHER = "aaaaaaaa-2222-4333-8444-555555555555"
FRAME = tone(1)[0]

# -- the context id of a request ------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "params", "want"),
    [
        ("/v1/talk/asterisk/ctx", {"ctx": [CTX]}, CTX),
        (f"/v1/talk/asterisk/ctx/{CTX}", {}, CTX),
        (f"/v1/talk/asterisk/ctx/{CTX}", {"ctx": [CTX]}, CTX),
        (f"/other/prefix/ctx/{CTX}", {}, CTX),
    ],
)
def test_context_id_from(path: str, params: dict[str, list[str]], want: str) -> None:
    assert context_id_from(path, params) == want


@pytest.mark.parametrize(
    ("path", "params", "message"),
    [
        ("/v1/talk/asterisk/ctx", {}, "no context id"),
        ("/v1/talk/asterisk/ctx", {"ctx": [""]}, "no context id"),
        ("/v1/talk/asterisk/ctx", {"ctx": [CTX, CTX]}, "more than one"),
        (f"/v1/talk/asterisk/ctx/{CTX}", {"ctx": [OTHER]}, "differ"),
        ("/v1/talk/asterisk/ctx", {"ctx": ["x" * 100]}, "not a context id"),
        ("/v1/talk/asterisk/ctx", {"ctx": [CTX.upper()]}, "not a context id"),
    ],
)
def test_context_id_from_refuses(path: str, params: dict[str, list[str]], message: str) -> None:
    with pytest.raises(BadContextId, match=message):
        context_id_from(path, params)


# -- a leg on a string transport ------------------------------------------------------------


class Transport(StringTransport):
    """Like TCP, unregistering without a producer is allowed (Autobahn does it on close)."""

    def unregisterProducer(self) -> None:
        if self.producer is not None:
            super().unregisterProducer()


LISTENER_OPTIONS = {"stall_timeout", "close_timeout", "ping_interval", "max_connections"}


class Leg:
    """One protocol on a ``StringTransport``, with a Clock; frames out are decoded."""

    def __init__(self, store: Any = None, **options: Any) -> None:
        self.clock = Clock()
        self.store = store if store is not None else MemoryContextStore(self.clock)
        if isinstance(self.store, MemoryContextStore):
            self.store.mint(CallContext(CTX, "1"), 30)
        self.assistant = RecordingAssistant()
        self.bridge = MediaBridge(
            clock=self.clock,
            contexts=self.store,
            assistants=AssistantRegistry(default=self.assistant),
        )
        shared = {k: options.pop(k) for k in LISTENER_OPTIONS & set(options)}
        listener = LegListener(self.bridge, "websocket", **shared)
        self.factory = MediaWebSocketFactory(listener, **options)
        self.proto: MediaWebSocketProtocol = self.factory.buildProtocol(None)
        self.transport = Transport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5000))
        self.proto.makeConnection(self.transport)
        self.decoder = fc.FrameDecoder()
        self.head = b""
        self.frames: list[tuple[int, bytes]] = []
        self.logs = LogCapture()
        logger = Logger(observer=self.logs)  # this leg's lines only
        self.factory.listener.log = logger
        assert self.proto.lifecycle is not None
        self.proto.lifecycle.log = logger

    def handshake(self, path: str = f"/v1/talk/asterisk/ctx?ctx={CTX}", **kw: Any) -> bytes:
        self.proto.dataReceived(fc.upgrade_request(path, **kw))
        self.head, _, rest = self.transport.value().partition(b"\r\n\r\n")
        self.transport.clear()
        self.frames += self.decoder.feed(rest)
        return self.head

    def send(self, opcode: int, payload: bytes | str) -> None:
        if isinstance(payload, str):
            payload = payload.encode("utf-8")
        self.proto.dataReceived(fc.encode_frame(opcode, payload))

    def start(self, media_start: str | None = None) -> Call:
        assert fc.head_is_101(self.handshake()), self.head
        self.send(fc.TEXT, media_start or fc.media_start_json(CTX))
        assert self.proto.call is not None, self.text()
        return self.proto.call

    @property
    def session(self) -> RecordingSession:
        return self.assistant.sessions[0]

    def out(self) -> list[tuple[int, bytes]]:
        self.frames += self.decoder.feed(self.transport.value())
        self.transport.clear()
        return self.frames

    def audio(self) -> list[bytes]:
        return [p for op, p in self.out() if op == fc.BINARY]

    def texts(self) -> list[str]:
        return [p.decode() for op, p in self.out() if op == fc.TEXT]

    def close_code(self) -> int | None:
        for op, p in self.out():
            if op == fc.CLOSE:
                return int(struct.unpack("!H", p[:2])[0])
        return None

    def tick(self, n: int = 1) -> None:
        for _ in range(n):
            self.clock.advance(0.02)

    def text(self) -> str:
        return self.logs.text()


# -- handshake and start ---------------------------------------------------------------------


def test_handshake_timeout_drops_a_silent_connection() -> None:
    leg = Leg(handshake_timeout=3)
    leg.clock.advance(2.9)
    assert not leg.transport.disconnecting
    leg.clock.advance(0.2)
    assert leg.transport.disconnecting
    assert "connection refused: handshake-timeout" in leg.text()


def test_no_media_start_in_time_closes_1008_then_aborts() -> None:
    leg = Leg(start_timeout=5, close_timeout=2)
    leg.handshake()
    leg.clock.advance(5)
    assert leg.close_code() == 1008
    assert "no-media-start (no MEDIA_START within 5s)" in leg.text()
    assert not leg.transport.disconnected
    leg.clock.advance(2)  # the peer never answered the close frame
    assert leg.transport.disconnected
    assert leg.store.get(CTX).result is not None  # never claimed


def test_context_store_down_is_503() -> None:
    class Down:
        def get(self, context_id: str) -> defer.Deferred[None]:
            return defer.fail(ContextStoreUnavailable("redis down"))

    leg = Leg(store=Down())
    assert fc.status_of(leg.handshake()) == 503
    assert "context-store-unavailable (redis down)" in leg.text()


def test_draining_node_is_503() -> None:
    leg = Leg()
    leg.bridge.accepting = False
    assert fc.status_of(leg.handshake()) == 503
    assert "not-accepting" in leg.text()


def test_no_permessage_deflate_even_when_offered() -> None:
    leg = Leg()
    head = leg.handshake(extra=[("Sec-WebSocket-Extensions", "permessage-deflate")])
    assert fc.head_is_101(head)
    assert b"sec-websocket-extensions" not in head.lower()


def test_context_claimed_by_someone_else_after_the_handshake() -> None:
    leg = Leg()
    leg.handshake()
    leg.store.claim(CTX)
    leg.send(fc.TEXT, fc.media_start_json(CTX))
    assert leg.close_code() == 1008
    assert "connection refused: context-reused" in leg.text()


def test_unsupported_codec_is_refused() -> None:
    leg = Leg()
    leg.handshake()
    leg.send(fc.TEXT, fc.media_start_json(CTX).replace('"format":"ulaw"', '"format":"opus"'))
    assert leg.close_code() == 1008
    assert "unsupported-format (format 'opus': dial with c(ulaw), c(alaw), c(slin16)" in leg.text()


def test_plain_text_media_start_has_no_variables_and_is_accepted() -> None:
    leg = Leg()
    leg.start(fc.MEDIA_START_PLAIN)
    assert leg.proto.fmt == "plain-text"


# -- in the call -------------------------------------------------------------------------------


def test_caller_audio_and_dtmf_reach_the_assistant() -> None:
    leg = Leg()
    leg.start()
    leg.send(fc.BINARY, b"\xff" * 160)
    leg.send(fc.BINARY, b"")  # ignored
    leg.send(fc.TEXT, '{"event":"DTMF_END","channel_id":"1","digit":"#"}')
    assert [len(a) for a in leg.session.audio] == [320]
    assert leg.session.digits == ["#"]


def mixed_stream() -> tuple[bytes, list[bytes]]:
    """Binary frames around a DTMF event, a ping and a fragmented message; the audio it holds."""
    a, b, c1, c2, d = (bytes([0x80 + i]) * 160 for i in range(5))
    stream = b"".join(
        [
            fc.encode_frame(fc.BINARY, a),
            fc.encode_frame(fc.TEXT, b'{"event":"DTMF_END","channel_id":"1","digit":"7"}'),
            fc.encode_frame(fc.BINARY, b),
            fc.encode_frame(fc.PING, b"p"),
            fc.encode_frame(fc.BINARY, c1, fin=False),
            fc.encode_frame(0, c2),
            fc.encode_frame(fc.BINARY, d),
        ]
    )
    return stream, [a, b, c1 + c2, d]


def check_mixed_stream(cuts: list[int]) -> None:
    leg = Leg()
    leg.start()
    stream, audio = mixed_stream()
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        leg.proto.dataReceived(stream[start:end])
    assert leg.session.audio == [ulaw_to_pcm(a) for a in audio]
    assert leg.session.digits == ["7"]
    assert (fc.PONG, b"p") in leg.out()
    assert leg.proto.call is not None


def test_binary_frames_and_every_other_frame_keep_their_order() -> None:
    check_mixed_stream([])


@settings(max_examples=200, deadline=None, database=None)
@given(st.lists(st.integers(min_value=1, max_value=len(mixed_stream()[0]) - 1), max_size=12))
def test_the_same_stream_cut_anywhere_gives_the_same_call(cuts: list[int]) -> None:
    check_mixed_stream(sorted(set(cuts)))


def test_whole_binary_frames_skip_autobahns_message_path(monkeypatch: pytest.MonkeyPatch) -> None:
    leg = Leg()
    leg.start()
    seen: list[bool] = []
    original = MediaWebSocketProtocol.onMessage

    def counting(self: MediaWebSocketProtocol, payload: bytes, is_binary: bool) -> None:
        seen.append(is_binary)
        original(self, payload, is_binary)

    monkeypatch.setattr(MediaWebSocketProtocol, "onMessage", counting)
    leg.proto.dataReceived(b"".join(fc.encode_frame(fc.BINARY, FRAME) for _ in range(5)))
    leg.send(fc.TEXT, '{"event":"DTMF_END","channel_id":"1","digit":"#"}')
    assert len(leg.session.audio) == 5
    assert seen == [False]  # only the text message went through Autobahn


def test_a_read_shaped_like_a_frame_inside_a_frame_autobahn_holds_stays_autobahns() -> None:
    leg = Leg()
    leg.start()
    audio = bytes(range(160))
    leg.send(fc.BINARY, audio)  # the media path learns this shape: 168 bytes, 82 fe 00 a0
    shape = fc.encode_frame(fc.BINARY, audio)[:4]
    frame = bytearray(fc.encode_frame(fc.BINARY, bytes(300)))  # one 300-byte message
    frame[100:104] = shape  # from byte 100 its next 168 bytes look like that shape
    frame = bytes(frame)
    leg.proto.dataReceived(frame[:100])  # partial: Autobahn holds it
    leg.proto.dataReceived(frame[100:268])
    leg.proto.dataReceived(frame[268:])
    payload = unmask(frame[8:], frame[4:8])
    assert leg.session.audio == [ulaw_to_pcm(audio), ulaw_to_pcm(payload)]
    assert leg.proto.call is not None


def test_one_whole_frame_a_read_takes_the_shortest_path(monkeypatch: pytest.MonkeyPatch) -> None:
    leg = Leg()
    leg.start()
    taken: list[int] = []
    original = MediaWebSocketProtocol._media_frames

    def counting(self: MediaWebSocketProtocol, data: bytes) -> int:
        taken.append(len(data))
        return original(self, data)

    monkeypatch.setattr(MediaWebSocketProtocol, "_media_frames", counting)
    for _ in range(5):
        leg.send(fc.BINARY, FRAME)
    leg.send(fc.BINARY, FRAME[:80])  # another shape: the frame parser again, and it is learnt
    leg.send(fc.BINARY, FRAME[:80])
    assert taken == [len(FRAME) + 8, 86]
    assert len(leg.session.audio) == 7


def test_a_bad_frame_among_good_ones_ends_the_call_and_nothing_after_it_plays() -> None:
    leg = Leg()
    call = leg.start(fc.media_start_json(CTX).replace('"ulaw"', '"slin"'))
    stream = b"".join(
        [
            fc.encode_frame(fc.BINARY, b"\x00" * 320),
            fc.encode_frame(fc.BINARY, b"\x00" * 321),  # half a 16-bit sample
            fc.encode_frame(fc.BINARY, b"\x00" * 320),
        ]
    )
    leg.proto.dataReceived(stream)
    assert len(leg.session.audio) == 1
    assert call.end_reason == "protocol-error"
    assert "321-byte message of 16-bit slin" in call.end_detail
    assert leg.close_code() == 1002


def test_silence_ticks_send_nothing_and_speech_starts_with_lead_frames() -> None:
    leg = Leg(lead_frames=3)
    call = leg.start()
    leg.tick(10)
    assert leg.audio() == []
    call.play(b"".join(tone(10)))
    leg.tick()
    assert len(leg.audio()) == 4  # one for the tick and three ahead
    leg.tick(6)
    assert len(leg.audio()) == 10
    assert all(len(a) == 160 for a in leg.audio())


def test_other_frame_sizes_send_whole_multiples() -> None:
    leg = Leg(lead_frames=0)
    call = leg.start(fc.media_start_json(CTX).replace("160,", "240,"))
    call.play(b"".join(tone(6)))
    leg.tick(6)
    sizes = [len(a) for a in leg.audio()]
    assert sizes == [240, 240, 240, 240]
    assert sum(sizes) == 6 * 160


def test_mark_ids_are_ours_and_map_back_to_the_assistants_names() -> None:
    leg = Leg(lead_frames=0)
    call = leg.start()
    call.play(FRAME)
    call.mark("a name with spaces that is rather long " * 3)
    leg.tick()
    assert leg.texts() == ['{"command": "MARK_MEDIA", "correlation_id": "m1"}']
    leg.send(fc.TEXT, '{"event":"MEDIA_MARK_PROCESSED","channel_id":"1","correlation_id":"zz"}')
    assert leg.session.marks == []
    leg.send(fc.TEXT, '{"event":"MEDIA_MARK_PROCESSED","channel_id":"1","correlation_id":"m1"}')
    assert leg.session.marks == ["a name with spaces that is rather long " * 3]


def test_plain_text_commands_for_a_plain_text_call() -> None:
    leg = Leg(lead_frames=0)
    call = leg.start(fc.MEDIA_START_PLAIN)
    call.play(FRAME)
    call.mark("x")
    leg.tick()
    call.clear()
    assert leg.texts() == ["MARK_MEDIA m1", "FLUSH_MEDIA"]
    assert leg.session.marks == ["x"]
    call.hangup()
    assert leg.texts()[-1] == "HANGUP"
    assert leg.close_code() == 1000


def test_xoff_holds_the_calls_queue_then_xon_bursts_and_paces_the_rest() -> None:
    leg = Leg(lead_frames=0)
    call = leg.start()
    leg.send(fc.TEXT, '{"event":"MEDIA_XOFF","channel_id":"1"}')
    call.play(b"".join(tone(XON_BURST + 10)))
    call.mark("end")
    leg.tick(XON_BURST + 10)
    assert leg.audio() == [] and leg.texts() == []
    assert call.queued_frames == XON_BURST + 10  # held in the call, not in the leg
    assert call.frames_out == 0 and call.silence_out == 0
    leg.send(fc.TEXT, '{"event":"MEDIA_XON","channel_id":"1"}')
    leg.tick()
    assert len(leg.audio()) == XON_BURST + 1
    leg.tick(9)
    assert len(leg.audio()) == XON_BURST + 10
    assert call.frames_out == XON_BURST + 10
    mark = json.loads(leg.texts()[-1])
    assert mark == {"command": "MARK_MEDIA", "correlation_id": "m1"}


def test_a_flush_during_xoff_settles_the_held_marks() -> None:
    leg = Leg(lead_frames=0)
    call = leg.start()
    leg.send(fc.TEXT, "MEDIA_XOFF")
    call.play(b"".join(tone(8)))
    call.mark("held")
    leg.tick(8)
    call.clear()
    assert leg.texts() == ['{"command": "FLUSH_MEDIA"}']
    assert leg.session.marks == ["held"]
    leg.send(fc.TEXT, "MEDIA_XON")
    leg.tick(3)
    assert leg.audio() == []
    assert leg.proto.xoff_count == 1


def test_unknown_events_errors_and_a_second_start_are_logged_not_fatal() -> None:
    leg = Leg()
    call = leg.start()
    leg.send(fc.TEXT, '{"event":"BRAND_NEW","channel_id":"1"}')
    leg.send(fc.TEXT, "ERROR error_text:Passthrough mode: no marks")
    leg.send(fc.TEXT, fc.media_start_json(CTX))
    leg.send(fc.TEXT, "QUEUE_DRAINED")
    assert not call.is_ended
    text = leg.text()
    assert "ignoring unknown event BRAND_NEW" in text
    assert "Asterisk reported an error: Passthrough mode: no marks" in text
    assert "ignoring a second MEDIA_START" in text


def test_malformed_event_in_a_call_ends_it_as_protocol_error() -> None:
    leg = Leg()
    call = leg.start()
    leg.send(fc.TEXT, "DTMF_END digit:99")
    assert call.end_reason == "protocol-error"
    assert "digit" in call.end_detail
    assert leg.close_code() == 1002


# -- keep-alive --------------------------------------------------------------------------------


def test_pings_keep_a_quiet_call_and_a_vanished_peer_ends_it() -> None:
    leg = Leg(ping_interval=10)
    call = leg.start()
    leg.clock.advance(10)
    pings = [p for op, p in leg.out() if op == fc.PING]
    assert len(pings) == 1
    leg.send(fc.PONG, pings[0])
    leg.clock.advance(10)
    assert not call.is_ended  # the pong counted
    leg.clock.advance(10)  # no pong to the second ping
    assert call.end_reason == "transport-error"
    assert "not even a pong, for 10s" in call.end_detail


def test_peer_that_stops_reading_is_hung_up() -> None:
    leg = Leg(stall_timeout=5)
    call = leg.start()
    leg.transport.producer.pauseProducing()  # the kernel buffer towards Asterisk is full
    leg.clock.advance(4.9)
    assert not call.is_ended
    leg.clock.advance(0.2)
    assert call.end_reason == "peer-not-reading"
    assert "write buffer full for 5s" in call.end_detail


def test_peer_that_reads_again_in_time_keeps_the_call() -> None:
    leg = Leg(stall_timeout=5)
    call = leg.start()
    leg.transport.producer.pauseProducing()
    leg.clock.advance(3)
    leg.transport.producer.resumeProducing()
    leg.clock.advance(10)
    assert not call.is_ended


def test_ping_off() -> None:
    leg = Leg(ping_interval=0)
    call = leg.start()
    leg.clock.advance(25)
    assert not call.is_ended
    assert [op for op, _ in leg.out() if op == fc.PING] == []


# -- endings -----------------------------------------------------------------------------------


def test_daemon_hangup_sends_hangup_then_close_and_aborts_a_peer_that_never_answers() -> None:
    leg = Leg(close_timeout=2)
    call = leg.start()
    call.hangup()
    assert leg.texts() == ['{"command": "HANGUP"}']
    assert leg.close_code() == 1000
    assert leg.proto.phase is Phase.CLOSING
    call.play(b"".join(tone(3)))  # nothing more reaches a closing connection
    leg.clock.advance(2)
    assert leg.transport.disconnected


def test_close_frame_then_reset_is_a_caller_hangup() -> None:
    from twisted.internet.error import ConnectionLost
    from twisted.python.failure import Failure

    leg = Leg()
    call = leg.start()
    leg.send(fc.CLOSE, fc.close_payload(1000))
    leg.proto.connectionLost(Failure(ConnectionLost("reset by peer")))
    assert call.end_reason == "caller-hangup"
    assert leg.factory.listener.connections == 0
    left = [c for c in leg.clock.getDelayedCalls() if getattr(c.func, "__self__", None) is not None]
    assert [c for c in left if c.func.__self__ in (leg.proto, call, leg.bridge.pacer)] == []


# -- the shipped Asterisk configuration --------------------------------------------------------

ETC = Path(__file__).resolve().parents[1] / "etc"


def test_shipped_websocket_client_conf_matches_the_endpoint() -> None:
    text = (ETC / "websocket_client.conf").read_text()
    uris = re.findall(r"^uri = (\S+)", text, re.M)
    assert uris and all(u.endswith("/v1/talk/asterisk/ctx") for u in uris)
    assert text.count("protocols = media") == len(uris)
    assert "connection_type = per_call_config" in text


@pytest.mark.parametrize(
    ("context", "codec"),
    [
        ("rapida-inbound-ws", "ulaw"),
        ("rapida-inbound-ws-16k", "slin16"),
        ("rapida-outbound-ws", "ulaw"),
    ],
)
def test_shipped_dialplans_have_what_real_asterisk_needs(context: str, codec: str) -> None:
    text = (ETC / "extensions-websocket.conf").read_text()
    body = text.split(f"[{context}]", 1)[1].split("\n[", 1)[0]
    assert "Set(__RAPIDA_CONTEXT_ID=${CTX})" in body
    assert f"/c({codec})f(json)v(ctx=${{CTX}}),,g)" in body
    assert "GotoIf($[${LEN(${CTX})} != 36]?error)" in body
    assert "WebSocket(" not in body  # there is no such application
    if context.startswith("rapida-inbound-ws"):
        for needed in ("conntimeout", "httptimeout", "failurecodes", "X-Api-Key", "URIENCODE"):
            assert needed in body


def test_autobahn_per_frame_debug_lines_stay_out_of_the_log() -> None:
    """Autobahn logs every frame at debug level through ``self.log``; that must stay its own
    (filtering) logger, or a busy node writes megabytes of log per second."""
    leg = Leg()
    capture = LogCapture()
    globalLogPublisher.addObserver(capture)
    try:
        leg.start()
        leg.session.call.play(b"\x00\x01" * 160 * 10)
        leg.tick(10)
        leg.send(fc.BINARY, b"\xff" * 160)
    finally:
        globalLogPublisher.removeObserver(capture)
    assert not isinstance(leg.proto.log, Logger)
    assert not [e for e in capture.events if e.get("log_level") == LogLevel.debug]
