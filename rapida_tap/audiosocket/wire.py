"""AudioSocket frames, sans-IO: bytes in, frames out, and frames to bytes.

Every AudioSocket message is ``kind (1 byte) | length (2 bytes, big-endian) | payload``
(protocols.md section 2). This module never touches a transport, a reactor or a clock: the
protocol feeds it what ``dataReceived`` got and acts on the frames or the `FrameError` it returns.

The decoder checks each header as soon as its 3 bytes arrive, so a hostile or broken peer is
refused before we buffer its payload: at most ``3 + max_audio_payload`` bytes are ever held.
"""

from __future__ import annotations

import enum
import struct
import uuid
from typing import NamedTuple, TypeAlias

#: What the codec accepts as input bytes.
BytesLike: TypeAlias = bytes | bytearray | memoryview


class Kind(enum.IntEnum):
    """The kind byte of an AudioSocket frame."""

    HANGUP = 0x00
    UUID = 0x01
    DTMF = 0x03
    SLIN_8K = 0x10
    SLIN_12K = 0x11
    SLIN_16K = 0x12
    SLIN_24K = 0x13
    SLIN_32K = 0x14
    SLIN_44K = 0x15
    SLIN_48K = 0x16
    SLIN_96K = 0x17
    SLIN_192K = 0x18
    ERROR = 0xFF


#: Sample rate in Hz of each audio kind; all are signed 16-bit little-endian mono.
AUDIO_SAMPLE_RATES: dict[int, int] = {
    Kind.SLIN_8K: 8000,
    Kind.SLIN_12K: 12000,
    Kind.SLIN_16K: 16000,
    Kind.SLIN_24K: 24000,
    Kind.SLIN_32K: 32000,
    Kind.SLIN_44K: 44100,
    Kind.SLIN_48K: 48000,
    Kind.SLIN_96K: 96000,
    Kind.SLIN_192K: 192000,
}

#: Meaning of the one-byte code of an ERROR (0xFF) frame (Asterisk -> server only).
#: Other codes are decoded as they come; look them up with ``ERROR_CODES.get(code)``.
ERROR_CODES: dict[int, str] = {
    0x00: "none",
    0x01: "hangup",
    0x02: "frame forwarding",
    0x04: "memory",
}

#: Largest payload the 16-bit length field can carry.
MAX_PAYLOAD = 0xFFFF

_HEADER = struct.Struct(">BH")
HEADER_SIZE = _HEADER.size  # 3

#: The frame that ends a call cleanly: Asterisk's ``AudioSocket()`` returns to the dialplan.
HANGUP_FRAME: bytes = b"\x00\x00\x00"

_DTMF_DIGITS = frozenset(bytes([c]) for c in b"0123456789*#ABCD")

# Per kind byte: None for an unknown kind, _AUDIO for audio (any even length up to the
# decoder's limit), otherwise the one payload length the kind allows.
_AUDIO = -1
_FIXED_LENGTH: dict[int, int] = {Kind.HANGUP: 0, Kind.UUID: 16, Kind.DTMF: 1, Kind.ERROR: 1}
_RULES: tuple[int | None, ...] = tuple(
    _AUDIO if k in AUDIO_SAMPLE_RATES else _FIXED_LENGTH.get(k) for k in range(256)
)
# Kind members by byte, so decoded frames carry a readable Kind without an enum lookup.
_KINDS: tuple[int, ...] = tuple(Kind(k) if k in Kind._value2member_map_ else k for k in range(256))


def _describe(kind: int) -> str:
    """``'SLIN_8K (0x10)'`` for a known kind, ``'0x02'`` otherwise."""
    if kind in Kind._value2member_map_:
        return f"{Kind(kind).name} (0x{kind:02X})"
    return f"0x{kind:02X}"


class Frame(NamedTuple):
    """One decoded message. ``kind`` is a `Kind` member (an int); ``payload`` holds
    ``length`` bytes: raw UUID, one ASCII DTMF digit, PCM16 LE audio, or one error code."""

    kind: int
    payload: bytes


class FrameError(Exception):
    """The byte stream is not valid AudioSocket; the connection cannot be trusted any more.

    ``str(e)`` is a one-line reason naming the kind and the problem. ``frames`` holds the valid
    frames decoded by the same `AudioSocketDecoder.feed` call before the bad one (maybe empty).
    """

    def __init__(self, message: str, kind: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.frames: list[Frame] = []


class UnknownKind(FrameError):
    """The kind byte is not one AudioSocket defines."""

    def __init__(self, kind: int, length: int) -> None:
        super().__init__(f"unknown AudioSocket kind 0x{kind:02X} (length {length})", kind)
        self.length = length


class FrameTooLarge(FrameError):
    """An audio frame's length is over the decoder's limit (bytes)."""

    def __init__(self, kind: int, length: int, limit: int) -> None:
        super().__init__(
            f"AudioSocket {_describe(kind)} frame of {length} bytes is over the {limit}-byte limit",
            kind,
        )
        self.length = length
        self.limit = limit


class MalformedFrame(FrameError):
    """A frame of a known kind whose length or content that kind does not allow."""

    def __init__(self, kind: int, problem: str) -> None:
        super().__init__(f"malformed AudioSocket {_describe(kind)} frame: {problem}", kind)


def _header_error(kind: int, length: int, limit: int) -> FrameError:
    """The precise error for a header that failed the fast check in `AudioSocketDecoder.feed`."""
    rule = _RULES[kind]
    if rule is None:
        return UnknownKind(kind, length)
    if rule == _AUDIO:
        if length > limit:
            return FrameTooLarge(kind, length, limit)
        return MalformedFrame(kind, f"odd length {length}: audio is whole 16-bit samples")
    if rule == 0:
        return MalformedFrame(kind, f"{length} payload bytes, expected none")
    what = {Kind.UUID: "the raw UUID", Kind.DTMF: "one ASCII digit", Kind.ERROR: "the error code"}
    return MalformedFrame(kind, f"{length} payload bytes, expected {rule} ({what[Kind(kind)]})")


class AudioSocketDecoder:
    """Incremental decoder for the Asterisk -> server byte stream of one connection.

    Feed it whatever the transport delivered; it returns the whole frames so far and keeps a
    partial tail. Audio frames may carry any even length up to ``max_audio_payload`` bytes
    (Asterisk sends 320 per 20 ms at 8 kHz, shorter at the end of a stretch); the other kinds
    have fixed lengths (HANGUP 0, UUID 16, DTMF 1, ERROR 1). The first error is final: it is
    raised again by every later `feed`, since the stream has lost its framing.
    """

    def __init__(self, max_audio_payload: int = 8192) -> None:
        if not 0 < max_audio_payload <= MAX_PAYLOAD:
            raise ValueError(
                f"max_audio_payload must be 1..{MAX_PAYLOAD} bytes, not {max_audio_payload}"
            )
        self._limit = max_audio_payload
        self._buffer = bytearray()
        # Bytes the buffered frame needs before decoding is worth trying again; keeps
        # byte-at-a-time delivery of a large frame linear rather than quadratic.
        self._need = 0
        self._error: FrameError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held of an incomplete frame (0 between frames: a clean place for EOF)."""
        return len(self._buffer)

    def feed(self, data: BytesLike) -> list[Frame]:
        """Decode ``data`` (any bytes-like) appended to what was held; return the whole frames.

        Raises `FrameError` (`UnknownKind`, `FrameTooLarge`, `MalformedFrame`) at the first
        invalid frame, and the same error on every call after that.
        """
        if self._error is not None:
            raise self._error
        buffer = self._buffer
        chunk: bytes
        if buffer:
            buffer += data
            if len(buffer) < self._need:
                return []
            chunk = bytes(buffer)
            buffer.clear()
        else:
            chunk = data if type(data) is bytes else bytes(data)

        frames: list[Frame] = []
        append = frames.append
        rules = _RULES
        kinds = _KINDS
        limit = self._limit
        end = len(chunk)
        pos = 0
        need = 0
        try:
            while end - pos >= 3:
                kind = chunk[pos]
                length = chunk[pos + 1] << 8 | chunk[pos + 2]
                rule = rules[kind]
                if rule == _AUDIO:
                    if length > limit or length & 1:
                        raise _header_error(kind, length, limit)
                elif rule != length:
                    raise _header_error(kind, length, limit)
                stop = pos + 3 + length
                if stop > end:
                    need = 3 + length
                    break
                payload = chunk[pos + 3 : stop]
                if kind == 0x03 and payload not in _DTMF_DIGITS:
                    raise MalformedFrame(kind, f"digit {payload!r} is not one of 0-9*#A-D")
                append(Frame(kinds[kind], payload))
                pos = stop
            else:
                need = 3
        except FrameError as error:
            error.frames = frames
            self._error = error
            raise
        if pos < end:
            buffer += memoryview(chunk)[pos:]
            self._need = need
        return frames


def encode_frame(kind: int, payload: BytesLike = b"") -> bytes:
    """One frame of any kind byte (0..255), with a payload of at most 65535 bytes.

    Asterisk accepts only audio (0x10-0x18) and HANGUP (0x00) from the server: any other kind,
    even ERROR, makes it hang the channel up. The daemon sends audio with `encode_audio` and
    ends calls with `HANGUP_FRAME`; other kinds are here for tests and fake Asterisk peers.
    """
    if not 0 <= kind <= 0xFF:
        raise ValueError(f"AudioSocket kind must be a byte (0..255), not {kind}")
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(
            f"AudioSocket {_describe(kind)} payload of {len(payload)} bytes is over the "
            f"{MAX_PAYLOAD}-byte frame limit"
        )
    return _HEADER.pack(kind, len(payload)) + payload


def encode_audio(pcm: BytesLike, kind: int = Kind.SLIN_8K) -> bytes:
    """An audio frame of PCM16 little-endian mono ``pcm`` at ``kind``'s sample rate.

    Send one 20 ms frame every 20 ms (320 bytes at 8 kHz): Asterisk plays whatever arrives at
    once, without pacing. Raises ValueError for a non-audio kind, an odd byte count or more
    than 65535 bytes.
    """
    if kind not in AUDIO_SAMPLE_RATES:
        raise ValueError(f"AudioSocket kind {_describe(kind)} is not an audio kind (0x10-0x18)")
    if len(pcm) & 1:
        raise ValueError(f"PCM16 audio must be whole 2-byte samples, got {len(pcm)} bytes")
    return encode_frame(kind, pcm)


def uuid_text(payload: BytesLike) -> str:
    """The canonical lower-case ``8-4-4-4-12`` text of a UUID frame's 16 raw bytes.

    This is the context id the dialplan passed to ``AudioSocket()``. Raises ValueError unless
    ``payload`` is exactly 16 bytes.
    """
    if len(payload) != 16:
        raise ValueError(f"a UUID is 16 raw bytes, got {len(payload)}")
    return str(uuid.UUID(bytes=bytes(payload)))
