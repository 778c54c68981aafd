"""The embedded default assistant: the caller hears themself, frame for frame.

Pressing ``#`` makes it hang up, so the daemon-side hangup (and the dialplan's next step) can be
tried from a real phone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet import defer
from zope.interface import implementer

from rapida_tap.interfaces import IAssistant, IAssistantSession

if TYPE_CHECKING:  # pragma: no cover
    from rapida_tap.media.call import Call

KEPT_DIGITS = 32


@implementer(IAssistantSession)
class EchoSession:
    def __init__(self, call: Call) -> None:
        self._call = call
        call.trim_backlog = True  # input comes at the rate it is played: keep latency flat
        self.digits: list[str] = []  # the last KEPT_DIGITS only: a flood must not grow it

    def audio_received(self, pcm: bytes) -> None:
        self._call.play(pcm)

    def dtmf_received(self, digit: str) -> None:
        if len(self.digits) >= KEPT_DIGITS:
            del self.digits[0]
        self.digits.append(digit)
        if digit == "#":
            self._call.hangup()

    def mark_played(self, name: str) -> None:
        pass

    def close(self, reason: str) -> None:
        pass


@implementer(IAssistant)
class EchoAssistant:
    name = "echo"

    def connect(self, call: Call) -> defer.Deferred[IAssistantSession]:
        return defer.succeed(EchoSession(call))
