"""The private library attributes the hot paths use are checked at start-up, loudly."""

from __future__ import annotations

import pprint
import socket
import struct
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import txaio
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket import protocol as autobahn_protocol
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet import abstract, epollreactor, selectreactor, tcp
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python import context, log
from twisted.python.failure import Failure

from rapida_tap import internals
from tests.support import LogCapture


def test_the_installed_libraries_have_what_the_daemon_relies_on() -> None:
    internals.check()


def test_a_library_without_it_stops_the_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(WebSocketProtocol, "SEND_STATE_GROUND")
    with pytest.raises(internals.LibraryChanged, match="SEND_STATE_GROUND"):
        internals.check()


def test_direct_socket_only_for_plain_tcp() -> None:
    from twisted.internet.testing import StringTransport

    assert internals.direct_socket(StringTransport()) is None


def test_a_node_on_its_defaults_loads_neither_numpy_nor_a_test_framework() -> None:
    """numpy and soxr (about 12 MB) load with the first resampler or recording, not at start;
    Twisted's test helpers (trial, unittest, doctest: 2 MB) never; the Redis client only for
    Redis."""
    import subprocess
    import sys

    code = (
        "import sys; from rapida_tap.tap import Options, makeService; o = Options(); "
        "o.parseOptions(['--http', 'tcp:0:interface=127.0.0.1', "
        "'--audiosocket', 'tcp:0:interface=127.0.0.1']); makeService(o); "
        "print(sorted(m for m in ('numpy', 'doctest', 'unittest', 'twisted.trial', 'txredisapi') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stderr


# -- the epoll reactor's event dispatch ------------------------------------------------------


class Reader(abstract.FileDescriptor):
    """Reads one end of a socketpair; ``fail`` makes its next read raise."""

    def __init__(self, reactor: Any, sock: socket.socket) -> None:
        super().__init__(reactor)
        self.sock = sock
        self.got: list[bytes] = []
        self.fail = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return "reader"  # what Twisted's own dispatch would put in the log context

    def doRead(self) -> None:
        if self.fail:
            self.fail = False
            raise RuntimeError("boom")
        self.got.append(self.sock.recv(100))


def test_epoll_events_reach_their_connection_without_the_log_context() -> None:
    reactor = epollreactor.EPollReactor()
    a, b = socket.socketpair()
    try:
        assert internals.dispatch_events_directly(reactor) is True
        reader = Reader(reactor, a)
        reactor.addReader(reader)
        b.send(b"frame")
        reactor.doIteration(1)
        assert reader.got == [b"frame"]
        seen: list[object] = []
        reader.doRead = lambda: seen.append(context.get(log.ILogContext)["system"])  # type: ignore[method-assign]
        b.send(b"x")
        reactor.doIteration(1)
        assert seen == ["-"]  # no per-event context was pushed
    finally:
        reactor.removeAll()
        reactor._poller.close()
        a.close()
        b.close()


def test_a_failing_connection_is_dropped_and_the_others_go_on() -> None:
    reactor = epollreactor.EPollReactor()
    pairs = [socket.socketpair() for _ in range(2)]
    try:
        internals.dispatch_events_directly(reactor)
        bad, good = Reader(reactor, pairs[0][0]), Reader(reactor, pairs[1][0])
        bad.fail = True
        bad.connectionLost = lambda reason: None  # type: ignore[method-assign]
        reactor.addReader(bad)
        reactor.addReader(good)
        for _, other in pairs:
            other.send(b"x")
        logs = LogCapture()
        globalLogPublisher.addObserver(logs)
        try:
            reactor.doIteration(1)  # Twisted logs the failure and disconnects the reader
        finally:
            globalLogPublisher.removeObserver(logs)
        assert good.got == [b"x"]
        assert bad not in reactor.getReaders()
        assert "boom" in logs.text()
    finally:
        reactor.removeAll()
        reactor._poller.close()
        for a, b in pairs:
            a.close()
            b.close()


def test_other_reactors_are_left_alone() -> None:
    reactor = selectreactor.SelectReactor()
    before = reactor.doIteration
    assert internals.dispatch_events_directly(reactor) is False
    assert reactor.doIteration == before


def test_autobahn_pretty_prints_no_settings_for_a_debug_line_it_drops(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(autobahn_protocol, "pformat", autobahn_protocol.pformat)  # put back after
    level = txaio.get_global_log_level()
    txaio.set_global_log_level("info")
    try:
        assert internals.defer_autobahn_settings_dump()
        assert not internals.defer_autobahn_settings_dump()  # once is enough
        real = pprint.pformat
        dumped: list[object] = []

        def counting(value: object, *args: Any, **kwargs: Any) -> str:
            dumped.append(value)
            return real(value, *args, **kwargs)

        monkeypatch.setattr(pprint, "pformat", counting)
        factory = WebSocketServerFactory()
        factory.protocol = WebSocketServerProtocol
        factory.setProtocolOptions(openHandshakeTimeout=0)  # no timer left on the reactor
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        assert dumped == []  # the settings of the new connection were never formatted
        settings = [("openHandshakeTimeout", 5, "WebSocketServerFactory")]
        written = f"\n{autobahn_protocol.pformat(settings)}"  # as the line would be written
        assert written == "\n" + real(settings)
        assert dumped == [settings]
    finally:
        txaio.set_global_log_level(level)


class Echo(Protocol):
    """Records what arrives; ``fail`` makes its next input raise."""

    def __init__(self) -> None:
        self.got: list[bytes] = []
        self.lost: Failure | None = None
        self.fail = False

    def dataReceived(self, data: bytes) -> None:
        if self.fail:
            raise RuntimeError("boom")
        self.got.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = reason


class Served:
    """TCP connections accepted by a fresh epoll reactor (iterated by hand), each with the
    plain client socket at the other end."""

    def __init__(self) -> None:
        self.reactor = epollreactor.EPollReactor()
        assert internals.dispatch_events_directly(self.reactor)
        self.protocols: list[Echo] = []
        factory = Factory.forProtocol(self._build)
        self.port = self.reactor.listenTCP(0, factory, interface="127.0.0.1")

    def _build(self) -> Echo:
        self.protocols.append(Echo())
        return self.protocols[-1]

    def connect(self) -> tuple[socket.socket, Echo]:
        client = socket.create_connection(("127.0.0.1", self.port.getHost().port))
        count = len(self.protocols)
        self.until(lambda: len(self.protocols) > count)
        return client, self.protocols[-1]

    def until(self, done: Callable[[], bool]) -> None:
        for _ in range(50):
            if done():
                return
            self.reactor.doIteration(0.1)
        raise AssertionError("the reactor never got there")

    def close(self) -> None:
        self.port.stopListening()
        self.reactor.removeAll()
        self.reactor._poller.close()


@pytest.fixture
def served() -> Iterator[Served]:
    s = Served()
    yield s
    s.close()


def test_tcp_input_reaches_the_protocol_and_a_close_ends_the_connection(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, proto = served.connect()
    general: list[int] = []
    monkeypatch.setattr(tcp.Server, "doRead", lambda self: general.append(1))
    client.sendall(b"frame")
    served.until(lambda: proto.got == [b"frame"])
    client.close()
    served.until(lambda: proto.lost is not None)
    assert proto.lost is not None and proto.lost.check(ConnectionDone)
    assert general == []  # read here, not through Connection.doRead


def test_a_reset_connection_is_lost(served: Served) -> None:
    client, proto = served.connect()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()  # RST
    served.until(lambda: proto.lost is not None)
    assert proto.lost is not None and proto.lost.check(ConnectionLost)


def test_a_protocol_that_raises_is_dropped_with_a_log_line_and_others_go_on(
    served: Served,
) -> None:
    (bad_client, bad), (good_client, good) = served.connect(), served.connect()
    bad.fail = True
    logs = LogCapture()
    globalLogPublisher.addObserver(logs)
    try:
        bad_client.sendall(b"x")
        good_client.sendall(b"y")
        served.until(lambda: bad.lost is not None and good.got == [b"y"])
    finally:
        globalLogPublisher.removeObserver(logs)
    assert "failed on its input" in logs.text()
    assert [str(e["log_failure"].value) for e in logs.events] == ["boom"]
    assert good.lost is None
    bad_client.close()
    good_client.close()
