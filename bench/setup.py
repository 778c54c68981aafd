"""Set-up: what one call's set-up and end cost the daemon, one call at a time.

Each call does what an Asterisk call does, and nothing more: it registers, connects (over
wss:// with a TLS handshake), identifies itself (AudioSocket: the UUID frame; chan_websocket:
the upgrade and ``MEDIA_START``), sends one frame of audio and hangs up (a hangup frame, or a
close 1000).  The calls run one after another, so the daemon never has two to handle at once:
its CPU over the run, divided by the calls, is the cost of one call's set-up and end, without
the audio of a real call and without the queueing of a ramp.
"""

from __future__ import annotations

import socket
import ssl
import statistics
import time
import uuid
from typing import Any

from bench import server as servers
from bench import ws
from bench.client import AUDIOSOCKET, WSS, register, ws_path
from rapida_tap.audiosocket.wire import HANGUP_FRAME, Kind, encode_frame

_AUDIO = encode_frame(Kind.SLIN_8K, bytes(320))
_TIMEOUT = 10.0


def _read_until_closed(sock: socket.socket | ssl.SSLSocket) -> None:
    try:
        while sock.recv(4096):
            pass
    except (ConnectionError, ssl.SSLError):
        pass  # the daemon dropped TCP after its close frame, as it may


def _audiosocket_call(server: servers.Server, ctx: str) -> None:
    with socket.create_connection(("127.0.0.1", server.as_port), timeout=_TIMEOUT) as sock:
        sock.sendall(encode_frame(Kind.UUID, uuid.UUID(ctx).bytes) + _AUDIO + HANGUP_FRAME)
        _read_until_closed(sock)


def _websocket_call(
    server: servers.Server, ctx: str, index: int, tls: ssl.SSLContext | None
) -> None:
    assert server.ws_port is not None
    raw = socket.create_connection(("127.0.0.1", server.ws_port), timeout=_TIMEOUT)
    sock = tls.wrap_socket(raw) if tls is not None else raw
    with sock:
        sock.sendall(ws.upgrade_request(ws_path(ctx), f"127.0.0.1:{server.ws_port}"))
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                raise ws.HandshakeFailed("closed during the upgrade")
            head += chunk
        ws.check_upgrade(head.partition(b"\r\n\r\n")[0])
        sock.sendall(ws.media_start(ctx, index) + ws.audio_frame(1) + ws.close_frame(1000))
        _read_until_closed(sock)


def setup_cost(
    transport: str = AUDIOSOCKET, calls: int = 200, core: int | None = 1, source: str | None = None
) -> dict[str, Any]:
    """Run ``calls`` calls one at a time against a fresh daemon; the daemon's CPU per call."""
    server = servers.start_daemon(core=core, tls=transport == WSS, source=source)
    tls = None
    if transport == WSS:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        tls.check_hostname = False
        tls.verify_mode = ssl.CERT_NONE  # Asterisk's verify_server_cert = no
    try:
        for index in range(5):  # warm up: first-use imports and caches are not set-up cost
            _one(server, transport, index, tls)
        server.wait_calls_ended(5)
        cpu_before = servers.cpu_seconds(server.pid)
        began = time.monotonic()
        walls = []
        for index in range(5, 5 + calls):
            started = time.monotonic()
            _one(server, transport, index, tls)
            walls.append(time.monotonic() - started)
        elapsed = time.monotonic() - began
        ended = server.wait_calls_ended(5 + calls)
        cpu = servers.cpu_seconds(server.pid) - cpu_before
    finally:
        server.stop()
    return {
        "transport": transport,
        "calls": calls,
        "calls_ended": (ended[0] - 5) if ended else None,
        "daemon_cpu_ms_per_call": 1000 * cpu / calls,
        "daemon_cpu_share": cpu / elapsed,
        "call_wall_ms_p50": 1000 * statistics.median(walls),
    }


def _one(server: servers.Server, transport: str, index: int, tls: ssl.SSLContext | None) -> None:
    assert server.http_port is not None
    ctx = register(server.http_port, "echo", f"setup{index}", servers.API_KEY, _TIMEOUT)
    if transport == AUDIOSOCKET:
        _audiosocket_call(server, ctx)
    else:
        _websocket_call(server, ctx, index, tls)
