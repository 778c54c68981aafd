"""Drain: SIGTERM the daemon while N AudioSocket calls of different lengths are live.

Each call registers, connects, sends 20 ms frames and hangs up by itself after its own
length (spread evenly from ``shortest`` to ``longest`` seconds).  ``sigterm_at`` seconds
after the last call started the daemon gets SIGTERM; with ``second_sigterm_at`` it gets
another one then.  A call is *cut* when the daemon ended it (its hangup frame, or the
connection closed) before the caller hung up.  The daemon must exit 0 after the last call.
"""

from __future__ import annotations

import selectors
import signal
import socket
import time
import uuid
from typing import Any

from bench import server as servers
from bench.client import register
from rapida_tap.audiosocket.wire import AudioSocketDecoder, FrameError, Kind, encode_frame

FRAME = encode_frame(Kind.SLIN_8K, bytes(320))


class _Call:
    def __init__(self, sock: socket.socket, length: float) -> None:
        self.sock = sock
        self.length = length
        self.decoder = AudioSocketDecoder(max_audio_payload=65535)
        self.frames_back = 0
        self.ended_by: str | None = None  # "caller", "daemon-hangup", "daemon-closed"


def drain(
    calls: int,
    shortest: float,
    longest: float,
    sigterm_at: float,
    second_sigterm_at: float | None,
    env: dict[str, str],
) -> dict[str, Any]:
    server = servers.start_daemon(None, extra_env=env)
    assert server.http_port is not None
    try:
        sel = selectors.DefaultSelector()
        live: list[_Call] = []
        for i in range(calls):
            ctx = register(server.http_port, "echo", f"drain{i}", servers.API_KEY)
            sock = socket.create_connection(("127.0.0.1", server.as_port))
            sock.sendall(encode_frame(Kind.UUID, uuid.UUID(ctx).bytes))
            sock.setblocking(False)
            length = shortest + (longest - shortest) * i / max(calls - 1, 1)
            call = _Call(sock, length)
            live.append(call)
            sel.register(sock, selectors.EVENT_READ, call)
        t0 = time.monotonic()
        next_frame = t0
        signals = [(t0 + sigterm_at, "SIGTERM")]
        if second_sigterm_at is not None:
            signals.append((t0 + second_sigterm_at, "second SIGTERM"))
        sent_at: dict[str, float] = {}
        while any(c.ended_by is None for c in live):
            now = time.monotonic()
            for at, name in signals:
                if now >= at and name not in sent_at:
                    server.process.send_signal(signal.SIGTERM)
                    sent_at[name] = now - t0
            if now >= next_frame:
                next_frame += 0.02
                for c in live:
                    if c.ended_by is not None:
                        continue
                    if now - t0 >= c.length:
                        _hang_up(sel, c)
                        continue
                    try:
                        c.sock.send(FRAME)
                    except OSError:
                        pass
            for key, _ in sel.select(timeout=0.005):
                _read(sel, key.data)
        exit_code = server.process.wait(timeout=30)
        exited_at = time.monotonic() - t0
        cut = [c for c in live if c.ended_by != "caller"]
        return {
            "calls": calls,
            "cut_by_daemon": len(cut),
            "cut_with_hangup_frame": sum(c.ended_by == "daemon-hangup" for c in cut),
            "signals_at": sent_at,
            "longest_call": longest,
            "daemon_exit_code": exit_code,
            "daemon_exited_at": round(exited_at, 1),
            "every_call_echoed": all(c.frames_back > 0 for c in live),
        }
    finally:
        server.stop()


def _hang_up(sel: selectors.BaseSelector, c: _Call) -> None:
    c.ended_by = "caller"
    try:
        c.sock.send(encode_frame(Kind.HANGUP))
    except OSError:
        pass
    sel.unregister(c.sock)
    c.sock.close()


def _read(sel: selectors.BaseSelector, c: _Call) -> None:
    try:
        data = c.sock.recv(65536)
    except BlockingIOError:
        return
    except OSError:
        data = b""
    if not data:
        c.ended_by = c.ended_by or "daemon-closed"
        sel.unregister(c.sock)
        c.sock.close()
        return
    try:
        frames = c.decoder.feed(data)
    except FrameError:
        frames = []
    for frame in frames:
        if frame.kind == Kind.HANGUP:
            c.ended_by = "daemon-hangup"
        else:
            c.frames_back += 1
