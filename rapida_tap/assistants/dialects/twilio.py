"""Twilio Media Streams: μ-law 8 kHz only; the codec is ``rapida_tap.assistants.mediastreams``.

Pipecat's ``TwilioFrameSerializer`` speaks it, and ``parse_telephony_websocket`` knows it by
``start.streamSid`` and ``start.callSid``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from rapida_tap.assistants.dialects.base import MULAW, AudioFormat, Dialect, StreamCall
from rapida_tap.assistants.mediastreams import BotMessage, StreamEncoder, parse_bot_message


def stream_sids(context_id: str) -> tuple[str, str]:
    """Twilio-shaped ``(streamSid, callSid)`` derived from the context id, so logs line up."""
    hex_id = uuid.UUID(context_id).hex
    return "MZ" + hex_id, "CA" + hex_id


class Twilio(Dialect):
    name = "twilio"
    formats = (AudioFormat(MULAW, 8000),)

    def __init__(self, call: StreamCall, audio: AudioFormat, now: Callable[[], float]) -> None:
        super().__init__(call, audio, now)
        stream_sid, call_sid = stream_sids(call.context_id)
        self.encoder = StreamEncoder(stream_sid, call_sid, account_sid=call.account)

    def opening(self) -> list[str]:
        return [
            self.encoder.connected(),
            self.encoder.start(custom_parameters=self.call.parameters),
        ]

    def media(self, pcm: bytes) -> str:
        return self.encoder.media(self.audio.encode(pcm), self.audio_ms(pcm))

    def dtmf(self, digit: str) -> str:
        return self.encoder.dtmf(digit)

    def mark_played(self, name: str) -> str:
        return self.encoder.mark(name)

    def stop(self) -> str:
        return self.encoder.stop()

    def parse(self, text: str | bytes, max_bytes: int) -> BotMessage:
        return parse_bot_message(text, max_bytes)

    def bot_message(self, message: dict[str, Any], event: str) -> BotMessage:
        raise NotImplementedError("parse() reads Twilio messages whole")
