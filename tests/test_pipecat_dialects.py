"""Real Pipecat bots in the other dialects: Telnyx and Plivo as Pipecat serializes them
(μ-law 8 kHz), and a wideband Exotel bot (PCM16 16 kHz) that a 6 kHz tone crosses.

The daemon speaks each dialect with ``protocol = ...`` and the bots are Pipecat's own
serializers, unchanged (``tests/pipecat_bot.py --dialect``).  The call bodies are those of
``tests/test_pipecat.py``; only how the call starts differs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from twisted.internet import defer, protocol, reactor, task
from twisted.trial import unittest

from rapida_tap.audiosocket.wire import Kind, encode_frame
from tests import fake_chan_websocket as fc
from tests.callers import Caller, call_over_audiosocket
from tests.pipecat_process import PipecatBotProcess, start_pipecat_bot
from tests.support import (
    API_KEY,
    FakeAsterisk,
    connect_audiosocket,
    register,
    start_daemon,
    tone,
    wait_until,
)
from tests.test_pipecat import ASSISTANT, PipecatCallTests
from tests.test_wideband import share_at


class DialectCallTests(PipecatCallTests):
    """The Pipecat call bodies, with the bot and the daemon speaking ``dialect``."""

    dialect = ""

    @defer.inlineCallbacks
    def call(self, mode: str, *options: str) -> Any:
        bot: PipecatBotProcess = yield start_pipecat_bot(
            self, mode, "--dialect", self.dialect, *options
        )
        daemon = start_daemon(
            self, assistants={ASSISTANT: {"url": bot.url, "protocol": self.dialect}}
        )
        daemon.bridge.call_ended.append(
            lambda call: self.ended.append((call.end_reason, call.end_detail))
        )
        caller: Caller = yield self.connect_caller(daemon, ASSISTANT)
        self.addCleanup(self.hang_up, caller)
        if self.dialect == "plivo":
            # Plivo sends no `connected`: Pipecat reads `start` and the next message (media)
            # before it tells the dialect, so the caller says nothing (silence) until then.
            primer = task.LoopingCall(caller.send_audio, bytes(320))
            primer.start(0.02)
            try:
                yield bot.wait_for("connected", caller.ctx)
            finally:
                primer.stop()
        yield bot.wait_for("ready", caller.ctx)
        return bot, daemon, caller, caller.ctx

    @defer.inlineCallbacks
    def test_pipecat_takes_the_stream_for_a_twilio_call(self) -> Any:
        """Here: Pipecat recognises the dialect and reads the call's ids from its `start`."""
        bot, _daemon, caller, call_id = yield self.call("echo")
        [connected] = bot.of("connected", call_id)
        self.assertEqual(connected["transport_type"], self.dialect)
        self.assertEqual(connected["stream_id"], caller.ctx)
        if self.dialect == "telnyx":
            self.assertEqual(connected["from_number"], "+4930123456")


class PipecatTelnyxTests(DialectCallTests, unittest.TestCase):
    dialect = "telnyx"
    connect_caller = staticmethod(call_over_audiosocket)


class PipecatPlivoTests(DialectCallTests, unittest.TestCase):
    dialect = "plivo"
    connect_caller = staticmethod(call_over_audiosocket)

    @defer.inlineCallbacks
    def test_a_caller_hangup_stops_the_bot(self) -> Any:
        """Here: the bot also counts the silence the caller sent while Pipecat told the
        dialect (see ``call``), so it heard at least the 25 frames of speech."""
        bot, _daemon, caller, call_id = yield self.call("echo")
        talker = caller.talk(25)
        yield talker.done
        caller.hang_up()
        ended = yield bot.wait_for("ended", call_id)
        self.assertGreaterEqual(ended["frames_in"], 25)
        self.assertEqual(bot.of("finished", call_id)[0]["frame"], "CancelFrame")


class WidebandPipecatTests(unittest.TestCase):
    """A Pipecat bot whose pipeline and wire run at 16 kHz (Exotel's PCM16)."""

    timeout = 90

    @defer.inlineCallbacks
    def daemon_and_bot(self) -> Any:
        bot: PipecatBotProcess = yield start_pipecat_bot(
            self, "echo", "--dialect", "exotel", "--rate", "16000"
        )
        options = {"url": bot.url, "protocol": "exotel", "sample_rate": 16000}
        return start_daemon(self, assistants={ASSISTANT: options}), bot

    def assert_tone_came_back(self, heard: bytes, sent: list[bytes]) -> None:
        self.assertGreater(len(heard), 40 * 640)
        self.assertGreater(share_at(heard, 16000, 6000), 0.95)
        want = np.frombuffer(b"".join(sent), dtype="<i2").astype(float)
        got = np.frombuffer(heard, dtype="<i2").astype(float)
        self.assertGreater(float(np.corrcoef(want[: len(got)], got[: len(want)])[0, 1]), 0.99)

    @defer.inlineCallbacks
    def test_a_6khz_tone_crosses_a_16khz_audiosocket_call_and_a_16khz_bot(self) -> Any:
        daemon, bot = yield self.daemon_and_bot()
        ctx = yield register(daemon.http_port, assistant=ASSISTANT, key=API_KEY)
        sent = tone(50, hz=6000, rate=16000)
        client = FakeAsterisk(ctx)
        yield connect_audiosocket(daemon.as_port, client)
        self.addCleanup(lambda: client.closed)
        self.addCleanup(client.transport.loseConnection)
        yield bot.wait_for("connected", ctx)
        for i, frame in enumerate(sent):
            reactor.callLater(0.02 * i, client.send, encode_frame(Kind.SLIN_16K, frame))
        yield wait_until(lambda: sum(any(r.payload) for r in client.audio()) >= 45, timeout=15)
        heard = [r for r in client.audio() if any(r.payload)]
        self.assertEqual({r.kind for r in heard}, {Kind.SLIN_16K})
        self.assert_tone_came_back(b"".join(r.payload for r in heard), sent)
        call = daemon.bridge.calls[ctx]
        self.assertEqual((call.caller_rate, call.rate, call.assistant_rate), (16000,) * 3)

    @defer.inlineCallbacks
    def test_a_6khz_tone_crosses_a_slin16_chan_websocket_call_and_a_16khz_bot(self) -> Any:
        daemon, bot = yield self.daemon_and_bot()
        ctx = yield register(daemon.http_port, assistant=ASSISTANT, key=API_KEY)
        client = fc.FakeChanWebSocket(fc.upgrade_request(f"/v1/talk/asterisk/ctx?ctx={ctx}"))
        yield protocol.ClientCreator(reactor, lambda: client).connectTCP(
            "127.0.0.1", daemon.http_port
        )
        yield client.handshake
        client.send_text(fc.media_start_json(ctx, fmt="slin16", frame_size=640))
        self.addCleanup(lambda: client.closed)
        self.addCleanup(client.close_like_asterisk)
        yield bot.wait_for("connected", ctx)
        sent = tone(50, hz=6000, rate=16000)
        for i, frame in enumerate(sent):
            reactor.callLater(0.02 * i, client.send_audio, frame)
        yield wait_until(lambda: len(b"".join(client.audio())) >= 45 * 640, timeout=15)
        self.assert_tone_came_back(b"".join(client.audio()), sent)
