"""The two parsers that take bytes from the network, driven at volume within CI time.

`AudioSocketDecoder` (AudioSocket) and `parse_event` (chan_websocket TEXT frames) see whatever
a peer sends.  Here each gets hundreds of thousands of frames or messages, valid, corrupted
and hostile, and must either return well-formed results or raise its own documented error
(`FrameError`, `ControlError`), never anything else, while holding no more than one frame.
The per-example properties live next to each parser's table tests; these are about volume.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import random
import tracemalloc
import typing
from collections.abc import Mapping

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rapida_tap.audiosocket.wire import (
    AUDIO_SAMPLE_RATES,
    AudioSocketDecoder,
    Frame,
    FrameError,
    Kind,
    encode_frame,
)
from rapida_tap.websocket import control as c
from rapida_tap.websocket.control import ControlError, parse_event

VOLUME = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)
AUDIO_KINDS = sorted(AUDIO_SAMPLE_RATES)
FIXED = {Kind.HANGUP: 0, Kind.UUID: 16, Kind.DTMF: 1, Kind.ERROR: 1}


# --- AudioSocket ------------------------------------------------------------------------------


def random_frames(rng: random.Random, count: int, limit: int) -> list[Frame]:
    frames = []
    for _ in range(count):
        roll = rng.random()
        if roll < 0.8:
            size = min(limit, rng.choice((320, 320, 640, 160, rng.randrange(0, 4096)))) & ~1
            frames.append(Frame(Kind(rng.choice(AUDIO_KINDS)), rng.randbytes(size)))
        elif roll < 0.9:
            frames.append(Frame(Kind.DTMF, bytes([rng.choice(b"0123456789*#ABCD")])))
        elif roll < 0.95:
            frames.append(Frame(Kind.UUID, rng.randbytes(16)))
        elif roll < 0.98:
            frames.append(Frame(Kind.ERROR, rng.randbytes(1)))
        else:
            frames.append(Frame(Kind.HANGUP, b""))
    return frames


def well_formed(frame: Frame, limit: int) -> bool:
    if frame.kind in FIXED:
        ok = len(frame.payload) == FIXED[Kind(frame.kind)]
        return ok and (frame.kind != Kind.DTMF or frame.payload in b"0123456789*#ABCD")
    size = len(frame.payload)
    return frame.kind in AUDIO_SAMPLE_RATES and size % 2 == 0 and size <= limit


@VOLUME
@given(
    seed=st.integers(0, 2**32 - 1),
    limit=st.sampled_from([320, 8192, 65535]),
    corrupt=st.one_of(st.none(), st.floats(0.0, 1.0)),
    max_chunk=st.sampled_from([9, 323, 4096, 65536]),
)
def test_audiosocket_streams_decode_or_fail_with_a_frame_error(
    seed: int, limit: int, corrupt: float | None, max_chunk: int
) -> None:
    """1,000 frames a stream (about 0.6 MB), maybe one byte changed, cut into random pieces."""
    rng = random.Random(seed)
    frames = random_frames(rng, 1000 if max_chunk > 9 else 100, limit)
    data = bytearray(b"".join(encode_frame(*f) for f in frames))
    if corrupt is not None:
        data[int(corrupt * (len(data) - 1))] = rng.randrange(256)
    decoder = AudioSocketDecoder(max_audio_payload=limit)
    decoded: list[Frame] = []
    pos = 0
    error: FrameError | None = None
    while pos < len(data):
        size = rng.randint(1, max_chunk)
        try:
            got = decoder.feed(data[pos : pos + size])
        except FrameError as e:
            error = e
            got = e.frames
        assert all(type(f) is Frame and well_formed(f, limit) for f in got)
        decoded.extend(got)
        assert decoder.buffered < 3 + limit + size  # never more than one frame held
        if error is not None:
            assert str(error) and "\n" not in str(error)
            try:
                decoder.feed(b"\x10\x00\x00")
            except FrameError as again:
                assert again is error  # the first error is final
            else:
                raise AssertionError("a failed decoder took more bytes")
            break
        pos += size
    if corrupt is None:
        assert error is None and decoded == frames and decoder.buffered == 0


@VOLUME
@given(st.lists(st.binary(min_size=1, max_size=512), min_size=1, max_size=200))
def test_random_bytes_at_volume_raise_only_frame_errors(chunks: list[bytes]) -> None:
    decoder = AudioSocketDecoder()
    for chunk in chunks:
        try:
            frames = decoder.feed(chunk)
        except FrameError:
            return
        assert all(well_formed(f, 8192) for f in frames)


def test_decoder_memory_stays_at_one_frame_over_20_mb() -> None:
    """20 MB of audio in pieces of every size: the decoder's own memory does not grow."""
    rng = random.Random(12)
    stream = b"".join(encode_frame(Kind.SLIN_8K, rng.randbytes(320)) for _ in range(1000))
    decoder = AudioSocketDecoder()
    count = 0
    tracemalloc.start()
    try:
        for _ in range(62):  # 62 x 323,000 bytes
            pos = 0
            while pos < len(stream):
                size = rng.choice((1, 3, 322, 323, 324, 1500, 65536))
                count += len(decoder.feed(stream[pos : pos + size]))
                pos += size
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 62_000
    assert peak < 512 * 1024, peak  # slices of the input and the frames of one feed


# --- chan_websocket control messages ------------------------------------------------------------

EVENT_NAMES = [*c._KNOWN_EVENTS, "NEW_THING", "", "media_start", "X" * 70]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=40),
    st.sampled_from(["0", "160", "true", "false", "ulaw", "*", "#", "1" * 12]),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)
FIELDS = [
    *("channel_id", "digit", "correlation_id", "error_text", "queue_length", "queue_full"),
    *("optimal_frame_size", "ptime", "channel_variables", "connection_id", "format", "channel"),
    *("xon_level", "xoff_level", "bulk_media", "media_paused"),
]
json_events = st.builds(
    lambda name, fields: json.dumps({"event": name, **fields}),
    st.sampled_from(EVENT_NAMES) | st.text(max_size=10),
    st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), json_values, max_size=10),
)
plain_events = st.builds(
    lambda name, pairs, tail: " ".join([name, *(f"{k}:{v}" for k, v in pairs)]) + tail,
    st.sampled_from(EVENT_NAMES),
    st.lists(st.tuples(st.sampled_from(FIELDS) | st.text(max_size=5), st.text(max_size=12))),
    st.sampled_from(["", " ", "  x", ":", " a:b:c", "\t", "\x00"]),
)
hostile = st.one_of(
    st.integers(1, 5000).map(lambda n: "[" * n + "]" * n),
    st.integers(1, 5000).map(lambda n: '{"event":"STATUS","queue_length":' + "9" * n + "}"),
    st.integers(4000, 5000).map(lambda n: "MEDIA_START " + "a:b " * (n // 4)),
    st.text(min_size=1, max_size=300),
    st.binary(max_size=300).map(lambda b: b.decode("latin-1")),
    st.just('{"event":"DTMF_END","digit":"1","digit":"2"}'),
    st.just('{"event": "\\ud800"}'),
)


@functools.cache
def field_types(kind: type) -> tuple[tuple[str, object], ...]:
    """``(name, str | int | bool | Mapping)`` for each field of an event class."""
    hints = typing.get_type_hints(kind)
    return tuple(
        (f.name, typing.get_origin(hints[f.name]) or hints[f.name])
        for f in dataclasses.fields(kind)
    )


def assert_well_formed(event: c.Event) -> None:
    """Every field holds the type its dataclass declares (str, int, bool, a str mapping)."""
    assert isinstance(event, c.Event)
    for name, origin in field_types(type(event)):
        value = getattr(event, name)
        if origin is bool:
            assert type(value) is bool, (name, value)
        elif origin is int:
            assert type(value) is int and value >= 0, (name, value)
        elif origin is str:
            assert type(value) is str, (name, value)
        else:
            assert isinstance(value, Mapping), (name, value)
    if isinstance(event, c.MediaStart):
        variables = event.channel_variables.items()
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in variables)
    if isinstance(event, c.DtmfEnd):
        assert event.digit in "0123456789*#ABCD" and len(event.digit) == 1


def parse_or_control_error(text: str) -> None:
    try:
        event = parse_event(text)
    except ControlError as e:
        assert str(e) and "\n" not in str(e)
    else:
        assert_well_formed(event)


@settings(VOLUME, max_examples=300)
@given(st.one_of(json_events, plain_events, hostile))
def test_control_messages_parse_or_fail_with_a_control_error(text: str) -> None:
    parse_or_control_error(text)


SAMPLES = [
    "MEDIA_START connection_id:rapida channel:WebSocket/rapida/0x1 channel_id:1.2 format:ulaw "
    "optimal_frame_size:160 ptime:20",
    json.dumps(
        {
            "event": "MEDIA_START",
            "connection_id": "rapida",
            "channel": "WebSocket/rapida/0x1",
            "channel_id": "1.2",
            "format": "ulaw",
            "optimal_frame_size": 160,
            "ptime": 20,
            "channel_variables": {"__RAPIDA_CONTEXT_ID": "6f1c", "A": "1"},
        },
        separators=(",", ":"),
    ),
    "DTMF_END digit:5 channel_id:1.2",
    '{"event":"DTMF_END","channel_id":"1.2","digit":"#"}',
    "STATUS channel_id:1 queue_length:5 xon_level:800 xoff_level:900 queue_full:true "
    "bulk_media:false media_paused:false",
    '{"event":"STATUS","channel_id":"1","queue_length":5,"xon_level":800,"xoff_level":900,'
    '"queue_full":false,"bulk_media":false,"media_paused":true}',
    "MEDIA_MARK_PROCESSED turn-1",
    '{"event":"MEDIA_MARK_PROCESSED","channel_id":"1.2","correlation_id":"turn-1"}',
    "ERROR error_text:Something went wrong here",
    "MEDIA_XOFF",
    '{"event":"QUEUE_DRAINED","channel_id":"1.2"}',
    "MEDIA_BUFFERING_COMPLETED buf-7",
]
ALPHABET = ' {}[]":,0123456789abcxyzAEZ_-.:\\\t\n\x00\u00e9\ud800'


def mutate(rng: random.Random, text: str) -> str:
    """One to four random edits: replace, insert, delete, truncate, repeat a span."""
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(text) + 1)
        op = rng.randrange(5)
        if op == 0 and text:
            text = text[: min(i, len(text) - 1)] + rng.choice(ALPHABET) + text[i + 1 :]
        elif op == 1:
            text = text[:i] + rng.choice(ALPHABET) * rng.randint(1, 3) + text[i:]
        elif op == 2:
            text = text[:i] + text[i + rng.randint(1, 8) :]
        elif op == 3:
            text = text[:i]
        else:
            text = text[:i] + text[i : i + rng.randint(1, 40)] * rng.randint(2, 30) + text[i:]
    return text


def test_50k_mutated_asterisk_messages_parse_or_fail_with_a_control_error() -> None:
    """Real messages of both formats, each edited at random: 50,000 of them."""
    rng = random.Random(20)
    outcomes = {"parsed": 0, "refused": 0}
    for n in range(50_000):
        text = mutate(rng, SAMPLES[n % len(SAMPLES)])
        try:
            event = parse_event(text)
        except ControlError as e:
            assert str(e) and "\n" not in str(e), (text, e)
            outcomes["refused"] += 1
        else:
            assert_well_formed(event)
            outcomes["parsed"] += 1
    assert min(outcomes.values()) > 5_000, outcomes  # both paths were exercised at volume


def test_control_parser_memory_is_bounded_by_the_message_limit() -> None:
    """The worst texts up to the 4,096-character limit, and far over it, parse in bounded
    memory: a message over the limit is refused before it is looked at."""
    worst = [
        "[" * 4096,
        '{"event":"STATUS","queue_length":' + "9" * 4000 + "}",
        "MEDIA_START " + "k:v " * 1000,
        '{"event":"X",' + ",".join(f'"k{i}":[]' for i in range(500)) + "}",
        "x" * 50_000_000,  # far over the limit: refused by its length
    ]
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        for _ in range(200):
            for text in worst:
                parse_or_control_error(text)
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert current - baseline < 64 * 1024  # nothing kept
    assert peak - baseline < 2 * 1024 * 1024, peak - baseline
