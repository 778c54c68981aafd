"""Telnyx media streaming: snake_case (``stream_id``, ``sequence_number``), ``media_format``.

Messages as Telnyx documents them (Media Streaming over WebSockets, its AsyncAPI): the
provider sends ``connected`` (``version``), ``start`` (``start.call_control_id``, ``from``,
``to``, ``media_format`` {``encoding``, ``sample_rate``, ``channels``}), ``media``
(``media.track``, ``chunk``, ``timestamp``, ``payload``), ``dtmf`` (``dtmf.digit``),
``mark`` and ``stop``; numbers are decimal strings.  The bot sends ``media``
(``media.payload``), ``mark`` (``mark.name``) and ``clear``.  Pipecat's
``TelnyxFrameSerializer`` speaks PCMU or PCMA at 8 kHz and ``parse_telephony_websocket``
knows the dialect by ``stream_id`` beside ``start.call_control_id``.  Payloads are RTP
payloads, so L16 is big-endian.
"""

from __future__ import annotations

import time

from rapida_tap.assistants.dialects.base import ALAW, L16, MULAW, AudioFormat, Dialect, b64, dumps

ENCODING_NAMES = {MULAW: "PCMU", ALAW: "PCMA", L16: "L16"}


class Telnyx(Dialect):
    name = "telnyx"
    formats = (
        AudioFormat(MULAW, 8000),
        AudioFormat(ALAW, 8000),
        AudioFormat(L16, 16000, big_endian=True),
        AudioFormat(L16, 8000, big_endian=True),
    )

    @property
    def stream_id(self) -> str:
        return self.call.context_id

    def opening(self) -> list[str]:
        call = self.call
        start = {
            "event": "start",
            "sequence_number": str(self.next_number()),
            "start": {
                "user_id": call.account,
                "call_control_id": call.context_id,
                "client_state": "",
                "from": call.caller,
                "to": call.to,
                "custom_parameters": dict(call.parameters),
                "media_format": {
                    "encoding": ENCODING_NAMES[self.audio.encoding],
                    "sample_rate": self.audio.rate,
                    "channels": 1,
                },
            },
            "stream_id": self.stream_id,
        }
        return [dumps({"event": "connected", "version": "1.0.0"}), dumps(start)]

    def media(self, pcm: bytes) -> str:
        self.chunk += 1
        return dumps(
            {
                "event": "media",
                "sequence_number": str(self.next_number()),
                "media": {
                    "track": "inbound",
                    "chunk": str(self.chunk),
                    "timestamp": str(self.audio_ms(pcm)),
                    "payload": b64(self.audio.encode(pcm)),
                },
                "stream_id": self.stream_id,
            }
        )

    def dtmf(self, digit: str) -> str:
        occurred = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.now()))
        return dumps(
            {
                "event": "dtmf",
                "stream_id": self.stream_id,
                "occurred_at": f"{occurred}Z",
                "sequence_number": str(self.next_number()),
                "dtmf": {"digit": digit},
            }
        )

    def mark_played(self, name: str) -> str:
        return dumps(
            {
                "event": "mark",
                "sequence_number": str(self.next_number()),
                "stream_id": self.stream_id,
                "mark": {"name": name},
            }
        )

    def stop(self) -> str:
        return dumps(
            {
                "event": "stop",
                "sequence_number": str(self.next_number()),
                "stop": {"user_id": self.call.account, "call_control_id": self.call.context_id},
                "stream_id": self.stream_id,
            }
        )
