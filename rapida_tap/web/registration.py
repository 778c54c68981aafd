"""``GET /v1/talk/asterisk/call/{assistantId}``: the dialplan's ``CURL()`` registers a call.

The reply body lands in a dialplan variable whatever the status, so only a 200 has a body (the
context id); every error is an empty body with a status code, and a log line says why.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING
from urllib.parse import unquote

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http import OK
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from rapida_tap.contexts import INBOUND, CallContext, ContextStoreUnavailable, new_context_id

if TYPE_CHECKING:  # pragma: no cover
    from twisted.web.server import Request

    from rapida_tap.media.bridge import MediaBridge
    from rapida_tap.ratelimit import RateLimiter
    from rapida_tap.web.auth import ApiKeys
    from rapida_tap.web.transfer import TransferSteps

STEPS = (b"next", b"outcome")  # what may follow a context id: rapida_tap.web.transfer
ASSISTANT_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
CALLER = re.compile(r"[A-Za-z0-9+*#\-_. ]{0,64}")
MAX_QUERY = 2048
TOO_MANY_REQUESTS = 429  # twisted.web.http has no name for it
RATE_LOG_INTERVAL = 10.0  # seconds between two "rate limit" log lines


def parse_query(uri: bytes) -> dict[str, str]:
    """Query parameters of ``uri``, first value wins.

    Asterisk's ``CURL()`` does not encode URLs, so ``+`` is taken literally (a caller id
    ``+4930…`` sent raw stays ``+4930…``); ``%XX`` escapes are decoded as usual.
    """
    _, _, query = uri.partition(b"?")
    params: dict[str, str] = {}
    for pair in query.decode("latin-1").split("&"):
        if not pair:
            continue
        name, _, value = pair.partition("=")
        params.setdefault(unquote(name).lower(), unquote(value, errors="replace"))
    return params


def client_address(request: Request) -> str:
    peer = request.getClientAddress()
    return getattr(peer, "host", "?")


def close_after(request: Request) -> None:
    """func_curl keeps a connection open for the whole call unless the server closes it."""
    request.setHeader(b"connection", b"close")
    channel = request.channel
    if channel is not None and hasattr(channel, "persistent"):
        channel.persistent = False


def refuse(request: Request, status: int) -> bytes:
    """An empty-body error reply; ``Content-Length: 0`` also when written after a Deferred
    (twisted.web would otherwise frame the empty body as ``chunked``)."""
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"text/plain")
    request.setHeader(b"content-length", b"0")
    return b""


class RegistrationResource(Resource):
    isLeaf = True
    log = Logger()

    def __init__(
        self,
        bridge: MediaBridge,
        keys: ApiKeys,
        limiter: RateLimiter,
        *,
        context_ttl: float,
        check_assistants: bool = True,
    ) -> None:
        super().__init__()
        self._bridge = bridge
        self._keys = keys
        self._limiter = limiter
        self._ttl = context_ttl
        self.check_assistants = check_assistants
        self.replies: dict[int, int] = {}
        #: ``{ctx}/next`` and ``{ctx}/outcome`` (``rapida_tap.web.transfer``), when set
        self.transfer_steps: TransferSteps | None = None
        self._limited_since_log = 0
        self._limited_logged_at = float("-inf")

    def render(self, request: Request) -> bytes | int:
        close_after(request)
        if request.method != b"GET":
            request.setHeader(b"allow", b"GET")
            return self._refuse(request, http.NOT_ALLOWED, "method not allowed")
        return self.render_GET(request)

    def render_GET(self, request: Request) -> bytes | int:
        client = client_address(request)
        if not self._limiter.allow(client, self._bridge.clock.seconds()):
            return self._rate_limited(request, client)
        path = request.postpath or []
        if not path or not path[0]:
            return self._refuse(request, http.NOT_FOUND, "no assistant id in the path")
        if len(path) == 2 and path[1] in STEPS and self.transfer_steps is not None:
            return self.transfer_steps.render(request, path[0].decode("latin-1"), path[1])
        if len(path) > 1:
            return self._refuse(
                request,
                http.NOT_FOUND,
                "unknown path: nothing follows the assistant id in /v1/talk/asterisk/call/{id}",
            )
        if len(request.uri) > MAX_QUERY:
            return self._refuse(request, http.BAD_REQUEST, "request URI too long")
        params = parse_query(request.uri)
        key = request.getHeader(b"x-api-key") or params.get("x-api-key")
        if not self._keys.check(key):
            return self._refuse(
                request, http.UNAUTHORIZED, "missing API key" if not key else "wrong API key"
            )
        if not self._bridge.accepting:
            return self._refuse(request, http.SERVICE_UNAVAILABLE, "not accepting calls (draining)")
        assistant_id = path[0].decode("latin-1")
        if not ASSISTANT_ID.fullmatch(assistant_id):
            return self._refuse(
                request, http.BAD_REQUEST, "assistant id must be 1-64 of [A-Za-z0-9._-]"
            )
        caller = params.get("from", "").strip()
        if not CALLER.fullmatch(caller):
            return self._refuse(
                request,
                http.BAD_REQUEST,
                "'from' must be up to 64 of letters, digits, +*#-_. and space",
            )
        if self.check_assistants and self._bridge.assistants.lookup(assistant_id) is None:
            return self._refuse(request, http.NOT_FOUND, f"unknown assistant {assistant_id!r}")
        context = CallContext(
            context_id=new_context_id(),
            assistant_id=assistant_id,
            caller=caller,
            direction=INBOUND,
            created_at=self._bridge.clock.seconds(),
        )
        d = self._bridge.contexts.mint(context, self._ttl)
        d.addCallback(self._minted, request)
        d.addErrback(self._mint_failed, request, context)
        return NOT_DONE_YET

    def _minted(self, context_id: str, request: Request) -> None:
        self._count(OK)
        if request.finished or request._disconnected:
            return
        body = context_id.encode("ascii")
        request.setHeader(b"content-type", b"text/plain")
        request.setHeader(b"content-length", b"%d" % len(body))
        request.write(body)
        request.finish()

    def _mint_failed(self, failure: Failure, request: Request, context: CallContext) -> None:
        if failure.check(ContextStoreUnavailable):
            detail = f"context store unavailable: {failure.getErrorMessage()}"
        else:
            self.log.failure("registration: minting a context failed", failure)
            detail = "internal error"
        if request.finished or request._disconnected:
            return
        request.write(self._refuse(request, http.SERVICE_UNAVAILABLE, detail))
        request.finish()

    def _rate_limited(self, request: Request, client: str) -> bytes:
        """429, logged at most once per ``RATE_LOG_INTERVAL`` (a flood must not flood the log)."""
        self._limited_since_log += 1
        now = self._bridge.clock.seconds()
        if now - self._limited_logged_at >= RATE_LOG_INTERVAL:
            self.log.warn(
                "registration refused: 429 rate limit (client {client}; {count} refused since "
                "the last such line)",
                client=client,
                count=self._limited_since_log,
            )
            self._limited_logged_at = now
            self._limited_since_log = 0
        return self._refuse(request, TOO_MANY_REQUESTS, "rate limit", log=False)

    def _refuse(self, request: Request, status: int, detail: str, log: bool = True) -> bytes:
        self._count(status)
        if log:
            self.log.info(
                "registration refused: {status} {detail} (client {client})",
                status=status,
                detail=detail,
                client=client_address(request),
            )
        return refuse(request, status)

    def _count(self, status: int) -> None:
        self.replies[status] = self.replies.get(status, 0) + 1
