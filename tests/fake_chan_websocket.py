"""A fake Asterisk chan_websocket client, built from the real transcripts in the fixtures.

It sends the upgrade request byte for byte as Asterisk does (header order, half-zero
``Sec-WebSocket-Key``, no Origin/User-Agent), masked unfragmented frames, answers pings, and on
``close()`` sends its close frame and drops the TCP connection at once, without waiting for the
reply, as Asterisk does.  Frame coding is written here from RFC 6455 so the tests do not trust
the library under test.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, protocol, reactor

from tests.captures import FIXTURES

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA
ASTERISK_KEY = "Ave8SwAAAADK468gAAAAAA=="  # from websocket-json.jsonl: bytes 4-7, 12-15 zero


def accept_for(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + GUID).digest()).decode("ascii")


def encode_frame(opcode: int, payload: bytes, *, mask: bool = True, fin: bool = True) -> bytes:
    """One WebSocket frame; masked with a random key like a client's."""
    first = (0x80 if fin else 0) | opcode
    n = len(payload)
    bit = 0x80 if mask else 0
    if n < 126:
        head = struct.pack("!BB", first, bit | n)
    elif n < 65536:
        head = struct.pack("!BBH", first, bit | 126, n)
    else:
        head = struct.pack("!BBQ", first, bit | 127, n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return head + key + masked


def close_payload(code: int, reason: str = "") -> bytes:
    return struct.pack("!H", code) + reason.encode("utf-8")


class FrameDecoder:
    """Server frames (unmasked) from a byte stream: ``feed`` returns ``(opcode, payload)``."""

    def __init__(self) -> None:
        self.buf = b""

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self.buf += data
        out = []
        while len(self.buf) >= 2:
            b0, b1 = self.buf[0], self.buf[1]
            n, pos = b1 & 0x7F, 2
            if n == 126:
                if len(self.buf) < 4:
                    break
                (n,) = struct.unpack("!H", self.buf[2:4])
                pos = 4
            elif n == 127:
                if len(self.buf) < 10:
                    break
                (n,) = struct.unpack("!Q", self.buf[2:10])
                pos = 10
            if b1 & 0x80:
                raise AssertionError("the server masked a frame")
            if len(self.buf) < pos + n:
                break
            out.append((b0 & 0x0F, self.buf[pos : pos + n]))
            self.buf = self.buf[pos + n :]
        return out


def upgrade_request(
    path: str,
    *,
    key: str = ASTERISK_KEY,
    protocols: str | None = "media",
    host: str = "127.0.0.1:8080",
    extra: list[tuple[str, str]] | None = None,
) -> bytes:
    """The upgrade exactly as chan_websocket sends it (header order from the captures)."""
    lines = [
        f"GET {path} HTTP/1.1",
        "Sec-WebSocket-Version: 13",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Host: {host}",
    ]
    if protocols is not None:
        lines.append(f"Sec-WebSocket-Protocol: {protocols}")
    lines.append(f"Sec-WebSocket-Key: {key}")
    lines += [f"{k}: {v}" for k, v in extra or []]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


# -- transcripts -------------------------------------------------------------------------------


@dataclass
class Transcript:
    meta: dict[str, Any]
    records: list[dict[str, Any]]

    @property
    def context_id(self) -> str:
        return str(self.meta["context_id"])

    def upgrade(self) -> dict[str, Any]:
        return next(r for r in self.records if r["type"] == "http" and r["dir"].startswith("ast"))

    def response(self) -> dict[str, Any]:
        return next(r for r in self.records if r["type"] == "http" and r["dir"].startswith("dae"))

    def from_asterisk(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r["type"] == "ws" and r["dir"] == "asterisk->daemon"]


def load(name: str) -> Transcript:
    lines = (FIXTURES / name).read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    return Transcript(records[0], records[1:])


def frame_for(record: dict[str, Any], old_ctx: str, new_ctx: str) -> tuple[int, bytes]:
    """The ``(opcode, payload)`` Asterisk sent, with the context id rewritten.

    Binary records without ``b64`` (after the first second) are ``length`` bytes of μ-law
    silence (0xFF), as the fixtures' README says.
    """
    opcode = record["opcode"]
    if opcode == "text":
        return TEXT, record["text"].replace(old_ctx, new_ctx).encode("utf-8")
    if opcode == "binary":
        if "b64" in record:
            return BINARY, base64.b64decode(record["b64"])
        return BINARY, b"\xff" * record["length"]
    if opcode == "close":
        return CLOSE, base64.b64decode(record["b64"])
    raise ValueError(f"unexpected opcode {opcode}")


# -- the client ----------------------------------------------------------------------------------


@dataclass
class Got:
    opcode: int
    payload: bytes
    at: float

    @property
    def text(self) -> str:
        return self.payload.decode("utf-8")


class FakeChanWebSocket(protocol.Protocol):
    """Speaks to the daemon as chan_websocket: ``handshake`` fires with the response head.

    ``request`` is written on connect (``b""``: nothing, the test writes itself).
    """

    def __init__(
        self, request: bytes, answer_pings: bool = True, answer_close: bool = True
    ) -> None:
        self.request = request
        self.answer_pings = answer_pings
        self.answer_close = answer_close
        self.received: list[Got] = []
        self.response_head = b""
        self.response_raw = b""
        self.lost_reason: Any = None
        self.handshake: defer.Deferred[bytes] = defer.Deferred()
        self.closed: defer.Deferred[None] = defer.Deferred()
        self.decoder = FrameDecoder()
        self._head = True
        self._buf = b""
        self.connected_ = False
        self.waiters: list[tuple[Any, defer.Deferred[None]]] = []

    def connectionMade(self) -> None:
        self.connected_ = True
        if self.request:
            self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        if self._head:
            self._buf += data
            if b"\r\n\r\n" not in self._buf:
                return
            head, _, rest = self._buf.partition(b"\r\n\r\n")
            self.response_head = head
            self._head = False
            if not self.handshake.called:
                self.handshake.callback(head)
            data = rest
            if not head.startswith(b"HTTP/1.1 101"):
                self.response_raw = rest
                return
        if not head_is_101(self.response_head):
            self.response_raw += data
            return
        now = reactor.seconds()
        for opcode, payload in self.decoder.feed(data):
            if opcode == PING and self.answer_pings:
                self.send(PONG, payload)
            self.received.append(Got(opcode, payload, now))
            if opcode == CLOSE and self.answer_close and self.connected_:
                # Asterisk echoes the code and closes its socket at once.
                self.send(CLOSE, payload[:2])
                self.transport.loseConnection()
        self._check_waiters()

    def connectionLost(self, reason: Any = None) -> None:
        self.connected_ = False
        self.lost_reason = reason
        if not self.handshake.called:
            self.handshake.callback(self.response_head)
        self.closed.callback(None)
        self._check_waiters()

    # -- sending --------------------------------------------------------------------------

    def send(self, opcode: int, payload: bytes) -> None:
        if self.connected_:
            self.transport.write(encode_frame(opcode, payload))

    def send_text(self, text: str) -> None:
        self.send(TEXT, text.encode("utf-8"))

    def send_audio(self, ulaw: bytes) -> None:
        self.send(BINARY, ulaw)

    def close_like_asterisk(self, code: int = 1000, reason: str = "") -> None:
        """Close frame, then drop TCP at once (Asterisk does not wait for the reply)."""
        self.send(CLOSE, close_payload(code, reason))
        self.transport.loseConnection()

    def reset(self) -> None:
        """Vanish with a TCP reset, no close frame."""
        self.transport.abortConnection()

    # -- reading --------------------------------------------------------------------------

    def texts(self) -> list[str]:
        return [g.text for g in self.received if g.opcode == TEXT]

    def commands(self) -> list[dict[str, Any] | str]:
        out: list[dict[str, Any] | str] = []
        for text in self.texts():
            out.append(json.loads(text) if text.startswith("{") else text)
        return out

    def audio(self) -> list[bytes]:
        return [g.payload for g in self.received if g.opcode == BINARY]

    def close_frame(self) -> tuple[int, str] | None:
        for g in self.received:
            if g.opcode == CLOSE:
                if len(g.payload) < 2:
                    return (1005, "")
                return struct.unpack("!H", g.payload[:2])[0], g.payload[2:].decode("utf-8")
        return None

    def wait_for(self, predicate: Any, timeout: float = 5.0) -> defer.Deferred[None]:
        """Fires when ``predicate(self)`` holds (checked on each arrival) or fails on timeout."""
        d: defer.Deferred[None] = defer.Deferred()
        if predicate(self):
            d.callback(None)
            return d
        self.waiters.append((predicate, d))
        d.addTimeout(timeout, reactor)
        return d

    def _check_waiters(self) -> None:
        for item in list(self.waiters):
            predicate, d = item
            if d.called:
                self.waiters.remove(item)
            elif predicate(self) or not self.connected_:
                self.waiters.remove(item)
                if predicate(self):
                    d.callback(None)
                else:
                    d.errback(AssertionError("connection closed before the condition held"))


def head_is_101(head: bytes) -> bool:
    return head.startswith(b"HTTP/1.1 101")


def headers_of(head: bytes) -> dict[str, str]:
    out = {}
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, _, value = line.partition(":")
        out[name.strip().lower()] = value.strip()
    return out


def status_of(head: bytes) -> int:
    parts = head.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def media_start_json(
    ctx: str | None,
    channel_id: str = "1795499200.6",
    *,
    fmt: str = "ulaw",
    frame_size: int = 160,
    **variables: str,
) -> str:
    """A MEDIA_START as chan_websocket sends it with ``f(json)`` (fields from the capture);
    ``fmt`` and ``frame_size`` as Asterisk names them for ``c(fmt)`` (``slin16``: 640)."""
    chan_vars = {
        "DIALEDPEERNUMBER": f"rapida/c({fmt})f(json)v(ctx={ctx})",
        "MEDIA_WEBSOCKET_CONNECTION_ID": "rapida",
        "MEDIA_WEBSOCKET_OPTIMAL_FRAME_SIZE": str(frame_size),
    }
    if ctx is not None:
        chan_vars["__RAPIDA_CONTEXT_ID"] = ctx
    chan_vars.update(variables)
    return json.dumps(
        {
            "event": "MEDIA_START",
            "connection_id": "rapida",
            "channel": "WebSocket/rapida/0x5627c0ecf400",
            "channel_id": channel_id,
            "format": fmt,
            "optimal_frame_size": frame_size,
            "ptime": 20,
            "channel_variables": chan_vars,
        },
        separators=(",", ":"),
    )


MEDIA_START_PLAIN = (
    "MEDIA_START connection_id:rapida channel:WebSocket/rapida/0x7fba6c009130 "
    "channel_id:1795501860.10 format:ulaw optimal_frame_size:160 ptime:20"
)
