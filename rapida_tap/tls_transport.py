"""TLS for calls: Twisted's TLS transport with fewer crossings into OpenSSL per 20 ms frame.

Twisted's transport is general.  Every record that comes in is read in a loop that ends on
a ``WantReadError``, and the send side is then checked the same way: two exceptions raised
through pyOpenSSL per record.  Every write is gathered until the next reactor turn, then
handed to TCP, which waits for a writable event.  A call is one small record each way every
20 ms, so on wss:// those costs were most of a call's CPU.

This subclass keeps Twisted's code for everything that is not that plain case (handshake,
shutdown, alerts, partial records, flow control) and adds two shortcuts:

* in: the read loop stops when OpenSSL holds nothing more, instead of on the exception;
* both ways: each record crosses into OpenSSL once, without pyOpenSSL's per-call buffers
  (``internals.tls_*``);
* out: ``write_now`` encrypts a frame at once and returns the record, for ``FrameWriter`` to
  send straight to the socket when nothing waits in front of it.
"""

from __future__ import annotations

from OpenSSL import SSL
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory, TLSMemoryBIOProtocol

from rapida_tap import internals

READ_SIZE = 4096
"""Bytes asked of one ``SSL_read``: a call's record is 166-666 bytes; a bigger one takes more
reads of the same loop."""

RECORD_SIZE = 16384
"""The most plaintext one TLS record carries."""


class MediaTLSTransport(BufferingTLSTransport):
    """A server-side TLS connection that carries a call well (see the module docstring)."""

    def dataReceived(self, data: bytes) -> None:
        if self._handshakeDone and not self._appSendBuffer:
            internals.tls_feed(self._tlsConnection, data)
            self._flushReceiveBIO()
        else:
            super().dataReceived(data)

    def _flushReceiveBIO(self) -> None:
        conn = self._tlsConnection
        while not self._lostTLSConnection and internals.tls_unread(conn):
            try:
                data = internals.tls_recv(conn, READ_SIZE)
            except SSL.Error:
                break  # a partial record, close_notify or an alert: Twisted's loop below
            if not self._aborted:
                ProtocolWrapper.dataReceived(self, data)
        else:
            if not internals.tls_unsent(conn):
                return
        super()._flushReceiveBIO()

    def write_now(self, data: bytes) -> bytes:
        """Encrypt ``data`` now and return its records, to be written after whatever this
        connection already handed to TCP; ``b""`` when it went Twisted's buffered way."""
        if (
            self._appSendBuffer
            or not self._handshakeDone
            or self._lostTLSConnection
            or self.disconnecting
        ):
            self.write(data)
            return b""
        self._aggregator.flush()  # earlier small writes (a control message) go first
        conn = self._tlsConnection
        sent = 0
        try:
            if 0 < len(data) <= RECORD_SIZE:  # a frame: one record
                sent = internals.tls_send(conn, data)
            while sent < len(data):
                sent += internals.tls_send(conn, data[sent : sent + RECORD_SIZE])
        except SSL.Error:
            self._flushSendBIO()  # what was encrypted goes first, through TCP's buffer
            TLSMemoryBIOProtocol.write(self, data[sent:])  # sees the same error, handles it
            return b""
        return internals.tls_take_unsent(conn)


class MediaTLSFactory(TLSMemoryBIOFactory):
    """Wraps a server factory's connections in `MediaTLSTransport`."""

    protocol = MediaTLSTransport
