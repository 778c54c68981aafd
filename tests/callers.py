"""One caller interface over both Asterisk transports, so one test body serves both.

`AudioSocketCaller` wraps `tests.support.FakeAsterisk`; `ChanWebSocketCaller` wraps
`tests.fake_chan_websocket.FakeChanWebSocket` (JSON control, as ``f(json)`` sends it).  Both
register over HTTP, connect, and then speak in the bridge's terms: 20 ms frames of PCM16 8 kHz
out and in, DTMF digits, a hangup, and what the daemon did to end the call.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer, protocol, reactor, task

from rapida_tap.audiosocket.wire import Kind, encode_frame
from rapida_tap.media.codec import pcm_to_ulaw, ulaw_to_pcm
from tests import fake_chan_websocket as fc
from tests.support import API_KEY, FakeAsterisk, connect_audiosocket, register, tone_frame


class Caller:
    """A fake Asterisk channel in a call with the daemon (see the transport subclasses)."""

    transport_name = ""
    ctx = ""

    @property
    def connected(self) -> bool:
        raise NotImplementedError

    @property
    def closed(self) -> defer.Deferred[None]:
        raise NotImplementedError

    def send_audio(self, pcm: bytes) -> None:
        raise NotImplementedError

    def send_dtmf(self, digit: str) -> None:
        raise NotImplementedError

    def hang_up(self) -> None:
        raise NotImplementedError

    def heard(self) -> list[bytes]:
        """Every audio frame the daemon sent, as PCM16 8 kHz, in order."""
        raise NotImplementedError

    def daemon_hangup(self) -> str:
        """How the daemon ended the call, in Asterisk's terms, for assertions."""
        raise NotImplementedError

    def expected_hangup(self) -> str:
        """What `daemon_hangup` says when the daemon hung up as Asterisk expects."""
        raise NotImplementedError

    def flushes(self) -> int | None:
        """``FLUSH_MEDIA`` commands received (None: the transport has no such command)."""
        return None

    def speech(self) -> list[bytes]:
        """What the caller heard that is not silence (all-zero frames left out)."""
        return [f for f in self.heard() if any(f)]

    def talk(self, frames: int | None = None) -> Talker:
        """Start sending a 440 Hz tone, one frame every 20 ms (until hung up, or ``frames``)."""
        return Talker(self, frames)


class Talker:
    """The caller talking: a 440 Hz tone, one 20 ms frame every 20 ms on the real reactor,
    until ``frames`` were sent, `stop`, or the call ends.  What was sent is in ``sent``."""

    def __init__(self, caller: Caller, frames: int | None) -> None:
        self.caller = caller
        self.limit = frames
        self.sent: list[bytes] = []
        self._loop = task.LoopingCall(self._tick)
        self.done = self._loop.start(0.02)
        caller.closed.addBoth(self._stop)

    def _tick(self) -> None:
        if not self.caller.connected or len(self.sent) == self.limit:
            self.stop()
            return
        frame = tone_frame(len(self.sent))
        self.sent.append(frame)
        self.caller.send_audio(frame)

    def _stop(self, result: Any) -> Any:
        if self._loop.running:
            self._loop.stop()
        return result

    def stop(self) -> None:
        self._stop(None)


class AudioSocketCaller(Caller):
    transport_name = "audiosocket"

    def __init__(self, client: FakeAsterisk, ctx: str) -> None:
        self.client = client
        self.ctx = ctx

    @property
    def connected(self) -> bool:
        return self.client.connected_

    @property
    def closed(self) -> defer.Deferred[None]:
        return self.client.closed

    def send_audio(self, pcm: bytes) -> None:
        self.client.send(encode_frame(Kind.SLIN_8K, pcm))

    def send_dtmf(self, digit: str) -> None:
        self.client.send(encode_frame(Kind.DTMF, digit.encode("ascii")))

    def hang_up(self) -> None:
        if self.client.connected_:
            self.client.transport.loseConnection()

    def heard(self) -> list[bytes]:
        return [r.payload for r in self.client.audio()]

    def daemon_hangup(self) -> str:
        if self.client.connected_:
            return "still connected"
        if self.client.received and self.client.received[-1].kind == Kind.HANGUP:
            return "0x00 then close"
        return "close without 0x00"

    def expected_hangup(self) -> str:
        return "0x00 then close"


class ChanWebSocketCaller(Caller):
    transport_name = "websocket"

    def __init__(self, client: fc.FakeChanWebSocket, ctx: str) -> None:
        self.client = client
        self.ctx = ctx

    @property
    def connected(self) -> bool:
        return self.client.connected_

    @property
    def closed(self) -> defer.Deferred[None]:
        return self.client.closed

    def send_audio(self, pcm: bytes) -> None:
        self.client.send_audio(pcm_to_ulaw(pcm))

    def send_dtmf(self, digit: str) -> None:
        event = {"event": "DTMF_END", "channel_id": "1795499200.6", "digit": digit}
        self.client.send_text(json.dumps(event))

    def hang_up(self) -> None:
        if self.client.connected_:
            self.client.close_like_asterisk()

    def heard(self) -> list[bytes]:
        return [ulaw_to_pcm(m) for m in self.client.audio()]

    def commands(self) -> list[str]:
        out = []
        for command in self.client.commands():
            out.append(command.get("command", "?") if isinstance(command, dict) else command)
        return out

    def flushes(self) -> int:
        return self.commands().count("FLUSH_MEDIA")

    def daemon_hangup(self) -> str:
        if self.client.connected_:
            return "still connected"
        close = self.client.close_frame()
        code = "no close frame" if close is None else f"close {close[0]}"
        hangup = "HANGUP then " if self.commands()[-1:] == ["HANGUP"] else ""
        return hangup + code

    def expected_hangup(self) -> str:
        return "HANGUP then close 1000"


@defer.inlineCallbacks
def call_over_audiosocket(daemon: Any, assistant: str, api_key: str = API_KEY) -> Any:
    """Register for ``assistant`` and connect an AudioSocket; fires with the caller.

    ``daemon`` is anything with ``http_port`` and ``as_port`` (an in-process daemon from
    `tests.support.start_daemon`, or the bench's daemon process)."""
    ctx = yield register(daemon.http_port, assistant=assistant, key=api_key)
    client = FakeAsterisk(ctx)
    yield connect_audiosocket(daemon.as_port, client)
    return AudioSocketCaller(client, ctx)


@defer.inlineCallbacks
def call_over_chan_websocket(daemon: Any, assistant: str, api_key: str = API_KEY) -> Any:
    """Register, upgrade as chan_websocket does, send ``MEDIA_START``; fires with the caller."""
    ctx = yield register(daemon.http_port, assistant=assistant, key=api_key)
    client = fc.FakeChanWebSocket(fc.upgrade_request(f"/v1/talk/asterisk/ctx?ctx={ctx}"))
    yield protocol.ClientCreator(reactor, lambda: client).connectTCP("127.0.0.1", daemon.http_port)
    head = yield client.handshake
    if not fc.head_is_101(head):
        raise AssertionError(f"chan_websocket upgrade refused: {head!r}")
    client.send_text(fc.media_start_json(ctx))
    return ChanWebSocketCaller(client, ctx)
