"""``/v1/talk/asterisk/ctx``: the chan_websocket endpoint inside the daemon's HTTP site.

Serves ``.../ctx?ctx=<id>`` (what Asterisk's ``v(ctx=...)`` produces) and ``.../ctx/<id>``
(for other clients and rewriting proxies) on every listener of the site, ``--http`` (ws://)
and ``--https`` (wss://).  A request that is not a WebSocket upgrade gets ``426 Upgrade
Required`` with a one-line explanation (a ``GET`` from a browser or ``curl``), another method
``405``, a deeper path ``404``; everything else is the protocol's business (see
``rapida_tap.websocket.protocol``), which refuses bad handshakes with their own 4xx/5xx.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from autobahn.twisted.resource import WebSocketResource
from twisted.logger import Logger
from twisted.web import http
from twisted.web.resource import Resource

if TYPE_CHECKING:  # pragma: no cover
    from twisted.web.server import Request

    from rapida_tap.websocket.factory import MediaWebSocketFactory

NOT_WEBSOCKET = (
    b"This is the chan_websocket media endpoint of rapida-asterisk: connect with a WebSocket"
    b" (Sec-WebSocket-Protocol: media), e.g. Dial(WebSocket/rapida/c(ulaw)f(json)v(ctx=...)).\n"
)


class MediaWebSocketResource(Resource):
    """Hands WebSocket upgrades to ``factory``; answers anything else with a clear 4xx."""

    isLeaf = True
    log = Logger()

    def __init__(self, factory: MediaWebSocketFactory) -> None:
        super().__init__()
        self.factory = factory
        self._upgrade = WebSocketResource(factory)

    def render(self, request: Request) -> bytes | int:
        postpath = request.postpath or []
        if len(postpath) > 1 or (postpath and not postpath[0]):
            return _plain(request, http.NOT_FOUND, b"")
        if request.method != b"GET":
            request.setHeader(b"allow", b"GET")
            return _plain(request, http.NOT_ALLOWED, NOT_WEBSOCKET)
        upgrade = (request.getHeader(b"upgrade") or b"").lower()
        if upgrade != b"websocket":
            self.log.info(
                "websocket: plain HTTP request for {path} answered 426",
                path=request.path.decode("latin-1")[:80],
            )
            request.setHeader(b"upgrade", b"websocket")
            request.setHeader(b"connection", b"close")
            if hasattr(request.channel, "persistent"):
                request.channel.persistent = False  # one answer, then close
            return _plain(request, 426, NOT_WEBSOCKET)
        result: bytes | int = self._upgrade.render(request)
        return result


def _plain(request: Request, code: int, body: bytes) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    return body
