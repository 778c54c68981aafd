"""The bridge's audio format: PCM16 little-endian, mono, 20 ms frames, at each call's own rate.

A call runs at one rate from start to end (its assistant's, or its caller's when the assistant
has no preference: see ``docs/wideband.md``); 8 kHz is the rate of a call that has not
settled it yet, and the rate every telephone network speaks.
"""

SAMPLE_RATE = 8000
FRAME_SECONDS = 0.020
SAMPLE_WIDTH = 2
FRAME_SAMPLES = int(SAMPLE_RATE * FRAME_SECONDS)  # 160
FRAME_BYTES = FRAME_SAMPLES * SAMPLE_WIDTH  # 320
SILENCE = bytes(FRAME_BYTES)


def frame_bytes(rate: int) -> int:
    """Bytes in one 20 ms frame of PCM16 mono at ``rate`` Hz (every rate Asterisk offers
    is a multiple of 50 Hz, so a frame is always a whole number of samples)."""
    return rate // 50 * SAMPLE_WIDTH
