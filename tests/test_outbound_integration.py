"""Outbound calls end to end over real HTTP on 127.0.0.1: the daemon's API, FakeAri, AudioSocket.

On ``answer`` the test does what the ``rapida-outbound`` dialplan does: it connects an
AudioSocket presenting the ``RAPIDA_CONTEXT_ID`` variable that ARI received.
"""

from __future__ import annotations

import json
import os
from typing import Any

from treq.client import HTTPClient
from twisted.internet import defer
from twisted.internet import reactor as global_reactor
from twisted.internet.protocol import Factory
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from rapida_tap.audiosocket.wire import Kind
from rapida_tap.config import ConfigError, Settings
from rapida_tap.node import Daemon
from tests.fake_ari import ANSWER, BUSY, ERROR, HANG, NO_ANSWER, FakeAri, serve_fake_ari
from tests.support import (
    API_KEY,
    FakeAsterisk,
    capture_logs,
    connect_audiosocket,
    start_daemon,
    tone,
    wait_until,
)

reactor: Any = global_reactor
USER, PASSWORD = "rapida", "ari-Pa55-integration"
PASSWORD_ENV = "RAPIDA_TEST_OUTBOUND_ARI_PASSWORD"
NUMBER = "+4930123456"
ENDPOINT = "PJSIP/trunk/+4930123456"
SILENCE = bytes(320)


def provider_table(url: str, **overrides: Any) -> dict[str, Any]:
    table: dict[str, Any] = dict(
        ari_url=url, ari_user=USER, password_env=PASSWORD_ENV, trunk="trunk", timeout=2.0
    )
    table.update(overrides)
    return table


class Reply:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def json(self) -> Any:
        assert self.headers.get("content-type") == "application/json", self.headers
        return json.loads(self.body)


class OutboundTestCase(TestCase):
    timeout = 20

    def setUp(self) -> None:
        os.environ[PASSWORD_ENV] = PASSWORD
        self.addCleanup(os.environ.pop, PASSWORD_ENV, None)
        self.logs = capture_logs(self)
        self.fake = FakeAri(reactor, user=USER, password=PASSWORD, answer_delay=0.05)
        self.server = serve_fake_ari(reactor, self.fake)
        self.addCleanup(self.server.stop)
        self.phones: list[FakeAsterisk] = []
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.http = HTTPClient(Agent(reactor, pool=pool))

    def start(self, providers: dict[str, Any] | None = None, **settings: Any) -> Daemon:
        if providers is None:
            providers = {"pbx1": provider_table(self.server.url)}
        settings.setdefault("ring_check_interval", 0.2)
        self.daemon = start_daemon(self, providers=providers, **settings)
        self.addCleanup(self.hang_up_phones)
        self.addCleanup(self.daemon.outbound.stop)
        return self.daemon

    def hang_up_phones(self) -> defer.Deferred[Any]:
        for phone in self.phones:
            if phone.connected_:
                phone.transport.loseConnection()
        return defer.gatherResults([p.closed for p in self.phones])

    def answer_like_the_dialplan(self, request: Any, frames: list[bytes] | None = None) -> None:
        phone = FakeAsterisk(request.variables["RAPIDA_CONTEXT_ID"], frames or [])
        self.phones.append(phone)
        connect_audiosocket(self.daemon.as_port, phone)

    @defer.inlineCallbacks
    def api(
        self,
        method: str,
        path: str = "",
        body: Any = None,
        *,
        key: str | None = API_KEY,
        data: bytes | None = None,
        content_type: str = "application/json",
    ) -> Any:
        headers = {"Content-Type": content_type}
        if key is not None:
            headers["X-Api-Key"] = key
        if body is not None:
            data = json.dumps(body).encode()
        url = f"http://127.0.0.1:{self.daemon.http_port}/v1/talk/asterisk/calls{path}"
        response = yield self.http.request(method, url, headers=headers, data=data)
        content = yield response.content()
        return Reply(
            response.code,
            {k.decode().lower(): v[-1].decode() for k, v in response.headers.getAllRawHeaders()},
            content,
        )

    def call(self, **body: Any) -> Any:
        return self.api("POST", body={"assistant_id": "bot-1", "to": NUMBER, **body})

    @defer.inlineCallbacks
    def status_becomes(self, context_id: str, status: str) -> Any:
        """Poll the API until the call has ``status``; fire with the last status JSON."""
        last: dict[str, Any] = {}

        @defer.inlineCallbacks
        def poll() -> Any:
            while last.get("status") != status:
                reply = yield self.api("GET", f"/{context_id}")
                last.clear()
                last.update(reply.json)
                if last.get("status") != status:
                    yield deferLater(0.02)

        yield poll().addTimeout(5, reactor)
        return dict(last)

    def assert_error(self, reply: Reply, status: int, code: str, message: str = "") -> None:
        self.assertEqual(reply.status, status, reply.body)
        self.assertEqual(reply.json["error"], code)
        self.assertIn(message, reply.json["message"])


def deferLater(seconds: float) -> defer.Deferred[None]:
    from twisted.internet import task

    return task.deferLater(reactor, seconds, lambda: None)


class AnsweredCallTests(OutboundTestCase):
    @defer.inlineCallbacks
    def test_answered_call_runs_through_the_echo_bridge(self) -> None:
        self.start()
        sent = tone(10)
        self.fake.behave(
            ENDPOINT, ANSWER, on_answer=lambda r: self.answer_like_the_dialplan(r, sent)
        )
        reply = yield self.call(**{"from": "+4930999", "variables": {"CUSTOMER": "42"}})
        self.assertEqual(reply.status, 201, reply.body)
        created = reply.json
        ctx, channel_id = created["context_id"], created["channel_id"]
        self.assertEqual(created["status"], "ringing")
        self.assertEqual(reply.headers["location"], f"/v1/talk/asterisk/calls/{ctx}")

        (originate,) = self.fake.requests
        self.assertEqual(
            (originate.method, originate.path), ("POST", f"/ari/channels/{channel_id}")
        )
        self.assertEqual(originate.headers["content-type"], "application/json")
        self.assertTrue(originate.headers["authorization"].startswith("Basic "))
        self.assertEqual(originate.query, {})
        self.assertEqual(
            originate.body,
            {
                "endpoint": ENDPOINT,
                "context": "rapida-outbound",
                "extension": "s",
                "priority": 1,
                "timeout": 120,
                "variables": {"CUSTOMER": "42", "RAPIDA_CONTEXT_ID": ctx},
                "callerId": "+4930999",
                "formats": "ulaw",
            },
        )
        connected = yield self.status_becomes(ctx, "connected")
        self.assertIsNotNone(connected["connected_at"])
        call = self.daemon.bridge.calls[ctx]
        self.assertEqual(call.context.direction, "outbound")
        self.assertEqual(call.context.variables, {"CUSTOMER": "42"})
        (phone,) = self.phones
        yield wait_until(lambda: sum(r.payload != SILENCE for r in phone.received) >= 10)
        self.assertEqual([r.payload for r in phone.received if r.payload != SILENCE], sent)

        phone.transport.loseConnection()  # the callee hangs up
        ended = yield self.status_becomes(ctx, "ended")
        self.assertEqual((ended["reason"], ended["channel_id"]), ("caller-hangup", channel_id))
        self.assertIn(f"outbound call {ctx} to {NUMBER} via pbx1: ringing", self.logs.text())
        self.assertIn(f"call {ctx} ended: caller-hangup", self.logs.text())
        self.assertIn(
            f"outbound provider pbx1: {self.server.url} as rapida, dialling PJSIP/trunk/<number>",
            self.logs.text(),
        )
        self.assertNotIn(PASSWORD, self.logs.text())

    @defer.inlineCallbacks
    def test_delete_of_a_connected_call_ends_it_through_the_bridge(self) -> None:
        self.start()
        self.fake.behave(ENDPOINT, ANSWER, on_answer=self.answer_like_the_dialplan)
        ctx = (yield self.call()).json["context_id"]
        yield self.status_becomes(ctx, "connected")
        reply = yield self.api("DELETE", f"/{ctx}")
        self.assertEqual(reply.status, 200)
        self.assertEqual((reply.json["status"], reply.json["reason"]), ("ended", "api-hangup"))
        (phone,) = self.phones
        yield phone.closed
        self.assertEqual(phone.received[-1].kind, Kind.HANGUP)  # AudioSocket() returns
        self.assertEqual([r.method for r in self.fake.requests], ["POST"])

    @defer.inlineCallbacks
    def test_list_shows_this_nodes_calls(self) -> None:
        self.start()
        self.fake.behave(ENDPOINT, NO_ANSWER)
        first = (yield self.call()).json["context_id"]
        second = (yield self.call()).json["context_id"]
        reply = yield self.api("GET")
        self.assertEqual(reply.status, 200)
        self.assertEqual([c["context_id"] for c in reply.json], [first, second])


class UnansweredCallTests(OutboundTestCase):
    @defer.inlineCallbacks
    def test_no_answer_hangs_up_after_the_ring_timeout_and_refuses_a_late_connect(self) -> None:
        self.start(ring_timeout=0.5)
        self.fake.behave(ENDPOINT, NO_ANSWER)
        created = (yield self.call()).json
        ctx, channel_id = created["context_id"], created["channel_id"]
        self.assertEqual(self.fake.requests[0].body["timeout"], 1)
        ended = yield self.status_becomes(ctx, "ended")
        self.assertEqual(ended["reason"], "no-answer")
        yield wait_until(lambda: self.fake.channels[channel_id].gone)
        self.assertEqual(self.fake.channels[channel_id].hangup_reason, "no_answer")
        late = FakeAsterisk(ctx, [])
        self.phones.append(late)
        yield connect_audiosocket(self.daemon.as_port, late)
        yield late.closed
        self.assertEqual(late.received, [])
        self.assertEqual(self.daemon.bridge.calls, {})

    @defer.inlineCallbacks
    def test_callee_rejects_while_ringing(self) -> None:
        self.start()
        self.fake.behave(ENDPOINT, NO_ANSWER)
        created = (yield self.call()).json
        self.fake.remote_hangup(created["channel_id"], "busy")
        ended = yield self.status_becomes(created["context_id"], "ended")
        self.assertEqual(ended["reason"], "not-answered")

    @defer.inlineCallbacks
    def test_delete_while_ringing_hangs_up_through_ari(self) -> None:
        self.start()
        self.fake.behave(ENDPOINT, NO_ANSWER)
        created = (yield self.call(transport="websocket")).json
        self.assertEqual(self.fake.requests[0].body["context"], "rapida-outbound-ws")
        reply = yield self.api("DELETE", f"/{created['context_id']}")
        self.assertEqual(reply.status, 200)
        self.assertEqual((reply.json["status"], reply.json["reason"]), ("ended", "cancelled"))
        hangup = self.fake.requests[-1]
        self.assertEqual(
            (hangup.method, hangup.path), ("DELETE", f"/ari/channels/{created['channel_id']}")
        )
        self.assertEqual(hangup.query, {"reason": "normal"})
        self.assertEqual(self.fake.live_channels(), [])
        again = yield self.api("DELETE", f"/{created['context_id']}")
        self.assertEqual((again.status, again.json["reason"]), (200, "cancelled"))

    @defer.inlineCallbacks
    def test_stopping_the_daemon_hangs_up_ringing_calls(self) -> None:
        self.start()
        self.fake.behave(ENDPOINT, NO_ANSWER)
        yield self.call()
        yield self.daemon.outbound.stop()
        self.assertEqual(self.fake.live_channels(), [])


class AriFailureTests(OutboundTestCase):
    @defer.inlineCallbacks
    def test_busy_or_unknown_endpoint(self) -> None:
        self.start()
        self.fake.behave(ENDPOINT, BUSY)
        reply = yield self.call()
        self.assert_error(reply, 502, "ari_not_found", "answered 404: Endpoint PJSIP/trunk/")
        (record,) = self.daemon.outbound.calls()
        self.assertEqual((record.status, record.reason), ("ended", "originate-failed"))

    @defer.inlineCallbacks
    def test_asterisk_fails_to_dial(self) -> None:
        self.start()
        self.fake.behave(ENDPOINT, ERROR)
        reply = yield self.call()
        self.assert_error(reply, 502, "ari_error", "answered 500: Allocation failed")

    @defer.inlineCallbacks
    def test_wrong_ari_password(self) -> None:
        os.environ[PASSWORD_ENV] = "not-the-password"
        self.start()
        self.fake.behave(ENDPOINT, ANSWER)
        reply = yield self.call()
        self.assert_error(reply, 502, "ari_unauthorized", "check ari_user and the password")
        self.assertNotIn("not-the-password", reply.body.decode() + self.logs.text())

    @defer.inlineCallbacks
    def test_ari_down(self) -> None:
        port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        url = f"http://127.0.0.1:{port.getHost().port}"
        yield port.stopListening()
        self.start({"pbx1": provider_table(url)})
        reply = yield self.call()
        self.assert_error(reply, 503, "ari_unreachable", "cannot connect to 127.0.0.1")

    @defer.inlineCallbacks
    def test_ari_silent(self) -> None:
        self.start({"pbx1": provider_table(self.server.url, timeout=0.3)})
        self.fake.behave(ENDPOINT, HANG)
        reply = yield self.call()
        self.assert_error(reply, 504, "ari_timeout", "got no answer within 0.3 s")
        yield wait_until(lambda: [r.method for r in self.fake.requests] == ["POST", "DELETE"])

    @defer.inlineCallbacks
    def test_several_providers(self) -> None:
        self.start(
            {
                "pbx1": provider_table(self.server.url),
                "pbx2": provider_table(self.server.url, trunk="", context="sales"),
            }
        )
        self.fake.behave("PJSIP/+4930123456", NO_ANSWER)
        reply = yield self.call()
        self.assert_error(reply, 400, "bad_request", "provider: is required")
        reply = yield self.call(provider="pbx2")
        self.assertEqual(reply.status, 201)
        self.assertEqual(self.fake.requests[-1].body["context"], "sales")


class EndpointTemplateTests(OutboundTestCase):
    """``endpoint`` templates: through the dialplan (``Local/``) or to a PJSIP endpoint."""

    @defer.inlineCallbacks
    def test_local_channel_through_the_dialplan_is_answered(self) -> None:
        self.start({"pbx1": provider_table(self.server.url, endpoint="Local/{to}@from-rapida")})
        endpoint = "Local/+4930123456@from-rapida"
        self.fake.behave(endpoint, ANSWER, on_answer=self.answer_like_the_dialplan)
        reply = yield self.call()
        self.assertEqual(reply.status, 201, reply.body)
        self.assertEqual(self.fake.requests[0].body["endpoint"], endpoint)
        yield self.status_becomes(reply.json["context_id"], "connected")
        self.assertIn(
            f"outbound provider pbx1: {self.server.url} as rapida, dialling "
            "Local/<number>@from-rapida",
            self.logs.text(),
        )

    @defer.inlineCallbacks
    def test_pjsip_endpoint_at_a_trunk(self) -> None:
        self.start({"pbx1": provider_table(self.server.url, endpoint="PJSIP/{to}@{trunk}")})
        self.fake.behave("PJSIP/+4930123456@trunk", NO_ANSWER)
        reply = yield self.call()
        self.assertEqual(reply.status, 201, reply.body)
        self.assertEqual(self.fake.requests[0].body["endpoint"], "PJSIP/+4930123456@trunk")

    @defer.inlineCallbacks
    def test_the_number_cannot_leave_the_template(self) -> None:
        self.start({"pbx1": provider_table(self.server.url, endpoint="Local/{to}@from-rapida")})
        reply = yield self.call(to="100@evil.example")
        self.assertEqual(reply.status, 400, reply.body)
        self.assertEqual(self.fake.requests, [])


class BadRequestTests(OutboundTestCase):
    @defer.inlineCallbacks
    def test_every_bad_input_gets_a_clear_json_error_and_good_calls_still_work(self) -> None:
        self.start()
        self.fake.behave(ENDPOINT, NO_ANSWER)
        good = {"assistant_id": "bot-1", "to": NUMBER}
        cases: list[tuple[dict[str, Any], int, str, str]] = [
            (dict(method="POST", body=good, key=None), 401, "unauthorized", "missing API key"),
            (dict(method="POST", body=good, key="wrong-key-123"), 401, "unauthorized", "wrong"),
            (dict(method="GET", key=None), 401, "unauthorized", "X-Api-Key"),
            (dict(method="POST", data=b"{nope"), 400, "bad_request", "not valid JSON"),
            (dict(method="POST", data=b"\xff\xfe\x00"), 400, "bad_request", "not valid JSON"),
            (dict(method="POST", data=b""), 400, "bad_request", "not valid JSON"),
            (dict(method="POST", body=[1]), 400, "bad_request", "must be a JSON object"),
            (dict(method="POST", body={"to": NUMBER}), 400, "bad_request", "assistant_id: is"),
            (
                dict(method="POST", body={"assistant_id": "b"}),
                400,
                "bad_request",
                "to: is required",
            ),
            (
                dict(method="POST", body={**good, "to": "1234;x"}),
                400,
                "bad_request",
                "to: number has ';'",
            ),
            (
                dict(method="POST", body={**good, "transport": "sip"}),
                400,
                "bad_request",
                "unknown transport 'sip'",
            ),
            (
                dict(method="POST", body={**good, "provider": "pbx9"}),
                404,
                "unknown_provider",
                "unknown provider 'pbx9' (known: pbx1)",
            ),
            (
                dict(method="POST", data=b'{"to": "' + b"1" * 20000 + b'"}'),
                413,
                "payload_too_large",
                "larger than 16384 bytes",
            ),
            (
                dict(method="POST", data=json.dumps(good).encode(), content_type="text/plain"),
                415,
                "unsupported_media_type",
                "Content-Type: application/json",
            ),
            (dict(method="PUT", body=good), 405, "method_not_allowed", "POST or GET"),
            (dict(method="GET", path="/nope"), 404, "unknown_call", "no outbound call nope"),
            (dict(method="DELETE", path="/nope"), 404, "unknown_call", "no outbound call nope"),
            (dict(method="POST", path="/nope"), 405, "method_not_allowed", "GET or DELETE"),
            (dict(method="GET", path="/a/b"), 404, "not_found", "no such resource"),
        ]
        for kwargs, status, code, message in cases:
            method = kwargs.pop("method")
            path = kwargs.pop("path", "")
            reply = yield self.api(method, path, **kwargs)
            self.assert_error(reply, status, code, message)
        self.assertEqual(self.fake.requests, [])
        reply = yield self.call()
        self.assertEqual(reply.status, 201)
        self.assertEqual(len(self.fake.requests), 1)

    @defer.inlineCallbacks
    def test_the_key_is_not_taken_from_the_query_string(self) -> None:
        self.start()
        reply = yield self.api("GET", f"?x-api-key={API_KEY}", key=None)
        self.assert_error(reply, 401, "unauthorized")

    @defer.inlineCallbacks
    def test_unknown_assistant(self) -> None:
        self.start()
        self.daemon.bridge.assistants.default = None
        reply = yield self.call()
        self.assert_error(reply, 404, "unknown_assistant", "unknown assistant 'bot-1'")

    @defer.inlineCallbacks
    def test_no_provider_configured(self) -> None:
        self.start({})
        reply = yield self.call()
        self.assert_error(reply, 404, "unknown_provider", "no ARI provider is configured")

    @defer.inlineCallbacks
    def test_draining_node_refuses_calls(self) -> None:
        self.start()
        self.daemon.bridge.accepting = False
        reply = yield self.call()
        self.assert_error(reply, 503, "unavailable", "not accepting calls")


def test_a_bad_provider_stops_the_daemon_with_the_setting_named() -> None:
    settings = Settings(
        api_keys=[API_KEY],
        providers={
            "pbx1": {"ari_url": "http://pbx:8088", "ari_user": "u", "password_env": "NOPE_X"}
        },
    )
    os.environ.pop("NOPE_X", None)
    try:
        Daemon(settings, reactor)
    except ConfigError as e:
        assert str(e) == (
            "providers.pbx1.password_env: the environment variable NOPE_X is not set or empty"
        )
    else:
        raise AssertionError("no ConfigError")


def test_a_bad_endpoint_template_stops_the_daemon_with_the_setting_named() -> None:
    os.environ[PASSWORD_ENV] = PASSWORD
    try:
        table = provider_table("http://pbx:8088", endpoint="PJSIP/{number}@{trunk}")
        Daemon(Settings(api_keys=[API_KEY], providers={"pbx1": table}), reactor)
    except ConfigError as e:
        assert str(e).startswith("providers.pbx1.endpoint: unknown placeholder {number}")
        assert PASSWORD not in str(e)
    else:
        raise AssertionError("no ConfigError")
    finally:
        os.environ.pop(PASSWORD_ENV, None)
