"""A small fake of Asterisk's ARI channel resource, for integration tests and benches.

It answers ``/ari/channels`` and ``/ari/channels/{id}`` (POST originate, GET, DELETE) over real
HTTP the way Asterisk does where it matters to the daemon: basic auth or 401, originate
parameters read from the JSON body only when ``Content-Type`` is ``application/json`` (else
``400 Endpoint must be specified`` when the endpoint was only in the body), ``variables`` taken
from the JSON body only, ``{"message": ...}`` error bodies, 404 for gone channels.

What each dialled endpoint does is set per endpoint (``FakeAri.behave``):

- ``answer``: 200, the channel rings, then after ``answer_delay`` seconds turns ``Up`` and
  ``on_answer(request)`` is called with the originate ``RecordedRequest`` (its ``variables``
  carry ``RAPIDA_CONTEXT_ID``, so a test can connect an AudioSocket with it);
- ``no_answer``: 200, the channel stays ``Ringing``;
- ``busy`` (and any endpoint never configured): ``404 {"message": ...}``;
- ``error``: ``500 {"error": "Allocation failed"}``, Asterisk's body when dialling fails;
- ``hang``: the request is accepted and never answered (client timeouts).

Simplification: a new channel is ``Ringing`` at once (real Asterisk answers ``Down`` first).
"""

from __future__ import annotations

import base64
import dataclasses
import itertools
import json
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IReactorTCP, IReactorTime
from twisted.protocols.policies import WrappingFactory
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

ANSWER = "answer"
NO_ANSWER = "no_answer"
BUSY = "busy"
ERROR = "error"
HANG = "hang"
BEHAVIOURS = frozenset({ANSWER, NO_ANSWER, BUSY, ERROR, HANG})

#: ARI's hangup ``reason`` values (rest-api/api-docs/channels.json).
HANGUP_REASONS = frozenset(
    {
        "normal",
        "busy",
        "congestion",
        "no_answer",
        "timeout",
        "rejected",
        "unallocated",
        "normal_unspecified",
        "number_incomplete",
        "codec_mismatch",
        "interworking",
        "failure",
        "answered_elsewhere",
    }
)

_ORIGINATE_PARAMS = (
    "endpoint",
    "extension",
    "context",
    "priority",
    "callerId",
    "timeout",
    "formats",
    "label",
    "app",
    "appArgs",
)


@dataclasses.dataclass
class RecordedRequest:
    """One request as the fake saw it: header names lower-case, ``body`` the parsed JSON
    (``None`` without a JSON content type or body), ``query`` the last value of each arg."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any

    @property
    def variables(self) -> dict[str, str]:
        """The channel variables Asterisk would set from this originate: JSON body only."""
        if isinstance(self.body, dict) and isinstance(self.body.get("variables"), dict):
            return dict(self.body["variables"])
        return {}


@dataclasses.dataclass
class FakeChannel:
    id: str
    name: str
    endpoint: str
    state: str
    context: str
    extension: str
    priority: int
    caller_id: str
    variables: dict[str, str]
    formats: str
    created_at: float
    gone: bool = False
    hangup_reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The ARI ``Channel`` model's required fields."""
        created = time.strftime("%Y-%m-%dT%H:%M:%S.000+0000", time.gmtime(self.created_at))
        return {
            "id": self.id,
            "name": self.name,
            "state": self.state,
            "protocol_id": "",
            "caller": {"name": "", "number": self.caller_id},
            "connected": {"name": "", "number": ""},
            "accountcode": "",
            "dialplan": {
                "context": self.context,
                "exten": self.extension,
                "priority": self.priority,
                "app_name": "",
                "app_data": "",
            },
            "creationtime": created,
            "language": "en",
        }


class FakeAri(Resource):
    """The fake ARI resource; mount it at the root of a ``Site`` (see ``serve_fake_ari``)."""

    isLeaf = True

    def __init__(
        self,
        clock: IReactorTime,
        user: str = "rapida",
        password: str = "secret",
        answer_delay: float = 0.0,
    ) -> None:
        super().__init__()
        self._clock = clock
        self._credentials = f"{user}:{password}".encode()
        self.answer_delay = answer_delay
        self.requests: list[RecordedRequest] = []
        self.channels: dict[str, FakeChannel] = {}
        self._behaviours: dict[str, tuple[str, Callable[[RecordedRequest], object] | None]] = {}
        self._timers: list[IDelayedCall] = []
        self._sequence = itertools.count(1)

    def behave(
        self,
        endpoint: str,
        behaviour: str,
        on_answer: Callable[[RecordedRequest], object] | None = None,
    ) -> None:
        """Make originates to ``endpoint`` (the exact dial string) ``answer``, ``no_answer``..."""
        if behaviour not in BEHAVIOURS:
            raise ValueError(f"unknown behaviour {behaviour!r}; one of {sorted(BEHAVIOURS)}")
        self._behaviours[endpoint] = (behaviour, on_answer)

    def remote_hangup(self, channel_id: str, reason: str = "normal") -> None:
        """The far end hangs up: the channel is gone from now on."""
        channel = self.channels[channel_id]
        channel.gone, channel.hangup_reason = True, reason

    def live_channels(self) -> list[FakeChannel]:
        return [c for c in self.channels.values() if not c.gone]

    def cancel_timers(self) -> None:
        """Drop pending answers (tests call this, via ``FakeAriServer.stop``, at teardown)."""
        for timer in self._timers:
            if timer.active():
                timer.cancel()
        self._timers.clear()

    def render(self, request: Request) -> bytes | int:
        recorded, body_error = self._record(request)
        self.requests.append(recorded)
        if not self._authorised(request):
            request.setHeader(b"WWW-Authenticate", b'Basic realm="Asterisk REST Interface"')
            return _reply(request, 401, {"message": "Authentication required"})
        if body_error:
            return _reply(request, 400, {"message": "Error parsing request body"})
        segments = recorded.path.strip("/").split("/")
        if segments[:2] != ["ari", "channels"] or len(segments) > 3:
            return _reply(request, 404, {"message": "Resource not found"})
        channel_id = segments[2] if len(segments) == 3 else None
        if recorded.method == "POST":
            return self._originate(request, recorded, channel_id)
        if recorded.method == "GET" and channel_id is not None:
            return self._get(request, channel_id)
        if recorded.method == "GET":
            return _reply(request, 200, [c.to_json() for c in self.live_channels()])
        if recorded.method == "DELETE" and channel_id is not None:
            return self._hangup(request, recorded, channel_id)
        return _reply(request, 405, {"message": "Invalid method"})

    def _record(self, request: Request) -> tuple[RecordedRequest, bool]:
        headers = {
            name.decode("latin-1").lower(): values[-1].decode("latin-1")
            for name, values in request.requestHeaders.getAllRawHeaders()
        }
        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        raw = request.content.read() if request.content is not None else b""
        body, body_error = None, False
        if content_type == "application/json" and raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body_error = True
        query = {
            k.decode("latin-1"): v[-1].decode("latin-1") for k, v in (request.args or {}).items()
        }
        path = request.path.decode("latin-1")
        method = request.method.decode("ascii")
        return RecordedRequest(method, path, query, headers, body), body_error

    def _authorised(self, request: Request) -> bool:
        header = request.getHeader(b"authorization") or b""
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"basic":
            return False
        try:
            return base64.b64decode(token, validate=True) == self._credentials
        except ValueError:
            return False

    def _originate(
        self, request: Request, recorded: RecordedRequest, channel_id: str | None
    ) -> bytes | int:
        params: dict[str, Any] = dict(recorded.query)
        if isinstance(recorded.body, dict):
            params.update({k: recorded.body[k] for k in _ORIGINATE_PARAMS if k in recorded.body})
        endpoint = str(params.get("endpoint") or "")
        if not endpoint:
            return _reply(request, 400, {"message": "Endpoint must be specified"})
        tech, _, resource = endpoint.partition("/")
        if not tech or not resource:
            return _reply(request, 400, {"message": "Invalid endpoint specified"})
        if channel_id is None:
            channel_id = f"{self._clock.seconds():.0f}.{next(self._sequence)}"
        existing = self.channels.get(channel_id)
        if existing is not None and not existing.gone:
            return _reply(request, 409, {"message": "Channel with given unique ID already exists"})
        behaviour, on_answer = self._behaviours.get(endpoint, (BUSY, None))
        if behaviour == BUSY:
            return _reply(request, 404, {"message": f"Endpoint {endpoint} not found or busy"})
        if behaviour == ERROR:
            return _reply(request, 500, {"error": "Allocation failed"})
        if behaviour == HANG:
            request.notifyFinish().addErrback(lambda _: None)
            return NOT_DONE_YET
        channel = FakeChannel(
            id=channel_id,
            name=f"{tech}/{resource.split('/')[0]}-{next(self._sequence):08x}",
            endpoint=endpoint,
            state="Ringing",
            context=str(params.get("context") or "default"),
            extension=str(params.get("extension") or "s"),
            priority=int(params.get("priority") or 1),
            caller_id=str(params.get("callerId") or ""),
            variables=recorded.variables,
            formats=str(params.get("formats") or ""),
            created_at=self._clock.seconds(),
        )
        self.channels[channel_id] = channel
        if behaviour == ANSWER:
            timer = self._clock.callLater(
                self.answer_delay, self._answer, channel, recorded, on_answer
            )
            self._timers.append(timer)
        return _reply(request, 200, channel.to_json())

    def _answer(
        self,
        channel: FakeChannel,
        recorded: RecordedRequest,
        on_answer: Callable[[RecordedRequest], object] | None,
    ) -> None:
        if channel.gone:
            return
        channel.state = "Up"
        if on_answer is not None:
            on_answer(recorded)

    def _get(self, request: Request, channel_id: str) -> bytes:
        channel = self.channels.get(channel_id)
        if channel is None or channel.gone:
            return _reply(request, 404, {"message": "Channel not found"})
        return _reply(request, 200, channel.to_json())

    def _hangup(self, request: Request, recorded: RecordedRequest, channel_id: str) -> bytes:
        channel = self.channels.get(channel_id)
        if channel is None or channel.gone:
            return _reply(request, 404, {"message": "Channel not found"})
        reason = recorded.query.get("reason", "")
        if reason and "reason_code" in recorded.query:
            return _reply(
                request, 400, {"message": "The reason and reason_code can't both be specified"}
            )
        if reason and reason not in HANGUP_REASONS:
            return _reply(request, 400, {"message": "Invalid reason for hangup reason provided"})
        channel.gone, channel.hangup_reason = True, reason or "normal"
        request.setResponseCode(204)
        return b""


def _reply(request: Request, status: int, body: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps(body).encode()


class _TrackingFactory(WrappingFactory):
    """Knows the open server connections, so ``stop`` can close them and wait."""

    def __init__(self, wrapped: Site) -> None:
        super().__init__(wrapped)
        self._closed: dict[object, Deferred[None]] = {}
        self.accepted = 0

    def registerProtocol(self, p: Any) -> None:
        super().registerProtocol(p)
        self.accepted += 1
        self._closed[p] = Deferred()

    def unregisterProtocol(self, p: Any) -> None:
        super().unregisterProtocol(p)
        done = self._closed.pop(p, None)
        if done is not None:
            done.callback(None)

    def close_all(self) -> Deferred[Any]:
        waiting = list(self._closed.values())
        for p in list(self.protocols):
            p.transport.loseConnection()
        return gatherResults(waiting)


@dataclasses.dataclass
class FakeAriServer:
    """A listening ``FakeAri``: point ``AriProvider.ari_url`` at ``url``."""

    fake: FakeAri
    port: IListeningPort
    url: str
    _factory: _TrackingFactory

    @property
    def connections_accepted(self) -> int:
        """TCP connections accepted so far (a persistent client keeps reusing one)."""
        return self._factory.accepted

    def stop(self) -> Deferred[Any]:
        """Stop listening, cancel pending answers, close every connection; fires when done."""
        self.fake.cancel_timers()
        stopped = maybeDeferred(self.port.stopListening)
        return gatherResults([stopped, self._factory.close_all()])


def serve_fake_ari(
    reactor: IReactorTCP, fake: FakeAri, interface: str = "127.0.0.1"
) -> FakeAriServer:
    """Listen on an ephemeral port of ``interface``; remember to ``stop()`` it."""
    factory = _TrackingFactory(Site(fake))
    port = reactor.listenTCP(0, factory, interface=interface)
    address = port.getHost()
    return FakeAriServer(fake, port, f"http://{interface}:{address.port}", factory)
