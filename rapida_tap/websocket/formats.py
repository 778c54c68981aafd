"""The media formats chan_websocket may carry, as ``MEDIA_START`` names them (``c(codec)``).

G.711 (``ulaw``, ``alaw``) is 8 kHz, one byte a sample; ``slin`` and ``slinNN`` are signed
16-bit linear PCM at 8 kHz and ``NN`` kHz, in Asterisk's host byte order (little-endian on
every platform Asterisk supports in practice).  Anything else (``opus``, ``g722``...) would
need a codec the daemon does not carry, so the call is refused, naming what to dial with.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from rapida_tap.media.codec import alaw_to_pcm, pcm_to_alaw, pcm_to_ulaw, ulaw_to_pcm

Convert = Callable[[bytes], bytes]


@dataclass(frozen=True)
class MediaFormat:
    """One wire format: its rate, how to reach PCM16 and back (``None``: it is PCM16), and
    the byte a silent sample is (to pad a partial frame)."""

    name: str
    rate: int
    to_pcm: Convert | None
    from_pcm: Convert | None
    silence: int


def _slin(name: str, rate: int) -> MediaFormat:
    return MediaFormat(name, rate, None, None, 0x00)


MEDIA_FORMATS: dict[str, MediaFormat] = {
    f.name: f
    for f in (
        MediaFormat("ulaw", 8000, ulaw_to_pcm, pcm_to_ulaw, 0xFF),
        MediaFormat("alaw", 8000, alaw_to_pcm, pcm_to_alaw, 0xD5),
        _slin("slin", 8000),
        _slin("slin12", 12000),
        _slin("slin16", 16000),
        _slin("slin24", 24000),
        _slin("slin32", 32000),
        _slin("slin44", 44100),
        _slin("slin48", 48000),
        _slin("slin96", 96000),
        _slin("slin192", 192000),
    )
}


def media_format(name: str) -> MediaFormat | None:
    """The format ``MEDIA_START`` names (any case), or ``None`` when the daemon cannot carry it."""
    return MEDIA_FORMATS.get(name.lower())


def default_frame_size(fmt: MediaFormat) -> int:
    """Bytes of 20 ms in ``fmt``: what Asterisk's ``optimal_frame_size`` says for it."""
    per_sample = 1 if fmt.to_pcm is not None else 2
    return fmt.rate // 50 * per_sample


def chain(first: Convert | None, then: Convert | None) -> Convert:
    """``then(first(x))``, leaving out a step that is ``None`` (``bytes`` when both are)."""
    if first is None:
        return then or bytes
    if then is None:
        return first
    return lambda data: then(first(data))
