"""``/v1/talk/asterisk/call/{contextId}/next`` and ``…/outcome``: the dialplan's side of a transfer.

After ``AudioSocket()`` (or ``Dial(WebSocket/…,,g)``) returns, the dialplan asks ``…/next``:
the body is the ``Dial()`` arguments of the transfer the bot asked for, or empty for "hang up".
After dialling it reports ``…/outcome?dialstatus=${DIALSTATUS}``: the body is a new context id
when the caller goes back to the bot, else empty.  As for registration, the body lands in a
dialplan variable whatever the status, so every error is an empty body (status code and a log
line carry the reason), and every reply closes the connection.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.server import NOT_DONE_YET

from rapida_tap.contexts import is_context_id
from rapida_tap.control_rules import CallNotFound, ControlUnavailable
from rapida_tap.web.registration import client_address, parse_query, refuse

if TYPE_CHECKING:  # pragma: no cover
    from twisted.web.server import Request

    from rapida_tap.call_control import CallControl
    from rapida_tap.web.auth import ApiKeys

DIALSTATUS = re.compile(r"[A-Z]{0,32}")


class TransferSteps:
    """Renders ``next`` and ``outcome`` for ``RegistrationResource`` (same path, same rules)."""

    log = Logger()

    def __init__(self, control: CallControl, keys: ApiKeys) -> None:
        self._control = control
        self._keys = keys

    def render(self, request: Request, context_id: str, step: bytes) -> bytes | int:
        params = parse_query(request.uri)
        key = request.getHeader(b"x-api-key") or params.get("x-api-key")
        if not self._keys.check(key):
            return self._refuse(request, http.UNAUTHORIZED, "missing or wrong API key", step)
        if not is_context_id(context_id):
            return self._refuse(request, http.NOT_FOUND, "not a context id", step)
        if step == b"next":
            d = defer.Deferred.fromCoroutine(self._control.next_hop(context_id))
        else:
            dialstatus = params.get("dialstatus", "").strip().upper()
            if not DIALSTATUS.fullmatch(dialstatus):
                return self._refuse(request, http.BAD_REQUEST, "bad dialstatus", step)
            d = defer.Deferred.fromCoroutine(self._control.report_outcome(context_id, dialstatus))
        d.addCallback(self._answer, request)
        d.addErrback(self._failed, request, context_id, step)
        return NOT_DONE_YET

    def _answer(self, body: str, request: Request) -> None:
        if request.finished or request._disconnected:
            return
        data = body.encode("ascii")
        request.setHeader(b"content-type", b"text/plain")
        request.setHeader(b"content-length", b"%d" % len(data))
        request.write(data)
        request.finish()

    def _failed(self, failure: Failure, request: Request, context_id: str, step: bytes) -> None:
        if failure.check(CallNotFound):
            status, detail = http.NOT_FOUND, failure.getErrorMessage()
        elif failure.check(ControlUnavailable):
            status, detail = http.SERVICE_UNAVAILABLE, failure.getErrorMessage()
        else:
            self.log.failure("transfer {step} for {ctx} failed", failure, step=step, ctx=context_id)
            status, detail = http.INTERNAL_SERVER_ERROR, "internal error"
        if request.finished or request._disconnected:
            return
        request.write(self._refuse(request, status, detail, step))
        request.finish()

    def _refuse(self, request: Request, status: int, detail: str, step: bytes) -> bytes:
        self.log.info(
            "transfer {step} refused: {status} {detail} (client {client})",
            step=step.decode("ascii"),
            status=status,
            detail=detail,
            client=client_address(request),
        )
        return refuse(request, status)
