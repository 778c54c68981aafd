"""Connection admission over real sockets: caps per address and in total, the descriptor
budget, the accept rate (on a Clock), one log line per reason, and the wrapper staying out of
the data path (the wrapped protocol sees the real TCP transport)."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, protocol, reactor, tcp
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from rapida_tap.admission import (
    ACCEPT_RATE,
    AUDIOSOCKET_ID_BYTES,
    OUT_OF_DESCRIPTORS,
    TOO_MANY_CONNECTIONS,
    TOO_MANY_PENDING,
    AdmissionFactory,
    DescriptorBudget,
)
from rapida_tap.ratelimit import LogThrottle
from tests import fake_chan_websocket as fc
from tests.support import capture_logs, register, start_daemon, wait_until

HELLO = b"hello\n"


class Greeter(protocol.Protocol):
    """Says hello on connect, so a client can tell an accepted connection from a refused one."""

    received = b""
    lost = False

    def connectionMade(self) -> None:
        self.factory.built.append(self)
        self.transport.write(HELLO)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True


class GreeterFactory(protocol.Factory):
    protocol = Greeter

    def __init__(self) -> None:
        self.built: list[Greeter] = []


class Client(protocol.Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.greeted: defer.Deferred[bool] = defer.Deferred()
        self.lost: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if HELLO in self.data and not self.greeted.called:
            self.greeted.callback(True)

    def connectionLost(self, reason: Any = None) -> None:
        if not self.greeted.called:
            self.greeted.callback(False)  # closed without a word: refused at accept
        self.lost.callback(None)


class AdmissionTests(TestCase):
    timeout = 20

    def setUp(self) -> None:
        self.clock = Clock()
        self.clients: list[Client] = []

    def tearDown(self) -> defer.Deferred[Any]:
        for c in self.clients:
            if c.transport is not None and c.transport.connected:
                c.transport.abortConnection()
        return defer.gatherResults([c.lost for c in self.clients])

    def listen(self, **overrides: Any) -> tuple[AdmissionFactory, GreeterFactory, int]:
        inner = GreeterFactory()
        options: dict[str, Any] = {
            "name": "test",
            "clock": self.clock,
            "budget": DescriptorBudget(limit=10_000),
            "max_connections": 100,
            "max_pending_per_address": 100,
            "accept_rate": 1000.0,
            "accept_burst": 1000,
        }
        options.update(overrides)
        admission = AdmissionFactory(inner, **options)
        port = reactor.listenTCP(0, admission, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return admission, inner, port.getHost().port

    @defer.inlineCallbacks
    def connect(self, port: int, source: str = "127.0.0.1") -> Any:
        """Connect from ``source``; fires with ``(client, accepted)``."""
        client = Client()
        self.clients.append(client)
        creator = protocol.ClientCreator(reactor, lambda: client)
        yield creator.connectTCP("127.0.0.1", port, bindAddress=(source, 0))
        accepted = yield client.greeted
        return client, accepted

    @defer.inlineCallbacks
    def test_pending_connections_are_capped_per_address_until_they_identify(self) -> Any:
        admission, inner, port = self.listen(
            max_pending_per_address=2, pending_bytes=AUDIOSOCKET_ID_BYTES
        )
        first, ok1 = yield self.connect(port)
        _, ok2 = yield self.connect(port)
        third, ok3 = yield self.connect(port)
        self.assertEqual((ok1, ok2, ok3), (True, True, False))
        self.assertEqual(admission.refused, {TOO_MANY_PENDING: 1})
        self.assertEqual(admission.connections, 2)
        # another address is not held up by this one's pending connections
        _, other = yield self.connect(port, source="127.0.0.2")
        self.assertTrue(other)
        # the first connection sends its UUID frame: it no longer counts as pending
        first.transport.write(b"\x01\x00\x10" + bytes(15))
        yield wait_until(lambda: admission.pending.get("127.0.0.1") == 2)  # 18 bytes: not yet
        first.transport.write(b"\x00")
        yield wait_until(lambda: admission.pending.get("127.0.0.1") == 1)
        _, ok4 = yield self.connect(port)
        self.assertTrue(ok4)
        self.assertEqual(len(inner.built), 4)  # the refused one never reached the factory

    @defer.inlineCallbacks
    def test_the_total_is_capped_and_a_closed_connection_frees_its_slot(self) -> Any:
        admission, _, port = self.listen(max_connections=2)
        first, _ = yield self.connect(port)
        yield self.connect(port, source="127.0.0.2")
        _, ok = yield self.connect(port, source="127.0.0.3")
        self.assertFalse(ok)
        self.assertEqual(admission.refused, {TOO_MANY_CONNECTIONS: 1})
        first.transport.loseConnection()
        yield wait_until(lambda: admission.connections == 1)
        _, ok = yield self.connect(port, source="127.0.0.3")
        self.assertTrue(ok)
        self.assertEqual(admission.pending, {"127.0.0.2": 1, "127.0.0.3": 1})

    @defer.inlineCallbacks
    def test_listeners_share_one_descriptor_budget(self) -> Any:
        budget = DescriptorBudget(limit=66, reserve=64)  # room for 2 connections in all
        self.assertEqual(budget.limit, 2)
        one, _, port1 = self.listen(budget=budget, name="one")
        two, _, port2 = self.listen(budget=budget, name="two")
        yield self.connect(port1)
        yield self.connect(port2)
        _, ok = yield self.connect(port2, source="127.0.0.2")
        self.assertFalse(ok)
        self.assertEqual(two.refused, {OUT_OF_DESCRIPTORS: 1})
        self.assertEqual((one.connections, two.connections, budget.open), (1, 1, 2))

    @defer.inlineCallbacks
    def test_accept_rate_per_address_refills_with_time(self) -> Any:
        admission, _, port = self.listen(accept_rate=1.0, accept_burst=2)
        results = []
        for _ in range(3):
            _, ok = yield self.connect(port)
            results.append(ok)
        self.assertEqual(results, [True, True, False])
        self.assertEqual(admission.refused, {ACCEPT_RATE: 1})
        _, other = yield self.connect(port, source="127.0.0.2")
        self.assertTrue(other)
        self.clock.advance(1.0)
        _, ok = yield self.connect(port)
        self.assertTrue(ok)

    @defer.inlineCallbacks
    def test_refusals_log_one_line_per_reason_every_few_seconds(self) -> Any:
        logs = capture_logs(self)
        admission, _, port = self.listen(accept_rate=1.0, accept_burst=1)
        yield self.connect(port)
        for _ in range(30):
            yield self.connect(port)
        self.assertEqual(admission.refused, {ACCEPT_RATE: 30})
        lines = [line for line in logs.text().splitlines() if "refused" in line]
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("test: connection from 127.0.0.1 refused: accept-rate", lines[0])
        self.clock.advance(0.5)  # half a token: still refused, still quiet
        yield self.connect(port)
        self.clock.advance(5.0)
        yield self.connect(port)  # a token again: accepted
        yield self.connect(port)  # refused, and logged with the count held back
        lines = [line for line in logs.text().splitlines() if "refused" in line]
        self.assertEqual(len(lines), 2, lines)
        self.assertIn("30 more refusal(s) for this reason not logged", lines[1])

    @defer.inlineCallbacks
    def test_the_wrapped_protocol_gets_the_real_tcp_transport(self) -> Any:
        _, inner, port = self.listen()
        client, _ = yield self.connect(port)
        (served,) = inner.built
        self.assertIs(type(served.transport), tcp.Server)  # AudioSocket's direct send needs it
        client.transport.write(b"ping")
        client.transport.loseConnection()
        yield client.lost
        yield wait_until(lambda: served.lost)  # reads and the end pass through the wrapper
        self.assertEqual(served.received, b"ping")


class DaemonListenerTests(TestCase):
    """The daemon's own listeners: a WebSocket call through the HTTP admission is released."""

    timeout = 20

    @defer.inlineCallbacks
    def test_websocket_call_counts_while_up_and_is_released_when_it_ends(self) -> Any:
        daemon = start_daemon(self)
        http = daemon.listeners["http"]
        ctx = yield register(daemon.http_port)
        yield wait_until(lambda: http.connections == 0)  # registration closed after its reply
        client = fc.FakeChanWebSocket(fc.upgrade_request(f"/v1/talk/asterisk/ctx?ctx={ctx}"))
        yield protocol.ClientCreator(reactor, lambda: client).connectTCP(
            "127.0.0.1", daemon.http_port
        )
        yield client.handshake
        self.assertEqual((http.connections, http.pending), (1, {}))  # identified by its head
        client.close_like_asterisk()
        yield client.closed
        yield wait_until(lambda: http.connections == 0)
        self.assertEqual(daemon.descriptors.open, 0)
        self.assertEqual(http.refused, {})


def test_log_throttle_counts_what_it_held_back() -> None:
    throttle = LogThrottle(interval=5.0)
    assert throttle.allow("a", 100.0) == 0
    assert [throttle.allow("a", 100.0 + i / 10) for i in range(1, 4)] == [None] * 3
    assert throttle.allow("b", 101.0) == 0  # causes are independent
    assert throttle.allow("a", 105.0) == 3
    assert throttle.allow("a", 104.0) is None  # the clock stepped back: quiet from then on
    assert throttle.allow("a", 108.0) is None
    assert throttle.allow("a", 109.0) == 2


def test_the_pending_cap_is_at_most_a_quarter_of_the_descriptor_budget() -> None:
    def admission(cap: int, nofile: int) -> AdmissionFactory:
        return AdmissionFactory(
            GreeterFactory(),
            name="t",
            clock=Clock(),
            budget=DescriptorBudget(limit=nofile),
            max_connections=10,
            max_pending_per_address=cap,
            accept_rate=1.0,
            accept_burst=1,
        )

    assert admission(256, 65536).max_pending_per_address == 256
    assert admission(256, 256).max_pending_per_address == 48  # ulimit -n 256: budget 192
    assert admission(256, 65).max_pending_per_address == 1
