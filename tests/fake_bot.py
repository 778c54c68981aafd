"""A real Twilio-Media-Streams bot for the tests: an Autobahn WebSocket server on 127.0.0.1.

It behaves like a small voice bot: greets when the stream starts, echoes the caller's audio
after a delay, and reacts to keys so a test can script it: ``1`` barge-in (``clear``), ``2``
hang up (close 1000), ``3`` 5 s of audio at once then a mark, ``9`` die (drop TCP, no close
handshake).  Everything it receives is kept, parsed, in ``FakeBot.streams``.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet import defer, protocol, reactor
from twisted.internet.interfaces import IListeningPort

SILENCE_ULAW = b"\xff"


def ulaw_tone(frames: int) -> bytes:
    """``frames`` 20 ms of a recognisable μ-law pattern (not silence)."""
    return bytes((i * 7) % 120 for i in range(160 * frames))


@dataclass
class Stream:
    """One WebSocket connection as the bot saw it."""

    path: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    raw: list[str] = field(default_factory=list)  # every text frame, as sent
    messages: list[dict[str, Any]] = field(default_factory=list)
    close_code: int | None = None
    clean: bool | None = None
    closed: defer.Deferred[None] = field(default_factory=defer.Deferred)

    def events(self) -> list[str]:
        return [m["event"] for m in self.messages]

    def of(self, event: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m["event"] == event]

    def caller_audio(self) -> bytes:
        return b"".join(base64.b64decode(m["media"]["payload"]) for m in self.of("media"))


class BotProtocol(WebSocketServerProtocol):
    factory: FakeBotFactory

    def onConnect(self, request: Any) -> None:
        bot = self.factory.bot
        if bot.refuse:
            raise ConnectionDeny(bot.refuse, "no entry")
        self.stream = Stream(path=request.path, headers=dict(request.headers))
        self.stream_sid = ""
        self.timers: list[Any] = []
        bot.streams.append(self.stream)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        text = payload.decode("utf-8")
        self.stream.raw.append(text)
        message = json.loads(text)
        self.stream.messages.append(message)
        event = message["event"]
        bot = self.factory.bot
        if event == "start":
            self.stream_sid = message["start"]["streamSid"]
            if bot.greeting_frames:
                self.media(ulaw_tone(bot.greeting_frames))
                self.mark("greeting")
        elif event == "media" and bot.echo_delay is not None:
            audio = base64.b64decode(message["media"]["payload"])
            self.timers.append(reactor.callLater(bot.echo_delay, self.media, audio))
        elif event == "dtmf":
            digit = message["dtmf"]["digit"]
            if digit == "1":
                self.send({"event": "clear", "streamSid": self.stream_sid})
            elif digit == "2":
                self.sendClose(1000, "goodbye")
            elif digit == "3":
                self.media(ulaw_tone(250))
                self.mark("burst")
            elif digit == "9":
                self.transport.abortConnection()

    def send(self, message: dict[str, Any]) -> None:
        if self.state == self.STATE_OPEN:
            self.sendMessage(json.dumps(message).encode(), isBinary=False)

    def media(self, ulaw: bytes) -> None:
        payload = base64.b64encode(ulaw).decode()
        self.send({"event": "media", "streamSid": self.stream_sid, "media": {"payload": payload}})

    def mark(self, name: str) -> None:
        self.send({"event": "mark", "streamSid": self.stream_sid, "mark": {"name": name}})

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        for timer in getattr(self, "timers", []):
            if timer.active():
                timer.cancel()
        stream = getattr(self, "stream", None)
        if stream is not None and not stream.closed.called:
            stream.close_code, stream.clean = code, wasClean
            stream.closed.callback(None)


class FakeBotFactory(WebSocketServerFactory):
    protocol = BotProtocol

    def __init__(self, bot: FakeBot) -> None:
        super().__init__(reactor=reactor)
        self.bot = bot
        self.noisy = False


class FakeBot:
    """Listens on 127.0.0.1 (``.port``); ``stop()`` closes the port after every stream ended."""

    def __init__(
        self,
        greeting_frames: int = 0,
        echo_delay: float | None = None,
        refuse: int = 0,
        tls: Any = None,
    ) -> None:
        self.greeting_frames = greeting_frames
        self.echo_delay = echo_delay
        self.refuse = refuse
        self.streams: list[Stream] = []
        self.factory = FakeBotFactory(self)
        if tls is None:
            self.listening: IListeningPort = reactor.listenTCP(
                0, self.factory, interface="127.0.0.1"
            )
        else:
            self.listening = reactor.listenSSL(0, self.factory, tls, interface="127.0.0.1")
        self.port: int = self.listening.getHost().port
        self.tls = tls is not None

    @property
    def url(self) -> str:
        if self.tls:
            return f"wss://localhost:{self.port}/stream"
        return f"ws://127.0.0.1:{self.port}/stream"

    def stop(self) -> defer.Deferred[Any]:
        waits = [s.closed for s in self.streams]
        d = defer.gatherResults(waits) if waits else defer.succeed(None)
        d.addCallback(lambda _: self.listening.stopListening())
        return d


class Mute(protocol.Protocol):
    """Accepts TCP and never answers: a bot that hangs in the handshake."""

    lost = False

    def connectionMade(self) -> None:
        self.factory.connections.append(self)  # type: ignore[attr-defined]

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True


def mute_server() -> tuple[IListeningPort, list[Mute]]:
    factory = protocol.Factory.forProtocol(Mute)
    factory.connections = []  # type: ignore[attr-defined]
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    return port, factory.connections  # type: ignore[attr-defined]


def self_signed(directory: str) -> tuple[Any, str]:
    """A throw-away certificate for localhost: (server TLS options, path of the PEM cert)."""
    import os
    from pathlib import Path

    from twisted.internet import ssl

    from tests.certs import make_cert

    os.makedirs(directory, exist_ok=True)
    key_path, cert_path = make_cert(Path(directory), name="bot")
    return ssl.DefaultOpenSSLContextFactory(str(key_path), str(cert_path)), str(cert_path)


@defer.inlineCallbacks
def refused_url() -> Any:
    """A ws:// URL on a 127.0.0.1 port nobody listens on (any more)."""
    port = reactor.listenTCP(0, protocol.Factory(), interface="127.0.0.1")
    number = port.getHost().port
    yield port.stopListening()
    return f"ws://127.0.0.1:{number}/stream"
