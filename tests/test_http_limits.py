"""HTTP limits over real sockets: the request deadline (on a Clock), bodies refused by their
declared length before a byte is read, chunked bodies cut at the limit, nothing spooled to a
temporary file, and the start-up check that proves twisted.web still calls the hooks."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import Request

from rapida_tap.web import guard
from rapida_tap.web.guard import (
    BAD_REQUEST,
    BODY_TOO_LARGE,
    REQUEST_TIMEOUT,
    BodyLimits,
    GuardedHTTPChannel,
    TwistedWebChanged,
    check_twisted_web,
)
from rapida_tap.web.site import PathTree, make_site, mount
from tests.support import capture_logs, wait_until

LIMIT = 64 * 1024
API = "/v1/talk/asterisk/calls"


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class Recorder(Resource):
    """Answers 200 with the body's length; remembers the bodies and their containers."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[bytes] = []
        self.containers: list[type] = []

    def render(self, request: Request) -> bytes:
        assert request.content is not None
        self.containers.append(type(request.content))
        request.content.seek(0)
        body = request.content.read()
        self.bodies.append(body)
        return b"%d" % len(body)


class CountingChannel(GuardedHTTPChannel):
    """Counts the bytes the server read from its peer (the test's view of what got in)."""

    received = 0

    def dataReceived(self, data: bytes) -> None:
        type(self).received += len(data)
        super().dataReceived(data)


class Peer(protocol.Protocol):
    """Sends ``head``, then ``body_total`` bytes of body as ``piece``s, as fast as the socket
    takes them (a push producer: the client never buffers more than a piece)."""

    def __init__(self, head: bytes, body_total: int = 0, piece: bytes = b"") -> None:
        self.head = head
        self.left = body_total
        self.piece = piece
        self.paused = False
        self.sent = 0
        self.data = b""
        self.lost: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)
        self.transport.write(self.head)
        self._pump()

    def _pump(self) -> None:
        while self.left > 0 and not self.paused and self.transport.connected:
            self.transport.write(self.piece)
            self.left -= len(self.piece)
            self.sent += len(self.piece)
        if self.left > 0 and self.transport.connected and not self.paused:
            reactor.callLater(0, self._pump)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        reactor.callLater(0, self._pump)

    def stopProducing(self) -> None:
        self.left = 0

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        self.left = 0
        self.lost.callback(None)


class HttpLimitsTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.clock = Clock()
        self.api = Recorder()
        self.registration = Recorder()
        root = PathTree()
        mount(root, API, self.api)
        mount(root, "v1/talk/asterisk/call", self.registration)
        self.site = make_site(
            root, head_timeout=10.0, body_limits=BodyLimits({API: LIMIT}), reactor=self.clock
        )
        CountingChannel.received = 0
        self.site.protocol = lambda: http._GenericHTTPChannelProtocol(CountingChannel())
        port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.port = port.getHost().port
        self.tmp = Path(self.mktemp())
        self.tmp.mkdir()
        self.patch(tempfile, "tempdir", str(self.tmp))  # where twisted.web would spool

    @defer.inlineCallbacks
    def send(self, peer: Peer) -> Any:
        yield protocol.ClientCreator(reactor, lambda: peer).connectTCP("127.0.0.1", self.port)
        yield peer.lost
        return peer

    # -- the request deadline ---------------------------------------------------------------

    @defer.inlineCallbacks
    def test_a_slow_head_is_closed_at_the_deadline_whatever_trickles_in(self) -> Any:
        logs = capture_logs(self)
        peer = Peer(b"")
        yield protocol.ClientCreator(reactor, lambda: peer).connectTCP("127.0.0.1", self.port)
        request = b"GET /v1/talk/asterisk/call/echo HTTP/1.1\r\n"
        for i, byte in enumerate(request[:3]):
            peer.transport.write(bytes([byte]))
            yield wait_until(lambda i=i: CountingChannel.received == i + 1)
            self.clock.advance(3.0)  # a byte every 3 s: twisted.web's idle timeout never fires
        self.assertFalse(peer.lost.called)  # 9 s: still within the deadline
        self.clock.advance(1.0)
        yield peer.lost
        self.assertEqual(peer.data, b"")  # aborted: nothing to say to a peer this slow
        self.assertEqual(self.site.refused, {REQUEST_TIMEOUT: 1})
        self.assertEqual(self.registration.bodies, [])
        self.assertIn("request-timeout (request not complete within 10 s)", logs.text())

    @defer.inlineCallbacks
    def test_the_deadline_restarts_for_each_request_on_a_kept_alive_connection(self) -> Any:
        request = b"GET /v1/talk/asterisk/call/echo HTTP/1.1\r\nHost: a\r\n\r\n"
        peer = Peer(request)
        yield protocol.ClientCreator(reactor, lambda: peer).connectTCP("127.0.0.1", self.port)
        yield wait_until(lambda: b"\r\n\r\n0" in peer.data)
        self.clock.advance(9.0)
        peer.transport.write(request)
        yield wait_until(lambda: len(self.registration.bodies) == 2)
        self.clock.advance(9.9)
        self.assertFalse(peer.lost.called)
        peer.transport.write(b"G")  # a third request begins, and stalls
        yield wait_until(lambda: CountingChannel.received == 2 * len(request) + 1)
        self.clock.advance(0.1)  # 10 s after the second response
        yield peer.lost
        self.assertEqual(self.site.refused, {REQUEST_TIMEOUT: 1})

    @defer.inlineCallbacks
    def test_an_idle_kept_alive_connection_is_closed_quietly(self) -> Any:
        logs = capture_logs(self)
        peer = Peer(b"GET /v1/talk/asterisk/call/echo HTTP/1.1\r\nHost: a\r\n\r\n")
        yield protocol.ClientCreator(reactor, lambda: peer).connectTCP("127.0.0.1", self.port)
        yield wait_until(lambda: b"\r\n\r\n0" in peer.data)
        self.clock.advance(10.0)
        yield peer.lost
        self.assertEqual(self.site.refused, {})
        self.assertNotIn("refused", logs.text())

    # -- bodies -----------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_a_declared_body_over_the_limit_is_refused_before_it_is_read(self) -> Any:
        head = (
            f"POST {API} HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
            "Content-Length: 2000000000\r\n\r\n"
        ).encode()
        yield self.send(Peer(head))  # warm-up: first-use allocations are not growth
        before = rss_bytes()
        peer = yield self.send(Peer(head, body_total=32 * 1024 * 1024, piece=b"x" * 65536))
        grown = rss_bytes() - before
        self.assertTrue(peer.data.startswith(b"HTTP/1.1 413 "), peer.data[:60])
        self.assertEqual(self.site.refused, {BODY_TOO_LARGE: 2})
        self.assertEqual(self.api.bodies, [])
        self.assertEqual(os.listdir(self.tmp), [])
        # What the server read: the head, and what the kernel had buffered when it closed.
        self.assertLess(CountingChannel.received, 1024 * 1024)
        self.assertLess(grown, 1024 * 1024)

    @defer.inlineCallbacks
    def test_a_chunked_body_is_cut_at_the_limit(self) -> Any:
        head = (f"POST {API} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
        chunk = b"4000\r\n" + b"y" * 0x4000 + b"\r\n"
        yield self.send(Peer(head, body_total=len(chunk) * 8, piece=chunk))  # warm-up
        before = rss_bytes()
        peer = yield self.send(Peer(head, body_total=len(chunk) * 2048, piece=chunk))  # 32 MiB
        grown = rss_bytes() - before
        self.assertTrue(peer.data.startswith(b"HTTP/1.1 413 "), peer.data[:60])
        self.assertEqual(self.site.refused, {BODY_TOO_LARGE: 2})
        self.assertEqual(self.api.bodies, [])
        self.assertEqual(os.listdir(self.tmp), [])
        self.assertLess(CountingChannel.received, 1024 * 1024)
        self.assertLess(grown, 1024 * 1024)

    @defer.inlineCallbacks
    def test_a_chunked_body_ending_right_after_the_limit_is_not_served(self) -> Any:
        over = LIMIT + 1
        body = b"%x\r\n" % over + b"z" * over + b"\r\n0\r\n\r\n"
        head = f"POST {API} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        peer = yield self.send(Peer(head + body))  # one write: the terminator is in the same read
        self.assertTrue(peer.data.startswith(b"HTTP/1.1 413 "))
        self.assertEqual(self.api.bodies, [])

    @defer.inlineCallbacks
    def test_registration_and_unlisted_paths_take_no_body(self) -> Any:
        for head in (
            b"GET /v1/talk/asterisk/call/echo HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nx",
            b"POST /elsewhere HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n",
        ):
            peer = yield self.send(Peer(head))
            self.assertTrue(peer.data.startswith(b"HTTP/1.1 413 "), peer.data[:60])
        self.assertEqual(self.registration.bodies, [])
        self.assertEqual(self.site.refused, {BODY_TOO_LARGE: 2})

    @defer.inlineCallbacks
    def test_bodies_within_the_limit_are_served_from_memory(self) -> Any:
        body = b"{" + b" " * (LIMIT - 2) + b"}"
        head = f"POST {API} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n".encode()
        peer = yield self.send(Peer(head + b"Content-Length: %d\r\n\r\n" % len(body) + body))
        self.assertTrue(peer.data.startswith(b"HTTP/1.1 200 "), peer.data[:60])
        chunked = b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        peer = yield self.send(Peer(head + chunked))
        self.assertTrue(peer.data.startswith(b"HTTP/1.1 200 "), peer.data[:60])
        self.assertEqual(self.api.bodies, [body, b"hello"])
        self.assertEqual({c.__name__ for c in self.api.containers}, {"BytesIO"})
        self.assertEqual(os.listdir(self.tmp), [])
        self.assertEqual(self.site.refused, {})

    @defer.inlineCallbacks
    def test_refusals_log_one_line_per_reason_and_garbage_is_counted(self) -> Any:
        logs = capture_logs(self)
        head = f"POST {API} HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999\r\n\r\n".encode()
        for _ in range(20):
            yield self.send(Peer(head))
        yield self.send(Peer(b"\x16\x03\x01\x02\x00garbage\r\n\r\n"))
        self.assertEqual(self.site.refused, {BODY_TOO_LARGE: 20, BAD_REQUEST: 1})
        lines = [line for line in logs.text().splitlines() if "request refused" in line]
        self.assertEqual(len(lines), 2, lines)
        self.clock.advance(5.0)
        yield self.send(Peer(head))
        text = logs.text()
        self.assertIn("19 more refusal(s) for this reason not logged", text)


class StartupCheckTests(TestCase):
    def test_the_installed_twisted_web_passes(self) -> None:
        check_twisted_web(make_site(Resource()))

    def test_a_twisted_web_that_skips_the_hooks_stops_start_up(self) -> None:
        self.patch(GuardedHTTPChannel, "allHeadersReceived", http.HTTPChannel.allHeadersReceived)
        self.patch(guard.GuardedRequest, "handleContentChunk", Request.handleContentChunk)
        with self.assertRaises(TwistedWebChanged) as caught:
            make_site(Resource())
        self.assertIn("install a supported Twisted version", str(caught.exception))

    def test_a_body_hook_that_is_never_called_stops_start_up(self) -> None:
        self.patch(guard.GuardedRequest, "handleContentChunk", Request.handleContentChunk)
        self.assertRaises(TwistedWebChanged, make_site, Resource())  # the chunked probe

    def test_a_renamed_private_attribute_stops_start_up_with_one_line(self) -> None:
        # as if twisted.web no longer set HTTPChannel._path for each request
        GuardedHTTPChannel._path = property(lambda self: self._renamed)  # type: ignore[attr-defined]
        self.addCleanup(delattr, GuardedHTTPChannel, "_path")
        with self.assertRaises(TwistedWebChanged) as caught:
            make_site(Resource())
        self.assertIn("a probe request failed (AttributeError", str(caught.exception))
        self.assertNotIn("\n", str(caught.exception))

    def test_a_missing_channel_method_stops_start_up(self) -> None:
        name = "_respondToBadRequestAndDisconnect"
        original = http.HTTPChannel.__dict__[name]
        delattr(http.HTTPChannel, name)
        self.addCleanup(setattr, http.HTTPChannel, name, original)
        with self.assertRaises(TwistedWebChanged) as caught:
            make_site(Resource())
        self.assertIn(f"HTTPChannel has no {name}", str(caught.exception))

    def test_either_body_check_alone_still_refuses(self) -> None:
        """The declared length is checked at the head and again as bytes are counted."""
        self.patch(GuardedHTTPChannel, "allHeadersReceived", http.HTTPChannel.allHeadersReceived)
        check_twisted_web(make_site(Resource()))

    def test_body_limits_match_a_path_and_its_children_only(self) -> None:
        limits = BodyLimits({"/v1/talk/asterisk/calls": 10, "/admin/drain/": 5})
        self.assertEqual(limits.for_path(b"/v1/talk/asterisk/calls"), 10)
        self.assertEqual(limits.for_path(b"/v1/talk/asterisk/calls/abc/hangup?x=1"), 10)
        self.assertEqual(limits.for_path(b"/v1/talk/asterisk/calls-other"), 0)
        self.assertEqual(limits.for_path(b"/admin/drain?x"), 5)
        self.assertEqual(limits.for_path(b"/v1/talk/asterisk/call/echo"), 0)
        self.assertRaises(ValueError, BodyLimits, {"/x": 2 * 1024 * 1024})
