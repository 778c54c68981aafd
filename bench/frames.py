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
import warnings

with warnings.catch_warnings():  # the daemon's codec; audioop-lts from 3.13
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

from rapida_tap.audiosocket.wire import Kind, encode_frame

FRAME_SECONDS = 0.020
PAYLOAD_BYTES = 320  # 20 ms of 8 kHz PCM16 mono
_SEQ = struct.Struct("<I")
_MARK = 0x80000000
TONE_FRAMES = 50  # one second of tone; 440 Hz repeats exactly after 1 s
_HEADER = encode_frame(Kind.SLIN_8K, bytes(PAYLOAD_BYTES))[:3]

SILENCE = bytes(PAYLOAD_BYTES)
"""What the daemon sends when it has nothing queued."""


def _tone_bodies() -> tuple[bytes, ...]:
    n = PAYLOAD_BYTES // 2
    bodies = []
    for f in range(TONE_FRAMES):
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
    return _SEQ.pack(seq | _MARK) + _BODIES[seq % TONE_FRAMES]


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
    if word & _MARK and seq and data[_SEQ.size :] == _BODIES[seq % TONE_FRAMES]:
        return seq
    return IS_CORRUPT


# -- μ-law frames (chan_websocket) -------------------------------------------------------------
#
# The daemon decodes caller μ-law with audioop.ulaw2lin and encodes its output with
# audioop.lin2ulaw, so a byte comes back unchanged iff lin2ulaw(ulaw2lin(b)) == b: every value
# but 0x7F ("negative zero", which comes back as 0xFF).  The sequence number goes into bytes
# with the top bit set (0x80..0xFF, all of which round-trip), seven bits each; the tone body is
# made of round-tripping bytes only, so an echoed μ-law frame is still exactly identifiable.

ULAW_BYTES = 160  # 20 ms of 8 kHz μ-law
ULAW_SILENCE = b"\xff" * ULAW_BYTES
ULAW_SEQ_BYTES = 5  # 5 x 7 bits >= 31 bits
_ULAW_MINUS_ZERO, _ULAW_ZERO = 0x7F, 0xFF


def _ulaw_bodies() -> tuple[bytes, ...]:
    bodies = []
    for f in range(TONE_FRAMES):
        pcm = struct.pack(
            f"<{ULAW_BYTES}h",
            *(
                int(8000 * math.sin(2 * math.pi * 440 * (f * ULAW_BYTES + i) / 8000))
                for i in range(ULAW_BYTES)
            ),
        )
        ulaw = audioop.lin2ulaw(pcm, 2)[ULAW_SEQ_BYTES:]
        bodies.append(ulaw.replace(bytes([_ULAW_MINUS_ZERO]), bytes([_ULAW_ZERO])))
    return tuple(bodies)


ULAW_BODIES = _ulaw_bodies()
"""Frame ``seq``'s body (bytes 5..159) is ``ULAW_BODIES[seq % 50]``."""


def ulaw_seq(seq: int) -> bytes:
    """The 5-byte μ-law header naming frame ``seq`` (1 .. 2**31-1): 7 bits a byte, top bit set."""
    if not 0 < seq < _MARK:
        raise ValueError(f"sequence number must be 1..{_MARK - 1}, not {seq}")
    return bytes(0x80 | ((seq >> (7 * i)) & 0x7F) for i in range(ULAW_SEQ_BYTES))


def ulaw_payload(seq: int) -> bytes:
    """The 160-byte μ-law payload of frame ``seq``."""
    return ulaw_seq(seq) + ULAW_BODIES[seq % TONE_FRAMES]


def identify_ulaw(data: bytes) -> int:
    """The sequence number of a returned μ-law payload, `IS_SILENCE` or `IS_CORRUPT`."""
    if len(data) != ULAW_BYTES:
        return IS_CORRUPT
    if data == ULAW_SILENCE:
        return IS_SILENCE
    seq = 0
    for i in range(ULAW_SEQ_BYTES):
        b = data[i]
        if not b & 0x80:
            return IS_CORRUPT
        seq |= (b & 0x7F) << (7 * i)
    if 0 < seq < _MARK and data[ULAW_SEQ_BYTES:] == ULAW_BODIES[seq % TONE_FRAMES]:
        return seq
    return IS_CORRUPT
