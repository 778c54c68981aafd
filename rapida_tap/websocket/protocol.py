"""chan_websocket server: one Autobahn WebSocket connection from Asterisk is one call leg.

Asterisk's ``Dial(WebSocket/<section>/c(ulaw)f(json)v(ctx=<id>))`` connects to the URI of its
``websocket_client.conf`` section with ``?ctx=<id>`` appended (``docs/protocols.md`` section 3);
other clients may put the id in the path (``.../ctx/<id>``).  The life of a connection:

1. Handshake (``onConnect``): subprotocol ``media`` required, the context id must be well
   formed and known to the store (looked at, not claimed), the node must accept calls and be
   under its connection limit.  A refusal here is an HTTP error status, so ``Dial()`` fails
   at once and the dialplan continues.  permessage-deflate is never negotiated.
2. ``MEDIA_START`` must be the first message, within ``start_timeout`` seconds.  Its format
   (JSON or plain text) is the format of every command we send.  When its
   ``channel_variables`` carry ``__RAPIDA_CONTEXT_ID`` it must equal the URL's id: Asterisk
   keeps a previous call's ``v()`` query on a later dial, and such a call is refused (close
   1008) *without* claiming the URL's id.  Only then is the context claimed (single use).
3. In the call: binary messages are caller audio (μ-law 8 kHz, any length) converted to the
   bridge format; ``DTMF_END`` reaches the assistant; marks and flushes map to ``MARK_MEDIA``
   / ``MEDIA_MARK_PROCESSED`` / ``FLUSH_MEDIA``; ``MEDIA_XOFF``/``MEDIA_XON`` hold our output.
4. The end: a close frame from Asterisk is a caller hangup even if the TCP connection is reset
   right after it (Asterisk does not wait for our reply); the daemon ends a call with
   ``HANGUP`` followed by close 1000; a peer that answers nothing, not even a ping, for
   ``2 * ping_interval`` seconds is gone.

Output decisions (see ``docs/websocket.md``): the pacer's silence ticks send nothing, because
Asterisk plays its own silence when its queue is empty and silence frames would only add
latency ahead of the next speech; ``lead_frames`` frames go ahead when speech starts, so
Asterisk's 20 ms timer never finds the queue empty between two of our ticks.  While XOFF is in
force the frames the pacer hands us are held here (up to ``xoff_hold_frames``, newest dropped
beyond) and sent after XON, at most ``XON_BURST`` at once and then two per tick, so order and
marks are kept.  All timers run on the injected clock.
"""

from __future__ import annotations

import collections
import enum
from typing import TYPE_CHECKING, Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet import interfaces
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from rapida_tap.contexts import ContextStoreUnavailable, is_context_id
from rapida_tap.interfaces import ICallLeg
from rapida_tap.media import call as reasons
from rapida_tap.media.codec import pcm_to_ulaw, ulaw_to_pcm
from rapida_tap.media.legs import peer_text
from rapida_tap.websocket import control
from rapida_tap.websocket.control import ControlError, ControlFormat

if TYPE_CHECKING:  # pragma: no cover
    from autobahn.websocket.types import ConnectionRequest

    from rapida_tap.media.bridge import MediaBridge
    from rapida_tap.media.call import Call

__all__ = [
    "CONTEXT_VARIABLE",
    "SUBPROTOCOL",
    "XON_BURST",
    "BadContextId",
    "MediaWebSocketFactory",
    "MediaWebSocketProtocol",
    "context_id_from",
]

SUBPROTOCOL = "media"
CONTEXT_VARIABLE = "__RAPIDA_CONTEXT_ID"
XON_BURST = 100
"""Held frames sent at once on ``MEDIA_XON``: Asterisk's XOFF and XON levels are 900 and 800,
so 100 frames cannot push its queue past XOFF again."""

ULAW_SILENCE = 0xFF
CLOSE_NORMAL = 1000
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011


class BadContextId(ValueError):
    """The request names no context id, or not a well-formed one (HTTP 400)."""


def context_id_from(path: str, params: dict[str, list[str]]) -> str:
    """The context id of a handshake: ``?ctx=<id>`` or the last segment of ``.../ctx/<id>``.

    Both forms at once must agree.  Raises ``BadContextId`` naming the problem.
    """
    from_query = params.get("ctx", [])
    if len(from_query) > 1:
        raise BadContextId("more than one ctx= parameter")
    segments = [s for s in path.split("/") if s]
    from_path = segments[-1] if len(segments) >= 2 and segments[-2] == "ctx" else None
    if from_query and from_path is not None and from_query[0] != from_path:
        raise BadContextId("the context id in the path and in ?ctx= differ")
    found = from_query[0] if from_query else from_path
    if not found:
        raise BadContextId("no context id (expected ?ctx=<id> or .../ctx/<id>)")
    if not is_context_id(found):
        raise BadContextId(f"not a context id: {found[:40]!r}")
    return found


class State(enum.Enum):
    HANDSHAKE = "handshake"
    AWAIT_START = "await-media-start"
    CLAIMING = "claiming"
    IN_CALL = "in-call"
    CLOSED = "closed"


class _Mark:
    __slots__ = ("cid",)

    def __init__(self, cid: str) -> None:
        self.cid = cid


@implementer(ICallLeg)
class MediaWebSocketProtocol(WebSocketServerProtocol):
    """One chan_websocket session (see the module docstring for its life)."""

    # Not ``log``: that name is Autobahn's own (txaio) logger, which drops its per-frame debug
    # lines; a twisted Logger there would write them all (a third of the CPU at 100 calls).
    daemon_log = Logger()
    transport_name = "websocket"
    factory: MediaWebSocketFactory

    def __init__(self) -> None:
        super().__init__()
        self.phase = State.HANDSHAKE
        self.call: Call | None = None
        self.context_id = ""
        self.peer_name = "?"
        self.fmt: ControlFormat | None = None
        self.media_start: control.MediaStart | None = None
        self.lead_frames = 0
        self.frame_size = 160
        self.xoff = False
        self.xoff_count = 0
        self.held_dropped = 0
        self._held: collections.deque[bytes | _Mark] = collections.deque()
        self._held_audio = 0
        self._out = b""
        self._marks = control.MarkTracker()
        self._mark_names: dict[str, str] = {}
        self._mark_seq = 0
        self._timer: IDelayedCall | None = None
        self._ping_timer: IDelayedCall | None = None
        self._abort_timer: IDelayedCall | None = None
        self._stall_timer: IDelayedCall | None = None
        self._heard = False
        self._counted = False
        self._error_code = CLOSE_PROTOCOL_ERROR

    @property
    def clock(self) -> IReactorTime:
        return self.factory.clock

    # -- connection and handshake -------------------------------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        self.factory.connections += 1
        self._counted = True
        self.peer_name = peer_text(self.transport)
        self.lead_frames = self.factory.lead_frames
        self._timer = self.clock.callLater(self.factory.handshake_timeout, self._no_handshake)

    def onConnect(self, request: ConnectionRequest) -> Any:
        """Check the request; returns (a Deferred of) the subprotocol, or refuses with a status."""
        if self.factory.connections > self.factory.max_connections:
            self._deny(503, "too-many-connections", f"over {self.factory.max_connections}")
        if SUBPROTOCOL not in request.protocols:
            offered = ",".join(request.protocols) or "none"
            self._deny(
                400,
                "wrong-subprotocol",
                f"Sec-WebSocket-Protocol must offer {SUBPROTOCOL!r} (offered: {offered}); "
                "set protocols = media in websocket_client.conf",
            )
        try:
            self.context_id = context_id_from(request.path, request.params)
        except BadContextId as e:
            self._deny(400, "bad-context-id", str(e))
        if not self.factory.bridge.accepting:
            self._deny(503, "not-accepting", "node is draining or stopping")
        d = self.factory.bridge.contexts.get(self.context_id)
        d.addCallbacks(self._looked_up, self._lookup_failed)
        return d

    def _looked_up(self, context: object) -> str:
        if self.transport is None or self.state == WebSocketServerProtocol.STATE_CLOSED:
            raise ConnectionDeny(400, "client went away")
        if context is None:
            self._deny(404, "context-unknown", f"{self.context_id} (unknown, expired or used)")
        return SUBPROTOCOL

    def _lookup_failed(self, failure: Failure) -> None:
        if failure.check(ConnectionDeny):
            failure.raiseException()
        if failure.check(ContextStoreUnavailable):
            self._deny(503, "context-store-unavailable", failure.getErrorMessage())
        self.daemon_log.failure(
            "websocket {peer}: context lookup failed", failure, peer=self.peer_name
        )
        self._deny(500, "internal-error", "context lookup failed")

    def _deny(self, status: int, why: str, detail: str) -> None:
        self._count_refusal(why, detail)
        self.phase = State.CLOSED
        self._cancel_timers()
        raise ConnectionDeny(status, f"{why}: {detail}")

    def onOpen(self) -> None:
        self._watch_writes()
        self._cancel_timer()
        self.phase = State.AWAIT_START
        self._timer = self.clock.callLater(self.factory.start_timeout, self._no_media_start)
        if self.factory.ping_interval > 0:
            self._ping_timer = self.clock.callLater(self.factory.ping_interval, self._keepalive)

    def _watch_writes(self) -> None:
        """Become the transport's producer, so a peer that stops reading is noticed.

        twisted.web's channel registered itself before the upgrade; after it the connection
        is ours, and its pause/resume must reach the call (``stall_timeout``).
        """
        transport: Any = self.transport  # TCP, or TLS over TCP: both take producers
        try:
            transport.unregisterProducer()
            transport.registerProducer(_StallWatch(self), True)
        except (AttributeError, RuntimeError):  # a transport without producers
            return

    def _writes_paused(self) -> None:
        if self._stall_timer is None and self.phase is not State.CLOSED:
            self._stall_timer = self.clock.callLater(self.factory.stall_timeout, self._stalled)

    def _writes_resumed(self) -> None:
        if self._stall_timer is not None and self._stall_timer.active():
            self._stall_timer.cancel()
        self._stall_timer = None

    def _stalled(self) -> None:
        self._stall_timer = None
        detail = f"write buffer full for {self.factory.stall_timeout:g}s"
        if self.call is not None:
            self.call.end(reasons.PEER_NOT_READING, detail)
        else:
            self._count_refusal("peer-not-reading", detail)
            self._abort()

    # -- messages from Asterisk -----------------------------------------------------------

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self._heard = True
        call = self.call
        if isBinary:
            if call is not None:
                if payload:
                    call.audio_received(ulaw_to_pcm(payload))  # the hot path
            elif self.phase is State.AWAIT_START:
                self._protocol_error("binary message before MEDIA_START")
            return  # audio while the context is being claimed is dropped
        if len(payload) > self.factory.max_text:
            self._protocol_error(
                f"text message of {len(payload)} bytes (limit {self.factory.max_text})",
                CLOSE_TOO_BIG,
            )
            return
        text = payload.decode("utf-8")  # Autobahn has validated UTF-8 already
        try:
            event = control.parse_event(text, max_length=self.factory.max_text)
        except ControlError as e:
            self._protocol_error(f"malformed control message: {e}")
            return
        if self.phase is State.AWAIT_START:
            self._media_start(event, text)
        elif self.phase in (State.IN_CALL, State.CLAIMING):
            self._event(event)

    def _media_start(self, event: control.Event, text: str) -> None:
        if not isinstance(event, control.MediaStart):
            self._protocol_error(f"first message was {event.name}, not MEDIA_START")
            return
        self._cancel_timer()
        self.fmt = control.detect_format(text)
        self.media_start = event
        if event.format.lower() != "ulaw":
            self._refuse(
                "unsupported-format",
                f"format {event.format!r}: dial with c(ulaw)",
                CLOSE_POLICY,
            )
            return
        if 0 < event.optimal_frame_size <= 8000:
            self.frame_size = event.optimal_frame_size
        claimed = event.channel_variables.get(CONTEXT_VARIABLE)
        if claimed is not None and claimed != self.context_id:
            self._refuse(
                "context-mismatch",
                f"URL ctx {self.context_id} but {CONTEXT_VARIABLE}={claimed[:40]!r} "
                "(a previous call's v() query left on the dial: Asterisk bug)",
                CLOSE_POLICY,
            )
            return
        self.phase = State.CLAIMING
        d = self.factory.bridge.open_call(self.context_id, self)
        d.addCallbacks(self._claimed, self._claim_failed)

    def _claimed(self, call: Call) -> None:
        if self.phase is State.CLOSED:
            call.end(reasons.CALLER_HANGUP, "closed while claiming")
            return
        self.phase = State.IN_CALL
        self.call = call
        assert self.media_start is not None
        self.daemon_log.info(
            "websocket {peer}: call {ctx} on channel {channel} ({channel_id}), {fmt} control",
            peer=self.peer_name,
            ctx=self.context_id,
            channel=self.media_start.channel,
            channel_id=self.media_start.channel_id,
            fmt=str(self.fmt),
        )

    def _claim_failed(self, failure: Failure) -> None:
        why = getattr(failure.value, "reason", None)
        if why is None:
            why = "internal-error"
            self.daemon_log.failure(
                "websocket {peer}: claim of {ctx} failed",
                failure,
                peer=self.peer_name,
                ctx=self.context_id,
            )
        if self.phase is not State.CLOSED:
            self._refuse(why, self.context_id, CLOSE_POLICY)

    def _event(self, event: control.Event) -> None:
        call = self.call
        if isinstance(event, control.DtmfEnd):
            if call is not None:
                call.dtmf_received(event.digit)
        elif isinstance(event, control.MediaMarkProcessed):
            settled = self._marks.processed(event.correlation_id)
            if not settled:
                self.daemon_log.debug(
                    "websocket {ctx}: MEDIA_MARK_PROCESSED for unknown mark {mark!r}",
                    ctx=self.context_id,
                    mark=event.correlation_id,
                )
            for cid in settled:
                self._mark_played(cid)
        elif isinstance(event, control.MediaXoff):
            if not self.xoff:
                self.xoff = True
                self.xoff_count += 1
                self.daemon_log.info(
                    "websocket {ctx}: MEDIA_XOFF, holding audio", ctx=self.context_id
                )
        elif isinstance(event, control.MediaXon):
            if self.xoff:
                self.xoff = False
                self._drain_held(XON_BURST)
        elif isinstance(event, control.ErrorEvent):
            self.daemon_log.warn(
                "websocket {ctx}: Asterisk reported an error: {text}",
                ctx=self.context_id,
                text=event.error_text,
            )
        elif isinstance(event, control.UnknownEvent):
            self.daemon_log.info(
                "websocket {ctx}: ignoring unknown event {name}",
                ctx=self.context_id,
                name=event.name,
            )
        elif isinstance(event, control.MediaStart):
            self.daemon_log.warn(
                "websocket {ctx}: ignoring a second MEDIA_START", ctx=self.context_id
            )
        # STATUS, QUEUE_DRAINED, MEDIA_BUFFERING_COMPLETED: answers to commands we never send.

    def onPong(self, payload: bytes) -> None:
        self._heard = True

    # -- ICallLeg: the pacer and the call drive these -------------------------------------

    def send_audio(self, frame: bytes) -> None:
        if self.phase is not State.IN_CALL:
            return
        ulaw = pcm_to_ulaw(frame)
        if self.xoff:
            self._hold(ulaw)
        elif self._held:
            self._hold(ulaw)
            self._drain_held(2)
        else:
            self._send_media(ulaw)

    def send_silence(self) -> None:
        """No new audio: send nothing (Asterisk plays silence itself when its queue is empty),
        but keep working off audio held during XOFF."""
        if self._held and not self.xoff and self.phase is State.IN_CALL:
            self._drain_held(2)

    def send_clear(self) -> None:
        if self.phase is not State.IN_CALL:
            return
        held_marks = [m.cid for m in self._held if isinstance(m, _Mark)]
        self._held.clear()
        self._held_audio = 0
        self._out = b""
        self._send_text(control.flush_media(self._format()))
        for cid in (*self._marks.flushed(), *held_marks):
            self._mark_played(cid)

    def send_mark(self, name: str) -> None:
        if self.phase is not State.IN_CALL:
            return
        self._mark_seq += 1
        cid = f"m{self._mark_seq}"
        self._mark_names[cid] = name
        if self.xoff or self._held:
            self._held.append(_Mark(cid))
        else:
            self._send_mark(cid)

    def hangup(self, reason: str) -> None:
        if self.phase is State.CLOSED:
            return
        self.phase = State.CLOSED
        self._cancel_timers()
        if reason == reasons.CALLER_HANGUP:
            self._close(CLOSE_NORMAL, "")
            return
        if reason == reasons.PROTOCOL_ERROR:
            self._close(self._error_code, reason)
            return
        if self.fmt is not None and self._is_open():
            self._send_text(control.hangup(self.fmt))
        self._close(CLOSE_NORMAL, reason)

    # -- output helpers -----------------------------------------------------------------

    def _format(self) -> ControlFormat:
        return self.fmt or ControlFormat.JSON

    def _send_media(self, ulaw: bytes) -> None:
        size = self.frame_size
        if size == len(ulaw) and not self._out:
            self._send_binary(ulaw)
            return
        data = self._out + ulaw
        whole = len(data) - len(data) % size
        if whole:
            self._send_binary(data[:whole])
        self._out = data[whole:]

    def _send_binary(self, payload: bytes) -> None:
        """One unfragmented binary message.

        Autobahn's ``sendMessage`` is general (fragmentation, masking, statistics) and costs
        several times the frame itself; a server's binary frame is a 2-4 byte header and the
        payload, so in the open state with no message half sent it is written directly.
        """
        if self.state == self.STATE_OPEN and self.send_state == self.SEND_STATE_GROUND:
            size = len(payload)
            if size < 126:
                header = bytes((0x82, size))
            elif size < 65536:
                header = b"\x82\x7e" + size.to_bytes(2, "big")
            else:
                header = b"\x82\x7f" + size.to_bytes(8, "big")
            self.transport.write(header + payload)  # type: ignore[union-attr]
        else:
            self.sendMessage(payload, isBinary=True)

    def _send_mark(self, cid: str) -> None:
        if self._out:  # a partial frame would be dropped by Asterisk: pad it
            pad = bytes([ULAW_SILENCE]) * (self.frame_size - len(self._out))
            self._send_binary(self._out + pad)
            self._out = b""
        self._send_text(control.mark_media(self._format(), cid))
        self._marks.sent(cid)

    def _send_text(self, text: str) -> None:
        if self._is_open():
            self.sendMessage(text.encode("utf-8"), isBinary=False)

    def _hold(self, ulaw: bytes) -> None:
        if self._held_audio >= self.factory.xoff_hold_frames:
            if self.held_dropped == 0:
                self.daemon_log.warn(
                    "websocket {ctx}: Asterisk's queue stays full; dropping audio",
                    ctx=self.context_id,
                )
            self.held_dropped += 1
            return
        self._held.append(ulaw)
        self._held_audio += 1

    def _drain_held(self, frames: int) -> None:
        held = self._held
        while held and (frames > 0 or isinstance(held[0], _Mark)):
            item = held.popleft()
            if isinstance(item, _Mark):
                self._send_mark(item.cid)
            else:
                self._held_audio -= 1
                frames -= 1
                self._send_media(item)

    def _mark_played(self, cid: str) -> None:
        name = self._mark_names.pop(cid, None)
        if name is not None and self.call is not None:
            self.call.mark_played(name)

    def _is_open(self) -> bool:
        """Autobahn's own ``state``: the WebSocket is open (no close frame sent or received)."""
        return self.transport is not None and self.state == WebSocketServerProtocol.STATE_OPEN

    # -- endings ------------------------------------------------------------------------

    def _no_handshake(self) -> None:
        self._timer = None
        self._refuse(
            "handshake-timeout", f"no handshake within {self.factory.handshake_timeout:g}s"
        )

    def _no_media_start(self) -> None:
        self._timer = None
        self._refuse(
            "no-media-start", f"no MEDIA_START within {self.factory.start_timeout:g}s", CLOSE_POLICY
        )

    def _keepalive(self) -> None:
        """Every ``ping_interval``: ping if the peer was heard since, else it is gone."""
        self._ping_timer = None
        if self.phase is State.CLOSED:
            return
        if not self._heard:
            detail = f"nothing from the peer, not even a pong, for {self.factory.ping_interval:g}s"
            if self.call is not None:
                self.call.end(reasons.TRANSPORT_ERROR, detail)
            else:
                self._refuse("peer-silent", detail, CLOSE_POLICY)
            return
        self._heard = False
        if self._is_open():
            self.sendPing()
        self._ping_timer = self.clock.callLater(self.factory.ping_interval, self._keepalive)

    def _protocol_error(self, detail: str, code: int = CLOSE_PROTOCOL_ERROR) -> None:
        if self.call is not None:
            self._error_code = code
            self.call.end(reasons.PROTOCOL_ERROR, detail)
        else:
            self._refuse("protocol-error", detail, code)

    def _count_refusal(self, why: str, detail: str) -> None:
        self.daemon_log.warn(
            "websocket {peer}: connection refused: {why} ({detail})",
            peer=self.peer_name,
            why=why,
            detail=detail,
        )
        self.factory.refused[why] = self.factory.refused.get(why, 0) + 1

    def _refuse(self, why: str, detail: str, code: int = CLOSE_POLICY) -> None:
        if self.phase is State.CLOSED:
            return
        self._count_refusal(why, detail)
        self.phase = State.CLOSED
        self._cancel_timers()
        self._close(code, why)

    def _close(self, code: int, reason: str) -> None:
        """Close with a close frame if open, else drop; abort if the peer does not finish."""
        if self._is_open():
            # sendCloseFrame, not sendClose: Autobahn's sendClose refuses the standard codes
            # 1002/1008/1009 that name the problem for the peer.
            self.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8")[:120], isReply=False)
        elif self.transport is not None:
            self.transport.loseConnection()
        if self._abort_timer is None:
            self._abort_timer = self.clock.callLater(self.factory.close_timeout, self._abort)

    def _abort(self) -> None:
        self._abort_timer = None
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        previous, self.phase = self.phase, State.CLOSED
        self._cancel_timers()
        peer_closed = self.remoteCloseCode is not None
        if self.call is not None and not self.call.is_ended:
            if peer_closed:
                detail = f"close {self.remoteCloseCode}"
                if self.remoteCloseReason:
                    detail += f" {self.remoteCloseReason[:60]!r}"
                self.call.end(reasons.CALLER_HANGUP, detail)
            elif self.failedByMe:
                self.call.end(reasons.PROTOCOL_ERROR, str(self.wasNotCleanReason or "failed"))
            else:
                self.call.end(reasons.TRANSPORT_ERROR, "connection lost without a close frame")
        elif previous is not State.CLOSED and self.call is None:
            if self.failedByMe or (previous is State.HANDSHAKE and self.wasNotCleanReason):
                self._count_refusal("protocol-error", str(self.wasNotCleanReason or "failed"))
            else:
                self.daemon_log.info(
                    "websocket {peer}: closed before the call started ({state})",
                    peer=self.peer_name,
                    state=previous.value,
                )

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        if self._counted:
            self._counted = False
            self.factory.connections -= 1
        if self.phase is not State.CLOSED:  # Autobahn did not call onClose (never opened)
            self.onClose(False, None, None)
        self._cancel_timers()
        if self._abort_timer is not None and self._abort_timer.active():
            self._abort_timer.cancel()
        self._abort_timer = None

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _cancel_timers(self) -> None:
        self._cancel_timer()
        self._writes_resumed()
        if self._ping_timer is not None and self._ping_timer.active():
            self._ping_timer.cancel()
        self._ping_timer = None


@implementer(interfaces.IPushProducer)
class _StallWatch:
    """The transport's producer for one session: buffer full / drained / gone."""

    def __init__(self, leg: MediaWebSocketProtocol) -> None:
        self._leg = leg

    def pauseProducing(self) -> None:
        self._leg._writes_paused()

    def resumeProducing(self) -> None:
        self._leg._writes_resumed()

    def stopProducing(self) -> None:
        self._leg._writes_resumed()


class MediaWebSocketFactory(WebSocketServerFactory):
    """Serves chan_websocket sessions for one ``MediaBridge``; limits are per node.

    Times are seconds on ``bridge.clock``; sizes are bytes.  ``max_message`` bounds any
    message (audio or text, Autobahn closes with 1009 beyond it), ``max_text`` text messages.
    ``ping_interval`` 0 disables keep-alive pings (a vanished peer is then found by the call's
    idle timeout only).  Autobahn's own timers are off: every timer here runs on the clock.
    """

    protocol = MediaWebSocketProtocol  # type: ignore[assignment]
    noisy = False

    def __init__(
        self,
        bridge: MediaBridge,
        *,
        handshake_timeout: float = 10.0,
        start_timeout: float = 5.0,
        close_timeout: float = 2.0,
        stall_timeout: float = 5.0,
        ping_interval: float = 10.0,
        max_message: int = 65536,
        max_text: int = control.MAX_EVENT_LENGTH,
        max_connections: int = 5000,
        lead_frames: int = 3,
        xoff_hold_frames: int = 500,
    ) -> None:
        super().__init__(protocols=[SUBPROTOCOL], server="rapida-asterisk")
        self.bridge = bridge
        self.clock: IReactorTime = bridge.clock
        self.handshake_timeout = handshake_timeout
        self.start_timeout = start_timeout
        self.close_timeout = close_timeout
        self.stall_timeout = stall_timeout
        self.ping_interval = ping_interval
        self.max_text = max_text
        self.max_connections = max_connections
        self.lead_frames = lead_frames
        self.xoff_hold_frames = xoff_hold_frames
        self.connections = 0
        self.refused: dict[str, int] = {}
        self.setProtocolOptions(
            maxFramePayloadSize=max_message,
            maxMessagePayloadSize=max_message,
            perMessageCompressionAccept=lambda offers: None,
            openHandshakeTimeout=0,
            closeHandshakeTimeout=0,
            autoPingInterval=0,
            requireMaskedClientFrames=True,
            failByDrop=True,
            webStatus=False,
        )
