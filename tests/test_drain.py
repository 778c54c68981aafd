"""Drain: on a Clock (the deadline), then with real connections and the node's stopService."""

from __future__ import annotations

import json
import os
import signal
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer, error, reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from rapida_tap.assistants.echo import EchoAssistant
from rapida_tap.assistants.registry import AssistantRegistry
from rapida_tap.audiosocket.protocol import AudioSocketFactory
from rapida_tap.audiosocket.wire import Kind
from rapida_tap.config import Settings
from rapida_tap.contexts import CallContext, MemoryContextStore, new_context_id
from rapida_tap.drain import DRAIN_TIMEOUT, Drain, DrainState
from rapida_tap.media.bridge import MediaBridge
from rapida_tap.node import Daemon
from rapida_tap.reasons import EndReason as reasons
from rapida_tap.reasons import NotAccepting
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
from tests.test_call import FakeLeg

# --- the Drain itself, on a Clock ----------------------------------------------------------------


class DrainClockTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.store = MemoryContextStore(self.clock)
        self.bridge = MediaBridge(
            clock=self.clock,
            contexts=self.store,
            assistants=AssistantRegistry(default=EchoAssistant()),
            idle_timeout=0,
        )
        self.drain = Drain(self.bridge, self.clock, timeout=30.0)
        self.addCleanup(self.bridge.pacer.stop)
        self.addCleanup(self.store.close)

    def open_call(self) -> tuple[Any, FakeLeg]:
        cid = new_context_id()
        self.store.mint(CallContext(cid, "a"), 60)
        leg = FakeLeg()
        return self.successResultOf(self.bridge.open_call(cid, leg)), leg

    def test_no_calls_drains_at_once(self) -> None:
        self.assertIs(self.drain.state, DrainState.SERVING)
        self.assertIsNone(self.successResultOf(self.drain.start("test")))
        self.assertIs(self.drain.state, DrainState.DRAINED)
        self.assertFalse(self.bridge.accepting)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertIsNone(self.successResultOf(self.drain.start("again")))  # idempotent

    def test_live_calls_may_finish_and_new_ones_are_refused(self) -> None:
        first, _ = self.open_call()
        second, _ = self.open_call()
        done = self.drain.start("test")
        also = self.drain.start("a second SIGTERM")  # its own Deferred
        self.assertNoResult(done)
        self.assertIs(self.drain.state, DrainState.DRAINING)
        cid = new_context_id()
        self.store.mint(CallContext(cid, "a"), 60)
        self.failureResultOf(self.bridge.open_call(cid, FakeLeg()), NotAccepting)
        self.clock.advance(10)
        self.assertEqual(self.drain.remaining, 20.0)
        first.end(reasons.CALLER_HANGUP)
        self.assertNoResult(done)
        self.clock.advance(10)
        second.end(reasons.ASSISTANT_HANGUP)
        self.successResultOf(done)
        self.successResultOf(also)
        self.assertIs(self.drain.state, DrainState.DRAINED)
        self.assertEqual(self.drain.remaining, 0.0)
        self.assertEqual(self.bridge.ended_by_reason.get(DRAIN_TIMEOUT), None)
        timers = [c.func for c in self.clock.getDelayedCalls()]
        self.assertNotIn(self.drain._timed_out, timers)  # the deadline is cancelled

    def test_the_timeout_ends_the_rest_with_drain_timeout(self) -> None:
        logs = capture_logs(self)
        call, leg = self.open_call()
        done = self.drain.start("test")
        self.clock.advance(29.9)
        self.assertNoResult(done)
        self.clock.advance(0.1)
        self.successResultOf(done)
        self.assertEqual(self.successResultOf(call.when_ended()), DRAIN_TIMEOUT)
        self.assertIn(("hangup", DRAIN_TIMEOUT), leg.events)
        self.assertEqual(self.bridge.ended_by_reason, {DRAIN_TIMEOUT: 1})
        self.assertIn("drain timeout (30 s): ending 1 call(s)", logs.text())
        self.assertIn("draining (test): 1 live call(s), up to 30 s", logs.text())

    def test_no_timeout_waits_for_every_call_however_long(self) -> None:
        logs = capture_logs(self)
        drain = Drain(self.bridge, self.clock, timeout=0)
        calls = [self.open_call()[0] for _ in range(3)]
        done = drain.start("test")
        self.assertNotIn(drain._timed_out, [c.func for c in self.clock.getDelayedCalls()])
        self.assertIsNone(drain.remaining)
        for call in calls[:2]:
            self.clock.advance(4 * 3600)  # hours: nothing ends a call but its own end
            self.assertNoResult(done)
            self.assertNoResult(calls[2].when_ended())
            call.end(reasons.CALLER_HANGUP)
        self.assertNoResult(done)
        calls[2].end(reasons.CALLER_HANGUP)
        self.successResultOf(done)
        self.assertEqual(self.bridge.ended_by_reason, {reasons.CALLER_HANGUP: 3})
        self.assertIn("draining (test): 3 live call(s), waiting for every call", logs.text())

    def test_force_ends_the_rest_with_their_hangup(self) -> None:
        drain = Drain(self.bridge, self.clock, timeout=0)
        (first, first_leg), (second, second_leg) = self.open_call(), self.open_call()
        done = drain.start("SIGTERM")
        first.end(reasons.CALLER_HANGUP)
        drain.force("second SIGTERM")
        self.successResultOf(done)
        self.assertIs(drain.state, DrainState.DRAINED)
        self.assertEqual(self.successResultOf(second.when_ended()), reasons.SHUTDOWN)
        self.assertIn(("hangup", reasons.SHUTDOWN), second_leg.events)
        self.assertNotIn(("hangup", reasons.SHUTDOWN), first_leg.events)
        drain.force("third SIGTERM")  # nothing left: no error
        self.assertEqual(self.bridge.ended_by_reason.get(reasons.SHUTDOWN), 1)

    def test_force_cancels_a_configured_deadline(self) -> None:
        call, _ = self.open_call()
        done = self.drain.start("SIGTERM")
        self.clock.advance(5)
        self.drain.force("second SIGTERM")
        self.successResultOf(done)
        self.assertEqual(self.successResultOf(call.when_ended()), reasons.SHUTDOWN)
        self.assertNotIn(self.drain._timed_out, [c.func for c in self.clock.getDelayedCalls()])

    def test_force_before_any_drain_starts_one_and_ends_the_calls(self) -> None:
        call, _ = self.open_call()
        self.drain.force("SIGTERM twice at once")
        self.assertIs(self.drain.state, DrainState.DRAINED)
        self.assertFalse(self.bridge.accepting)
        self.assertEqual(self.successResultOf(call.when_ended()), reasons.SHUTDOWN)


# --- real connections ---------------------------------------------------------------------------


def get(port: int, path: str, method: str = "GET", key: str | None = API_KEY) -> Any:
    headers = {"Connection": "close"}
    if key is not None:
        headers["X-Api-Key"] = key
    request = curl_get(path, headers=headers).replace(b"GET ", method.encode() + b" ", 1)
    return raw_http(port, request)


class DrainIntegrationTests(TestCase):
    timeout = 20

    def setUp(self) -> None:
        self.daemon = start_daemon(self, drain_timeout=5.0)

    @defer.inlineCallbacks
    def live_call(self) -> Any:
        ctx = yield register(self.daemon.http_port)
        client = FakeAsterisk(ctx)
        yield connect_audiosocket(self.daemon.as_port, client)
        yield wait_until(lambda: ctx in self.daemon.bridge.calls)
        return ctx, client

    @defer.inlineCallbacks
    def test_drain_refuses_new_work_and_lets_the_live_call_finish(self) -> Any:
        ctx, live = yield self.live_call()
        waiting = yield register(self.daemon.http_port)  # registered before, connects after
        done = self.daemon.drain.start("test")

        health = yield get(self.daemon.http_port, "/healthz", key=None)
        self.assertEqual(health.status, 503)
        body = json.loads(health.body)
        self.assertFalse(body["accepting"])
        self.assertIn("draining: 1 call(s) left", body["problems"]["drain"])

        reply = yield get(self.daemon.http_port, "/v1/talk/asterisk/call/123456789")
        self.assertEqual((reply.status, reply.body), (503, b""))

        late = FakeAsterisk(waiting)
        yield connect_audiosocket(self.daemon.as_port, late)
        yield late.closed  # refused: closed without a call
        self.assertEqual(self.daemon.audiosocket.listener.refused, {"not-accepting": 1})
        self.assertNotIn(waiting, self.daemon.bridge.calls)

        live.received.clear()
        yield wait_until(lambda: len(live.received) >= 10)  # the live call still runs
        self.assertFalse(done.called)
        call = self.daemon.bridge.calls[ctx]
        live.transport.loseConnection()
        self.assertEqual((yield call.when_ended()), reasons.CALLER_HANGUP)
        yield done
        self.assertIs(self.daemon.drain.state, DrainState.DRAINED)
        health = yield get(self.daemon.http_port, "/healthz", key=None)
        self.assertEqual(json.loads(health.body)["problems"], {"drain": "drained"})

    @defer.inlineCallbacks
    def test_the_timeout_hangs_up_the_rest(self) -> Any:
        self.daemon.drain.timeout = 0.2
        ctx, client = yield self.live_call()
        yield self.daemon.drain.start("test")
        yield client.closed
        self.assertEqual(client.received[-1].kind, Kind.HANGUP)
        self.assertEqual(self.daemon.bridge.ended_by_reason, {DRAIN_TIMEOUT: 1})

    @defer.inlineCallbacks
    def test_admin_drain_needs_a_key_and_post(self) -> Any:
        port = self.daemon.http_port
        for method, key, status in [
            ("POST", None, 401),
            ("POST", "wrong-key-0123456789", 401),
            ("PUT", API_KEY, 405),
            ("DELETE", API_KEY, 405),
        ]:
            reply = yield get(port, "/admin/drain", method=method, key=key)
            self.assertEqual((reply.status, reply.body), (status, b""), (method, key))
        reply = yield get(port, "/admin/drain/more", method="POST")
        self.assertEqual(reply.status, 404)
        self.assertTrue(self.daemon.bridge.accepting)
        reply = yield get(port, "/admin/drain")
        self.assertEqual(reply.status, 200)
        self.assertEqual(json.loads(reply.body)["state"], "serving")

    @defer.inlineCallbacks
    def test_admin_drain_reports_progress_and_then_runs_on_drained(self) -> Any:
        stopped: list[bool] = []
        from rapida_tap.web.admin import DrainResource
        from rapida_tap.web.site import mount

        mount(
            self.daemon.root,
            "admin/drain",
            DrainResource(self.daemon.drain, self.daemon.keys, lambda: stopped.append(True)),
        )
        ctx, client = yield self.live_call()
        reply = yield get(self.daemon.http_port, "/admin/drain", method="POST")
        self.assertEqual(reply.status, 202)
        state = json.loads(reply.body)
        self.assertEqual((state["state"], state["calls"], state["timeout"]), ("draining", 1, 5.0))
        self.assertGreater(state["remaining"], 4.0)
        again = yield get(self.daemon.http_port, "/admin/drain", method="POST")
        self.assertEqual(again.status, 202)
        self.assertFalse(self.daemon.bridge.accepting)
        self.assertEqual(stopped, [])
        client.transport.loseConnection()
        yield wait_until(lambda: stopped == [True])
        reply = yield get(self.daemon.http_port, "/admin/drain")
        self.assertEqual(json.loads(reply.body)["state"], "drained")
        self.assertEqual(stopped, [True])  # once, however many POSTs


def listening_ports(top: Any) -> tuple[int, int]:
    """The AudioSocket and HTTP ports of a started node service."""
    ports: dict[type, int] = {}
    for child in top:
        if isinstance(child, StreamServerEndpointService):

            def found(port: Any, kind: type) -> Any:
                ports[kind] = port.getHost().port
                return port  # the service stops it later

            child._waitingForPort.addCallback(found, type(child.factory.wrapped))
    as_port = ports.pop(AudioSocketFactory)
    (http_port,) = ports.values()
    return as_port, http_port


class NodeServiceStopTests(TestCase):
    """What twistd does on SIGTERM: ``stopService`` of the node, waited for by the reactor."""

    timeout = 20

    @defer.inlineCallbacks
    def test_stop_service_drains_before_closing_anything(self) -> Any:
        local = "tcp:0:interface=127.0.0.1"
        daemon = Daemon(
            Settings(api_keys=[API_KEY], audiosocket=local, http=local, drain_timeout=5.0),
            reactor,
        )
        top = daemon.service()
        top.startService()
        self.addCleanup(lambda: top.stopService() if top.running else None)
        as_port, http_port = listening_ports(top)

        ctx = yield register(http_port)
        client = FakeAsterisk(ctx)
        yield connect_audiosocket(as_port, client)
        yield wait_until(lambda: ctx in daemon.bridge.calls)

        stopped = top.stopService()
        self.assertFalse(stopped.called)
        self.assertFalse(daemon.bridge.accepting)
        client.received.clear()
        yield wait_until(lambda: len(client.received) >= 5)  # listeners and the call still up
        reply = yield get(http_port, "/v1/talk/asterisk/call/123456789")
        self.assertEqual(reply.status, 503)
        client.transport.loseConnection()
        yield stopped
        self.assertFalse(top.running)
        self.assertEqual(daemon.bridge.ended_by_reason, {reasons.CALLER_HANGUP: 1})
        with self.assertRaises(error.ConnectionRefusedError):  # the HTTP listener is closed now
            yield get(http_port, "/healthz", key=None)

    @defer.inlineCallbacks
    def test_by_default_the_drain_waits_and_a_second_sigterm_ends_calls_with_a_hangup(
        self,
    ) -> Any:
        local = "tcp:0:interface=127.0.0.1"
        daemon = Daemon(Settings(api_keys=[API_KEY], audiosocket=local, http=local), reactor)
        self.assertEqual(daemon.drain.timeout, 0)  # the default: no time limit
        top = daemon.service()
        top.startService()
        self.addCleanup(lambda: top.stopService() if top.running else None)
        as_port, http_port = listening_ports(top)
        clients = []
        for _ in range(3):
            ctx = yield register(http_port)
            client = FakeAsterisk(ctx)
            yield connect_audiosocket(as_port, client)
            clients.append(client)
        yield wait_until(lambda: len(daemon.bridge.calls) == 3)

        before = signal.getsignal(signal.SIGTERM)
        stopped = top.stopService()  # what twistd does on the first SIGTERM
        self.assertIsNot(signal.getsignal(signal.SIGTERM), before)
        clients[0].transport.loseConnection()  # one caller hangs up by itself
        yield wait_until(lambda: len(daemon.bridge.calls) == 2)
        for client in clients[1:]:
            client.received.clear()
        yield wait_until(lambda: all(len(c.received) >= 5 for c in clients[1:]))
        self.assertFalse(stopped.called)  # no deadline: the others go on

        os.kill(os.getpid(), signal.SIGTERM)  # the second SIGTERM
        yield stopped
        self.assertEqual(
            daemon.bridge.ended_by_reason, {reasons.CALLER_HANGUP: 1, reasons.SHUTDOWN: 2}
        )
        for client in clients[1:]:
            yield wait_until(lambda c=client: not c.connected_)
            self.assertEqual(client.received[-1].kind, Kind.HANGUP)  # Asterisk hangs up cleanly
        self.assertIs(signal.getsignal(signal.SIGTERM), before)
