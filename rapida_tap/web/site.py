"""The HTTP site: registration, health, and an access log that never shows a key."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http import _escape
from twisted.web.resource import Resource
from twisted.web.server import Request

from rapida_tap.web.guard import BodyLimits, GuardedRequest, GuardedSite, check_twisted_web
from rapida_tap.web.registration import close_after

SECRET_PARAMS = frozenset({"x-api-key", "api_key", "apikey", "key", "token"})


def redact_uri(uri: bytes) -> bytes:
    """The URI with the value of any key-like query parameter replaced by ``REDACTED``.

    Names are decoded as registration's ``parse_query`` decodes them (``%XX`` escapes, lower
    case), so a key sent as ``x%2Dapi-key=...`` is accepted *and* redacted.
    """
    path, sep, query = uri.partition(b"?")
    if not sep:
        return uri
    pairs = []
    for pair in query.split(b"&"):
        name, eq, _ = pair.partition(b"=")
        if eq and unquote(name.decode("latin-1")).lower() in SECRET_PARAMS:
            pair = name + b"=REDACTED"
        pairs.append(pair)
    return path + b"?" + b"&".join(pairs)


def redacted_log_formatter(timestamp: str, request: Request) -> str:
    """Twisted's combined log format, with secrets removed from the request line.

    (``_escape`` is bound at import: each attribute read through ``twisted.web.http``, a
    module wrapped for deprecation warnings, costs microseconds, six times per request.)
    """
    referrer = _escape(request.getHeader(b"referer") or b"-")
    agent = _escape(request.getHeader(b"user-agent") or b"-")
    ip = _escape(getattr(request.getClientAddress(), "host", "-"))
    method = _escape(request.method)
    uri = _escape(redact_uri(request.uri))
    protocol = _escape(request.clientproto)
    length = request.sentLength or "-"
    return (
        f'"{ip}" - - {timestamp} "{method} {uri} {protocol}" '
        f'{request.code} {length} "{referrer}" "{agent}"'
    )


class PathTree(Resource):
    """A plain container: unknown paths are 404 with an empty body (the dialplan reads bodies)."""

    def getChild(self, path: bytes, request: Request) -> Resource:
        return NotFound()

    def render(self, request: Request) -> bytes:
        return NotFound().render(request)


class NotFound(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        close_after(request)  # a dialplan with a mistyped URL must not hold connections open
        request.setResponseCode(http.NOT_FOUND)
        request.setHeader(b"content-type", b"text/plain")
        return b""


def mount(root: Resource, path: str, resource: Resource) -> None:
    """Put ``resource`` at ``/a/b/c``, creating containers on the way."""
    parts = [p.encode("ascii") for p in path.strip("/").split("/")]
    node = root
    for part in parts[:-1]:
        child = node.children.get(part)
        if child is None:
            child = PathTree()
            node.putChild(part, child)
        node = child
    node.putChild(parts[-1], resource)


class QuietRequest(GuardedRequest):
    """A request whose internal errors are a 500 with an empty body, like every other error.

    Twisted's default error page would land in the dialplan's variable.
    """

    log = Logger()

    def processingFailed(self, reason: Failure) -> None:
        self.log.failure("request {uri} failed", reason, uri=redact_uri(self.uri))
        if self.finished or self._disconnected:
            return
        self.setResponseCode(http.INTERNAL_SERVER_ERROR)
        self.setHeader(b"content-type", b"text/plain")
        self.setHeader(b"content-length", b"0")
        self.finish()


def make_site(
    root: Resource,
    *,
    timeout: float = 30.0,
    head_timeout: float = 10.0,
    body_limits: BodyLimits | None = None,
    reactor: Any = None,
) -> GuardedSite:
    """The daemon's HTTP site: the limits of `rapida_tap.web.guard`, quiet errors, a
    redacted access log.  ``timeout`` is twisted.web's inactivity timeout (idle keep-alive).
    """
    site = GuardedSite(
        root,
        head_timeout=head_timeout,
        body_limits=body_limits,
        logFormatter=redacted_log_formatter,
        timeout=timeout,
        reactor=reactor,
    )
    site.requestFactory = QuietRequest
    site.displayTracebacks = False
    check_twisted_web(site)
    return site
