"""Call control on two daemons sharing one real redis-server: every node answers for every call.

The media of a call lives on one node; the Calls resource, ``…/next``, ``…/outcome`` and the
outbound API answer on either, the record coming from Redis and commands relayed to the node
that holds the media over Redis pub/sub.
"""

from __future__ import annotations

import json
import os
from typing import Any

from treq.client import HTTPClient
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from rapida_tap.audiosocket.wire import Kind
from rapida_tap.contexts import new_context_id
from rapida_tap.control_rules import call_sid
from rapida_tap.reasons import EndReason
from tests.fake_ari import ANSWER, NO_ANSWER, FakeAri, serve_fake_ari
from tests.fake_bot import FakeBot
from tests.redis_server import RedisServer
from tests.support import (
    API_KEY,
    FakeAsterisk,
    capture_logs,
    connect_audiosocket,
    register,
    start_daemon,
    wait_until,
)
from tests.twilio_client import next_hop, outcome, twilio

ASSISTANT = "123456789"
DIAL = "<Response><Dial>+4930123456</Dial></Response>"
PASSWORD_ENV = "RAPIDA_TEST_NODES_ARI_PASSWORD"
ENDPOINT = "PJSIP/trunk/+4930123456"


class TwoNodeControlTests(TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        self.logs = capture_logs(self)
        self.redis = RedisServer(reactor)
        yield self.redis.start()
        self.addCleanup(self.redis.stop)  # runs last: after both daemons are stopped
        self.bot = FakeBot()
        self.addCleanup(self.bot.stop)
        self.ended: list[tuple[str, str, str]] = []
        self.a = self.node("a")
        self.b = self.node("b")
        yield wait_until(lambda: self.a.contexts.healthy and self.b.contexts.healthy)
        for node in (self.a, self.b):  # each listens on its own channel
            yield self.subscribed(f"rapida:node:{node.node_id}")

    def node(self, name: str, **settings: Any) -> Any:
        daemon = start_daemon(
            self,
            contexts=self.redis.url,
            assistants={ASSISTANT: {"url": self.bot.url}},
            transfer_endpoint="PJSIP/{to}@trunk",
            **settings,
        )
        daemon.bridge.call_ended.append(
            lambda call: self.ended.append((name, call.end_reason, call.end_detail))
        )
        return daemon

    @defer.inlineCallbacks
    def subscribed(self, channel: str) -> Any:
        """Wait until a node listens on ``channel``: PUBLISH answers how many got a probe
        (a reply to nobody's request, which the node drops)."""
        deadline = reactor.seconds() + 10
        probe = '{"id":"probe","reply":{}}'
        while (yield self.redis.command("PUBLISH", channel, probe)) != b":1":
            self.assertLess(reactor.seconds(), deadline, f"nobody subscribed to {channel}")
            yield deferLater(reactor, 0.02, lambda: None)

    @defer.inlineCallbacks
    def media_on(self, node: Any, ctx: str, streams: int) -> Any:
        client = FakeAsterisk(ctx)
        yield connect_audiosocket(node.as_port, client)

        def hang_up() -> defer.Deferred[None]:
            if client.connected_:
                client.transport.loseConnection()
            return client.closed

        self.addCleanup(hang_up)
        yield wait_until(
            lambda: len(self.bot.streams) >= streams and "start" in self.bot.streams[-1].events()
        )
        yield wait_until(lambda: ctx in node.bridge.calls)
        return client

    @defer.inlineCallbacks
    def record_shows(self, node: Any, ctx: str, status: str) -> Any:
        """Poll the Calls resource on ``node`` until the call has ``status`` (record writes
        are asynchronous); fire with the last reply's JSON."""
        last: dict[str, Any] = {}
        deadline = reactor.seconds() + 5
        while last.get("status") != status:
            self.assertLess(reactor.seconds(), deadline, f"status {status!r}: {last}")
            reply = yield twilio(node.http_port, "GET", call_sid(ctx))
            last = reply.json if reply.status == 200 else {}
            if last.get("status") != status:
                yield deferLater(reactor, 0.02, lambda: None)
        return last

    @defer.inlineCallbacks
    def test_transfer_and_hang_up_through_the_node_without_the_media(self) -> Any:
        ctx = yield register(self.a.http_port, assistant=ASSISTANT)
        client = yield self.media_on(self.b, ctx, streams=1)
        live = yield self.record_shows(self.a, ctx, "in-progress")
        self.assertEqual(live["from"], "+4930123456")

        reply = yield twilio(self.a.http_port, "POST", call_sid(ctx), {"Twiml": DIAL})
        self.assertEqual(reply.status, 200, reply.body)
        yield client.closed
        self.assertEqual(client.received[-1].kind, Kind.HANGUP)
        self.assertEqual(self.ended, [("b", EndReason.TRANSFER, "to +4930123456")])

        hop = yield next_hop(self.a.http_port, ctx)
        self.assertEqual((hop.status, hop.body), (200, b"PJSIP/+4930123456@trunk,30"))
        back = yield outcome(self.a.http_port, ctx, "NOANSWER")
        new_ctx = back.body.decode()
        self.assertEqual(len(new_ctx), 36)

        again = yield self.media_on(self.a, new_ctx, streams=2)
        params = self.bot.streams[1].of("start")[0]["start"]["customParameters"]
        self.assertEqual(params["transfer_status"], "no-answer")
        self.assertEqual(params["previous_call_sid"], call_sid(ctx))
        yield self.record_shows(self.b, new_ctx, "in-progress")
        hung = yield twilio(self.b.http_port, "POST", call_sid(new_ctx), {"Status": "completed"})
        self.assertEqual(hung.status, 200, hung.body)
        yield again.closed
        self.assertEqual(self.ended[-1][:2], ("a", EndReason.ASSISTANT_HANGUP))

        first = yield self.record_shows(self.b, ctx, "completed")
        self.assertEqual(first["rapida_transfer_status"], "no-answer")
        self.assertEqual(first["rapida_next_call_sid"], call_sid(new_ctx))
        gone = yield twilio(self.a.http_port, "POST", call_sid(new_ctx), {"Status": "completed"})
        self.assertEqual((gone.status, gone.json["code"]), (404, 20404))

    @defer.inlineCallbacks
    def test_with_redis_down_a_bot_still_hangs_up_its_calls_node_and_others_say_503(self) -> Any:
        ctx = yield register(self.a.http_port, assistant=ASSISTANT)
        client = yield self.media_on(self.a, ctx, streams=1)
        yield self.record_shows(self.b, ctx, "in-progress")
        yield self.redis.kill()
        elsewhere = yield twilio(self.b.http_port, "POST", call_sid(ctx), {"Status": "completed"})
        self.assertEqual((elsewhere.status, elsewhere.json["code"]), (503, 20503))
        hop = yield next_hop(self.b.http_port, ctx)
        self.assertEqual((hop.status, hop.body), (503, b""))
        self.assertTrue(client.connected_)
        self.assertIn(ctx, self.a.bridge.calls)
        here = yield twilio(self.a.http_port, "POST", call_sid(ctx), {"Status": "completed"})
        self.assertEqual((here.status, here.json.get("status")), (200, "in-progress"), here.body)
        yield client.closed
        self.assertEqual(
            self.ended, [("a", EndReason.ASSISTANT_HANGUP, "hung up through the Calls API")]
        )
        yield self.redis.start()  # the daemons' cleanup expects it

    @defer.inlineCallbacks
    def test_a_call_whose_node_is_gone_is_20404(self) -> Any:
        ctx = new_context_id()
        yield self.a.contexts.update_call(
            ctx,
            {"started": "1.0", "node": "0123456789abcdef", "account_sid": "rapida-asterisk"},
            60,
        )
        reply = yield twilio(self.b.http_port, "POST", call_sid(ctx), {"Status": "completed"})
        self.assertEqual((reply.status, reply.json["code"]), (404, 20404))
        shown = yield twilio(self.b.http_port, "GET", call_sid(ctx))
        self.assertEqual(shown.json["status"], "in-progress")


class TwoNodeOutboundTests(TwoNodeControlTests):
    """The outbound API on any node: placed on A, media on B, read and ended on either."""

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        os.environ[PASSWORD_ENV] = "ari-Pa55-nodes"
        self.addCleanup(os.environ.pop, PASSWORD_ENV, None)
        self.fake = FakeAri(reactor, user="rapida", password="ari-Pa55-nodes", answer_delay=0.05)
        self.server = serve_fake_ari(reactor, self.fake)
        self.addCleanup(self.server.stop)
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.http = HTTPClient(Agent(reactor, pool=pool))
        yield super().setUp()

    def node(self, name: str, **settings: Any) -> Any:
        if name == "a":
            settings["providers"] = {
                "pbx1": {
                    "ari_url": self.server.url,
                    "ari_user": "rapida",
                    "password_env": PASSWORD_ENV,
                    "trunk": "trunk",
                    "timeout": 2.0,
                }
            }
            settings["ring_check_interval"] = 0
        return super().node(name, **settings)

    @defer.inlineCallbacks
    def api(self, node: Any, method: str, path: str = "", body: Any = None) -> Any:
        url = f"http://127.0.0.1:{node.http_port}/v1/talk/asterisk/calls{path}"
        data = json.dumps(body).encode() if body is not None else None
        headers = {"X-Api-Key": API_KEY, "Content-Type": "application/json"}
        response = yield self.http.request(method, url, headers=headers, data=data)
        return response.code, json.loads((yield response.content()))

    @defer.inlineCallbacks
    def status_on(self, node: Any, ctx: str, status: str) -> Any:
        deadline = reactor.seconds() + 5
        while True:
            code, body = yield self.api(node, "GET", f"/{ctx}")
            if body.get("status") == status:
                return body
            self.assertLess(reactor.seconds(), deadline, f"{status!r}: {code} {body}")
            yield deferLater(reactor, 0.02, lambda: None)

    @defer.inlineCallbacks
    def test_placed_on_a_connected_on_b_read_and_ended_on_either(self) -> Any:
        phones: list[Any] = []

        def answer(request: Any) -> None:
            ctx = request.variables["RAPIDA_CONTEXT_ID"]
            phones.append(self.media_on(self.b, ctx, streams=1))

        self.fake.behave(ENDPOINT, ANSWER, on_answer=answer)
        code, placed = yield self.api(
            self.a, "POST", body={"assistant_id": ASSISTANT, "to": "+4930123456"}
        )
        self.assertEqual(code, 201, placed)
        ctx = placed["context_id"]
        yield wait_until(lambda: bool(phones))
        phone = yield phones[0]
        on_b = yield self.status_on(self.b, ctx, "connected")  # B never placed it
        self.assertEqual(on_b["provider"], "pbx1")
        twilio_view = yield self.record_shows(self.a, ctx, "in-progress")
        self.assertEqual(twilio_view["direction"], "outbound-api")

        code, ended = yield self.api(self.a, "DELETE", f"/{ctx}")  # relayed to B
        self.assertEqual(code, 200, ended)
        yield phone.closed
        self.assertEqual(self.ended, [("b", EndReason.API_HANGUP, "hung up through the API")])
        for node in (self.a, self.b):
            body = yield self.status_on(node, ctx, "ended")
            self.assertEqual(body["reason"], "api-hangup")

    @defer.inlineCallbacks
    def test_a_ringing_call_is_cancelled_through_the_other_node(self) -> Any:
        self.fake.behave(ENDPOINT, NO_ANSWER)
        code, placed = yield self.api(
            self.a, "POST", body={"assistant_id": ASSISTANT, "to": "+4930123456"}
        )
        ctx = placed["context_id"]
        ringing = yield self.status_on(self.b, ctx, "ringing")
        self.assertEqual(ringing["channel_id"], placed["channel_id"])
        shown = yield self.record_shows(self.b, ctx, "ringing")
        self.assertEqual(shown["rapida_end_reason"], None)
        code, body = yield self.api(self.b, "DELETE", f"/{ctx}")  # relayed to A, which placed it
        self.assertEqual((code, body["status"], body["reason"]), (200, "ended", "cancelled"))
        self.assertEqual(
            [r.method for r in self.fake.requests], ["POST", "DELETE"]
        )  # A hung the channel up through ARI
        done = yield self.record_shows(self.b, ctx, "canceled")
        self.assertEqual(done["status"], "canceled")
        unknown = new_context_id()
        code, body = yield self.api(self.b, "GET", f"/{unknown}")
        self.assertEqual((code, body["error"]), (404, "unknown_call"))
