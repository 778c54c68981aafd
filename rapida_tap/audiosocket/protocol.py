"""AudioSocket server: a thin Protocol around the sans-IO decoder, and the call leg it serves."""

from __future__ import annotations

import enum
import socket
from typing import TYPE_CHECKING, Any

from twisted.internet import interfaces, tcp
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
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
from rapida_tap.interfaces import ICallLeg
from rapida_tap.media import call as reasons
from rapida_tap.media.audio import FRAME_BYTES, SAMPLE_RATE
from rapida_tap.media.codec import Resampler, from_bridge, to_bridge
from rapida_tap.media.legs import peer_text

if TYPE_CHECKING:  # pragma: no cover
    from rapida_tap.media.bridge import MediaBridge
    from rapida_tap.media.call import Call

_SLIN8 = int(Kind.SLIN_8K)
_SLIN8_HEADER = encode_frame(Kind.SLIN_8K, bytes(FRAME_BYTES))[:3]
_SLIN8_SILENCE = encode_frame(Kind.SLIN_8K, bytes(FRAME_BYTES))


class State(enum.Enum):
    AWAIT_ID = "await-id"
    CLAIMING = "claiming"
    IN_CALL = "in-call"
    CLOSED = "closed"


@implementer(ICallLeg, interfaces.IPushProducer)
class AudioSocketProtocol(Protocol):
    """One AudioSocket connection from Asterisk.

    The first frame must be the UUID (the context id) within ``id_timeout`` seconds; the
    context is then claimed and the call runs until either side ends it.  A refusal is a plain
    close: Asterisk accepts no error frame from the server, and ``AudioSocket()`` returns so the
    dialplan's next step runs.  Audio goes out in the kind Asterisk last sent (8 kHz until then).
    """

    log = Logger()
    transport_name = "audiosocket"
    lead_frames = 0  # Asterisk plays AudioSocket audio on receipt: nothing to send ahead
    transport: Any  # an ITCPTransport (and IProducer consumer) once connected

    def __init__(self, factory: AudioSocketFactory) -> None:
        self.factory = factory
        self.clock: IReactorTime = factory.clock
        self.state = State.AWAIT_ID
        self.call: Call | None = None
        self.context_id = ""
        self._decoder = AudioSocketDecoder(max_audio_payload=factory.max_audio_payload)
        self._timer: IDelayedCall | None = None
        self._abort_timer: IDelayedCall | None = None
        self._paused = False
        self._out_kind = int(Kind.SLIN_8K)
        self._header = _SLIN8_HEADER
        self._silence = _SLIN8_SILENCE
        self._upsample: Resampler | None = None
        self._downsample: Resampler | None = None
        self._in_rate = SAMPLE_RATE
        self._socket: socket.socket | None = None

    # -- connection ------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.factory.connections += 1
        self.peer = peer_text(self.transport)
        if self.factory.connections > self.factory.max_connections:
            self._refuse("too-many-connections", f"over {self.factory.max_connections}")
            return
        self.transport.registerProducer(self, True)
        # One small write per call per 20 ms: Nagle would hold a frame until the peer ACKs
        # the last one (up to a delayed-ACK timeout when the peer sends in bursts).
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        self._socket = _direct_socket(self.transport)
        self._timer = self.clock.callLater(self.factory.id_timeout, self._id_timed_out)

    def dataReceived(self, data: bytes) -> None:
        if self.state is State.CLOSED:
            return
        try:
            frames = self._decoder.feed(data)
        except FrameError as e:
            self._protocol_error(str(e))
            return
        call = self.call
        for kind, payload in frames:
            if kind == _SLIN8 and call is not None and self._in_rate == SAMPLE_RATE:
                call.audio_received(payload)  # the hot path: 8 kHz audio in a call
                continue
            self._frame(kind, payload)
            if self.state is State.CLOSED:
                return
            call = self.call

    def _frame(self, kind: int, payload: bytes) -> None:
        if self.state is State.AWAIT_ID:
            if kind != Kind.UUID:
                self._protocol_error(f"first frame was kind 0x{kind:02x}, not the UUID (0x01)")
                return
            self._claim(uuid_text(payload))
        elif kind in AUDIO_SAMPLE_RATES:
            if self.call is not None:
                self._audio(kind, payload)
        elif kind == Kind.DTMF:
            if self.call is not None:
                self.call.dtmf_received(payload.decode("ascii"))
        elif kind == Kind.HANGUP:
            self._end(reasons.CALLER_HANGUP, "hangup frame from Asterisk")
        elif kind == Kind.ERROR:
            code = payload[0]
            name = ERROR_CODES.get(code, "?")
            self._end(reasons.TRANSPORT_ERROR, f"Asterisk error 0x{code:02x} {name}")
        elif kind == Kind.UUID:
            self._protocol_error("a second UUID frame")

    def _audio(self, kind: int, payload: bytes) -> None:
        assert self.call is not None
        rate = AUDIO_SAMPLE_RATES[kind]
        if kind != self._out_kind:
            self._switch_rate(kind, rate)
        if self._downsample is not None:
            payload = self._downsample(payload)
        self.call.audio_received(payload)

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
        self.factory.connections -= 1
        self._upsample = self._downsample = None  # the resamplers' native state
        self._cancel_timer()
        if self._abort_timer is not None and self._abort_timer.active():
            self._abort_timer.cancel()
        previous, self.state = self.state, State.CLOSED
        if self.call is not None:
            self.call.end(reasons.CALLER_HANGUP)
        elif previous is State.AWAIT_ID and self.context_id == "":
            if self.factory.log_unidentified:
                self.log.info("audiosocket {peer}: closed before any UUID frame", peer=self.peer)

    # -- claiming --------------------------------------------------------------------

    def _claim(self, context_id: str) -> None:
        self._cancel_timer()
        self.state = State.CLAIMING
        self.context_id = context_id
        d = self.factory.bridge.open_call(context_id, self)
        d.addCallbacks(self._claimed, self._claim_failed)

    def _claimed(self, call: Call) -> None:
        if self.state is State.CLOSED:
            call.end(reasons.CALLER_HANGUP, "closed while claiming")
            return
        self.state = State.IN_CALL
        self.call = call

    def _claim_failed(self, failure: Failure) -> None:
        why = getattr(failure.value, "reason", None)
        if why is None:
            why = "internal-error"
            self.log.failure(
                "audiosocket {peer}: claim of {ctx} failed",
                failure,
                peer=self.peer,
                ctx=self.context_id,
            )
        if self.state is State.CLOSED:
            return
        self._refuse(why, self.context_id)

    # -- ICallLeg ----------------------------------------------------------------------

    def send_audio(self, frame: bytes) -> None:
        if self._paused:
            return
        if self._upsample is not None:
            self._send(encode_frame(self._out_kind, self._upsample(frame)))
        else:
            self._send(self._header + frame)

    def send_silence(self) -> None:
        if not self._paused:
            self._send(self._silence)

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
        if sock is not None and not transport.dataBuffer and not transport._tempDataBuffer:
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

    def send_clear(self) -> None:
        """Nothing to do: Asterisk plays AudioSocket audio on receipt and buffers none."""

    def send_mark(self, name: str) -> None:
        if self.call is not None:
            self.call.mark_played(name)

    def hangup(self, reason: str) -> None:
        if self.state is State.CLOSED:
            return
        self.state = State.CLOSED
        self._cancel_timer()
        if reason != reasons.CALLER_HANGUP:
            self._send(HANGUP_FRAME)  # straight to the kernel: it must survive a shutdown
        self._close()

    # -- IPushProducer: a peer that stops reading -------------------------------------

    def pauseProducing(self) -> None:
        self._paused = True
        if self._timer is None and self.state is State.IN_CALL:
            self._timer = self.clock.callLater(self.factory.stall_timeout, self._stalled)

    def resumeProducing(self) -> None:
        self._paused = False
        if self.state is State.IN_CALL:
            self._cancel_timer()

    def stopProducing(self) -> None:
        self._paused = True

    # -- endings -----------------------------------------------------------------------

    def _stalled(self) -> None:
        self._timer = None
        self._end(
            reasons.PEER_NOT_READING, f"write buffer full for {self.factory.stall_timeout:g}s"
        )

    def _id_timed_out(self) -> None:
        self._timer = None
        self._refuse("no-uuid", f"no UUID frame within {self.factory.id_timeout:g}s")

    def _protocol_error(self, detail: str) -> None:
        if self.call is not None:
            self._end(reasons.PROTOCOL_ERROR, detail)
        else:
            self._refuse("protocol-error", detail)

    def _end(self, reason: str, detail: str) -> None:
        if self.call is not None:
            self.call.end(reason, detail)  # calls hangup() on this leg
        else:
            self._refuse(reason, detail)

    def _refuse(self, why: str, detail: str) -> None:
        self.log.warn(
            "audiosocket {peer}: connection refused: {why} ({detail})",
            peer=self.peer,
            why=why,
            detail=detail,
        )
        self.factory.refused[why] = self.factory.refused.get(why, 0) + 1
        self.state = State.CLOSED
        self._cancel_timer()
        self._close()

    def _close(self) -> None:
        """Close after flushing; abort if the peer does not take the last bytes in time."""
        self.transport.loseConnection()
        if self._abort_timer is None:
            self._abort_timer = self.clock.callLater(self.factory.close_timeout, self._abort)

    def _abort(self) -> None:
        self._abort_timer = None
        self.transport.abortConnection()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


class AudioSocketFactory(Factory):
    """Serves AudioSocket connections for one ``MediaBridge``; limits are per node."""

    protocol = AudioSocketProtocol
    noisy = False

    def __init__(
        self,
        bridge: MediaBridge,
        *,
        id_timeout: float = 5.0,
        stall_timeout: float = 5.0,
        close_timeout: float = 2.0,
        max_connections: int = 5000,
        max_audio_payload: int = 8192,
    ) -> None:
        self.bridge = bridge
        self.clock = bridge.clock
        self.id_timeout = id_timeout
        self.stall_timeout = stall_timeout
        self.close_timeout = close_timeout
        self.max_connections = max_connections
        self.max_audio_payload = max_audio_payload
        self.connections = 0
        self.refused: dict[str, int] = {}
        self.log_unidentified = True

    def buildProtocol(self, addr: object) -> AudioSocketProtocol:
        return AudioSocketProtocol(self)


def _direct_socket(transport: object) -> socket.socket | None:
    """The plain TCP socket under ``transport``, or None (TLS, memory transports, tests).

    The direct send relies on two buffers of Twisted's ``FileDescriptor`` being visible; where
    they are not, every write goes through ``transport.write`` as usual.
    """
    if type(transport) is not tcp.Server or getattr(transport, "TLS", False):
        return None
    if not hasattr(transport, "_tempDataBuffer") or not hasattr(transport, "dataBuffer"):
        return None
    return getattr(transport, "socket", None)
