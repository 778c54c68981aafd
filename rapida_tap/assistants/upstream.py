"""One call's stream to an upstream voice bot, in its dialect (Twilio Media Streams by default,
``docs/media-streams.md``; Telnyx, Plivo, Exotel: ``rapida_tap.assistants.dialects``).

The daemon is the WebSocket client (as the provider is); the bot is the server.  ``UpstreamSession``
is the per-call state machine between the bridge and the bot's messages: it never touches a
socket (it is given ``send`` and ``close`` callables), so tests drive it on a ``task.Clock``.
``rapida_tap.assistants.bot_client`` connects it to a real bot.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import TYPE_CHECKING

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from rapida_tap.assistants.dialects import DIALECTS, Dialect, StreamCall
from rapida_tap.assistants.dialects.twilio import stream_sids as stream_sids
from rapida_tap.assistants.mediastreams import (
    DTMF_DIGITS,
    BotClear,
    BotMark,
    BotMedia,
    BotOther,
    StreamProtocolError,
)
from rapida_tap.interfaces import IAssistantSession
from rapida_tap.media.playout import end_after_playout
from rapida_tap.reasons import EndReason

if TYPE_CHECKING:  # pragma: no cover
    from rapida_tap.assistants.config import BotSpec
    from rapida_tap.media.call import Call

MAX_MESSAGE_BYTES = 1_048_576
# Close codes that mean "the bot ended the call"; any other code, or no close handshake at
# all, means it failed.
CLEAN_CLOSE_CODES = frozenset({1000, 1001, 1005})


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


def dialect_for(call: Call, spec: BotSpec, clock: IReactorTime) -> Dialect:
    """The dialect ``spec`` names, set up for ``call`` (stamped with ``clock``'s time)."""
    ctx = call.context
    described = StreamCall(
        context_id=ctx.context_id,
        caller=ctx.caller,
        to=ctx.variables.get("to", ""),
        account=spec.account_sid,
        parameters=custom_parameters(call, spec),
    )
    return DIALECTS[spec.protocol](described, spec.audio, clock.seconds)


@implementer(IAssistantSession)
class UpstreamSession:
    """One call's stream to one bot.

    ``send(text)`` writes one JSON text frame and returns False when the socket is closing
    (the message is then dropped and counted, never raised); ``close_bot(code, reason)``
    closes the WebSocket.  The owner feeds bot frames to ``message_received`` and the socket's
    end to ``bot_closed``, as soon as the bot's close frame arrives.  Every bot ``mark`` is
    echoed exactly once: when its audio has played, or at once when a ``clear`` drops it.
    """

    log = Logger()

    def __init__(
        self,
        call: Call,
        spec: BotSpec,
        send: Callable[[str], bool],
        close_bot: Callable[[int, str], None],
        clock: IReactorTime,
    ) -> None:
        self.call = call
        self.spec = spec
        self._send = send
        self._close_bot = close_bot
        self._clock = clock
        self.dialect = dialect_for(call, spec, clock)
        self.bot_open = True
        self.closed = False
        self._clearing = False
        self._pending: collections.Counter[str] = collections.Counter()
        self.bad_messages = 0
        self.other_events = 0
        self.dropped_messages = 0  # written while the bot's socket was closing

    def start(self) -> None:
        """The WebSocket is open: the dialect's opening (``connected``, ``start``) first."""
        for text in self.dialect.opening():
            self._write(text)

    def _write(self, text: str) -> None:
        if not self._send(text):
            self.dropped_messages += 1

    # -- IAssistantSession: the call's side -------------------------------------------

    def audio_received(self, pcm: bytes) -> None:
        if not self.bot_open or not pcm:
            return
        self._write(self.dialect.media(pcm))

    def dtmf_received(self, digit: str) -> None:
        if self.bot_open and digit in DTMF_DIGITS:
            self._write(self.dialect.dtmf(digit))

    def mark_played(self, name: str) -> None:
        if not self._pending[name]:
            return  # not a mark the bot is waiting for (settled already)
        self._pending[name] -= 1
        if self.bot_open and (self.dialect.echo_cleared_marks or not self._clearing):
            self._write(self.dialect.mark_played(name))

    def close(self, reason: str) -> None:
        """The call ended: ``stop`` and a normal close, unless the bot is gone already."""
        if self.closed:
            return
        self.closed = True
        if self.bot_open:
            self.bot_open = False
            stop = self.dialect.stop()
            if stop is not None:
                self._write(stop)
            self._close_bot(1000, "call ended")

    # -- the bot's side ---------------------------------------------------------------

    def message_received(self, payload: str | bytes) -> None:
        """One WebSocket frame from the bot (text or binary, both read as JSON)."""
        if self.closed or not self.bot_open:
            return
        try:
            message = self.dialect.parse(payload, MAX_MESSAGE_BYTES)
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
                self.call.play(self.dialect.audio.decode(message.payload))
        elif isinstance(message, BotMark):
            self._pending[message.name] += 1
            self.call.mark(message.name)
        elif isinstance(message, BotClear):
            self._clearing = True
            try:
                self.call.clear()  # settles every pending mark through mark_played
            finally:
                self._clearing = False
            cleared = self.dialect.cleared()
            if cleared is not None and self.bot_open:
                self._write(cleared)
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
        plays out first (at most its own length plus ``playout.DRAIN_SLACK`` seconds), then the call
        ends as ``assistant-hangup``, which stays its reason if the caller hangs up meanwhile.
        Anything else ends the call at once as a failure (``on_failure`` decides the reason).
        """
        if not self.bot_open:
            return
        self.bot_open = False
        if self.closed:
            return
        said = f" {reason!r}" if reason else ""
        if clean and (code is None or code in CLEAN_CLOSE_CODES):
            detail = f"bot closed the stream ({code or 'no code'}{said})"
            end_after_playout(self.call, self._clock, EndReason.ASSISTANT_HANGUP, detail)
            return
        if clean:
            detail = f"bot {self.spec.name} closed with code {code}{said}"
        else:
            detail = f"bot {self.spec.name} connection lost: {reason or 'no close handshake'}"
        end_for_failure(self.call, self.spec, detail)


def end_for_failure(call: Call, spec: BotSpec, detail: str) -> None:
    """End ``call`` because its bot failed, as the bot's ``on_failure`` says.

    ``hangup``: reason ``assistant-failed``.  ``continue``: reason ``assistant-hangup``, as if
    the bot had handed the call back, so transports take their orderly path and the dialplan
    goes on (the detail still says the bot failed).
    """
    if spec.on_failure == "continue":
        call.hangup(EndReason.ASSISTANT_HANGUP, f"{detail}; on_failure=continue")
    else:
        call.end(EndReason.ASSISTANT_FAILED, detail)
