"""The sans-IO AudioSocket codec: table tests, properties, and real Asterisk captures."""

from __future__ import annotations

import hashlib
import json
import random
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rapida_tap.audiosocket.wire import (
    AUDIO_SAMPLE_RATES,
    ERROR_CODES,
    HANGUP_FRAME,
    AudioSocketDecoder,
    Frame,
    FrameError,
    FrameTooLarge,
    Kind,
    MalformedFrame,
    UnknownKind,
    encode_audio,
    encode_frame,
    uuid_text,
)
from tests.captures import FIXTURES

AUDIO_KINDS = sorted(AUDIO_SAMPLE_RATES)
CTX = uuid.UUID("bb727ffd-d9c3-412f-a9cc-0e20cc55ce94")


def decode_all(data: bytes, chunks: list[int] | None = None, **kwargs: int) -> list[Frame]:
    """Decode ``data`` split at the given chunk sizes (whole when None); all of it must frame."""
    decoder = AudioSocketDecoder(**kwargs)
    frames: list[Frame] = []
    if chunks is None:
        frames += decoder.feed(data)
    else:
        pos = 0
        for size in chunks:
            frames += decoder.feed(data[pos : pos + size])
            pos += size
        frames += decoder.feed(data[pos:])
    assert decoder.buffered == 0
    return frames


# --- tables ----------------------------------------------------------------------------------

VALID = [
    ("hangup", b"\x00\x00\x00", Frame(Kind.HANGUP, b"")),
    ("uuid", b"\x01\x00\x10" + CTX.bytes, Frame(Kind.UUID, CTX.bytes)),
    *[
        (f"dtmf {d}", b"\x03\x00\x01" + bytes([d]), Frame(Kind.DTMF, bytes([d])))
        for d in b"0123456789*#ABCD"
    ],
    *[
        (
            f"audio 0x{k:02X}",
            bytes([k, 0x01, 0x40]) + bytes(range(64)) * 5,
            Frame(k, bytes(range(64)) * 5),
        )
        for k in AUDIO_KINDS
    ],
    (
        "short 8 kHz frame",
        b"\x10\x00\xd8" + b"\x01\x02" * 108,
        Frame(Kind.SLIN_8K, b"\x01\x02" * 108),
    ),
    ("empty audio", b"\x12\x00\x00", Frame(Kind.SLIN_16K, b"")),
    ("largest audio", b"\x18\x20\x00" + bytes(8192), Frame(Kind.SLIN_192K, bytes(8192))),
    *[
        (f"error {c:#04x}", bytes([0xFF, 0, 1, c]), Frame(Kind.ERROR, bytes([c])))
        for c in ERROR_CODES
    ],
    ("error, undocumented code", b"\xff\x00\x01\x7f", Frame(Kind.ERROR, b"\x7f")),
]


@pytest.mark.parametrize(("name", "data", "frame"), VALID, ids=[v[0] for v in VALID])
def test_decode_every_kind(name: str, data: bytes, frame: Frame) -> None:
    frames = decode_all(data)
    assert frames == [frame]
    assert isinstance(frames[0].kind, Kind)
    assert type(frames[0].payload) is bytes
    assert encode_frame(frame.kind, frame.payload) == data


def test_every_kind_is_tested() -> None:
    assert {f.kind for _, _, f in VALID} == set(Kind)


INVALID = [
    # name, bytes, exception, attributes, words the message must contain
    ("unknown 0x02", b"\x02\x00\x00", UnknownKind, {"kind": 2}, ["unknown", "0x02"]),
    ("unknown 0x19", b"\x19\x01\x40", UnknownKind, {"kind": 0x19, "length": 320}, ["0x19"]),
    ("unknown 0xFE", b"\xfe\x00\x01x", UnknownKind, {"kind": 0xFE}, ["0xFE"]),
    (
        "audio over limit",
        b"\x10\x20\x02",
        FrameTooLarge,
        {"kind": 0x10, "length": 8194, "limit": 8192},
        ["SLIN_8K (0x10)", "8194 bytes", "8192-byte limit"],
    ),
    (
        "audio 0xFFFF",
        b"\x18\xff\xfe",
        FrameTooLarge,
        {"kind": 0x18, "length": 65534, "limit": 8192},
        ["SLIN_192K (0x18)", "65534"],
    ),
    (
        "odd audio",
        b"\x10\x01\x41",
        MalformedFrame,
        {"kind": 0x10},
        ["SLIN_8K (0x10)", "odd length 321"],
    ),
    ("odd audio 1", b"\x12\x00\x01", MalformedFrame, {"kind": 0x12}, ["SLIN_16K (0x12)", "odd"]),
    (
        "short uuid",
        b"\x01\x00\x0f",
        MalformedFrame,
        {"kind": 1},
        ["UUID (0x01)", "15 payload bytes", "16"],
    ),
    (
        "long uuid",
        b"\x01\x00\x24",
        MalformedFrame,
        {"kind": 1},
        ["UUID (0x01)", "36 payload bytes"],
    ),
    (
        "empty dtmf",
        b"\x03\x00\x00",
        MalformedFrame,
        {"kind": 3},
        ["DTMF (0x03)", "0 payload bytes"],
    ),
    ("long dtmf", b"\x03\x00\x02", MalformedFrame, {"kind": 3}, ["DTMF (0x03)", "2 payload bytes"]),
    (
        "dtmf letter",
        b"\x03\x00\x01x",
        MalformedFrame,
        {"kind": 3},
        ["DTMF (0x03)", "b'x'", "0-9*#A-D"],
    ),
    ("dtmf lower", b"\x03\x00\x01a", MalformedFrame, {"kind": 3}, ["DTMF (0x03)", "b'a'"]),
    ("dtmf NUL", b"\x03\x00\x01\x00", MalformedFrame, {"kind": 3}, ["DTMF (0x03)", "b'\\x00'"]),
    (
        "hangup payload",
        b"\x00\x00\x02",
        MalformedFrame,
        {"kind": 0},
        ["HANGUP (0x00)", "2 payload", "none"],
    ),
    (
        "empty error",
        b"\xff\x00\x00",
        MalformedFrame,
        {"kind": 0xFF},
        ["ERROR (0xFF)", "0 payload", "code"],
    ),
    ("long error", b"\xff\x00\x02", MalformedFrame, {"kind": 0xFF}, ["ERROR (0xFF)", "2 payload"]),
]


@pytest.mark.parametrize(
    ("name", "data", "error", "attrs", "words"), INVALID, ids=[v[0] for v in INVALID]
)
def test_decode_errors(
    name: str, data: bytes, error: type[FrameError], attrs: dict[str, int], words: list[str]
) -> None:
    decoder = AudioSocketDecoder()
    with pytest.raises(error) as info:
        decoder.feed(data)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message
    for attr, value in attrs.items():
        assert getattr(info.value, attr) == value


@pytest.mark.parametrize(
    ("name", "data", "error", "attrs", "words"), INVALID, ids=[v[0] for v in INVALID]
)
def test_error_is_final(
    name: str, data: bytes, error: type[FrameError], attrs: dict[str, int], words: list[str]
) -> None:
    decoder = AudioSocketDecoder()
    with pytest.raises(error) as first:
        decoder.feed(data)
    for later in (b"", HANGUP_FRAME, encode_audio(bytes(320))):
        with pytest.raises(error) as again:
            decoder.feed(later)
        assert again.value is first.value


def test_header_errors_come_before_the_payload() -> None:
    """A bad header is refused at once: nothing of its payload is waited for or held."""
    decoder = AudioSocketDecoder()
    with pytest.raises(FrameTooLarge):
        decoder.feed(b"\x10\xff")
        decoder.feed(b"\xfe")
    decoder = AudioSocketDecoder()
    with pytest.raises(UnknownKind):
        decoder.feed(b"\x42\x00\x10")


def test_error_keeps_the_frames_before_it() -> None:
    good = [Frame(Kind.UUID, CTX.bytes), Frame(Kind.SLIN_8K, bytes(320))]
    data = b"".join(encode_frame(*f) for f in good) + b"\x03\x00\x01z"
    decoder = AudioSocketDecoder()
    with pytest.raises(MalformedFrame) as info:
        decoder.feed(data)
    assert info.value.frames == good


def test_audio_limit_is_configurable() -> None:
    decoder = AudioSocketDecoder(max_audio_payload=640)
    assert decoder.feed(encode_audio(bytes(640), Kind.SLIN_16K)) == [
        Frame(Kind.SLIN_16K, bytes(640))
    ]
    with pytest.raises(FrameTooLarge) as info:
        decoder.feed(encode_audio(bytes(642), Kind.SLIN_16K))
    assert (info.value.length, info.value.limit) == (642, 640)
    assert "642 bytes" in str(info.value) and "640-byte limit" in str(info.value)
    assert (
        decode_all(b"\x18\xff\xfe" + bytes(65534), max_audio_payload=65535)[0].kind
        == Kind.SLIN_192K
    )


@pytest.mark.parametrize("limit", [0, -2, 65536])
def test_audio_limit_must_fit_the_length_field(limit: int) -> None:
    with pytest.raises(ValueError, match=f"max_audio_payload must be 1..65535 bytes, not {limit}"):
        AudioSocketDecoder(max_audio_payload=limit)


def test_partial_frames_are_held() -> None:
    data = encode_audio(b"\x01\x02" * 160)
    decoder = AudioSocketDecoder()
    assert decoder.buffered == 0
    assert decoder.feed(data[:2]) == []
    assert decoder.buffered == 2
    assert decoder.feed(data[2:100]) == []
    assert decoder.buffered == 100
    assert decoder.feed(data[100:] + HANGUP_FRAME[:1]) == [Frame(Kind.SLIN_8K, data[3:])]
    assert decoder.buffered == 1
    assert decoder.feed(HANGUP_FRAME[1:]) == [Frame(Kind.HANGUP, b"")]
    assert decoder.buffered == 0
    assert decoder.feed(b"") == []


def test_large_frame_one_byte_at_a_time() -> None:
    data = encode_audio(bytes(range(256)) * 32, Kind.SLIN_192K)
    decoder = AudioSocketDecoder()
    for i in range(len(data) - 1):
        assert decoder.feed(data[i : i + 1]) == []
    assert decoder.buffered == len(data) - 1
    assert decoder.feed(data[-1:]) == [Frame(Kind.SLIN_192K, data[3:])]


@pytest.mark.parametrize("wrap", [bytearray, memoryview])
def test_feed_accepts_bytes_like(wrap: type) -> None:
    data = encode_frame(Kind.UUID, CTX.bytes) + encode_audio(bytes(320))
    decoder = AudioSocketDecoder()
    frames = decoder.feed(wrap(data[:10])) + decoder.feed(wrap(data[10:]))
    assert frames == [Frame(Kind.UUID, CTX.bytes), Frame(Kind.SLIN_8K, bytes(320))]
    assert all(type(f.payload) is bytes for f in frames)


# --- encoder -----------------------------------------------------------------------------------


def test_hangup_frame() -> None:
    assert HANGUP_FRAME == b"\x00\x00\x00" == encode_frame(Kind.HANGUP)


def test_encode_audio() -> None:
    assert encode_audio(b"\x01\x02" * 160) == b"\x10\x01\x40" + b"\x01\x02" * 160
    assert encode_audio(bytes(640), Kind.SLIN_16K)[:3] == b"\x12\x02\x80"
    assert encode_audio(bytes(65534), Kind.SLIN_48K)[:3] == b"\x16\xff\xfe"
    assert encode_audio(memoryview(b"ab")) == b"\x10\x00\x02ab"


def test_encode_frame_largest() -> None:
    assert encode_frame(0x42, bytes(65535))[:3] == b"\x42\xff\xff"


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: encode_frame(Kind.SLIN_8K, bytes(65536)), "65536 bytes is over the 65535-byte"),
        (lambda: encode_frame(256), "kind must be a byte"),
        (lambda: encode_frame(-1), "kind must be a byte"),
        (lambda: encode_audio(bytes(65536)), "65536 bytes is over the 65535-byte"),
        (lambda: encode_audio(bytes(3)), "whole 2-byte samples, got 3 bytes"),
        (lambda: encode_audio(bytes(2), Kind.DTMF), "DTMF (0x03) is not an audio kind"),
        (lambda: encode_audio(bytes(2), Kind.HANGUP), "HANGUP (0x00) is not an audio kind"),
        (lambda: encode_audio(bytes(2), 0x19), "0x19 is not an audio kind"),
        (lambda: uuid_text(bytes(15)), "16 raw bytes, got 15"),
        (lambda: uuid_text(CTX.bytes + b"x"), "16 raw bytes, got 17"),
    ],
)
def test_encoder_errors(call: object, message: str) -> None:
    with pytest.raises(ValueError) as info:
        call()  # type: ignore[operator]
    assert message in str(info.value)


def test_uuid_text() -> None:
    assert uuid_text(CTX.bytes) == "bb727ffd-d9c3-412f-a9cc-0e20cc55ce94"
    assert uuid_text(bytes(range(0xF0, 0x100))) == "f0f1f2f3-f4f5-f6f7-f8f9-fafbfcfdfeff"


def test_tables() -> None:
    assert AUDIO_SAMPLE_RATES[Kind.SLIN_44K] == 44100
    assert [AUDIO_SAMPLE_RATES[k] // 1000 for k in AUDIO_KINDS] == [
        8,
        12,
        16,
        24,
        32,
        44,
        48,
        96,
        192,
    ]
    assert AUDIO_KINDS == list(range(0x10, 0x19))
    assert ERROR_CODES == {0: "none", 1: "hangup", 2: "frame forwarding", 4: "memory"}


# --- properties --------------------------------------------------------------------------------

valid_frames = st.one_of(
    st.just(Frame(Kind.HANGUP, b"")),
    st.binary(min_size=16, max_size=16).map(lambda b: Frame(Kind.UUID, b)),
    st.sampled_from(b"0123456789*#ABCD").map(lambda d: Frame(Kind.DTMF, bytes([d]))),
    st.integers(0, 255).map(lambda c: Frame(Kind.ERROR, bytes([c]))),
    st.tuples(st.sampled_from(AUDIO_KINDS), st.integers(0, 4096)).map(
        lambda t: Frame(Kind(t[0]), random.Random(t[1]).randbytes(t[1] * 2))
    ),
)


# Bytes that look like frames often enough to get past the first header: a kind byte that is
# usually real, a small random length, random payload.
near_frames = st.tuples(
    st.one_of(st.sampled_from([*Kind, 0x02, 0x19]), st.integers(0, 255)),
    st.integers(0, 40),
    st.binary(max_size=40),
).map(lambda t: bytes([t[0], 0, t[1]]) + t[2])
garbage = st.lists(st.one_of(st.binary(max_size=64), near_frames), max_size=20)


@given(garbage, st.integers(1, 65535))
def test_random_bytes_raise_only_frame_errors(chunks: list[bytes], limit: int) -> None:
    decoder = AudioSocketDecoder(max_audio_payload=limit)
    for chunk in chunks:
        try:
            frames = decoder.feed(chunk)
        except FrameError as error:
            assert str(error) and "\n" not in str(error)
            with pytest.raises(type(error)):
                decoder.feed(b"")
            return
        assert all(isinstance(f, Frame) and f.kind in set(Kind) for f in frames)
    assert decoder.buffered < 3 + 65535


@given(st.lists(valid_frames, max_size=30))
def test_encode_decode_identity(frames: list[Frame]) -> None:
    data = b"".join(encode_frame(*f) for f in frames)
    assert decode_all(data) == frames


@given(st.lists(valid_frames, max_size=20), st.lists(st.integers(0, 700), max_size=40))
def test_chunking_does_not_matter(frames: list[Frame], chunks: list[int]) -> None:
    data = b"".join(encode_frame(*f) for f in frames)
    assert decode_all(data, chunks) == frames


# --- real Asterisk captures --------------------------------------------------------------------

CAPTURES = ["audiosocket-call", "audiosocket-slin16", "audiosocket-daemon-hangup"]


def load(name: str) -> tuple[bytes, dict]:
    data = (FIXTURES / f"{name}.bin").read_bytes()
    sidecar = json.loads((FIXTURES / f"{name}.json").read_text())
    assert hashlib.sha256(data).hexdigest() == sidecar["sha256"]
    return data, sidecar


def random_chunks(seed: int, total: int) -> list[int]:
    rng = random.Random(seed)
    sizes = []
    while total > 0:
        size = rng.choice([1, 2, 3, rng.randint(1, 50), rng.randint(1, 1500)])
        sizes.append(size)
        total -= size
    return sizes


def check_capture(frames: list[Frame], sidecar: dict) -> None:
    expected = sidecar["frame_list"]
    assert [(f.kind, len(f.payload)) for f in frames] == [
        (int(e["kind"], 16), e["length"]) for e in expected
    ]
    offsets = [0]
    for f in frames[:-1]:
        offsets.append(offsets[-1] + 3 + len(f.payload))
    assert offsets == [e["offset"] for e in expected]
    for f, e in zip(frames, expected, strict=True):
        if "payload_hex" in e:
            assert f.payload.hex() == e["payload_hex"]
    assert frames[0].kind == Kind.UUID
    assert uuid_text(frames[0].payload) == sidecar["context_id"]
    summary = sidecar["summary"]
    assert [f.payload.decode() for f in frames if f.kind == Kind.DTMF] == summary["dtmf"]
    audio = [f for f in frames if f.kind in AUDIO_SAMPLE_RATES]
    assert {f.kind for f in audio} == {int(summary["audio_kind"], 16)}
    sizes: dict[str, int] = {}
    for f in audio:
        sizes[str(len(f.payload))] = sizes.get(str(len(f.payload)), 0) + 1
    assert sizes == summary["audio_sizes"]


@pytest.mark.parametrize("name", CAPTURES)
def test_capture_whole(name: str) -> None:
    data, sidecar = load(name)
    check_capture(decode_all(data), sidecar)


@pytest.mark.parametrize("name", CAPTURES)
def test_capture_byte_at_a_time(name: str) -> None:
    data, sidecar = load(name)
    check_capture(decode_all(data, [1] * len(data)), sidecar)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("name", CAPTURES)
def test_capture_random_chunks(name: str, seed: int) -> None:
    data, sidecar = load(name)
    check_capture(decode_all(data, random_chunks(seed, len(data))), sidecar)


def test_capture_shapes() -> None:
    """What the captures hold, so a changed fixture cannot make the tests above vacuous."""
    frames = decode_all(load("audiosocket-call")[0])
    assert len(frames) == 128 and frames[-2] == Frame(Kind.DTMF, b"2")
    assert [len(f.payload) for f in frames if f.kind == Kind.SLIN_8K][-1] == 216
    frames = decode_all(load("audiosocket-slin16")[0])
    assert {len(f.payload) for f in frames if f.kind == Kind.SLIN_16K} == {640, 128}
    frames = decode_all(load("audiosocket-daemon-hangup")[0])
    assert frames[-1] == Frame(Kind.DTMF, b"#")
