"""Call control end to end on one node: a fake Asterisk, a real WebSocket bot, real HTTP.

The test plays the bot's REST client (the Calls resource) and the dialplan (``CURL()`` of
``…/next`` and ``…/outcome``), as ``etc/extensions-*.conf`` would after ``AudioSocket()``.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer
from twisted.trial import unittest

from rapida_tap.audiosocket.wire import Kind
from rapida_tap.control_rules import call_sid
from rapida_tap.reasons import EndReason
from tests.callers import call_over_chan_websocket
from tests.fake_bot import FakeBot
from tests.support import (
    API_KEY,
    FakeAsterisk,
    capture_logs,
    connect_audiosocket,
    curl_get,
    raw_http,
    register,
    start_daemon,
    wait_until,
)
from tests.test_quality import SentEvents
from tests.twilio_client import (
    exchange,
    next_hop,
    outcome,
    pipecat_hang_up,
    twilio,
)

ASSISTANT = "123456789"
DIAL = (
    '<Response><Dial timeout="20" callerId="+4930999"><Number>+4930123456</Number></Dial>'
    "</Response>"
)


class CallControlTestCase(unittest.TestCase):
    timeout = 20

    def setUp(self) -> None:
        self.logs = capture_logs(self)
        self.ended: list[tuple[str, str]] = []

    def bot(self, **options: Any) -> FakeBot:
        bot = FakeBot(**options)
        self.addCleanup(bot.stop)
        return bot

    def daemon(self, bot: FakeBot, assistant: dict[str, Any] | None = None, **settings: Any) -> Any:
        settings.setdefault("transfer_endpoint", "PJSIP/{to}@trunk")
        daemon = start_daemon(
            self, assistants={ASSISTANT: {"url": bot.url, **(assistant or {})}}, **settings
        )
        daemon.bridge.call_ended.append(
            lambda call: self.ended.append((call.end_reason, call.end_detail))
        )
        return daemon

    @defer.inlineCallbacks
    def connect(self, daemon: Any, ctx: str, bot: FakeBot, streams: int = 1) -> Any:
        client = FakeAsterisk(ctx)
        yield connect_audiosocket(daemon.as_port, client)

        def hang_up() -> defer.Deferred[None]:
            if client.connected_:
                client.transport.loseConnection()
            return client.closed

        self.addCleanup(hang_up)
        yield wait_until(
            lambda: len(bot.streams) >= streams and "start" in bot.streams[-1].events()
        )
        yield wait_until(lambda: ctx in daemon.bridge.calls)
        return client

    @defer.inlineCallbacks
    def call(self, daemon: Any, bot: FakeBot) -> Any:
        ctx = yield register(daemon.http_port, assistant=ASSISTANT)
        client = yield self.connect(daemon, ctx, bot)
        return client, ctx

    def heard(self, client: FakeAsterisk) -> list[bytes]:
        return [r.payload for r in client.audio() if any(r.payload)]

    def assert_twilio_error(self, reply: Any, status: int, code: int, message: str = "") -> None:
        self.assertEqual(reply.status, status, reply.body)
        body = reply.json
        self.assertEqual(set(body), {"code", "message", "more_info", "status"})
        self.assertEqual((body["code"], body["status"]), (code, status))
        self.assertEqual(body["more_info"], f"https://www.twilio.com/docs/errors/{code}")
        self.assertIn(message, body["message"])


class HangUpTests(CallControlTestCase):
    @defer.inlineCallbacks
    def test_pipecat_hang_up_plays_the_queued_audio_first_then_ends_the_call(self) -> Any:
        bot = self.bot(greeting_frames=50)  # 1 s of audio sent at once when the stream starts
        daemon = self.daemon(bot)
        client, ctx = yield self.call(daemon, bot)
        sid = call_sid(ctx)
        self.assertEqual(bot.streams[0].of("start")[0]["start"]["callSid"], sid)

        reply = yield exchange(daemon.http_port, pipecat_hang_up(daemon.http_port, sid))
        self.assertEqual(reply.status, 200, reply.body)
        self.assertEqual((reply.json["sid"], reply.json["status"]), (sid, "in-progress"))
        self.assertEqual(reply.json["account_sid"], "rapida-asterisk")
        self.assertTrue(client.connected_)  # the greeting still plays

        yield client.closed
        self.assertEqual(len(self.heard(client)), 50)  # every frame was heard, then 0x00
        self.assertEqual(client.received[-1].kind, Kind.HANGUP)
        self.assertEqual(
            self.ended, [(EndReason.ASSISTANT_HANGUP, "hung up through the Calls API")]
        )

        # Pipecat's second attempt (or a late one) reads 20404 as "already ended".
        again = yield exchange(daemon.http_port, pipecat_hang_up(daemon.http_port, sid))
        self.assert_twilio_error(again, 404, 20404, f"/Calls/{sid}.json was not found")
        done = yield twilio(daemon.http_port, "GET", sid)
        self.assertEqual(done.status, 200)
        self.assertEqual(done.json["status"], "completed")
        self.assertEqual(done.json["rapida_end_reason"], "assistant-hangup")
        self.assertIsNotNone(done.json["end_time"])
        self.assertEqual(done.json["uri"], f"/2010-04-01/Accounts/rapida-asterisk/Calls/{sid}.json")

    @defer.inlineCallbacks
    def test_twiml_hangup_ends_the_call_and_canceled_is_accepted_too(self) -> Any:
        bot = self.bot()
        daemon = self.daemon(bot)
        client, ctx = yield self.call(daemon, bot)
        reply = yield twilio(
            daemon.http_port, "POST", call_sid(ctx), {"Twiml": "<Response><Hangup/></Response>"}
        )
        self.assertEqual(reply.status, 200, reply.body)
        yield client.closed
        client2, ctx2 = yield self.call(daemon, bot)
        reply = yield twilio(daemon.http_port, "POST", call_sid(ctx2), {"Status": "canceled"})
        self.assertEqual(reply.status, 200, reply.body)
        yield client2.closed
        self.assertEqual([r for r, _ in self.ended], [EndReason.ASSISTANT_HANGUP] * 2)

    @defer.inlineCallbacks
    def test_a_wrong_token_or_account_is_401_in_twilios_shape(self) -> Any:
        bot = self.bot()
        daemon = self.daemon(bot)
        client, ctx = yield self.call(daemon, bot)
        sid = call_sid(ctx)
        for kwargs in (
            {"key": "wrong-key-0123456789"},
            {"key": None},
            {"user": "AC-someone-else"},
            {"key": API_KEY[:-1]},
        ):
            reply = yield twilio(daemon.http_port, "POST", sid, {"Status": "completed"}, **kwargs)
            self.assert_twilio_error(reply, 401, 20003, "Authenticate")
            self.assertEqual(reply.headers["www-authenticate"], 'Basic realm="rapida-asterisk"')
        self.assertTrue(client.connected_)
        self.assertIn(ctx, daemon.bridge.calls)
        self.assertNotIn(API_KEY, self.logs.text())

    @defer.inlineCallbacks
    def test_unknown_calls_and_paths_are_20404(self) -> Any:
        bot = self.bot()
        daemon = self.daemon(bot)
        unknown = call_sid(str(uuid.uuid4()))
        for method, sid, path in (
            ("POST", unknown, None),
            ("GET", unknown, None),
            ("GET", "CA-not-a-sid", None),
            ("GET", unknown, f"/2010-04-01/Accounts/rapida-asterisk/Calls/{unknown}"),
            ("GET", unknown, f"/2010-04-01/Accounts/rapida-asterisk/Conferences/{unknown}.json"),
        ):
            form = {"Status": "completed"} if method == "POST" else None
            reply = yield twilio(daemon.http_port, method, sid, form, path=path)
            self.assert_twilio_error(reply, 404, 20404, "was not found")
        put = yield twilio(daemon.http_port, "DELETE", unknown)
        self.assert_twilio_error(put, 405, 20004, "Method not allowed")

    @defer.inlineCallbacks
    def test_unsupported_twiml_url_and_status_are_400_naming_them(self) -> Any:
        bot = self.bot()
        daemon = self.daemon(bot)
        client, ctx = yield self.call(daemon, bot)
        sid = call_sid(ctx)
        cases = [
            ({"Twiml": "<Response><Say>Bye</Say></Response>"}, 12200, "<Say>"),
            ({"Twiml": "<Response><Dial><Queue>q</Queue></Dial></Response>"}, 12200, "<Queue>"),
            ({"Twiml": "<Response><Hangup/>"}, 12100, "not well-formed"),
            ({"Twiml": '<!DOCTYPE x [<!ENTITY a "b">]><Response/>'}, 12100, "document type"),
            ({"Url": "https://bot.example/twiml"}, 21205, "Url is not supported"),
            ({"Status": "ringing"}, 21220, "'ringing' is not supported"),
            ({"Status": "completed", "Twiml": "<Response><Hangup/></Response>"}, 20001, "either"),
        ]
        for form, code, message in cases:
            reply = yield twilio(daemon.http_port, "POST", sid, form)
            self.assert_twilio_error(reply, 400, code, message)
        too_big = yield twilio(daemon.http_port, "POST", sid, {"Twiml": "x" * 20000})
        self.assertEqual((too_big.status, too_big.body), (413, b""))  # refused before reading
        nothing = yield twilio(daemon.http_port, "POST", sid, {})
        self.assertEqual((nothing.status, nothing.json["status"]), (200, "in-progress"))
        self.assertTrue(client.connected_)
        self.assertEqual(self.ended, [])


class TransferTests(CallControlTestCase):
    @defer.inlineCallbacks
    def transfer(self, daemon: Any, bot: FakeBot, twiml: str = DIAL) -> Any:
        client, ctx = yield self.call(daemon, bot)
        reply = yield twilio(daemon.http_port, "POST", call_sid(ctx), {"Twiml": twiml})
        self.assertEqual(reply.status, 200, reply.body)
        self.assertEqual(reply.json["status"], "in-progress")
        yield client.closed
        self.assertEqual(client.received[-1].kind, Kind.HANGUP)  # AudioSocket() returns
        return ctx

    @defer.inlineCallbacks
    def test_transfer_to_a_target_that_answers(self) -> Any:
        bot = self.bot(greeting_frames=10)
        daemon = self.daemon(bot)
        sent = SentEvents()
        daemon.events.sender = sent  # what would go to the webhook endpoints
        ctx = yield self.transfer(daemon, bot)
        self.assertEqual(self.ended, [(EndReason.TRANSFER, "to +4930123456")])

        hop = yield next_hop(daemon.http_port, ctx)
        self.assertEqual((hop.status, hop.body), (200, b"PJSIP/+4930123456@trunk,20,f(+4930999)"))
        self.assertEqual(hop.headers["connection"], "close")
        again = yield next_hop(daemon.http_port, ctx)  # a second ask dials nothing
        self.assertEqual((again.status, again.body), (200, b""))
        dialing = yield twilio(daemon.http_port, "GET", call_sid(ctx))
        self.assertEqual(dialing.json["status"], "in-progress")
        self.assertEqual(dialing.json["rapida_transfer_status"], "dialing")
        self.assertEqual(dialing.json["rapida_end_reason"], "transfer")

        report = yield outcome(daemon.http_port, ctx, "ANSWER")
        self.assertEqual((report.status, report.body), (200, b""))  # no way back: hang up
        [(event, data)] = [(e, d) for e, d in sent.sent if e == "call.transferred"]
        self.assertEqual(data["context_id"], ctx)
        self.assertEqual(
            data["transfer"],
            {"to": "+4930123456", "outcome": "completed", "dialstatus": "ANSWER"},
        )
        done = yield twilio(daemon.http_port, "GET", call_sid(ctx))
        self.assertEqual(done.json["status"], "completed")
        self.assertEqual(done.json["rapida_transfer_to"], "+4930123456")
        self.assertEqual(done.json["rapida_transfer_status"], "completed")
        self.assertIsNone(done.json["rapida_next_call_sid"])
        self.assertIn(f"call {ctx} ended: transfer (to +4930123456)", self.logs.text())
        self.assertIn(
            f"call {ctx} transfer to +4930123456 ended: completed (DIALSTATUS=ANSWER)",
            self.logs.text(),
        )
        metrics = yield raw_http(
            daemon.http_port, curl_get("/metrics", headers={"Connection": "close"})
        )
        families = {f.name: f for f in text_string_to_metric_families(metrics.body.decode())}
        samples = {s.labels.get("outcome"): s.value for s in families["rapida_transfers"].samples}
        self.assertEqual(samples, {"completed": 1.0})
        ended = {
            (s.labels["reason"]): s.value
            for s in families["rapida_calls_ended"].samples
            if s.name.endswith("_total")
        }
        self.assertEqual(ended, {"transfer": 1.0})

    @defer.inlineCallbacks
    def test_nobody_answers_and_the_caller_returns_to_the_bot(self) -> Any:
        bot = self.bot()
        daemon = self.daemon(bot)
        ctx = yield self.transfer(daemon, bot)
        hop = yield next_hop(daemon.http_port, ctx)
        self.assertTrue(hop.body.startswith(b"PJSIP/+4930123456@trunk,"))

        report = yield outcome(daemon.http_port, ctx, "NOANSWER")
        self.assertEqual(report.status, 200)
        back = report.body.decode()
        self.assertEqual(str(uuid.UUID(back)), back)  # a context id: the dialplan goes to talk

        yield self.connect(daemon, back, bot, streams=2)
        params = bot.streams[1].of("start")[0]["start"]["customParameters"]
        self.assertEqual(params["transfer_status"], "no-answer")
        self.assertEqual(params["previous_call_sid"], call_sid(ctx))
        self.assertEqual(params["previous_context_id"], ctx)
        self.assertEqual(params["caller"], "+4930123456")
        first = yield twilio(daemon.http_port, "GET", call_sid(ctx))
        self.assertEqual(first.json["rapida_transfer_status"], "no-answer")
        self.assertEqual(first.json["rapida_next_call_sid"], call_sid(back))
        self.assertEqual(first.json["status"], "completed")
        second = yield twilio(daemon.http_port, "GET", call_sid(back))
        self.assertEqual(second.json["status"], "in-progress")
        self.assertEqual(second.json["parent_call_sid"], call_sid(ctx))

        late = yield outcome(daemon.http_port, ctx, "NOANSWER")  # the way back is single use
        self.assertEqual((late.status, late.body), (200, b""))

    @defer.inlineCallbacks
    def test_busy_target_without_fallback_hangs_up(self) -> Any:
        bot = self.bot()
        daemon = self.daemon(bot, {"transfer_fallback": False})
        ctx = yield self.transfer(daemon, bot)
        yield next_hop(daemon.http_port, ctx)
        report = yield outcome(daemon.http_port, ctx, "BUSY")
        self.assertEqual((report.status, report.body), (200, b""))
        done = yield twilio(daemon.http_port, "GET", call_sid(ctx))
        self.assertEqual(done.json["rapida_transfer_status"], "busy")

    @defer.inlineCallbacks
    def test_sip_target_and_assistant_template(self) -> Any:
        bot = self.bot()
        daemon = self.daemon(
            bot,
            {"transfer_sip_endpoint": "PJSIP/agents/{uri}"},
            transfer_endpoint="Local/{to}@agents",
        )
        ctx = yield self.transfer(
            daemon, bot, "<Response><Dial><Sip>sip:alice@pbx.example.com</Sip></Dial></Response>"
        )
        hop = yield next_hop(daemon.http_port, ctx)
        self.assertEqual(hop.body, b"PJSIP/agents/sip:alice@pbx.example.com,30")

    @defer.inlineCallbacks
    def test_a_target_without_a_template_is_refused_and_the_call_goes_on(self) -> Any:
        bot = self.bot()
        daemon = self.daemon(bot, transfer_endpoint="")
        client, ctx = yield self.call(daemon, bot)
        reply = yield twilio(daemon.http_port, "POST", call_sid(ctx), {"Twiml": DIAL})
        self.assert_twilio_error(reply, 400, 13223, "no transfer_endpoint is configured")
        self.assertTrue(client.connected_)
        hop = yield next_hop(daemon.http_port, ctx)
        self.assertEqual((hop.status, hop.body), (200, b""))  # nothing to dial: hang up

    @defer.inlineCallbacks
    def test_dialplan_steps_refuse_with_empty_bodies(self) -> Any:
        bot = self.bot()
        daemon = self.daemon(bot)
        client, ctx = yield self.call(daemon, bot)
        cases = [
            (next_hop(daemon.http_port, ctx, key="wrong-key-0123456789"), 401),
            (next_hop(daemon.http_port, str(uuid.uuid4())), 404),
            (next_hop(daemon.http_port, "not-a-context-id"), 404),
            (outcome(daemon.http_port, ctx, "NO%20ANSWER"), 400),
            (outcome(daemon.http_port, ctx, "ANSWER"), 404),  # no transfer was asked for
        ]
        for request, status in cases:
            reply = yield request
            self.assertEqual((reply.status, reply.body), (status, b""), reply)
            self.assertEqual(reply.headers["content-length"], "0")
        self.assertTrue(client.connected_)
        self.assertIn("transfer next refused: 401", self.logs.text())


class RecordTests(CallControlTestCase):
    @defer.inlineCallbacks
    def test_get_shows_a_live_call_in_twilios_shape(self) -> Any:
        bot = self.bot()
        daemon = self.daemon(bot)
        client, ctx = yield self.call(daemon, bot)
        reply = yield twilio(daemon.http_port, "GET", call_sid(ctx))
        body = reply.json
        self.assertEqual(body["status"], "in-progress")
        self.assertEqual(body["direction"], "inbound")
        self.assertEqual(body["from"], "+4930123456")
        self.assertEqual(body["api_version"], "2010-04-01")
        self.assertRegex(body["start_time"], r"^\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d \+0000$")
        self.assertIsNone(body["end_time"])
        self.assertEqual(json.loads(reply.body)["rapida_context_id"], ctx)


class ChanWebSocketTransferTests(CallControlTestCase):
    @defer.inlineCallbacks
    def test_a_transfer_ends_the_websocket_leg_so_dial_g_goes_on(self) -> Any:
        bot = self.bot(greeting_frames=10)
        daemon = self.daemon(bot)
        caller = yield call_over_chan_websocket(daemon, ASSISTANT)
        self.addCleanup(lambda: (caller.hang_up(), caller.closed)[1])
        yield wait_until(lambda: bot.streams and "start" in bot.streams[-1].events())
        reply = yield twilio(daemon.http_port, "POST", call_sid(caller.ctx), {"Twiml": DIAL})
        self.assertEqual(reply.status, 200, reply.body)
        yield caller.closed
        self.assertEqual(caller.daemon_hangup(), "HANGUP then close 1000")
        self.assertEqual(len(caller.speech()), 10)  # the bot's words were played first
        self.assertEqual(self.ended, [(EndReason.TRANSFER, "to +4930123456")])
        hop = yield next_hop(daemon.http_port, caller.ctx)
        self.assertEqual(hop.body, b"PJSIP/+4930123456@trunk,20,f(+4930999)")
