"""chan_websocket server: one Autobahn WebSocket connection from Asterisk is one call leg.

This module only adapts Autobahn to the shared lifecycle (``rapida_tap.media.lifecycle``): the
checks are in ``handshake``, the output framing in ``framing``, the formats in ``formats``, the
control messages in ``control`` and ``commands``.  The life of a connection:

1. Upgrade (``onConnect``): a refusal is an HTTP status, so ``Dial()`` fails at once.  The
   context is looked at, not claimed.  permessage-deflate is never negotiated.
2. ``MEDIA_START`` first, within ``start_timeout``: its format (JSON or plain text) is the
   format of every command we send; only then is the context claimed (single use).
3. In the call: binary messages are caller audio; ``DTMF_END`` reaches the assistant; marks
   and barge-in map to ``MARK_MEDIA`` / ``MEDIA_MARK_PROCESSED`` / ``FLUSH_MEDIA``;
   ``MEDIA_XOFF``/``MEDIA_XON`` hold and release the call's own queue.
4. The end: Asterisk's close frame is a caller hangup at once (its TCP reset right after is
   normal); the daemon ends a call with ``HANGUP`` then close 1000.

Audio is in the format ``MEDIA_START`` names, converted to the call's rate and back.  The
pacer's silence ticks send nothing (Asterisk plays its own silence; ours would only delay the
next words); ``lead_frames`` frames go ahead when speech starts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from autobahn.twisted.websocket import WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from rapida_tap import internals
from rapida_tap.contexts import ContextStoreUnavailable
from rapida_tap.frame_writer import FrameWriter
from rapida_tap.interfaces import ICallLeg
from rapida_tap.media.codec import RateMatch
from rapida_tap.media.lifecycle import (
    CLOSE_POLICY,
    CLOSE_TOO_BIG,
    ILegTransport,
    LegLifecycle,
    Phase,
    StallWatch,
)
from rapida_tap.media.listener import peer_text
from rapida_tap.reasons import EndReason, Refusal
from rapida_tap.websocket import commands, control
from rapida_tap.websocket.control import ControlError, ControlFormat
from rapida_tap.websocket.formats import MediaFormat, chain, default_frame_size
from rapida_tap.websocket.framing import MediaFramer, binary_frame, read_media_frame, unmask
from rapida_tap.websocket.handshake import (
    SUBPROTOCOL,
    HandshakeRefused,
    check_media_start,
    check_upgrade,
    frame_size_of,
)

if TYPE_CHECKING:  # pragma: no cover
    from autobahn.websocket.types import ConnectionRequest

    from rapida_tap.media.call import Call
    from rapida_tap.websocket.factory import MediaWebSocketFactory

XON_BURST = 100
"""Frames sent at once on ``MEDIA_XON``: Asterisk's XOFF and XON levels are 900 and 800, so
100 frames cannot push its queue past XOFF again."""


@implementer(ICallLeg, ILegTransport)
class MediaWebSocketProtocol(WebSocketServerProtocol):
    """One chan_websocket session (see the module docstring for its life)."""

    transport_name = "websocket"
    factory: MediaWebSocketFactory

    def __init__(self) -> None:
        super().__init__()
        self.lifecycle: LegLifecycle | None = None
        self.fmt: ControlFormat | None = None
        self.media_start: control.MediaStart | None = None
        self.detail = ""
        self.lead_frames = 0
        self.xoff_count = 0
        self.media_format: MediaFormat | None = None
        self.sample_rate: int | None = None  # the wire's rate, from MEDIA_START
        self._inbound: Callable[[bytes], bytes] | None = None  # wire -> call, once set up
        self._outbound: Callable[[bytes], bytes] = bytes
        self._odd = 0  # 1 for slin: a message of odd length splits a sample
        self._framer = MediaFramer()
        self._marks = commands.MarkTracker()
        self._mark_names: dict[str, str] = {}
        self._mark_seq = 0
        self._unread = 0  # bytes written while the peer does not read
        self._writer: FrameWriter | None = None  # once open
        # The last whole media frame's length and its bytes before the masking key: a read of
        # exactly that shape is one more such frame (see ``dataReceived``).
        self._media_size = -1
        self._media_head = b""
        self._autobahn_holds = True  # Autobahn holds part of a frame or message (or may)

    @property
    def call(self) -> Call | None:
        return self.lifecycle.call if self.lifecycle is not None else None

    @property
    def context_id(self) -> str:
        return self.lifecycle.context_id if self.lifecycle is not None else ""

    @property
    def codec(self) -> str:
        """The wire format Asterisk announced in MEDIA_START (for the quality report)."""
        return self.media_start.format if self.media_start is not None else "ulaw"

    @property
    def phase(self) -> Phase:
        return self.lifecycle.phase if self.lifecycle is not None else Phase.CLOSED

    # -- connection and handshake -------------------------------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        factory = self.factory
        self.lifecycle = lifecycle = LegLifecycle(factory.listener, self, self)
        self.lead_frames = factory.lead_frames
        lifecycle.connected(peer_text(self.transport))
        lifecycle.awaiting(factory.handshake_timeout, Refusal.HANDSHAKE_TIMEOUT, "no handshake")

    def onConnect(self, request: ConnectionRequest) -> Any:
        """Check the request; returns (a Deferred of) the subprotocol, or refuses with a status."""
        lifecycle = self._lifecycle()
        if lifecycle.over_cap:
            self._deny(
                503, Refusal.TOO_MANY_CONNECTIONS, f"over {lifecycle.listener.max_connections}"
            )
        try:
            lifecycle.context_id = check_upgrade(request.path, request.params, request.protocols)
        except HandshakeRefused as e:
            self._deny(e.status, e.reason, e.detail)
        bridge = self.factory.bridge
        if not bridge.accepting:
            self._deny(503, Refusal.NOT_ACCEPTING, "node is draining or stopping")
        d = bridge.contexts.get(lifecycle.context_id)
        d.addCallbacks(self._looked_up, self._lookup_failed)
        return d

    def _looked_up(self, context: object) -> str:
        if not self._lifecycle().open:
            raise ConnectionDeny(400, "client went away")
        if context is None:
            self._deny(
                404, Refusal.CONTEXT_UNKNOWN, f"{self.context_id} (unknown, expired or used)"
            )
        return SUBPROTOCOL

    def _lookup_failed(self, failure: Failure) -> None:
        if failure.check(ConnectionDeny):
            failure.raiseException()
        if failure.check(ContextStoreUnavailable):
            self._deny(503, Refusal.CONTEXT_STORE_UNAVAILABLE, failure.getErrorMessage())
        self._lifecycle().log.failure(
            "websocket {peer}: context lookup failed", failure, peer=self._lifecycle().peer
        )
        self._deny(500, Refusal.INTERNAL_ERROR, "context lookup failed")

    def _deny(self, status: int, why: Refusal, detail: str) -> None:
        self._lifecycle().refused_before_open(why, detail)
        raise ConnectionDeny(status, f"{why}: {detail}")

    def onOpen(self) -> None:
        lifecycle = self._lifecycle()
        self._writer = FrameWriter(self.transport)
        self._watch_writes()
        lifecycle.awaiting(self.factory.start_timeout, Refusal.NO_MEDIA_START, "no MEDIA_START")
        lifecycle.keep_alive()

    def _watch_writes(self) -> None:
        """Become the transport's producer, so a peer that stops reading is noticed.

        twisted.web's channel registered itself before the upgrade; after it the connection
        is ours, and its pause/resume must reach the lifecycle (``stall_timeout``).
        """
        transport: Any = self.transport  # TCP, or TLS over TCP: both take producers
        try:
            transport.unregisterProducer()
            transport.registerProducer(StallWatch(self._lifecycle()), True)
        except (AttributeError, RuntimeError):  # a transport without producers
            return

    def _lifecycle(self) -> LegLifecycle:
        assert self.lifecycle is not None, "used before connectionMade"
        return self.lifecycle

    # -- messages from Asterisk -----------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        """One read: most often exactly one frame of the call's audio, the same shape as the
        last (same length, same bytes before the masking key), which goes to the call here."""
        # (Autobahn's own dataReceived first formats the fields of a debug line, every read.)
        inbound = self._inbound
        if (
            len(data) == self._media_size
            and inbound is not None
            and not self._autobahn_holds
            and self.state == self.STATE_OPEN
            and data.startswith(self._media_head)
        ):
            lifecycle = self._lifecycle()
            call = lifecycle.call
            if call is not None:
                lifecycle.heard()
                key_at = len(self._media_head)
                body = key_at + 4
                try:
                    call.audio_received(inbound(unmask(data[body:], data[key_at:body])))
                except Exception:
                    lifecycle.failed("handling a chan_websocket message failed")
                return
        self._dataReceived(data)

    def _dataReceived(self, data: bytes) -> None:
        """Whole binary frames between messages take the media path; the rest is Autobahn's.

        A frame Autobahn has begun (a partial one, a fragmented message) stays Autobahn's to
        the end, so the two parsers never share a frame.  Autobahn's parser moves only here,
        so whether it holds anything is looked at once after it ran.
        """
        if self.state == self.STATE_OPEN and not self._autobahn_holds:
            taken = self._media_frames(data)
            if taken == len(data):
                return
            data = data[taken:]
        super()._dataReceived(data)
        self._autobahn_holds = not internals.websocket_between_frames(self)

    def _media_frames(self, data: bytes) -> int:
        """Hand the whole binary frames at the start of ``data`` to the call; how far it got."""
        lifecycle = self._lifecycle()
        limit = self.factory.max_message
        end = len(data)
        offset = 0
        try:
            while offset < end and self.state == self.STATE_OPEN:  # a frame may end the session
                frame = read_media_frame(data, offset, limit)
                if frame is None:
                    break
                if not offset:
                    lifecycle.heard()
                payload, stop = frame
                self._audio(lifecycle, payload)
                if not offset and stop == end and self._inbound is not None:
                    self._media_size = end
                    self._media_head = data[: end - len(payload) - 4]
                offset = stop
        except Exception:
            lifecycle.failed("handling a chan_websocket message failed")
            return end
        return offset

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        lifecycle = self._lifecycle()
        lifecycle.heard()
        try:
            if isBinary:
                self._audio(lifecycle, payload)
            elif lifecycle.control_allowed():
                self._text(lifecycle, payload)
        except Exception:
            lifecycle.failed("handling a chan_websocket message failed")

    def _audio(self, lifecycle: LegLifecycle, payload: bytes) -> None:
        call = lifecycle.call
        if call is not None:
            if len(payload) & self._odd:
                lifecycle.protocol_error(f"{len(payload)}-byte message of 16-bit slin")
            elif payload:
                inbound = self._inbound or self._convert_for(call)
                call.audio_received(inbound(payload))  # the hot path
        elif lifecycle.phase is Phase.AWAITING_ID:
            lifecycle.protocol_error("binary message before MEDIA_START")
        # audio while the context is being claimed is dropped

    def _text(self, lifecycle: LegLifecycle, payload: bytes) -> None:
        limit = self.factory.max_text
        if len(payload) > limit:
            lifecycle.protocol_error(
                f"text message of {len(payload)} bytes (limit {limit})", CLOSE_TOO_BIG
            )
            return
        text = payload.decode("utf-8")  # Autobahn has validated UTF-8 already
        try:
            event = control.parse_event(text, max_length=limit)
        except ControlError as e:
            lifecycle.protocol_error(f"malformed control message: {e}")
            return
        if lifecycle.phase is Phase.AWAITING_ID:
            self._media_start(lifecycle, event, text)
        elif lifecycle.open:
            self._event(lifecycle, event)

    def _media_start(self, lifecycle: LegLifecycle, event: control.Event, text: str) -> None:
        if not isinstance(event, control.MediaStart):
            lifecycle.protocol_error(f"first message was {event.name}, not MEDIA_START")
            return
        self.fmt = control.detect_format(text)
        self.media_start = event
        try:
            fmt = check_media_start(event, lifecycle.context_id)
        except HandshakeRefused as e:
            lifecycle.refuse(e.reason, e.detail, CLOSE_POLICY)
            return
        self.media_format = fmt
        self.sample_rate = fmt.rate
        self._odd = 1 if fmt.to_pcm is None else 0
        size = frame_size_of(event, default_frame_size(fmt))
        if fmt.to_pcm is None and size % 2:
            size = default_frame_size(fmt)  # slin is 2 bytes a sample: never split one
        self._framer = MediaFramer(size, fmt.silence)
        self.detail = (
            f" channel={event.channel} channel_id={event.channel_id} control={self.fmt}"
            f" format={fmt.name}"
        )
        lifecycle.identified(lifecycle.context_id)

    def _event(self, lifecycle: LegLifecycle, event: control.Event) -> None:
        call = lifecycle.call
        listener = lifecycle.listener
        ctx = lifecycle.context_id
        if isinstance(event, control.DtmfEnd):
            if call is not None and lifecycle.dtmf_allowed():
                call.dtmf_received(event.digit)
        elif isinstance(event, control.MediaMarkProcessed):
            settled = self._marks.processed(event.correlation_id)
            for cid in settled:
                self._mark_played(cid)
        elif isinstance(event, control.MediaXoff):
            self.xoff_count += 1
            lifecycle.hold("xoff")
            listener.note("xoff", "websocket {ctx}: MEDIA_XOFF, holding audio", ctx=ctx)
        elif isinstance(event, control.MediaXon):
            lifecycle.release("xoff", XON_BURST)
        elif isinstance(event, control.ErrorEvent):
            listener.note(
                "asterisk-error",
                "websocket {ctx}: Asterisk reported an error: {text}",
                ctx=ctx,
                text=event.error_text,
            )
        elif isinstance(event, control.UnknownEvent):
            listener.note(
                "unknown-event",
                "websocket {ctx}: ignoring unknown event {name}",
                ctx=ctx,
                name=event.name,
            )
        elif isinstance(event, control.MediaStart):
            listener.note("second-start", "websocket {ctx}: ignoring a second MEDIA_START", ctx=ctx)
        # STATUS, QUEUE_DRAINED, MEDIA_BUFFERING_COMPLETED: answers to commands we never send.

    def onPing(self, payload: bytes) -> None:
        lifecycle = self._lifecycle()
        lifecycle.heard()
        if lifecycle.control_allowed():
            super().onPing(payload)

    def onPong(self, payload: bytes) -> None:
        self._lifecycle().heard()

    def _convert_for(self, call: Call) -> Callable[[bytes], bytes]:
        """Set up both directions between the wire format and the call's rate (once)."""
        fmt = self.media_format
        assert fmt is not None, "a call starts only after MEDIA_START"
        match = RateMatch(fmt.rate, call.caller_rate_is(fmt.rate))
        self._media_size = -1  # a frame is learnt again in this format
        self._inbound = chain(fmt.to_pcm, match.to_call)
        self._outbound = chain(match.to_wire, fmt.from_pcm)
        return self._inbound

    # -- ICallLeg: the pacer and the call drive these -------------------------------------

    def send_audio(self, frame: bytes) -> bool:
        lifecycle = self.lifecycle
        if lifecycle is None or not lifecycle.writable:
            return False
        if self._inbound is None:
            call = self.call
            if call is not None:
                self._convert_for(call)
        data = self._framer.push(self._outbound(frame))
        if data:
            self._send_binary(data)
        return True

    def send_silence(self) -> None:
        """Nothing: Asterisk plays silence itself when its queue is empty."""

    def send_clear(self) -> None:
        if not self._lifecycle().writable:
            return
        self._framer.clear()
        self._send_text(commands.flush_media(self._format()))
        for cid in self._marks.flushed():
            self._mark_played(cid)

    def send_mark(self, name: str) -> None:
        if not self._lifecycle().writable:
            return
        self._mark_seq += 1
        cid = f"m{self._mark_seq}"
        self._mark_names[cid] = name
        padded = self._framer.pad()  # a partial frame would be dropped by Asterisk
        if padded:
            self._send_binary(padded)
        self._send_text(commands.mark_media(self._format(), cid))
        self._marks.sent(cid)

    def hangup(self, reason: EndReason) -> None:
        self._lifecycle().hangup(reason)

    def _mark_played(self, cid: str) -> None:
        name = self._mark_names.pop(cid, None)
        call = self.call
        if name is not None and call is not None:
            call.mark_played(name)

    # -- output ---------------------------------------------------------------------------

    def _format(self) -> ControlFormat:
        return self.fmt or ControlFormat.JSON

    def _send_binary(self, payload: bytes) -> None:
        """One binary message; framed by hand in the open state (Autobahn's general path costs
        several times the frame), through Autobahn otherwise."""
        if internals.websocket_open_and_idle(self) and self._writer is not None:
            self._writer.write(binary_frame(payload))
        elif self._is_open():
            self.sendMessage(payload, isBinary=True)

    def _send_text(self, text: str) -> None:
        if self._is_open():
            self.sendMessage(text.encode("utf-8"), isBinary=False)

    def _is_open(self) -> bool:
        return self.transport is not None and self.state == WebSocketServerProtocol.STATE_OPEN

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        """Every byte Autobahn writes; bounded while the peer does not read (pongs included)."""
        lifecycle = self.lifecycle
        if lifecycle is not None and lifecycle.blocked:
            self._unread += len(data)
            if self._unread > self.factory.max_unread:
                lifecycle.buffer_overflow(self._unread)
                return
        else:
            self._unread = 0
        super().sendData(data, sync, chopsize)

    # -- ILegTransport ----------------------------------------------------------------------

    def send_goodbye(self) -> None:
        if self.fmt is not None:
            self._send_text(commands.hangup(self.fmt))

    def close(self, code: int, why: str) -> None:
        if self._is_open():
            # sendCloseFrame, not sendClose: Autobahn's sendClose refuses the standard codes
            # 1002/1008/1009 that name the problem for the peer.
            self.sendCloseFrame(code=code, reasonUtf8=why.encode("utf-8")[:120], isReply=False)
        elif self.transport is not None:
            self.transport.loseConnection()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def ping(self) -> None:
        if self._is_open():
            self.sendPing()

    # -- endings ------------------------------------------------------------------------

    def onCloseFrame(self, code: int, reasonRaw: bytes) -> Any:
        """The peer's close frame ends the call now, before Autobahn's reply goes out."""
        lifecycle = self.lifecycle
        if lifecycle is not None and lifecycle.open:
            detail = f"close {code}" if code is not None else "close frame"
            if reasonRaw:
                detail += f" {reasonRaw[:60].decode('utf-8', 'replace')!r}"
            lifecycle.peer_closed(detail)
        return super().onCloseFrame(code, reasonRaw)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        lifecycle = self.lifecycle
        if lifecycle is None or not lifecycle.open:
            return
        if self.failedByMe:
            lifecycle.protocol_error(str(self.wasNotCleanReason or "failed"))
        else:
            lifecycle.lost("connection lost without a close frame")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self._inbound, self._outbound = None, bytes  # the resamplers' native state
        if self._writer is not None:
            self._writer.detach()
        if self.lifecycle is not None:
            self.lifecycle.connection_lost()
