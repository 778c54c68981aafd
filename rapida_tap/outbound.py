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

import collections
import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from rapida_tap.ari import (
    AriClient,
    AriError,
    AriProvider,
    AriTimeout,
    InvalidNumber,
    build_endpoint,
    describe_endpoint,
    validate_number,
)
from rapida_tap.contexts import (
    OUTBOUND,
    CallContext,
    ContextError,
    ContextStoreUnavailable,
    new_context_id,
)
from rapida_tap.media.call import API_HANGUP, SHUTDOWN

if TYPE_CHECKING:  # pragma: no cover
    from rapida_tap.media.bridge import MediaBridge
    from rapida_tap.media.call import Call

AUDIOSOCKET = "audiosocket"
WEBSOCKET = "websocket"
TRANSPORTS = (AUDIOSOCKET, WEBSOCKET)

# Statuses, in the order a call goes through them.
ORIGINATING = "originating"
RINGING = "ringing"
CONNECTED = "connected"
ENDED = "ended"

# End reasons of calls that never connected (connected calls end with the bridge's reasons).
NO_ANSWER = "no-answer"
NOT_ANSWERED = "not-answered"
NOT_CONNECTED = "not-connected"
CANCELLED = "cancelled"
ORIGINATE_FAILED = "originate-failed"

#: The channel variable the outbound dialplans hand to ``AudioSocket()`` / ``Dial(WebSocket/…)``.
CONTEXT_VARIABLE = "RAPIDA_CONTEXT_ID"
#: Seconds the context outlives the ring timer (see the module docstring).
CONNECT_GRACE = 5.0

ASSISTANT_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
VARIABLE_NAME = re.compile(r"_{0,2}[A-Za-z][A-Za-z0-9_]{0,63}")
MAX_VARIABLES = 32
MAX_VARIABLE_VALUE = 1024
REQUEST_FIELDS = ("assistant_id", "to", "from", "transport", "provider", "variables")


class OutboundError(Exception):
    """A request the outbound service cannot carry out; ``str()`` is for the API's caller."""


class InvalidCallRequest(OutboundError):
    """The request itself is wrong (missing field, bad number, unknown transport...)."""


class UnknownProvider(OutboundError):
    pass


class UnknownAssistantId(OutboundError):
    pass


class UnknownCall(OutboundError):
    pass


class CallElsewhere(OutboundError):
    """The call's media connected to another node; only that node can end it."""


class Unavailable(OutboundError):
    """This node cannot place calls now (draining, stopping, context store down)."""


# -- the request ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CallRequest:
    """A validated ``POST /v1/talk/asterisk/calls`` body."""

    assistant_id: str
    to: str
    caller_id: str = ""
    transport: str = AUDIOSOCKET
    provider: str | None = None
    variables: Mapping[str, str] = dataclasses.field(default_factory=dict)


def parse_call_request(data: Any) -> CallRequest:
    """Validate a decoded JSON body; raise ``InvalidCallRequest`` naming the field."""
    if not isinstance(data, dict):
        raise InvalidCallRequest("the body must be a JSON object")
    unknown = sorted(set(data) - set(REQUEST_FIELDS))
    if unknown:
        raise InvalidCallRequest(
            f"unknown field {unknown[0]!r}; the fields are {', '.join(REQUEST_FIELDS)}"
        )
    assistant_id = _string(data, "assistant_id", required=True)
    if not ASSISTANT_ID.fullmatch(assistant_id):
        raise InvalidCallRequest("assistant_id: must be 1-64 of [A-Za-z0-9._-]")
    to = _number(data, "to", required=True)
    caller_id = _number(data, "from", required=False)
    transport = _string(data, "transport") or AUDIOSOCKET
    if transport not in TRANSPORTS:
        raise InvalidCallRequest(
            f"transport: unknown transport {transport!r}; use 'audiosocket' or 'websocket'"
        )
    provider = _string(data, "provider") or None
    return CallRequest(
        assistant_id=assistant_id,
        to=to,
        caller_id=caller_id,
        transport=transport,
        provider=provider,
        variables=_variables(data.get("variables")),
    )


def _string(data: dict[str, Any], key: str, required: bool = False) -> str:
    value = data.get(key)
    if value is None:
        if required:
            raise InvalidCallRequest(f"{key}: is required")
        return ""
    if not isinstance(value, str):
        raise InvalidCallRequest(f"{key}: must be a string")
    value = value.strip()
    if required and not value:
        raise InvalidCallRequest(f"{key}: must not be empty")
    return value


def _number(data: dict[str, Any], key: str, required: bool) -> str:
    value = _string(data, key, required)
    if not value:
        return ""
    try:
        return validate_number(value)
    except InvalidNumber as e:
        raise InvalidCallRequest(f"{key}: {e}") from None


def _variables(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidCallRequest("variables: must be an object of names to string values")
    if len(value) > MAX_VARIABLES:
        raise InvalidCallRequest(f"variables: at most {MAX_VARIABLES} are allowed")
    out: dict[str, str] = {}
    for name, text in value.items():
        if not VARIABLE_NAME.fullmatch(name):
            raise InvalidCallRequest(
                f"variables: {name!r} is not a channel variable name (a letter, then letters, "
                "digits or '_', up to 64; '_' or '__' in front to inherit)"
            )
        if name.lstrip("_").upper() == CONTEXT_VARIABLE:
            raise InvalidCallRequest(f"variables: {name} is set by the daemon")
        if not isinstance(text, str):
            raise InvalidCallRequest(f"variables: the value of {name} must be a string")
        if len(text) > MAX_VARIABLE_VALUE or not text.isprintable():
            raise InvalidCallRequest(
                f"variables: the value of {name} must be up to {MAX_VARIABLE_VALUE} "
                "printable characters"
            )
        out[name] = text
    return out


# -- the calls -------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class OutboundCall:
    """One outbound call as this node follows it.  Times are ``IReactorTime.seconds()``."""

    context_id: str
    channel_id: str
    provider: str
    assistant_id: str
    to: str
    caller_id: str
    transport: str
    created_at: float
    status: str = ORIGINATING
    reason: str | None = None
    detail: str = ""
    connected_at: float | None = None
    ended_at: float | None = None
    originated: bool = False  # ARI created the channel
    answered: bool = False  # ARI reported the channel Up
    claiming: bool = False  # a take-back of the context is under way
    call: Call | None = dataclasses.field(default=None, repr=False)
    ring_timer: IDelayedCall | None = dataclasses.field(default=None, repr=False)
    check_timer: IDelayedCall | None = dataclasses.field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "context_id": self.context_id,
            "channel_id": self.channel_id,
            "provider": self.provider,
            "assistant_id": self.assistant_id,
            "to": self.to,
            "from": self.caller_id,
            "transport": self.transport,
            "status": self.status,
            "reason": self.reason,
            "detail": self.detail,
            "created_at": self.created_at,
            "connected_at": self.connected_at,
            "ended_at": self.ended_at,
        }

    def stop_timers(self) -> None:
        for timer in (self.ring_timer, self.check_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self.ring_timer = self.check_timer = None


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
        self.max_ended = max_ended
        self.ended_retention = ended_retention
        self.accepting = True
        self._live: dict[str, OutboundCall] = {}
        self._ended: collections.OrderedDict[str, tuple[float, OutboundCall]] = (
            collections.OrderedDict()
        )
        self._pending: set[Deferred[Any]] = set()
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
        self._prune()
        record = self._live.get(context_id)
        if record is None and context_id in self._ended:
            record = self._ended[context_id][1]
        if record is None:
            raise UnknownCall(f"no outbound call {context_id} on this node")
        return record

    def calls(self) -> list[OutboundCall]:
        """Live calls, then recently ended ones, oldest first."""
        self._prune()
        return [*self._live.values(), *(record for _, record in self._ended.values())]

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
        provider = self._provider(request.provider)
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
        if record.status == ORIGINATING:
            record.status = RINGING
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
            self._schedule_check(record)
        elif record.status == ENDED and record.call is None:
            # Cancelled or timed out while the originate was under way.
            self._hangup_quietly(record, "normal")
        return record

    def _provider(self, name: str | None) -> AriProvider:
        if name is None:
            if not self.providers:
                raise UnknownProvider(
                    "no ARI provider is configured: add a [providers.NAME] table to the config"
                )
            if len(self.providers) > 1:
                raise InvalidCallRequest(
                    f"provider: is required when several are configured "
                    f"({', '.join(self.providers)})"
                )
            return next(iter(self.providers.values()))
        provider = self.providers.get(name)
        if provider is None:
            known = ", ".join(self.providers) or "none configured"
            raise UnknownProvider(f"unknown provider {name!r} (known: {known})")
        return provider

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
        if record is None or record.status == ENDED:
            return
        record.stop_timers()
        record.status = CONNECTED
        record.call = call
        record.connected_at = self._clock.seconds()
        self.log.info(
            "outbound call {ctx}: connected after {seconds:.1f}s",
            ctx=record.context_id,
            seconds=record.connected_at - record.created_at,
        )

    def _call_ended(self, call: Call) -> None:
        record = self._live.get(call.context_id)
        if record is None or record.call is not call:
            return
        self._finish(record, call.end_reason or SHUTDOWN, call.end_detail, log=False)

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
        if self.check_interval > 0 and record.status == RINGING and self.accepting:
            record.check_timer = self._clock.callLater(self.check_interval, self._check, record)

    def _check(self, record: OutboundCall) -> None:
        record.check_timer = None
        d = self._clients[record.provider].get_channel(record.channel_id)
        d.addCallbacks(self._checked, self._check_failed, (record,), {}, (record,))
        self._track(d)

    def _checked(self, channel: dict[str, Any] | None, record: OutboundCall) -> None:
        if record.status != RINGING:
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
        if record.status == ENDED or record.claiming:
            return False
        record.claiming = True
        try:
            await self._bridge.contexts.claim(record.context_id)
        except ContextError:
            if record.call is None and record.status != CONNECTED:
                record.stop_timers()
                record.status = CONNECTED
                record.detail = "the media connected to another node"
                self._retain(record)
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
        record.status = ENDED
        record.reason = reason
        record.detail = detail
        record.ended_at = self._clock.seconds()
        record.call = None
        self._retain(record)
        if log:
            self.log.info(
                "outbound call {ctx} to {to} via {provider} ended: {reason} ({detail})",
                ctx=record.context_id,
                to=record.to,
                provider=record.provider,
                reason=reason,
                detail=detail,
            )

    def _retain(self, record: OutboundCall) -> None:
        self._live.pop(record.context_id, None)
        self._ended[record.context_id] = (self._clock.seconds(), record)
        self._prune()

    def _prune(self) -> None:
        ended = self._ended
        while len(ended) > self.max_ended:
            ended.popitem(last=False)
        horizon = self._clock.seconds() - self.ended_retention
        while ended and next(iter(ended.values()))[0] < horizon:
            ended.popitem(last=False)

    # -- hanging up ------------------------------------------------------------------------

    async def _hangup(self, context_id: str) -> OutboundCall:
        record = self.get(context_id)
        if record.status == ENDED:
            return record
        if record.call is None and record.status != CONNECTED:
            if await self._take_back(record):
                self._finish(record, CANCELLED, "hung up through the API before it connected")
                if record.originated:
                    await self._clients[record.provider].hangup(record.channel_id, "normal")
                return record
            if record.status == ENDED or record.claiming:
                return record  # the ring timer got there first
        if record.call is None:
            raise CallElsewhere(
                f"outbound call {context_id} is connected on another node; hang it up there"
            )
        record.call.end(API_HANGUP, "hung up through the API")
        return record

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
            if record.status in (ORIGINATING, RINGING):
                self._finish(record, SHUTDOWN, "the daemon stopped")
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
