"""Audio conversions between wire formats and the bridge format (PCM16 mono, the call's rate)."""

from __future__ import annotations

import warnings

with warnings.catch_warnings():
    # The standard library's audioop (to 3.12) warns of its removal; audioop-lts replaces it
    # from 3.13 under the same name (setup.cfg installs it by environment marker).
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

from typing import Any

from rapida_tap.media.audio import SAMPLE_RATE


class Resampler:
    """A streaming resampler for one direction of one call (keeps filter state across frames).

    After priming, each 20 ms in gives 20 ms out (the filter adds about 15 ms of delay), so
    paced frames stay paced.  Takes and returns PCM16 little-endian mono bytes.
    """

    def __init__(self, in_rate: int, out_rate: int) -> None:
        # numpy and soxr (about 12 MB) load with the first call that needs a resampler: an 8 kHz
        # node never pays for them.
        import numpy as np
        import soxr

        self._np: Any = np
        self.in_rate = in_rate
        self.out_rate = out_rate
        # vr=True: soxr's variable-rate engine streams with ~15 ms delay and steady
        # chunk sizes; the fixed-rate engine buffers ~100 ms and emits it in bursts.
        self._stream = soxr.ResampleStream(
            in_rate, out_rate, 1, dtype="int16", quality="HQ", vr=True
        )
        # Prime with 40 ms of silence so that every later frame yields a whole frame.
        self._stream.resample_chunk(np.zeros(2 * in_rate // 50, dtype="<i2"))

    def __call__(self, pcm: bytes) -> bytes:
        samples = self._np.frombuffer(pcm, dtype="<i2")
        return self._stream.resample_chunk(samples).astype("<i2", copy=False).tobytes()


def to_bridge(rate: int) -> Resampler:
    return Resampler(rate, SAMPLE_RATE)


def from_bridge(rate: int) -> Resampler:
    return Resampler(SAMPLE_RATE, rate)


def ulaw_to_pcm(ulaw: bytes) -> bytes:
    return audioop.ulaw2lin(ulaw, 2)


def pcm_to_ulaw(pcm: bytes) -> bytes:
    return audioop.lin2ulaw(pcm, 2)


def alaw_to_pcm(alaw: bytes) -> bytes:
    return audioop.alaw2lin(alaw, 2)


def pcm_to_alaw(pcm: bytes) -> bytes:
    return audioop.lin2alaw(pcm, 2)


def swap_bytes(pcm: bytes) -> bytes:
    """PCM16 between little- and big-endian (L16 as RTP carries it is big-endian)."""
    return audioop.byteswap(pcm, 2)


class RateMatch:
    """One leg's conversion between its wire rate and its call's rate.

    Both directions are ``None`` when the rates agree (nothing to do); otherwise each is one
    streaming soxr resampler, 20 ms in giving 20 ms out.
    """

    __slots__ = ("call_rate", "to_call", "to_wire", "wire_rate")

    def __init__(self, wire_rate: int, call_rate: int) -> None:
        self.wire_rate = wire_rate
        self.call_rate = call_rate
        same = wire_rate == call_rate
        self.to_call: Resampler | None = None if same else Resampler(wire_rate, call_rate)
        self.to_wire: Resampler | None = None if same else Resampler(call_rate, wire_rate)
