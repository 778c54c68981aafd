"""Every private Twisted and Autobahn attribute the hot paths rely on, checked at start-up.

Writing a 20 ms frame straight to the socket when nothing is buffered saves most of the
daemon's CPU per call (see ``AudioSocketProtocol``), and framing a WebSocket binary message by
hand saves Autobahn's general path; both need a look inside the libraries.  Those looks live
here only, and ``check()`` runs when the service is made, so an upgrade that removes one of
them stops the daemon at start-up with one line instead of failing calls.
"""

from __future__ import annotations

import pprint
import select
import socket
from typing import Any, cast

from autobahn.websocket import protocol as autobahn_protocol
from autobahn.websocket.protocol import WebSocketProtocol
from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _ssl_lib
from twisted.internet import abstract, epollreactor, main, tcp
from twisted.logger import Logger
from twisted.protocols import tls


class LibraryChanged(RuntimeError):
    """An installed Twisted or Autobahn lacks something the daemon relies on."""


def check() -> None:
    """Raise ``LibraryChanged`` naming the first missing piece."""
    probe = abstract.FileDescriptor.__new__(abstract.FileDescriptor)
    abstract.FileDescriptor.__init__(probe, reactor=cast(Any, _NoReactor()))
    for name in ("dataBuffer", "_tempDataBuffer", "_tempDataLen"):
        if not hasattr(probe, name):
            raise LibraryChanged(f"twisted FileDescriptor has no {name}: upgrade rapida-asterisk")
    for name in (
        "STATE_OPEN",
        "SEND_STATE_GROUND",
        "_dataReceived",
        "sendData",
        "onCloseFrame",
        "sendCloseFrame",
    ):
        if not hasattr(WebSocketProtocol, name):
            raise LibraryChanged(
                f"autobahn WebSocketProtocol has no {name}: upgrade rapida-asterisk"
            )

    _check_tls()


def _check_tls() -> None:
    """What ``rapida_tap.tls_transport`` and the ``tls_*`` helpers below use."""
    names = (
        "_flushSendBIO",
        "_shutdownTLS",
        "_tlsShutdownFinished",
        "_lostTLSConnection",
        "_aborted",
        "_handshakeDone",
    )
    for name in names:
        if not hasattr(tls.TLSMemoryBIOProtocol, name):
            raise LibraryChanged(
                f"twisted TLSMemoryBIOProtocol has no {name}: upgrade rapida-asterisk"
            )
    if "_aggregator" not in getattr(tls.BufferingTLSTransport, "__annotations__", {}):
        raise LibraryChanged(
            "twisted BufferingTLSTransport has no _aggregator: upgrade rapida-asterisk"
        )
    conn = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
    bindings = ("BIO_get_mem_data", "BIO_read", "BIO_write", "SSL_read", "SSL_write", "SSL_pending")
    insides = ("_from_ssl", "_into_ssl", "_ssl", "_raise_ssl_error", "_handle_bio_errors")
    if not all(hasattr(_ssl_lib, name) for name in bindings) or not all(
        hasattr(conn, name) for name in insides
    ):
        raise LibraryChanged("pyOpenSSL has no memory BIO bindings: upgrade rapida-asterisk")


def dispatch_events_directly(reactor: object) -> bool:
    """Make an epoll reactor hand each event straight to its connection.

    Twisted's epoll reactor wraps every event in ``log.callWithLogger``, which copies two
    context dicts so that old-style ``log.msg`` lines carry the connection's prefix.  The
    daemon logs through twisted.logger with its own fields, and a call is one read event
    every 20 ms, so that wrapper cost several microseconds per frame.  A TCP connection that
    is only readable (nearly every event: a frame) is read here as ``Connection.doRead`` would,
    with the same outcomes (closed, reset, a protocol that raises).  Only an exact
    ``EPollReactor`` with the expected insides is changed (True); any other reactor is left
    as it is (False): slower, still correct.
    """
    names = ("_poller", "_selectables", "_doReadOrWrite", "_disconnectSelectable")
    if (
        type(reactor) is not epollreactor.EPollReactor
        or not all(hasattr(reactor, name) for name in names)
        or not isinstance(getattr(tcp.Server, "bufferSize", None), int)
    ):
        return False
    poller = reactor._poller
    selectables = reactor._selectables
    handle = reactor._doReadOrWrite
    disconnect = reactor._disconnectSelectable
    readable = select.EPOLLIN
    server = tcp.Server

    def doPoll(timeout: float | None) -> None:
        try:
            events = poller.poll(-1 if timeout is None else timeout, len(selectables))
        except InterruptedError:
            return
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            if event == readable and type(selectable) is server:
                # A TCP connection with bytes to read, and nothing else to say: what
                # ``Connection.doRead`` does, without three calls in between.
                try:
                    data = selectable.socket.recv(selectable.bufferSize)
                except BlockingIOError:
                    continue
                except OSError:
                    disconnect(selectable, main.CONNECTION_LOST, True)
                    continue
                if not data:
                    disconnect(selectable, main.CONNECTION_DONE, True)
                    continue
                try:
                    selectable.protocol.dataReceived(data)
                except BaseException as e:  # Twisted's own rule: log, then drop the connection
                    _log.failure("{selectable!r} failed on its input", selectable=selectable)
                    disconnect(selectable, e, True)
                continue
            try:
                handle(selectable, fd, event)
            except Exception:
                _log.failure("handling an event of {selectable!r} failed", selectable=selectable)

    reactor.doIteration = reactor.doPoll = doPoll  # type: ignore[method-assign]
    return True


_log = Logger()


class _PrettyWhenWritten:
    """``pprint.pformat(value)``, done only if a log line that holds it is ever written."""

    __slots__ = ("_value",)

    def __init__(self, value: object) -> None:
        self._value = value

    def __format__(self, spec: str) -> str:
        return format(pprint.pformat(self._value), spec)

    def __str__(self) -> str:
        return pprint.pformat(self._value)

    __repr__ = __str__


def defer_autobahn_settings_dump() -> bool:
    """Make Autobahn's debug dump of each new connection's settings cost nothing unless it
    is logged.

    Autobahn pretty-prints ~40 settings for a debug line on every WebSocket connection,
    before the logger drops it (the daemon logs Autobahn at error level): a sixth of the
    CPU of setting up a wss:// call.  True if the dump was found and deferred; False leaves
    Autobahn as it is (slower, still correct).
    """
    if getattr(autobahn_protocol, "pformat", None) is not pprint.pformat:
        return False
    autobahn_protocol.pformat = _PrettyWhenWritten  # type: ignore[assignment]
    return True


class _NoReactor:
    """Enough of a reactor for ``FileDescriptor.__init__``."""

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(name)


def direct_socket(transport: object) -> socket.socket | None:
    """The plain TCP socket under ``transport``, or None (TLS, memory transports, tests)."""
    if type(transport) is not tcp.Server or getattr(transport, "TLS", False):
        return None
    return getattr(transport, "socket", None)


def nothing_buffered(transport: Any) -> bool:
    """The transport has no bytes waiting: a direct ``send`` keeps the order of the stream."""
    return not transport.dataBuffer and not transport._tempDataBuffer


def websocket_between_frames(proto: WebSocketProtocol) -> bool:
    """Autobahn holds no part of an incoming frame or message: the next byte starts a frame.

    Read defensively: if a release renames these, the answer is False and every frame takes
    Autobahn's own path (slower, still correct).
    """
    return (
        getattr(proto, "current_frame", False) is None
        and not getattr(proto, "data", True)
        and not getattr(proto, "inside_message", True)
    )


def websocket_open_and_idle(proto: WebSocketProtocol) -> bool:
    """Open, and no message half sent: a whole frame may be written by hand."""
    return proto.state == proto.STATE_OPEN and proto.send_state == proto.SEND_STATE_GROUND


# -- pyOpenSSL: a socket read in, a frame out, with as few crossings into OpenSSL as can be ---
#
# pyOpenSSL's ``recv``/``send``/``bio_read``/``bio_write`` each allocate a buffer or a buffer
# view and check their arguments before the one OpenSSL call, and Twisted asks OpenSSL twice
# more per record whether anything is left; for a 20 ms frame each way that was more than the
# encryption.  These make the same OpenSSL calls on a buffer allocated once (the reactor is
# one thread) and leave every error to pyOpenSSL's own handling, so each error is exactly the
# one the pyOpenSSL method would raise.

TLS_BUFFER_SIZE = 1 << 15
"""Twice the most plaintext a TLS record carries: one ``SSL_read`` takes a whole record."""
_tls_buffer = _ffi.new("char[]", TLS_BUFFER_SIZE)


def tls_unsent(conn: SSL.Connection) -> int:
    """Bytes of records OpenSSL has made and nobody has taken for the socket yet."""
    return _ssl_lib.BIO_get_mem_data(conn._from_ssl, _ffi.NULL)  # type: ignore[no-any-return]


def tls_decrypt(conn: SSL.Connection, data: bytes) -> tuple[bytes, SSL.Error | None]:
    """Hand OpenSSL ``data`` read from the socket; the plaintext of every whole record in it.

    Returns the plaintext and what stopped the reading: None when OpenSSL holds nothing more,
    else the error ``conn.recv`` would have raised there (``WantReadError``: part of a record
    waits for more, or a record had nothing for the application; ``ZeroReturnError``:
    close_notify; any other: an alert or a corrupt record).  It is returned, not raised, so
    that what was decrypted before it is not lost; OpenSSL's error queue is emptied either way.
    """
    into = conn._into_ssl
    written = _ssl_lib.BIO_write(into, data, len(data))
    if written <= 0:
        conn._handle_bio_errors(into, written)
    ssl = conn._ssl
    plaintext = b""
    while True:
        got = _ssl_lib.SSL_read(ssl, _tls_buffer, TLS_BUFFER_SIZE)
        if got <= 0:
            try:
                conn._raise_ssl_error(ssl, got)
            except SSL.Error as e:
                return plaintext, e
            return plaintext, None
        plaintext += _ffi.unpack(_tls_buffer, got)
        if not _ssl_lib.BIO_get_mem_data(into, _ffi.NULL) and not _ssl_lib.SSL_pending(ssl):
            return plaintext, None


def tls_encrypt(conn: SSL.Connection, data: bytes) -> bytes:
    """Encrypt ``data`` (at most one record's worth) and take its record for the socket.

    Raises as ``conn.send`` would; on an error nothing of ``data`` was encrypted.
    """
    ssl = conn._ssl
    sent = _ssl_lib.SSL_write(ssl, data, len(data))
    if sent <= 0:
        conn._raise_ssl_error(ssl, sent)
    from_ssl = conn._from_ssl
    records = b""
    while True:
        got = _ssl_lib.BIO_read(from_ssl, _tls_buffer, TLS_BUFFER_SIZE)
        if got <= 0:
            return records  # taken to the last byte
        records += _ffi.unpack(_tls_buffer, got)
        if got < TLS_BUFFER_SIZE:
            return records
