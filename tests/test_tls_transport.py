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
from OpenSSL._util import lib as _ssl_lib
from twisted.internet.error import ConnectionDone
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

    def __init__(self, directory: Path, client_max_version: int | None = None) -> None:
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
        client_context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        if client_max_version is not None:
            client_context.set_max_proto_version(client_max_version)
        self.client = SSL.Connection(client_context, None)
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
    assert pair.wire.disconnecting
    pair.feed_client()
    with pytest.raises(SSL.ZeroReturnError):
        pair.client.recv(4096)  # our close_notify came back: a clean TLS end
    pair.server.connectionLost(Failure(ConnectionDone()))
    assert pair.app.lost is not None and pair.app.lost.check(ConnectionDone)


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


def test_records_whole_or_cut_never_take_twisteds_read_loop(
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
    data = pair.records(b"half")
    pair.server.dataReceived(data[:5])  # part of a record waits in OpenSSL
    assert len(pair.app.received) == 10
    pair.server.dataReceived(data[5:])
    assert pair.app.received[-1] == b"half"
    assert general == []


def test_a_record_that_makes_openssl_answer_has_its_answer_sent_at_once(
    tmp_path: Path,
) -> None:
    pair = Pair(tmp_path, client_max_version=SSL.TLS1_2_VERSION)
    assert pair.client.renegotiate()
    with pytest.raises(SSL.WantReadError):
        pair.client.do_handshake()  # a new ClientHello, which OpenSSL refuses with an alert
    pair.server.dataReceived(pair.take_client())
    assert pair.app.received == []
    assert pair.wire.value()  # the answer went to TCP in the same turn


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


def test_tls_decrypt_gives_every_whole_record_of_a_read(pair: Pair) -> None:
    conn = pair.server._tlsConnection
    assert internals.tls_decrypt(conn, pair.records(b"first", b"second")) == (
        b"firstsecond",
        None,
    )
    big = bytes(range(256)) * 64  # 16 KiB: the largest record, read whole
    assert internals.tls_decrypt(conn, pair.records(big)) == (big, None)
    x, third = pair.records(b"x"), pair.records(b"third")
    plaintext, stopped = internals.tls_decrypt(conn, x + third[:4])
    assert (plaintext, type(stopped)) == (b"x", SSL.WantReadError)  # part of a record waits
    assert internals.tls_decrypt(conn, third[4:]) == (b"third", None)


def test_tls_decrypt_returns_close_notify_after_the_data_before_it(pair: Pair) -> None:
    data = pair.records(b"last")
    pair.client.shutdown()
    data += pair.take_client()
    plaintext, stopped = internals.tls_decrypt(pair.server._tlsConnection, data)
    assert (plaintext, type(stopped)) == (b"last", SSL.ZeroReturnError)


def test_tls_decrypt_of_a_corrupt_record_returns_the_error_and_leaves_none_behind(
    pair: Pair,
) -> None:
    data = bytearray(pair.records(b"z" * 166))
    data[-1] ^= 0xFF
    plaintext, stopped = internals.tls_decrypt(pair.server._tlsConnection, bytes(data))
    assert plaintext == b""
    assert isinstance(stopped, SSL.Error) and "bad record mac" in str(stopped)
    assert _ssl_lib.ERR_peek_error() == 0  # nothing stale for another connection's call


def test_tls_encrypt_gives_the_record_the_client_reads(pair: Pair) -> None:
    conn = pair.server._tlsConnection
    for message in (b"frame", bytes(range(256)) * 64):
        records = internals.tls_encrypt(conn, message)
        assert internals.tls_unsent(conn) == 0
        pair.wire.write(records)
        assert pair.client_reads() == message


def test_tls_encrypt_raises_as_send_does_once_the_connection_is_shut(pair: Pair) -> None:
    conn = pair.server._tlsConnection
    conn.shutdown()
    with pytest.raises(SSL.Error):
        internals.tls_encrypt(conn, b"late")
    with pytest.raises(SSL.Error):
        conn.send(b"late")


def test_write_now_of_more_than_a_record_takes_the_buffered_way_in_order(pair: Pair) -> None:
    big = bytes(range(256)) * 64 * 3  # 48 KiB
    assert pair.server.write_now(big) == b""
    record = pair.server.write_now(b"after")
    assert pair.wire.value()  # the big write went to TCP before the frame's record
    pair.wire.write(record)
    assert pair.client_reads() == big + b"after"
