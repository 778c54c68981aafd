"""chan_websocket media frames, sans-IO: the caller's masked binary frames in, ours out.

In: once a session is open, nearly every frame Asterisk sends is one whole binary message of
one 20 ms frame.  ``read_media_frame`` takes exactly that shape and nothing else, so the
protocol can hand audio to the call without Autobahn's general per-frame path (most of a
WebSocket call's CPU); any other frame (text, control, fragments, reserved bits, over the size
limit, incomplete) goes to Autobahn, which checks and handles it as before.

Out: Asterisk drops a partial frame at the end of a message, so audio goes out in whole
multiples of its ``optimal_frame_size`` (160 bytes of μ-law at 8 kHz, 640 of slin16); a partial
tail waits for the next audio, or is padded with silence when a mark must follow it.
"""

from __future__ import annotations

ULAW_SILENCE = 0xFF
_FINAL_BINARY = 0x82  # FIN, no RSV bits, opcode 2
_MASKED = 0x80
_HEAD_160 = b"\x82\x7e\x00\xa0"


def read_media_frame(data: bytes, start: int, max_payload: int) -> tuple[bytes, int] | None:
    """The unmasked payload of the whole frame at ``data[start:]`` and the offset after it, if
    that frame is a final, masked binary frame of at most ``max_payload`` bytes in the shortest
    length encoding; None for anything else, which is the general parser's to judge."""
    end = len(data)
    if end - start < 6 or data[start] != _FINAL_BINARY:
        return None
    size = data[start + 1]
    if not size & _MASKED:
        return None
    size &= 0x7F
    key_at = start + 2
    if size == 126:
        if end - start < 8:
            return None
        size = (data[key_at] << 8) | data[key_at + 1]
        if size < 126:
            return None
        key_at += 2
    elif size == 127:
        return None  # 64 KiB or more: never a media frame
    body = key_at + 4
    stop = body + size
    if size > max_payload or stop > end:
        return None
    return unmask(data[body:stop], data[key_at:body]), stop


def unmask(payload: bytes, key: bytes) -> bytes:
    """``payload`` XORed with the 4-byte masking ``key`` repeated (RFC 6455, 5.3)."""
    size = len(payload)
    if not size:
        return b""
    keys = (key * ((size + 3) >> 2))[:size]
    masked = int.from_bytes(payload, "little") ^ int.from_bytes(keys, "little")
    return masked.to_bytes(size, "little")


def binary_frame(payload: bytes) -> bytes:
    """One unfragmented, unmasked binary WebSocket frame (what a server sends)."""
    size = len(payload)
    if size == 160:
        return _HEAD_160 + payload  # μ-law at 8 kHz: nearly every frame
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
