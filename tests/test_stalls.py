"""A stall of the whole process (a garbage collection, a slow callback) while the reactor
dispatches I/O: a caller's frame that arrived during it still goes out on its tick.

The reactor reads a batch of events, then fires the timers that fell due meanwhile: a frame
that arrived during a stall in that batch was not in it, and without a read first its tick
would find the call's queue empty (a click) and send it a tick late.  Real sockets and the
real reactor; the caller is a thread on its own clock, as Asterisk is, and the stall a busy
wait in another connection's ``dataReceived``, as a collection would be.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.internet.base import ReactorBase
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from rapida_tap.audiosocket.wire import Kind, encode_frame
from rapida_tap.node import poll_without_waiting
from tests.support import register, start_daemon, tone, wait_until

FRAMES = 12
STALLED_FRAME = 8  # the frame that arrives during the stall


class Stall(protocol.Protocol):
    """Holds the reactor, when its byte arrives, until 3 ms after the call's next tick."""

    call: Any = None
    began = threading.Event()

    def dataReceived(self, data: bytes) -> None:
        until = time.monotonic() + self.call._pacer.until_next_tick(self.call) + 0.003
        self.began.set()
        while time.monotonic() < until:
            pass


def caller(port: int, ctx: str, stall_port: int, began: threading.Event) -> None:
    """Asterisk: the UUID frame, then a frame every 20 ms on its own clock; before the stalled
    frame it pokes the stall and waits until the stall has begun."""
    frames = tone(FRAMES)
    with (
        socket.create_connection(("127.0.0.1", port)) as s,
        socket.create_connection(("127.0.0.1", stall_port)) as poke,
    ):
        s.sendall(encode_frame(Kind.UUID, uuid.UUID(ctx).bytes))
        start = time.monotonic() + 0.02
        for i, frame in enumerate(frames):
            time.sleep(max(0.0, start + i * 0.02 - time.monotonic()))
            if i == STALLED_FRAME:
                poke.sendall(b"!")
                began.wait(5)
            s.sendall(encode_frame(Kind.SLIN_8K, frame))
        time.sleep(0.1)


class StalledTickTests(TestCase):
    timeout = 20

    @defer.inlineCallbacks
    def queue_at_the_stalled_tick(self, read_pending: bool) -> Any:
        daemon = start_daemon(self)
        if not read_pending:
            daemon.bridge.pacer.read_pending = None
        stall = Stall()
        stall.began = threading.Event()
        factory = protocol.Factory.forProtocol(lambda: stall)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        ctx = yield register(daemon.http_port)
        thread = threading.Thread(
            target=caller, args=(daemon.as_port, ctx, port.getHost().port, stall.began)
        )
        thread.start()
        self.addCleanup(thread.join)
        yield wait_until(lambda: ctx in daemon.bridge.calls)
        call = stall.call = daemon.bridge.calls[ctx]
        seen: list[int] = []
        pace = call.pace

        def spy(catch_up: bool) -> None:
            if stall.began.is_set():
                seen.append(len(call._queue))
            pace(catch_up)

        call.pace = spy  # type: ignore[method-assign]
        yield wait_until(lambda: len(seen) >= 1)
        return seen[0]

    @defer.inlineCallbacks
    def test_the_frame_that_arrived_during_the_stall_goes_out_on_its_tick(self) -> Any:
        queued = yield self.queue_at_the_stalled_tick(read_pending=True)
        self.assertEqual(queued, 1)

    @defer.inlineCallbacks
    def test_without_reading_first_the_stalled_tick_finds_nothing_to_send(self) -> Any:
        queued = yield self.queue_at_the_stalled_tick(read_pending=False)
        self.assertEqual(queued, 0)


class _Polls:
    def __init__(self) -> None:
        self.delays: list[float | None] = []

    def doIteration(self, delay: float | None) -> None:
        self.delays.append(delay)


class _NoPoll(ReactorBase):
    """A reactor that keeps ReactorBase's doIteration, which raises (asyncio's)."""


def test_the_pacer_polls_without_waiting_only_where_the_reactor_has_a_poll() -> None:
    polls = _Polls()
    read = poll_without_waiting(polls)
    assert read is not None
    read()
    assert polls.delays == [0]
    assert poll_without_waiting(object.__new__(_NoPoll)) is None
    assert poll_without_waiting(Clock()) is None
    assert poll_without_waiting(reactor) is not None  # the tests' epoll reactor
