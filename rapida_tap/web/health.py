"""``GET /healthz``: is this node able to take calls?  JSON for people and load balancers."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.web import http
from twisted.web.resource import Resource

if TYPE_CHECKING:  # pragma: no cover
    from twisted.web.server import Request

    from rapida_tap.media.bridge import MediaBridge


class HealthResource(Resource):
    """200 while the node accepts calls and its parts are healthy, 503 otherwise.

    ``checks`` are named callables returning ``(ok, detail)``; e.g. the Redis context store.
    """

    isLeaf = True

    def __init__(self, bridge: MediaBridge) -> None:
        super().__init__()
        self._bridge = bridge
        self.checks: dict[str, Callable[[], tuple[bool, str]]] = {}

    def render_GET(self, request: Request) -> bytes:
        problems: dict[str, str] = {}
        for name, check in self.checks.items():
            ok, detail = check()
            if not ok:
                problems[name] = detail
        ready = self._bridge.accepting and not problems
        body: dict[str, Any] = {
            "status": "ok" if ready else "unavailable",
            "accepting": self._bridge.accepting,
            "calls": len(self._bridge.calls),
            "problems": problems,
        }
        request.setResponseCode(http.OK if ready else http.SERVICE_UNAVAILABLE)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(body).encode() + b"\n"

    def render_HEAD(self, request: Request) -> bytes:
        """``curl -I`` and load balancers: a GET's status and headers, no body.

        Without it twisted.web renders the GET and logs a warning on every probe as it drops
        the body.
        """
        body = self.render_GET(request)
        request.setHeader(b"content-length", b"%d" % len(body))
        return b""
