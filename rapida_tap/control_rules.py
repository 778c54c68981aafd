"""The rules of call control that need no I/O: CallSids, transfer outcomes and policies, the
errors a call-control request can meet, and the messages relayed between nodes."""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Callable
from typing import Any

from rapida_tap.assistants.config import AssistantsSpec, BotSpec
from rapida_tap.twiml import Dial, Hangup, Instruction

DEFAULT_ACCOUNT_SID = "rapida-asterisk"

#: Asterisk's DIALSTATUS -> the transfer's outcome, in Twilio's words (DialCallStatus).
DIALSTATUS = {
    "ANSWER": "completed",
    "BUSY": "busy",
    "NOANSWER": "no-answer",
    "CANCEL": "canceled",
}
#: Outcomes after which the caller may go back to the bot.
FALLBACK_OUTCOMES = frozenset({"busy", "no-answer", "failed"})


class ControlError(Exception):
    """A call-control request that cannot be carried out; ``str()`` is for the client."""


class CallNotFound(ControlError):
    """No such call, or it is over: Twilio's 20404."""


class CallNotInProgress(ControlError):
    """The call exists but cannot take this command now (e.g. TwiML for a ringing call)."""


class TransferRefused(ControlError):
    """The call cannot be transferred to that kind of target (no template configured)."""


class ControlUnavailable(ControlError):
    """The store or the node holding the call did not answer."""


def call_sid(context_id: str) -> str:
    return "CA" + uuid.UUID(context_id).hex


def context_of_sid(sid: str) -> str | None:
    """The context id of a CallSid ``CA`` + 32 hex digits, or None."""
    if len(sid) != 34 or not sid.startswith("CA"):
        return None
    try:
        return str(uuid.UUID(hex=sid[2:]))
    except ValueError:
        return None


def transfer_outcome(dialstatus: str) -> str:
    """``completed``, ``busy``, ``no-answer``, ``canceled``, or ``failed`` for anything else."""
    return DIALSTATUS.get(dialstatus.strip().upper(), "failed")


@dataclasses.dataclass(frozen=True)
class TransferPolicy:
    """What one assistant's calls may do: its AccountSid, its transfer templates, fallback."""

    account_sid: str = DEFAULT_ACCOUNT_SID
    number_template: str = ""
    sip_template: str = ""
    fallback: bool = True

    def dial_arguments(self, dial: Dial) -> str:
        """The ``Dial()`` arguments for ``dial``: ``target,timeout[,f(callerId)]``."""
        if dial.kind == "sip":
            if not self.sip_template:
                raise TransferRefused("no transfer_sip_endpoint is configured: <Sip> is refused")
            target = self.sip_template.format(uri=dial.target)
        else:
            if not self.number_template:
                raise TransferRefused("no transfer_endpoint is configured: <Number> is refused")
            target = self.number_template.format(to=dial.target)
        args = f"{target},{dial.timeout}"
        return args + f",f({dial.caller_id})" if dial.caller_id else args


def policies(
    spec: AssistantsSpec, number_template: str, sip_template: str
) -> Callable[[str], TransferPolicy]:
    """The policy of each assistant id: its own settings, else the top-level templates."""

    def policy_of(assistant_id: str) -> TransferPolicy:
        bot = spec.by_id.get(assistant_id, spec.default)
        if not isinstance(bot, BotSpec):
            return TransferPolicy(DEFAULT_ACCOUNT_SID, number_template, sip_template, True)
        return TransferPolicy(
            bot.account_sid,
            bot.transfer_endpoint or number_template,
            bot.transfer_sip_endpoint or sip_template,
            bot.transfer_fallback,
        )

    return policy_of


# -- views and relay messages ----------------------------------------------------------


def outbound_view(record: dict[str, str]) -> dict[str, Any]:
    """The outbound API's JSON for a stored call: the placing node's record, completed by
    the media node's (the end and its reason) and the transfer's outcome."""
    if "outbound" not in record:
        raise CallNotFound("not an outbound call")
    view: dict[str, Any] = json.loads(record["outbound"])
    if "started" in record and view.get("status") in ("originating", "ringing"):
        view.update(status="connected", connected_at=float(record["started"]))
    if "ended" in record and view.get("status") == "connected":
        view.update(
            status="ended",
            reason=record.get("reason") or None,
            detail=record.get("detail", ""),
            ended_at=float(record["ended"]),
        )
    view["transfer_to"] = record.get("transfer_to") or None
    view["transfer_status"] = record.get("transfer_status") or None
    return view


def encode_instruction(instruction: Instruction) -> dict[str, Any]:
    if isinstance(instruction, Hangup):
        return {"kind": "hangup"}
    return {
        "kind": "dial",
        "target": instruction.target,
        "target_kind": instruction.kind,
        "timeout": instruction.timeout,
        "caller_id": instruction.caller_id,
    }


def decode_instruction(action: dict[str, Any]) -> Instruction:
    if action.get("kind") == "dial":
        return Dial(
            target=str(action["target"]),
            kind=str(action["target_kind"]),
            timeout=int(action["timeout"]),
            caller_id=str(action.get("caller_id", "")),
        )
    return Hangup()


_ERROR_NAMES: dict[type[ControlError], str] = {
    CallNotFound: "not-found",
    CallNotInProgress: "not-in-progress",
    TransferRefused: "refused",
    ControlUnavailable: "unavailable",
}


def error_reply(error: ControlError) -> dict[str, Any]:
    return {"error": _ERROR_NAMES.get(type(error), "unavailable"), "message": str(error)}


def raise_reply_error(reply: dict[str, Any]) -> None:
    error = reply.get("error")
    if not error:
        return
    for kind, name in _ERROR_NAMES.items():
        if name == error:
            raise kind(str(reply.get("message", "")))
    raise ControlUnavailable(str(reply.get("message", "the other node failed")))
