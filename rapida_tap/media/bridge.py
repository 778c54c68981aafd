"""The media bridge shared by every transport: claim a context, start a call, end it."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from rapida_tap.logs import log_line
from rapida_tap.media.call import Call
from rapida_tap.media.pacer import Pacer
from rapida_tap.reasons import EndReason, NotAccepting, UnknownAssistant

PACER_PHASES = 4
"""Ticks per 20 ms on the shared grid; each call is paced on one (``rapida_tap.media.pacer``)."""

if TYPE_CHECKING:  # pragma: no cover
    from rapida_tap.assistants.registry import AssistantRegistry
    from rapida_tap.contexts import CallContext
    from rapida_tap.interfaces import IAssistantSession, ICallLeg, IContextStore


class MediaBridge:
    """Owns the live calls of this node, the shared pacer, and the path from context id to call.

    ``open_call`` is what a transport calls once it knows the context id: it claims the context
    (single use), creates the ``Call`` (paced from that moment, so Asterisk hears silence rather
    than nothing while the assistant connects) and connects the assistant.
    """

    log = Logger()

    def __init__(
        self,
        *,
        clock: IReactorTime,
        contexts: IContextStore,
        assistants: AssistantRegistry,
        pacer: Pacer | None = None,
        idle_timeout: float = 60.0,
    ) -> None:
        self.clock = clock
        self.contexts = contexts
        self.assistants = assistants
        self.pacer = pacer if pacer is not None else Pacer(clock, phases=PACER_PHASES)
        self.idle_timeout = idle_timeout
        self.accepting = True
        self.calls: dict[str, Call] = {}
        self.calls_total = 0
        self.ended_by_reason: dict[EndReason, int] = {}
        self.call_started: list[Callable[[Call], None]] = []
        self.call_ended: list[Callable[[Call], None]] = []
        #: the ended call's quality report, logged in its end line (``rapida_tap.events``)
        self.end_report: Callable[[Call], dict[str, Any]] | None = None

    def open_call(self, context_id: str, leg: ICallLeg) -> defer.Deferred[Call]:
        """Claim ``context_id`` and start its call on ``leg``.

        Fails with the store's ``ContextError`` (unknown, expired, reused),
        ``ContextStoreUnavailable``, ``NotAccepting`` or ``UnknownAssistant``; the leg then
        refuses the connection.  No ``Call`` exists on failure.
        """
        if not self.accepting:
            return defer.fail(NotAccepting(context_id))
        return self.contexts.claim(context_id).addCallback(self._start, leg)

    def _start(self, context: CallContext, leg: ICallLeg) -> Call:
        assistant = self.assistants.lookup(context.assistant_id)
        if assistant is None:
            raise UnknownAssistant(context.assistant_id)
        if not self.accepting:
            raise NotAccepting(context.context_id)
        call = Call(
            context,
            leg,
            clock=self.clock,
            pacer=self.pacer,
            idle_timeout=self.idle_timeout,
            rate=getattr(assistant, "sample_rate", None),
        )
        wire_rate = getattr(leg, "sample_rate", None)  # known now on chan_websocket only
        if wire_rate:
            call.caller_rate_is(wire_rate)
        self.calls[context.context_id] = call
        self.calls_total += 1
        detail = getattr(leg, "detail", "")
        log_line(
            self.log,
            LogLevel.info,
            f"call {context.context_id} started: assistant={context.assistant_id} "
            f"caller={context.caller!r} transport={leg.transport_name} "
            f"direction={context.direction}{detail}",
            ctx=context.context_id,
            assistant_id=context.assistant_id,
            caller=context.caller,
            transport=leg.transport_name,
            direction=context.direction,
            detail=detail,
        )
        call.when_ended().addCallback(self._ended, call)
        for hook in self.call_started:
            hook(call)
        d = defer.maybeDeferred(assistant.connect, call)
        d.addCallback(self._attached, call, assistant.name)
        d.addErrback(self._assistant_failed, call)
        return call

    def _attached(self, session: IAssistantSession, call: Call, name: str) -> None:
        call.attach(session, name)

    def _assistant_failed(self, failure: Failure, call: Call) -> None:
        call.end(EndReason.ASSISTANT_FAILED, failure.getErrorMessage() or repr(failure.value))

    def _ended(self, reason: EndReason, call: Call) -> EndReason:
        self.calls.pop(call.context_id, None)
        self.ended_by_reason[reason] = self.ended_by_reason.get(reason, 0) + 1
        extra = {} if self.end_report is None else {"quality": self.end_report(call)}
        detail = f" ({call.end_detail})" if call.end_detail else ""
        duration = call.duration()
        context = call.context
        caller_rate = call.caller_rate or "-"
        log_line(
            self.log,
            LogLevel.info,
            f"call {call.context_id} ended: {reason}{detail} after {duration:.1f}s; "
            f"assistant={context.assistant_id} caller={context.caller!r} "
            f"transport={call.leg.transport_name} frames_in={call.frames_in} "
            f"frames_out={call.frames_out} underruns={call.underruns} "
            f"caller_rate={caller_rate} rate={call.rate} assistant_rate={call.assistant_rate}",
            ctx=call.context_id,
            reason=reason,
            detail=detail,
            duration=duration,
            assistant_id=context.assistant_id,
            caller=context.caller,
            transport=call.leg.transport_name,
            frames_in=call.frames_in,
            frames_out=call.frames_out,
            underruns=call.underruns,
            caller_rate=caller_rate,
            rate=call.rate,
            assistant_rate=call.assistant_rate,
            **extra,
        )
        for hook in self.call_ended:
            hook(call)
        return reason

    def end_all(self, reason: EndReason = EndReason.SHUTDOWN) -> None:
        """End every live call (service stop, end of a drain)."""
        for call in list(self.calls.values()):
            call.end(reason)
