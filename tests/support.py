"""Test helpers: a daemon on 127.0.0.1 with real sockets, a raw HTTP client, a fake Asterisk."""

from __future__ import annotations

import math
import struct
import uuid
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.internet.interfaces import IListeningPort
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from rapida_tap.admission import AUDIOSOCKET_ID_BYTES
from rapida_tap.audiosocket.wire import AudioSocketDecoder, Kind, encode_frame
from rapida_tap.config import Settings
from rapida_tap.interfaces import IAssistant, IAssistantSession
from rapida_tap.node import Daemon
from rapida_tap.services import ContextStoreService

API_KEY = "test-key-0123456789"


def start_daemon(testcase: Any, **overrides: Any) -> Daemon:
    """A daemon on the real reactor, listening on ephemeral 127.0.0.1 ports (``.as_port``,
    ``.http_port``); everything is stopped at the end of ``testcase``."""
    settings = Settings(api_keys=[API_KEY], **overrides)
    daemon = Daemon(settings, reactor)
    store = ContextStoreService(daemon.contexts)
    store.startService()  # connects a Redis store
    # Behind the same admission caps as the daemon's own listeners (rapida_tap.admission).
    audiosocket = daemon.admitted(
        "audiosocket", daemon.audiosocket, settings.max_connections, AUDIOSOCKET_ID_BYTES
    )
    http = daemon.admitted("http", daemon.site, settings.http_max_connections)
    as_port: IListeningPort = reactor.listenTCP(0, audiosocket, interface="127.0.0.1")
    http_port: IListeningPort = reactor.listenTCP(0, http, interface="127.0.0.1")
    daemon.as_port = as_port.getHost().port  # type: ignore[attr-defined]
    daemon.http_port = http_port.getHost().port  # type: ignore[attr-defined]

    @defer.inlineCallbacks
    def stop() -> Any:
        daemon.drain.stop()
        daemon.bridge.end_all("test-over")
        daemon.bridge.pacer.stop()
        yield daemon.outbound.stop()
        yield daemon.stop_events()
        yield defer.gatherResults(
            [
                defer.maybeDeferred(as_port.stopListening),
                defer.maybeDeferred(http_port.stopListening),
            ]
        )
        yield store.stopService()

    testcase.addCleanup(stop)
    return daemon


# -- raw HTTP, byte for byte as func_curl sends it ------------------------------------------


@dataclass
class HttpReply:
    status: int
    headers: dict[str, str]
    body: bytes
    closed_by_server: bool


class _RawHttp(protocol.Protocol):
    def __init__(self, request: bytes) -> None:
        self.request = request
        self.data = b""
        self.done: defer.Deferred[HttpReply] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        head, _, body = self.data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1]) if lines[0] else 0
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        self.done.callback(HttpReply(status, headers, body, True))


def raw_http(port: int, request: bytes, timeout: float = 5.0) -> defer.Deferred[HttpReply]:
    """Send ``request`` as is and read the reply until the server closes the connection.

    Fails (times out) if the server keeps the connection open: registration must close it.
    """
    client = _RawHttp(request)
    d = protocol.ClientCreator(reactor, lambda: client).connectTCP("127.0.0.1", port)
    d.addCallback(lambda _: client.done)
    return d.addTimeout(timeout, reactor)


def curl_get(path: str, host: str = "127.0.0.1", headers: dict[str, str] | None = None) -> bytes:
    """A request exactly like func_curl's (``Host``, ``User-Agent``, ``Accept``, extra headers)."""
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}",
        "User-Agent: asterisk-libcurl-agent/1.0",
        "Accept: */*",
    ]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def register(
    port: int, assistant: str = "123456789", caller: str = "%2B4930123456", key: str = API_KEY
) -> defer.Deferred[str]:
    d = raw_http(
        port,
        curl_get(f"/v1/talk/asterisk/call/{assistant}?from={caller}", headers={"X-Api-Key": key}),
    )

    def body(reply: HttpReply) -> str:
        assert reply.status == 200, reply
        return reply.body.decode("ascii")

    return d.addCallback(body)


# -- a fake Asterisk AudioSocket client --------------------------------------------------------


def tone(frames: int, hz: float = 440.0, rate: int = 8000, amplitude: int = 8000) -> list[bytes]:
    """``frames`` 20 ms frames of a sine, PCM16 LE; every frame differs (phase continues)."""
    return [tone_frame(f, hz, rate, amplitude) for f in range(frames)]


def tone_frame(index: int, hz: float = 440.0, rate: int = 8000, amplitude: int = 8000) -> bytes:
    """Frame ``index`` of the endless sine `tone` cuts into frames."""
    n = rate // 50
    return struct.pack(
        f"<{n}h",
        *(int(amplitude * math.sin(2 * math.pi * hz * (index * n + i) / rate)) for i in range(n)),
    )


@dataclass
class Received:
    kind: int
    payload: bytes
    at: float


class FakeAsterisk(protocol.Protocol):
    """Speaks AudioSocket as Asterisk does: the UUID frame, then audio every 20 ms (or a script).

    ``received`` collects every frame the daemon sends, with its arrival time; ``closed`` fires
    when the connection ends.
    """

    def __init__(
        self,
        context_id: str | None,
        frames: list[bytes] | None = None,
        kind: int = Kind.SLIN_8K,
        interval: float = 0.02,
        hangup_after: bool = False,
    ):
        self.context_id = context_id
        self.frames = list(frames or [])
        self.kind = kind
        self.interval = interval
        self.hangup_after = hangup_after
        self.received: list[Received] = []
        self.decoder = AudioSocketDecoder(max_audio_payload=65535)
        self.closed: defer.Deferred[None] = defer.Deferred()
        self.sent_all: defer.Deferred[None] = defer.Deferred()
        self._timer: Any = None
        self.connected_ = False

    def connectionMade(self) -> None:
        self.connected_ = True
        if self.context_id is not None:
            self.transport.write(encode_frame(Kind.UUID, uuid.UUID(self.context_id).bytes))
        self._next(0)

    def _next(self, i: int) -> None:
        self._timer = None
        if not self.connected_:
            return
        if i >= len(self.frames):
            if self.hangup_after:
                self.transport.loseConnection()
            if not self.sent_all.called:
                self.sent_all.callback(None)
            return
        self.transport.write(encode_frame(self.kind, self.frames[i]))
        self._timer = reactor.callLater(self.interval, self._next, i + 1)

    def dataReceived(self, data: bytes) -> None:
        now = reactor.seconds()
        for kind, payload in self.decoder.feed(data):
            self.received.append(Received(kind, payload, now))

    def send(self, data: bytes) -> None:
        self.transport.write(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.connected_ = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if not self.sent_all.called:
            self.sent_all.callback(None)
        self.closed.callback(None)

    def audio(self) -> list[Received]:
        return [r for r in self.received if r.kind != Kind.HANGUP]


def connect_audiosocket(port: int, client: FakeAsterisk) -> defer.Deferred[FakeAsterisk]:
    d = protocol.ClientCreator(reactor, lambda: client).connectTCP("127.0.0.1", port)
    return d.addCallback(lambda _: client)


@dataclass
class LogCapture:
    """Collects log events (``twisted.logger``) during a test, formatted."""

    events: list[dict[str, Any]] = field(default_factory=list)

    def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def text(self) -> str:
        from twisted.logger import formatEvent

        return "\n".join(formatEvent(e) for e in self.events)


def capture_logs(testcase: Any) -> LogCapture:
    capture = LogCapture()
    globalLogPublisher.addObserver(capture)
    testcase.addCleanup(globalLogPublisher.removeObserver, capture)
    return capture


def wait_until(predicate: Any, timeout: float = 5.0, step: float = 0.01) -> defer.Deferred[None]:
    """Poll ``predicate`` on the reactor (I/O progress, not a sleep) until true or timeout."""
    d: defer.Deferred[None] = defer.Deferred()
    deadline = reactor.seconds() + timeout

    def check() -> None:
        if predicate():
            d.callback(None)
        elif reactor.seconds() > deadline:
            d.errback(AssertionError(f"condition not met within {timeout}s"))
        else:
            reactor.callLater(step, check)

    check()
    return d


@implementer(IAssistantSession)
class RecordingSession:
    """An assistant session that only records what reaches it; the test drives the call."""

    def __init__(self, call: Any = None) -> None:
        self.call = call
        self.audio: list[bytes] = []
        self.digits: list[str] = []
        self.marks: list[str] = []
        self.closed: list[str] = []

    def audio_received(self, pcm: bytes) -> None:
        self.audio.append(pcm)

    def dtmf_received(self, digit: str) -> None:
        self.digits.append(digit)

    def mark_played(self, name: str) -> None:
        self.marks.append(name)

    def close(self, reason: str) -> None:
        self.closed.append(reason)


@implementer(IAssistant)
class RecordingAssistant:
    """Connects every call to a new ``RecordingSession`` (kept in ``sessions``); with
    ``sample_rate``, its calls run at that rate, as a bot's do."""

    name = "recorder"

    def __init__(self, sample_rate: int | None = None) -> None:
        self.sessions: list[RecordingSession] = []
        self.sample_rate = sample_rate

    def connect(self, call: Any) -> defer.Deferred[IAssistantSession]:
        session = RecordingSession(call)
        self.sessions.append(session)
        return defer.succeed(session)


class ProcessOutput(protocol.ProcessProtocol):
    """Another process's output (stdout and stderr together) and how it ended."""

    def __init__(self) -> None:
        self.out = b""
        self.reason: Failure | None = None
        self.ended: defer.Deferred[None] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self.reason = reason
        self.ended.callback(None)
