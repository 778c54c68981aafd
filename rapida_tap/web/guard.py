"""HTTP limits enforced as the bytes arrive, before twisted.web buffers a request.

twisted.web reads a request's whole body (into a temporary file above 100 kB) before any
resource runs, and its only timeout is an inactivity timeout, which one byte every few seconds
resets.  So the limits live in the channel and the request, not in resources:

* a **deadline for each request**: head and body must be in within ``head_timeout`` seconds
  of the connection (or of the previous response on a keep-alive connection), or the
  connection is aborted (``request-timeout``).  A kept-alive connection on which nothing of a
  next request arrived in that time is just idle: it is closed without counting or logging;
* a **body limit per path** (`BodyLimits`): a declared ``Content-Length`` over it is refused
  with 413 and the connection closed before one body byte is read; a chunked body is counted
  as it arrives and cut the same way at the limit (``body-too-large``).  Paths not listed
  take no body at all;
* bodies are kept in memory (they are at most `MAX_BODY_LIMIT`), never in a temporary file;
* a request line or headers twisted.web cannot parse get its 400 (``bad-request``).

Each refusal is counted in ``GuardedSite.refused`` (``rapida_http_refused_total``) and logged
at most one line per reason every few seconds.

This relies on twisted.web internals (``HTTPChannel._path``, ``allHeadersReceived``,
``allContentReceived``, ``Request.gotLength`` / ``handleContentChunk``, the 400 path);
`check_twisted_web` proves at start-up, on an in-memory connection, that the installed
version still calls them as expected, and stops the daemon with one clear line if not.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http import _GenericHTTPChannelProtocol
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface import implementer

from rapida_tap.admission import mark_identified
from rapida_tap.media.listener import peer_text
from rapida_tap.ratelimit import LogThrottle

#: refusal reasons (log lines and the ``reason`` label of ``rapida_http_refused_total``)
REQUEST_TIMEOUT = "request-timeout"
BODY_TOO_LARGE = "body-too-large"
BAD_REQUEST = "bad-request"

#: the largest body limit accepted: bodies are held in memory
MAX_BODY_LIMIT = 1024 * 1024

_TOO_LARGE = (
    b"HTTP/1.1 413 Request Entity Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
)


class BodyLimits:
    """The largest body, in bytes, a request to each path may carry; 0 for other paths.

    ``limits`` maps a path (``/v1/talk/asterisk/calls``) to its limit; the path's children
    (``/v1/talk/asterisk/calls/<id>/hangup``) share it.  The query string does not count.
    """

    def __init__(self, limits: Mapping[str, int] | None = None) -> None:
        self._limits: list[tuple[bytes, int]] = []
        for path, limit in (limits or {}).items():
            if not 0 <= limit <= MAX_BODY_LIMIT:
                raise ValueError(f"body limit for {path}: {limit} not in 0..{MAX_BODY_LIMIT}")
            self._limits.append((path.rstrip("/").encode("ascii"), limit))

    def for_path(self, target: bytes) -> int:
        path = target.split(b"?", 1)[0].rstrip(b"/")
        for prefix, limit in self._limits:
            if path == prefix or path.startswith(prefix + b"/"):
                return limit
        return 0


class GuardedRequest(Request):
    """Keeps the body in memory and counts it against the channel's limit as it arrives."""

    channel: GuardedHTTPChannel

    def gotLength(self, length: int | None) -> None:
        self.content = io.BytesIO()  # at most MAX_BODY_LIMIT: never a temporary file

    def handleContentChunk(self, data: bytes) -> None:
        channel = self.channel
        if channel is None or not channel.body_received(len(data)):
            return
        self.content.write(data)  # type: ignore[union-attr]


class GuardedHTTPChannel(http.HTTPChannel):
    """An ``HTTPChannel`` with a deadline for each request and a body limit per path."""

    site: GuardedSite
    _deadline: IDelayedCall | None = None
    _body_limit = 0
    _body_seen = 0
    _refused = False
    _served = False  # a response went out on this connection
    _begun = False  # bytes of the current request (or of the first) arrived

    def connectionMade(self) -> None:
        super().connectionMade()
        self._start_deadline()

    def dataReceived(self, data: bytes) -> None:
        self._begun = True
        super().dataReceived(data)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._cancel_deadline()
        super().connectionLost(reason)

    # -- the deadline ---------------------------------------------------------------------

    def _start_deadline(self) -> None:
        self._cancel_deadline()
        self._deadline = self.callLater(self.site.head_timeout, self._timed_out)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _timed_out(self) -> None:
        self._deadline = None
        if self._served and not self._begun:  # an idle kept-alive connection
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        self.site.refuse(
            REQUEST_TIMEOUT,
            self.transport,
            f"request not complete within {self.site.head_timeout:g} s",
        )
        self._refused = True
        self.transport.abortConnection()  # type: ignore[union-attr]

    def requestDone(self, request: Request) -> None:
        super().requestDone(request)
        if self.persistent and self.transport is not None and not self._refused:
            self._served, self._begun = True, False
            self._start_deadline()  # the next request on this connection

    # -- the body -------------------------------------------------------------------------

    def allHeadersReceived(self) -> None:
        mark_identified(self.transport)
        limit = self.site.body_limits.for_path(self._path)
        declared = self.length  # None: chunked
        if (declared is None and limit == 0) or (declared is not None and declared > limit):
            what = "a chunked body" if declared is None else f"{declared} bytes"
            self._refuse_body(f"{what} for {_path_text(self._path)}, limit {limit} bytes")
            return
        self._body_limit = limit
        self._body_seen = 0
        super().allHeadersReceived()

    def body_received(self, size: int) -> bool:
        """Count ``size`` body bytes; False (and the connection refused) over the limit."""
        if self._refused:
            return False
        self._body_seen += size
        if self._body_seen > self._body_limit:
            self._refuse_body(
                f"chunked body over {self._body_limit} bytes for {_path_text(self._path)}"
            )
            return False
        return True

    def allContentReceived(self) -> None:
        if self._refused:  # the end of a chunked body that was cut: never served
            return
        self._cancel_deadline()
        super().allContentReceived()

    def _refuse_body(self, detail: str) -> None:
        self._refused = True
        self._cancel_deadline()
        self.site.refuse(BODY_TOO_LARGE, self.transport, detail)
        # Nothing more is parsed or kept from this connection: the rest of the body is
        # dropped as it arrives until the close completes.
        self.dataReceived = self.rawDataReceived = _discard  # type: ignore[method-assign]
        self.persistent = False
        self.transport.write(_TOO_LARGE)  # type: ignore[union-attr]
        self.loseConnection()

    def _respondToBadRequestAndDisconnect(self) -> None:
        self._refused = True
        self._cancel_deadline()
        self.site.refuse(
            BAD_REQUEST,
            self.transport,
            "malformed request refused with 400: not HTTP, or a TLS client on the plain port?",
        )
        super()._respondToBadRequestAndDisconnect()


def _discard(data: bytes) -> None:
    return None


def _path_text(path: bytes) -> str:
    return path.split(b"?", 1)[0][:80].decode("latin-1")


def guarded_channel() -> _GenericHTTPChannelProtocol:
    """What twisted.web's ``Site.protocol`` builds, with `GuardedHTTPChannel` inside."""
    return _GenericHTTPChannelProtocol(GuardedHTTPChannel())


class GuardedSite(Site):
    """A ``Site`` whose channels enforce the limits above; ``refused`` counts per reason."""

    requestFactory = GuardedRequest
    protocol = staticmethod(guarded_channel)  # type: ignore[assignment]

    def __init__(
        self,
        resource: Resource,
        *,
        head_timeout: float = 10.0,
        body_limits: BodyLimits | None = None,
        log_interval: float = 5.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(resource, **kwargs)
        self.head_timeout = head_timeout
        self.body_limits = body_limits or BodyLimits()
        self.refused: dict[str, int] = {}
        self._throttle = LogThrottle(log_interval)
        self.refusal_log = Logger()  # not ``log``: that is Site's access log method

    def refuse(self, why: str, transport: Any, detail: str) -> None:
        self.refused[why] = self.refused.get(why, 0) + 1
        held = self._throttle.allow(why, self.reactor.seconds())
        if held is None:
            return
        self.refusal_log.warn(
            "http {peer}: request refused: {why} ({detail}){more}",
            peer=peer_text(transport),
            why=why,
            detail=detail,
            more=f"; {held} more refusal(s) for this reason not logged" if held else "",
        )


class TwistedWebChanged(RuntimeError):
    """The installed twisted.web no longer calls the hooks the HTTP limits rely on."""


def check_twisted_web(site: GuardedSite) -> None:
    """Prove on an in-memory connection that ``site``'s channels refuse oversized bodies.

    A declared body over the limit must get 413 before the resource runs, and a chunked one
    must be cut at the limit with nothing kept beyond it.  Raises `TwistedWebChanged`.
    """
    if not hasattr(http, "_GenericHTTPChannelProtocol"):
        raise TwistedWebChanged(f"twisted.web has no _GenericHTTPChannelProtocol: {_UNSUPPORTED}")
    for name in ("_respondToBadRequestAndDisconnect", "allHeadersReceived", "requestDone"):
        if not hasattr(http.HTTPChannel, name):
            raise TwistedWebChanged(f"twisted.web's HTTPChannel has no {name}: {_UNSUPPORTED}")
    # The probes also need HTTPChannel._path (set per request) and the Request hooks.
    for request in (
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n0123456789",
        b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    ):
        try:
            sent, refused = _probe(site, request)
        except Exception as e:  # an attribute or signature that changed: say so, in one line
            raise TwistedWebChanged(f"a probe request failed ({e!r}): {_UNSUPPORTED}") from e
        if not sent.startswith(b"HTTP/1.1 413 ") or refused != {BODY_TOO_LARGE: 1}:
            raise TwistedWebChanged(f"a probe request got {sent[:40]!r}: {_UNSUPPORTED}")


_UNSUPPORTED = (
    "this twisted.web no longer works as rapida_tap.web.guard expects, so request bodies "
    "could not be limited; install a supported Twisted version"
)


def _probe(site: GuardedSite, request: bytes) -> tuple[bytes, dict[str, int]]:
    """What a channel of ``site`` sends for ``request`` (a body limit of 2 bytes)."""
    # Its own Clock: a probe that fails half-way leaves no timer on the daemon's reactor.
    probe = GuardedSite(_NeverRendered(), body_limits=BodyLimits({"/x": 2}), reactor=Clock())
    probe.requestFactory = site.requestFactory
    probe.refusal_log = Logger(observer=_silent)
    channel = probe.buildProtocol(None)
    transport = _ProbeTransport()
    channel.makeConnection(transport)
    channel.dataReceived(request)
    channel.connectionLost(Failure(ConnectionError("probe done")))
    return b"".join(transport.sent), probe.refused


class _ProbeTransport:
    """What an HTTP channel needs of a transport, in memory.  (Twisted's ``StringTransport``
    lives in ``twisted.internet.testing``, which imports trial, unittest and doctest: 2 MB of
    a node's memory for one probe at start-up.)"""

    disconnecting = False
    producer: Any = None

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.sent.append(data)

    def writeSequence(self, data: list[bytes]) -> None:
        self.sent.extend(data)

    def loseConnection(self) -> None:
        self.disconnecting = True

    abortConnection = loseConnection

    def getPeer(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 0)

    getHost = getPeer

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def pauseProducing(self) -> None:
        pass

    resumeProducing = stopProducing = pauseProducing


@implementer(ILogObserver)
def _silent(event: Any) -> None:
    return None


class _NeverRendered(Resource):
    """The probe's resource: reaching it at all (a 200) means the body was not refused."""

    isLeaf = True

    def render(self, request: Request) -> bytes:
        return b"the body limit was not enforced"
