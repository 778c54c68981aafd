"""One contract, both transports: the same test bodies drive AudioSocket and chan_websocket legs.

Each leg runs on an in-memory transport and a ``task.Clock``; a subclass per transport says how
its peer connects, names its context, sends audio, misbehaves and hangs up, and how a goodbye
looks on its wire.  Whatever the transport, a refusal is counted by reason and logged, a call
ends once for its first cause, nothing is written to a closing connection, and a bug in a leg
or a session ends its call as ``internal-error`` with the right hangup toward Asterisk.
"""

from __future__ import annotations

import gc
import struct
import uuid
import weakref
from typing import Any

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from rapida_tap.assistants.registry import AssistantRegistry
from rapida_tap.audiosocket.protocol import AudioSocketFactory
from rapida_tap.audiosocket.wire import HANGUP_FRAME, AudioSocketDecoder, Kind, encode_frame
from rapida_tap.contexts import CallContext, MemoryContextStore, new_context_id
from rapida_tap.media.bridge import MediaBridge
from rapida_tap.media.call import Call
from rapida_tap.media.lifecycle import Phase
from rapida_tap.media.listener import LegListener
from rapida_tap.reasons import EndReason, Refusal
from rapida_tap.websocket.factory import MediaWebSocketFactory
from tests import fake_chan_websocket as fc
from tests.support import RecordingAssistant, capture_logs, tone


class Transport(StringTransport):
    """A TCP-like memory transport: abort works, producers may be unregistered when absent."""

    def __init__(self) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000))
        self.aborted = False

    def abortConnection(self) -> None:
        self.aborted = True
        self.loseConnection()

    def unregisterProducer(self) -> None:
        if self.producer is not None:
            super().unregisterProducer()


class Peer:
    """One connection as its peer (Asterisk) sees it."""

    def __init__(self, proto: Any, transport: Transport) -> None:
        self.proto = proto
        self.transport = transport
        self.lost = False

    def lose(self) -> None:
        """What the reactor does once the connection is gone (TCP drops its producer too)."""
        if not self.lost:
            self.lost = True
            self.transport.producer = None
            self.proto.connectionLost(Failure(ConnectionLost("gone")))


class LegContract:
    """The test bodies; subclasses provide the transport (``SynchronousTestCase`` mixed in)."""

    factory: Any
    id_timeout = 5.0
    expired = Refusal.CONTEXT_EXPIRED  # the refusal an expired context gets

    def setUp(self) -> None:
        self.clock = Clock()
        self.store = MemoryContextStore(self.clock)
        self.assistant = RecordingAssistant()
        self.bridge = MediaBridge(
            clock=self.clock,
            contexts=self.store,
            assistants=AssistantRegistry(default=self.assistant),
        )
        self.factory = self.make_factory()
        self.listener = self.factory.listener
        self.logs = capture_logs(self)

    # -- what each transport provides ---------------------------------------------------

    def make_factory(self) -> Any:
        raise NotImplementedError

    def identify(self, peer: Peer, ctx: str) -> None:
        """Present ``ctx`` as the call's context, the way this transport's peer does."""
        raise NotImplementedError

    def send_audio(self, peer: Peer) -> None:
        raise NotImplementedError

    def send_dtmf(self, peer: Peer, digit: str) -> None:
        raise NotImplementedError

    def send_garbage(self, peer: Peer) -> None:
        """Something no peer of this transport may send in a call."""
        raise NotImplementedError

    def hang_up_as_peer(self, peer: Peer) -> None:
        raise NotImplementedError

    def said_goodbye(self, peer: Peer) -> bool:
        """The daemon's hangup toward Asterisk went out (``0x00``; ``HANGUP`` and close 1000)."""
        raise NotImplementedError

    def audio_out(self, peer: Peer) -> int:
        """Audio frames written toward the peer so far."""
        raise NotImplementedError

    def pause_writes(self, peer: Peer) -> None:
        raise NotImplementedError

    def closing(self, peer: Peer) -> bool:
        """The daemon has started to close the connection."""
        return bool(peer.transport.disconnecting)

    # -- helpers -------------------------------------------------------------------------

    def connect(self) -> Peer:
        proto = self.factory.buildProtocol(None)
        transport = Transport()
        proto.makeConnection(transport)
        return Peer(proto, transport)

    def mint(self, ttl: float = 30) -> str:
        context = CallContext(new_context_id(), "123", "+49")
        return self.successResultOf(self.store.mint(context, ttl))

    def start_call(self) -> tuple[Peer, Call]:
        peer = self.connect()
        self.identify(peer, self.mint())
        call = peer.proto.call
        assert call is not None, self.logs.text()
        return peer, call

    def tick(self, n: int = 1) -> None:
        self.clock.pump([0.02] * n)

    def assert_refused(self, peer: Peer, why: Refusal) -> None:
        assert isinstance(self, SynchronousTestCase)
        self.assertEqual(self.listener.refused, {why: 1})
        self.assertIn(f"connection refused: {why}", self.logs.text())
        self.assertTrue(self.closing(peer))
        self.assertEqual(self.bridge.calls, {})

    # -- refusals ------------------------------------------------------------------------

    def test_unknown_context_is_refused(self) -> None:
        peer = self.connect()
        self.identify(peer, str(uuid.uuid4()))
        self.assert_refused(peer, Refusal.CONTEXT_UNKNOWN)

    def test_expired_context_is_refused(self) -> None:
        ctx = self.mint(ttl=30)
        self.clock.advance(31)
        peer = self.connect()
        self.identify(peer, ctx)
        self.assert_refused(peer, self.expired)

    def test_reused_context_is_refused_and_the_first_call_goes_on(self) -> None:
        first, call = self.start_call()
        second = self.connect()
        self.identify(second, call.context_id)
        self.assertTrue(self.closing(second))
        self.assertEqual(sum(self.listener.refused.values()), 1)
        self.assertFalse(call.is_ended)
        self.assertFalse(self.closing(first))

    def test_not_accepting_refuses(self) -> None:
        ctx = self.mint()
        self.bridge.accepting = False
        peer = self.connect()
        self.identify(peer, ctx)
        self.assert_refused(peer, Refusal.NOT_ACCEPTING)

    def test_too_many_connections(self) -> None:
        self.listener.max_connections = 1
        first, call = self.start_call()
        second = self.connect()
        self.identify(second, self.mint())
        self.assertEqual(self.listener.refused, {Refusal.TOO_MANY_CONNECTIONS: 1})
        self.assertTrue(self.closing(second))
        second.lose()
        self.assertEqual(self.listener.connections, 1)
        self.assertFalse(call.is_ended)

    def test_no_context_id_in_time(self) -> None:
        peer = self.connect()
        self.before_identify(peer)
        self.clock.advance(self.id_timeout - 0.1)
        self.assertFalse(self.closing(peer))
        self.clock.advance(0.2)
        self.assertTrue(self.closing(peer))
        self.assertEqual(sum(self.listener.refused.values()), 1)

    def before_identify(self, peer: Peer) -> None:
        """Whatever the peer does before it names its context (a handshake)."""

    def test_refusal_lines_are_throttled_but_every_refusal_is_counted(self) -> None:
        for _ in range(20):
            peer = self.connect()
            self.identify(peer, str(uuid.uuid4()))
            peer.lose()
        self.assertEqual(self.listener.refused, {Refusal.CONTEXT_UNKNOWN: 20})
        self.assertEqual(self.logs.text().count("connection refused: context-unknown"), 1)
        self.clock.advance(self.listener.throttle.interval)
        peer = self.connect()
        self.identify(peer, str(uuid.uuid4()))
        self.assertIn("(and 19 more like it)", self.logs.text())
        self.assertEqual(self.listener.connections, 1)

    # -- claiming --------------------------------------------------------------------------

    def test_closed_while_claiming_ends_the_call_at_once_and_writes_nothing(self) -> None:
        pending: defer.Deferred[CallContext] = defer.Deferred()
        ctx = self.mint()
        real_claim = self.store.claim
        self.store.claim = lambda cid: pending  # type: ignore[method-assign]
        peer = self.connect()
        self.identify(peer, ctx)
        self.hang_up_as_peer(peer)
        written = peer.transport.value()
        real_claim(ctx).chainDeferred(pending)
        self.tick(3)
        self.assertEqual(self.bridge.calls, {})
        self.assertEqual(self.bridge.ended_by_reason, {EndReason.CALLER_HANGUP: 1})
        self.assertEqual(peer.transport.value(), written)

    # -- in the call -----------------------------------------------------------------------

    def test_audio_and_dtmf_reach_the_assistant(self) -> None:
        peer, call = self.start_call()
        self.send_audio(peer)
        self.send_dtmf(peer, "5")
        session = self.assistant.sessions[0]
        self.assertEqual(len(session.audio), 1)
        self.assertEqual(session.digits, ["5"])

    def test_dtmf_flood_ends_the_call_as_a_protocol_error(self) -> None:
        other, other_call = self.start_call()
        peer, call = self.start_call()
        for _ in range(1000):
            self.send_dtmf(peer, "1")
        self.assertEqual(call.end_reason, EndReason.PROTOCOL_ERROR)
        self.assertIn("DTMF flood", call.end_detail)
        session = self.assistant.sessions[1]
        self.assertLessEqual(len(session.digits), 4 * self.listener.dtmf_rate)
        self.assertFalse(other_call.is_ended)

    def test_dtmf_at_a_human_pace_is_never_capped(self) -> None:
        peer, call = self.start_call()
        for _ in range(200):
            self.send_dtmf(peer, "1")
            self.clock.advance(0.1)  # ten digits a second, for twenty seconds
        self.assertFalse(call.is_ended)
        self.assertEqual(len(self.assistant.sessions[0].digits), 200)

    def test_protocol_error_mid_call_ends_only_that_call(self) -> None:
        other, other_call = self.start_call()
        peer, call = self.start_call()
        self.send_garbage(peer)
        self.assertEqual(call.end_reason, EndReason.PROTOCOL_ERROR)
        self.assertTrue(self.closing(peer))
        self.assertFalse(other_call.is_ended)
        self.assertFalse(self.closing(other))

    def test_peer_that_stops_reading_keeps_audio_queued_then_is_hung_up(self) -> None:
        peer, call = self.start_call()
        call.play(b"".join(tone(50)))
        self.pause_writes(peer)
        sent = self.audio_out(peer)
        self.tick(100)
        self.assertEqual(self.audio_out(peer), sent)  # nothing piles up, nothing is lost
        self.assertEqual(call.queued_frames, 50)
        self.tick(200)
        self.assertEqual(call.end_reason, EndReason.PEER_NOT_READING)

    def test_peer_closing_mid_call_stops_every_write(self) -> None:
        peer, call = self.start_call()
        call.play(b"".join(tone(20)))
        self.tick(2)
        self.hang_up_as_peer(peer)
        self.assertEqual(call.end_reason, EndReason.CALLER_HANGUP)
        written = peer.transport.value()
        call.play(b"".join(tone(5)))
        call.mark("late")
        call.clear()
        self.tick(5)
        peer.lose()
        self.assertEqual(peer.transport.value(), written)
        self.assertEqual(len(self.bridge.pacer), 0)
        self.assertEqual(self.listener.connections, 0)

    def test_an_ended_call_is_freed_by_reference_counts(self) -> None:
        """Nothing refers back to an ended call: it goes at once, not at a full GC pass."""
        peer, call = self.start_call()
        self.send_audio(peer)
        self.tick(2)
        self.hang_up_as_peer(peer)
        peer.lose()
        self.tick(1)
        self.assistant.sessions.clear()  # this test's own assistant keeps its sessions
        gone = weakref.ref(call)
        gc.disable()
        try:
            del call
            self.assertIsNone(gone())
        finally:
            gc.enable()

    def test_daemon_hangup_says_goodbye_once_and_then_writes_nothing(self) -> None:
        peer, call = self.start_call()
        call.hangup()
        self.assertTrue(self.said_goodbye(peer))
        self.assertEqual(peer.proto.lifecycle.phase, Phase.CLOSING)
        written = peer.transport.value()
        call.hangup()
        self.tick(5)
        self.assertEqual(peer.transport.value(), written)
        self.clock.advance(self.listener.close_timeout)
        self.assertTrue(peer.transport.aborted)  # a peer that never finishes the close
        peer.lose()
        owners = (peer.proto, peer.proto.lifecycle, call, self.bridge.pacer)
        left = [c for c in self.clock.getDelayedCalls() if getattr(c.func, "__self__", None)]
        self.assertEqual([c for c in left if c.func.__self__ in owners], [])

    def test_session_that_raises_ends_the_call_as_internal_error(self) -> None:
        peer, call = self.start_call()
        session = self.assistant.sessions[0]

        def broken(pcm: bytes) -> None:
            raise RuntimeError("bug in the session")

        session.audio_received = broken  # type: ignore[method-assign]
        self.send_audio(peer)
        self.assertEqual(call.end_reason, EndReason.INTERNAL_ERROR)
        self.assertIn("bug in the session", call.end_detail)
        self.assertTrue(self.said_goodbye(peer))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)  # type: ignore[attr-defined]

    def test_leg_that_raises_while_paced_ends_the_call_as_internal_error(self) -> None:
        peer, call = self.start_call()
        call.play(b"".join(tone(5)))

        def broken(frame: bytes) -> bool:
            raise RuntimeError("bug in the leg")

        peer.proto.send_audio = broken
        self.tick(1)
        self.assertEqual(call.end_reason, EndReason.INTERNAL_ERROR)
        self.assertIn("bug in the leg", call.end_detail)
        self.assertTrue(self.said_goodbye(peer))
        self.assertEqual(len(self.bridge.pacer), 0)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)  # type: ignore[attr-defined]

    def test_first_cause_wins_when_the_peer_hangs_up_during_the_last_words(self) -> None:
        peer, call = self.start_call()
        call.play(b"".join(tone(25)))
        call.ending(EndReason.ASSISTANT_HANGUP, "bot closed the stream")
        self.tick(3)
        self.hang_up_as_peer(peer)
        self.assertEqual(call.end_reason, EndReason.ASSISTANT_HANGUP)
        self.assertEqual(self.bridge.ended_by_reason, {EndReason.ASSISTANT_HANGUP: 1})


class AudioSocketContract(LegContract, SynchronousTestCase):
    id_timeout = 5.0

    def make_factory(self) -> AudioSocketFactory:
        listener = LegListener(self.bridge, "audiosocket", stall_timeout=5)
        return AudioSocketFactory(listener, id_timeout=self.id_timeout)

    def identify(self, peer: Peer, ctx: str) -> None:
        peer.proto.dataReceived(encode_frame(Kind.UUID, uuid.UUID(ctx).bytes))

    def send_audio(self, peer: Peer) -> None:
        peer.proto.dataReceived(encode_frame(Kind.SLIN_8K, bytes(320)))

    def send_dtmf(self, peer: Peer, digit: str) -> None:
        peer.proto.dataReceived(encode_frame(Kind.DTMF, digit.encode()))

    def send_garbage(self, peer: Peer) -> None:
        peer.proto.dataReceived(b"\x42\x00\x01x")

    def hang_up_as_peer(self, peer: Peer) -> None:
        peer.lose()  # Asterisk just closes the TCP connection

    def frames(self, peer: Peer) -> list[Any]:
        return list(AudioSocketDecoder(65535).feed(peer.transport.value()))

    def said_goodbye(self, peer: Peer) -> bool:
        return peer.transport.value().endswith(HANGUP_FRAME) and self.closing(peer)

    def audio_out(self, peer: Peer) -> int:
        return sum(1 for kind, _ in self.frames(peer) if kind == Kind.SLIN_8K)

    def pause_writes(self, peer: Peer) -> None:
        peer.proto.pauseProducing()


class ChanWebSocketContract(LegContract, SynchronousTestCase):
    id_timeout = 5.0  # MEDIA_START after the handshake
    # The handshake only looks a context up (a call refused for Asterisk's sticky v() bug must
    # not use it up), and a look cannot tell expired from unknown.
    expired = Refusal.CONTEXT_UNKNOWN

    def make_factory(self) -> MediaWebSocketFactory:
        listener = LegListener(self.bridge, "websocket", stall_timeout=5)
        return MediaWebSocketFactory(listener, start_timeout=self.id_timeout)

    def before_identify(self, peer: Peer) -> None:
        self.assertTrue(fc.head_is_101(self.handshake(peer, self.mint())))

    def closing(self, peer: Peer) -> bool:
        """A close frame went out (the TCP close waits for the peer's reply)."""
        return bool(peer.transport.disconnecting) or any(
            op == fc.CLOSE for op, _ in self.out_frames(peer)
        )

    def handshake(self, peer: Peer, ctx: str) -> bytes:
        peer.proto.dataReceived(fc.upgrade_request(f"/v1/talk/asterisk/ctx?ctx={ctx}"))
        return peer.transport.value()

    def identify(self, peer: Peer, ctx: str) -> None:
        head = self.handshake(peer, ctx)
        if fc.head_is_101(head):
            peer.proto.dataReceived(fc.encode_frame(fc.TEXT, fc.media_start_json(ctx).encode()))

    def send_audio(self, peer: Peer) -> None:
        peer.proto.dataReceived(fc.encode_frame(fc.BINARY, b"\xff" * 160))

    def send_dtmf(self, peer: Peer, digit: str) -> None:
        text = f'{{"event":"DTMF_END","channel_id":"1","digit":"{digit}"}}'
        peer.proto.dataReceived(fc.encode_frame(fc.TEXT, text.encode()))

    def send_garbage(self, peer: Peer) -> None:
        peer.proto.dataReceived(fc.encode_frame(fc.TEXT, b"DTMF_END digit:99"))

    def hang_up_as_peer(self, peer: Peer) -> None:
        peer.proto.dataReceived(fc.encode_frame(fc.CLOSE, fc.close_payload(1000)))
        peer.lose()  # Asterisk drops TCP right after its close frame

    def out_frames(self, peer: Peer) -> list[tuple[int, bytes]]:
        _, _, rest = peer.transport.value().partition(b"\r\n\r\n")
        return list(fc.FrameDecoder().feed(rest))

    def said_goodbye(self, peer: Peer) -> bool:
        frames = self.out_frames(peer)
        texts = [p.decode() for op, p in frames if op == fc.TEXT]
        closes = [struct.unpack("!H", p[:2])[0] for op, p in frames if op == fc.CLOSE]
        return texts[-1:] == ['{"command": "HANGUP"}'] and closes == [1000]

    def audio_out(self, peer: Peer) -> int:
        return sum(1 for op, _ in self.out_frames(peer) if op == fc.BINARY)

    def pause_writes(self, peer: Peer) -> None:
        peer.transport.producer.pauseProducing()

    # -- what only chan_websocket has ---------------------------------------------------------

    def test_control_flood_ends_the_call_and_logs_little(self) -> None:
        peer, call = self.start_call()
        for _ in range(20000):
            peer.proto.dataReceived(fc.encode_frame(fc.TEXT, b'{"event":"NEW","channel_id":"1"}'))
            if self.closing(peer):
                break
        self.assertEqual(call.end_reason, EndReason.PROTOCOL_ERROR)
        self.assertIn("control flood", call.end_detail)
        self.assertLessEqual(self.logs.text().count("ignoring unknown event"), 1)
        self.assertLessEqual(len(self.logs.events), 10)

    def test_ping_flood_is_a_control_flood(self) -> None:
        peer, call = self.start_call()
        self.pause_writes(peer)  # and it does not read what we answer
        before = len(peer.transport.value())
        ping = fc.encode_frame(fc.PING, b"x" * 125)
        for _ in range(100000):
            peer.proto.dataReceived(ping)
            if self.closing(peer):
                break
        self.assertEqual(call.end_reason, EndReason.PROTOCOL_ERROR)
        pongs = 4 * self.listener.control_rate + 1
        self.assertLessEqual(len(peer.transport.value()) - before, pongs * 130)

    def test_what_waits_for_a_peer_that_does_not_read_is_bounded(self) -> None:
        self.listener.control_rate = 1e9  # so that only the buffer bound can end the call
        self.factory.max_unread = 10_000
        peer, call = self.start_call()
        self.pause_writes(peer)
        before = len(peer.transport.value())
        ping = fc.encode_frame(fc.PING, b"x" * 125)
        for _ in range(1000):
            peer.proto.dataReceived(ping)
            if self.closing(peer):
                break
        self.assertEqual(call.end_reason, EndReason.PEER_NOT_READING)
        self.assertIn("does not read", call.end_detail)
        self.assertLessEqual(len(peer.transport.value()) - before, 10_000)
        self.assertTrue(peer.transport.aborted)
