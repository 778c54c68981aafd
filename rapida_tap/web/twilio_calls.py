"""``/2010-04-01/Accounts/{AccountSid}/Calls/{CallSid}.json``: Twilio's Calls resource, for bots.

Bots written for Twilio end and transfer calls through Twilio's REST API rather than through
the media stream: Pipecat's ``TwilioFrameSerializer`` posts ``Status=completed`` here when its
pipeline ends (``auto_hang_up``, with ``base_url`` pointing at this daemon).  The resource
speaks Twilio's dialect: form-encoded ``POST`` and ``GET``, HTTP basic auth with the AccountSid
the daemon sent in ``start.accountSid`` and one of the daemon's API keys as the token, replies
and errors in Twilio's JSON shapes (``20404`` for a call that is unknown or over, which Pipecat
reads as "already ended").  See ``docs/call-control.md`` for the supported subset.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from rapida_tap.call_control import CallControl
from rapida_tap.control_rules import (
    CallNotFound,
    CallNotInProgress,
    ControlUnavailable,
    TransferRefused,
    call_sid,
    context_of_sid,
)
from rapida_tap.reasons import EndReason
from rapida_tap.twiml import (
    MAX_TWIML,
    Hangup,
    Instruction,
    MalformedTwiml,
    TwimlError,
    parse_twiml,
)

if TYPE_CHECKING:  # pragma: no cover
    from twisted.web.server import Request

    from rapida_tap.web.auth import ApiKeys

API_VERSION = "2010-04-01"
PATH = f"{API_VERSION}/Accounts"
#: Largest form body, in bytes: a ``Twiml`` of ``MAX_TWIML`` characters, percent-encoded.
#: The HTTP guard refuses a longer one (413) before reading it (``node.py`` sets the limit).
MAX_FORM = 3 * MAX_TWIML + 1024
FORM_TYPE = b"application/x-www-form-urlencoded"
#: End reasons after which a call counts as failed rather than completed.
FAILED_REASONS = frozenset(
    {
        EndReason.ASSISTANT_FAILED,
        EndReason.INTERNAL_ERROR,
        EndReason.PROTOCOL_ERROR,
        EndReason.TRANSPORT_ERROR,
    }
)
#: Outbound end reasons of calls that never connected -> Twilio's status.
OUTBOUND_STATUS = {
    "no-answer": "no-answer",
    "not-answered": "busy",
    "cancelled": "canceled",
    "originate-failed": "failed",
}


class TwilioError(Exception):
    """An error reply in Twilio's shape: ``{"code", "message", "more_info", "status"}``."""

    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def body(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "message": self.message,
            "more_info": f"https://www.twilio.com/docs/errors/{self.code}",
            "status": self.status,
        }


def not_found(uri: str) -> TwilioError:
    return TwilioError(http.NOT_FOUND, 20404, f"The requested resource {uri} was not found")


def twilio_date(seconds: float | None) -> str | None:
    """RFC 2822 in UTC, as Twilio writes dates: ``Tue, 31 Aug 2010 20:36:28 +0000``."""
    if seconds is None:
        return None
    return time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime(seconds))


def call_status(record: dict[str, str], live: bool) -> str:
    """Twilio's status of a call, from its record (and whether its media is live here)."""
    if live or ("started" in record and "ended" not in record):
        return "in-progress"
    if "started" not in record:
        outbound = json.loads(record.get("outbound", "{}"))
        status = outbound.get("status")
        if status == "originating":
            return "queued"
        if status in ("ringing", "connected"):
            return "ringing"
        return OUTBOUND_STATUS.get(str(outbound.get("reason")), "failed")
    if record.get("reason") == EndReason.TRANSFER and record.get("transfer_status") in (
        None,
        "dialing",
    ):
        return "in-progress"  # the caller is being transferred: the dialplan still runs
    return "failed" if record.get("reason") in FAILED_REASONS else "completed"


def call_json(context_id: str, record: dict[str, str], live: bool = False) -> dict[str, Any]:
    """A call in Twilio's JSON shape, with the daemon's own fields under ``rapida_*``."""
    sid = call_sid(context_id)
    account = record.get("account_sid", "")
    started = float(record["started"]) if "started" in record else None
    ended = float(record["ended"]) if "ended" in record else None
    outbound = record.get("direction") == "outbound" or "outbound" in record
    duration = None if started is None or ended is None else str(int(ended - started))
    previous = record.get("previous")
    fallback = record.get("fallback")
    return {
        "sid": sid,
        "account_sid": account,
        "api_version": API_VERSION,
        "status": call_status(record, live),
        "direction": "outbound-api" if outbound else "inbound",
        "from": record.get("from", ""),
        "to": record.get("to", ""),
        "start_time": twilio_date(started),
        "end_time": twilio_date(ended),
        "duration": duration,
        "date_created": twilio_date(started),
        "date_updated": twilio_date(ended if ended is not None else started),
        "parent_call_sid": call_sid(previous) if previous else None,
        "answered_by": None,
        "price": None,
        "uri": f"/{PATH}/{account}/Calls/{sid}.json",
        "rapida_context_id": context_id,
        "rapida_end_reason": record.get("reason") or None,
        "rapida_transfer_to": record.get("transfer_to") or None,
        "rapida_transfer_status": record.get("transfer_status") or None,
        "rapida_next_call_sid": call_sid(fallback) if fallback and fallback != "-" else None,
    }


class TwilioCallsResource(Resource):
    """Leaf at ``/2010-04-01/Accounts``; ``postpath`` is ``[AccountSid, "Calls", CallSid.json]``."""

    isLeaf = True
    log = Logger()

    def __init__(self, control: CallControl, keys: ApiKeys) -> None:
        super().__init__()
        self._control = control
        self._keys = keys

    def render(self, request: Request) -> bytes | int:
        request.setHeader(b"cache-control", b"no-store")
        try:
            account, context_id = self._route(request)
            if request.method == b"GET":
                d = defer.Deferred.fromCoroutine(self._fetch(request, account, context_id))
            else:
                instruction = self._instruction(request)
                d = defer.Deferred.fromCoroutine(
                    self._update(request, account, context_id, instruction)
                )
        except TwilioError as e:
            return self._error(request, e)
        d.addCallbacks(
            lambda body: self._finish(request, http.OK, body),
            lambda failure: self._failed(request, failure),
        )
        return NOT_DONE_YET

    def _route(self, request: Request) -> tuple[str, str]:
        path = [p.decode("utf-8", "replace") for p in request.postpath or []]
        uri = request.path.decode("utf-8", "replace")
        if request.method not in (b"GET", b"POST"):
            request.setHeader(b"allow", b"GET, POST")
            raise TwilioError(http.NOT_ALLOWED, 20004, "Method not allowed")
        if len(path) != 3 or path[1] != "Calls" or not path[2].endswith(".json"):
            raise not_found(uri)
        account = path[0]
        user = request.getUser().decode("utf-8", "replace")
        if user != account or not self._keys.check(request.getPassword()):
            request.setHeader(b"www-authenticate", b'Basic realm="rapida-asterisk"')
            raise TwilioError(http.UNAUTHORIZED, 20003, "Authenticate")
        context_id = context_of_sid(path[2][: -len(".json")])
        if context_id is None:
            raise not_found(uri)
        return account, context_id

    def _instruction(self, request: Request) -> Instruction | None:
        """What a POST asks for: ``Status`` or ``Twiml`` (``None``: nothing, as Twilio allows)."""
        content_type = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
        content = request.content
        body = b""
        if content is not None:
            content.seek(0)
            body = content.read(MAX_FORM + 1)
        if body and content_type != FORM_TYPE:
            raise TwilioError(
                http.UNSUPPORTED_MEDIA_TYPE,
                20001,
                "Send the parameters form-encoded "
                "(Content-Type: application/x-www-form-urlencoded)",
            )
        try:
            form = dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=32))
        except (UnicodeDecodeError, ValueError):
            raise TwilioError(http.BAD_REQUEST, 20001, "The form body cannot be read") from None
        if "Url" in form:
            raise TwilioError(
                http.BAD_REQUEST,
                21205,
                "Url is not supported here: this server fetches no TwiML. Send Twiml with "
                "<Dial> or <Hangup/>, or Status=completed",
            )
        status, twiml = form.get("Status"), form.get("Twiml")
        if status is not None and twiml is not None:
            raise TwilioError(http.BAD_REQUEST, 20001, "Send either Status or Twiml, not both")
        if status is not None:
            if status not in ("completed", "canceled"):
                raise TwilioError(
                    http.BAD_REQUEST,
                    21220,
                    f"Status {status[:32]!r} is not supported: use completed or canceled",
                )
            return Hangup()
        if twiml is not None:
            try:
                return parse_twiml(twiml)
            except TwimlError as e:
                code = 12100 if isinstance(e, MalformedTwiml) else 12200
                raise TwilioError(http.BAD_REQUEST, code, str(e)) from None
        return None

    async def _record(self, account: str, context_id: str, uri: str) -> dict[str, str]:
        try:
            record = await self._control.load(context_id)
        except CallNotFound:
            raise not_found(uri) from None
        if record.get("account_sid", account) != account:
            raise not_found(uri)  # another account's call, as Twilio answers it
        return record

    async def _fetch(self, request: Request, account: str, context_id: str) -> dict[str, Any]:
        record = await self._record(account, context_id, request.path.decode("utf-8", "replace"))
        return call_json(context_id, record)

    async def _update(
        self, request: Request, account: str, context_id: str, instruction: Instruction | None
    ) -> dict[str, Any]:
        uri = request.path.decode("utf-8", "replace")
        record = await self._record(account, context_id, uri)
        if instruction is None:
            return call_json(context_id, record)
        try:
            record = await self._control.update(context_id, instruction)
        except CallNotFound:
            raise not_found(uri) from None
        except CallNotInProgress as e:
            raise TwilioError(http.BAD_REQUEST, 21220, str(e)) from None
        except TransferRefused as e:
            raise TwilioError(http.BAD_REQUEST, 13223, str(e)) from None
        self.log.info(
            "Calls API: {sid} {what}",
            sid=call_sid(context_id),
            what="hang-up" if isinstance(instruction, Hangup) else f"transfer ({instruction})",
        )
        return call_json(context_id, record)

    def _failed(self, request: Request, failure: Failure) -> None:
        if failure.check(TwilioError):
            error = failure.value
        elif failure.check(ControlUnavailable):
            error = TwilioError(http.SERVICE_UNAVAILABLE, 20503, failure.getErrorMessage())
        else:
            self.log.failure("Calls API: {method} failed", failure, method=request.method)
            error = TwilioError(http.INTERNAL_SERVER_ERROR, 20500, "Internal Server Error")
        assert isinstance(error, TwilioError)
        self._log(request, error)
        self._finish(request, error.status, error.body())

    def _error(self, request: Request, error: TwilioError) -> bytes:
        self._log(request, error)
        return self._json(request, error.status, error.body())

    def _log(self, request: Request, error: TwilioError) -> None:
        self.log.info(
            "Calls API: {method} {path} refused: {status} {code} {message}",
            method=request.method.decode("ascii", "replace"),
            path=request.path.decode("utf-8", "replace")[:120],
            status=error.status,
            code=error.code,
            message=error.message,
        )

    def _finish(self, request: Request, status: int, body: Any) -> None:
        if request.finished or request._disconnected:
            return
        request.write(self._json(request, status, body))
        request.finish()

    def _json(self, request: Request, status: int, body: Any) -> bytes:
        data = json.dumps(body, separators=(",", ":")).encode("utf-8")
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"content-length", b"%d" % len(data))
        return data
