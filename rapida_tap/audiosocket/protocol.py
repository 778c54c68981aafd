"""AudioSocket server: the sans-IO decoder and the shared lifecycle, joined by a thin Protocol."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet import interfaces
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

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
from rapida_tap.frame_writer import FrameWriter
from rapida_tap.interfaces import ICallLeg
from rapida_tap.media.audio import frame_bytes
from rapida_tap.media.codec import RateMatch, Resampler
from rapida_tap.media.lifecycle import ILegTransport, LegLifecycle, Phase
from rapida_tap.media.listener import LegListener, peer_text
from rapida_tap.reasons import EndReason, Refusal

if TYPE_CHECKING:  # pragma: no cover
    from rapida_tap.media.call import Call

_SLIN8 = int(Kind.SLIN_8K)


@implementer(ICallLeg, ILegTransport, interfaces.IPushProducer)
class AudioSocketProtocol(Protocol):
    """One AudioSocket connection from Asterisk.

    The first frame must be the UUID (the context id) within ``id_timeout`` seconds; the
    context is then claimed and the call runs until either side ends it.  A refusal is a plain
    close: Asterisk accepts no error frame from the server, and ``AudioSocket()`` returns so the
    dialplan's next step runs.

    Audio goes out in the kind Asterisk last sent (8 kHz until then).  The leg converts between
    that rate and its call's (one soxr step each way, none when they agree); the first audio
    frame tells the call the caller's rate (``Call.caller_rate_is``).
    """

    transport_name = "audiosocket"
    lead_frames = 0  # Asterisk plays AudioSocket audio on receipt: nothing to send ahead
    transport: Any  # an ITCPTransport (and IProducer consumer) once connected

    def __init__(self, factory: AudioSocketFactory) -> None:
        self.factory = factory
        self.lifecycle = LegLifecycle(factory.listener, self, self)
        self._decoder = AudioSocketDecoder(max_audio_payload=factory.max_audio_payload)
        self.sample_rate: int | None = None  # Asterisk's rate, once its first audio came
        self._out_kind = _SLIN8
        self._in_kind = -1  # the kind the conversion below is set up for (-1: none yet)
        self._direct_kind = -1  # an audio kind at the call's own rate: the hot path
        self._direct_size = -1  # bytes of one such frame, header included
        self._wired = False
        self._header = b""
        self._silence = encode_frame(Kind.SLIN_8K, bytes(frame_bytes(8000)))
        self._to_call: Resampler | None = None
        self._to_wire: Resampler | None = None
        self._writer: FrameWriter | None = None  # from connectionMade

    @property
    def call(self) -> Call | None:
        return self.lifecycle.call

    @property
    def codec(self) -> str:
        """Asterisk's name of the wire format: ``slin``, ``slin16``... (for the quality report)."""
        rate = self.sample_rate or 8000
        return "slin" if rate == 8000 else f"slin{rate // 1000}"

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
        self._writer = FrameWriter(self.transport)

    def dataReceived(self, data: bytes) -> None:
        lifecycle = self.lifecycle
        if not lifecycle.open:
            return
        try:
            if len(data) == self._direct_size and data[:3] == self._header:
                call = lifecycle.call  # one whole frame of the call's own audio: the hot path
                if call is not None and not self._decoder.buffered:
                    call.audio_received(data[3:])
                    return
            frames = self._decoder.feed(data)
            call = lifecycle.call
            for kind, payload in frames:
                if kind == self._direct_kind and call is not None:
                    call.audio_received(payload)  # the hot path: audio at the call's rate
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
        if kind != self._in_kind:
            rate = AUDIO_SAMPLE_RATES[kind]
            self.sample_rate = rate
            self._wire(kind, call.caller_rate_is(rate))
            self._in_kind = kind
            self._direct_kind = kind if self._to_call is None else -1
            self._direct_size = 3 + len(payload) if self._direct_kind != -1 else -1
        if self._to_call is not None:
            payload = self._to_call(payload)
        call.audio_received(payload)

    def _wire(self, kind: int, call_rate: int) -> None:
        """Asterisk's channel runs at ``kind``'s rate, the call at ``call_rate``: convert both
        directions between them from now on (nothing to convert when they agree)."""
        rate = AUDIO_SAMPLE_RATES[kind]
        match = RateMatch(rate, call_rate)
        self._to_call, self._to_wire = match.to_call, match.to_wire
        self._out_kind = kind
        self._direct_kind = -1  # until Asterisk's audio shows this kind (see ``_audio``)
        self._direct_size = -1
        self._header = encode_frame(kind, bytes(frame_bytes(rate)))[:3]
        self._silence = encode_frame(kind, bytes(frame_bytes(rate)))
        self._wired = True

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._to_call = self._to_wire = None  # the resamplers' native state
        if self._writer is not None:
            self._writer.detach()
        self.lifecycle.connection_lost()

    # -- ICallLeg: bytes out -----------------------------------------------------------

    def send_audio(self, frame: bytes) -> bool:
        if not self.lifecycle.writable:
            return False
        if not self._wired:
            # The assistant speaks before Asterisk sent audio: its rate is still unknown,
            # so the call's audio goes out as 8 kHz until Asterisk names its own.
            call = self.lifecycle.call
            self._wire(self._out_kind, call.rate if call is not None else 8000)
        to_wire = self._to_wire
        if to_wire is not None:
            self._send(encode_frame(self._out_kind, to_wire(frame)))
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
        writer = self._writer
        if writer is not None:
            writer.write(data)  # at once when nothing is buffered (see FrameWriter)

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
