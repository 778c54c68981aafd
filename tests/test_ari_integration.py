"""The ARI client against FakeAri over real HTTP on 127.0.0.1, and against dead/silent servers."""

from __future__ import annotations

import json
from typing import Any

import treq
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from rapida_tap.ari import (
    AriClient,
    AriConflict,
    AriNotFound,
    AriProvider,
    AriServerError,
    AriTimeout,
    AriUnauthorized,
    AriUnreachable,
)
from rapida_tap.dialstring import build_endpoint
from tests.fake_ari import ANSWER, BUSY, ERROR, HANG, NO_ANSWER, FakeAri, serve_fake_ari

reactor: Any = global_reactor
USER, PASSWORD = "rapida", "integration-Pa55"
CTX = "3f2c9a7e-1b4d-4e8f-9c6a-2d5e7f8a9b0c"


def provider(url: str, **overrides: Any) -> AriProvider:
    fields: dict[str, Any] = dict(
        name="pbx1", ari_url=url, ari_user=USER, ari_password=PASSWORD, trunk="trunk"
    )
    fields.update(overrides)
    return AriProvider(**fields)


class FakeAriTests(TestCase):
    timeout = 10

    def setUp(self) -> None:
        self.fake = FakeAri(reactor, user=USER, password=PASSWORD)
        self.server = serve_fake_ari(reactor, self.fake)
        self.addCleanup(self.server.stop)
        self.provider = provider(self.server.url)
        self.client = AriClient(self.provider, reactor)
        self.addCleanup(self.client.close)
        self.endpoint = build_endpoint(self.provider, "+4930123456")

    def originate(self, channel_id: str = "chan-1", **kwargs: Any) -> Deferred[dict[str, Any]]:
        return self.client.originate(
            channel_id,
            self.endpoint,
            context=self.provider.context,
            variables={"RAPIDA_CONTEXT_ID": CTX},
            **kwargs,
        )

    async def test_answered_call_lifecycle(self) -> None:
        answered: Deferred[Any] = Deferred()
        self.fake.behave(self.endpoint, ANSWER, on_answer=answered.callback)
        channel = await self.originate(caller_id="+4930999")
        self.assertEqual(channel["id"], "chan-1")
        self.assertEqual(channel["name"], "PJSIP/trunk-00000001")
        self.assertEqual(channel["dialplan"]["context"], "rapida-outbound")

        request = await answered
        self.assertEqual(request.variables, {"RAPIDA_CONTEXT_ID": CTX})
        self.assertEqual(request.headers["content-type"], "application/json")
        self.assertTrue(request.headers["authorization"].startswith("Basic "))
        self.assertEqual(request.body["formats"], "ulaw")
        self.assertEqual(request.body["callerId"], "+4930999")

        up = await self.client.get_channel("chan-1")
        assert up is not None
        self.assertEqual(up["state"], "Up")
        self.assertIs(await self.client.hangup("chan-1"), True)
        self.assertIsNone(await self.client.get_channel("chan-1"))
        self.assertIs(await self.client.hangup("chan-1"), False)
        self.assertEqual(self.fake.channels["chan-1"].hangup_reason, "normal")
        self.assertEqual(
            [r.method for r in self.fake.requests], ["POST", "GET", "DELETE", "GET", "DELETE"]
        )
        self.assertEqual({r.path for r in self.fake.requests}, {"/ari/channels/chan-1"})
        self.assertEqual(self.server.connections_accepted, 1)

    async def test_unanswered_call_keeps_ringing(self) -> None:
        self.fake.behave(self.endpoint, NO_ANSWER)
        await self.originate()
        channel = await self.client.get_channel("chan-1")
        assert channel is not None
        self.assertEqual(channel["state"], "Ringing")
        self.assertIs(await self.client.hangup("chan-1", reason="no_answer"), True)
        self.assertEqual(self.fake.channels["chan-1"].hangup_reason, "no_answer")

    async def test_far_end_hangup_is_seen_as_gone(self) -> None:
        self.fake.behave(self.endpoint, NO_ANSWER)
        await self.originate()
        self.fake.remote_hangup("chan-1")
        self.assertIsNone(await self.client.get_channel("chan-1"))

    async def test_busy_and_unknown_endpoints_are_not_found(self) -> None:
        self.fake.behave(self.endpoint, BUSY)
        error = await self.assertFailure(self.originate(), AriNotFound)
        self.assertIn(self.endpoint, error.message)
        unknown = build_endpoint(self.provider, "999")
        error = await self.assertFailure(
            self.client.originate("chan-2", unknown, context="c"), AriNotFound
        )
        self.assertEqual(error.status, 404)
        self.assertEqual(self.fake.live_channels(), [])

    async def test_asterisk_error_is_server_error(self) -> None:
        self.fake.behave(self.endpoint, ERROR)
        error = await self.assertFailure(self.originate(), AriServerError)
        self.assertIn("Allocation failed", error.message)

    async def test_same_channel_id_twice_conflicts(self) -> None:
        self.fake.behave(self.endpoint, NO_ANSWER)
        await self.originate()
        error = await self.assertFailure(self.originate(), AriConflict)
        self.assertIn("already exists", error.message)

    async def test_wrong_password_is_unauthorized(self) -> None:
        self.fake.behave(self.endpoint, ANSWER)
        client = AriClient(provider(self.server.url, ari_password="wrong-one"), reactor)
        self.addCleanup(client.close)
        error = await self.assertFailure(client.get_channel("chan-1"), AriUnauthorized)
        self.assertIn("Authentication required", error.message)
        self.assertNotIn("wrong-one", error.message)
        self.assertEqual(self.fake.channels, {})

    async def test_ari_hanging_times_out(self) -> None:
        self.fake.behave(self.endpoint, HANG)
        client = AriClient(provider(self.server.url, timeout=0.2), reactor)
        self.addCleanup(client.close)
        await self.assertFailure(client.originate("chan-1", self.endpoint, context="c"), AriTimeout)


class FakeAriRealismTests(TestCase):
    """The fake behaves like Asterisk where the daemon could get it wrong."""

    timeout = 10

    def setUp(self) -> None:
        self.fake = FakeAri(reactor, user=USER, password=PASSWORD)
        self.fake.behave("PJSIP/trunk/123", NO_ANSWER)
        self.server = serve_fake_ari(reactor, self.fake)
        self.addCleanup(self.server.stop)

    async def post(self, **kwargs: Any) -> tuple[int, Any]:
        response = await treq.post(
            self.server.url + "/ari/channels/c1",
            auth=(USER, PASSWORD),
            reactor=reactor,
            persistent=False,
            **kwargs,
        )
        return response.code, json.loads(await response.content())

    async def test_json_body_without_content_type_is_ignored(self) -> None:
        body = json.dumps({"endpoint": "PJSIP/trunk/123", "context": "c"}).encode()
        status, reply = await self.post(data=body)
        self.assertEqual((status, reply), (400, {"message": "Endpoint must be specified"}))

    async def test_variables_in_query_are_dropped(self) -> None:
        status, _ = await self.post(
            params={"endpoint": "PJSIP/trunk/123", "variables": '{"RAPIDA_CONTEXT_ID": "x"}'}
        )
        self.assertEqual(status, 200)
        self.assertEqual(self.fake.channels["c1"].variables, {})

    async def test_non_object_variables_are_ignored(self) -> None:
        status, _ = await self.post(json={"endpoint": "PJSIP/trunk/123", "variables": "x=1"})
        self.assertEqual(status, 200)
        self.assertEqual(self.fake.channels["c1"].variables, {})

    async def test_content_type_parameters_are_accepted(self) -> None:
        body = json.dumps({"endpoint": "PJSIP/trunk/123", "variables": {"A": "1"}}).encode()
        status, _ = await self.post(
            data=body, headers={"Content-Type": "Application/JSON; charset=utf-8"}
        )
        self.assertEqual(status, 200)
        self.assertEqual(self.fake.channels["c1"].variables, {"A": "1"})

    async def test_missing_auth_is_401_and_recorded(self) -> None:
        response = await treq.get(
            self.server.url + "/ari/channels/c1", reactor=reactor, persistent=False
        )
        self.assertEqual(response.code, 401)
        self.assertEqual(await response.json(), {"message": "Authentication required"})
        [recorded] = self.fake.requests
        self.assertEqual((recorded.method, recorded.path), ("GET", "/ari/channels/c1"))


class SilentServer(Protocol):
    """Accepts a connection, sends ``factory.greeting`` (maybe nothing), then never a word more."""

    def connectionMade(self) -> None:
        self.factory.connections.append(self)
        self.closed: Deferred[None] = Deferred()
        self.transport.write(self.factory.greeting)

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.callback(None)


class UnreachableTests(TestCase):
    timeout = 10

    async def test_connection_refused_is_unreachable(self) -> None:
        port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        number = port.getHost().port
        url = f"http://127.0.0.1:{number}"
        await port.stopListening()
        client = AriClient(provider(url), reactor)
        self.addCleanup(client.close)
        error = await self.assertFailure(client.get_channel("chan-1"), AriUnreachable)
        self.assertIn(f"cannot connect to 127.0.0.1:{number}", error.message)
        self.assertIsNone(error.status)

    async def test_silent_server_times_out(self) -> None:
        await self.check_timeout(b"")

    async def test_stalled_body_times_out_and_closes(self) -> None:
        await self.check_timeout(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{")

    async def check_timeout(self, greeting: bytes) -> None:
        factory = Factory.forProtocol(SilentServer)
        factory.connections = []  # type: ignore[attr-defined]
        factory.greeting = greeting  # type: ignore[attr-defined]
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        url = f"http://127.0.0.1:{port.getHost().port}"
        # Long enough that a loaded machine still connects before the timeout fires.
        client = AriClient(provider(url, timeout=1.0), reactor)
        self.addCleanup(client.close)
        error = await self.assertFailure(
            client.originate("chan-1", "PJSIP/trunk/123", context="c"), AriTimeout
        )
        self.assertIn("no answer within 1 s", error.message)
        await gatherResults([c.closed for c in factory.connections])  # type: ignore[attr-defined]
        self.assertEqual(len(factory.connections), 1)  # type: ignore[attr-defined]
