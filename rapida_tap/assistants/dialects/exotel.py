"""Exotel voicebot streams: snake_case (``stream_sid``, ``sequence_number`` as numbers), raw
PCM16 little-endian at 8, 16 or 24 kHz (Exotel's ``?sample-rate=``).

Messages as Exotel documents them (Working with the Stream and Voicebot Applet): the provider
sends ``connected``, ``start`` (``start.stream_sid``, ``call_sid``, ``account_sid``, ``from``,
``to``, ``custom_parameters``, ``media_format`` {``encoding``: ``base64``, ``sample_rate``,
``bit_rate``}), ``media`` (``media.chunk``, ``timestamp``, ``payload``), ``dtmf``
(``dtmf.digit``, ``duration``), ``mark`` and ``stop`` (``stop.reason``).  The bot sends
``media``, ``mark`` and ``clear``.  Pipecat's ``ExotelFrameSerializer`` speaks it at its
``exotel_sample_rate`` and ``parse_telephony_websocket`` knows it by ``start.stream_sid``,
``call_sid`` and ``account_sid``.
"""

from __future__ import annotations

from rapida_tap.assistants.dialects.base import L16, AudioFormat, Dialect, b64, dumps


class Exotel(Dialect):
    name = "exotel"
    formats = (AudioFormat(L16, 8000), AudioFormat(L16, 16000), AudioFormat(L16, 24000))

    @property
    def stream_sid(self) -> str:
        return self.call.context_id.replace("-", "")

    def opening(self) -> list[str]:
        call = self.call
        start = {
            "event": "start",
            "sequence_number": self.next_number(),
            "stream_sid": self.stream_sid,
            "start": {
                "stream_sid": self.stream_sid,
                "call_sid": call.context_id,
                "account_sid": call.account,
                "from": call.caller,
                "to": call.to,
                "custom_parameters": dict(call.parameters),
                "media_format": {
                    "encoding": "base64",
                    "sample_rate": str(self.audio.rate),
                    "bit_rate": f"{self.audio.rate * 16 // 1000}kbps",
                },
            },
        }
        return [dumps({"event": "connected"}), dumps(start)]

    def media(self, pcm: bytes) -> str:
        self.chunk += 1
        return dumps(
            {
                "event": "media",
                "sequence_number": self.next_number(),
                "stream_sid": self.stream_sid,
                "media": {
                    "chunk": self.chunk,
                    "timestamp": str(self.audio_ms(pcm)),
                    "payload": b64(self.audio.encode(pcm)),
                },
            }
        )

    def dtmf(self, digit: str) -> str:
        return dumps(
            {
                "event": "dtmf",
                "sequence_number": self.next_number(),
                "stream_sid": self.stream_sid,
                "dtmf": {"duration": "0", "digit": digit},
            }
        )

    def mark_played(self, name: str) -> str:
        return dumps(
            {
                "event": "mark",
                "sequence_number": self.next_number(),
                "stream_sid": self.stream_sid,
                "mark": {"name": name},
            }
        )

    def stop(self) -> str:
        return dumps(
            {
                "event": "stop",
                "sequence_number": self.next_number(),
                "stream_sid": self.stream_sid,
                "stop": {
                    "call_sid": self.call.context_id,
                    "account_sid": self.call.account,
                    "reason": "callended",
                },
            }
        )
