"""One connection lifecycle for every call leg (AudioSocket, chan_websocket).

A leg's protocol only decodes bytes and encodes frames; what happens to the connection is
decided here, once, for every transport::

    awaiting-id ──identified──▶ claiming ──claimed──▶ in-call ──hangup──▶ closing ──lost──▶ closed
         │                          │                    │
         └── refused (timeout, protocol error, claim failed, cap) ──────▶ closing
                                     peer closed / lost ─────────────────▶ closed

The machine is sans-IO: it talks to its protocol through ``ILegTransport`` (goodbye, close,
abort, ping) and runs its timers on the listener's clock.  Its rules:

- Nothing is written once the connection is closing or closed: ``writable`` says so, and the
  goodbye (``0x00``, ``HANGUP``) is sent at most once, and only to a peer that is still there.
- Refusals are counted by reason and logged at most once per reason every few seconds.
- A peer that floods DTMF or control messages ends its own call as ``protocol-error``.
- An exception inside a protocol ends its call as ``internal-error`` (see ``Call.fail``).
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from rapida_tap.media.listener import LegListener
from rapida_tap.ratelimit import Bucket
from rapida_tap.reasons import EndReason, Refusal, refusal_of

if TYPE_CHECKING:  # pragma: no cover
    from rapida_tap.interfaces import ICallLeg
    from rapida_tap.media.call import Call

CLOSE_NORMAL = 1000
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009


class Phase(enum.Enum):
    AWAITING_ID = "awaiting-id"
    CLAIMING = "claiming"
    IN_CALL = "in-call"
    CLOSING = "closing"
    CLOSED = "closed"


class ILegTransport(Interface):
    """All the lifecycle asks of a protocol."""

    def send_goodbye() -> None:
        """Tell the peer the daemon ends the call (AudioSocket ``0x00``, ``HANGUP``)."""

    def close(code: int, why: str) -> None:
        """Close in order after what is buffered (a WebSocket close frame with ``code``)."""

    def abort() -> None:
        """Drop the connection now."""

    def ping() -> None:
        """Ask the peer for a sign of life (WebSocket ping); may do nothing."""


class LegLifecycle:
    """The life of one media connection, from its first byte to its last (see the module)."""

    log = Logger()

    def __init__(self, listener: LegListener, transport: ILegTransport, leg: ICallLeg) -> None:
        self.listener = listener
        self.transport = transport
        self.leg: ICallLeg | None = leg
        self.clock = listener.clock
        self.phase = Phase.AWAITING_ID
        self.peer = "?"
        self.call: Call | None = None
        self.context_id = ""
        self.error_code = CLOSE_PROTOCOL_ERROR
        self._counted = False
        self._heard = False
        self._holds: set[str] = set()
        self._deadline: IDelayedCall | None = None
        self._stall: IDelayedCall | None = None
        self._keepalive: IDelayedCall | None = None
        self._abort: IDelayedCall | None = None
        self._dtmf = Bucket(listener.dtmf_rate, int(listener.dtmf_rate * 4))
        self._control = Bucket(listener.control_rate, int(listener.control_rate * 4))

    @property
    def writable(self) -> bool:
        """Media may be written: the call runs and nobody has started closing."""
        return self.phase is Phase.IN_CALL

    @property
    def open(self) -> bool:
        return self.phase is not Phase.CLOSING and self.phase is not Phase.CLOSED

    # -- inputs: the connection ------------------------------------------------------------

    def connected(self, peer: str) -> None:
        """A new connection: counted until ``connection_lost``."""
        self.peer = peer
        self.listener.connections += 1
        self._counted = True

    @property
    def over_cap(self) -> bool:
        return self.listener.connections > self.listener.max_connections

    def awaiting(self, timeout: float, why: Refusal, what: str) -> None:
        """(Re)start the deadline for the peer's next step (its id, a handshake, MEDIA_START)."""
        self._cancel("_deadline")
        self._deadline = self.clock.callLater(
            timeout, self._missed, why, f"{what} within {timeout:g}s"
        )

    def keep_alive(self) -> None:
        """Start pinging a peer that may stay quiet for long (chan_websocket)."""
        if self.listener.ping_interval > 0 and self._keepalive is None and self.open:
            self._keepalive = self.clock.callLater(self.listener.ping_interval, self._check_alive)

    def heard(self) -> None:
        """Anything arrived from the peer."""
        self._heard = True

    def identified(self, context_id: str) -> None:
        """The peer named its context: claim it (single use) and start the call."""
        self._cancel("_deadline")
        self.phase = Phase.CLAIMING
        self.context_id = context_id
        assert self.leg is not None, "identified after the connection was lost"
        d = self.listener.bridge.open_call(context_id, self.leg)
        d.addCallbacks(self._claimed, self._claim_failed)

    def peer_closed(self, detail: str) -> None:
        """The peer ended the connection in order: a caller hangup."""
        self._gone(EndReason.CALLER_HANGUP, detail)

    def lost(self, detail: str) -> None:
        """The connection broke without an orderly end."""
        self._gone(EndReason.TRANSPORT_ERROR, detail)

    def connection_lost(self) -> None:
        """The last event of every connection: whatever is left ends, every timer stops."""
        if self.phase is not Phase.CLOSED:
            self.peer_closed("")
        self._cancel("_deadline", "_stall", "_keepalive", "_abort")
        if self._counted:
            self._counted = False
            self.listener.connections -= 1
        # Nothing more can happen on this connection.  Letting go of the call and of the
        # protocol (which holds this lifecycle) leaves no reference cycle between them, so an
        # ended call is freed by reference counts now, not by a full pass of the cyclic
        # collector minutes later (hundreds of ended calls' memory in between).
        self.call = None
        self.leg = None
        self.transport = DETACHED

    # -- inputs: the peer's behaviour ------------------------------------------------------

    def protocol_error(self, detail: str, code: int = CLOSE_PROTOCOL_ERROR) -> None:
        if self.call is not None:
            self.error_code = code
            self.call.end(EndReason.PROTOCOL_ERROR, detail)
        else:
            self.refuse(Refusal.PROTOCOL_ERROR, detail, code)

    def dtmf_allowed(self) -> bool:
        """Count one DTMF digit; over the per-call rate the call ends as a protocol error."""
        if self._dtmf.allow(self.clock.seconds()):
            return True
        self.protocol_error(f"DTMF flood: over {self.listener.dtmf_rate:g} digits/s")
        return False

    def control_allowed(self) -> bool:
        """Count one control message; over the per-call rate the call ends."""
        if self._control.allow(self.clock.seconds()):
            return True
        self.protocol_error(f"control flood: over {self.listener.control_rate:g} messages/s")
        return False

    def hold(self, cause: str) -> None:
        """The peer cannot take audio for ``cause`` (its XOFF): the call keeps it queued."""
        self._holds.add(cause)
        if self.call is not None:
            self.call.pause()

    def release(self, cause: str, burst: int = 0) -> None:
        """``cause`` is over; once no cause is left, audio flows (``burst`` frames at once)."""
        self._holds.discard(cause)
        if not self._holds and self.call is not None:
            self.call.resume(burst)

    @property
    def blocked(self) -> bool:
        """The kernel buffer toward the peer is full: whatever is written now piles up."""
        return self._stall is not None

    def writes_paused(self) -> None:
        """The peer stopped reading (kernel buffer full): hold the audio, start the clock."""
        self.hold("buffer")
        if self._stall is None and self.open:
            self._stall = self.clock.callLater(self.listener.stall_timeout, self._stalled)

    def writes_resumed(self) -> None:
        self._cancel("_stall")
        self.release("buffer")

    def buffer_overflow(self, size: int) -> None:
        """What waits for a peer that does not read grew past its bound."""
        detail = f"{size} bytes wait for a peer that does not read"
        if self.call is not None:
            self.call.end(EndReason.PEER_NOT_READING, detail)
        else:
            self.refuse(Refusal.PEER_NOT_READING, detail)
        self.transport.abort()

    def failed(self, what: str) -> None:
        """A bug while handling the peer's input (inside an ``except``): end, log once."""
        failure = Failure()
        if self.call is not None:
            self.call.fail(what, failure)
            return
        self.log.failure(
            "{transport} {peer}: {what}",
            failure,
            transport=self.listener.transport_name,
            peer=self.peer,
            what=what,
        )
        self.refuse(Refusal.INTERNAL_ERROR, what)

    # -- outputs ---------------------------------------------------------------------------

    def refuse(self, why: Refusal, detail: str, code: int = CLOSE_POLICY) -> None:
        """Close a connection whose call never started, once, counted and logged."""
        if not self.open or self.call is not None:
            return
        self.listener.count_refusal(self.peer, why, detail)
        self._close(code, str(why))

    def refused_before_open(self, why: Refusal, detail: str) -> None:
        """A refusal the protocol itself answers (an HTTP status for a WebSocket handshake)."""
        if self.open:
            self.listener.count_refusal(self.peer, why, detail)
            self.phase = Phase.CLOSING
            self._cancel("_deadline", "_stall", "_keepalive")

    def hangup(self, reason: EndReason) -> None:
        """The call ended: say goodbye to a peer that is still there, then close."""
        if not self.open:
            return
        if reason is EndReason.PROTOCOL_ERROR:
            self._close(self.error_code, str(reason))
        elif reason is EndReason.CALLER_HANGUP:
            self._close(CLOSE_NORMAL, "")
        else:
            try:
                self.transport.send_goodbye()
            except Exception:
                self.log.failure(
                    "{transport} {peer}: goodbye failed; dropping the connection",
                    transport=self.listener.transport_name,
                    peer=self.peer,
                )
                self.phase = Phase.CLOSING
                self.transport.abort()
                return
            self._close(CLOSE_NORMAL, str(reason))

    # -- inside ----------------------------------------------------------------------------

    def _claimed(self, call: Call) -> None:
        if not self.open:
            call.end(EndReason.CALLER_HANGUP, "closed while claiming")
            return
        self.phase = Phase.IN_CALL
        self.call = call
        if self._holds:
            call.pause()

    def _claim_failed(self, failure: Failure) -> None:
        why = refusal_of(failure.value) if failure.value is not None else Refusal.INTERNAL_ERROR
        if why is Refusal.INTERNAL_ERROR:
            self.log.failure(
                "{transport} {peer}: claim of {ctx} failed",
                failure,
                transport=self.listener.transport_name,
                peer=self.peer,
                ctx=self.context_id,
            )
        self.refuse(why, self.context_id)

    def _gone(self, reason: EndReason, detail: str) -> None:
        previous, self.phase = self.phase, Phase.CLOSED
        self._cancel("_deadline", "_stall", "_keepalive")
        if self.call is not None:
            self.call.end(reason, detail)
        elif previous is Phase.AWAITING_ID:
            self.listener.note(
                "closed-early",
                "{transport} {peer}: closed before the call started ({detail})",
                transport=self.listener.transport_name,
                peer=self.peer,
                detail=detail,
            )

    def _missed(self, why: Refusal, detail: str) -> None:
        self._deadline = None
        self.refuse(why, detail)

    def _stalled(self) -> None:
        self._stall = None
        detail = f"write buffer full for {self.listener.stall_timeout:g}s"
        if self.call is not None:
            self.call.end(EndReason.PEER_NOT_READING, detail)
        else:
            self.refuse(Refusal.PEER_NOT_READING, detail)
        self.transport.abort()

    def _check_alive(self) -> None:
        self._keepalive = None
        if not self.open:
            return
        if not self._heard:
            detail = f"nothing from the peer, not even a pong, for {self.listener.ping_interval:g}s"
            if self.call is not None:
                self.call.end(EndReason.TRANSPORT_ERROR, detail)
            else:
                self.refuse(Refusal.PEER_SILENT, detail)
            return
        self._heard = False
        self.transport.ping()
        self._keepalive = self.clock.callLater(self.listener.ping_interval, self._check_alive)

    def _close(self, code: int, why: str) -> None:
        """Close after flushing; abort if the peer does not finish in ``close_timeout``."""
        self.phase = Phase.CLOSING
        self._cancel("_deadline", "_stall", "_keepalive")
        self.transport.close(code, why)
        if self._abort is None and self.phase is Phase.CLOSING:
            self._abort = self.clock.callLater(self.listener.close_timeout, self._aborted)

    def _aborted(self) -> None:
        self._abort = None
        self.transport.abort()

    def _cancel(self, *names: str) -> None:
        for name in names:
            timer = getattr(self, name)
            if timer is not None:
                setattr(self, name, None)
                if timer.active():
                    timer.cancel()


@implementer(ILegTransport)
class _Detached:
    """The transport of a lifecycle whose connection is gone: every request is a no-op."""

    def send_goodbye(self) -> None:
        pass

    def close(self, code: int, why: str) -> None:
        pass

    def abort(self) -> None:
        pass

    def ping(self) -> None:
        pass


DETACHED = _Detached()


@implementer(IPushProducer)
class StallWatch:
    """A transport's producer that only tells a lifecycle when its peer stops reading."""

    def __init__(self, lifecycle: LegLifecycle) -> None:
        self._lifecycle = lifecycle

    def pauseProducing(self) -> None:
        self._lifecycle.writes_paused()

    def resumeProducing(self) -> None:
        self._lifecycle.writes_resumed()

    def stopProducing(self) -> None:
        """The connection is going: ``connectionLost`` follows."""
