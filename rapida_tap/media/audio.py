"""The bridge's one internal audio format: PCM16 little-endian, 8 kHz, mono, 20 ms frames."""

SAMPLE_RATE = 8000
FRAME_SECONDS = 0.020
SAMPLE_WIDTH = 2
FRAME_SAMPLES = int(SAMPLE_RATE * FRAME_SECONDS)  # 160
FRAME_BYTES = FRAME_SAMPLES * SAMPLE_WIDTH  # 320
SILENCE = bytes(FRAME_BYTES)
