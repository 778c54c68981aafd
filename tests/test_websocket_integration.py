"""chan_websocket end to end: a daemon on real sockets, a client that behaves like Asterisk."""

from __future__ import annotations

import json
import struct
from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.logger import LogLevel, formatEvent
from twisted.trial import unittest

from rapida_tap.assistants.echo import EchoSession
from rapida_tap.assistants.registry import AssistantRegistry
from rapida_tap.media.call import Call
from rapida_tap.media.codec import pcm_to_ulaw, ulaw_to_pcm
from tests import fake_chan_websocket as fc
from tests.support import (
    RecordingAssistant,
    capture_logs,
    register,
    start_daemon,
    tone,
    wait_until,
)

TRANSCRIPTS = [
    "websocket-json.jsonl",
    "websocket-plain.jsonl",
    "websocket-json-flood.jsonl",
    "websocket-json-daemon-hangup.jsonl",
    "websocket-json-daemon-close.jsonl",
]


def samples(pcm: bytes) -> list[int]:
    return list(struct.unpack(f"<{len(pcm) // 2}h", pcm))


def assert_audio_close(testcase: Any, got: bytes, want: bytes, tolerance: float = 0.04) -> None:
    """Decoded audio within ``tolerance`` of full scale per sample (μ-law steps, not bytes)."""
    a, b = samples(got), samples(want)
    testcase.assertEqual(len(a), len(b))
    worst = max(abs(x - y) for x, y in zip(a, b, strict=True))
    testcase.assertLessEqual(worst, tolerance * 32768, f"worst sample error {worst}")


class WebSocketTest(unittest.TestCase):
    def setUp(self) -> None:
        self.logs = capture_logs(self)
        self.daemon = start_daemon(self)
        self.calls: list[Call] = []
        self.daemon.bridge.call_started.append(self.calls.append)
        self.clients: list[fc.FakeChanWebSocket] = []

    def tearDown(self) -> defer.Deferred[Any]:
        waits = []
        for c in self.clients:
            if c.connected_:
                c.transport.abortConnection()
            waits.append(c.closed)
        return defer.gatherResults(waits)

    @defer.inlineCallbacks
    def connect(self, request: bytes) -> Any:
        client = fc.FakeChanWebSocket(request)
        self.clients.append(client)
        yield protocol.ClientCreator(reactor, lambda: client).connectTCP(
            "127.0.0.1", self.daemon.http_port
        )
        yield client.handshake
        return client

    @defer.inlineCallbacks
    def start_call(
        self, path: str | None = None, media_start: str | None = None, ctx: str | None = None
    ) -> Any:
        """Register, upgrade, MEDIA_START; fires with (client, call) once the call runs."""
        if ctx is None:
            ctx = yield register(self.daemon.http_port)
        client = yield self.connect(
            fc.upgrade_request(path.format(ctx=ctx) if path else f"/v1/talk/asterisk/ctx?ctx={ctx}")
        )
        self.assertTrue(fc.head_is_101(client.response_head), client.response_head)
        client.send_text(media_start if media_start is not None else fc.media_start_json(ctx))
        yield wait_until(lambda: ctx in self.daemon.bridge.calls)
        return client, self.daemon.bridge.calls[ctx]

    def errors(self) -> list[str]:
        bad = (LogLevel.error, LogLevel.critical)
        return [formatEvent(e) for e in self.logs.events if e.get("log_level") in bad]

    def use_recorder(self) -> RecordingAssistant:
        assistant = RecordingAssistant()
        self.daemon.bridge.assistants = AssistantRegistry(default=assistant)
        return assistant

    # -- the happy paths -----------------------------------------------------------------

    @defer.inlineCallbacks
    def test_echo_json_query_form(self) -> Any:
        """The handshake is what Asterisk accepts; audio comes back; DTMF; caller hangup."""
        client, call = yield self.start_call()
        headers = fc.headers_of(client.response_head)
        self.assertEqual(headers["sec-websocket-protocol"], "media")
        self.assertEqual(headers["sec-websocket-accept"], fc.accept_for(fc.ASTERISK_KEY))
        self.assertNotIn("sec-websocket-extensions", headers)
        sent = [pcm_to_ulaw(f) for f in tone(25)]
        for i, frame in enumerate(sent):
            reactor.callLater(0.02 * i, client.send_audio, frame)
        yield client.wait_for(lambda c: len(c.audio()) >= len(sent))
        got = client.audio()
        self.assertTrue(all(len(m) == 160 for m in got))
        assert_audio_close(self, ulaw_to_pcm(b"".join(got)), ulaw_to_pcm(b"".join(sent)))
        client.send_text('{"event":"DTMF_END","channel_id":"1795499200.6","digit":"7"}')
        yield wait_until(lambda: call.session is not None and call.session.digits == ["7"])
        self.assertIsInstance(call.session, EchoSession)
        client.close_like_asterisk()
        reason = yield call.when_ended()
        self.assertEqual(reason, "caller-hangup")
        self.assertIn("close 1000", call.end_detail)
        self.assertNotIn("protocol-error", self.logs.text())

    @defer.inlineCallbacks
    def test_echo_plain_text_path_form(self) -> Any:
        client, call = yield self.start_call(
            path="/v1/talk/asterisk/ctx/{ctx}", media_start=fc.MEDIA_START_PLAIN
        )
        frames = [pcm_to_ulaw(f) for f in tone(5)]
        for frame in frames:
            client.send_audio(frame)
        yield client.wait_for(lambda c: len(c.audio()) >= 5)
        client.send_text("DTMF_END digit:5 channel_id:1795501860.10")
        yield wait_until(lambda: call.session.digits == ["5"])
        client.close_like_asterisk()
        self.assertEqual((yield call.when_ended()), "caller-hangup")

    @defer.inlineCallbacks
    def test_short_last_frame_and_unknown_event(self) -> Any:
        assistant = self.use_recorder()
        client, call = yield self.start_call()
        client.send_audio(b"\x55" * 108)  # the prompt's last frame: shorter
        client.send_text('{"event":"SOMETHING_NEW","channel_id":"1","x":1}')
        client.send_audio(b"\x55" * 160)
        session = assistant.sessions[0]
        yield wait_until(lambda: len(session.audio) == 2)
        self.assertEqual([len(a) for a in session.audio], [216, 320])
        self.assertIn("ignoring unknown event SOMETHING_NEW", self.logs.text())
        self.assertFalse(call.is_ended)

    def replay(self, name: str) -> Any:
        """Every asterisk->daemon frame of a real transcript, in order, then Asterisk's close."""

        @defer.inlineCallbacks
        def run() -> Any:
            transcript = fc.load(name)
            ctx = yield register(self.daemon.http_port)
            old = transcript.context_id
            request = transcript.upgrade()["raw"].replace(old, ctx).encode("latin-1")
            client = yield self.connect(request)
            recorded = fc.headers_of(transcript.response()["raw"].encode("latin-1"))
            headers = fc.headers_of(client.response_head)
            self.assertEqual(headers["sec-websocket-accept"], recorded["sec-websocket-accept"])
            assistant = self.use_recorder() if not self.calls else None
            frames = [fc.frame_for(r, old, ctx) for r in transcript.from_asterisk()]
            texts = [p for op, p in frames if op == fc.TEXT]
            client.send(*frames[0])
            yield wait_until(lambda: ctx in self.daemon.bridge.calls)
            call = self.daemon.bridge.calls[ctx]
            for opcode, payload in frames[1:]:
                if opcode == fc.CLOSE:
                    client.send(opcode, payload)
                    client.transport.loseConnection()  # at once, as Asterisk does
                else:
                    client.send(opcode, payload)
            reason = yield call.when_ended()
            self.assertEqual(reason, "caller-hangup")
            audio = sum(1 for op, _ in frames if op == fc.BINARY)
            digits = [
                json.loads(t)["digit"] if t.startswith(b"{") else t.split(b":")[1][:1].decode()
                for t in texts
                if b"DTMF_END" in t
            ]
            self.assertEqual(call.frames_in, audio + len(digits))
            if assistant is not None:
                self.assertEqual(assistant.sessions[0].digits, digits)
                self.assertEqual(assistant.sessions[0].closed, ["caller-hangup"])
            self.assertNotIn("protocol-error", self.logs.text())
            self.assertEqual(self.errors(), [])

        return run()

    def test_replay_json(self) -> Any:
        return self.replay("websocket-json.jsonl")

    def test_replay_plain(self) -> Any:
        return self.replay("websocket-plain.jsonl")

    def test_replay_flood(self) -> Any:
        return self.replay("websocket-json-flood.jsonl")

    def test_replay_daemon_hangup(self) -> Any:
        return self.replay("websocket-json-daemon-hangup.jsonl")

    def test_replay_daemon_close(self) -> Any:
        return self.replay("websocket-json-daemon-close.jsonl")

    # -- marks, flush, flow control ---------------------------------------------------------

    @defer.inlineCallbacks
    def test_marks_and_flush_round_trip(self) -> Any:
        assistant = self.use_recorder()
        client, call = yield self.start_call()
        session = assistant.sessions[0]
        call.play(b"".join(tone(5)))
        call.mark("first")
        yield client.wait_for(lambda c: any("MARK_MEDIA" in t for t in c.texts()))
        self.assertEqual(len(client.audio()), 5)  # the mark follows its audio
        mark = next(c for c in client.commands() if c["command"] == "MARK_MEDIA")
        self.assertEqual(session.marks, [])
        client.send_text(
            json.dumps({"event": "MEDIA_MARK_PROCESSED", "correlation_id": mark["correlation_id"]})
        )
        yield wait_until(lambda: session.marks == ["first"])
        # Barge-in with a mark in Asterisk's queue and one still in ours.
        call.play(b"".join(tone(10)))
        call.mark("sent")
        yield client.wait_for(lambda c: sum("MARK_MEDIA" in t for t in c.texts()) == 2)
        call.play(b"".join(tone(50)))
        call.mark("queued")
        call.clear()
        yield client.wait_for(lambda c: any("FLUSH_MEDIA" in t for t in c.texts()))
        self.assertEqual(session.marks, ["first", "sent", "queued"])
        self.assertEqual(client.commands()[-1], {"command": "FLUSH_MEDIA"})
        client.close_like_asterisk()
        yield call.when_ended()

    @defer.inlineCallbacks
    def test_xoff_holds_audio_and_xon_sends_it_in_order(self) -> Any:
        self.use_recorder()
        client, call = yield self.start_call()
        client.send_text('{"event":"MEDIA_XOFF","channel_id":"1"}')
        yield wait_until(lambda: call.paused)
        frames = tone(20)
        call.play(b"".join(frames))
        call.mark("end")
        pacer = self.daemon.bridge.pacer
        later = pacer.ticks + 5
        yield wait_until(lambda: pacer.ticks >= later)
        self.assertEqual(len(client.audio()), 0)
        self.assertEqual(call.queued_frames, 20)  # held in the call's own queue
        client.send_text('{"event":"MEDIA_XON","channel_id":"1"}')
        yield client.wait_for(lambda c: any("MARK_MEDIA" in t for t in c.texts()))
        got = client.audio()
        self.assertEqual(len(got), 20)
        assert_audio_close(self, ulaw_to_pcm(b"".join(got)), b"".join(frames))
        client.close_like_asterisk()
        yield call.when_ended()

    # -- endings ------------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_daemon_hangup_sends_hangup_then_close_1000(self) -> Any:
        client, call = yield self.start_call()
        call.hangup()
        yield client.wait_for(lambda c: c.close_frame() is not None)
        self.assertEqual(client.commands(), [{"command": "HANGUP"}])
        self.assertEqual(client.close_frame(), (1000, "assistant-hangup"))
        client.close_like_asterisk()  # Asterisk's reply, then it drops TCP
        yield client.closed

    @defer.inlineCallbacks
    def test_reset_without_close_frame_ends_the_call(self) -> Any:
        client, call = yield self.start_call()
        client.reset()
        reason = yield call.when_ended()
        self.assertEqual(reason, "transport-error")
        self.assertIn("without a close frame", call.end_detail)

    # -- bad input: each ends only its own connection ---------------------------------------------

    @defer.inlineCallbacks
    def test_bad_inputs_end_only_their_own_connection(self) -> Any:
        self.daemon.websocket.setProtocolOptions(
            maxMessagePayloadSize=4096, maxFramePayloadSize=4096
        )
        self.daemon.websocket.max_text = 1024
        self.daemon.websocket.listener.throttle.interval = 0  # every refusal's line is checked
        good, good_call = yield self.start_call()
        port = self.daemon.http_port
        cases = []

        @defer.inlineCallbacks
        def http_refusal(request: bytes, status: int, log: str | None) -> Any:
            client = yield self.connect(request)
            yield client.closed
            self.assertEqual(fc.status_of(client.response_head), status, client.response_head)
            if log is not None:
                self.assertIn(log, self.logs.text())
            cases.append(log)

        @defer.inlineCallbacks
        def in_call_refusal(messages: list[tuple[int, bytes]], code: int, log: str) -> Any:
            ctx = yield register(port)
            client = yield self.connect(fc.upgrade_request(f"/v1/talk/asterisk/ctx?ctx={ctx}"))
            for opcode, payload in messages:
                client.send(opcode, payload.replace(b"{ctx}", ctx.encode()))
            yield client.closed
            close = client.close_frame()
            self.assertEqual(close[0] if close else None, code, (log, close))
            self.assertIn(log, self.logs.text())
            cases.append(log)

        unknown = "11111111-2222-4333-8444-555555555555"
        yield http_refusal(
            fc.upgrade_request(f"/v1/talk/asterisk/ctx?ctx={unknown}"), 404, "context-unknown"
        )
        yield http_refusal(
            fc.upgrade_request("/v1/talk/asterisk/ctx?ctx=not-a-uuid"), 400, "bad-context-id"
        )
        yield http_refusal(
            fc.upgrade_request(f"/v1/talk/asterisk/ctx?ctx={good_call.context_id}"),
            404,
            "context-unknown",  # reused: already claimed by the good call
        )
        ctx = yield register(port)
        yield http_refusal(
            fc.upgrade_request(f"/v1/talk/asterisk/ctx?ctx={ctx}", protocols="chat"),
            400,
            "wrong-subprotocol",
        )
        yield http_refusal(
            fc.upgrade_request(f"/v1/talk/asterisk/ctx?ctx={ctx}", protocols=None),
            400,
            "wrong-subprotocol",
        )
        # Garbage (here the start of a TLS ClientHello): 400, closed, and a log line.
        yield http_refusal(
            b"\x16\x03\x01\x02\x00garbage\r\n\r\n", 400, "malformed request refused with 400"
        )
        yield http_refusal(
            f"GET /v1/talk/asterisk/ctx?ctx={ctx} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
            426,
            "plain HTTP request",
        )
        yield in_call_refusal([(fc.TEXT, b'{"event": "MEDIA_START",')], 1002, "invalid JSON")
        yield in_call_refusal(
            [(fc.BINARY, b"\xff" * 160)], 1002, "binary message before MEDIA_START"
        )
        yield in_call_refusal(
            [(fc.TEXT, b"DTMF_END digit:1")], 1002, "first message was DTMF_END, not MEDIA_START"
        )
        other = "aaaaaaaa-2222-4333-8444-555555555555"
        yield in_call_refusal(
            [(fc.TEXT, fc.media_start_json(other).encode())], 1008, "context-mismatch"
        )
        yield in_call_refusal([(fc.TEXT, b"X" * 2000)], 1009, "text message of 2000 bytes")
        yield in_call_refusal(
            [(fc.TEXT, fc.media_start_json("{ctx}").encode()), (fc.BINARY, b"\xff" * 5000)],
            None,  # Autobahn drops the connection at once (failByDrop)
            "exceeds payload limit",
        )
        self.assertEqual(len(cases), 13)
        # The good call never noticed.
        self.assertFalse(good_call.is_ended)
        before = len(good.audio())
        good.send_audio(pcm_to_ulaw(tone(1)[0]))
        yield good.wait_for(lambda c: len(c.audio()) > before)
        self.assertEqual(list(self.daemon.bridge.calls), [good_call.context_id])

    @defer.inlineCallbacks
    def test_mismatch_does_not_burn_the_url_context(self) -> Any:
        """A refused sticky-v() call leaves the URL's context usable by its own call."""
        ctx = yield register(self.daemon.http_port)
        stale = yield self.connect(fc.upgrade_request(f"/v1/talk/asterisk/ctx?ctx={ctx}"))
        stale.send_text(fc.media_start_json("bbbbbbbb-2222-4333-8444-555555555555"))
        yield stale.closed
        _client, call = yield self.start_call(ctx=ctx)
        self.assertEqual(call.context_id, ctx)

    @defer.inlineCallbacks
    def test_connection_limit(self) -> Any:
        self.daemon.websocket.listener.max_connections = 1
        _client, call = yield self.start_call()
        ctx = yield register(self.daemon.http_port)
        second = yield self.connect(fc.upgrade_request(f"/v1/talk/asterisk/ctx?ctx={ctx}"))
        yield second.closed
        self.assertEqual(fc.status_of(second.response_head), 503)
        self.assertIn("too-many-connections", self.logs.text())
        self.assertFalse(call.is_ended)
