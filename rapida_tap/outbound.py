"""Outbound calls through Asterisk ARI: mint a context, originate, follow the call to its end.

Without a Stasis application the daemon learns how a call went from its own side: the media
connection claiming the context means *connected*, the bridge ending that call gives the end
reason, and a ring timer (helped by a periodic ``GET`` of the channel) catches calls nobody
answers.  The status of each call lives in memory on the node that placed it; ended calls are
kept for a while (bounded in number and age) so that programs can read how they ended.

The context outlives the ring timer by ``CONNECT_GRACE`` seconds so that the timer can *claim*
it: a claim is atomic (even across nodes with a shared store), so either the media connection
or the timer wins, never both.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from rapida_tap.ari import AriClient, AriError, AriProvider, AriTimeout
from rapida_tap.contexts import (
    OUTBOUND,
    CallContext,
    ContextError,
    ContextStoreUnavailable,
    new_context_id,
)
from rapida_tap.dialstring import build_endpoint, describe_endpoint
from rapida_tap.outbound_call import (
    CANCELLED,
    NO_ANSWER,
    NOT_ANSWERED,
    NOT_CONNECTED,
    ORIGINATE_FAILED,
    CallElsewhere,
    CallRecords,
    OutboundCall,
    Status,
    Unavailable,
    UnknownAssistantId,
    UnknownCall,
)
from rapida_tap.providers import choose_provider
from rapida_tap.reasons import EndReason
from rapida_tap.web.call_request import (
    AUDIOSOCKET,
    CONTEXT_VARIABLE,
    CallRequest,
)

if TYPE_CHECKING:  # pragma: no cover
    from rapida_tap.media.bridge import MediaBridge
    from rapida_tap.media.call import Call

#: Seconds the context outlives the ring timer (see the module docstring).
CONNECT_GRACE = 5.0


# -- the calls -------------------------------------------------------------------------------


class OutboundCalls:
    """Places outbound calls through ARI and follows them (status kept on this node).

    ``ring_timeout`` (seconds) bounds the ring: after it the context is taken back and the
    channel hung up.  ``check_interval`` (seconds, 0 = off) is how often a ringing channel is
    looked up over ARI, to notice a callee who rejected the call before the ring timeout.
    ``client_factory`` builds the ARI client of each provider (tests pass fakes).
    """

    log = Logger()

    def __init__(
        self,
        bridge: MediaBridge,
        providers: Mapping[str, AriProvider],
        *,
        clock: IReactorTime,
        ring_timeout: float = 120.0,
        check_interval: float = 5.0,
        client_factory: Callable[[AriProvider], Any] | None = None,
        max_ended: int = 1000,
        ended_retention: float = 3600.0,
    ) -> None:
        self._bridge = bridge
        self._clock = clock
        self.providers = dict(providers)
        factory = client_factory or (lambda p: AriClient(p, clock))
        self._clients = {name: factory(p) for name, p in self.providers.items()}
        self.ring_timeout = ring_timeout
        self.check_interval = check_interval
        self.accepting = True
        self._records = CallRecords(clock, max_ended=max_ended, retention=ended_retention)
        self._live = self._records.live
        self._pending: set[Deferred[Any]] = set()
        #: called with a record after each change of its status (call control, webhooks)
        self.changed: list[Callable[[OutboundCall], None]] = []
        bridge.call_started.append(self._call_started)
        bridge.call_ended.append(self._call_ended)
        for p in self.providers.values():
            self.log.info(
                "outbound provider {name}: {url} as {user}, dialling {endpoint}",
                name=p.name,
                url=p.ari_url,
                user=p.ari_user,
                endpoint=describe_endpoint(p),
            )

    # -- the API ---------------------------------------------------------------------------

    def place(self, request: CallRequest) -> Deferred[OutboundCall]:
        """Mint a context and originate; fire once ARI created the channel (status ringing).

        Fails with ``OutboundError`` subclasses for the request and ``AriError`` subclasses
        when ARI refused or could not be reached (the call is then ended, reason
        ``originate-failed``, and its context can no longer connect).
        """
        return Deferred.fromCoroutine(self._place(request))

    def get(self, context_id: str) -> OutboundCall:
        """The call, live or recently ended; ``UnknownCall`` otherwise."""
        record = self._records.get(context_id)
        if record is None:
            raise UnknownCall(f"no outbound call {context_id} on this node")
        return record

    def calls(self) -> list[OutboundCall]:
        """Live calls, then recently ended ones, oldest first."""
        return self._records.all()

    def hangup(self, context_id: str) -> Deferred[OutboundCall]:
        """End the call: through ARI before it connected, through the bridge once connected.

        Ended calls are returned as they are.  Fails with ``UnknownCall``, ``CallElsewhere``
        or an ``AriError`` when ARI could not hang the channel up (the call is ended anyway:
        its context can no longer connect, and Asterisk stops ringing after its own timeout).
        """
        return Deferred.fromCoroutine(self._hangup(context_id))

    def stop(self) -> Deferred[Any]:
        """Stop placing calls, hang up the ringing ones, close the ARI clients."""
        return Deferred.fromCoroutine(self._stop())

    # -- placing ---------------------------------------------------------------------------

    async def _place(self, request: CallRequest) -> OutboundCall:
        if not (self.accepting and self._bridge.accepting):
            raise Unavailable("this node is not accepting calls (draining or stopping)")
        provider = choose_provider(self.providers, request.provider)
        if self._bridge.assistants.lookup(request.assistant_id) is None:
            raise UnknownAssistantId(f"unknown assistant {request.assistant_id!r}")
        endpoint = build_endpoint(provider, request.to)
        now = self._clock.seconds()
        context = CallContext(
            context_id=new_context_id(),
            assistant_id=request.assistant_id,
            caller=request.to,
            direction=OUTBOUND,
            created_at=now,
            variables=dict(request.variables),
        )
        try:
            await self._bridge.contexts.mint(context, self.ring_timeout + CONNECT_GRACE)
        except ContextStoreUnavailable as e:
            raise Unavailable(f"the context store is unavailable: {e}") from None
        record = OutboundCall(
            context_id=context.context_id,
            channel_id=new_context_id(),
            provider=provider.name,
            assistant_id=request.assistant_id,
            to=request.to,
            caller_id=request.caller_id or provider.caller_id,
            transport=request.transport,
            created_at=now,
        )
        self._live[record.context_id] = record
        self._changed(record)
        record.ring_timer = self._clock.callLater(self.ring_timeout, self._ring_timed_out, record)
        dialplan = provider.context if request.transport == AUDIOSOCKET else provider.ws_context
        try:
            await self._clients[provider.name].originate(
                record.channel_id,
                endpoint,
                context=dialplan,
                caller_id=record.caller_id,
                ring_timeout=math.ceil(self.ring_timeout),
                variables={**request.variables, CONTEXT_VARIABLE: record.context_id},
            )
        except AriError as e:
            await self._originate_failed(record, e)
            raise
        record.originated = True
        if record.status == Status.ORIGINATING:
            record.move(Status.RINGING)
            record.ringing_at = self._clock.seconds()
            self.log.info(
                "outbound call {ctx} to {to} via {provider}: ringing on channel {channel} "
                "(assistant={assistant_id} transport={transport} dialplan={dialplan})",
                ctx=record.context_id,
                to=record.to,
                provider=record.provider,
                channel=record.channel_id,
                assistant_id=record.assistant_id,
                transport=record.transport,
                dialplan=dialplan,
            )
            self._changed(record)
            self._schedule_check(record)
        elif record.status == Status.ENDED and record.call is None:
            # Cancelled or timed out while the originate was under way.
            self._hangup_quietly(record, "normal")
        return record

    async def _originate_failed(self, record: OutboundCall, error: AriError) -> None:
        took = await self._take_back(record)
        if not took:
            return  # answered and connected although ARI's reply was lost (a timeout)
        self._finish(record, ORIGINATE_FAILED, error.message)
        if isinstance(error, AriTimeout):
            # Asterisk may have created the channel all the same.
            self._hangup_quietly(record, "normal")

    # -- following -------------------------------------------------------------------------

    def _call_started(self, call: Call) -> None:
        record = self._live.get(call.context_id)
        if record is None or record.status == Status.ENDED:
            return
        record.stop_timers()
        record.move(Status.CONNECTED)
        record.call = call
        record.connected_at = self._clock.seconds()
        self._changed(record)
        self.log.info(
            "outbound call {ctx}: connected after {seconds:.1f}s",
            ctx=record.context_id,
            seconds=record.connected_at - record.created_at,
        )

    def _call_ended(self, call: Call) -> None:
        record = self._live.get(call.context_id)
        if record is None or record.call is not call:
            return
        self._finish(record, call.end_reason or EndReason.SHUTDOWN, call.end_detail, log=False)

    def _ring_timed_out(self, record: OutboundCall) -> None:
        record.ring_timer = None
        if record.answered:
            reason, detail = NOT_CONNECTED, self._not_connected_detail(record)
        else:
            reason, detail = NO_ANSWER, f"not answered within {self.ring_timeout:g}s"
        self._track(
            Deferred.fromCoroutine(self._give_up(record, reason, detail, ari_reason="no_answer"))
        )

    def _schedule_check(self, record: OutboundCall) -> None:
        if self.check_interval > 0 and record.status == Status.RINGING and self.accepting:
            record.check_timer = self._clock.callLater(self.check_interval, self._check, record)

    def _check(self, record: OutboundCall) -> None:
        record.check_timer = None
        d = self._clients[record.provider].get_channel(record.channel_id)
        d.addCallbacks(self._checked, self._check_failed, (record,), {}, (record,))
        self._track(d)

    def _checked(self, channel: dict[str, Any] | None, record: OutboundCall) -> None:
        if record.status != Status.RINGING:
            return
        if channel is None:
            if record.answered:
                reason, detail = NOT_CONNECTED, self._not_connected_detail(record)
            else:
                reason = NOT_ANSWERED
                detail = "the channel ended before it was answered (busy, rejected, unreachable)"
            self._track(Deferred.fromCoroutine(self._give_up(record, reason, detail, None)))
            return
        if channel.get("state") == "Up":
            record.answered = True
        self._schedule_check(record)

    def _check_failed(self, failure: Failure, record: OutboundCall) -> None:
        failure.trap(AriError)  # the ARI client logged it; the ring timer still runs
        self._schedule_check(record)

    @staticmethod
    def _not_connected_detail(record: OutboundCall) -> str:
        return (
            f"answered, but the dialplan never connected the media: check that the channel "
            f"lands in the provider's {record.transport} outbound context"
        )

    async def _give_up(
        self, record: OutboundCall, reason: str, detail: str, ari_reason: str | None
    ) -> None:
        """End a call that has not connected; hang its channel up when ``ari_reason``."""
        if not await self._take_back(record):
            return
        self._finish(record, reason, detail)
        if ari_reason is not None and record.originated:
            await self._hangup_quietly(record, ari_reason)

    async def _take_back(self, record: OutboundCall) -> bool:
        """Claim the context ourselves so no media connection can use it any more.

        False when the call already ended, another take-back is under way, or a media
        connection got the context first; when that was on another node, the call is from then
        on only followed there.
        """
        if record.status == Status.ENDED or record.claiming:
            return False
        record.claiming = True
        try:
            await self._bridge.contexts.claim(record.context_id)
        except ContextError:
            if record.call is None and record.status != Status.CONNECTED:
                record.stop_timers()
                record.move(Status.CONNECTED)
                record.detail = "the media connected to another node"
                self._records.retain(record)
                self._changed(record)
            return False
        except ContextStoreUnavailable as e:
            self.log.warn(
                "outbound call {ctx}: cannot take the context back: {error}",
                ctx=record.context_id,
                error=e,
            )
        finally:
            record.claiming = False
        return True

    def _finish(self, record: OutboundCall, reason: str, detail: str, log: bool = True) -> None:
        record.stop_timers()
        record.move(Status.ENDED)
        record.reason = reason
        record.detail = detail
        record.ended_at = self._clock.seconds()
        record.call = None
        self._records.retain(record)
        self._changed(record)
        if log:
            self.log.info(
                "outbound call {ctx} to {to} via {provider} ended: {reason} ({detail})",
                ctx=record.context_id,
                to=record.to,
                provider=record.provider,
                reason=reason,
                detail=detail,
            )

    # -- hanging up ------------------------------------------------------------------------

    async def _hangup(self, context_id: str) -> OutboundCall:
        record = self.get(context_id)
        if record.status == Status.ENDED:
            return record
        if record.call is None and record.status != Status.CONNECTED:
            if await self._take_back(record):
                self._finish(record, CANCELLED, "hung up through the API before it connected")
                if record.originated:
                    await self._clients[record.provider].hangup(record.channel_id, "normal")
                return record
            if record.status == Status.ENDED or record.claiming:
                return record  # the ring timer got there first
        if record.call is None:
            raise CallElsewhere(
                f"outbound call {context_id} is connected on another node; hang it up there"
            )
        record.call.end(EndReason.API_HANGUP, "hung up through the API")
        return record

    def _changed(self, record: OutboundCall) -> None:
        for hook in self.changed:
            hook(record)

    def _hangup_quietly(self, record: OutboundCall, ari_reason: str) -> Deferred[Any]:
        """Hang the channel up, logging (not raising) a failure: Asterisk's own originate
        timeout (the ring timeout) ends the channel anyway."""

        def failed(failure: Failure) -> None:
            failure.trap(AriError)
            self.log.warn(
                "outbound call {ctx}: could not hang up channel {channel}: {error}",
                ctx=record.context_id,
                channel=record.channel_id,
                error=failure.getErrorMessage(),
            )

        d = self._clients[record.provider].hangup(record.channel_id, ari_reason)
        d.addErrback(failed)
        return self._track(d)

    def _track(self, d: Deferred[Any]) -> Deferred[Any]:
        """Keep ``d`` until it fires, so ``stop`` can wait for it; log unexpected failures."""
        self._pending.add(d)

        def done(result: Any) -> None:
            self._pending.discard(d)
            if isinstance(result, Failure):
                self.log.failure("outbound: unexpected error", result)

        d.addBoth(done)
        return d

    async def _stop(self) -> None:
        self.accepting = False
        for record in list(self._live.values()):
            if record.status in (Status.ORIGINATING, Status.RINGING):
                self._finish(record, EndReason.SHUTDOWN, "the daemon stopped")
                self._track(self._bridge.contexts.discard(record.context_id))
                if record.originated:
                    self._hangup_quietly(record, "normal")
        while self._pending:
            await gatherResults(list(self._pending))
        await gatherResults([Deferred.fromCoroutine(_close(c)) for c in self._clients.values()])


async def _close(client: Any) -> None:
    close = getattr(client, "close", None)
    if close is not None:
        await close()
