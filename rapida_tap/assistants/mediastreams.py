"""Sans-IO codec of the telephony media-stream protocol (Twilio Media Streams JSON).

The daemon plays Twilio's part: it is the WebSocket *client* and sends ``connected``,
``start``, ``media``, ``dtmf``, ``mark`` and ``stop``; the upstream bot (Pipecat, Vocode, ...)
is the server and sends ``media``, ``mark`` and ``clear``.  Every message is one JSON text
frame.  Audio here is always G.711 μ-law, 8 kHz, mono, as raw bytes (one byte per sample);
conversion to and from the bridge's PCM16 lives elsewhere.  See ``docs/media-streams.md``.
"""

from __future__ import annotations

import binascii
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DTMF_DIGITS",
    "BotClear",
    "BotMark",
    "BotMedia",
    "BotOther",
    "StreamEncoder",
    "StreamProtocolError",
    "load_message",
    "media_payload",
    "parse_bot_message",
]

DTMF_DIGITS = frozenset("0123456789*#ABCD")
MEDIA_FORMAT = {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}

_dumps = json.JSONEncoder(separators=(",", ":")).encode


class StreamEncoder:
    """The daemon -> bot messages of one call, as JSON text.

    Send them in Twilio's order: ``connected()``, ``start()``, then any ``media()``,
    ``dtmf()`` and ``mark()``, and ``stop()`` last.  Bots read the first frame as
    ``connected`` and the second as ``start``, so nothing may come between those two.

    As Twilio does, ``connected`` carries no ``sequenceNumber``; every later message carries
    the next one, a decimal string starting at ``"1"`` (so ``start`` is ``"1"``).  Each
    ``media`` message also carries the next ``chunk``, again from ``"1"``.
    """

    def __init__(
        self, stream_sid: str, call_sid: str, account_sid: str = "rapida-asterisk"
    ) -> None:
        self.stream_sid = stream_sid
        self.call_sid = call_sid
        self.account_sid = account_sid
        self._sequence = 0
        self._chunk = 0
        # The only dynamic text spliced into the media template; everything else in it is
        # digits or base64, which never needs escaping.
        self._media_tail = '"},"streamSid":' + _dumps(stream_sid) + "}"

    @property
    def sequence_number(self) -> int:
        """The ``sequenceNumber`` of the last message sent (0 before ``start``)."""
        return self._sequence

    @property
    def chunk(self) -> int:
        """The ``media.chunk`` of the last media message sent (0 before the first)."""
        return self._chunk

    def _next(self) -> str:
        self._sequence += 1
        return str(self._sequence)

    def connected(self) -> str:
        """The first message: names the protocol and its version."""
        return _dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})

    def start(
        self, *, custom_parameters: Mapping[str, str], tracks: Iterable[str] = ("inbound",)
    ) -> str:
        """The stream's metadata, sent once right after ``connected``.

        ``custom_parameters`` are Twilio's ``<Parameter>`` pairs: strings only, since bots
        read them as strings.  Raises ``TypeError`` for any other key or value.
        """
        for key, value in custom_parameters.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise TypeError(f"custom parameter {key!r} must map a str to a str")
        return _dumps(
            {
                "event": "start",
                "sequenceNumber": self._next(),
                "start": {
                    "accountSid": self.account_sid,
                    "streamSid": self.stream_sid,
                    "callSid": self.call_sid,
                    "tracks": list(tracks),
                    "customParameters": dict(custom_parameters),
                    "mediaFormat": dict(MEDIA_FORMAT),
                },
                "streamSid": self.stream_sid,
            }
        )

    def media(self, ulaw: bytes, timestamp_ms: int) -> str:
        """One chunk of caller audio (μ-law bytes) on the ``inbound`` track.

        ``timestamp_ms`` is the chunk's position in the stream, in milliseconds from its
        start (audio time: 20 ms per 160-byte chunk, not wall-clock time).  Runs 50 times a
        second per call, so it fills a template instead of encoding a dict; the output is
        the same JSON.
        """
        self._sequence += 1
        self._chunk += 1
        return (
            f'{{"event":"media","sequenceNumber":"{self._sequence}",'
            f'"media":{{"track":"inbound","chunk":"{self._chunk}",'
            f'"timestamp":"{int(timestamp_ms)}","payload":"'
            + binascii.b2a_base64(ulaw, newline=False).decode("ascii")
            + self._media_tail
        )

    def dtmf(self, digit: str) -> str:
        """The caller pressed ``digit`` (one of ``0-9*#A-D``); ``ValueError`` otherwise."""
        if digit not in DTMF_DIGITS:
            raise ValueError(f"not a DTMF digit: {digit!r}")
        return _dumps(
            {
                "event": "dtmf",
                "sequenceNumber": self._next(),
                "streamSid": self.stream_sid,
                "dtmf": {"track": "inbound_track", "digit": digit},
            }
        )

    def mark(self, name: str) -> str:
        """Echo of the bot's mark ``name``: the audio it sent before that mark is done.

        Send one echo for every mark the bot sent, in order: once its audio has played, or
        at once when a ``clear`` drops that audio.
        """
        return _dumps(
            {
                "event": "mark",
                "sequenceNumber": self._next(),
                "streamSid": self.stream_sid,
                "mark": {"name": name},
            }
        )

    def stop(self) -> str:
        """The last message: the stream (the call) has ended."""
        return _dumps(
            {
                "event": "stop",
                "sequenceNumber": self._next(),
                "stop": {"accountSid": self.account_sid, "callSid": self.call_sid},
                "streamSid": self.stream_sid,
            }
        )


class StreamProtocolError(Exception):
    """A bot message that cannot be understood; the message, not the call, is at fault."""


@dataclass(frozen=True)
class BotMedia:
    """Audio to play: μ-law bytes, 8 kHz mono, any length (not framed to 20 ms)."""

    payload: bytes
    stream_sid: str | None = field(default=None, compare=False)


@dataclass(frozen=True)
class BotMark:
    """Tell the bot when everything it sent before this mark has been played."""

    name: str
    stream_sid: str | None = field(default=None, compare=False)


@dataclass(frozen=True)
class BotClear:
    """Barge-in: drop all audio the bot sent that has not been played yet."""

    stream_sid: str | None = field(default=None, compare=False)


@dataclass(frozen=True)
class BotOther:
    """A well-formed message with an event this protocol does not define; ignore it."""

    event: str


BotMessage = BotMedia | BotMark | BotClear | BotOther


def load_message(text: str | bytes, max_bytes: int = 1_048_576) -> tuple[dict[str, Any], str]:
    """One bot message as a JSON object and its ``event``: what every dialect shares.

    Raises ``StreamProtocolError`` for: more than ``max_bytes`` of UTF-8, bytes that are not
    UTF-8, text that is not JSON, a JSON value that is not an object, a missing or non-string
    ``event``.
    """
    size = len(text)
    if isinstance(text, str) and size * 4 > max_bytes:  # a char is 1 to 4 UTF-8 bytes
        size = len(text.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise StreamProtocolError(f"message of {size} bytes exceeds {max_bytes}")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise StreamProtocolError("message is not UTF-8") from None
    try:
        message = json.loads(text)
    except (ValueError, RecursionError):
        raise StreamProtocolError("message is not JSON") from None
    if not isinstance(message, dict):
        raise StreamProtocolError("message is not a JSON object")
    event = message.get("event")
    if not isinstance(event, str):
        raise StreamProtocolError("message has no string 'event'")
    return message, event


def parse_bot_message(text: str | bytes, max_bytes: int = 1_048_576) -> BotMessage:
    """Decode one bot -> daemon WebSocket message.

    ``max_bytes`` bounds the message's UTF-8 size.  ``streamSid`` is not checked (bots set
    it from ``start``, some omit it); a string ``streamSid`` is kept as ``stream_sid`` for the
    caller to log, and takes no part in equality.  Raises ``StreamProtocolError`` for what
    ``load_message`` refuses, ``media`` without an object ``media`` holding a base64 string
    ``payload`` (padding may be left off), and ``mark`` without an object ``mark`` holding a
    non-empty string ``name``.
    """
    message, event = load_message(text, max_bytes)
    stream_sid = message.get("streamSid")
    if not isinstance(stream_sid, str):
        stream_sid = None

    if event == "media":
        return BotMedia(media_payload(message.get("media")), stream_sid)
    if event == "mark":
        return BotMark(mark_name(message.get("mark"), "mark.name"), stream_sid)
    if event == "clear":
        return BotClear(stream_sid)
    return BotOther(event)


def mark_name(value: object, where: str) -> str:
    """``value['name']`` when ``value`` is an object and that is a non-empty string."""
    name = value.get("name") if isinstance(value, dict) else None
    if not isinstance(name, str) or not name:
        raise StreamProtocolError(f"mark has no non-empty string '{where}'")
    return name


def media_payload(media: object) -> bytes:
    """The audio of a ``media`` object: its base64 ``payload``, padding optional."""
    payload = media.get("payload") if isinstance(media, dict) else None
    if not isinstance(payload, str):
        raise StreamProtocolError("media has no string 'media.payload'")
    try:
        return binascii.a2b_base64(payload + "=" * (-len(payload) % 4), strict_mode=True)
    except (binascii.Error, ValueError):
        raise StreamProtocolError("media.payload is not base64") from None
