"""``/v1/talk/asterisk/calls``: the outbound calls API, for programs.

``POST /v1/talk/asterisk/calls`` places a call, ``GET`` lists this node's calls,
``GET``/``DELETE /v1/talk/asterisk/calls/{contextId}`` read and end one.  The key travels in
``X-Api-Key`` (never in the URL).  Unlike the dialplan's registration, every reply is JSON,
errors included: ``{"error": "<code>", "message": "<what went wrong and what to do>"}``.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from rapida_tap import ari
from rapida_tap.call_control import CallControl
from rapida_tap.control_rules import CallNotFound, ControlUnavailable
from rapida_tap.outbound import OutboundCalls
from rapida_tap.outbound_call import (
    CallElsewhere,
    OutboundCall,
    OutboundError,
    Unavailable,
    UnknownAssistantId,
    UnknownCall,
)
from rapida_tap.providers import UnknownProvider
from rapida_tap.web.call_request import InvalidCallRequest, parse_call_request

if TYPE_CHECKING:  # pragma: no cover
    from twisted.web.server import Request

    from rapida_tap.web.auth import ApiKeys

PATH = "v1/talk/asterisk/calls"
#: Largest accepted request body, in bytes.
MAX_BODY = 16 * 1024

# (HTTP status, error code) of each failure the service can report.
_ERRORS: list[tuple[type[Exception], int, str]] = [
    (InvalidCallRequest, http.BAD_REQUEST, "bad_request"),
    (UnknownProvider, http.NOT_FOUND, "unknown_provider"),
    (UnknownAssistantId, http.NOT_FOUND, "unknown_assistant"),
    (UnknownCall, http.NOT_FOUND, "unknown_call"),
    (CallElsewhere, http.CONFLICT, "call_elsewhere"),
    (Unavailable, http.SERVICE_UNAVAILABLE, "unavailable"),
    (ari.AriUnauthorized, http.BAD_GATEWAY, "ari_unauthorized"),
    (ari.AriNotFound, http.BAD_GATEWAY, "ari_not_found"),
    (ari.AriBadRequest, http.BAD_GATEWAY, "ari_rejected"),
    (ari.AriUnreachable, http.SERVICE_UNAVAILABLE, "ari_unreachable"),
    (ari.AriTimeout, http.GATEWAY_TIMEOUT, "ari_timeout"),
    (ari.AriError, http.BAD_GATEWAY, "ari_error"),
    (OutboundError, http.BAD_REQUEST, "bad_request"),
]

_HINTS: dict[type[Exception], str] = {
    ari.AriUnauthorized: " (check ari_user and the password of the provider)",
    ari.AriNotFound: " (the endpoint is unknown to Asterisk, or unreachable or busy)",
    ari.AriUnreachable: " (is Asterisk running, with ARI enabled in http.conf and ari.conf?)",
}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def error_for(exc: BaseException) -> ApiError | None:
    """The API error for a service failure, or ``None`` for an unexpected one."""
    for kind, status, code in _ERRORS:
        if isinstance(exc, kind):
            return ApiError(status, code, str(exc) + _HINTS.get(kind, ""))
    return None


class CallsResource(Resource):
    """Leaf resource at ``/v1/talk/asterisk/calls``; ``postpath`` holds the context id."""

    isLeaf = True
    log = Logger()

    def __init__(
        self, outbound: OutboundCalls, keys: ApiKeys, control: CallControl | None = None
    ) -> None:
        super().__init__()
        self._outbound = outbound
        self._keys = keys
        self._control = control

    def render(self, request: Request) -> bytes | int:
        request.setHeader(b"cache-control", b"no-store")
        try:
            return self._route(request)
        except ApiError as e:
            return self._error(request, e)

    def _route(self, request: Request) -> bytes | int:
        if not self._keys.check(request.getHeader(b"x-api-key")):
            missing = not request.getHeader(b"x-api-key")
            raise ApiError(
                http.UNAUTHORIZED,
                "unauthorized",
                "missing API key: send it in the X-Api-Key header" if missing else "wrong API key",
            )
        path = [p for p in request.postpath or [] if p]
        method = request.method
        if not path:
            if method == b"POST":
                return self._place(request)
            if method == b"GET":
                return self._json(request, http.OK, [c.to_json() for c in self._outbound.calls()])
            request.setHeader(b"allow", b"GET, POST")
            raise ApiError(http.NOT_ALLOWED, "method_not_allowed", "use POST or GET here")
        if len(path) > 1:
            raise ApiError(http.NOT_FOUND, "not_found", "no such resource")
        context_id = path[0].decode("utf-8", "replace")
        if method == b"GET":
            try:
                call = self._outbound.get(context_id)
            except OutboundError as e:
                if self._control is None:
                    raise _api_error(e) from None
                return self._elsewhere(request, context_id, None)
            if call.call is None and call.status in ("ringing", "connected") and self._control:
                return self._elsewhere(request, context_id, call)
            return self._json(request, http.OK, call.to_json())
        if method == b"DELETE":
            d = self._outbound.hangup(context_id)
            if self._control is not None:
                d.addErrback(self._hangup_elsewhere, context_id)
            return self._respond(request, d, http.OK)
        request.setHeader(b"allow", b"GET, DELETE")
        raise ApiError(http.NOT_ALLOWED, "method_not_allowed", "use GET or DELETE here")

    def _elsewhere(self, request: Request, context_id: str, local: OutboundCall | None) -> int:
        """Answer from the shared store for a call this node does not follow (any node)."""
        assert self._control is not None
        d = Deferred.fromCoroutine(self._control.outbound_status(context_id))

        def failed(failure: Failure) -> Any:
            if failure.check(CallNotFound, ControlUnavailable) and local is not None:
                return local
            if failure.check(CallNotFound):
                raise UnknownCall(f"no outbound call {context_id}")
            if failure.check(ControlUnavailable):
                raise Unavailable(failure.getErrorMessage())
            return failure

        d.addErrback(failed)
        return self._respond(request, d, http.OK)

    def _hangup_elsewhere(self, failure: Failure, context_id: str) -> Any:
        """DELETE of a call this node did not place, or whose media is on another node."""
        failure.trap(UnknownCall, CallElsewhere)
        assert self._control is not None
        d = Deferred.fromCoroutine(self._control.hangup_for_api(context_id))

        def failed(f: Failure) -> Any:
            if f.check(CallNotFound):
                return failure
            if f.check(ControlUnavailable):
                raise Unavailable(f.getErrorMessage())
            return f

        return d.addErrback(failed)

    def _place(self, request: Request) -> bytes | int:
        content_type = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
        if content_type != b"application/json":
            raise ApiError(
                http.UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the body as JSON with Content-Type: application/json",
            )
        body = _read_body(request)
        try:
            data = json.loads(body)
        except ValueError as e:
            raise ApiError(
                http.BAD_REQUEST, "bad_request", f"the body is not valid JSON: {e}"
            ) from None
        try:
            call_request = parse_call_request(data)
        except InvalidCallRequest as e:
            raise _api_error(e) from None
        d = self._outbound.place(call_request)
        return self._respond(request, d, http.CREATED)

    def _respond(self, request: Request, d: Deferred[Any], status: int) -> int:
        def done(call: OutboundCall | dict[str, Any]) -> None:
            if isinstance(call, dict):  # a call followed by another node, from the store
                self._finish(request, status, call)
                return
            if status == http.CREATED:
                request.setHeader(b"location", f"/{PATH}/{call.context_id}".encode("ascii"))
            self._finish(request, status, call.to_json())

        def failed(failure: Failure) -> None:
            error = error_for(failure.value) if failure.value is not None else None
            if error is None:
                self.log.failure(
                    "outbound calls API: {method} failed", failure, method=request.method
                )
                error = ApiError(http.INTERNAL_SERVER_ERROR, "internal_error", "internal error")
            else:
                self._log_error(request, error)
            self._finish(request, error.status, _error_body(error))

        d.addCallbacks(done, failed)
        return NOT_DONE_YET

    def _finish(self, request: Request, status: int, body: Any) -> None:
        if request.finished or request._disconnected:
            return
        request.write(self._json(request, status, body))
        request.finish()

    def _json(self, request: Request, status: int, body: Any) -> bytes:
        data = json.dumps(body, separators=(",", ":")).encode("utf-8") + b"\n"
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"content-length", b"%d" % len(data))
        return data

    def _error(self, request: Request, error: ApiError) -> bytes:
        self._log_error(request, error)
        return self._json(request, error.status, _error_body(error))

    def _log_error(self, request: Request, error: ApiError) -> None:
        self.log.info(
            "outbound calls API: {method} refused: {status} {code}: {message}",
            method=request.method.decode("ascii", "replace"),
            status=error.status,
            code=error.code,
            message=error.message,
        )


def _api_error(exc: Exception) -> ApiError:
    error = error_for(exc)
    assert error is not None
    return error


def _error_body(error: ApiError) -> dict[str, str]:
    return {"error": error.code, "message": error.message}


def _read_body(request: Request) -> bytes:
    declared = request.getHeader(b"content-length")
    too_big = ApiError(
        http.REQUEST_ENTITY_TOO_LARGE,
        "payload_too_large",
        f"the body is larger than {MAX_BODY} bytes",
    )
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY:
        raise too_big
    content = request.content
    if content is None:
        return b""
    content.seek(0)
    body: bytes = content.read(MAX_BODY + 1)
    if len(body) > MAX_BODY:
        raise too_big
    return body
