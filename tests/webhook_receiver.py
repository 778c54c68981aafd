"""A webhook receiver for tests: twisted.web on 127.0.0.1, verifying with ``standardwebhooks``."""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from typing import Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from twisted.internet import reactor
from twisted.internet.interfaces import IListeningPort
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(32)).decode("ascii")


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes
    payload: dict[str, Any]

    @property
    def type(self) -> str:
        return str(self.payload["type"])

    @property
    def data(self) -> dict[str, Any]:
        return dict(self.payload["data"])


class WebhookReceiver(Resource):
    """Accepts (204) what verifies with ``secret``, rejects (400) anything else.

    ``hold`` makes it accept the request and never answer (a receiver that hangs).
    """

    isLeaf = True

    def __init__(self, secret: str) -> None:
        super().__init__()
        self.verifier = Webhook(secret)
        self.accepted: list[Delivery] = []
        self.rejected: list[tuple[dict[str, str], bytes, str]] = []
        self.hold = False
        self.held: list[Any] = []

    def render_POST(self, request: Any) -> Any:
        body = request.content.read()
        headers = {
            k.decode("latin-1").lower(): v[0].decode("latin-1")
            for k, v in request.requestHeaders.getAllRawHeaders()
        }
        if self.hold:
            self.held.append(request)
            return NOT_DONE_YET
        try:
            payload = self.verifier.verify(body, headers)
        except WebhookVerificationError as e:
            self.rejected.append((headers, body, str(e)))
            request.setResponseCode(400)
            return b"bad signature\n"
        self.accepted.append(Delivery(headers, body, payload))
        request.setResponseCode(204)
        return b""

    def of_type(self, event_type: str) -> list[Delivery]:
        return [d for d in self.accepted if d.type == event_type]


def listen(receiver: WebhookReceiver, port: int = 0) -> IListeningPort:
    return reactor.listenTCP(port, Site(receiver), interface="127.0.0.1")  # type: ignore[no-any-return]
