"""What every media-stream dialect shares: its audio format, the call it describes, its shape.

A dialect is the sans-IO codec of one provider's media-stream protocol, as the daemon speaks
it in the provider's place (the WebSocket client): the messages it sends (``opening``,
``media``, ``dtmf``, ``mark_played``, ``cleared``, ``stop``) and how it reads the bot's
(``parse``).  One instance serves one call; it numbers its own messages.
"""

from __future__ import annotations

import binascii
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from rapida_tap.assistants.mediastreams import (
    BotClear,
    BotMark,
    BotMedia,
    BotMessage,
    BotOther,
    load_message,
    mark_name,
    media_payload,
)
from rapida_tap.media.codec import (
    alaw_to_pcm,
    pcm_to_alaw,
    pcm_to_ulaw,
    swap_bytes,
    ulaw_to_pcm,
)

MULAW = "mulaw"
ALAW = "alaw"
L16 = "l16"


def _same(pcm: bytes) -> bytes:
    return pcm


_CODECS: dict[tuple[str, bool], tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]] = {
    (MULAW, False): (pcm_to_ulaw, ulaw_to_pcm),
    (ALAW, False): (pcm_to_alaw, alaw_to_pcm),
    (L16, False): (_same, _same),
    (L16, True): (swap_bytes, swap_bytes),
}


@dataclass(frozen=True)
class AudioFormat:
    """The audio a dialect carries: ``encoding`` (``mulaw``, ``alaw``, ``l16``) at ``rate`` Hz,
    mono; ``big_endian`` for L16 as RTP carries it.  ``encode`` takes PCM16 LE at ``rate``."""

    encoding: str
    rate: int
    big_endian: bool = False

    def encode(self, pcm: bytes) -> bytes:
        return _CODECS[self.encoding, self.big_endian][0](pcm)

    def decode(self, payload: bytes) -> bytes:
        """PCM16 LE; an odd trailing byte of L16 (half a sample) is left out."""
        if self.encoding == L16 and len(payload) % 2:
            payload = payload[:-1]
        return _CODECS[self.encoding, self.big_endian][1](payload)

    @property
    def label(self) -> str:
        return f"{self.encoding}/{self.rate}"


@dataclass(frozen=True)
class StreamCall:
    """What a dialect tells the bot about the call (all text; ``to`` may be empty)."""

    context_id: str
    caller: str
    to: str
    account: str
    parameters: Mapping[str, str]


def b64(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode("ascii")


dumps = json.JSONEncoder(separators=(",", ":")).encode


class Dialect(ABC):
    """One provider's media-stream protocol for one call (see the module docstring).

    ``formats`` lists the audio the provider allows, the first being the default.
    ``echo_cleared_marks``: whether marks dropped by a bot's clear are still echoed (Twilio
    echoes them; Plivo never reports a checkpoint whose audio was not played).
    """

    name: ClassVar[str]
    formats: ClassVar[tuple[AudioFormat, ...]]
    echo_cleared_marks: ClassVar[bool] = True

    def __init__(self, call: StreamCall, audio: AudioFormat, now: Callable[[], float]) -> None:
        self.call = call
        self.audio = audio
        self.now = now  # wall-clock seconds, for the dialects that stamp messages with it
        self.samples = 0  # caller samples sent: audio time for the media messages
        self.sequence = 0  # the last message number given
        self.chunk = 0  # the last media message number given

    @classmethod
    def audio_format(cls, encoding: str | None, rate: int | None) -> AudioFormat | None:
        """The allowed format matching ``encoding`` and ``rate`` (either may be left out)."""
        for fmt in cls.formats:
            if encoding in (None, fmt.encoding) and rate in (None, fmt.rate):
                return fmt
        return None

    def next_number(self) -> int:
        """The next message's sequence number (from 1)."""
        self.sequence += 1
        return self.sequence

    def audio_ms(self, pcm: bytes) -> int:
        """The stream position of ``pcm`` in ms (before it), and count it as sent."""
        ms = self.samples * 1000 // self.audio.rate
        self.samples += len(pcm) // 2
        return ms

    @abstractmethod
    def opening(self) -> list[str]:
        """What the provider sends as soon as the WebSocket is open (``connected``, ``start``)."""

    @abstractmethod
    def media(self, pcm: bytes) -> str:
        """Caller audio (PCM16 LE at ``audio.rate``) as one message."""

    @abstractmethod
    def dtmf(self, digit: str) -> str:
        """The caller pressed ``digit``."""

    @abstractmethod
    def mark_played(self, name: str) -> str:
        """The audio the bot sent before its mark ``name`` has been played."""

    def cleared(self) -> str | None:
        """After the bot's clear: the provider's acknowledgement, if it sends one."""
        return None

    @abstractmethod
    def stop(self) -> str | None:
        """The last message before the daemon closes (``None``: the close says it)."""

    def parse(self, text: str | bytes, max_bytes: int) -> BotMessage:
        """One bot message; ``StreamProtocolError`` when it cannot be understood."""
        message, event = load_message(text, max_bytes)
        return self.bot_message(message, event)

    def bot_message(self, message: dict[str, Any], event: str) -> BotMessage:
        """The meaning of a bot's JSON object whose ``event`` is ``event``: ``media``,
        ``mark`` and ``clear`` shaped as Twilio's, which Telnyx and Exotel share."""
        if event == "media":
            return BotMedia(media_payload(message.get("media")))
        if event == "mark":
            return BotMark(mark_name(message.get("mark"), "mark.name"))
        if event == "clear":
            return BotClear()
        return BotOther(event)
