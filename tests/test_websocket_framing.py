"""The caller's media frames, sans-IO: which frames the fast path takes, and unmasking."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rapida_tap.websocket.framing import binary_frame, read_media_frame, unmask
from tests import fake_chan_websocket as fc

LIMIT = 65536
KEY = b"\x12\x34\x56\x78"


def masked(payload: bytes, key: bytes = KEY) -> bytes:
    return bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def binary(payload: bytes, *, first: int = 0x82, key: bytes = KEY) -> bytes:
    n = len(payload)
    head = struct.pack("!BB", first, 0x80 | n) if n < 126 else struct.pack("!BBH", first, 0xFE, n)
    return head + key + masked(payload, key)


@pytest.mark.parametrize("size", [0, 1, 125, 126, 160, 320, 640, 65535])
def test_a_whole_masked_binary_frame_is_taken(size: int) -> None:
    payload = os.urandom(size)
    data = binary(payload) + b"next"
    assert read_media_frame(data, 0, LIMIT) == (payload, len(data) - 4)


def test_frames_are_read_from_an_offset() -> None:
    one, two = os.urandom(160), os.urandom(160)
    data = binary(one) + binary(two)
    first = read_media_frame(data, 0, LIMIT)
    assert first is not None and first[0] == one
    assert read_media_frame(data, first[1], LIMIT) == (two, len(data))


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (fc.encode_frame(fc.TEXT, b"{}"), "text"),
        (fc.encode_frame(fc.PING, b"x"), "ping"),
        (fc.encode_frame(fc.CLOSE, fc.close_payload(1000)), "close"),
        (fc.encode_frame(fc.BINARY, b"x" * 160, fin=False), "first fragment"),
        (fc.encode_frame(0, b"x" * 160), "continuation"),
        (fc.encode_frame(fc.BINARY, b"x" * 160, mask=False), "unmasked"),
        (binary(b"x" * 160, first=0xC2), "RSV1 (compressed)"),
        (binary(b"x" * 160, first=0x92), "RSV3"),
        (binary(b"x" * 160, first=0x83), "reserved opcode"),
        (b"\x82\xfe\x00\x7d" + KEY + b"x" * 125, "length not in its shortest form"),
        (b"\x82\xff" + struct.pack("!Q", 65536) + KEY + b"x" * 65536, "64-bit length"),
        (binary(b"x" * 161), "over the limit"),
        (binary(b"x" * 160)[:-1], "payload not all there"),
        (binary(b"x" * 160)[:5], "key not all there"),
        (binary(b"x" * 300)[:3], "length not all there"),
        (b"", "nothing"),
    ],
)
def test_anything_else_is_left_to_the_general_parser(data: bytes, why: str) -> None:
    assert read_media_frame(data, 0, 160) is None, why


def test_unmask_matches_rfc_6455() -> None:
    payload = bytes(range(256)) * 3
    assert unmask(masked(payload), KEY) == payload
    assert unmask(b"", KEY) == b""
    assert unmask(b"\x00\x00\x00", b"\xff\x00\xff\x00") == b"\xff\x00\xff"


@settings(max_examples=300, deadline=None, database=None)
@given(st.binary(max_size=2000), st.binary(min_size=4, max_size=4))
def test_unmask_round_trips_any_payload_and_key(payload: bytes, key: bytes) -> None:
    once = unmask(payload, key)
    assert once == masked(payload, key)
    assert unmask(once, key) == payload


@settings(max_examples=300, deadline=None, database=None)
@given(st.binary(max_size=400), st.integers(min_value=0, max_value=400))
def test_arbitrary_bytes_give_a_frame_inside_the_data_or_none(data: bytes, limit: int) -> None:
    got = read_media_frame(data, 0, limit)
    if got is not None:
        payload, end = got
        assert data[0] == 0x82 and data[1] & 0x80
        assert len(payload) <= limit and 6 <= end <= len(data)
        assert end - len(payload) in (6, 8)


@pytest.mark.parametrize("size", [0, 1, 125, 126, 159, 160, 161, 640, 65535, 65536])
def test_our_binary_frames_decode_to_their_payload(size: int) -> None:
    payload = os.urandom(size)
    decoder = fc.FrameDecoder()
    assert decoder.feed(binary_frame(payload)) == [(fc.BINARY, payload)]
