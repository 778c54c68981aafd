"""Audio toward chan_websocket, sans-IO: whole-frame messages and unmasked binary frames.

Asterisk drops a partial frame at the end of a message, so audio goes out in whole multiples
of its ``optimal_frame_size`` (160 bytes of μ-law at 8 kHz, 640 of slin16); a partial tail
waits for the next audio, or is padded with silence when a mark must follow it.
"""

from __future__ import annotations

ULAW_SILENCE = 0xFF


def binary_frame(payload: bytes) -> bytes:
    """One unfragmented, unmasked binary WebSocket frame (what a server sends)."""
    size = len(payload)
    if size < 126:
        header = bytes((0x82, size))
    elif size < 65536:
        header = b"\x82\x7e" + size.to_bytes(2, "big")
    else:
        header = b"\x82\x7f" + size.to_bytes(8, "big")
    return header + payload


class MediaFramer:
    """Cuts wire-format audio into messages of whole frames of ``frame_size`` bytes;
    ``silence`` is the byte of a silent sample (μ-law ``0xFF``, A-law ``0xD5``, slin ``0``)."""

    def __init__(self, frame_size: int = 160, silence: int = ULAW_SILENCE) -> None:
        self.frame_size = frame_size
        self.silence = silence
        self._tail = b""

    def push(self, ulaw: bytes) -> bytes:
        """The whole frames ready to send (maybe none: ``b""``); the rest waits."""
        if not self._tail and len(ulaw) == self.frame_size:
            return ulaw
        data = self._tail + ulaw
        whole = len(data) - len(data) % self.frame_size
        self._tail = data[whole:]
        return data[:whole]

    def pad(self) -> bytes:
        """The waiting tail as a whole frame padded with silence (``b""`` if none waits)."""
        tail, self._tail = self._tail, b""
        if not tail:
            return b""
        return tail + bytes([self.silence]) * (self.frame_size - len(tail))

    def clear(self) -> None:
        self._tail = b""
