"""AudioSocket server: the sans-IO decoder and the shared lifecycle, joined by a thin Protocol."""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any

from twisted.internet import interfaces
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from rapida_tap import internals
from rapida_tap.audiosocket.wire import (
    AUDIO_SAMPLE_RATES,
    ERROR_CODES,
    HANGUP_FRAME,
    AudioSocketDecoder,
    FrameError,
    Kind,
    encode_frame,
    uuid_text,
)
from rapida_tap.interfaces import ICallLeg
from rapida_tap.media.audio import FRAME_BYTES, SAMPLE_RATE
from rapida_tap.media.codec import Resampler, from_bridge, to_bridge
from rapida_tap.media.lifecycle import ILegTransport, LegLifecycle, Phase
from rapida_tap.media.listener import LegListener, peer_text
from rapida_tap.reasons import EndReason, Refusal

if TYPE_CHECKING:  # pragma: no cover
    from rapida_tap.media.call import Call

_SLIN8 = int(Kind.SLIN_8K)
_SLIN8_HEADER = encode_frame(Kind.SLIN_8K, bytes(FRAME_BYTES))[:3]
_SLIN8_SILENCE = encode_frame(Kind.SLIN_8K, bytes(FRAME_BYTES))


@implementer(ICallLeg, ILegTransport, interfaces.IPushProducer)
class AudioSocketProtocol(Protocol):
    """One AudioSocket connection from Asterisk.

    The first frame must be the UUID (the context id) within ``id_timeout`` seconds; the
    context is then claimed and the call runs until either side ends it.  A refusal is a plain
    close: Asterisk accepts no error frame from the server, and ``AudioSocket()`` returns so the
    dialplan's next step runs.  Audio goes out in the kind Asterisk last sent (8 kHz until then).
    """

    transport_name = "audiosocket"
    lead_frames = 0  # Asterisk plays AudioSocket audio on receipt: nothing to send ahead
    transport: Any  # an ITCPTransport (and IProducer consumer) once connected

    def __init__(self, factory: AudioSocketFactory) -> None:
        self.factory = factory
        self.lifecycle = LegLifecycle(factory.listener, self, self)
        self._decoder = AudioSocketDecoder(max_audio_payload=factory.max_audio_payload)
        self._out_kind = _SLIN8
        self._header = _SLIN8_HEADER
        self._silence = _SLIN8_SILENCE
        self._upsample: Resampler | None = None
        self._downsample: Resampler | None = None
        self._in_rate = SAMPLE_RATE
        self._socket: socket.socket | None = None

    @property
    def call(self) -> Call | None:
        return self.lifecycle.call

    @property
    def codec(self) -> str:
        """Asterisk's name of the wire format: ``slin``, ``slin16``... (for the quality report)."""
        rate = self._in_rate
        return "slin" if rate == SAMPLE_RATE else f"slin{rate // 1000}"

    @property
    def sample_rate(self) -> int:
        return self._in_rate

    # -- bytes in ----------------------------------------------------------------------

    def connectionMade(self) -> None:
        lifecycle = self.lifecycle
        lifecycle.connected(peer_text(self.transport))
        if lifecycle.over_cap:
            lifecycle.refuse(
                Refusal.TOO_MANY_CONNECTIONS, f"over {lifecycle.listener.max_connections}"
            )
            return
        lifecycle.awaiting(self.factory.id_timeout, Refusal.NO_UUID, "no UUID frame")
        self.transport.registerProducer(self, True)
        # One small write per call per 20 ms: Nagle would hold a frame until the peer ACKs
        # the last one (up to a delayed-ACK timeout when the peer sends in bursts).
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        self._socket = internals.direct_socket(self.transport)

    def dataReceived(self, data: bytes) -> None:
        lifecycle = self.lifecycle
        if not lifecycle.open:
            return
        try:
            frames = self._decoder.feed(data)
            call = lifecycle.call
            for kind, payload in frames:
                if kind == _SLIN8 and call is not None and self._in_rate == SAMPLE_RATE:
                    call.audio_received(payload)  # the hot path: 8 kHz audio in a call
                    continue
                self._frame(kind, payload)
                if not lifecycle.open:
                    return
                call = lifecycle.call
        except FrameError as e:
            lifecycle.protocol_error(str(e))
        except Exception:
            lifecycle.failed("handling AudioSocket input failed")

    def _frame(self, kind: int, payload: bytes) -> None:
        lifecycle = self.lifecycle
        call = lifecycle.call
        if lifecycle.phase is Phase.AWAITING_ID:
            if kind != Kind.UUID:
                lifecycle.protocol_error(f"first frame was kind 0x{kind:02x}, not the UUID (0x01)")
                return
            lifecycle.identified(uuid_text(payload))
        elif kind in AUDIO_SAMPLE_RATES:
            if call is not None:
                self._audio(call, kind, payload)
        elif kind == Kind.DTMF:
            if call is not None and lifecycle.dtmf_allowed():
                call.dtmf_received(payload.decode("ascii"))
        elif kind == Kind.HANGUP:
            lifecycle.peer_closed("hangup frame from Asterisk")
            self.transport.loseConnection()
        elif kind == Kind.ERROR:
            code = payload[0]
            lifecycle.lost(f"Asterisk error 0x{code:02x} {ERROR_CODES.get(code, '?')}")
            self.transport.loseConnection()
        elif kind == Kind.UUID:
            lifecycle.protocol_error("a second UUID frame")

    def _audio(self, call: Call, kind: int, payload: bytes) -> None:
        if kind != self._out_kind:
            self._switch_rate(kind, AUDIO_SAMPLE_RATES[kind])
        if self._downsample is not None:
            payload = self._downsample(payload)
        call.audio_received(payload)

    def _switch_rate(self, kind: int, rate: int) -> None:
        """Asterisk's channel runs at ``rate``: convert both directions from now on."""
        self._out_kind = kind
        self._in_rate = rate
        if rate == SAMPLE_RATE:
            self._downsample = self._upsample = None
            self._header, self._silence = _SLIN8_HEADER, _SLIN8_SILENCE
        else:
            self._downsample, self._upsample = to_bridge(rate), from_bridge(rate)
            self._silence = encode_frame(kind, bytes(FRAME_BYTES * rate // SAMPLE_RATE))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._upsample = self._downsample = None  # the resamplers' native state
        self._socket = None
        self.lifecycle.connection_lost()

    # -- ICallLeg: bytes out -----------------------------------------------------------

    def send_audio(self, frame: bytes) -> bool:
        if not self.lifecycle.writable:
            return False
        if self._upsample is not None:
            self._send(encode_frame(self._out_kind, self._upsample(frame)))
        else:
            self._send(self._header + frame)
        return True

    def send_silence(self) -> None:
        if self.lifecycle.writable:
            self._send(self._silence)

    def send_clear(self) -> None:
        """Nothing to do: Asterisk plays AudioSocket audio on receipt and buffers none."""

    def send_mark(self, name: str) -> None:
        call = self.lifecycle.call
        if call is not None:
            call.mark_played(name)  # played on receipt

    def hangup(self, reason: EndReason) -> None:
        self.lifecycle.hangup(reason)

    def _send(self, data: bytes) -> None:
        """Write now when nothing is buffered (the pacer's tick *is* the send time).

        ``transport.write`` only buffers and asks the reactor for a writable event; for one
        frame per call per tick that costs two ``epoll_ctl`` calls, an event dispatch and the
        ``send``, roughly a third of the daemon's CPU.  A direct ``send`` is one syscall; what
        the kernel does not take goes through ``transport.write`` as before (so buffering,
        ordering and producer pausing are Twisted's).
        """
        sock = self._socket
        transport = self.transport
        if sock is not None and internals.nothing_buffered(transport):
            try:
                sent = sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                sent = 0  # let the transport see and report the error
                self._socket = None
            if sent == len(data):
                return
            data = data[sent:]
        transport.write(data)

    # -- ILegTransport -----------------------------------------------------------------

    def send_goodbye(self) -> None:
        self._send(HANGUP_FRAME)  # straight to the kernel: it must survive a shutdown

    def close(self, code: int, why: str) -> None:
        self.transport.loseConnection()

    def abort(self) -> None:
        self.transport.abortConnection()

    def ping(self) -> None:
        """AudioSocket has no ping: Asterisk's audio (or the idle timeout) shows it is there."""

    # -- IPushProducer: a peer that stops reading -------------------------------------

    def pauseProducing(self) -> None:
        self.lifecycle.writes_paused()

    def resumeProducing(self) -> None:
        self.lifecycle.writes_resumed()

    def stopProducing(self) -> None:
        """The connection is going: ``connectionLost`` follows."""


class AudioSocketFactory(Factory):
    """Serves AudioSocket connections of one ``LegListener`` (its bridge, limits and counts)."""

    protocol = AudioSocketProtocol
    noisy = False

    def __init__(
        self, listener: LegListener, *, id_timeout: float = 5.0, max_audio_payload: int = 8192
    ) -> None:
        self.listener = listener
        self.bridge = listener.bridge
        self.id_timeout = id_timeout
        self.max_audio_payload = max_audio_payload

    def buildProtocol(self, addr: object) -> AudioSocketProtocol:
        return AudioSocketProtocol(self)
