"""Call control: hang-up and transfer on a bot's request, from any node, with the outcome.

Every call has a record in the context store (``IContextStore.update_call``), written by the
node that holds its media when the call starts and ends, and kept ``record_ttl`` seconds after.
The record is what lets any node answer for any call: the Calls resource, the dialplan's
``…/next`` and ``…/outcome``, the outbound API.  A command for a call whose media is on another
node goes there through the ``Relay`` (the store's pub/sub).

A transfer never needs ARI: the daemon stores the ready ``Dial()`` arguments on the record,
then ends the media leg with reason ``transfer`` once the bot's last words played.  The
dialplan asks ``…/next`` for them, dials, and reports ``DIALSTATUS`` to ``…/outcome``, whose
answer is a fresh context id when the caller should go back to the bot (the transfer did not
connect and the assistant allows it), so the dialplan connects the caller again.
See ``docs/call-control.md``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, Metric
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from rapida_tap.contexts import (
    CALL_RECORD_TTL,
    CallContext,
    ContextStoreUnavailable,
    new_context_id,
)
from rapida_tap.control_rules import (
    FALLBACK_OUTCOMES,
    CallNotFound,
    CallNotInProgress,
    ControlError,
    ControlUnavailable,
    TransferPolicy,
    call_sid,
    decode_instruction,
    encode_instruction,
    error_reply,
    outbound_view,
    raise_reply_error,
    transfer_outcome,
)
from rapida_tap.media.playout import end_after_playout
from rapida_tap.reasons import EndReason
from rapida_tap.relay import NodeGone, NodeTimeout, Relay
from rapida_tap.twiml import Hangup, Instruction

if TYPE_CHECKING:  # pragma: no cover
    from twisted.internet.interfaces import IReactorTime

    from rapida_tap.media.bridge import MediaBridge
    from rapida_tap.media.call import Call
    from rapida_tap.outbound import OutboundCalls
    from rapida_tap.outbound_call import OutboundCall


class CallControl:
    """Follows every call of this node in the store and carries out commands for any call."""

    log = Logger()

    def __init__(
        self,
        bridge: MediaBridge,
        *,
        node_id: str,
        clock: IReactorTime,
        policy_of: Callable[[str], TransferPolicy],
        context_ttl: float = 30.0,
        record_ttl: float = CALL_RECORD_TTL,
        relay_timeout: float = 2.0,
    ) -> None:
        self._bridge = bridge
        self.node_id = node_id
        self._clock = clock
        self.policy_of = policy_of
        self._context_ttl = context_ttl
        self._record_ttl = record_ttl
        self.relay = Relay(bridge.contexts, node_id, clock, relay_timeout)
        self.relay.handlers.update(
            {"update": self._relayed_update, "outbound-hangup": self._relayed_outbound_hangup}
        )
        self.outbound: OutboundCalls | None = None
        self.transfers: dict[str, int] = {}  # outcome -> count, for metrics
        self._writes: set[defer.Deferred[Any]] = set()
        bridge.call_started.append(self._started)
        bridge.call_ended.append(self._ended)
        #: told (context id, record, outcome) of each transfer outcome the dialplan reports
        self.transfer_reported: list[Callable[[str, dict[str, str], str], None]] = []

    def start(self) -> None:
        self.relay.start()

    def follow_outbound(self, outbound: OutboundCalls) -> None:
        """Keep each outbound call's record in the store, so every node can read and end it."""
        self.outbound = outbound
        outbound.changed.append(self._outbound_changed)

    # -- the record ------------------------------------------------------------------------

    def _write(self, context_id: str, fields: dict[str, str]) -> defer.Deferred[None]:
        d = self._bridge.contexts.update_call(context_id, fields, self._record_ttl)
        self._writes.add(d)

        def done(result: Any) -> None:
            self._writes.discard(d)
            if isinstance(result, Failure):
                self.log.warn(
                    "call {ctx}: its record was not written: {error}",
                    ctx=context_id,
                    error=result.getErrorMessage(),
                )

        d.addBoth(done)
        return d

    def _fields(self, call: Call) -> dict[str, str]:
        """What the record says about a call when it starts."""
        ctx = call.context
        outbound = ctx.direction == "outbound"
        fields = {
            "assistant_id": ctx.assistant_id,
            "account_sid": self.policy_of(ctx.assistant_id).account_sid,
            "direction": ctx.direction,
            "caller": ctx.caller,
            "from": "" if outbound else ctx.caller,
            "to": ctx.caller if outbound else "",
            "started": repr(call.started_at),
            "node": self.node_id,
            "transport": str(call.leg.transport_name),
        }
        previous = ctx.variables.get("previous_context_id")
        if previous:
            fields["previous"] = previous
        return fields

    def _started(self, call: Call) -> None:
        self._write(call.context_id, self._fields(call))

    def _ended(self, call: Call) -> None:
        self._write(
            call.context_id,
            {
                "ended": repr(self._clock.seconds()),
                "reason": str(call.end_reason or ""),
                "detail": call.end_detail[:200],
            },
        )

    def _outbound_changed(self, record: OutboundCall) -> None:
        self._write(
            record.context_id,
            {"outbound": json.dumps(record.to_json()), "outbound_node": self.node_id},
        )

    def load(self, context_id: str) -> defer.Deferred[dict[str, str]]:
        """The call's record; fails with ``CallNotFound`` or ``ControlUnavailable``.

        A call with its media on this node is answered for even when the store is down or
        has not got its record yet, so a bot can always hang up a call of this node.
        """
        return defer.Deferred.fromCoroutine(self._load(context_id))

    async def _load(self, context_id: str) -> dict[str, str]:
        call = self._bridge.calls.get(context_id)
        try:
            record = await self._bridge.contexts.load_call(context_id)
        except ContextStoreUnavailable as e:
            if call is None:
                raise ControlUnavailable(f"the context store is unavailable: {e}") from None
            record = {}
        if call is not None:
            record = {**self._fields(call), **record}
        if not record:
            raise CallNotFound(f"no call {context_id}")
        return record

    # -- commands --------------------------------------------------------------------------

    async def update(self, context_id: str, instruction: Instruction) -> dict[str, str]:
        """Carry out ``instruction`` (hang up, transfer) wherever the call's media is.

        Fires with the call's record afterwards.  A call that is over is ``CallNotFound``.
        """
        call = self._bridge.calls.get(context_id)
        if call is not None:
            fields = self._fields(call)
            await self._apply(call, instruction)
            try:
                return await self.load(context_id)
            except ControlUnavailable:
                return fields  # the store is down, and the call may have ended already
        record = await self.load(context_id)
        if "started" not in record and "outbound" in record:
            await self._cancel_ringing(context_id, record, instruction)
            return await self.load(context_id)
        if "ended" in record or "started" not in record or record.get("node") == self.node_id:
            raise CallNotFound(f"call {context_id} is over")
        reply = await self._ask(
            record["node"], "update", ctx=context_id, action=encode_instruction(instruction)
        )
        raise_reply_error(reply)
        return await self.load(context_id)

    async def _apply(self, call: Call, instruction: Instruction) -> None:
        if call.is_ended:
            raise CallNotFound(f"call {call.context_id} is over")
        if isinstance(instruction, Hangup):
            end_after_playout(
                call, self._clock, EndReason.ASSISTANT_HANGUP, "hung up through the Calls API"
            )
            return
        policy = self.policy_of(call.context.assistant_id)
        args = policy.dial_arguments(instruction)
        try:
            await self._bridge.contexts.update_call(
                call.context_id,
                {"transfer": args, "transfer_to": instruction.target},
                self._record_ttl,
            )
        except ContextStoreUnavailable as e:
            raise ControlUnavailable(f"the call's record cannot be written: {e}") from None
        if call.is_ended:
            raise CallNotFound(f"call {call.context_id} ended meanwhile")
        self.log.info(
            "call {ctx}: transfer to {target} requested; ending the media leg once the bot's "
            "audio played",
            ctx=call.context_id,
            target=instruction.target,
        )
        end_after_playout(call, self._clock, EndReason.TRANSFER, f"to {instruction.target}")

    async def _cancel_ringing(
        self, context_id: str, record: dict[str, str], instruction: Instruction
    ) -> None:
        """Status=canceled/completed on an outbound call that has not connected: cancel it."""
        if not isinstance(instruction, Hangup):
            raise CallNotInProgress(
                f"call {context_id} is not in progress: it cannot be transferred"
            )
        placed_by = record.get("outbound_node", "")
        if placed_by == self.node_id and self.outbound is not None:
            await self.outbound.hangup(context_id)
            return
        reply = await self._ask(placed_by, "outbound-hangup", ctx=context_id)
        raise_reply_error(reply)

    async def hangup_for_api(self, context_id: str) -> dict[str, Any]:
        """``DELETE /v1/talk/asterisk/calls/{ctx}`` for a call this node does not follow."""
        record = await self.load(context_id)
        if "outbound" not in record:
            raise CallNotFound(f"no outbound call {context_id}")
        local = self._bridge.calls.get(context_id)
        if local is not None:
            local.end(EndReason.API_HANGUP, "hung up through the API")
            await self.settle()
        elif "started" in record and "ended" not in record:
            reply = await self._ask(
                record.get("node", ""), "update", ctx=context_id, action={"kind": "api-hangup"}
            )
            raise_reply_error(reply)
        elif "started" not in record:
            reply = await self._ask(
                record.get("outbound_node", ""), "outbound-hangup", ctx=context_id
            )
            raise_reply_error(reply)
        return outbound_view(await self.load(context_id))

    async def outbound_status(self, context_id: str) -> dict[str, Any]:
        """The outbound API's view of a call placed by any node."""
        return outbound_view(await self.load(context_id))

    async def _ask(self, node: str, op: str, **args: Any) -> dict[str, Any]:
        if not node:
            raise CallNotFound("the call's node is unknown")
        try:
            return await self.relay.request(node, op, **args)
        except NodeGone:
            raise CallNotFound(f"the node that held the call ({node}) is gone") from None
        except NodeTimeout:
            raise ControlUnavailable(f"the node holding the call ({node}) did not answer") from None
        except ContextStoreUnavailable as e:
            raise ControlUnavailable(str(e)) from None

    async def _relayed_update_async(self, args: dict[str, Any]) -> dict[str, Any]:
        call = self._bridge.calls.get(str(args.get("ctx")))
        action = args.get("action") or {}
        if call is None or call.is_ended:
            return {"error": "not-found", "message": "the call is over"}
        if action.get("kind") == "api-hangup":
            call.end(EndReason.API_HANGUP, "hung up through the API")
            return {"ok": True}
        try:
            await self._apply(call, decode_instruction(action))
        except ControlError as e:
            return error_reply(e)
        return {"ok": True}

    def _relayed_update(self, args: dict[str, Any]) -> defer.Deferred[dict[str, Any]]:
        return defer.Deferred.fromCoroutine(self._relayed_update_async(args))

    def _relayed_outbound_hangup(self, args: dict[str, Any]) -> defer.Deferred[dict[str, Any]]:
        if self.outbound is None:
            return defer.succeed({"error": "not-found", "message": "no outbound calls here"})
        d: defer.Deferred[Any] = self.outbound.hangup(str(args.get("ctx")))
        d.addCallbacks(
            lambda record: {"ok": True},
            lambda f: {"error": "not-found", "message": f.getErrorMessage()},
        )
        return d

    # -- the dialplan's side of a transfer -------------------------------------------------

    async def next_hop(self, context_id: str) -> str:
        """The ``Dial()`` arguments of the call's transfer, once; "" means hang up."""
        record = await self.load(context_id)
        args = record.get("transfer", "")
        if not args:
            return ""
        try:
            first = await self._bridge.contexts.claim_call_field(
                context_id, "transfer_status", "dialing"
            )
        except ContextStoreUnavailable as e:
            raise ControlUnavailable(str(e)) from None
        if not first:
            return ""  # asked again: the dial is under way or over
        self.log.info("call {ctx}: the dialplan dials {args}", ctx=context_id, args=args)
        return args

    async def report_outcome(self, context_id: str, dialstatus: str) -> str:
        """Record the transfer's outcome; a new context id when the caller goes back to the bot.

        The new context carries ``transfer_status``, ``previous_call_sid`` and
        ``previous_context_id`` as custom parameters for the bot.
        """
        record = await self.load(context_id)
        if "transfer" not in record:
            raise CallNotFound(f"call {context_id} has no transfer")
        outcome = transfer_outcome(dialstatus)
        try:
            await self._bridge.contexts.update_call(
                context_id,
                {"transfer_status": outcome, "dialstatus": dialstatus[:32]},
                self._record_ttl,
            )
        except ContextStoreUnavailable as e:
            raise ControlUnavailable(str(e)) from None
        self.transfers[outcome] = self.transfers.get(outcome, 0) + 1
        for hook in self.transfer_reported:
            hook(context_id, {**record, "dialstatus": dialstatus[:32]}, outcome)
        assistant_id = record.get("assistant_id", "")
        back = (
            outcome in FALLBACK_OUTCOMES
            and self.policy_of(assistant_id).fallback
            and self._bridge.accepting
            and self._bridge.assistants.lookup(assistant_id) is not None
        )
        new_id = ""
        if back and await self._bridge.contexts.claim_call_field(context_id, "fallback", "-"):
            new_id = await self._mint_fallback(context_id, record, outcome)
        self.log.info(
            "call {ctx} transfer to {target} ended: {outcome} (DIALSTATUS={dialstatus}){back}",
            ctx=context_id,
            target=record.get("transfer_to", "?"),
            outcome=outcome,
            dialstatus=dialstatus[:32],
            back=f"; the caller goes back to the bot as call {new_id}" if new_id else "",
        )
        return new_id

    async def _mint_fallback(self, context_id: str, record: dict[str, str], outcome: str) -> str:
        context = CallContext(
            context_id=new_context_id(),
            assistant_id=record.get("assistant_id", ""),
            caller=record.get("caller", ""),
            direction=record.get("direction", "inbound"),
            created_at=self._clock.seconds(),
            variables={
                "transfer_status": outcome,
                "previous_call_sid": call_sid(context_id),
                "previous_context_id": context_id,
            },
        )
        try:
            new_id = await self._bridge.contexts.mint(context, self._context_ttl)
        except ContextStoreUnavailable as e:
            raise ControlUnavailable(str(e)) from None
        await self._write(context_id, {"fallback": new_id})
        return new_id

    def settle(self) -> defer.Deferred[Any]:
        """Fires once every record write under way is done (stop, tests)."""
        return defer.gatherResults(list(self._writes), consumeErrors=True)


class TransferCollector:
    """``rapida_transfers_total{outcome}``: transfers whose outcome this node recorded."""

    def __init__(self, control: CallControl) -> None:
        self._control = control

    def collect(self) -> Iterator[Metric]:
        c = CounterMetricFamily(
            "rapida_transfers",
            "Transfers by outcome (completed, busy, no-answer, failed, canceled).",
            labels=["outcome"],
        )
        for outcome, count in sorted(self._control.transfers.items()):
            c.add_metric([outcome], count)
        yield c
