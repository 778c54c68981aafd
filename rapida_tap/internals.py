"""Every private Twisted and Autobahn attribute the hot paths rely on, checked at start-up.

Writing a 20 ms frame straight to the socket when nothing is buffered saves most of the
daemon's CPU per call (see ``AudioSocketProtocol``), and framing a WebSocket binary message by
hand saves Autobahn's general path; both need a look inside the libraries.  Those looks live
here only, and ``check()`` runs when the service is made, so an upgrade that removes one of
them stops the daemon at start-up with one line instead of failing calls.
"""

from __future__ import annotations

import select
import socket
from typing import Any, cast

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
        "_flushReceiveBIO",
        "_flushSendBIO",
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


# -- pyOpenSSL: one record in or out with one crossing into OpenSSL each ----------------------
#
# pyOpenSSL's ``recv``/``send``/``bio_read``/``bio_write`` each allocate a buffer or a buffer
# view and check their arguments before the one OpenSSL call; for a 20 ms frame each way that
# was more than the encryption.  These make the same OpenSSL calls on a buffer allocated once
# (the reactor is one thread) and leave every error to pyOpenSSL's own handling, so they raise
# exactly what the pyOpenSSL method would.

TLS_BUFFER_SIZE = 1 << 15
_tls_buffer = _ffi.new("char[]", TLS_BUFFER_SIZE)


def tls_unread(conn: SSL.Connection) -> int:
    """Bytes OpenSSL holds for reading: undecrypted input, or decrypted but not yet read."""
    return _ssl_lib.BIO_get_mem_data(conn._into_ssl, _ffi.NULL) or _ssl_lib.SSL_pending(conn._ssl)  # type: ignore[no-any-return]


def tls_unsent(conn: SSL.Connection) -> int:
    """Bytes of records OpenSSL has made and nobody has taken for the socket yet."""
    return _ssl_lib.BIO_get_mem_data(conn._from_ssl, _ffi.NULL)  # type: ignore[no-any-return]


def tls_take_unsent(conn: SSL.Connection) -> bytes:
    """Every byte of those records (``b""`` if none)."""
    size = tls_unsent(conn)
    if not size:
        return b""
    if size > TLS_BUFFER_SIZE:
        return conn.bio_read(size)
    got = _ssl_lib.BIO_read(conn._from_ssl, _tls_buffer, size)
    if got <= 0:
        conn._handle_bio_errors(conn._from_ssl, got)
        return b""
    return _ffi.buffer(_tls_buffer, got)[:]


def tls_feed(conn: SSL.Connection, data: bytes) -> None:
    """Hand OpenSSL bytes read from the socket (``conn.bio_write``)."""
    written = _ssl_lib.BIO_write(conn._into_ssl, data, len(data))
    if written <= 0:
        conn._handle_bio_errors(conn._into_ssl, written)


def tls_recv(conn: SSL.Connection, size: int) -> bytes:
    """Decrypted bytes, at most ``size`` (``conn.recv``): raises ``WantReadError`` and the rest
    as pyOpenSSL does."""
    got = _ssl_lib.SSL_read(conn._ssl, _tls_buffer, min(size, TLS_BUFFER_SIZE))
    if got <= 0:
        conn._raise_ssl_error(conn._ssl, got)
        return b""
    return _ffi.buffer(_tls_buffer, got)[:]


def tls_send(conn: SSL.Connection, data: bytes) -> int:
    """Encrypt ``data`` into records (``conn.send``); how many bytes it took."""
    sent = _ssl_lib.SSL_write(conn._ssl, data, len(data))
    if sent <= 0:
        conn._raise_ssl_error(conn._ssl, sent)
    return sent  # type: ignore[no-any-return]
