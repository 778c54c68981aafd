"""The HTTP site: registration, health, and an access log that never shows a key."""

from __future__ import annotations

import re

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

_SECRET_PARAM = re.compile(rb"((?:^|[?&])(?:x-api-key|api_key|apikey|key|token)=)[^&]*", re.I)


def redact_uri(uri: bytes) -> bytes:
    """The URI with the value of any key-like query parameter replaced by ``REDACTED``."""
    return _SECRET_PARAM.sub(rb"\1REDACTED", uri)


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


class QuietRequest(Request):
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


def make_site(root: Resource, *, timeout: float = 30.0) -> Site:
    site = Site(root, logFormatter=redacted_log_formatter, timeout=timeout)
    site.requestFactory = QuietRequest
    site.displayTracebacks = False
    return site
