"""A minimal chan_websocket client, sans-IO: the upgrade, masked frames, server frames.

What the bench needs of RFC 6455 and no more, written for speed: the client's frames are
masked with one fixed key (the server may not tell, and a fixed key lets every audio frame be
masked from a precomputed body: the 155 tone bytes are masked once per tone frame, only the
5 sequence bytes per frame), server frames are parsed from a growing buffer by offset.  The
upgrade, ``MEDIA_START`` and the close are what Asterisk's chan_websocket sends (see
``docs/protocols.md`` section 3 and ``tests/fake_chan_websocket.py``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct

from bench.frames import TONE_FRAMES, ULAW_BODIES, ULAW_BYTES, ULAW_SEQ_BYTES, ulaw_seq

TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
KEY = "Ave8SwAAAADK468gAAAAAA=="  # chan_websocket's half-zero Sec-WebSocket-Key, as captured
MASK = b"\x5a\xc3\x17\xe9"  # the fixed masking key of every client frame
ACCEPT = base64.b64encode(hashlib.sha1(KEY.encode("ascii") + _GUID).digest()).decode("ascii")
"""The Sec-WebSocket-Accept that answers `KEY`."""
_MAX_SERVER_FRAME = 1 << 20


class HandshakeFailed(Exception):
    """The server did not answer the upgrade with a valid 101 for subprotocol ``media``."""


class BadServerFrame(Exception):
    """The server sent a masked, fragmented, reserved-bit or oversized frame."""


def upgrade_request(path: str, host: str) -> bytes:
    """The upgrade exactly as chan_websocket sends it (header order from the captures)."""
    return (
        f"GET {path} HTTP/1.1\r\nSec-WebSocket-Version: 13\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nHost: {host}\r\nSec-WebSocket-Protocol: media\r\n"
        f"Sec-WebSocket-Key: {KEY}\r\n\r\n"
    ).encode("latin-1")


def check_upgrade(head: bytes) -> None:
    """Raise `HandshakeFailed` unless ``head`` (status line and headers) accepts the upgrade."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or parts[1] != "101":
        raise HandshakeFailed(f"upgrade answered {lines[0][:60]!r}")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("sec-websocket-accept") != ACCEPT:
        raise HandshakeFailed("wrong Sec-WebSocket-Accept")
    if headers.get("sec-websocket-protocol") != "media":
        raise HandshakeFailed(f"subprotocol {headers.get('sec-websocket-protocol')!r}, not 'media'")


def mask(payload: bytes, offset: int = 0) -> bytes:
    """``payload`` XOR the fixed key, as if it began ``offset`` bytes into a frame's payload."""
    n = len(payload)
    if not n:
        return b""
    shift = offset % 4
    key = (MASK[shift:] + MASK[:shift]) * (n // 4 + 1)
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key[:n], "big")).to_bytes(n, "big")


def client_frame(opcode: int, payload: bytes) -> bytes:
    """One final, masked client frame."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    return head + MASK + mask(payload)


def media_start(ctx: str, index: int) -> bytes:
    """``MEDIA_START`` as chan_websocket sends it with ``f(json)``, as a client text frame."""
    text = json.dumps(
        {
            "event": "MEDIA_START",
            "connection_id": "rapida",
            "channel": f"WebSocket/rapida/0x{0x5627C0000000 + index:012x}",
            "channel_id": f"1795499200.{index}",
            "format": "ulaw",
            "optimal_frame_size": ULAW_BYTES,
            "ptime": 20,
            "channel_variables": {
                "DIALEDPEERNUMBER": f"rapida/c(ulaw)f(json)v(ctx={ctx})",
                "MEDIA_WEBSOCKET_CONNECTION_ID": "rapida",
                "MEDIA_WEBSOCKET_OPTIMAL_FRAME_SIZE": str(ULAW_BYTES),
                "__RAPIDA_CONTEXT_ID": ctx,
            },
        },
        separators=(",", ":"),
    )
    return client_frame(TEXT, text.encode("utf-8"))


def close_frame(code: int = 1000) -> bytes:
    return client_frame(CLOSE, struct.pack("!H", code))


_AUDIO_HEAD = struct.pack("!BBH", 0x80 | BINARY, 0x80 | 126, ULAW_BYTES) + MASK
_MASKED_BODIES = tuple(mask(body, ULAW_SEQ_BYTES) for body in ULAW_BODIES)


def audio_frame(seq: int) -> bytes:
    """Frame ``seq`` (`bench.frames.ulaw_payload`) as a masked binary client frame."""
    return _AUDIO_HEAD + mask(ulaw_seq(seq)) + _MASKED_BODIES[seq % TONE_FRAMES]


class ServerFrames:
    """Server frames (unmasked, unfragmented, as Autobahn sends them) from a byte stream."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Append ``data``; return the whole frames now available as ``(opcode, payload)``."""
        buf = self._buf + data if self._buf else data
        out = []
        pos, end = 0, len(buf)
        while end - pos >= 2:
            b0, n = buf[pos], buf[pos + 1]
            if n & 0x80 or b0 & 0x70 or not b0 & 0x80:
                raise BadServerFrame(f"frame header {b0:#04x} {n:#04x}")
            start = pos + 2
            if n == 126:
                if end - pos < 4:
                    break
                n = (buf[pos + 2] << 8) | buf[pos + 3]
                start = pos + 4
            elif n == 127:
                if end - pos < 10:
                    break
                (n,) = struct.unpack_from("!Q", buf, pos + 2)
                start = pos + 10
                if n > _MAX_SERVER_FRAME:
                    raise BadServerFrame(f"a {n}-byte frame")
            if end < start + n:
                break
            out.append((b0 & 0x0F, buf[start : start + n]))
            pos = start + n
        self._buf = buf[pos:] if pos < end else b""
        return out
