"""``POST /admin/drain``: drain this node over HTTP, where sending SIGTERM is not an option.

Same drain as SIGTERM (``rapida_tap.drain``): not ready at once, no new calls, live calls
finish (within ``drain_timeout`` if one is set), then the daemon exits 0 (``on_drained``).
``GET`` reports progress.  Both need an API key in ``X-Api-Key``; errors are empty-body statuses.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger
from twisted.web import http
from twisted.web.resource import Resource

from rapida_tap.web.registration import client_address, refuse

if TYPE_CHECKING:  # pragma: no cover
    from twisted.web.server import Request

    from rapida_tap.drain import Drain
    from rapida_tap.web.auth import ApiKeys


class DrainResource(Resource):
    """202 and the drain's state on ``POST`` (repeatable), 200 and the state on ``GET``.

    ``on_drained`` runs once the drain is done (the daemon passes ``reactor.stop``); ``None``
    leaves the node up and not ready.
    """

    isLeaf = True
    log = Logger()

    def __init__(
        self, drain: Drain, keys: ApiKeys, on_drained: Callable[[], None] | None = None
    ) -> None:
        super().__init__()
        self._drain = drain
        self._keys = keys
        self._on_drained = on_drained
        self._requested = False

    def render(self, request: Request) -> bytes:
        if request.method not in (b"GET", b"POST"):
            request.setHeader(b"allow", b"GET, POST")
            return refuse(request, http.NOT_ALLOWED)
        if request.postpath not in ([], [b""]):
            return refuse(request, http.NOT_FOUND)
        if not self._keys.check(request.getHeader(b"x-api-key")):
            self.log.warn(
                "admin drain refused: 401 (client {client})", client=client_address(request)
            )
            return refuse(request, http.UNAUTHORIZED)
        if request.method == b"POST":
            self.log.info("drain requested by {client}", client=client_address(request))
            d = self._drain.start("POST /admin/drain")
            on_drained = self._on_drained
            if not self._requested and on_drained is not None:
                self._requested = True
                d.addCallback(lambda _: on_drained())
            request.setResponseCode(http.ACCEPTED)
        return self._state(request)

    def _state(self, request: Request) -> bytes:
        drain = self._drain
        body: dict[str, Any] = {
            "state": drain.state.value,
            "calls": drain.live_calls,
            "timeout": drain.timeout,
            "remaining": None if (left := drain.remaining) is None else round(left, 1),
        }
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(body).encode() + b"\n"
