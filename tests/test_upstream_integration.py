"""A whole call: fake Asterisk over AudioSocket -> daemon -> a real WebSocket bot, on 127.0.0.1."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer
from twisted.trial import unittest

from rapida_tap.assistants.upstream import stream_sids
from rapida_tap.audiosocket.wire import Kind, encode_frame
from rapida_tap.media.codec import pcm_to_ulaw, ulaw_to_pcm
from rapida_tap.reasons import EndReason
from tests.fake_bot import FakeBot, mute_server, refused_url, self_signed, ulaw_tone
from tests.support import (
    API_KEY,
    FakeAsterisk,
    capture_logs,
    connect_audiosocket,
    curl_get,
    raw_http,
    register,
    start_daemon,
    tone,
    wait_until,
)

ASSISTANT = "123456789"


class UpstreamCallTests(unittest.TestCase):
    timeout = 20

    def setUp(self) -> None:
        self.ended: list[tuple[str, str]] = []
        self.logs = capture_logs(self)
        self.patch(os, "environ", {**os.environ, "TEST_BOT_TOKEN": "s3cret"})

    def bot(self, **options: Any) -> FakeBot:
        bot = FakeBot(**options)
        self.addCleanup(bot.stop)
        return bot

    def daemon(self, url: str, **options: Any) -> Any:
        daemon = start_daemon(self, assistants={ASSISTANT: {"url": url, **options}})
        daemon.bridge.call_ended.append(
            lambda call: self.ended.append((call.end_reason, call.end_detail))
        )
        return daemon

    @defer.inlineCallbacks
    def call(self, daemon: Any, frames: list[bytes] | None = None) -> Any:
        """Register and connect a fake Asterisk (silent, or sending ``frames`` every 20 ms);
        fires with (client, context id)."""
        ctx = yield register(daemon.http_port, assistant=ASSISTANT)
        client = FakeAsterisk(ctx, frames)
        yield connect_audiosocket(daemon.as_port, client)

        def hang_up() -> defer.Deferred[None]:
            if client.connected_:
                client.transport.loseConnection()
            return client.closed

        self.addCleanup(hang_up)
        return client, ctx

    @defer.inlineCallbacks
    def started(self, bot: FakeBot, daemon: Any) -> Any:
        client, ctx = yield self.call(daemon)
        yield wait_until(lambda: bot.streams and "start" in bot.streams[0].events())
        return client, ctx, bot.streams[0]

    def audio_heard(self, client: FakeAsterisk) -> list[bytes]:
        """What Asterisk received, silence left out."""
        return [r.payload for r in client.audio() if any(r.payload)]

    def assert_hung_up(self, client: FakeAsterisk) -> None:
        self.assertEqual(client.received[-1].kind, Kind.HANGUP)
        self.assertFalse(client.connected_)

    # -- a conversation ---------------------------------------------------------------

    @defer.inlineCallbacks
    def test_conversation_exact_json_greeting_echo_and_caller_hangup(self) -> Any:
        bot = self.bot(greeting_frames=10, echo_delay=0.1)
        daemon = self.daemon(
            bot.url,
            headers={"Authorization": "Bearer ${TEST_BOT_TOKEN}"},
            parameters={"language": "de"},
        )
        client, ctx, stream = yield self.started(bot, daemon)
        sid, call_sid = stream_sids(ctx)

        self.assertEqual(stream.path, "/stream")
        self.assertEqual(stream.headers["authorization"], "Bearer s3cret")
        self.assertTrue(stream.headers["user-agent"].startswith("rapida-asterisk/"))
        self.assertEqual(stream.raw[0], '{"event":"connected","protocol":"Call","version":"1.0.0"}')
        self.assertEqual(
            stream.messages[1],
            {
                "event": "start",
                "sequenceNumber": "1",
                "start": {
                    "accountSid": "rapida-asterisk",
                    "streamSid": sid,
                    "callSid": call_sid,
                    "tracks": ["inbound"],
                    "customParameters": {
                        "language": "de",
                        "context_id": ctx,
                        "assistant_id": ASSISTANT,
                        "caller": "+4930123456",
                        "from_number": "+4930123456",
                        "direction": "inbound",
                        "transport": "audiosocket",
                    },
                    "mediaFormat": {
                        "encoding": "audio/x-mulaw",
                        "sampleRate": 8000,
                        "channels": 1,
                    },
                },
                "streamSid": sid,
            },
        )

        # The greeting is played and its mark echoed back.
        yield wait_until(lambda: stream.of("mark"))
        self.assertEqual(
            stream.of("mark"),
            [
                {
                    "event": "mark",
                    "sequenceNumber": "2",
                    "streamSid": sid,
                    "mark": {"name": "greeting"},
                }
            ],
        )
        greeting = ulaw_to_pcm(ulaw_tone(10))
        self.assertEqual(b"".join(self.audio_heard(client)), greeting)

        # The caller speaks; the bot gets exact media and echoes it, paced, after its delay.
        frames = tone(20)
        for frame in frames:
            client.send(encode_frame(Kind.SLIN_8K, frame))
        yield wait_until(lambda: len(stream.of("media")) == 20)
        media = stream.of("media")
        self.assertEqual(
            media[0],
            {
                "event": "media",
                "sequenceNumber": "3",
                "media": {
                    "track": "inbound",
                    "chunk": "1",
                    "timestamp": "0",
                    "payload": media[0]["media"]["payload"],
                },
                "streamSid": sid,
            },
        )
        self.assertEqual([m["sequenceNumber"] for m in media], [str(n) for n in range(3, 23)])
        self.assertEqual([m["media"]["chunk"] for m in media], [str(n) for n in range(1, 21)])
        self.assertEqual([m["media"]["timestamp"] for m in media], [str(20 * n) for n in range(20)])
        self.assertEqual(stream.caller_audio(), b"".join(pcm_to_ulaw(f) for f in frames))
        echo = [ulaw_to_pcm(pcm_to_ulaw(f)) for f in frames]
        yield wait_until(lambda: len(self.audio_heard(client)) >= 10 + 20)
        self.assertEqual(self.audio_heard(client)[10:], echo)

        # The caller hangs up: the bot gets stop, last, then a normal close.
        client.transport.loseConnection()
        yield stream.closed
        self.assertEqual(
            stream.messages[-1],
            {
                "event": "stop",
                "sequenceNumber": str(len(stream.messages) - 1),
                "stop": {"accountSid": "rapida-asterisk", "callSid": call_sid},
                "streamSid": sid,
            },
        )
        self.assertEqual((stream.close_code, stream.clean), (1000, True))
        self.assertEqual(self.ended, [(EndReason.CALLER_HANGUP, "")])

    @defer.inlineCallbacks
    def test_dtmf_reaches_the_bot(self) -> Any:
        bot = self.bot()
        daemon = self.daemon(bot.url)
        client, ctx, stream = yield self.started(bot, daemon)
        client.send(encode_frame(Kind.DTMF, b"5"))
        yield wait_until(lambda: stream.of("dtmf"))
        self.assertEqual(
            stream.of("dtmf"),
            [
                {
                    "event": "dtmf",
                    "sequenceNumber": "2",
                    "streamSid": stream_sids(ctx)[0],
                    "dtmf": {"track": "inbound_track", "digit": "5"},
                }
            ],
        )

    @defer.inlineCallbacks
    def test_barge_in_empties_the_queue_and_echoes_the_pending_mark(self) -> Any:
        bot = self.bot()
        daemon = self.daemon(bot.url)
        client, ctx, stream = yield self.started(bot, daemon)
        client.send(encode_frame(Kind.DTMF, b"3"))  # 5 s of audio at once, then a mark
        yield wait_until(lambda: len(self.audio_heard(client)) >= 5)
        call = daemon.bridge.calls[ctx]
        self.assertGreater(call.queued_frames, 0)
        self.assertEqual(stream.of("mark"), [])  # queued is not played
        client.send(encode_frame(Kind.DTMF, b"1"))  # clear
        yield wait_until(lambda: stream.of("mark"))
        self.assertEqual(call.queued_frames, 0)
        self.assertEqual([m["mark"]["name"] for m in stream.of("mark")], ["burst"])
        self.assertLess(len(self.audio_heard(client)), 250)
        self.assertEqual(self.ended, [])

    # -- endings ----------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_bot_hangup_ends_the_audiosocket_with_0x00(self) -> Any:
        bot = self.bot()
        daemon = self.daemon(bot.url)
        client, _ctx, stream = yield self.started(bot, daemon)
        client.send(encode_frame(Kind.DTMF, b"2"))
        yield client.closed
        self.assert_hung_up(client)
        self.assertEqual(
            self.ended, [(EndReason.ASSISTANT_HANGUP, "bot closed the stream (1000 'goodbye')")]
        )
        yield stream.closed
        self.assertNotIn("stop", stream.events())

    @defer.inlineCallbacks
    def test_bot_hangup_while_the_caller_talks_is_clean(self) -> Any:
        """Caller audio keeps coming while the bot's socket closes: dropped, never raised."""
        bot = self.bot(echo_delay=0.0)
        daemon = self.daemon(bot.url)
        client, _ctx = yield self.call(daemon, frames=tone(500))
        yield wait_until(lambda: bot.streams and len(bot.streams[0].of("media")) > 10)
        client.send(encode_frame(Kind.DTMF, b"2"))
        yield client.closed
        self.assert_hung_up(client)
        [(reason, detail)] = self.ended
        self.assertEqual(reason, EndReason.ASSISTANT_HANGUP)
        self.assertNotIn("internal-error", self.logs.text())
        self.assertNotIn("Unhandled", self.logs.text())
        self.assertEqual(self.flushLoggedErrors(), [])

    @defer.inlineCallbacks
    def test_bot_dies_mid_call(self) -> Any:
        bot = self.bot()
        daemon = self.daemon(bot.url)
        client, _ctx, _stream = yield self.started(bot, daemon)
        client.send(encode_frame(Kind.DTMF, b"9"))
        yield client.closed
        self.assert_hung_up(client)
        [(reason, detail)] = self.ended
        self.assertEqual(reason, EndReason.ASSISTANT_FAILED)
        self.assertTrue(detail.startswith(f"bot {bot.url} connection lost: "), detail)

    @defer.inlineCallbacks
    def test_bot_unreachable(self) -> Any:
        url = yield refused_url()
        daemon = self.daemon(url)
        client, _ctx = yield self.call(daemon)
        yield client.closed
        self.assert_hung_up(client)
        [(reason, detail)] = self.ended
        self.assertEqual(reason, EndReason.ASSISTANT_FAILED)
        self.assertTrue(detail.startswith(f"bot {url}: "), detail)
        self.assertIn("refused", detail)

    @defer.inlineCallbacks
    def test_bot_unreachable_on_failure_continue(self) -> Any:
        url = yield refused_url()
        daemon = self.daemon(url, on_failure="continue")
        client, _ctx = yield self.call(daemon)
        yield client.closed
        self.assert_hung_up(client)
        [(reason, detail)] = self.ended
        self.assertEqual(reason, EndReason.ASSISTANT_HANGUP)
        self.assertTrue(detail.endswith("; on_failure=continue"), detail)

    @defer.inlineCallbacks
    def test_bot_connect_timeout(self) -> Any:
        port, connections = mute_server()
        self.addCleanup(port.stopListening)
        url = f"ws://127.0.0.1:{port.getHost().port}/stream"
        daemon = self.daemon(url, connect_timeout=0.3)
        client, _ctx = yield self.call(daemon)
        yield client.closed
        self.assert_hung_up(client)
        self.assertEqual(
            self.ended, [(EndReason.ASSISTANT_FAILED, f"bot {url}: not connected within 0.3s")]
        )
        self.assertEqual(len(connections), 1)
        yield wait_until(lambda: connections[0].lost)

    @defer.inlineCallbacks
    def test_bot_refuses_the_handshake(self) -> Any:
        bot = self.bot(refuse=403)
        daemon = self.daemon(bot.url)
        client, _ctx = yield self.call(daemon)
        yield client.closed
        self.assert_hung_up(client)
        [(reason, detail)] = self.ended
        self.assertEqual(reason, EndReason.ASSISTANT_FAILED)
        self.assertIn("upgrade failed [403]", detail)

    @defer.inlineCallbacks
    def test_tls_is_verified_by_default(self) -> Any:
        options, _ca = self_signed(self.mktemp())
        bot = self.bot(tls=options)
        daemon = self.daemon(bot.url)
        client, _ctx = yield self.call(daemon)
        yield client.closed
        [(reason, detail)] = self.ended
        self.assertEqual(reason, EndReason.ASSISTANT_FAILED)
        self.assertIn("TLS failed", detail)
        self.assertIn("certificate verify failed", detail)
        self.assertEqual(bot.streams, [])

    @defer.inlineCallbacks
    def test_tls_with_a_private_ca(self) -> Any:
        options, ca = self_signed(self.mktemp())
        bot = self.bot(tls=options)
        daemon = self.daemon(bot.url, ca_file=ca)
        _client, _ctx, stream = yield self.started(bot, daemon)
        self.assertEqual(stream.events()[:2], ["connected", "start"])


class RegistrationWithAMapTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_unknown_ids_get_404_with_an_empty_body(self) -> Any:
        daemon = start_daemon(self, assistants={ASSISTANT: {"url": "echo"}})
        reply = yield raw_http(
            daemon.http_port,
            curl_get("/v1/talk/asterisk/call/987654321", headers={"X-Api-Key": API_KEY}),
        )
        self.assertEqual((reply.status, reply.body), (404, b""))
        ctx = yield register(daemon.http_port, assistant=ASSISTANT)
        self.assertEqual(len(ctx), 36)

    @defer.inlineCallbacks
    def test_a_default_serves_unlisted_ids(self) -> Any:
        daemon = start_daemon(
            self, assistants={ASSISTANT: {"url": "echo"}, "default": {"url": "echo"}}
        )
        ctx = yield register(daemon.http_port, assistant="987654321")
        self.assertEqual(len(ctx), 36)
