"""An upstream voice bot over the Twilio Media Streams protocol (``docs/media-streams.md``).

The daemon is the WebSocket client (as Twilio is); the bot is the server.  ``UpstreamSession``
is the per-call state machine between the bridge and the bot's messages: it never touches a
socket (it is given ``send`` and ``close`` callables), so tests drive it on a ``task.Clock``.
``UpstreamAssistant`` connects it to a real bot with Autobahn, TLS verified by default.
"""

from __future__ import annotations

import collections
import uuid
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
from rapida_tap.assistants.mediastreams import (
    DTMF_DIGITS,
    BotClear,
    BotMark,
    BotMedia,
    BotOther,
    StreamEncoder,
    StreamProtocolError,
    parse_bot_message,
)
from rapida_tap.interfaces import IAssistant, IAssistantSession
from rapida_tap.media.audio import FRAME_SECONDS, SAMPLE_RATE
from rapida_tap.media.call import ASSISTANT_FAILED, ASSISTANT_HANGUP
from rapida_tap.media.codec import pcm_to_ulaw, ulaw_to_pcm

if TYPE_CHECKING:  # pragma: no cover
    from rapida_tap.assistants.config import BotSpec
    from rapida_tap.media.call import Call

MAX_MESSAGE_BYTES = 1_048_576
# Close codes that mean "the bot ended the call"; any other code, or no close handshake at
# all, means it failed.
CLEAN_CLOSE_CODES = frozenset({1000, 1001, 1005})
# After the bot hangs up, its audio still queued gets this long beyond its own length to play.
DRAIN_SLACK = 2.0


class UpstreamError(Exception):
    """The bot could not be reached or spoken to; ``str()`` names the bot, never secrets."""


class BotUnreachable(UpstreamError):
    """DNS, TCP or TLS failed (refused, no route, certificate not trusted)."""


class BotTimeout(UpstreamError):
    """No open WebSocket within ``connect_timeout`` seconds."""


class BotRefused(UpstreamError):
    """The bot answered the WebSocket handshake with something other than 101."""


class CallEndedWhileConnecting(UpstreamError):
    """The caller hung up before the bot answered; nothing to report to anyone."""


def stream_sids(context_id: str) -> tuple[str, str]:
    """Twilio-shaped ``(streamSid, callSid)`` derived from the context id, so logs line up."""
    hex_id = uuid.UUID(context_id).hex
    return "MZ" + hex_id, "CA" + hex_id


def custom_parameters(call: Call, spec: BotSpec) -> dict[str, str]:
    """``start.customParameters``: the call's variables, the configured parameters, then the
    daemon's own (which win): ``from_number`` is the name Pipecat's runner reads."""
    ctx = call.context
    params = dict(ctx.variables)
    params.update(spec.parameters)
    params.update(
        context_id=ctx.context_id,
        assistant_id=ctx.assistant_id,
        caller=ctx.caller,
        from_number=ctx.caller,
        direction=ctx.direction,
        transport=str(getattr(call.leg, "transport_name", "")),
    )
    return params


@implementer(IAssistantSession)
class UpstreamSession:
    """One call's stream to one bot.

    ``send(text)`` writes one JSON text frame; ``close_bot(code, reason)`` closes the
    WebSocket.  The owner feeds bot frames to ``message_received`` and the socket's end to
    ``bot_closed``.  Every bot ``mark`` is echoed exactly once: when its audio has played, or
    at once when a ``clear`` drops it.
    """

    log = Logger()

    def __init__(
        self,
        call: Call,
        spec: BotSpec,
        send: Callable[[str], None],
        close_bot: Callable[[int, str], None],
        clock: IReactorTime,
    ) -> None:
        self.call = call
        self.spec = spec
        self._send = send
        self._close_bot = close_bot
        self._clock = clock
        stream_sid, call_sid = stream_sids(call.context_id)
        self.encoder = StreamEncoder(stream_sid, call_sid, account_sid=spec.account_sid)
        self.bot_open = True
        self.closed = False
        self._samples = 0  # caller samples sent: the media timestamps
        self._pending: collections.Counter[str] = collections.Counter()
        self._drain_mark = f"\0rapida-drain-{uuid.uuid4().hex}"
        self._drain_timer: IDelayedCall | None = None
        self._hangup_detail = ""
        self.bad_messages = 0
        self.other_events = 0

    def start(self) -> None:
        """The WebSocket is open: ``connected`` then ``start``, nothing between them."""
        self._send(self.encoder.connected())
        self._send(self.encoder.start(custom_parameters=custom_parameters(self.call, self.spec)))

    # -- IAssistantSession: the call's side -------------------------------------------

    def audio_received(self, pcm: bytes) -> None:
        if not self.bot_open or not pcm:
            return
        timestamp_ms = self._samples * 1000 // SAMPLE_RATE
        self._samples += len(pcm) // 2
        self._send(self.encoder.media(pcm_to_ulaw(pcm), timestamp_ms))

    def dtmf_received(self, digit: str) -> None:
        if self.bot_open and digit in DTMF_DIGITS:
            self._send(self.encoder.dtmf(digit))

    def mark_played(self, name: str) -> None:
        if name == self._drain_mark:
            self._drained()
            return
        if not self._pending[name]:
            return  # not a mark the bot is waiting for (settled already)
        self._pending[name] -= 1
        if self.bot_open:
            self._send(self.encoder.mark(name))

    def close(self, reason: str) -> None:
        """The call ended: ``stop`` and a normal close, unless the bot is gone already."""
        if self.closed:
            return
        self.closed = True
        self._cancel_drain()
        if self.bot_open:
            self.bot_open = False
            self._send(self.encoder.stop())
            self._close_bot(1000, "call ended")

    # -- the bot's side ---------------------------------------------------------------

    def message_received(self, payload: str | bytes) -> None:
        """One WebSocket frame from the bot (text or binary, both read as JSON)."""
        if self.closed or not self.bot_open:
            return
        try:
            message = parse_bot_message(payload, MAX_MESSAGE_BYTES)
        except StreamProtocolError as e:
            self.bad_messages += 1
            if self.bad_messages == 1:
                self.log.warn(
                    "call {ctx}: bot {bot} sent a bad message, dropped (further ones are "
                    "counted only): {error}",
                    ctx=self.call.context_id,
                    bot=self.spec.name,
                    error=str(e),
                )
            return
        if isinstance(message, BotMedia):
            if message.payload:
                self.call.play(ulaw_to_pcm(message.payload))
        elif isinstance(message, BotMark):
            self._pending[message.name] += 1
            self.call.mark(message.name)
        elif isinstance(message, BotClear):
            self.call.clear()  # settles every pending mark through mark_played
        elif isinstance(message, BotOther):
            self.other_events += 1
            if self.other_events == 1:
                self.log.info(
                    "call {ctx}: bot {bot} sent event {event!r}, ignored",
                    ctx=self.call.context_id,
                    bot=self.spec.name,
                    event=message.event[:40],
                )

    def bot_closed(self, clean: bool, code: int | None, reason: str | None) -> None:
        """The bot's WebSocket ended.

        A clean close (1000, 1001, no code) is the bot hanging up: the audio it already sent
        plays out first (at most its own length plus ``DRAIN_SLACK`` seconds), then the call
        ends as ``assistant-hangup``.  Anything else ends the call at once as a failure
        (``on_failure`` decides the reason).
        """
        if not self.bot_open:
            return
        self.bot_open = False
        if self.closed:
            return
        said = f" {reason!r}" if reason else ""
        if clean and (code is None or code in CLEAN_CLOSE_CODES):
            self._hangup_detail = f"bot closed the stream ({code or 'no code'}{said})"
            queued = self.call.queued_frames + 1
            self._drain_timer = self._clock.callLater(
                queued * FRAME_SECONDS + DRAIN_SLACK, self._drained
            )
            self.call.mark(self._drain_mark)  # played at once when nothing is queued
            return
        if clean:
            detail = f"bot {self.spec.name} closed with code {code}{said}"
        else:
            detail = f"bot {self.spec.name} connection lost: {reason or 'no close handshake'}"
        end_for_failure(self.call, self.spec, detail)

    def _drained(self) -> None:
        self._cancel_drain()
        if not self.closed:
            self.call.hangup(ASSISTANT_HANGUP, self._hangup_detail)

    def _cancel_drain(self) -> None:
        timer, self._drain_timer = self._drain_timer, None
        if timer is not None and timer.active():
            timer.cancel()


def end_for_failure(call: Call, spec: BotSpec, detail: str) -> None:
    """End ``call`` because its bot failed, as the bot's ``on_failure`` says.

    ``hangup``: reason ``assistant-failed``.  ``continue``: reason ``assistant-hangup``, as if
    the bot had handed the call back, so transports take their orderly path and the dialplan
    goes on (the detail still says the bot failed).
    """
    if spec.on_failure == "continue":
        call.hangup(ASSISTANT_HANGUP, f"{detail}; on_failure=continue")
    else:
        call.end(ASSISTANT_FAILED, detail)


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

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        session = self.attempt.session
        if session is not None:
            session.message_received(payload)

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
        self.call.ended.addBoth(self._call_ended)
        d = self.assistant.endpoint().connect(_AttemptFactory(self.assistant.factory, self))
        self._connecting = d
        d.addErrback(self._connect_failed)

    def opened(self, proto: BotClientProtocol) -> None:
        if self._settled:
            proto.dropConnection(abort=True)
            return
        self._settled = True
        self._cancel_timer()

        def send(text: str) -> None:
            proto.sendMessage(text.encode("utf-8"), isBinary=False)

        def close_bot(code: int, reason: str) -> None:
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
