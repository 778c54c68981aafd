"""The HTTP site: registration, health, and an access log that never shows a key."""

from __future__ import annotations

from urllib.parse import unquote

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from rapida_tap.media.listener import peer_text
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
    """Twisted's combined log format, with secrets removed from the request line."""
    referrer = http._escape(request.getHeader(b"referer") or b"-")
    agent = http._escape(request.getHeader(b"user-agent") or b"-")
    ip = http._escape(getattr(request.getClientAddress(), "host", "-"))
    method = http._escape(request.method)
    uri = http._escape(redact_uri(request.uri))
    protocol = http._escape(request.clientproto)
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


def body_too_large(request: Request, limit: int) -> bool:
    """Whether the request's body exceeds ``limit`` bytes (declared or received)."""
    declared = request.getHeader(b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return True
    return int(getattr(request, "body_received", 0)) > limit


class QuietRequest(Request):
    """A request whose internal errors are a 500 with an empty body, like every other error.

    Twisted's default error page would land in the dialplan's variable.  Its body is kept up
    to ``MAX_BODY`` bytes as it arrives and the rest dropped (and counted in
    ``body_received``), so no client can make the daemon buffer more than that.
    """

    log = Logger()
    #: The largest body any resource of the daemon reads, in bytes.
    MAX_BODY = 64 * 1024
    body_received = 0

    def handleContentChunk(self, data: bytes) -> None:
        room = self.MAX_BODY - self.body_received
        self.body_received += len(data)
        if room > 0:
            super().handleContentChunk(data[:room])

    def processingFailed(self, reason: Failure) -> None:
        self.log.failure("request {uri} failed", reason, uri=redact_uri(self.uri))
        if self.finished or self._disconnected:
            return
        self.setResponseCode(http.INTERNAL_SERVER_ERROR)
        self.setHeader(b"content-type", b"text/plain")
        self.setHeader(b"content-length", b"0")
        self.finish()


class LoggingHTTPChannel(http.HTTPChannel):
    """An HTTP channel that says in the log when it refuses a request it cannot even parse
    (garbage, a TLS hello on the plain port): twisted.web answers 400 silently."""

    log = Logger()

    def _respondToBadRequestAndDisconnect(self) -> None:
        self.log.warn(
            "http {peer}: malformed request refused with 400 (not HTTP, or a TLS client on "
            "the plain port?)",
            peer=peer_text(self.transport),
        )
        super()._respondToBadRequestAndDisconnect()


def _channel() -> http._GenericHTTPChannelProtocol:
    return http._GenericHTTPChannelProtocol(LoggingHTTPChannel())


def make_site(root: Resource, *, timeout: float = 30.0) -> Site:
    site = Site(root, logFormatter=redacted_log_formatter, timeout=timeout)
    site.requestFactory = QuietRequest
    site.protocol = _channel  # type: ignore[assignment]
    site.displayTracebacks = False
    return site
