"""A real Pipecat 1.x bot behind the daemon, over both Asterisk transports.

The bot (``tests/pipecat_bot.py``) runs as a child process: Pipecat's FastAPI WebSocket
transport and ``TwilioFrameSerializer`` exactly as a Pipecat user writes them, no AI services.
The daemon runs in the test's reactor with the bot as its assistant; a fake Asterisk calls in
over AudioSocket or chan_websocket.  One set of test bodies, one subclass per transport.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np
from twisted.internet import defer, reactor
from twisted.logger import LogLevel, eventAsText
from twisted.trial import unittest

from rapida_tap.assistants.config import build_registry, parse_assistants
from rapida_tap.assistants.upstream import stream_sids
from rapida_tap.media.codec import pcm_to_ulaw, ulaw_to_pcm
from rapida_tap.reasons import EndReason
from tests.callers import Caller, call_over_audiosocket, call_over_chan_websocket
from tests.pipecat_process import (
    PYTHON_ENV,
    NoPipecat,
    PipecatBotProcess,
    bot_python,
    start_pipecat_bot,
)
from tests.support import API_KEY, capture_logs, start_daemon, tone, wait_until

ASSISTANT_HANGUP, CALLER_HANGUP = EndReason.ASSISTANT_HANGUP, EndReason.CALLER_HANGUP
ASSISTANT = "pipecat"
FRAME_BYTES = 320


def as_heard(pcm: bytes) -> bytes:
    """``pcm`` after the μ-law legs of the path (daemon to bot and back)."""
    return ulaw_to_pcm(pcm_to_ulaw(pcm))


def correlation(a: bytes, b: bytes) -> float:
    """Pearson correlation of two PCM16 signals over their common length."""
    n = min(len(a), len(b)) // 2
    x = np.frombuffer(a[: 2 * n], dtype="<i2").astype(float)
    y = np.frombuffer(b[: 2 * n], dtype="<i2").astype(float)
    return float(np.corrcoef(x, y)[0, 1])


def within(d: defer.Deferred[Any], seconds: float, what: str) -> defer.Deferred[Any]:
    """``d``, failing with ``what`` if it has not fired within ``seconds``."""

    def explain(failure: Any) -> Any:
        failure.trap(defer.TimeoutError)
        raise AssertionError(f"{what}: not within {seconds}s")

    return d.addTimeout(seconds, reactor).addErrback(explain)


class PipecatCallTests:
    """The test bodies; a subclass sets ``connect_caller`` to one transport's."""

    timeout = 90
    connect_caller: Any

    def setUp(self) -> None:
        self.logs = capture_logs(self)
        self.ended: list[tuple[str, str]] = []

    @defer.inlineCallbacks
    def call(self, mode: str, *options: str) -> Any:
        """The bot, the daemon with the bot as its assistant, and a caller whose stream the
        bot has started; fires with ``(bot, daemon, caller, call_sid)``."""
        bot: PipecatBotProcess = yield start_pipecat_bot(self, mode, *options)
        daemon = start_daemon(self, assistants={ASSISTANT: {"url": bot.url}})
        daemon.bridge.call_ended.append(
            lambda call: self.ended.append((call.end_reason, call.end_detail))
        )
        caller: Caller = yield self.connect_caller(daemon, ASSISTANT)
        self.addCleanup(self.hang_up, caller)
        call_sid = stream_sids(caller.ctx)[1]
        yield bot.wait_for("ready", call_sid)
        return bot, daemon, caller, call_sid

    def hang_up(self, caller: Caller) -> defer.Deferred[None]:
        caller.hang_up()
        return caller.closed

    def reasons(self) -> list[str]:
        return [reason for reason, _detail in self.ended]

    def bad_log_lines(self) -> list[str]:
        """Tracebacks, failures, error and critical lines in the daemon's log."""
        return [
            eventAsText(e)
            for e in self.logs.events
            if e.get("log_failure") is not None
            or e.get("log_level") in (LogLevel.error, LogLevel.critical)
        ]

    def assert_log_clean(self) -> None:
        self.assertEqual(self.bad_log_lines(), [])

    # -- the call as Pipecat sees it --------------------------------------------------

    @defer.inlineCallbacks
    def test_pipecat_takes_the_stream_for_a_twilio_call(self) -> Any:
        bot, _daemon, caller, call_sid = yield self.call("echo")
        [connected] = bot.of("connected", call_sid)
        self.assertEqual(connected["transport_type"], "twilio")
        self.assertEqual(connected["stream_id"], stream_sids(caller.ctx)[0])
        self.assertEqual(connected["from_number"], "+4930123456")
        self.assertEqual(connected["body"]["context_id"], caller.ctx)
        self.assertEqual(connected["body"]["transport"], caller.transport_name)

    # -- audio both ways ----------------------------------------------------------------

    @defer.inlineCallbacks
    def test_the_bot_echoes_what_the_caller_says(self) -> Any:
        _bot, _daemon, caller, _sid = yield self.call("echo")
        talker = caller.talk(50)
        yield talker.done
        # Pipecat sends 40 ms per message: at most one frame can wait for its pair.
        yield wait_until(lambda: len(caller.speech()) >= 48, timeout=10)
        heard = b"".join(caller.speech())
        sent = as_heard(b"".join(talker.sent))
        self.assertGreater(correlation(heard, sent), 0.99)
        self.assertEqual(heard, sent[: len(heard)])

    @defer.inlineCallbacks
    def test_the_bots_tone_reaches_the_caller(self) -> Any:
        _bot, _daemon, caller, _sid = yield self.call("tone", "--tone-ms", "1000")
        yield wait_until(lambda: len(caller.speech()) >= 50, timeout=10)
        heard = b"".join(caller.speech())
        self.assertEqual(len(heard), 50 * FRAME_BYTES)
        self.assertGreater(correlation(heard, as_heard(b"".join(tone(50)))), 0.99)

    # -- DTMF and barge-in --------------------------------------------------------------

    @defer.inlineCallbacks
    def test_dtmf_reaches_the_bot_and_hash_ends_the_call(self) -> Any:
        bot, _daemon, caller, call_sid = yield self.call("echo", "--end-silence", "0")
        caller.send_dtmf("5")
        yield bot.wait_for("dtmf", call_sid)
        caller.send_dtmf("#")
        yield within(caller.closed, 15, "the daemon hangs up after the bot")
        self.assertEqual([e["digit"] for e in bot.of("dtmf", call_sid)], ["5", "#"])
        self.assertEqual(caller.daemon_hangup(), caller.expected_hangup())
        self.assertEqual(self.reasons(), [ASSISTANT_HANGUP])
        finished = yield bot.wait_for("finished", call_sid)
        self.assertEqual(finished["frame"], "EndFrame")
        self.assert_log_clean()

    @defer.inlineCallbacks
    def test_an_interruption_clears_what_the_daemon_queued(self) -> Any:
        # 5 s of tone in 1 s messages: the daemon holds up to 50 frames when the bot is
        # interrupted, so a `clear` it ignored would be heard (as 50 more frames).
        bot, daemon, caller, call_sid = yield self.call(
            "tone", "--tone-ms", "5000", "--chunk-ms", "1000", "--end-silence", "0"
        )
        yield wait_until(lambda: len(caller.speech()) >= 1, timeout=10)
        call = daemon.bridge.calls[caller.ctx]
        self.assertGreater(call.queued_frames, 25)
        caller.send_dtmf("1")
        yield bot.wait_for("interrupt", call_sid)
        yield wait_until(lambda: call.queued_frames == 0, timeout=5)
        if caller.flushes() is not None:
            yield wait_until(lambda: caller.flushes() == 1, timeout=5)
        caller.send_dtmf("#")  # goodbye (200 ms) and hang up: everything queued is heard
        yield within(caller.closed, 15, "the daemon hangs up after the bot")
        self.assertLess(len(caller.speech()), 10 + 25)
        self.assertEqual(caller.daemon_hangup(), caller.expected_hangup())
        self.assertEqual(self.reasons(), [ASSISTANT_HANGUP])
        self.assert_log_clean()

    # -- endings ------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_the_bot_hangs_up_while_the_caller_talks(self) -> Any:
        # Pipecat's defaults: after its goodbye it sends 2 s of silence
        # (audio_out_end_silence_secs), then closes the WebSocket; the caller never stops.
        bot, _daemon, caller, call_sid = yield self.call("hangup-after")
        caller.talk()
        yield bot.wait_for("hangup", call_sid)
        yield within(caller.closed, 20, "the daemon hangs up after the bot")
        yield wait_until(lambda: self.ended, timeout=5)
        self.assertEqual(
            {
                "toward Asterisk": caller.daemon_hangup(),
                "end reasons": self.reasons(),
                "bad log lines": len(self.bad_log_lines()),
            },
            {
                "toward Asterisk": caller.expected_hangup(),
                "end reasons": [ASSISTANT_HANGUP],
                "bad log lines": 0,
            },
        )
        finished = yield bot.wait_for("finished", call_sid)
        self.assertEqual(finished["frame"], "EndFrame")
        yield bot.wait_for("ended", call_sid)

    # -- hanging up through the Calls resource (auto_hang_up=True, base_url set) ---------

    @defer.inlineCallbacks
    def call_with_hang_up_api(self, mode: str, *options: str) -> Any:
        """As ``call``, the bot on Pipecat's defaults with only ``base_url`` (and credentials)
        set: the daemon starts first, so the bot can be told its URL."""
        daemon = start_daemon(self, assistants={ASSISTANT: {"url": "ws://127.0.0.1:9/ws"}})
        daemon.bridge.call_ended.append(
            lambda call: self.ended.append((call.end_reason, call.end_detail))
        )
        base_url = f"http://127.0.0.1:{daemon.http_port}"
        bot: PipecatBotProcess = yield start_pipecat_bot(
            self,
            mode,
            "--base-url",
            base_url,
            "--auth-token",
            API_KEY,
            "--log-level",
            "DEBUG",
            *options,
        )
        spec = parse_assistants({ASSISTANT: {"url": bot.url}}, "", {})
        daemon.bridge.assistants = build_registry(spec, reactor)
        caller: Caller = yield self.connect_caller(daemon, ASSISTANT)
        self.addCleanup(self.hang_up, caller)
        call_sid = stream_sids(caller.ctx)[1]
        yield bot.wait_for("ready", call_sid)
        return bot, daemon, caller, call_sid

    @defer.inlineCallbacks
    def test_a_bot_with_auto_hang_up_hangs_up_through_the_calls_resource(self) -> Any:
        bot, _daemon, caller, call_sid = yield self.call_with_hang_up_api(
            "hangup-after", "--goodbye-ms", "600"
        )
        caller.talk()
        yield bot.wait_for("hangup", call_sid)
        yield within(caller.closed, 20, "the daemon hangs up after the bot")
        yield bot.wait_for("ended", call_sid)
        self.assertIn(f"Successfully terminated Twilio call {call_sid}", bot.log_tail(20000))
        self.assertNotIn("Failed to terminate", bot.log_tail(20000))
        self.assertEqual(caller.daemon_hangup(), caller.expected_hangup())
        self.assertEqual(self.reasons(), [ASSISTANT_HANGUP])
        self.assertIn(
            self.ended[0][1], ("hung up through the Calls API", "bot closed the stream (1000)")
        )
        self.assertIn(f"Calls API: {call_sid} hang-up", self.logs.text())
        self.assert_log_clean()

    @defer.inlineCallbacks
    def test_a_caller_hangup_stops_the_bot(self) -> Any:
        bot, _daemon, caller, call_sid = yield self.call("echo")
        talker = caller.talk(25)
        yield talker.done
        caller.hang_up()
        ended = yield bot.wait_for("ended", call_sid)
        self.assertEqual(ended["frames_in"], 25)
        self.assertTrue(bot.of("disconnected", call_sid))
        self.assertEqual(bot.of("finished", call_sid)[0]["frame"], "CancelFrame")
        self.assertEqual(self.reasons(), [CALLER_HANGUP])
        self.assert_log_clean()


class PipecatOverAudioSocketTests(PipecatCallTests, unittest.TestCase):
    connect_caller = staticmethod(call_over_audiosocket)


class PipecatOverChanWebSocketTests(PipecatCallTests, unittest.TestCase):
    connect_caller = staticmethod(call_over_chan_websocket)


class BotProcessTests(unittest.SynchronousTestCase):
    def test_reports_are_read_line_by_line_whatever_the_chunks(self) -> None:
        bot = PipecatBotProcess()
        ports: list[int] = []
        bot.listening.addCallback(ports.append)
        bot.outReceived(b'{"event": "listen')
        bot.outReceived(b'ing", "port": 4321}\nnot json\n')
        bot.outReceived(b'{"event": "ready", "call": "CA1"}\n[1]\n{"ev')
        self.assertEqual(ports, [4321])
        self.assertEqual(bot.url, "ws://127.0.0.1:4321/ws")
        events = [e["event"] for e in bot.events]
        self.assertEqual(events, ["listening", "stdout", "ready", "stdout"])
        self.assertEqual(bot.events[1]["text"], "not json")
        self.assertEqual(bot.of("ready", "CA1"), [{"event": "ready", "call": "CA1"}])

    def test_a_missing_pipecat_environment_fails_saying_how_to_make_it(self) -> None:
        self.patch(os, "environ", {**os.environ, PYTHON_ENV: "/nonexistent/bin/python"})
        with self.assertRaises(NoPipecat) as caught:
            bot_python()
        message = str(caught.exception)
        self.assertIn("no Python for the Pipecat bot at /nonexistent/bin/python", message)
        self.assertIn("tests/pipecat-bot-requirements.txt", message)
        self.assertIn(PYTHON_ENV, message)

    def test_the_environment_variable_names_the_interpreter(self) -> None:
        self.patch(os, "environ", {**os.environ, PYTHON_ENV: sys.executable})
        self.assertEqual(bot_python(), sys.executable)
