"""The WebSocket client side of an upstream bot: connect, then carry one ``UpstreamSession``.

``UpstreamAssistant`` opens one WebSocket per call with Autobahn (TLS verified by default).
The same teardown rules hold as for the call legs: nothing is written to a socket that is
closing (it is dropped and counted), the bot's close frame is its hang-up the moment it
arrives, and an exception while handling a bot message ends the call as ``internal-error``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from OpenSSL import SSL
from twisted.internet import defer, endpoints, ssl
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import ClientFactory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from rapida_tap import __version__
from rapida_tap.assistants.upstream import (
    MAX_MESSAGE_BYTES,
    BotRefused,
    BotTimeout,
    BotUnreachable,
    CallEndedWhileConnecting,
    UpstreamError,
    UpstreamSession,
    end_for_failure,
)
from rapida_tap.interfaces import IAssistant, IAssistantSession

if TYPE_CHECKING:  # pragma: no cover
    from rapida_tap.assistants.config import BotSpec
    from rapida_tap.media.call import Call


def _tls_error(failure: Failure) -> str:
    """The OpenSSL reason (e.g. 'certificate verify failed'), not its nested tuples."""
    try:
        errors = failure.value.args[0]  # type: ignore[union-attr]
        return "; ".join(str(e[2]) for e in errors) or failure.getErrorMessage()
    except (IndexError, TypeError, AttributeError):
        return failure.getErrorMessage()


class BotClientProtocol(WebSocketClientProtocol):
    """Thin adapter: Autobahn callbacks to the attempt and then the session."""

    attempt: _Attempt

    def onOpen(self) -> None:
        self.attempt.opened(self)

    def writable(self) -> bool:
        return self.transport is not None and self.state == self.STATE_OPEN

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        session = self.attempt.session
        if session is not None:
            try:
                session.message_received(payload)
            except Exception:
                self.attempt.call.fail("handling a bot message failed")

    def onCloseFrame(self, code: int, reasonRaw: bytes) -> Any:
        """The bot's close frame is its hang-up now, however the TCP close races after it."""
        session = self.attempt.session
        if session is not None and self.state == self.STATE_OPEN:
            reason = reasonRaw.decode("utf-8", "replace") if reasonRaw else None
            session.bot_closed(True, code, reason)
        return super().onCloseFrame(code, reasonRaw)

    lost: Failure | None = None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = reason  # onClose is not told why; a TLS failure only shows here
        super().connectionLost(reason)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.attempt.closed(wasClean, code, reason or getattr(self, "wasNotCleanReason", None))


class _AttemptFactory(ClientFactory):
    """Hands the shared WebSocket factory's protocol to the one attempt that connects."""

    noisy = False

    def __init__(self, factory: WebSocketClientFactory, attempt: _Attempt) -> None:
        self.factory = factory
        self.attempt = attempt

    def buildProtocol(self, addr: Any) -> BotClientProtocol:
        proto = cast(BotClientProtocol, self.factory.buildProtocol(addr))
        proto.attempt = self.attempt
        self.attempt.protocol = proto
        return proto


class _Attempt:
    """Connecting one call to the bot, then carrying its session: fires ``result`` once."""

    log = Logger()

    def __init__(self, assistant: UpstreamAssistant, call: Call) -> None:
        self.assistant = assistant
        self.spec = assistant.spec
        self.call = call
        self.result: defer.Deferred[IAssistantSession] = defer.Deferred()
        self.protocol: BotClientProtocol | None = None
        self.session: UpstreamSession | None = None
        self._connecting: defer.Deferred[Any] | None = None
        self._timer: IDelayedCall | None = None
        self._settled = False

    def start(self) -> None:
        clock = self.assistant.clock
        self._timer = clock.callLater(self.spec.connect_timeout, self._timed_out)
        self.call.when_ended().addBoth(self._call_ended)
        d = self.assistant.endpoint().connect(_AttemptFactory(self.assistant.factory, self))
        self._connecting = d
        d.addErrback(self._connect_failed)

    def opened(self, proto: BotClientProtocol) -> None:
        if self._settled:
            proto.dropConnection(abort=True)
            return
        self._settled = True
        self._cancel_timer()

        def send(text: str) -> bool:
            if not proto.writable():
                return False
            proto.sendMessage(text.encode("utf-8"), isBinary=False)
            return True

        def close_bot(code: int, reason: str) -> None:
            if proto.writable():
                proto.sendClose(code, reason)

        self.session = UpstreamSession(self.call, self.spec, send, close_bot, self.assistant.clock)
        self.session.start()
        self.log.info(
            "call {ctx}: bot {bot} connected", ctx=self.call.context_id, bot=self.spec.name
        )
        self.result.callback(self.session)

    def closed(self, clean: bool, code: int | None, reason: str | None) -> None:
        if self.session is not None:
            self.session.bot_closed(clean, code, reason)
        elif not self._settled:
            lost = self.protocol.lost if self.protocol is not None else None
            if lost is not None and lost.check(SSL.Error):
                self._fail(BotUnreachable(f"bot {self.spec.name}: TLS failed: {_tls_error(lost)}"))
            else:
                self._fail(BotRefused(f"bot {self.spec.name}: {reason or 'handshake failed'}"))

    def _connect_failed(self, failure: Failure) -> None:
        if self._settled:
            return None
        self._fail(BotUnreachable(f"bot {self.spec.name}: {failure.getErrorMessage()}"))
        return None

    def _timed_out(self) -> None:
        self._timer = None
        self._fail(
            BotTimeout(f"bot {self.spec.name}: not connected within {self.spec.connect_timeout:g}s")
        )

    def _call_ended(self, reason: Any) -> Any:
        if not self._settled:
            self._fail(CallEndedWhileConnecting(f"bot {self.spec.name}: call ended first"))
        return reason

    def _fail(self, error: UpstreamError) -> None:
        """Give up connecting: stop every timer and socket, then report ``error``."""
        if self._settled:
            return
        self._settled = True  # cancelling and ending below call back into this attempt
        self._cancel_timer()
        connecting, self._connecting = self._connecting, None
        if self.protocol is not None:
            self.protocol.dropConnection(abort=True)
        elif connecting is not None and not connecting.called:
            connecting.cancel()
        # The call's end line carries ``error`` as its detail: no second log line here.
        if self.spec.on_failure == "continue" and not isinstance(error, CallEndedWhileConnecting):
            end_for_failure(self.call, self.spec, str(error))
        self.result.errback(Failure(error))

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()


@implementer(IAssistant)
class UpstreamAssistant:
    """A bot every call to this assistant id talks to, one WebSocket per call.

    ``reactor`` must provide TCP, time and name resolution (the real reactor);
    ``endpoint_factory`` replaces how the bot is reached (tests).
    """

    def __init__(
        self,
        spec: BotSpec,
        reactor: Any,
        endpoint_factory: Callable[[], IStreamClientEndpoint] | None = None,
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.sample_rate = spec.audio.rate  # the call runs at the bot's rate
        self.clock: IReactorTime = reactor
        self._reactor = reactor
        self._endpoint_factory = endpoint_factory or self._default_endpoint
        self._tls = self._tls_options() if spec.url.startswith("wss://") else None
        self.factory = WebSocketClientFactory(
            spec.url,
            headers=dict(spec.headers),
            useragent=f"rapida-asterisk/{__version__}",
            reactor=reactor,
        )
        self.factory.protocol = BotClientProtocol
        self.factory.noisy = False
        self.factory.setProtocolOptions(
            openHandshakeTimeout=0,  # ours covers TCP + TLS + handshake, on the injected clock
            closeHandshakeTimeout=1,
            maxMessagePayloadSize=MAX_MESSAGE_BYTES,
            autoPingInterval=15,
            autoPingTimeout=10,
            perMessageCompressionOffers=[],
        )

    def endpoint(self) -> IStreamClientEndpoint:
        return self._endpoint_factory()

    def _tls_options(self) -> Any:
        host = urlsplit(self.spec.url).hostname or ""
        trust = None
        if self.spec.ca_file:
            with open(self.spec.ca_file, "rb") as f:
                trust = ssl.Certificate.loadPEM(f.read())
        return ssl.optionsForClientTLS(host, trustRoot=trust)

    def _default_endpoint(self) -> IStreamClientEndpoint:
        parts = urlsplit(self.spec.url)
        host = parts.hostname or ""
        port = parts.port or (443 if self._tls is not None else 80)
        endpoint: IStreamClientEndpoint = endpoints.HostnameEndpoint(
            self._reactor, host, port, timeout=self.spec.connect_timeout
        )
        if self._tls is not None:
            endpoint = endpoints.wrapClientTLS(self._tls, endpoint)
        return endpoint

    def connect(self, call: Call) -> defer.Deferred[IAssistantSession]:
        """Open the bot's WebSocket for ``call`` and send ``connected`` + ``start``.

        Fails with ``BotUnreachable``, ``BotTimeout``, ``BotRefused`` or (the caller hung up
        first) ``CallEndedWhileConnecting``.
        """
        attempt = _Attempt(self, call)
        attempt.start()
        return attempt.result
