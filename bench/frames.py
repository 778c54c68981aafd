"""The load generator's audio, sans-IO: numbered tone frames, and telling them apart on return.

Every frame a bench call sends is 20 ms of PCM16 (320 bytes at 8 kHz) whose first 4 bytes are
its sequence number (little-endian, top bit set so a numbered frame is never all zeros) and
whose other 316 bytes are a 440 Hz tone.  The echo comes back byte for byte, so each returned
frame names exactly which sent frame it is: loss, duplication and latency are exact, and a
frame that is neither numbered nor silence is counted as corrupt.
"""

from __future__ import annotations

import math
import struct

from rapida_tap.audiosocket.wire import Kind, encode_frame

FRAME_SECONDS = 0.020
PAYLOAD_BYTES = 320  # 20 ms of 8 kHz PCM16 mono
_SEQ = struct.Struct("<I")
_MARK = 0x80000000
_TONE_FRAMES = 50  # one second of tone; 440 Hz repeats exactly after 1 s
_HEADER = encode_frame(Kind.SLIN_8K, bytes(PAYLOAD_BYTES))[:3]

SILENCE = bytes(PAYLOAD_BYTES)
"""What the daemon sends when it has nothing queued."""


def _tone_bodies() -> tuple[bytes, ...]:
    n = PAYLOAD_BYTES // 2
    bodies = []
    for f in range(_TONE_FRAMES):
        samples = [int(8000 * math.sin(2 * math.pi * 440 * (f * n + i) / 8000)) for i in range(n)]
        bodies.append(struct.pack(f"<{n}h", *samples)[_SEQ.size :])
    return tuple(bodies)


_BODIES = _tone_bodies()

#: Returned by `identify` for a silence frame.
IS_SILENCE = 0
#: Returned by `identify` for a frame that is neither silence nor a frame we sent.
IS_CORRUPT = -1


def payload(seq: int) -> bytes:
    """The 320-byte payload of frame ``seq`` (1 .. 2**31-1)."""
    if not 0 < seq < _MARK:
        raise ValueError(f"sequence number must be 1..{_MARK - 1}, not {seq}")
    return _SEQ.pack(seq | _MARK) + _BODIES[seq % _TONE_FRAMES]


def audio_frame(seq: int) -> bytes:
    """Frame ``seq`` as AudioSocket bytes (SLIN_8K header + `payload`)."""
    return _HEADER + payload(seq)


def identify(data: bytes) -> int:
    """The sequence number of a returned payload, `IS_SILENCE` or `IS_CORRUPT`."""
    if len(data) != PAYLOAD_BYTES:
        return IS_CORRUPT
    if data == SILENCE:
        return IS_SILENCE
    (word,) = _SEQ.unpack_from(data)
    seq = word & ~_MARK
    if word & _MARK and seq and data[_SEQ.size :] == _BODIES[seq % _TONE_FRAMES]:
        return seq
    return IS_CORRUPT
