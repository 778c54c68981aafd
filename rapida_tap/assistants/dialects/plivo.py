"""Plivo audio streaming: camelCase (``streamId``, ``sequenceNumber`` as numbers), no
``connected`` and no ``stop`` (the stream ends with the WebSocket).

Messages as Plivo documents them (Stream Event Protocol): the provider sends ``start``
(``start.callId``, ``streamId``, ``accountId``, ``tracks``, ``mediaFormat`` {``encoding``,
``sampleRate``}, and ``extra_headers``), ``media`` (``media.track``, ``timestamp`` in Unix
ms, ``chunk``, ``payload``), ``dtmf`` (``dtmf.digit``), ``playedStream`` (a checkpoint's
audio was played: ``name``) and ``clearedAudio``.  The bot sends ``playAudio``
(``media.contentType``, ``sampleRate``, ``payload``), ``checkpoint`` (``name``) and
``clearAudio``.  A checkpoint whose audio a clear dropped is never reported.  Pipecat's
``PlivoFrameSerializer`` speaks μ-law 8 kHz; ``parse_telephony_websocket`` knows the dialect
by ``start.streamId`` and ``start.callId``.
"""

from __future__ import annotations

from typing import Any

from rapida_tap.assistants.dialects.base import L16, MULAW, AudioFormat, Dialect, b64, dumps
from rapida_tap.assistants.mediastreams import (
    BotClear,
    BotMark,
    BotMedia,
    BotMessage,
    BotOther,
    StreamProtocolError,
    mark_name,
    media_payload,
)

CONTENT_TYPES = {MULAW: "audio/x-mulaw", L16: "audio/x-l16"}


class Plivo(Dialect):
    name = "plivo"
    formats = (
        AudioFormat(MULAW, 8000),
        AudioFormat(L16, 16000),
        AudioFormat(L16, 8000),
    )
    echo_cleared_marks = False

    @property
    def stream_id(self) -> str:
        return self.call.context_id

    @property
    def extra_headers(self) -> str:
        """The call's parameters as Plivo's ``extraHeaders`` string (``k=v;k=v``)."""
        return ";".join(f"{k}={v}" for k, v in self.call.parameters.items())

    def opening(self) -> list[str]:
        start = {
            "event": "start",
            "sequenceNumber": self.next_number(),
            "start": {
                "callId": self.call.context_id,
                "streamId": self.stream_id,
                "accountId": self.call.account,
                "tracks": ["inbound"],
                "mediaFormat": {
                    "encoding": CONTENT_TYPES[self.audio.encoding],
                    "sampleRate": self.audio.rate,
                },
            },
            "extra_headers": self.extra_headers,
        }
        return [dumps(start)]

    def media(self, pcm: bytes) -> str:
        self.chunk += 1
        self.audio_ms(pcm)
        return dumps(
            {
                "event": "media",
                "sequenceNumber": self.next_number(),
                "streamId": self.stream_id,
                "media": {
                    "track": "inbound",
                    "timestamp": str(int(self.now() * 1000)),
                    "chunk": self.chunk,
                    "payload": b64(self.audio.encode(pcm)),
                },
                "extra_headers": self.extra_headers,
            }
        )

    def dtmf(self, digit: str) -> str:
        return dumps(
            {
                "event": "dtmf",
                "sequenceNumber": self.next_number(),
                "streamId": self.stream_id,
                "dtmf": {
                    "track": "inbound",
                    "digit": digit,
                    "timestamp": str(int(self.now() * 1000)),
                },
                "extra_headers": self.extra_headers,
            }
        )

    def mark_played(self, name: str) -> str:
        return dumps(
            {
                "event": "playedStream",
                "sequenceNumber": self.next_number(),
                "streamId": self.stream_id,
                "name": name,
            }
        )

    def cleared(self) -> str:
        return dumps(
            {
                "event": "clearedAudio",
                "sequenceNumber": self.next_number(),
                "streamId": self.stream_id,
            }
        )

    def stop(self) -> None:
        return None

    def bot_message(self, message: dict[str, Any], event: str) -> BotMessage:
        if event == "playAudio":
            media = message.get("media")
            payload = media_payload(media)
            self._check_format(media)
            return BotMedia(payload)
        if event == "checkpoint":
            return BotMark(mark_name(message, "name"))
        if event == "clearAudio":
            return BotClear()
        return BotOther(event)

    def _check_format(self, media: Any) -> None:
        """A ``playAudio`` that names another format than the stream's would play as noise."""
        content_type = media.get("contentType")
        rate = media.get("sampleRate")
        expected = CONTENT_TYPES[self.audio.encoding]
        if content_type is not None and content_type != expected:
            raise StreamProtocolError(
                f"playAudio of {str(content_type)[:40]!r}, but the stream is {expected}"
            )
        if rate is not None and rate != self.audio.rate:
            raise StreamProtocolError(
                f"playAudio at sampleRate {str(rate)[:12]}, but the stream is {self.audio.rate}"
            )
