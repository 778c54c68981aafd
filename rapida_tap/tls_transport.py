"""TLS for calls: Twisted's TLS transport with fewer crossings into OpenSSL per 20 ms frame.

Twisted's transport is general.  Every record that comes in is read in a loop that ends on
a ``WantReadError``, and the send side is then checked the same way: two exceptions raised
through pyOpenSSL per record.  Every write is gathered until the next reactor turn, then
handed to TCP, which waits for a writable event.  A call is one small record each way every
20 ms, so on wss:// those costs were most of a call's CPU.

This subclass keeps Twisted's code for everything that is not that plain case (handshake,
shutdown, alerts, partial records, flow control, writes bigger than a record) and adds two
shortcuts, each crossing into OpenSSL as few times as it can (``internals.tls_*``):

* in: the records of one socket read are decrypted in one go and handed on as one read
  (part of a record waits in OpenSSL for the next read; close_notify and alerts end TLS as
  Twisted's own read loop ends it);
* out: ``write_now`` encrypts a frame at once and returns the record, for ``FrameWriter`` to
  send straight to the socket when nothing waits in front of it.
"""

from __future__ import annotations

from OpenSSL import SSL
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure

from rapida_tap import internals

RECORD_SIZE = 16384
"""The most plaintext one TLS record carries."""


class MediaTLSTransport(BufferingTLSTransport):
    """A server-side TLS connection that carries a call well (see the module docstring)."""

    def dataReceived(self, data: bytes) -> None:
        if not self._handshakeDone or self._appSendBuffer:
            super().dataReceived(data)
            return
        conn = self._tlsConnection
        plaintext, stopped = internals.tls_decrypt(conn, data)
        if plaintext and not self._aborted:
            ProtocolWrapper.dataReceived(self, plaintext)
        if stopped is None or isinstance(stopped, SSL.WantReadError):
            if internals.tls_unsent(conn):
                self._flushSendBIO()  # an answer OpenSSL made (an alert, a key update)
            return
        if self._lostTLSConnection:
            return
        # The end of TLS, handled as Twisted's own read loop handles it.
        if isinstance(stopped, SSL.ZeroReturnError):
            self._shutdownTLS()
            self._tlsShutdownFinished(None)
        else:
            self._tlsShutdownFinished(Failure(stopped))

    def write_now(self, data: bytes) -> bytes:
        """Encrypt ``data`` now and return its records, to be written after whatever this
        connection already handed to TCP; ``b""`` when it went Twisted's buffered way."""
        if (
            not 0 < len(data) <= RECORD_SIZE
            or self._appSendBuffer
            or not self._handshakeDone
            or self._lostTLSConnection
            or self.disconnecting
        ):
            self.write(data)
            return b""
        self._aggregator.flush()  # earlier small writes (a control message) go first
        try:
            return internals.tls_encrypt(self._tlsConnection, data)
        except SSL.Error:
            TLSMemoryBIOProtocol.write(self, data)  # sees the same error, handles it
            return b""


class MediaTLSFactory(TLSMemoryBIOFactory):
    """Wraps a server factory's connections in `MediaTLSTransport`."""

    protocol = MediaTLSTransport
