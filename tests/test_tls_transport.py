"""`MediaTLSTransport` on memory, against a pyOpenSSL client: the shortcuts and every other case.

The server side is the daemon's TLS transport over a ``StringTransport`` with a Clock; the
client is a plain pyOpenSSL connection over memory BIOs, so each test decides exactly which
TLS bytes arrive in which read.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from OpenSSL import SSL
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure

from rapida_tap import internals, tls
from rapida_tap.tls_transport import MediaTLSFactory, MediaTLSTransport
from tests.certs import make_cert


class Recorder(Protocol):
    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.lost = reason


class Pair:
    """The daemon's TLS transport and a client, joined by hand."""

    def __init__(self, directory: Path) -> None:
        key, cert = make_cert(directory)
        spec = tls.parse_tls_endpoint(f"ssl:0:privateKey={key}:certKey={cert}")
        self.clock = Clock()
        self.app = Recorder()
        factory = MediaTLSFactory(
            tls.TlsServerContext(spec), False, Factory.forProtocol(lambda: self.app), self.clock
        )
        self.server: MediaTLSTransport = factory.buildProtocol(None)  # type: ignore[assignment]
        self.wire = StringTransport()
        self.server.makeConnection(self.wire)
        self.client = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)
        self.client.set_connect_state()
        for _ in range(4):
            self.client_step()
        assert self.server._handshakeDone

    def client_step(self) -> None:
        try:
            self.client.do_handshake()
        except SSL.WantReadError:
            pass
        data = self.take_client()
        if data:
            self.server.dataReceived(data)
        self.feed_client()

    def take_client(self) -> bytes:
        try:
            return self.client.bio_read(1 << 20)
        except SSL.WantReadError:
            return b""

    def feed_client(self) -> None:
        data = self.wire.value()
        self.wire.clear()
        if data:
            self.client.bio_write(data)

    def records(self, *messages: bytes) -> bytes:
        """Each message as its own record, as the client would send them."""
        out = b""
        for message in messages:
            self.client.send(message)
            out += self.take_client()
        return out

    def client_reads(self) -> bytes:
        self.feed_client()
        got = b""
        while True:
            try:
                got += self.client.recv(1 << 16)
            except SSL.WantReadError:
                return got


@pytest.fixture
def pair(tmp_path: Path) -> Pair:
    return Pair(tmp_path)


def test_records_in_one_read_reach_the_protocol_in_order(pair: Pair) -> None:
    frames = [bytes([i]) * 166 for i in range(5)]
    pair.server.dataReceived(pair.records(*frames))
    assert b"".join(pair.app.received) == b"".join(frames)
    assert pair.app.lost is None


def test_a_record_cut_into_single_bytes_arrives_whole(pair: Pair) -> None:
    data = pair.records(b"x" * 166, b"y" * 166)
    for i in range(len(data)):
        pair.server.dataReceived(data[i : i + 1])
    assert b"".join(pair.app.received) == b"x" * 166 + b"y" * 166


def test_a_record_larger_than_one_read_is_read_whole(pair: Pair) -> None:
    big = bytes(range(256)) * 60  # 15360 bytes in one record: several reads
    pair.server.dataReceived(pair.records(big))
    assert b"".join(pair.app.received) == big


def test_write_now_gives_the_record_at_once_after_earlier_buffered_writes(pair: Pair) -> None:
    pair.server.write(b"command;")  # Twisted's buffered way, until the next reactor turn
    record = pair.server.write_now(b"frame")
    assert record
    assert pair.wire.value()  # the earlier write went to TCP first
    pair.wire.write(record)
    assert pair.client_reads() == b"command;frame"


def test_write_now_before_the_handshake_or_after_the_end_takes_the_buffered_way(
    tmp_path: Path,
) -> None:
    clock = Clock()
    key, cert = make_cert(tmp_path)
    spec = tls.parse_tls_endpoint(f"ssl:0:privateKey={key}:certKey={cert}")
    factory = MediaTLSFactory(
        tls.TlsServerContext(spec), False, Factory.forProtocol(Recorder), clock
    )
    server: MediaTLSTransport = factory.buildProtocol(None)  # type: ignore[assignment]
    server.makeConnection(StringTransport())
    assert server.write_now(b"early") == b""  # no handshake yet: buffered by Twisted
    assert server._appSendBuffer or server._aggregator._buffer  # type: ignore[attr-defined]


def test_close_notify_ends_the_connection_cleanly(pair: Pair) -> None:
    pair.client.shutdown()
    pair.server.dataReceived(pair.take_client())
    assert pair.server._lostTLSConnection
    pair.server.connectionLost(Failure(ConnectionError("closed")))
    assert pair.app.lost is not None


def test_data_then_close_notify_in_one_read(pair: Pair) -> None:
    data = pair.records(b"bye")
    pair.client.shutdown()
    pair.server.dataReceived(data + pair.take_client())
    assert pair.app.received == [b"bye"]
    assert pair.server._lostTLSConnection


def test_a_corrupt_record_ends_the_connection_with_an_alert(pair: Pair) -> None:
    data = bytearray(pair.records(b"z" * 166))
    data[-1] ^= 0xFF  # the authentication tag no longer matches
    pair.server.dataReceived(bytes(data))
    assert pair.app.received == []
    assert pair.server._lostTLSConnection
    assert pair.wire.value()  # an alert went out
    assert pair.wire.disconnecting or pair.wire.disconnected


def test_whole_records_never_take_twisteds_read_loop(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    general: list[int] = []
    original = TLSMemoryBIOProtocol._flushReceiveBIO

    def counting(self: TLSMemoryBIOProtocol) -> None:
        general.append(1)
        original(self)

    monkeypatch.setattr(TLSMemoryBIOProtocol, "_flushReceiveBIO", counting)
    for i in range(10):
        pair.server.dataReceived(pair.records(bytes([i]) * 166))
    assert len(pair.app.received) == 10
    assert general == []
    data = pair.records(b"half")
    pair.server.dataReceived(data[:5])  # a partial record: the general loop says "want more"
    assert general == [1]
    pair.server.dataReceived(data[5:])
    assert pair.app.received[-1] == b"half"


@settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.lists(st.integers(min_value=1, max_value=4000), max_size=10), st.integers(1, 20))
def test_records_cut_anywhere_arrive_whole_and_in_order(
    pair: Pair, cuts: list[int], frames: int
) -> None:
    messages = [bytes([i]) * (166 + i) for i in range(frames)]
    data = pair.records(*messages)
    before = b"".join(pair.app.received)
    points = sorted({c % len(data) for c in cuts} - {0})
    for start, end in zip([0, *points], [*points, len(data)], strict=True):
        pair.server.dataReceived(data[start:end])
    assert b"".join(pair.app.received) == before + b"".join(messages)


# -- the direct OpenSSL calls raise and return exactly what pyOpenSSL's methods would --------


def test_tls_recv_returns_a_copy_and_raises_as_recv_does(pair: Pair) -> None:
    conn = pair.server._tlsConnection
    with pytest.raises(SSL.WantReadError):
        internals.tls_recv(conn, 4096)
    internals.tls_feed(conn, pair.records(b"first", b"second"))
    first = internals.tls_recv(conn, 4096)
    second = internals.tls_recv(conn, 3)  # at most what was asked, the rest stays
    assert (first, second, internals.tls_recv(conn, 4096)) == (b"first", b"sec", b"ond")
    pair.client.shutdown()
    internals.tls_feed(conn, pair.take_client())
    with pytest.raises(SSL.ZeroReturnError):
        internals.tls_recv(conn, 4096)


def test_tls_recv_raises_on_a_corrupt_record_as_recv_does(pair: Pair) -> None:
    data = bytearray(pair.records(b"z" * 166))
    data[-1] ^= 0xFF
    internals.tls_feed(pair.server._tlsConnection, bytes(data))
    with pytest.raises(SSL.Error, match="bad record mac"):
        internals.tls_recv(pair.server._tlsConnection, 4096)


def test_tls_send_and_take_unsent_give_records_the_client_reads(pair: Pair) -> None:
    conn = pair.server._tlsConnection
    assert internals.tls_take_unsent(conn) == b""
    big = bytes(range(256)) * 64 * 3  # 48 KiB: more records than the shared buffer holds
    for message in (b"frame", big):
        sent = 0
        while sent < len(message):
            sent += internals.tls_send(conn, message[sent : sent + 16384])
        records = internals.tls_take_unsent(conn)
        assert internals.tls_unsent(conn) == 0
        pair.wire.write(records)
        assert pair.client_reads() == message


def test_tls_send_raises_as_send_does_once_the_connection_is_shut(pair: Pair) -> None:
    conn = pair.server._tlsConnection
    conn.shutdown()
    with pytest.raises(SSL.Error):
        internals.tls_send(conn, b"late")
    with pytest.raises(SSL.Error):
        conn.send(b"late")
