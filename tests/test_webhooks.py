"""Webhooks: signing, retries, the bounded queue and the flush on a Clock (StubTreq), then a
real receiver on 127.0.0.1 that verifies with ``standardwebhooks`` behind real calls."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import treq
import treq.testing
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from rapida_tap.config import Settings
from rapida_tap.events.webhooks import (
    CALL_ENDED,
    CALL_STARTED,
    RETRY_DELAYS,
    Endpoint,
    WebhookSender,
)
from rapida_tap.listeners import Listener
from rapida_tap.node import Daemon
from tests.support import (
    API_KEY,
    FakeAsterisk,
    capture_logs,
    connect_audiosocket,
    register,
    start_daemon,
    tone,
    wait_until,
)
from tests.webhook_receiver import WebhookReceiver, listen, new_secret

URL = "http://receiver.test/hooks"


class ScriptedReceiver(Resource):
    """Answers each POST with the next status of ``script`` (``None``: never answers)."""

    isLeaf = True

    def __init__(self, secret: str, script: list[int | None]) -> None:
        super().__init__()
        self.verifier = Webhook(secret)
        self.script = list(script)
        self.requests: list[tuple[dict[str, str], bytes]] = []

    def render_POST(self, request: Any) -> Any:
        body = request.content.read()
        headers = {
            k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()
        }
        self.requests.append((headers, body))
        status = self.script.pop(0) if self.script else 204
        if status is None:
            return NOT_DONE_YET
        request.setResponseCode(status)
        return b""


class Outcomes:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str, float | None]] = []

    def delivered(self, endpoint: str, seconds: float) -> None:
        self.seen.append(("delivered", endpoint, seconds))

    def failed(self, endpoint: str) -> None:
        self.seen.append(("failed", endpoint, None))

    def dropped(self, endpoint: str) -> None:
        self.seen.append(("dropped", endpoint, None))


class SenderTests(SynchronousTestCase):
    def setUp(self) -> None:
        # Standard Webhooks receivers reject timestamps more than 5 minutes off their clock.
        self.clock = Clock()
        self.clock.advance(time.time())
        self.secret = new_secret()
        self.endpoint = Endpoint("ops", URL, self.secret)
        self.outcomes = Outcomes()
        self.logs = capture_logs(self)

    def sender(self, script: list[int | None], **kw: Any) -> tuple[WebhookSender, Any, Any]:
        receiver = ScriptedReceiver(self.secret, script)
        stub = treq.testing.StubTreq(receiver)
        sender = WebhookSender(stub, self.clock, observer=self.outcomes, **kw)
        return sender, receiver, stub

    def test_a_delivery_is_signed_per_the_standard(self) -> None:
        sender, receiver, _ = self.sender([204])
        sender.send([self.endpoint], CALL_STARTED, {"context_id": "c1"})
        ((headers, body),) = receiver.requests
        payload = Webhook(self.secret).verify(body, headers)
        self.assertEqual(payload["type"], CALL_STARTED)
        self.assertEqual(payload["data"], {"context_id": "c1"})
        self.assertTrue(headers["webhook-id"].startswith("msg_"))
        self.assertEqual(headers["webhook-timestamp"], str(int(self.clock.seconds())))
        self.assertEqual(headers["content-type"], "application/json")
        with self.assertRaises(WebhookVerificationError):
            Webhook(self.secret).verify(body.replace(b"c1", b"c2"), headers)
        with self.assertRaises(WebhookVerificationError):
            Webhook(new_secret()).verify(body, headers)
        self.assertEqual((sender.delivered, sender.pending), (1, 0))
        self.assertEqual(self.outcomes.seen, [("delivered", "ops", 0.0)])

    def test_only_the_events_an_endpoint_asked_for(self) -> None:
        sender, receiver, _ = self.sender([])
        ended_only = Endpoint("crm", URL, self.secret, frozenset({CALL_ENDED}))
        sender.send([ended_only], CALL_STARTED, {})
        sender.send([ended_only, self.endpoint], CALL_ENDED, {})
        self.assertEqual(len(receiver.requests), 2)
        ids = {headers["webhook-id"] for headers, _ in receiver.requests}
        self.assertEqual(len(ids), 2)  # one message per endpoint

    def test_5xx_is_retried_with_backoff_under_the_same_id(self) -> None:
        sender, receiver, _ = self.sender([503, 500, 204])
        sender.send([self.endpoint], CALL_ENDED, {"n": 1})
        self.assertEqual(len(receiver.requests), 1)
        self.clock.advance(RETRY_DELAYS[0] - 0.1)
        self.assertEqual(len(receiver.requests), 1)
        self.clock.advance(0.1)
        self.assertEqual(len(receiver.requests), 2)
        self.clock.advance(RETRY_DELAYS[1])
        self.assertEqual(len(receiver.requests), 3)
        ids = {h["webhook-id"] for h, _ in receiver.requests}
        stamps = [int(h["webhook-timestamp"]) for h, _ in receiver.requests]
        self.assertEqual(len(ids), 1)
        self.assertEqual(stamps[2] - stamps[0], int(RETRY_DELAYS[0] + RETRY_DELAYS[1]))
        for headers, body in receiver.requests:  # re-signed on each try
            Webhook(self.secret).verify(body, headers)
        self.assertEqual((sender.delivered, sender.failed, sender.pending), (1, 0, 0))
        self.assertEqual(self.outcomes.seen, [("delivered", "ops", 20.0)])

    def test_five_tries_over_two_minutes_then_it_fails_with_one_line(self) -> None:
        sender, receiver, _ = self.sender([502] * 10)
        sender.send([self.endpoint], CALL_ENDED, {})
        self.clock.pump([1.0] * 200)
        self.assertEqual(len(receiver.requests), 5)
        self.assertEqual(sum(RETRY_DELAYS), 120.0)
        self.assertEqual((sender.delivered, sender.failed, sender.pending), (0, 1, 0))
        self.assertEqual(self.outcomes.seen, [("failed", "ops", None)])
        self.assertIn("failed after 5 tries: HTTP 502", self.logs.text())

    def test_a_refusal_is_final(self) -> None:
        sender, receiver, _ = self.sender([400, 204])
        sender.send([self.endpoint], CALL_ENDED, {})
        self.clock.pump([1.0] * 200)
        self.assertEqual(len(receiver.requests), 1)
        self.assertEqual((sender.failed, sender.pending), (1, 0))

    def test_a_redirect_is_not_followed(self) -> None:
        sender, receiver, _ = self.sender([302, 204])
        sender.send([self.endpoint], CALL_ENDED, {})
        self.clock.pump([1.0] * 200)
        self.assertEqual(len(receiver.requests), 1)
        self.assertEqual(sender.failed, 1)
        self.assertIn("failed after 1 tries: HTTP 302", self.logs.text())

    def test_429_and_timeouts_are_retried(self) -> None:
        sender, receiver, _ = self.sender([None, 429, 204])
        sender.send([self.endpoint], CALL_ENDED, {})
        self.assertEqual(sender.pending, 1)
        self.clock.advance(self.endpoint.timeout)  # the first try times out
        self.clock.advance(RETRY_DELAYS[0])
        self.clock.advance(RETRY_DELAYS[1])
        self.assertEqual(len(receiver.requests), 3)
        self.assertEqual((sender.delivered, sender.pending), (1, 0))

    def test_a_full_queue_drops_new_deliveries_and_says_so_once_per_few_seconds(self) -> None:
        sender, receiver, _ = self.sender([None] * 100, max_pending=3)
        for _ in range(10):
            sender.send([self.endpoint], CALL_ENDED, {})
        self.assertEqual((sender.pending, sender.dropped), (3, 7))
        self.assertEqual(len(self.logs.text().split("deliveries pending (the limit)")), 2)
        self.clock.advance(5.0)
        sender.send([self.endpoint], CALL_ENDED, {})  # still full (retries wait)
        self.assertEqual(len(self.logs.text().split("deliveries pending (the limit)")), 3)
        self.assertIn("dropped 1 new one(s)", self.logs.text())
        self.assertEqual([o for o, _, _ in self.outcomes.seen].count("dropped"), 8)

    def test_in_flight_requests_are_bounded(self) -> None:
        sender, receiver, _ = self.sender([None] * 10, max_in_flight=2)
        for _ in range(5):
            sender.send([self.endpoint], CALL_ENDED, {})
        self.assertEqual((len(receiver.requests), sender.pending), (2, 5))

    def test_flush_tries_waiting_retries_at_once(self) -> None:
        sender, receiver, _ = self.sender([503, 204])
        sender.send([self.endpoint], CALL_ENDED, {})
        d = sender.flush(10.0)
        self.assertEqual(len(receiver.requests), 2)  # without waiting RETRY_DELAYS[0]
        self.successResultOf(d)
        self.assertEqual((sender.delivered, sender.pending), (1, 0))

    def test_flush_gives_up_at_its_deadline(self) -> None:
        sender, receiver, _ = self.sender([503] * 10)
        sender.send([self.endpoint], CALL_ENDED, {})
        sender.send([self.endpoint], CALL_ENDED, {})
        d = sender.flush(3.0)
        self.assertNoResult(d)
        self.clock.advance(3.0)
        self.successResultOf(d)
        self.assertEqual((sender.failed, sender.pending), (2, 0))
        self.assertIn("2 deliveries still pending after 3s of flushing", self.logs.text())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_flush_with_nothing_pending_is_immediate(self) -> None:
        sender, _, _ = self.sender([])
        self.successResultOf(sender.flush(1.0))


# --- real sockets: a receiver on 127.0.0.1, real calls through the daemon -------------------


class WebhookIntegrationTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.secret = new_secret()
        os.environ["RAPIDA_TEST_WEBHOOK_SECRET"] = self.secret
        self.addCleanup(os.environ.pop, "RAPIDA_TEST_WEBHOOK_SECRET", None)
        self.receiver = WebhookReceiver(self.secret)

    def start(self, port: int, **assistants: Any) -> Any:
        endpoint = {
            "url": f"http://127.0.0.1:{port}/hooks",
            "secret_env": "RAPIDA_TEST_WEBHOOK_SECRET",
        }
        return start_daemon(self, webhooks={"test": endpoint}, assistants=assistants)

    def listen(self, port: int = 0) -> int:
        listening = listen(self.receiver, port)
        self.addCleanup(listening.stopListening)
        return int(listening.getHost().port)

    @defer.inlineCallbacks
    def echo_call(self, daemon: Any, frames: int = 25) -> Any:
        ctx = yield register(daemon.http_port)
        sent = tone(frames)
        client = FakeAsterisk(ctx, sent)
        yield connect_audiosocket(daemon.as_port, client)
        yield client.sent_all
        yield wait_until(lambda: sum(any(r.payload) for r in client.received) >= frames)
        client.transport.loseConnection()
        yield client.closed
        return ctx, sent, client

    @defer.inlineCallbacks
    def test_every_call_produces_signed_started_and_ended_events_and_tampering_is_refused(
        self,
    ) -> Any:
        port = self.listen()
        daemon = self.start(port)
        ctx, _, _ = yield self.echo_call(daemon)
        sender = daemon.events.sender
        yield wait_until(lambda: len(self.receiver.of_type(CALL_ENDED)) == 1 and not sender.pending)
        (started,) = self.receiver.of_type(CALL_STARTED)
        (ended,) = self.receiver.of_type(CALL_ENDED)
        self.assertEqual(started.data["context_id"], ctx)
        self.assertEqual(ended.data["context_id"], ctx)
        self.assertEqual(ended.data["end_reason"], "caller-hangup")
        quality = ended.data["quality"]
        self.assertEqual(quality["transport"], "audiosocket")
        self.assertEqual(quality["frames_in"], 25)
        self.assertGreaterEqual(quality["frames_out"], 25)
        self.assertEqual(self.receiver.rejected, [])

        # The same bytes with one changed are refused by the receiver: 400.
        tampered = ended.body.replace(b'"caller-hangup"', b'"assistant-hangup"')
        self.assertNotEqual(tampered, ended.body)
        response = yield treq.post(
            f"http://127.0.0.1:{port}/hooks",
            data=tampered,
            headers={k: [v] for k, v in ended.headers.items() if k.startswith("webhook-")},
            persistent=False,
        )
        yield treq.content(response)
        self.assertEqual(response.code, 400)
        ((_, _, why),) = self.receiver.rejected
        self.assertIn("No matching signature", why)
        self.assertEqual(daemon.events.sender.delivered, 2)
        self.assertEqual(daemon.events.sender.failed, 0)
        sample = daemon.metrics.registry.get_sample_value
        labels = {"endpoint": "test", "outcome": "delivered"}
        self.assertEqual(sample("rapida_webhook_deliveries_total", labels), 2)
        self.assertEqual(sample("rapida_webhook_delivery_seconds_count", {"endpoint": "test"}), 2)
        by_transport = {"transport": "audiosocket"}
        self.assertEqual(sample("rapida_call_first_audio_seconds_count", by_transport), 1)
        self.assertEqual(sample("rapida_call_pacing_error_p99_seconds_count", by_transport), 1)

    @defer.inlineCallbacks
    def test_an_assistants_own_endpoint_gets_its_calls_as_well(self) -> Any:
        own_secret = new_secret()
        os.environ["RAPIDA_TEST_OWN_SECRET"] = own_secret
        self.addCleanup(os.environ.pop, "RAPIDA_TEST_OWN_SECRET", None)
        own = WebhookReceiver(own_secret)
        own_port = listen(own)
        self.addCleanup(own_port.stopListening)
        port = self.listen()
        table = {
            "url": "echo",
            "webhooks": {
                "own": {
                    "url": f"http://127.0.0.1:{own_port.getHost().port}/",
                    "secret_env": "RAPIDA_TEST_OWN_SECRET",
                    "events": ["call.ended"],
                }
            },
        }
        daemon = self.start(port, default=table)
        ctx, _, _ = yield self.echo_call(daemon, frames=5)
        yield wait_until(lambda: len(own.accepted) == 1 and len(self.receiver.accepted) == 2)
        self.assertEqual(own.accepted[0].type, CALL_ENDED)
        self.assertEqual(own.accepted[0].data["context_id"], ctx)
        self.assertEqual(own.rejected, [])

    @defer.inlineCallbacks
    def test_a_receiver_down_then_up_loses_nothing_and_never_slows_the_call(self) -> Any:
        probe = listen(self.receiver)  # find a free port, then close it: the receiver is down
        port = int(probe.getHost().port)
        yield probe.stopListening()
        daemon = self.start(port)
        # The schedule, shrunk to 7.5 s: the call (about 1.5 s) ends well within it.
        daemon.events.sender.retry_delays = (0.5, 1.0, 2.0, 4.0)
        logs = capture_logs(self)
        ctx, sent, client = yield self.echo_call(daemon, frames=50)
        # While the receiver was down the call ran as always: every frame came back, in order.
        echoed = [r.payload for r in client.received if any(r.payload)]
        self.assertEqual(echoed, sent)
        self.assertEqual(self.receiver.accepted, [])
        self.assertGreater(daemon.events.sender.pending, 0)
        self.listen(port)  # the receiver comes back
        sender = daemon.events.sender  # the receiver has both; the sender has its answers:
        yield wait_until(lambda: len(self.receiver.accepted) == 2 and not sender.pending, 15)
        started, ended = sorted(self.receiver.accepted, key=lambda d: d.type != CALL_STARTED)
        self.assertEqual((started.type, ended.type), (CALL_STARTED, CALL_ENDED))
        self.assertEqual(ended.data["context_id"], ctx)
        quality = ended.data["quality"]
        self.assertEqual((quality["frames_in"], quality["dropped_frames"]), (50, 0))
        self.assertEqual(daemon.events.sender.failed, 0)
        self.assertEqual(daemon.events.sender.pending, 0)
        self.assertNotIn("failed after", logs.text())

    @defer.inlineCallbacks
    def test_pending_deliveries_are_flushed_when_the_node_stops(self) -> Any:
        probe = listen(self.receiver)
        port = int(probe.getHost().port)
        yield probe.stopListening()
        daemon = self.start(port)
        ctx = yield register(daemon.http_port)
        client = FakeAsterisk(ctx, tone(5))
        yield connect_audiosocket(daemon.as_port, client)
        yield wait_until(lambda: ctx in daemon.bridge.calls)
        self.assertEqual(daemon.events.sender.pending, 1)  # call.started waits for a retry
        self.listen(port)
        daemon.bridge.end_all()  # as BridgeService.stopService does
        yield daemon.stop_events()  # waits no retry delay: the flush tries at once
        self.assertEqual(sorted(d.type for d in self.receiver.accepted), [CALL_ENDED, CALL_STARTED])
        self.assertEqual(json.loads(self.receiver.accepted[0].body)["data"]["context_id"], ctx)
        yield client.closed


class NodeStopFlushTests(TestCase):
    """SIGTERM's path: the node drains, its calls end, then pending webhooks are flushed."""

    timeout = 20

    @defer.inlineCallbacks
    def test_the_node_stops_only_after_its_pending_webhooks_went_out(self) -> Any:
        secret = new_secret()
        os.environ["RAPIDA_TEST_WEBHOOK_SECRET"] = secret
        self.addCleanup(os.environ.pop, "RAPIDA_TEST_WEBHOOK_SECRET", None)
        receiver = WebhookReceiver(secret)
        probe = listen(receiver)  # a free port, closed: the receiver is down for now
        port = int(probe.getHost().port)
        yield probe.stopListening()
        local = "tcp:0:interface=127.0.0.1"
        endpoint = {"url": f"http://127.0.0.1:{port}/", "secret_env": "RAPIDA_TEST_WEBHOOK_SECRET"}
        daemon = Daemon(
            Settings(
                api_keys=[API_KEY],
                audiosocket=local,
                http=local,
                drain_timeout=0.5,
                webhooks={"test": endpoint},
            ),
            reactor,
        )
        top = daemon.service()
        top.startService()
        self.addCleanup(lambda: top.stopService() if top.running else None)
        ports: dict[str, int] = {}
        for child in top:
            if isinstance(child, Listener):

                def found(listening: Any, setting: str) -> Any:
                    ports[setting] = listening.getHost().port
                    return listening

                child._waitingForPort.addCallback(found, child.setting)
        as_port, http_port = ports["audiosocket"], ports["http"]
        ctx = yield register(http_port)
        client = FakeAsterisk(ctx)
        yield connect_audiosocket(as_port, client)
        yield wait_until(lambda: ctx in daemon.bridge.calls)
        self.assertEqual(daemon.events.sender.pending, 1)  # call.started, waiting for a retry
        up = listen(receiver, port)
        self.addCleanup(up.stopListening)
        yield top.stopService()  # drain (the call outlives it), end the call, flush
        self.assertEqual(sorted(d.type for d in receiver.accepted), [CALL_ENDED, CALL_STARTED])
        (ended,) = receiver.of_type(CALL_ENDED)
        self.assertEqual(ended.data["end_reason"], "drain-timeout")
        self.assertEqual(daemon.events.sender.pending, 0)
        yield client.closed
