"""Every private Twisted and Autobahn attribute the hot paths rely on, checked at start-up.

Writing a 20 ms frame straight to the socket when nothing is buffered saves most of the
daemon's CPU per call (see ``AudioSocketProtocol``), and framing a WebSocket binary message by
hand saves Autobahn's general path; both need a look inside the libraries.  Those looks live
here only, and ``check()`` runs when the service is made, so an upgrade that removes one of
them stops the daemon at start-up with one line instead of failing calls.
"""

from __future__ import annotations

import socket
from typing import Any, cast

from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet import abstract, tcp


class LibraryChanged(RuntimeError):
    """An installed Twisted or Autobahn lacks something the daemon relies on."""


def check() -> None:
    """Raise ``LibraryChanged`` naming the first missing piece."""
    probe = abstract.FileDescriptor.__new__(abstract.FileDescriptor)
    abstract.FileDescriptor.__init__(probe, reactor=cast(Any, _NoReactor()))
    for name in ("dataBuffer", "_tempDataBuffer", "_tempDataLen"):
        if not hasattr(probe, name):
            raise LibraryChanged(f"twisted FileDescriptor has no {name}: upgrade rapida-asterisk")
    for name in ("STATE_OPEN", "SEND_STATE_GROUND", "sendData", "onCloseFrame", "sendCloseFrame"):
        if not hasattr(WebSocketProtocol, name):
            raise LibraryChanged(
                f"autobahn WebSocketProtocol has no {name}: upgrade rapida-asterisk"
            )


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


def websocket_open_and_idle(proto: WebSocketProtocol) -> bool:
    """Open, and no message half sent: a whole frame may be written by hand."""
    return proto.state == proto.STATE_OPEN and proto.send_state == proto.SEND_STATE_GROUND
