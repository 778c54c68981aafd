"""A call's frames straight to the kernel, when nothing waits in Twisted's buffers.

``transport.write`` only buffers and asks the reactor for a writable event; for one frame per
call per 20 ms tick that costs two ``epoll_ctl`` calls, an event dispatch and the ``send``,
roughly a third of the daemon's CPU.  A direct ``send`` is one syscall, and the pacer's tick
*is* the send time.  What the kernel does not take goes through ``transport.write`` as
before, so buffering, ordering and producer pausing stay Twisted's.  Over TLS the frame is
encrypted at once (`MediaTLSTransport.write_now`) and its record sent the same way.

Reads are made smaller too: Twisted allocates its 64 KiB read buffer for every ``recv``, and
a call's reads are a frame or a few (a burst of five μ-law frames is 830 bytes).
"""

from __future__ import annotations

from typing import Any

from rapida_tap import internals
from rapida_tap.tls_transport import MediaTLSTransport

READ_BYTES = 4096


class FrameWriter:
    """Writes one leg's frames: at once if possible, else through its transport."""

    __slots__ = ("_socket", "_tcp", "_tls")

    def __init__(self, transport: Any) -> None:
        self._tls = transport if isinstance(transport, MediaTLSTransport) else None
        self._tcp = transport.transport if self._tls is not None else transport
        self._socket = internals.direct_socket(self._tcp)
        if self._socket is not None:
            self._tcp.bufferSize = READ_BYTES

    def write(self, data: bytes) -> None:
        if self._tls is not None:
            data = self._tls.write_now(data)
            if not data:
                return
        sock = self._socket
        tcp = self._tcp
        if sock is not None and internals.nothing_buffered(tcp):
            try:
                sent = sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                sent = 0  # let the transport see and report the error
                self._socket = None
            if sent == len(data):
                return
            data = data[sent:]
        tcp.write(data)

    def detach(self) -> None:
        """The connection is gone: nothing more goes to its socket directly."""
        self._socket = None
