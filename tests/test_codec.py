"""Audio conversions: streaming resampling keeps pace and quality; μ-law round trip."""

import numpy as np
import pytest

from rapida_tap.media.codec import Resampler, from_bridge, pcm_to_ulaw, to_bridge, ulaw_to_pcm


def sine(hz: float, rate: int, seconds: float, amplitude: float = 8000) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amplitude * np.sin(2 * np.pi * hz * t)).astype("<i2")


def stream(resampler: Resampler, signal: np.ndarray, frame: int) -> np.ndarray:
    out = [resampler(signal[i : i + frame].tobytes()) for i in range(0, len(signal), frame)]
    return np.frombuffer(b"".join(out), dtype="<i2")


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x.astype(float) ** 2)))


@pytest.mark.parametrize("rate", [12000, 16000, 24000, 32000, 44100, 48000, 96000, 192000])
def test_every_frame_in_gives_a_frame_out(rate: int) -> None:
    down, up = to_bridge(rate), from_bridge(rate)
    n = rate // 50
    for _ in range(20):
        assert len(down(bytes(2 * n))) == 320
        assert len(up(bytes(320))) == 2 * n


def test_downsampling_keeps_speech_band_and_removes_what_would_alias() -> None:
    kept = stream(to_bridge(16000), sine(1000, 16000, 1.0), 320)[400:]
    assert rms(kept) == pytest.approx(8000 / np.sqrt(2), rel=0.05)
    spectrum = np.abs(np.fft.rfft(kept))
    assert abs(np.argmax(spectrum) * 8000 / len(kept) - 1000) < 10
    aliased = stream(to_bridge(16000), sine(6000, 16000, 1.0), 320)[400:]
    assert rms(aliased) < rms(kept) / 100  # at least 40 dB down


def test_upsampling_round_trip() -> None:
    original = sine(440, 8000, 1.0)
    up = stream(from_bridge(16000), original, 160)
    back = stream(to_bridge(16000), up, 320)
    assert rms(back[800:]) == pytest.approx(rms(original[800:]), rel=0.05)


def test_ulaw_round_trip_is_close() -> None:
    pcm = sine(440, 8000, 0.1).tobytes()
    ulaw = pcm_to_ulaw(pcm)
    assert len(ulaw) == len(pcm) // 2
    back = np.frombuffer(ulaw_to_pcm(ulaw), dtype="<i2").astype(float)
    orig = np.frombuffer(pcm, dtype="<i2").astype(float)
    assert np.max(np.abs(back - orig)) < 300
