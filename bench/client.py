"""One load-generating client process: many AudioSocket or chan_websocket calls on one epoll loop.

A process runs its share of the calls as plain non-blocking sockets (no framework, so the
client stays cheap and its own CPU is easy to report): per call, register over HTTP exactly as
Asterisk's ``CURL()`` does, then

* ``audiosocket``: connect AudioSocket, send the UUID frame, then numbered PCM tone frames;
* ``websocket`` / ``wss``: connect to ``/v1/talk/asterisk/ctx?ctx=<id>`` (TLS through an
  ``ssl.SSLObject`` over memory BIOs for wss, the lab certificate not verified), upgrade with
  subprotocol ``media``, send a JSON ``MEDIA_START`` carrying ``__RAPIDA_CONTEXT_ID``, then
  numbered μ-law tone frames as masked binary messages, answering pings;

on the chosen pattern until ``stop_at``; read everything the server returns, drain for
``drain`` seconds, hang up (a close frame first on WebSocket, as Asterisk does), close.
`run_worker` is the entry point given to ``multiprocessing``; it returns a picklable dict.
"""

from __future__ import annotations

import errno
import heapq
import math
import os
import random
import select
import socket
import ssl
import time
import uuid
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bench import ws
from bench.frames import FRAME_SECONDS, ULAW_BYTES, audio_frame, identify, identify_ulaw
from bench.stats import EchoTracker
from rapida_tap.audiosocket.wire import AudioSocketDecoder, FrameError, Kind, encode_frame

PACED = "paced"
BURSTY = "bursty"
JITTERED = "jittered"
PATTERNS = (PACED, BURSTY, JITTERED)
AUDIOSOCKET = "audiosocket"
WEBSOCKET = "websocket"
WSS = "wss"
TRANSPORTS = (AUDIOSOCKET, WEBSOCKET, WSS)

# Call states.
_REG_CONNECT, _REG_READ, _AS_CONNECT, _IN_CALL, _DONE, _FAILED = range(6)
_WS_CONNECT, _TLS_HANDSHAKE, _WS_UPGRADE = range(6, 9)
_SLIN8 = int(Kind.SLIN_8K)
_HANGUP = int(Kind.HANGUP)
EARLY = 0.0005  # seconds: write a frame this much before it is due rather than spin


@dataclass(frozen=True)
class WorkerPlan:
    """What one client process does.  Times are absolute ``time.monotonic()`` seconds."""

    starts: tuple[float, ...]  # one per call, ascending
    first_index: int  # index of this process's first call (for caller ids)
    stop_at: float  # stop sending audio
    hold_from: float  # measurement window is [hold_from, stop_at)
    as_port: int
    http_port: int | None  # None: no registration, a random UUID (a peer echo server)
    api_key: str = ""
    assistant: str = "echo"
    pattern: str = PACED
    burst: int = 5  # frames per write, bursty pattern
    jitter: float = 0.010  # seconds, jittered pattern: each frame late by U(0, jitter)
    drain: float = 2.0  # after stop_at, read until everything is back or this long
    cpu: int | None = None  # pin this process to that CPU
    seed: int = 0
    transport: str = AUDIOSOCKET
    ws_port: int | None = None  # the chan_websocket endpoint (websocket/wss)
    lead: int = 3  # the daemon's ws_lead_frames (for the interval statistics)


class _Call:
    __slots__ = (
        "bio_in",
        "bio_out",
        "ctx",
        "decoder",
        "due_base",
        "error",
        "inbox",
        "index",
        "next_frame",
        "out",
        "setup_start",
        "sock",
        "start",
        "state",
        "tls",
        "tracker",
        "ws",
    )

    def __init__(self, index: int, start: float, tracker: EchoTracker) -> None:
        self.index = index
        self.start = start
        self.tracker = tracker
        self.state = _REG_CONNECT
        self.sock: socket.socket | None = None
        self.inbox = b""
        self.out = b""
        self.error = ""
        self.setup_start = math.nan
        self.decoder = AudioSocketDecoder(max_audio_payload=65535)
        self.next_frame = 1
        self.due_base = 0.0
        self.ctx = ""
        self.ws = ws.ServerFrames()
        self.tls: ssl.SSLObject | None = None
        self.bio_in: ssl.MemoryBIO | None = None
        self.bio_out: ssl.MemoryBIO | None = None


def registration_request(assistant: str, caller: str, api_key: str) -> bytes:
    """The GET func_curl sends (see tests/support.py ``curl_get``)."""
    return (
        f"GET /v1/talk/asterisk/call/{assistant}?from={caller} HTTP/1.1\r\n"
        "Host: 127.0.0.1\r\nUser-Agent: asterisk-libcurl-agent/1.0\r\nAccept: */*\r\n"
        f"X-Api-Key: {api_key}\r\n\r\n"
    ).encode("latin-1")


def ws_path(ctx: str) -> str:
    """The chan_websocket endpoint's path for context ``ctx`` (``v(ctx=…)`` in the dial string)."""
    return f"/v1/talk/asterisk/ctx?ctx={ctx}"


def parse_reply(data: bytes) -> tuple[int, bytes]:
    """``(status, body)`` of a whole HTTP/1.1 reply (the server closed after it); 0 if garbled."""
    head, _, body = data.partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        return 0, b""
    return int(parts[1]), body


def register(port: int, assistant: str, caller: str, api_key: str, timeout: float = 5.0) -> str:
    """One registration as ``CURL()`` makes it, blocking: the context id (RuntimeError if not
    200)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(registration_request(assistant, caller, api_key))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status, body = parse_reply(data)
    if status != 200:
        raise RuntimeError(f"registration answered {status}")
    return body.decode("ascii")


def run_worker(plan: WorkerPlan) -> dict[str, Any]:
    """Run the plan to the end and return its raw results (see `bench.load.summarize`)."""
    if plan.transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, not {plan.transport!r}")
    if plan.cpu is not None:
        os.sched_setaffinity(0, {plan.cpu})
    rng = random.Random(plan.seed)
    intervals: array[float] = array("d")
    latencies: array[float] = array("d")
    early: array[float] = array("d")
    late: array[float] = array("d")
    lag: array[float] = array("d")
    calls = [
        _Call(plan.first_index + i, start, echo_tracker(plan, intervals, latencies, early, late))
        for i, start in enumerate(plan.starts)
    ]
    by_fd: dict[int, _Call] = {}
    heap: list[tuple[float, int]] = []
    ep = select.epoll()
    request_for = {}
    blocked = 0
    period = FRAME_SECONDS * (plan.burst if plan.pattern == BURSTY else 1)
    uuid_rng = random.Random(plan.seed ^ 0x5EED)
    websocket = plan.transport != AUDIOSOCKET
    frame_of = ws.audio_frame if websocket else audio_frame
    tls_context = None
    if plan.transport == WSS:
        tls_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        tls_context.check_hostname = False
        tls_context.verify_mode = ssl.CERT_NONE  # the bench's own lab certificate
    host = f"127.0.0.1:{plan.ws_port}"

    def close(call: _Call) -> None:
        sock = call.sock
        if sock is not None:
            by_fd.pop(sock.fileno(), None)
            try:
                ep.unregister(sock.fileno())
            except (OSError, ValueError):
                pass
            sock.close()
            call.sock = None

    def fail(call: _Call, why: str) -> None:
        call.state = _FAILED
        call.error = why
        close(call)

    def connect(call: _Call, port: int, state: int) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex(("127.0.0.1", port))
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            fail(call, f"connect: {errno.errorcode.get(err, err)}")
            return
        call.sock = sock
        call.state = state
        by_fd[sock.fileno()] = call
        ep.register(sock.fileno(), select.EPOLLOUT)

    def begin(call: _Call, now: float) -> None:
        call.setup_start = now
        if plan.http_port is None:
            call.inbox = uuid.UUID(int=uuid_rng.getrandbits(128), version=4).bytes
            connect(call, plan.as_port, _AS_CONNECT)
        else:
            request_for[call.index] = registration_request(
                plan.assistant, f"bench{call.index}", plan.api_key
            )
            connect(call, plan.http_port, _REG_CONNECT)

    def write(call: _Call, data: bytes) -> None:
        nonlocal blocked
        sock = call.sock
        assert sock is not None
        if call.out:
            blocked += 1
            data = call.out + data
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as e:
            fail(call, f"send: {e.strerror}")
            return
        call.out = data[sent:]

    def send(call: _Call, data: bytes) -> None:
        """Application bytes: through TLS first on wss."""
        tls = call.tls
        if tls is None:
            write(call, data)
            return
        assert call.bio_out is not None
        tls.write(data)
        write(call, call.bio_out.read())

    def flush_tls(call: _Call) -> None:
        assert call.bio_out is not None
        if call.bio_out.pending:
            write(call, call.bio_out.read())

    def start_media(call: _Call, now: float) -> None:
        call.state = _IN_CALL
        call.due_base = now
        call.next_frame = 1
        first = now + (plan.burst - 1) * FRAME_SECONDS if plan.pattern == BURSTY else now
        heapq.heappush(heap, (first, call.index - plan.first_index))

    def send_due(call: _Call, due: float, now: float) -> None:
        lag.append(now - due)
        k = call.next_frame
        if plan.pattern == BURSTY:
            data = b"".join(frame_of(k + i) for i in range(plan.burst))
            for _ in range(plan.burst):
                call.tracker.sent(now)
            call.next_frame = k + plan.burst
        else:
            data = frame_of(k)
            call.tracker.sent(now)
            call.next_frame = k + 1
        send(call, data)
        if call.state == _IN_CALL:
            heapq.heappush(heap, (_due(call, plan, period, rng), call.index - plan.first_index))

    def connected(call: _Call, sock: socket.socket, state: int, now: float) -> None:
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            fail(call, f"connect: {errno.errorcode.get(err, err)}")
            return
        ep.modify(sock.fileno(), select.EPOLLIN)
        if state == _REG_CONNECT:
            call.state = _REG_READ
            write(call, request_for.pop(call.index))
        elif state == _AS_CONNECT:
            write(call, encode_frame(Kind.UUID, call.inbox))
            call.inbox = b""
            start_media(call, now)
        elif tls_context is not None:
            call.bio_in, call.bio_out = ssl.MemoryBIO(), ssl.MemoryBIO()
            call.tls = tls_context.wrap_bio(call.bio_in, call.bio_out)
            call.state = _TLS_HANDSHAKE
            handshake(call)
        else:
            call.state = _WS_UPGRADE
            write(call, ws.upgrade_request(ws_path(call.ctx), host))

    def handshake(call: _Call) -> bool:
        """Drive the TLS handshake; True once it is done (the upgrade is then sent)."""
        assert call.tls is not None
        try:
            call.tls.do_handshake()
        except ssl.SSLWantReadError:
            flush_tls(call)
            return False
        except ssl.SSLError as e:
            fail(call, f"TLS: {e.reason or e}")
            return False
        flush_tls(call)
        call.state = _WS_UPGRADE
        send(call, ws.upgrade_request(ws_path(call.ctx), host))
        return True

    def decrypt(call: _Call, data: bytes) -> bytes | None:
        """The plaintext in ``data`` (b"": none yet; None: the TLS session ended or failed)."""
        tls, bio_in = call.tls, call.bio_in
        assert tls is not None and bio_in is not None
        bio_in.write(data)
        if call.state == _TLS_HANDSHAKE and not handshake(call):
            return None if call.state == _FAILED else b""
        chunks = []
        while True:
            try:
                chunks.append(tls.read(65536))
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b"".join(chunks) or None
            except ssl.SSLError as e:
                call.error = f"TLS: {e.reason or e}"
                return None
        flush_tls(call)  # e.g. a TLS 1.3 key update
        return b"".join(chunks)

    def server_closed(call: _Call, now: float, why: str) -> None:
        if now < plan.stop_at:
            fail(call, call.error or why)
        else:
            call.state = _DONE
            close(call)

    def websocket_data(call: _Call, data: bytes, now: float) -> None:
        if call.state == _WS_UPGRADE:
            call.inbox += data
            if b"\r\n\r\n" not in call.inbox:
                return
            head, _, data = call.inbox.partition(b"\r\n\r\n")
            call.inbox = b""
            try:
                ws.check_upgrade(head)
            except ws.HandshakeFailed as e:
                fail(call, f"websocket: {e}")
                return
            send(call, ws.media_start(call.ctx, call.index))
            start_media(call, now)
            if not data:
                return
        try:
            messages = call.ws.feed(data)
        except ws.BadServerFrame as e:
            fail(call, f"bad frame from server: {e}")
            return
        received = call.tracker.received
        for opcode, payload in messages:
            if opcode == ws.BINARY:
                if len(payload) == ULAW_BYTES:
                    received(identify_ulaw(payload), now)
                else:  # whole frames in one message are allowed; a partial one is not
                    for at in range(0, len(payload), ULAW_BYTES):
                        received(identify_ulaw(payload[at : at + ULAW_BYTES]), now)
            elif opcode == ws.PING:
                send(call, ws.client_frame(ws.PONG, payload))
            elif opcode == ws.CLOSE:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                reason = payload[2:].decode("utf-8", "replace")
                server_closed(call, now, f"server closed the websocket: {code} {reason}".strip())
                return
            elif opcode == ws.TEXT and b"HANGUP" in payload and now < plan.stop_at:
                fail(call, "server sent HANGUP")
                return

    def event(call: _Call, mask: int, now: float) -> None:
        sock = call.sock
        assert sock is not None
        state = call.state
        if state in (_REG_CONNECT, _AS_CONNECT, _WS_CONNECT):
            connected(call, sock, state, now)
            return
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as e:
            data = b""
            call.error = f"recv: {e.strerror}"
        if state == _REG_READ:
            if data:
                call.inbox += data
                return
            status, body = parse_reply(call.inbox)
            close(call)
            if status != 200 or len(body) != 36:
                fail(call, f"registration: HTTP {status}")
                return
            if websocket:
                call.inbox = b""
                call.ctx = body.decode("ascii")
                assert plan.ws_port is not None
                connect(call, plan.ws_port, _WS_CONNECT)
            else:
                call.inbox = uuid.UUID(body.decode("ascii")).bytes
                connect(call, plan.as_port, _AS_CONNECT)
            return
        if not data:  # the server hung up
            server_closed(call, now, "server closed the call")
            return
        if websocket:
            if call.tls is not None:
                plain = decrypt(call, data)
                if plain is None:
                    if call.state != _FAILED:
                        server_closed(call, now, "server ended the TLS session")
                    return
                if not plain:
                    return
                data = plain
            websocket_data(call, data, now)
            return
        try:
            frames = call.decoder.feed(data)
        except FrameError as e:
            fail(call, f"bad frame from server: {e}")
            return
        received = call.tracker.received
        for kind, payload in frames:
            if kind == _SLIN8:
                received(identify(payload), now)
            elif kind == _HANGUP:
                if now < plan.stop_at:
                    fail(call, "server sent a hangup frame")
                return
            else:
                received(-1, now)

    def hang_up(call: _Call) -> None:
        """As Asterisk does: a close frame (WebSocket), then drop TCP without waiting."""
        if websocket and call.sock is not None and call.state == _IN_CALL:
            try:
                send(call, ws.close_frame(1000))
            except (OSError, ssl.SSLError):
                pass
        close(call)

    cpu0 = time.process_time()
    wall0 = time.monotonic()
    end = plan.stop_at + plan.drain
    next_start = 0
    hold_from = hold_to = None  # (process time, wall time) when the loop saw the hold begin, end
    try:
        while True:
            now = time.monotonic()
            if hold_to is None and now >= plan.hold_from:
                if hold_from is None:
                    hold_from = (time.process_time(), now)
                elif now >= plan.stop_at:
                    hold_to = (time.process_time(), now)
            if now >= end or (now >= plan.stop_at and _all_echoed(calls)):
                break
            while next_start < len(calls) and calls[next_start].start <= now:
                begin(calls[next_start], now)
                next_start += 1
            if now < plan.stop_at:
                soon = now + EARLY
                while heap and heap[0][0] <= soon:
                    due, i = heapq.heappop(heap)
                    call = calls[i]
                    if call.state == _IN_CALL:
                        send_due(call, due, now)
            wake = end
            if heap and now < plan.stop_at:
                wake = min(wake, heap[0][0], plan.stop_at)
            if next_start < len(calls):
                wake = min(wake, calls[next_start].start)
            # epoll rounds its timeout up to whole ms; frames due within EARLY go out now,
            # so the client never spins (it shares a CPU with others) and is at most ~0.5 ms
            # early or late.
            events = ep.poll(max(0.0, wake - time.monotonic() - EARLY))
            now = time.monotonic()
            for fd, mask in events:
                ready = by_fd.get(fd)
                if ready is not None:
                    event(ready, mask, now)
    finally:
        for call in calls:
            hang_up(call)
            if call.state in (_IN_CALL, _DONE):
                call.state = _DONE
            elif call.state != _FAILED:
                call.state = _FAILED
                call.error = call.error or "not set up before the end"
        ep.close()
    cpu1 = time.process_time()
    outcomes = [(c.tracker, c.error if c.state == _FAILED else None, c.setup_start) for c in calls]
    return worker_results(
        outcomes,
        intervals,
        latencies,
        early,
        late,
        lag,
        blocked,
        cpu_seconds=cpu1 - cpu0,
        hold_share=_share(hold_from, hold_to),
        wall_seconds=time.monotonic() - wall0,
    )


def _share(start: tuple[float, float] | None, end: tuple[float, float] | None) -> float:
    """CPU time over wall time between two (process time, wall time) samples; NaN without both."""
    if start is None or end is None or end[1] <= start[1]:
        return math.nan
    return (end[0] - start[0]) / (end[1] - start[1])


def _all_echoed(calls: list[_Call]) -> bool:
    for call in calls:
        if call.state == _IN_CALL and call.tracker.expect < len(call.tracker.send_times):
            return False
    return True


def echo_tracker(
    plan: WorkerPlan,
    intervals: array[float],
    latencies: array[float],
    early: array[float],
    late: array[float],
) -> EchoTracker:
    lead = None if plan.transport == AUDIOSOCKET else plan.lead
    return EchoTracker(plan.hold_from, plan.stop_at, intervals, latencies, early, late, lead)


def _due(call: _Call, plan: WorkerPlan, period: float, rng: random.Random) -> float:
    """When ``call.next_frame`` (or the burst ending at it) is written."""
    k = call.next_frame - 1  # frames written so far
    if plan.pattern == BURSTY:
        return call.due_base + (k + plan.burst - 1) * FRAME_SECONDS
    due = call.due_base + k * FRAME_SECONDS
    if plan.pattern == JITTERED:
        due += rng.uniform(0.0, plan.jitter)
    return due


def worker_results(
    outcomes: Sequence[tuple[EchoTracker, str | None, float]],
    intervals: array[float],
    latencies: array[float],
    early: array[float],
    late: array[float],
    lag: array[float],
    blocked: int,
    *,
    cpu_seconds: float,
    hold_share: float,
    wall_seconds: float,
) -> dict[str, Any]:
    """A client process's raw results (see `bench.load.summarize`), whichever client ran it.

    ``outcomes``: per call, its tracker, why it failed (None if it did not) and when its set-up
    began; the arrays are the ones its trackers filled; CPU and wall time are the loop's, and
    ``hold_share`` the share of a core it used over the hold window (NaN if it never saw it).
    """
    errors: dict[str, int] = {}
    setup: list[float] = []
    totals = dict.fromkeys(
        ("sent", "echoed", "lost", "duplicated", "corrupt", "silence", "underruns"), 0
    )
    for t, error, setup_start in outcomes:
        if error is not None:
            errors[error] = errors.get(error, 0) + 1
        t.finish()
        if t.first_echo_at is not None:
            setup.append(t.first_echo_at - setup_start)
        totals["sent"] += t.sent_frames
        totals["echoed"] += t.echoed
        totals["lost"] += t.lost
        totals["duplicated"] += t.duplicated
        totals["corrupt"] += t.corrupt
        totals["silence"] += t.silence
        totals["underruns"] += t.underruns
    return {
        "calls": len(outcomes),
        "failed": sum(errors.values()),
        "errors": errors,
        **totals,
        "setup": setup,
        "intervals": intervals,
        "latencies": latencies,
        "early": early,
        "late": late,
        "lag": lag,
        "blocked_writes": blocked,
        "cpu_seconds": cpu_seconds,
        "hold_share": hold_share,
        "wall_seconds": wall_seconds,
    }
