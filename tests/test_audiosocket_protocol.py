"""The AudioSocket protocol on in-memory transports and a Clock: every bad input, one by one."""

from __future__ import annotations

import uuid

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from rapida_tap.assistants.echo import EchoAssistant
from rapida_tap.assistants.registry import AssistantRegistry
from rapida_tap.audiosocket.protocol import AudioSocketFactory, AudioSocketProtocol
from rapida_tap.audiosocket.wire import HANGUP_FRAME, AudioSocketDecoder, Kind, encode_frame
from rapida_tap.contexts import CallContext, MemoryContextStore, new_context_id
from rapida_tap.media.bridge import MediaBridge
from rapida_tap.media.listener import LegListener
from rapida_tap.reasons import EndReason as reasons
from tests.support import capture_logs

AUDIO = encode_frame(Kind.SLIN_8K, b"\x01\x02" * 160)


class Transport(StringTransport):
    def __init__(self) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000))
        self.aborted = False

    def abortConnection(self) -> None:
        self.aborted = True
        self.loseConnection()


class ProtocolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.store = MemoryContextStore(self.clock)
        self.bridge = MediaBridge(
            clock=self.clock,
            contexts=self.store,
            assistants=AssistantRegistry(default=EchoAssistant()),
            idle_timeout=60,
        )
        listener = LegListener(self.bridge, "audiosocket", stall_timeout=5)
        self.factory = AudioSocketFactory(listener, id_timeout=5)
        self.logs = capture_logs(self)

    def mint(self, ttl: float = 30) -> str:
        context = CallContext(new_context_id(), "123", "+49")
        return self.successResultOf(self.store.mint(context, ttl))

    def connect(self) -> tuple[AudioSocketProtocol, Transport]:
        proto = self.factory.buildProtocol(None)
        transport = Transport()
        proto.makeConnection(transport)
        return proto, transport

    def lose(self, proto: AudioSocketProtocol, transport: Transport) -> None:
        """What the reactor does after loseConnection: tell the protocol it is gone."""
        if transport.disconnecting and proto.factory.listener.connections:
            proto.connectionLost()

    def start_call(self) -> tuple[AudioSocketProtocol, Transport, str]:
        ctx = self.mint()
        proto, transport = self.connect()
        proto.dataReceived(encode_frame(Kind.UUID, uuid.UUID(ctx).bytes))
        self.assertIsNotNone(proto.call)
        return proto, transport, ctx

    def sent_frames(self, transport: Transport) -> list[tuple[int, bytes]]:
        return list(AudioSocketDecoder(65535).feed(transport.value()))

    def assert_refused(self, transport: Transport, why: str) -> None:
        self.assertTrue(transport.disconnecting)
        self.assertIn(f"connection refused: {why}", self.logs.text())
        self.assertEqual(self.bridge.calls, {})

    # -- refusals before a call exists ---------------------------------------------------

    def test_unknown_context_id_is_refused_by_closing(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(encode_frame(Kind.UUID, uuid.uuid4().bytes))
        self.assert_refused(transport, "context-unknown")
        self.assertEqual(transport.value(), b"")  # no error frame: Asterisk would hang up

    def test_reused_context_id_is_refused(self) -> None:
        proto, transport, ctx = self.start_call()
        other, other_transport = self.connect()
        other.dataReceived(encode_frame(Kind.UUID, uuid.UUID(ctx).bytes))
        self.assertIn("connection refused: context-reused", self.logs.text())
        self.assertTrue(other_transport.disconnecting)
        self.assertIn(ctx, self.bridge.calls)  # the first call goes on
        self.assertFalse(transport.disconnecting)

    def test_expired_context_id_is_refused(self) -> None:
        ctx = self.mint(ttl=30)
        self.clock.advance(31)
        proto, transport = self.connect()
        proto.dataReceived(encode_frame(Kind.UUID, uuid.UUID(ctx).bytes))
        self.assert_refused(transport, "context-expired")

    def test_first_frame_must_be_the_uuid(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(AUDIO)
        self.assert_refused(transport, "protocol-error")
        self.assertIn("not the UUID", self.logs.text())

    def test_no_uuid_within_the_timeout(self) -> None:
        proto, transport = self.connect()
        self.clock.advance(4.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.2)
        self.assert_refused(transport, "no-uuid")

    def test_garbage_is_refused_with_a_precise_reason(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
        self.assert_refused(transport, "protocol-error")
        self.assertIn("0x47", self.logs.text())  # 'G' is no AudioSocket kind

    def test_a_peer_that_never_takes_the_close_is_aborted(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(b"\x99\x00\x00")
        self.assertTrue(transport.disconnecting)
        self.clock.advance(self.factory.listener.close_timeout)
        self.assertTrue(transport.aborted)

    def test_too_many_connections(self) -> None:
        self.factory.listener.max_connections = 1
        first, t1 = self.connect()
        second, t2 = self.connect()
        self.assertFalse(t1.disconnecting)
        self.assertTrue(t2.disconnecting)
        self.assertIn("too-many-connections", self.logs.text())

    def test_not_accepting_refuses(self) -> None:
        ctx = self.mint()
        self.bridge.accepting = False
        proto, transport = self.connect()
        proto.dataReceived(encode_frame(Kind.UUID, uuid.UUID(ctx).bytes))
        self.assert_refused(transport, "not-accepting")

    def test_uuid_split_over_reads(self) -> None:
        ctx = self.mint()
        proto, transport = self.connect()
        data = encode_frame(Kind.UUID, uuid.UUID(ctx).bytes) + AUDIO
        for i in range(len(data)):
            proto.dataReceived(data[i : i + 1])
        self.assertIsNotNone(proto.call)

    # -- bad input during a call ------------------------------------------------------

    def test_unknown_kind_mid_call_ends_only_that_call(self) -> None:
        proto, transport, ctx = self.start_call()
        other, other_transport, other_ctx = self.start_call()
        call = proto.call
        proto.dataReceived(AUDIO + b"\x42\x00\x01x")
        self.assertEqual(call.end_reason, reasons.PROTOCOL_ERROR)
        self.assertIn("0x42", call.end_detail)
        self.assertTrue(transport.disconnecting)
        self.assertIn(other_ctx, self.bridge.calls)
        self.assertFalse(other_transport.disconnecting)
        self.assertIn(f"call {ctx} ended: protocol-error", self.logs.text())

    def test_oversized_audio_frame_ends_the_call(self) -> None:
        proto, transport, ctx = self.start_call()
        call = proto.call
        proto.dataReceived(b"\x10\xff\xff")
        self.assertEqual(call.end_reason, reasons.PROTOCOL_ERROR)
        self.assertEqual(self.bridge.calls, {})

    def test_whole_frames_split_frames_and_runs_of_frames_keep_their_order(self) -> None:
        """One whole frame per read takes the short path; anything else the decoder's."""
        proto, transport, ctx = self.start_call()
        frames = [encode_frame(Kind.SLIN_8K, bytes([n]) * 320) for n in range(1, 8)]
        reads = [
            frames[0],
            frames[1][:100],  # the decoder now holds part of a frame...
            frames[1][100:] + frames[2][:23],
            frames[2][23:],  # ...and this read is a frame's length, but not a frame
            frames[3],
            frames[4] + frames[5],
            frames[6],
        ]
        for data in reads:
            proto.dataReceived(data)
        self.clock.pump([0.005] * 100)
        echoed = [p for k, p in self.sent_frames(transport) if k == Kind.SLIN_8K and any(p)]
        self.assertEqual(echoed, [f[3:] for f in frames])

    def test_a_frame_sized_read_with_another_header_is_decoded_not_trusted(self) -> None:
        proto, transport, ctx = self.start_call()
        call = proto.call
        proto.dataReceived(AUDIO)
        proto.dataReceived(b"\x77" + AUDIO[1:])  # same length, unknown kind
        self.assertEqual(call.end_reason, reasons.PROTOCOL_ERROR)
        self.assertIn("0x77", call.end_detail)

    def test_second_uuid_is_a_protocol_error(self) -> None:
        proto, transport, ctx = self.start_call()
        call = proto.call
        proto.dataReceived(encode_frame(Kind.UUID, uuid.uuid4().bytes))
        self.assertEqual(call.end_reason, reasons.PROTOCOL_ERROR)

    def test_error_frame_from_asterisk_ends_the_call(self) -> None:
        proto, transport, ctx = self.start_call()
        call = proto.call
        proto.dataReceived(encode_frame(Kind.ERROR, b"\x04"))
        self.assertEqual(call.end_reason, reasons.TRANSPORT_ERROR)
        self.assertIn("0x04", call.end_detail)

    def test_hangup_from_asterisk(self) -> None:
        proto, transport, ctx = self.start_call()
        call = proto.call
        proto.dataReceived(HANGUP_FRAME)
        self.assertEqual(call.end_reason, reasons.CALLER_HANGUP)
        self.assertTrue(transport.disconnecting)
        self.assertNotIn(HANGUP_FRAME, transport.value())  # no 0x00 back to a hangup

    def test_connection_lost_ends_the_call_and_frees_it(self) -> None:
        proto, transport, ctx = self.start_call()
        call = proto.call
        proto.connectionLost()
        self.assertEqual(call.end_reason, reasons.CALLER_HANGUP)
        self.assertEqual(self.bridge.calls, {})
        self.assertEqual(len(self.bridge.pacer), 0)
        self.assertEqual(self.factory.listener.connections, 0)
        self.store.close()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_dtmf_reaches_the_assistant_and_hash_hangs_up(self) -> None:
        proto, transport, ctx = self.start_call()
        call = proto.call
        proto.dataReceived(encode_frame(Kind.DTMF, b"5"))
        self.assertEqual(call.session.digits, ["5"])
        proto.dataReceived(encode_frame(Kind.DTMF, b"#"))
        self.assertEqual(call.end_reason, reasons.ASSISTANT_HANGUP)
        self.assertTrue(transport.value().endswith(HANGUP_FRAME))

    def test_short_frame_is_accepted(self) -> None:
        proto, transport, ctx = self.start_call()
        proto.dataReceived(encode_frame(Kind.SLIN_8K, b"\x05" * 216))
        self.clock.advance(0.02)
        frames = self.sent_frames(transport)
        self.assertEqual(frames[-1], (Kind.SLIN_8K, b"\x05" * 216 + bytes(104)))

    def test_one_frame_per_tick_even_if_asterisk_sends_nothing(self) -> None:
        proto, transport, ctx = self.start_call()
        self.clock.pump([0.02] * 10)
        frames = self.sent_frames(transport)
        self.assertEqual(len(frames), 10)
        self.assertTrue(all(f == (Kind.SLIN_8K, bytes(320)) for f in frames))

    def test_idle_in_both_directions_ends_the_call(self) -> None:
        proto, transport, ctx = self.start_call()
        call = proto.call
        self.clock.pump([1] * 80)
        self.assertEqual(call.end_reason, reasons.IDLE_TIMEOUT)
        self.assertTrue(transport.value().endswith(HANGUP_FRAME))

    def test_peer_that_stops_reading_is_hung_up(self) -> None:
        proto, transport, ctx = self.start_call()
        call = proto.call
        proto.pauseProducing()  # the transport's buffer is full
        before = len(transport.value())
        self.clock.pump([0.02] * 100)
        self.assertEqual(len(transport.value()), before)  # nothing more piled up
        self.clock.pump([0.02] * 200)
        self.assertEqual(call.end_reason, reasons.PEER_NOT_READING)

    def test_peer_that_resumes_in_time_keeps_the_call(self) -> None:
        proto, transport, ctx = self.start_call()
        proto.pauseProducing()
        self.clock.pump([0.02] * 100)
        proto.resumeProducing()
        self.clock.pump([0.02] * 300)
        self.assertFalse(proto.call.is_ended)

    def test_slin16_switches_both_directions(self) -> None:
        proto, transport, ctx = self.start_call()
        proto.dataReceived(encode_frame(Kind.SLIN_16K, bytes(640)))
        transport.clear()
        self.clock.advance(0.02)
        kind, payload = self.sent_frames(transport)[-1]
        self.assertEqual(kind, Kind.SLIN_16K)
        self.assertEqual(len(payload), 640)
        proto.connectionLost()

    def test_closed_while_claiming(self) -> None:
        """A slow store: the peer goes away before the claim answers; the call ends at once."""
        from twisted.internet import defer

        pending: defer.Deferred = defer.Deferred()
        ctx = self.mint()
        self.store.claim, real_claim = (lambda cid: pending), self.store.claim
        proto, transport = self.connect()
        proto.dataReceived(encode_frame(Kind.UUID, uuid.UUID(ctx).bytes))
        proto.connectionLost()
        real_claim(ctx).chainDeferred(pending)
        self.assertEqual(self.bridge.calls, {})
        self.assertEqual(self.bridge.ended_by_reason, {reasons.CALLER_HANGUP: 1})


class EchoStateTests(SynchronousTestCase):
    def test_echo_keeps_only_the_last_digits(self) -> None:
        from rapida_tap.assistants.echo import KEPT_DIGITS, EchoSession

        class Call:
            trim_backlog = False

        session = EchoSession(Call())  # type: ignore[arg-type]
        for i in range(10 * KEPT_DIGITS):
            session.dtmf_received(str(i % 10))
        self.assertEqual(len(session.digits), KEPT_DIGITS)
        self.assertEqual(session.digits[-1], "9")
